//! floto-registry: what the floto-connect server knows and must not forget. Devices,
//! provisioning keys (hashed), issued certificates, operators and the audit log, behind the
//! [`Registry`] trait, with the refusals a write can meet and the [`rules`] a commit is
//! checked against. SQLite ([`sqlite::SqliteRegistry`]) is the embedded default;
//! PostgreSQL ([`postgres::PgRegistry`]) serves a cluster of nodes.
//!
//! No HTTP and no running server here: a write returns what it committed (a [`Change`])
//! and appends to the change feed in the same transaction ([`Registry::changes_after`]);
//! the server decides who hears of it.

pub mod cluster;
mod commit;
pub mod postgres;
mod rows;
pub mod rules;
pub mod sqlite;
#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr};

use async_trait::async_trait;
use time::OffsetDateTime;

use floto_proto::admin::{Role, TokenKind};
use floto_proto::{DeviceId, WgKey};

pub use crate::rules::{EnrollRefusal, Overlays, RenewRefusal};
pub use floto_proto::admin::{KeyInfo, OperatorInfo};

/// A storage fault (not a refusal): the database is unreachable, corrupt or full.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database driver failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored value does not parse: the database was edited by hand or is corrupt.
    #[error("corrupt registry row: {0}")]
    Corrupt(String),
    /// The registry holds data this server cannot serve (e.g. addresses outside the overlay).
    #[error("{0}")]
    Inconsistent(String),
}

/// An enrolled device as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub fleet: String,
    pub wg_public_key: WgKey,
    pub overlay_ip: Ipv4Addr,
    /// Serial (hex) of the newest certificate; only it may renew.
    pub cert_serial: String,
    /// SubjectPublicKeyInfo DER of the newest certificate's key.
    pub cert_public_key: Vec<u8>,
    pub cert_expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// Id of the provisioning key that enrolled it.
    pub key_id: Option<String>,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
    /// Last authenticated endpoint, persisted so the server can call devices back after a restart.
    pub last_endpoint: Option<SocketAddr>,
    pub last_seen: Option<OffsetDateTime>,
}

impl Device {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// A key to insert.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub hash: [u8; 32],
    pub fleet: String,
    pub uses: Option<u32>,
    pub expires_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

/// What a validated enrollment asks the registry to record.
#[derive(Debug, Clone)]
pub struct EnrollCommit {
    pub key_hash: [u8; 32],
    pub device: DeviceId,
    pub wg_public_key: WgKey,
    pub cert_serial: String,
    pub cert_public_key: Vec<u8>,
    pub cert_expires_at: OffsetDateTime,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
    pub now: OffsetDateTime,
    /// When no fresh overlay address is left, the address of a device revoked at or before
    /// this time (and held by no live device) may be given again.
    pub reuse_addresses_revoked_before: OffsetDateTime,
}

/// What an enrollment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollOutcome {
    /// A new device (HTTP 201).
    Created(Device),
    /// An existing device proved its key again and got a new certificate (HTTP 200).
    Reenrolled {
        device: Device,
        /// Its WireGuard key before, when the re-enrollment brought a new one.
        previous_wg_key: Option<WgKey>,
    },
}

impl EnrollOutcome {
    pub fn device(&self) -> &Device {
        match self {
            Self::Created(d) | Self::Reenrolled { device: d, .. } => d,
        }
    }
}

/// What a validated renewal asks the registry to record.
#[derive(Debug, Clone)]
pub struct RenewCommit {
    pub device: DeviceId,
    /// Serial of the certificate presented over mTLS.
    pub presented_serial: String,
    pub new_wg_public_key: Option<WgKey>,
    pub cert_serial: String,
    pub cert_public_key: Vec<u8>,
    pub cert_expires_at: OffsetDateTime,
    pub now: OffsetDateTime,
}

/// Result of a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub device: Device,
    pub previous_wg_key: Option<WgKey>,
}

/// A certificate the CA issued, for the CRL and the revocation check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertRecord {
    pub serial: String,
    pub kind: CertKind,
    /// Device UUID or operator name.
    pub subject: String,
    pub issued_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    Device,
    Operator,
}

impl CertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Operator => "operator",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "device" => Ok(Self::Device),
            "operator" => Ok(Self::Operator),
            other => Err(StoreError::Corrupt(format!("certificate kind {other:?}"))),
        }
    }
}

/// A new operator with its token (hashed): a one-time login token, or a viewer's API
/// token.
#[derive(Debug, Clone)]
pub struct NewOperator {
    pub name: String,
    pub role: Role,
    pub fleets: Vec<String>,
    pub token_kind: TokenKind,
    pub token_hash: [u8; 32],
    pub token_expires_at: Option<OffsetDateTime>,
    pub now: OffsetDateTime,
}

/// Why a login token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Used,
    Expired,
    OperatorRevoked,
}

