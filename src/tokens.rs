//! The service-token lifecycle (contract §3.6, §8): minting, rotation with overlap,
//! revocation, status, and the JSON object the admin API answers with.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{hash_secret, AuditEvent, TokenRecord};
use crate::time::Timestamp;

/// Shortest lifetime a token may be given.
pub const MIN_EXPIRES_IN: i64 = 60;
/// Overlap of a rotation when none is given.
pub const DEFAULT_OVERLAP: i64 = 300;
/// Longest token id accepted.
const MAX_ID_LEN: usize = 128;

/// `POST /api/admin/service-tokens`.
#[derive(Debug, Default, Deserialize)]
pub struct CreateRequest {
    /// The id; default: the first 8 hex characters of the secret's hash.
    pub identifier: Option<String>,
    /// A human-readable label.
    pub name: Option<String>,
    /// Scopes.
    pub scopes: Option<Vec<String>>,
    /// Workspaces (`*` for all).
    pub workspace_ids: Option<Vec<String>>,
    /// Lifetime; none: never expires.
    pub expires_in_seconds: Option<i64>,
}

/// `POST /api/admin/service-tokens/{id}/rotate`.
#[derive(Debug, Default, Deserialize)]
pub struct RotateRequest {
    /// How long the old token stays valid.
    pub overlap_seconds: Option<i64>,
    /// Lifetime of the new token.
    pub expires_in_seconds: Option<i64>,
    /// The new token's id.
    pub identifier: Option<String>,
    /// New scopes (default: the old token's).
    pub scopes: Option<Vec<String>>,
    /// New workspaces (default: the old token's).
    pub workspace_ids: Option<Vec<String>>,
}

/// `DELETE /api/admin/service-tokens/{id}`.
#[derive(Debug, Deserialize)]
pub struct RevokeRequest {
    /// Why.
    pub reason: String,
}

/// Who asks, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    /// The caller's token id.
    pub token_id: Option<String>,
    /// The caller's IP.
    pub ip: Option<String>,
    /// The caller's user agent.
    pub user_agent: Option<String>,
}

impl Actor {
    /// An audit row for `token_id` by this actor.
    pub fn event(&self, token_id: &str, action: &str, details: Option<Value>) -> AuditEvent {
        AuditEvent {
            token_id: token_id.to_string(),
            action: action.to_string(),
            actor: self.token_id.clone(),
            ip_address: self.ip.clone(),
            user_agent: self.user_agent.clone(),
            timestamp: Timestamp::now(),
            details,
        }
    }
}

/// 32 random bytes, base64url without padding: 43 characters.
pub fn new_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness available".to_string())?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn clean_list(items: Option<Vec<String>>) -> Option<Vec<String>> {
    items.map(|items| {
        let mut items: Vec<String> = items
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        items.sort();
        items.dedup();
        items
    })
}

/// The last second every store and the ISO 8601 form can hold (9999-12-31T23:59:59Z):
/// a token may not end later, so no duration can wrap a timestamp.
const LATEST: i64 = 253_402_300_799;

/// `now + seconds`, when that is a time the stores can hold.
fn later(now: Timestamp, seconds: i64, field: &str) -> Result<Timestamp, String> {
    now.0
        .checked_add(seconds)
        .filter(|at| *at <= LATEST)
        .map(Timestamp)
        .ok_or_else(|| format!("{field} is too large: the time it gives is past the year 9999"))
}

fn check_expires_in(value: Option<i64>) -> Result<Option<i64>, String> {
    match value {
        Some(seconds) if seconds < MIN_EXPIRES_IN => Err(format!(
            "expires_in_seconds must be at least {MIN_EXPIRES_IN}"
        )),
        Some(seconds) => {
            later(Timestamp::now(), seconds, "expires_in_seconds").map(|_| Some(seconds))
        }
        None => Ok(None),
    }
}

/// Ids that would mean something else: path segments (`.`, `..`) and the bootstrap
/// token's own id.
const RESERVED_IDS: [&str; 3] = [".", "..", "bootstrap"];

fn check_identifier(value: Option<String>) -> Result<Option<String>, String> {
    match value.map(|v| v.trim().to_string()) {
        Some(id) if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control() || c == '/') => Err(
            format!("identifier must be 1 to {MAX_ID_LEN} characters, without '/' or control characters"),
        ),
        Some(id) if RESERVED_IDS.iter().any(|r| id.eq_ignore_ascii_case(r)) => {
            Err(format!("identifier '{id}' is reserved"))
        }
        other => Ok(other),
    }
}

/// A new token: its record and its secret (shown once, never stored).
pub fn mint(
    identifier: Option<String>,
    name: Option<String>,
    scopes: Vec<String>,
    workspace_ids: Vec<String>,
    expires_in: Option<i64>,
) -> Result<(TokenRecord, String), String> {
    let secret = new_secret()?;
    let hash = hash_secret(&secret);
    let now = Timestamp::now();
    let record = TokenRecord {
        identifier: identifier.unwrap_or_else(|| hash[..8].to_string()),
        secret_hash: hash,
        scopes,
        workspace_ids,
        issued_at: now,
        expires_at: expires_in
            .map(|s| later(now, s, "expires_in_seconds"))
            .transpose()?,
        name: name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()),
        secret_preview: Some(secret[secret.len() - 4..].to_string()),
        ..TokenRecord::default()
    };
    Ok((record, secret))
}

