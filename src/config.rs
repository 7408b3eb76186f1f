//! The gateway's configuration: `gateway.yaml` plus environment overrides, parsed once into
//! the typed structs below and validated before anything starts. The doc comment of each
//! field is the documentation of its key.
//!
//! Loading collects every problem — unknown keys, wrong types, bad values, bad environment
//! variables — and reports them together, each named by its YAML path or variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod env;
mod errors;
mod validate;
pub use validate::{check_url, jwks_json, route_name};
mod load;
pub mod values;

pub use errors::{ConfigError, ConfigErrors, Env};
pub use load::{load, load_file, resolve_path};
pub use values::{ByteSize, Cidr, Dur, Secret, SecretUrl, StrList};

use crate::time::Timestamp;

/// The whole configuration. Every section has defaults, so an empty file is valid.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// Where the gateway accepts client traffic.
    pub listen: Listen,
    /// Certificate and key for the HTTPS listeners.
    pub tls: Tls,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: Admin,
    /// CIDRs whose forwarding headers and PROXY headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Connection, header and time limits.
    pub limits: Limits,
    /// Named upstream services that routes forward to.
    pub upstreams: Upstreams,
    /// Authentication: mode, JWT, bootstrap token, service tokens, failure limits.
    pub auth: Auth,
    /// What the upstream is told about the caller.
    pub identity: IdentitySettings,
    /// The forward-auth decision endpoint for ingress controllers.
    pub forward_auth: ForwardAuth,
    /// The route table, matched in order; the first match wins.
    pub routes: Vec<Route>,
    /// Logging.
    pub log: Log,
}

/// Client-facing listeners.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Listen {
    /// Plain HTTP/1.1 and h2c (prior knowledge) listeners.
    pub http: Vec<SocketAddr>,
    /// TLS listeners; HTTP/1.1 and HTTP/2 chosen by ALPN. Needs `tls.cert_file` and `tls.key_file`.
    pub https: Vec<SocketAddr>,
    /// Expect a PROXY protocol v1 or v2 header at the start of every connection.
    pub proxy_protocol: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            https: Vec::new(),
            proxy_protocol: false,
        }
    }
}

/// TLS certificate files; both are re-read when either changes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: Option<PathBuf>,
}

/// The admin listener. It has no authentication: keep it off the public network.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Admin {
    /// Address of the admin listener; `null` turns it off.
    pub listen: Option<SocketAddr>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
        }
    }
}

/// Limits that keep the gateway bounded under any input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Limits {
    /// Client connections open at once, over all listeners; further ones wait to be accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and to finish TLS and PROXY handshakes).
    pub header_read_timeout: Dur,
    /// Largest request head (request line and headers) accepted; larger → 431.
    pub max_header_bytes: ByteSize,
    /// A keep-alive connection with no request in flight for this long is closed.
    pub idle_timeout: Dur,
    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    pub shutdown_grace: Dur,
    /// Keys each rate limiter tracks at most; the oldest are evicted first.
    pub max_tracked_clients: usize,
    /// Largest WebSocket message relayed; larger closes the connection with 1009.
    pub websocket_max_message: ByteSize,
    /// A WebSocket with no frame in either direction for this long is closed with 1001.
    pub websocket_idle_timeout: Dur,
    /// WebSocket connections relayed at once; beyond it upgrades get 503.
    pub max_websockets: usize,
    /// Connections open at once from one client address (the PROXY header's, when
    /// believed); beyond it new ones are closed at accept. 0 turns the cap off.
    pub max_connections_per_ip: usize,
    /// Threads serving the proxy listeners, each with its own runtime, listening
    /// sockets (`SO_REUSEPORT`) and upstream connections. 0: one per CPU.
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Dur::secs(10),
            max_header_bytes: ByteSize(32 * 1024),
            idle_timeout: Dur::secs(60),
            shutdown_grace: Dur::secs(30),
            max_tracked_clients: 100_000,
            websocket_max_message: ByteSize(16 * 1024 * 1024),
            websocket_idle_timeout: Dur::secs(600),
            max_websockets: 10_000,
            max_connections_per_ip: 0,
            workers: 0,
        }
    }
}

