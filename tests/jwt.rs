//! The JWT suite: a positive test per algorithm, every applicable pitfall of
//! ../shared/reference/peer-gateways.md §5 as a negative test, and the Wycheproof JOSE
//! vectors (tests/data/wycheproof) as a table where every invalid vector is rejected.

mod common;

use common::jwt::*;
use jsonwebtoken::Algorithm;
use orcheo_gateway::auth::failure::AuthError;
use orcheo_gateway::auth::jwt::{JwtSettings, JwtVerifier};
use orcheo_gateway::auth::keys::{parse_key_set, KeySet};
use serde_json::{json, Value};

const ALL: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn settings() -> JwtSettings {
    JwtSettings {
        allowed: ALL.to_vec(),
        audience: Vec::new(),
        issuer: None,
        leeway: 0.0,
        required: vec!["exp".into()],
    }
}

fn keys(jwks: Value) -> KeySet {
    parse_key_set(&jwks).unwrap().0
}

/// A JWKS with one key per asymmetric algorithm family: rsa, p256, p384, ed.
fn standard_jwks() -> Value {
    json!({"keys": [
        public_jwk(Algorithm::RS256, 1, "rsa"),
        public_jwk(Algorithm::ES256, 1, "p256"),
        public_jwk(Algorithm::ES384, 1, "p384"),
        public_jwk(Algorithm::EdDSA, 1, "ed"),
    ]})
}

fn verifier_with(settings: JwtSettings, secret: Option<&[u8]>, jwks: Value) -> JwtVerifier {
    JwtVerifier::new(settings, secret, keys(jwks), None, 0).unwrap()
}

fn standard() -> JwtVerifier {
    verifier_with(settings(), Some(SECRET), standard_jwks())
}

fn kid_for(alg: Algorithm) -> Option<&'static str> {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
        Algorithm::ES256 => Some("p256"),
        Algorithm::ES384 => Some("p384"),
        Algorithm::EdDSA => Some("ed"),
        _ => Some("rsa"),
    }
}

async fn code(verifier: &JwtVerifier, token: &str) -> &'static str {
    match verifier.verify(token, now() as f64).await {
        Ok(_) => "ok",
        Err(failure) => failure.error.code(),
    }
}

#[tokio::test]
async fn every_algorithm_verifies() {
    let verifier = standard();
    for alg in ALL {
        let token = sign(alg, kid_for(alg), &claims(&format!("user-{alg:?}")));
        let identity = verifier
            .verify(&token, now() as f64)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!(identity.subject, format!("user-{alg:?}"));
        // Without a kid, the first key whose type fits is used.
        let token = sign(alg, None, &claims("no-kid"));
        assert_eq!(code(&verifier, &token).await, "ok", "{alg:?} without kid");
    }
}

fn tamper_header(token: &str, header: &str) -> String {
    let rest = token.split_once('.').unwrap().1;
    format!("{}.{rest}", b64(header.as_bytes()))
}

#[tokio::test]
async fn alg_none_in_every_spelling_is_rejected_even_without_keys() {
    let no_keys = verifier_with(settings(), None, json!({"keys": []}));
    let payload = b64(claims("x").to_string().as_bytes());
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert_eq!(
                code(&standard(), &token).await,
                "auth.invalid_token",
                "{token}"
            );
            assert_eq!(
                code(&no_keys, &token).await,
                "auth.invalid_token",
                "{token}"
            );
        }
    }
}

