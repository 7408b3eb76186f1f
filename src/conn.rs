//! What a request knows of the connection it arrived on, and how work that outlives the
//! request (a WebSocket relay) ends with the gateway. `server` fills these in; the
//! request pipeline and the relay only read them.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;

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

/// Lets a task poll some of its futures only after one of them woke it. They are polled
/// with a waker of their own, which marks them woken and wakes the task; a wake of the
/// task by anything else (its socket, say) skips them. Polling a pending timer or
/// notification is not free (a lock, a timer check), and a connection's task wakes
/// several times per request for none of them.
pub struct Quiet {
    flag: Arc<QuietFlag>,
    waker: Waker,
}

struct QuietFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for QuietFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Quiet {
    fn default() -> Self {
        Quiet::new()
    }
}

impl Quiet {
    /// Woken at first, so the futures are polled (and register) once.
    pub fn new() -> Self {
        let flag = Arc::new(QuietFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Quiet { flag, waker }
    }

    /// The context to poll the futures with, if one of them woke the task since they were
    /// last polled; `None`: leave them be. The task's waker is kept for their next wake.
    pub fn woken(&self, cx: &Context<'_>) -> Option<Context<'_>> {
        // Registered first: a wake between the two lines is then not lost.
        self.flag.task.register(cx.waker());
        self.flag
            .woken
            .swap(false, Ordering::AcqRel)
            .then(|| Context::from_waker(&self.waker))
    }

    /// Has the futures polled again at the next poll (one was ready; others may be).
    pub fn wake_again(&self) {
        self.flag.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn quiet_futures_are_polled_only_after_one_of_them_woke_the_task() {
        let task = Arc::new(CountingWaker::default());
        let task_waker = Waker::from(task.clone());
        let cx = Context::from_waker(&task_waker);
        let quiet = Quiet::new();
        // Polled once at first, so that they register.
        let theirs = quiet.woken(&cx).expect("polled at first").waker().clone();
        assert!(
            quiet.woken(&cx).is_none(),
            "a wake by anything else skips them"
        );
        theirs.wake_by_ref();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "their wake wakes the task"
        );
        assert!(quiet.woken(&cx).is_some(), "then they are polled");
        assert!(quiet.woken(&cx).is_none());
        quiet.wake_again();
        assert!(
            quiet.woken(&cx).is_some(),
            "one was ready: all polled again"
        );
        // A wake before the task polls again is not lost, and wakes the task once more.
        theirs.wake_by_ref();
        theirs.wake_by_ref();
        assert!(quiet.woken(&cx).is_some());
        assert!(task.0.load(Ordering::SeqCst) >= 2);
    }
}
