//! The SQLite registry: WAL journal, `synchronous=FULL` (a commit is on disk before the
//! API answers), one writer connection (transactions start `IMMEDIATE`, so writers queue
//! instead of failing busy) and a small pool of readers.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row as _, Sqlite, Transaction};
use time::OffsetDateTime;

use floto_proto::admin::Role;
use floto_proto::{DeviceId, WgKey};

use super::*;
use crate::enroll::{self, EnrollDecision, EnrollRefusal, RenewRefusal};

/// Schema version this code writes. Migrations run forward only.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE provisioning_keys (
    id         TEXT PRIMARY KEY,
    hash       BLOB NOT NULL UNIQUE,
    fleet      TEXT NOT NULL,
    uses_left  INTEGER,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE devices (
    uuid            TEXT PRIMARY KEY,
    fleet           TEXT NOT NULL,
    wg_public_key   TEXT NOT NULL UNIQUE,
    overlay_ip      INTEGER NOT NULL UNIQUE,
    cert_serial     TEXT NOT NULL,
    cert_public_key BLOB NOT NULL,
    cert_expires_at INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    revoked_at      INTEGER,
    key_id          TEXT,
    device_type     TEXT,
    hostname        TEXT,
    last_endpoint   TEXT,
    last_seen       INTEGER
);
CREATE INDEX devices_fleet ON devices(fleet);
CREATE TABLE certificates (
    serial     TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    issued_at  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX certificates_subject ON certificates(subject);
CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE operators (
    name             TEXT PRIMARY KEY,
    role             TEXT NOT NULL,
    fleets           TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    revoked_at       INTEGER,
    token_hash       BLOB UNIQUE,
    token_expires_at INTEGER,
    token_used_at    INTEGER
);
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    device TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX audit_device ON audit(device, at);
CREATE INDEX audit_actor ON audit(actor, at);
"#;

/// The SQLite registry.
#[derive(Debug, Clone)]
pub struct SqliteRegistry {
    writer: SqlitePool,
    reader: SqlitePool,
    overlay: Ipv4Net,
}

impl SqliteRegistry {
    /// Opens (creating if needed) the database at `path` and migrates it. `overlay` is the
    /// network device addresses are allocated from; a registry with addresses outside it is
    /// refused.
    pub async fn open(path: &Path, overlay: Ipv4Net) -> Result<Self, StoreError> {
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
        let registry = Self {
            writer,
            reader,
            overlay,
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
        let outside: Vec<i64> = sqlx::query_scalar("SELECT overlay_ip FROM devices")
            .fetch_all(&self.reader)
            .await?
            .into_iter()
            .filter(|ip: &i64| !self.overlay.contains(&ip_from_db(*ip)))
            .collect();
        if let Some(first) = outside.first() {
            return Err(StoreError::Inconsistent(format!(
                "{} enrolled device(s) have addresses outside the configured overlay {} (e.g. {}); \
                 run with the overlay the registry was created with",
                outside.len(),
                self.overlay,
                ip_from_db(*first)
            )));
        }
        Ok(())
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Inconsistent(format!(
            "the registry has schema version {version}, newer than this server understands \
             ({SCHEMA_VERSION}); run a newer floto-vpn-server or restore a backup"
        )));
    }
    if version < 1 {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(SCHEMA_V1).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO meta(key, value) VALUES ('next_ip_offset', '2'), ('crl_number', '0')",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::raw_sql("PRAGMA user_version = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn from_ts(secs: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {secs}")))
}

fn opt_ts(secs: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    secs.map(from_ts).transpose()
}

fn ip_from_db(v: i64) -> Ipv4Addr {
    Ipv4Addr::from(v as u32)
}

fn ip_to_db(ip: Ipv4Addr) -> i64 {
    i64::from(u32::from(ip))
}

fn device_from_row(row: &SqliteRow) -> Result<Device, StoreError> {
    let uuid: String = row.try_get("uuid")?;
    let id: DeviceId = uuid
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("device uuid {uuid:?}: {e}")))?;
    let key: String = row.try_get("wg_public_key")?;
    let wg_public_key: WgKey = key
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("device {id} WireGuard key: {e}")))?;
    let endpoint: Option<String> = row.try_get("last_endpoint")?;
    Ok(Device {
        id,
        fleet: row.try_get("fleet")?,
        wg_public_key,
        overlay_ip: ip_from_db(row.try_get("overlay_ip")?),
        cert_serial: row.try_get("cert_serial")?,
        cert_public_key: row.try_get("cert_public_key")?,
        cert_expires_at: from_ts(row.try_get("cert_expires_at")?)?,
        created_at: from_ts(row.try_get("created_at")?)?,
        updated_at: from_ts(row.try_get("updated_at")?)?,
        revoked_at: opt_ts(row.try_get("revoked_at")?)?,
        key_id: row.try_get("key_id")?,
        device_type: row.try_get("device_type")?,
        hostname: row.try_get("hostname")?,
        last_endpoint: endpoint.and_then(|e| SocketAddr::from_str(&e).ok()),
        last_seen: opt_ts(row.try_get("last_seen")?)?,
    })
}

