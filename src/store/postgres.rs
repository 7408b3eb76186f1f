//! The PostgreSQL token store, for several replicas: Orcheo's schema (TIMESTAMPTZ and
//! JSONB), a pool that replaces broken connections by itself, and LISTEN/NOTIFY so that a
//! revocation or rotation on one replica reaches every other within a second — with a
//! periodic resync, so that a missed notification cannot leave a revoked token valid
//! for long.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::{
    AuditEvent, BoxFuture, Change, StoreChange, StoreError, TokenChange, TokenRecord, TokenStore,
    Usage, WriteError, CHANGE_BACKLOG,
};
use crate::time::Timestamp;
use tokio_postgres_rustls::MakeRustlsConnect;

mod tls;

/// The notification channel every replica listens on.
const CHANNEL: &str = "orcheo_gateway_service_tokens";
/// A resync (cache emptied, "any active token?" recounted) at least this often, whatever
/// notifications arrived: the bound on the damage of a missed one.
const RESYNC: Duration = Duration::from_secs(5);
/// Time allowed to get a connection, open one, or check one.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections kept at most.
const POOL_SIZE: usize = 8;

/// The tables, in one transaction under a transaction-level advisory lock (key: the bytes
/// of `orcheo-g` read as a big-endian number): replicas starting together create them one
/// after the other. Without the lock two concurrent `CREATE TABLE IF NOT EXISTS` can both
/// go ahead, and the second fails on PostgreSQL's catalog.
const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(8030590385584549223);
CREATE TABLE IF NOT EXISTS service_tokens (
    identifier TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    scopes JSONB,
    workspace_ids JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_by TEXT,
    issued_at TIMESTAMPTZ,
    expires_at TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    use_count INTEGER DEFAULT 0,
    rotation_expires_at TIMESTAMPTZ,
    rotated_to TEXT,
    rotated_from TEXT,
    revoked_at TIMESTAMPTZ,
    revoked_by TEXT,
    revocation_reason TEXT,
    allowed_ip_ranges JSONB,
    rate_limit_override JSONB
);
CREATE INDEX IF NOT EXISTS idx_service_tokens_hash ON service_tokens(secret_hash);
CREATE INDEX IF NOT EXISTS idx_service_tokens_expires ON service_tokens(expires_at);
CREATE INDEX IF NOT EXISTS idx_service_tokens_active ON service_tokens(revoked_at) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS service_token_audit_log (
    id SERIAL PRIMARY KEY,
    token_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT,
    ip_address TEXT,
    user_agent TEXT,
    timestamp TIMESTAMPTZ NOT NULL DEFAULT now(),
    details JSONB
);
CREATE INDEX IF NOT EXISTS idx_audit_token ON service_token_audit_log(token_id);
CREATE INDEX IF NOT EXISTS idx_audit_timestamp ON service_token_audit_log(timestamp);
ALTER TABLE service_tokens ADD COLUMN IF NOT EXISTS name TEXT;
ALTER TABLE service_tokens ADD COLUMN IF NOT EXISTS secret_preview TEXT;
ALTER TABLE service_tokens ADD COLUMN IF NOT EXISTS workspace_id TEXT;
COMMIT;
";

const COLUMNS: &str =
    "identifier, secret_hash, scopes, workspace_ids, COALESCE(issued_at, created_at), \
     expires_at, revoked_at, revocation_reason, name, secret_preview, last_used_at, use_count, \
     rotation_expires_at, rotated_to, rotated_from";

/// Service tokens in PostgreSQL.
pub struct PostgresStore {
    pool: Pool,
    any_active: Arc<AtomicBool>,
    changes: broadcast::Sender<StoreChange>,
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Ok(mut listener) = self.listener.lock() {
            if let Some(task) = listener.take() {
                task.abort();
            }
        }
    }
}

/// Whether `dsn` can be used: it parses, its `sslmode` is known and its `sslrootcert`
/// (when verification needs one) is a readable certificate bundle.
pub fn check_dsn(dsn: &str) -> Result<(), String> {
    let dsn = tls::parse(dsn)?;
    tls::connector(&dsn).map(|_| ())
}

fn error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn to_system(at: Option<Timestamp>) -> Option<SystemTime> {
    at.map(|t| UNIX_EPOCH + Duration::from_secs(t.0.max(0) as u64))
}

fn from_system(at: Option<SystemTime>) -> Option<Timestamp> {
    at.map(|t| {
        Timestamp(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        )
    })
}

