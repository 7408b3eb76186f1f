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
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/readyz" => readiness(shared),
        "/metrics" => {
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

fn readiness(shared: &Shared) -> Response<Body> {
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
    let draining = shared.is_draining();
    check(
        "shutdown",
        !draining,
        if draining { "draining" } else { "running" },
    );
    let snapshot = shared.snapshot();
    let routes = snapshot.routes.len();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "routes": routes,
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
