//! Rows to records and back: timestamps in whole seconds, addresses as integers, and the
//! column lists the combined queries select with a prefix.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr as _;

use sqlx::sqlite::SqliteRow;
use sqlx::{Row as _, Sqlite, Transaction};
use time::OffsetDateTime;

use floto_proto::admin::{KeyInfo, OperatorInfo, Role};
use floto_proto::{DeviceId, WgKey};

use crate::{AuditRecord, CertKind, Device, IssuedCertRecord, StoreError};

pub(super) fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

pub(super) fn from_ts(secs: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {secs}")))
}

pub(super) fn opt_ts(secs: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    secs.map(from_ts).transpose()
}

pub(super) fn ip_from_db(v: i64) -> Ipv4Addr {
    Ipv4Addr::from(v as u32)
}

pub(super) fn ip_to_db(ip: Ipv4Addr) -> i64 {
    i64::from(u32::from(ip))
}

pub(super) fn device_from_row(row: &SqliteRow) -> Result<Device, StoreError> {
    device_from_prefixed(row, "")
}

/// A device from columns named `{prefix}{column}`.
pub(super) fn device_from_prefixed(row: &SqliteRow, prefix: &str) -> Result<Device, StoreError> {
    let col = |name: &str| format!("{prefix}{name}");
    let uuid: String = row.try_get(col("uuid").as_str())?;
    let id: DeviceId = uuid
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("device uuid {uuid:?}: {e}")))?;
    let key: String = row.try_get(col("wg_public_key").as_str())?;
    let wg_public_key: WgKey = key
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("device {id} WireGuard key: {e}")))?;
    let endpoint: Option<String> = row.try_get(col("last_endpoint").as_str())?;
    Ok(Device {
        id,
        fleet: row.try_get(col("fleet").as_str())?,
        wg_public_key,
        overlay_ip: ip_from_db(row.try_get(col("overlay_ip").as_str())?),
        cert_serial: row.try_get(col("cert_serial").as_str())?,
        cert_public_key: row.try_get(col("cert_public_key").as_str())?,
        cert_expires_at: from_ts(row.try_get(col("cert_expires_at").as_str())?)?,
        created_at: from_ts(row.try_get(col("created_at").as_str())?)?,
        updated_at: from_ts(row.try_get(col("updated_at").as_str())?)?,
        revoked_at: opt_ts(row.try_get(col("revoked_at").as_str())?)?,
        key_id: row.try_get(col("key_id").as_str())?,
        device_type: row.try_get(col("device_type").as_str())?,
        hostname: row.try_get(col("hostname").as_str())?,
        last_endpoint: endpoint.and_then(|e| SocketAddr::from_str(&e).ok()),
        last_seen: opt_ts(row.try_get(col("last_seen").as_str())?)?,
    })
}

pub(super) fn key_from_row(row: &SqliteRow) -> Result<KeyInfo, StoreError> {
    key_from_prefixed(row, "")
}

pub(super) fn key_from_prefixed(row: &SqliteRow, prefix: &str) -> Result<KeyInfo, StoreError> {
    let col = |name: &str| format!("{prefix}{name}");
    let uses: Option<i64> = row.try_get(col("uses_left").as_str())?;
    Ok(KeyInfo {
        id: row.try_get(col("id").as_str())?,
        fleet: row.try_get(col("fleet").as_str())?,
        uses_left: uses.map(|u| u.clamp(0, i64::from(u32::MAX)) as u32),
        expires_at: opt_ts(row.try_get(col("expires_at").as_str())?)?,
        created_at: from_ts(row.try_get(col("created_at").as_str())?)?,
        revoked_at: opt_ts(row.try_get(col("revoked_at").as_str())?)?,
    })
}

pub(super) fn operator_from_row(row: &SqliteRow) -> Result<OperatorInfo, StoreError> {
    let role: String = row.try_get("role")?;
    let fleets: String = row.try_get("fleets")?;
    Ok(OperatorInfo {
        name: row.try_get("name")?,
        role: role
            .parse::<Role>()
            .map_err(|e| StoreError::Corrupt(format!("operator role: {e}")))?,
        fleets: serde_json::from_str(&fleets)
            .map_err(|e| StoreError::Corrupt(format!("operator fleets: {e}")))?,
        created_at: from_ts(row.try_get("created_at")?)?,
        revoked_at: opt_ts(row.try_get("revoked_at")?)?,
    })
}

pub(super) fn cert_from_row(row: &SqliteRow) -> Result<IssuedCertRecord, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(IssuedCertRecord {
        serial: row.try_get("serial")?,
        kind: CertKind::parse(&kind)?,
        subject: row.try_get("subject")?,
        issued_at: from_ts(row.try_get("issued_at")?)?,
        expires_at: from_ts(row.try_get("expires_at")?)?,
        revoked_at: opt_ts(row.try_get("revoked_at")?)?,
    })
}

pub(super) fn audit_from_row(row: &SqliteRow) -> Result<AuditRecord, StoreError> {
    let device: Option<String> = row.try_get("device")?;
    Ok(AuditRecord {
        at: from_ts(row.try_get("at")?)?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        device: device.and_then(|d| d.parse().ok()),
        detail: row.try_get("detail")?,
    })
}

pub(super) async fn insert_cert(
    tx: &mut Transaction<'static, Sqlite>,
    cert: &IssuedCertRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO certificates(serial, kind, subject, issued_at, expires_at, revoked_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&cert.serial)
    .bind(cert.kind.as_str())
    .bind(&cert.subject)
    .bind(ts(cert.issued_at))
    .bind(ts(cert.expires_at))
    .bind(cert.revoked_at.map(ts))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) const DEVICE_COLUMNS: [&str; 15] = [
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
pub(super) const KEY_COLUMNS: [&str; 6] = [
    "id",
    "fleet",
    "uses_left",
    "expires_at",
    "created_at",
    "revoked_at",
];

/// Timestamps are stored in whole seconds; the rows we return say what a read would.
pub(super) fn whole_seconds(t: OffsetDateTime) -> Result<OffsetDateTime, StoreError> {
    from_ts(ts(t))
}

/// Serials of the revoked certificates of one subject.
pub(super) async fn revoked_serials(
    tx: &mut Transaction<'static, Sqlite>,
    kind: CertKind,
    subject: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT serial FROM certificates WHERE subject = ? AND kind = ? AND revoked_at IS NOT NULL",
    )
    .bind(subject)
    .bind(kind.as_str())
    .fetch_all(&mut **tx)
    .await?)
}
