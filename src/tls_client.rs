//! TLS as a client — towards `https://` upstreams, the JWKS endpoint, PostgreSQL and
//! Redis: the system roots plus an optional CA bundle.

use std::path::Path;
use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The system trust roots, read once per configuration build.
pub struct Roots(Vec<CertificateDer<'static>>);

impl Roots {
    /// Reads the system roots if any upstream needs them. Unreadable entries are skipped
    /// (and logged): one bad file in the system store must not stop the gateway.
    pub fn load(needed: bool) -> Self {
        if !needed {
            return Roots(Vec::new());
        }
        let result = rustls_native_certs::load_native_certs();
        for error in &result.errors {
            tracing::warn!(%error, "skipping an unreadable system CA certificate");
        }
        Roots(result.certs)
    }
}

/// A client configuration trusting the system roots and the certificates in `ca_file`.
pub fn config(roots: &Roots, ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let store = root_store(roots, ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(config)
}

/// The roots `roots` and the certificates in `ca_file` (a PEM bundle), as one store.
pub fn root_store(roots: &Roots, ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(roots.0.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("ca_file {} holds no certificate", path.display()));
        }
        for cert in certs {
            store
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    Ok(store)
}

/// The connector every HTTP client of the gateway uses (upstreams, JWKS, the `token`
/// commands): `http://` or `https://` with `tls`, HTTP/1.1, TCP_NODELAY, and an optional
/// TCP connect timeout.
pub fn connector(
    tls: ClientConfig,
    connect_timeout: Option<std::time::Duration>,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(connect_timeout);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}
