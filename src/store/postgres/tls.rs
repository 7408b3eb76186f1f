//! TLS to PostgreSQL as libpq's `sslmode` and `sslrootcert` describe it: `disable`,
//! `allow` and `prefer` speak plaintext; `require` encrypts (checking the server's
//! certificate chain only when `sslrootcert` is given, as libpq does); `verify-ca` checks
//! the chain; `verify-full` checks the chain and the host name. The roots are the
//! `sslrootcert` file, or the system's (`sslrootcert=system`, or none given). The DSN's
//! other settings go to the driver as written.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls_client::{self, Roots};

/// How the connection to PostgreSQL is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext (`disable`, `allow`, `prefer`).
    Plain,
    /// Encrypted; the chain is checked only against an explicit `sslrootcert`.
    Require,
    /// Encrypted, the chain checked.
    VerifyCa,
    /// Encrypted, the chain and the host name checked.
    VerifyFull,
}

/// A DSN taken apart: what the driver reads, and the TLS settings read here.
#[derive(Debug)]
pub struct Dsn {
    /// The driver's configuration (without `sslmode`/`sslrootcert`).
    pub config: tokio_postgres::Config,
    /// The TLS mode.
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file, or `None` for the system roots.
    pub root_cert: Option<PathBuf>,
}

/// Parses a libpq URL (`postgres://…?sslmode=verify-full`) or key=value DSN.
pub fn parse(dsn: &str) -> Result<Dsn, String> {
    let (rest, settings) = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        split_url(dsn)
    } else {
        split_key_values(dsn)?
    };
    let mut mode = SslMode::Plain;
    let mut root_cert = None;
    for (key, value) in settings {
        match key.as_str() {
            "sslmode" => {
                mode = match value.as_str() {
                    "disable" | "allow" | "prefer" => SslMode::Plain,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(format!("sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full")),
                }
            }
            _ if value == "system" || value.is_empty() => root_cert = None,
            _ => root_cert = Some(PathBuf::from(value)),
        }
    }
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    config.ssl_mode(if mode == SslMode::Plain {
        tokio_postgres::config::SslMode::Disable
    } else {
        tokio_postgres::config::SslMode::Require
    });
    Ok(Dsn {
        config,
        mode,
        root_cert,
    })
}

/// The parameters read here.
fn is_tls_setting(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// A URL without its TLS query parameters, and those parameters (decoded).
fn split_url(dsn: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = dsn.split_once('?') else {
        return (dsn.to_string(), Vec::new());
    };
    let mut settings = Vec::new();
    let mut kept = Vec::new();
    for param in crate::query::params(query) {
        if is_tls_setting(&param.name) {
            settings.push((param.name.into_owned(), param.value.into_owned()));
        } else {
            kept.push(param.raw);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, settings)
}

/// A key=value DSN without its TLS settings, and those settings. Values may be quoted
/// (`'a value'`, with `\'` and `\\` escapes), as libpq writes them.
fn split_key_values(dsn: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut settings = Vec::new();
    let mut kept = Vec::new();
    let mut chars = dsn.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("`{key}` has no value"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let (value, raw) = read_value(&mut chars)?;
        if is_tls_setting(&key) {
            settings.push((key, value));
        } else {
            kept.push(format!("{key}={raw}"));
        }
    }
    Ok((kept.join(" "), settings))
}

/// One value: its text, and how it was written (to pass on unchanged).
fn read_value(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
) -> Result<(String, String), String> {
    let mut value = String::new();
    let mut raw = String::new();
    if chars.peek() == Some(&'\'') {
        raw.push('\'');
        chars.next();
        loop {
            match chars.next() {
                Some('\\') => {
                    let escaped = chars.next().ok_or("unterminated quoted value")?;
                    raw.push('\\');
                    raw.push(escaped);
                    value.push(escaped);
                }
                Some('\'') => {
                    raw.push('\'');
                    return Ok((value, raw));
                }
                Some(c) => {
                    raw.push(c);
                    value.push(c);
                }
                None => return Err("unterminated quoted value".into()),
            }
        }
    }
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            break;
        }
        value.push(c);
        raw.push(c);
        chars.next();
    }
    Ok((value, raw))
}

/// The TLS connector for `mode`, or `None` for plaintext.
pub fn connector(dsn: &Dsn) -> Result<Option<MakeRustlsConnect>, String> {
    if dsn.mode == SslMode::Plain {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    // `require` checks the chain only when the operator named the roots (libpq's rule).
    let mode = match (dsn.mode, &dsn.root_cert) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (mode, _) => mode,
    };
    let config = if mode == SslMode::Require {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth()
    } else {
        let roots = Roots::load(dsn.root_cert.is_none());
        let store = tls_client::root_store(&roots, dsn.root_cert.as_deref())
            .map_err(|e| format!("sslrootcert: {e}"))?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| format!("sslrootcert: {e}"))?;
        if mode == SslMode::VerifyFull {
            builder.with_webpki_verifier(webpki).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner: webpki }))
                .with_no_client_auth()
        }
    };
    Ok(Some(MakeRustlsConnect::new(config)))
}

/// `verify-ca`: the chain must lead to a trusted root; the name in it is not compared.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match verified {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `require` without `sslrootcert`: encryption against passive listeners, any
/// certificate accepted (the handshake's signatures are still checked).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_out_of_both_dsn_forms() {
        let dsn = parse("postgres://u@db:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=gw").unwrap();
        assert_eq!(dsn.mode, SslMode::VerifyFull);
        assert_eq!(dsn.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(dsn.config.get_application_name(), Some("gw"));
        let dsn = parse("host=db user=u sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname = app")
            .unwrap();
        assert_eq!(dsn.mode, SslMode::VerifyCa);
        assert_eq!(dsn.root_cert, Some(PathBuf::from("/a b/ca.pem")));
        assert_eq!(dsn.config.get_dbname(), Some("app"));
        let dsn = parse("postgres://u@db/app?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!((dsn.mode, dsn.root_cert), (SslMode::Require, None));
        assert_eq!(parse("postgres://u@db/app").unwrap().mode, SslMode::Plain);
        assert_eq!(
            parse("host=db sslmode=prefer").unwrap().mode,
            SslMode::Plain
        );
        assert!(parse("host=db sslmode=sometimes")
            .unwrap_err()
            .contains("sslmode"));
        assert!(parse("host=db sslrootcert='unterminated").is_err());
    }
}
