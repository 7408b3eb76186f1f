//! Header rewriting between client and upstream (contract §5): hop-by-hop removal,
//! identity-header stripping, `X-Forwarded-*` and `X-Request-Id`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::identity::Identity;
use crate::config;
use crate::error::GatewayError;

/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that tell an upstream what the request "really" was (its client, URL, method,
/// prefix): believed only from trusted proxies, removed from everyone else's requests so a
/// client cannot rewrite what the upstream thinks it asked for. (`X-Forwarded-For/-Proto/
/// -Host` are not here: the gateway sets those itself.)
fn is_forwarded_by_proxies(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-real-ip"
            | "x-original-url"
            | "x-rewrite-url"
            | "x-original-uri"
            | "x-original-method"
            | "x-forwarded-prefix"
            | "x-forwarded-port"
            | "x-forwarded-uri"
            | "x-forwarded-method"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
    )
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still meet), and
/// `Upgrade`: an upgrade is relayed only by the WebSocket path. Names compared as text (a
/// `HeaderName` is always lower case): one length switch, no hashing.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers the gateway sets itself; an identity header may not take one of these names.
pub fn is_reserved(name: &HeaderName) -> bool {
    is_hop_by_hop(name.as_str())
        || *name == header::HOST
        || *name == header::AUTHORIZATION
        || *name == header::CONTENT_LENGTH
        || *name == header::CONTENT_TYPE
        || *name == X_REQUEST_ID
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
        || *name == header::FORWARDED
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
/// `Upgrade` goes too: an upgrade is relayed only by the WebSocket path.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, |_| false);
}

/// What a request loses before it is forwarded (contract §5), in one pass over the names
/// it carries: hop-by-hop headers (and those its `Connection` names), the inbound
/// identity headers, and, from a peer that is not a trusted proxy, the headers only
/// proxies may set.
pub fn strip_inbound(headers: &mut HeaderMap, identity: &IdentityHeaderNames, peer_trusted: bool) {
    strip(headers, |name| {
        identity.names(name) || (!peer_trusted && is_forwarded_by_proxies(name.as_str()))
    });
}

