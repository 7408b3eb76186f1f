//! The forward-auth endpoint (contract §9): an ingress that keeps the data path asks
//! whether a request may pass, describing it in one of three conventions — nginx
//! `auth_request` (`X-Original-Method`/`X-Original-URI`), Traefik and Caddy
//! (`X-Forwarded-Method`/`X-Forwarded-Uri`), or Envoy's HTTP `ext_authz` (the original path
//! after the endpoint's own). The answer comes from the same decision as the proxy path;
//! allowed is 200 with the identity headers for the ingress to copy upstream.

use http::header::{HeaderMap, HeaderName, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access_log::{AccessRecord, RouteLabel};
use crate::body::{self, Body};
use crate::client_ip;
use crate::config;
use crate::decision::{decide, identify, limit_client, Original, RequestContext};
use crate::error::GatewayError;
use crate::proxy::headers::X_REQUEST_ID;
use crate::routing::NormalizedPath;

pub mod replay;

const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
/// ingress-nginx sends the whole URL (`https://host/path?query`) here.
const X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");
const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

/// The `protocol` label of this endpoint's decisions.
pub const PROTOCOL: &str = "http";

/// Whether `path` is the endpoint (or, for Envoy, under it).
pub fn is_endpoint(path: &str, settings: &config::ForwardAuth) -> bool {
    settings.enabled
        && path
            .strip_prefix(settings.path.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The request an ingress asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Its method.
    pub method: Method,
    /// Its raw path.
    pub path: String,
    /// Its raw query.
    pub query: Option<String>,
}

/// What the check request says the original request was, in the contract's order of
/// conventions. `path` and `query` are the check request's own.
pub fn asked(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    settings: &config::ForwardAuth,
) -> Result<Asked, GatewayError> {
    let conventions = [
        (X_ORIGINAL_METHOD, X_ORIGINAL_URI),
        (X_ORIGINAL_METHOD, X_ORIGINAL_URL),
        (X_FORWARDED_METHOD, X_FORWARDED_URI),
    ];
    for (method_header, uri_header) in conventions {
        let Some(uri) = single(headers, &uri_header)? else {
            continue;
        };
        let method = match single(headers, &method_header)? {
            Some(text) => Method::from_bytes(text.as_bytes())
                .map_err(|_| invalid("The original method is not a method"))?,
            None => method.clone(),
        };
        let (path, query) = split_target(uri)?;
        return Ok(Asked {
            method,
            path,
            query,
        });
    }
    // Envoy's `path_prefix`: the original path follows the endpoint's own.
    let rest = &path[settings.path.len().min(path.len())..];
    if rest.starts_with('/') {
        return Ok(Asked {
            method: method.clone(),
            path: rest.to_string(),
            query: query.map(str::to_string),
        });
    }
    Err(invalid(
        "Forward-auth request names no original request (X-Original-URI, X-Forwarded-Uri or a path after the endpoint)",
    ))
}

/// The one value of `name`, if present; a repeated one is refused, since the gateway
/// would decide on one while the ingress forwards another.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, GatewayError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid("The original request is described more than once"));
    }
    let text = first
        .to_str()
        .map_err(|_| invalid("The original request is not readable"))?;
    Ok(Some(text.trim()).filter(|t| !t.is_empty()))
}

/// `/path?query` — or a whole URL, of which the path and query count.
fn split_target(uri: &str) -> Result<(String, Option<String>), GatewayError> {
    let target = if uri.starts_with('/') {
        uri
    } else {
        let after_scheme = uri
            .split_once("://")
            .map(|(_, rest)| rest)
            .ok_or_else(|| invalid("The original URI must start with / or be a URL"))?;
        after_scheme
            .find('/')
            .map_or("/", |start| &after_scheme[start..])
    };
    let target = target.split('#').next().unwrap_or(target);
    Ok(match target.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (target.to_string(), None),
    })
}

fn invalid(message: &str) -> GatewayError {
    GatewayError::InvalidRequest(message.into())
}

/// Answers one check request, and counts its outcome.
pub async fn answer(
    ctx: &RequestContext<'_>,
    request: Request<Incoming>,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    record.route = RouteLabel::Fixed("forward-auth");
    // The ingress's own request id: the same on every question about one request.
    let request_id = request
        .headers()
        .get(X_REQUEST_ID)
        .map(|_| ctx.request_id.clone());
    let request_id = request_id.as_ref().and_then(|id| id.to_str().ok());
    let (caller, client) = (ctx.conn.peer.ip(), ctx.client_ip);
    let replays = &ctx.shared.forward_auth_replays;
    if let Some(error) = request_id.and_then(|id| replays.take(caller, client, id)) {
        return Err(error);
    }
    let result = decide_for(ctx, &request, record).await;
    if let (Err(error), Some(id)) = (&result, request_id) {
        replays.remember(caller, client, id, error);
    }
    count(ctx, PROTOCOL, &result);
    result
}

/// Counts one forward-auth decision (`forward_auth_decisions_total`).
pub fn count<T>(ctx: &RequestContext<'_>, protocol: &str, result: &Result<T, GatewayError>) {
    let (outcome, code) = match result {
        Ok(_) => ("allow", "ok"),
        Err(error) => ("deny", error.code()),
    };
    ctx.shared
        .metrics
        .forward_auth_decisions
        .with_label_values(&[protocol, outcome, code])
        .inc();
}

