//! TLS client configuration: trust exactly one CA, optionally present a client certificate.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ClientError;

/// A client certificate and its key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

/// The workspace's one TLS crypto provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider. Every config here names its provider
/// explicitly; this covers any library that asks rustls for the default. Call it first in
/// `main`.
pub fn install_default_provider() {
    // Err means a default is already installed (a second call): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rustls client config that trusts only `ca_pem`, with the given ALPN protocols.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| ClientError::Config(format!("the CA file is not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Config(format!("the CA certificate is not usable: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(ClientError::Config(
            "the CA file holds no certificate".to_owned(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Config(format!("client certificate is not PEM: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                .map_err(|e| ClientError::Config(format!("client key is not PEM: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                ClientError::Config(format!("client certificate and key do not fit: {e}"))
            })?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
