//! orcheo-gateway: a reverse proxy that puts Orcheo's authentication model in front of
//! any HTTP or WebSocket service.
//!
//! # Layout
//! - [`cli`]: the command line (`serve`, `check-config`).
//! - [`app`]: wire-up — configuration → state → listeners → watchers → drain.
//! - [`config`]: `gateway.yaml` and environment, parsed into validated types.
//! - [`conn`]: what a request knows of its connection, and how long-lived work ends.
//! - [`server`]: accept loop, connection limits, TLS with certificate reload, PROXY
//!   protocol, HTTP/1.1 and HTTP/2 serving with timeouts.
//! - [`handler`]: the request pipeline, one screen long.
//! - [`auth`]: credential extraction, JWT and JWKS, bootstrap and service tokens → identity.
//! - [`authz`]: scopes and workspaces, pure functions of identity and route.
//! - [`store`]: where service tokens live (the `TokenStore` trait).
//! - [`routing`]: the route table and path normalisation.
//! - [`proxy`]: upstream clients and header rewriting.
//! - [`query`]: query strings as form parameters; credential parameters found, removed
//!   and redacted the one way.
//! - [`admin`]: health, readiness and metrics endpoints.
//! - [`error`]: the error enum and the one mapping to status, JSON and headers.
//! - [`metrics`], [`access_log`], [`logging`]: observability.
//! - [`state`]: the configuration snapshot shared by requests, swapped on reload.
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
pub mod error;
pub mod files;
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
pub mod tokens;
pub mod tokens_api;

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
