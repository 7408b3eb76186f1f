//! Bearer JWT verification (contract §3.4): compact JWS only, the algorithm checked
//! against the allow-list and bound to the key's type, keys from the secret (HS*) or the
//! static then remote JWKS (others), then the time, audience, issuer and required claims.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus::IntCounter;
use serde_json::{Map, Value};

use super::b64url;
use super::cache::TokenCache;
use super::failure::{AuthError, AuthFailure, Expired};
use super::identity::Identity;
use super::jwks::{RemoteJwks, RemoteLookup};
use super::keys::{KeySet, Lookup};
use crate::config;

/// Claim checks, from configuration.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Algorithms a token may use.
    pub allowed: Vec<Algorithm>,
    /// When non-empty, `aud` must contain one of these.
    pub audience: Vec<String>,
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
    /// Clock skew allowed, in seconds.
    pub leeway: f64,
    /// Claims that must be present.
    pub required: Vec<String>,
}

impl JwtSettings {
    /// From `auth.jwt` (already validated).
    pub fn from_config(jwt: &config::Jwt) -> Result<Self, String> {
        let allowed = jwt
            .allowed_algorithms
            .0
            .iter()
            .map(|name| {
                name.parse::<Algorithm>()
                    .map_err(|_| format!("unknown algorithm `{name}`"))
            })
            .collect::<Result<_, _>>()?;
        Ok(JwtSettings {
            allowed,
            audience: jwt.audience.0.clone(),
            issuer: jwt.issuer.clone().filter(|i| !i.is_empty()),
            leeway: jwt.leeway.get().as_secs_f64(),
            required: jwt.required_claims.0.clone(),
        })
    }
}

/// The parts of a compact JWS, checked for shape before any cryptography.
struct Parsed<'a> {
    alg: Algorithm,
    kid: Option<String>,
    signing_input: &'a str,
    payload: &'a str,
    signature: &'a str,
}

/// Header members that change how a JWS must be processed; the gateway implements none
/// of them, so a token carrying one is refused rather than half-understood.
const REFUSED_HEADER_MEMBERS: [&str; 4] = ["crit", "b64", "enc", "zip"];

/// Longest `kid` accepted: a key id is a short opaque name, not a place for payloads.
const MAX_KID_BYTES: usize = 256;

/// Largest time claim accepted (2^53: the last integer a JSON number holds exactly);
/// anything beyond is not a time.
const MAX_TIME_CLAIM: f64 = 9_007_199_254_740_992.0;

/// A JSON object whose members are all distinct: duplicate members (two `alg`, two
/// `exp`) make a token mean different things to different parsers, so they are refused.
struct StrictObject(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<StrictObject, A::Error> {
                let mut map = Map::new();
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if map.insert(key, value).is_some() {
                        return Err(serde::de::Error::custom("duplicate member"));
                    }
                }
                Ok(StrictObject(map))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Decodes one base64url segment holding a JSON object with distinct members.
fn decode_object(segment: &str) -> Option<Map<String, Value>> {
    let bytes = b64url::decode(segment)?;
    serde_json::from_slice::<StrictObject>(&bytes)
        .ok()
        .map(|o| o.0)
}

fn parse<'a>(token: &'a str, allowed: &[Algorithm]) -> Result<Parsed<'a>, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::InvalidToken);
    };
    if [header, payload, signature]
        .iter()
        .any(|s| s.is_empty() || !b64url::is_alphabet(s))
    {
        return Err(AuthError::InvalidToken);
    }
    let header = decode_object(header).ok_or(AuthError::InvalidToken)?;
    if REFUSED_HEADER_MEMBERS
        .iter()
        .any(|m| header.contains_key(*m))
    {
        return Err(AuthError::InvalidToken);
    }
    // A nested token (`cty: JWT`) is a signed or encrypted JWT inside: never unwrapped.
    if header
        .get("cty")
        .and_then(Value::as_str)
        .is_some_and(|c| c.eq_ignore_ascii_case("jwt"))
    {
        return Err(AuthError::InvalidToken);
    }
    let name = match header.get("alg") {
        Some(Value::String(name)) => name.as_str(),
        _ => return Err(AuthError::InvalidToken),
    };
    if name.eq_ignore_ascii_case("none") {
        return Err(AuthError::InvalidToken);
    }
    let alg = name
        .parse::<Algorithm>()
        .ok()
        .filter(|alg| allowed.contains(alg))
        .ok_or(AuthError::UnsupportedAlgorithm)?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) if kid.len() <= MAX_KID_BYTES => Some(kid.clone()),
        Some(_) => return Err(AuthError::InvalidToken),
    };
    let split = token.len() - signature.len() - 1;
    Ok(Parsed {
        alg,
        kid,
        signing_input: &token[..split],
        payload,
        signature,
    })
}

