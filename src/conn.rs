//! What a request knows of the connection it arrived on, and how work that outlives the
//! request (a WebSocket relay) ends with the gateway. `server` fills these in; the
//! request pipeline and the relay only read them.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::client_ip::ClientText;

/// What long-lived work started by a request (a WebSocket relay) needs in order to end
/// with the gateway: the shutdown signal, and a drain guard that shutdown waits for.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// Becomes `true` when the gateway shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Held while the work runs.
    pub drain: mpsc::Sender<()>,
    /// The connection's places under the connection limits (`max_connections`,
    /// `max_connections_per_ip`), given back when the last holder lets go: an upgraded
    /// WebSocket keeps them until its relay ends.
    pub slot: Arc<dyn Any + Send + Sync>,
}

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer as the gateway believes it: the PROXY header's source when the TCP peer
    /// is trusted, else the TCP peer.
    pub peer: SocketAddr,
    /// `peer` as text, rate-limit key and header value, built once for all its requests.
    pub peer_text: ClientText,
    /// Whether the client connected over TLS.
    pub tls: bool,
    /// Shutdown signal and drain guard, for work that outlives the request.
    pub lifecycle: Lifecycle,
}

/// Resolves once shutdown has begun (at once if it already has).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await of the caller.
    let _ = shutdown.wait_for(|&stop| stop).await.map(|_| ());
}
