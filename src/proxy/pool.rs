//! Keep-alive connections to one upstream, held per proxy worker: a request takes an idle
//! connection of its own worker (or opens one), and the connection comes back when the
//! response body has been read to its end. No lock is shared between workers, and a
//! connection is driven by the runtime of the worker that opened it.
//!
//! Bounds: `max_idle_per_host` idle connections split over the workers (each share rounded
//! up to a whole connection); a connection idle for [`IDLE_TIMEOUT`] is closed, and never
//! reused after that.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// Idle upstream connections are kept this long for reuse; shorter than the usual 60 s+
/// keep-alive of upstream servers, so the gateway closes first and never reuses a
/// connection the upstream is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a finished exchange may take to leave its connection ready for the next.
const READY_WAIT: Duration = Duration::from_secs(1);

/// The idle connections of one upstream, one list per worker.
pub struct Pool {
    slots: Box<[Mutex<Slot>]>,
    /// Idle connections each worker keeps at most.
    per_slot: usize,
}

#[derive(Default)]
struct Slot {
    /// Oldest first; requests take the most recently used.
    idle: Vec<Idle>,
    /// Whether a task closes this slot's expired connections.
    sweeping: bool,
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// How a request got its connection.
pub enum Checkout {
    /// A kept-alive connection, ready for a request.
    Reused(SendRequest<Incoming>),
    /// None idle: the caller opens one.
    Empty,
}

impl Pool {
    /// A pool for `workers` workers keeping at most `max_idle` idle connections in all.
    pub fn new(workers: usize, max_idle: usize) -> Arc<Self> {
        let workers = workers.max(1);
        let per_slot = max_idle.div_ceil(workers);
        Arc::new(Pool {
            slots: (0..workers).map(|_| Mutex::new(Slot::default())).collect(),
            per_slot,
        })
    }

    /// The calling worker's list.
    fn index(&self) -> usize {
        crate::worker::current() % self.slots.len()
    }

    /// The calling worker's most recently used live connection, if any, as of `now`.
    pub fn checkout(&self, now: Instant) -> Checkout {
        let mut slot = lock(&self.slots[self.index()]);
        while let Some(idle) = slot.idle.pop() {
            if now.saturating_duration_since(idle.since) < IDLE_TIMEOUT && idle.sender.is_ready() {
                return Checkout::Reused(idle.sender);
            }
            // Closed by the upstream, mid-exchange, or too old to trust: dropping the
            // handle closes the connection.
        }
        Checkout::Empty
    }

    /// Gives a connection whose exchange is over back to the calling worker's list. A
    /// connection still finishing the exchange (its request body not yet all sent, say)
    /// is waited for a moment, not thrown away.
    pub fn checkin(self: &Arc<Self>, mut sender: SendRequest<Incoming>) {
        if self.per_slot == 0 || sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            return self.keep(sender);
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                pool.keep(sender);
            }
        });
    }

    fn keep(self: &Arc<Self>, sender: SendRequest<Incoming>) {
        let now = Instant::now();
        let index = self.index();
        let mut slot = lock(&self.slots[index]);
        slot.idle.retain(|idle| now - idle.since < IDLE_TIMEOUT);
        if slot.idle.len() >= self.per_slot {
            // The longest idle goes: the list keeps the connections most likely warm.
            slot.idle.remove(0);
        }
        slot.idle.push(Idle { sender, since: now });
        if !slot.sweeping {
            slot.sweeping = true;
            drop(slot);
            tokio::spawn(sweep(Arc::downgrade(self), index));
        }
    }
}

/// Closes the expired connections of one worker's list while it holds any, so a quiet
/// gateway does not keep upstream sockets open forever.
async fn sweep(pool: Weak<Pool>, index: usize) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut slot = lock(&pool.slots[index]);
        let now = Instant::now();
        slot.idle
            .retain(|idle| now - idle.since < IDLE_TIMEOUT && !idle.sender.is_closed());
        if slot.idle.is_empty() {
            slot.sweeping = false;
            return;
        }
    }
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    // A panic while holding the lock leaves a list of connections, still consistent.
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens an HTTP/1.1 client connection over `io`; the connection is driven by a task on
/// the calling worker.
pub async fn handshake<T>(io: T) -> hyper::Result<SendRequest<Incoming>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // One buffer per write, as towards clients (see `server::http::Http::new`).
    let (sender, connection) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `request` on `sender`. When the request never left (the connection closed
/// first), it comes back with the error so it can go on another connection.
pub async fn send(
    sender: &mut SendRequest<Incoming>,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Incoming>>)> {
    sender.try_send_request(request).await.map_err(|mut error| {
        let request = error.take_message();
        (error.into_error(), request)
    })
}

/// A response body that gives its connection back to the pool once read to its end; a
/// body dropped early takes the connection with it (the rest of the response cannot be
/// skipped on HTTP/1.1).
pub struct Returning {
    body: Incoming,
    connection: Option<(SendRequest<Incoming>, Arc<Pool>)>,
}

impl Returning {
    /// Wraps `body`, read from `sender`'s connection.
    pub fn new(body: Incoming, sender: SendRequest<Incoming>, pool: Arc<Pool>) -> Self {
        Returning {
            body,
            connection: Some((sender, pool)),
        }
    }

    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.connection.take() {
            pool.checkin(sender);
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.connection = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_bound_is_split_over_the_workers() {
        assert_eq!(Pool::new(2, 64).per_slot, 32);
        assert_eq!(Pool::new(3, 64).per_slot, 22, "rounded up: 66 at most");
        assert_eq!(Pool::new(4, 1).per_slot, 1, "one each rather than none");
        assert_eq!(Pool::new(2, 0).per_slot, 0, "0 keeps nothing");
        assert_eq!(Pool::new(0, 8).slots.len(), 1, "at least one list");
    }
}
