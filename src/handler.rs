//! THE request pipeline: resolve the client → the gateway's own endpoints → route →
//! authenticate → authorize → limit → forward (HTTP or WebSocket); on error, the one
//! mapping; then metrics and the access log. [`decide`] is the part every way of asking
//! shares (the proxy path here, forward-auth next to it).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::access_log::AccessRecord;
use crate::auth::failure::{self, AuthError, AuthFailure};
use crate::auth::Caller;
use crate::authz::{self, Refusal, AMBIGUOUS_WORKSPACE};
use crate::body::{self, Body};
use crate::client_ip;
use crate::conn::ConnInfo;
use crate::error::GatewayError;
use crate::proxy::headers::{self, Forwarding, X_REQUEST_ID};
use crate::proxy::{websocket, UpstreamClient};
use crate::query;
use crate::routing::{NormalizedPath, RouteMatch};
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
    limit_client(ctx).await?;
    if request.uri().path() == ASSERTION_JWKS_PATH {
        return assertion_jwks(ctx);
    }
    let path = NormalizedPath::parse(request.uri().path())?;
    if tokens_api::is_api(&path) {
        return admin_api(ctx, request, &path, record).await;
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

/// What every step of one request may consult: the state, the connection and the client
/// as resolved once. The access-log record is kept apart; it only records.
pub struct RequestContext<'a> {
    /// Process-wide state.
    pub shared: &'a Shared,
    /// The configuration in force for this request.
    pub snapshot: &'a Snapshot,
    /// The connection the request arrived on.
    pub conn: &'a ConnInfo,
    /// The request id, kept from the client or generated.
    pub request_id: HeaderValue,
    /// The client's address (contract §6.4).
    pub client_ip: IpAddr,
    /// The same, as text for messages and logs.
    pub client: String,
    /// The client as rate limiters key it (IPv6: its /64).
    pub ip_key: String,
}

impl<'a> RequestContext<'a> {
    /// Resolves the client and the request id of a request with `headers`.
    pub fn new(
        shared: &'a Shared,
        snapshot: &'a Snapshot,
        conn: &'a ConnInfo,
        headers: &HeaderMap,
    ) -> Self {
        let proxies = &snapshot.config.trusted_proxies;
        let client_ip = client_ip::resolve(conn.peer.ip(), headers, proxies);
        RequestContext {
            shared,
            snapshot,
            conn,
            request_id: headers::request_id(headers),
            client_ip,
            client: client_ip.to_string(),
            ip_key: client_ip::limit_key(client_ip),
        }
    }
}

/// The request a decision is about: the one being proxied, or the one an ingress asks about.
pub struct Original<'a> {
    /// Its method.
    pub method: &'a Method,
    /// Its normalised path.
    pub path: &'a NormalizedPath,
    /// The headers its credential is read from.
    pub headers: &'a HeaderMap,
    /// Its raw query.
    pub query: Option<&'a str>,
    /// Whether it asks for a WebSocket upgrade.
    pub websocket: bool,
}

/// The matched route, holding its upstream.
pub type Matched<'s> = RouteMatch<'s, Arc<UpstreamClient>>;

/// Route → authenticate → authorize → limit: whether `original` may pass, and as whom.
pub async fn decide<'s>(
    ctx: &RequestContext<'s>,
    original: &Original<'_>,
    record: &mut AccessRecord,
) -> Result<(Matched<'s>, Caller), GatewayError> {
    let matched = route(ctx.snapshot, original)?;
    record.route = matched.route.name.clone();
    let authenticated = ctx
        .snapshot
        .auth
        .authenticate_request(
            &matched.route.config,
            original.headers,
            original.query,
            original.websocket,
            &ctx.client,
        )
        .await;
    let outcome = match authenticated {
        Ok(caller) => {
            match authz::authorize_route(&caller, &matched, original.headers, original.query) {
                Ok(()) => Ok(caller),
                Err(Refusal::Denied(error)) => Err(refusal(ctx, &caller, error)),
                Err(Refusal::AmbiguousWorkspace) => {
                    return Err(GatewayError::InvalidRequest(AMBIGUOUS_WORKSPACE.into()))
                }
            }
        }
        Err(failure) => Err(failure),
    };
    let caller = guard(ctx, outcome, record).await?;
    limit_route(ctx, &matched, &caller).await?;
    Ok((matched, caller))
}

/// The first route for the request; upgrades only where the route accepts them.
fn route<'s>(snapshot: &'s Snapshot, original: &Original<'_>) -> Result<Matched<'s>, GatewayError> {
    let matched = snapshot
        .routes
        .find(original.method, original.path)
        .ok_or(GatewayError::RouteNotFound)?;
    if original.websocket && !matched.route.config.websocket {
        return Err(GatewayError::InvalidRequest(
            "WebSocket upgrades are not accepted on this route".into(),
        ));
    }
    Ok(matched)
}

/// An authorization refusal of an authenticated caller, reported like any auth failure.
fn refusal(ctx: &RequestContext<'_>, caller: &Caller, error: AuthError) -> AuthFailure {
    let identity = &caller.identity;
    let failure = AuthFailure {
        identity: (!identity.is_anonymous()).then(|| identity.subject.clone()),
        token_presented: caller.token.is_some() && error == AuthError::MissingToken,
        error,
    };
    let method = identity.method.as_str();
    let metrics = &ctx.shared.metrics;
    failure::report(
        metrics,
        method,
        &failure,
        &ctx.client,
        caller.token.as_deref(),
    );
    failure
}

