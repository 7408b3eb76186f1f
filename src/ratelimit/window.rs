//! Local sliding windows: per key, the times of the last `limit` events. A key is blocked
//! while `limit` events lie within the window, and is free again the moment the oldest
//! of them leaves it. At most `capacity` keys are kept; the least recently used goes
//! first, so a flood of new keys cannot grow memory.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

/// Shards: keys spread over independent locks, so concurrent requests rarely wait on
/// each other. Each lock is held for a few map operations only, never across an await.
const SHARDS: usize = 16;

/// Sliding windows for one kind of limit.
pub struct Windows {
    shards: Vec<Mutex<LruCache<String, VecDeque<u64>>>>,
    hasher: RandomState,
    epoch: Instant,
}

impl Windows {
    /// Windows for at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        let per_shard =
            NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Windows {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, key: &str) -> &Mutex<LruCache<String, VecDeque<u64>>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[index]
    }

    /// Drops events that left the window and keeps at most `limit` (only the newest
    /// `limit` ever decide anything).
    fn prune(events: &mut VecDeque<u64>, now: u64, window: u64, limit: usize) {
        while events.front().is_some_and(|&at| at + window <= now) {
            events.pop_front();
        }
        while events.len() > limit {
            events.pop_front();
        }
    }

    /// With `limit` events in the window: how long until the oldest leaves it.
    fn wait(events: &VecDeque<u64>, now: u64, window: u64, limit: usize) -> Option<Duration> {
        if events.len() < limit {
            return None;
        }
        let oldest = *events.front()?;
        Some(Duration::from_millis((oldest + window).saturating_sub(now)))
    }

    /// Whether `key` is blocked, and for how long.
    pub fn blocked(&self, key: &str, limit: u32, window: Duration) -> Option<Duration> {
        let (now, window_ms, limit) = (self.now_ms(), window.as_millis() as u64, limit as usize);
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let events = shard.get_mut(key)?;
        Self::prune(events, now, window_ms, limit);
        Self::wait(events, now, window_ms, limit)
    }

    /// Records an event for `key`.
    pub fn record(&self, key: &str, limit: u32, window: Duration) {
        let (now, window_ms, limit) = (self.now_ms(), window.as_millis() as u64, limit as usize);
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let events = shard.get_or_insert_mut(key.to_string(), VecDeque::new);
        events.push_back(now);
        Self::prune(events, now, window_ms, limit);
    }

    /// Records an event unless `key` is at its limit; then says how long to wait.
    pub fn acquire(&self, key: &str, limit: u32, window: Duration) -> Result<(), Duration> {
        let (now, window_ms, limit) = (self.now_ms(), window.as_millis() as u64, limit as usize);
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let events = shard.get_or_insert_mut(key.to_string(), VecDeque::new);
        Self::prune(events, now, window_ms, limit);
        if let Some(wait) = Self::wait(events, now, window_ms, limit) {
            return Err(wait);
        }
        events.push_back(now);
        Ok(())
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn exactly_n_blocks_and_the_window_slides() {
        let windows = Windows::new(100);
        for _ in 0..2 {
            windows.record("k", 3, WINDOW);
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert_eq!(windows.blocked("k", 3, WINDOW), None, "N-1 events: free");
        windows.record("k", 3, WINDOW); // t = 20 s: the third event
        assert_eq!(
            windows.blocked("k", 3, WINDOW),
            Some(Duration::from_secs(40)),
            "N events: blocked until the first (t=0) leaves at 60 s"
        );
        tokio::time::advance(Duration::from_secs(39)).await;
        assert_eq!(
            windows.blocked("k", 3, WINDOW),
            Some(Duration::from_secs(1))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            windows.blocked("k", 3, WINDOW),
            None,
            "the oldest left at exactly 60 s"
        );
        windows.record("k", 3, WINDOW); // t = 60 s: events at 10, 20, 60
        assert_eq!(
            windows.blocked("k", 3, WINDOW),
            Some(Duration::from_secs(10))
        );
        assert_eq!(windows.blocked("other", 3, WINDOW), None);
    }

    #[tokio::test(start_paused = true)]
    async fn n_plus_one_events_still_free_when_the_oldest_leaves() {
        let windows = Windows::new(100);
        for _ in 0..4 {
            windows.record("k", 3, WINDOW);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Events at 0, 1, 2, 3 s; only the newest three count: free once t=1 leaves at 61 s.
        assert_eq!(
            windows.blocked("k", 3, WINDOW),
            Some(Duration::from_secs(57))
        );
        tokio::time::advance(Duration::from_secs(57)).await;
        assert_eq!(windows.blocked("k", 3, WINDOW), None);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_admits_up_to_the_limit_per_window() {
        let windows = Windows::new(100);
        let second = Duration::from_secs(1);
        for _ in 0..5 {
            assert!(windows.acquire("r", 5, second).is_ok());
        }
        assert_eq!(windows.acquire("r", 5, second), Err(second));
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(
            windows.acquire("r", 5, second),
            Err(Duration::from_millis(600))
        );
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(windows.acquire("r", 5, second).is_ok());
    }

    #[test]
    fn a_million_distinct_keys_stay_within_capacity() {
        let windows = Windows::new(10_000);
        for i in 0..1_000_000u32 {
            windows.record(&format!("client-{i}"), 5, WINDOW);
        }
        assert!(windows.len() <= 10_000 + SHARDS, "{}", windows.len());
        // The most recent keys are the ones kept.
        assert!(windows.blocked("client-999999", 1, WINDOW).is_some());
        assert!(windows.blocked("client-0", 1, WINDOW).is_none());
    }
}
