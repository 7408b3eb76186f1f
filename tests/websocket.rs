//! The WebSocket front door with a real WebSocket client and an in-process upstream:
//! credential sources, what the upstream sees, refusals as HTTP errors, the relay, close
//! codes, connections that end with their credential, idle and shutdown, and 1 000
//! concurrent connections.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::jwt::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use jsonwebtoken::Algorithm;
use orcheo_gateway::store::{hash_secret, MemoryStore, TokenRecord};
use orcheo_gateway::time::Timestamp;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Connected = Result<(Client, http::Response<Option<Vec<u8>>>), WsError>;
type Case<'a> = (String, Vec<(&'a str, &'a str)>, Option<&'a str>);

/// Close frames the upstream received.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(u16, String)>>>);

/// A WebSocket upstream (the handshake callback's error type is tungstenite's own, large
/// by design): first sends JSON of the handshake it received, then echoes;
/// "close-me" makes it close with 4002 "upstream bye".
#[allow(clippy::result_large_err)]
async fn ws_upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let closes = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let closes = closes.clone();
            tokio::spawn(async move {
                let handshake = Arc::new(Mutex::new(Value::Null));
                let record = handshake.clone();
                let callback = move |request: &WsRequest, mut response: WsResponse| {
                    let headers: serde_json::Map<String, Value> = request
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                        .collect();
                    if let Some(offered) = request.headers().get("sec-websocket-protocol") {
                        let first = offered
                            .to_str()
                            .unwrap()
                            .split(',')
                            .next()
                            .unwrap()
                            .trim()
                            .to_string();
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", first.parse().unwrap());
                    }
                    *record.lock().unwrap() = json!({"path": request.uri().path(), "query": request.uri().query(), "headers": headers});
                    Ok(response)
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                else {
                    return;
                };
                let hello = handshake.lock().unwrap().to_string();
                if socket.send(Message::text(hello)).await.is_err() {
                    return;
                }
                while let Some(Ok(message)) = socket.next().await {
                    match message {
                        Message::Text(text) if text.as_str() == "close-me" => {
                            let frame = CloseFrame {
                                code: CloseCode::from(4002),
                                reason: "upstream bye".into(),
                            };
                            let _ = socket.close(Some(frame)).await;
                        }
                        Message::Close(frame) => {
                            if let Some(frame) = frame {
                                closes
                                    .0
                                    .lock()
                                    .unwrap()
                                    .push((u16::from(frame.code), frame.reason.to_string()));
                            }
                        }
                        Message::Ping(_) | Message::Pong(_) => {}
                        other => {
                            if socket.send(other).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn ws_gateway(upstream: SocketAddr, extra: &str, store: Arc<MemoryStore>) -> TestGateway {
    let text = format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams: {{default: {{url: 'http://{upstream}/base'}}}}\nroutes:\n  - {{name: ws, path: '/ws/workflow/{{workflow_ref}}', websocket: true, scopes: [workflows:execute]}}\n  - {{name: plain, path: '/plain/**'}}\nauth:\n  jwt: {{secret: '{}'}}\n{extra}",
        std::str::from_utf8(SECRET).unwrap()
    );
    let config =
        orcheo_gateway::config::load(&text, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    start_with(config, None, store).await
}

fn token_with(exp_in: i64) -> String {
    sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "ws-user", "exp": now() + exp_in, "scope": "workflows:execute"}),
    )
}

async fn connect(
    gw: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, http::Response<Option<Vec<u8>>>), WsError> {
    let mut request = format!("ws://{}{path}", gw.http)
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(request).await
}

/// The upstream's first message: what its handshake looked like.
async fn hello(client: &mut Client) -> Value {
    match client.next().await.unwrap().unwrap() {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("unexpected {other:?}"),
    }
}

/// A gateway (with `extra` configuration) in front of a fresh upstream, and a client
/// connected through it with a valid token, past the upstream's greeting.
async fn relayed(extra: &str) -> (TestGateway, Client, Seen) {
    let (upstream, seen) = ws_upstream().await;
    let gw = ws_gateway(upstream, extra, Default::default()).await;
    let client = opened(&gw, "a").await;
    (gw, client, seen)
}

/// A client connected through `gw` to workflow `workflow` with a valid token, past the
/// upstream's greeting.
async fn opened(gw: &TestGateway, workflow: &str) -> Client {
    let (mut client, _) = connect(
        gw,
        &format!("/ws/workflow/{workflow}?token={}", token_with(600)),
        &[],
    )
    .await
    .unwrap();
    hello(&mut client).await;
    client
}

async fn close_frame(client: &mut Client, within: Duration) -> Option<CloseFrame> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame,
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return None,
            Err(_) => panic!("no close frame within {within:?}"),
        }
    }
}

