//! Connection and header limits: 431, slow clients, idle connections, the connection
//! limit, and PROXY protocol.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn oversized_request_heads_get_the_json_431() {
    let (gw, _up) = echo_gateway("limits: {max_header_bytes: 4KiB}\n").await;
    let req = Request::get("/x")
        .header("host", "gw")
        .header("x-big", "a".repeat(5000))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = collect(send(gw.http, req).await).await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request.header_too_large",
        "Request headers too large",
    );
    // Just under the limit passes.
    let req = Request::get("/x")
        .header("host", "gw")
        .header("x-big", "a".repeat(3500))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, _) = collect(send(gw.http, req).await).await;
    assert_eq!(status, StatusCode::OK);
    // Far over the limit, the connection's own parser refuses it before any handler runs.
    let huge = format!(
        "GET /x HTTP/1.1\r\nhost: gw\r\nx-huge: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw(gw.http, huge.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let (gw, _up) = echo_gateway("limits: {header_read_timeout: 1s}\n").await;
    let mut slow = TcpStream::connect(gw.http).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /x HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    let trickle = async {
        // One header byte every 200 ms: the head never completes.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"x").await.is_err() {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = slow.read_to_end(&mut rest).await;
        started.elapsed()
    };
    let others = async {
        for _ in 0..5 {
            let (status, _, _) = get(gw.http, "/fast").await;
            assert_eq!(status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (cut_after, ()) = tokio::join!(trickle, others);
    assert!(
        cut_after < Duration::from_millis(2500),
        "slow client held on for {cut_after:?}"
    );

    // The same for a client that opens a connection and sends nothing at all.
    let started = Instant::now();
    let answer = raw(gw.http, b"", Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_millis(2500), "{answer}");

    // And for an HTTP/2 client that sends the preface but never a request.
    let started = Instant::now();
    let answer = raw(
        gw.http,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(2500), "{answer}");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let (gw, _up) = echo_gateway("limits: {idle_timeout: 500ms}\n").await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream
        .write_all(b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("the idle connection stayed open"),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(400) && closed_after < Duration::from_secs(3),
        "{closed_after:?}"
    );
}

#[tokio::test]
async fn the_connection_limit_holds_new_connections_back() {
    let (gw, _up) = echo_gateway("limits: {max_connections: 2}\n").await;
    let first = TcpStream::connect(gw.http).await.unwrap();
    let second = TcpStream::connect(gw.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third connection completes the TCP handshake in the kernel's backlog, but the
    // gateway does not accept and serve it while two are open.
    let third = tokio::time::timeout(Duration::from_millis(700), get(gw.http, "/x")).await;
    assert!(
        third.is_err(),
        "a third connection was served beyond the limit"
    );
    drop(first);
    drop(second);
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), get(gw.http, "/x"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

async fn proxied_request(addr: std::net::SocketAddr, header: &[u8]) -> String {
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(b"GET /who HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n");
    raw(addr, &bytes, Duration::from_secs(5)).await
}

#[tokio::test]
async fn proxy_protocol_sets_the_client_address_only_from_trusted_peers() {
    let v1 = b"PROXY TCP4 198.51.100.23 10.0.0.1 40000 443\r\n";
    let up = echo_upstream().await;
    let config = |trusted: &str| {
        format!(
            "listen: {{http: ['127.0.0.1:0'], proxy_protocol: true}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams: {{default: {{url: '{}'}}}}\nroutes: [{{name: all, path: '/**'}}]\ntrusted_proxies: [{trusted}]\n",
            up.url()
        )
    };
    let trusted = gateway(&config("'127.0.0.1'")).await;
    let answer = proxied_request(trusted.http, v1).await;
    assert!(
        answer.contains(r#""x-forwarded-for":["198.51.100.23"]"#),
        "{answer}"
    );

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 5, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb]);
    let answer = proxied_request(trusted.http, &v2).await;
    assert!(
        answer.contains(r#""x-forwarded-for":["203.0.113.5"]"#),
        "{answer}"
    );

    let answer = proxied_request(trusted.http, b"").await;
    assert!(
        answer.is_empty(),
        "a connection without a PROXY header must be closed: {answer}"
    );

    let untrusted = gateway(&config("")).await;
    let answer = proxied_request(untrusted.http, v1).await;
    assert!(
        answer.contains(r#""x-forwarded-for":["127.0.0.1"]"#),
        "an untrusted PROXY header is not believed: {answer}"
    );
}

#[tokio::test]
async fn a_client_behind_a_trusted_l4_balancer_cannot_set_forwarding_headers() {
    let up = echo_upstream().await;
    let gw = gateway(&format!(
        "listen: {{http: ['127.0.0.1:0'], proxy_protocol: true}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams: {{default: {{url: '{}'}}}}\nroutes: [{{name: all, path: '/**'}}]\ntrusted_proxies: ['127.0.0.1']\n",
        up.url()
    ))
    .await;
    // The balancer (127.0.0.1, trusted) says the client is 198.51.100.23, which is not.
    let request = b"PROXY TCP4 198.51.100.23 10.0.0.1 40000 443\r\nGET /who HTTP/1.1\r\nhost: gw\r\nx-forwarded-for: 6.6.6.6\r\nx-forwarded-proto: https\r\nx-forwarded-host: evil.example\r\nforwarded: for=6.6.6.6\r\nx-real-ip: 6.6.6.6\r\nx-original-url: /admin\r\nconnection: close\r\n\r\n";
    let answer = raw(gw.http, request, Duration::from_secs(5)).await;
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    let headers = &echo["headers"];
    assert_eq!(
        headers["x-forwarded-for"],
        serde_json::json!(["198.51.100.23"]),
        "{echo}"
    );
    assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(headers["x-forwarded-host"], serde_json::json!(["gw"]));
    for name in ["forwarded", "x-real-ip", "x-original-url"] {
        assert!(
            headers.get(name).is_none(),
            "{name} reached the upstream: {echo}"
        );
    }
}

#[tokio::test]
async fn keep_alive_connections_stay_open_for_the_idle_timeout() {
    // The header timeout is far shorter than the idle timeout: waiting for the next
    // request on a kept-alive connection is idleness, not a slow request head.
    let (gw, _up) = echo_gateway("limits: {header_read_timeout: 300ms, idle_timeout: 3s}\n").await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    let request = b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n";
    let mut buffer = vec![0u8; 65536];
    for round in 0..3 {
        stream.write_all(request).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "round {round}: the kept-alive connection was closed");
        assert!(buffer[..n].starts_with(b"HTTP/1.1 200"), "round {round}");
        // Idle between requests for longer than the header timeout.
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
}

#[tokio::test]
async fn a_later_request_head_must_also_arrive_within_the_header_timeout() {
    let (gw, _up) = echo_gateway("limits: {header_read_timeout: 500ms, idle_timeout: 10s}\n").await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream
        .write_all(b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0u8; 65536];
    let n = stream.read(&mut buffer).await.unwrap();
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
    // The next head trickles in, a byte at a time, never complete.
    let started = Instant::now();
    let mut cut = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"X").await.is_err() {
            cut = true;
            break;
        }
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buffer)).await
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickled request head held the connection");
    // Generous: the header timeout is 500 ms, the idle timeout 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn http2_pings_do_not_keep_an_idle_connection_open() {
    let (gw, _up) = echo_gateway("limits: {idle_timeout: 1s}\n").await;
    let stream = TcpStream::connect(gw.http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let ended = tokio::spawn(connection);
    let request = Request::get("http://gw/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        sender.send_request(request).await.unwrap().status(),
        StatusCode::OK
    );
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(6), ended).await;
    assert!(closed.is_ok(), "PINGs kept an idle HTTP/2 connection open");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connections_per_address_are_capped_when_asked() {
    let (gw, _up) = echo_gateway("limits: {max_connections_per_ip: 2}\n").await;
    let request = b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(gw.http).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buffer = [0u8; 4096];
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
        open.push(stream);
    }
    // A third connection from the same address is closed at once, unanswered.
    let answer = raw(gw.http, request, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "{answer}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_connections_refused_total{reason="per_ip"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    // A place comes back when a connection closes.
    drop(open.pop());
    let served = eventually(Duration::from_secs(5), || async {
        raw(
            gw.http,
            b"GET /x HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .await
        .starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(served);
}

#[tokio::test]
async fn a_kept_alive_connection_outlives_the_http_librarys_own_30_s_default() {
    // hyper closes a connection that waits 30 s for its next request head unless told
    // otherwise; the gateway's rule is `idle_timeout` (60 s by default).
    let (gw, _up) = echo_gateway("").await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    let request = b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n";
    let mut buffer = vec![0u8; 65536];
    stream.write_all(request).await.unwrap();
    let n = stream.read(&mut buffer).await.unwrap();
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(32)).await;
    stream.write_all(request).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
        .await
        .expect("an answer")
        .unwrap();
    assert!(n > 0, "the connection was closed after 32 s idle");
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_cut_off() {
    // 1 GiB on offer: far more than the socket buffers between them hold, so the
    // gateway's writes to a client that stopped reading stall.
    let up = upstream(|_| async {
        use http_body_util::BodyExt;
        http::Response::new(
            Generated::new(64 * 1024, 16 * 1024)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
    })
    .await;
    let gw = gateway(&yaml(
        &up.url(),
        "routes:\n  - {name: all, path: '/**'}\nlimits: {idle_timeout: 1s}\n",
    ))
    .await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buffer).await.unwrap();
    let head = String::from_utf8_lossy(&buffer[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The client stops reading for longer than the idle timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // What the socket buffers still hold, then the end: the response no longer flows.
    let mut rest = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => rest += n,
            Err(_) => panic!("the connection stayed open, silent"),
        }
        assert!(
            rest < 64 * 1024 * 1024,
            "the response kept flowing to a client that had stopped reading"
        );
    }
}
