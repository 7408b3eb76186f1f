//! Reloads and shutdown, in process and through the real binary with real signals.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

fn route_yaml(upstream: &str, route_path: &str, extra: &str) -> String {
    format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams: {{default: {{url: '{upstream}'}}}}\nroutes: [{{name: r, path: '{route_path}'}}]\n{extra}"
    )
}

#[tokio::test]
async fn reload_applies_a_valid_config_and_refuses_a_bad_one() {
    let up = echo_upstream().await;
    let dir = temp_dir("reload");
    let file = dir.join("gateway.yaml");
    std::fs::write(&file, route_yaml(&up.url(), "/a", "")).unwrap();
    let config = orcheo_gateway::config::load_file(Some(&file), &Default::default()).unwrap();
    let gw = start(config, Some(file.clone())).await;
    assert_eq!(get(gw.http, "/a").await.0, StatusCode::OK);

    std::fs::write(&file, route_yaml(&up.url(), "/b", "")).unwrap();
    gw.gateway().reload().await.unwrap();
    assert_eq!(get(gw.http, "/b").await.0, StatusCode::OK);
    assert_eq!(get(gw.http, "/a").await.0, StatusCode::NOT_FOUND);

    std::fs::write(&file, route_yaml(&up.url(), "no-slash", "")).unwrap();
    let error = gw.gateway().reload().await.unwrap_err();
    assert!(error.contains("routes[0].path"), "{error}");
    assert_eq!(
        get(gw.http, "/b").await.0,
        StatusCode::OK,
        "the old config keeps serving"
    );
    let metrics = gw.metrics().await;
    // The file watcher may have noticed the same changes too, so these are lower bounds.
    let reloads = |result: &str| {
        metric_value(
            &metrics,
            &format!(r#"orcheo_gateway_config_reloads_total{{result="{result}"}}"#),
        )
        .unwrap()
    };
    assert!(reloads("success") >= 1.0, "{metrics}");
    assert!(reloads("failure") >= 1.0, "{metrics}");

    // A change to the file is noticed without any signal: the reload counter moves.
    let before = reloads("success");
    std::fs::write(&file, route_yaml(&up.url(), "/c", "")).unwrap();
    let series = r#"orcheo_gateway_config_reloads_total{result="success"}"#;
    let reloaded = gw
        .wait_for_metric(series, before + 1.0, Duration::from_secs(10))
        .await;
    assert!(reloaded, "the changed file was not picked up");
    assert_eq!(get(gw.http, "/c").await.0, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops_accepting() {
    let (slow, mut gate) = gated_upstream("/slow", "finished").await;
    let mut gw = gateway(&yaml(
        &slow.url(),
        "routes: [{name: all, path: '/**'}]\nlimits: {shutdown_grace: 5s}\n",
    ))
    .await;
    let addr = gw.http;
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
    gate.wait_arrival().await;
    let started = Instant::now();
    let gateway = gw.gateway.take().unwrap();
    let shutdown = tokio::spawn(gateway.shutdown());
    // The listener closes while the request is still held upstream.
    let closed = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(closed, "still accepting after shutdown began");
    assert!(!in_flight.is_finished(), "the in-flight request was cut");
    gate.open();
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "finished");
    let report = shutdown.await.unwrap();
    assert_eq!(report.cut_connections, 0);
    // Generous: the drain ends when the request does, far inside the 5 s grace.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "drain took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_cuts_what_outlives_the_grace_period() {
    let (stuck, mut gate) = gated_upstream("/stuck", "never").await;
    let mut gw = gateway(&yaml(
        &stuck.url(),
        "routes: [{name: all, path: '/**'}]\nlimits: {shutdown_grace: 300ms}\n",
    ))
    .await;
    let addr = gw.http;
    let _in_flight = tokio::spawn(async move { get(addr, "/stuck").await });
    gate.wait_arrival().await;
    let started = Instant::now();
    let report = gw.shutdown().await;
    // Generous: the grace is 300 ms; anything near it shows the cut happened on time.
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(report.cut_connections, 1);
}

/// The binary, started with a config file; its JSON log lines arrive on a channel.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orcheo-gateway"))
            .args(["serve", "-c"])
            .arg(config)
            .env_remove("ORCHEO_GATEWAY_CONFIG")
            .env(
                "ORCHEO_AUTH_SERVICE_TOKEN_DB_PATH",
                config.with_extension("sqlite"),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process { child, lines }
    }

    /// Waits for a log line containing every one of `needles`.
    fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no log line with {needles:?}");
    }

    /// Every line up to and including the first with all of `needles`.
    fn lines_until(&self, needles: &[&str]) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = needles.iter().all(|n| line.contains(n));
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {needles:?}");
    }

    fn address(&self, role: &str) -> SocketAddr {
        let line = self.wait_for(&["listening", &format!(r#""role":"{role}""#)]);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        value["addr"].as_str().unwrap().parse().unwrap()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_binary_reloads_on_sighup_and_drains_on_sigterm() {
    let (slow, mut gate) = gated_upstream("/two/slow", "ok").await;
    let dir = temp_dir("binary");
    let file = dir.join("gateway.yaml");
    std::fs::write(
        &file,
        route_yaml(&slow.url(), "/one/**", "limits: {shutdown_grace: 10s}\n"),
    )
    .unwrap();
    let mut process = Process::start(&file);
    let http = process.address("proxy");
    process.address("admin");
    assert_eq!(get(http, "/one/x").await.0, StatusCode::OK);

    // SIGHUP: a valid new file is applied.
    std::fs::write(
        &file,
        route_yaml(&slow.url(), "/two/**", "limits: {shutdown_grace: 10s}\n"),
    )
    .unwrap();
    process.signal("HUP");
    process.wait_for(&["configuration reloaded"]);
    assert_eq!(get(http, "/two/x").await.0, StatusCode::OK);
    assert_eq!(get(http, "/one/x").await.0, StatusCode::NOT_FOUND);

    // SIGHUP: an invalid file is refused, logged, and the old one keeps serving.
    std::fs::write(&file, "routes: [{name: r, path: /x, upstream: missing}]\n").unwrap();
    process.signal("HUP");
    let line = process.wait_for(&["configuration reload refused"]);
    assert!(line.contains("routes[0].upstream"), "{line}");
    assert_eq!(get(http, "/two/x").await.0, StatusCode::OK);

    // SIGTERM with a request in flight: it finishes, then the process exits 0.
    let in_flight = tokio::spawn(async move { get(http, "/two/slow").await });
    gate.wait_arrival().await;
    process.signal("TERM");
    process.wait_for(&["shutting down"]);
    gate.open();
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");
    let exit = process.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "{exit:?}");
    process.wait_for(&["shutdown complete"]);
}

fn check_config(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orcheo-gateway"));
    command
        .arg("check-config")
        .args(args)
        .env_remove("ORCHEO_GATEWAY_CONFIG");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

#[test]
fn check_config_prints_redacted_settings_or_every_problem() {
    let dir = temp_dir("check");
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "auth: {jwt: {secret: yaml-secret-1}}\nroutes: [{name: all, path: '/**'}]\n",
    )
    .unwrap();
    let output = check_config(
        &["-c", good.to_str().unwrap()],
        &[
            ("ORCHEO_AUTH_BOOTSTRAP_SERVICE_TOKEN", "env-boot-2"),
            ("ORCHEO_POSTGRES_DSN", "postgres://u:pw-3@db/x"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stdout.contains("path: /**"), "{stdout}");
    for secret in ["yaml-secret-1", "env-boot-2", "pw-3"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "listen: {http: [nope]}\nlimits: {idle_timeout: never}\nextra: 1\n",
    )
    .unwrap();
    let output = check_config(
        &["--config", bad.to_str().unwrap()],
        &[("ORCHEO_AUTH_MODE", "sometimes")],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in [
        "listen.http[0]",
        "limits.idle_timeout",
        "extra",
        "ORCHEO_AUTH_MODE",
    ] {
        assert!(
            stderr.contains(&format!("  - {key}: ")),
            "{key} not named:\n{stderr}"
        );
    }
}

#[test]
fn the_shipped_gateway_yaml_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml");
    let output = check_config(&["-c", shipped], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for route in [
        "system-health",
        "workflow-websocket",
        "credentials-write",
        "name: api",
    ] {
        assert!(stdout.contains(route), "{route} missing:\n{stdout}");
    }
}

/// Two consecutive free ports (the demo's gateway and admin listeners).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports");
}

#[tokio::test]
async fn the_demo_prints_commands_that_work() {
    let port = free_port_pair();
    let mut child = Command::new(env!("CARGO_BIN_EXE_orcheo-gateway"))
        .args(["demo", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut tokens = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokens.len() < 3 && Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.split("Bearer ").nth(1) {
                tokens.push(rest.split('\'').next().unwrap().to_string());
            }
        }
    }
    assert_eq!(tokens.len(), 3, "the demo printed its commands");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let call = |path: &'static str, token: Option<String>| async move {
        let mut builder = http::Request::get(path).header("host", "demo");
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        collect(
            send(
                addr,
                builder
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await,
        )
        .await
    };
    let (status, _, body) = call("/api/workflows", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&body)["code"], "auth.missing_token");
    let (status, _, body) = call("/api/workflows", Some(tokens[0].clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["headers"]["x-orcheo-subject"], "demo-user");
    let (status, _, _) = call("/api/workspaces/other/items", Some(tokens[1].clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, body) = call("/api/workspaces/any/items", Some(tokens[2].clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["headers"]["x-orcheo-auth-method"], "bootstrap");
    assert_eq!(call("/public/hello", None).await.0, StatusCode::OK);
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

#[tokio::test]
async fn a_remote_jwks_without_audience_or_issuer_is_warned_about_at_start_and_reload() {
    let dir = temp_dir("jwks-warn");
    let file = dir.join("gateway.yaml");
    // Nothing listens on port 9: the JWKS fetch fails, which does not matter here.
    let config = "listen: {http: ['127.0.0.1:0']}\nadmin: {listen: '127.0.0.1:0'}\nroutes: []\nauth:\n  jwt: {jwks_url: 'http://127.0.0.1:9/jwks.json'}\n";
    std::fs::write(&file, config).unwrap();
    let process = Process::start(&file);
    let needle = "without auth.jwt.audience or auth.jwt.issuer";
    let line = process.wait_for(&[needle]);
    assert!(line.contains(r#""level":"WARN""#), "{line}");
    process.address("proxy");
    process.signal("HUP");
    process.wait_for(&[needle]);
    process.wait_for(&["configuration reloaded"]);
    // With an audience the warning is gone.
    std::fs::write(
        &file,
        config.replace("jwks_url:", "audience: [api], jwks_url:"),
    )
    .unwrap();
    process.signal("HUP");
    let lines = process.lines_until(&["configuration reloaded"]);
    assert!(lines.iter().all(|l| !l.contains(needle)), "{lines:?}");
}

#[tokio::test]
async fn the_healthcheck_command_asks_the_admin_listener() {
    let dir = temp_dir("healthcheck");
    let file = dir.join("gateway.yaml");
    std::fs::write(
        &file,
        "listen: {http: ['127.0.0.1:0']}\nadmin: {listen: '127.0.0.1:0'}\nroutes: []\n",
    )
    .unwrap();
    let healthcheck = |admin: &str| {
        Command::new(env!("CARGO_BIN_EXE_orcheo-gateway"))
            .args(["healthcheck", "-c"])
            .arg(&file)
            .env_remove("ORCHEO_GATEWAY_CONFIG")
            .env("ORCHEO_GATEWAY_ADMIN_LISTEN", admin)
            .output()
            .unwrap()
    };
    let mut process = Process::start(&file);
    let admin = process.address("admin");
    // A wildcard address is asked on loopback, as inside a container.
    for asked in [admin.to_string(), format!("0.0.0.0:{}", admin.port())] {
        let output = healthcheck(&asked);
        assert!(output.status.success(), "{asked}: {output:?}");
    }
    process.signal("TERM");
    assert!(process.wait_exit(Duration::from_secs(10)).success());
    let output = healthcheck(&admin.to_string());
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unhealthy"));
    assert_eq!(healthcheck("off").status.code(), Some(1));
}

#[tokio::test]
async fn a_second_gateway_on_a_taken_port_fails_instead_of_sharing_it() {
    let up = echo_upstream().await;
    let port = free_port();
    let config = |admin: u16| {
        orcheo_gateway::config::load(
            &format!(
                "listen: {{http: ['127.0.0.1:{port}']}}\nadmin: {{listen: '127.0.0.1:{admin}'}}\nlimits: {{workers: 2}}\nupstreams: {{default: {{url: '{}'}}}}\nroutes: [{{name: all, path: '/**'}}]\n",
                up.url()
            ),
            &Default::default(),
        )
        .unwrap()
    };
    let first = start(config(free_port()), None).await;
    assert_eq!(first.http.port(), port);
    assert_eq!(get(first.http, "/x").await.0, StatusCode::OK);
    // Both would set SO_REUSEPORT; the second must still see the port as taken.
    let second = orcheo_gateway::app::Gateway::start_with_store(
        config(free_port()),
        None,
        Default::default(),
        std::sync::Arc::new(orcheo_gateway::store::MemoryStore::new()),
    )
    .await;
    let Err(error) = second else {
        panic!("a second gateway started on a port already served");
    };
    let text = error.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("listen.http"),
        "{text}"
    );
    // The first one still answers every connection.
    for i in 0..10 {
        assert_eq!(
            get(first.http, &format!("/after/{i}")).await.0,
            StatusCode::OK
        );
    }
}
