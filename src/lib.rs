//! orcheo-gateway: a reverse proxy that puts Orcheo's authentication model in front of
//! any HTTP or WebSocket service.
//!
//! # Layout
//! One request, in order: [`server`] accepts it and fills in [`conn`]; [`handler`] runs
//! the pipeline — [`client_ip`] → [`decision`] ([`routing`] → [`auth`] → [`authz`] →
//! [`ratelimit`]) → [`proxy`] — against the [`state`] snapshot; [`error`] turns any failure into its
//! response; [`access_log`] and [`metrics`] record it.
//!
//! - [`cli`]: the command line (`serve`, `check-config`, `demo`, `token`).
//! - [`app`]: wire-up — configuration → state → listeners (each given its handler) →
//!   watchers → drain.
//! - [`config`]: `gateway.yaml` and environment, parsed into validated types.
//! - [`server`]: accept loop, connection limits, TLS with certificate reload, PROXY
//!   protocol, HTTP/1.1 and HTTP/2 serving with timeouts (an idle HTTP/1.1 connection
//!   holds only its socket); knows nothing of what it serves.
//! - [`worker`]: the proxy workers — a single-threaded runtime per CPU, each with its own
//!   listening sockets and upstream connections.
//! - [`conn`]: what a request knows of its connection, and how long-lived work ends.
//! - [`handler`]: THE request pipeline of the proxy listeners.
//! - [`decision`]: route → authenticate → authorize → limit, shared by the proxy path and
//!   forward-auth; what the upstream is told about the caller.
//! - [`forward_auth`]: the ingress companion's HTTP endpoint (nginx, Traefik, Caddy and
//!   Envoy conventions), answered by the same decision.
//! - [`ext_authz`]: Envoy's gRPC `ext_authz` listener, answered by the same decision.
//! - [`client_ip`]: the client's address behind trusted proxies; the one trusted-peer check.
//! - [`routing`]: the route table and path normalisation.
//! - [`auth`]: credential extraction, JWT and JWKS, bootstrap and service tokens → caller.
//! - [`authz`]: scopes and workspaces, pure functions of the caller and the route.
//! - [`ratelimit`]: sliding windows for failures and route rates, optionally in Redis.
//! - [`proxy`]: upstream clients and their per-worker connection pools, header
//!   rewriting, the WebSocket relay.
//! - [`query`]: query strings as form parameters; credential parameters found, removed
//!   and redacted the one way.
//! - [`store`]: where service tokens live (the `TokenStore` trait) and its cache.
//! - [`tokens`], [`tokens_api`]: the service-token lifecycle and its admin API.
//! - [`admin`]: health, readiness and metrics endpoints.
//! - [`error`]: the error enum and the one mapping to status, JSON and headers.
//! - [`state`]: the configuration snapshot shared by requests, swapped on reload.
//! - [`metrics`], [`access_log`], [`logging`]: observability.
//! - [`tls_client`]: TLS towards upstreams, the JWKS endpoint and the stores: trust roots
//!   and client configurations.
//! - [`body`], [`files`], [`time`]: the response body type, file watching, the clock and
//!   timestamps.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod auth;
pub mod authz;
pub mod body;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod conn;
pub mod decision;
pub mod error;
pub mod ext_authz;
pub mod files;
pub mod forward_auth;
pub mod handler;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod query;
pub mod ratelimit;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod time;
pub mod tls_client;
pub mod tokens;
pub mod tokens_api;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by unit tests.
    use http::header::{HeaderMap, HeaderName, HeaderValue};

    /// A header map from name/value pairs (repeated names append).
    pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }
}
