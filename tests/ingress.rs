//! The ingress companion with real ingresses: nginx (`auth_request` + `auth_request_set`,
//! the JSON body fetched by its `error_page` location) and Caddy (`forward_auth`), each
//! in front of an echo upstream and asking this gateway. The configurations are the
//! README's snippets with test ports. nginx and Caddy are Debian packages (`.ci/run`
//! installs them) and are stopped by PID.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::jwt::*;
use common::*;
use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

/// A child process stopped (by PID) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is installed by .ci/run"
        );
        eprintln!("\n*** SKIPPED: {program} is not installed ***\n");
    }
    found
}

async fn wait_listening(port: u16) {
    let up = eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "nothing listens on {port}");
}

/// The gateway as a companion: routes, the ingress (127.0.0.1) trusted, an IP limit.
async fn companion(upstream: &str) -> TestGateway {
    gateway(&yaml(
        upstream,
        &format!(
            "routes:\n  - {{name: health, path: /api/system/health, public: true}}\n  - {{name: read, path: '/api/read/**', scopes: [workflows:read]}}\ntrusted_proxies: ['127.0.0.1']\nauth:\n  jwt: {{secret: '{}'}}\n  rate_limit: {{ip: 3, interval: 60}}\n",
            std::str::from_utf8(SECRET).unwrap()
        ),
    ))
    .await
}

fn token(scopes: &str) -> String {
    let claims = json!({"sub": "alice", "exp": now() + 600, "scope": scopes});
    format!("Bearer {}", sign(Algorithm::HS256, None, &claims))
}

/// What both ingresses must do with the gateway's answers.
async fn the_ingress_enforces_the_gateways_decisions(ingress: u16, gw: &TestGateway) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ingress));
    // Allowed: the upstream sees the identity, never the client's spoofed one.
    let reader = token("workflows:read");
    let (status, _, echo) = call(
        addr,
        "/api/read/x?y=1",
        &[("authorization", &reader), ("x-orcheo-subject", "root")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    let seen = &echo["headers"];
    assert_eq!(seen["x-orcheo-subject"], json!(["alice"]), "{echo}");
    assert_eq!(seen["x-orcheo-scopes"], json!(["workflows:read"]));
    assert_eq!(seen["x-orcheo-auth-method"], json!(["jwt"]));
    assert_eq!(echo["path"], "/api/read/x");
    // A public route, anonymous, with a spoofed subject: the upstream never sees it.
    let (status, _, echo) = call(addr, "/api/system/health", &[("x-orcheo-subject", "root")]).await;
    assert_eq!(status, StatusCode::OK);
    let subject = echo["headers"]
        .get("x-orcheo-subject")
        .cloned()
        .unwrap_or(Value::Null);
    assert!(
        subject != json!(["root"]),
        "the spoofed subject reached the upstream: {echo}"
    );
    // 403 with the gateway's body and challenge.
    let (status, headers, body) = call(addr, "/api/read/x", &[("authorization", &token(""))]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("auth.missing_scope")),
        "{body}"
    );
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("insufficient_scope"));
    // 401 three times (each failure counted once), then 429, all with the JSON body.
    for _ in 0..3 {
        let (status, headers, body) = call(addr, "/api/read/x", &[]).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("auth.missing_token")),
            "{body}"
        );
        assert_eq!(headers["www-authenticate"], r#"Bearer realm="orcheo""#);
    }
    let (status, headers, body) = call(addr, "/api/read/x", &[("authorization", &reader)]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("auth.rate_limited.ip")),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    let metrics = gw.metrics().await;
    let failures = metric_value(
        &metrics,
        r#"orcheo_gateway_auth_attempts_total{code="auth.missing_token",method="none",result="failure"}"#,
    );
    assert_eq!(
        failures,
        Some(3.0),
        "each failure is counted once:\n{metrics}"
    );
}

