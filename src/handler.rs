//! THE request pipeline: snapshot → gateway's own paths → route → authenticate and
//! authorize → forward; on error, the one mapping; then metrics and the access log.

use std::time::Instant;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::access_log::AccessRecord;
use crate::auth::Decision;
use crate::body::{self, Body};
use crate::client_ip;
use crate::conn::ConnInfo;
use crate::error::GatewayError;
use crate::proxy::headers::{self, Forwarding, X_REQUEST_ID};
use crate::proxy::websocket;
use crate::routing::{NormalizedPath, RouteMatch};
use crate::state::{Shared, Snapshot};
use crate::tokens_api;

/// Answers one request on a proxy listener. Never fails: every error becomes its response.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let snapshot = shared.snapshot();
    let request_id = headers::request_id(request.headers());
    let client_ip = client_ip::resolve(
        conn.peer.ip(),
        request.headers(),
        &snapshot.config.trusted_proxies,
    );
    let mut record = AccessRecord::new(&request, client_ip, &request_id);
    let ctx = Context {
        shared,
        snapshot: &snapshot,
        conn,
        request_id: &request_id,
        ip_key: client_ip::limit_key(client_ip),
    };
    let mut response = match pipeline(&ctx, request, &mut record).await {
        Ok(response) => response,
        Err(error) => {
            record.error = Some(error.to_string());
            error.to_response()
        }
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    record.finish(&shared.metrics, response.status(), started);
    response
}

/// What every step of one request may consult.
struct Context<'a> {
    shared: &'a Shared,
    snapshot: &'a Snapshot,
    conn: &'a ConnInfo,
    request_id: &'a HeaderValue,
    /// The client IP as rate limiters key it (IPv6: its /64).
    ip_key: String,
}

async fn pipeline(
    ctx: &Context<'_>,
    mut request: Request<Incoming>,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    let (shared, snapshot) = (ctx.shared, ctx.snapshot);
    check_head_size(&request, snapshot)?;
    let limits = &snapshot.config.auth.rate_limit;
    shared
        .limiter
        .check_ip(limits, &ctx.ip_key, &record.client_ip)
        .await
        .map_err(GatewayError::RateLimited)?;
    if request.uri().path() == ASSERTION_JWKS_PATH {
        return assertion_jwks(shared, snapshot);
    }
    let path = NormalizedPath::parse(request.uri().path())?;
    if tokens_api::is_api(&path) {
        return admin_api(ctx, request, &path, record).await;
    }
    let matched = snapshot
        .routes
        .find(request.method(), &path)
        .ok_or(GatewayError::RouteNotFound)?;
    let route = matched.route;
    record.route = route.name.clone();
    let websocket = websocket::is_upgrade(&request);
    if websocket && !route.config.websocket {
        return Err(GatewayError::InvalidRequest(
            "WebSocket upgrades are not accepted on this route".into(),
        ));
    }
    let decision = authenticate(ctx, &matched, &request, websocket, record).await?;
    if let Some(limit) = &route.config.rate_limit {
        let identity =
            (!decision.identity.is_anonymous()).then_some(decision.identity.subject.as_str());
        shared
            .limiter
            .check_route(&route.name, limit, &ctx.ip_key, identity, &record.client_ip)
            .await
            .map_err(GatewayError::RateLimited)?;
    }
    let upstream = snapshot
        .upstreams
        .get(&route.config.upstream)
        .ok_or_else(|| GatewayError::UpstreamUnavailable("route names no known upstream".into()))?;
    record.upstream = Some(upstream.name().to_string());
    let timeout = route.config.timeout.map_or(upstream.timeout(), |t| t.get());
    if websocket {
        let query = websocket::strip_credential_params(request.uri().query());
        let uri = upstream.ws_uri(&route.upstream_path(&path), query.as_deref())?;
        return forward_websocket(ctx, request, uri, upstream, &decision, timeout).await;
    }
    let uri = upstream.uri(&route.upstream_path(&path), request.uri().query())?;
    prepare_headers(snapshot, ctx.conn, &mut request, ctx.request_id);
    identify(shared, snapshot, &mut request, &decision, upstream.name())?;
    upstream.send(request, uri, timeout, &shared.metrics).await
}

/// The token admin API: always authenticated (in every mode), scoped by method.
async fn admin_api(
    ctx: &Context<'_>,
    request: Request<Incoming>,
    path: &NormalizedPath,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    record.route = "admin-api".into();
    let scope = [tokens_api::scope_for(request.method()).to_string()];
    let outcome = ctx
        .snapshot
        .auth
        .check_bearer(request.headers(), &scope, &record.client_ip)
        .await;
    let decision = guard(ctx, outcome, record).await?;
    let store = ctx.shared.services.store.as_ref();
    tokens_api::handle(store, path, request, &decision.identity, &record.client_ip).await
}

/// Opens the upstream WebSocket and hands the connection to the relay.
async fn forward_websocket(
    ctx: &Context<'_>,
    mut request: Request<Incoming>,
    uri: http::Uri,
    upstream: &crate::proxy::UpstreamClient,
    decision: &Decision,
    timeout: std::time::Duration,
) -> Result<Response<Body>, GatewayError> {
    let (shared, snapshot) = (ctx.shared, ctx.snapshot);
    prepare_headers(snapshot, ctx.conn, &mut request, ctx.request_id);
    identify(shared, snapshot, &mut request, decision, upstream.name())?;
    let stream = upstream.connect().await?;
    let limits = &snapshot.config.limits;
    let settings = websocket::RelaySettings {
        max_message: usize::try_from(limits.websocket_max_message.0).unwrap_or(usize::MAX),
        idle_timeout: limits.websocket_idle_timeout.get(),
        metrics: shared.metrics.clone(),
        store: shared.services.store.clone(),
        lifecycle: ctx.conn.lifecycle.clone(),
    };
    let credential =
        websocket::Credential::new(decision.identity.clone(), decision.token.as_deref());
    websocket::proxy(request, uri, stream, timeout, credential, settings).await
}

