//! THE request pipeline: resolve the client → the gateway's own endpoints → route →
//! authenticate → authorize → limit (the shared [`decide`]) → forward (HTTP or
//! WebSocket); on error, the one mapping; then metrics and the access log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::access_log::{AccessRecord, RouteLabel};
use crate::auth::Caller;
use crate::authz;
use crate::body::{self, Body};
use crate::client_ip;
use crate::conn::ConnInfo;
use crate::decision::{
    decide, guard, identify, limit_client, refusal, Matched, Original, RequestContext,
};
use crate::error::GatewayError;
use crate::forward_auth;
use crate::proxy::headers::{self, Forwarding, X_REQUEST_ID};
use crate::proxy::{websocket, UpstreamClient};
use crate::query;
use crate::routing::NormalizedPath;
use crate::state::{Shared, Snapshot};
use crate::tokens_api;

/// Where the gateway serves the public key of its identity assertions.
pub const ASSERTION_JWKS_PATH: &str = "/.well-known/orcheo-gateway/jwks.json";

/// Answers one request on a proxy listener. Never fails: every error becomes its response.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let snapshot = shared.snapshot();
    let ctx = RequestContext::new(shared, &snapshot, conn, request.headers());
    let mut record = AccessRecord::new(&request, ctx.client_ip, &ctx.request_id);
    let mut response = match pipeline(&ctx, request, &mut record).await {
        Ok(response) => response,
        Err(error) => {
            record.error = Some(error.to_string());
            error.to_response()
        }
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID, ctx.request_id.clone());
    record.finish(&shared.metrics, response.status(), started);
    response
}

async fn pipeline(
    ctx: &RequestContext<'_>,
    request: Request<Incoming>,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    check_head_size(ctx.snapshot, &request)?;
    // Forward-auth puts the client limit after its replays: an ingress's second question
    // about a request must get the first answer, not one the first answer caused.
    // The gateway's own endpoints are boxed: inline, their state (the admin API's store
    // calls, forward-auth's replays) would make every proxied request's future larger,
    // and futures are moved by copying.
    if forward_auth::is_endpoint(request.uri().path(), &ctx.snapshot.config.forward_auth) {
        return Box::pin(forward_auth::answer(ctx, request, record)).await;
    }
    limit_client(ctx).await?;
    if request.uri().path() == ASSERTION_JWKS_PATH {
        return assertion_jwks(ctx);
    }
    let path = NormalizedPath::parse(request.uri().path())?;
    if tokens_api::is_api(&path) {
        return Box::pin(admin_api(ctx, request, &path, record)).await;
    }
    let original = Original {
        method: request.method(),
        path: &path,
        headers: request.headers(),
        query: request.uri().query(),
        websocket: websocket::is_upgrade(&request),
    };
    let websocket = original.websocket;
    let (matched, caller) = decide(ctx, &original, record).await?;
    forward(ctx, request, &matched, &path, &caller, websocket, record).await
}

/// Sends the request on to the route's upstream, as HTTP or as a WebSocket relay.
async fn forward(
    ctx: &RequestContext<'_>,
    mut request: Request<Incoming>,
    matched: &Matched<'_>,
    path: &NormalizedPath,
    caller: &Caller,
    websocket: bool,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    let route = matched.route;
    let upstream = &route.target;
    record.upstream = Some(upstream.label());
    let timeout = route.config.timeout.map_or(upstream.timeout(), |t| t.get());
    let query = query::without_credentials(request.uri().query());
    let uri = upstream.uri(|out| route.push_upstream_path(path, out), query.as_deref())?;
    rewrite_headers(ctx, &mut request, caller, upstream)?;
    if websocket {
        // Boxed: the upgrade's state (connect, handshake, relay setup) is large and rare;
        // inline, every plain request's future would carry its space.
        return Box::pin(forward_websocket(
            ctx, request, uri, upstream, caller, timeout,
        ))
        .await;
    }
    upstream.send(request, uri, timeout).await
}

/// Opens the upstream WebSocket and hands the connection to the relay.
async fn forward_websocket(
    ctx: &RequestContext<'_>,
    request: Request<Incoming>,
    uri: http::Uri,
    upstream: &UpstreamClient,
    caller: &Caller,
    timeout: Duration,
) -> Result<Response<Body>, GatewayError> {
    let websocket_slot = ctx
        .shared
        .websockets
        .clone()
        .try_acquire_owned()
        .map_err(|_| GatewayError::TooManyWebSockets)?;
    let stream = upstream.connect().await?;
    let limits = &ctx.snapshot.config.limits;
    let settings = websocket::RelaySettings {
        max_message: usize::try_from(limits.websocket_max_message.0).unwrap_or(usize::MAX),
        idle_timeout: limits.websocket_idle_timeout.get(),
        metrics: ctx.shared.metrics.clone(),
        store: ctx.shared.services.store.clone(),
        lifecycle: ctx.conn.lifecycle.clone(),
        websocket_slot: Arc::new(websocket_slot),
    };
    let watched =
        websocket::WatchedCredential::new(caller.identity.clone(), caller.token.as_deref());
    websocket::proxy(request, uri, stream, timeout, watched, settings).await
}

