//! TLS plumbing: the crypto provider and the client side the gateway uses towards upstream
//! servers when it terminates a sandbox's TLS.
//!
//! Upstream trust is the host's system store plus the operator's extra CA files
//! ([`crate::EgressSettings::extra_roots`]). It is loaded on first use: most gateways never
//! terminate TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// Where distributions keep the system bundle; the first that exists is used.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The crypto provider every TLS configuration of the gateway uses (set explicitly, so the
/// process-wide default of another crate cannot change it).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The upstream TLS client configuration, built on first use.
pub(crate) struct Upstream {
    extra_roots: Vec<PathBuf>,
    config: OnceLock<std::result::Result<Arc<ClientConfig>, String>>,
}

impl Upstream {
    pub(crate) fn new(extra_roots: Vec<PathBuf>) -> Self {
        Self {
            extra_roots,
            config: OnceLock::new(),
        }
    }

    pub(crate) fn config(&self) -> Result<Arc<ClientConfig>> {
        self.config
            .get_or_init(|| build(&self.extra_roots).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Tls)
    }
}

fn add_file(store: &mut RootCertStore, path: &Path) -> Result<usize> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?
        .filter_map(std::result::Result::ok)
        .collect();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    Ok(added)
}

fn build(extra_roots: &[PathBuf]) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    if let Some(system) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
        let n = add_file(&mut roots, system)?;
        tracing::debug!(bundle = %system.display(), certificates = n, "upstream trust: system store");
    }
    for path in extra_roots {
        let n = add_file(&mut roots, path)?;
        tracing::debug!(bundle = %path.display(), certificates = n, "upstream trust: extra CA file");
    }
    if roots.is_empty() {
        return Err(Error::Tls(
            "no CA certificates to verify upstream servers with (no system bundle, no SSL_CERT_FILE)"
                .into(),
        ));
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
