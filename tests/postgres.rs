//! Service tokens on a real PostgreSQL (127.0.0.1:5432, or $ORCHEO_TEST_POSTGRES_URL for
//! the maintenance database): the lifecycle and a restart, a row written the way Orcheo
//! writes it, revocation on one replica honoured by another within a second, killed
//! connections, the table going away and coming back, and usage written at shutdown.
//! Each test works in a database of its own. Without a server the tests say so and
//! skip — except in CI (`CI` set), where they fail.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, Request, StatusCode};
use orcheo_gateway::app::Gateway;
use serde_json::{json, Value};

fn admin_url() -> String {
    std::env::var("ORCHEO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn admin() -> Option<tokio_postgres::Client> {
    match tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Some(client)
        }
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is required in CI: {error}"
            );
            eprintln!(
                "\n*** SKIPPED: no PostgreSQL at {} ({error}); set ORCHEO_TEST_POSTGRES_URL ***\n",
                admin_url()
            );
            None
        }
    }
}

/// Drops a test database, closing whatever still uses it.
async fn drop_database(admin: &tokio_postgres::Client, dsn: &str) {
    let db = dsn.rsplit_once('/').unwrap().1;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
}

/// A fresh database; returns the admin client and the database's DSN.
async fn database(name: &str) -> Option<(tokio_postgres::Client, String)> {
    let client = admin().await?;
    let db = format!("orcheo_gw_{name}_{}", std::process::id());
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let base = admin_url();
    let dsn = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    Some((client, dsn))
}