/// A validated create request, minted.
pub fn create(request: CreateRequest) -> Result<(TokenRecord, String), String> {
    let expires_in = check_expires_in(request.expires_in_seconds)?;
    let identifier = check_identifier(request.identifier)?;
    mint(
        identifier,
        request.name,
        clean_list(request.scopes).unwrap_or_default(),
        clean_list(request.workspace_ids).unwrap_or_default(),
        expires_in,
    )
}

/// Rotation: a new token (same scopes and workspaces unless given), and the old one
/// ending at min(its expiry, now + overlap). Returns (old updated, new, secret, overlap).
pub fn rotate(
    old: &TokenRecord,
    request: RotateRequest,
) -> Result<(TokenRecord, TokenRecord, String, i64), String> {
    let overlap = request.overlap_seconds.unwrap_or(DEFAULT_OVERLAP);
    if overlap < 0 {
        return Err("overlap_seconds must not be negative".into());
    }
    let expires_in = check_expires_in(request.expires_in_seconds)?;
    let identifier = check_identifier(request.identifier)?;
    let (mut new, secret) = mint(
        identifier,
        old.name.clone(),
        clean_list(request.scopes).unwrap_or_else(|| old.scopes.clone()),
        clean_list(request.workspace_ids).unwrap_or_else(|| old.workspace_ids.clone()),
        expires_in,
    )?;
    new.rotated_from = Some(old.identifier.clone());
    let end = later(Timestamp::now(), overlap, "overlap_seconds")?;
    let mut ended = old.clone();
    ended.expires_at = Some(old.expires_at.map_or(end, |at| at.min(end)));
    ended.rotation_expires_at = Some(end);
    ended.rotated_to = Some(new.identifier.clone());
    Ok((ended, new, secret, overlap))
}

/// `active`, `rotating` (rotated, still inside its overlap), `expired` or `revoked`.
pub fn status(record: &TokenRecord, now: Timestamp) -> &'static str {
    if record.revoked_at.is_some() {
        "revoked"
    } else if record.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else if record.rotated_to.is_some() {
        "rotating"
    } else {
        "active"
    }
}

/// The token object of the admin API.
pub fn to_json(record: &TokenRecord, secret: Option<&str>, message: Option<String>) -> Value {
    let time = |t: Option<Timestamp>| t.map(|t| t.to_string());
    let sorted = |items: &[String]| {
        let mut items = items.to_vec();
        items.sort();
        items
    };
    json!({
        "identifier": record.identifier,
        "name": record.name,
        "secret": secret,
        "secret_preview": record.secret_preview,
        "scopes": sorted(&record.scopes),
        "workspace_ids": sorted(&record.workspace_ids),
        "issued_at": record.issued_at.to_string(),
        "expires_at": time(record.expires_at),
        "last_used_at": time(record.last_used_at),
        "use_count": record.use_count,
        "revoked_at": time(record.revoked_at),
        "revocation_reason": record.revocation_reason,
        "rotated_to": record.rotated_to,
        "rotated_from": record.rotated_from,
        "status": status(record, Timestamp::now()),
        "message": message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_43_characters_and_ids_default_to_the_hash_prefix() {
        let (record, secret) = create(CreateRequest::default()).unwrap();
        assert_eq!(secret.len(), 43);
        assert!(secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(record.secret_hash, hash_secret(&secret));
        assert_eq!(record.identifier, record.secret_hash[..8]);
        assert_eq!(record.secret_preview.as_deref(), Some(&secret[39..]));
        assert_eq!(record.expires_at, None);
    }

    #[test]
    fn bad_requests_are_explained() {
        let short = CreateRequest {
            expires_in_seconds: Some(59),
            ..Default::default()
        };
        assert!(create(short).unwrap_err().contains("at least 60"));
        let slash = CreateRequest {
            identifier: Some("a/b".into()),
            ..Default::default()
        };
        assert!(create(slash).is_err());
        let (old, _) = create(CreateRequest::default()).unwrap();
        let negative = RotateRequest {
            overlap_seconds: Some(-1),
            ..Default::default()
        };
        assert!(rotate(&old, negative).is_err());
    }

    #[test]
    fn rotation_overlap_bounds_the_old_token() {
        let request = CreateRequest {
            scopes: Some(vec!["b".into(), "a".into(), "a".into()]),
            expires_in_seconds: Some(3600),
            ..Default::default()
        };
        let (old, _) = create(request).unwrap();
        assert_eq!(old.scopes, vec!["a", "b"]);
        let (ended, new, _, overlap) = rotate(&old, RotateRequest::default()).unwrap();
        assert_eq!(overlap, 300);
        assert_eq!(new.scopes, old.scopes);
        assert_eq!(new.rotated_from.as_deref(), Some(old.identifier.as_str()));
        assert_eq!(ended.rotated_to.as_deref(), Some(new.identifier.as_str()));
        let now = Timestamp::now().0;
        assert!((ended.expires_at.unwrap().0 - (now + 300)).abs() <= 1);
        assert_eq!(status(&ended, Timestamp::now()), "rotating");
        // Overlap 0: the old token ends now.
        let (ended, _, _, _) = rotate(
            &old,
            RotateRequest {
                overlap_seconds: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(status(&ended, Timestamp::now()), "expired");
        // An old expiry sooner than the overlap stands.
        let soon = TokenRecord {
            expires_at: Some(Timestamp(now + 10)),
            ..old
        };
        let (ended, _, _, _) = rotate(&soon, RotateRequest::default()).unwrap();
        assert_eq!(ended.expires_at, Some(Timestamp(now + 10)));
    }
}
