//! Forwarding through the gateway: paths, headers, errors and streaming.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use orcheo_gateway::body;

fn request(addr: std::net::SocketAddr, path: &str) -> http::request::Builder {
    Request::get(path).header("host", format!("gw.example:{}", addr.port()))
}

#[tokio::test]
async fn forwards_the_normalised_path_and_original_query() {
    let up = echo_upstream().await;
    let gw = gateway(&yaml(
        &format!("{}/base/", up.url()),
        "routes:\n  - {name: svc, path: '/svc/**', strip_prefix: /svc}\n  - {name: api, path: '/api/**'}\n",
    ))
    .await;
    let (status, headers, body) = get(gw.http, "/api/a/./b/../c%20d?x=1&y=%2F").await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["path"], "/base/api/a/c%20d");
    assert_eq!(echo["query"], "x=1&y=%2F");
    assert!(headers.contains_key("x-request-id"));
    let (_, _, body) = get(gw.http, "/svc/inner/x/").await;
    assert_eq!(json(&body)["path"], "/base/inner/x/");
    let (_, _, body) = get(gw.http, "/api/%2e%2e/svc/x").await;
    assert_eq!(
        json(&body)["path"],
        "/base/x",
        "normalised first, then matched and stripped"
    );
}

#[tokio::test]
async fn unmatched_requests_and_bad_paths_get_json_errors() {
    let up = echo_upstream().await;
    let gw = gateway(&yaml(
        &up.url(),
        "routes:\n  - {name: read, path: '/api/**', methods: [GET]}\n",
    ))
    .await;
    let (status, headers, body) = get(gw.http, "/other").await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::NOT_FOUND,
        "route.not_found",
        "No route for this request",
    );
    let response = send(
        gw.http,
        request(gw.http, "/api/x")
            .method("DELETE")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    let (status, headers, body) = collect(response).await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::NOT_FOUND,
        "route.not_found",
        "No route for this request",
    );
    let (status, headers, body) = get(gw.http, "/api/..%2f..%2fetc/passwd").await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::BAD_REQUEST,
        "request.invalid",
        "Request path must not contain an encoded / or \\",
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .contains(r#"orcheo_gateway_requests_total{method="GET",route="none",status="404"} 1"#),
        "{metrics}"
    );
    assert!(metrics
        .contains(r#"orcheo_gateway_requests_total{method="DELETE",route="none",status="404"} 1"#));
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let up = upstream(|req: Request<Incoming>| async move {
        let seen: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
        let mut response = Response::new(body::full(seen.join(",")));
        let headers = response.headers_mut();
        headers.insert("connection", "x-upstream-private".parse().unwrap());
        headers.insert("x-upstream-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("proxy-authenticate", "Basic".parse().unwrap());
        headers.insert("x-kept", "yes".parse().unwrap());
        response
    })
    .await;
    let gw = gateway(&yaml(&up.url(), "routes:\n  - {name: all, path: '/**'}\n")).await;
    let req = request(gw.http, "/x")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret-hop")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic abc")
        .header("proxy-connection", "keep-alive")
        .header("upgrade", "h2c")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = collect(send(gw.http, req).await).await;
    assert_eq!(status, StatusCode::OK);
    let seen = String::from_utf8(body.to_vec()).unwrap();
    for gone in [
        "x-private",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            !seen.split(',').any(|h| h == gone),
            "{gone} reached the upstream: {seen}"
        );
    }
    assert!(seen.split(',').any(|h| h == "x-end-to-end"), "{seen}");
    assert!(!headers.contains_key("x-upstream-private"));
    assert!(!headers.contains_key("keep-alive"));
    assert!(!headers.contains_key("proxy-authenticate"));
    assert_eq!(headers["x-kept"], "yes");
}