#[tokio::test]
async fn every_credential_source_and_what_the_upstream_sees() {
    let (upstream, _) = ws_upstream().await;
    let gw = ws_gateway(upstream, "", Default::default()).await;
    let token = token_with(600);
    let bearer = format!("Bearer {token}");
    let subprotocol = format!("orcheo-auth, bearer.{token}, chat.v1");
    let cases: Vec<Case> = vec![
        (
            "/ws/workflow/wf-1?x=1".to_string(),
            vec![("authorization", bearer.as_str())],
            None,
        ),
        (
            "/ws/workflow/wf-1?x=1".to_string(),
            vec![("sec-websocket-protocol", subprotocol.as_str())],
            Some("orcheo-auth"),
        ),
        (format!("/ws/workflow/wf-1?x=1&token={token}"), vec![], None),
        (
            format!("/ws/workflow/wf-1?access_token={token}&x=1"),
            vec![],
            None,
        ),
    ];
    for (path, headers, protocol) in cases {
        let (mut client, response) = connect(&gw, &path, &headers)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            protocol
        );
        let seen = hello(&mut client).await;
        assert_eq!(seen["path"], "/base/ws/workflow/wf-1");
        assert_eq!(
            seen["query"], "x=1",
            "no token in the forwarded query ({path})"
        );
        let h = &seen["headers"];
        assert_eq!(h["x-orcheo-subject"], "ws-user");
        assert_eq!(h["x-orcheo-scopes"], "workflows:execute");
        assert_eq!(
            h["authorization"],
            bearer.as_str(),
            "the credential reaches the upstream only as a header"
        );
        let offered = h
            .get("sec-websocket-protocol")
            .and_then(Value::as_str)
            .unwrap_or("");
        assert!(
            !offered.contains("bearer.") && !offered.contains(&token),
            "{offered}"
        );
        client.close(None).await.unwrap();
    }
}

#[tokio::test]
async fn refusals_are_http_errors_never_a_101() {
    let (upstream, _) = ws_upstream().await;
    let gw = ws_gateway(
        upstream,
        "  rate_limit: {ip: 4, interval: 60}\n",
        Default::default(),
    )
    .await;
    let expect = |result: Connected, status: StatusCode, code: &str| match result {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), status);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["code"], code);
        }
        Ok(_) => panic!("a refused upgrade got a 101"),
        Err(other) => panic!("{other}"),
    };
    expect(
        connect(&gw, "/ws/workflow/a", &[]).await,
        StatusCode::UNAUTHORIZED,
        "auth.missing_token",
    );
    let no_scope = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "x", "exp": now() + 60}),
    );
    expect(
        connect(&gw, &format!("/ws/workflow/a?token={no_scope}"), &[]).await,
        StatusCode::FORBIDDEN,
        "auth.missing_scope",
    );
    expect(
        connect(
            &gw,
            "/plain/x",
            &[("authorization", &format!("Bearer {}", token_with(60)))],
        )
        .await,
        StatusCode::BAD_REQUEST,
        "request.invalid",
    );
    for _ in 0..3 {
        expect(
            connect(&gw, "/ws/workflow/a?token=wrong", &[]).await,
            StatusCode::UNAUTHORIZED,
            "auth.invalid_token",
        );
    }
    expect(
        connect(
            &gw,
            &format!("/ws/workflow/a?token={}", token_with(60)),
            &[],
        )
        .await,
        StatusCode::TOO_MANY_REQUESTS,
        "auth.rate_limited.ip",
    );
}

