//! Who a request is from: the [`Identity`] every authentication method produces, and the
//! mapping from JWT claims to it (contract §3.4), exactly as Orcheo reads them.

use std::collections::BTreeSet;

use std::sync::OnceLock;

use http::HeaderValue;
use serde_json::{Map, Value};

/// How the caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// A bearer JWT.
    Jwt,
    /// A service token from the store.
    ServiceToken,
    /// The bootstrap token.
    Bootstrap,
    /// Nothing: anonymous.
    None,
}

impl AuthMethod {
    /// The value of `X-Orcheo-Auth-Method` and of metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ServiceToken => "service_token",
            AuthMethod::Bootstrap => "bootstrap",
            AuthMethod::None => "none",
        }
    }
}

/// The kind of caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityType {
    /// A person.
    User,
    /// A machine: service tokens, the bootstrap token, service JWTs.
    Service,
    /// No credential.
    Anonymous,
}

impl IdentityType {
    /// The value of `X-Orcheo-Identity-Type`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityType::User => "user",
            IdentityType::Service => "service",
            IdentityType::Anonymous => "anonymous",
        }
    }
}

/// The workspaces an identity may access.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workspaces {
    /// Every workspace (`*`).
    pub all: bool,
    /// Workspace ids, lowercased.
    pub ids: BTreeSet<String>,
}

impl Workspaces {
    /// From ids; `*` among them grants every workspace.
    pub fn from_ids<I: IntoIterator<Item = String>>(ids: I) -> Self {
        let mut workspaces = Workspaces::default();
        for id in ids {
            let id = id.trim().to_lowercase();
            if id == "*" {
                workspaces.all = true;
            } else if !id.is_empty() {
                workspaces.ids.insert(id);
            }
        }
        workspaces
    }

    /// Whether `workspace` (compared case-insensitively) is allowed.
    pub fn allows(&self, workspace: &str) -> bool {
        self.all || self.ids.contains(&workspace.trim().to_lowercase())
    }

    /// Space-separated and sorted; `*` for all.
    pub fn header_value(&self) -> String {
        if self.all {
            "*".to_string()
        } else {
            self.ids.iter().cloned().collect::<Vec<_>>().join(" ")
        }
    }
}

/// An authenticated (or anonymous) caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject.
    pub subject: String,
    /// User, service or anonymous.
    pub identity_type: IdentityType,
    /// The token id.
    pub token_id: String,
    /// Scopes held.
    pub scopes: BTreeSet<String>,
    /// Workspaces accessible.
    pub workspaces: Workspaces,
    /// How it authenticated.
    pub method: AuthMethod,
    /// When the credential stops being valid (UNIX seconds), if it does.
    pub expires_at: Option<i64>,
    /// The identity's header values, built on first use: a verified token is cached with
    /// its identity, so a busy token's values are built once, not per request.
    pub values: HeaderValuesCache,
}

/// The values of the identity headers (contract §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValues {
    /// The subject.
    pub subject: HeaderValue,
    /// `user`, `service` or `anonymous`.
    pub identity_type: HeaderValue,
    /// The token id.
    pub token_id: HeaderValue,
    /// Scopes, space-separated and sorted.
    pub scopes: HeaderValue,
    /// Workspaces, space-separated and sorted; `*` for all.
    pub workspaces: HeaderValue,
    /// `jwt`, `service_token`, `bootstrap` or `none`.
    pub auth_method: HeaderValue,
}

/// Which identity field cannot be sent as a header value.
pub type InvalidValue = &'static str;

/// The lazily built [`HeaderValues`] of an identity. It is derived data: identities
/// compare equal whatever it holds.
#[derive(Debug, Clone, Default)]
pub struct HeaderValuesCache(OnceLock<Result<HeaderValues, InvalidValue>>);

impl PartialEq for HeaderValuesCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for HeaderValuesCache {}

impl Identity {
    /// The identity's header values, or the field that cannot be one.
    pub fn header_values(&self) -> Result<&HeaderValues, InvalidValue> {
        let built = self.values.0.get_or_init(|| {
            let value =
                |text: &str, field: InvalidValue| HeaderValue::from_str(text).map_err(|_| field);
            Ok(HeaderValues {
                subject: value(&self.subject, "subject")?,
                identity_type: HeaderValue::from_static(self.identity_type.as_str()),
                token_id: value(&self.token_id, "token id")?,
                scopes: value(&self.scopes_header(), "scopes")?,
                workspaces: value(&self.workspaces.header_value(), "workspaces")?,
                auth_method: HeaderValue::from_static(self.method.as_str()),
            })
        });
        built.as_ref().map_err(|field| *field)
    }

