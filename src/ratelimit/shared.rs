//! Windows shared by every replica through Redis: one sorted set per key, scored by the
//! Redis server's own clock (so replicas' clocks need not agree), updated by one Lua
//! script — atomic, one round trip.
//!
//! Redis must not become the fleet's ceiling (contract §6.4), so failure limits touch it
//! only when a failure is recorded. The write that fills a window also announces the
//! block (pub/sub, and a sorted set of current blocks that a replica reads when it
//! (re)subscribes); every replica remembers announced blocks and refuses those keys
//! locally. A successful request costs Redis nothing. Route limits admit each request
//! through Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Longest wait for Redis on the request path. Past it the local windows decide.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, Redis is left alone this long, so an outage costs each request
/// nothing rather than a timeout.
const BACKOFF: Duration = Duration::from_secs(2);
/// Where blocks are announced (with the database number appended: channels are shared
/// by every database of a server, fleets on different databases must not hear each
/// other), and the sorted set of blocks still in force (member: the key, score: the
/// Redis time in ms when it ends).
const CHANNEL: &str = "orcheo-gateway:rl:blocked";
const BLOCKED: &str = "orcheo-gateway:rl:blocked-until";
/// Between two attempts to (re)subscribe.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// KEYS[1]: the window, KEYS[2]: the set of blocks. ARGV: window ms, limit, mode
/// (`record`, `acquire`), a unique member, the announced key. Returns {blocked, wait_ms}.
/// A `record` that fills the window announces the block.
const SCRIPT: &str = r"
local key = KEYS[1]
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local mode = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if mode == 'acquire' and count >= limit then
  local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
  return {1, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', key, now, ARGV[4])
redis.call('PEXPIRE', key, window)
count = count + 1
if count > limit then
  redis.call('ZREMRANGEBYRANK', key, 0, count - limit - 1)
  count = limit
end
if mode == 'record' and count >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], now + wait, ARGV[5])
  redis.call('PUBLISH', ARGV[6], wait .. ' ' .. ARGV[5])
  return {1, wait}
end
return {0, 0}
";

/// KEYS[1]: the set of blocks. Returns {key, ms left, key, ms left, …} for the blocks in
/// force, dropping the ended ones.
const SNAPSHOT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local items = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #items, 2 do
  out[#out + 1] = items[i]
  out[#out + 1] = tonumber(items[i + 1]) - now
end
return out
";

/// What to do with a window.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Add a failure (and announce the block it completes).
    Record,
    /// Add an event unless blocked.
    Acquire,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Record => "record",
            Mode::Acquire => "acquire",
        }
    }
}

/// Blocks announced by any replica (this one included), by key, until they end; at most
/// `capacity` keys (past it the ended ones go, then new announcements are not kept).
struct Blocks {
    // A std mutex: held for one map operation, never across an await.
    until: Mutex<HashMap<String, Instant>>,
    capacity: usize,
}

impl Blocks {
    fn remember(&self, key: &str, wait: Duration) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if until.len() >= self.capacity {
            until.retain(|_, end| *end > now);
            if until.len() >= self.capacity {
                return;
            }
        }
        let end = now + wait;
        let entry = until.entry(key.to_string()).or_insert(end);
        *entry = (*entry).max(end);
    }

    /// How long `kind:key` is still blocked. With no block announced, as nearly always,
    /// the answer needs neither the key's text nor the clock.
    fn wait(&self, kind: &str, key: &str) -> Option<Duration> {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if until.is_empty() {
            return None;
        }
        let left = until
            .get(format!("{kind}:{key}").as_str())?
            .saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }
}

/// The Redis side of the limiter.
pub struct RedisWindows {
    connection: ConnectionManager,
    script: Script,
    channel: String,
    blocks: Arc<Blocks>,
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

fn redis_key(key: &str) -> String {
    format!("orcheo-gateway:rl:{key}")
}

impl RedisWindows {
    /// A lazily connecting client for `url` (Redis need not be up yet), and the task that
    /// learns of blocks announced by the fleet. Announced blocks are kept for at most
    /// `capacity` keys.
    pub fn new(url: &str, capacity: usize, metrics: Metrics) -> Result<Self, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("auth.rate_limit.redis_url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let connection = client
            .get_connection_manager_lazy(config)
            .map_err(|e| format!("auth.rate_limit.redis_url: {e}"))?;
        let blocks = Arc::new(Blocks {
            until: Mutex::new(HashMap::new()),
            capacity,
        });
        let channel = format!(
            "{CHANNEL}:{}",
            client.get_connection_info().redis_settings().db()
        );
        tokio::spawn(listen(client, channel.clone(), Arc::downgrade(&blocks)));
        Ok(RedisWindows {
            connection,
            script: Script::new(SCRIPT),
            channel,
            blocks,
            skip_until: AtomicU64::new(0),
            down: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
            metrics,
        })
    }

