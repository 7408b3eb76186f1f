//! The decision on one request, shared by every way of asking for one — the proxy path
//! and the forward-auth endpoints: the request's context (client, request id) resolved
//! once, then route → authenticate → authorize → limit, and what the upstream is told
//! about the caller.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue};
use http::Method;

use crate::access_log::{AccessRecord, RouteLabel};
use crate::auth::failure::{self, AuthError, AuthFailure};
use crate::auth::Caller;
use crate::authz::{self, Refusal, AMBIGUOUS_WORKSPACE};
use crate::client_ip;
use crate::conn::ConnInfo;
use crate::error::GatewayError;
use crate::proxy::headers;
use crate::proxy::UpstreamClient;
use crate::routing::{NormalizedPath, RouteMatch};
use crate::state::{Shared, Snapshot};

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
    pub client: Arc<str>,
    /// The client as rate limiters key it (IPv6: its /64).
    pub ip_key: Arc<str>,
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
        // Most requests come from the connection's peer itself: its text is shared.
        let (client, ip_key) = if client_ip == conn.peer.ip() {
            (conn.peer_text.text.clone(), conn.peer_text.key.clone())
        } else {
            let text = client_ip::ClientText::of(client_ip);
            (text.text, text.key)
        };
        RequestContext {
            shared,
            snapshot,
            conn,
            request_id: headers::request_id(headers),
            client_ip,
            client,
            ip_key,
        }
    }
}

impl RequestContext<'_> {
    /// Takes `client` as the client's address (an ingress that names it in its own
    /// protocol, such as Envoy's check attributes).
    pub fn set_client(&mut self, client: IpAddr) {
        let text = client_ip::ClientText::of(client);
        self.client_ip = client;
        self.client = text.text;
        self.ip_key = text.key;
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
    record.route = RouteLabel::Named(matched.route.name.clone());
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
pub fn refusal(ctx: &RequestContext<'_>, caller: &Caller, error: AuthError) -> AuthFailure {
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
pub async fn limit_client(ctx: &RequestContext<'_>) -> Result<(), GatewayError> {
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
pub async fn guard(
    ctx: &RequestContext<'_>,
    outcome: Result<Caller, AuthFailure>,
    record: &mut AccessRecord,
) -> Result<Caller, GatewayError> {
    let (limiter, limits) = (&ctx.shared.limiter, &ctx.snapshot.config.auth.rate_limit);
    let identity = match &outcome {
        Ok(caller) => (!caller.identity.is_anonymous()).then_some(caller.identity.subject.as_str()),
        Err(failure) => failure.identity.as_deref(),
    };
    if let Some(identity) = identity {
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

/// Tells the upstream who the caller is (contract §5): the identity headers, and the
/// signed assertion (for `upstream`) when enabled. The proxy path sets them on the
/// forwarded request, forward-auth on its answer to the ingress.
pub fn identify(
    ctx: &RequestContext<'_>,
    headers: &mut HeaderMap,
    caller: &Caller,
    upstream: &str,
) -> Result<(), GatewayError> {
    let (snapshot, settings) = (ctx.snapshot, &ctx.snapshot.config.identity);
    headers::set_identity(headers, &snapshot.identity_headers, &caller.identity)?;
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
