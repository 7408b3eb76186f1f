//! Service-token identities, built once per stored record instead of once per request.
//! The token cache hands out a record as a shared `Arc` and replaces it (never changes it
//! in place) when the token changes, so an identity built from one `Arc` stays right for
//! exactly as long as the cache hands out that same `Arc`. Revocation and expiry are still
//! checked on the record at every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::identity::{AuthMethod, Identity, IdentityType, Workspaces};
use crate::store::TokenRecord;

/// Identities kept at most; past it they are all dropped (and built again on use).
const CAPACITY: usize = 10_000;

/// The identity of each recently used record, by secret hash.
#[derive(Default)]
pub struct ServiceIdentities {
    // A std mutex: held for one map operation, never across an await.
    kept: Mutex<HashMap<String, Kept>>,
}

/// A record and the identity built from it.
type Kept = (Arc<TokenRecord>, Arc<Identity>);

impl ServiceIdentities {
    /// The identity of `record`: the one built from this same record if there is one,
    /// else a new one.
    pub fn of(&self, record: &Arc<TokenRecord>) -> Arc<Identity> {
        {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((from, identity)) = kept.get(record.secret_hash.as_str()) {
                if Arc::ptr_eq(from, record) {
                    return identity.clone();
                }
            }
        }
        let identity = Arc::new(identity_of(record));
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= CAPACITY && !kept.contains_key(record.secret_hash.as_str()) {
            kept.clear();
        }
        kept.insert(
            record.secret_hash.clone(),
            (record.clone(), identity.clone()),
        );
        identity
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The caller a service token stands for (contract §3.3).
fn identity_of(record: &TokenRecord) -> Identity {
    Identity {
        subject: record.identifier.clone(),
        identity_type: IdentityType::Service,
        token_id: record.identifier.clone(),
        scopes: record.scopes.iter().cloned().collect(),
        workspaces: Workspaces::from_ids(record.workspace_ids.iter().cloned()),
        method: AuthMethod::ServiceToken,
        expires_at: record.expires_at.map(|t| t.0),
        values: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn record(id: &str, scopes: &[&str]) -> Arc<TokenRecord> {
        Arc::new(TokenRecord {
            identifier: id.into(),
            secret_hash: format!("hash-{id}"),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            workspace_ids: vec!["WS-1".into()],
            expires_at: Some(Timestamp(2_000_000_000)),
            ..Default::default()
        })
    }

    #[test]
    fn one_identity_per_record_and_a_new_one_when_the_record_is_replaced() {
        let identities = ServiceIdentities::default();
        let first = record("svc", &["workflows:read"]);
        let identity = identities.of(&first);
        assert_eq!(identity.subject, "svc");
        assert_eq!(identity.token_id, "svc");
        assert!(identity.scopes.contains("workflows:read"));
        assert!(identity.workspaces.ids.contains("ws-1"));
        assert_eq!(identity.expires_at, Some(2_000_000_000));
        assert!(Arc::ptr_eq(&identity, &identities.of(&first)), "built once");
        // The same token with new scopes arrives as a new record: a new identity.
        let changed = record("svc", &["workflows:write"]);
        let renewed = identities.of(&changed);
        assert!(!Arc::ptr_eq(&identity, &renewed));
        assert!(renewed.scopes.contains("workflows:write"));
        assert!(!renewed.scopes.contains("workflows:read"));
        // Equal contents are not enough: only the same record reuses an identity.
        let equal = Arc::new(TokenRecord::clone(&changed));
        assert!(!Arc::ptr_eq(&renewed, &identities.of(&equal)));
        assert_eq!(identities.len(), 1);
    }

    #[test]
    fn size_stays_bounded() {
        let identities = ServiceIdentities::default();
        for i in 0..CAPACITY + 10 {
            identities.of(&record(&i.to_string(), &[]));
        }
        assert!((1..=CAPACITY).contains(&identities.len()));
    }
}
