//! `healthcheck`: GET the admin listener's `/healthz` and exit 0 on 200, 1 otherwise —
//! the container image's `HEALTHCHECK`, since a minimal image has no curl.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::Config;

/// The whole check (connect, ask, answer) must take less than this.
const DEADLINE: Duration = Duration::from_secs(3);

/// Checks the admin listener `config` names (a wildcard address is asked on loopback).
pub fn run(config: &Config) -> ExitCode {
    let Some(mut addr) = config.admin.listen else {
        eprintln!("unhealthy: the admin listener is off (admin.listen)");
        return ExitCode::from(1);
    };
    if addr.ip().is_unspecified() {
        let loopback = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        addr = SocketAddr::new(loopback, addr.port());
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("unhealthy: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(async { tokio::time::timeout(DEADLINE, ask(addr)).await }) {
        Ok(Ok(StatusCode::OK)) => {
            println!("healthy: {addr} /healthz answered 200");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            eprintln!("unhealthy: {addr} /healthz answered {status}");
            ExitCode::from(1)
        }
        Ok(Err(error)) => {
            eprintln!("unhealthy: {addr}: {error}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("unhealthy: {addr} did not answer within {DEADLINE:?}");
            ExitCode::from(1)
        }
    }
}

async fn ask(addr: SocketAddr) -> Result<StatusCode, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get("/healthz")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status())
}