/// Removes the hop-by-hop headers and every header `also` matches. One pass over the names
/// present (a request has a handful) instead of one hash lookup per name that might be;
/// most messages carry none of those names but `Connection` with its usual tokens, and
/// then nothing is allocated.
fn strip(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let mut connection = false;
    let mut others = false;
    for name in headers.keys() {
        if *name == header::CONNECTION {
            connection = true;
        } else if is_hop_by_hop(name.as_str()) || also(name) {
            others = true;
        }
    }
    if connection {
        // `close`, `keep-alive`, `upgrade`: the usual tokens name nothing else to remove
        // (and are not turned into header names, which would cost an allocation each).
        // A `Connection` that is one usual token, as nearly every one is, is not split.
        let values = headers.get_all(header::CONNECTION);
        if !values
            .iter()
            .all(|value| is_usual_connection_token(value.as_bytes()))
        {
            let named: Vec<HeaderName> = values
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .map(str::trim)
                .filter(|token| !is_usual_connection_token(token.as_bytes()))
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    if others {
        let found: Vec<HeaderName> = headers
            .keys()
            .filter(|name| is_hop_by_hop(name.as_str()) || also(name))
            .cloned()
            .collect();
        for name in found {
            headers.remove(name);
        }
    }
}

/// Connection tokens that are options, or headers removed anyway.
fn is_usual_connection_token(token: &[u8]) -> bool {
    [&b"keep-alive"[..], b"close", b"upgrade", b"te", b""]
        .iter()
        .any(|usual| token.eq_ignore_ascii_case(usual))
}

/// The names of the identity headers (contract §5), one field per header.
#[derive(Debug, Clone)]
pub struct IdentityHeaderNames {
    /// The subject.
    pub subject: HeaderName,
    /// `user`, `service` or `anonymous`.
    pub identity_type: HeaderName,
    /// The token id.
    pub token_id: HeaderName,
    /// The scopes.
    pub scopes: HeaderName,
    /// The workspaces.
    pub workspaces: HeaderName,
    /// The authentication method.
    pub auth_method: HeaderName,
    /// The signed identity assertion.
    pub assertion: HeaderName,
    /// Bit `len % 64` set for the length of every name: a name whose length is not here
    /// is none of them (nor one of their `_` spellings, of the same length), decided
    /// without comparing text — most inbound names are not identity headers.
    lengths: u64,
}

impl IdentityHeaderNames {
    /// The names `identity` configures (already validated).
    pub fn from_config(identity: &config::IdentitySettings) -> Result<Self, String> {
        let name = |text: &str| {
            HeaderName::from_bytes(text.as_bytes())
                .map_err(|_| format!("`{text}` is not a valid header name"))
        };
        let headers = &identity.headers;
        let mut names = IdentityHeaderNames {
            subject: name(&headers.subject)?,
            identity_type: name(&headers.identity_type)?,
            token_id: name(&headers.token_id)?,
            scopes: name(&headers.scopes)?,
            workspaces: name(&headers.workspaces)?,
            auth_method: name(&headers.auth_method)?,
            assertion: name(&identity.assertion.header)?,
            lengths: 0,
        };
        names.lengths = names
            .all()
            .iter()
            .fold(0, |bits, name| bits | length_bit(name.as_str()));
        Ok(names)
    }

    /// Whether an inbound header is one of these (stripped from every request). A name
    /// that equals one once `_` is read as `-` (`X_Orcheo_Subject`) is too: WSGI and CGI
    /// upstreams merge the two spellings into one variable.
    pub fn names(&self, name: &HeaderName) -> bool {
        if self.lengths & length_bit(name.as_str()) == 0 {
            return false;
        }
        let all = self.all();
        all.contains(&name)
            || (name.as_str().contains('_') && {
                let dashed = name.as_str().replace('_', "-");
                all.iter().any(|n| n.as_str() == dashed)
            })
    }

    /// Every name: what is stripped from inbound requests.
    pub fn all(&self) -> [&HeaderName; 7] {
        [
            &self.subject,
            &self.identity_type,
            &self.token_id,
            &self.scopes,
            &self.workspaces,
            &self.auth_method,
            &self.assertion,
        ]
    }
}

fn length_bit(name: &str) -> u64 {
    1 << (name.len() % 64)
}

/// Sets the identity headers (all but the assertion). An anonymous identity gets only the
/// type and the method. A value that cannot be a header value fails the request: an
/// upstream must never see a request whose identity silently lost a header.
pub fn set_identity(
    headers: &mut HeaderMap,
    names: &IdentityHeaderNames,
    identity: &Identity,
) -> Result<(), GatewayError> {
    let values = identity.header_values().map_err(|field| {
        GatewayError::Internal(format!("the identity's {field} cannot be a header value"))
    })?;
    headers.insert(names.identity_type.clone(), values.identity_type.clone());
    headers.insert(names.auth_method.clone(), values.auth_method.clone());
    if identity.is_anonymous() {
        return Ok(());
    }
    headers.insert(names.subject.clone(), values.subject.clone());
    headers.insert(names.token_id.clone(), values.token_id.clone());
    headers.insert(names.scopes.clone(), values.scopes.clone());
    headers.insert(names.workspaces.clone(), values.workspaces.clone());
    Ok(())
}

/// What the forwarding headers are built from.
pub struct Forwarding<'a> {
    /// The address the request came from: with the PROXY protocol, the address its header
    /// carries.
    pub peer: IpAddr,
    /// `peer` as a header value.
    pub peer_header: &'a HeaderValue,
    /// Whether `peer` is a trusted proxy, whose forwarding headers are kept and extended.
    pub peer_trusted: bool,
    /// `http` or `https`: how the client reached the gateway.
    pub scheme: &'static str,
    /// The original `Host` (or HTTP/2 `:authority`).
    pub host: Option<&'a HeaderValue>,
    /// The request id.
    pub request_id: &'a HeaderValue,
}

/// Sets `X-Forwarded-For/-Proto/-Host` and `X-Request-Id`. From an untrusted peer, the
/// client's own forwarding headers are replaced, never extended (and the other headers
/// only proxies may set are gone already: [`strip_inbound`]).
pub fn set_forwarding(headers: &mut HeaderMap, fwd: &Forwarding<'_>) {
    let previous = match fwd.peer_trusted {
        true => joined(headers, &X_FORWARDED_FOR),
        false => None,
    };
    match previous {
        Some(previous) => {
            if let Ok(value) = HeaderValue::from_str(&format!("{previous}, {}", fwd.peer)) {
                headers.insert(X_FORWARDED_FOR, value);
            }
        }
        None => {
            headers.insert(X_FORWARDED_FOR, fwd.peer_header.clone());
        }
    }
    let keep = |headers: &HeaderMap, name: &HeaderName| {
        fwd.peer_trusted && headers.get(name).is_some_and(|v| !v.is_empty())
    };
    if !keep(headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(fwd.scheme));
    }
    if !keep(headers, &X_FORWARDED_HOST) {
        match fwd.host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host.clone()),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
    headers.insert(X_REQUEST_ID, fwd.request_id.clone());
}

