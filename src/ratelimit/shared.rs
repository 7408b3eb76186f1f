//! Windows shared by every replica through Redis: one sorted set per key, scored by the
//! Redis server's own clock (so replicas' clocks need not agree), updated by one Lua
//! script — atomic, one round trip per check.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use crate::metrics::Metrics;

/// Longest wait for Redis on the request path. Past it the local windows decide.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, Redis is left alone this long, so an outage costs each request
/// nothing rather than a timeout.
const BACKOFF: Duration = Duration::from_secs(2);

/// KEYS[1]: the window. ARGV: window ms, limit, mode (`check`, `record`, `acquire`),
/// a unique member. Returns {blocked, wait_ms}.
const SCRIPT: &str = r"
local key = KEYS[1]
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local mode = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if mode == 'record' or (mode == 'acquire' and count < limit) then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
  count = count + 1
  if count > limit then
    redis.call('ZREMRANGEBYRANK', key, 0, count - limit - 1)
    count = limit
  end
  return {0, 0}
end
if count >= limit then
  local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
  return {1, tonumber(oldest[2]) + window - now}
end
return {0, 0}
";

/// What to do with a window.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Is the key blocked?
    Check,
    /// Add an event.
    Record,
    /// Add an event unless blocked.
    Acquire,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Check => "check",
            Mode::Record => "record",
            Mode::Acquire => "acquire",
        }
    }
}

/// The Redis side of the limiter.
pub struct RedisWindows {
    connection: ConnectionManager,
    script: Script,
    /// UNIX ms until which Redis is skipped after a failure.
    skip_until: AtomicU64,
    /// Whether an outage is under way (logged once per outage).
    down: AtomicBool,
    sequence: AtomicU64,
    metrics: Metrics,
}

fn unix_ms() -> u64 {
    crate::time::since_epoch().as_millis() as u64
}

impl RedisWindows {
    /// A lazily connecting client for `url`; Redis need not be up yet.
    pub fn new(url: &str, metrics: Metrics) -> Result<Self, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("auth.rate_limit.redis_url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let connection = client
            .get_connection_manager_lazy(config)
            .map_err(|e| format!("auth.rate_limit.redis_url: {e}"))?;
        Ok(RedisWindows {
            connection,
            script: Script::new(SCRIPT),
            skip_until: AtomicU64::new(0),
            down: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
            metrics,
        })
    }

    /// Runs one window operation; `None` when Redis cannot answer in time (the caller
    /// then relies on its local windows).
    pub async fn run(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
        mode: Mode,
    ) -> Option<Option<Duration>> {
        if unix_ms() < self.skip_until.load(Ordering::Relaxed) {
            return None;
        }
        let member = format!(
            "{}-{}",
            unix_ms(),
            self.sequence.fetch_add(1, Ordering::Relaxed)
        );
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(format!("orcheo-gateway:rl:{key}"));
        invocation
            .arg(window.as_millis() as u64)
            .arg(limit)
            .arg(mode.as_str())
            .arg(member);
        let call = invocation.invoke_async::<(i64, i64)>(&mut connection);
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok((blocked, wait_ms))) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again; rate limits are shared across replicas");
                }
                Some((blocked == 1).then(|| Duration::from_millis(wait_ms.max(0) as u64)))
            }
            Ok(Err(error)) => self.failed(&error.to_string()),
            Err(_) => self.failed("no answer in time"),
        }
    }

    fn failed(&self, error: &str) -> Option<Option<Duration>> {
        self.metrics.ratelimit_redis_errors.inc();
        self.skip_until
            .store(unix_ms() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "Redis is unavailable; rate limits fall back to this replica's own windows");
        }
        None
    }
}
