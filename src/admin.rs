//! The admin listener: `/healthz` (process up), `/readyz` (every credential holds a usable token),
//! `/metrics` (Prometheus),
//! and the credentials API: `GET /admin/credentials` (state, expiry, age, last error and logUUID;
//! never a token), `POST /admin/credentials/NAME/refresh` and `/invalidate`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::auth::cache::TokenSource;
use crate::body::{ClientBody, ProxyBody, ProxyResponse};
use crate::error::{Chain, ProxyError};
use crate::gateway::SharedLive;
use crate::metrics::Metrics;

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
        async move { Ok(handle(req, &live.credentials, &metrics).await) }
    })
}

async fn handle(
    req: Request<ClientBody>,
    credentials: &BTreeMap<String, TokenSource>,
    metrics: &Metrics,
) -> ProxyResponse {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => readyz(credentials).await,
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(ProxyBody::full(metrics.render(credentials).await));
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
                return not_found();
            };
            let Some(source) = credentials.get(name) else {
                return not_found();
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
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

async fn readyz(credentials: &BTreeMap<String, TokenSource>) -> ProxyResponse {
    let mut missing = Vec::new();
    for (name, source) in credentials {
        if source.current().await.is_none() {
            missing.push(name.as_str());
        }
    }
    if missing.is_empty() {
        json_response(StatusCode::OK, json!({ "status": "ready" }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "not_ready", "reason": "no valid token", "credentials": missing }),
        )
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
        "backing_off": source.backing_off(),
        "last_error": source.last_error().map(|e| Chain(&*e).to_string()),
        "last_log_uuid": source.last_log_uuid(),
        "exchanges": source.exchanges(),
    })
}

fn not_found() -> ProxyResponse {
    json_response(StatusCode::NOT_FOUND, json!({ "kind": "not_found" }))
}

fn json_response(status: StatusCode, body: serde_json::Value) -> ProxyResponse {
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