fn list_column(items: &[String]) -> Option<Value> {
    let mut sorted = items.to_vec();
    sorted.sort();
    sorted.dedup();
    (!sorted.is_empty()).then(|| Value::from(sorted))
}

fn list_value(value: Option<Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        // Some writers store the JSON text in a JSONB string.
        Some(Value::String(text)) => serde_json::from_str(&text).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// A time that ends a token (`expires_at`, `revoked_at`): one that is present but cannot
/// be read ends it at the epoch, so the token is refused rather than made eternal; so
/// does any time before the epoch (`-infinity` included).
fn ending(row: &Row, index: usize, identifier: &str) -> Option<Timestamp> {
    match row.try_get::<_, Option<SystemTime>>(index) {
        Ok(at) => from_system(at),
        Err(_) => {
            tracing::warn!(
                token_id = identifier,
                column = index,
                "unreadable time in a service token row; the token is refused"
            );
            Some(Timestamp(0))
        }
    }
}

fn row_to_record(row: &Row) -> Result<TokenRecord, tokio_postgres::Error> {
    let identifier: String = row.try_get(0)?;
    Ok(TokenRecord {
        expires_at: ending(row, 5, &identifier),
        revoked_at: ending(row, 6, &identifier),
        identifier,
        secret_hash: row.try_get(1)?,
        scopes: list_value(row.try_get(2)?),
        workspace_ids: list_value(row.try_get(3)?),
        issued_at: from_system(row.try_get(4)?).unwrap_or_default(),
        revocation_reason: row.try_get(7)?,
        name: row.try_get(8)?,
        secret_preview: row.try_get(9)?,
        last_used_at: from_system(row.try_get(10)?),
        use_count: i64::from(row.try_get::<_, Option<i32>>(11)?.unwrap_or(0)),
        rotation_expires_at: from_system(row.try_get(12)?),
        rotated_to: row.try_get(13)?,
        rotated_from: row.try_get(14)?,
    })
}

impl PostgresStore {
    /// A store for `dsn`. Nothing is connected yet: a background task connects, creates
    /// the schema if missing and listens for changes, and keeps trying while the database
    /// is unreachable, so the gateway starts (and serves JWT and bootstrap traffic) without
    /// it. Only a DSN that cannot be parsed is an error.
    pub async fn open(dsn: &str) -> Result<Arc<Self>, String> {
        let invalid = |e: String| format!("auth.service_tokens.postgres_dsn: {e}");
        let dsn = tls::parse(dsn).map_err(invalid)?;
        let tls = tls::connector(&dsn).map_err(invalid)?;
        let config = dsn.config;
        let recycling = ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(config.clone(), tls.clone(), recycling),
            None => Manager::from_config(config.clone(), NoTls, recycling),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("postgres pool: {e}"))?;
        let store = Arc::new(PostgresStore {
            pool,
            any_active: Arc::new(AtomicBool::new(false)),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
            listener: std::sync::Mutex::new(None),
        });
        let (ready, mut connected) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(listen(Arc::downgrade(&store), config, tls, ready));
        if let Ok(mut listener) = store.listener.lock() {
            *listener = Some(task);
        }
        // A reachable database is set up before the first request; an unreachable one
        // delays the start by this wait only.
        let first = tokio::time::timeout(POOL_TIMEOUT, connected.wait_for(|&up| up)).await;
        if !matches!(first, Ok(Ok(_))) {
            tracing::warn!("PostgreSQL is not reachable yet; starting without it (service tokens answer 503 until it is)");
        }
        Ok(store)
    }

    async fn recount(&self) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let count = client
            .query_one(
                "SELECT COUNT(*) FROM service_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
                &[],
            )
            .await;
        if let Ok(row) = count {
            self.any_active
                .store(row.get::<_, i64>(0) > 0, Ordering::Release);
        }
    }

    fn changed(&self, change: StoreChange) {
        let _ = self.changes.send(change);
    }
}

