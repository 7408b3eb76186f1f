//! WebSocket relay: messages per second through the gateway versus direct to the same
//! echo upstream, and the gateway's resident memory per idle connection.
//!
//!   cargo build --release && cargo bench --bench websocket
//!
//! The gateway runs as the release binary (a process of its own, so its memory is its
//! own); the echo upstream and the clients run here. Everything is on 127.0.0.1.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: usize = 8;
const MESSAGES: usize = 20_000;
/// Idle connections held open for the memory figure. Each costs the gateway two file
/// descriptors (client side, upstream side) and this process two more; with the usual
/// limit of 20 000 descriptors per process, 9 000 is what fits.
const IDLE: usize = 9_000;

async fn echo_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Total echoed messages per second over `CONNECTIONS` pipelined connections to `url`.
async fn throughput(url: &str) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let (mut write, mut read) = socket.split();
                let writer = tokio::spawn(async move {
                    for i in 0..MESSAGES {
                        write
                            .send(Message::text(format!("message number {i:>12}")))
                            .await
                            .unwrap();
                    }
                    write
                });
                for _ in 0..MESSAGES {
                    read.next().await.unwrap().unwrap();
                }
                let _ = writer.await;
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (CONNECTIONS * MESSAGES) as f64 / started.elapsed().as_secs_f64()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn main() {
    let binary = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/orcheo-gateway");
    assert!(
        std::path::Path::new(binary).exists(),
        "build the release binary first: cargo build --release"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = echo_upstream().await;
        let (port, admin) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("orcheo-ws-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("gateway.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{http: ['127.0.0.1:{port}']}}\nadmin: {{listen: '127.0.0.1:{admin}'}}\nupstreams: {{default: {{url: 'http://{upstream}'}}}}\nauth: {{mode: disabled, service_tokens: {{backend: memory}}}}\nlimits: {{max_connections: 20000}}\nroutes: [{{name: ws, path: '/ws', websocket: true, public: true}}]\nlog: {{level: warn}}\n"
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .args(["serve", "-c", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let gateway = Gateway(child);
        tokio::time::sleep(Duration::from_millis(500)).await;

        let direct = throughput(&format!("ws://{upstream}/ws")).await;
        let through = throughput(&format!("ws://127.0.0.1:{port}/ws")).await;
        println!("messages echoed per second ({CONNECTIONS} connections x {MESSAGES} messages, pipelined):");
        println!("  direct        {direct:>10.0}");
        println!("  gateway       {through:>10.0}   ratio {:.2}", through / direct);

        let pid = gateway.0.id();
        let before = rss_kib(pid);
        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            let (socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws")).await.unwrap();
            idle.push(socket);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid);
        println!(
            "gateway resident memory: {before} KiB idle, {after} KiB with {IDLE} open connections: {:.1} KiB per connection",
            (after.saturating_sub(before)) as f64 / IDLE as f64
        );
        drop(idle);
        drop(gateway);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