#[tokio::test]
async fn key_type_confusion_is_rejected() {
    let rsa_jwk = public_jwk(Algorithm::RS256, 1, "rsa");
    let rsa_pem_public = {
        let pem = std::fs::read(format!(
            "{}/tests/data/keys/rsa.pem",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        pem
    };
    // HS256 signed with the public key (PEM bytes, JWK text) as the HMAC secret.
    for secret in [rsa_pem_public.clone(), rsa_jwk.to_string().into_bytes()] {
        let token = hs256_raw(
            r#"{"alg":"HS256","kid":"rsa"}"#,
            &claims("x").to_string(),
            &secret,
        );
        // Only a JWKS: no key can ever verify an HS token.
        let jwks_only = verifier_with(settings(), None, standard_jwks());
        assert_eq!(code(&jwks_only, &token).await, "auth.key_unavailable");
        // With a (different) secret: the signature is simply wrong.
        assert_eq!(code(&standard(), &token).await, "auth.invalid_token");
    }
    // An RS256 token naming an EC key's kid.
    let token = sign(Algorithm::RS256, Some("p256"), &claims("x"));
    assert_eq!(code(&standard(), &token).await, "auth.invalid_token");
    // ES256 signature checked only with P-256: naming the P-384 key fails.
    let token = sign(Algorithm::ES256, Some("p384"), &claims("x"));
    assert_eq!(code(&standard(), &token).await, "auth.invalid_token");
    // ES384 token naming the P-256 key.
    let token = sign(Algorithm::ES384, Some("p256"), &claims("x"));
    assert_eq!(code(&standard(), &token).await, "auth.invalid_token");
}

#[tokio::test]
async fn key_alg_and_use_bind_the_key() {
    let mut rs512 = public_jwk(Algorithm::RS256, 1, "pinned");
    rs512["alg"] = json!("RS512");
    let mut enc = public_jwk(Algorithm::RS256, 1, "enc");
    enc["use"] = json!("enc");
    let verifier = verifier_with(settings(), None, json!({"keys": [rs512, enc]}));
    let token = sign(Algorithm::RS256, Some("pinned"), &claims("x"));
    assert_eq!(
        code(&verifier, &token).await,
        "auth.invalid_token",
        "RS256 with a key pinned to RS512"
    );
    let token = sign(Algorithm::RS512, Some("pinned"), &claims("x"));
    assert_eq!(code(&verifier, &token).await, "ok");
    let token = sign(Algorithm::PS512, Some("pinned"), &claims("x"));
    assert_eq!(
        code(&verifier, &token).await,
        "auth.invalid_token",
        "PS512 with a key pinned to RS512"
    );
    let token = sign(Algorithm::RS256, Some("enc"), &claims("x"));
    assert_eq!(
        code(&verifier, &token).await,
        "auth.key_unavailable",
        "an encryption key never verifies"
    );
}

#[tokio::test]
async fn kid_is_an_opaque_bounded_name() {
    let verifier = standard();
    for kid in [
        "../../dev/null",
        "' OR 1=1 --",
        "$(reboot)",
        "rsa\u{0}",
        "r\u{0073}a\u{200b}",
    ] {
        let token = sign(Algorithm::RS256, Some(kid), &claims("x"));
        assert_eq!(
            code(&verifier, &token).await,
            "auth.key_unavailable",
            "{kid:?}"
        );
    }
    let long = "k".repeat(10_000);
    let token = sign(Algorithm::RS256, Some(&long), &claims("x"));
    assert_eq!(code(&verifier, &token).await, "auth.invalid_token");
    let token = hs256_raw(
        r#"{"alg":"HS256","kid":42}"#,
        &claims("x").to_string(),
        SECRET,
    );
    assert_eq!(
        code(&verifier, &token).await,
        "auth.invalid_token",
        "a non-string kid"
    );
}

#[tokio::test]
async fn embedded_keys_and_key_urls_are_never_used() {
    // Signed with the second RSA key, which the gateway does not know, and offering it.
    let attacker = public_jwk(Algorithm::RS256, 2, "attacker");
    for member in ["jwk", "jku", "x5u", "x5c"] {
        let value = match member {
            "jwk" => attacker.clone(),
            "x5c" => json!(["MIIB"]),
            _ => json!("https://attacker.example/keys"),
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some("attacker".into());
        let mut header_json = serde_json::to_value(&header).unwrap();
        header_json[member] = value;
        let signed = sign_with(Algorithm::RS256, 2, Some("attacker"), &claims("x"));
        let token = tamper_header(&signed, &header_json.to_string());
        assert_eq!(
            code(&standard(), &token).await,
            "auth.key_unavailable",
            "{member}"
        );
        // Without a kid, the known key is used, and the signature does not verify.
        header_json.as_object_mut().unwrap().remove("kid");
        let token = tamper_header(&signed, &header_json.to_string());
        assert_eq!(
            code(&standard(), &token).await,
            "auth.invalid_token",
            "{member} without kid"
        );
    }
}

#[tokio::test]
async fn crit_b64_nested_and_encrypted_tokens_are_rejected() {
    let body = claims("x").to_string();
    for header in [
        r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
        r#"{"alg":"HS256","crit":[]}"#,
        r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#,
        r#"{"alg":"HS256","b64":true}"#,
        r#"{"alg":"HS256","cty":"JWT"}"#,
        r#"{"alg":"HS256","enc":"A128GCM"}"#,
        r#"{"alg":"HS256","zip":"DEF"}"#,
        r#"{"typ":"JWT"}"#,
        r#"{"alg":256}"#,
        r#"["alg","HS256"]"#,
    ] {
        let token = hs256_raw(header, &body, SECRET);
        assert_eq!(
            code(&standard(), &token).await,
            "auth.invalid_token",
            "{header}"
        );
    }
    let valid = sign(Algorithm::HS256, None, &claims("x"));
    let jwe = format!("{valid}.AAAA.BBBB");
    assert_eq!(
        code(&standard(), &jwe).await,
        "auth.invalid_token",
        "5 segments"
    );
    let parts: Vec<&str> = valid.split('.').collect();
    let json_serialization =
        json!({"payload": parts[1], "protected": parts[0], "signature": parts[2]}).to_string();
    assert_eq!(
        code(&standard(), &json_serialization).await,
        "auth.invalid_token"
    );
}

#[tokio::test]
async fn unsupported_algorithms_get_their_own_code() {
    let mut only_rs = settings();
    only_rs.allowed = vec![Algorithm::RS256];
    let verifier = verifier_with(only_rs, Some(SECRET), standard_jwks());
    let token = sign(Algorithm::HS256, None, &claims("x"));
    assert_eq!(code(&verifier, &token).await, "auth.unsupported_algorithm");
    for alg in ["ES512", "hs256", "RS1", "ES256K"] {
        let token = hs256_raw(
            &format!(r#"{{"alg":"{alg}"}}"#),
            &claims("x").to_string(),
            SECRET,
        );
        assert_eq!(
            code(&verifier, &token).await,
            "auth.unsupported_algorithm",
            "{alg}"
        );
    }
}

#[tokio::test]
async fn time_claims_must_be_numbers_in_range() {
    let verifier = standard();
    let now = now();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"sub": "x"}), "auth.invalid_token"),
        (
            json!({"sub": "x", "exp": (now + 60).to_string()}),
            "auth.invalid_token",
        ),
        (json!({"sub": "x", "exp": null}), "auth.invalid_token"),
        (json!({"sub": "x", "exp": true}), "auth.invalid_token"),
        (json!({"sub": "x", "exp": [now + 60]}), "auth.invalid_token"),
        (json!({"sub": "x", "exp": 1e300}), "auth.invalid_token"),
        (
            json!({"sub": "x", "exp": 18446744073709551615u64}),
            "auth.invalid_token",
        ),
        (json!({"sub": "x", "exp": -5}), "auth.token_expired"),
        (json!({"sub": "x", "exp": -1}), "auth.token_expired"),
        (json!({"sub": "x", "exp": -1e300}), "auth.token_expired"),
        (json!({"sub": "x", "exp": 0}), "auth.token_expired"),
        (
            json!({"sub": "x", "exp": now + 60, "nbf": "0"}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "x", "exp": now + 60, "iat": "now"}),
            "auth.invalid_token",
        ),
        (json!({"sub": "x", "exp": (now + 60) as f64 + 0.5}), "ok"),
        (json!({"sub": 5, "exp": now + 60}), "auth.invalid_token"),
        (
            json!({"sub": "x", "jti": 7, "exp": now + 60}),
            "auth.invalid_token",
        ),
    ];
    for (claims, expected) in cases {
        let token = sign(Algorithm::HS256, None, &claims);
        assert_eq!(code(&verifier, &token).await, expected, "{claims}");
    }
}