fn key_from_row(row: &SqliteRow) -> Result<ProvisioningKey, StoreError> {
    let uses: Option<i64> = row.try_get("uses_left")?;
    Ok(ProvisioningKey {
        id: row.try_get("id")?,
        fleet: row.try_get("fleet")?,
        uses_left: uses.map(|u| u.clamp(0, i64::from(u32::MAX)) as u32),
        expires_at: opt_ts(row.try_get("expires_at")?)?,
        created_at: from_ts(row.try_get("created_at")?)?,
        revoked_at: opt_ts(row.try_get("revoked_at")?)?,
    })
}

fn operator_from_row(row: &SqliteRow) -> Result<Operator, StoreError> {
    let role: String = row.try_get("role")?;
    let fleets: String = row.try_get("fleets")?;
    Ok(Operator {
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

fn cert_from_row(row: &SqliteRow) -> Result<IssuedCertRecord, StoreError> {
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

fn audit_from_row(row: &SqliteRow) -> Result<AuditRecord, StoreError> {
    let device: Option<String> = row.try_get("device")?;
    Ok(AuditRecord {
        at: from_ts(row.try_get("at")?)?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        device: device.and_then(|d| d.parse().ok()),
        detail: row.try_get("detail")?,
    })
}

async fn device_in_tx(
    tx: &mut Transaction<'static, Sqlite>,
    id: &DeviceId,
) -> Result<Option<Device>, StoreError> {
    sqlx::query("SELECT * FROM devices WHERE uuid = ?")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .as_ref()
        .map(device_from_row)
        .transpose()
}

async fn wg_key_owner(
    tx: &mut Transaction<'static, Sqlite>,
    key: &WgKey,
) -> Result<Option<DeviceId>, StoreError> {
    let owner: Option<String> =
        sqlx::query_scalar("SELECT uuid FROM devices WHERE wg_public_key = ?")
            .bind(key.to_base64())
            .fetch_optional(&mut **tx)
            .await?;
    owner
        .map(|u| {
            u.parse()
                .map_err(|e| StoreError::Corrupt(format!("device uuid {u:?}: {e}")))
        })
        .transpose()
}

async fn insert_cert(
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

/// Takes the next never-used address of the overlay, or `None` when none is left.
async fn allocate_ip(
    tx: &mut Transaction<'static, Sqlite>,
    overlay: Ipv4Net,
) -> Result<Option<Ipv4Addr>, StoreError> {
    let next: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'next_ip_offset'")
        .fetch_one(&mut **tx)
        .await?;
    let offset: u32 = next
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("next_ip_offset {next:?}")))?;
    let Some(ip) = enroll::overlay_address(overlay, offset) else {
        return Ok(None);
    };
    sqlx::query("UPDATE meta SET value = ? WHERE key = 'next_ip_offset'")
        .bind((offset + 1).to_string())
        .execute(&mut **tx)
        .await?;
    Ok(Some(ip))
}

#[async_trait]
impl Registry for SqliteRegistry {
    async fn create_key(&self, key: NewKey) -> Result<ProvisioningKey, StoreError> {
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
        Ok(ProvisioningKey {
            id: key.id,
            fleet: key.fleet,
            uses_left: key.uses,
            expires_at: key.expires_at,
            created_at: key.created_at,
            revoked_at: None,
        })
    }

    async fn find_key(&self, hash: &[u8; 32]) -> Result<Option<ProvisioningKey>, StoreError> {
        sqlx::query("SELECT * FROM provisioning_keys WHERE hash = ?")
            .bind(&hash[..])
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn list_keys(&self) -> Result<Vec<ProvisioningKey>, StoreError> {
        sqlx::query("SELECT * FROM provisioning_keys ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn enroll(
        &self,
        c: EnrollCommit,
    ) -> Result<Result<EnrollOutcome, EnrollRefusal>, StoreError> {
        let mut tx = self.begin().await?;
        let key = sqlx::query("SELECT * FROM provisioning_keys WHERE hash = ?")
            .bind(&c.key_hash[..])
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()?;
        let existing = device_in_tx(&mut tx, &c.device).await?;
        let owner = wg_key_owner(&mut tx, &c.wg_public_key).await?;
        let decision =
            match enroll::decide_enrollment(key.as_ref(), existing.as_ref(), owner.as_ref(), &c) {
                Ok(d) => d,
                Err(refusal) => return Ok(Err(refusal)),
            };
        // `decide_enrollment` returned Ok, so the key exists.
        let Some(key) = key else {
            return Ok(Err(EnrollRefusal::KeyUnknown));
        };
        let now = ts(c.now);
        let outcome = match decision {
            EnrollDecision::Create => {
                let Some(ip) = allocate_ip(&mut tx, self.overlay).await? else {
                    return Ok(Err(EnrollRefusal::AddressPoolExhausted {
                        overlay: self.overlay,
                    }));
                };
                sqlx::query(
                    "INSERT INTO devices(uuid, fleet, wg_public_key, overlay_ip, cert_serial, \
                     cert_public_key, cert_expires_at, created_at, updated_at, key_id, device_type, hostname) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(c.device.to_string())
                .bind(&key.fleet)
                .bind(c.wg_public_key.to_base64())
                .bind(ip_to_db(ip))
                .bind(&c.cert_serial)
                .bind(&c.cert_public_key)
                .bind(ts(c.cert_expires_at))
                .bind(now)
                .bind(now)
                .bind(&key.id)
                .bind(&c.device_type)
                .bind(&c.hostname)
                .execute(&mut *tx)
                .await?;
                if key.uses_left.is_some() {
                    sqlx::query("UPDATE provisioning_keys SET uses_left = uses_left - 1 WHERE id = ? AND uses_left > 0")
                        .bind(&key.id)
                        .execute(&mut *tx)
                        .await?;
                }
                None
            }
            EnrollDecision::Reenroll => {
                sqlx::query(
                    "UPDATE devices SET wg_public_key = ?, cert_serial = ?, cert_public_key = ?, \
                     cert_expires_at = ?, updated_at = ?, \
                     device_type = COALESCE(?, device_type), hostname = COALESCE(?, hostname) \
                     WHERE uuid = ?",
                )
                .bind(c.wg_public_key.to_base64())
                .bind(&c.cert_serial)
                .bind(&c.cert_public_key)
                .bind(ts(c.cert_expires_at))
                .bind(now)
                .bind(&c.device_type)
                .bind(&c.hostname)
                .bind(c.device.to_string())
                .execute(&mut *tx)
                .await?;
                // Some(previous key if it changed): this was a re-enrollment.
                Some(
                    existing
                        .as_ref()
                        .map(|d| d.wg_public_key)
                        .filter(|k| *k != c.wg_public_key),
                )
            }
        };
        insert_cert(
            &mut tx,
            &IssuedCertRecord {
                serial: c.cert_serial.clone(),
                kind: CertKind::Device,
                subject: c.device.to_string(),
                issued_at: c.now,
                expires_at: c.cert_expires_at,
                revoked_at: None,
            },
        )
        .await?;
        let device = device_in_tx(&mut tx, &c.device).await?.ok_or_else(|| {
            StoreError::Inconsistent("device vanished inside its transaction".into())
        })?;
        tx.commit().await?;
        Ok(Ok(match outcome {
            None => EnrollOutcome::Created(device),
            Some(previous_wg_key) => EnrollOutcome::Reenrolled {
                device,
                previous_wg_key,
            },
        }))
    }

    async fn renew(&self, c: RenewCommit) -> Result<Result<Renewed, RenewRefusal>, StoreError> {
        let mut tx = self.begin().await?;
        let existing = device_in_tx(&mut tx, &c.device).await?;
        let owner = match &c.new_wg_public_key {
            Some(k) => wg_key_owner(&mut tx, k).await?,
            None => None,
        };
        let device = match enroll::decide_renewal(existing.as_ref(), owner.as_ref(), &c) {
            Ok(d) => d,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let new_key = c.new_wg_public_key.unwrap_or(device.wg_public_key);
        sqlx::query(
            "UPDATE devices SET wg_public_key = ?, cert_serial = ?, cert_public_key = ?, \
             cert_expires_at = ?, updated_at = ? WHERE uuid = ?",
        )
        .bind(new_key.to_base64())
        .bind(&c.cert_serial)
        .bind(&c.cert_public_key)
        .bind(ts(c.cert_expires_at))
        .bind(ts(c.now))
        .bind(c.device.to_string())
        .execute(&mut *tx)
        .await?;
        insert_cert(
            &mut tx,
            &IssuedCertRecord {
                serial: c.cert_serial.clone(),
                kind: CertKind::Device,
                subject: c.device.to_string(),
                issued_at: c.now,
                expires_at: c.cert_expires_at,
                revoked_at: None,
            },
        )
        .await?;
        let previous_wg_key = Some(device.wg_public_key).filter(|k| *k != new_key);
        let device = device_in_tx(&mut tx, &c.device).await?.ok_or_else(|| {
            StoreError::Inconsistent("device vanished inside its transaction".into())
        })?;
        tx.commit().await?;
        Ok(Ok(Renewed {
            device,
            previous_wg_key,
        }))
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
    ) -> Result<Option<Device>, StoreError> {
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
        let device = device_in_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(device)
    }

    async fn save_presence(&self, presence: &[Presence]) -> Result<(), StoreError> {
        if presence.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for p in presence {
            sqlx::query("UPDATE devices SET last_endpoint = ?, last_seen = ? WHERE uuid = ?")
                .bind(p.endpoint.to_string())
                .bind(ts(p.last_seen))
                .bind(p.device.to_string())
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

    async fn add_operator(&self, op: NewOperator) -> Result<Option<Operator>, StoreError> {
        let fleets =
            serde_json::to_string(&op.fleets).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let done = sqlx::query(
            "INSERT INTO operators(name, role, fleets, created_at, token_hash, token_expires_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING",
        )
        .bind(&op.name)
        .bind(op.role.to_string())
        .bind(fleets)
        .bind(ts(op.now))
        .bind(&op.token_hash[..])
        .bind(ts(op.token_expires_at))
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(Some(Operator {
            name: op.name,
            role: op.role,
            fleets: op.fleets,
            created_at: op.now,
            revoked_at: None,
        }))
    }

    async fn operator(&self, name: &str) -> Result<Option<Operator>, StoreError> {
        sqlx::query("SELECT * FROM operators WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(operator_from_row)
            .transpose()
    }

    async fn operators(&self) -> Result<Vec<Operator>, StoreError> {
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
    ) -> Result<Result<Operator, TokenRefusal>, StoreError> {
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

    async fn revoke_operator(
        &self,
        name: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Operator>, StoreError> {
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
        tx.commit().await?;
        Ok(op)
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
