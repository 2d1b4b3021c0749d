//! TLS for the API and the QUIC broker: the server certificate (issued from our CA at
//! start, or mounted from files, e.g. by cert-manager) and the client-certificate policy.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::RwLock;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;
use tracing::info;

use floto_pki::{Ca, Serial};

use crate::config::Config;
use crate::datadir::{self, DataDir};

/// Lifetime of the server certificate the server issues itself. It is issued anew at
/// every start and when it nears expiry.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// The workspace's one TLS crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Asks for a client certificate without requiring one, and accepts any certificate
/// whose holder proves its key; the chain, validity and revocation are checked by the
/// application (see [`crate::identify::Identifier::certificate`]) so that refusals are HTTP answers
/// with reasons, not TLS alerts.
#[derive(Debug)]
pub struct DeferredClientAuth {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serves the current server certificate; it can be swapped while running.
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<Option<OffsetDateTime>>,
    /// SHA-256 of the mounted certificate and key files as last loaded.
    mounted_digest: RwLock<Option<Vec<u8>>>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("not_after", &*self.not_after.read())
            .finish()
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

impl ServerCert {
    /// Loads the mounted certificate, or issues one from `ca` for the names this server
    /// answers to.
    pub fn load(config: &Config, data: &DataDir, ca: &Ca) -> anyhow::Result<Arc<Self>> {
        let (certified, not_after, digest) = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let (certified, not_after) = load_mounted(cert, key)?;
                (certified, Some(not_after), Some(mounted_digest(cert, key)?))
            }
            _ => {
                let (certified, not_after) = issue(config, data, ca)?;
                (certified, Some(not_after), None)
            }
        };
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(certified)),
            not_after: RwLock::new(not_after),
            mounted_digest: RwLock::new(digest),
        }))
    }

    /// Rotation: serves a mounted certificate again once its files changed (cert-manager
    /// renewing the Secret, an operator copying new files), or issues a new self-issued one
    /// when a third of its lifetime is left. New TLS connections get the new certificate;
    /// open ones keep theirs. A mounted pair that does not load (half written, key and
    /// certificate not matching yet) leaves the current one in place; the next check
    /// tries again. Returns whether the certificate changed.
    pub fn refresh(&self, config: &Config, data: &DataDir, ca: &Ca) -> anyhow::Result<bool> {
        let now = OffsetDateTime::now_utc();
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let digest = mounted_digest(cert, key)?;
                if self.mounted_digest.read().as_deref() == Some(digest.as_slice()) {
                    return Ok(false);
                }
                let (certified, not_after) = load_mounted(cert, key)?;
                *self.current.write() = Arc::new(certified);
                *self.not_after.write() = Some(not_after);
                *self.mounted_digest.write() = Some(digest);
                info!(cert = %cert.display(), %not_after, "serving the rotated TLS certificate");
                Ok(true)
            }
            _ => {
                let due = self
                    .not_after()
                    .is_none_or(|t| t - now < SERVER_CERT_LIFETIME / 3);
                if !due {
                    return Ok(false);
                }
                let (certified, not_after) = issue(config, data, ca)?;
                *self.current.write() = Arc::new(certified);
                *self.not_after.write() = Some(not_after);
                Ok(true)
            }
        }
    }

    /// Expiry of the served certificate (the first of a mounted chain).
    pub fn not_after(&self) -> Option<OffsetDateTime> {
        *self.not_after.read()
    }
}

