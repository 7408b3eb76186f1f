//! The signed identity assertion (contract §5): a short-lived ES256 JWT, signed with a
//! key the gateway generates at start-up, that tells the upstream the request came
//! through the gateway and who the caller is. Its public key is served as a JWKS.

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

use super::b64url;
use super::identity::Identity;

/// Signs identity assertions.
pub struct AssertionSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    jwks: String,
}

impl AssertionSigner {
    /// Generates a fresh P-256 key.
    pub fn generate() -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "cannot generate the assertion key".to_string())?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| "cannot load the assertion key".to_string())?;
        let point = key.public_key().as_ref();
        let x = b64url::encode(&point[1..33]);
        let y = b64url::encode(&point[33..65]);
        // RFC 7638 thumbprint: the required members in lexicographic order, no spaces.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        let kid = b64url::encode(digest.as_ref());
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "kid": kid, "alg": "ES256", "use": "sig"
        }]})
        .to_string();
        Ok(AssertionSigner {
            key,
            rng,
            kid,
            jwks,
        })
    }

    /// The JWKS document with the public key.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// An assertion for `identity`, for the upstream `audience`, valid `ttl_seconds`.
    pub fn sign(
        &self,
        identity: &Identity,
        issuer: &str,
        audience: &str,
        now: i64,
        ttl_seconds: i64,
    ) -> Result<String, String> {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let workspaces: Vec<String> = if identity.workspaces.all {
            vec!["*".to_string()]
        } else {
            identity.workspaces.ids.iter().cloned().collect()
        };
        let claims = json!({
            "iss": issuer,
            "aud": audience,
            "sub": identity.subject,
            "iat": now,
            "exp": now + ttl_seconds,
            "identity_type": identity.identity_type.as_str(),
            "token_id": identity.token_id,
            "scopes": identity.scopes.iter().collect::<Vec<_>>(),
            "workspace_ids": workspaces,
            "auth_method": identity.method.as_str(),
        });
        let input = format!(
            "{}.{}",
            b64url::encode(header.to_string()),
            b64url::encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| "signing the identity assertion failed".to_string())?;
        Ok(format!("{input}.{}", b64url::encode(signature.as_ref())))
    }
}
