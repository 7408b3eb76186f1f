//! The SQLite token store: Orcheo's schema in one file, created on first start. SQLite
//! calls block, so each runs on the blocking pool, never on a runtime worker.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use super::{
    AuditEvent, BoxFuture, Change, StoreChange, StoreError, TokenRecord, TokenStore, Usage,
    WriteError, CHANGE_BACKLOG,
};
use crate::time::Timestamp;

/// Orcheo's tables, created when missing; an existing Orcheo database is used as it is.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS service_tokens (
    identifier TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    scopes TEXT,
    workspace_ids TEXT,
    created_at TEXT NOT NULL,
    created_by TEXT,
    issued_at TEXT,
    expires_at TEXT,
    last_used_at TEXT,
    use_count INTEGER DEFAULT 0,
    rotation_expires_at TEXT,
    rotated_to TEXT,
    rotated_from TEXT,
    revoked_at TEXT,
    revoked_by TEXT,
    revocation_reason TEXT,
    allowed_ip_ranges TEXT,
    rate_limit_override TEXT
);
CREATE INDEX IF NOT EXISTS idx_service_tokens_hash ON service_tokens(secret_hash);
CREATE INDEX IF NOT EXISTS idx_service_tokens_expires ON service_tokens(expires_at);
CREATE INDEX IF NOT EXISTS idx_service_tokens_active ON service_tokens(revoked_at) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS service_token_audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT,
    ip_address TEXT,
    user_agent TEXT,
    timestamp TEXT NOT NULL,
    details TEXT,
    FOREIGN KEY (token_id) REFERENCES service_tokens(identifier)
);
CREATE INDEX IF NOT EXISTS idx_audit_token ON service_token_audit_log(token_id);
CREATE INDEX IF NOT EXISTS idx_audit_timestamp ON service_token_audit_log(timestamp);
";

/// Columns newer Orcheo releases add; added when missing.
const ADDED_COLUMNS: [(&str, &str); 3] = [
    ("name", "TEXT"),
    ("secret_preview", "TEXT"),
    ("workspace_id", "TEXT"),
];

/// How often the file is checked for changes: revocations by another process reach open
/// WebSocket connections within this time.
const ACTIVE_REFRESH: Duration = Duration::from_millis(500);

