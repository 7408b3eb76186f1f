//! The forward-auth endpoint by direct requests, in each convention an ingress uses:
//! nginx (`X-Original-*`), Traefik and Caddy (`X-Forwarded-*`) and Envoy's HTTP
//! `ext_authz` (the original path after the endpoint). The same decision as the proxy
//! path: routes, modes, scopes, workspaces, rate limits and WebSocket credential sources.

mod common;

use common::jwt::*;
use common::*;
use http::{HeaderMap, StatusCode};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

const ROUTES: &str = "routes:
  - {name: health, path: /api/system/health, public: true}
  - {name: read, path: '/api/read/**', scopes: [workflows:read]}
  - {name: ws-query, path: '/api/wsq/**', workspace: {query: workspace}}
  - {name: socket, path: '/ws/**', websocket: true, scopes: [workflows:execute]}
  - {name: limited, path: '/api/limited', rate_limit: {per: ip, requests: 2, window: 60s}}
";

async fn companion(trusted: &str, extra: &str) -> (TestGateway, Upstream) {
    let up = echo_upstream().await;
    let text = yaml(
        &up.url(),
        &format!(
            "{ROUTES}trusted_proxies: [{trusted}]\nauth:\n  jwt: {{secret: '{}'}}\n{extra}",
            std::str::from_utf8(SECRET).unwrap()
        ),
    );
    (gateway(&text).await, up)
}

fn bearer(scopes: &str, workspaces: Value) -> String {
    let claims =
        json!({"sub": "alice", "exp": now() + 600, "scope": scopes, "workspace_ids": workspaces});
    format!("Bearer {}", sign(Algorithm::HS256, None, &claims))
}

type Answer = (StatusCode, HeaderMap, Value);

fn assert_code(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{:?}", answer.2);
    assert_eq!(answer.2["code"], code, "{:?}", answer.2);
}

