//! Service-token storage. [`TokenStore`] is what authentication needs on the hot path:
//! a lookup by SHA-256 hash, and whether any active token exists (which switches the
//! default mode to enforcing).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use crate::time::Timestamp;

mod cached;
mod postgres;
mod sqlite;

pub use cached::CachedStore;
pub use postgres::{check_dsn as check_postgres_dsn, PostgresStore};
pub use sqlite::SqliteStore;

/// A boxed future, so the trait can be used as `dyn TokenStore`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A stored service token (Orcheo's `service_tokens` row).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenRecord {
    /// The token id.
    pub identifier: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_hash: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Workspace ids (`*` for all).
    pub workspace_ids: Vec<String>,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it expires, if it does.
    pub expires_at: Option<Timestamp>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
    /// Why it was revoked.
    pub revocation_reason: Option<String>,
    /// A human-readable label (not unique).
    pub name: Option<String>,
    /// The secret's last four characters, kept at creation.
    pub secret_preview: Option<String>,
    /// When it was last used.
    pub last_used_at: Option<Timestamp>,
    /// How often it was used.
    pub use_count: i64,
    /// End of the overlap of a rotation that replaced it.
    pub rotation_expires_at: Option<Timestamp>,
    /// The token that replaced it.
    pub rotated_to: Option<String>,
    /// The token it replaced.
    pub rotated_from: Option<String>,
}

/// One row of the audit trail (`service_token_audit_log`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditEvent {
    /// The token.
    pub token_id: String,
    /// `created`, `rotated` or `revoked`.
    pub action: String,
    /// The caller's token id.
    pub actor: Option<String>,
    /// The caller's IP.
    pub ip_address: Option<String>,
    /// The caller's user agent.
    pub user_agent: Option<String>,
    /// When.
    pub timestamp: Timestamp,
    /// Details, e.g. `{"reason": …}`.
    pub details: Option<serde_json::Value>,
}

/// One atomic change to the store: a new token, a changed one, and their audit rows.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// A token to add; its id must be free.
    pub insert: Option<TokenRecord>,
    /// A token to overwrite (found by id).
    pub update: Option<TokenRecord>,
    /// Audit rows to append.
    pub audit: Vec<AuditEvent>,
}

impl Change {
    /// What this change does to tokens, for the caches and connections that hold them.
    pub fn token_changes(&self) -> Vec<StoreChange> {
        let created = self.insert.iter().map(|r| TokenChange::of(r, true));
        let updated = self.update.iter().map(|r| TokenChange::of(r, false));
        updated.chain(created).map(StoreChange::Token).collect()
    }
}

/// One token's new state, as far as authentication needs it: enough to refuse a revoked
/// or rotated-out token at once, without asking the store again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenChange {
    /// The token id.
    pub identifier: String,
    /// SHA-256 of its secret.
    pub secret_hash: String,
    /// When it expires now (a rotation brings this forward).
    pub expires_at: Option<Timestamp>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
    /// A token that did not exist before: secrets remembered as unknown are forgotten.
    pub created: bool,
}

impl TokenChange {
    /// The change that `record` (new when `created`) makes.
    pub fn of(record: &TokenRecord, created: bool) -> Self {
        TokenChange {
            identifier: record.identifier.clone(),
            secret_hash: record.secret_hash.clone(),
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
            created,
        }
    }
}

