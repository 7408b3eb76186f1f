//! THE request pipeline: snapshot → route → (authenticate → authorize → rate-limit) →
//! forward; on error, the one mapping; then metrics and the access log.

use std::time::Instant;

use http::header::{HeaderValue, HOST};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::access_log::AccessRecord;
use crate::body::Body;
use crate::error::GatewayError;
use crate::proxy::headers::{self, Forwarding, X_REQUEST_ID};
use crate::routing::NormalizedPath;
use crate::server::ConnInfo;
use crate::state::{Shared, Snapshot};

/// Answers one request on a proxy listener. Never fails: every error becomes its response.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let snapshot = shared.snapshot();
    let request_id = headers::request_id(request.headers());
    let mut record = AccessRecord::new(&request, conn, &request_id);
    let mut response =
        match pipeline(shared, &snapshot, conn, request, &request_id, &mut record).await {
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

async fn pipeline(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: &ConnInfo,
    mut request: Request<Incoming>,
    request_id: &HeaderValue,
    record: &mut AccessRecord,
) -> Result<Response<Body>, GatewayError> {
    check_head_size(&request, snapshot)?;
    let path = NormalizedPath::parse(request.uri().path())?;
    let matched = snapshot
        .routes
        .find(request.method(), &path)
        .ok_or(GatewayError::RouteNotFound)?;
    let route = matched.route;
    record.route = route.name.clone();
    let upstream = snapshot
        .upstreams
        .get(&route.config.upstream)
        .ok_or_else(|| GatewayError::UpstreamUnavailable("route names no known upstream".into()))?;
    record.upstream = Some(upstream.name().to_string());
    let uri = upstream.uri(&route.upstream_path(&path), request.uri().query())?;
    prepare_headers(snapshot, conn, &mut request, request_id);
    let timeout = route.config.timeout.map_or(upstream.timeout(), |t| t.get());
    upstream.send(request, uri, timeout, &shared.metrics).await
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
