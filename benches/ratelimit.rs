//! Cost of one rate-limit check: the local sliding windows, and through Redis
//! (127.0.0.1:6379, or $ORCHEO_TEST_REDIS_URL) when it answers.
//!
//!   cargo bench --bench ratelimit

use std::hint::black_box;
use std::time::{Duration, Instant};

use orcheo_gateway::config::{AuthRateLimit, Dur, RateLimitPer, RouteRateLimit};
use orcheo_gateway::metrics::Metrics;
use orcheo_gateway::ratelimit::RateLimiter;

fn limits() -> AuthRateLimit {
    AuthRateLimit {
        ip: 1_000_000,
        identity: 0,
        interval: Dur::secs(60),
        redis_url: None,
    }
}

/// Mean time per call of `op` over about `budget`, spread over 10 000 client keys.
async fn measure<F, Fut>(budget: Duration, mut op: F) -> Duration
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("198.51.{}.{}", i / 256, i % 256))
        .collect();
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < budget {
        for key in keys.iter().take(1000) {
            op(key.clone()).await;
        }
        calls += 1000;
    }
    started.elapsed() / calls
}

async fn bench(label: &str, limiter: &RateLimiter) {
    let limits = limits();
    let route = RouteRateLimit {
        per: RateLimitPer::Ip,
        requests: 1_000_000,
        window: Dur::secs(1),
    };
    let budget = Duration::from_secs(2);
    let ip = measure(budget, |key| {
        let limits = &limits;
        async move {
            black_box(limiter.check_ip(limits, &key, "bench").await.ok());
        }
    })
    .await;
    let route_check = measure(budget, |key| {
        let route = &route;
        async move {
            black_box(
                limiter
                    .check_route("bench", route, &key, None, "bench")
                    .await
                    .ok(),
            );
        }
    })
    .await;
    println!(
        "{label:<8} {:>16.2} µs {:>18.2} µs",
        ip.as_secs_f64() * 1e6,
        route_check.as_secs_f64() * 1e6
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "{:<8} {:>19} {:>21}",
            "windows", "IP failure check", "route limit (acquire)"
        );
        let local = RateLimiter::new(100_000, None, Metrics::new()).unwrap();
        bench("local", &local).await;
        let url = std::env::var("ORCHEO_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let url = format!("{}/6", url.trim_end_matches('/'));
        let metrics = Metrics::new();
        let shared = RateLimiter::new(100_000, Some(&url), metrics.clone()).unwrap();
        bench("redis", &shared).await;
        if metrics.ratelimit_redis_errors.get() > 0 {
            println!("(Redis at {url} did not answer: the redis row measured the local fallback)");
        }
    });
}