/// All values of a header joined with `, ` (a header may legally be repeated).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The request id: the client's `X-Request-Id` when it is short printable ASCII,
/// otherwise a new UUID.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut text = [0u8; uuid::fmt::Simple::LENGTH];
            uuid::Uuid::new_v4().simple().encode_lower(&mut text);
            // Owned by the value: one allocation, and its clones (access record,
            // upstream request, response) share it by reference count.
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

/// Size of a request head as it arrived: request line, header lines and the blank line.
pub fn head_size(method: &str, target: &str, headers: &HeaderMap) -> usize {
    let line = method.len() + target.len() + " HTTP/1.1\r\n".len() + 1;
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
        + 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers as map;

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close"),
            ("x-secret", "a"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["content-type"]);
        // The usual case: only `Connection` with a usual token.
        let mut headers = map(&[("connection", "keep-alive"), ("server", "up")]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["server"]);
        // A usual token in one value does not spare what another value names.
        let mut headers = map(&[
            ("connection", "Keep-Alive"),
            ("connection", "x-a"),
            ("x-a", "1"),
            ("server", "up"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["server"]);
    }

    #[test]
    fn a_request_id_is_the_clients_when_short_and_printable_else_a_new_one() {
        let kept = request_id(&map(&[("x-request-id", "abc-123")]));
        assert_eq!(kept, "abc-123");
        for sent in ["", "has space", &"x".repeat(129)] {
            let new = request_id(&map(&[("x-request-id", sent)]));
            assert_ne!(new, sent);
            assert_eq!(new.len(), 32);
        }
        let new = request_id(&HeaderMap::new());
        let text = new.to_str().unwrap();
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(new.clone(), new, "clones share the same text");
        assert_ne!(request_id(&HeaderMap::new()), new);
    }

    #[test]
    fn inbound_identity_and_proxy_only_headers_are_removed_from_untrusted_peers() {
        let identity =
            IdentityHeaderNames::from_config(&config::IdentitySettings::default()).unwrap();
        let sent = [
            ("x-orcheo-subject", "root"),
            ("x_orcheo_scopes", "admin"),
            ("x-real-ip", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("x-http-method-override", "DELETE"),
            ("connection", "te"),
            ("accept", "*/*"),
        ];
        let mut untrusted = map(&sent);
        strip_inbound(&mut untrusted, &identity, false);
        assert_eq!(names(&untrusted), ["accept"]);
        for name in identity.all() {
            let underscored = HeaderName::from_bytes(name.as_str().replace('-', "_").as_bytes());
            assert!(identity.names(name) && identity.names(&underscored.unwrap()));
        }
        let longer = HeaderName::from_static("x-orcheo-subjects");
        let padded = HeaderName::from_bytes(&[b'x'; 80]).unwrap();
        assert!(!identity.names(&longer) && !identity.names(&padded));
        let mut trusted = map(&sent);
        strip_inbound(&mut trusted, &identity, true);
        assert_eq!(
            names(&trusted),
            ["accept", "forwarded", "x-http-method-override", "x-real-ip"],
            "a trusted proxy's forwarding headers stay; identity headers never do"
        );
    }
}