/// Named upstreams. Defaults to one, `default`, at `http://127.0.0.1:8000`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Upstreams(pub BTreeMap<String, Upstream>);

impl Default for Upstreams {
    fn default() -> Self {
        let mut map = BTreeMap::new();
        map.insert(
            "default".to_string(),
            Upstream::with_url("http://127.0.0.1:8000"),
        );
        Upstreams(map)
    }
}

/// One upstream service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Upstream {
    /// `http://` or `https://` base URL; its path, if any, prefixes every forwarded path.
    pub url: String,
    /// Time allowed to open the TCP connection.
    pub connect_timeout: Dur,
    /// Time allowed for the response headers, and between two reads of the response body.
    pub timeout: Dur,
    /// Extra PEM CA bundle trusted for `https://` upstreams, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Idle keep-alive connections kept open to this upstream for reuse; more are closed
    /// once their request ends. Bounds what a burst of clients leaves behind.
    pub max_idle_per_host: usize,
}

impl Upstream {
    /// An upstream at `url` with default timeouts.
    pub fn with_url(url: &str) -> Self {
        Upstream {
            url: url.to_string(),
            ..Upstream::default()
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            url: String::new(),
            connect_timeout: Dur::secs(5),
            timeout: Dur::secs(60),
            ca_file: None,
            max_idle_per_host: 64,
        }
    }
}

/// How authentication is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Nothing is checked; every request is anonymous.
    Disabled,
    /// Requests without a credential are anonymous; a bad credential is refused.
    Optional,
    /// Every non-public request needs a valid credential.
    Required,
}

impl AuthMode {
    /// The mode's name, as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Disabled => "disabled",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        }
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disabled" => Ok(AuthMode::Disabled),
            "optional" => Ok(AuthMode::Optional),
            "required" => Ok(AuthMode::Required),
            other => Err(format!(
                "`{other}` is not a mode (use disabled, optional or required)"
            )),
        }
    }
}

/// Authentication settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Auth {
    /// `disabled`, `optional` or `required`. Unset: optional, enforced as required as soon
    /// as any credential source exists.
    pub mode: Option<AuthMode>,
    /// Bearer JWT verification.
    pub jwt: Jwt,
    /// The bootstrap service token.
    pub bootstrap: Bootstrap,
    /// Where service tokens are stored.
    pub service_tokens: ServiceTokens,
    /// Limits on failed authentication.
    pub rate_limit: AuthRateLimit,
}

/// JWT verification settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Jwt {
    /// Shared secret for HS256/384/512.
    pub secret: Option<Secret>,
    /// URL of a remote JWKS.
    pub jwks_url: Option<String>,
    /// A static JWKS: `{"keys": [...]}` or a bare list, as JSON text or YAML.
    pub jwks: Option<serde_yaml::Value>,
    /// Longest time a fetched JWKS is cached; a shorter `Cache-Control: max-age` wins.
    pub jwks_cache_ttl: Dur,
    /// Time allowed for one JWKS fetch.
    pub jwks_timeout: Dur,
    /// Algorithms a token may be signed with.
    pub allowed_algorithms: StrList,
    /// When set, the token's `aud` must contain one of these.
    pub audience: StrList,
    /// When set, the token's `iss` must equal it.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Dur,
    /// Claims every token must carry.
    pub required_claims: StrList,
}

impl Default for Jwt {
    fn default() -> Self {
        Jwt {
            secret: None,
            jwks_url: None,
            jwks: None,
            jwks_cache_ttl: Dur::secs(300),
            jwks_timeout: Dur::secs(5),
            allowed_algorithms: StrList(vec!["RS256".into(), "HS256".into()]),
            audience: StrList::default(),
            issuer: None,
            leeway: Dur::secs(0),
            required_claims: StrList(vec!["exp".into()]),
        }
    }
}

