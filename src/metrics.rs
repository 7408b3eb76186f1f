//! Prometheus metrics (contract §10.3), owned by one struct with its own Registry — never
//! the process-global default one, so several gateways can live in one test process.
//! Labels are bounded: route names, upstream names, fixed method names and status codes.

use http::Method;
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const PREFIX: &str = "orcheo_gateway";

/// Latency buckets in seconds: from sub-millisecond proxying to minute-long upstream calls.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// Every metric the gateway exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `requests_total{route,method,status}`.
    pub requests: IntCounterVec,
    /// `request_duration_seconds{route}`.
    pub request_duration: HistogramVec,
    /// `upstream_duration_seconds{upstream}`.
    pub upstream_duration: HistogramVec,
    /// `config_reloads_total{result}`.
    pub config_reloads: IntCounterVec,
    /// `tls_cert_not_after_timestamp_seconds`.
    pub tls_not_after: Gauge,
    /// `open_connections`: client connections currently open.
    pub open_connections: IntGauge,
    /// `auth_attempts_total{method,result,code}`.
    pub auth_attempts: IntCounterVec,
    /// `auth_attempts_total{method,result="success",code="ok"}` for each method, resolved
    /// once: every authenticated request counts one.
    pub auth_successes: AuthSuccesses,
    /// `auth_enforced`: 1 when authentication is enforced.
    pub auth_enforced: IntGauge,
    /// `jwks_refresh_total{result}`.
    pub jwks_refresh: IntCounterVec,
    /// `jwks_keys`: keys in the remote JWKS.
    pub jwks_keys: IntGauge,
    /// `jwks_last_success_timestamp_seconds`.
    pub jwks_last_success: Gauge,
    /// `rate_limited_total{kind}`.
    pub rate_limited: IntCounterVec,
    /// `ratelimit_redis_errors_total`: Redis calls that failed or timed out.
    pub ratelimit_redis_errors: prometheus::IntCounter,
    /// `websocket_connections`: relayed WebSocket connections open now.
    pub websocket_connections: IntGauge,
    /// `websocket_messages_total{direction}`.
    pub websocket_messages: IntCounterVec,
    /// `websocket_closed_total{reason}`.
    pub websocket_closed: IntCounterVec,
    /// `token_store_errors_total`: service-token store calls that failed.
    pub token_store_errors: prometheus::IntCounter,
    /// `jwt_signature_checks_total`: JWT signatures checked cryptographically (tokens
    /// answered from the verified-token cache are not counted).
    pub jwt_signature_checks: prometheus::IntCounter,
    /// `tls_reloads_total{result}`: certificate reloads after a file change.
    pub tls_reloads: IntCounterVec,
    /// `connections_refused_total{reason}`: connections closed at accept (`per_ip`).
    pub connections_refused: IntCounterVec,
    /// `forward_auth_decisions_total{protocol,result,code}`.
    pub forward_auth_decisions: IntCounterVec,
    /// `ready`: 1 when the last `/readyz` probe answered 200.
    pub ready: IntGauge,
    /// Per worker, the request metrics' handles its last request used (see
    /// [`Metrics::observe_request`]).
    recent: Arc<[Mutex<Option<Recent>>]>,
}

/// The success counters of [`Metrics::auth_attempts`], one per method that authenticates.
#[derive(Clone)]
pub struct AuthSuccesses {
    /// `method="jwt"`.
    pub jwt: IntCounter,
    /// `method="service_token"`.
    pub service_token: IntCounter,
    /// `method="bootstrap"`.
    pub bootstrap: IntCounter,
}

impl AuthSuccesses {
    fn of(attempts: &IntCounterVec) -> Self {
        let success = |method| attempts.with_label_values(&[method, "success", "ok"]);
        AuthSuccesses {
            jwt: success("jwt"),
            service_token: success("service_token"),
            bootstrap: success("bootstrap"),
        }
    }
}

/// Slots of [`Metrics::recent`]; workers beyond share them (a slot is a cache: sharing
/// costs hits, never a wrong count).
const RECENT_SLOTS: usize = 16;

