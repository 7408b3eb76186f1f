//! The service-token admin API (contract §8), served by the gateway itself on the main
//! listeners and never forwarded: create, list, show, rotate, revoke, audit — with the
//! paths, scopes, shapes, statuses and messages of Orcheo's backend.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::time::Duration;

use crate::auth::identity::Identity;
use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::routing::NormalizedPath;
use crate::store::{Change, TokenStore, WriteError};
use crate::time::Timestamp;
use crate::tokens::{self, Actor, CreateRequest, RevokeRequest, RotateRequest};

/// The API's path prefix.
pub const PREFIX: [&str; 3] = ["api", "admin", "service-tokens"];
/// Scope to read tokens.
pub const READ: &str = "admin:tokens:read";
/// Scope to change tokens.
pub const WRITE: &str = "admin:tokens:write";
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Whether `path` is under the API.
pub fn is_api(path: &NormalizedPath) -> bool {
    path.starts_with(&PREFIX)
}

/// The scope a request needs.
pub fn scope_for(method: &Method) -> &'static str {
    if method == Method::GET || method == Method::HEAD {
        READ
    } else {
        WRITE
    }
}

/// Answers one API request from an already authorized caller. A request body must
/// arrive whole within `body_timeout`.
pub async fn handle(
    store: &dyn TokenStore,
    path: &NormalizedPath,
    request: Request<Incoming>,
    caller: &Identity,
    client_ip: &str,
    body_timeout: Duration,
) -> Result<Response<Body>, GatewayError> {
    let rest: Vec<&str> = path.segments().skip(PREFIX.len()).collect();
    let actor = Actor {
        token_id: Some(caller.token_id.clone()),
        ip: Some(client_ip.to_string()),
        user_agent: request
            .headers()
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let method = request.method().clone();
    match (method, rest.as_slice()) {
        (Method::POST, []) => create(store, body(request, body_timeout).await?, &actor).await,
        (Method::GET, []) => list(store, request.uri().query()).await,
        (Method::GET, [id]) => show(store, id).await,
        (Method::POST, [id, "rotate"]) => {
            rotate(store, id, body(request, body_timeout).await?, &actor).await
        }
        (Method::DELETE, [id]) => {
            revoke(store, id, body(request, body_timeout).await?, &actor).await
        }
        (Method::GET, [id, "audit"]) => audit(store, id).await,
        _ => Err(GatewayError::RouteNotFound),
    }
}

/// Reads and parses a JSON body (an empty body is `{}`); anything else is 422. A body
/// that has not arrived within `limit` is refused (400): a slow client holds no handler.
async fn body<T: DeserializeOwned>(
    request: Request<Incoming>,
    limit: Duration,
) -> Result<T, GatewayError> {
    let collect = Limited::new(request.into_body(), MAX_BODY).collect();
    let bytes: Bytes = tokio::time::timeout(limit, collect)
        .await
        .map_err(|_| GatewayError::InvalidRequest("Request body did not arrive in time".into()))?
        .map_err(|_| {
            GatewayError::Unprocessable(format!(
                "Request body must be JSON of at most {MAX_BODY} bytes"
            ))
        })?
        .to_bytes();
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(text)
        .map_err(|e| GatewayError::Unprocessable(format!("Invalid request body: {e}")))
}

fn respond(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn unavailable(error: impl std::fmt::Display) -> GatewayError {
    tracing::error!(%error, "service token store failed");
    GatewayError::StoreUnavailable
}

fn write_error(error: WriteError) -> GatewayError {
    match error {
        WriteError::Conflict(id) => GatewayError::TokenConflict(id),
        WriteError::Store(error) => unavailable(error),
    }
}

async fn existing(
    store: &dyn TokenStore,
    id: &str,
) -> Result<crate::store::TokenRecord, GatewayError> {
    store
        .get(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| GatewayError::TokenNotFound(id.to_string()))
}

async fn create(
    store: &dyn TokenStore,
    request: CreateRequest,
    actor: &Actor,
) -> Result<Response<Body>, GatewayError> {
    let (record, secret) = tokens::create(request).map_err(GatewayError::Unprocessable)?;
    let event = actor.event(&record.identifier, "created", None);
    let change = Change {
        insert: Some(record.clone()),
        update: None,
        audit: vec![event],
    };
    store.write(change).await.map_err(write_error)?;
    tracing::info!(token_id = %record.identifier, actor = actor.token_id.as_deref().unwrap_or(""), "service token created");
    let message = "Store this token securely. It will not be shown again.".to_string();
    Ok(respond(
        StatusCode::CREATED,
        &tokens::to_json(&record, Some(&secret), Some(message)),
    ))
}

async fn list(store: &dyn TokenStore, query: Option<&str>) -> Result<Response<Body>, GatewayError> {
    let wanted = crate::query::first(query, "status");
    if let Some(status) = wanted.as_deref() {
        if !["active", "expired", "revoked", "rotating"].contains(&status) {
            return Err(GatewayError::Unprocessable(
                "status must be one of active, expired, revoked, rotating".into(),
            ));
        }
    }
    let now = Timestamp::now();
    let tokens: Vec<Value> = store
        .list()
        .await
        .map_err(unavailable)?
        .iter()
        .filter(|t| {
            wanted
                .as_deref()
                .is_none_or(|w| tokens::status(t, now) == w)
        })
        .map(|t| tokens::to_json(t, None, None))
        .collect();
    Ok(respond(
        StatusCode::OK,
        &json!({"total": tokens.len(), "tokens": tokens}),
    ))
}

async fn show(store: &dyn TokenStore, id: &str) -> Result<Response<Body>, GatewayError> {
    let record = existing(store, id).await?;
    Ok(respond(
        StatusCode::OK,
        &tokens::to_json(&record, None, None),
    ))
}

async fn rotate(
    store: &dyn TokenStore,
    id: &str,
    request: RotateRequest,
    actor: &Actor,
) -> Result<Response<Body>, GatewayError> {
    let old = existing(store, id).await?;
    if old.revoked_at.is_some() {
        return Err(GatewayError::TokenRevoked(id.to_string()));
    }
    let (ended, new, secret, overlap) =
        tokens::rotate(&old, request).map_err(GatewayError::Unprocessable)?;
    let details = json!({"rotated_to": new.identifier, "overlap_seconds": overlap});
    let audit = vec![
        actor.event(
            &new.identifier,
            "created",
            Some(json!({"rotated_from": id})),
        ),
        actor.event(id, "rotated", Some(details)),
    ];
    let change = Change {
        insert: Some(new.clone()),
        update: Some(ended),
        audit,
    };
    store.write(change).await.map_err(write_error)?;
    tracing::info!(token_id = %id, new_token_id = %new.identifier, overlap, "service token rotated");
    let message = format!("New token created. Old token '{id}' valid for {overlap}s.");
    Ok(respond(
        StatusCode::OK,
        &tokens::to_json(&new, Some(&secret), Some(message)),
    ))
}

async fn revoke(
    store: &dyn TokenStore,
    id: &str,
    request: RevokeRequest,
    actor: &Actor,
) -> Result<Response<Body>, GatewayError> {
    let mut record = existing(store, id).await?;
    let reason = request.reason.trim().to_string();
    record.revoked_at = Some(Timestamp::now());
    record.revocation_reason = (!reason.is_empty()).then(|| reason.clone());
    let details = (!reason.is_empty()).then(|| json!({"reason": reason}));
    let change = Change {
        insert: None,
        update: Some(record),
        audit: vec![actor.event(id, "revoked", details)],
    };
    store.write(change).await.map_err(write_error)?;
    tracing::info!(token_id = %id, "service token revoked");
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn audit(store: &dyn TokenStore, id: &str) -> Result<Response<Body>, GatewayError> {
    existing(store, id).await?;
    let events: Vec<Value> = store
        .audit(id)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|e| {
            json!({
                "action": e.action,
                "actor": e.actor,
                "ip_address": e.ip_address,
                "user_agent": e.user_agent,
                "timestamp": e.timestamp.to_string(),
                "details": e.details,
            })
        })
        .collect();
    Ok(respond(StatusCode::OK, &json!({"events": events})))
}
