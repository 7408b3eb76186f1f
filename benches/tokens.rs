//! Cost of a service-token lookup: through the cache (warm), and a cache miss that asks
//! SQLite or PostgreSQL (127.0.0.1:5432, or $ORCHEO_TEST_POSTGRES_URL's server).
//!
//!   cargo bench --bench tokens

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orcheo_gateway::store::{
    hash_secret, CachedStore, Change, PostgresStore, SqliteStore, TokenRecord, TokenStore,
};
use orcheo_gateway::time::Timestamp;

const TOKENS: usize = 1000;

async fn fill(store: &dyn TokenStore) -> Vec<String> {
    let mut hashes = Vec::new();
    for i in 0..TOKENS {
        let hash = hash_secret(&format!("bench-secret-{i}"));
        let record = TokenRecord {
            identifier: format!("bench-{i}"),
            secret_hash: hash.clone(),
            scopes: vec!["workflows:read".into()],
            issued_at: Timestamp::now(),
            ..TokenRecord::default()
        };
        store
            .write(Change {
                insert: Some(record),
                ..Change::default()
            })
            .await
            .unwrap();
        hashes.push(hash);
    }
    hashes
}

async fn per_lookup(store: &dyn TokenStore, hashes: &[String]) -> Duration {
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_secs(2) {
        for hash in hashes {
            black_box(store.lookup(hash).await.unwrap().unwrap());
        }
        calls += hashes.len() as u32;
    }
    started.elapsed() / calls
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("{:<36} {:>12}", "lookup", "per call");
        let dir = std::env::temp_dir().join(format!("orcheo-token-bench-{}", std::process::id()));
        let sqlite = SqliteStore::open(&dir.join("tokens.sqlite")).unwrap();
        let hashes = fill(sqlite.as_ref()).await;
        let miss = per_lookup(sqlite.as_ref(), &hashes).await;
        println!(
            "{:<36} {:>9.1} µs",
            "cache miss, SQLite",
            miss.as_secs_f64() * 1e6
        );
        let cached = CachedStore::new(
            sqlite.clone(),
            prometheus::IntCounter::new("bench_errors", "x").unwrap(),
        );
        let hit = per_lookup(cached.as_ref(), &hashes).await;
        println!("{:<36} {:>9.1} µs", "cache hit", hit.as_secs_f64() * 1e6);

        let admin = std::env::var("ORCHEO_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let db = format!("orcheo_gw_bench_{}", std::process::id());
        match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("CREATE DATABASE {db}"))
                    .await
                    .unwrap();
                let dsn = format!("{}/{db}", admin.rsplit_once('/').unwrap().0);
                let postgres: Arc<PostgresStore> = PostgresStore::open(&dsn).await.unwrap();
                let hashes = fill(postgres.as_ref()).await;
                let miss = per_lookup(postgres.as_ref(), &hashes).await;
                println!(
                    "{:<36} {:>9.1} µs",
                    "cache miss, PostgreSQL",
                    miss.as_secs_f64() * 1e6
                );
                drop(postgres);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                    .await;
            }
            Err(error) => println!("(no PostgreSQL at {admin}: {error})"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