/// Service tokens in an SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    // A std mutex: SQLite work happens on the blocking pool, where holding it is fine;
    // it is never held across an await.
    connection: Arc<Mutex<Connection>>,
    any_active: Arc<AtomicBool>,
    changes: tokio::sync::broadcast::Sender<StoreChange>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its schema.
    pub fn open(path: &Path) -> Result<Arc<Self>, String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut connection =
            Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .and_then(|_| use_wal(&connection))
            .and_then(|_| create_schema(&mut connection))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let any_active = Arc::new(AtomicBool::new(count_active(&connection).unwrap_or(0) > 0));
        let store = Arc::new(SqliteStore {
            path: path.to_path_buf(),
            connection: Arc::new(Mutex::new(connection)),
            any_active,
            changes: tokio::sync::broadcast::channel(CHANGE_BACKLOG).0,
        });
        store.watch_active();
        Ok(store)
    }

    /// Watches the file for changes, also by other processes sharing it (SQLite's
    /// `data_version` moves whenever another connection commits): keeps the "any active
    /// token?" flag current and tells subscribers.
    fn watch_active(self: &Arc<Self>) {
        let connection = Arc::downgrade(&self.connection);
        let flag = self.any_active.clone();
        let changes = self.changes.clone();
        tokio::spawn(async move {
            let mut version = None;
            loop {
                tokio::time::sleep(ACTIVE_REFRESH).await;
                let Some(connection) = connection.upgrade() else {
                    return;
                };
                let state = tokio::task::spawn_blocking(move || {
                    let connection = connection.lock().unwrap_or_else(|e| e.into_inner());
                    let version: i64 =
                        connection.query_row("PRAGMA data_version", [], |row| row.get(0))?;
                    Ok::<_, rusqlite::Error>((version, count_active(&connection)?))
                })
                .await;
                if let Ok(Ok((now, count))) = state {
                    flag.store(count > 0, Ordering::Release);
                    // Another process committed: which tokens changed is not known.
                    if version.is_some_and(|before| before != now) {
                        let _ = changes.send(StoreChange::Unknown);
                    }
                    version = Some(now);
                }
            }
        });
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Switches the file to write-ahead logging. Two processes switching one new file at the
/// same moment get "locked" at once (SQLite's busy handler does not cover this step), so
/// it is tried again, for up to [`BUSY_TIMEOUT`].
fn use_wal(connection: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match connection.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if matches!(
                    error.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Creates the tables and adds the columns later versions added, in one transaction that
/// takes the write lock first: gateways sharing the file and starting together (a rolling
/// restart, replicas on one volume) set it up one after the other, each seeing what the
/// one before did, instead of two adding the same column.
fn create_schema(connection: &mut Connection) -> rusqlite::Result<()> {
    let transaction =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    transaction.execute_batch(SCHEMA)?;
    add_missing_columns(&transaction)?;
    transaction.commit()
}

fn add_missing_columns(connection: &Connection) -> rusqlite::Result<()> {
    let mut statement =
        connection.prepare("SELECT name FROM pragma_table_info('service_tokens')")?;
    let existing: Vec<String> = statement
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for (name, kind) in ADDED_COLUMNS {
        if !existing.iter().any(|c| c == name) {
            connection.execute_batch(&format!(
                "ALTER TABLE service_tokens ADD COLUMN {name} {kind}"
            ))?;
        }
    }
    Ok(())
}

fn count_active(connection: &Connection) -> rusqlite::Result<i64> {
    let now = Timestamp::now();
    let mut statement = connection
        .prepare_cached("SELECT expires_at FROM service_tokens WHERE revoked_at IS NULL")?;
    let rows = statement.query_map([], |row| row.get::<_, Option<String>>(0))?;
    let mut count = 0;
    for expires in rows {
        let active = match expires? {
            None => true,
            Some(text) => text
                .parse::<Timestamp>()
                .map(|at| at > now)
                .unwrap_or(false),
        };
        count += i64::from(active);
    }
    Ok(count)
}

/// A JSON array column (Orcheo writes sorted arrays, or NULL when empty).
fn json_list(text: Option<String>) -> Vec<String> {
    text.and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok())
        .unwrap_or_default()
}

fn timestamp(text: Option<String>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

/// A time that ends a token (`expires_at`, `revoked_at`): one that is present but cannot
/// be read ends it at the epoch, so the token is refused rather than made eternal.
fn ending(text: Option<String>, column: &str, identifier: &str) -> Option<Timestamp> {
    let text = text?;
    match text.parse() {
        Ok(at) => Some(at),
        Err(_) => {
            tracing::warn!(
                token_id = identifier,
                column,
                "unreadable time in a service token row; the token is refused"
            );
            Some(Timestamp(0))
        }
    }
}

/// Every column the gateway reads, in the order [`row_to_record`] expects.
const COLUMNS: &str =
    "identifier, secret_hash, scopes, workspace_ids, issued_at, created_at, expires_at, \
     revoked_at, revocation_reason, name, secret_preview, last_used_at, use_count, \
     rotation_expires_at, rotated_to, rotated_from";

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let issued: Option<String> = row.get(4)?;
    let created: Option<String> = row.get(5)?;
    let identifier: String = row.get(0)?;
    Ok(TokenRecord {
        expires_at: ending(row.get(6)?, "expires_at", &identifier),
        revoked_at: ending(row.get(7)?, "revoked_at", &identifier),
        identifier,
        secret_hash: row.get(1)?,
        scopes: json_list(row.get(2)?),
        workspace_ids: json_list(row.get(3)?),
        issued_at: timestamp(issued.or(created)).unwrap_or(Timestamp(0)),
        revocation_reason: row.get(8)?,
        name: row.get(9)?,
        secret_preview: row.get(10)?,
        last_used_at: timestamp(row.get(11)?),
        use_count: row.get::<_, Option<i64>>(12)?.unwrap_or(0),
        rotation_expires_at: timestamp(row.get(13)?),
        rotated_to: row.get(14)?,
        rotated_from: row.get(15)?,
    })
}

fn lookup_blocking(connection: &Connection, hash: &str) -> rusqlite::Result<Option<TokenRecord>> {
    connection
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM service_tokens WHERE secret_hash = ?1"
        ))?
        .query_row([hash], row_to_record)
        .optional()
}