/// Admits the ingress asking: a trusted proxy, and its client not blocked (§6.1).
pub async fn admit_caller(ctx: &RequestContext<'_>) -> Result<(), GatewayError> {
    let proxies = &ctx.snapshot.config.trusted_proxies;
    if !client_ip::is_trusted(proxies, ctx.conn.peer.ip()) {
        return Err(GatewayError::UntrustedCaller);
    }
    limit_client(ctx).await
}

/// The decision on the request an ingress asks about, in any convention (HTTP or gRPC):
/// decided exactly as if proxied; allowed, the identity headers (and assertion) for the
/// ingress to pass upstream.
pub async fn decide_asked(
    ctx: &RequestContext<'_>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    record: &mut AccessRecord,
) -> Result<HeaderMap, GatewayError> {
    let path = NormalizedPath::parse(path)?;
    let original = Original {
        method,
        path: &path,
        headers,
        query,
        websocket: asks_for_websocket(headers),
    };
    let (matched, caller) = decide(ctx, &original, record).await?;
    let upstream = matched.route.target.label();
    record.upstream = Some(upstream.clone());
    let mut identity = HeaderMap::new();
    identify(ctx, &mut identity, &caller, &upstream)?;
    Ok(identity)
}

async fn decide_for(
    ctx: &RequestContext<'_>,
    request: &Request<Incoming>,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    admit_caller(ctx).await?;
    let settings = &ctx.snapshot.config.forward_auth;
    let uri = request.uri();
    let asked = asked(
        request.method(),
        uri.path(),
        uri.query(),
        request.headers(),
        settings,
    )?;
    record.describe(&asked.method, &asked.path, asked.query.as_deref());
    let query = asked.query.as_deref();
    let headers = request.headers();
    let identity = decide_asked(ctx, &asked.method, &asked.path, query, headers, record).await?;
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    *response.headers_mut() = identity;
    Ok(response)
}

/// Whether the check is about a WebSocket upgrade: the ingress passes `Upgrade` along.
fn asks_for_websocket(headers: &HeaderMap) -> bool {
    headers.get_all(UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;

    fn settings() -> config::ForwardAuth {
        config::ForwardAuth::default()
    }

    fn ask(
        method: &str,
        path: &str,
        query: Option<&str>,
        pairs: &[(&str, &str)],
    ) -> Result<Asked, GatewayError> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        asked(&method, path, query, &headers(pairs), &settings())
    }

    fn want(method: &str, path: &str, query: Option<&str>) -> Asked {
        Asked {
            method: Method::from_bytes(method.as_bytes()).unwrap(),
            path: path.into(),
            query: query.map(str::to_string),
        }
    }

    #[test]
    fn the_endpoint_and_what_lies_under_it() {
        let s = settings();
        assert!(is_endpoint("/_orcheo/auth", &s));
        assert!(is_endpoint("/_orcheo/auth/api/x", &s));
        assert!(!is_endpoint("/_orcheo/authx", &s));
        assert!(!is_endpoint("/api", &s));
        let off = config::ForwardAuth {
            enabled: false,
            ..s
        };
        assert!(!is_endpoint("/_orcheo/auth", &off));
    }

    #[test]
    fn each_convention_names_the_original_request() {
        let nginx = [
            ("x-original-method", "POST"),
            ("x-original-uri", "/api/x?a=1"),
        ];
        assert_eq!(
            ask("GET", "/_orcheo/auth", None, &nginx).unwrap(),
            want("POST", "/api/x", Some("a=1"))
        );
        let ingress = [
            ("x-original-method", "PUT"),
            ("x-original-url", "https://h.example/api/y?b=2"),
        ];
        assert_eq!(
            ask("GET", "/_orcheo/auth", None, &ingress).unwrap(),
            want("PUT", "/api/y", Some("b=2"))
        );
        let traefik = [
            ("x-forwarded-method", "DELETE"),
            ("x-forwarded-uri", "/api/z"),
        ];
        assert_eq!(
            ask("GET", "/_orcheo/auth", None, &traefik).unwrap(),
            want("DELETE", "/api/z", None)
        );
        // Without a method header, the check request's own method stands in.
        let uri_only = [("x-forwarded-uri", "/api/z")];
        assert_eq!(
            ask("HEAD", "/_orcheo/auth", None, &uri_only).unwrap(),
            want("HEAD", "/api/z", None)
        );
        // Envoy: the original path after the endpoint, the check's own method and query.
        assert_eq!(
            ask("PATCH", "/_orcheo/auth/api/w", Some("y=1"), &[]).unwrap(),
            want("PATCH", "/api/w", Some("y=1"))
        );
        // nginx's headers win over the others.
        let both = [("x-original-uri", "/first"), ("x-forwarded-uri", "/second")];
        assert_eq!(
            ask("GET", "/_orcheo/auth", None, &both).unwrap().path,
            "/first"
        );
    }

    #[test]
    fn a_missing_or_doubled_description_is_refused() {
        assert!(ask("GET", "/_orcheo/auth", None, &[]).is_err());
        let doubled = [("x-original-uri", "/a"), ("x-original-uri", "/b")];
        assert!(ask("GET", "/_orcheo/auth", None, &doubled).is_err());
        assert!(ask(
            "GET",
            "/_orcheo/auth",
            None,
            &[("x-original-uri", "relative")]
        )
        .is_err());
        let bad_method = [("x-original-method", "GE T"), ("x-original-uri", "/a")];
        assert!(ask("GET", "/_orcheo/auth", None, &bad_method).is_err());
    }
}
