//! Rows to records, for both backends: timestamps in whole seconds, addresses as integers,
//! and the column lists the combined queries select with a prefix. Both schemas use the
//! same column names and kinds (INTEGER/BIGINT, TEXT, BLOB/BYTEA).

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr as _;

use time::OffsetDateTime;

use floto_proto::admin::{KeyInfo, OperatorInfo, Role};
use floto_proto::{DeviceId, WgKey};

use crate::{AuditRecord, CertKind, Device, IssuedCertRecord, StoreError};

/// The column reads the records need, for a row of either backend.
pub(crate) trait RegistryRow {
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>, StoreError>;
}

macro_rules! registry_row {
    ($row:ty) => {
        impl RegistryRow for $row {
            fn int(&self, col: &str) -> Result<i64, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn text(&self, col: &str) -> Result<String, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn bytes(&self, col: &str) -> Result<Vec<u8>, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
        }
    };
}

registry_row!(sqlx::sqlite::SqliteRow);
registry_row!(sqlx::postgres::PgRow);

pub(crate) fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

pub(crate) fn from_ts(secs: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {secs}")))
}

pub(crate) fn opt_ts(secs: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    secs.map(from_ts).transpose()
}

pub(crate) fn ip_from_db(v: i64) -> Ipv4Addr {
    Ipv4Addr::from(v as u32)
}

pub(crate) fn ip_to_db(ip: Ipv4Addr) -> i64 {
    i64::from(u32::from(ip))
}

/// Timestamps are stored in whole seconds; the rows we return say what a read would.
pub(crate) fn whole_seconds(t: OffsetDateTime) -> Result<OffsetDateTime, StoreError> {
    from_ts(ts(t))
}

/// Refuses a registry holding device addresses outside `overlay`: a server started with
/// another overlay than the one its devices were given addresses in.
pub(crate) fn check_addresses(
    addresses: &[i64],
    overlay: &crate::rules::Overlays,
) -> Result<(), StoreError> {
    let outside: Vec<Ipv4Addr> = addresses
        .iter()
        .map(|ip| ip_from_db(*ip))
        .filter(|ip| !overlay.contains(*ip))
        .collect();
    match outside.first() {
        None => Ok(()),
        Some(first) => Err(StoreError::Inconsistent(format!(
            "{} enrolled device(s) have addresses outside the configured overlay {overlay} \
             (e.g. {first}); run with the overlay the registry was created with (networks may \
             be added, never removed)",
            outside.len(),
        ))),
    }
}

/// The logins of a `fleets` row's `ssh_logins` column.
pub(crate) fn split_logins(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(crate) fn fleet_from_row(row: &impl RegistryRow) -> Result<crate::FleetSettings, StoreError> {
    Ok(crate::FleetSettings {
        name: row.text("name")?,
        ssh_logins: split_logins(&row.text("ssh_logins")?),
        updated_at: from_ts(row.int("updated_at")?)?,
    })
}

pub(crate) fn parse_device_id(uuid: &str) -> Result<DeviceId, StoreError> {
    uuid.parse()
        .map_err(|e| StoreError::Corrupt(format!("device uuid {uuid:?}: {e}")))
}

pub(crate) fn device_from_row(row: &impl RegistryRow) -> Result<Device, StoreError> {
    device_from_prefixed(row, "")
}

/// A device from columns named `{prefix}{column}`.
pub(crate) fn device_from_prefixed(
    row: &impl RegistryRow,
    prefix: &str,
) -> Result<Device, StoreError> {
    let col = |name: &str| format!("{prefix}{name}");
    let id = parse_device_id(&row.text(&col("uuid"))?)?;
    let key = row.text(&col("wg_public_key"))?;
    let wg_public_key: WgKey = key
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("device {id} WireGuard key: {e}")))?;
    let endpoint = row.opt_text(&col("last_endpoint"))?;
    Ok(Device {
        id,
        fleet: row.text(&col("fleet"))?,
        wg_public_key,
        overlay_ip: ip_from_db(row.int(&col("overlay_ip"))?),
        cert_serial: row.text(&col("cert_serial"))?,
        cert_public_key: row.bytes(&col("cert_public_key"))?,
        cert_expires_at: from_ts(row.int(&col("cert_expires_at"))?)?,
        created_at: from_ts(row.int(&col("created_at"))?)?,
        updated_at: from_ts(row.int(&col("updated_at"))?)?,
        revoked_at: opt_ts(row.opt_int(&col("revoked_at"))?)?,
        key_id: row.opt_text(&col("key_id"))?,
        device_type: row.opt_text(&col("device_type"))?,
        hostname: row.opt_text(&col("hostname"))?,
        last_endpoint: endpoint.and_then(|e| SocketAddr::from_str(&e).ok()),
        last_seen: opt_ts(row.opt_int(&col("last_seen"))?)?,
    })
}

pub(crate) fn key_from_row(row: &impl RegistryRow) -> Result<KeyInfo, StoreError> {
    key_from_prefixed(row, "")
}

