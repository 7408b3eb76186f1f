//! `demo`: the gateway in front of a built-in echo upstream, with an in-memory token
//! store, a fresh bootstrap token and HS256 secret, and ready-to-paste curl commands.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::Gateway;
use crate::body::{self, Body};
use crate::config::{self, Env};
use crate::store::MemoryStore;

/// Runs the demo until Ctrl-C.
pub fn run(port: u16) -> ExitCode {
    let Some(admin_port) = port.checked_add(1) else {
        eprintln!("error: --port must leave room for the admin port (port + 1)");
        return ExitCode::from(2);
    };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = runtime.block_on(demo(port, admin_port));
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness available".to_string())?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

async fn demo(port: u16, admin_port: u16) -> ExitCode {
    match start(port, admin_port).await {
        Ok(gateway) => {
            let _ = tokio::signal::ctrl_c().await;
            gateway.shutdown().await;
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

async fn start(port: u16, admin_port: u16) -> Result<Gateway, String> {
    let echo = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("echo upstream: {e}"))?;
    let echo_addr = echo.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(serve_echo(echo));
    let secret = random_token()?;
    let bootstrap = random_token()?;
    let yaml = format!(
        r#"
listen: {{http: ["127.0.0.1:{port}"]}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
upstreams: {{default: {{url: "http://{echo_addr}"}}}}
auth:
  jwt: {{secret: "{secret}", allowed_algorithms: [HS256]}}
  bootstrap: {{token: "{bootstrap}"}}
  service_tokens: {{backend: memory}}
routes:
  - {{name: public, path: /public/**, public: true}}
  - {{name: workflows, path: /api/workflows/**, scopes: [workflows:read]}}
  - {{name: workspace, path: "/api/workspaces/{{workspace_id}}/**", workspace: {{path_param: workspace_id}}}}
  - {{name: echo-websocket, path: /ws/echo, websocket: true}}
  - {{name: everything-else, path: /**}}
log: {{format: text}}
"#
    );
    let config = config::load(&yaml, &Env::new()).map_err(|e| e.to_string())?;
    crate::logging::init(config::LogLevel::Info, config::LogFormat::Text);
    let jwt = mint(&secret)?;
    let gateway = Gateway::start_with_store(config, None, Env::new(), Arc::new(MemoryStore::new()))
        .await
        .map_err(|e| e.to_string())?;
    print_tour(port, admin_port, &jwt, &bootstrap);
    Ok(gateway)
}

/// A JWT for the tour: one hour, `workflows:read`, workspace `demo`.
fn mint(secret: &str) -> Result<String, String> {
    let now = crate::time::Timestamp::now().0;
    let claims = json!({
        "sub": "demo-user", "exp": now + 3600, "iat": now,
        "scope": "workflows:read workflows:execute", "workspace_ids": ["demo"]
    });
    let key =
        jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).map_err(|e| e.to_string())?;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .map_err(|e| e.to_string())
}

fn print_tour(port: u16, admin_port: u16, jwt: &str, bootstrap: &str) {
    let base = format!("http://127.0.0.1:{port}");
    println!(
        r#"
orcheo-gateway demo: the gateway on {base} in front of an echo upstream
(admin: http://127.0.0.1:{admin_port}/readyz and /metrics). Ctrl-C stops it.

1. No token: refused with 401 auth.missing_token
   curl -i {base}/api/workflows

2. A JWT (HS256, scope workflows:read, workspace demo): 200, and the echo shows the
   X-Orcheo-* identity headers the upstream received
   curl -s -H 'Authorization: Bearer {jwt}' {base}/api/workflows

3. The same JWT on another workspace: 403 auth.workspace_forbidden
   curl -i -H 'Authorization: Bearer {jwt}' {base}/api/workspaces/other/items

4. The bootstrap token (all admin scopes, every workspace): 200
   curl -s -H 'Authorization: Bearer {bootstrap}' {base}/api/workspaces/any/items

5. A public route: no token needed
   curl -s {base}/public/hello
"#
    );
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service =
                service_fn(|request| async move { Ok::<_, Infallible>(echo(request).await) });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers with JSON of the method, path, query and headers received; on `/ws/echo`,
/// accepts a WebSocket and echoes every message.
async fn echo(mut request: Request<Incoming>) -> Response<Body> {
    if crate::proxy::websocket::is_upgrade(&request) && request.uri().path() == "/ws/echo" {
        return echo_websocket(&mut request);
    }
    let (parts, incoming) = request.into_parts();
    let size = incoming
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                json!(String::from_utf8_lossy(value.as_bytes())),
            )
        })
        .collect();
    let body = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": size,
    });
    let mut response = Response::new(body::full(format!("{body:#}\n")));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn echo_websocket(request: &mut Request<Incoming>) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = request
        .headers()
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec());
    let Some(key) = key else {
        let mut response = Response::new(body::full("missing Sec-WebSocket-Key"));
        *response.status_mut() = http::StatusCode::BAD_REQUEST;
        return response;
    };
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = socket.next().await {
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let mut response = Response::new(body::empty());
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    if let Ok(value) = http::HeaderValue::from_str(&accept) {
        headers.insert(http::header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}
