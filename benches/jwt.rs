//! Cost of verifying a bearer JWT, cold (every request checks the signature) and through
//! the verified-token cache, for HS256 and RS256.
//!
//!   cargo bench --bench jwt                  # the table
//!   cargo bench --bench jwt -- mint RS256    # a token + JWKS for benches/proxy_load.sh

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orcheo_gateway::auth::jwt::{JwtSettings, JwtVerifier};
use orcheo_gateway::auth::keys::parse_key_set;
use serde_json::json;

const SECRET: &[u8] = b"benchmark-secret-with-32-bytes-or-more";

fn rsa_key() -> EncodingKey {
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/keys/rsa.pem"
    ))
    .unwrap();
    EncodingKey::from_rsa_pem(&pem).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(alg: Algorithm) -> String {
    let claims = json!({"sub": "bench", "exp": now() + 86_400, "scope": "workflows:read", "workspace_ids": ["ws-1"]});
    let mut header = Header::new(alg);
    let key = if alg == Algorithm::RS256 {
        header.kid = Some("bench".into());
        rsa_key()
    } else {
        EncodingKey::from_secret(SECRET).unwrap()
    };
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn jwks() -> serde_json::Value {
    let mut jwk = serde_json::to_value(
        jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa_key(), Algorithm::RS256).unwrap(),
    )
    .unwrap();
    jwk["kid"] = json!("bench");
    json!({"keys": [jwk]})
}

fn verifier(cache: usize) -> JwtVerifier {
    let settings = JwtSettings {
        allowed: vec![Algorithm::HS256, Algorithm::RS256],
        audience: vec![],
        issuer: None,
        leeway: 0.0,
        required: vec!["exp".into()],
    };
    let keys = parse_key_set(&jwks()).unwrap().0;
    JwtVerifier::new(settings, Some(SECRET), keys, None, cache).unwrap()
}

/// Mean time per verification over a run of about `budget`.
fn measure(
    runtime: &tokio::runtime::Runtime,
    verifier: &JwtVerifier,
    token: &str,
    budget: Duration,
) -> Duration {
    let now = now() as f64;
    runtime.block_on(async {
        for _ in 0..100 {
            black_box(verifier.verify(token, now).await.unwrap());
        }
        let started = Instant::now();
        let mut runs = 0u32;
        while started.elapsed() < budget {
            for _ in 0..100 {
                black_box(verifier.verify(black_box(token), now).await.unwrap());
            }
            runs += 100;
        }
        started.elapsed() / runs
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "mint") {
        let alg = match args.get(i + 1).map(String::as_str) {
            Some("RS256") => Algorithm::RS256,
            _ => Algorithm::HS256,
        };
        println!("TOKEN={}", token(alg));
        println!("SECRET={}", std::str::from_utf8(SECRET).unwrap());
        println!("JWKS={}", jwks());
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let budget = Duration::from_secs(2);
    println!("{:<8} {:>16} {:>16}", "alg", "cold (no cache)", "cached");
    for alg in [Algorithm::HS256, Algorithm::RS256] {
        let token = token(alg);
        let cold = measure(&runtime, &verifier(0), &token, budget);
        let cached = measure(&runtime, &verifier(10_000), &token, budget);
        println!(
            "{:<8} {:>13.2} µs {:>13.2} µs",
            format!("{alg:?}"),
            cold.as_secs_f64() * 1e6,
            cached.as_secs_f64() * 1e6
        );
    }
}
