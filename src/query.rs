//! Query strings, read the one way the gateway reads them everywhere: as form parameters
//! (`application/x-www-form-urlencoded`), names and values percent-decoded and `+` read
//! as a space, so `%77orkspace` is `workspace` and `%74oken` is `token` wherever a name is
//! compared. Credential parameters are recognised here, for extraction, forwarding and
//! logging alike.

use std::borrow::Cow;

/// Names of the query parameters that carry a credential (contract §3.2), compared after
/// decoding and without regard to case, so no spelling slips a token past the gateway.
const CREDENTIAL_PARAMS: [&str; 2] = ["token", "access_token"];

/// One `name=value` pair of a query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    /// The pair as it arrived, still encoded.
    pub raw: &'a str,
    /// The decoded name.
    pub name: Cow<'a, str>,
    /// The decoded value (empty when the pair has no `=`).
    pub value: Cow<'a, str>,
}

/// Every non-empty pair of `query`, in order.
pub fn params(query: &str) -> impl Iterator<Item = Param<'_>> {
    query.split('&').filter(|pair| !pair.is_empty()).map(|raw| {
        let (name, value) = raw.split_once('=').unwrap_or((raw, ""));
        Param {
            raw,
            name: decode(name),
            value: decode(value),
        }
    })
}

/// The decoded values of every parameter whose decoded name is exactly `name`.
pub fn values<'a>(query: Option<&'a str>, name: &'a str) -> impl Iterator<Item = Cow<'a, str>> {
    params(query.unwrap_or(""))
        .filter(move |param| param.name == name)
        .map(|param| param.value)
}

/// The first value of parameter `name`.
pub fn first(query: Option<&str>, name: &str) -> Option<String> {
    values(query, name).next().map(Cow::into_owned)
}

/// Whether a decoded parameter name carries a credential.
pub fn is_credential(name: &str) -> bool {
    CREDENTIAL_PARAMS
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c))
}

/// The first value of the credential parameter `name` (`token` or `access_token`), in
/// any spelling.
pub fn credential(query: Option<&str>, name: &str) -> Option<String> {
    params(query?)
        .find(|param| param.name.eq_ignore_ascii_case(name))
        .map(|param| param.value.into_owned())
}

/// The query without its credential parameters, the other pairs as they arrived; `None`
/// when nothing is left.
pub fn without_credentials(query: Option<&str>) -> Option<Cow<'_, str>> {
    let query = query?;
    if !params(query).any(|param| is_credential(&param.name)) {
        return (!query.is_empty()).then_some(Cow::Borrowed(query));
    }
    let kept: Vec<&str> = params(query)
        .filter(|param| !is_credential(&param.name))
        .map(|param| param.raw)
        .collect();
    (!kept.is_empty()).then(|| Cow::Owned(kept.join("&")))
}

/// The query with the value of every credential parameter replaced by `REDACTED`, for logs.
pub fn redacted(query: &str) -> Cow<'_, str> {
    if !params(query).any(|param| is_credential(&param.name)) {
        return Cow::Borrowed(query);
    }
    let pairs: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|raw| {
            let name = raw.split_once('=').map_or(raw, |(name, _)| name);
            if is_credential(&decode(name)) {
                Cow::Owned(format!("{name}=REDACTED"))
            } else {
                Cow::Borrowed(raw)
            }
        })
        .collect();
    Cow::Owned(pairs.join("&"))
}

/// Form decoding: `%XX` escapes and `+` as a space; invalid UTF-8 is replaced, and a `%`
/// not followed by two hex digits stays as it is.
fn decode(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(text);
    }
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_form_decoded() {
        let pairs: Vec<(String, String)> = params("a=1&%77orkspace=b%20c&x+y=1+2&flag&&z=%zz")
            .map(|p| (p.name.into_owned(), p.value.into_owned()))
            .collect();
        let want = [
            ("a", "1"),
            ("workspace", "b c"),
            ("x y", "1 2"),
            ("flag", ""),
            ("z", "%zz"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, want);
        assert_eq!(
            values(Some("workspace=a&%77orkspace=b"), "workspace").collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            first(Some("status=active&status=x"), "status").as_deref(),
            Some("active")
        );
        assert_eq!(first(None, "status"), None);
    }

    #[test]
    fn credentials_are_found_removed_and_redacted_in_any_spelling() {
        for spelling in [
            "token",
            "TOKEN",
            "%74oken",
            "Access_Token",
            "access%5Ftoken",
        ] {
            let query = format!("x=1&{spelling}=secret&y=2");
            assert_eq!(
                without_credentials(Some(&query)).as_deref(),
                Some("x=1&y=2"),
                "{spelling}"
            );
            assert_eq!(
                redacted(&query),
                format!("x=1&{spelling}=REDACTED&y=2"),
                "{spelling}"
            );
        }
        assert_eq!(
            credential(Some("%74oken=a%2Eb"), "token").as_deref(),
            Some("a.b")
        );
        assert_eq!(credential(Some("x=1"), "token"), None);
        assert_eq!(without_credentials(Some("token=a")), None);
        assert_eq!(without_credentials(Some("a=1&b")).as_deref(), Some("a=1&b"));
        assert_eq!(without_credentials(None), None);
        assert_eq!(redacted("tokens=1&my_token=2"), "tokens=1&my_token=2");
    }
}