/// The names the self-issued certificate carries.
pub fn server_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = crate::config::local_hostname() {
        names.push(host);
    }
    if let Some(endpoint) = &config.endpoint {
        if let Some((host, _)) = endpoint.rsplit_once(':') {
            names.push(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            );
        }
    }
    if !config.api_listen.ip().is_unspecified() {
        names.push(config.api_listen.ip().to_string());
    }
    names.extend(config.tls_names.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn issue(
    config: &Config,
    data: &DataDir,
    ca: &Ca,
) -> anyhow::Result<(CertifiedKey, OffsetDateTime)> {
    let names = server_names(config);
    let now = OffsetDateTime::now_utc();
    let (cert, key_pem) = ca
        .issue_server(&names, &Serial::random(), now, SERVER_CERT_LIFETIME)
        .context("issuing the server's TLS certificate")?;
    // Kept on disk for inspection and for tools that want to pin it.
    datadir::write_secret(&data.tls_key(), key_pem.as_bytes())?;
    datadir::write_public(&data.tls_cert(), cert.pem.as_bytes())?;
    info!(names = ?names, not_after = %cert.not_after, "issued the server's TLS certificate");
    let chain = vec![
        CertificateDer::from(cert.der.clone()),
        CertificateDer::from(ca.cert_der().to_vec()),
    ];
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading back the server key")?;
    Ok((certified_key(chain, key)?, cert.not_after))
}

fn mounted_digest(cert: &Path, key: &Path) -> anyhow::Result<Vec<u8>> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for path in [cert, key] {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    Ok(ctx.finish().as_ref().to_vec())
}

fn load_mounted(cert: &Path, key: &Path) -> anyhow::Result<(CertifiedKey, OffsetDateTime)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let not_after = floto_pki::parse_cert_der(&chain[0])
        .with_context(|| format!("reading the validity of {}", cert.display()))?
        .not_after;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading TLS key {}", key.display()))?;
    Ok((certified_key(chain, key)?, not_after))
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<CertifiedKey> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .context("the TLS key is not a key this server can sign with")?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .context("the TLS key does not match the certificate")?;
    Ok(certified)
}

/// The HTTPS server config: TLS 1.3 and 1.2, ALPN h2 and http/1.1, optional client certs.
pub fn https_config(cert: Arc<ServerCert>) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth { provider }))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The QUIC TLS config: TLS 1.3 only, ALPN `floto-broker/1`, and in a cluster also
/// `floto-node/1`, the node link, on which this node presents its node certificate.
pub fn quic_config(cert: Arc<ServerCert>, node: Option<&NodeCert>) -> anyhow::Result<ServerConfig> {
    let provider = provider();
    let resolver = QuicCerts {
        tls: cert,
        node: node.map(|n| n.certified.clone()),
    };
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS protocol versions")?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth { provider }))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![floto_proto::broker::ALPN.to_vec()];
    if node.is_some() {
        config
            .alpn_protocols
            .push(floto_proto::broker::ALPN_NODE.to_vec());
    }
    Ok(config)
}

/// The operators' certificate on the broker's ALPN, the node certificate on the node link.
#[derive(Debug)]
struct QuicCerts {
    tls: Arc<ServerCert>,
    node: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for QuicCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let wants_node = hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == floto_proto::broker::ALPN_NODE));
        match (&self.node, wants_node) {
            (Some(node), true) => Some(node.clone()),
            _ => self.tls.resolve(hello),
        }
    }
}

/// Lifetime of a node certificate; issued anew at every start.
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// This node's certificate for the node link (see [`floto_pki::Ca::issue_node`]).
#[derive(Debug, Clone)]
pub struct NodeCert {
    certified: Arc<CertifiedKey>,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl NodeCert {
    /// Issues this node's certificate from the cluster's CA, for `host`, the name or
    /// address other nodes reach it at.
    /// Kept in the data dir (`node.pem`, `node.key`) for inspection.
    pub fn issue(ca: &Ca, node: &str, host: &str, data: &DataDir) -> anyhow::Result<Self> {
        let (cert, key_pem) = ca
            .issue_node(
                node,
                &[host.to_owned()],
                &Serial::random(),
                OffsetDateTime::now_utc(),
                NODE_CERT_LIFETIME,
            )
            .context("issuing the node certificate")?;
        datadir::write_secret(&data.node_key(), key_pem.as_bytes())?;
        datadir::write_public(&data.node_cert(), cert.pem.as_bytes())?;
        let chain = vec![
            CertificateDer::from(cert.der.clone()),
            CertificateDer::from(ca.cert_der().to_vec()),
        ];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .context("reading back the node key")?;
        let key_der = key.secret_der().to_vec();
        Ok(Self {
            certified: Arc::new(certified_key(chain.clone(), key)?),
            chain,
            key_der,
        })
    }

    /// The client side of the node link: trusts only the cluster's CA, presents this
    /// node's certificate, ALPN `floto-node/1`.
    pub fn client_config(&self, ca: &Ca) -> anyhow::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der().to_vec()))
            .context("the CA certificate as a trust anchor")?;
        let key = PrivateKeyDer::try_from(self.key_der.clone())
            .map_err(|e| anyhow::anyhow!("the node key: {e}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), key)
            .context("the node certificate as a client certificate")?;
        config.alpn_protocols = vec![floto_proto::broker::ALPN_NODE.to_vec()];
        Ok(config)
    }
}
