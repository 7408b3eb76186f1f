//! Authentication and authorization end to end, through the proxy: every mode row, every
//! error code with its status, message and WWW-Authenticate, the claim mapping, scopes,
//! workspaces, identity headers, credentials forwarding and the identity assertion.

mod common;

use std::sync::Arc;

use common::jwt::*;
use common::*;
use http::{HeaderMap, StatusCode};
use jsonwebtoken::Algorithm;
use orcheo_gateway::store::{hash_secret, MemoryStore, TokenRecord};
use orcheo_gateway::time::Timestamp;
use serde_json::{json, Value};

const ROUTES: &str = r#"routes:
  - {name: public, path: '/public/**', public: true}
  - {name: read, path: '/read/**', scopes: [workflows:read]}
  - {name: write, path: '/write/**', scopes: [workflows:write, workflows:read]}
  - {name: ws-path, path: '/ws/{workspace_id}/**', workspace: {path_param: workspace_id}}
  - {name: ws-header, path: '/wsh/**', workspace: {header: X-Workspace-Id}}
  - {name: ws-query, path: '/wsq/**', workspace: {query: workspace}}
  - {name: open, path: '/open/**'}
"#;

fn secret_yaml() -> String {
    format!(
        "auth:\n  jwt:\n    secret: '{}'\n",
        std::str::from_utf8(SECRET).unwrap()
    )
}

async fn gateway_with(auth: &str, store: Arc<MemoryStore>) -> (TestGateway, Upstream) {
    let up = echo_upstream().await;
    let text = yaml(&up.url(), &format!("{ROUTES}{auth}"));
    let config =
        orcheo_gateway::config::load(&text, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    (start_with(config, None, store).await, up)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn jwt(scopes: &str, workspaces: Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "alice", "exp": now() + 600, "scope": scopes, "workspace_ids": workspaces}),
    )
}

fn assert_refused(
    result: &(StatusCode, HeaderMap, Value),
    status: StatusCode,
    code: &str,
    message: &str,
) {
    let (got, _, body) = result;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["message"], message);
    assert_eq!(body["detail"]["code"], code);
    assert_eq!(body["detail"]["message"], message);
}

