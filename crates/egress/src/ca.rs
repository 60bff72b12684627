//! The gateway's certificate authority: generated when the process starts, kept in memory
//! only, and used solely to terminate TLS for hosts with a credential rule.
//!
//! Sandboxes whose policy injects credentials trust its certificate (never its key); every
//! other sandbox trusts only the host's store, and its TLS is never intercepted. Leaf
//! certificates are minted per server name on first use, cached for a day, and valid for a
//! month; the CA itself is valid for ten years, which only matters for a process that runs that
//! long, since a new one is made at every start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, Result};

/// How long a minted leaf is reused before a fresh one is made.
const LEAF_REUSE: Duration = Duration::from_secs(24 * 3600);
/// How many server names keep a cached leaf; the cache is emptied when it is full.
const LEAF_CACHE: usize = 1024;
/// ALPN: the gateway speaks HTTP/1.1 to both sides when it terminates TLS.
const HTTP11: &[u8] = b"http/1.1";

fn cert_err(e: impl std::fmt::Display) -> Error {
    Error::Certificate(e.to_string())
}

/// A validity window around now: from an hour ago (clock skew) for `days`.
fn validity(params: &mut CertificateParams, days: u64) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(cert_err)?
        .as_secs();
    let at = |secs: u64| {
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
            .map_err(cert_err)
    };
    params.not_before = at(now.saturating_sub(3600))?;
    params.not_after = at(now + days * 24 * 3600)?;
    Ok(())
}

/// The process's CA and its cache of leaf certificates.
pub(crate) struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    leaves: Mutex<HashMap<String, (Instant, Arc<ServerConfig>)>>,
}

impl Authority {
    /// Generates a new CA (ECDSA P-256).
    pub(crate) fn generate() -> Result<Self> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ampoule egress gateway CA");
        dn.push(DnType::OrganizationName, "ampoule (this server only)");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 3650)?;
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM.
    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server configuration presenting a certificate for `name` (minted or cached).
    pub(crate) fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>> {
        if let Ok(cache) = self.leaves.lock()
            && let Some((made, cfg)) = cache.get(name)
            && made.elapsed() < LEAF_REUSE
        {
            return Ok(cfg.clone());
        }
        let cfg = Arc::new(self.mint(name)?);
        if let Ok(mut cache) = self.leaves.lock() {
            if cache.len() >= LEAF_CACHE {
                cache.clear();
            }
            cache.insert(name.to_owned(), (Instant::now(), cfg.clone()));
        }
        Ok(cfg)
    }

    fn mint(&self, name: &str) -> Result<ServerConfig> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 30)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| Error::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![HTTP11.to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_ca_and_are_cached() {
        let ca = Authority::generate().unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.cert_pem().contains("PRIVATE KEY"));
        let a = ca.server_config("api.example.com").unwrap();
        let b = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = ca.server_config("other.example.com").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