#[tokio::test]
async fn text_binary_large_messages_and_close_codes_both_ways() {
    let (gw, mut client, seen) = relayed("").await;
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("hello")
    );
    client
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(big));
    // The client closes with its own code and reason: the upstream sees exactly them.
    client
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "client bye".into(),
        }))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            seen.0
                .lock()
                .unwrap()
                .contains(&(4001, "client bye".to_string()))
        })
        .await
    );
    // The upstream closes: the client sees its code and reason.
    let mut client = opened(&gw, "b").await;
    client.send(Message::text("close-me")).await.unwrap();
    let frame = close_frame(&mut client, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (4002, "upstream bye")
    );
    let metrics = gw.metrics().await;
    assert!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_websocket_messages_total{direction="client_to_upstream"}"#
        )
        .unwrap()
            >= 3.0
    );
    assert!(
        metrics.contains(r#"orcheo_gateway_websocket_closed_total{reason="client"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let (_gw, mut client, _) = relayed("limits: {websocket_max_message: 64KiB}\n").await;
    client
        .send(Message::binary(vec![7u8; 100 * 1024]))
        .await
        .unwrap();
    let frame = close_frame(&mut client, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(frame.code, CloseCode::Size);
}

#[tokio::test]
async fn a_jwt_expiring_mid_connection_closes_it_with_1008() {
    let (upstream, seen) = ws_upstream().await;
    let gw = ws_gateway(upstream, "", Default::default()).await;
    let token = token_with(2);
    let exp = now() + 2;
    let (mut client, _) = connect(&gw, &format!("/ws/workflow/a?token={token}"), &[])
        .await
        .unwrap();
    hello(&mut client).await;
    let frame = close_frame(&mut client, Duration::from_secs(5))
        .await
        .unwrap();
    let late = now() - exp;
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::Policy, "token expired")
    );
    assert!(late <= 1, "closed {late}s after exp");
    assert!(
        eventually(Duration::from_secs(3), || async {
            seen.0.lock().unwrap().iter().any(|(code, _)| *code == 1008)
        })
        .await,
        "the upstream side is closed too"
    );
}

