//! The SQLite registry: WAL journal, `synchronous=FULL` (a commit is on disk before the
//! API answers), one writer connection (transactions start `IMMEDIATE`, so writers queue
//! instead of failing busy) and a small pool of readers.

mod schema;
#[cfg(test)]
mod tests;
mod writer;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row as _, Sqlite, Transaction};
use time::OffsetDateTime;

use floto_proto::admin::{KeyInfo, OperatorInfo, TokenKind};
use floto_proto::DeviceId;

pub use schema::{inspect, snapshot, SnapshotInfo, SCHEMA_VERSION};

use crate::commit::{CommitTx as _, EnrollResult, Jobs, RenewResult};
use crate::rows::*;
use crate::*;
use schema::migrate;
use writer::SqliteWriter;

/// Devices a presence statement writes at most.
const PRESENCE_BATCH: usize = 5000;

/// The SQLite registry.
#[derive(Debug, Clone)]
pub struct SqliteRegistry {
    writer: SqlitePool,
    reader: SqlitePool,
    overlay: Overlays,
    /// Enrollments and renewals, committed in groups by [`crate::commit`].
    jobs: Jobs,
}

impl SqliteRegistry {
    /// Opens (creating if needed) the database at `path` and migrates it. `overlay` is the
    /// network device addresses are allocated from; a registry with addresses outside it is
    /// refused.
    pub async fn open(path: &Path, overlay: impl Into<Overlays>) -> Result<Self, StoreError> {
        let overlay = overlay.into();
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("trusted_schema", "OFF");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone())
            .await?;
        migrate(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        let jobs = Jobs::start(SqliteWriter(writer.clone()), overlay.clone());
        let registry = Self {
            writer,
            reader,
            overlay,
            jobs,
        };
        registry.check_overlay().await?;
        Ok(registry)
    }