/// A JSON array column as Orcheo writes it: sorted, NULL when empty.
fn json_column(items: &[String]) -> Option<String> {
    let mut sorted = items.to_vec();
    sorted.sort();
    sorted.dedup();
    (!sorted.is_empty()).then(|| serde_json::to_string(&sorted).unwrap_or_default())
}

fn time_column(at: Option<Timestamp>) -> Option<String> {
    at.map(Timestamp::to_offset_string)
}

fn insert_blocking(connection: &Connection, record: &TokenRecord) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO service_tokens (identifier, secret_hash, scopes, workspace_ids, created_at, issued_at, \
         expires_at, revoked_at, revocation_reason, name, secret_preview, last_used_at, use_count, \
         rotation_expires_at, rotated_to, rotated_from) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        rusqlite::params![
            record.identifier,
            record.secret_hash,
            json_column(&record.scopes),
            json_column(&record.workspace_ids),
            record.issued_at.to_offset_string(),
            time_column(record.expires_at),
            time_column(record.revoked_at),
            record.revocation_reason,
            record.name,
            record.secret_preview,
            time_column(record.last_used_at),
            record.use_count,
            time_column(record.rotation_expires_at),
            record.rotated_to,
            record.rotated_from,
        ],
    )?;
    Ok(())
}

/// Overwrites what the lifecycle can change: expiry, revocation, rotation links.
fn update_blocking(connection: &Connection, record: &TokenRecord) -> rusqlite::Result<()> {
    connection.execute(
        "UPDATE service_tokens SET expires_at = ?2, revoked_at = ?3, revocation_reason = ?4, \
         rotation_expires_at = ?5, rotated_to = ?6 WHERE identifier = ?1",
        rusqlite::params![
            record.identifier,
            time_column(record.expires_at),
            time_column(record.revoked_at),
            record.revocation_reason,
            time_column(record.rotation_expires_at),
            record.rotated_to,
        ],
    )?;
    Ok(())
}

fn audit_blocking(connection: &Connection, event: &AuditEvent) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO service_token_audit_log (token_id, action, actor, ip_address, user_agent, timestamp, details) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        rusqlite::params![
            event.token_id,
            event.action,
            event.actor,
            event.ip_address,
            event.user_agent,
            event.timestamp.to_offset_string(),
            event.details.as_ref().map(|d| d.to_string()),
        ],
    )?;
    Ok(())
}

fn write_blocking(connection: &mut Connection, change: &Change) -> Result<(), WriteError> {
    let store = |e: rusqlite::Error| WriteError::Store(StoreError(e.to_string()));
    let transaction = connection.transaction().map_err(store)?;
    if let Some(new) = &change.insert {
        let taken: bool = transaction
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM service_tokens WHERE identifier = ?1)",
                [&new.identifier],
                |r| r.get(0),
            )
            .map_err(store)?;
        if taken {
            return Err(WriteError::Conflict(new.identifier.clone()));
        }
        insert_blocking(&transaction, new).map_err(store)?;
    }
    if let Some(changed) = &change.update {
        update_blocking(&transaction, changed).map_err(store)?;
    }
    for event in &change.audit {
        audit_blocking(&transaction, event).map_err(store)?;
    }
    transaction.commit().map_err(store)
}