#[tokio::test]
async fn nginx_auth_request_in_front_of_an_upstream() {
    if !installed("nginx") {
        return;
    }
    let up = echo_upstream().await;
    let gw = companion(&up.url()).await;
    let dir = temp_dir("nginx");
    let port = free_port();
    let config = NGINX_CONF
        .replace("{dir}", &dir.display().to_string())
        .replace("{port}", &port.to_string())
        .replace("{gateway}", &gw.http.to_string())
        .replace("{upstream}", &up.addr.to_string());
    std::fs::write(dir.join("nginx.conf"), config).unwrap();
    let _nginx = Running(
        Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts"),
    );
    wait_listening(port).await;
    the_ingress_enforces_the_gateways_decisions(port, &gw).await;
}

/// The README's nginx block, in a minimal nginx.conf of its own (one process, files in
/// the test's directory).
const NGINX_CONF: &str = r#"
master_process off;
daemon off;
user root;
pid {dir}/nginx.pid;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;

  upstream orcheo_gateway { server {gateway}; }

  server {
    listen 127.0.0.1:{port};

    location / {
      auth_request /_orcheo_auth;
      auth_request_set $orcheo_subject $upstream_http_x_orcheo_subject;
      auth_request_set $orcheo_identity_type $upstream_http_x_orcheo_identity_type;
      auth_request_set $orcheo_token_id $upstream_http_x_orcheo_token_id;
      auth_request_set $orcheo_scopes $upstream_http_x_orcheo_scopes;
      auth_request_set $orcheo_workspaces $upstream_http_x_orcheo_workspaces;
      auth_request_set $orcheo_auth_method $upstream_http_x_orcheo_auth_method;
      proxy_set_header X-Orcheo-Subject $orcheo_subject;
      proxy_set_header X-Orcheo-Identity-Type $orcheo_identity_type;
      proxy_set_header X-Orcheo-Token-Id $orcheo_token_id;
      proxy_set_header X-Orcheo-Scopes $orcheo_scopes;
      proxy_set_header X-Orcheo-Workspaces $orcheo_workspaces;
      proxy_set_header X-Orcheo-Auth-Method $orcheo_auth_method;
      # 401 and 403 come back as such, anything else (429, 503) as 500: either way the
      # gateway is asked again for its JSON answer, which it replays without recounting.
      error_page 401 403 500 = @orcheo_denied;
      proxy_pass http://{upstream};
    }

    location = /_orcheo_auth {
      internal;
      proxy_pass http://orcheo_gateway/_orcheo/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Request-Id $request_id;
    }

    location @orcheo_denied {
      rewrite ^ /_orcheo/auth break;
      proxy_pass http://orcheo_gateway;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Request-Id $request_id;
    }
  }
}
"#;

#[tokio::test]
async fn caddy_forward_auth_in_front_of_an_upstream() {
    if !installed("caddy") {
        return;
    }
    let up = echo_upstream().await;
    let gw = companion(&up.url()).await;
    let dir = temp_dir("caddy");
    let port = free_port();
    let config = CADDYFILE
        .replace("{port}", &port.to_string())
        .replace("{gateway}", &gw.http.to_string())
        .replace("{upstream}", &up.addr.to_string());
    std::fs::write(dir.join("Caddyfile"), config).unwrap();
    let _caddy = Running(run_caddy(&dir));
    wait_listening(port).await;
    the_ingress_enforces_the_gateways_decisions(port, &gw).await;
}

fn run_caddy(dir: &Path) -> Child {
    Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(dir.join("Caddyfile"))
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("caddy starts")
}

/// The README's Caddy block with test ports.
const CADDYFILE: &str = r#"
{
  admin off
  auto_https off
}

:{port} {
  bind 127.0.0.1
  forward_auth {gateway} {
    uri /_orcheo/auth
    copy_headers X-Orcheo-Subject X-Orcheo-Identity-Type X-Orcheo-Token-Id X-Orcheo-Scopes X-Orcheo-Workspaces X-Orcheo-Auth-Method
  }
  reverse_proxy {upstream}
}
"#;