/// A client blocked for its failed authentications is refused on every path (§6.1).
async fn limit_client(ctx: &RequestContext<'_>) -> Result<(), GatewayError> {
    let limits = &ctx.snapshot.config.auth.rate_limit;
    ctx.shared
        .limiter
        .check_ip(limits, &ctx.ip_key, &ctx.client)
        .await
        .map_err(GatewayError::RateLimited)
}

/// Puts an authentication outcome under the per-identity limit (§6.2): an identity with
/// too many recent failures is refused even when its credential would now pass; a
/// failure counts against the client and the identity it names.
async fn guard(
    ctx: &RequestContext<'_>,
    outcome: Result<Caller, AuthFailure>,
    record: &mut AccessRecord,
) -> Result<Caller, GatewayError> {
    let (limiter, limits) = (&ctx.shared.limiter, &ctx.snapshot.config.auth.rate_limit);
    let identity = match &outcome {
        Ok(caller) => (!caller.identity.is_anonymous()).then(|| caller.identity.subject.clone()),
        Err(failure) => failure.identity.clone(),
    };
    if let Some(identity) = &identity {
        limiter
            .check_identity(limits, identity, &ctx.client)
            .await
            .map_err(GatewayError::RateLimited)?;
    }
    match outcome {
        Ok(caller) => {
            record.identify(&caller.identity);
            Ok(caller)
        }
        Err(failure) => {
            limiter.record_failure(limits, &failure, &ctx.ip_key).await;
            Err(GatewayError::Auth(failure))
        }
    }
}

/// The route's own request-rate limit (§6.3), per client or per identity.
async fn limit_route(
    ctx: &RequestContext<'_>,
    matched: &Matched<'_>,
    caller: &Caller,
) -> Result<(), GatewayError> {
    let route = matched.route;
    let Some(limit) = &route.config.rate_limit else {
        return Ok(());
    };
    let identity = &caller.identity;
    let identity = (!identity.is_anonymous()).then_some(identity.subject.as_str());
    ctx.shared
        .limiter
        .check_route(&route.name, limit, &ctx.ip_key, identity, &ctx.client)
        .await
        .map_err(GatewayError::RateLimited)
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
    record.upstream = Some(upstream.name().to_string());
    let timeout = route.config.timeout.map_or(upstream.timeout(), |t| t.get());
    let upstream_path = route.upstream_path(path);
    let query = query::without_credentials(request.uri().query());
    let uri = if websocket {
        upstream.ws_uri(&upstream_path, query.as_deref())?
    } else {
        upstream.uri(&upstream_path, query.as_deref())?
    };
    rewrite_headers(ctx, &mut request, caller, upstream.name())?;
    if websocket {
        return forward_websocket(ctx, request, uri, upstream, caller, timeout).await;
    }
    upstream
        .send(request, uri, timeout, &ctx.shared.metrics)
        .await
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
    record.route = "admin-api".into();
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

/// Rewrites the request headers for the upstream (contract §5): hop-by-hop and inbound
/// identity headers out, forwarding headers set, then who the caller is.
fn rewrite_headers(
    ctx: &RequestContext<'_>,
    request: &mut Request<Incoming>,
    caller: &Caller,
    upstream: &str,
) -> Result<(), GatewayError> {
    let snapshot = ctx.snapshot;
    // HTTP/2 carries the host in `:authority`; the upstream speaks HTTP/1.1 and needs `Host`.
    let host = request.headers().get(HOST).cloned().or_else(|| {
        let authority = request.uri().authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    // With the PROXY protocol the peer is the address its header carries: a client behind
    // a trusted L4 balancer is still an untrusted client.
    let proxies = &snapshot.config.trusted_proxies;
    let peer_trusted = client_ip::is_trusted(proxies, ctx.conn.peer.ip());
    let headers = request.headers_mut();
    headers::strip_hop_by_hop(headers);
    headers::strip_identity(headers, &snapshot.identity_headers);
    if let Some(host) = &host {
        headers.insert(HOST, host.clone());
    }
    let forwarding = Forwarding {
        peer: ctx.conn.peer.ip(),
        peer_trusted,
        scheme: if ctx.conn.tls { "https" } else { "http" },
        host: host.as_ref(),
        request_id: &ctx.request_id,
    };
    headers::set_forwarding(headers, &forwarding);
    identify(ctx, headers, caller, upstream)
}

/// Tells the upstream who the caller is (contract §5): the identity headers, the
/// credential when `forward_credentials` is on, and the signed assertion when enabled.
fn identify(
    ctx: &RequestContext<'_>,
    headers: &mut HeaderMap,
    caller: &Caller,
    upstream: &str,
) -> Result<(), GatewayError> {
    let (snapshot, settings) = (ctx.snapshot, &ctx.snapshot.config.identity);
    headers::set_identity(headers, &snapshot.identity_headers, &caller.identity)?;
    if !settings.forward_credentials {
        headers.remove(AUTHORIZATION);
    } else if let Some(token) = &caller.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| GatewayError::InvalidRequest("Invalid credential".into()))?;
        headers.insert(AUTHORIZATION, value);
    } else if !caller.skipped {
        headers.remove(AUTHORIZATION);
    }
    if settings.assertion.enabled {
        let now = crate::time::Timestamp::now().0;
        let ttl = settings.assertion.ttl.get().as_secs().max(1) as i64;
        let issuer = &settings.assertion.issuer;
        let assertion = ctx
            .shared
            .signer
            .sign(&caller.identity, issuer, upstream, now, ttl)
            .map_err(GatewayError::Internal)?;
        let value = HeaderValue::from_str(&assertion)
            .map_err(|_| GatewayError::Internal("assertion is not a header value".into()))?;
        headers.insert(snapshot.identity_headers.assertion.clone(), value);
    }
    Ok(())
}