#[tokio::test]
async fn forwarding_headers_from_untrusted_and_trusted_peers() {
    let (gw, _up) = echo_gateway("").await;
    let req = request(gw.http, "/x")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "client-chosen-id-1")
        .header("x-orcheo-subject", "admin")
        .header("X-Orcheo-Scopes", "admin:tokens:write")
        .header("x-orcheo-identity", "forged")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, headers, body) = collect(send(gw.http, req).await).await;
    let echo = json(&body);
    let h = &echo["headers"];
    assert_eq!(
        h["x-forwarded-for"][0], "127.0.0.1",
        "an untrusted client's XFF is dropped"
    );
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(
        h["x-forwarded-host"][0],
        format!("gw.example:{}", gw.http.port())
    );
    assert_eq!(
        h["host"][0],
        format!("gw.example:{}", gw.http.port()),
        "the original Host is kept"
    );
    assert!(h.get("forwarded").is_none());
    assert_eq!(h["x-request-id"][0], "client-chosen-id-1");
    assert_eq!(headers["x-request-id"], "client-chosen-id-1");
    for spoofed in ["x-orcheo-subject", "x-orcheo-scopes", "x-orcheo-identity"] {
        assert!(h.get(spoofed).is_none(), "{spoofed} was forwarded");
    }

    let (trusted, _up2) = echo_gateway("trusted_proxies: ['127.0.0.0/8']\n").await;
    let req = request(trusted.http, "/x")
        .header("x-forwarded-for", "203.0.113.9, 10.0.0.2")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "public.example")
        .header("x-request-id", "bad id with spaces")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, headers, body) = collect(send(trusted.http, req).await).await;
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 10.0.0.2, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "https");
    assert_eq!(h["x-forwarded-host"][0], "public.example");
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "an unusable client id is replaced: {id}");
    assert_eq!(h["x-request-id"][0], id);
}

#[tokio::test]
async fn refused_upstream_is_502_and_slow_upstream_is_504() {
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let slow = upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(body::full("late"))
    })
    .await;
    let gw = gateway(&format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams:\n  down: {{url: 'http://{closed}'}}\n  slow: {{url: '{}', timeout: 1s}}\nroutes:\n  - {{name: down, path: '/down', upstream: down}}\n  - {{name: slow, path: '/slow', upstream: slow}}\n  - {{name: slower-allowed, path: '/slow-ok', upstream: slow, timeout: 100ms}}\n",
        slow.url()
    ))
    .await;
    let (status, headers, body) = get(gw.http, "/down").await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::BAD_GATEWAY,
        "upstream.unavailable",
        "Upstream service is unavailable",
    );
    let started = std::time::Instant::now();
    let (status, headers, body) = get(gw.http, "/slow").await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::GATEWAY_TIMEOUT,
        "upstream.timeout",
        "Upstream service timed out",
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let started = std::time::Instant::now();
    let (status, _, _) = get(gw.http, "/slow-ok").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // Generous: the route's 100 ms against the upstream's 1 s.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the route timeout overrides the upstream's"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"orcheo_gateway_upstream_duration_seconds_count{upstream="slow"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let (gw, _up) = echo_gateway("").await;
    let stream = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://h2.example:{}/over/h2", gw.http.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (status, _, body) = collect(response).await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["path"], "/over/h2");
    assert_eq!(
        echo["version"], "HTTP/1.1",
        "the upstream is spoken to in HTTP/1.1"
    );
    assert_eq!(
        echo["headers"]["host"][0],
        format!("h2.example:{}", gw.http.port())
    );
}

