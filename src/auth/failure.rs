//! Why authentication or authorization failed. Each kind has one code, status and message
//! (contract §10.1); the error mapping in `error.rs` turns it into the response.

use http::StatusCode;

use crate::metrics::Metrics;

/// Which token kind expired (each has its own message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A JWT.
    Bearer,
    /// A service token.
    Service,
    /// The bootstrap token.
    Bootstrap,
}

/// A refusal of authentication or authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credential where one is needed.
    MissingToken,
    /// An `Authorization` header that is not one Bearer token.
    InvalidScheme,
    /// A credential that is not valid.
    InvalidToken,
    /// A JWT signed with an algorithm not allowed.
    UnsupportedAlgorithm,
    /// The credential's time is over.
    TokenExpired(Expired),
    /// A revoked service token.
    TokenRevoked,
    /// A JWT for another audience.
    InvalidAudience,
    /// A JWT from another issuer.
    InvalidIssuer,
    /// No key can verify the token. `unavailable`: the key source itself is down (503).
    KeyUnavailable {
        /// 503 instead of 401.
        unavailable: bool,
    },
    /// Scopes the route needs and the identity lacks, sorted.
    MissingScope(Vec<String>),
    /// The workspace asked for.
    WorkspaceForbidden(String),
    /// The service-token store cannot be reached.
    BackendUnavailable,
}

/// Seconds a client is asked to wait after a 503 from a key source or the token store.
pub const RETRY_AFTER_UNAVAILABLE: u64 = 5;

impl AuthError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "auth.missing_token",
            AuthError::InvalidScheme => "auth.invalid_scheme",
            AuthError::InvalidToken => "auth.invalid_token",
            AuthError::UnsupportedAlgorithm => "auth.unsupported_algorithm",
            AuthError::TokenExpired(_) => "auth.token_expired",
            AuthError::TokenRevoked => "auth.token_revoked",
            AuthError::InvalidAudience => "auth.invalid_audience",
            AuthError::InvalidIssuer => "auth.invalid_issuer",
            AuthError::KeyUnavailable { .. } => "auth.key_unavailable",
            AuthError::MissingScope(_) => "auth.missing_scope",
            AuthError::WorkspaceForbidden(_) => "auth.workspace_forbidden",
            AuthError::BackendUnavailable => "auth.backend_unavailable",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::MissingScope(_) | AuthError::WorkspaceForbidden(_) => StatusCode::FORBIDDEN,
            AuthError::KeyUnavailable { unavailable: true } | AuthError::BackendUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The message the client sees.
    pub fn message(&self) -> String {
        match self {
            AuthError::MissingToken => "Missing bearer token".into(),
            AuthError::InvalidScheme => "Authorization header must use the Bearer scheme".into(),
            AuthError::InvalidToken => "Invalid bearer token".into(),
            AuthError::UnsupportedAlgorithm => {
                "Bearer token is signed with an unsupported algorithm".into()
            }
            AuthError::TokenExpired(Expired::Bearer) => "Bearer token has expired".into(),
            AuthError::TokenExpired(Expired::Service) => "Service token has expired".into(),
            AuthError::TokenExpired(Expired::Bootstrap) => {
                "Bootstrap service token has expired".into()
            }
            AuthError::TokenRevoked => "Service token has been revoked".into(),
            AuthError::InvalidAudience => "Bearer token has an invalid audience".into(),
            AuthError::InvalidIssuer => "Bearer token has an invalid issuer".into(),
            AuthError::KeyUnavailable { .. } => {
                "Unable to resolve signing key for bearer token".into()
            }
            AuthError::MissingScope(missing) => {
                format!("Missing required scopes: {}", missing.join(", "))
            }
            AuthError::WorkspaceForbidden(workspace) => {
                format!("Workspace access denied for: {workspace}")
            }
            AuthError::BackendUnavailable => "Service token store is unavailable".into(),
        }
    }

    /// Whether this is a failed authentication (a 401 of §3), as counted by limits.
    pub fn is_authentication_failure(&self) -> bool {
        self.status() == StatusCode::UNAUTHORIZED
    }
}

/// A refusal with what is known about the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// What went wrong.
    pub error: AuthError,
    /// The identity the failure names, when the credential named one (a revoked service
    /// token's id, a well-signed JWT's subject): used by per-identity limits.
    pub identity: Option<String>,
    /// Whether a token was presented (decides `error="invalid_token"` on 401s).
    pub token_presented: bool,
}

impl AuthFailure {
    /// A failure about a presented token that names no identity.
    pub fn token(error: AuthError) -> Self {
        AuthFailure {
            error,
            identity: None,
            token_presented: true,
        }
    }

    /// A failure that names `identity`.
    pub fn of(error: AuthError, identity: impl Into<String>) -> Self {
        AuthFailure {
            error,
            identity: Some(identity.into()),
            token_presented: true,
        }
    }

    /// A failure with no token involved.
    pub fn bare(error: AuthError) -> Self {
        AuthFailure {
            error,
            identity: None,
            token_presented: false,
        }
    }
}

/// Counts a refusal and logs it with its code: one line per failure, naming the token
/// only by its fingerprint.
pub fn report(
    metrics: &Metrics,
    method: &str,
    failure: &AuthFailure,
    client_ip: &str,
    token: Option<&str>,
) {
    let code = failure.error.code();
    metrics
        .auth_attempts
        .with_label_values(&[method, "failure", code])
        .inc();
    tracing::warn!(
        code,
        method,
        client_ip,
        identity = failure.identity.as_deref().unwrap_or(""),
        token_fingerprint = token.map(super::fingerprint).unwrap_or_default(),
        "authentication failed"
    );
}