/// A fleet's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub name: String,
    /// Logins operators may use on its devices over SSH (the principals of their
    /// certificates).
    pub ssh_logins: Vec<String>,
    pub updated_at: OffsetDateTime,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: OffsetDateTime,
    /// Operator name, `device:<uuid>`, `key:<id>` or `system`.
    pub actor: String,
    pub action: String,
    pub device: Option<DeviceId>,
    /// JSON with the action's details.
    pub detail: String,
}

/// A device revocation as committed: the device row and every certificate serial of it
/// that is now revoked (for the running server's revoked set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRevocation {
    pub device: Device,
    pub serials: Vec<String>,
}

/// An operator revocation as committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRevocation {
    pub operator: OperatorInfo,
    pub serials: Vec<String>,
}

/// A committed registry change that the running parts of a server (the concentrator, the
/// broker, the set of revoked certificates) must follow. Every write that changes what a
/// running server does returns one; the server hands it to its one applier. (A cluster of
/// servers will carry the same changes between nodes.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A device was enrolled, re-enrolled or renewed: its row as committed, and its
    /// WireGuard key before when the write replaced it.
    DeviceUpdated {
        device: Device,
        previous_wg_key: Option<WgKey>,
    },
    /// A device was revoked.
    DeviceRevoked(DeviceRevocation),
    /// An operator was revoked.
    OperatorRevoked(OperatorRevocation),
}

impl EnrollOutcome {
    /// What this enrollment changed for the running server.
    pub fn change(&self) -> Change {
        let previous_wg_key = match self {
            Self::Created(_) => None,
            Self::Reenrolled {
                previous_wg_key, ..
            } => *previous_wg_key,
        };
        Change::DeviceUpdated {
            device: self.device().clone(),
            previous_wg_key,
        }
    }
}

impl Renewed {
    /// What this renewal changed for the running server.
    pub fn change(&self) -> Change {
        Change::DeviceUpdated {
            device: self.device.clone(),
            previous_wg_key: self.previous_wg_key,
        }
    }
}

/// What a change-feed entry is about; the entry names its subject (a device UUID or an
/// operator name), and a reader reads the subject as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Device,
    Operator,
}

impl ChangeKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Operator => "operator",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "device" => Ok(Self::Device),
            "operator" => Ok(Self::Operator),
            other => Err(StoreError::Corrupt(format!("change kind {other:?}"))),
        }
    }
}

/// One entry of the change feed as stored: its sequence number and subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    pub seq: u64,
    pub kind: ChangeKind,
    pub subject: String,
}

/// One change of the feed, with its subject as the registry holds it now. Reading the
/// subject's present state (rather than a copy made at write time) makes applying the feed
/// converge: a late or repeated entry can only bring a node to the present, never back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    pub seq: u64,
    /// `None` when the change asks nothing of a running server (an operator that is not
    /// revoked) or its subject is gone.
    pub change: Option<Change>,
}

/// A page of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// The entries after the asked-for sequence number, oldest first.
    Entries(Vec<FeedEntry>),
    /// Entries after the asked-for number have been pruned: the reader must load the whole
    /// registry again (and continue from `resume_after`, read before that load).
    Pruned { resume_after: u64 },
}

/// Persisted presence of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub device: DeviceId,
    pub endpoint: SocketAddr,
    pub last_seen: OffsetDateTime,
}

