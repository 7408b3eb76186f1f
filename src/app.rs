//! Wire-up: configuration → state → listeners → watchers; then reload on demand and a
//! graceful drain on shutdown. `cli` maps signals onto these calls; tests call them directly.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::auth::assertion::AssertionSigner;
use crate::body::Body;
use crate::config::TokenBackend;
use crate::config::{self, Config};
use crate::conn::ConnInfo;
use crate::ext_authz::GrpcListener;
use crate::files::FileStamp;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::server::tls::CertStore;
use crate::server::{self, Listener, Role, ServerContext};
use crate::state::{ConfigSource, Services, Shared, Snapshot};
use crate::store::{CachedStore, MemoryStore, PostgresStore, SqliteStore, TokenStore};
use crate::worker::{self, Workers};

/// How often the configuration and certificate files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({role}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        role: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// Building routes or upstream clients failed.
    #[error("configuration: {0}")]
    Config(String),
}

/// Where the running gateway listens.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    /// Plain HTTP listeners.
    pub http: Vec<SocketAddr>,
    /// TLS listeners.
    pub https: Vec<SocketAddr>,
    /// The admin listener.
    pub admin: Option<SocketAddr>,
    /// The gRPC `ext_authz` listener.
    pub grpc: Option<SocketAddr>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open when the grace period ended, cut off.
    pub cut_connections: i64,
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    /// Where it listens.
    pub addresses: Addresses,
    shutdown: watch::Sender<bool>,
    drain: Option<mpsc::Sender<()>>,
    drained: mpsc::Receiver<()>,
    grace: Duration,
    tasks: Vec<JoinHandle<()>>,
    /// The proxy workers; taken when they are halted.
    workers: Option<Workers>,
}

impl Gateway {
    /// Binds every listener and starts serving `config`, with the token store its
    /// `auth.service_tokens` names.
    pub async fn start(
        config: Config,
        path: Option<PathBuf>,
        env: config::Env,
    ) -> Result<Self, StartError> {
        let store = open_store(&config).await?;
        Self::start_with_store(config, path, env, store).await
    }