/// Authenticates and authorizes, under the per-identity limit: an identity with too many
/// recent failures is refused (429) even when its credential would now pass or fail
/// again; failures are counted against the client IP and the identity they name.
async fn authenticate(
    ctx: &Context<'_>,
    matched: &RouteMatch<'_>,
    request: &Request<Incoming>,
    websocket: bool,
    record: &mut AccessRecord,
) -> Result<Decision, GatewayError> {
    let outcome = ctx
        .snapshot
        .auth
        .check(
            matched,
            request.headers(),
            request.uri().query(),
            websocket,
            &record.client_ip,
        )
        .await;
    guard(ctx, outcome, record).await
}

/// Puts an authentication outcome under the per-identity limit and counts a failure.
async fn guard(
    ctx: &Context<'_>,
    outcome: Result<Decision, crate::auth::failure::AuthFailure>,
    record: &mut AccessRecord,
) -> Result<Decision, GatewayError> {
    let (limiter, limits) = (&ctx.shared.limiter, &ctx.snapshot.config.auth.rate_limit);
    let identity = match &outcome {
        Ok(decision) => {
            (!decision.identity.is_anonymous()).then(|| decision.identity.subject.clone())
        }
        Err(failure) => failure.identity.clone(),
    };
    if let Some(identity) = &identity {
        limiter
            .check_identity(limits, identity, &record.client_ip)
            .await
            .map_err(GatewayError::RateLimited)?;
    }
    match outcome {
        Ok(decision) => {
            record.identify(&decision.identity);
            Ok(decision)
        }
        Err(failure) => {
            limiter.record_failure(limits, &failure, &ctx.ip_key).await;
            Err(GatewayError::Auth(failure))
        }
    }
}

/// Where the gateway serves the public key of its identity assertions.
pub const ASSERTION_JWKS_PATH: &str = "/.well-known/orcheo-gateway/jwks.json";

fn assertion_jwks(shared: &Shared, snapshot: &Snapshot) -> Result<Response<Body>, GatewayError> {
    if !snapshot.config.identity.assertion.enabled {
        return Err(GatewayError::RouteNotFound);
    }
    let mut response = Response::new(body::full(shared.signer.jwks().to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Tells the upstream who the caller is (contract §5): the identity headers, the
/// credential when `forward_credentials` is on, and the signed assertion when enabled.
fn identify(
    shared: &Shared,
    snapshot: &Snapshot,
    request: &mut Request<Incoming>,
    decision: &Decision,
    upstream: &str,
) -> Result<(), GatewayError> {
    let settings = &snapshot.config.identity;
    let headers = request.headers_mut();
    headers::set_identity(headers, &snapshot.identity_headers, &decision.identity);
    if !settings.forward_credentials {
        headers.remove(AUTHORIZATION);
    } else if let Some(token) = &decision.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| GatewayError::InvalidRequest("Invalid credential".into()))?;
        headers.insert(AUTHORIZATION, value);
    } else if !decision.skipped {
        headers.remove(AUTHORIZATION);
    }
    if settings.assertion.enabled {
        let now = crate::time::Timestamp::now().0;
        let ttl = settings.assertion.ttl.get().as_secs().max(1) as i64;
        let assertion = shared
            .signer
            .sign(
                &decision.identity,
                &settings.assertion.issuer,
                upstream,
                now,
                ttl,
            )
            .map_err(GatewayError::UpstreamUnavailable)?;
        let value = HeaderValue::from_str(&assertion).map_err(|_| {
            GatewayError::UpstreamUnavailable("assertion is not a header value".into())
        })?;
        if let Some(name) = snapshot.identity_headers.last() {
            headers.insert(name.clone(), value);
        }
    }
    Ok(())
}

/// Refuses a request head larger than `limits.max_header_bytes` with the JSON 431.
fn check_head_size(request: &Request<Incoming>, snapshot: &Snapshot) -> Result<(), GatewayError> {
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let size = headers::head_size(request.method().as_str(), target, request.headers());
    if size as u64 > snapshot.config.limits.max_header_bytes.0 {
        return Err(GatewayError::HeaderTooLarge(size));
    }
    Ok(())
}

/// Rewrites the request headers for the upstream (contract §5).
fn prepare_headers(
    snapshot: &Snapshot,
    conn: &ConnInfo,
    request: &mut Request<Incoming>,
    request_id: &HeaderValue,
) {
    // HTTP/2 carries the host in `:authority`; the upstream speaks HTTP/1.1 and needs `Host`.
    let host = request.headers().get(HOST).cloned().or_else(|| {
        let authority = request.uri().authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    let peer_trusted = snapshot.is_trusted(conn.socket_peer.ip());
    let headers = request.headers_mut();
    headers::strip_hop_by_hop(headers);
    headers::strip_named(headers, &snapshot.identity_headers);
    if let Some(host) = &host {
        headers.insert(HOST, host.clone());
    }
    let forwarding = Forwarding {
        peer: conn.peer.ip(),
        peer_trusted,
        scheme: if conn.tls { "https" } else { "http" },
        host: host.as_ref(),
        request_id,
    };
    headers::set_forwarding(headers, &forwarding);
}
