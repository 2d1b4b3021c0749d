//! Who is calling: a client certificate (checked against our CA, its expiry and the set of
//! revoked serials) or an API bearer token, resolved to a device or an operator. Used by
//! the REST API, the CONNECT front end and the QUIC broker alike; what the caller may then
//! do is [`crate::authz`]'s decision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashSet;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use floto_pki::{Ca, CertInfo, VerifyError};
use floto_proto::{ApiError, DeviceId, ErrorCode};
use floto_registry::{OperatorInfo, Registry, StoreError, TokenRefusal};

use crate::secret::hash_secret;

/// A connection's client certificate, checked once when the connection is made.
#[derive(Clone, Debug)]
pub enum PeerCert {
    None,
    Valid(Arc<CertInfo>),
    Invalid(Arc<VerifyError>),
}

impl PeerCert {
    /// Checks the certificate a TLS or QUIC client presented (if any) against our CA.
    pub fn verify(ca: &Ca, presented: Option<&CertificateDer<'_>>, now: OffsetDateTime) -> Self {
        match presented {
            None => Self::None,
            Some(der) => match ca.verify_client_cert(der, now) {
                Ok(info) => Self::Valid(Arc::new(info)),
                Err(e) => Self::Invalid(Arc::new(e)),
            },
        }
    }
}

/// Serials (hex) of revoked certificates that have not expired. Written only by the
/// applier of registry changes (and at start); read on every authenticated request.
#[derive(Debug, Default)]
pub struct RevokedSerials {
    serials: DashSet<String>,
    /// Bumped by every serial added, so a reader can tell the set changed.
    version: AtomicU64,
}

impl RevokedSerials {
    pub fn insert(&self, serial: String) {
        if self.serials.insert(serial) {
            self.version.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// Changes whenever a serial is added.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

/// Why a caller could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    /// The credential is missing, unknown, expired, revoked or of the wrong kind; the
    /// message says which.
    #[error("{}", .0.message)]
    Refused(ApiError),
    /// The registry could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IdentifyError {
    /// What the caller is told: the refusal, or for a registry fault (logged here with
    /// its detail) a pointer to the server's log.
    pub fn into_api_error(self) -> ApiError {
        match self {
            Self::Refused(error) => error,
            Self::Store(e) => {
                tracing::error!(error = %e, "identifying a caller failed");
                ApiError::internal()
            }
        }
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> IdentifyError {
    IdentifyError::Refused(ApiError::new(code, message))
}

/// Resolves credentials to devices and operators.
pub struct Identifier {
    registry: Arc<dyn Registry>,
    revoked: Arc<RevokedSerials>,
}

impl std::fmt::Debug for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identifier").finish_non_exhaustive()
    }
}

impl Identifier {
    pub fn new(registry: Arc<dyn Registry>, revoked: Arc<RevokedSerials>) -> Self {
        Self { registry, revoked }
    }

    /// The verified, unexpired, unrevoked certificate, or the refusal that says why not.
    pub fn certificate(
        &self,
        cert: &PeerCert,
        now: OffsetDateTime,
    ) -> Result<Arc<CertInfo>, ApiError> {
        let info = match cert {
            PeerCert::None => {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "this route needs a client certificate (mTLS); none was presented",
                ))
            }
            PeerCert::Invalid(e) => {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    certificate_message(e),
                ))
            }
            PeerCert::Valid(info) => info.clone(),
        };
        // Checked again per request: a long connection may outlive its certificate.
        if info.not_after <= now {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                certificate_message(&VerifyError::Expired {
                    not_after: info.not_after,
                }),
            ));
        }
        if self.revoked.contains(&info.serial.to_hex()) {
            return Err(ApiError::new(
                ErrorCode::Revoked,
                format!("client certificate {} was revoked", info.serial),
            ));
        }
        Ok(info)
    }

    /// The device a certificate names.
    pub fn device(
        &self,
        cert: &PeerCert,
        now: OffsetDateTime,
    ) -> Result<(DeviceId, Arc<CertInfo>), ApiError> {
        let info = self.certificate(cert, now)?;
        let device = info.device_id().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Forbidden,
                "this route is for devices; the client certificate is not a device certificate",
            )
        })?;
        Ok((device, info))
    }

    /// The operator making a request: named by its client certificate, or (for viewers,
    /// which are machine clients) by an API bearer token when no certificate was presented.
    pub async fn operator(
        &self,
        cert: &PeerCert,
        bearer: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<OperatorInfo, IdentifyError> {
        let op = match (cert, bearer) {
            (PeerCert::None, Some(token)) => self
                .registry
                .operator_by_api_token(&hash_secret(token), now)
                .await?
                .map_err(|r| {
                    let (code, message) = match r {
                        TokenRefusal::Unknown | TokenRefusal::Used => {
                            (ErrorCode::Unauthorized, "unknown API token")
                        }
                        TokenRefusal::Expired => (
                            ErrorCode::Unauthorized,
                            "this API token expired; ask an admin for a new one",
                        ),
                        TokenRefusal::OperatorRevoked => (
                            ErrorCode::Revoked,
                            "the operator of this API token was revoked",
                        ),
                    };
                    refused(code, message)
                })?,
            _ => {
                let info = self
                    .certificate(cert, now)
                    .map_err(IdentifyError::Refused)?;
                let name = info.operator_name().ok_or_else(|| {
                    refused(
                        ErrorCode::Forbidden,
                        "this route is for operators; the client certificate is not an operator certificate",
                    )
                })?;
                self.registry.operator(name).await?.ok_or_else(|| {
                    refused(
                        ErrorCode::Unauthorized,
                        format!("operator {name:?} is not known here"),
                    )
                })?
            }
        };
        if op.revoked_at.is_some() {
            return Err(refused(
                ErrorCode::Revoked,
                format!("operator {:?} was revoked", op.name),
            ));
        }
        Ok(op)
    }
}

fn certificate_message(e: &VerifyError) -> String {
    match e {
        VerifyError::Expired { not_after } => format!(
            "client certificate expired at {}; a device re-enrolls with its provisioning key, an operator runs `floto login` again",
            floto_proto::timestamp::rfc3339(*not_after)
        ),
        other => format!("client certificate refused: {other}"),
    }
}