/// Keeps a connection of its own: creates the schema, listens for notifications and
/// recounts on a timer; reconnects after failures. After a reconnection, subscribers are
/// told that unknown changes may have happened while it was away.
async fn listen(
    store: std::sync::Weak<PostgresStore>,
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    set_up: tokio::sync::watch::Sender<bool>,
) {
    let mut connected_before = false;
    let mut failures = 0u32;
    loop {
        match connect(&config, tls.as_ref()).await {
            Ok((client, mut messages)) => {
                // The schema is created once per process, on the first connection: a table
                // that goes away later is an outage to report, not something to recreate.
                let statement = if connected_before {
                    format!("LISTEN {CHANNEL};")
                } else {
                    format!("{SCHEMA}\nLISTEN {CHANNEL};")
                };
                let setup = client.batch_execute(&statement);
                // The connection must be polled for the statements to complete.
                let mut setup = std::pin::pin!(setup);
                let ready = loop {
                    tokio::select! {
                        result = &mut setup => break result.map_err(|e| e.to_string()),
                        message = messages.next() => if message.is_none() {
                            break Err("connection closed".into());
                        },
                    }
                };
                match ready {
                    Ok(()) => {
                        if failures > 0 || connected_before {
                            tracing::info!("PostgreSQL token store connected");
                        }
                        failures = 0;
                        let Some(live) = store.upgrade() else { return };
                        live.recount().await;
                        set_up.send_replace(true);
                        if connected_before {
                            live.changed(StoreChange::Unknown);
                        }
                        drop(live);
                        connected_before = true;
                        let mut resync = tokio::time::interval(RESYNC);
                        loop {
                            let change = tokio::select! {
                                message = messages.next() => match message {
                                    Some(Ok(AsyncMessage::Notification(note))) => Some(parse_change(note.payload())),
                                    Some(Ok(_)) => continue,
                                    Some(Err(_)) | None => break,
                                },
                                _ = resync.tick() => None,
                            };
                            let Some(live) = store.upgrade() else { return };
                            // The change first: a revocation must not wait for a count.
                            if let Some(change) = change {
                                live.changed(change);
                            }
                            live.recount().await;
                        }
                        tracing::warn!("lost the PostgreSQL notification connection; reconnecting");
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(%error, "PostgreSQL schema or LISTEN failed; retrying");
                    }
                }
            }
            Err(error) => {
                failures += 1;
                // Logged once per outage, then every minute or so, not every second.
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(%error, "cannot connect to PostgreSQL; service tokens are unavailable until it answers");
                }
            }
        }
        if store.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The notifications and other messages of a connection of its own.
type Messages = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>,
>;

/// Opens a connection of its own, over TLS when the DSN asks for it.
async fn connect(
    config: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
) -> Result<(tokio_postgres::Client, Messages), tokio_postgres::Error> {
    Ok(match tls {
        Some(tls) => {
            let (client, mut connection) = config.connect(tls.clone()).await?;
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            (client, Box::pin(messages) as Messages)
        }
        None => {
            let (client, mut connection) = config.connect(NoTls).await?;
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            (client, Box::pin(messages) as Messages)
        }
    })
}

/// A notification's payload: the token change a replica wrote, or (anything else) an
/// unknown change.
fn parse_change(payload: &str) -> StoreChange {
    serde_json::from_str::<TokenChange>(payload)
        .map(StoreChange::Token)
        .unwrap_or(StoreChange::Unknown)
}

impl TokenStore for PostgresStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<TokenRecord>>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(error)?;
            let query = format!("SELECT {COLUMNS} FROM service_tokens WHERE secret_hash = $1");
            let row = client
                .query_opt(&query, &[&secret_hash])
                .await
                .map_err(error)?;
            row.map(|r| row_to_record(&r).map(Arc::new))
                .transpose()
                .map_err(error)
        })
    }

    fn has_active(&self) -> bool {
        self.any_active.load(Ordering::Acquire)
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreChange> {
        self.changes.subscribe()
    }

    fn get<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(error)?;
            let query = format!("SELECT {COLUMNS} FROM service_tokens WHERE identifier = $1");
            let row = client
                .query_opt(&query, &[&identifier])
                .await
                .map_err(error)?;
            row.map(|r| row_to_record(&r)).transpose().map_err(error)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(error)?;
            let query = format!(
                "SELECT {COLUMNS} FROM service_tokens ORDER BY created_at DESC, identifier"
            );
            let rows = client.query(&query, &[]).await.map_err(error)?;
            rows.iter()
                .map(row_to_record)
                .collect::<Result<_, _>>()
                .map_err(error)
        })
    }

    fn write(&self, change: Change) -> BoxFuture<'_, Result<(), WriteError>> {
        Box::pin(async move {
            let changes = change.token_changes();
            let mut client = self
                .pool
                .get()
                .await
                .map_err(|e| WriteError::Store(error(e)))?;
            let store = |e: tokio_postgres::Error| WriteError::Store(error(e));
            let transaction = client.transaction().await.map_err(store)?;
            if let Some(new) = &change.insert {
                let taken: bool = transaction
                    .query_one(
                        "SELECT EXISTS(SELECT 1 FROM service_tokens WHERE identifier = $1)",
                        &[&new.identifier],
                    )
                    .await
                    .map_err(store)?
                    .get(0);
                if taken {
                    return Err(WriteError::Conflict(new.identifier.clone()));
                }
                transaction
                    .execute(
                        "INSERT INTO service_tokens (identifier, secret_hash, scopes, workspace_ids, created_at, issued_at, \
                         expires_at, revoked_at, revocation_reason, name, secret_preview, last_used_at, use_count, \
                         rotation_expires_at, rotated_to, rotated_from) \
                         VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                        &[
                            &new.identifier,
                            &new.secret_hash,
                            &list_column(&new.scopes),
                            &list_column(&new.workspace_ids),
                            &to_system(Some(new.issued_at)),
                            &to_system(new.expires_at),
                            &to_system(new.revoked_at),
                            &new.revocation_reason,
                            &new.name,
                            &new.secret_preview,
                            &to_system(new.last_used_at),
                            &(new.use_count as i32),
                            &to_system(new.rotation_expires_at),
                            &new.rotated_to,
                            &new.rotated_from,
                        ],
                    )
                    .await
                    .map_err(store)?;
            }
            if let Some(changed) = &change.update {
                transaction
                    .execute(
                        "UPDATE service_tokens SET expires_at = $2, revoked_at = $3, revocation_reason = $4, \
                         rotation_expires_at = $5, rotated_to = $6 WHERE identifier = $1",
                        &[
                            &changed.identifier,
                            &to_system(changed.expires_at),
                            &to_system(changed.revoked_at),
                            &changed.revocation_reason,
                            &to_system(changed.rotation_expires_at),
                            &changed.rotated_to,
                        ],
                    )
                    .await
                    .map_err(store)?;
            }
            for event in &change.audit {
                transaction
                    .execute(
                        "INSERT INTO service_token_audit_log (token_id, action, actor, ip_address, user_agent, timestamp, details) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        &[
                            &event.token_id,
                            &event.action,
                            &event.actor,
                            &event.ip_address,
                            &event.user_agent,
                            &to_system(Some(event.timestamp)),
                            &event.details,
                        ],
                    )
                    .await
                    .map_err(store)?;
            }
            // Delivered to every listening replica when the transaction commits, each
            // naming the token it changed and its new state.
            for change in &changes {
                let StoreChange::Token(token) = change else {
                    continue;
                };
                let payload =
                    serde_json::to_string(token).map_err(|e| WriteError::Store(error(e)))?;
                transaction
                    .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                    .await
                    .map_err(store)?;
            }
            transaction.commit().await.map_err(store)?;
            self.recount().await;
            for change in changes {
                self.changed(change);
            }
            Ok(())
        })
    }

    fn audit<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AuditEvent>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(error)?;
            let rows = client
                .query(
                    "SELECT token_id, action, actor, ip_address, user_agent, timestamp, details \
                     FROM service_token_audit_log WHERE token_id = $1 ORDER BY timestamp DESC, id DESC",
                    &[&identifier],
                )
                .await
                .map_err(error)?;
            rows.iter()
                .map(|row| {
                    Ok(AuditEvent {
                        token_id: row.try_get(0)?,
                        action: row.try_get(1)?,
                        actor: row.try_get(2)?,
                        ip_address: row.try_get(3)?,
                        user_agent: row.try_get(4)?,
                        timestamp: from_system(row.try_get(5)?).unwrap_or_default(),
                        details: row.try_get(6)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(error)
        })
    }

    fn add_usage(&self, usage: Vec<Usage>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(error)?;
            let transaction = client.transaction().await.map_err(error)?;
            for used in &usage {
                transaction
                    .execute(
                        "UPDATE service_tokens SET use_count = COALESCE(use_count, 0) + $2, \
                         last_used_at = GREATEST(last_used_at, $3) WHERE identifier = $1",
                        &[
                            &used.identifier,
                            &(used.count as i32),
                            &to_system(Some(used.last_used_at)),
                        ],
                    )
                    .await
                    .map_err(error)?;
            }
            transaction.commit().await.map_err(error)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(error)?;
            client
                .query_one("SELECT COUNT(*) FROM service_tokens", &[])
                .await
                .map(|_| ())
                .map_err(error)
        })
    }
}