#[tokio::test]
async fn request_rewriting_headers_are_believed_only_from_trusted_proxies() {
    let up = echo_upstream().await;
    let spoof = [
        ("x-real-ip", "6.6.6.6"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-original-uri", "/admin"),
        ("x-original-method", "DELETE"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-uri", "/admin"),
        ("x-forwarded-method", "DELETE"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
    ];
    let config = |trusted: &str| {
        yaml(
            &up.url(),
            &format!("routes: [{{name: all, path: '/**'}}]\ntrusted_proxies: [{trusted}]\n"),
        )
    };
    let untrusted = gateway(&config("")).await;
    let (status, _, echo) = call(untrusted.http, "/x", &spoof).await;
    assert_eq!(status, StatusCode::OK);
    for (name, _) in spoof {
        assert!(
            echo["headers"].get(name).is_none(),
            "{name} was forwarded: {echo}"
        );
    }
    let trusted = gateway(&config("'127.0.0.1'")).await;
    let (_, _, echo) = call(trusted.http, "/x", &spoof).await;
    for (name, value) in spoof {
        assert_eq!(
            echo["headers"][name][0], value,
            "{name} from a trusted proxy"
        );
    }
}

#[tokio::test]
async fn credentials_in_the_query_never_reach_the_upstream() {
    let up = echo_upstream().await;
    let gw = gateway(&yaml(&up.url(), "routes: [{name: all, path: '/**'}]\n")).await;
    for (target, kept) in [
        ("/x?token=secret&a=1", Some("a=1")),
        ("/x?a=1&access_token=secret", Some("a=1")),
        (
            "/x?TOKEN=secret&%74oken=s2&access%5Ftoken=s3&b=2",
            Some("b=2"),
        ),
        ("/x?token=secret", None),
    ] {
        let (status, _, echo) = call(gw.http, target, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(echo["query"].as_str(), kept, "{target}");
    }
}

#[tokio::test]
async fn semicolons_in_path_segments_and_lower_case_methods_do_not_pass() {
    let up = echo_upstream().await;
    let gw = gateway(&yaml(
        &up.url(),
        "routes: [{name: read, path: '/api/**', methods: [GET]}]\n",
    ))
    .await;
    for target in ["/api/..;/admin", "/api/x;jsessionid=1", "/api/x%3By"] {
        let (status, _, body) = call(gw.http, target, &[]).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("request.invalid")),
            "{target}"
        );
    }
    let answer = raw(
        gw.http,
        b"get /api/x HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

/// How a [`CountingUpstream`] answers.
#[derive(Clone, Copy)]
enum Answer {
    /// `ok` after `delay`, keeping the connection alive.
    KeptAlive { delay: Duration },
    /// `ok` at once, then the socket is closed without saying so in the response (as an
    /// upstream whose keep-alive timer fires does).
    OnePerConnection,
}

/// An upstream answering `ok` that counts the connections it accepted and those still
/// open.
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl CountingUpstream {
    async fn start(answer: Answer) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let open = std::sync::Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_count, open_count) = (accepted.clone(), open.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted_count.fetch_add(1, Ordering::SeqCst);
                open_count.fetch_add(1, Ordering::SeqCst);
                let open_count = open_count.clone();
                tokio::spawn(async move {
                    serve_counted(stream, answer).await;
                    open_count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingUpstream {
            addr,
            accepted,
            open,
            server,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve_counted(mut stream: tokio::net::TcpStream, answer: Answer) {
    let delay = match answer {
        Answer::KeptAlive { delay } => delay,
        Answer::OnePerConnection => {
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buffer[..n]),
                }
            }
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer).await;
            return;
        }
    };
    let service = hyper::service::service_fn(move |_req| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, std::convert::Infallible>(Response::new(body::full("ok")))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// A gateway forwarding everything to `addr`, with `workers` workers (0: one per CPU)
/// and `upstream` appended to the upstream's settings.
fn pooled_yaml(addr: std::net::SocketAddr, workers: usize, upstream: &str) -> String {
    format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nlimits: {{workers: {workers}}}\nupstreams: {{default: {{url: 'http://{addr}'{upstream}}}}}\nroutes: [{{name: all, path: '/**'}}]\n"
    )
}

#[tokio::test]
async fn idle_upstream_connections_are_capped_after_a_burst() {
    // Answers slowly enough that a burst needs one connection per request.
    let up = CountingUpstream::start(Answer::KeptAlive {
        delay: Duration::from_millis(200),
    })
    .await;
    let gw = gateway(&pooled_yaml(up.addr, 0, ", max_idle_per_host: 2")).await;
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let http = gw.http;
            tokio::spawn(async move { get(http, &format!("/burst/{i}")).await.0 })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    assert!(up.open() <= 20);
    let capped = eventually(Duration::from_secs(5), || async { up.open() <= 2 }).await;
    assert!(capped, "{} idle upstream connections kept", up.open());
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_per_worker() {
    for workers in [1, 3] {
        let up = CountingUpstream::start(Answer::KeptAlive {
            delay: Duration::ZERO,
        })
        .await;
        let gw = gateway(&pooled_yaml(up.addr, workers, "")).await;
        // Each request on a new client connection: the kernel spreads those over the
        // workers, and each worker keeps its own upstream connection.
        for i in 0..30 {
            let (status, _, body) = get(gw.http, &format!("/seq/{i}")).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        }
        let opened = up.accepted();
        assert!(
            (1..=workers).contains(&opened),
            "{workers} worker(s) opened {opened} upstream connections for 30 requests in a row"
        );
    }
}

#[tokio::test]
async fn a_kept_connection_the_upstream_closed_is_not_a_failed_request() {
    let up = CountingUpstream::start(Answer::OnePerConnection).await;
    let gw = gateway(&pooled_yaml(up.addr, 1, "")).await;
    for i in 0..20 {
        let (status, _, body) = get(gw.http, &format!("/again/{i}")).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"ok"[..]),
            "request {i}"
        );
        // The close reaches the gateway before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.accepted(), 20);
}

#[tokio::test]
async fn a_response_left_unread_does_not_leave_its_connection_in_the_pool() {
    // The upstream streams a long body; the client reads the head and goes away.
    let up = upstream(|request: Request<Incoming>| async move {
        if request.uri().path() == "/long" {
            return Response::new(body::full(vec![b'x'; 4 * 1024 * 1024]));
        }
        Response::new(body::full("short"))
    })
    .await;
    let gw = gateway(&pooled_yaml(up.addr, 1, "")).await;
    for _ in 0..3 {
        let response = send(
            gw.http,
            request(gw.http, "/long")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        let (status, _, body) = get(gw.http, "/after").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"short"[..]));
    }
}

#[tokio::test]
async fn an_answer_before_the_request_body_is_all_sent_still_gets_through() {
    // The upstream answers as soon as it has the head, and reads the body only after:
    // the gateway must finish sending the body after the response, on a connection
    // nothing else polls at that point, and keep the connection usable.
    let up = upstream(|request: Request<Incoming>| async move {
        if request.uri().path() == "/early" {
            tokio::spawn(async move {
                let _ = http_body_util::BodyExt::collect(request.into_body()).await;
            });
            return Response::new(body::full("early"));
        }
        Response::new(body::full("after"))
    })
    .await;
    let gw = gateway(&pooled_yaml(up.addr, 1, "")).await;
    for _ in 0..3 {
        let upload = Bytes::from(vec![b'u'; 2 * 1024 * 1024]);
        let response = send(
            gw.http,
            Request::post("/early")
                .header("host", "gw.example")
                .body(Full::new(upload))
                .unwrap(),
        )
        .await;
        let (status, _, body) = collect(response).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"early"[..]));
        let (status, _, body) = get(gw.http, "/next").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"after"[..]));
    }
}

