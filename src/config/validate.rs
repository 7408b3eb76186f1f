//! Checks of a parsed configuration that types alone cannot express: references between
//! sections, ranges, formats, and files that must exist. Every problem is recorded.

use std::collections::HashSet;
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};

use super::errors::ConfigErrors;
use super::{Config, Route, TokenBackend, JWT_ALGORITHMS};
use crate::routing::Pattern;

/// Records every problem of `config` in `errors`.
pub fn check(config: &Config, errors: &mut ConfigErrors) {
    check_listeners(config, errors);
    check_limits(config, errors);
    check_upstreams(config, errors);
    check_auth(config, errors);
    check_identity(config, errors);
    let forward_auth = &config.forward_auth;
    if forward_auth.grpc_tls && (config.tls.cert_file.is_none() || config.tls.key_file.is_none()) {
        errors.push(
            "forward_auth.grpc_tls",
            "needs tls.cert_file and tls.key_file",
        );
    }
    if forward_auth.grpc_tls && forward_auth.grpc_listen.is_none() {
        errors.push("forward_auth.grpc_tls", "needs forward_auth.grpc_listen");
    }
    if let Some(addr) = forward_auth.grpc_listen {
        let taken = config
            .listen
            .http
            .iter()
            .chain(&config.listen.https)
            .chain(&config.admin.listen);
        if addr.port() != 0 && taken.into_iter().any(|a| *a == addr) {
            errors.push(
                "forward_auth.grpc_listen",
                format!("{addr} is used by another listener"),
            );
        }
    }
    if !config.forward_auth.path.starts_with('/') {
        errors.push("forward_auth.path", "must start with `/`");
    }
    let mut names = HashSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        let name = route_name(route);
        if !names.insert(name.clone()) {
            errors.push(
                format!("routes[{i}].name"),
                format!("`{name}` is used by an earlier route; names must be unique"),
            );
        }
        check_route(config, route, &format!("routes[{i}]"), errors);
    }
}

/// A route's name: its `name`, else its path.
pub fn route_name(route: &Route) -> String {
    route.name.clone().unwrap_or_else(|| route.path.clone())
}

fn check_listeners(config: &Config, errors: &mut ConfigErrors) {
    let listen = &config.listen;
    if listen.http.is_empty() && listen.https.is_empty() {
        errors.push(
            "listen",
            "at least one of listen.http and listen.https is needed",
        );
    }
    let mut seen = HashSet::new();
    let admin = config.admin.listen.iter().map(|a| ("admin.listen", a));
    let all = listen
        .http
        .iter()
        .map(|a| ("listen.http", a))
        .chain(listen.https.iter().map(|a| ("listen.https", a)))
        .chain(admin);
    for (key, addr) in all {
        if addr.port() != 0 && !seen.insert(*addr) {
            errors.push(key, format!("{addr} is listed twice"));
        }
    }
    if !listen.https.is_empty() {
        for (key, file) in [
            ("tls.cert_file", &config.tls.cert_file),
            ("tls.key_file", &config.tls.key_file),
        ] {
            match file {
                None => errors.push(key, "required when listen.https is set"),
                Some(path) if !path.is_file() => {
                    errors.push(key, format!("{} is not a readable file", path.display()))
                }
                Some(_) => {}
            }
        }
    }
}

/// The most proxy worker threads `limits.workers` may ask for.
pub const MAX_WORKERS: usize = 256;

fn check_limits(config: &Config, errors: &mut ConfigErrors) {
    let limits = &config.limits;
    if limits.max_connections == 0 {
        errors.push("limits.max_connections", "must be at least 1");
    }
    if limits.max_websockets == 0 {
        errors.push("limits.max_websockets", "must be at least 1");
    }
    // More threads than this only adds memory and scheduling; 0 means one per CPU.
    if limits.workers > MAX_WORKERS {
        errors.push(
            "limits.workers",
            format!("must be at most {MAX_WORKERS} (0: one per CPU)"),
        );
    }
    if limits.max_tracked_clients == 0 {
        errors.push("limits.max_tracked_clients", "must be at least 1");
    }
    // Below 1 KiB not even an ordinary browser request fits; above 1 MiB a header limit
    // no longer protects memory.
    if !(1024..=1024 * 1024).contains(&limits.max_header_bytes.0) {
        errors.push("limits.max_header_bytes", "must be between 1KiB and 1MiB");
    }
    if limits.websocket_max_message.0 == 0 {
        errors.push("limits.websocket_max_message", "must be at least 1 byte");
    }
    for (key, value) in [
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.idle_timeout", limits.idle_timeout),
        (
            "limits.websocket_idle_timeout",
            limits.websocket_idle_timeout,
        ),
    ] {
        positive(errors, key, value.get());
    }
}