/// What a store tells its subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// One named token changed.
    Token(TokenChange),
    /// Tokens may have changed in ways the store cannot name (another program wrote to the
    /// database, notifications may have been lost): cached answers are asked for again.
    Unknown,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The id of the token to insert is taken.
    #[error("service token id `{0}` is taken")]
    Conflict(String),
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TokenRecord {
    /// Not revoked and not expired at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// The store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("service token store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where service tokens live.
pub trait TokenStore: Send + Sync {
    /// The token whose secret hashes to `secret_hash`, if any.
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<TokenRecord>>, StoreError>>;

    /// Whether at least one active token exists (answered from memory: it is asked on
    /// every request in the default mode).
    fn has_active(&self) -> bool;

    /// A name for logs and readiness.
    fn backend(&self) -> &'static str;

    /// Notifications that tokens changed (created, revoked, rotated, expiry moved), so
    /// caches and long-lived connections apply exactly that change.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreChange>;

    /// The token with id `identifier`.
    fn get<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>>;

    /// Every token, newest first.
    fn list(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>>;

    /// Applies `change` atomically, then notifies subscribers.
    fn write(&self, change: Change) -> BoxFuture<'_, Result<(), WriteError>>;

    /// The audit trail of a token, newest first.
    fn audit<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AuditEvent>, StoreError>>;

    /// Adds counted uses to tokens' `use_count` and moves `last_used_at` forward.
    fn add_usage(&self, usage: Vec<Usage>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Whether the store answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Counts one successful use of a token. Stores that batch usage count it in memory;
    /// the others leave usage to their callers.
    fn record_use(&self, _identifier: &str) {}

    /// Writes whatever is held in memory (usage counts); called periodically and at
    /// shutdown. Stores that hold nothing have nothing to do.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Uses of one token, counted in memory since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The token.
    pub identifier: String,
    /// Uses since the last flush.
    pub count: i64,
    /// The last of them.
    pub last_used_at: Timestamp,
}

/// Room for change notifications not yet seen by a slow subscriber; a subscriber that
/// falls further behind is told it lagged and treats that as an unknown change.
pub const CHANGE_BACKLOG: usize = 256;

/// Tokens in memory, for tests and `demo`.
pub struct MemoryStore {
    // A std RwLock: held only for map operations, never across an await.
    tokens: RwLock<HashMap<String, TokenRecord>>,
    audit: RwLock<Vec<AuditEvent>>,
    changes: tokio::sync::broadcast::Sender<StoreChange>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            tokens: RwLock::default(),
            audit: RwLock::default(),
            changes: tokio::sync::broadcast::channel(CHANGE_BACKLOG).0,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Adds or replaces a token, and tells subscribers.
    pub fn put(&self, record: TokenRecord) {
        let change = TokenChange::of(&record, true);
        {
            let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
            tokens.insert(record.secret_hash.clone(), record);
        }
        let _ = self.changes.send(StoreChange::Token(change));
    }
}

impl TokenStore for MemoryStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<TokenRecord>>, StoreError>> {
        let found = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(secret_hash)
            .cloned()
            .map(Arc::new);
        Box::pin(async move { Ok(found) })
    }

    fn has_active(&self) -> bool {
        let now = Timestamp::now();
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|t| t.is_active(now))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreChange> {
        self.changes.subscribe()
    }

    fn get<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let found = tokens
            .values()
            .find(|t| t.identifier == identifier)
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>> {
        let mut all: Vec<TokenRecord> = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| {
            b.issued_at
                .cmp(&a.issued_at)
                .then_with(|| a.identifier.cmp(&b.identifier))
        });
        Box::pin(async move { Ok(all) })
    }

    fn write(&self, change: Change) -> BoxFuture<'_, Result<(), WriteError>> {
        let changes = change.token_changes();
        let result = (|| {
            let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
            if let Some(new) = &change.insert {
                if tokens.values().any(|t| t.identifier == new.identifier) {
                    return Err(WriteError::Conflict(new.identifier.clone()));
                }
            }
            if let Some(changed) = change.update {
                tokens.retain(|_, t| t.identifier != changed.identifier);
                tokens.insert(changed.secret_hash.clone(), changed);
            }
            if let Some(new) = change.insert {
                tokens.insert(new.secret_hash.clone(), new);
            }
            self.audit
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .extend(change.audit);
            Ok(())
        })();
        if result.is_ok() {
            for change in changes {
                let _ = self.changes.send(change);
            }
        }
        Box::pin(async move { result })
    }

    fn add_usage(&self, usage: Vec<Usage>) -> BoxFuture<'_, Result<(), StoreError>> {
        {
            let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
            for used in usage {
                if let Some(token) = tokens
                    .values_mut()
                    .find(|t| t.identifier == used.identifier)
                {
                    token.use_count += used.count;
                    token.last_used_at = token.last_used_at.max(Some(used.last_used_at));
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn audit<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AuditEvent>, StoreError>> {
        let events: Vec<AuditEvent> = self
            .audit
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .filter(|e| e.token_id == identifier)
            .cloned()
            .collect();
        Box::pin(async move { Ok(events) })
    }
}

/// SHA-256 of a token, lowercase hex: how secrets are stored and looked up. Runs on every
/// service-token request: one allocation, no formatting machinery.
pub fn hash_secret(secret: &str) -> String {
    hex(&secret_digest(secret))
}

/// SHA-256 of a token: [`hash_secret`] before hex, and how the bootstrap token is
/// compared (in constant time, on digests).
pub fn secret_digest(secret: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref());
    out
}

/// Lowercase hex of `bytes` (a secret's SHA-256 as [`hash_secret`] writes it).
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_hash_to_lowercase_hex_sha256() {
        assert_eq!(
            super::hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            super::hash_secret(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