fn audit_rows(connection: &Connection, identifier: &str) -> rusqlite::Result<Vec<AuditEvent>> {
    let mut statement = connection.prepare_cached(
        "SELECT token_id, action, actor, ip_address, user_agent, timestamp, details \
         FROM service_token_audit_log WHERE token_id = ?1 ORDER BY timestamp DESC, id DESC",
    )?;
    let rows = statement.query_map([identifier], |row| {
        let details: Option<String> = row.get(6)?;
        Ok(AuditEvent {
            token_id: row.get(0)?,
            action: row.get(1)?,
            actor: row.get(2)?,
            ip_address: row.get(3)?,
            user_agent: row.get(4)?,
            timestamp: timestamp(row.get(5)?).unwrap_or(Timestamp(0)),
            details: details.and_then(|d| serde_json::from_str(&d).ok()),
        })
    })?;
    rows.collect()
}

impl SqliteStore {
    /// Runs `work` on the blocking pool with the connection.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut connection)
        })
        .await
        .map_err(|e| StoreError(e.to_string()))?
    }
}

impl TokenStore for SqliteStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<TokenRecord>>, StoreError>> {
        let connection = self.connection.clone();
        let hash = secret_hash.to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let connection = connection.lock().unwrap_or_else(|e| e.into_inner());
                lookup_blocking(&connection, &hash)
            })
            .await
            .map_err(|e| StoreError(e.to_string()))?
            .map(|found| found.map(Arc::new))
            .map_err(|e| StoreError(e.to_string()))
        })
    }

    fn has_active(&self) -> bool {
        self.any_active.load(Ordering::Acquire)
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreChange> {
        self.changes.subscribe()
    }

    fn get<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        let identifier = identifier.to_string();
        Box::pin(self.blocking(move |connection| {
            connection
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM service_tokens WHERE identifier = ?1"
                ))
                .and_then(|mut s| s.query_row([identifier], row_to_record).optional())
                .map_err(|e| StoreError(e.to_string()))
        }))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>> {
        Box::pin(self.blocking(|connection| {
            let query = format!(
                "SELECT {COLUMNS} FROM service_tokens ORDER BY created_at DESC, identifier"
            );
            let mut statement = connection
                .prepare_cached(&query)
                .map_err(|e| StoreError(e.to_string()))?;
            let rows = statement
                .query_map([], row_to_record)
                .map_err(|e| StoreError(e.to_string()))?;
            rows.collect::<Result<_, _>>()
                .map_err(|e| StoreError(e.to_string()))
        }))
    }

    fn write(&self, change: Change) -> BoxFuture<'_, Result<(), WriteError>> {
        Box::pin(async move {
            let changes = change.token_changes();
            let connection = self.connection.clone();
            let result = tokio::task::spawn_blocking(move || {
                let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
                write_blocking(&mut connection, &change)?;
                Ok::<i64, WriteError>(count_active(&connection).unwrap_or(0))
            })
            .await
            .map_err(|e| WriteError::Store(StoreError(e.to_string())))?;
            let active = result?;
            // The flag and the subscribers learn of this write now: this connection's own
            // commits do not move its `data_version`.
            self.any_active.store(active > 0, Ordering::Release);
            for change in changes {
                let _ = self.changes.send(change);
            }
            Ok(())
        })
    }

    fn add_usage(&self, usage: Vec<Usage>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.blocking(move |connection| {
            let store = |e: rusqlite::Error| StoreError(e.to_string());
            let transaction = connection.transaction().map_err(store)?;
            for used in &usage {
                // Timestamps in one format compare correctly as text.
                transaction
                    .execute(
                        "UPDATE service_tokens SET use_count = COALESCE(use_count, 0) + ?2, \
                         last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < ?3 THEN ?3 ELSE last_used_at END \
                         WHERE identifier = ?1",
                        rusqlite::params![used.identifier, used.count, used.last_used_at.to_offset_string()],
                    )
                    .map_err(store)?;
            }
            transaction.commit().map_err(store)
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.blocking(|connection| {
            connection
                .query_row("SELECT COUNT(*) FROM service_tokens", [], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|_| ())
                .map_err(|e| StoreError(e.to_string()))
        }))
    }

    fn audit<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AuditEvent>, StoreError>> {
        let identifier = identifier.to_string();
        Box::pin(self.blocking(move |connection| {
            audit_rows(connection, &identifier).map_err(|e| StoreError(e.to_string()))
        }))
    }
}
