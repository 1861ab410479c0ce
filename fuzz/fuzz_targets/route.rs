//! Route matching and rewriting on a fixed table: any method, target, Host and version either
//! routes onto an upstream URI or is refused with a typed error.
#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokengate::Gateway;
use tokengate::gateway::routes::RouteCtx;
use tokengate::layers::route::route_request;

static GATEWAY: LazyLock<Gateway> = LazyLock::new(|| {
    let text = r#"
[credentials.partner]
auth_url = "http://127.0.0.1:9/v2/auth"
agent_id = "fuzz"
secret = { env = "S" }

[[routes]]
host = "api.example.com"
path_prefix = "/v1/"
upstream = "https://api.example.com/base/"
credential = "partner"
strip_prefix = true

[[routes]]
path_prefix = "/keep"
upstream = "http://127.0.0.1:8081"
credential = "partner"
client_authorization = "keep"

[[routes]]
host = "[::1]:8443"
upstream = "http://127.0.0.1:8082"
credential = "partner"
"#;
    let config = tokengate::Config::parse(text, "fuzz.toml").unwrap();
    let env = BTreeMap::from([("S".to_owned(), "secret".to_owned())]);
    // Building clients needs a runtime context for nothing here, but keep one alive anyway.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    Gateway::new(config, "fuzz.toml", &env).unwrap()
});

fuzz_target!(|input: (&str, &str, &str, bool, bool)| {
    let (method, target, host, http2, with_auth) = input;
    let Ok(mut req) = http::Request::builder()
        .method(method)
        .uri(target)
        .version(if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        })
        .body(())
    else {
        return;
    };
    if let Ok(host) = http::HeaderValue::try_from(host) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    if with_auth {
        req.headers_mut().insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Basic x"),
        );
    }
    let snapshot = GATEWAY.snapshot();
    if route_request(&snapshot.routes, &mut req).is_ok() {
        let ctx = req
            .extensions()
            .get::<RouteCtx>()
            .expect("a routed request carries its route");
        let uri = req.uri();
        assert!(uri.scheme().is_some() && uri.authority().is_some());
        assert!(uri.path().starts_with('/'));
        assert!(!req.headers().contains_key(http::header::HOST));
        if ctx.inject {
            assert!(!req.headers().contains_key(http::header::AUTHORIZATION));
        }
    }
});
