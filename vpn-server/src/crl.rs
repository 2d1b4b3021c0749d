//! The CRL the server publishes at `GET /v1/crl`: signed when the set of revoked
//! certificates changes (or when half its validity has passed), and served from memory in
//! between, so that fetching it costs no registry write, no fsync and no signature.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::Mutex;

use floto_pki::{Ca, RevokedSerial, Serial};
use floto_registry::{Registry, StoreError};

use crate::identify::RevokedSerials;

/// Validity of each CRL the server signs (its `nextUpdate` is this far after `thisUpdate`).
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A CRL is signed anew once this much of its validity has passed, even with no change.
const RESIGN_AFTER: Duration = Duration::from_secs(12 * 3600);

/// Why no CRL could be served.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    /// The registry could not be read or the CRL number not bumped.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA could not sign.
    #[error("signing the CRL: {0}")]
    Sign(#[from] floto_pki::PkiError),
}

#[derive(Debug)]
struct Signed {
    /// [`RevokedSerials::version`] it was signed for.
    version: u64,
    signed_at: OffsetDateTime,
    pem: String,
}

/// Signs and caches the CRL.
pub struct CrlPublisher {
    registry: Arc<dyn Registry>,
    ca: Arc<Ca>,
    revoked: Arc<RevokedSerials>,
    /// Held while signing, so that concurrent requests sign once between them.
    current: Mutex<Option<Signed>>,
}

impl std::fmt::Debug for CrlPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlPublisher").finish_non_exhaustive()
    }
}

impl CrlPublisher {
    pub fn new(registry: Arc<dyn Registry>, ca: Arc<Ca>, revoked: Arc<RevokedSerials>) -> Self {
        Self {
            registry,
            ca,
            revoked,
            current: Mutex::new(None),
        }
    }

    /// The current CRL, PEM.
    pub async fn pem(&self, now: OffsetDateTime) -> Result<String, CrlError> {
        let mut current = self.current.lock().await;
        // Read before the registry: a revocation applied meanwhile makes the next request
        // sign again rather than this CRL be taken for the newer set.
        let version = self.revoked.version();
        if let Some(signed) = current.as_ref() {
            if signed.version == version && now - signed.signed_at < RESIGN_AFTER {
                return Ok(signed.pem.clone());
            }
        }
        let entries = self
            .registry
            .revoked_certificates(now)
            .await?
            .iter()
            .filter_map(|c| {
                Some(RevokedSerial {
                    serial: Serial::from_hex(&c.serial).ok()?,
                    revoked_at: c.revoked_at?,
                })
            })
            .collect::<Vec<_>>();
        let number = self.registry.next_crl_number().await?;
        let pem = self.ca.crl(&entries, number, now, CRL_VALIDITY)?;
        *current = Some(Signed {
            version,
            signed_at: now,
            pem: pem.clone(),
        });
        Ok(pem)
    }
}