    /// How long `key` of `kind` (`ip`, `identity`) is still blocked by a block the fleet
    /// announced (no Redis call).
    pub fn announced(&self, kind: &str, key: &str) -> Option<Duration> {
        self.blocks.wait(kind, key)
    }

    /// Runs one window operation; `None` when Redis cannot answer in time (the caller
    /// then relies on its local windows). A `Record` that completes a block remembers it
    /// here at once (the announcement reaches the other replicas).
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
        let mut invocation = self.script.key(redis_key(key));
        invocation
            .key(BLOCKED)
            .arg(window.as_millis() as u64)
            .arg(limit)
            .arg(mode.as_str())
            .arg(member)
            .arg(key)
            .arg(&self.channel);
        let call = invocation.invoke_async::<(i64, i64)>(&mut connection);
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok((blocked, wait_ms))) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again; rate limits are shared across replicas");
                }
                let wait = (blocked == 1).then(|| Duration::from_millis(wait_ms.max(0) as u64));
                if let (Some(wait), Mode::Record) = (wait, mode) {
                    self.blocks.remember(key, wait);
                }
                Some(wait)
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

/// Learns of the blocks the fleet announces: subscribes, reads the blocks already in
/// force, then takes each announcement; resubscribes after a lost connection (reading
/// the blocks in force again). Ends when the limiter is dropped.
async fn listen(client: redis::Client, channel: String, blocks: Weak<Blocks>) {
    loop {
        if let Err(error) = follow(&client, &channel, &blocks).await {
            tracing::debug!(%error, "rate-limit announcements: reconnecting");
        }
        if blocks.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

async fn follow(
    client: &redis::Client,
    channel: &str,
    blocks: &Weak<Blocks>,
) -> redis::RedisResult<()> {
    let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT * 4, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    pubsub.subscribe(channel).await?;
    // Subscribed first, then the blocks in force: nothing announced in between is lost.
    let mut connection = client.get_multiplexed_async_connection().await?;
    let current: Vec<(String, i64)> = Script::new(SNAPSHOT)
        .key(BLOCKED)
        .invoke_async(&mut connection)
        .await?;
    drop(connection);
    {
        let Some(blocks) = blocks.upgrade() else {
            return Ok(());
        };
        for (key, left) in current {
            blocks.remember(&key, Duration::from_millis(left.max(0) as u64));
        }
    }
    let mut messages = pubsub.into_on_message();
    while let Some(message) = messages.next().await {
        let Some(blocks) = blocks.upgrade() else {
            return Ok(());
        };
        let payload: String = message.get_payload().unwrap_or_default();
        if let Some((wait, key)) = payload.split_once(' ') {
            if let Ok(wait) = wait.parse::<u64>() {
                blocks.remember(key, Duration::from_millis(wait));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn announced_blocks_end_and_stay_bounded() {
        let blocks = Blocks {
            until: Mutex::new(HashMap::new()),
            capacity: 2,
        };
        assert!(blocks.wait("ip", "a").is_none(), "nothing announced");
        blocks.remember("identity:user:1", Duration::from_secs(10));
        assert!(blocks.wait("identity", "user:1").is_some());
        assert!(blocks.wait("ip", "user:1").is_none(), "another kind's key");
        tokio::time::advance(Duration::from_secs(11)).await;
        blocks.remember("ip:a", Duration::from_secs(10));
        blocks.remember("ip:a", Duration::from_secs(5));
        assert!(
            blocks.wait("ip", "a").unwrap() > Duration::from_secs(9),
            "the later end wins"
        );
        blocks.remember("ip:b", Duration::from_secs(1));
        blocks.remember("ip:c", Duration::from_secs(1));
        assert!(blocks.wait("ip", "c").is_none(), "full: not kept");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(blocks.wait("ip", "b").is_none(), "ended");
        blocks.remember("ip:c", Duration::from_secs(1));
        assert!(
            blocks.wait("ip", "c").is_some(),
            "room again once the ended ones went"
        );
    }
}
