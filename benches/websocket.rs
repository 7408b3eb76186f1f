//! WebSocket relay: messages per second through the gateway versus direct to the same
//! echo upstream, and the gateway's resident memory per idle connection.
//!
//!   cargo build --release && cargo bench --bench websocket
//!
//! `benches/proxy_load.sh` drives it in parts, to compare the gateway with nginx:
//!
//!   cargo bench --bench websocket -- serve-echo PORT          # echo upstream until killed
//!   cargo bench --bench websocket -- ping-pong URL CONNS SECS # messages/s, one in flight each
//!   cargo bench --bench websocket -- hold URL N               # N open; "held"; waits for stdin
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
    tokio::spawn(serve_echo(listener));
    addr
}

/// Echoes every text and binary message back on its connection.
async fn serve_echo(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(message)) = socket.next().await {
                if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err()
                {
                    break;
                }
            }
        });
    }
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

/// Echoed messages per second over `connections` connections, each with one message in
/// flight at a time (send, wait for the echo, send again), for `seconds`.
async fn ping_pong(url: &str, connections: usize, seconds: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let mut echoed = 0u64;
                while Instant::now() < deadline {
                    socket
                        .send(Message::text("ping-pong message, 32 bytes long"))
                        .await
                        .unwrap();
                    match socket.next().await {
                        Some(Ok(message)) if message.is_text() => echoed += 1,
                        other => panic!("no echo: {other:?}"),
                    }
                }
                echoed
            })
        })
        .collect();
    let started = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// The parts `benches/proxy_load.sh` runs; `None` when the arguments name none.
fn part(args: &[String]) -> Option<()> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let at = |name: &str| args.iter().position(|a| a == name);
    if let Some(i) = at("serve-echo") {
        let port: u16 = args.get(i + 1)?.parse().ok()?;
        runtime().block_on(async move {
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            serve_echo(listener).await;
        });
        return Some(());
    }
    if let Some(i) = at("ping-pong") {
        let url = args.get(i + 1)?.clone();
        let connections: usize = args.get(i + 2)?.parse().ok()?;
        let seconds: f64 = args.get(i + 3)?.parse().ok()?;
        let rate = runtime().block_on(ping_pong(&url, connections, seconds));
        println!("{rate:.0}");
        return Some(());
    }
    if let Some(i) = at("hold") {
        let url = args.get(i + 1)?.clone();
        let count: usize = args.get(i + 2)?.parse().ok()?;
        runtime().block_on(async move {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .unwrap();
                held.push(socket);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            println!("held");
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            drop(held);
        });
        return Some(());
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if part(&args).is_some() {
        return;
    }
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
