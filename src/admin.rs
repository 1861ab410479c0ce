//! The admin listener: `/healthz` (process up) and `/readyz` (every credential holds a token).

use std::collections::BTreeMap;
use std::convert::Infallible;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::cache::TokenSource;
use crate::body::{ProxyBody, ProxyResponse};
use crate::gateway::SharedLive;

/// The admin service over `credentials`.
pub fn service(
    live: SharedLive,
) -> impl tower::Service<
    Request<Incoming>,
    Response = ProxyResponse,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        let live = live.load_full();
        async move { Ok(handle(req, &live.credentials).await) }
    })
}

async fn handle(
    req: Request<Incoming>,
    credentials: &BTreeMap<String, TokenSource>,
) -> ProxyResponse {
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        "/readyz" => {
            let mut missing = Vec::new();
            for (name, source) in credentials {
                if source.current().await.is_none() {
                    missing.push(name.as_str());
                }
            }
            if missing.is_empty() {
                json(StatusCode::OK, serde_json::json!({ "status": "ready" }))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "not_ready", "reason": "no valid token", "credentials": missing }),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "kind": "not_found" }),
        ),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> ProxyResponse {
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
