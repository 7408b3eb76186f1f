//! Shared gateway state: the current configuration snapshot (swapped atomically on
//! reload, loaded once per request) and the parts that live as long as the process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::assertion::AssertionSigner;
use crate::auth::jwks::RemoteJwks;
use crate::auth::Authenticator;
use crate::config::{Config, Env};
use crate::forward_auth::replay::Replays;
use crate::metrics::Metrics;
use crate::proxy::headers::IdentityHeaderNames;
use crate::proxy::{UpstreamClient, UpstreamSet};
use crate::ratelimit::RateLimiter;
use crate::routing::RouteTable;
use crate::store::TokenStore;

/// What lives as long as the process and every snapshot is built with.
#[derive(Clone)]
pub struct Services {
    /// Metrics.
    pub metrics: Metrics,
    /// The service-token store.
    pub store: Arc<dyn TokenStore>,
}

/// The route table of a snapshot: each route holds its upstream client.
pub type Routes = RouteTable<Arc<UpstreamClient>>;

/// Everything derived from one configuration. Requests hold an `Arc` of it for their
/// whole life, so a reload never changes the rules under a request in flight.
pub struct Snapshot {
    /// The configuration itself.
    pub config: Arc<Config>,
    /// The compiled route table, each route holding its upstream client.
    pub routes: Routes,
    /// Upstream clients, lent to the next snapshot when their settings stay the same.
    pub upstreams: UpstreamSet,
    /// The identity header names: set for the upstream, stripped from every request.
    pub identity_headers: IdentityHeaderNames,
    /// Authentication under this configuration.
    pub auth: Authenticator,
}

impl Snapshot {
    /// Builds a snapshot; `previous` lends its unchanged upstream clients.
    pub fn build(
        config: Config,
        services: &Services,
        previous: Option<&Snapshot>,
    ) -> Result<Self, String> {
        let upstreams =
            UpstreamSet::build(&config, previous.map(|p| &p.upstreams), &services.metrics)?;
        let routes = RouteTable::compile(&config.routes, |route| {
            upstreams
                .get(&route.upstream)
                .cloned()
                .ok_or_else(|| format!("route names unknown upstream `{}`", route.upstream))
        })?;
        let remote = remote_jwks(&config, services, previous)?;
        let auth = Authenticator::build(
            &config,
            services.store.clone(),
            remote,
            services.metrics.clone(),
        )?;
        let identity_headers = IdentityHeaderNames::from_config(&config.identity)?;
        Ok(Snapshot {
            config: Arc::new(config),
            routes,
            upstreams,
            identity_headers,
            auth,
        })
    }
}

/// The remote JWKS client: the previous one (with its cached keys) when its settings did
/// not change, else a new one, started.
fn remote_jwks(
    config: &Config,
    services: &Services,
    previous: Option<&Snapshot>,
) -> Result<Option<Arc<RemoteJwks>>, String> {
    let jwt = &config.auth.jwt;
    let Some(url) = &jwt.jwks_url else {
        return Ok(None);
    };
    if let Some(old) = previous.filter(|p| same_jwks_settings(&p.config, config)) {
        if let Some(remote) = old.auth.remote_jwks() {
            return Ok(Some(remote.clone()));
        }
    }
    let remote = RemoteJwks::new(
        url,
        jwt.jwks_cache_ttl.get(),
        jwt.jwks_timeout.get(),
        services.metrics.clone(),
    )?;
    remote.start();
    Ok(Some(remote))
}

fn same_jwks_settings(a: &Config, b: &Config) -> bool {
    let (a, b) = (&a.auth.jwt, &b.auth.jwt);
    a.jwks_url == b.jwks_url
        && a.jwks_cache_ttl == b.jwks_cache_ttl
        && a.jwks_timeout == b.jwks_timeout
}

/// Where the configuration came from, so reloads read the same sources.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The YAML file; `None` for built-in defaults.
    pub path: Option<PathBuf>,
    /// The environment as captured at start-up.
    pub env: Env,
}

/// State shared by every task. Cheap to clone through its `Arc`.
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// Metrics.
    pub metrics: Metrics,
    /// Long-lived services the snapshots are built with.
    pub services: Services,
    /// Signs identity assertions; one key for the life of the process.
    pub signer: AssertionSigner,
    /// Rate limiters; their windows outlive reloads.
    pub limiter: RateLimiter,
    /// Where to reload the configuration from.
    pub source: ConfigSource,
    /// Places for relayed WebSockets (`limits.max_websockets`, fixed at start-up).
    pub websockets: Arc<tokio::sync::Semaphore>,
    /// Forward-auth denials waiting for the ingress's second question.
    pub forward_auth_replays: Replays,
    draining: AtomicBool,
    listeners_bound: AtomicBool,
}

impl Shared {
    /// State around a first snapshot.
    pub fn new(
        snapshot: Snapshot,
        services: Services,
        signer: AssertionSigner,
        limiter: RateLimiter,
        source: ConfigSource,
    ) -> Self {
        let max_websockets = snapshot.config.limits.max_websockets;
        Shared {
            websockets: Arc::new(tokio::sync::Semaphore::new(max_websockets)),
            forward_auth_replays: Replays::default(),
            limiter,
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: services.metrics.clone(),
            services,
            signer,
            source,
            draining: AtomicBool::new(false),
            listeners_bound: AtomicBool::new(false),
        }
    }

    /// The current snapshot (one atomic load).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Installs a new snapshot for the requests that start from now on.
    pub fn install(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Marks the gateway as shutting down (readiness turns false).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the gateway is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Records that every listener is bound.
    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::Release);
    }

    /// Whether every listener is bound.
    pub fn listeners_bound(&self) -> bool {
        self.listeners_bound.load(Ordering::Acquire)
    }
}
