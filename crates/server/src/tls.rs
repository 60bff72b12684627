//! HTTPS: the certificate and key the listener speaks TLS with.
//!
//! Some clients (Semantic Kernel Python) refuse `http://` endpoints, so the server can speak
//! TLS itself (`[server] tls_cert` and `tls_key`, PEM). The listener ([`crate::listener`])
//! runs each handshake in the connection's own task, within the header timeout, so a client
//! that connects and says nothing never stalls other connections.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::Error;

/// Loads a PEM certificate chain and private key into a server config (HTTP/1.1 only).
pub fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("parsing {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Tls(format!("reading the key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(format!("certificate and key do not fit: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
