//! Service-token storage. [`TokenStore`] is what authentication needs on the hot path:
//! a lookup by SHA-256 hash, and whether any active token exists (which switches the
//! default mode to enforcing).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::RwLock;

use crate::time::Timestamp;

mod sqlite;

pub use sqlite::SqliteStore;

/// A boxed future, so the trait can be used as `dyn TokenStore`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A stored service token (Orcheo's `service_tokens` row).
#[derive(Debug, Clone, PartialEq, Eq)]
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
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>>;

    /// Whether at least one active token exists (answered from memory: it is asked on
    /// every request in the default mode).
    fn has_active(&self) -> bool;

    /// A name for logs and readiness.
    fn backend(&self) -> &'static str;

    /// Notifications that tokens changed (revoked, rotated, expiry moved), so holders of
    /// long-lived connections can re-check their token.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()>;
}

/// Room for change notifications not yet seen by a slow subscriber; a subscriber that
/// falls further behind is told it lagged and re-checks anyway.
const CHANGE_BACKLOG: usize = 16;

/// Tokens in memory, for tests and `demo`.
pub struct MemoryStore {
    // A std RwLock: held only for map operations, never across an await.
    tokens: RwLock<HashMap<String, TokenRecord>>,
    changes: tokio::sync::broadcast::Sender<()>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            tokens: RwLock::default(),
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
        {
            let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
            tokens.insert(record.secret_hash.clone(), record);
        }
        let _ = self.changes.send(());
    }
}

impl TokenStore for MemoryStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        let found = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(secret_hash)
            .cloned();
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

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.changes.subscribe()
    }
}

/// SHA-256 of a token, lowercase hex: how secrets are stored and looked up.
pub fn hash_secret(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