    /// Like [`Gateway::start`], with a token store given by the caller (`demo`, tests).
    pub async fn start_with_store(
        config: Config,
        path: Option<PathBuf>,
        env: config::Env,
        store: Arc<dyn TokenStore>,
    ) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let store: Arc<dyn TokenStore> =
            CachedStore::new(store, metrics.token_store_errors.clone());
        let services = Services {
            metrics: metrics.clone(),
            store,
        };
        let grace = config.limits.shutdown_grace.get();
        let limits = config.limits.clone();
        // The certificate serves the HTTPS listeners and, with `grpc_tls`, ext_authz.
        let needs_certs = !config.listen.https.is_empty() || config.forward_auth.grpc_tls;
        let certs = match (&config.tls.cert_file, &config.tls.key_file, needs_certs) {
            (Some(cert), Some(key), true) => {
                Some(CertStore::load(cert, key, &metrics).map_err(StartError::Tls)?)
            }
            _ => None,
        };
        let workers = crate::worker::count(limits.workers);
        let listeners = bind_all(&config, certs.as_ref(), workers)?;
        let grpc = bind_grpc(&config, certs.as_ref()).await?;
        let snapshot = Snapshot::build(config, &services, None).map_err(StartError::Config)?;
        if snapshot.routes.is_empty() {
            tracing::warn!("no routes are configured: every request will be answered 404");
        }
        log_mode(&snapshot, &metrics);
        let signer = AssertionSigner::generate().map_err(StartError::Config)?;
        let limiter = rate_limiter(&snapshot.config, &metrics)?;
        let source = ConfigSource { path, env };
        let shared = Arc::new(Shared::new(snapshot, services, signer, limiter, source));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (drain, drained) = mpsc::channel(1);
        let ctx = ServerContext::new(shared.clone(), limits, shutdown_rx, drain.clone());
        let mut addresses = Addresses::default();
        let mut tasks = Vec::new();
        // Worker `i` serves the `i`-th socket of every proxy address.
        let mut jobs: Vec<Vec<worker::Job>> = (0..workers).map(|_| Vec::new()).collect();
        let proxy = Arc::new(ProxyHandler(shared.clone()));
        for bound in listeners {
            let addr = bound.addr;
            match (bound.role, bound.tls) {
                (Role::Admin, _) => addresses.admin = Some(addr),
                (Role::Proxy, true) => addresses.https.push(addr),
                (Role::Proxy, false) => addresses.http.push(addr),
            }
            tracing::info!(%addr, role = bound.role.as_str(), tls = bound.tls, "listening");
            for (index, listener) in bound.sockets.into_iter().enumerate() {
                match bound.role {
                    Role::Proxy => {
                        let run = server::run(listener, ctx.clone(), proxy.clone());
                        jobs[index].push(Box::pin(run));
                    }
                    Role::Admin => {
                        let handler = Arc::new(AdminHandler(shared.clone()));
                        tasks.push(tokio::spawn(server::run(listener, ctx.clone(), handler)));
                    }
                }
            }
        }
        let workers = Workers::start(jobs).map_err(|error| {
            StartError::Config(format!("cannot start the proxy workers: {error}"))
        })?;
        tracing::info!(workers = workers.len(), "proxy workers started");
        if let Some(listener) = grpc {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                role: "local address",
                source,
            })?;
            addresses.grpc = Some(addr);
            tracing::info!(%addr, role = "ext_authz", "listening");
            let serving = crate::ext_authz::serve(
                listener,
                shared.clone(),
                ctx.shutdown.clone(),
                drain.clone(),
                ctx.limits.header_read_timeout.get(),
            );
            tasks.push(tokio::spawn(serving));
        }
        tasks.push(tokio::spawn(watch_files(shared.clone(), certs)));
        shared.set_listeners_bound();
        Ok(Gateway {
            shared,
            addresses,
            shutdown,
            drain: Some(drain),
            drained,
            grace,
            tasks,
            workers: Some(workers),
        })
    }

    /// The shared state (metrics, current snapshot).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Re-reads the configuration from its sources and applies it, or refuses it and
    /// keeps the current one. The work runs on the blocking pool.
    pub async fn reload(&self) -> Result<(), String> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || reload(&shared))
            .await
            .map_err(|error| format!("reload did not finish: {error}"))?
    }

    /// Stops accepting, lets in-flight requests finish within `limits.shutdown_grace`,
    /// then cuts whatever is left.
    pub async fn shutdown(mut self) -> ShutdownReport {
        tracing::info!(
            grace_seconds = self.grace.as_secs_f64(),
            "shutting down: draining connections"
        );
        self.shared.set_draining();
        let _ = self.shutdown.send(true);
        self.drain = None;
        let finished = tokio::time::timeout(self.grace, self.drained.recv())
            .await
            .is_ok();
        for task in &self.tasks {
            task.abort();
        }
        let cut = if finished {
            0
        } else {
            self.shared.metrics.open_connections.get()
        };
        if cut > 0 {
            tracing::warn!(
                connections = cut,
                "grace period over: cutting connections still open"
            );
        }
        // Usage counted in memory is written before the process goes (and before the
        // workers stop: store connections they opened live on their runtimes).
        self.shared.services.store.flush().await;
        if let Some(workers) = self.workers.take() {
            workers.halt().await;
        }
        tracing::info!("shutdown complete");
        ShutdownReport {
            cut_connections: cut,
        }
    }
}

/// The proxy listeners answer through the request pipeline.
struct ProxyHandler(Arc<Shared>);

