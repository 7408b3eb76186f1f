//! The errors the gateway answers with, and the ONE mapping from an error to its status,
//! JSON body and headers (contract §10.1). What the client is told is short and fixed; the
//! cause travels separately to the log.

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::auth::failure::{AuthError, AuthFailure, RETRY_AFTER_UNAVAILABLE};
use crate::body::{self, Body};
use crate::ratelimit::{Kind, Limited};
use crate::routing::PathError;

/// An error answered by the gateway itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// No route matches the request.
    #[error("no route matches the request")]
    RouteNotFound,
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request path was refused.
    #[error("invalid request path: {}", .0.message())]
    InvalidPath(PathError),
    /// The request head exceeds `limits.max_header_bytes`.
    #[error("request head of {0} bytes exceeds the limit")]
    HeaderTooLarge(usize),
    /// The upstream refused or could not be reached; the cause is for the log.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The upstream did not answer within its timeout.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    /// Authentication or authorization refused the request.
    #[error("{}", .0.error.code())]
    Auth(AuthFailure),
    /// A rate limit refused the request.
    #[error("rate limited ({})", .0.kind.as_str())]
    RateLimited(Limited),
    /// A well-formed request whose content is refused (422).
    #[error("unprocessable request: {0}")]
    Unprocessable(String),
    /// No service token with this id.
    #[error("service token {0} not found")]
    TokenNotFound(String),
    /// A service token with this id exists already.
    #[error("service token {0} exists already")]
    TokenConflict(String),
    /// A revoked service token cannot be rotated.
    #[error("service token {0} is revoked")]
    TokenRevoked(String),
    /// The token store cannot be reached (admin API).
    #[error("service token store unavailable")]
    StoreUnavailable,
    /// A forward-auth request from outside `trusted_proxies` (403).
    #[error("forward-auth request from an untrusted caller")]
    UntrustedCaller,
    /// `limits.max_websockets` relays are open already (503).
    #[error("too many WebSocket connections")]
    TooManyWebSockets,
    /// The gateway's own failure (a signing key that fails, a value it built that is not
    /// valid): 500, never blamed on the upstream or the client.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The JSON body of every gateway error: flat, and again under `detail` as Orcheo's
/// backend answers, so both kinds of client can read it.
#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    detail: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
}

impl GatewayError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::RouteNotFound => "route.not_found",
            GatewayError::InvalidRequest(_) | GatewayError::InvalidPath(_) => "request.invalid",
            GatewayError::HeaderTooLarge(_) => "request.header_too_large",
            GatewayError::UpstreamUnavailable(_) => "upstream.unavailable",
            GatewayError::UpstreamTimeout(_) => "upstream.timeout",
            GatewayError::Auth(failure) => failure.error.code(),
            GatewayError::Unprocessable(_) => "request.invalid",
            GatewayError::TokenNotFound(_) => "token.not_found",
            GatewayError::TokenConflict(_) => "token.conflict",
            GatewayError::TokenRevoked(_) => "token.revoked",
            GatewayError::StoreUnavailable => "auth.backend_unavailable",
            GatewayError::Internal(_) => "internal",
            GatewayError::TooManyWebSockets => "upstream.unavailable",
            GatewayError::UntrustedCaller => "forward_auth.untrusted_caller",
            GatewayError::RateLimited(limited) => match limited.kind {
                Kind::Ip => "auth.rate_limited.ip",
                Kind::Identity => "auth.rate_limited.identity",
                Kind::Route => "rate_limited.route",
            },
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::RouteNotFound => StatusCode::NOT_FOUND,
            GatewayError::InvalidRequest(_) | GatewayError::InvalidPath(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::HeaderTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Auth(failure) => failure.error.status(),
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::TokenNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::TokenConflict(_) | GatewayError::TokenRevoked(_) => StatusCode::CONFLICT,
            GatewayError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::TooManyWebSockets => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UntrustedCaller => StatusCode::FORBIDDEN,
        }
    }

    /// The message the client sees.
    pub fn message(&self) -> std::borrow::Cow<'_, str> {
        match self {
            GatewayError::RouteNotFound => "No route for this request".into(),
            GatewayError::InvalidRequest(message) => message.as_str().into(),
            GatewayError::InvalidPath(error) => error.message().into(),
            GatewayError::HeaderTooLarge(_) => "Request headers too large".into(),
            GatewayError::UpstreamUnavailable(_) => "Upstream service is unavailable".into(),
            GatewayError::UpstreamTimeout(_) => "Upstream service timed out".into(),
            GatewayError::Auth(failure) => failure.error.message().into(),
            GatewayError::Unprocessable(message) => message.as_str().into(),
            GatewayError::TokenNotFound(id) => format!("Service token '{id}' not found").into(),
            GatewayError::TokenConflict(id) => {
                format!("Service token '{id}' already exists").into()
            }
            GatewayError::TokenRevoked(id) => {
                format!("Service token '{id}' has been revoked and cannot be rotated").into()
            }
            GatewayError::StoreUnavailable => "Service token store is unavailable".into(),
            GatewayError::Internal(_) => "Internal gateway error".into(),
            GatewayError::TooManyWebSockets => "Upstream service is unavailable".into(),
            GatewayError::UntrustedCaller => {
                "Forward-auth requests are accepted only from trusted proxies".into()
            }
            GatewayError::RateLimited(limited) => match limited.kind {
                Kind::Ip => format!(
                    "Too many authentication attempts from IP {}",
                    limited.subject
                )
                .into(),
                Kind::Identity => format!(
                    "Too many authentication attempts for identity {}",
                    limited.subject
                )
                .into(),
                Kind::Route => "Too many requests".into(),
            },
        }
    }

    /// The complete response: status, JSON body and headers.
    pub fn to_response(&self) -> Response<Body> {
        let mut response = json_error(self.status(), self.code(), &self.message());
        match self {
            GatewayError::Auth(failure) => add_auth_headers(&mut response, failure),
            GatewayError::RateLimited(limited) => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(limited.retry_after));
            }
            GatewayError::StoreUnavailable | GatewayError::TooManyWebSockets => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_UNAVAILABLE));
            }
            _ => {}
        }
        response
    }
}

impl From<PathError> for GatewayError {
    fn from(error: PathError) -> Self {
        GatewayError::InvalidPath(error)
    }
}

/// `WWW-Authenticate` on 401s and scope 403s (RFC 6750 §3), `Retry-After` on 503s.
fn add_auth_headers(response: &mut Response<Body>, failure: &AuthFailure) {
    let challenge = match &failure.error {
        AuthError::MissingScope(missing) => Some(format!(
            r#"Bearer realm="orcheo", error="insufficient_scope", scope="{}""#,
            missing.join(" ")
        )),
        error if error.status() == StatusCode::UNAUTHORIZED && failure.token_presented => {
            Some(r#"Bearer realm="orcheo", error="invalid_token""#.to_string())
        }
        error if error.status() == StatusCode::UNAUTHORIZED => {
            Some(r#"Bearer realm="orcheo""#.to_string())
        }
        _ => None,
    };
    if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    if failure.error.status() == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_UNAVAILABLE));
    }
}

/// The JSON body of an error in the gateway's shape.
pub fn json_body(code: &str, message: &str) -> Vec<u8> {
    let body = ErrorBody {
        code,
        message,
        detail: Detail { code, message },
    };
    // Serializing two string fields cannot fail; the fallback keeps the response valid anyway.
    serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
}

/// A JSON error response in the gateway's shape.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let bytes = json_body(code, message);
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
