//! JSON Web Keys: parsed once into verification keys that know which algorithms they may
//! verify. A key only ever verifies algorithms of its own type (and curve): an RSA key
//! never verifies `HS256`, an `ES256` signature is checked only with a P-256 key.

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Smallest RSA modulus accepted; shorter keys are refused when the key set is loaded.
const MIN_RSA_BITS: usize = 2048;

/// The type (and curve) of a key, which fixes the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `kty: RSA`.
    Rsa,
    /// `kty: EC`, `crv: P-256`.
    P256,
    /// `kty: EC`, `crv: P-384`.
    P384,
    /// `kty: OKP`, `crv: Ed25519`.
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind may verify `alg`.
    pub fn fits(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::P256, Algorithm::ES256)
                | (KeyKind::P384, Algorithm::ES384)
                | (KeyKind::Ed25519, Algorithm::EdDSA)
        )
    }
}

/// A public verification key from a JWKS.
#[derive(Clone)]
pub struct VerifyKey {
    /// `kid`, if given.
    pub kid: Option<String>,
    /// The key's own `alg`, if given: then it verifies only that algorithm.
    pub alg: Option<Algorithm>,
    /// Type and curve.
    pub kind: KeyKind,
    /// The key material.
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

/// A set of verification keys, in the order the JWKS lists them.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    /// The keys.
    pub keys: Vec<VerifyKey>,
}

/// What a key lookup found.
pub enum Lookup<'a> {
    /// A key that fits the token.
    Found(&'a VerifyKey),
    /// Keys with the token's `kid` exist, but none fits its algorithm.
    Mismatch,
    /// No key with that `kid` (or, without a `kid`, none that fits).
    Missing,
}

impl KeySet {
    /// The key for a token with `kid` and `alg`: with a `kid`, a key with that `kid`;
    /// without, the first key whose type and `alg` fit.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Lookup::Missing;
                }
                named
                    .find(|k| k.fits(alg))
                    .map_or(Lookup::Mismatch, Lookup::Found)
            }
            None => self
                .keys
                .iter()
                .find(|k| k.fits(alg))
                .map_or(Lookup::Missing, Lookup::Found),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Parses a JWKS: `{"keys": [...]}` or a bare list. Keys that are not signature keys
/// (`use: enc`), symmetric (`oct`: HS tokens use the configured secret only) or of an
/// unsupported type are skipped and reported in `skipped`; a malformed key is an error.
pub fn parse_key_set(value: &Value) -> Result<(KeySet, Vec<String>), String> {
    let entries = match value {
        Value::Object(map) => map
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("a JWKS object needs a `keys` list")?,
        Value::Array(items) => items,
        _ => return Err("a JWKS is an object with `keys` or a list of keys".into()),
    };
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match parse_key(entry) {
            Ok(Some(key)) => set.keys.push(key),
            Ok(None) => skipped.push(format!(
                "keys[{i}]: not a signature verification key; skipped"
            )),
            Err(error) => return Err(format!("keys[{i}]: {error}")),
        }
    }
    Ok((set, skipped))
}