#[tokio::test]
async fn many_small_exchanges_on_one_client_connection_reuse_one_upstream_connection() {
    let up = CountingUpstream::start(Answer::KeptAlive {
        delay: Duration::ZERO,
    })
    .await;
    let gw = gateway(&pooled_yaml(up.addr, 1, "")).await;
    let mut sender = connection(gw.http).await;
    for i in 0..200 {
        sender.ready().await.unwrap();
        let response = sender
            .send_request(
                request(gw.http, &format!("/many/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (status, _, body) = collect(response).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]), "{i}");
    }
    assert_eq!(up.accepted(), 1, "one upstream connection for them all");
}

#[tokio::test]
async fn a_request_without_host_reaches_the_upstream_with_the_upstreams_own() {
    let up = echo_upstream().await;
    let gw = gateway(&yaml(&up.url(), "routes: [{name: api, path: '/api/**'}]\n")).await;
    let answer = raw(
        gw.http,
        b"GET /api/x HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let echo = json(&Bytes::copy_from_slice(body.as_bytes()));
    let authority = up.url().trim_start_matches("http://").to_string();
    assert_eq!(echo["headers"]["host"][0], authority.as_str());
    assert!(
        echo["headers"].get("x-forwarded-host").is_none(),
        "no original host to report: {echo}"
    );
}