#[tokio::test]
async fn expiry_not_before_issued_at_and_leeway_edges() {
    let now = now() as f64;
    let at = |claims: Value, leeway: f64, when: f64| async move {
        let mut s = settings();
        s.leeway = leeway;
        let verifier = verifier_with(s, Some(SECRET), json!([]));
        let token = sign(Algorithm::HS256, None, &claims);
        match verifier.verify(&token, when).await {
            Ok(_) => "ok",
            Err(f) => f.error.code(),
        }
    };
    let exp = now + 100.0;
    assert_eq!(at(json!({"exp": exp}), 0.0, exp - 1.0).await, "ok");
    assert_eq!(
        at(json!({"exp": exp}), 0.0, exp).await,
        "auth.token_expired",
        "exp == now is expired"
    );
    assert_eq!(at(json!({"exp": exp}), 30.0, exp + 29.0).await, "ok");
    assert_eq!(
        at(json!({"exp": exp}), 30.0, exp + 30.0).await,
        "auth.token_expired"
    );
    assert_eq!(
        at(json!({"exp": exp, "nbf": now + 10.0}), 0.0, now).await,
        "auth.invalid_token"
    );
    assert_eq!(
        at(json!({"exp": exp, "nbf": now + 10.0}), 30.0, now).await,
        "ok"
    );
    assert_eq!(
        at(json!({"exp": exp, "iat": now + 10.0}), 0.0, now).await,
        "auth.invalid_token"
    );
    assert_eq!(
        at(json!({"exp": exp, "iat": now + 10.0}), 30.0, now).await,
        "ok"
    );
    assert_eq!(
        at(json!({"exp": exp, "nbf": now, "iat": now}), 0.0, now).await,
        "ok"
    );
}