#[tokio::test]
async fn a_revoked_service_token_closes_its_connection() {
    let store = Arc::new(MemoryStore::new());
    let record = TokenRecord {
        identifier: "ws-ci".into(),
        secret_hash: hash_secret("ws-ci-secret"),
        scopes: vec!["workflows:execute".into()],
        workspace_ids: vec![],
        issued_at: Timestamp::now(),
        expires_at: None,
        revoked_at: None,
        ..Default::default()
    };
    store.put(record.clone());
    let (upstream, _) = ws_upstream().await;
    let gw = ws_gateway(upstream, "", store.clone()).await;
    let (mut client, _) = connect(
        &gw,
        "/ws/workflow/a",
        &[("authorization", "Bearer ws-ci-secret")],
    )
    .await
    .unwrap();
    hello(&mut client).await;
    let started = Instant::now();
    store.put(TokenRecord {
        revoked_at: Some(Timestamp::now()),
        ..record
    });
    let frame = close_frame(&mut client, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::Policy, "token revoked")
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn idle_connections_close_with_1001() {
    let (_gw, mut client, _) = relayed("limits: {websocket_idle_timeout: 1s}\n").await;
    let started = Instant::now();
    let frame = close_frame(&mut client, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(frame.code, CloseCode::Away);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001_within_the_grace() {
    let (mut gw, mut client, _) = relayed("limits: {shutdown_grace: 5s}\n").await;
    let started = Instant::now();
    let closing =
        tokio::spawn(async move { close_frame(&mut client, Duration::from_secs(5)).await });
    let report = gw.shutdown().await;
    let frame = closing.await.unwrap().unwrap();
    assert_eq!(frame.code, CloseCode::Away);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.cut_connections, 0);
}

#[tokio::test]
async fn a_thousand_concurrent_connections() {
    let (upstream, _) = ws_upstream().await;
    let gw = ws_gateway(upstream, "", Default::default()).await;
    let token = token_with(600);
    let mut clients = Vec::new();
    for i in 0..1000 {
        let (mut client, _) = connect(&gw, &format!("/ws/workflow/wf-{i}?token={token}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{i}: {e}"));
        hello(&mut client).await;
        clients.push(client);
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "orcheo_gateway_websocket_connections"),
        Some(1000.0)
    );
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                let text = format!("message {i}");
                client.send(Message::text(text.clone())).await.unwrap();
                assert_eq!(client.next().await.unwrap().unwrap(), Message::text(text));
                client.close(None).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let drained = eventually(Duration::from_secs(10), || async {
        metric_value(&gw.metrics().await, "orcheo_gateway_websocket_connections") == Some(0.0)
    })
    .await;
    assert!(drained, "every relay ended");
}

#[tokio::test]
async fn an_upgraded_websocket_keeps_its_connection_slot_and_the_relay_cap_holds() {
    let (upstream, _) = ws_upstream().await;
    let gw = ws_gateway(
        upstream,
        "limits: {max_connections: 2, max_websockets: 1}\n",
        Default::default(),
    )
    .await;
    let path = format!("/ws/workflow/a?token={}", token_with(600));
    let (mut first, _) = connect(&gw, &path, &[]).await.unwrap();
    hello(&mut first).await;
    // The relay cap (1) is reached: a second upgrade is refused with 503, not relayed.
    let refused = connect(&gw, &path, &[]).await.unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["code"], "upstream.unavailable");
    // The open relay still holds one of the two connection places: with one more
    // connection open, a third is not accepted.
    let mut held = TcpStream::connect(gw.http).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut held, b"GET /plain/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let n = tokio::io::AsyncReadExt::read(&mut held, &mut buffer)
        .await
        .unwrap();
    assert!(
        buffer[..n].starts_with(b"HTTP/1.1 "),
        "the second connection is served"
    );
    let waiting = tokio::time::timeout(Duration::from_millis(500), get(gw.http, "/plain/y")).await;
    assert!(
        waiting.is_err(),
        "a third connection was served while a WebSocket held a place"
    );
    // When the WebSocket ends, its place comes back.
    first.close(None).await.unwrap();
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(5), get(gw.http, "/plain/z")).await;
    // Without a credential this route answers 401: an answer is what counts here.
    assert_eq!(
        served.expect("served once the WebSocket ended").0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn fragments_and_pings_pass_as_sent() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let (gw, mut client, _) = relayed("").await;
    // A message in three fragments reaches the upstream as one message.
    for (data, opcode, last) in [
        (&b"frag"[..], Data::Text, false),
        (b"men", Data::Continue, false),
        (b"ted", Data::Continue, true),
    ] {
        let frame = Frame::message(data.to_vec(), OpCode::Data(opcode), last);
        client.send(Message::Frame(frame)).await.unwrap();
    }
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("fragmented")
    );
    // A ping reaches the upstream, and its one pong comes back.
    client
        .send(Message::Ping(b"p1".to_vec().into()))
        .await
        .unwrap();
    client.send(Message::text("after")).await.unwrap();
    let mut pongs = 0;
    loop {
        match client.next().await.unwrap().unwrap() {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"p1");
                pongs += 1;
            }
            Message::Text(text) if text.as_str() == "after" => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, 1);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"orcheo_gateway_websocket_messages_total{direction="client_to_upstream"}"#
        ),
        Some(2.0),
        "messages are counted whole, control frames not at all"
    );
}

#[tokio::test]
async fn a_client_breaking_the_protocol_is_closed_with_1002() {
    let (_gw, mut client, seen) = relayed("").await;
    // An unmasked frame, which a client must never send.
    let MaybeTlsStream::Plain(raw) = client.get_mut() else {
        panic!("plain connection expected");
    };
    tokio::io::AsyncWriteExt::write_all(raw, &[0x81, 0x02, b'h', b'i'])
        .await
        .unwrap();
    let frame = close_frame(&mut client, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::Protocol, "protocol error")
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            seen.0
                .lock()
                .unwrap()
                .contains(&(1001, "client connection ended".to_string()))
        })
        .await
    );
}

/// An upstream that answers every request with `answer` as it stands.
async fn raw_upstream(answer: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_refusal_is_passed_on_and_a_bad_101_is_a_502() {
    let refusing = raw_upstream(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 7\r\n\r\nno way!",
    )
    .await;
    let gw = ws_gateway(refusing, "", Default::default()).await;
    let path = format!("/ws/workflow/a?token={}", token_with(600));
    let Err(WsError::Http(response)) = connect(&gw, &path, &[]).await else {
        panic!("expected the upstream's refusal");
    };
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(response.body().as_deref(), Some(&b"no way!"[..]));
    // A 101 whose accept key does not answer the gateway's key is no WebSocket.
    let wrong = raw_upstream(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: d3Jvbmc=\r\n\r\n",
    )
    .await;
    let gw = ws_gateway(wrong, "", Default::default()).await;
    let Err(WsError::Http(response)) = connect(&gw, &path, &[]).await else {
        panic!("expected a refusal");
    };
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}