fn challenge(result: &(StatusCode, HeaderMap, Value)) -> String {
    result
        .1
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn upstream_headers(result: &(StatusCode, HeaderMap, Value)) -> &Value {
    &result.2["headers"]
}

fn service_token(
    store: &MemoryStore,
    id: &str,
    secret: &str,
    scopes: &[&str],
    workspaces: &[&str],
) {
    store.put(TokenRecord {
        identifier: id.into(),
        secret_hash: hash_secret(secret),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        workspace_ids: workspaces.iter().map(|s| s.to_string()).collect(),
        issued_at: Timestamp::now(),
        expires_at: None,
        revoked_at: None,
        ..Default::default()
    });
}

#[tokio::test]
async fn required_mode_rows() {
    let (gw, _up) = gateway_with(
        &format!("{}  mode: required\n", secret_yaml()),
        Default::default(),
    )
    .await;
    let none = call(gw.http, "/open/x", &[]).await;
    assert_refused(
        &none,
        StatusCode::UNAUTHORIZED,
        "auth.missing_token",
        "Missing bearer token",
    );
    assert_eq!(challenge(&none), r#"Bearer realm="orcheo""#);
    let invalid = call(
        gw.http,
        "/open/x",
        &[("authorization", "Bearer not-a-token")],
    )
    .await;
    assert_refused(
        &invalid,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_token",
        "Invalid bearer token",
    );
    assert_eq!(
        challenge(&invalid),
        r#"Bearer realm="orcheo", error="invalid_token""#
    );
    let valid = call(
        gw.http,
        "/open/x",
        &[("authorization", &bearer(&jwt("", json!([]))))],
    )
    .await;
    assert_eq!(valid.0, StatusCode::OK);
    assert_eq!(upstream_headers(&valid)["x-orcheo-subject"][0], "alice");
    // Public routes skip authentication even here.
    assert_eq!(call(gw.http, "/public/x", &[]).await.0, StatusCode::OK);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("orcheo_gateway_auth_enforced 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn optional_mode_rows() {
    let (gw, _up) = gateway_with(
        &format!("{}  mode: optional\n", secret_yaml()),
        Default::default(),
    )
    .await;
    let none = call(gw.http, "/open/x", &[]).await;
    assert_eq!(none.0, StatusCode::OK);
    assert_eq!(
        upstream_headers(&none)["x-orcheo-identity-type"][0],
        "anonymous"
    );
    assert_eq!(upstream_headers(&none)["x-orcheo-auth-method"][0], "none");
    assert!(upstream_headers(&none).get("x-orcheo-subject").is_none());
    let invalid = call(gw.http, "/open/x", &[("authorization", "Bearer nope")]).await;
    assert_eq!(invalid.0, StatusCode::UNAUTHORIZED);
    let scheme = call(
        gw.http,
        "/open/x",
        &[("authorization", "Basic dXNlcjpwdw==")],
    )
    .await;
    assert_refused(
        &scheme,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_scheme",
        "Authorization header must use the Bearer scheme",
    );
    assert_eq!(challenge(&scheme), r#"Bearer realm="orcheo""#);
    let valid = call(
        gw.http,
        "/open/x",
        &[("authorization", &bearer(&jwt("", json!([]))))],
    )
    .await;
    assert_eq!(upstream_headers(&valid)["x-orcheo-auth-method"][0], "jwt");
    // An anonymous caller on a route that needs a scope is asked to authenticate.
    let scoped = call(gw.http, "/read/x", &[]).await;
    assert_refused(
        &scoped,
        StatusCode::UNAUTHORIZED,
        "auth.missing_token",
        "Missing bearer token",
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("orcheo_gateway_auth_enforced 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn disabled_mode_checks_nothing_and_passes_authorization_through() {
    let (gw, _up) = gateway_with(
        &format!("{}  mode: disabled\n", secret_yaml()),
        Default::default(),
    )
    .await;
    for auth in ["", "Bearer nope", "Basic abc"] {
        let headers: Vec<(&str, &str)> = if auth.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth)]
        };
        let mut headers = headers;
        headers.push(("x-orcheo-subject", "spoofed"));
        headers.push(("x-orcheo-scopes", "admin:tokens:write"));
        let result = call(gw.http, "/write/x", &headers).await;
        assert_eq!(result.0, StatusCode::OK, "{auth}");
        let seen = upstream_headers(&result);
        assert_eq!(seen["x-orcheo-identity-type"][0], "anonymous");
        assert!(seen.get("x-orcheo-subject").is_none() && seen.get("x-orcheo-scopes").is_none());
        if !auth.is_empty() {
            assert_eq!(seen["authorization"][0], auth, "passes through untouched");
        }
    }
    let (_, _, health) = call(gw.admin, "/healthz", &[]).await;
    assert_eq!(health["auth_mode"], "disabled");
}

#[tokio::test]
async fn default_mode_enforces_once_a_credential_source_exists() {
    // No source at all: optional.
    let store = Arc::new(MemoryStore::new());
    let (gw, _up) = gateway_with("", store.clone()).await;
    assert_eq!(call(gw.http, "/open/x", &[]).await.0, StatusCode::OK);
    let (_, _, ready) = call(gw.admin, "/readyz", &[]).await;
    assert_eq!(ready["auth_mode"], "optional");
    // The first active service token switches enforcement on, live.
    service_token(&store, "first", "first-secret", &[], &[]);
    assert_eq!(
        call(gw.http, "/open/x", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (_, _, ready) = call(gw.admin, "/readyz", &[]).await;
    assert_eq!(ready["auth_mode"], "required");
    assert!(ready["auth_mode_reason"]
        .as_str()
        .unwrap()
        .contains("active service token"));
    // A configured secret enforces from the start.
    let (gw2, _up2) = gateway_with(&secret_yaml(), Default::default()).await;
    assert_eq!(
        call(gw2.http, "/open/x", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn every_jwt_error_code() {
    let auth = format!(
        "{}    audience: [orcheo]\n    issuer: https://idp.example\n    allowed_algorithms: [HS256, RS256]\n    jwks: {}\n",
        secret_yaml(),
        json!({"keys": [public_jwk(Algorithm::RS256, 1, "rsa")]})
    );
    let (gw, _up) = gateway_with(&auth, Default::default()).await;
    let good =
        json!({"sub": "a", "exp": now() + 600, "aud": "orcheo", "iss": "https://idp.example"});
    let with = |patch: Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let cases: Vec<(String, StatusCode, &str, &str)> = vec![
        (sign(Algorithm::HS256, None, &good), StatusCode::OK, "", ""),
        (
            sign(Algorithm::RS256, Some("rsa"), &good),
            StatusCode::OK,
            "",
            "",
        ),
        (
            sign(Algorithm::ES256, Some("p256"), &good),
            StatusCode::UNAUTHORIZED,
            "auth.unsupported_algorithm",
            "Bearer token is signed with an unsupported algorithm",
        ),
        (
            sign(Algorithm::HS256, None, &with(json!({"exp": now() - 5}))),
            StatusCode::UNAUTHORIZED,
            "auth.token_expired",
            "Bearer token has expired",
        ),
        (
            sign(Algorithm::HS256, None, &with(json!({"aud": "other"}))),
            StatusCode::UNAUTHORIZED,
            "auth.invalid_audience",
            "Bearer token has an invalid audience",
        ),
        (
            sign(
                Algorithm::HS256,
                None,
                &with(json!({"iss": "https://evil"})),
            ),
            StatusCode::UNAUTHORIZED,
            "auth.invalid_issuer",
            "Bearer token has an invalid issuer",
        ),
        (
            sign(Algorithm::RS256, Some("unknown"), &good),
            StatusCode::UNAUTHORIZED,
            "auth.key_unavailable",
            "Unable to resolve signing key for bearer token",
        ),
        (
            format!("{}x", sign(Algorithm::HS256, None, &good)),
            StatusCode::UNAUTHORIZED,
            "auth.invalid_token",
            "Invalid bearer token",
        ),
        (
            "a".repeat(17 * 1024),
            StatusCode::UNAUTHORIZED,
            "auth.invalid_token",
            "Invalid bearer token",
        ),
    ];
    for (token, status, code, message) in cases {
        let result = call(gw.http, "/open/x", &[("authorization", &bearer(&token))]).await;
        if status == StatusCode::OK {
            assert_eq!(result.0, StatusCode::OK, "{}", result.2);
        } else {
            assert_refused(&result, status, code, message);
            assert_eq!(
                challenge(&result),
                r#"Bearer realm="orcheo", error="invalid_token""#
            );
        }
    }
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"orcheo_gateway_auth_attempts_total{code="auth.token_expired",method="jwt",result="failure"} 1"#), "{metrics}");
    assert!(
        metrics.contains(
            r#"orcheo_gateway_auth_attempts_total{code="ok",method="jwt",result="success"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn service_tokens_bootstrap_and_their_errors() {
    let store = Arc::new(MemoryStore::new());
    service_token(&store, "ci", "ci-secret", &["workflows:read"], &["WS-A"]);
    store.put(TokenRecord {
        revoked_at: Some(Timestamp::now()),
        ..record("revoked", "revoked-secret")
    });
    store.put(TokenRecord {
        expires_at: Some(Timestamp(Timestamp::now().0 - 10)),
        ..record("expired", "expired-secret")
    });
    let auth = "auth:\n  bootstrap:\n    token: boot-secret\n";
    let (gw, _up) = gateway_with(auth, store).await;
    let ok = call(gw.http, "/read/x", &[("authorization", "Bearer ci-secret")]).await;
    assert_eq!(ok.0, StatusCode::OK);
    let seen = upstream_headers(&ok);
    assert_eq!(seen["x-orcheo-subject"][0], "ci");
    assert_eq!(seen["x-orcheo-token-id"][0], "ci");
    assert_eq!(seen["x-orcheo-identity-type"][0], "service");
    assert_eq!(seen["x-orcheo-auth-method"][0], "service_token");
    assert_eq!(seen["x-orcheo-scopes"][0], "workflows:read");
    assert_eq!(seen["x-orcheo-workspaces"][0], "ws-a");
    assert_eq!(
        seen["authorization"][0], "Bearer ci-secret",
        "forward_credentials defaults to on"
    );
    let revoked = call(
        gw.http,
        "/open/x",
        &[("authorization", "Bearer revoked-secret")],
    )
    .await;
    assert_refused(
        &revoked,
        StatusCode::UNAUTHORIZED,
        "auth.token_revoked",
        "Service token has been revoked",
    );
    let expired = call(
        gw.http,
        "/open/x",
        &[("authorization", "Bearer expired-secret")],
    )
    .await;
    assert_refused(
        &expired,
        StatusCode::UNAUTHORIZED,
        "auth.token_expired",
        "Service token has expired",
    );
    let boot = call(
        gw.http,
        "/write/x",
        &[("authorization", "Bearer boot-secret")],
    )
    .await;
    assert_eq!(boot.0, StatusCode::OK);
    let seen = upstream_headers(&boot);
    assert_eq!(seen["x-orcheo-subject"][0], "bootstrap");
    assert_eq!(seen["x-orcheo-auth-method"][0], "bootstrap");
    assert_eq!(seen["x-orcheo-workspaces"][0], "*");
    assert_eq!(
        seen["x-orcheo-scopes"][0],
        "admin:tokens:read admin:tokens:write vault:read vault:write workflows:execute workflows:read workflows:write"
    );
    assert_eq!(
        call(
            gw.http,
            "/ws/any-workspace/x",
            &[("authorization", "Bearer boot-secret")]
        )
        .await
        .0,
        StatusCode::OK
    );
}

fn record(id: &str, secret: &str) -> TokenRecord {
    TokenRecord {
        identifier: id.into(),
        secret_hash: hash_secret(secret),
        scopes: vec![],
        workspace_ids: vec![],
        issued_at: Timestamp::now(),
        expires_at: None,
        revoked_at: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn bootstrap_expiry_in_both_formats() {
    for expires in ["'2020-01-01T00:00:00Z'", "1577836800", "'2020-01-01'"] {
        let auth = format!("auth:\n  bootstrap:\n    token: boot\n    scopes: 'workflows:read'\n    expires_at: {expires}\n");
        let (gw, _up) = gateway_with(&auth, Default::default()).await;
        let result = call(gw.http, "/read/x", &[("authorization", "Bearer boot")]).await;
        assert_refused(
            &result,
            StatusCode::UNAUTHORIZED,
            "auth.token_expired",
            "Bootstrap service token has expired",
        );
    }
    let future = "auth:\n  bootstrap:\n    token: boot\n    scopes: 'workflows:read'\n    expires_at: 4102444800\n";
    let (gw, _up) = gateway_with(future, Default::default()).await;
    let result = call(gw.http, "/read/x", &[("authorization", "Bearer boot")]).await;
    assert_eq!(result.0, StatusCode::OK);
    assert_eq!(
        upstream_headers(&result)["x-orcheo-scopes"][0],
        "workflows:read"
    );
}

#[tokio::test]
async fn scopes_and_workspaces() {
    let (gw, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    let reader = bearer(&jwt("workflows:read", json!(["WS-1", "ws-2"])));
    assert_eq!(
        call(gw.http, "/read/x", &[("authorization", &reader)])
            .await
            .0,
        StatusCode::OK
    );
    let denied = call(gw.http, "/write/x", &[("authorization", &reader)]).await;
    assert_refused(
        &denied,
        StatusCode::FORBIDDEN,
        "auth.missing_scope",
        "Missing required scopes: workflows:write",
    );
    assert_eq!(
        challenge(&denied),
        r#"Bearer realm="orcheo", error="insufficient_scope", scope="workflows:write""#
    );
    let nothing = bearer(&jwt("", json!([])));
    let denied = call(gw.http, "/write/x", &[("authorization", &nothing)]).await;
    assert_refused(
        &denied,
        StatusCode::FORBIDDEN,
        "auth.missing_scope",
        "Missing required scopes: workflows:read, workflows:write",
    );
    assert_eq!(
        challenge(&denied),
        r#"Bearer realm="orcheo", error="insufficient_scope", scope="workflows:read workflows:write""#
    );

    assert_eq!(
        call(gw.http, "/ws/ws-1/x", &[("authorization", &reader)])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(gw.http, "/ws/WS-2/x", &[("authorization", &reader)])
            .await
            .0,
        StatusCode::OK
    );
    let forbidden = call(gw.http, "/ws/ws-3/x", &[("authorization", &reader)]).await;
    assert_refused(
        &forbidden,
        StatusCode::FORBIDDEN,
        "auth.workspace_forbidden",
        "Workspace access denied for: ws-3",
    );
    assert!(forbidden.1.get("www-authenticate").is_none());
    let header = [
        ("authorization", reader.as_str()),
        ("x-workspace-id", "ws-9"),
    ];
    assert_eq!(
        call(gw.http, "/wsh/x", &header).await.0,
        StatusCode::FORBIDDEN
    );
    let header = [
        ("authorization", reader.as_str()),
        ("x-workspace-id", "ws-1"),
    ];
    assert_eq!(call(gw.http, "/wsh/x", &header).await.0, StatusCode::OK);
    assert_eq!(
        call(
            gw.http,
            "/wsq/x?workspace=ws-9",
            &[("authorization", &reader)]
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(
            gw.http,
            "/wsq/x?workspace=ws-2",
            &[("authorization", &reader)]
        )
        .await
        .0,
        StatusCode::OK
    );
    let all = bearer(&jwt("", json!("*")));
    assert_eq!(
        call(gw.http, "/ws/anything/x", &[("authorization", &all)])
            .await
            .0,
        StatusCode::OK
    );
    let none = bearer(&jwt("", json!([])));
    assert_eq!(
        call(gw.http, "/ws/ws-1/x", &[("authorization", &none)])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn claims_map_to_identity_headers() {
    let (gw, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    let cases: Vec<(Value, [&str; 5])> = vec![
        (
            json!({"sub": "alice", "jti": "j-1", "scope": "b a", "scp": ["c"], "orcheo": {"scopes": "d", "workspace_ids": ["W-4"]}, "workspace_id": "W-1", "workspaces": "w-2,w-3"}),
            ["alice", "j-1", "user", "a b c d", "w-1 w-2 w-3 w-4"],
        ),
        (
            json!({"sub": "svc", "token_id": "t-9", "token_use": "client", "scopes": "[\"x\",\"y\"]"}),
            ["svc", "t-9", "service", "x y", ""],
        ),
        (
            json!({"jti": "only-jti", "typ": "service", "workspace": ["*"]}),
            ["only-jti", "only-jti", "service", "", "*"],
        ),
        (
            json!({"sub": "bob", "type": "robot", "typ": "user"}),
            ["bob", "bob", "user", "", ""],
        ),
    ];
    for (mut claims, [subject, token_id, kind, scopes, workspaces]) in cases {
        claims["exp"] = json!(now() + 600);
        let token = sign(Algorithm::HS256, None, &claims);
        let result = call(gw.http, "/open/x", &[("authorization", &bearer(&token))]).await;
        assert_eq!(result.0, StatusCode::OK, "{claims}");
        let seen = upstream_headers(&result);
        assert_eq!(seen["x-orcheo-subject"][0], subject, "{claims}");
        assert_eq!(seen["x-orcheo-token-id"][0], token_id, "{claims}");
        assert_eq!(seen["x-orcheo-identity-type"][0], kind, "{claims}");
        assert_eq!(
            seen["x-orcheo-scopes"]
                .get(0)
                .and_then(Value::as_str)
                .unwrap_or(""),
            scopes,
            "{claims}"
        );
        assert_eq!(
            seen["x-orcheo-workspaces"]
                .get(0)
                .and_then(Value::as_str)
                .unwrap_or(""),
            workspaces,
            "{claims}"
        );
    }
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let spoof = [
        ("x-orcheo-subject", "root"),
        ("x-orcheo-identity-type", "service"),
        ("x-orcheo-token-id", "bootstrap"),
        ("x-orcheo-scopes", "admin:tokens:write"),
        ("x-orcheo-workspaces", "*"),
        ("x-orcheo-auth-method", "bootstrap"),
        ("x-orcheo-identity", "forged.assertion.value"),
    ];
    let (gw, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    let check = |result: &(StatusCode, HeaderMap, Value)| {
        let seen = upstream_headers(result);
        for (name, value) in spoof {
            if let Some(values) = seen.get(name) {
                assert!(
                    values.as_array().unwrap().iter().all(|v| v != value),
                    "{name} was forwarded"
                );
            }
        }
    };
    let public = call(gw.http, "/public/x", &spoof).await;
    assert_eq!(public.0, StatusCode::OK);
    check(&public);
    assert_eq!(
        upstream_headers(&public)["x-orcheo-identity-type"][0],
        "anonymous"
    );
    let mut with_token = spoof.to_vec();
    let token = bearer(&jwt("", json!([])));
    with_token.push(("authorization", &token));
    let authenticated = call(gw.http, "/open/x", &with_token).await;
    check(&authenticated);
    assert_eq!(
        upstream_headers(&authenticated)["x-orcheo-subject"][0],
        "alice"
    );
}

#[tokio::test]
async fn credentials_are_forwarded_only_when_configured() {
    let auth = format!("{}identity:\n  forward_credentials: false\n", secret_yaml());
    let (gw, _up) = gateway_with(&auth, Default::default()).await;
    let token = bearer(&jwt("", json!([])));
    let result = call(gw.http, "/open/x", &[("authorization", &token)]).await;
    assert_eq!(result.0, StatusCode::OK);
    assert!(upstream_headers(&result).get("authorization").is_none());
    let public = call(gw.http, "/public/x", &[("authorization", &token)]).await;
    assert!(upstream_headers(&public).get("authorization").is_none());
}

#[tokio::test]
async fn the_signed_identity_assertion_verifies_with_the_gateway_jwks() {
    let (plain, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    assert_eq!(
        call(plain.http, "/.well-known/orcheo-gateway/jwks.json", &[])
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    let auth = format!(
        "{}identity:\n  assertion: {{enabled: true, ttl: 30s, issuer: gw-test}}\n",
        secret_yaml()
    );
    let (gw, _up) = gateway_with(&auth, Default::default()).await;
    let (status, _, jwks) = call(gw.http, "/.well-known/orcheo-gateway/jwks.json", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let token = bearer(&jwt("workflows:read", json!(["ws-1"])));
    let result = call(gw.http, "/open/x", &[("authorization", &token)]).await;
    let assertion = upstream_headers(&result)["x-orcheo-identity"][0]
        .as_str()
        .unwrap()
        .to_string();
    // Verify it as an upstream would: with the gateway's JWKS, ES256, audience = upstream name.
    let verifier = orcheo_gateway::auth::jwt::JwtVerifier::new(
        orcheo_gateway::auth::jwt::JwtSettings {
            allowed: vec![Algorithm::ES256],
            audience: vec!["default".into()],
            issuer: Some("gw-test".into()),
            leeway: 0.0,
            required: vec!["exp".into()],
        },
        None,
        orcheo_gateway::auth::keys::parse_key_set(&jwks).unwrap().0,
        None,
        0,
    )
    .unwrap();
    let payload = verifier.verify_jws(&assertion).await.unwrap();
    let claims: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scopes"], json!(["workflows:read"]));
    assert_eq!(claims["workspace_ids"], json!(["ws-1"]));
    assert_eq!(claims["auth_method"], "jwt");
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!(lifetime > 0 && lifetime <= 30, "{lifetime}");
    assert!(verifier.verify(&assertion, now() as f64).await.is_ok());
}

#[tokio::test]
async fn a_failing_store_is_503_for_service_tokens_only() {
    let dir = temp_dir("store-down");
    let path = dir.join("tokens.sqlite");
    let store = orcheo_gateway::store::SqliteStore::open(&path).unwrap();
    let up = echo_upstream().await;
    let text = yaml(&up.url(), &format!("{ROUTES}{}", secret_yaml()));
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    let gateway =
        orcheo_gateway::app::Gateway::start_with_store(config, None, Default::default(), store)
            .await
            .unwrap();
    let http = gateway.addresses.http[0];
    assert_eq!(
        call(
            http,
            "/open/x",
            &[("authorization", "Bearer unknown-secret")]
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    // Break the database under the running gateway.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE service_tokens")
        .unwrap();
    let down = call(
        http,
        "/open/x",
        &[("authorization", "Bearer some-service-token")],
    )
    .await;
    assert_refused(
        &down,
        StatusCode::SERVICE_UNAVAILABLE,
        "auth.backend_unavailable",
        "Service token store is unavailable",
    );
    assert_eq!(down.1["retry-after"], "5");
    // JWTs are unaffected.
    assert_eq!(
        call(
            http,
            "/open/x",
            &[("authorization", &bearer(&jwt("", json!([]))))]
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_workspace_must_be_given_exactly_once() {
    let (gw, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    let reader = bearer(&jwt("workflows:read", json!(["ws-1"])));
    let auth = ("authorization", reader.as_str());
    let bad_request = |response: &(StatusCode, HeaderMap, Value)| {
        assert_refused(
            response,
            StatusCode::BAD_REQUEST,
            "request.invalid",
            "Workspace must be given exactly once",
        )
    };
    // Query: repeated (also when one copy spells its name percent-encoded), or missing.
    for target in [
        "/wsq/x?workspace=ws-1&workspace=ws-2",
        "/wsq/x?workspace=ws-1&%77orkspace=ws-2",
        "/wsq/x?workspace=ws-1&workspac%65=ws-1",
        "/wsq/x",
        "/wsq/x?workspace=",
        "/wsq/x?other=1",
    ] {
        bad_request(&call(gw.http, target, &[auth]).await);
    }
    // A name spelled percent-encoded is the parameter itself, checked as such.
    assert_eq!(
        call(gw.http, "/wsq/x?%77orkspace=ws-1", &[auth]).await.0,
        StatusCode::OK
    );
    let forbidden = call(gw.http, "/wsq/x?%77orkspace=ws-2", &[auth]).await;
    assert_refused(
        &forbidden,
        StatusCode::FORBIDDEN,
        "auth.workspace_forbidden",
        "Workspace access denied for: ws-2",
    );
    // Header: repeated, a list, or missing.
    bad_request(
        &call(
            gw.http,
            "/wsh/x",
            &[auth, ("x-workspace-id", "ws-1"), ("x-workspace-id", "ws-2")],
        )
        .await,
    );
    bad_request(&call(gw.http, "/wsh/x", &[auth, ("x-workspace-id", "ws-1, ws-2")]).await);
    bad_request(&call(gw.http, "/wsh/x", &[auth]).await);
    assert_eq!(
        call(gw.http, "/wsh/x", &[auth, ("x-workspace-id", "ws-1")])
            .await
            .0,
        StatusCode::OK
    );
    // Without a credential the caller is asked to authenticate first.
    let (status, _, body) = call(gw.http, "/wsq/x?workspace=a&workspace=b", &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth.missing_token"))
    );
}

#[tokio::test]
async fn identity_headers_spelled_with_underscores_are_stripped_too() {
    let (gw, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    let token = bearer(&jwt("", json!([])));
    let result = call(
        gw.http,
        "/open/x",
        &[
            ("authorization", &token),
            ("x_orcheo_subject", "root"),
            ("X_Orcheo_Scopes", "admin:tokens:write"),
            ("x-orcheo_identity", "forged"),
        ],
    )
    .await;
    assert_eq!(result.0, StatusCode::OK);
    let seen = upstream_headers(&result);
    for name in ["x_orcheo_subject", "x_orcheo_scopes", "x-orcheo_identity"] {
        assert!(seen.get(name).is_none(), "{name} was forwarded: {seen}");
    }
    assert_eq!(seen["x-orcheo-subject"][0], "alice");
}

#[tokio::test]
async fn an_identity_that_cannot_be_a_header_value_fails_the_request() {
    let (gw, _up) = gateway_with(&secret_yaml(), Default::default()).await;
    let token = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "alice\r\nx-orcheo-scopes: admin", "exp": now() + 600}),
    );
    let result = call(gw.http, "/open/x", &[("authorization", &bearer(&token))]).await;
    assert_refused(
        &result,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal gateway error",
    );
}

#[tokio::test]
async fn a_bootstrap_token_with_dots_is_still_the_bootstrap_token() {
    // The bootstrap token is checked first, whatever it looks like; JWTs and service
    // tokens beside it keep working.
    let store = Arc::new(MemoryStore::new());
    service_token(&store, "ci", "ci-secret", &["workflows:read"], &[]);
    let auth = format!(
        "auth:\n  jwt: {{secret: '{}'}}\n  bootstrap:\n    token: boot.strap.token\n",
        std::str::from_utf8(SECRET).unwrap()
    );
    let (gw, _up) = gateway_with(&auth, store).await;
    let boot = call(
        gw.http,
        "/read/x",
        &[("authorization", "Bearer boot.strap.token")],
    )
    .await;
    assert_eq!(boot.0, StatusCode::OK);
    assert_eq!(
        upstream_headers(&boot)["x-orcheo-auth-method"][0],
        "bootstrap"
    );
    let token = bearer(&jwt("workflows:read", json!([])));
    let signed = call(gw.http, "/read/x", &[("authorization", &token)]).await;
    assert_eq!(signed.0, StatusCode::OK);
    assert_eq!(upstream_headers(&signed)["x-orcheo-auth-method"][0], "jwt");
    let service = call(gw.http, "/read/x", &[("authorization", "Bearer ci-secret")]).await;
    assert_eq!(service.0, StatusCode::OK);
    assert_eq!(
        upstream_headers(&service)["x-orcheo-auth-method"][0],
        "service_token"
    );
    let near = call(
        gw.http,
        "/read/x",
        &[("authorization", "Bearer boot.strap.tokeN")],
    )
    .await;
    assert_eq!(near.0, StatusCode::UNAUTHORIZED);
}
