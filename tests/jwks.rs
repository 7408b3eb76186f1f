//! The remote JWKS against a real HTTP JWKS server: readiness waits for the first fetch,
//! rotation to a new kid, one shared refetch for a flood of unknown kids, and cached keys
//! serving while the server is down.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::jwt::*;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::Algorithm;
use orcheo_gateway::body;
use serde_json::{json, Value};

/// What the JWKS server answers, and how often it was asked.
#[derive(Clone)]
struct JwksServer {
    answer: Arc<Mutex<(u16, Value)>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    fn set(&self, status: u16, keys: Value) {
        *self.answer.lock().unwrap() = (status, keys);
    }
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn jwks_server(status: u16, keys: Value) -> (Upstream, JwksServer) {
    let server = JwksServer {
        answer: Arc::new(Mutex::new((status, keys))),
        fetches: Arc::new(AtomicUsize::new(0)),
    };
    let state = server.clone();
    let up = upstream(move |_req| {
        let state = state.clone();
        async move {
            state.fetches.fetch_add(1, Ordering::SeqCst);
            // A little latency, so concurrent requests really overlap the fetch.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (status, keys) = state.answer.lock().unwrap().clone();
            let mut response = Response::new(body::full(keys.to_string()));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("cache-control", "max-age=600".parse().unwrap());
            response
        }
    })
    .await;
    (up, server)
}

fn keys(kids: &[(u8, &str)]) -> Value {
    json!({"keys": kids.iter().map(|(which, kid)| public_jwk(Algorithm::RS256, *which, kid)).collect::<Vec<_>>()})
}

async fn gateway_for(jwks_url: &str) -> (TestGateway, Upstream) {
    let up = echo_upstream().await;
    let auth = format!(
        "routes: [{{name: all, path: '/**'}}]\nauth:\n  mode: required\n  jwt:\n    jwks_url: '{jwks_url}'\n    jwks_cache_ttl: 300\n    jwks_timeout: 2\n"
    );
    (gateway(&yaml(&up.url(), &auth)).await, up)
}

async fn status_with(addr: std::net::SocketAddr, token: &str) -> (StatusCode, Value) {
    let request = Request::get("/x")
        .header("host", "gw")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = collect(send(addr, request).await).await;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(headers["retry-after"], "5");
    }
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn token(which: u8, kid: &str) -> String {
    sign_with(Algorithm::RS256, which, Some(kid), &claims("jwks-user"))
}

#[tokio::test]
async fn readiness_waits_for_the_first_fetch_and_keys_then_serve() {
    let (server_up, server) = jwks_server(500, json!({})).await;
    let (gw, _up) = gateway_for(&format!("{}/jwks", server_up.url())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, body) = get(gw.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["checks"]["jwks"]["ok"], false);
    let (status, body) = status_with(gw.http, &token(1, "k1")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no usable key set at all: {body}"
    );
    assert_eq!(body["code"], "auth.key_unavailable");

    server.set(200, keys(&[(1, "k1")]));
    let ready = eventually(Duration::from_secs(8), || async {
        get(gw.admin, "/readyz").await.0 == StatusCode::OK
    })
    .await;
    assert!(ready, "readiness never turned green");
    assert_eq!(
        status_with(gw.http, &token(1, "k1")).await.0,
        StatusCode::OK
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("orcheo_gateway_jwks_keys 1"), "{metrics}");
    assert!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_jwks_refresh_total{result="failure"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        metric_value(
            &metrics,
            "orcheo_gateway_jwks_last_success_timestamp_seconds"
        )
        .unwrap()
            > 1.7e9
    );
}

#[tokio::test]
async fn rotation_to_a_new_kid_is_picked_up_by_one_refetch() {
    let (server_up, server) = jwks_server(200, keys(&[(1, "k1")])).await;
    let (gw, _up) = gateway_for(&format!("{}/jwks", server_up.url())).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(gw.admin, "/readyz").await.0 == StatusCode::OK
        })
        .await
    );
    assert_eq!(
        status_with(gw.http, &token(1, "k1")).await.0,
        StatusCode::OK
    );
    let before = server.fetches();
    server.set(200, keys(&[(1, "k1"), (2, "k2")]));
    assert_eq!(
        status_with(gw.http, &token(2, "k2")).await.0,
        StatusCode::OK,
        "the new kid triggers a refetch"
    );
    assert_eq!(server.fetches(), before + 1);
}

#[tokio::test]
async fn an_unknown_kid_flood_causes_at_most_one_fetch_per_cooldown() {
    let (server_up, server) = jwks_server(200, keys(&[(1, "k1")])).await;
    let (gw, _up) = gateway_for(&format!("{}/jwks", server_up.url())).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(gw.admin, "/readyz").await.0 == StatusCode::OK
        })
        .await
    );
    let before = server.fetches();
    let flood: Vec<_> = (0..50)
        .map(|i| {
            let addr = gw.http;
            tokio::spawn(async move { status_with(addr, &token(2, &format!("made-up-{i}"))).await })
        })
        .collect();
    for request in flood {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], "auth.key_unavailable");
    }
    assert_eq!(
        server.fetches(),
        before + 1,
        "one shared refetch for the whole flood"
    );
    for i in 0..20 {
        status_with(gw.http, &token(2, &format!("again-{i}"))).await;
    }
    assert_eq!(
        server.fetches(),
        before + 1,
        "no refetch inside the cooldown"
    );
    // Known keys are unaffected throughout.
    assert_eq!(
        status_with(gw.http, &token(1, "k1")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn cached_keys_keep_serving_while_the_server_is_down() {
    let (server_up, server) = jwks_server(200, keys(&[(1, "k1")])).await;
    let (gw, _up) = gateway_for(&format!("{}/jwks", server_up.url())).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(gw.admin, "/readyz").await.0 == StatusCode::OK
        })
        .await
    );
    // Fail every fetch from now on, then take the server away entirely.
    server.set(503, json!({}));
    drop(server_up);
    assert_eq!(
        status_with(gw.http, &token(1, "k1")).await.0,
        StatusCode::OK
    );
    // An unknown kid still triggers a (failing) refetch, then 401, never a 5xx.
    let (status, body) = status_with(gw.http, &token(2, "k2")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        status_with(gw.http, &token(1, "k1")).await.0,
        StatusCode::OK
    );
    let (status, _, _) = get(gw.admin, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "stale keys within a day still count as ready"
    );
}