/// The algorithms `auth.jwt.allowed_algorithms` may name.
pub const JWT_ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// The bootstrap token's default scopes.
pub const BOOTSTRAP_DEFAULT_SCOPES: [&str; 7] = [
    "admin:tokens:read",
    "admin:tokens:write",
    "workflows:read",
    "workflows:write",
    "workflows:execute",
    "vault:read",
    "vault:write",
];

/// The bootstrap service token: for first set-up, before any persistent token exists.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Bootstrap {
    /// The token itself.
    pub token: Option<Secret>,
    /// Scopes it grants.
    pub scopes: StrList,
    /// When it stops working: ISO 8601 or epoch seconds.
    pub expires_at: Option<Timestamp>,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap {
            token: None,
            scopes: StrList(BOOTSTRAP_DEFAULT_SCOPES.map(String::from).to_vec()),
            expires_at: None,
        }
    }
}

/// Service-token store backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenBackend {
    /// An SQLite file (the default).
    Sqlite,
    /// PostgreSQL, shared by several replicas.
    Postgres,
    /// In memory, for tests and `demo`.
    #[serde(alias = "inmemory")]
    Memory,
}

impl std::str::FromStr for TokenBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sqlite" => Ok(TokenBackend::Sqlite),
            "postgres" | "postgresql" => Ok(TokenBackend::Postgres),
            "memory" | "inmemory" => Ok(TokenBackend::Memory),
            other => Err(format!(
                "`{other}` is not a backend (use sqlite, postgres or memory)"
            )),
        }
    }
}

/// Service-token storage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ServiceTokens {
    /// `sqlite`, `postgres` or `memory`.
    pub backend: TokenBackend,
    /// The SQLite file, created if missing.
    pub sqlite_path: PathBuf,
    /// PostgreSQL connection string; required for `postgres`.
    pub postgres_dsn: Option<SecretUrl>,
}

impl Default for ServiceTokens {
    fn default() -> Self {
        ServiceTokens {
            backend: TokenBackend::Sqlite,
            sqlite_path: PathBuf::from("./data/service_tokens.sqlite"),
            postgres_dsn: None,
        }
    }
}

/// Limits on failed authentication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AuthRateLimit {
    /// Failed authentications per client IP within `interval` before it is blocked; 0 = off.
    pub ip: u32,
    /// Failures per identity within `interval` before it is blocked; 0 = off.
    pub identity: u32,
    /// The sliding window.
    pub interval: Dur,
    /// Redis URL to share the windows across replicas.
    pub redis_url: Option<SecretUrl>,
}

impl Default for AuthRateLimit {
    fn default() -> Self {
        AuthRateLimit {
            ip: 0,
            identity: 0,
            interval: Dur::secs(60),
            redis_url: None,
        }
    }
}

/// What the upstream learns about the caller.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct IdentitySettings {
    /// Names of the identity headers.
    pub headers: IdentityHeaders,
    /// Forward the credential to the upstream as `Authorization: Bearer …`.
    pub forward_credentials: bool,
    /// A short-lived signed identity assertion for the upstream.
    pub assertion: Assertion,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings {
            headers: IdentityHeaders::default(),
            forward_credentials: true,
            assertion: Assertion::default(),
        }
    }
}

/// Identity header names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct IdentityHeaders {
    /// The subject.
    pub subject: String,
    /// `user`, `service` or `anonymous`.
    pub identity_type: String,
    /// The token id.
    pub token_id: String,
    /// Scopes, space-separated and sorted.
    pub scopes: String,
    /// Workspaces, space-separated and sorted; `*` for all.
    pub workspaces: String,
    /// `jwt`, `service_token`, `bootstrap` or `none`.
    pub auth_method: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            subject: "X-Orcheo-Subject".into(),
            identity_type: "X-Orcheo-Identity-Type".into(),
            token_id: "X-Orcheo-Token-Id".into(),
            scopes: "X-Orcheo-Scopes".into(),
            workspaces: "X-Orcheo-Workspaces".into(),
            auth_method: "X-Orcheo-Auth-Method".into(),
        }
    }
}