/// The key chosen for one token.
enum KeyRef<'a> {
    Local(&'a DecodingKey),
    Remote(Arc<KeySet>, usize),
}

impl KeyRef<'_> {
    fn key(&self) -> &DecodingKey {
        match self {
            KeyRef::Local(key) => key,
            KeyRef::Remote(set, index) => &set.keys[*index].key,
        }
    }
}

/// Verifies bearer JWTs.
pub struct JwtVerifier {
    settings: JwtSettings,
    secret: Option<DecodingKey>,
    static_keys: KeySet,
    remote: Option<Arc<RemoteJwks>>,
    cache: TokenCache,
    signature_checks: IntCounter,
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl JwtVerifier {
    /// A verifier over the given key sources.
    pub fn new(
        settings: JwtSettings,
        secret: Option<&[u8]>,
        static_keys: KeySet,
        remote: Option<Arc<RemoteJwks>>,
        cache_capacity: usize,
    ) -> Result<Self, String> {
        let secret = secret
            .map(|s| DecodingKey::from_secret(s).map_err(|e| format!("auth.jwt.secret: {e}")))
            .transpose()?;
        Ok(JwtVerifier {
            settings,
            secret,
            static_keys,
            remote,
            cache: TokenCache::new(cache_capacity),
            signature_checks: IntCounter::new("jwt_signature_checks", "unregistered")
                .map_err(|e| e.to_string())?,
        })
    }

    /// Counts every cryptographic signature check on `counter` (the gateway's metric).
    pub fn counting_signatures(mut self, counter: IntCounter) -> Self {
        self.signature_checks = counter;
        self
    }

    /// Whether any key source is configured (JWTs are tried at all).
    pub fn has_sources(&self) -> bool {
        self.secret.is_some() || !self.static_keys.is_empty() || self.remote.is_some()
    }

    /// The remote JWKS, if configured.
    pub fn remote(&self) -> Option<&Arc<RemoteJwks>> {
        self.remote.as_ref()
    }

    /// Checks the shape, header, algorithm, key and signature of a compact JWS, and
    /// returns its decoded payload. No claim is looked at.
    pub async fn verify_jws(&self, token: &str) -> Result<Vec<u8>, AuthError> {
        let parsed = self.check_signature(token).await?;
        b64url::decode(parsed.payload).ok_or(AuthError::InvalidToken)
    }

    /// The shape, header, algorithm, key and signature checks every token goes through.
    async fn check_signature<'t>(&self, token: &'t str) -> Result<Parsed<'t>, AuthError> {
        let parsed = parse(token, &self.settings.allowed)?;
        self.verify_parsed(&parsed).await?;
        Ok(parsed)
    }

    async fn verify_parsed(&self, parsed: &Parsed<'_>) -> Result<(), AuthError> {
        let key = self.key_for(parsed).await?;
        self.signature_checks.inc();
        let verified = jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.signing_input.as_bytes(),
            key.key(),
            parsed.alg,
        )
        .unwrap_or(false);
        if verified {
            Ok(())
        } else {
            Err(AuthError::InvalidToken)
        }
    }

    /// Verifies `token` at time `now` (UNIX seconds) and maps its claims to an identity.
    pub async fn verify(&self, token: &str, now: f64) -> Result<Arc<Identity>, AuthFailure> {
        // A cached token passed every check below under this same configuration (the
        // cache lives and dies with it), so the lookup comes first.
        if let Some(identity) = self.cache.get(token, now, |kid| self.still_known(kid)) {
            return Ok(identity);
        }
        let parsed = self
            .check_signature(token)
            .await
            .map_err(AuthFailure::token)?;
        let leeway = self.settings.leeway;
        let claims =
            decode_object(parsed.payload).ok_or(AuthFailure::token(AuthError::InvalidToken))?;
        let expires_at = validate_claims(&claims, &self.settings, now)?;
        let identity = Arc::new(Identity::from_claims(
            &claims,
            expires_at.map(|e| e.floor() as i64),
        ));
        let kid = if is_hmac(parsed.alg) {
            None
        } else {
            parsed.kid
        };
        self.cache.insert(
            token,
            identity.clone(),
            expires_at.map(|e| e + leeway),
            kid,
            now,
        );
        Ok(identity)
    }

    /// Whether a key with `kid` is still among the current keys (a cached verification
    /// must not outlive the removal of its key from the JWKS).
    fn still_known(&self, kid: &str) -> bool {
        let named = |set: &KeySet| set.keys.iter().any(|k| k.kid.as_deref() == Some(kid));
        named(&self.static_keys)
            || self
                .remote
                .as_ref()
                .is_some_and(|r| r.current().is_some_and(|s| named(&s)))
    }

    async fn key_for(&self, parsed: &Parsed<'_>) -> Result<KeyRef<'_>, AuthError> {
        let missing = AuthError::KeyUnavailable { unavailable: false };
        if is_hmac(parsed.alg) {
            return self.secret.as_ref().map(KeyRef::Local).ok_or(missing);
        }
        match self.static_keys.find(parsed.kid.as_deref(), parsed.alg) {
            Lookup::Found(key) => return Ok(KeyRef::Local(&key.key)),
            Lookup::Mismatch => return Err(AuthError::InvalidToken),
            Lookup::Missing => {}
        }
        let Some(remote) = &self.remote else {
            return Err(missing);
        };
        match remote.find(parsed.kid.as_deref(), parsed.alg).await {
            RemoteLookup::Found(set, index) => Ok(KeyRef::Remote(set, index)),
            RemoteLookup::Mismatch => Err(AuthError::InvalidToken),
            RemoteLookup::Missing => Err(missing),
            RemoteLookup::Unavailable => Err(AuthError::KeyUnavailable { unavailable: true }),
        }
    }
}

