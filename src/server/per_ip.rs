//! The per-client connection cap (`limits.max_connections_per_ip`): open connections
//! counted by the client's address (the PROXY header's, when believed). The map holds
//! only addresses with an open connection, so it is bounded by `max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per client address.
pub struct PerIp {
    max: usize,
    // A std mutex: held for one map operation, never across an await.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place under the cap; given back when dropped.
pub struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A cap of `max` connections per address; 0 turns it off.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerIp {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, or `None` when it has `max` already.
    /// With the cap off, `Some` without counting.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Option<IpSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Some(IpSlot {
            owner: self.clone(),
            ip,
        }))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_cap_and_places_come_back() {
        let cap = PerIp::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = cap.acquire(a).unwrap();
        let second = cap.acquire(a).unwrap();
        assert!(
            cap.acquire(a).is_none(),
            "a third connection from one address"
        );
        assert!(cap.acquire(b).is_some(), "another address is not affected");
        drop(first);
        assert!(cap.acquire(a).is_some());
        drop(second);
        assert!(
            cap.open.lock().unwrap().is_empty(),
            "closed addresses are forgotten"
        );
        let off = PerIp::new(0);
        assert!(off.acquire(a).unwrap().is_none(), "no cap, no counting");
    }
}