/// The token admin API: always authenticated (in every mode), scoped by method.
async fn admin_api(
    ctx: &RequestContext<'_>,
    request: Request<Incoming>,
    path: &NormalizedPath,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    record.route = RouteLabel::Fixed("admin-api");
    let scope = [tokens_api::scope_for(request.method()).to_string()];
    let outcome = ctx
        .snapshot
        .auth
        .authenticate_bearer(request.headers(), &ctx.client)
        .await
        .and_then(|caller| {
            authz::authorize(&caller.identity, &scope, None)
                .map_err(|error| refusal(ctx, &caller, error))
                .map(|()| caller)
        });
    let caller = guard(ctx, outcome, record).await?;
    let store = ctx.shared.services.store.as_ref();
    let body_timeout = ctx.snapshot.config.limits.header_read_timeout.get();
    tokens_api::handle(
        store,
        path,
        request,
        &caller.identity,
        &ctx.client,
        body_timeout,
    )
    .await
}

fn assertion_jwks(ctx: &RequestContext<'_>) -> Result<Response<Body>, GatewayError> {
    if !ctx.snapshot.config.identity.assertion.enabled {
        return Err(GatewayError::RouteNotFound);
    }
    let mut response = Response::new(body::full(ctx.shared.signer.jwks().to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Refuses a request head larger than `limits.max_header_bytes` with the JSON 431.
fn check_head_size(snapshot: &Snapshot, request: &Request<Incoming>) -> Result<(), GatewayError> {
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let size = headers::head_size(request.method().as_str(), target, request.headers());
    if size as u64 > snapshot.config.limits.max_header_bytes.0 {
        return Err(GatewayError::HeaderTooLarge(size));
    }
    Ok(())
}

/// Headers the rewriting may add to a request: `Host`, four forwarding headers, the
/// identity headers and the credential.
const ADDED_HEADERS: usize = 12;

/// Rewrites the request headers for the upstream (contract §5): hop-by-hop and inbound
/// identity headers out, forwarding headers set, then who the caller is.
fn rewrite_headers(
    ctx: &RequestContext<'_>,
    request: &mut Request<Incoming>,
    caller: &Caller,
    upstream: &UpstreamClient,
) -> Result<(), GatewayError> {
    let snapshot = ctx.snapshot;
    // The client's `Host` stays as it came. HTTP/2 carries the host in `:authority`; the
    // upstream speaks HTTP/1.1 and needs `Host`, so that is set from it, or, with
    // neither, the upstream's own.
    let sent_host = request.headers().get(HOST).cloned();
    let host_sent = sent_host.is_some();
    let host = sent_host.or_else(|| {
        let authority = request.uri().authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    // With the PROXY protocol the peer is the address its header carries: a client behind
    // a trusted L4 balancer is still an untrusted client.
    let proxies = &snapshot.config.trusted_proxies;
    let peer_trusted = client_ip::is_trusted(proxies, ctx.conn.peer.ip());
    let headers = request.headers_mut();
    // Room for what is added below (forwarding, request id, identity headers) at once,
    // instead of the map growing several times on the way.
    headers.reserve(ADDED_HEADERS);
    headers::strip_inbound(headers, &snapshot.identity_headers, peer_trusted);
    if !host_sent {
        let value = host.as_ref().unwrap_or(upstream.host_header());
        headers.insert(HOST, value.clone());
    }
    let forwarding = Forwarding {
        peer: ctx.conn.peer.ip(),
        peer_header: &ctx.conn.peer_text.header,
        peer_trusted,
        scheme: if ctx.conn.tls { "https" } else { "http" },
        host: host.as_ref(),
        request_id: &ctx.request_id,
    };
    headers::set_forwarding(headers, &forwarding);
    identify(ctx, headers, caller, upstream.name())?;
    forward_credential(ctx, headers, caller)
}

/// Hands the caller's credential to the upstream (contract §5) when
/// `forward_credentials` is on, and removes it when it is off.
fn forward_credential(
    ctx: &RequestContext<'_>,
    headers: &mut HeaderMap,
    caller: &Caller,
) -> Result<(), GatewayError> {
    if !ctx.snapshot.config.identity.forward_credentials {
        headers.remove(AUTHORIZATION);
    } else if let Some(token) = &caller.token {
        let sent = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
        if sent.and_then(|v| v.strip_prefix(b"Bearer ")) == Some(token.as_bytes()) {
            // Already in the form the upstream gets.
            return Ok(());
        }
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| GatewayError::InvalidRequest("Invalid credential".into()))?;
        headers.insert(AUTHORIZATION, value);
    } else if !caller.skipped {
        headers.remove(AUTHORIZATION);
    }
    Ok(())
}