/// The registry. Implementations must make `enroll`, `renew` and `consume_login_token`
/// atomic: two concurrent calls never both take the last use of a key, the same UUID, or
/// the same token.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    // provisioning keys
    async fn create_key(&self, key: NewKey) -> Result<KeyInfo, StoreError>;
    async fn find_key(&self, hash: &[u8; 32]) -> Result<Option<KeyInfo>, StoreError>;
    async fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError>;
    /// Marks a provisioning key revoked: it enrolls nothing more (devices it enrolled keep
    /// their certificates). `None` if unknown; an already revoked key is returned as it is.
    async fn revoke_key(
        &self,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<KeyInfo>, StoreError>;

    // devices
    async fn enroll(
        &self,
        c: EnrollCommit,
    ) -> Result<Result<EnrollOutcome, EnrollRefusal>, StoreError>;
    async fn renew(&self, c: RenewCommit) -> Result<Result<Renewed, RenewRefusal>, StoreError>;
    async fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError>;
    async fn devices(&self) -> Result<Vec<Device>, StoreError>;
    /// Marks the device and all its certificates revoked. `None` if unknown; an already
    /// revoked device is returned as it is.
    async fn revoke_device(
        &self,
        id: &DeviceId,
        now: OffsetDateTime,
    ) -> Result<Option<DeviceRevocation>, StoreError>;
    async fn save_presence(&self, presence: &[Presence]) -> Result<(), StoreError>;
    async fn count_devices(&self) -> Result<u64, StoreError>;

    // certificates
    async fn record_certificate(&self, cert: IssuedCertRecord) -> Result<(), StoreError>;
    /// Revoked certificates that have not yet expired at `now`.
    async fn revoked_certificates(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<IssuedCertRecord>, StoreError>;
    /// Bumps and returns the CRL number.
    async fn next_crl_number(&self) -> Result<u64, StoreError>;

    // operators
    async fn add_operator(&self, op: NewOperator) -> Result<Option<OperatorInfo>, StoreError>;
    async fn operator(&self, name: &str) -> Result<Option<OperatorInfo>, StoreError>;
    async fn operators(&self) -> Result<Vec<OperatorInfo>, StoreError>;
    /// Takes a one-time token: afterwards it can never be used again.
    async fn consume_login_token(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<OperatorInfo, TokenRefusal>, StoreError>;
    /// The operator holding this API token, if it is valid at `now`.
    async fn operator_by_api_token(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<OperatorInfo, TokenRefusal>, StoreError>;
    /// Marks the operator and its certificates revoked. `None` if unknown.
    async fn revoke_operator(
        &self,
        name: &str,
        now: OffsetDateTime,
    ) -> Result<Option<OperatorRevocation>, StoreError>;

    // change feed
    /// The newest sequence number of the change feed (0 when it is empty). A reader that
    /// loads the whole registry reads this first and follows the feed after it.
    async fn last_change(&self) -> Result<u64, StoreError>;
    /// Up to `limit` stored entries after `seq`, oldest first; `Err(resume_after)` when
    /// entries after `seq` have been pruned.
    async fn change_rows_after(
        &self,
        seq: u64,
        limit: u32,
    ) -> Result<Result<Vec<ChangeRow>, u64>, StoreError>;
    /// Serials of the revoked certificates of one device or operator.
    async fn revoked_serials_of(
        &self,
        kind: CertKind,
        subject: &str,
    ) -> Result<Vec<String>, StoreError>;
    /// Drops feed entries older than `before` (a reader that was away longer reloads).
    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, StoreError>;
    /// Waits until another writer may have appended to the feed, or `timeout` passes.
    /// Backends without other writers just wait.
    async fn wait_for_changes(&self, timeout: std::time::Duration) {
        tokio::time::sleep(timeout).await;
    }

    /// Up to `limit` changes after `seq`, oldest first, each with its subject as it is now.
    async fn changes_after(&self, seq: u64, limit: u32) -> Result<Feed, StoreError> {
        let rows = match self.change_rows_after(seq, limit).await? {
            Ok(rows) => rows,
            Err(resume_after) => return Ok(Feed::Pruned { resume_after }),
        };
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let change = match row.kind {
                ChangeKind::Device => {
                    let id = rows::parse_device_id(&row.subject)?;
                    match self.device(&id).await? {
                        Some(device) if device.is_revoked() => {
                            let serials = self
                                .revoked_serials_of(CertKind::Device, &row.subject)
                                .await?;
                            Some(Change::DeviceRevoked(DeviceRevocation { device, serials }))
                        }
                        Some(device) => Some(Change::DeviceUpdated {
                            device,
                            previous_wg_key: None,
                        }),
                        None => None,
                    }
                }
                ChangeKind::Operator => match self.operator(&row.subject).await? {
                    Some(operator) if operator.revoked_at.is_some() => {
                        let serials = self
                            .revoked_serials_of(CertKind::Operator, &row.subject)
                            .await?;
                        Some(Change::OperatorRevoked(OperatorRevocation {
                            operator,
                            serials,
                        }))
                    }
                    _ => None,
                },
            };
            entries.push(FeedEntry {
                seq: row.seq,
                change,
            });
        }
        Ok(Feed::Entries(entries))
    }

    // fleets
    /// The SSH logins operators may use on devices of `fleet`; `None` when the fleet has no
    /// setting of its own (the default applies).
    async fn fleet_ssh_logins(&self, fleet: &str) -> Result<Option<Vec<String>>, StoreError>;
    /// Sets the SSH logins of `fleet`, or (with `None`) goes back to the default.
    async fn set_fleet_ssh_logins(
        &self,
        fleet: &str,
        logins: Option<&[String]>,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Every fleet with a setting of its own, by name.
    async fn fleet_settings(&self) -> Result<Vec<FleetSettings>, StoreError>;
    /// Records the SSH host keys a device sent (and holds host certificates for); an empty
    /// list forgets them.
    async fn set_device_ssh_host_keys(
        &self,
        device: &DeviceId,
        keys: &[String],
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// The SSH host keys a device last sent (empty when none).
    async fn device_ssh_host_keys(&self, device: &DeviceId) -> Result<Vec<String>, StoreError>;

    // audit
    async fn append_audit(&self, record: AuditRecord) -> Result<(), StoreError>;
    async fn audit(
        &self,
        device: Option<&DeviceId>,
        actor: Option<&str>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}
