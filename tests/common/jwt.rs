//! Test tokens: signing with the test keys in tests/data/keys, and their public JWKs.
#![allow(dead_code)]

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const SECRET: &[u8] = b"test-secret-with-at-least-32-bytes!!";

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/data/keys/{name}.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The signing key for `alg` (`which` picks between the two RSA keys).
pub fn encoding_key(alg: Algorithm, which: u8) -> EncodingKey {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(SECRET).unwrap()
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&key_file("p256")).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(&key_file("p384")).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&key_file("ed25519")).unwrap(),
        _ if which == 2 => EncodingKey::from_rsa_pem(&key_file("rsa2")).unwrap(),
        _ => EncodingKey::from_rsa_pem(&key_file("rsa")).unwrap(),
    }
}

/// The public JWK of the key for `alg`, with `kid`.
pub fn public_jwk(alg: Algorithm, which: u8, kid: &str) -> Value {
    let jwk = Jwk::from_encoding_key(&encoding_key(alg, which), alg).unwrap();
    let mut value = serde_json::to_value(jwk).unwrap();
    value["kid"] = json!(kid);
    value.as_object_mut().unwrap().remove("alg");
    value
}

/// A token signed with `alg`, header `kid`, and `claims`.
pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    sign_with(alg, 1, kid, claims)
}

pub fn sign_with(alg: Algorithm, which: u8, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, which)).unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Standard claims valid for an hour.
pub fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "iat": now()})
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An HMAC-signed token with a hand-written header and payload (for malformed cases).
pub fn hs256_raw(header: &str, payload: &str, secret: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}
