//! Denials remembered for a moment, so that an ingress asking twice about one request
//! gets the same answer without the failure being counted twice. nginx does exactly that:
//! `auth_request` asks first, and its `error_page` location asks again to fetch the
//! gateway's JSON body. Keyed by the ingress, the client and the ingress's request id
//! (`X-Request-Id`, nginx's `$request_id`); each denial is replayed once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::GatewayError;

/// Denials remembered at most; past it the oldest half is forgotten (a forgotten one
/// only costs a fresh decision).
const CAPACITY: usize = 10_000;
/// How long a denial waits for its second question.
const KEEP: Duration = Duration::from_secs(10);

type Key = (IpAddr, IpAddr, String);

/// Recent denials, by (ingress, client, request id).
#[derive(Default)]
pub struct Replays {
    // A std mutex: held for one map operation, never across an await.
    denials: Mutex<HashMap<Key, (Instant, GatewayError)>>,
}

impl Replays {
    /// Remembers that the request `request_id` from `client`, asked about by `caller`,
    /// was denied with `error`.
    pub fn remember(&self, caller: IpAddr, client: IpAddr, request_id: &str, error: &GatewayError) {
        let mut denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        if denials.len() >= CAPACITY {
            denials.retain(|_, (at, _)| at.elapsed() < KEEP);
            if denials.len() >= CAPACITY {
                let mut ages: Vec<Instant> = denials.values().map(|(at, _)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                denials.retain(|_, (at, _)| *at > cut);
            }
        }
        let key = (caller, client, request_id.to_string());
        denials.insert(key, (Instant::now(), error.clone()));
    }

    /// The denial to replay for this request, if it was denied a moment ago (once).
    pub fn take(&self, caller: IpAddr, client: IpAddr, request_id: &str) -> Option<GatewayError> {
        let mut denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        let key = (caller, client, request_id.to_string());
        let (at, error) = denials.remove(&key)?;
        (at.elapsed() < KEEP).then_some(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_is_replayed_once_for_the_same_request_only() {
        let replays = Replays::default();
        let (ingress, client, other) = (
            "10.0.0.1".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
            "198.51.100.8".parse().unwrap(),
        );
        replays.remember(ingress, client, "r1", &GatewayError::RouteNotFound);
        assert!(
            replays.take(ingress, other, "r1").is_none(),
            "another client"
        );
        assert!(
            replays.take(ingress, client, "r2").is_none(),
            "another request"
        );
        assert!(matches!(
            replays.take(ingress, client, "r1"),
            Some(GatewayError::RouteNotFound)
        ));
        assert!(
            replays.take(ingress, client, "r1").is_none(),
            "replayed once"
        );
    }

    #[test]
    fn memory_stays_bounded() {
        let replays = Replays::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..(CAPACITY * 3) {
            replays.remember(ip, ip, &i.to_string(), &GatewayError::RouteNotFound);
        }
        assert!(replays.denials.lock().unwrap().len() <= CAPACITY);
    }
}