    /// The anonymous identity: no scopes, no workspaces.
    pub fn anonymous() -> Self {
        Identity {
            subject: String::new(),
            identity_type: IdentityType::Anonymous,
            token_id: String::new(),
            scopes: BTreeSet::new(),
            workspaces: Workspaces::default(),
            method: AuthMethod::None,
            expires_at: None,
            values: HeaderValuesCache::default(),
        }
    }

    /// Whether this is the anonymous identity.
    pub fn is_anonymous(&self) -> bool {
        self.identity_type == IdentityType::Anonymous
    }

    /// Space-separated, sorted scopes.
    pub fn scopes_header(&self) -> String {
        self.scopes.iter().cloned().collect::<Vec<_>>().join(" ")
    }

    /// The identity of verified JWT claims (contract §3.4).
    pub fn from_claims(claims: &Map<String, Value>, expires_at: Option<i64>) -> Self {
        let text = |name: &str| match claims.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        let identity_type = identity_type(claims);
        let sub = text("sub");
        let token_id = text("jti")
            .or_else(|| text("token_id"))
            .or_else(|| sub.clone())
            .unwrap_or_else(|| identity_type.as_str().to_string());
        let nested = claims.get("orcheo").and_then(Value::as_object);
        let mut scopes = BTreeSet::new();
        for name in ["scope", "scopes", "scp"] {
            coerce_items(claims.get(name), &mut scopes);
        }
        coerce_items(nested.and_then(|o| o.get("scopes")), &mut scopes);
        let mut workspace_ids = BTreeSet::new();
        for name in ["workspace_ids", "workspaces", "workspace_id", "workspace"] {
            coerce_items(claims.get(name), &mut workspace_ids);
        }
        coerce_items(
            nested.and_then(|o| o.get("workspace_ids")),
            &mut workspace_ids,
        );
        Identity {
            subject: sub.unwrap_or_else(|| token_id.clone()),
            identity_type,
            token_id,
            scopes,
            workspaces: Workspaces::from_ids(workspace_ids),
            method: AuthMethod::Jwt,
            expires_at,
            values: HeaderValuesCache::default(),
        }
    }
}

/// The first of `token_use`, `type`, `typ` whose lowercase value is `user`, `service` or
/// `client` (`client` counts as service); `user` when none is.
fn identity_type(claims: &Map<String, Value>) -> IdentityType {
    for name in ["token_use", "type", "typ"] {
        if let Some(Value::String(value)) = claims.get(name) {
            match value.trim().to_lowercase().as_str() {
                "user" => return IdentityType::User,
                "service" | "client" => return IdentityType::Service,
                _ => {}
            }
        }
    }
    IdentityType::User
}

/// Orcheo's list coercion: strings are JSON-parsed when they can be, else split on commas
/// and white space; arrays and objects (their values) recurse; numbers and booleans are
/// their text.
pub fn coerce_items(value: Option<&Value>, out: &mut BTreeSet<String>) {
    coerce(value, out, 0);
}

/// Nesting depth accepted in claim values: deeper structures are ignored, so a hostile
/// token cannot make this recurse without bound.
const MAX_DEPTH: usize = 8;

fn coerce(value: Option<&Value>, out: &mut BTreeSet<String>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => coerce_text(text, out, depth),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => {
                        let s = s.trim();
                        if !s.is_empty() {
                            out.insert(s.to_string());
                        }
                    }
                    other => coerce(Some(other), out, depth + 1),
                }
            }
        }
        Some(Value::Object(map)) => {
            for item in map.values() {
                coerce(Some(item), out, depth + 1);
            }
        }
        Some(Value::Bool(b)) => {
            out.insert(if *b { "True" } else { "False" }.to_string());
        }
        Some(Value::Number(n)) => {
            out.insert(n.to_string());
        }
    }
}

