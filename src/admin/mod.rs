//! The admin listener: `/healthz` (process up), `/readyz` (every credential a route uses has
//! had its first exchange answered), `/metrics` (Prometheus), and the credentials API:
//! `GET /admin/credentials` (state, expiry, age, last error and logUUID; never a token),
//! `POST /admin/credentials/NAME/refresh` and `/invalidate`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::ErrorChain;
use crate::auth::cache::{Readiness, TokenSource};
use crate::body::{ClientBody, ProxyBody, ProxyResponse};
use crate::error::ProxyError;
use crate::gateway::{Live, SharedLive};
use crate::metrics::{Metrics, TokenReading};

/// The admin service over the current snapshot's credentials.
pub fn service(
    live: SharedLive,
    metrics: Arc<Metrics>,
) -> impl tower::Service<
    Request<ClientBody>,
    Response = ProxyResponse,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<ClientBody>| {
        let live = live.load_full();
        let metrics = metrics.clone();
        async move { Ok(handle(req, &live, &metrics).await) }
    })
}

/// The endpoints, for `not_found` answers.
const ENDPOINTS: &str = "GET /healthz, GET /readyz, GET /metrics, GET /admin/credentials, \
POST /admin/credentials/NAME/refresh, POST /admin/credentials/NAME/invalidate";

async fn handle(req: Request<ClientBody>, live: &Live, metrics: &Metrics) -> ProxyResponse {
    let credentials = &live.credentials;
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => readyz(live),
        (&Method::GET, "/metrics") => {
            let now = Instant::now();
            let mut readings = Vec::with_capacity(credentials.len());
            for (name, source) in credentials {
                let expires_at = source.current().await.map(|t| t.expires_at());
                readings.push(TokenReading {
                    credential: name,
                    expires_in: expires_at
                        .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
                    backing_off: source.backing_off(),
                });
            }
            let mut response = Response::new(ProxyBody::full(metrics.render(readings)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (&Method::GET, "/admin/credentials") => {
            let mut all = serde_json::Map::new();
            for (name, source) in credentials {
                all.insert(name.clone(), describe(source).await);
            }
            json_response(StatusCode::OK, all.into())
        }
        (&Method::POST, _) if path.starts_with("/admin/credentials/") => {
            let rest = &path["/admin/credentials/".len()..];
            let Some((name, action)) = rest.rsplit_once('/') else {
                return not_found(path);
            };
            let Some(source) = credentials.get(name) else {
                return no_such_credential(name, live);
            };
            match action {
                "refresh" => match source.refresh().await {
                    Ok(_) => json_response(StatusCode::OK, describe(source).await),
                    Err(error) => ProxyError::Auth {
                        credential: source.name().clone(),
                        source: error,
                        retry_after: std::time::Duration::ZERO,
                    }
                    .into_response(),
                },
                "invalidate" => {
                    source.invalidate().await;
                    tracing::info!(credential = name, "token invalidated by the admin API");
                    json_response(StatusCode::OK, describe(source).await)
                }
                _ => not_found(path),
            }
        }
        _ => not_found(path),
    }
}

/// Readiness: 503 `warming_up` until every credential a route uses has had an exchange answer
/// since start or its last invalidation; then 200, `ready` when each holds a token, else
/// `degraded` with each failing credential's last error. A refusal or an outage of the provider
/// is the same for every replica, so an unready pod would only turn the proxy's explanatory
/// `auth_rejected` / `auth_unavailable` answers into connection refusals.
fn readyz(live: &Live) -> ProxyResponse {
    let mut warming = Vec::new();
    let mut failing = serde_json::Map::new();
    for (name, source) in live.routed_credentials() {
        match source.readiness() {
            Readiness::Ready => {}
            Readiness::Warming => warming.push(name.as_str()),
            Readiness::Failing => {
                let error = source.last_error().map(|e| ErrorChain(&*e).to_string());
                failing.insert(name.clone(), json!({ "last_error": error }));
            }
        }
    }
    if !warming.is_empty() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "status": "warming_up",
                "reason": "waiting for the first token exchange",
                "credentials": warming,
            }),
        )
    } else if !failing.is_empty() {
        json_response(
            StatusCode::OK,
            json!({ "status": "degraded", "credentials": failing }),
        )
    } else {
        json_response(StatusCode::OK, json!({ "status": "ready" }))
    }
}

/// What an operator may see of a credential: never the token.
async fn describe(source: &TokenSource) -> serde_json::Value {
    let now = Instant::now();
    let token = source.current().await;
    let state = match (&token, source.backing_off()) {
        (Some(_), _) => "valid",
        (None, true) => "backing_off",
        (None, false) => "no_token",
    };
    json!({
        "state": state,
        "expires_in_s": token.as_ref().map(|t| t.expires_at().saturating_duration_since(now).as_secs()),
        "age_s": token.as_ref().map(|t| now.saturating_duration_since(t.obtained_at()).as_secs()),
        "generation": token.as_ref().map(|t| t.generation()),
        "token_origin": token.as_ref().map(|t| t.origin().as_str()),
        "fleet_generation": token.as_ref().and_then(|t| t.fleet_generation()),
        "shared": source.shared(),
        "backing_off": source.backing_off(),
        "last_error": source.last_error().map(|e| ErrorChain(&*e).to_string()),
        "last_log_uuid": source.last_log_uuid(),
        "exchanges": source.exchanges(),
    })
}

fn not_found(path: &str) -> ProxyResponse {
    json_response(
        StatusCode::NOT_FOUND,
        json!({
            "kind": "not_found",
            "message": format!("no admin endpoint at `{path}`; the endpoints are {ENDPOINTS}"),
        }),
    )
}

fn no_such_credential(name: &str, live: &Live) -> ProxyResponse {
    let known: Vec<&str> = live.credentials.keys().map(String::as_str).collect();
    json_response(
        StatusCode::NOT_FOUND,
        json!({
            "kind": "not_found",
            "message": format!(
                "no credential `{name}`; configured: {}",
                live.config.credential_names()
            ),
            "credential": name,
            "known": known,
        }),
    )
}

fn json_response(status: StatusCode, body: serde_json::Value) -> ProxyResponse {
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
