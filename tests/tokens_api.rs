//! The service-token admin API end to end, on the memory and the SQLite store: the full
//! lifecycle with Orcheo's shapes and messages, scopes, errors, the audit trail,
//! persistence across a restart, and rows written the way Orcheo writes them.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::Full;
use orcheo_gateway::app::Gateway;
use orcheo_gateway::store::{MemoryStore, SqliteStore, TokenStore};
use serde_json::{json, Value};

const BOOT: &str = "Bearer boot-admin-secret";

async fn start_store(store: Arc<dyn TokenStore>) -> (Gateway, Upstream) {
    let up = echo_upstream().await;
    let text = yaml(
        &up.url(),
        "routes: [{name: all, path: '/**'}]\nauth:\n  bootstrap: {token: boot-admin-secret}\n  service_tokens: {backend: memory}\n",
    );
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    (
        Gateway::start_with_store(config, None, Default::default(), store)
            .await
            .unwrap(),
        up,
    )
}

async fn api(
    gw: &Gateway,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gw")
        .header("user-agent", "tokens-test/1");
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let (status, headers, body) = collect(
        send(
            gw.addresses.http[0],
            builder.body(Full::new(bytes)).unwrap(),
        )
        .await,
    )
    .await;
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

const BASE: &str = "/api/admin/service-tokens";

async fn lifecycle(store: Arc<dyn TokenStore>) {
    let (gw, _up) = start_store(store).await;
    let http = gw.addresses.http[0];
    // Authentication and scopes come first.
    let (status, _, body) = api(&gw, Method::GET, BASE, None, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth.missing_token"))
    );

    let create = json!({"identifier": "ci", "name": "CI", "scopes": ["workflows:read", "admin:tokens:read"], "workspace_ids": ["WS-B", "ws-a"], "expires_in_seconds": 3600});
    let (status, _, created) = api(&gw, Method::POST, BASE, Some(BOOT), Some(create.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 43);
    assert_eq!(created["identifier"], "ci");
    assert_eq!(created["name"], "CI");
    assert_eq!(
        created["scopes"],
        json!(["admin:tokens:read", "workflows:read"])
    );
    assert_eq!(created["workspace_ids"], json!(["WS-B", "ws-a"]));
    assert_eq!(created["secret_preview"], &secret[39..]);
    assert_eq!(created["status"], "active");
    assert_eq!(
        created["message"],
        "Store this token securely. It will not be shown again."
    );
    assert!(created["issued_at"].as_str().unwrap().ends_with('Z'));
    assert!(created["expires_at"].as_str().unwrap().ends_with('Z'));
    let ci = format!("Bearer {secret}");

    // The new token works, through the proxy and on the API within its scopes.
    let (status, _, echo) = call(http, "/x", &[("authorization", &ci)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["headers"]["x-orcheo-token-id"][0], "ci");
    assert_eq!(
        api(&gw, Method::GET, BASE, Some(&ci), None).await.0,
        StatusCode::OK
    );
    let (status, _, body) = api(&gw, Method::POST, BASE, Some(&ci), Some(json!({}))).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (
            StatusCode::FORBIDDEN,
            Some("Missing required scopes: admin:tokens:write")
        )
    );

    // Conflicts and bad bodies.
    let (status, _, body) = api(&gw, Method::POST, BASE, Some(BOOT), Some(create)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("token.conflict"))
    );
    let (status, _, body) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"expires_in_seconds": 30})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("request.invalid"))
    );
    let (status, _, _) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"scopes": "not-a-list"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, auto) = api(&gw, Method::POST, BASE, Some(BOOT), Some(json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let auto_id = auto["identifier"].as_str().unwrap().to_string();
    assert_eq!(
        auto_id.len(),
        8,
        "default id: the first 8 hex characters of the hash"
    );

    // Show and list.
    let (status, _, shown) = api(&gw, Method::GET, &format!("{BASE}/ci"), Some(BOOT), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["secret"], Value::Null);
    // Three uses so far (proxy, list, the refused create); reads flush the counts first.
    assert_eq!(shown["use_count"], 3);
    assert!(shown["last_used_at"].as_str().unwrap().ends_with('Z'));
    let (status, _, body) = api(&gw, Method::GET, &format!("{BASE}/nope"), Some(BOOT), None).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (
            StatusCode::NOT_FOUND,
            Some("Service token 'nope' not found")
        )
    );
    let (_, _, listed) = api(&gw, Method::GET, BASE, Some(BOOT), None).await;
    assert_eq!(listed["total"], 2);

    // Rotation with overlap 0 ends the old token at once.
    let (status, _, rotated) = api(
        &gw,
        Method::POST,
        &format!("{BASE}/ci/rotate"),
        Some(BOOT),
        Some(json!({"overlap_seconds": 0, "identifier": "ci-2"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(
        rotated["message"],
        "New token created. Old token 'ci' valid for 0s."
    );
    assert_eq!(rotated["rotated_from"], "ci");
    assert_eq!(
        rotated["scopes"],
        json!(["admin:tokens:read", "workflows:read"])
    );
    let ci2 = format!("Bearer {}", rotated["secret"].as_str().unwrap());
    let (status, _, body) = call(http, "/x", &[("authorization", &ci)]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth.token_expired"))
    );
    assert_eq!(
        call(http, "/x", &[("authorization", &ci2)]).await.0,
        StatusCode::OK
    );
    let (_, _, old) = api(&gw, Method::GET, &format!("{BASE}/ci"), Some(BOOT), None).await;
    assert_eq!(
        (old["status"].as_str(), old["rotated_to"].as_str()),
        (Some("expired"), Some("ci-2"))
    );
    // With the default overlap, the old token keeps working meanwhile.
    let (_, _, rotated) = api(
        &gw,
        Method::POST,
        &format!("{BASE}/ci-2/rotate"),
        Some(BOOT),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        rotated["message"],
        "New token created. Old token 'ci-2' valid for 300s."
    );
    assert_eq!(
        call(http, "/x", &[("authorization", &ci2)]).await.0,
        StatusCode::OK
    );
    let (_, _, listed) = api(
        &gw,
        Method::GET,
        &format!("{BASE}?status=rotating"),
        Some(BOOT),
        None,
    )
    .await;
    assert_eq!(listed["tokens"][0]["identifier"], "ci-2");
    assert_eq!(listed["total"], 1);
    assert_eq!(
        api(
            &gw,
            Method::GET,
            &format!("{BASE}?status=bogus"),
            Some(BOOT),
            None
        )
        .await
        .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // Revocation.
    let (status, _, _) = api(
        &gw,
        Method::DELETE,
        &format!("{BASE}/{auto_id}"),
        Some(BOOT),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a reason is required"
    );
    let (status, _, body) = api(
        &gw,
        Method::DELETE,
        &format!("{BASE}/{auto_id}"),
        Some(BOOT),
        Some(json!({"reason": "leaked in a log"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let auto_secret = format!("Bearer {}", auto["secret"].as_str().unwrap());
    let (status, _, body) = call(http, "/x", &[("authorization", &auto_secret)]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth.token_revoked"))
    );
    let (status, _, body) = api(
        &gw,
        Method::POST,
        &format!("{BASE}/{auto_id}/rotate"),
        Some(BOOT),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("token.revoked"))
    );
    let (_, _, revoked) = api(
        &gw,
        Method::GET,
        &format!("{BASE}/{auto_id}"),
        Some(BOOT),
        None,
    )
    .await;
    assert_eq!(
        (
            revoked["status"].as_str(),
            revoked["revocation_reason"].as_str()
        ),
        (Some("revoked"), Some("leaked in a log"))
    );

    // The audit trail, newest first, with who, from where, with what.
    let (status, _, trail) = api(
        &gw,
        Method::GET,
        &format!("{BASE}/{auto_id}/audit"),
        Some(BOOT),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events = trail["events"].as_array().unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["revoked", "created"]
    );
    assert_eq!(events[0]["details"], json!({"reason": "leaked in a log"}));
    assert_eq!(events[0]["actor"], "bootstrap");
    assert_eq!(events[0]["ip_address"], "127.0.0.1");
    assert_eq!(events[0]["user_agent"], "tokens-test/1");
    let (_, _, trail) = api(
        &gw,
        Method::GET,
        &format!("{BASE}/ci/audit"),
        Some(BOOT),
        None,
    )
    .await;
    let actions: Vec<&str> = trail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["rotated", "created"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_lifecycle_on_the_memory_store() {
    lifecycle(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn the_lifecycle_on_the_sqlite_store() {
    let dir = temp_dir("tokens-sqlite");
    lifecycle(SqliteStore::open(&dir.join("tokens.sqlite")).unwrap()).await;
}

#[tokio::test]
async fn sqlite_tokens_survive_a_restart() {
    let dir = temp_dir("tokens-restart");
    let path = dir.join("tokens.sqlite");
    let (gw, _up) = start_store(SqliteStore::open(&path).unwrap()).await;
    let (_, _, created) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"identifier": "keeper"})),
    )
    .await;
    let secret = format!("Bearer {}", created["secret"].as_str().unwrap());
    gw.shutdown().await;
    let (gw, _up) = start_store(SqliteStore::open(&path).unwrap()).await;
    let (status, _, echo) = call(gw.addresses.http[0], "/x", &[("authorization", &secret)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["headers"]["x-orcheo-token-id"][0], "keeper");
    let (_, _, trail) = api(
        &gw,
        Method::GET,
        &format!("{BASE}/keeper/audit"),
        Some(BOOT),
        None,
    )
    .await;
    assert_eq!(trail["events"][0]["action"], "created");
}

#[tokio::test]
async fn a_row_written_the_way_orcheo_writes_it_is_accepted() {
    let dir = temp_dir("tokens-orcheo");
    let path = dir.join("tokens.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let hash = orcheo_gateway::store::hash_secret("ci-token");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO service_tokens (identifier, secret_hash, scopes, workspace_ids, created_at, issued_at, expires_at, use_count) \
             VALUES ('orcheo-ci', ?1, '[\"workflows:execute\", \"workflows:read\"]', '[\"ws-1\"]', \
             '2025-01-01T00:00:00.123456+00:00', '2025-01-01T00:00:00.123456+00:00', '2999-01-01T00:00:00.000001+00:00', 0)",
            [&hash],
        )
        .unwrap();
    let (gw, _up) = start_store(store).await;
    let (status, _, echo) = call(
        gw.addresses.http[0],
        "/x",
        &[("authorization", "Bearer ci-token")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        echo["headers"]["x-orcheo-scopes"][0],
        "workflows:execute workflows:read"
    );
    assert_eq!(echo["headers"]["x-orcheo-workspaces"][0], "ws-1");
    let (_, _, shown) = api(
        &gw,
        Method::GET,
        &format!("{BASE}/orcheo-ci"),
        Some(BOOT),
        None,
    )
    .await;
    assert_eq!(shown["issued_at"], "2025-01-01T00:00:00Z");
    assert_eq!(shown["expires_at"], "2999-01-01T00:00:00Z");
    assert_eq!(shown["status"], "active");
}

#[tokio::test]
async fn unreadable_expiry_or_revocation_times_refuse_the_token() {
    let dir = temp_dir("tokens-unreadable");
    let path = dir.join("tokens.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let connection = rusqlite::Connection::open(&path).unwrap();
    for (id, column) in [
        ("bad-expiry", "expires_at"),
        ("bad-revocation", "revoked_at"),
    ] {
        let hash = orcheo_gateway::store::hash_secret(id);
        connection
            .execute(
                &format!(
                    "INSERT INTO service_tokens (identifier, secret_hash, created_at, {column}) \
                     VALUES (?1, ?2, '2025-01-01T00:00:00+00:00', 'next tuesday')"
                ),
                [id, hash.as_str()],
            )
            .unwrap();
    }
    let (gw, _up) = start_store(store).await;
    for (id, code) in [
        ("bad-expiry", "auth.token_expired"),
        ("bad-revocation", "auth.token_revoked"),
    ] {
        let (status, _, body) = call(
            gw.addresses.http[0],
            "/x",
            &[("authorization", &format!("Bearer {id}"))],
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some(code)),
            "{id}"
        );
    }
}

#[tokio::test]
async fn usage_is_counted_in_memory_and_written_at_shutdown() {
    let dir = temp_dir("tokens-usage");
    let path = dir.join("tokens.sqlite");
    let (gw, _up) = start_store(SqliteStore::open(&path).unwrap()).await;
    let (_, _, created) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"identifier": "busy"})),
    )
    .await;
    let secret = format!("Bearer {}", created["secret"].as_str().unwrap());
    let mut sender = connection(gw.addresses.http[0]).await;
    for _ in 0..1000 {
        let request = Request::get("/x")
            .header("host", "gw")
            .header("authorization", &secret)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        collect(response).await;
    }
    // Nothing was written per request.
    let stored = |path: &std::path::Path| {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT use_count, last_used_at FROM service_tokens WHERE identifier = 'busy'",
                [],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Option<String>>(1)?)),
            )
            .unwrap()
    };
    assert_eq!(
        stored(&path).0,
        0,
        "usage is batched, not written per request"
    );
    gw.shutdown().await;
    let (count, last_used) = stored(&path);
    assert_eq!(count, 1000);
    assert!(last_used.unwrap().ends_with("+00:00"));
}

#[tokio::test]
async fn a_store_outage_spares_cached_tokens_and_recovers() {
    let dir = temp_dir("tokens-outage");
    let path = dir.join("tokens.sqlite");
    let (gw, _up) = start_store(SqliteStore::open(&path).unwrap()).await;
    let http = gw.addresses.http[0];
    let (_, _, warm) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"identifier": "warm"})),
    )
    .await;
    let (_, _, cold) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"identifier": "cold"})),
    )
    .await;
    let warm = format!("Bearer {}", warm["secret"].as_str().unwrap());
    let cold = format!("Bearer {}", cold["secret"].as_str().unwrap());
    assert_eq!(
        call(http, "/x", &[("authorization", &warm)]).await.0,
        StatusCode::OK
    );
    // The database goes away under the running gateway.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE service_tokens RENAME TO service_tokens_away")
        .unwrap();
    assert_eq!(
        call(http, "/x", &[("authorization", &warm)]).await.0,
        StatusCode::OK,
        "a cached token keeps working"
    );
    let (status, headers, body) = call(http, "/x", &[("authorization", &cold)]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("auth.backend_unavailable")
        )
    );
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        call(http, "/x", &[("authorization", BOOT)]).await.0,
        StatusCode::OK,
        "the bootstrap token is unaffected"
    );
    let admin = gw.addresses.admin.unwrap();
    let (status, _, ready) = get(admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&ready)["checks"]["token_store"]["ok"], false);
    let metrics = String::from_utf8(get(admin, "/metrics").await.2.to_vec()).unwrap();
    assert!(metric_value(&metrics, "orcheo_gateway_token_store_errors_total").unwrap() >= 1.0);
    // It comes back: everything works again.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE service_tokens_away RENAME TO service_tokens")
        .unwrap();
    assert_eq!(
        call(http, "/x", &[("authorization", &cold)]).await.0,
        StatusCode::OK
    );
    assert_eq!(get(admin, "/readyz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn reserved_ids_huge_durations_and_bad_bodies_are_refused() {
    let (gw, _up) = start_store(Arc::new(MemoryStore::new())).await;
    for id in [".", "..", "bootstrap", "BOOTSTRAP"] {
        let (status, _, body) = api(
            &gw,
            Method::POST,
            BASE,
            Some(BOOT),
            Some(json!({"identifier": id})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{id}: {body}");
        assert_eq!(body["code"], "request.invalid");
    }
    for huge in [json!(i64::MAX), json!(9_000_000_000_000i64)] {
        let (status, _, body) = api(
            &gw,
            Method::POST,
            BASE,
            Some(BOOT),
            Some(json!({"expires_in_seconds": huge})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    let (status, _, _) = api(
        &gw,
        Method::POST,
        BASE,
        Some(BOOT),
        Some(json!({"identifier": "r"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) = api(
        &gw,
        Method::POST,
        &format!("{BASE}/r/rotate"),
        Some(BOOT),
        Some(json!({"overlap_seconds": i64::MAX})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // Still usable: the refused rotation changed nothing.
    let (_, _, shown) = api(&gw, Method::GET, &format!("{BASE}/r"), Some(BOOT), None).await;
    assert_eq!(shown["status"], "active");
    // A body over 64 KiB.
    let big = json!({"identifier": "big", "name": "x".repeat(70 * 1024)});
    let (status, _, _) = api(&gw, Method::POST, BASE, Some(BOOT), Some(big)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn an_admin_body_must_arrive_within_the_header_timeout() {
    let up = echo_upstream().await;
    let text = yaml(
        &up.url(),
        "routes: []\nlimits: {header_read_timeout: 500ms}\nauth:\n  bootstrap: {token: boot-admin-secret}\n",
    );
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    let gw = Gateway::start_with_store(
        config,
        None,
        Default::default(),
        Arc::new(MemoryStore::new()),
    )
    .await
    .unwrap();
    let mut stream = tokio::net::TcpStream::connect(gw.addresses.http[0])
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"POST /api/admin/service-tokens HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer boot-admin-secret\r\ncontent-length: 100\r\n\r\n{\"iden")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_opening_one_new_sqlite_file_together_all_start() {
    // A rolling restart or replicas on one volume: the schema set-up of each sees the
    // others' (two adding the same column failed the second before).
    let mut path = std::path::PathBuf::new();
    for round in 0..40 {
        let dir = temp_dir(&format!("tokens-together-{round}"));
        path = dir.join("tokens.sqlite");
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let runtime = tokio::runtime::Handle::current();
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let (path, barrier, runtime) = (path.clone(), barrier.clone(), runtime.clone());
                std::thread::spawn(move || {
                    let _entered = runtime.enter();
                    barrier.wait();
                    SqliteStore::open(&path).map(|_| ())
                })
            })
            .collect();
        for opener in openers {
            opener
                .join()
                .unwrap()
                .expect("every gateway opens the shared file");
        }
    }
    // And the file they made works.
    lifecycle(SqliteStore::open(&path).unwrap()).await;
}
