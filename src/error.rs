//! The errors the gateway answers with, and the ONE mapping from an error to its status,
//! JSON body and headers (contract §10.1). What the client is told is short and fixed; the
//! cause travels separately to the log.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::body::{self, Body};
use crate::routing::PathError;

/// An error answered by the gateway itself.
#[derive(Debug, thiserror::Error)]
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
        }
    }

    /// The message the client sees.
    pub fn message(&self) -> &str {
        match self {
            GatewayError::RouteNotFound => "No route for this request",
            GatewayError::InvalidRequest(message) => message,
            GatewayError::InvalidPath(error) => error.message(),
            GatewayError::HeaderTooLarge(_) => "Request headers too large",
            GatewayError::UpstreamUnavailable(_) => "Upstream service is unavailable",
            GatewayError::UpstreamTimeout(_) => "Upstream service timed out",
        }
    }

    /// The complete response: status, JSON body and headers.
    pub fn to_response(&self) -> Response<Body> {
        json_error(self.status(), self.code(), self.message())
    }
}

impl From<PathError> for GatewayError {
    fn from(error: PathError) -> Self {
        GatewayError::InvalidPath(error)
    }
}

/// A JSON error response in the gateway's shape.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = ErrorBody {
        code,
        message,
        detail: Detail { code, message },
    };
    // Serializing two string fields cannot fail; the fallback keeps the response valid anyway.
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
