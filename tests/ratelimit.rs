//! Abuse protection end to end: failure limits per IP and per identity, route limits, the
//! client IP behind trusted proxies and PROXY protocol, and windows shared through a real
//! Redis — which may fail at any moment without failing a request.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::jwt::*;
use common::*;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::Algorithm;
use orcheo_gateway::store::{hash_secret, MemoryStore, TokenRecord};
use orcheo_gateway::time::Timestamp;
use serde_json::json;

fn redis_url(db: u8) -> String {
    let base =
        std::env::var("ORCHEO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    format!("{}/{db}", base.trim_end_matches('/'))
}

const ROUTES: &str = r#"routes:
  - {name: public, path: '/public/**', public: true}
  - {name: read, path: '/read/**', scopes: [workflows:read]}
  - {name: limited-ip, path: '/limited/**', public: true, rate_limit: {per: ip, requests: 3, window: 1s}}
  - {name: limited-id, path: '/per-user/**', rate_limit: {per: identity, requests: 2, window: 5s}}
  - {name: open, path: '/**'}
"#;

fn config_text(upstream: &str, extra: &str) -> String {
    format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams: {{default: {{url: '{upstream}'}}}}\n{ROUTES}auth:\n  jwt: {{secret: '{}'}}\n{extra}",
        std::str::from_utf8(SECRET).unwrap()
    )
}

