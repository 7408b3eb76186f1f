//! Where the credential comes from (contract §3.2). Plain HTTP: the `Authorization` header
//! only. WebSocket upgrades: the header, then a `bearer.<token>` subprotocol entry, then
//! the `token` and `access_token` query parameters. A present `Authorization` header
//! decides alone.

use http::header::{HeaderMap, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};

/// Tokens longer than this are refused before any parsing (16 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer …`.
    Header,
    /// A `Sec-WebSocket-Protocol` entry `bearer.<token>`.
    Subprotocol,
    /// The `token` query parameter.
    QueryToken,
    /// The `access_token` query parameter.
    QueryAccessToken,
}

/// What the request presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Nothing.
    None,
    /// An `Authorization` header that is not exactly one Bearer token.
    BadScheme,
    /// A bearer token.
    Bearer {
        /// The token.
        token: String,
        /// Where it was found.
        source: Source,
    },
}

/// The credential of a plain HTTP request.
pub fn from_http(headers: &HeaderMap) -> Credential {
    authorization(headers).unwrap_or(Credential::None)
}

/// The credential of a WebSocket upgrade request; `query` is the raw query string.
pub fn from_websocket(headers: &HeaderMap, query: Option<&str>) -> Credential {
    if let Some(credential) = authorization(headers) {
        return credential;
    }
    if let Some(token) = subprotocol_token(headers) {
        return Credential::Bearer {
            token,
            source: Source::Subprotocol,
        };
    }
    for (name, source) in [
        ("token", Source::QueryToken),
        ("access_token", Source::QueryAccessToken),
    ] {
        if let Some(token) = crate::query::credential(query, name).filter(|t| !t.is_empty()) {
            return Credential::Bearer { token, source };
        }
    }
    Credential::None
}

/// The `Authorization` header's credential, if the header is present at all: exactly one
/// header, the scheme `Bearer` (any case), whitespace, one token of visible ASCII.
fn authorization(headers: &HeaderMap) -> Option<Credential> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return Some(Credential::BadScheme);
    }
    Some(
        bearer_token(first.as_bytes()).map_or(Credential::BadScheme, |token| Credential::Bearer {
            token: token.to_string(),
            source: Source::Header,
        }),
    )
}

/// The token of a `Bearer <token>` header value. Read as bytes, in two passes that compile
/// to vector loops: a token is hundreds of bytes, and this runs on every request.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = value.trim_ascii();
    let gap = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    let (scheme, rest) = value.split_at(gap);
    let token = rest.trim_ascii_start();
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.is_empty() || !all_visible(token) {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// Whether every byte is visible ASCII (no space, control or non-ASCII byte). A fold
/// without an early exit, so the loop is vectorised.
fn all_visible(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(true, |visible, &b| visible & (b.wrapping_sub(0x21) < 0x5e))
}

/// The token of a `bearer.<token>` entry in `Sec-WebSocket-Protocol`.
pub fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|entry| entry.strip_prefix("bearer.").filter(|t| !t.is_empty()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;

    fn bearer(token: &str, source: Source) -> Credential {
        Credential::Bearer {
            token: token.into(),
            source,
        }
    }

    #[test]
    fn http_reads_only_one_bearer_header() {
        assert_eq!(from_http(&headers(&[])), Credential::None);
        assert_eq!(
            from_http(&headers(&[("authorization", "Bearer abc")])),
            bearer("abc", Source::Header)
        );
        assert_eq!(
            from_http(&headers(&[("authorization", "bEaReR   abc ")])),
            bearer("abc", Source::Header)
        );
        for bad in [
            "Basic dXNlcjpwdw==",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "abc",
            "Token abc",
        ] {
            assert_eq!(
                from_http(&headers(&[("authorization", bad)])),
                Credential::BadScheme,
                "{bad}"
            );
        }
        for (value, token) in [
            ("Bearer\tabc", Some("abc")),
            ("\t bearer abc.def-_~+/=", Some("abc.def-_~+/=")),
            ("Bearer abc\t", Some("abc")),
            ("Bearer a\tb", None),
            ("Bearerabc", None),
            ("Bearer\u{7f}abc", None),
        ] {
            assert_eq!(bearer_token(value.as_bytes()), token, "{value:?}");
        }
        // Bytes a header may carry but a token may not (obs-text).
        assert_eq!(bearer_token(b"Bearer ab\xc3\xa9"), None);
        assert_eq!(bearer_token(b"Bearer \x80"), None);
        let two = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(from_http(&two), Credential::BadScheme);
    }

    #[test]
    fn websocket_sources_in_order() {
        let query = Some("access_token=q2&token=q1");
        let all = headers(&[
            ("authorization", "Bearer h"),
            ("sec-websocket-protocol", "orcheo-auth, bearer.s"),
        ]);
        assert_eq!(from_websocket(&all, query), bearer("h", Source::Header));
        let sub = headers(&[("sec-websocket-protocol", "orcheo-auth, bearer.s")]);
        assert_eq!(
            from_websocket(&sub, query),
            bearer("s", Source::Subprotocol)
        );
        assert_eq!(
            from_websocket(&headers(&[]), query),
            bearer("q1", Source::QueryToken)
        );
        assert_eq!(
            from_websocket(&headers(&[]), Some("access_token=a%2Eb")),
            bearer("a.b", Source::QueryAccessToken)
        );
        let bad = headers(&[
            ("authorization", "Basic x"),
            ("sec-websocket-protocol", "bearer.s"),
        ]);
        assert_eq!(
            from_websocket(&bad, query),
            Credential::BadScheme,
            "a present header decides alone"
        );
        assert_eq!(
            from_websocket(&headers(&[]), Some("token=")),
            Credential::None
        );
    }
}
