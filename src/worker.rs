//! Proxy workers: one thread per CPU (`limits.workers`), each with its own single-threaded
//! runtime and its own listening sockets on every proxy address (`SO_REUSEPORT`, so the
//! kernel spreads connections over the workers). A connection, its requests and the
//! upstream connections they use stay on one worker: no work stealing, no lock shared
//! between workers on the request path. The admin listener, gRPC `ext_authz`, reload,
//! JWKS refresh and the store's background tasks stay on the main runtime.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

thread_local! {
    /// This thread's worker number; 0 on threads that are not proxy workers.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// In-flight work left on a worker when it is halted is cut after this long.
const HALT_TIMEOUT: Duration = Duration::from_millis(100);

/// The worker number of the calling thread (0 outside the workers): the index of the
/// per-worker state (upstream connection pools) it uses.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers `limits.workers` asks for: the number given, or one per CPU for 0.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What one worker runs: its listeners' accept loops, built on the main runtime and run
/// on the worker's.
pub type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The running workers.
pub struct Workers {
    halt: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per entry of `jobs`, each running its jobs on a runtime of its
    /// own until [`Workers::halt`].
    pub fn start(jobs: Vec<Vec<Job>>) -> std::io::Result<Self> {
        let (halt, halted) = watch::channel(false);
        let mut threads = Vec::with_capacity(jobs.len());
        for (index, jobs) in jobs.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut halted = halted.clone();
            let thread = std::thread::Builder::new()
                .name(format!("orcheo-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|cell| cell.set(index));
                    runtime.block_on(async move {
                        for job in jobs {
                            tokio::spawn(job);
                        }
                        let _ = halted.wait_for(|halt| *halt).await;
                    });
                    runtime.shutdown_timeout(HALT_TIMEOUT);
                });
            match thread {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    let _ = halt.send(true);
                    return Err(error);
                }
            }
        }
        Ok(Workers { halt, threads })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether no worker runs.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Stops the workers: whatever still runs on them (connections past the grace
    /// period) is cut. Returns when every worker thread has ended.
    pub async fn halt(mut self) {
        let _ = self.halt.send(true);
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// A gateway dropped without a shutdown (tests, start-up failures) does not leave
    /// its workers serving.
    fn drop(&mut self) {
        let _ = self.halt.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_knows_its_number_and_halts() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let jobs = (0..3)
            .map(|_| {
                let tx = tx.clone();
                let job: Job = Box::pin(async move {
                    let _ = tx.send((current(), std::thread::current().id()));
                    std::future::pending::<()>().await;
                });
                vec![job]
            })
            .collect();
        drop(tx);
        let workers = Workers::start(jobs).unwrap();
        assert_eq!(workers.len(), 3);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(rx.recv().await.unwrap());
        }
        seen.sort_by_key(|(index, _)| *index);
        assert_eq!(
            seen.iter().map(|(index, _)| *index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_ne!(seen[0].1, seen[1].1);
        // Halting cuts the pending jobs; their senders go, so the channel closes.
        workers.halt().await;
        assert!(rx.recv().await.is_none());
    }

    #[test]
    fn zero_means_one_per_cpu() {
        assert_eq!(count(3), 3);
        assert!(count(0) >= 1);
    }
}
