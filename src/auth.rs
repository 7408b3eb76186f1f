//! Authentication (contract §3): the effective mode, where the credential comes from, and
//! what it is — the bootstrap token, a service token, or a JWT — turned into an
//! [`Identity`]. Every decision is logged on failure and counted.

use std::collections::BTreeSet;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::{AuthMode, Config, Route};
use crate::metrics::Metrics;
use crate::store::{hash_secret, hex, secret_digest, TokenStore};
use crate::time::Timestamp;

pub mod assertion;
pub mod b64url;
mod cache;
pub mod credential;
pub mod failure;
pub mod identity;
pub mod jwks;
pub mod jwt;
pub mod keys;
mod service;

use credential::{Credential, MAX_TOKEN_BYTES};
use failure::{AuthError, AuthFailure, Expired};
use identity::{AuthMethod, Identity, IdentityType, Workspaces};
use jwks::RemoteJwks;
use jwt::{JwtSettings, JwtVerifier};

/// Verified JWTs remembered at most; each entry is a few hundred bytes.
const TOKEN_CACHE_CAPACITY: usize = 10_000;

/// The bootstrap token, kept only as its digest so it is compared in constant time.
struct BootstrapToken {
    digest: [u8; 32],
    /// Whether the token has a `.` in it: a token that differs in this (every JWT, when
    /// the bootstrap token has none) is not it, and is not hashed to find out.
    dotted: bool,
    scopes: BTreeSet<String>,
    expires_at: Option<Timestamp>,
}

/// Equality of two digests without an early exit, so timing reveals nothing.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A short, non-reversible token fingerprint for logs: never the token itself.
pub fn fingerprint(token: &str) -> String {
    hash_secret(token)[..12].to_string()
}

/// The mode in force and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeReport {
    /// `disabled`, `optional` or `required`, as enforced right now.
    pub effective: AuthMode,
    /// Whether a missing credential is refused.
    pub enforced: bool,
    /// Why.
    pub reason: String,
}

/// Who a request is from, as authentication found it; `authz` then decides whether it
/// may use the route.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The identity.
    pub identity: Arc<Identity>,
    /// The verified token, to forward as `Authorization: Bearer …` when configured.
    pub token: Option<String>,
    /// Whether authentication was skipped (disabled mode or a public route): the
    /// request's own `Authorization` header then passes through as it came.
    pub skipped: bool,
}

/// Authenticates requests under one configuration.
pub struct Authenticator {
    configured: Option<AuthMode>,
    /// Why enforcement is on in the default mode, from the configuration alone.
    static_source: Option<&'static str>,
    bootstrap: Option<BootstrapToken>,
    jwt: JwtVerifier,
    store: Arc<dyn TokenStore>,
    /// Service-token identities, built once per stored record.
    service_identities: service::ServiceIdentities,
    metrics: Metrics,
    /// `log.sensitive_debug`: debug lines carry the identity's claims and the token's
    /// fingerprint (still never the token).
    sensitive_debug: bool,
}