fn positive(errors: &mut ConfigErrors, key: &str, value: Duration) {
    if value.is_zero() {
        errors.push(key, "must be greater than zero");
    }
}

fn check_upstreams(config: &Config, errors: &mut ConfigErrors) {
    for (name, upstream) in &config.upstreams.0 {
        let key = format!("upstreams.{name}");
        if let Err(message) = check_url(&upstream.url, false) {
            errors.push(format!("{key}.url"), message);
        }
        positive(
            errors,
            &format!("{key}.connect_timeout"),
            upstream.connect_timeout.get(),
        );
        positive(errors, &format!("{key}.timeout"), upstream.timeout.get());
        if let Some(ca) = &upstream.ca_file {
            if !upstream.url.starts_with("https://") {
                errors.push(
                    format!("{key}.ca_file"),
                    "only applies to https:// upstreams",
                );
            } else if !ca.is_file() {
                errors.push(
                    format!("{key}.ca_file"),
                    format!("{} is not a readable file", ca.display()),
                );
            }
        }
    }
}

/// An absolute `http://` or `https://` URL with a host and no query or fragment.
pub fn check_url(url: &str, allow_query: bool) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("`{url}` is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if !allow_query && (uri.query().is_some() || url.contains('#')) {
        return Err(format!("`{url}` must not have a query or fragment"));
    }
    Ok(uri)
}

fn check_auth(config: &Config, errors: &mut ConfigErrors) {
    let jwt = &config.auth.jwt;
    if jwt.allowed_algorithms.0.is_empty() {
        errors.push(
            "auth.jwt.allowed_algorithms",
            "must name at least one algorithm",
        );
    }
    for alg in &jwt.allowed_algorithms.0 {
        if alg.eq_ignore_ascii_case("none") {
            errors.push("auth.jwt.allowed_algorithms", "`none` is never allowed");
        } else if !JWT_ALGORITHMS.contains(&alg.as_str()) {
            errors.push(
                "auth.jwt.allowed_algorithms",
                format!(
                    "unknown algorithm `{alg}` (known: {})",
                    JWT_ALGORITHMS.join(", ")
                ),
            );
        }
    }
    if let Some(url) = &jwt.jwks_url {
        if let Err(message) = check_url(url, true) {
            errors.push("auth.jwt.jwks_url", message);
        }
    }
    if let Some(jwks) = &jwt.jwks {
        if let Err(message) = check_jwks(jwks) {
            errors.push("auth.jwt.jwks", message);
        }
    }
    if matches!(&jwt.secret, Some(s) if s.expose().is_empty()) {
        errors.push("auth.jwt.secret", "must not be empty");
    }
    positive(errors, "auth.jwt.jwks_timeout", jwt.jwks_timeout.get());
    positive(errors, "auth.jwt.jwks_cache_ttl", jwt.jwks_cache_ttl.get());
    let tokens = &config.auth.service_tokens;
    match (&tokens.postgres_dsn, tokens.backend) {
        (None, TokenBackend::Postgres) => errors.push(
            "auth.service_tokens.postgres_dsn",
            "required when backend is postgres (or set ORCHEO_POSTGRES_DSN)",
        ),
        (Some(dsn), TokenBackend::Postgres) => {
            if let Err(problem) = crate::store::check_postgres_dsn(dsn.expose()) {
                errors.push("auth.service_tokens.postgres_dsn", problem);
            }
        }
        _ => {}
    }
    let limit = &config.auth.rate_limit;
    positive(errors, "auth.rate_limit.interval", limit.interval.get());
    if let Some(url) = &limit.redis_url {
        let text = url.expose();
        if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
            errors.push(
                "auth.rate_limit.redis_url",
                "must start with redis:// or rediss://",
            );
        }
    }
}