fn field<'a>(
    entry: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, String> {
    match entry.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{name}` must be a string")),
    }
}

fn required<'a>(entry: &'a serde_json::Map<String, Value>, name: &str) -> Result<&'a str, String> {
    field(entry, name)?.ok_or_else(|| format!("missing `{name}`"))
}

/// One key; `Ok(None)` for keys the gateway never verifies with.
pub fn parse_key(entry: &Value) -> Result<Option<VerifyKey>, String> {
    let entry = entry.as_object().ok_or("a key must be a JSON object")?;
    let kty = required(entry, "kty")?;
    if field(entry, "use")?.is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    // `key_ops`, when given, must allow verification (RFC 7517 §4.3).
    if let Some(ops) = entry.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op == "verify"));
        if !verifies {
            return Ok(None);
        }
    }
    let alg = match field(entry, "alg")? {
        None => None,
        Some(name) => match name.parse::<Algorithm>() {
            Ok(alg) => Some(alg),
            // A key for an algorithm the gateway does not verify (RSA-OAEP, ES512, …).
            Err(_) => return Ok(None),
        },
    };
    let kid = field(entry, "kid")?.map(str::to_string);
    let (kind, key) = match kty {
        "RSA" => (KeyKind::Rsa, rsa_key(entry)?),
        "EC" => {
            let kind = match required(entry, "crv")? {
                "P-256" => KeyKind::P256,
                "P-384" => KeyKind::P384,
                _ => return Ok(None),
            };
            let x = decode_coordinate(required(entry, "x")?, kind)?;
            let y = decode_coordinate(required(entry, "y")?, kind)?;
            let key =
                DecodingKey::from_ec_components(&x, &y).map_err(|e| format!("EC key: {e}"))?;
            (kind, key)
        }
        "OKP" => {
            if required(entry, "crv")? != "Ed25519" {
                return Ok(None);
            }
            let x = required(entry, "x")?;
            if b64(x)?.len() != 32 {
                return Err("an Ed25519 `x` is 32 bytes".into());
            }
            let key = DecodingKey::from_ed_components(x).map_err(|e| format!("OKP key: {e}"))?;
            (KeyKind::Ed25519, key)
        }
        "oct" => return Ok(None),
        _ => return Ok(None),
    };
    if let Some(alg) = alg {
        if !kind.fits(alg) {
            return Err(format!("`alg` {alg:?} does not fit a {kty} key"));
        }
    }
    Ok(Some(VerifyKey {
        kid,
        alg,
        kind,
        key,
    }))
}

fn b64(text: &str) -> Result<Vec<u8>, String> {
    super::b64url::decode(text).ok_or_else(|| "not base64url".to_string())
}

fn rsa_key(entry: &serde_json::Map<String, Value>) -> Result<DecodingKey, String> {
    let n = required(entry, "n")?;
    let e = required(entry, "e")?;
    let modulus = b64(n)?;
    let exponent = b64(e)?;
    let bits = modulus.iter().position(|&b| b != 0).map_or(0, |i| {
        (modulus.len() - i) * 8 - modulus[i].leading_zeros() as usize
    });
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA modulus of {bits} bits is below {MIN_RSA_BITS}"
        ));
    }
    if has_roca_fingerprint(&modulus) {
        return Err("RSA key generated with the ROCA-vulnerable method (CVE-2017-15361)".into());
    }
    // e = 1 makes every "signature" valid; even exponents are not RSA.
    let e_value = exponent
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    if exponent.len() > 8 || e_value < 3 || e_value.is_multiple_of(2) {
        return Err("RSA exponent out of range".into());
    }
    DecodingKey::from_rsa_components(n, e).map_err(|e| format!("RSA key: {e}"))
}

/// Small primes of the ROCA test: a modulus produced by the vulnerable generator lies,
/// modulo every one of them, in the subgroup generated by 65537 (Nemec et al., 2017).
/// For an honest modulus that happens with negligible probability.
const ROCA_PRIMES: [u32; 38] = [
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
    101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
];

fn has_roca_fingerprint(modulus: &[u8]) -> bool {
    ROCA_PRIMES.iter().all(|&prime| {
        let residue = modulus
            .iter()
            .fold(0u32, |acc, &byte| (acc * 256 + u32::from(byte)) % prime);
        // Walk the subgroup generated by 65537 modulo `prime`.
        let generator = 65537 % prime;
        let mut element = 1u32;
        loop {
            if element == residue {
                return true;
            }
            element = element * generator % prime;
            if element == 1 {
                return false;
            }
        }
    })
}

/// EC coordinates must have the curve's exact length; the text is passed on unchanged.
fn decode_coordinate(text: &str, kind: KeyKind) -> Result<String, String> {
    let want = if kind == KeyKind::P256 { 32 } else { 48 };
    if b64(text)?.len() != want {
        return Err(format!("EC coordinates on this curve are {want} bytes"));
    }
    Ok(text.to_string())
}
