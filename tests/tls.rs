//! HTTPS: handshakes over HTTP/1.1 and HTTP/2 by ALPN, key formats, and certificate
//! reload without dropping open connections.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf for `localhost` signed by `ca`; returns (chain PEM, key PEM, leaf DER).
fn leaf(ca: &Ca, name: &str, year: i32) -> (String, String, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let chain = format!("{}{}", cert.pem(), ca.cert.pem());
    (chain, key.serialize_pem(), cert.der().to_vec())
}

fn write_pair(dir: &Path, chain: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), chain).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
}

async fn tls_gateway(dir: &Path, upstream: &str) -> TestGateway {
    gateway(&format!(
        "listen: {{http: [], https: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\ntls: {{cert_file: '{}', key_file: '{}'}}\nupstreams: {{default: {{url: '{upstream}'}}}}\nroutes: [{{name: all, path: '/**'}}]\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    ))
    .await
}

/// A TLS acceptor serving `chain` with `key` (PEM), for upstreams the gateway reaches over
/// TLS.
fn acceptor(chain: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(server))
}

fn connector(root: &CertificateDer<'static>, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
    alpn: &[u8],
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    connector(root, alpn).connect(name, tcp).await.unwrap()
}

fn leaf_of(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn get_req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn https_over_http1_and_http2_by_alpn() {
    let up = echo_upstream().await;
    let ca = ca();
    let root = CertificateDer::from(ca.cert.der().to_vec());
    let dir = temp_dir("tls-alpn");
    let (chain, key, _) = leaf(&ca, "leaf", 2035);
    write_pair(&dir, &chain, &key);
    let gw = tls_gateway(&dir, &up.url()).await;
    let addr = gw.gateway().addresses.https[0];

    let stream = handshake(addr, &root, b"http/1.1").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (status, _, body) = collect(sender.send_request(get_req("/one")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["headers"]["x-forwarded-proto"][0], "https");
    // Idle past the release of its HTTP session (10 ms), the same TLS connection serves
    // the next request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = sender.send_request(get_req("/one-again")).await.unwrap();
    let (status, _, body) = collect(again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["path"], "/one-again");

    let stream = handshake(addr, &root, b"h2").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::get("https://localhost/two")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (status, _, body) = collect(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["path"], "/two");

    let metrics = gw.metrics().await;
    // 2035-01-01T00:00:00Z
    assert!(
        metrics.contains("orcheo_gateway_tls_cert_not_after_timestamp_seconds 2051222400"),
        "{metrics}"
    );
}

#[tokio::test]
async fn certificate_reload_is_picked_up_by_new_handshakes_only() {
    let up = echo_upstream().await;
    let ca = ca();
    let root = CertificateDer::from(ca.cert.der().to_vec());
    let dir = temp_dir("tls-reload");
    let (chain, key, first_der) = leaf(&ca, "first", 2035);
    write_pair(&dir, &chain, &key);
    let gw = tls_gateway(&dir, &up.url()).await;
    let addr = gw.gateway().addresses.https[0];

    let open = handshake(addr, &root, b"http/1.1").await;
    assert_eq!(leaf_of(&open), first_der);
    let (mut open_sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(open))
        .await
        .unwrap();
    tokio::spawn(conn);

    // A broken pair is refused and the first certificate keeps serving.
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let failure = r#"orcheo_gateway_tls_reloads_total{result="failure"}"#;
    let refused = gw
        .wait_for_metric(failure, 1.0, Duration::from_secs(10))
        .await;
    assert!(refused, "the broken pair was never looked at");
    assert_eq!(
        leaf_of(&handshake(addr, &root, b"http/1.1").await),
        first_der
    );

    let (chain, key, second_der) = leaf(&ca, "second", 2036);
    write_pair(&dir, &chain, &key);
    let success = r#"orcheo_gateway_tls_reloads_total{result="success"}"#;
    let reloaded = gw
        .wait_for_metric(success, 1.0, Duration::from_secs(10))
        .await;
    assert!(reloaded, "the new pair was never installed");
    assert_eq!(
        leaf_of(&handshake(addr, &root, b"http/1.1").await),
        second_der,
        "a new handshake gets the new certificate"
    );

    // The connection opened before the reload still works.
    let (status, _, _) = collect(
        open_sender
            .send_request(get_req("/still-open"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("orcheo_gateway_tls_cert_not_after_timestamp_seconds 2082758400"),
        "{metrics}"
    );
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .status()
        .expect("openssl is installed by .ci/run");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test]
async fn pkcs1_and_sec1_keys_are_accepted() {
    let up = echo_upstream().await;
    for (label, keygen) in [
        ("pkcs1", vec!["genrsa", "-traditional", "-out"]),
        (
            "sec1",
            vec![
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ],
        ),
    ] {
        let dir = temp_dir(label);
        let key = dir.join("key.pem");
        let cert = dir.join("cert.pem");
        let mut args = keygen.clone();
        let key_path = key.to_str().unwrap();
        args.push(key_path);
        if label == "pkcs1" {
            args.push("2048");
        }
        openssl(&args);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key_path,
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ]);
        let pem = std::fs::read_to_string(&key).unwrap();
        let expected = if label == "pkcs1" {
            "BEGIN RSA PRIVATE KEY"
        } else {
            "BEGIN EC PRIVATE KEY"
        };
        assert!(pem.contains(expected), "{label}: {pem}");
        let gw = tls_gateway(&dir, &up.url()).await;
        let addr = gw.gateway().addresses.https[0];
        let der = rustls::pki_types::pem::PemObject::from_pem_file(&cert).unwrap();
        let stream = handshake(addr, &der, b"http/1.1").await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (status, _, _) = collect(sender.send_request(get_req("/")).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{label}");
    }
}

#[tokio::test]
async fn a_key_that_does_not_fit_the_certificate_stops_the_start() {
    let ca = ca();
    let dir = temp_dir("tls-mismatch");
    let (chain, _, _) = leaf(&ca, "a", 2035);
    let (_, other_key, _) = leaf(&ca, "b", 2035);
    write_pair(&dir, &chain, &other_key);
    let yaml = format!(
        "listen: {{http: [], https: ['127.0.0.1:0']}}\nadmin: {{listen: null}}\ntls: {{cert_file: '{}', key_file: '{}'}}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let config = orcheo_gateway::config::load(&yaml, &Default::default()).unwrap();
    let store = std::sync::Arc::new(orcheo_gateway::store::MemoryStore::new());
    let error =
        orcheo_gateway::app::Gateway::start_with_store(config, None, Default::default(), store)
            .await
            .err()
            .unwrap();
    assert!(error.to_string().contains("does not belong to"), "{error}");
}

#[tokio::test]
async fn https_upstreams_are_verified_with_the_configured_ca() {
    let ca = ca();
    let (chain, key, _) = leaf(&ca, "upstream", 2035);
    let acceptor = acceptor(&chain, &key);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        orcheo_gateway::body::full("secure upstream"),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let dir = temp_dir("tls-upstream");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let url = format!("https://localhost:{}", addr.port());
    let trusting = gateway(&format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams: {{default: {{url: '{url}', ca_file: '{}'}}}}\nroutes: [{{name: all, path: '/**'}}]\n",
        dir.join("ca.pem").display()
    ))
    .await;
    let (status, _, body) = get(trusting.http, "/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "secure upstream");
    // Without the CA, the upstream's certificate is not trusted: 502, never plaintext.
    let untrusting = gateway(&yaml(&url, "routes: [{name: all, path: '/**'}]\n")).await;
    let (status, _, _) = get(untrusting.http, "/x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn grpc_ext_authz_over_tls_with_the_serving_certificate() {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let up = echo_upstream().await;
    let ca = ca();
    let root = CertificateDer::from(ca.cert.der().to_vec());
    let dir = temp_dir("tls-grpc");
    let (chain, key, _) = leaf(&ca, "leaf", 2035);
    write_pair(&dir, &chain, &key);
    let gw = gateway(&format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\ntls: {{cert_file: '{}', key_file: '{}'}}\nupstreams: {{default: {{url: '{}'}}}}\nroutes: [{{name: all, path: '/**', public: true}}]\ntrusted_proxies: ['127.0.0.1']\nforward_auth: {{grpc_listen: '127.0.0.1:0', grpc_tls: true}}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        up.url()
    ))
    .await;
    let addr = gw.gateway().addresses.grpc.unwrap();
    // A plaintext HTTP/2 client gets nowhere: the listener speaks TLS only.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    if let Ok(channel) = plain.connect().await {
        let mut client = AuthorizationClient::new(channel);
        let request = envoy_types::ext_authz::v3::pb::CheckRequest::default();
        assert!(client.check(request).await.is_err());
    }
    // Over TLS (ALPN h2, the test CA) the check is answered.
    let root_for_connect = root.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let root = root_for_connect.clone();
            async move {
                let stream = handshake(addr, &root, b"h2").await;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let mut client = AuthorizationClient::new(channel);
    let request = envoy_types::ext_authz::v3::pb::CheckRequest {
        attributes: Some(envoy_types::pb::envoy::service::auth::v3::AttributeContext {
            request: Some(envoy_types::pb::envoy::service::auth::v3::attribute_context::Request {
                http: Some(envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/anything".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let response = client.check(request).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0, "allowed over TLS");
}

/// A TLS WebSocket upstream with `chain`/`key`: greets with "hello" at once, then echoes.
async fn tls_ws_upstream(chain: &str, key: &str) -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let acceptor = acceptor(chain, key);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut socket) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                if socket.send(Message::text("hello")).await.is_err() {
                    return;
                }
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websockets_over_tls_on_both_sides() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;
    let ca = ca();
    let root = CertificateDer::from(ca.cert.der().to_vec());
    let (up_chain, up_key, _) = leaf(&ca, "ws-upstream", 2035);
    let upstream = tls_ws_upstream(&up_chain, &up_key).await;
    let dir = temp_dir("tls-websocket");
    let (chain, key, _) = leaf(&ca, "leaf", 2035);
    write_pair(&dir, &chain, &key);
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let gw = gateway(&format!(
        "listen: {{http: [], https: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\ntls: {{cert_file: '{}', key_file: '{}'}}\nupstreams: {{default: {{url: 'https://localhost:{}', ca_file: '{}'}}}}\nroutes: [{{name: ws, path: '/ws/**', websocket: true, public: true}}]\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        upstream.port(),
        dir.join("ca.pem").display()
    ))
    .await;
    let addr = gw.gateway().addresses.https[0];
    let stream = handshake(addr, &root, b"http/1.1").await;
    let (mut client, response) = tokio_tungstenite::client_async("wss://localhost/ws/echo", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    // The greeting the upstream sent right after its 101 is not lost.
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("hello")
    );
    client.send(Message::text("over tls")).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("over tls")
    );
    // Larger than any one TLS record or read: it goes through in many.
    let big: Vec<u8> = (0..300 * 1024).map(|i| (i % 253) as u8).collect();
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(big));
    client
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .unwrap();
    // The upstream's answer to the close comes back through the gateway.
    let answer = tokio::time::timeout(Duration::from_secs(3), client.next())
        .await
        .unwrap();
    match answer {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the upstream's close, got {other:?}"),
    }
}