#[tokio::test]
async fn audience_issuer_and_required_claims() {
    let mut s = settings();
    s.audience = vec!["orcheo".into(), "orcheo-api".into()];
    s.issuer = Some("https://idp.example".into());
    s.required = vec!["exp".into(), "sub".into()];
    let verifier = verifier_with(s, Some(SECRET), json!([]));
    let exp = now() + 600;
    let iss = "https://idp.example";
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": "orcheo"}),
            "ok",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": ["other", "orcheo-api"]}),
            "ok",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": []}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": ""}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": "other"}),
            "auth.invalid_audience",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": ["other", 5]}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": iss, "aud": {"orcheo": true}}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "orcheo"}),
            "auth.invalid_token",
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": "https://evil.example", "aud": "orcheo"}),
            "auth.invalid_issuer",
        ),
        (
            json!({"exp": exp, "iss": iss, "aud": "orcheo"}),
            "auth.invalid_token",
        ),
    ];
    for (claims, expected) in cases {
        let token = sign(Algorithm::HS256, None, &claims);
        assert_eq!(code(&verifier, &token).await, expected, "{claims}");
    }
    // A failure after a valid signature names the subject (for per-identity limits).
    let token = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "mallory", "exp": exp, "iss": iss, "aud": "x"}),
    );
    let failure = verifier.verify(&token, now() as f64).await.unwrap_err();
    assert_eq!(failure.identity.as_deref(), Some("mallory"));
}