async fn start_text(text: &str, store: Arc<MemoryStore>) -> TestGateway {
    let config =
        orcheo_gateway::config::load(text, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    start_with(config, None, store).await
}

fn jwt(sub: &str) -> String {
    format!(
        "Bearer {}",
        sign(
            Algorithm::HS256,
            None,
            &json!({"sub": sub, "exp": now() + 600, "scope": ""})
        )
    )
}

fn retry_after(headers: &HeaderMap) -> u64 {
    headers["retry-after"].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn failures_per_ip_block_every_request_until_they_leave_the_window() {
    let up = echo_upstream().await;
    let gw = start_text(
        &config_text(&up.url(), "  rate_limit: {ip: 3, interval: 2}\n"),
        Default::default(),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            call(gw.http, "/x", &[("authorization", "Bearer wrong")])
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
    }
    let valid = jwt("alice");
    let (status, headers, body) = call(gw.http, "/x", &[("authorization", &valid)]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "auth.rate_limited.ip");
    assert_eq!(
        body["message"],
        "Too many authentication attempts from IP 127.0.0.1"
    );
    assert_eq!(body["detail"]["code"], "auth.rate_limited.ip");
    let wait = retry_after(&headers);
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        call(gw.http, "/public/x", &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "public routes too"
    );
    assert_eq!(
        call(gw.http, "/no-such-route-either", &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(
        call(gw.http, "/x", &[("authorization", &valid)]).await.0,
        StatusCode::OK,
        "served again after the window"
    );
    let metrics = gw.metrics().await;
    assert!(
        metric_value(&metrics, r#"orcheo_gateway_rate_limited_total{kind="ip"}"#).unwrap() >= 3.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn successful_requests_never_count_toward_the_ip_limit() {
    let up = echo_upstream().await;
    let gw = start_text(
        &config_text(&up.url(), "  rate_limit: {ip: 3, interval: 60}\n"),
        Default::default(),
    )
    .await;
    let valid = jwt("busy");
    let mut sender = connection(gw.http).await;
    for i in 0..1000 {
        let request = Request::get("/x")
            .header("host", "gw")
            .header("authorization", &valid)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        collect(response).await;
    }
}

fn expired_token(store: &MemoryStore) {
    store.put(TokenRecord {
        identifier: "old-ci".into(),
        secret_hash: hash_secret("old-ci-secret"),
        scopes: vec![],
        workspace_ids: vec![],
        issued_at: Timestamp::now(),
        expires_at: Some(Timestamp(Timestamp::now().0 - 1)),
        revoked_at: None,
        ..Default::default()
    });
}

#[tokio::test]
async fn identities_are_blocked_after_repeated_403s_and_expired_tokens() {
    let store = Arc::new(MemoryStore::new());
    expired_token(&store);
    let up = echo_upstream().await;
    let gw = start_text(
        &config_text(&up.url(), "  rate_limit: {identity: 3, interval: 60}\n"),
        store,
    )
    .await;
    let bob = jwt("bob");
    for _ in 0..3 {
        assert_eq!(
            call(gw.http, "/read/x", &[("authorization", &bob)]).await.0,
            StatusCode::FORBIDDEN
        );
    }
    // Even a request bob may make is now refused, naming bob.
    let (status, headers, body) = call(gw.http, "/x", &[("authorization", &bob)]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "auth.rate_limited.identity");
    assert_eq!(
        body["message"],
        "Too many authentication attempts for identity bob"
    );
    assert!(retry_after(&headers) >= 1);
    // Another identity from the same IP is unaffected.
    assert_eq!(
        call(gw.http, "/x", &[("authorization", &jwt("carol"))])
            .await
            .0,
        StatusCode::OK
    );
    // An expired service token names its id; the fourth try is refused as that identity.
    for _ in 0..3 {
        let (status, _, body) =
            call(gw.http, "/x", &[("authorization", "Bearer old-ci-secret")]).await;
        assert_eq!(body["code"], "auth.token_expired", "{status}");
    }
    let (status, _, body) = call(gw.http, "/x", &[("authorization", "Bearer old-ci-secret")]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body["message"],
        "Too many authentication attempts for identity old-ci"
    );
}

#[tokio::test]
async fn an_untrusted_client_cannot_choose_its_address() {
    let up = echo_upstream().await;
    let gw = start_text(
        &config_text(&up.url(), "  rate_limit: {ip: 2, interval: 60}\n"),
        Default::default(),
    )
    .await;
    for spoofed in ["1.1.1.1", "2.2.2.2"] {
        let headers = [
            ("authorization", "Bearer wrong"),
            ("x-forwarded-for", spoofed),
            ("forwarded", "for=3.3.3.3"),
        ];
        assert_eq!(
            call(gw.http, "/x", &headers).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, _, body) = call(gw.http, "/x", &[("x-forwarded-for", "4.4.4.4")]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body["message"],
        "Too many authentication attempts from IP 127.0.0.1"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_the_key() {
    let up = echo_upstream().await;
    let extra = "  rate_limit: {ip: 2, interval: 60}\ntrusted_proxies: ['127.0.0.1']\n";
    let gw = start_text(&config_text(&up.url(), extra), Default::default()).await;
    for _ in 0..2 {
        let headers = [
            ("authorization", "Bearer wrong"),
            ("x-forwarded-for", "6.6.6.6, 198.51.100.1"),
        ];
        assert_eq!(
            call(gw.http, "/x", &headers).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, _, body) = call(gw.http, "/x", &[("x-forwarded-for", "198.51.100.1")]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body["message"],
        "Too many authentication attempts from IP 198.51.100.1"
    );
    let token = jwt("y");
    let (status, _, body) = call(
        gw.http,
        "/x",
        &[
            ("x-forwarded-for", "198.51.100.2"),
            ("authorization", &token),
        ],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another client behind the same proxy: {body}"
    );
    assert_eq!(
        body["headers"]["x-forwarded-for"][0],
        "198.51.100.2, 127.0.0.1"
    );
}

#[tokio::test]
async fn the_proxy_protocol_source_is_the_key() {
    let up = echo_upstream().await;
    let extra = "  rate_limit: {ip: 1, interval: 60}\ntrusted_proxies: ['127.0.0.1']\n";
    let text = config_text(&up.url(), extra).replace(
        "listen: {http: ['127.0.0.1:0']}",
        "listen: {http: ['127.0.0.1:0'], proxy_protocol: true}",
    );
    let gw = start_text(&text, Default::default()).await;
    let request = |source: &str, auth: &str| {
        format!("PROXY TCP4 {source} 10.0.0.1 40000 80\r\nGET /x HTTP/1.1\r\nhost: gw\r\nauthorization: {auth}\r\nconnection: close\r\n\r\n")
    };
    let answer = raw(
        gw.http,
        request("203.0.113.1", "Bearer wrong").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = raw(
        gw.http,
        request("203.0.113.1", &jwt("x")).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 429") && answer.contains("from IP 203.0.113.1"),
        "{answer}"
    );
    let answer = raw(
        gw.http,
        request("203.0.113.2", &jwt("x")).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn route_limits_per_ip_and_per_identity() {
    let up = echo_upstream().await;
    let gw = start_text(&config_text(&up.url(), ""), Default::default()).await;
    for _ in 0..3 {
        assert_eq!(call(gw.http, "/limited/x", &[]).await.0, StatusCode::OK);
    }
    let (status, headers, body) = call(gw.http, "/limited/x", &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["code"], "rate_limited.route");
    assert_eq!(body["message"], "Too many requests");
    assert_eq!(retry_after(&headers), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(gw.http, "/limited/x", &[]).await.0, StatusCode::OK);
    // Per identity: each caller has its own budget, whatever its IP.
    let (alice, bob) = (jwt("alice"), jwt("bob"));
    for _ in 0..2 {
        assert_eq!(
            call(gw.http, "/per-user/x", &[("authorization", &alice)])
                .await
                .0,
            StatusCode::OK
        );
    }
    assert_eq!(
        call(gw.http, "/per-user/x", &[("authorization", &alice)])
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        call(gw.http, "/per-user/x", &[("authorization", &bob)])
            .await
            .0,
        StatusCode::OK
    );
    let metrics = gw.metrics().await;
    assert!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_rate_limited_total{kind="route"}"#
        )
        .unwrap()
            >= 2.0
    );
}

fn flush(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
        return false;
    };
    redis::cmd("FLUSHDB").query::<()>(&mut connection).is_ok()
}

#[tokio::test]
async fn two_gateways_share_their_windows_through_redis() {
    let url = redis_url(5);
    assert!(
        flush(&url),
        "Redis must be running at {url} (set ORCHEO_TEST_REDIS_URL)"
    );
    let up = echo_upstream().await;
    let extra = format!("  rate_limit: {{ip: 3, interval: 60, redis_url: '{url}'}}\n");
    let a = start_text(&config_text(&up.url(), &extra), Default::default()).await;
    let b = start_text(&config_text(&up.url(), &extra), Default::default()).await;
    assert_eq!(
        call(a.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(a.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(b.http, "/x", &[("authorization", &jwt("z"))]).await.0,
        StatusCode::OK,
        "two failures: not yet"
    );
    assert_eq!(
        call(b.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // Three failures across the fleet: both replicas refuse — A learns of the block B
    // completed through Redis's announcement, within a second.
    let refused = eventually(Duration::from_secs(1), || async {
        call(a.http, "/x", &[("authorization", &jwt("z"))]).await.0 == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    assert!(refused, "replica A never learned of the block");
    let (status, headers, _) = call(a.http, "/x", &[("authorization", &jwt("z"))]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        (55..=60).contains(&retry_after(&headers)),
        "{:?}",
        headers.get("retry-after")
    );
    assert_eq!(
        call(b.http, "/x", &[("authorization", &jwt("z"))]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Route limits are shared too.
    assert_eq!(
        call(a.http, "/limited/y", &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "the IP is blocked on every route"
    );
}

/// Window operations the Redis server has run so far: each runs `ZCARD` once (the read of
/// the blocks in force, which a replica does when it subscribes, does not).
fn script_calls(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut connection)
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_zcard:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test]
async fn successful_requests_cost_redis_nothing_and_a_late_replica_learns_current_blocks() {
    let mut redis = OwnRedis::start();
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let up = echo_upstream().await;
    let extra = format!("  rate_limit: {{ip: 2, identity: 2, interval: 60, redis_url: '{url}'}}\n");
    let a = start_text(&config_text(&up.url(), &extra), Default::default()).await;
    let before = script_calls(&url);
    for i in 0..50 {
        let token = jwt(&format!("user-{i}"));
        assert_eq!(
            call(a.http, "/x", &[("authorization", &token)]).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        script_calls(&url) - before,
        0,
        "failure limits touched Redis on successes"
    );
    // Failures do go to Redis: two fill the window and announce the block.
    for _ in 0..2 {
        let status = call(a.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(script_calls(&url) - before, 2);
    // A replica started after the block learns it from the blocks in force.
    let late = start_text(&config_text(&up.url(), &extra), Default::default()).await;
    let refused = eventually(Duration::from_secs(5), || async {
        call(late.http, "/x", &[("authorization", &jwt("z"))])
            .await
            .0
            == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    assert!(refused, "a late replica did not learn the current block");
    let _ = redis.child.kill();
    let _ = redis.child.wait();
}

/// A Redis server of this test's own, stopped by PID.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed by .ci/run");
        // Owned from here on, so it is stopped (by PID) and reaped on every path.
        let redis = OwnRedis { child, port };
        let url = format!("redis://127.0.0.1:{port}/0");
        for _ in 0..100 {
            if flush(&url) {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_going_away_never_fails_a_request() {
    let mut redis = OwnRedis::start();
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let up = echo_upstream().await;
    let extra = format!("  rate_limit: {{ip: 3, interval: 60, redis_url: '{url}'}}\n");
    let gw = start_text(&config_text(&up.url(), &extra), Default::default()).await;
    assert_eq!(
        call(gw.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    // Served, with the local windows deciding: the failure before the outage counts.
    let started = std::time::Instant::now();
    assert_eq!(
        call(gw.http, "/x", &[("authorization", &jwt("ok"))])
            .await
            .0,
        StatusCode::OK
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "Redis stalled a request: {:?}",
        started.elapsed()
    );
    assert_eq!(
        call(gw.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(gw.http, "/x", &[("authorization", "Bearer wrong")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(gw.http, "/x", &[("authorization", &jwt("ok"))])
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    let metrics = gw.metrics().await;
    assert!(
        metric_value(&metrics, "orcheo_gateway_ratelimit_redis_errors_total").unwrap() >= 1.0,
        "{metrics}"
    );

    // Unreachable from the very start: the same.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra =
        format!("  rate_limit: {{ip: 3, interval: 60, redis_url: 'redis://127.0.0.1:{closed}'}}\n");
    let gw = start_text(&config_text(&up.url(), &extra), Default::default()).await;
    for _ in 0..20 {
        assert_eq!(
            call(gw.http, "/x", &[("authorization", &jwt("ok"))])
                .await
                .0,
            StatusCode::OK
        );
    }
}
