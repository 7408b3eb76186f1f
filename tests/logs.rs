//! What the logs say about authentication: one line per failure with its code, client IP
//! and token fingerprint, and never a token — also at debug level with sensitive debug on.
//! Alone in its binary, because it installs the process-wide log subscriber.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::jwt::*;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::Algorithm;
use orcheo_gateway::store::{hash_secret, MemoryStore, TokenRecord};
use orcheo_gateway::time::Timestamp;
use serde_json::json;

async fn send_with(
    addr: std::net::SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> StatusCode {
    let mut builder = Request::get(path).header("host", "gw");
    if let Some(value) = authorization {
        builder = builder.header("authorization", value);
    }
    collect(send(addr, builder.body(Full::new(Bytes::new())).unwrap()).await)
        .await
        .0
}

#[tokio::test]
async fn no_token_ever_reaches_the_logs() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .init();

    let store = Arc::new(MemoryStore::new());
    let service_secret = "svc-secret-value-0123456789abcdefghijklmnopq";
    store.put(TokenRecord {
        identifier: "svc".into(),
        secret_hash: hash_secret(service_secret),
        scopes: vec![],
        workspace_ids: vec![],
        issued_at: Timestamp::now(),
        expires_at: None,
        revoked_at: Some(Timestamp::now()),
        ..Default::default()
    });
    let up = echo_upstream().await;
    let text = yaml(
        &up.url(),
        &format!(
            "routes: [{{name: all, path: '/**'}}]\nauth:\n  jwt: {{secret: '{}'}}\n  bootstrap: {{token: boot-secret-value-xyz}}\nlog: {{sensitive_debug: true, level: trace}}\n",
            std::str::from_utf8(SECRET).unwrap()
        ),
    );
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    let gw = start_with(config, None, store).await;

    let good = sign(Algorithm::HS256, None, &claims("log-user"));
    let expired = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "old", "exp": now() - 60}),
    );
    let forged = format!("{}AAAA", &good[..good.len() - 4]);
    let tokens = [
        good.as_str(),
        expired.as_str(),
        forged.as_str(),
        service_secret,
        "boot-secret-value-xyz",
    ];
    assert_eq!(
        send_with(gw.http, "/a", Some(&format!("Bearer {good}"))).await,
        StatusCode::OK
    );
    assert_eq!(
        send_with(gw.http, "/a", Some(&format!("Bearer {expired}"))).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send_with(gw.http, "/a", Some(&format!("Bearer {forged}"))).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send_with(gw.http, "/a", Some(&format!("Bearer {service_secret}"))).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send_with(gw.http, "/a", Some("Bearer boot-secret-value-xyz")).await,
        StatusCode::OK
    );
    assert_eq!(
        send_with(gw.http, "/a", Some("Basic dXNlcjpzZWNyZXQtcGFzc3dvcmQ=")).await,
        StatusCode::UNAUTHORIZED
    );
    let query = format!("/a?token={good}&access_token={service_secret}");
    send_with(gw.http, &query, Some(&format!("Bearer {good}"))).await;
    // Other spellings of the same parameters are redacted too.
    let spelled = format!("/a?%74oken={good}&ACCESS_TOKEN={service_secret}&Access%5FToken={good}");
    send_with(gw.http, &spelled, Some(&format!("Bearer {good}"))).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for token in tokens {
        assert!(!logs.contains(token), "a token reached the logs:\n{logs}");
    }
    assert!(
        !logs.contains("dXNlcjpzZWNyZXQtcGFzc3dvcmQ="),
        "Basic credentials reached the logs"
    );
    assert!(
        !logs.contains(SECRET_TEXT),
        "the JWT secret reached the logs"
    );
    let failures: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("authentication failed"))
        .collect();
    assert_eq!(failures.len(), 4, "{logs}");
    for (line, code) in failures.iter().zip([
        "auth.token_expired",
        "auth.invalid_token",
        "auth.token_revoked",
        "auth.invalid_scheme",
    ]) {
        assert!(line.contains(&format!(r#""code":"{code}""#)), "{line}");
        assert!(line.contains(r#""client_ip":"127.0.0.1""#), "{line}");
    }
    let fingerprint = orcheo_gateway::auth::fingerprint(&expired);
    assert!(failures[0].contains(&fingerprint), "{}", failures[0]);
    assert!(
        failures[0].contains(r#""identity":"old""#),
        "{}",
        failures[0]
    );
    for redacted in [
        "token=REDACTED",
        "access_token=REDACTED",
        "%74oken=REDACTED",
        "ACCESS_TOKEN=REDACTED",
        "Access%5FToken=REDACTED",
    ] {
        assert!(logs.contains(redacted), "{redacted}: {logs}");
    }
    assert!(
        logs.contains("the bootstrap service token was used"),
        "{logs}"
    );
}

const SECRET_TEXT: &str = "test-secret-with-at-least-32-bytes!!";
