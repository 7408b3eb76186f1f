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
    AuditEvent, BoxFuture, Change, StoreError, TokenRecord, TokenStore, Usage, WriteError,
};
use crate::time::Timestamp;

/// The notification channel every replica listens on.
const CHANNEL: &str = "orcheo_gateway_service_tokens";
/// A resync (cache emptied, "any active token?" recounted) at least this often, whatever
/// notifications arrived: the bound on the damage of a missed one.
const RESYNC: Duration = Duration::from_secs(5);
/// Time allowed to get a connection, open one, or check one.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections kept at most.
const POOL_SIZE: usize = 8;

const SCHEMA: &str = "
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
";

const COLUMNS: &str =
    "identifier, secret_hash, scopes, workspace_ids, COALESCE(issued_at, created_at), \
     expires_at, revoked_at, revocation_reason, name, secret_preview, last_used_at, use_count, \
     rotation_expires_at, rotated_to, rotated_from";

/// Service tokens in PostgreSQL.
pub struct PostgresStore {
    pool: Pool,
    any_active: Arc<AtomicBool>,
    changes: broadcast::Sender<()>,
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

fn row_to_record(row: &Row) -> Result<TokenRecord, tokio_postgres::Error> {
    Ok(TokenRecord {
        identifier: row.try_get(0)?,
        secret_hash: row.try_get(1)?,
        scopes: list_value(row.try_get(2)?),
        workspace_ids: list_value(row.try_get(3)?),
        issued_at: from_system(row.try_get(4)?).unwrap_or_default(),
        expires_at: from_system(row.try_get(5)?),
        revoked_at: from_system(row.try_get(6)?),
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
    /// Connects to `dsn`, creates the schema if missing and starts listening.
    pub async fn open(dsn: &str) -> Result<Arc<Self>, String> {
        let config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|e| format!("auth.service_tokens.postgres_dsn: {e}"))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("postgres pool: {e}"))?;
        let client = pool
            .get()
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        client
            .batch_execute(SCHEMA)
            .await
            .map_err(|e| format!("PostgreSQL schema: {e}"))?;
        drop(client);
        let store = Arc::new(PostgresStore {
            pool,
            any_active: Arc::new(AtomicBool::new(false)),
            changes: broadcast::channel(16).0,
            listener: std::sync::Mutex::new(None),
        });
        store.recount().await;
        let task = tokio::spawn(listen(Arc::downgrade(&store), config));
        if let Ok(mut listener) = store.listener.lock() {
            *listener = Some(task);
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

    fn changed(&self) {
        let _ = self.changes.send(());
    }
}

/// Listens for notifications on a connection of its own (reconnecting after failures),
/// and resyncs on a timer.
async fn listen(store: std::sync::Weak<PostgresStore>, config: tokio_postgres::Config) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {CHANNEL}");
                let listening = client.batch_execute(&statement);
                // The connection must be polled for LISTEN to complete.
                let mut listening = std::pin::pin!(listening);
                let ready = loop {
                    tokio::select! {
                        result = &mut listening => break result.is_ok(),
                        message = messages.next() => if message.is_none() { break false },
                    }
                };
                if ready {
                    let mut resync = tokio::time::interval(RESYNC);
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(Ok(AsyncMessage::Notification(_))) => {}
                                Some(Ok(_)) => continue,
                                Some(Err(_)) | None => break,
                            },
                            _ = resync.tick() => {}
                        }
                        let Some(store) = store.upgrade() else { return };
                        store.recount().await;
                        store.changed();
                    }
                }
                tracing::warn!("lost the PostgreSQL notification connection; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the PostgreSQL notification connection; retrying")
            }
        }
        if store.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl TokenStore for PostgresStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(error)?;
            let query = format!("SELECT {COLUMNS} FROM service_tokens WHERE secret_hash = $1");
            let row = client
                .query_opt(&query, &[&secret_hash])
                .await
                .map_err(error)?;
            row.map(|r| row_to_record(&r)).transpose().map_err(error)
        })
    }

    fn has_active(&self) -> bool {
        self.any_active.load(Ordering::Acquire)
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn subscribe(&self) -> broadcast::Receiver<()> {
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
            // Delivered to every listening replica when the transaction commits.
            transaction
                .execute(&format!("NOTIFY {CHANNEL}"), &[])
                .await
                .map_err(store)?;
            transaction.commit().await.map_err(store)?;
            self.recount().await;
            self.changed();
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
