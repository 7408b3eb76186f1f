//! gRPC `Check` calls per second against a running gateway's ext_authz listener, from a
//! tonic client: `CONCURRENCY` calls in flight over one HTTP/2 connection, for `SECONDS`.
//! Run by `benches/forward_auth.sh`, which starts the gateway; only 127.0.0.1 is targeted.
//!
//!   cargo bench --bench ext_authz -- 127.0.0.1:9191 'Bearer …' 5 64

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [addr, authorization, seconds, concurrency] = args.as_slice() else {
        eprintln!("usage: cargo bench --bench ext_authz -- ADDR AUTHORIZATION SECONDS CONCURRENCY");
        std::process::exit(2);
    };
    assert!(
        addr.starts_with("127.0.0.1:"),
        "benchmarks target 127.0.0.1 only"
    );
    let seconds: u64 = seconds.parse().expect("seconds");
    let concurrency: usize = concurrency.parse().expect("concurrency");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (calls, allowed) = runtime.block_on(run(addr, authorization, seconds, concurrency));
    println!(
        "checks/s {:.0} allowed {allowed}/{calls}",
        calls as f64 / seconds as f64
    );
}

async fn run(addr: &str, authorization: &str, seconds: u64, concurrency: usize) -> (u64, u64) {
    let client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .expect("the ext_authz listener answers");
    let headers: HashMap<String, String> =
        [("authorization".to_string(), authorization.to_string())].into();
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/auth/bench".into(),
                    headers,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (calls, allowed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, request) = (client.clone(), request.clone());
            let (calls, allowed) = (calls.clone(), allowed.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let Ok(response) = client.check(request.clone()).await else {
                        continue;
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if response
                        .get_ref()
                        .status
                        .as_ref()
                        .is_some_and(|s| s.code == 0)
                    {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    (
        calls.load(Ordering::Relaxed),
        allowed.load(Ordering::Relaxed),
    )
}
