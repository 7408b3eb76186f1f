//! The remote JWKS: fetched at start-up, cached for min(`jwks_cache_ttl`, `max-age`),
//! refreshed in the background before it runs out, refetched once — shared by every
//! waiting request — when a token names an unknown `kid` (at most once per cooldown),
//! and served stale for up to a day while the endpoint fails.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, USER_AGENT};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use jsonwebtoken::Algorithm;
use tokio::sync::watch;

use super::keys::{parse_key_set, KeySet, Lookup};
use crate::metrics::Metrics;

/// Refetches caused by unknown `kid`s happen at most this often: a flood of tokens with
/// made-up `kid`s must not turn into a flood of requests to the identity provider.
pub const UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(30);
/// How long the last good keys keep serving while the endpoint fails.
pub const MAX_STALENESS: Duration = Duration::from_secs(24 * 3600);
/// Largest JWKS document accepted.
const MAX_BODY: usize = 1024 * 1024;
/// Shortest effective TTL, so that `max-age=0` cannot make the gateway fetch in a loop.
const MIN_TTL: Duration = Duration::from_secs(5);
/// Retry delays after a failed fetch: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

struct Fetched {
    keys: Arc<KeySet>,
    /// When the last successful fetch happened.
    at: Instant,
}

#[derive(Default)]
struct Inflight {
    done: Option<watch::Receiver<bool>>,
    last_unknown_kid: Option<Instant>,
}

/// The outcome of a lookup in the remote JWKS.
pub enum RemoteLookup {
    /// A key fits: the set and the key's index in it.
    Found(Arc<KeySet>, usize),
    /// The `kid` exists but its key does not fit the token's algorithm.
    Mismatch,
    /// No such key, even after a refetch.
    Missing,
    /// No usable key set at all (never fetched, or stale beyond a day).
    Unavailable,
}

/// A remote JWKS endpoint and its cached keys.
pub struct RemoteJwks {
    url: Uri,
    max_ttl: Duration,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    state: ArcSwapOption<Fetched>,
    inflight: Mutex<Inflight>,
    metrics: Metrics,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for RemoteJwks {
    fn drop(&mut self) {
        if let Ok(mut task) = self.refresher.lock() {
            if let Some(task) = task.take() {
                task.abort();
            }
        }
    }
}

impl RemoteJwks {
    /// A JWKS client for `url`; call [`RemoteJwks::start`] to begin fetching.
    pub fn new(
        url: &str,
        max_ttl: Duration,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Arc<Self>, String> {
        let url: Uri = url
            .parse()
            .map_err(|_| format!("auth.jwt.jwks_url: `{url}` is not a URL"))?;
        let roots = crate::tls_client::Roots::load(url.scheme_str() == Some("https"));
        let tls = crate::tls_client::config(&roots, None)?;
        let connector = crate::tls_client::connector(tls, Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Arc::new(RemoteJwks {
            url,
            max_ttl,
            timeout,
            client,
            state: ArcSwapOption::empty(),
            inflight: Mutex::new(Inflight::default()),
            metrics,
            refresher: Mutex::new(None),
        }))
    }

    /// Starts the background task: the first fetch at once, then refreshes before the TTL
    /// runs out, and retries with back-off after failures. It stops when `self` is dropped.
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(refresh_loop(weak));
        if let Ok(mut slot) = self.refresher.lock() {
            *slot = Some(task);
        }
    }

    /// Whether a key set has been fetched (readiness waits for this).
    pub fn is_ready(&self) -> bool {
        self.state.load().is_some()
    }

    /// The current keys, if usable (fetched, and not staler than a day).
    pub fn current(&self) -> Option<Arc<KeySet>> {
        let state = self.state.load_full()?;
        (state.at.elapsed() <= MAX_STALENESS).then(|| state.keys.clone())
    }

    /// The URL, for readiness reports.
    pub fn url(&self) -> String {
        self.url.to_string()
    }

    /// Finds the key for a token; an unknown `kid` triggers one shared refetch.
    pub async fn find(self: &Arc<Self>, kid: Option<&str>, alg: Algorithm) -> RemoteLookup {
        let Some(keys) = self.current() else {
            return RemoteLookup::Unavailable;
        };
        match lookup(&keys, kid, alg) {
            RemoteLookup::Missing if kid.is_some() => {}
            other => return other,
        }
        if !self.refetch_for_unknown_kid().await {
            return RemoteLookup::Missing;
        }
        match self.current() {
            Some(keys) => lookup(&keys, kid, alg),
            None => RemoteLookup::Unavailable,
        }
    }

