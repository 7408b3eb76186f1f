//! One access-log line per request (contract §10.3): request id, route, method, path
//! (credential query values redacted), status, duration, client IP, auth method, token
//! id and subject. Never a token.

use std::time::Instant;

use http::{HeaderValue, Method, Request, StatusCode};

use crate::metrics::Metrics;
use std::net::IpAddr;

/// Route label of requests that matched no route.
pub const NO_ROUTE: &str = "none";

/// What the access log and the request metrics record about one request.
pub struct AccessRecord {
    /// Request id.
    pub request_id: String,
    /// Matched route name, or [`NO_ROUTE`].
    pub route: String,
    /// Method.
    pub method: Method,
    /// Path and query, credential values redacted.
    pub target: String,
    /// The client IP.
    pub client_ip: String,
    /// The upstream, once chosen.
    pub upstream: Option<String>,
    /// `jwt`, `service_token`, `bootstrap` or `none`.
    pub auth_method: &'static str,
    /// The authenticated token id.
    pub token_id: Option<String>,
    /// The authenticated subject.
    pub subject: Option<String>,
    /// The internal cause of an error response.
    pub error: Option<String>,
}

impl AccessRecord {
    /// Starts a record for `request`.
    pub fn new<B>(request: &Request<B>, client_ip: IpAddr, request_id: &HeaderValue) -> Self {
        let uri = request.uri();
        Self::of(
            request.method(),
            uri.path(),
            uri.query(),
            client_ip,
            request_id,
        )
    }

    /// Starts a record for a request known by its parts (a gRPC check describes one).
    pub fn of(
        method: &Method,
        path: &str,
        query: Option<&str>,
        client_ip: IpAddr,
        request_id: &HeaderValue,
    ) -> Self {
        AccessRecord {
            request_id: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
            route: NO_ROUTE.to_string(),
            method: method.clone(),
            target: redact_target(path, query),
            client_ip: client_ip.to_string(),
            upstream: None,
            auth_method: "none",
            token_id: None,
            subject: None,
            error: None,
        }
    }

    /// Records the request a forward-auth check is about, in place of the check itself.
    pub fn describe(&mut self, method: &Method, path: &str, query: Option<&str>) {
        self.method = method.clone();
        self.target = redact_target(path, query);
    }

    /// Records who the caller is.
    pub fn identify(&mut self, identity: &crate::auth::identity::Identity) {
        self.auth_method = identity.method.as_str();
        if !identity.is_anonymous() {
            self.token_id = Some(identity.token_id.clone());
            self.subject = Some(identity.subject.clone());
        }
    }

    /// Records metrics and writes the log line.
    pub fn finish(self, metrics: &Metrics, status: StatusCode, started: Instant) {
        let elapsed = started.elapsed();
        metrics.observe_request(
            &self.route,
            &self.method,
            status.as_u16(),
            elapsed.as_secs_f64(),
        );
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            route = %self.route,
            method = %self.method,
            path = %self.target,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            client_ip = %self.client_ip,
            upstream = self.upstream.as_deref().unwrap_or(""),
            auth_method = self.auth_method,
            token_id = self.token_id.as_deref().unwrap_or(""),
            subject = self.subject.as_deref().unwrap_or(""),
            error = self.error.as_deref().unwrap_or(""),
            "request"
        );
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