/// A static JWKS as JSON, whether it was written as YAML or as JSON text.
pub fn jwks_json(value: &serde_yaml::Value) -> Result<serde_json::Value, String> {
    let parsed;
    let value = match value {
        serde_yaml::Value::String(text) => {
            parsed = serde_yaml::from_str::<serde_yaml::Value>(text)
                .map_err(|e| format!("not valid JSON: {e}"))?;
            &parsed
        }
        other => other,
    };
    serde_json::to_value(value).map_err(|e| format!("not a JSON document: {e}"))
}

/// Parses a static JWKS exactly as start-up will, so `check-config` reports bad keys.
fn check_jwks(value: &serde_yaml::Value) -> Result<(), String> {
    let json = jwks_json(value)?;
    crate::auth::keys::parse_key_set(&json).map(|_| ())
}

fn check_identity(config: &Config, errors: &mut ConfigErrors) {
    let identity = &config.identity;
    let mut seen = HashSet::new();
    let headers = identity.headers.all();
    let assertion = ("assertion.header", identity.assertion.header.as_str());
    for (key, name) in headers.into_iter().chain([assertion]) {
        let path = if key.starts_with("assertion") {
            format!("identity.{key}")
        } else {
            format!("identity.headers.{key}")
        };
        match HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => errors.push(path, format!("`{name}` is not a valid header name")),
            Ok(header) if !seen.insert(header.clone()) => {
                errors.push(path, format!("`{name}` is used twice"))
            }
            Ok(header) if crate::proxy::headers::is_reserved(&header) => errors.push(
                path,
                format!("`{name}` is a header the gateway manages itself"),
            ),
            Ok(_) => {}
        }
    }
    let ttl = identity.assertion.ttl.get();
    if ttl.is_zero() || ttl > Duration::from_secs(60) {
        errors.push("identity.assertion.ttl", "must be between 1s and 60s");
    }
}

fn check_route(config: &Config, route: &Route, key: &str, errors: &mut ConfigErrors) {
    let pattern = match Pattern::parse(&route.path) {
        Ok(pattern) => Some(pattern),
        Err(message) => {
            errors.push(format!("{key}.path"), message);
            None
        }
    };
    for method in &route.methods.0 {
        if method.parse::<Method>().is_err() || method.chars().any(|c| c.is_ascii_lowercase()) {
            errors.push(
                format!("{key}.methods"),
                format!("`{method}` is not a method (use upper case, like GET)"),
            );
        }
    }
    if !config.upstreams.0.contains_key(&route.upstream) {
        errors.push(
            format!("{key}.upstream"),
            format!("no upstream named `{}` under upstreams", route.upstream),
        );
    }
    if let Some(source) = &route.workspace {
        let count = [&source.path_param, &source.header, &source.query]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if count != 1 {
            errors.push(
                format!("{key}.workspace"),
                "give exactly one of path_param, header, query",
            );
        }
        if let (Some(param), Some(pattern)) = (&source.path_param, &pattern) {
            if !pattern.has_param(param) {
                errors.push(
                    format!("{key}.workspace.path_param"),
                    format!("the path has no `{{{param}}}` segment"),
                );
            }
        }
        if let Some(header) = &source.header {
            if HeaderName::from_bytes(header.as_bytes()).is_err() {
                errors.push(format!("{key}.workspace.header"), "not a valid header name");
            }
        }
    }
    if let Some(limit) = &route.rate_limit {
        if limit.requests == 0 {
            errors.push(format!("{key}.rate_limit.requests"), "must be at least 1");
        }
        positive(
            errors,
            &format!("{key}.rate_limit.window"),
            limit.window.get(),
        );
    }
    if let Some(prefix) = &route.strip_prefix {
        if !prefix.starts_with('/') || prefix.contains(['?', '#', '%']) || prefix.contains("..") {
            errors.push(
                format!("{key}.strip_prefix"),
                "must be a literal path starting with `/`",
            );
        }
    }
    if let Some(timeout) = route.timeout {
        positive(errors, &format!("{key}.timeout"), timeout.get());
    }
}