/// The labelled handles of one kind of request: a worker's traffic mostly repeats its
/// route, method and status, and then finds them here instead of hashing its labels
/// into the metric families twice.
struct Recent {
    route: String,
    method: &'static str,
    status: u16,
    requests: IntCounter,
    duration: Histogram,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)
            .expect("the metric prefix is a valid name");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request to response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "upstream_duration_seconds",
                "Time the upstream took to answer with its response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Configuration reloads, by result"),
            &["result"],
        )
        .expect("valid metric");
        let tls_not_after = Gauge::new(
            "tls_cert_not_after_timestamp_seconds",
            "Expiry of the serving TLS certificate, UNIX seconds",
        )
        .expect("valid metric");
        let open_connections =
            IntGauge::new("open_connections", "Client connections currently open")
                .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; the version is the label"),
            &["version"],
        )
        .expect("valid metric");
        let auth_attempts = IntCounterVec::new(
            Opts::new(
                "auth_attempts_total",
                "Authentication attempts, by method, result and code",
            ),
            &["method", "result", "code"],
        )
        .expect("valid metric");
        let auth_enforced = IntGauge::new(
            "auth_enforced",
            "1 when authentication is enforced (mode required, or optional with a credential source)",
        )
        .expect("valid metric");
        let jwks_refresh = IntCounterVec::new(
            Opts::new("jwks_refresh_total", "Remote JWKS fetches, by result"),
            &["result"],
        )
        .expect("valid metric");
        let jwks_keys =
            IntGauge::new("jwks_keys", "Keys in the remote JWKS").expect("valid metric");
        let jwks_last_success = Gauge::new(
            "jwks_last_success_timestamp_seconds",
            "Time of the last successful remote JWKS fetch, UNIX seconds",
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests refused by a rate limit, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let ratelimit_redis_errors = prometheus::IntCounter::new(
            "ratelimit_redis_errors_total",
            "Redis rate-limit calls that failed or timed out (local windows decided)",
        )
        .expect("valid metric");
        let websocket_connections = IntGauge::new(
            "websocket_connections",
            "Relayed WebSocket connections open now",
        )
        .expect("valid metric");
        let websocket_messages = IntCounterVec::new(
            Opts::new(
                "websocket_messages_total",
                "WebSocket messages relayed, by direction",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let websocket_closed = IntCounterVec::new(
            Opts::new(
                "websocket_closed_total",
                "Relayed WebSocket connections ended, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let token_store_errors = prometheus::IntCounter::new(
            "token_store_errors_total",
            "Service-token store calls that failed",
        )
        .expect("valid metric");
        let jwt_signature_checks = prometheus::IntCounter::new(
            "jwt_signature_checks_total",
            "JWT signatures checked cryptographically (verified-token cache hits excluded)",
        )
        .expect("valid metric");
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "tls_reloads_total",
                "TLS certificate reloads after a file change, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Client connections closed at accept, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        connections_refused.with_label_values(&["per_ip"]);
        let forward_auth_decisions = IntCounterVec::new(
            Opts::new(
                "forward_auth_decisions_total",
                "Forward-auth decisions, by protocol (http, grpc), result (allow, deny) and error code",
            ),
            &["protocol", "result", "code"],
        )
        .expect("valid metric");
        let ready = IntGauge::new("ready", "1 when the last /readyz probe answered 200")
            .expect("valid metric");
        for collector in [
            Box::new(token_store_errors.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ready.clone()),
            Box::new(connections_refused.clone()),
            Box::new(forward_auth_decisions.clone()),
            Box::new(jwt_signature_checks.clone()),
            Box::new(tls_reloads.clone()),
            Box::new(websocket_connections.clone()),
            Box::new(websocket_messages.clone()),
            Box::new(websocket_closed.clone()),
            Box::new(rate_limited.clone()),
            Box::new(ratelimit_redis_errors.clone()),
            Box::new(auth_attempts.clone()),
            Box::new(auth_enforced.clone()),
            Box::new(jwks_refresh.clone()),
            Box::new(jwks_keys.clone()),
            Box::new(jwks_last_success.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(config_reloads.clone()),
            Box::new(tls_not_after.clone()),
            Box::new(open_connections.clone()),
            Box::new(build_info.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every series of a bounded label set exists from the start, at 0, so that rates
        // and alerts work before the first event.
        for kind in ["ip", "identity", "route"] {
            rate_limited.with_label_values(&[kind]);
        }
        for direction in ["client_to_upstream", "upstream_to_client"] {
            websocket_messages.with_label_values(&[direction]);
        }
        for reason in [
            "client",
            "upstream",
            "token_expired",
            "token_revoked",
            "idle",
            "shutdown",
            "message_too_big",
            "error",
        ] {
            websocket_closed.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
            tls_reloads.with_label_values(&[result]);
            jwks_refresh.with_label_values(&[result]);
        }
        Metrics {
            recent: (0..RECENT_SLOTS).map(|_| Mutex::new(None)).collect(),
            auth_successes: AuthSuccesses::of(&auth_attempts),
            registry,
            requests,
            request_duration,
            upstream_duration,
            config_reloads,
            tls_not_after,
            open_connections,
            auth_attempts,
            auth_enforced,
            jwks_refresh,
            jwks_keys,
            jwks_last_success,
            rate_limited,
            ratelimit_redis_errors,
            websocket_connections,
            websocket_messages,
            websocket_closed,
            token_store_errors,
            jwt_signature_checks,
            tls_reloads,
            connections_refused,
            forward_auth_decisions,
            ready,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Records one answered request.
    pub fn observe_request(&self, route: &str, method: &Method, status: u16, seconds: f64) {
        let method = method_label(method);
        let slot = &self.recent[crate::worker::current() % RECENT_SLOTS];
        // Never held across an await; the slot is the calling worker's own.
        let mut recent = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(hit) = recent
            .as_ref()
            .filter(|r| r.status == status && r.method == method && r.route == route)
        {
            hit.requests.inc();
            hit.duration.observe(seconds);
            return;
        }
        let status_buffer = itoa_status(status);
        let status_text = std::str::from_utf8(&status_buffer).unwrap_or("000");
        let found = Recent {
            route: route.to_string(),
            method,
            status,
            requests: self
                .requests
                .with_label_values(&[route, method, status_text]),
            duration: self.request_duration.with_label_values(&[route]),
        };
        found.requests.inc();
        found.duration.observe(seconds);
        *recent = Some(found);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn itoa_status(status: u16) -> [u8; 3] {
    let status = status.min(999);
    [
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]
}

/// The method as a label: the standard ones by name, anything else as `OTHER`, so a
/// client cannot create label values at will.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(metrics: &Metrics, route: &str, method: &str, status: &str) -> u64 {
        metrics
            .requests
            .with_label_values(&[route, method, status])
            .get()
    }

    #[test]
    fn requests_are_counted_under_their_own_labels_whatever_came_before() {
        let (a, b) = (Metrics::new(), Metrics::new());
        for (route, method, status) in [
            ("r1", Method::GET, 200),
            ("r1", Method::GET, 200),
            ("r1", Method::GET, 404),
            ("r2", Method::GET, 200),
            ("r1", Method::POST, 200),
            ("r1", Method::GET, 200),
        ] {
            a.observe_request(route, &method, status, 0.001);
        }
        b.observe_request("r1", &Method::GET, 200, 0.001);
        assert_eq!(count(&a, "r1", "GET", "200"), 3);
        assert_eq!(count(&a, "r1", "GET", "404"), 1);
        assert_eq!(count(&a, "r2", "GET", "200"), 1);
        assert_eq!(count(&a, "r1", "POST", "200"), 1);
        assert_eq!(
            count(&b, "r1", "GET", "200"),
            1,
            "another registry's own count"
        );
        let observed = a
            .request_duration
            .with_label_values(&["r1"])
            .get_sample_count();
        assert_eq!(observed, 5);
    }
}
