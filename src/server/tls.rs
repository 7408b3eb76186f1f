//! TLS termination: a rustls server configuration whose certificate is swapped in place
//! when its files change, so new handshakes get the new certificate and open
//! connections are untouched.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::files::FileStamp;
use crate::metrics::Metrics;

mod x509;

/// The serving certificate and where it came from.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    cert_file: PathBuf,
    key_file: PathBuf,
    stamp: std::sync::Mutex<FileStamp>,
    provider: Arc<CryptoProvider>,
    not_after: prometheus::Gauge,
    reloads: prometheus::IntCounterVec,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the certificate and key; fails with a message naming the bad file.
    pub fn load(cert_file: &Path, key_file: &Path, metrics: &Metrics) -> Result<Arc<Self>, String> {
        let not_after = metrics.tls_not_after.clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = FileStamp::of(&[cert_file, key_file]);
        let (key, expiry) = load_key(&provider, cert_file, key_file)?;
        not_after.set(expiry as f64);
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(key),
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            stamp: std::sync::Mutex::new(stamp),
            provider,
            not_after,
            reloads: metrics.tls_reloads.clone(),
        }))
    }

    /// Re-reads the files if they changed. A bad new pair is logged and the current
    /// certificate keeps serving. Returns whether a new certificate was installed.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = FileStamp::of(&[&self.cert_file, &self.key_file]);
        {
            // A std mutex: held only for this comparison, never across an await.
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == stamp {
                return false;
            }
            *last = stamp;
        }
        match load_key(&self.provider, &self.cert_file, &self.key_file) {
            Ok((key, expiry)) => {
                self.current.store(Arc::new(key));
                self.not_after.set(expiry as f64);
                self.reloads.with_label_values(&["success"]).inc();
                tracing::info!(cert_file = %self.cert_file.display(), not_after = expiry, "TLS certificate reloaded");
                true
            }
            Err(error) => {
                self.reloads.with_label_values(&["failure"]).inc();
                tracing::error!(%error, "TLS certificate reload failed; the previous certificate keeps serving");
                false
            }
        }
    }

    /// A TLS acceptor offering TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

/// Reads a PEM chain and key, checks that they belong together, and returns the
/// certified key with the leaf's notAfter (UNIX seconds).
fn load_key(
    provider: &CryptoProvider,
    cert_file: &Path,
    key_file: &Path,
) -> Result<(CertifiedKey, i64), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
    let Some(leaf) = certs.first() else {
        return Err(format!(
            "tls.cert_file {}: no PEM certificate found",
            cert_file.display()
        ));
    };
    let expiry = x509::not_after(leaf).ok_or_else(|| {
        format!(
            "tls.cert_file {}: unreadable certificate",
            cert_file.display()
        )
    })?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        format!(
            "tls.key_file {}: no PKCS#8, PKCS#1 or SEC1 private key ({e})",
            key_file.display()
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls.key_file {}: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "tls.key_file {} does not belong to tls.cert_file {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok((certified, expiry))
}
