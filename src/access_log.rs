//! One access-log line per request (contract §10.3): request id, route, method, path
//! (credential query values redacted), status, duration, client IP, auth method, token
//! id and subject. Never a token. The record holds what it needs cheaply (shared names,
//! the request's URI and identity) and formats only when the line is written.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, StatusCode, Uri};

use crate::auth::identity::Identity;
use crate::metrics::Metrics;

/// Route label of requests that matched no route.
pub const NO_ROUTE: &str = "none";

/// A route's name as metrics and logs show it: a fixed label, or a route's own name.
#[derive(Debug, Clone)]
pub enum RouteLabel {
    /// `none`, `admin-api`, `forward-auth`, `ext-authz`.
    Fixed(&'static str),
    /// A configured route.
    Named(Arc<str>),
}

impl RouteLabel {
    /// The label.
    pub fn as_str(&self) -> &str {
        match self {
            RouteLabel::Fixed(name) => name,
            RouteLabel::Named(name) => name,
        }
    }
}

/// Which request a line is about.
enum Target {
    /// The request as it arrived.
    Uri(Uri),
    /// The request a check describes (forward-auth).
    Described(String, Option<String>),
    /// Not kept: the access log was off when the request arrived (a reload that turns it
    /// on shows the requests then in flight with `-` for a path).
    Unlogged,
}

/// What the access log and the request metrics record about one request.
pub struct AccessRecord {
    request_id: HeaderValue,
    /// Matched route, or [`NO_ROUTE`].
    pub route: RouteLabel,
    method: Method,
    target: Target,
    client_ip: IpAddr,
    /// The upstream, once chosen.
    pub upstream: Option<Arc<str>>,
    identity: Option<Arc<Identity>>,
    /// The internal cause of an error response.
    pub error: Option<String>,
}

impl AccessRecord {
    /// Starts a record for `request`.
    pub fn new<B>(request: &Request<B>, client_ip: IpAddr, request_id: &HeaderValue) -> Self {
        let target = match logging_requests() {
            true => Target::Uri(request.uri().clone()),
            false => Target::Unlogged,
        };
        Self::start(request.method(), target, client_ip, request_id)
    }

    /// Starts a record for a request known by its parts (a gRPC check describes one).
    pub fn of(
        method: &Method,
        path: &str,
        query: Option<&str>,
        client_ip: IpAddr,
        request_id: &HeaderValue,
    ) -> Self {
        let target = Target::Described(path.to_string(), query.map(str::to_string));
        Self::start(method, target, client_ip, request_id)
    }

    fn start(method: &Method, target: Target, client_ip: IpAddr, request_id: &HeaderValue) -> Self {
        AccessRecord {
            request_id: request_id.clone(),
            route: RouteLabel::Fixed(NO_ROUTE),
            method: method.clone(),
            target,
            client_ip,
            upstream: None,
            identity: None,
            error: None,
        }
    }

    /// Records the request a forward-auth check is about, in place of the check itself.
    pub fn describe(&mut self, method: &Method, path: &str, query: Option<&str>) {
        self.method = method.clone();
        self.target = Target::Described(path.to_string(), query.map(str::to_string));
    }

    /// Records who the caller is.
    pub fn identify(&mut self, identity: &Arc<Identity>) {
        self.identity = Some(identity.clone());
    }

    /// Records metrics and writes the log line.
    pub fn finish(self, metrics: &Metrics, status: StatusCode, started: Instant) {
        let elapsed = started.elapsed();
        metrics.observe_request(
            self.route.as_str(),
            &self.method,
            status.as_u16(),
            elapsed.as_secs_f64(),
        );
        if !logging_requests() {
            return;
        }
        let identity = self.identity.as_deref();
        let known = identity.filter(|i| !i.is_anonymous());
        tracing::info!(
            target: "access",
            request_id = %String::from_utf8_lossy(self.request_id.as_bytes()),
            route = self.route.as_str(),
            method = %self.method,
            path = %self.target,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            client_ip = %self.client_ip,
            upstream = self.upstream.as_deref().unwrap_or(""),
            auth_method = identity.map_or("none", |i| i.method.as_str()),
            token_id = known.map_or("", |i| i.token_id.as_str()),
            subject = known.map_or("", |i| i.subject.as_str()),
            error = self.error.as_deref().unwrap_or(""),
            "request"
        );
    }
}

/// Whether access lines are written (the `access` target at `info`).
fn logging_requests() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// The path and query, credential values redacted.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, query) = match self {
            Target::Uri(uri) => (uri.path(), uri.query()),
            Target::Described(path, query) => (path.as_str(), query.as_deref()),
            Target::Unlogged => return f.write_str("-"),
        };
        f.write_str(&redact_target(path, query))
    }
}

/// The path and query with the values of credential parameters replaced by `REDACTED`.
pub fn redact_target(path: &str, query: Option<&str>) -> String {
    match query {
        Some(query) => format!("{path}?{}", crate::query::redacted(query)),
        None => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_target;

    #[test]
    fn credential_query_values_are_redacted() {
        assert_eq!(redact_target("/a", None), "/a");
        assert_eq!(
            redact_target("/ws", Some("x=1&token=secret&ACCESS_TOKEN=s2&y")),
            "/ws?x=1&token=REDACTED&ACCESS_TOKEN=REDACTED&y"
        );
    }
}
