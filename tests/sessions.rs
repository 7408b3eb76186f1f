//! HTTP/1.1 connections that go idle give their HTTP session back and keep serving:
//! the next request, split or pipelined, is answered on the same connection; the idle
//! timeout and shutdown still close them; connections whose state only the session
//! knows (a request body, an ask to close) are never released.
//! Alone in its binary, because it installs the process-wide log subscriber.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RELEASED: &str = "idle HTTP/1 session released";

/// Long enough for an idle session to be released (10 ms idle), with room for a
/// loaded machine.
const PAST_RELEASE: Duration = Duration::from_millis(400);

fn logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(captured.clone())
            .init();
        captured
    })
}

/// Sessions released so far, read from the log.
fn releases() -> usize {
    logs().text().matches(RELEASED).count()
}

/// Reads one response (head and a `content-length` body) from `stream`.
async fn response(stream: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "the connection closed; read so far: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    let status = head.lines().next().unwrap().to_string();
    (status, String::from_utf8(body).unwrap())
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n")
}

/// Whether the gateway closed `stream` within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buffer = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, stream.read(&mut buffer)).await,
        Ok(Ok(0) | Err(_))
    )
}

// One test function: the log is process-wide, so releases are counted in sequence.
#[tokio::test]
async fn idle_sessions_are_released_and_the_connection_serves_on() {
    logs();
    let (gw, _up) = echo_gateway("limits: {header_read_timeout: 1s, idle_timeout: 4s}\n").await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();

    // A request, then idle: the session is released, the connection stays open.
    stream.write_all(get("/one").as_bytes()).await.unwrap();
    let (status, body) = response(&mut stream).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains(r#""path":"/one""#), "{body}");
    tokio::time::sleep(PAST_RELEASE).await;
    assert_eq!(releases(), 1, "{}", logs().text());

    // The next request, its head split over two writes, is served by a new session.
    let next = get("/two");
    let (first, rest) = next.split_at(9);
    stream.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(rest.as_bytes()).await.unwrap();
    let (status, body) = response(&mut stream).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains(r#""path":"/two""#), "{body}");

    // Released again; then two pipelined requests in one write, both answered in order.
    tokio::time::sleep(PAST_RELEASE).await;
    assert_eq!(releases(), 2, "{}", logs().text());
    stream
        .write_all(format!("{}{}", get("/three"), get("/four")).as_bytes())
        .await
        .unwrap();
    for path in ["/three", "/four"] {
        let (status, body) = response(&mut stream).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(body.contains(&format!(r#""path":"{path}""#)), "{body}");
    }

    // Released once more; the idle timeout (4 s since the last request) still closes
    // the connection, whether its session was released or not.
    let idle_from = Instant::now();
    tokio::time::sleep(PAST_RELEASE).await;
    assert_eq!(releases(), 3, "{}", logs().text());
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "the idle timeout did not close it"
    );
    let closed_after = idle_from.elapsed();
    assert!(
        closed_after >= Duration::from_millis(3500) && closed_after < Duration::from_secs(6),
        "{closed_after:?}"
    );

    // A request with a body pins its connection's session: it is never released, and the
    // connection keeps serving.
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream
        .write_all(b"POST /five HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (status, body) = response(&mut stream).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains(r#""body_len":5"#), "{body}");
    tokio::time::sleep(PAST_RELEASE).await;
    assert_eq!(releases(), 3, "a session that carried a body was released");
    stream.write_all(get("/six").as_bytes()).await.unwrap();
    let (status, _) = response(&mut stream).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // A released connection is closed at once when the gateway shuts down.
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream.write_all(get("/seven").as_bytes()).await.unwrap();
    response(&mut stream).await;
    tokio::time::sleep(PAST_RELEASE).await;
    assert_eq!(releases(), 4, "{}", logs().text());
    let mut gw = gw;
    let stopping = Instant::now();
    let report = gw.shutdown().await;
    assert!(
        closed_within(&mut stream, Duration::from_secs(2)).await,
        "shutdown left it open"
    );
    assert!(stopping.elapsed() < Duration::from_secs(3), "{report:?}");
}
