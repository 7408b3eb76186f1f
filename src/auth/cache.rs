//! The verified-token cache: a JWT verified once is not verified again until it expires,
//! which spares an RSA signature check per request. Bounded in size; an entry never
//! outlives the token's `exp`, a fixed maximum age, or the key that verified it.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use dashmap::DashMap;

use super::identity::Identity;

/// Longest time a verification is reused, even for a token without `exp`: bounds how
/// long a configuration change (new audience, removed secret) takes to reach tokens that
/// are in constant use.
const MAX_AGE_SECONDS: f64 = 300.0;

struct Entry {
    identity: Arc<Identity>,
    valid_until: f64,
    kid: Option<String>,
}

/// Verified tokens, keyed by the token text. The map is sharded (DashMap), so lookups
/// from many connections do not contend on one lock; no lock is held across an await.
pub struct TokenCache {
    entries: DashMap<Box<str>, Entry, TailHash>,
    capacity: usize,
}

/// How many bytes at the end of a token its hash is taken from.
const HASHED_TAIL: usize = 32;

/// Hashes a token by its last [`HASHED_TAIL`] bytes, mixed with a key drawn at random for
/// each cache. Every token in the cache passed signature verification, and a JWT ends
/// with its signature: bytes no one can choose without the signing key, so the tail
/// spreads the entries as well as the whole token would, at a fixed cost however long the
/// token (SipHash over a 200–1 000-byte token cost more than the rest of a cached
/// verification). Keys are still compared in full: a shared tail only shares a bucket.
#[derive(Clone)]
struct TailHash {
    key: u64,
}

impl TailHash {
    fn new() -> Self {
        TailHash {
            key: uuid::Uuid::new_v4().as_u64_pair().0 | 1,
        }
    }
}

impl BuildHasher for TailHash {
    type Hasher = TailHasher;

    fn build_hasher(&self) -> TailHasher {
        TailHasher { state: self.key }
    }
}

struct TailHasher {
    state: u64,
}

impl TailHasher {
    fn mix(&mut self, word: u64) {
        // One round of a multiply-xorshift mixer (as in SplitMix64's finaliser).
        let x = (self.state ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.state = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
}

impl Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        let tail = &bytes[bytes.len().saturating_sub(HASHED_TAIL)..];
        let mut chunks = tail.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.mix(u64::from_le_bytes(last) ^ (bytes.len() as u64) << 56);
    }

    fn finish(&self) -> u64 {
        self.state ^ (self.state >> 31)
    }
}

impl TokenCache {
    /// A cache holding at most `capacity` tokens (0 disables it).
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            entries: DashMap::with_hasher(TailHash::new()),
            capacity,
        }
    }

    /// The cached identity of `token`, if still valid at `now` and its key (by `kid`) is
    /// still known.
    pub fn get(
        &self,
        token: &str,
        now: f64,
        still_known: impl Fn(&str) -> bool,
    ) -> Option<Arc<Identity>> {
        {
            // The key check runs under the shard's read lock: it reads the current key
            // set and never waits.
            let entry = self.entries.get(token)?;
            if entry.valid_until > now && entry.kid.as_deref().is_none_or(still_known) {
                return Some(entry.identity.clone());
            }
        }
        self.entries.remove(token);
        None
    }

    /// Remembers a verification; `valid_until` is the token's `exp` plus leeway.
    pub fn insert(
        &self,
        token: &str,
        identity: Arc<Identity>,
        valid_until: Option<f64>,
        kid: Option<String>,
        now: f64,
    ) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        let cap = now + MAX_AGE_SECONDS;
        let valid_until = valid_until.map_or(cap, |v| v.min(cap));
        self.entries.insert(
            token.into(),
            Entry {
                identity,
                valid_until,
                kid,
            },
        );
    }

    /// Drops expired entries; if the cache is still full, drops a tenth of it. Dropping
    /// arbitrary entries only costs a re-verification, never a wrong answer.
    fn make_room(&self, now: f64) {
        self.entries.retain(|_, entry| entry.valid_until > now);
        if self.entries.len() >= self.capacity {
            let excess = self.entries.len() + 1 - self.capacity + self.capacity / 10;
            let victims: Vec<Box<str>> = self
                .entries
                .iter()
                .take(excess)
                .map(|e| e.key().clone())
                .collect();
            for key in victims {
                self.entries.remove(&key);
            }
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Arc<Identity> {
        Arc::new(Identity::anonymous())
    }

    #[test]
    fn entries_expire_with_the_token_and_the_maximum_age() {
        let cache = TokenCache::new(10);
        cache.insert("a", identity(), Some(110.0), None, 100.0);
        assert!(cache.get("a", 109.9, |_| true).is_some());
        assert!(cache.get("a", 110.0, |_| true).is_none());
        assert!(cache.is_empty(), "an expired entry is dropped when seen");
        cache.insert("b", identity(), None, None, 100.0);
        assert!(cache.get("b", 399.0, |_| true).is_some());
        assert!(cache.get("b", 400.0, |_| true).is_none());
    }

    #[test]
    fn a_removed_key_invalidates_its_entries() {
        let cache = TokenCache::new(10);
        cache.insert("t", identity(), Some(1e12), Some("k1".into()), 0.0);
        assert!(cache.get("t", 1.0, |kid| kid == "k1").is_some());
        assert!(cache.get("t", 1.0, |_| false).is_none());
    }

    #[test]
    fn tokens_sharing_their_tail_stay_apart() {
        let cache = TokenCache::new(10);
        let tail = "x".repeat(HASHED_TAIL);
        cache.insert(&format!("a.{tail}"), identity(), Some(1e12), None, 0.0);
        assert!(cache.get(&format!("b.{tail}"), 1.0, |_| true).is_none());
        assert!(cache.get(&tail, 1.0, |_| true).is_none());
        assert!(cache.get(&format!("a.{tail}"), 1.0, |_| true).is_some());
    }

    #[test]
    fn the_hash_follows_the_tail_and_the_length() {
        let build = TailHash { key: 7 };
        let hash = |text: String| build.hash_one(text.as_str());
        let signature = "s".repeat(HASHED_TAIL);
        assert_eq!(
            hash(format!("header.claims.{signature}")),
            hash(format!("HEADER.CLAIMS.{signature}")),
            "only the tail is hashed"
        );
        assert_ne!(
            hash(format!("header.claims.{signature}")),
            hash(format!("header.claims.{}t", &signature[1..]))
        );
        assert_ne!(
            hash(format!("header.claims.{signature}")),
            hash(format!("header.claims2.{signature}")),
            "the length counts"
        );
        assert_ne!(hash(String::new()), hash("a".into()));
        assert_ne!(TailHash { key: 9 }.hash_one("t"), build.hash_one("t"));
    }

    #[test]
    fn size_stays_bounded() {
        let cache = TokenCache::new(100);
        for i in 0..10_000 {
            cache.insert(&format!("token-{i}"), identity(), Some(1e12), None, 0.0);
            assert!(cache.len() <= 100);
        }
        let disabled = TokenCache::new(0);
        disabled.insert("x", identity(), None, None, 0.0);
        assert!(disabled.is_empty());
    }
}