#[tokio::test]
async fn duplicate_members_are_rejected() {
    let exp = now() + 600;
    let two_alg = hs256_raw(
        r#"{"alg":"none","alg":"HS256"}"#,
        &claims("x").to_string(),
        SECRET,
    );
    assert_eq!(code(&standard(), &two_alg).await, "auth.invalid_token");
    let two_exp = hs256_raw(
        r#"{"alg":"HS256"}"#,
        &format!(r#"{{"sub":"x","exp":1,"exp":{exp}}}"#),
        SECRET,
    );
    assert_eq!(code(&standard(), &two_exp).await, "auth.invalid_token");
    // A JWKS repeating a kid for keys of different types: the one that fits is used.
    let mut ec = public_jwk(Algorithm::ES256, 1, "shared");
    ec["kid"] = json!("shared");
    let rsa = public_jwk(Algorithm::RS256, 1, "shared");
    let verifier = verifier_with(settings(), None, json!({"keys": [ec, rsa]}));
    assert_eq!(
        code(
            &verifier,
            &sign(Algorithm::RS256, Some("shared"), &claims("x"))
        )
        .await,
        "ok"
    );
    assert_eq!(
        code(
            &verifier,
            &sign(Algorithm::ES256, Some("shared"), &claims("x"))
        )
        .await,
        "ok"
    );
}

#[tokio::test]
async fn base64url_is_strict() {
    let token = sign(Algorithm::HS256, None, &claims("x"));
    let (head, rest) = token.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let last = signature.chars().last().unwrap();
    let flipped_bits = format!(
        "{}{}",
        &signature[..signature.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    for bad in [
        format!("{head}=.{payload}.{signature}"),
        format!("{head}.{payload}=.{signature}"),
        format!("{head}.{payload}.{signature}="),
        format!(
            "{head}.{}.{signature}",
            payload.replace('-', "+").replace('_', "/") + "+/"
        ),
        format!(" {token}"),
        format!("{head}.{payload} .{signature}"),
        format!("{head}.{payload}.{flipped_bits}"),
        format!("{head}..{signature}"),
        format!("{head}.{payload}.{signature}!"),
    ] {
        assert_eq!(code(&standard(), &bad).await, "auth.invalid_token", "{bad}");
    }
}

#[tokio::test]
async fn malformed_signatures_and_weak_keys_are_rejected() {
    // ECDSA signatures are raw r||s: a DER-encoded one, or r = s = 0, never verifies.
    let token = sign(Algorithm::ES256, Some("p256"), &claims("x"));
    let (input, _) = token.rsplit_once('.').unwrap();
    for signature in [
        vec![0u8; 64],
        [
            vec![0x30, 0x44, 0x02, 0x20],
            vec![1u8; 32],
            vec![0x02, 0x20],
            vec![1u8; 32],
        ]
        .concat(),
    ] {
        let forged = format!("{input}.{}", b64(&signature));
        assert_eq!(code(&standard(), &forged).await, "auth.invalid_token");
    }
    // A truncated RSA signature.
    let token = sign(Algorithm::RS256, Some("rsa"), &claims("x"));
    let (input, signature) = token.rsplit_once('.').unwrap();
    let forged = format!("{input}.{}", &signature[..signature.len() - 8]);
    assert_eq!(code(&standard(), &forged).await, "auth.invalid_token");
    // RSA keys below 2048 bits and e = 1 are refused when the key set is loaded.
    let mut small = public_jwk(Algorithm::RS256, 1, "small");
    small["n"] = json!(b64(&[0xC3; 128]));
    assert!(parse_key_set(&json!([small]))
        .unwrap_err()
        .contains("below 2048"));
    let mut e1 = public_jwk(Algorithm::RS256, 1, "e1");
    e1["e"] = json!("AQ");
    assert!(parse_key_set(&json!([e1]))
        .unwrap_err()
        .contains("exponent"));
}

#[tokio::test]
async fn verified_tokens_are_cached_until_they_expire() {
    let checks = prometheus::IntCounter::new("checks", "signature checks").unwrap();
    let cached = |capacity| {
        JwtVerifier::new(settings(), Some(SECRET), KeySet::default(), None, capacity)
            .unwrap()
            .counting_signatures(checks.clone())
    };
    let verifier = cached(100);
    let now = now() as f64;
    let token = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "c", "exp": now + 10.0}),
    );
    for offset in [0.0, 1.0, 5.0, 9.0] {
        let identity = verifier.verify(&token, now + offset).await.unwrap();
        assert_eq!(identity.subject, "c");
    }
    assert_eq!(
        checks.get(),
        1,
        "one signature check, then the cache answers"
    );
    let other = sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "d", "exp": now + 10.0}),
    );
    verifier.verify(&other, now).await.unwrap();
    assert_eq!(checks.get(), 2, "another token is checked on its own");
    // Without a cache every verification checks the signature again.
    let uncached = cached(0);
    for _ in 0..3 {
        uncached.verify(&token, now).await.unwrap();
    }
    assert_eq!(checks.get(), 5);
    let expired = verifier.verify(&token, now + 10.0).await.unwrap_err();
    assert_eq!(
        expired.error,
        AuthError::TokenExpired(orcheo_gateway::auth::failure::Expired::Bearer)
    );
}

