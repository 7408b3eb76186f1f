//! The admin listener: `/healthz` (the process runs), `/readyz` (JSON of each check) and
//! `/metrics` (Prometheus text). No authentication: it must stay off the public network.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::state::Shared;

/// Answers one request on the admin listener.
pub async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return GatewayError::RouteNotFound.to_response();
    }
    match request.uri().path() {
        "/healthz" => {
            let mode = shared.snapshot().auth.mode();
            json_response(
                StatusCode::OK,
                &json!({"status": "ok", "auth_mode": mode.effective.as_str()}),
            )
        }
        "/readyz" => readiness(shared).await,
        "/metrics" => {
            // The mode can change live (the first service token switches enforcement
            // on), so the gauge is brought up to date when it is read. `ready` is set by
            // each /readyz probe: a scrape must not ping the store.
            let enforced = shared.snapshot().auth.mode().enforced;
            shared.metrics.auth_enforced.set(i64::from(enforced));
            let mut response = Response::new(body::full(shared.metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => GatewayError::RouteNotFound.to_response(),
    }
}

/// Longest wait for the token store when answering a readiness probe.
const STORE_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn readiness(shared: &Shared) -> Response<Body> {
    let store = &shared.services.store;
    let store_check = match tokio::time::timeout(STORE_PING_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => Ok(store.backend()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer in time".to_string()),
    };
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut check = |name: &str, ok: bool, detail: &str| {
        ready &= ok;
        checks.insert(name.into(), json!({"ok": ok, "detail": detail}));
    };
    let bound = shared.listeners_bound();
    check(
        "listeners",
        bound,
        if bound { "bound" } else { "not yet bound" },
    );
    match &store_check {
        Ok(backend) => check("token_store", true, backend),
        Err(error) => check("token_store", false, error),
    }
    let draining = shared.is_draining();
    check(
        "shutdown",
        !draining,
        if draining { "draining" } else { "running" },
    );
    let snapshot = shared.snapshot();
    if let Some(jwks) = snapshot.auth.remote_jwks() {
        let fetched = jwks.is_ready();
        let detail = if fetched {
            "keys fetched"
        } else {
            "waiting for the first fetch"
        };
        check("jwks", fetched, detail);
    }
    shared.metrics.ready.set(i64::from(ready));
    let mode = snapshot.auth.mode();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "auth_mode": mode.effective.as_str(),
        "auth_enforced": mode.enforced,
        "auth_mode_reason": mode.reason,
        "routes": snapshot.routes.len(),
        "checks": checks,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
