//! Shared gateway state: the current configuration snapshot (swapped atomically on
//! reload, loaded once per request) and the parts that live as long as the process.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HeaderName;

use crate::config::{Cidr, Config, Env};
use crate::metrics::Metrics;
use crate::proxy::UpstreamSet;
use crate::routing::RouteTable;

/// Everything derived from one configuration. Requests hold an `Arc` of it for their
/// whole life, so a reload never changes the rules under a request in flight.
pub struct Snapshot {
    /// The configuration itself.
    pub config: Arc<Config>,
    /// The compiled route table.
    pub routes: RouteTable,
    /// Upstream clients.
    pub upstreams: UpstreamSet,
    /// Inbound headers removed from every request: the identity headers and the assertion.
    pub identity_headers: Vec<HeaderName>,
}

impl Snapshot {
    /// Builds a snapshot; `previous` lends its unchanged upstream clients.
    pub fn build(config: Config, previous: Option<&Snapshot>) -> Result<Self, String> {
        let routes = RouteTable::compile(&config.routes)?;
        let upstreams = UpstreamSet::build(&config, previous.map(|p| &p.upstreams))?;
        let identity = &config.identity;
        let identity_headers = identity
            .headers
            .all()
            .iter()
            .map(|(_, name)| *name)
            .chain([identity.assertion.header.as_str()])
            .map(|name| {
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("`{name}` is not a valid header name"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            config: Arc::new(config),
            routes,
            upstreams,
            identity_headers,
        })
    }

    /// Whether `ip` is inside `trusted_proxies`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.config
            .trusted_proxies
            .iter()
            .any(|net: &Cidr| net.contains(ip))
    }
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
    /// Where to reload the configuration from.
    pub source: ConfigSource,
    draining: AtomicBool,
    listeners_bound: AtomicBool,
}

impl Shared {
    /// State around a first snapshot.
    pub fn new(snapshot: Snapshot, metrics: Metrics, source: ConfigSource) -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
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
