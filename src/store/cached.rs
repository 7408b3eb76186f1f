//! The store as the hot path sees it: lookups answered from a bounded in-memory cache
//! (a busy token costs no database round trip), re-asked whenever tokens change; cached
//! tokens keep working while the database is unreachable; and usage counted in memory,
//! written in batches at least every 10 s and at shutdown — never a write per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{
    AuditEvent, BoxFuture, Change, StoreError, TokenRecord, TokenStore, Usage, WriteError,
};
use crate::time::Timestamp;

/// Tokens remembered at most.
const CAPACITY: usize = 10_000;
/// How long a cached answer is trusted without a change notification: the bound on how
/// stale a token can be if a notification is ever missed.
const FRESH: Duration = Duration::from_secs(30);
/// How often counted usage is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

struct Cached {
    record: TokenRecord,
    fetched: Instant,
    /// Set when tokens changed: the entry must be asked for again, but still stands in
    /// while the store cannot answer.
    stale: bool,
}

/// A caching, usage-batching wrapper around a store.
pub struct CachedStore {
    inner: Arc<dyn TokenStore>,
    // Std mutexes: held for map operations only, never across an await.
    cache: Mutex<HashMap<String, Cached>>,
    usage: Mutex<HashMap<String, (i64, Timestamp)>>,
    changes: broadcast::Sender<()>,
    errors: prometheus::IntCounter,
}

impl CachedStore {
    /// Wraps `inner`; `errors` counts failed store calls (`token_store_errors_total`).
    pub fn new(inner: Arc<dyn TokenStore>, errors: prometheus::IntCounter) -> Arc<Self> {
        let store = Arc::new(CachedStore {
            inner,
            cache: Mutex::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            changes: broadcast::channel(16).0,
            errors,
        });
        store.start();
        store
    }

    /// Relays the inner store's change notifications (after emptying the cache), and
    /// flushes usage on its interval. Both stop when the store is dropped.
    fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut inner_changes = self.inner.subscribe();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
            ticker.tick().await;
            loop {
                tokio::select! {
                    change = inner_changes.recv() => {
                        let Some(this) = weak.upgrade() else { return };
                        if matches!(change, Err(broadcast::error::RecvError::Closed)) {
                            inner_changes = this.inner.subscribe();
                        }
                        this.forget_all();
                        let _ = this.changes.send(());
                    }
                    _ = ticker.tick() => {
                        let Some(this) = weak.upgrade() else { return };
                        this.flush().await;
                    }
                }
            }
        });
    }

    /// Marks every entry stale: the next lookup of each asks the store again.
    fn forget_all(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for entry in cache.values_mut() {
            entry.stale = true;
        }
    }

    fn failed(&self, error: &StoreError) {
        self.errors.inc();
        tracing::warn!(%error, backend = self.inner.backend(), "service token store call failed");
    }

    fn remember(&self, hash: &str, record: &TokenRecord) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CAPACITY {
            cache.retain(|_, c| c.fetched.elapsed() < FRESH);
            if cache.len() >= CAPACITY {
                // Dropping entries only costs a database round trip later.
                cache.clear();
            }
        }
        cache.insert(
            hash.to_string(),
            Cached {
                record: record.clone(),
                fetched: Instant::now(),
                stale: false,
            },
        );
    }

    /// The cached record of `hash` and whether it is still fresh.
    fn cached(&self, hash: &str) -> Option<(TokenRecord, bool)> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(hash)
            .map(|c| (c.record.clone(), !c.stale && c.fetched.elapsed() < FRESH))
    }
}

impl TokenStore for CachedStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        Box::pin(async move {
            let cached = self.cached(secret_hash);
            if let Some((record, true)) = &cached {
                return Ok(Some(record.clone()));
            }
            match self.inner.lookup(secret_hash).await {
                Ok(Some(record)) => {
                    self.remember(secret_hash, &record);
                    Ok(Some(record))
                }
                Ok(None) => Ok(None),
                Err(error) => {
                    self.failed(&error);
                    // While the store is away, a token it vouched for before keeps working.
                    match cached {
                        Some((record, _)) => Ok(Some(record)),
                        None => Err(error),
                    }
                }
            }
        })
    }

    fn has_active(&self) -> bool {
        self.inner.has_active()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn subscribe(&self) -> broadcast::Receiver<()> {
        self.changes.subscribe()
    }

    fn get<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenRecord>, StoreError>> {
        Box::pin(async move {
            self.flush().await;
            self.inner
                .get(identifier)
                .await
                .inspect_err(|e| self.failed(e))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<TokenRecord>, StoreError>> {
        Box::pin(async move {
            self.flush().await;
            self.inner.list().await.inspect_err(|e| self.failed(e))
        })
    }

    fn write(&self, change: Change) -> BoxFuture<'_, Result<(), WriteError>> {
        Box::pin(async move {
            let result = self.inner.write(change).await;
            // The inner store notifies too; emptying here as well means this replica
            // never answers from a cache older than its own write.
            self.forget_all();
            if let Err(WriteError::Store(error)) = &result {
                self.failed(error);
            }
            result
        })
    }

    fn audit<'a>(
        &'a self,
        identifier: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AuditEvent>, StoreError>> {
        Box::pin(async move {
            self.inner
                .audit(identifier)
                .await
                .inspect_err(|e| self.failed(e))
        })
    }

    fn add_usage(&self, usage: Vec<Usage>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.add_usage(usage)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.inner.ping().await.inspect_err(|e| self.failed(e)) })
    }

    fn record_use(&self, identifier: &str) {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let entry = usage
            .entry(identifier.to_string())
            .or_insert((0, Timestamp::now()));
        entry.0 += 1;
        entry.1 = Timestamp::now();
    }

    /// Writes the counted usage; on failure the counts are kept and retried next time.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let batch: Vec<Usage> = {
                let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
                usage
                    .drain()
                    .map(|(identifier, (count, last_used_at))| Usage {
                        identifier,
                        count,
                        last_used_at,
                    })
                    .collect()
            };
            if batch.is_empty() {
                return;
            }
            if let Err(error) = self.inner.add_usage(batch.clone()).await {
                self.failed(&error);
                let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
                for used in batch {
                    let entry = usage
                        .entry(used.identifier)
                        .or_insert((0, used.last_used_at));
                    entry.0 += used.count;
                    entry.1 = entry.1.max(used.last_used_at);
                }
            }
        })
    }
}
