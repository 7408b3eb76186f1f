//! Abuse protection (contract §6): failed authentications per client IP and per
//! identity, and request rates per route — sliding windows kept locally and, with
//! `auth.rate_limit.redis_url`, shared by every replica through Redis.

use std::time::Duration;

use crate::auth::failure::AuthFailure;
use crate::config::{AuthRateLimit, RateLimitPer, RouteRateLimit};
use crate::metrics::Metrics;

mod shared;
pub mod window;

use shared::{Mode, RedisWindows};
use window::Windows;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Failed authentications from one IP.
    Ip,
    /// Failures naming one identity.
    Identity,
    /// A route's request rate.
    Route,
}

impl Kind {
    /// The metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ip => "ip",
            Kind::Identity => "identity",
            Kind::Route => "route",
        }
    }
}

/// A refusal by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// Which limit.
    pub kind: Kind,
    /// The client IP or identity named in the message.
    pub subject: String,
    /// Whole seconds until a request would be allowed again (at least 1).
    pub retry_after: u64,
}

/// Whole seconds, rounded up, never below one.
fn whole_seconds(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// Every limiter of the gateway. Lives as long as the process, so reloads keep counts.
pub struct RateLimiter {
    ip: Windows,
    identity: Windows,
    routes: Windows,
    redis: Option<RedisWindows>,
    metrics: Metrics,
}

impl RateLimiter {
    /// Limiters of at most `capacity` keys each; shared through Redis when `redis_url`.
    pub fn new(capacity: usize, redis_url: Option<&str>, metrics: Metrics) -> Result<Self, String> {
        let redis = redis_url
            .map(|url| RedisWindows::new(url, capacity, metrics.clone()))
            .transpose()?;
        Ok(RateLimiter {
            ip: Windows::new(capacity),
            identity: Windows::new(capacity),
            routes: Windows::new(capacity),
            redis,
            metrics,
        })
    }

    fn local(&self, kind: Kind) -> &Windows {
        match kind {
            Kind::Ip => &self.ip,
            Kind::Identity => &self.identity,
            Kind::Route => &self.routes,
        }
    }

    /// One window operation: always on the local windows, and on Redis when configured
    /// and answering — whose answer then wins, as it sees the whole fleet.
    async fn run(
        &self,
        kind: Kind,
        key: &str,
        limit: u32,
        window: Duration,
        mode: Mode,
    ) -> Option<Duration> {
        let local = self.local(kind);
        let local_answer = match mode {
            Mode::Record => {
                local.record(key, limit, window);
                None
            }
            // Locally the event is recorded either way: the local count is what stands
            // in for the fleet while Redis is away.
            Mode::Acquire if self.redis.is_some() => {
                let wait = local.blocked(key, limit, window);
                local.record(key, limit, window);
                wait
            }
            Mode::Acquire => local.acquire(key, limit, window).err(),
        };
        let redis_key = format!("{}:{key}", kind.as_str());
        match &self.redis {
            Some(redis) => redis
                .run(&redis_key, limit, window, mode)
                .await
                .unwrap_or(local_answer),
            None => local_answer,
        }
    }

    fn refuse(&self, kind: Kind, subject: &str, wait: Duration, client_ip: &str) -> Limited {
        self.metrics
            .rate_limited
            .with_label_values(&[kind.as_str()])
            .inc();
        let identity = if kind == Kind::Identity { subject } else { "" };
        tracing::warn!(
            kind = kind.as_str(),
            client_ip,
            identity,
            "request refused by a rate limit"
        );
        Limited {
            kind,
            subject: subject.to_string(),
            retry_after: whole_seconds(wait),
        }
    }

    /// Refuses a client IP with too many recent authentication failures.
    pub async fn check_ip(
        &self,
        limits: &AuthRateLimit,
        ip_key: &str,
        client_ip: &str,
    ) -> Result<(), Limited> {
        self.check(Kind::Ip, limits.ip, limits, ip_key, client_ip, client_ip)
            .await
    }

    /// Refuses an identity with too many recent failures.
    pub async fn check_identity(
        &self,
        limits: &AuthRateLimit,
        identity: &str,
        client_ip: &str,
    ) -> Result<(), Limited> {
        self.check(
            Kind::Identity,
            limits.identity,
            limits,
            identity,
            identity,
            client_ip,
        )
        .await
    }

    /// Whether `key` has `limit` failures in the window (a `limit` of 0 is off);
    /// `subject` is what the refusal names. Answered here, never by a Redis call: by the
    /// local window, and by the blocks the fleet announced through Redis.
    async fn check(
        &self,
        kind: Kind,
        limit: u32,
        limits: &AuthRateLimit,
        key: &str,
        subject: &str,
        client_ip: &str,
    ) -> Result<(), Limited> {
        if limit == 0 {
            return Ok(());
        }
        let local = self.local(kind).blocked(key, limit, limits.interval.get());
        let announced = self
            .redis
            .as_ref()
            .and_then(|redis| redis.announced(kind.as_str(), key));
        match local.max(announced) {
            Some(wait) => Err(self.refuse(kind, subject, wait, client_ip)),
            None => Ok(()),
        }
    }

    /// Counts a refused authentication or authorization: against the IP when it is a
    /// failed authentication (401), against the identity when it names one.
    pub async fn record_failure(
        &self,
        limits: &AuthRateLimit,
        failure: &AuthFailure,
        ip_key: &str,
    ) {
        let window = limits.interval.get();
        if limits.ip > 0 && failure.error.is_authentication_failure() {
            self.run(Kind::Ip, ip_key, limits.ip, window, Mode::Record)
                .await;
        }
        if let (true, Some(identity)) = (limits.identity > 0, &failure.identity) {
            self.run(
                Kind::Identity,
                identity,
                limits.identity,
                window,
                Mode::Record,
            )
            .await;
        }
    }

    /// Admits a request under a route's rate limit, per client IP or per identity
    /// (anonymous callers: per IP).
    pub async fn check_route(
        &self,
        route: &str,
        limit: &RouteRateLimit,
        ip_key: &str,
        identity: Option<&str>,
        client_ip: &str,
    ) -> Result<(), Limited> {
        let key = match (limit.per, identity) {
            (RateLimitPer::Identity, Some(identity)) => format!("{route}:id:{identity}"),
            _ => format!("{route}:ip:{ip_key}"),
        };
        match self
            .run(
                Kind::Route,
                &key,
                limit.requests,
                limit.window.get(),
                Mode::Acquire,
            )
            .await
        {
            Some(wait) => Err(self.refuse(Kind::Route, client_ip, wait, client_ip)),
            None => Ok(()),
        }
    }
}
