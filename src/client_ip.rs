//! The client's address (contract §6.4): the TCP peer (or the PROXY header's source, when
//! that peer is trusted), unless that address is a trusted proxy — then the rightmost
//! untrusted address of `X-Forwarded-For`, or of RFC 7239 `Forwarded` when there is no
//! `X-Forwarded-For`, or `X-Real-IP` (nginx's usual header) when there is neither. An untrusted client can never choose its own address.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue, FORWARDED};

use crate::config::Cidr;
use crate::proxy::headers::X_FORWARDED_FOR;

/// `X-Real-IP`.
const X_REAL_IP: http::header::HeaderName = http::header::HeaderName::from_static("x-real-ip");

/// Hops of a forwarding header examined at most: a header with more is a forgery or a
/// loop, and the walk stops at the limit.
const MAX_HOPS: usize = 32;

/// Whether `ip` is one of the `trusted_proxies`: the one check of whether a peer's
/// forwarding headers (and PROXY header) are believed.
pub fn is_trusted(proxies: &[Cidr], ip: IpAddr) -> bool {
    proxies.iter().any(|net| net.contains(ip))
}

/// The client address of a request that arrived from `peer`.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, proxies: &[Cidr]) -> IpAddr {
    if !is_trusted(proxies, peer) {
        return peer;
    }
    let hops = forwarded_for(headers, &X_FORWARDED_FOR, parse_xff_entry)
        .or_else(|| forwarded_for(headers, &FORWARDED, parse_forwarded_element))
        .or_else(|| forwarded_for(headers, &X_REAL_IP, parse_host))
        .unwrap_or_default();
    let mut client = peer;
    // Walk from the nearest hop outwards; the first address not ours is the client.
    for hop in hops.iter().rev().take(MAX_HOPS) {
        match hop {
            Some(ip) if is_trusted(proxies, *ip) => client = *ip,
            Some(ip) => return *ip,
            // An unreadable entry (`unknown`, an obfuscated name, garbage) ends the walk:
            // nothing beyond it can be believed.
            None => return client,
        }
    }
    client
}

/// Every hop listed in all values of `name`, in order, or `None` without the header.
fn forwarded_for(
    headers: &HeaderMap,
    name: &http::header::HeaderName,
    parse: fn(&str) -> Option<IpAddr>,
) -> Option<Vec<Option<IpAddr>>> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let hops = values
        .flat_map(|value| {
            value
                .to_str()
                .unwrap_or("")
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|entry| parse(entry.trim()))
        .collect();
    Some(hops)
}

fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    parse_host(entry)
}

/// `for=` of one `Forwarded` element: `for=192.0.2.1`, `for="[2001:db8::1]:4711"`.
fn parse_forwarded_element(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_host(value.trim().trim_matches('"')))?
    })
}

/// An address, possibly with a port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_host(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest
            .split(']')
            .next()?
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6);
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

/// A client address as text, as its rate-limit key and as a header value: built once per
/// connection for its peer, and shared by every request that resolves to it.
#[derive(Debug, Clone)]
pub struct ClientText {
    /// The address as text, for messages and logs.
    pub text: Arc<str>,
    /// The key rate limiters use (see [`limit_key`]).
    pub key: Arc<str>,
    /// The address as a header value (`X-Forwarded-For`).
    pub header: HeaderValue,
}

impl ClientText {
    /// The forms of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        let text: Arc<str> = ip.to_string().into();
        let key: Arc<str> = match ip {
            IpAddr::V4(_) => text.clone(),
            IpAddr::V6(_) => limit_key(ip).into(),
        };
        let header = HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("unknown"));
        ClientText { text, key, header }
    }
}

/// The key a rate limiter uses for `ip`: the address itself for IPv4 (IPv4-mapped IPv6
/// included), the /64 for IPv6, since one subscriber usually holds a whole /64.
pub fn limit_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let network = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{network}/64")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;

    fn proxies(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(
            resolve(ip("203.0.113.9"), &h, &proxies(&["10.0.0.0/8"])),
            ip("203.0.113.9")
        );
        assert_eq!(resolve(ip("203.0.113.9"), &h, &[]), ip("203.0.113.9"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_behind_trusted_proxies() {
        let trusted = proxies(&["10.0.0.0/8", "192.0.2.1"]);
        // The client forged "6.6.6.6"; the LB appended the real address it saw.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.3")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(resolve(ip("192.0.2.1"), &h, &trusted), ip("198.51.100.7"));
        // Everything trusted: the leftmost hop.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("10.1.1.1"));
        // No header: the trusted peer itself.
        assert_eq!(
            resolve(ip("10.0.0.2"), &headers(&[]), &trusted),
            ip("10.0.0.2")
        );
        // Garbage ends the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, not-an-ip, 10.0.0.3")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.3"));
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:443, 198.51.100.8:1234")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.8"));
    }

    #[test]
    fn rfc7239_forwarded_when_there_is_no_xff() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6, for="[2001:db8::1]:4711";proto=https, for=10.0.0.9"#,
        )]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("2001:db8::1"));
        let h = headers(&[("forwarded", "for=unknown, for=10.0.0.9")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn x_real_ip_from_a_trusted_proxy_when_nothing_else_is_sent() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let h = headers(&[("x-real-ip", "198.51.100.7")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
        assert_eq!(resolve(ip("203.0.113.9"), &h, &trusted), ip("203.0.113.9"));
        let both = headers(&[
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.8"),
        ]);
        assert_eq!(resolve(ip("10.0.0.2"), &both, &trusted), ip("198.51.100.8"));
    }

    #[test]
    fn ipv6_is_keyed_by_slash_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), "2001:db8:1:2::/64");
        assert_eq!(
            limit_key(ip("2001:db8:1:2:bbbb::9")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:3::1")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(limit_key(ip("::ffff:192.0.2.5")), "192.0.2.5");
        assert_eq!(limit_key(ip("192.0.2.5")), "192.0.2.5");
    }
}