async fn db_client(dsn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

async fn gateway_on(dsn: &str, up: &Upstream) -> Gateway {
    let text = yaml(
        &up.url(),
        &format!("routes: [{{name: all, path: '/**'}}]\nauth:\n  bootstrap: {{token: pg-boot}}\n  service_tokens: {{backend: postgres, postgres_dsn: '{dsn}'}}\n"),
    );
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    Gateway::start(config, None, Default::default())
        .await
        .unwrap()
}

const BASE: &str = "/api/admin/service-tokens";

async fn api(gw: &Gateway, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let bytes = body
        .map(|b| bytes::Bytes::from(b.to_string()))
        .unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gw")
        .header("authorization", "Bearer pg-boot")
        .body(http_body_util::Full::new(bytes))
        .unwrap();
    let (status, _, body) = collect(send(gw.addresses.http[0], request).await).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn create(gw: &Gateway, id: &str) -> String {
    let (status, token) = api(
        gw,
        Method::POST,
        BASE,
        Some(json!({"identifier": id, "scopes": ["workflows:read"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    format!("Bearer {}", token["secret"].as_str().unwrap())
}

#[tokio::test]
async fn lifecycle_restart_and_orcheo_rows_on_postgres() {
    let Some((admin, dsn)) = database("lifecycle").await else {
        return;
    };
    let up = echo_upstream().await;
    let gw = gateway_on(&dsn, &up).await;
    let secret = create(&gw, "pg-ci").await;
    assert_eq!(
        api(
            &gw,
            Method::POST,
            BASE,
            Some(json!({"identifier": "pg-ci"}))
        )
        .await
        .0,
        StatusCode::CONFLICT
    );
    let (status, _, echo) = call(gw.addresses.http[0], "/x", &[("authorization", &secret)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["headers"]["x-orcheo-token-id"][0], "pg-ci");
    let (status, rotated) = api(
        &gw,
        Method::POST,
        &format!("{BASE}/pg-ci/rotate"),
        Some(json!({"overlap_seconds": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let new_secret = format!("Bearer {}", rotated["secret"].as_str().unwrap());
    assert_eq!(
        call(gw.addresses.http[0], "/x", &[("authorization", &secret)])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (_, trail) = api(&gw, Method::GET, &format!("{BASE}/pg-ci/audit"), None).await;
    assert_eq!(trail["events"][0]["action"], "rotated");
    gw.shutdown().await;

    // A restart: the rotated token still works; a row written as Orcheo writes it too.
    let client = db_client(&dsn).await;
    client
        .execute(
            "INSERT INTO service_tokens (identifier, secret_hash, scopes, workspace_ids, created_at, issued_at, use_count) \
             VALUES ('orcheo-row', $1, '[\"workflows:execute\"]'::jsonb, '[\"ws-9\"]'::jsonb, now(), now(), 0)",
            &[&orcheo_gateway::store::hash_secret("orcheo-written")],
        )
        .await
        .unwrap();
    let gw = gateway_on(&dsn, &up).await;
    assert_eq!(
        call(
            gw.addresses.http[0],
            "/x",
            &[("authorization", &new_secret)]
        )
        .await
        .0,
        StatusCode::OK
    );
    let (status, _, echo) = call(
        gw.addresses.http[0],
        "/x",
        &[("authorization", "Bearer orcheo-written")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["headers"]["x-orcheo-scopes"][0], "workflows:execute");
    assert_eq!(echo["headers"]["x-orcheo-workspaces"][0], "ws-9");
    gw.shutdown().await;
    drop_database(&admin, &dsn).await;
}

#[tokio::test]
async fn replicas_starting_together_on_a_new_database_all_come_up() {
    let Some((admin, dsn)) = database("together").await else {
        return;
    };
    let up = echo_upstream().await;
    // Their schema set-ups run at once; each must find the tables the others made.
    let replicas = futures_util::future::join_all((0..8).map(|_| gateway_on(&dsn, &up))).await;
    for (i, replica) in replicas.iter().enumerate() {
        let ready = eventually(Duration::from_secs(5), || async {
            get(replica.addresses.admin.unwrap(), "/readyz").await.0 == StatusCode::OK
        })
        .await;
        assert!(ready, "replica {i} never became ready");
    }
    let secret = create(&replicas[0], "together").await;
    for replica in &replicas {
        let (status, _, _) = call(
            replica.addresses.http[0],
            "/x",
            &[("authorization", &secret)],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    for replica in replicas {
        replica.shutdown().await;
    }
    drop_database(&admin, &dsn).await;
}

#[tokio::test]
async fn a_revocation_on_one_replica_reaches_another_within_a_second() {
    let Some((admin, dsn)) = database("replicas").await else {
        return;
    };
    let up = echo_upstream().await;
    let a = gateway_on(&dsn, &up).await;
    let b = gateway_on(&dsn, &up).await;
    let secret = create(&a, "shared").await;
    // B has it cached after this.
    assert_eq!(
        call(b.addresses.http[0], "/x", &[("authorization", &secret)])
            .await
            .0,
        StatusCode::OK
    );
    let (status, _) = api(
        &a,
        Method::DELETE,
        &format!("{BASE}/shared"),
        Some(json!({"reason": "test"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked_at = Instant::now();
    let seen = eventually(Duration::from_secs(3), || async {
        call(b.addresses.http[0], "/x", &[("authorization", &secret)])
            .await
            .2["code"]
            == "auth.token_revoked"
    })
    .await;
    assert!(seen, "replica B never saw the revocation");
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        revoked_at.elapsed()
    );
    a.shutdown().await;
    b.shutdown().await;
    drop_database(&admin, &dsn).await;
}

#[tokio::test]
async fn killed_connections_and_a_missing_table_are_survived() {
    let Some((admin, dsn)) = database("outage").await else {
        return;
    };
    let db = dsn.rsplit_once('/').unwrap().1.to_string();
    let up = echo_upstream().await;
    let gw = gateway_on(&dsn, &up).await;
    let http = gw.addresses.http[0];
    let warm = create(&gw, "warm").await;
    let cold = create(&gw, "cold").await;
    assert_eq!(
        call(http, "/x", &[("authorization", &warm)]).await.0,
        StatusCode::OK
    );
    // Every connection of the gateway is killed: the pool replaces them by itself.
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&db])
        .await
        .unwrap();
    let recovered = eventually(Duration::from_secs(5), || async {
        call(http, "/x", &[("authorization", &cold)]).await.0 == StatusCode::OK
    })
    .await;
    assert!(
        recovered,
        "no reconnection after the connections were killed"
    );
    let fresh = create(&gw, "fresh").await;
    // The table goes away: cached tokens keep working, uncached ones get 503.
    let client = db_client(&dsn).await;
    client
        .batch_execute("ALTER TABLE service_tokens RENAME TO service_tokens_away")
        .await
        .unwrap();
    assert_eq!(
        call(http, "/x", &[("authorization", &warm)]).await.0,
        StatusCode::OK
    );
    let (status, _, body) = call(http, "/x", &[("authorization", &fresh)]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("auth.backend_unavailable")
        )
    );
    assert_eq!(
        get(gw.addresses.admin.unwrap(), "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    client
        .batch_execute("ALTER TABLE service_tokens_away RENAME TO service_tokens")
        .await
        .unwrap();
    let back = call(http, "/x", &[("authorization", &fresh)]).await;
    assert_eq!(back.0, StatusCode::OK, "{}", back.2);
    assert_eq!(
        get(gw.addresses.admin.unwrap(), "/readyz").await.0,
        StatusCode::OK
    );

    // Usage: counted in memory, written at shutdown.
    for _ in 0..50 {
        assert_eq!(
            call(http, "/x", &[("authorization", &fresh)]).await.0,
            StatusCode::OK
        );
    }
    gw.shutdown().await;
    let row = client
        .query_one(
            "SELECT use_count FROM service_tokens WHERE identifier = 'fresh'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 51);
    drop(client);
    drop_database(&admin, &dsn).await;
}

/// `token_store_errors_total` of a gateway.
async fn store_errors(gw: &Gateway) -> f64 {
    let metrics = metrics_of(gw.addresses.admin.unwrap()).await;
    metric_value(&metrics, "orcheo_gateway_token_store_errors_total").unwrap_or(0.0)
}

#[tokio::test]
async fn a_revocation_is_honoured_while_the_store_is_down_and_spares_the_others() {
    let Some((admin, dsn)) = database("failclosed").await else {
        return;
    };
    let up = echo_upstream().await;
    let a = gateway_on(&dsn, &up).await;
    let b = gateway_on(&dsn, &up).await;
    let b_http = b.addresses.http[0];
    let revoked = create(&a, "to-revoke").await;
    let rotated = create(&a, "to-rotate").await;
    let kept = create(&a, "kept").await;
    for secret in [&revoked, &rotated, &kept] {
        assert_eq!(
            call(b_http, "/x", &[("authorization", secret)]).await.0,
            StatusCode::OK
        );
    }
    // Replica A revokes one token and rotates another with no overlap; the table goes
    // away before replica B asks the database about either of them again.
    let (status, _) = api(
        &a,
        Method::DELETE,
        &format!("{BASE}/to-revoke"),
        Some(json!({"reason": "leaked"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api(
        &a,
        Method::POST,
        &format!("{BASE}/to-rotate/rotate"),
        Some(json!({"overlap_seconds": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let client = db_client(&dsn).await;
    client
        .batch_execute("ALTER TABLE service_tokens RENAME TO service_tokens_away")
        .await
        .unwrap();
    let errors_before = store_errors(&b).await;
    let refused = eventually(Duration::from_secs(3), || async {
        call(b_http, "/x", &[("authorization", &revoked)]).await.2["code"] == "auth.token_revoked"
    })
    .await;
    assert!(
        refused,
        "a revoked token was served from the cache during the outage"
    );
    let (status, _, body) = call(b_http, "/x", &[("authorization", &rotated)]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth.token_expired")),
        "a rotated-out token was served from the cache during the outage"
    );
    // The untouched token keeps working, answered from the cache without the database.
    for _ in 0..5 {
        assert_eq!(
            call(b_http, "/x", &[("authorization", &kept)]).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        store_errors(&b).await,
        errors_before,
        "cached tokens were asked for again because another token changed"
    );
    client
        .batch_execute("ALTER TABLE service_tokens_away RENAME TO service_tokens")
        .await
        .unwrap();
    a.shutdown().await;
    b.shutdown().await;
    drop(client);
    drop_database(&admin, &dsn).await;
}

#[tokio::test]
async fn unknown_secrets_are_remembered_briefly() {
    let Some((admin, dsn)) = database("negative").await else {
        return;
    };
    let up = echo_upstream().await;
    let gw = gateway_on(&dsn, &up).await;
    let http = gw.addresses.http[0];
    let unknown = "Bearer never-issued-secret";
    assert_eq!(
        call(http, "/x", &[("authorization", unknown)]).await.2["code"],
        "auth.invalid_token"
    );
    // The database goes away: the same unknown secret is still answered from memory, not
    // turned into one failing query per request.
    let client = db_client(&dsn).await;
    client
        .batch_execute("ALTER TABLE service_tokens RENAME TO service_tokens_away")
        .await
        .unwrap();
    let errors_before = store_errors(&gw).await;
    for _ in 0..20 {
        assert_eq!(
            call(http, "/x", &[("authorization", unknown)]).await.2["code"],
            "auth.invalid_token"
        );
    }
    assert_eq!(store_errors(&gw).await, errors_before);
    client
        .batch_execute("ALTER TABLE service_tokens_away RENAME TO service_tokens")
        .await
        .unwrap();
    gw.shutdown().await;
    drop(client);
    drop_database(&admin, &dsn).await;
}

/// A TCP relay on `listener` to PostgreSQL, started when the test lets the database
/// "come back".
async fn relay_to_postgres(listener: tokio::net::TcpListener) {
    let target = admin_url()
        .rsplit_once('@')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_string();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test]
async fn the_gateway_starts_without_the_database_and_connects_when_it_returns() {
    let Some((admin, dsn)) = database("late").await else {
        return;
    };
    // A port where nothing listens yet; the database "returns" when a relay opens it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let db = dsn.rsplit_once('/').unwrap().1;
    let user = admin_url()
        .split("://")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let late_dsn = format!("postgres://{user}@127.0.0.1:{port}/{db}");
    let up = echo_upstream().await;
    let secret = std::str::from_utf8(common::jwt::SECRET).unwrap();
    let text = yaml(
        &up.url(),
        &format!("routes: [{{name: all, path: '/**'}}]\nauth:\n  bootstrap: {{token: pg-boot}}\n  jwt: {{secret: '{secret}'}}\n  service_tokens: {{backend: postgres, postgres_dsn: '{late_dsn}'}}\n"),
    );
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    let gw = Gateway::start(config, None, Default::default())
        .await
        .expect("the gateway starts while PostgreSQL is unreachable");
    let http = gw.addresses.http[0];
    let admin_addr = gw.addresses.admin.unwrap();
    // JWT and bootstrap traffic work; service tokens cannot be checked.
    let token = common::jwt::sign(
        jsonwebtoken::Algorithm::HS256,
        None,
        &common::jwt::claims("u"),
    );
    let jwt = format!("Bearer {token}");
    assert_eq!(
        call(http, "/x", &[("authorization", &jwt)]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(http, "/x", &[("authorization", "Bearer pg-boot")])
            .await
            .0,
        StatusCode::OK
    );
    let (status, headers, body) = call(
        http,
        "/x",
        &[("authorization", "Bearer some-service-token")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("auth.backend_unavailable")
        )
    );
    assert!(headers.contains_key("retry-after"));
    let (status, _, body) = get(admin_addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let readiness: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        readiness["checks"]["token_store"]["ok"], false,
        "{readiness}"
    );

    // The database comes back: no restart needed.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    relay_to_postgres(listener).await;
    let ready = eventually(Duration::from_secs(10), || async {
        get(admin_addr, "/readyz").await.0 == StatusCode::OK
    })
    .await;
    assert!(
        ready,
        "the gateway never connected to the returning database"
    );
    let secret = create(&gw, "late").await;
    assert_eq!(
        call(http, "/x", &[("authorization", &secret)]).await.0,
        StatusCode::OK
    );
    gw.shutdown().await;
    drop_database(&admin, &dsn).await;
}

#[tokio::test]
async fn an_unreadable_expiry_refuses_the_token() {
    let Some((admin, dsn)) = database("unreadable").await else {
        return;
    };
    let up = echo_upstream().await;
    let gw = gateway_on(&dsn, &up).await;
    let client = db_client(&dsn).await;
    let hash = orcheo_gateway::store::hash_secret("infinite-secret");
    client
        .execute(
            "INSERT INTO service_tokens (identifier, secret_hash, expires_at) VALUES ('infinite', $1, '-infinity')",
            &[&hash],
        )
        .await
        .unwrap();
    let (status, _, body) = call(
        gw.addresses.http[0],
        "/x",
        &[("authorization", "Bearer infinite-secret")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth.token_expired"))
    );
    gw.shutdown().await;
    drop(client);
    drop_database(&admin, &dsn).await;
}