impl server::Handler for ProxyHandler {
    fn handle(
        &self,
        conn: &ConnInfo,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send {
        crate::handler::handle(&self.0, conn, request)
    }
}

/// The admin listener answers health, readiness and metrics.
struct AdminHandler(Arc<Shared>);

impl server::Handler for AdminHandler {
    fn handle(
        &self,
        _conn: &ConnInfo,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send {
        crate::admin::handle(&self.0, request)
    }
}

/// The sockets bound for one configured address: one per worker for proxy addresses.
struct Bound {
    addr: SocketAddr,
    role: Role,
    tls: bool,
    sockets: Vec<Listener>,
}

fn bind_all(
    config: &Config,
    certs: Option<&Arc<CertStore>>,
    workers: usize,
) -> Result<Vec<Bound>, StartError> {
    let proxy_protocol = config.listen.proxy_protocol;
    let acceptor = match certs {
        Some(certs) => Some(certs.acceptor().map_err(StartError::Tls)?),
        None => None,
    };
    let mut wanted = Vec::new();
    for addr in &config.listen.http {
        wanted.push((*addr, Role::Proxy, None, "listen.http"));
    }
    if let Some(acceptor) = &acceptor {
        for addr in &config.listen.https {
            wanted.push((*addr, Role::Proxy, Some(acceptor.clone()), "listen.https"));
        }
    }
    if let Some(addr) = config.admin.listen {
        wanted.push((addr, Role::Admin, None, "admin.listen"));
    }
    let mut bound = Vec::new();
    for (addr, role, tls, key) in wanted {
        let has_tls = tls.is_some();
        let bind_error = |source| StartError::Bind {
            addr,
            role: key,
            source,
        };
        let sockets = match role {
            Role::Proxy => Listener::bind_group(addr, workers, role, tls, proxy_protocol)
                .map_err(bind_error)?,
            Role::Admin => vec![Listener::bind(addr, role, None, false).map_err(bind_error)?],
        };
        let addr = sockets[0].local_addr().map_err(bind_error)?;
        bound.push(Bound {
            addr,
            role,
            tls: has_tls,
            sockets,
        });
    }
    Ok(bound)
}

/// The gRPC `ext_authz` listener, when `forward_auth.grpc_listen` is set.
async fn bind_grpc(
    config: &Config,
    certs: Option<&Arc<CertStore>>,
) -> Result<Option<GrpcListener>, StartError> {
    let Some(addr) = config.forward_auth.grpc_listen else {
        return Ok(None);
    };
    let tls = match (config.forward_auth.grpc_tls, certs) {
        (true, Some(certs)) => Some(certs.acceptor().map_err(StartError::Tls)?),
        (true, None) => {
            return Err(StartError::Tls(
                "forward_auth.grpc_tls needs tls.cert_file and tls.key_file".into(),
            ))
        }
        (false, _) => None,
    };
    let listener = GrpcListener::bind(addr, tls)
        .await
        .map_err(|source| StartError::Bind {
            addr,
            role: "forward_auth.grpc_listen",
            source,
        })?;
    Ok(Some(listener))
}

/// Loads the configuration again and installs it if valid.
fn reload(shared: &Shared) -> Result<(), String> {
    let source = &shared.source;
    let outcome = config::load_file(source.path.as_deref(), &source.env)
        .map_err(|errors| errors.to_string())
        .and_then(|config| {
            let current = shared.snapshot();
            warn_restart_only(&current.config, &config);
            Snapshot::build(config, &shared.services, Some(&current))
        });
    match outcome {
        Ok(snapshot) => {
            let routes = snapshot.routes.len();
            shared.install(snapshot);
            shared
                .metrics
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            tracing::info!(routes, "configuration reloaded");
            Ok(())
        }
        Err(error) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            tracing::error!(%error, "configuration reload refused; the previous configuration stays in force");
            Err(error)
        }
    }
}

/// Logs the effective authentication mode and its reason, and sets the gauge.
fn log_mode(snapshot: &Snapshot, metrics: &Metrics) {
    let mode = snapshot.auth.mode();
    metrics.auth_enforced.set(i64::from(mode.enforced));
    tracing::info!(mode = mode.effective.as_str(), enforced = mode.enforced, reason = %mode.reason, "authentication mode");
}

/// The rate limiters, shared through Redis when `auth.rate_limit.redis_url` is set.
fn rate_limiter(config: &Config, metrics: &Metrics) -> Result<RateLimiter, StartError> {
    let redis = config.auth.rate_limit.redis_url.as_ref();
    if let Some(url) = redis {
        tracing::info!(redis = %url.redacted(), "rate limits shared through Redis");
    }
    RateLimiter::new(
        config.limits.max_tracked_clients,
        redis.map(|u| u.expose()),
        metrics.clone(),
    )
    .map_err(StartError::Config)
}

/// The service-token store `auth.service_tokens.backend` names.
async fn open_store(config: &Config) -> Result<Arc<dyn TokenStore>, StartError> {
    match config.auth.service_tokens.backend {
        TokenBackend::Memory => Ok(Arc::new(MemoryStore::new())),
        TokenBackend::Sqlite => {
            let path = &config.auth.service_tokens.sqlite_path;
            let store = SqliteStore::open(path)
                .map_err(|e| StartError::Config(format!("auth.service_tokens.sqlite_path: {e}")))?;
            tracing::info!(path = %path.display(), "service tokens in SQLite");
            Ok(store)
        }
        TokenBackend::Postgres => {
            let dsn = config
                .auth
                .service_tokens
                .postgres_dsn
                .as_ref()
                .ok_or_else(|| {
                    StartError::Config(
                        "auth.service_tokens.postgres_dsn is required for postgres".into(),
                    )
                })?;
            let store = PostgresStore::open(dsn.expose())
                .await
                .map_err(StartError::Config)?;
            tracing::info!(dsn = %dsn.redacted(), "service tokens in PostgreSQL");
            Ok(store)
        }
    }
}

/// Settings bound at start-up cannot change in place; say so instead of ignoring them.
fn warn_restart_only(old: &Config, new: &Config) {
    let json = |value: &dyn erased::Json| value.to_json();
    let sections: [(&str, &dyn erased::Json, &dyn erased::Json); 6] = [
        ("listen", &old.listen, &new.listen),
        ("tls", &old.tls, &new.tls),
        ("admin", &old.admin, &new.admin),
        ("limits", &old.limits, &new.limits),
        ("log", &old.log, &new.log),
        (
            "auth.rate_limit.redis_url",
            &old.auth.rate_limit.redis_url,
            &new.auth.rate_limit.redis_url,
        ),
    ];
    for (name, before, after) in sections {
        if json(before) != json(after) {
            tracing::warn!(
                section = name,
                "this section changed but only takes effect after a restart"
            );
        }
    }
}

/// Comparing configuration sections of different types through their JSON form.
mod erased {
    /// A section that can be compared as JSON.
    pub trait Json {
        fn to_json(&self) -> Option<serde_json::Value>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Option<serde_json::Value> {
            serde_json::to_value(self).ok()
        }
    }
}

/// Polls the configuration file and the certificate files; reloads what changed. File
/// reads, parsing and certificate loading run on the blocking pool, never on the workers
/// that serve requests.
async fn watch_files(shared: Arc<Shared>, certs: Option<Arc<CertStore>>) {
    let mut last = stamp_of(&shared);
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    loop {
        ticker.tick().await;
        let (shared, certs, seen) = (shared.clone(), certs.clone(), last.clone());
        let check =
            tokio::task::spawn_blocking(move || check_files(&shared, certs.as_deref(), seen));
        match check.await {
            Ok(stamp) => last = stamp,
            Err(error) => tracing::error!(%error, "checking the configuration files failed"),
        }
    }
}

/// One look at the watched files: reloads the certificate and the configuration when they
/// changed since `last`; returns the configuration file's stamp now.
fn check_files(
    shared: &Shared,
    certs: Option<&CertStore>,
    last: Option<FileStamp>,
) -> Option<FileStamp> {
    if let Some(certs) = certs {
        certs.reload_if_changed();
    }
    let stamp = stamp_of(shared);
    if stamp != last {
        tracing::info!("configuration file changed; reloading");
        let _ = reload(shared);
    }
    stamp
}

fn stamp_of(shared: &Shared) -> Option<FileStamp> {
    shared.source.path.as_deref().map(|p| FileStamp::of(&[p]))
}