#[tokio::test]
async fn allowed_requests_get_200_with_the_identity_headers_in_every_convention() {
    let (gw, _up) = companion("'127.0.0.1'", "").await;
    let token = bearer("workflows:read", json!(["ws-1"]));
    let conventions: [Vec<(&str, &str)>; 4] = [
        vec![
            ("x-original-method", "GET"),
            ("x-original-uri", "/api/read/x?y=1"),
        ],
        vec![
            ("x-original-method", "GET"),
            ("x-original-url", "https://app.example/api/read/x"),
        ],
        vec![
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/api/read/x"),
            ("x-forwarded-host", "app.example"),
            ("x-forwarded-proto", "https"),
        ],
        vec![],
    ];
    for (i, mut headers) in conventions.into_iter().enumerate() {
        headers.push(("authorization", &token));
        // Envoy's form: the original path follows the endpoint's own.
        let target = if i == 3 {
            "/_orcheo/auth/api/read/x?y=1"
        } else {
            "/_orcheo/auth"
        };
        let (status, answer_headers, body) = call(gw.http, target, &headers).await;
        assert_eq!(status, StatusCode::OK, "convention {i}: {body}");
        assert_eq!(body, Value::Null, "an allowed answer has no body");
        assert_eq!(answer_headers["x-orcheo-subject"], "alice");
        assert_eq!(answer_headers["x-orcheo-scopes"], "workflows:read");
        assert_eq!(answer_headers["x-orcheo-workspaces"], "ws-1");
        assert_eq!(answer_headers["x-orcheo-auth-method"], "jwt");
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_forward_auth_decisions_total{code="ok",protocol="http",result="allow"}"#
        ),
        Some(4.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn denials_carry_the_proxy_paths_status_body_and_headers() {
    let (gw, _up) = companion("'127.0.0.1'", "").await;
    let ask = |uri: &'static str| [("x-original-method", "GET"), ("x-original-uri", uri)];
    // No credential: 401 with the challenge.
    let answer = call(gw.http, "/_orcheo/auth", &ask("/api/read/x")).await;
    assert_code(&answer, StatusCode::UNAUTHORIZED, "auth.missing_token");
    assert_eq!(answer.1["www-authenticate"], r#"Bearer realm="orcheo""#);
    // A scope missing: 403 with `insufficient_scope`.
    let token = bearer("", json!([]));
    let mut headers = ask("/api/read/x").to_vec();
    headers.push(("authorization", &token));
    let answer = call(gw.http, "/_orcheo/auth", &headers).await;
    assert_code(&answer, StatusCode::FORBIDDEN, "auth.missing_scope");
    assert!(answer.1["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("insufficient_scope"));
    // Workspaces, from the original query.
    let token = bearer("", json!(["ws-1"]));
    for (uri, status) in [
        ("/api/wsq/x?workspace=ws-1", StatusCode::OK),
        ("/api/wsq/x?workspace=ws-2", StatusCode::FORBIDDEN),
        (
            "/api/wsq/x?workspace=ws-1&workspace=ws-2",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let headers = [("x-original-uri", uri), ("authorization", token.as_str())];
        assert_eq!(
            call(gw.http, "/_orcheo/auth", &headers).await.0,
            status,
            "{uri}"
        );
    }
    // Public routes pass without a credential; unknown paths are 404.
    assert_eq!(
        call(gw.http, "/_orcheo/auth", &ask("/api/system/health"))
            .await
            .0,
        StatusCode::OK
    );
    let answer = call(gw.http, "/_orcheo/auth", &ask("/nowhere")).await;
    assert_code(&answer, StatusCode::NOT_FOUND, "route.not_found");
    // The original path is normalised like any other.
    let answer = call(gw.http, "/_orcheo/auth", &ask("/api/read/..;/x")).await;
    assert_code(&answer, StatusCode::BAD_REQUEST, "request.invalid");
    // No description of the original request at all.
    let answer = call(gw.http, "/_orcheo/auth", &[]).await;
    assert_code(&answer, StatusCode::BAD_REQUEST, "request.invalid");
}

#[tokio::test]
async fn callers_outside_the_trusted_proxies_are_refused_in_every_convention() {
    let (gw, _up) = companion("'10.0.0.0/8'", "").await;
    let token = bearer("workflows:read", json!([]));
    for (target, headers) in [
        ("/_orcheo/auth", vec![("x-original-uri", "/api/read/x")]),
        ("/_orcheo/auth", vec![("x-forwarded-uri", "/api/read/x")]),
        ("/_orcheo/auth/api/read/x", vec![]),
    ] {
        let mut headers = headers;
        headers.push(("authorization", &token));
        let answer = call(gw.http, target, &headers).await;
        assert_code(
            &answer,
            StatusCode::FORBIDDEN,
            "forward_auth.untrusted_caller",
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_forward_auth_decisions_total{code="forward_auth.untrusted_caller",protocol="http",result="deny"}"#
        ),
        Some(3.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn rate_limits_count_the_original_client() {
    let (gw, _up) = companion("'127.0.0.1'", "  rate_limit: {ip: 2, interval: 60}\n").await;
    // The ingress says which client it asks for; that client's failures count.
    let ask = |client: &'static str| {
        [
            ("x-original-uri", "/api/read/x"),
            ("x-forwarded-for", client),
            ("authorization", "Bearer not-a-token"),
        ]
    };
    for _ in 0..2 {
        assert_eq!(
            call(gw.http, "/_orcheo/auth", &ask("198.51.100.7")).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let answer = call(gw.http, "/_orcheo/auth", &ask("198.51.100.7")).await;
    assert_code(
        &answer,
        StatusCode::TOO_MANY_REQUESTS,
        "auth.rate_limited.ip",
    );
    assert!(answer.1.contains_key("retry-after"));
    assert_eq!(
        answer.2["message"],
        "Too many authentication attempts from IP 198.51.100.7"
    );
    // Another client behind the same ingress is not affected; X-Real-IP names one too.
    let other = [
        ("x-original-uri", "/api/system/health"),
        ("x-real-ip", "198.51.100.8"),
    ];
    assert_eq!(
        call(gw.http, "/_orcheo/auth", &other).await.0,
        StatusCode::OK
    );
    // Route limits too.
    let limited = [
        ("x-original-uri", "/api/limited"),
        ("x-forwarded-for", "198.51.100.9"),
        ("authorization", ""),
    ];
    let token = bearer("", json!([]));
    let limited: Vec<(&str, &str)> = limited
        .into_iter()
        .map(|(k, v)| {
            if k == "authorization" {
                (k, token.as_str())
            } else {
                (k, v)
            }
        })
        .collect();
    for _ in 0..2 {
        assert_eq!(
            call(gw.http, "/_orcheo/auth", &limited).await.0,
            StatusCode::OK
        );
    }
    let answer = call(gw.http, "/_orcheo/auth", &limited).await;
    assert_code(&answer, StatusCode::TOO_MANY_REQUESTS, "rate_limited.route");
}

#[tokio::test]
async fn websocket_checks_read_the_upgrade_credential_sources() {
    let (gw, _up) = companion("'127.0.0.1'", "").await;
    let claims = json!({"sub": "ws", "exp": now() + 600, "scope": "workflows:execute"});
    let token = sign(Algorithm::HS256, None, &claims);
    let uri = format!("/ws/run?token={token}");
    let subprotocol = format!("orcheo-auth, bearer.{token}");
    let cases: [Vec<(&str, &str)>; 2] = [
        vec![("x-original-uri", uri.as_str()), ("upgrade", "websocket")],
        vec![
            ("x-original-uri", "/ws/run"),
            ("upgrade", "websocket"),
            ("sec-websocket-protocol", subprotocol.as_str()),
        ],
    ];
    for headers in cases {
        let (status, answer, body) = call(gw.http, "/_orcheo/auth", &headers).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(answer["x-orcheo-subject"], "ws");
    }
    // Without `Upgrade`, the query token is not read: plain HTTP takes the header only.
    let answer = call(
        gw.http,
        "/_orcheo/auth",
        &[("x-original-uri", uri.as_str())],
    )
    .await;
    assert_code(&answer, StatusCode::UNAUTHORIZED, "auth.missing_token");
    // An upgrade on a route without WebSockets is refused, as when proxied.
    let token = bearer("workflows:read", json!([]));
    let answer = call(
        gw.http,
        "/_orcheo/auth",
        &[
            ("x-original-uri", "/api/read/x"),
            ("upgrade", "websocket"),
            ("authorization", &token),
        ],
    )
    .await;
    assert_code(&answer, StatusCode::BAD_REQUEST, "request.invalid");
}

#[tokio::test]
async fn the_endpoint_follows_its_configuration_and_reloads() {
    let (gw, _up) = companion("'127.0.0.1'", "forward_auth: {path: /check}\n").await;
    let ask = [("x-original-uri", "/api/system/health")];
    assert_eq!(call(gw.http, "/check", &ask).await.0, StatusCode::OK);
    assert_eq!(
        call(gw.http, "/_orcheo/auth", &ask).await.0,
        StatusCode::NOT_FOUND
    );
    let (off, _up) = companion("'127.0.0.1'", "forward_auth: {enabled: false}\n").await;
    assert_eq!(
        call(off.http, "/_orcheo/auth", &ask).await.0,
        StatusCode::NOT_FOUND
    );

    // A reload changes the decisions: a route made public passes without a credential.
    let up = echo_upstream().await;
    let dir = temp_dir("forward-auth-reload");
    let file = dir.join("gateway.yaml");
    let text = |public: bool| {
        yaml(
            &up.url(),
            &format!("routes: [{{name: r, path: '/api/**', public: {public}}}]\ntrusted_proxies: ['127.0.0.1']\nauth: {{jwt: {{secret: '{}'}}}}\n", std::str::from_utf8(SECRET).unwrap()),
        )
    };
    std::fs::write(&file, text(false)).unwrap();
    let config = orcheo_gateway::config::load_file(Some(&file), &Default::default()).unwrap();
    let gw = start(config, Some(file.clone())).await;
    let ask = [("x-original-uri", "/api/x")];
    assert_eq!(
        call(gw.http, "/_orcheo/auth", &ask).await.0,
        StatusCode::UNAUTHORIZED
    );
    std::fs::write(&file, text(true)).unwrap();
    gw.gateway().reload().await.unwrap();
    assert_eq!(call(gw.http, "/_orcheo/auth", &ask).await.0, StatusCode::OK);
}