fn coerce_text(text: &str, out: &mut BTreeSet<String>, depth: usize) {
    let text = text.trim();
    if text.is_empty() {
        return;
    }
    if let Ok(parsed) = serde_json::from_str::<Value>(text) {
        match parsed {
            // A JSON string is split again; anything else recurses.
            Value::String(inner) => split_text(&inner, out),
            other => coerce(Some(&other), out, depth + 1),
        }
        return;
    }
    split_text(text, out);
}

fn split_text(text: &str, out: &mut BTreeSet<String>) {
    for item in text.split(|c: char| c == ',' || c.is_whitespace()) {
        if !item.is_empty() {
            out.insert(item.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn subject_and_token_id_follow_orcheo() {
        let id = Identity::from_claims(&claims(json!({"sub": "alice", "jti": "j1"})), None);
        assert_eq!((id.subject.as_str(), id.token_id.as_str()), ("alice", "j1"));
        let id = Identity::from_claims(&claims(json!({"sub": "alice", "token_id": "t1"})), None);
        assert_eq!(id.token_id, "t1");
        let id = Identity::from_claims(&claims(json!({"sub": "alice"})), None);
        assert_eq!(id.token_id, "alice");
        let id = Identity::from_claims(&claims(json!({"jti": "only-jti"})), None);
        assert_eq!(
            (id.subject.as_str(), id.token_id.as_str()),
            ("only-jti", "only-jti")
        );
        let id = Identity::from_claims(&claims(json!({"sub": ""})), None);
        assert_eq!(
            (id.subject.as_str(), id.token_id.as_str()),
            ("user", "user")
        );
    }

    #[test]
    fn identity_type_is_the_first_recognised_claim() {
        let kind = |v: Value| Identity::from_claims(&claims(v), None).identity_type;
        assert_eq!(kind(json!({})), IdentityType::User);
        assert_eq!(kind(json!({"token_use": "Service"})), IdentityType::Service);
        assert_eq!(kind(json!({"type": "client"})), IdentityType::Service);
        assert_eq!(
            kind(json!({"typ": "JWT", "type": "user", "token_use": "access"})),
            IdentityType::User
        );
        assert_eq!(
            kind(json!({"token_use": "access", "type": "bogus", "typ": "service"})),
            IdentityType::Service
        );
        assert_eq!(
            kind(json!({"token_use": "user", "typ": "service"})),
            IdentityType::User
        );
    }

    #[test]
    fn scopes_are_the_union_of_every_form() {
        let id = Identity::from_claims(
            &claims(json!({
                "scope": "a b,c",
                "scopes": ["d", " e ", ""],
                "scp": "[\"f\", \"g\"]",
                "orcheo": {"scopes": "h"}
            })),
            None,
        );
        assert_eq!(id.scopes, set(&["a", "b", "c", "d", "e", "f", "g", "h"]));
        let id = Identity::from_claims(
            &claims(json!({"scope": "\"x y\"", "scopes": [["nested"], 7, true]})),
            None,
        );
        assert_eq!(id.scopes, set(&["x", "y", "nested", "7", "True"]));
        let id = Identity::from_claims(
            &claims(json!({"orcheo.scopes": "ignored", "orcheo": "not-an-object"})),
            None,
        );
        assert!(id.scopes.is_empty());
    }

    #[test]
    fn workspaces_are_trimmed_lowercased_and_star_means_all() {
        let id = Identity::from_claims(
            &claims(json!({
                "workspace_ids": ["WS-A", " ws-b "],
                "workspaces": "ws-c,ws-d",
                "workspace_id": "WS-E",
                "workspace": ["ws-f"],
                "orcheo": {"workspace_ids": "[\"Ws-G\"]"}
            })),
            None,
        );
        assert_eq!(
            id.workspaces.ids,
            set(&["ws-a", "ws-b", "ws-c", "ws-d", "ws-e", "ws-f", "ws-g"])
        );
        assert!(id.workspaces.allows("Ws-A") && !id.workspaces.allows("ws-z"));
        let all = Workspaces::from_ids(["*".to_string()]);
        assert!(all.allows("anything"));
        assert_eq!(all.header_value(), "*");
    }

    #[test]
    fn hostile_nesting_is_bounded() {
        let mut value = json!("deep");
        for _ in 0..100 {
            value = json!([value]);
        }
        let mut out = BTreeSet::new();
        coerce_items(Some(&value), &mut out);
        assert!(out.is_empty());
    }
}
