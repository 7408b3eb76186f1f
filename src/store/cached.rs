//! The store as the hot path sees it: lookups answered from a bounded in-memory cache
//! (a busy token costs no database round trip). A change notification names the token
//! it changed, and the cache applies exactly that change — a revoked or rotated-out token
//! is refused at once, whatever the database's state, and the other cached tokens are
//! neither refetched nor stopped: they keep working while the database is unreachable.
//! Unknown secrets are remembered briefly, so a flood of random tokens is not one query
//! each. Usage is counted in memory and written in batches at least every 10 s and at
//! shutdown — never a write per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{
    AuditEvent, BoxFuture, Change, StoreChange, StoreError, TokenRecord, TokenStore, Usage,
    WriteError, CHANGE_BACKLOG,
};
use crate::time::Timestamp;

/// Tokens remembered at most.
const CAPACITY: usize = 10_000;
/// How long a cached answer is trusted without a change notification: the bound on how
/// stale a token can be if a notification is ever missed.
const FRESH: Duration = Duration::from_secs(30);
/// Unknown secrets remembered at most; past it they are all forgotten (which costs only
/// database queries).
const UNKNOWN_CAPACITY: usize = 10_000;
/// How long a secret the store did not know is answered "unknown" without asking again:
/// short, since a token created by a program that does not notify (Orcheo itself) is
/// unusable for this long.
const UNKNOWN_FOR: Duration = Duration::from_secs(5);
/// How often counted usage is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

struct Cached {
    /// Replaced, never changed in place: the same `Arc` is the same record (the
    /// authenticator keeps what it derives from a record while the record is the same).
    record: Arc<TokenRecord>,
    fetched: Instant,
    /// Set on an unknown change: the entry must be asked for again, but still stands in
    /// while the store cannot answer.
    stale: bool,
}

/// The cache's two maps, under one lock so a change applies to both at once.
#[derive(Default)]
struct Entries {
    known: HashMap<String, Cached>,
    /// Secrets the store did not know, and when it said so.
    unknown: HashMap<String, Instant>,
}

/// A caching, usage-batching wrapper around a store.
pub struct CachedStore {
    inner: Arc<dyn TokenStore>,
    // Std mutexes: held for map operations only, never across an await.
    cache: Mutex<Entries>,
    /// Moves on every change applied: a lookup that started before a change must not
    /// cache the answer it got from before the change.
    generation: AtomicU64,
    usage: Mutex<HashMap<String, (i64, Timestamp)>>,
    changes: broadcast::Sender<StoreChange>,
    errors: prometheus::IntCounter,
}

impl CachedStore {
    /// Wraps `inner`; `errors` counts failed store calls (`token_store_errors_total`).
    pub fn new(inner: Arc<dyn TokenStore>, errors: prometheus::IntCounter) -> Arc<Self> {
        let store = Arc::new(CachedStore {
            inner,
            cache: Mutex::new(Entries::default()),
            generation: AtomicU64::new(0),
            usage: Mutex::new(HashMap::new()),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
            errors,
        });
        store.start();
        store
    }

    /// Applies and relays the inner store's change notifications, and flushes usage on
    /// its interval. Both stop when the store is dropped.
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
                        let change = match change {
                            Ok(change) => change,
                            // Missed notifications: which tokens changed is not known.
                            Err(broadcast::error::RecvError::Lagged(_)) => StoreChange::Unknown,
                            Err(broadcast::error::RecvError::Closed) => {
                                inner_changes = this.inner.subscribe();
                                StoreChange::Unknown
                            }
                        };
                        this.apply(&change);
                        let _ = this.changes.send(change);
                    }
                    _ = ticker.tick() => {
                        let Some(this) = weak.upgrade() else { return };
                        this.flush().await;
                    }
                }
            }
        });
    }

    /// Applies one change: a named token takes its new expiry and revocation (a cached
    /// revoked token is refused from now on, without asking the store); an unknown change
    /// makes every entry ask again.
    fn apply(&self, change: &StoreChange) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut entries = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match change {
            StoreChange::Token(token) => {
                if let Some(entry) = entries.known.get_mut(&token.secret_hash) {
                    let mut record = TokenRecord::clone(&entry.record);
                    record.expires_at = token.expires_at;
                    record.revoked_at = token.revoked_at;
                    entry.record = Arc::new(record);
                }
                if token.created {
                    entries.unknown.clear();
                } else {
                    entries.unknown.remove(&token.secret_hash);
                }
            }
            StoreChange::Unknown => {
                for entry in entries.known.values_mut() {
                    entry.stale = true;
                }
                entries.unknown.clear();
            }
        }
    }

    fn failed(&self, error: &StoreError) {
        self.errors.inc();
        tracing::warn!(%error, backend = self.inner.backend(), "service token store call failed");
    }

    /// Caches the store's answer for `hash`, unless a change arrived since the lookup
    /// began (`generation`): that answer may predate it.
    fn remember(&self, hash: &str, record: Option<&Arc<TokenRecord>>, generation: u64) {
        let mut entries = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let Some(record) = record else {
            if entries.unknown.len() >= UNKNOWN_CAPACITY {
                entries
                    .unknown
                    .retain(|_, seen| seen.elapsed() < UNKNOWN_FOR);
                if entries.unknown.len() >= UNKNOWN_CAPACITY {
                    entries.unknown.clear();
                }
            }
            entries.unknown.insert(hash.to_string(), Instant::now());
            return;
        };
        if entries.known.len() >= CAPACITY {
            entries.known.retain(|_, c| c.fetched.elapsed() < FRESH);
            if entries.known.len() >= CAPACITY {
                // Dropping entries only costs a database round trip later.
                entries.known.clear();
            }
        }
        entries.known.insert(
            hash.to_string(),
            Cached {
                record: record.clone(),
                fetched: Instant::now(),
                stale: false,
            },
        );
    }

    /// What the cache knows of `hash`.
    fn cached(&self, hash: &str) -> Lookup {
        let entries = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = entries.known.get(hash) {
            let fresh = !c.stale && c.fetched.elapsed() < FRESH;
            return Lookup::Known(c.record.clone(), fresh);
        }
        match entries.unknown.get(hash) {
            Some(seen) if seen.elapsed() < UNKNOWN_FOR => Lookup::Unknown,
            _ => Lookup::Miss,
        }
    }
}