pub(crate) fn key_from_prefixed(
    row: &impl RegistryRow,
    prefix: &str,
) -> Result<KeyInfo, StoreError> {
    let col = |name: &str| format!("{prefix}{name}");
    let uses = row.opt_int(&col("uses_left"))?;
    Ok(KeyInfo {
        id: row.text(&col("id"))?,
        fleet: row.text(&col("fleet"))?,
        uses_left: uses.map(|u| u.clamp(0, i64::from(u32::MAX)) as u32),
        expires_at: opt_ts(row.opt_int(&col("expires_at"))?)?,
        created_at: from_ts(row.int(&col("created_at"))?)?,
        revoked_at: opt_ts(row.opt_int(&col("revoked_at"))?)?,
    })
}

pub(crate) fn operator_from_row(row: &impl RegistryRow) -> Result<OperatorInfo, StoreError> {
    let role = row.text("role")?;
    let fleets = row.text("fleets")?;
    Ok(OperatorInfo {
        name: row.text("name")?,
        role: role
            .parse::<Role>()
            .map_err(|e| StoreError::Corrupt(format!("operator role: {e}")))?,
        fleets: serde_json::from_str(&fleets)
            .map_err(|e| StoreError::Corrupt(format!("operator fleets: {e}")))?,
        created_at: from_ts(row.int("created_at")?)?,
        revoked_at: opt_ts(row.opt_int("revoked_at")?)?,
    })
}

pub(crate) fn cert_from_row(row: &impl RegistryRow) -> Result<IssuedCertRecord, StoreError> {
    Ok(IssuedCertRecord {
        serial: row.text("serial")?,
        kind: CertKind::parse(&row.text("kind")?)?,
        subject: row.text("subject")?,
        issued_at: from_ts(row.int("issued_at")?)?,
        expires_at: from_ts(row.int("expires_at")?)?,
        revoked_at: opt_ts(row.opt_int("revoked_at")?)?,
    })
}

pub(crate) fn audit_from_row(row: &impl RegistryRow) -> Result<AuditRecord, StoreError> {
    let device = row.opt_text("device")?;
    Ok(AuditRecord {
        at: from_ts(row.int("at")?)?,
        actor: row.text("actor")?,
        action: row.text("action")?,
        device: device.and_then(|d| d.parse().ok()),
        detail: row.text("detail")?,
    })
}

/// A change-feed row (`seq, kind, subject`).
pub(crate) fn change_from_row(row: &impl RegistryRow) -> Result<crate::ChangeRow, StoreError> {
    Ok(crate::ChangeRow {
        seq: row.int("seq")?.max(0) as u64,
        kind: crate::ChangeKind::parse(&row.text("kind")?)?,
        subject: row.text("subject")?,
    })
}

/// The `changes_pruned_through` mark of the meta table.
pub(crate) fn parse_pruned_through(value: Option<&str>) -> Result<u64, StoreError> {
    value
        .unwrap_or("0")
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("changes_pruned_through {value:?}")))
}

pub(crate) const DEVICE_COLUMNS: [&str; 15] = [
    "uuid",
    "fleet",
    "wg_public_key",
    "overlay_ip",
    "cert_serial",
    "cert_public_key",
    "cert_expires_at",
    "created_at",
    "updated_at",
    "revoked_at",
    "key_id",
    "device_type",
    "hostname",
    "last_endpoint",
    "last_seen",
];

pub(crate) const KEY_COLUMNS: [&str; 6] = [
    "id",
    "fleet",
    "uses_left",
    "expires_at",
    "created_at",
    "revoked_at",
];

/// The combined query every enrollment and renewal decides on: the key (by hash, `$key`),
/// the device (by UUID, `$device`), the holder of the WireGuard key (`$wg`), and the
/// highest address given out so far. The arguments are how the backend spells those three
/// parameters (`?1` or `$1`).
pub(crate) fn facts_sql(key: &str, device: &str, wg: &str) -> String {
    let mut cols: Vec<String> = KEY_COLUMNS
        .iter()
        .map(|c| format!("k.{c} AS k_{c}"))
        .collect();
    cols.extend(DEVICE_COLUMNS.iter().map(|c| format!("d.{c} AS d_{c}")));
    format!(
        "SELECT {}, o.uuid AS owner, (SELECT MAX(overlay_ip) FROM devices) AS max_ip \
         FROM (SELECT 1) AS one \
         LEFT JOIN provisioning_keys AS k ON k.hash = {key} \
         LEFT JOIN devices AS d ON d.uuid = {device} \
         LEFT JOIN devices AS o ON o.wg_public_key = {wg}",
        cols.join(", ")
    )
}

/// What an enrollment or renewal decides on, read by [`facts_sql`].
pub(crate) struct Facts {
    pub key: Option<KeyInfo>,
    pub device: Option<Device>,
    pub owner: Option<DeviceId>,
    /// The highest overlay address given out, if any.
    pub max_ip: Option<Ipv4Addr>,
}

impl Facts {
    pub(crate) fn from_row(row: &impl RegistryRow) -> Result<Self, StoreError> {
        Ok(Self {
            key: row
                .opt_text("k_id")?
                .map(|_| key_from_prefixed(row, "k_"))
                .transpose()?,
            device: row
                .opt_text("d_uuid")?
                .map(|_| device_from_prefixed(row, "d_"))
                .transpose()?,
            owner: row
                .opt_text("owner")?
                .map(|u| parse_device_id(&u))
                .transpose()?,
            max_ip: row.opt_int("max_ip")?.map(ip_from_db),
        })
    }
}