    /// Closes the pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    async fn check_overlay(&self) -> Result<(), StoreError> {
        let addresses: Vec<i64> = sqlx::query_scalar("SELECT overlay_ip FROM devices")
            .fetch_all(&self.reader)
            .await?;
        check_addresses(&addresses, &self.overlay)
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

#[async_trait]
impl Registry for SqliteRegistry {
    async fn create_key(&self, key: NewKey) -> Result<KeyInfo, StoreError> {
        sqlx::query(
            "INSERT INTO provisioning_keys(id, hash, fleet, uses_left, expires_at, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.hash[..])
        .bind(&key.fleet)
        .bind(key.uses.map(i64::from))
        .bind(key.expires_at.map(ts))
        .bind(ts(key.created_at))
        .execute(&self.writer)
        .await?;
        Ok(KeyInfo {
            id: key.id,
            fleet: key.fleet,
            uses_left: key.uses,
            expires_at: key.expires_at,
            created_at: key.created_at,
            revoked_at: None,
        })
    }

    async fn find_key(&self, hash: &[u8; 32]) -> Result<Option<KeyInfo>, StoreError> {
        sqlx::query("SELECT * FROM provisioning_keys WHERE hash = ?")
            .bind(&hash[..])
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        sqlx::query("SELECT * FROM provisioning_keys ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_key(
        &self,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<KeyInfo>, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE provisioning_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let key = sqlx::query("SELECT * FROM provisioning_keys WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()?;
        tx.commit().await?;
        Ok(key)
    }

    async fn enroll(&self, c: EnrollCommit) -> EnrollResult {
        self.jobs.enroll(c).await
    }

    async fn renew(&self, c: RenewCommit) -> RenewResult {
        self.jobs.renew(c).await
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        sqlx::query("SELECT * FROM devices WHERE uuid = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        sqlx::query("SELECT * FROM devices ORDER BY overlay_ip")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(device_from_row)
            .collect()
    }

    async fn revoke_device(
        &self,
        id: &DeviceId,
        now: OffsetDateTime,
    ) -> Result<Option<DeviceRevocation>, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE devices SET revoked_at = ?, updated_at = ? WHERE uuid = ? AND revoked_at IS NULL")
            .bind(ts(now))
            .bind(ts(now))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE certificates SET revoked_at = ? WHERE subject = ? AND kind = 'device' AND revoked_at IS NULL")
            .bind(ts(now))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let device = sqlx::query("SELECT * FROM devices WHERE uuid = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()?;
        let serials = revoked_serials(&mut tx, CertKind::Device, &id.to_string()).await?;
        if device.is_some() {
            tx.record_change(ChangeKind::Device, &id.to_string(), now)
                .await?;
        }
        tx.commit().await?;
        Ok(device.map(|device| DeviceRevocation { device, serials }))
    }

    async fn save_presence(&self, presence: &[Presence]) -> Result<(), StoreError> {
        if presence.is_empty() {
            return Ok(());
        }
        // One statement per PRESENCE_BATCH devices, which reads them from a JSON array: a
        // statement per device cost two thread switches each (sqlx runs SQLite on a worker
        // thread), about a tenth of the server's CPU in a 10,000-device storm.
        let mut tx = self.begin().await?;
        for chunk in presence.chunks(PRESENCE_BATCH) {
            let rows: Vec<(String, String, i64)> = chunk
                .iter()
                .map(|p| {
                    (
                        p.device.to_string(),
                        p.endpoint.to_string(),
                        ts(p.last_seen),
                    )
                })
                .collect();
            let rows =
                serde_json::to_string(&rows).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "UPDATE devices SET last_endpoint = p.value ->> 1, last_seen = p.value ->> 2 \
                 FROM json_each(?) AS p WHERE devices.uuid = p.value ->> 0",
            )
            .bind(rows)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn count_devices(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE revoked_at IS NULL")
            .fetch_one(&self.reader)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn record_certificate(&self, cert: IssuedCertRecord) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        insert_cert(&mut tx, &cert).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn revoked_certificates(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<IssuedCertRecord>, StoreError> {
        sqlx::query("SELECT * FROM certificates WHERE revoked_at IS NOT NULL AND expires_at > ? ORDER BY revoked_at")
            .bind(ts(now))
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(cert_from_row)
            .collect()
    }

    async fn next_crl_number(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'crl_number'")
            .execute(&mut *tx)
            .await?;
        let v: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'crl_number'")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        v.parse()
            .map_err(|_| StoreError::Corrupt(format!("crl_number {v:?}")))
    }

    async fn add_operator(&self, op: NewOperator) -> Result<Option<OperatorInfo>, StoreError> {
        let fleets =
            serde_json::to_string(&op.fleets).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (login, api) = match op.token_kind {
            TokenKind::Login => (Some(&op.token_hash[..]), None),
            TokenKind::Api => (None, Some(&op.token_hash[..])),
        };
        let done = sqlx::query(
            "INSERT INTO operators(name, role, fleets, created_at, token_hash, token_expires_at, \
             api_token_hash, api_token_expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6) ON CONFLICT(name) DO NOTHING",
        )
        .bind(&op.name)
        .bind(op.role.to_string())
        .bind(fleets)
        .bind(ts(op.now))
        .bind(login)
        .bind(op.token_expires_at.map(ts))
        .bind(api)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(Some(OperatorInfo {
            name: op.name,
            role: op.role,
            fleets: op.fleets,
            created_at: op.now,
            revoked_at: None,
        }))
    }

    async fn operator(&self, name: &str) -> Result<Option<OperatorInfo>, StoreError> {
        sqlx::query("SELECT * FROM operators WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(operator_from_row)
            .transpose()
    }

    async fn operators(&self) -> Result<Vec<OperatorInfo>, StoreError> {
        sqlx::query("SELECT * FROM operators ORDER BY name")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(operator_from_row)
            .collect()
    }

    async fn consume_login_token(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<OperatorInfo, TokenRefusal>, StoreError> {
        let mut tx = self.begin().await?;
        let Some(row) = sqlx::query("SELECT * FROM operators WHERE token_hash = ?")
            .bind(&hash[..])
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let op = operator_from_row(&row)?;
        let used: Option<i64> = row.try_get("token_used_at")?;
        let expires: Option<i64> = row.try_get("token_expires_at")?;
        if used.is_some() {
            return Ok(Err(TokenRefusal::Used));
        }
        if op.revoked_at.is_some() {
            return Ok(Err(TokenRefusal::OperatorRevoked));
        }
        if expires.is_some_and(|e| e <= ts(now)) {
            return Ok(Err(TokenRefusal::Expired));
        }
        sqlx::query("UPDATE operators SET token_used_at = ? WHERE name = ?")
            .bind(ts(now))
            .bind(&op.name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(op))
    }

    async fn operator_by_api_token(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<OperatorInfo, TokenRefusal>, StoreError> {
        let Some(row) = sqlx::query("SELECT * FROM operators WHERE api_token_hash = ?")
            .bind(&hash[..])
            .fetch_optional(&self.reader)
            .await?
        else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let op = operator_from_row(&row)?;
        let expires: Option<i64> = row.try_get("api_token_expires_at")?;
        if op.revoked_at.is_some() {
            return Ok(Err(TokenRefusal::OperatorRevoked));
        }
        if expires.is_some_and(|e| e <= ts(now)) {
            return Ok(Err(TokenRefusal::Expired));
        }
        Ok(Ok(op))
    }

    async fn revoke_operator(
        &self,
        name: &str,
        now: OffsetDateTime,
    ) -> Result<Option<OperatorRevocation>, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE operators SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL")
            .bind(ts(now))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE certificates SET revoked_at = ? WHERE subject = ? AND kind = 'operator' AND revoked_at IS NULL")
            .bind(ts(now))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let op = sqlx::query("SELECT * FROM operators WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(operator_from_row)
            .transpose()?;
        let serials = revoked_serials(&mut tx, CertKind::Operator, name).await?;
        if op.is_some() {
            tx.record_change(ChangeKind::Operator, name, now).await?;
        }
        tx.commit().await?;
        Ok(op.map(|operator| OperatorRevocation { operator, serials }))
    }

    async fn last_change(&self) -> Result<u64, StoreError> {
        let n: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM changes")
            .fetch_one(&self.reader)
            .await?;
        let pruned = pruned_through(&self.reader).await?;
        Ok(n.map_or(0, |n| n.max(0) as u64).max(pruned))
    }

    async fn change_rows_after(
        &self,
        seq: u64,
        limit: u32,
    ) -> Result<Result<Vec<ChangeRow>, u64>, StoreError> {
        // One read transaction: the pruning mark and the rows agree.
        let mut tx = self.reader.begin().await?;
        let pruned = pruned_through(&mut *tx).await?;
        if seq < pruned {
            return Ok(Err(self.last_change().await?));
        }
        let rows = sqlx::query(
            "SELECT seq, kind, subject FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(rows
            .iter()
            .map(change_from_row)
            .collect::<Result<_, StoreError>>()?))
    }

    async fn revoked_serials_of(
        &self,
        kind: CertKind,
        subject: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.reader.begin().await?;
        let serials = revoked_serials(&mut tx, kind, subject).await?;
        tx.commit().await?;
        Ok(serials)
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let through: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM changes WHERE at < ?")
            .bind(ts(before))
            .fetch_one(&mut *tx)
            .await?;
        let Some(through) = through else {
            return Ok(0);
        };
        let done = sqlx::query("DELETE FROM changes WHERE seq <= ?")
            .bind(through)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'changes_pruned_through'")
            .bind(through.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn fleet_ssh_logins(&self, fleet: &str) -> Result<Option<Vec<String>>, StoreError> {
        let logins: Option<String> =
            sqlx::query_scalar("SELECT ssh_logins FROM fleets WHERE name = ?1")
                .bind(fleet)
                .fetch_optional(&self.reader)
                .await?;
        Ok(logins.map(|l| split_logins(&l)))
    }

    async fn set_fleet_ssh_logins(
        &self,
        fleet: &str,
        logins: Option<&[String]>,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        match logins {
            Some(logins) => {
                sqlx::query(
                    "INSERT INTO fleets(name, ssh_logins, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET ssh_logins = EXCLUDED.ssh_logins, \
                     updated_at = EXCLUDED.updated_at",
                )
                .bind(fleet)
                .bind(logins.join(","))
                .bind(ts(at))
                .execute(&self.writer)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM fleets WHERE name = ?1")
                    .bind(fleet)
                    .execute(&self.writer)
                    .await?;
            }
        }
        Ok(())
    }

    async fn set_device_ssh_host_keys(
        &self,
        device: &DeviceId,
        keys: &[String],
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            sqlx::query("DELETE FROM device_ssh WHERE uuid = ?1")
                .bind(device.to_string())
                .execute(&self.writer)
                .await?;
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO device_ssh(uuid, host_keys, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (uuid) DO UPDATE SET host_keys = EXCLUDED.host_keys, \
             updated_at = EXCLUDED.updated_at",
        )
        .bind(device.to_string())
        .bind(keys.join("\n"))
        .bind(ts(at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn device_ssh_host_keys(&self, device: &DeviceId) -> Result<Vec<String>, StoreError> {
        let keys: Option<String> =
            sqlx::query_scalar("SELECT host_keys FROM device_ssh WHERE uuid = ?1")
                .bind(device.to_string())
                .fetch_optional(&self.reader)
                .await?;
        Ok(keys
            .map(|k| k.lines().map(str::to_owned).collect())
            .unwrap_or_default())
    }

    async fn fleet_settings(&self) -> Result<Vec<FleetSettings>, StoreError> {
        sqlx::query("SELECT * FROM fleets ORDER BY name")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(fleet_from_row)
            .collect()
    }

    async fn append_audit(&self, r: AuditRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit(at, actor, action, device, detail) VALUES (?, ?, ?, ?, ?)")
            .bind(ts(r.at))
            .bind(&r.actor)
            .bind(&r.action)
            .bind(r.device.map(|d| d.to_string()))
            .bind(&r.detail)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn audit(
        &self,
        device: Option<&DeviceId>,
        actor: Option<&str>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM audit WHERE (?1 IS NULL OR device = ?1) AND (?2 IS NULL OR actor = ?2) \
             AND (?3 IS NULL OR at >= ?3) ORDER BY id DESC LIMIT ?4",
        )
        .bind(device.map(|d| d.to_string()))
        .bind(actor)
        .bind(since.map(ts))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }
}

/// The highest sequence number pruned from the feed (0 when none).
async fn pruned_through<'c>(
    conn: impl sqlx::Executor<'c, Database = Sqlite>,
) -> Result<u64, StoreError> {
    let v: Option<String> =
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'changes_pruned_through'")
            .fetch_optional(conn)
            .await?;
    parse_pruned_through(v.as_deref())
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
