//! Envoy's gRPC `ext_authz` with a real gRPC client (tonic, the generated Envoy client):
//! allowed checks carry the identity headers and remove inbound ones; each denial maps to
//! its HTTP status, JSON body, headers and gRPC code; malformed checks and untrusted
//! callers are denied, never an RPC error.

mod common;

use std::collections::HashMap;

use common::jwt::*;
use common::*;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

const ROUTES: &str = "routes:
  - {name: health, path: /api/system/health, public: true}
  - {name: read, path: '/api/read/**', scopes: [workflows:read]}
  - {name: ws-query, path: '/api/wsq/**', workspace: {query: workspace}}
";

async fn grpc_gateway(trusted: &str) -> (TestGateway, Upstream) {
    let up = echo_upstream().await;
    let text = yaml(
        &up.url(),
        &format!(
            "{ROUTES}trusted_proxies: [{trusted}]\nforward_auth: {{grpc_listen: '127.0.0.1:0'}}\nauth:\n  jwt: {{secret: '{}'}}\n  rate_limit: {{ip: 2, interval: 60}}\n",
            std::str::from_utf8(SECRET).unwrap()
        ),
    );
    (gateway(&text).await, up)
}

async fn client(gw: &TestGateway) -> AuthorizationClient<tonic::transport::Channel> {
    let addr = gw
        .gateway()
        .addresses
        .grpc
        .expect("the gRPC listener is up");
    AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn check(method: &str, path: &str, headers: &[(&str, &str)], source: Option<&str>) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let source = source.map(|ip| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.to_string(),
                ..SocketAddress::default()
            })),
        }),
        ..Peer::default()
    });
    CheckRequest {
        attributes: Some(AttributeContext {
            source,
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

fn token(scopes: &str, workspaces: Value) -> String {
    let claims =
        json!({"sub": "alice", "exp": now() + 600, "scope": scopes, "workspace_ids": workspaces});
    format!("Bearer {}", sign(Algorithm::HS256, None, &claims))
}

/// (gRPC code, HTTP status, JSON body, headers) of a denial.
fn denial(response: &CheckResponse) -> (i32, i32, Value, HashMap<String, String>) {
    let code = response.status.as_ref().unwrap().code;
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not a denial: {response:?}");
    };
    let headers = denied
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let body = serde_json::from_str(&denied.body).unwrap();
    (code, denied.status.as_ref().unwrap().code, body, headers)
}

#[tokio::test]
async fn an_allowed_check_sets_and_removes_identity_headers() {
    let (gw, _up) = grpc_gateway("'127.0.0.1'").await;
    let mut client = client(&gw).await;
    let bearer = token("workflows:read", json!(["ws-1"]));
    let response = client
        .check(check(
            "GET",
            "/api/read/x?y=1",
            &[("authorization", &bearer), (":path", "/api/read/x?y=1")],
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.as_ref().unwrap().code, 0, "OK");
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not allowed: {response:?}");
    };
    let set: HashMap<String, String> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert_eq!(set["x-orcheo-subject"], "alice");
    assert_eq!(set["x-orcheo-scopes"], "workflows:read");
    assert_eq!(set["x-orcheo-workspaces"], "ws-1");
    assert_eq!(set["x-orcheo-auth-method"], "jwt");
    // Every inbound identity header is either overwritten or removed.
    assert!(ok
        .headers_to_remove
        .contains(&"x-orcheo-identity".to_string()));
    for header in &ok.headers {
        assert_eq!(
            header.append_action,
            envoy_types::ext_authz::v3::pb::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
    }
    // An anonymous caller on a public route: the identity headers it does not get are removed.
    let response = client
        .check(check(
            "GET",
            "/api/system/health",
            &[("x-orcheo-subject", "root")],
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not allowed: {response:?}");
    };
    assert!(
        ok.headers_to_remove
            .contains(&"x-orcheo-subject".to_string()),
        "{ok:?}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_forward_auth_decisions_total{code="ok",protocol="grpc",result="allow"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn each_denial_maps_to_its_status_body_headers_and_code() {
    let (gw, _up) = grpc_gateway("'127.0.0.1'").await;
    let mut client = client(&gw).await;
    let ask = |path: &str, headers: &[(&str, &str)]| check("GET", path, headers, None);
    let no_scope = token("", json!(["ws-1"]));
    let cases = [
        (ask("/api/read/x", &[]), 16, 401, "auth.missing_token"),
        (
            ask("/api/read/x", &[("authorization", &no_scope)]),
            7,
            403,
            "auth.missing_scope",
        ),
        (ask("/nowhere", &[]), 5, 404, "route.not_found"),
        (
            ask(
                "/api/wsq/x?workspace=a&workspace=b",
                &[("authorization", &no_scope)],
            ),
            3,
            400,
            "request.invalid",
        ),
        (
            check("GET", "relative", &[], None),
            3,
            400,
            "request.invalid",
        ),
        (CheckRequest::default(), 3, 400, "request.invalid"),
    ];
    for (request, grpc, http, code) in cases {
        let response = client.check(request).await.unwrap().into_inner();
        let (got_grpc, got_http, body, headers) = denial(&response);
        assert_eq!(
            (got_grpc, got_http, body["code"].as_str()),
            (grpc, http, Some(code)),
            "{body}"
        );
        assert_eq!(headers["content-type"], "application/json");
        if http == 401 {
            assert_eq!(headers["www-authenticate"], r#"Bearer realm="orcheo""#);
        }
    }
    // The client Envoy names (its source address) is the one rate limits count.
    let bad = [("authorization", "Bearer not-a-token")];
    for _ in 0..2 {
        let response = client
            .check(check("GET", "/api/read/x", &bad, Some("198.51.100.7")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(denial(&response).1, 401);
    }
    let response = client
        .check(check("GET", "/api/read/x", &bad, Some("198.51.100.7")))
        .await
        .unwrap()
        .into_inner();
    let (grpc, http, body, headers) = denial(&response);
    assert_eq!(
        (grpc, http, body["code"].as_str()),
        (8, 429, Some("auth.rate_limited.ip"))
    );
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        body["message"],
        "Too many authentication attempts from IP 198.51.100.7"
    );
}

#[tokio::test]
async fn an_untrusted_caller_is_denied_not_failed() {
    let (gw, _up) = grpc_gateway("'10.0.0.0/8'").await;
    let mut client = client(&gw).await;
    let bearer = token("workflows:read", json!([]));
    let response = client
        .check(check(
            "GET",
            "/api/read/x",
            &[("authorization", &bearer)],
            None,
        ))
        .await
        .expect("a CheckResponse, never an RPC error")
        .into_inner();
    let (grpc, http, body, _) = denial(&response);
    assert_eq!(
        (grpc, http, body["code"].as_str()),
        (7, 403, Some("forward_auth.untrusted_caller"))
    );
}