/// What the cache holds for a secret.
enum Lookup {
    /// A record, and whether it is fresh enough to answer without the store.
    Known(Arc<TokenRecord>, bool),
    /// The store recently said it has no such token.
    Unknown,
    /// Nothing.
    Miss,
}

impl TokenStore for CachedStore {
    fn lookup<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<TokenRecord>>, StoreError>> {
        Box::pin(async move {
            let stale = match self.cached(secret_hash) {
                Lookup::Known(record, true) => return Ok(Some(record)),
                Lookup::Known(record, false) => Some(record),
                Lookup::Unknown => return Ok(None),
                Lookup::Miss => None,
            };
            let generation = self.generation.load(Ordering::Acquire);
            match self.inner.lookup(secret_hash).await {
                Ok(record) => {
                    self.remember(secret_hash, record.as_ref(), generation);
                    Ok(record)
                }
                Err(error) => {
                    self.failed(&error);
                    // While the store is away, a token it vouched for keeps working, with
                    // every change the gateway was told of since applied to it.
                    stale.map(Some).ok_or(error)
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

    fn subscribe(&self) -> broadcast::Receiver<StoreChange> {
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
            let changes = change.token_changes();
            let result = self.inner.write(change).await;
            match &result {
                // The inner store notifies too; applying here as well means this replica
                // never answers from a cache older than its own write.
                Ok(()) => changes.iter().for_each(|change| self.apply(change)),
                Err(WriteError::Store(error)) => self.failed(error),
                Err(WriteError::Conflict(_)) => {}
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
        let now = Timestamp::now();
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        // The id is copied only for the first use since the last flush.
        match usage.get_mut(identifier) {
            Some(entry) => *entry = (entry.0 + 1, now),
            None => {
                usage.insert(identifier.to_string(), (1, now));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{hash_secret, MemoryStore, TokenChange};

    fn record(id: &str, secret: &str) -> TokenRecord {
        TokenRecord {
            identifier: id.into(),
            secret_hash: hash_secret(secret),
            ..TokenRecord::default()
        }
    }

    fn cached_store(inner: Arc<MemoryStore>) -> Arc<CachedStore> {
        let errors = prometheus::IntCounter::new("errors", "errors").unwrap();
        CachedStore::new(inner, errors)
    }

    /// Waits until the cache's relay task has applied what the inner store sent.
    async fn settle(store: &CachedStore, before: u64) {
        for _ in 0..100 {
            if store.generation.load(Ordering::Acquire) > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the change was never applied");
    }

    #[tokio::test]
    async fn a_created_token_ends_what_was_remembered_as_unknown() {
        let inner = Arc::new(MemoryStore::new());
        let store = cached_store(inner.clone());
        let hash = hash_secret("later");
        assert_eq!(store.lookup(&hash).await.unwrap(), None);
        assert!(matches!(store.cached(&hash), Lookup::Unknown));
        let before = store.generation.load(Ordering::Acquire);
        inner.put(record("later", "later"));
        settle(&store, before).await;
        let found = store.lookup(&hash).await.unwrap();
        assert_eq!(found.as_ref().map(|r| r.identifier.as_str()), Some("later"));
    }

    #[tokio::test]
    async fn a_named_change_is_applied_to_the_cached_record_only() {
        let inner = Arc::new(MemoryStore::new());
        let store = cached_store(inner.clone());
        for id in ["a", "b"] {
            inner.put(record(id, id));
            store.lookup(&hash_secret(id)).await.unwrap();
        }
        let before = store.generation.load(Ordering::Acquire);
        let mut revoked = record("a", "a");
        revoked.revoked_at = Some(Timestamp(1));
        store.apply(&StoreChange::Token(TokenChange::of(&revoked, false)));
        assert!(store.generation.load(Ordering::Acquire) > before);
        match store.cached(&hash_secret("a")) {
            Lookup::Known(record, true) => assert_eq!(record.revoked_at, Some(Timestamp(1))),
            _ => panic!("the revoked record is cached, fresh, with its revocation"),
        }
        assert!(matches!(
            store.cached(&hash_secret("b")),
            Lookup::Known(_, true)
        ));
        store.apply(&StoreChange::Unknown);
        assert!(matches!(
            store.cached(&hash_secret("b")),
            Lookup::Known(_, false)
        ));
    }
}