impl IdentityHeaders {
    /// Every configured name, with its YAML key.
    pub fn all(&self) -> [(&'static str, &str); 6] {
        [
            ("subject", &self.subject),
            ("identity_type", &self.identity_type),
            ("token_id", &self.token_id),
            ("scopes", &self.scopes),
            ("workspaces", &self.workspaces),
            ("auth_method", &self.auth_method),
        ]
    }
}

/// The signed identity assertion (ES256 JWT) sent to the upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Assertion {
    /// Add the assertion header and serve the gateway's JWKS.
    pub enabled: bool,
    /// The header that carries it.
    pub header: String,
    /// Lifetime of each assertion; at most 60 s.
    pub ttl: Dur,
    /// The `iss` claim.
    pub issuer: String,
}

impl Default for Assertion {
    fn default() -> Self {
        Assertion {
            enabled: false,
            header: "X-Orcheo-Identity".into(),
            ttl: Dur::secs(60),
            issuer: "orcheo-gateway".into(),
        }
    }
}

/// The forward-auth endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ForwardAuth {
    /// Serve the endpoint on the main listeners.
    pub enabled: bool,
    /// Its path (any method).
    pub path: String,
    /// Where Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/Check`) is
    /// served; off when unset.
    pub grpc_listen: Option<SocketAddr>,
    /// Serve gRPC over TLS with the `tls.*` certificate instead of plaintext h2c.
    pub grpc_tls: bool,
}

impl Default for ForwardAuth {
    fn default() -> Self {
        ForwardAuth {
            enabled: true,
            path: "/_orcheo/auth".into(),
            grpc_listen: None,
            grpc_tls: false,
        }
    }
}

/// One route of the route table.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Route {
    /// Name used in metrics and logs; defaults to the path.
    #[serde(default)]
    pub name: Option<String>,
    /// Pattern: literal segments, `{param}` segments, and an optional trailing `**`.
    pub path: String,
    /// Methods this route takes; empty means all.
    #[serde(default)]
    pub methods: StrList,
    /// Scopes the caller must all hold.
    #[serde(default)]
    pub scopes: StrList,
    /// Where the requested workspace is read from.
    #[serde(default)]
    pub workspace: Option<WorkspaceSource>,
    /// The upstream to forward to.
    #[serde(default = "default_upstream")]
    pub upstream: String,
    /// No authentication at all.
    #[serde(default)]
    pub public: bool,
    /// Accept WebSocket upgrades.
    #[serde(default)]
    pub websocket: bool,
    /// Request-rate limit for this route.
    #[serde(default)]
    pub rate_limit: Option<RouteRateLimit>,
    /// A leading path prefix removed before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Overrides the upstream's `timeout`.
    #[serde(default)]
    pub timeout: Option<Dur>,
}

fn default_upstream() -> String {
    "default".into()
}

/// Where a route reads the requested workspace from: exactly one of the fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct WorkspaceSource {
    /// A `{param}` of the route's path.
    pub path_param: Option<String>,
    /// A request header.
    pub header: Option<String>,
    /// A query parameter.
    pub query: Option<String>,
}

/// Whom a route rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitPer {
    /// Per client IP.
    Ip,
    /// Per identity (anonymous requests: per IP).
    Identity,
}

/// A per-route request-rate limit.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RouteRateLimit {
    /// `ip` or `identity`.
    pub per: RateLimitPer,
    /// Requests allowed per window.
    pub requests: u32,
    /// The sliding window.
    pub window: Dur,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(format!("`{other}` is not a log format (use json or text)")),
        }
    }
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything.
    Trace,
    /// Diagnostics.
    Debug,
    /// Normal operation (the default).
    Info,
    /// Problems only.
    Warn,
    /// Failures only.
    Error,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            other => Err(format!(
                "`{other}` is not a level (use trace, debug, info, warn or error)"
            )),
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Log {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: LogLevel,
    /// `json` or `text`.
    pub format: LogFormat,
    /// Debug logs include claims and token fingerprints (never a whole secret).
    pub sensitive_debug: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: LogLevel::Info,
            format: LogFormat::Json,
            sensitive_debug: false,
        }
    }
}

#[cfg(test)]
mod tests;