    /// Joins the refetch in flight, or starts one unless one ran within the cooldown.
    /// Returns whether a refetch completed.
    async fn refetch_for_unknown_kid(self: &Arc<Self>) -> bool {
        let mut done = {
            // A std mutex: held for these few lines only, never across an await.
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(done) = &inflight.done {
                done.clone()
            } else if inflight
                .last_unknown_kid
                .is_some_and(|at| at.elapsed() < UNKNOWN_KID_COOLDOWN)
            {
                return false;
            } else {
                let (tx, rx) = watch::channel(false);
                inflight.done = Some(rx.clone());
                inflight.last_unknown_kid = Some(Instant::now());
                // The fetch runs in its own task, so a client that goes away cannot
                // cancel it for the others waiting on it.
                let this = self.clone();
                tokio::spawn(async move {
                    let result = this.fetch().await;
                    this.record(result, "unknown_kid");
                    this.inflight.lock().unwrap_or_else(|e| e.into_inner()).done = None;
                    let _ = tx.send(true);
                });
                rx
            }
        };
        let wait = self.timeout + Duration::from_secs(1);
        let finished = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        matches!(finished, Ok(Ok(_)))
    }

    /// One GET of the JWKS; returns the keys and the TTL the response allows.
    async fn fetch(&self) -> Result<(KeySet, Duration), String> {
        let request = Request::get(self.url.clone())
            .header(
                USER_AGENT,
                concat!("orcheo-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            let max_age = response
                .headers()
                .get(CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .and_then(max_age);
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            Ok((body, max_age))
        };
        let (body, max_age) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))??;
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        let (keys, skipped) = parse_key_set(&value)?;
        for note in skipped {
            tracing::debug!(url = %self.url, %note, "JWKS entry skipped");
        }
        if keys.is_empty() {
            return Err("the JWKS holds no usable signature key".into());
        }
        let ttl = max_age
            .map_or(self.max_ttl, |age| age.min(self.max_ttl))
            .max(MIN_TTL);
        Ok((keys, ttl))
    }

    /// Stores a fetch result (a failure keeps the previous keys) and counts it.
    fn record(&self, result: Result<(KeySet, Duration), String>, reason: &str) -> Option<Duration> {
        match result {
            Ok((keys, ttl)) => {
                let count = keys.len();
                self.state.store(Some(Arc::new(Fetched {
                    keys: Arc::new(keys),
                    at: Instant::now(),
                })));
                self.metrics
                    .jwks_refresh
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.jwks_keys.set(count as i64);
                let now = crate::time::since_epoch();
                self.metrics.jwks_last_success.set(now.as_secs_f64());
                tracing::info!(url = %self.url, keys = count, ttl_seconds = ttl.as_secs(), reason, "JWKS fetched");
                Some(ttl)
            }
            Err(error) => {
                self.metrics
                    .jwks_refresh
                    .with_label_values(&["failure"])
                    .inc();
                let stale = self.state.load().as_ref().map(|s| s.at.elapsed().as_secs());
                tracing::warn!(url = %self.url, %error, reason, stale_seconds = stale, "JWKS fetch failed; keeping the last good keys");
                None
            }
        }
    }
}

fn lookup(keys: &Arc<KeySet>, kid: Option<&str>, alg: Algorithm) -> RemoteLookup {
    match keys.find(kid, alg) {
        Lookup::Found(key) => {
            let index = keys
                .keys
                .iter()
                .position(|k| std::ptr::eq(k, key))
                .unwrap_or(0);
            RemoteLookup::Found(keys.clone(), index)
        }
        Lookup::Mismatch => RemoteLookup::Mismatch,
        Lookup::Missing => RemoteLookup::Missing,
    }
}

/// The `max-age` of a `Cache-Control` header.
fn max_age(header: &str) -> Option<Duration> {
    header.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        value
            .trim()
            .trim_matches('"')
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    })
}

async fn refresh_loop(jwks: Weak<RemoteJwks>) {
    let mut retry = RETRY_FIRST;
    loop {
        let Some(this) = jwks.upgrade() else { return };
        let result = this.fetch().await;
        let wait = match this.record(result, "refresh") {
            Some(ttl) => {
                retry = RETRY_FIRST;
                // Refresh at 80% of the TTL, so the keys never run out in normal operation.
                ttl.mul_f64(0.8)
            }
            None => {
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                wait
            }
        };
        drop(this);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(max_age("max-age=60"), Some(Duration::from_secs(60)));
        assert_eq!(
            max_age("public, Max-Age=\"120\", must-revalidate"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(max_age("no-store"), None);
        assert_eq!(max_age("s-maxage=5"), None);
        assert_eq!(max_age("max-age=-1"), None);
    }
}