/// A time claim: absent, or a JSON number.
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            // Any time in the past is a time (an `exp` of -1 has expired, as PyJWT says);
            // beyond 2^53 a number is no longer a time.
            .filter(|v| v.is_finite() && *v <= MAX_TIME_CLAIM)
            .map(Some)
            .ok_or(()),
        Some(_) => Err(()),
    }
}

/// Checks the claims of a token whose signature verified; returns its `exp`.
pub fn validate_claims(
    claims: &Map<String, Value>,
    settings: &JwtSettings,
    now: f64,
) -> Result<Option<f64>, AuthFailure> {
    for name in ["sub", "jti"] {
        if claims.get(name).is_some_and(|v| !v.is_string()) {
            return Err(AuthFailure::token(AuthError::InvalidToken));
        }
    }
    let who = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .or_else(|| claims.get("jti").and_then(Value::as_str))
        .map(str::to_string);
    let fail = |error: AuthError| AuthFailure {
        error,
        identity: who.clone(),
        token_presented: true,
    };
    let (exp, nbf, iat) = match (
        time_claim(claims, "exp"),
        time_claim(claims, "nbf"),
        time_claim(claims, "iat"),
    ) {
        (Ok(exp), Ok(nbf), Ok(iat)) => (exp, nbf, iat),
        _ => return Err(fail(AuthError::InvalidToken)),
    };
    for name in &settings.required {
        if !claims.contains_key(name) {
            return Err(fail(AuthError::InvalidToken));
        }
    }
    let leeway = settings.leeway;
    if exp.is_some_and(|exp| exp + leeway <= now) {
        return Err(fail(AuthError::TokenExpired(Expired::Bearer)));
    }
    if iat.is_some_and(|iat| iat > now + leeway) || nbf.is_some_and(|nbf| nbf > now + leeway) {
        return Err(fail(AuthError::InvalidToken));
    }
    if !settings.audience.is_empty() {
        let audiences: Vec<&Value> = match claims.get("aud") {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(value @ Value::String(_)) => vec![value],
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err(fail(AuthError::InvalidToken)),
        };
        if audiences.is_empty()
            || audiences
                .iter()
                .any(|a| a.as_str().is_none_or(str::is_empty))
        {
            return Err(fail(AuthError::InvalidToken));
        }
        let matches = audiences
            .iter()
            .filter_map(|a| a.as_str())
            .any(|a| settings.audience.iter().any(|want| want == a));
        if !matches {
            return Err(fail(AuthError::InvalidAudience));
        }
    }
    if let Some(issuer) = &settings.issuer {
        match claims.get("iss") {
            None | Some(Value::Null) => return Err(fail(AuthError::InvalidToken)),
            Some(Value::String(iss)) if iss == issuer => {}
            Some(Value::String(_)) => return Err(fail(AuthError::InvalidIssuer)),
            Some(_) => return Err(fail(AuthError::InvalidToken)),
        }
    }
    Ok(exp)
}