impl Authenticator {
    /// Builds the authenticator of `config`. `remote` is the remote JWKS client, when
    /// `auth.jwt.jwks_url` is set.
    pub fn build(
        config: &Config,
        store: Arc<dyn TokenStore>,
        remote: Option<Arc<RemoteJwks>>,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let auth = &config.auth;
        let settings = JwtSettings::from_config(&auth.jwt)?;
        let static_keys = match &auth.jwt.jwks {
            Some(value) => {
                let json = crate::config::jwks_json(value)?;
                let (keys, skipped) =
                    keys::parse_key_set(&json).map_err(|e| format!("auth.jwt.jwks: {e}"))?;
                for note in skipped {
                    tracing::warn!(%note, "static JWKS entry skipped");
                }
                keys
            }
            None => keys::KeySet::default(),
        };
        let secret = auth.jwt.secret.as_ref().map(|s| s.expose().as_bytes());
        let jwt = JwtVerifier::new(settings, secret, static_keys, remote, TOKEN_CACHE_CAPACITY)?
            .counting_signatures(metrics.jwt_signature_checks.clone());
        let bootstrap = auth
            .bootstrap
            .token
            .as_ref()
            .filter(|t| !t.expose().is_empty())
            .map(|token| BootstrapToken {
                digest: secret_digest(token.expose()),
                dotted: token.expose().contains('.'),
                scopes: auth.bootstrap.scopes.0.iter().cloned().collect(),
                expires_at: auth.bootstrap.expires_at,
            });
        let static_source = if auth.jwt.secret.is_some() {
            Some("a JWT secret is configured")
        } else if auth.jwt.jwks_url.is_some() {
            Some("a JWKS URL is configured")
        } else if auth.jwt.jwks.is_some() {
            Some("a static JWKS is configured")
        } else if bootstrap.is_some() {
            Some("a bootstrap token is configured")
        } else {
            None
        };
        if auth.jwt.jwks_url.is_some()
            && auth.jwt.audience.0.is_empty()
            && auth.jwt.issuer.is_none()
        {
            // A shared identity provider signs tokens for every application it serves:
            // without an audience or issuer, all of them are accepted here.
            tracing::warn!("auth.jwt.jwks_url is set without auth.jwt.audience or auth.jwt.issuer: every token the JWKS keys signed is accepted, whichever application it was issued for");
        }
        if auth
            .jwt
            .secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 32)
        {
            tracing::warn!("auth.jwt.secret is shorter than 32 bytes; HS256 secrets should be at least as long as the hash");
        }
        Ok(Authenticator {
            configured: auth.mode,
            static_source,
            bootstrap,
            jwt,
            store,
            service_identities: Default::default(),
            metrics,
            sensitive_debug: config.log.sensitive_debug,
        })
    }

    /// The remote JWKS, for readiness.
    pub fn remote_jwks(&self) -> Option<&Arc<RemoteJwks>> {
        self.jwt.remote()
    }

    /// The mode in force now: in the default mode, creating the first service token
    /// switches enforcement on without a restart.
    pub fn mode(&self) -> ModeReport {
        let (effective, enforced) = self.enforcement();
        let reason = match (self.configured, self.static_source) {
            (Some(AuthMode::Disabled), _) => "auth.mode is disabled".to_string(),
            (Some(AuthMode::Required), _) => "auth.mode is required".to_string(),
            (Some(AuthMode::Optional), _) => "auth.mode is optional".to_string(),
            (None, Some(source)) => format!("auth.mode is unset and {source}"),
            (None, None) if enforced => {
                "auth.mode is unset and an active service token exists".to_string()
            }
            (None, None) => "auth.mode is unset and no credential source exists".to_string(),
        };
        ModeReport {
            effective,
            enforced,
            reason,
        }
    }

    /// The effective mode and whether authentication is enforced, without the reason:
    /// what each request needs.
    pub fn enforcement(&self) -> (AuthMode, bool) {
        match self.configured {
            Some(AuthMode::Disabled) => (AuthMode::Disabled, false),
            Some(AuthMode::Required) => (AuthMode::Required, true),
            Some(AuthMode::Optional) => (AuthMode::Optional, false),
            None if self.static_source.is_some() || self.store.has_active() => {
                (AuthMode::Required, true)
            }
            None => (AuthMode::Optional, false),
        }
    }

    /// Authenticates one request for `route`. `websocket` selects the upgrade credential
    /// sources. Disabled mode and public routes skip authentication: the caller is then
    /// anonymous and authorization has nothing to check.
    pub async fn authenticate_request(
        &self,
        route: &Route,
        headers: &HeaderMap,
        query: Option<&str>,
        websocket: bool,
        client_ip: &str,
    ) -> Result<Caller, AuthFailure> {
        let (effective, enforced) = self.enforcement();
        if effective == AuthMode::Disabled || route.public {
            return Ok(Caller {
                identity: anonymous(),
                token: None,
                skipped: true,
            });
        }
        let credential = if websocket {
            credential::from_websocket(headers, query)
        } else {
            credential::from_http(headers)
        };
        match credential {
            Credential::None if !enforced => Ok(Caller {
                identity: anonymous(),
                token: None,
                skipped: false,
            }),
            credential => self.bearer(credential, client_ip).await,
        }
    }

    /// Authenticates a request that always needs a Bearer credential in its
    /// `Authorization` header, whatever the mode (the token admin API).
    pub async fn authenticate_bearer(
        &self,
        headers: &HeaderMap,
        client_ip: &str,
    ) -> Result<Caller, AuthFailure> {
        self.bearer(credential::from_http(headers), client_ip).await
    }

    async fn bearer(&self, credential: Credential, client_ip: &str) -> Result<Caller, AuthFailure> {
        let error = match credential {
            Credential::Bearer { token, .. } => {
                let identity = self.authenticate(&token, client_ip).await?;
                return Ok(Caller {
                    identity,
                    token: Some(token),
                    skipped: false,
                });
            }
            Credential::None => AuthError::MissingToken,
            Credential::BadScheme => AuthError::InvalidScheme,
        };
        let failure = AuthFailure::bare(error);
        failure::report(&self.metrics, "none", &failure, client_ip, None);
        Err(failure)
    }

    /// What a token is, in the contract's order: bootstrap, service token, JWT.
    pub async fn authenticate(
        &self,
        token: &str,
        client_ip: &str,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let dotted = token.contains('.');
        // The token's SHA-256, when something needs it: the comparison with the bootstrap
        // token, and the service-token lookup (its hex). Computed once.
        let hashed = (!dotted || self.bootstrap.as_ref().is_some_and(|b| b.dotted))
            .then(|| secret_digest(token));
        let is_bootstrap = match (&self.bootstrap, &hashed) {
            (Some(bootstrap), Some(hashed)) => constant_time_eq(&bootstrap.digest, hashed),
            _ => false,
        };
        let method = if is_bootstrap {
            AuthMethod::Bootstrap
        } else if dotted {
            AuthMethod::Jwt
        } else {
            AuthMethod::ServiceToken
        };
        let result = if token.len() > MAX_TOKEN_BYTES {
            Err(AuthFailure::token(AuthError::InvalidToken))
        } else {
            match method {
                AuthMethod::Bootstrap => self.bootstrap_identity(client_ip),
                // Service tokens are base64url and never contain a dot; JWTs always do.
                AuthMethod::ServiceToken => {
                    let hash = hex(&hashed.unwrap_or_else(|| secret_digest(token)));
                    self.service_token(&hash).await
                }
                _ if self.jwt.has_sources() => {
                    self.jwt
                        .verify(token, crate::time::since_epoch().as_secs_f64())
                        .await
                }
                _ => Err(AuthFailure::token(AuthError::InvalidToken)),
            }
        };
        match &result {
            Ok(identity) => {
                let successes = &self.metrics.auth_successes;
                match method {
                    AuthMethod::Jwt => successes.jwt.inc(),
                    AuthMethod::ServiceToken => successes.service_token.inc(),
                    AuthMethod::Bootstrap => successes.bootstrap.inc(),
                    AuthMethod::None => {}
                }
                if self.sensitive_debug {
                    tracing::debug!(
                        method = method.as_str(),
                        token_id = %identity.token_id,
                        subject = %identity.subject,
                        identity_type = identity.identity_type.as_str(),
                        scopes = %identity.scopes_header(),
                        workspaces = %identity.workspaces.header_value(),
                        expires_at = identity.expires_at,
                        token_fingerprint = %fingerprint(token),
                        "authenticated"
                    );
                } else {
                    tracing::debug!(method = method.as_str(), token_id = %identity.token_id, "authenticated");
                }
            }
            Err(failure) => failure::report(
                &self.metrics,
                method.as_str(),
                failure,
                client_ip,
                Some(token),
            ),
        }
        result
    }

    fn bootstrap_identity(&self, client_ip: &str) -> Result<Arc<Identity>, AuthFailure> {
        let Some(bootstrap) = &self.bootstrap else {
            return Err(AuthFailure::token(AuthError::InvalidToken));
        };
        if bootstrap
            .expires_at
            .is_some_and(|at| at <= Timestamp::now())
        {
            return Err(AuthFailure::of(
                AuthError::TokenExpired(Expired::Bootstrap),
                "bootstrap",
            ));
        }
        tracing::warn!(
            client_ip,
            "the bootstrap service token was used; replace it with a persistent service token"
        );
        Ok(Arc::new(Identity {
            subject: "bootstrap".into(),
            identity_type: IdentityType::Service,
            token_id: "bootstrap".into(),
            scopes: bootstrap.scopes.clone(),
            workspaces: Workspaces {
                all: true,
                ids: BTreeSet::new(),
            },
            method: AuthMethod::Bootstrap,
            expires_at: bootstrap.expires_at.map(|t| t.0),
            values: Default::default(),
        }))
    }

    /// The service token whose secret hashes to `hash` (lowercase hex SHA-256).
    async fn service_token(&self, hash: &str) -> Result<Arc<Identity>, AuthFailure> {
        let record = match self.store.lookup(hash).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(AuthFailure::token(AuthError::InvalidToken)),
            Err(error) => {
                tracing::error!(%error, backend = self.store.backend(), "service token lookup failed");
                return Err(AuthFailure::token(AuthError::BackendUnavailable));
            }
        };
        if record.revoked_at.is_some() {
            return Err(AuthFailure::of(
                AuthError::TokenRevoked,
                record.identifier.clone(),
            ));
        }
        if record.expires_at.is_some_and(|at| at <= Timestamp::now()) {
            return Err(AuthFailure::of(
                AuthError::TokenExpired(Expired::Service),
                record.identifier.clone(),
            ));
        }
        self.store.record_use(&record.identifier);
        Ok(self.service_identities.of(&record))
    }
}

/// The anonymous identity, shared: public routes and anonymous callers allocate nothing.
fn anonymous() -> Arc<Identity> {
    static ANONYMOUS: std::sync::LazyLock<Arc<Identity>> =
        std::sync::LazyLock::new(|| Arc::new(Identity::anonymous()));
    ANONYMOUS.clone()
}