/// Runs one Wycheproof file: the group's key becomes the secret (an `oct` key) or the
/// static JWKS (anything else); every vector marked invalid must be rejected.
async fn wycheproof(file: &str) -> (usize, usize, Vec<String>) {
    let path = format!(
        "{}/tests/data/wycheproof/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (mut invalid, mut valid_accepted, mut valid_rejected) = (0, 0, Vec::new());
    for group in data["testGroups"].as_array().unwrap() {
        let key = &group["private"];
        let (secret, jwks) = if key["kty"] == "oct" {
            let k = key["k"].as_str().unwrap();
            (Some(base64_decode(k)), json!([]))
        } else if key.get("keys").is_some() {
            (None, key.clone())
        } else {
            (None, json!([key]))
        };
        let static_keys = match parse_key_set(&jwks) {
            Ok((keys, _)) => keys,
            Err(_) => KeySet::default(),
        };
        let verifier =
            JwtVerifier::new(settings(), secret.as_deref(), static_keys, None, 0).unwrap();
        let tests = group["tests"].as_array().unwrap();
        // Compact tokens are strings; JSON-serialized ones are objects, passed as their text.
        // JWE vectors carry `jwe` instead of `jws`: a bearer is never decrypted, so they
        // must all be refused.
        let jws_of = |test: &Value| {
            let token = test
                .get("jws")
                .or_else(|| test.get("jwe"))
                .unwrap_or(&Value::Null);
            token
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| token.to_string())
        };
        // A few vectors (e.g. "invalidBase64Padding") lost the padding that made them
        // invalid and are now byte for byte a valid vector of the same group; no
        // verifier can accept one and reject the other, so they are reported, not run.
        let valid: Vec<String> = tests
            .iter()
            .filter(|t| t["result"] == "valid")
            .map(jws_of)
            .collect();
        for test in tests {
            let jws = jws_of(test);
            let accepted = verifier.verify_jws(&jws).await.is_ok();
            let id = format!("{file} #{} {}", test["tcId"], test["comment"]);
            let is_jwe = test.get("jwe").is_some();
            match test["result"].as_str().unwrap() {
                _ if is_jwe => {
                    assert!(!accepted, "accepted an encrypted token: {id}");
                    invalid += 1;
                }
                "invalid" if valid.contains(&jws) => {
                    eprintln!("skipped, identical to a valid vector: {id}");
                }
                "invalid" => {
                    assert!(!accepted, "accepted an invalid vector: {id}");
                    invalid += 1;
                }
                "valid" if accepted => valid_accepted += 1,
                _ => valid_rejected.push(id),
            }
        }
    }
    (invalid, valid_accepted, valid_rejected)
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

#[tokio::test]
async fn wycheproof_vectors() {
    for file in [
        "json_web_signature_test.json",
        "json_web_key_test.json",
        "json_web_crypto_test.json",
    ] {
        let (invalid, accepted, rejected) = wycheproof(file).await;
        eprintln!("{file}: {invalid} invalid vectors rejected; {accepted} valid accepted");
        assert!(invalid > 0 && accepted > 0, "{file}: the table ran");
        let expected: Vec<String> = REFUSED_VALID
            .iter()
            .filter(|(f, _, _)| *f == file)
            .map(|(_, id, _)| format!("{file} #{id}"))
            .collect();
        let rejected: Vec<String> = rejected
            .iter()
            .map(|id| id.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            rejected, expected,
            "{file}: valid vectors rejected beyond the gateway's stated policy (see REFUSED_VALID)"
        );
    }
}

/// Vectors Wycheproof marks valid that the gateway refuses on purpose, each with the rule
/// of the contract that refuses it. Any other valid vector that is rejected fails the test.
const REFUSED_VALID: [(&str, u32, &str); 18] = [
    (
        "json_web_signature_test.json",
        259,
        "empty payload: a bearer JWT's payload is a claims object",
    ),
    ("json_web_signature_test.json", 264, "empty payload"),
    ("json_web_signature_test.json", 268, "empty payload"),
    ("json_web_signature_test.json", 272, "empty payload"),
    ("json_web_signature_test.json", 320, "empty payload"),
    ("json_web_signature_test.json", 325, "empty payload"),
    (
        "json_web_signature_test.json",
        346,
        "token alg PS384, key alg PS256: the key's alg must fit",
    ),
    (
        "json_web_signature_test.json",
        347,
        "ES512 is not an allowed algorithm (ES256/384 only)",
    ),
    (
        "json_web_signature_test.json",
        349,
        "key_ops [\"sign, verify\"] does not list verify",
    ),
    (
        "json_web_signature_test.json",
        350,
        "token alg PS384, key alg PS256: the key's alg must fit",
    ),
    (
        "json_web_signature_test.json",
        351,
        "ES512 is not an allowed algorithm",
    ),
    (
        "json_web_signature_test.json",
        372,
        "a non-base64url character: segments are strict base64url",
    ),
    (
        "json_web_signature_test.json",
        373,
        "a non-base64url character: segments are strict base64url",
    ),
    (
        "json_web_key_test.json",
        2,
        "HS* uses the configured secret only, never a JWKS oct key",
    ),
    (
        "json_web_key_test.json",
        13,
        "HS* uses the configured secret only",
    ),
    (
        "json_web_key_test.json",
        14,
        "HS* uses the configured secret only",
    ),
    (
        "json_web_key_test.json",
        15,
        "HS* uses the configured secret only",
    ),
    (
        "json_web_crypto_test.json",
        48,
        "HS* uses the configured secret only",
    ),
];
