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
use tokio::sync::{mpsc, oneshot};

use floto_proto::admin::{Role, TokenKind};
use floto_proto::{DeviceId, WgKey};

use super::*;
use crate::enroll::{self, EnrollDecision, EnrollRefusal, RenewRefusal};

/// Schema version this code writes. Migrations run forward only.
/// The registry schema this build reads and writes.
pub const SCHEMA_VERSION: i64 = 2;

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
-- Invariants kept by the database itself, so one INSERT or UPDATE of a device is the
-- whole write of an enrollment or renewal:
-- every certificate a device is given is recorded (for the CRL and revocation) ...
CREATE TRIGGER device_certificate_on_insert AFTER INSERT ON devices BEGIN
    INSERT INTO certificates(serial, kind, subject, issued_at, expires_at)
        VALUES (NEW.cert_serial, 'device', NEW.uuid, NEW.updated_at, NEW.cert_expires_at);
    -- ... and a new device takes one use of the key that enrolled it.
    UPDATE provisioning_keys SET uses_left = uses_left - 1
        WHERE id = NEW.key_id AND uses_left > 0;
END;
CREATE TRIGGER device_certificate_on_update AFTER UPDATE OF cert_serial ON devices
    WHEN NEW.cert_serial <> OLD.cert_serial BEGIN
    INSERT INTO certificates(serial, kind, subject, issued_at, expires_at)
        VALUES (NEW.cert_serial, 'device', NEW.uuid, NEW.updated_at, NEW.cert_expires_at);
END;
-- Device rows are never deleted (revocation keeps them), so the next address is the
-- highest one given out plus one, and no address is ever given out twice.
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

/// Version 2: API tokens for viewers (machine clients).
const SCHEMA_V2: &str = r#"
ALTER TABLE operators ADD COLUMN api_token_hash BLOB;
ALTER TABLE operators ADD COLUMN api_token_expires_at INTEGER;
CREATE UNIQUE INDEX operators_api_token ON operators(api_token_hash) WHERE api_token_hash IS NOT NULL;
"#;

/// Enrollments and renewals committed together at most.
const MAX_BATCH: usize = 256;

/// What a snapshot of the registry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub schema_version: i64,
    /// Enrolled, unrevoked devices.
    pub devices: u64,
}

/// Writes a consistent copy of the registry at `db` to `to` (which must not exist) with
/// `VACUUM INTO`: one read transaction, so a running server's concurrent writes are either
/// all in it or not at all. Never writes to `db`.
pub async fn snapshot(db: &Path, to: &Path) -> Result<SnapshotInfo, StoreError> {
    let opts = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(30));
    let mut conn = sqlx::ConnectOptions::connect(&opts).await?;
    sqlx::query("VACUUM INTO ?")
        .bind(to.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await?;
    sqlx::Connection::close(conn).await?;
    inspect(to).await
}

/// The schema version and device count of the registry at `db`, read without migrating.
pub async fn inspect(db: &Path) -> Result<SnapshotInfo, StoreError> {
    let opts = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(false)
        .read_only(true);
    let mut conn = sqlx::ConnectOptions::connect(&opts).await?;
    let schema_version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut conn)
        .await?;
    let devices: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE revoked_at IS NULL")
        .fetch_one(&mut conn)
        .await?;
    sqlx::Connection::close(conn).await?;
    Ok(SnapshotInfo {
        schema_version,
        devices: devices.max(0) as u64,
    })
}

/// The SQLite registry.
#[derive(Debug, Clone)]
pub struct SqliteRegistry {
    writer: SqlitePool,
    reader: SqlitePool,
    overlay: Ipv4Net,
    /// Enrollments and renewals, committed in groups by [`group_commit`].
    jobs: mpsc::Sender<Job>,
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
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(group_commit(writer.clone(), overlay, queue));
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
    if version < 2 {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(SCHEMA_V2).execute(&mut *tx).await?;
        sqlx::raw_sql("PRAGMA user_version = 2")
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
    device_from_prefixed(row, "")
}

/// A device from columns named `{prefix}{column}`.
fn device_from_prefixed(row: &SqliteRow, prefix: &str) -> Result<Device, StoreError> {
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

fn key_from_row(row: &SqliteRow) -> Result<ProvisioningKey, StoreError> {
    key_from_prefixed(row, "")
}

fn key_from_prefixed(row: &SqliteRow, prefix: &str) -> Result<ProvisioningKey, StoreError> {
    let col = |name: &str| format!("{prefix}{name}");
    let uses: Option<i64> = row.try_get(col("uses_left").as_str())?;
    Ok(ProvisioningKey {
        id: row.try_get(col("id").as_str())?,
        fleet: row.try_get(col("fleet").as_str())?,
        uses_left: uses.map(|u| u.clamp(0, i64::from(u32::MAX)) as u32),
        expires_at: opt_ts(row.try_get(col("expires_at").as_str())?)?,
        created_at: from_ts(row.try_get(col("created_at").as_str())?)?,
        revoked_at: opt_ts(row.try_get(col("revoked_at").as_str())?)?,
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

const DEVICE_COLUMNS: [&str; 15] = [
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
const KEY_COLUMNS: [&str; 6] = [
    "id",
    "fleet",
    "uses_left",
    "expires_at",
    "created_at",
    "revoked_at",
];

/// One query for every fact an enrollment or renewal decides on: the key (?1, by hash),
/// the device (?2, by UUID), the holder of the WireGuard key (?3), and the highest address
/// given out so far.
static FACTS_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut cols: Vec<String> = KEY_COLUMNS
        .iter()
        .map(|c| format!("k.{c} AS k_{c}"))
        .collect();
    cols.extend(DEVICE_COLUMNS.iter().map(|c| format!("d.{c} AS d_{c}")));
    format!(
        "SELECT {}, o.uuid AS owner, (SELECT MAX(overlay_ip) FROM devices) AS max_ip \
         FROM (SELECT 1) AS one \
         LEFT JOIN provisioning_keys AS k ON k.hash = ?1 \
         LEFT JOIN devices AS d ON d.uuid = ?2 \
         LEFT JOIN devices AS o ON o.wg_public_key = ?3",
        cols.join(", ")
    )
});

/// A new device (the triggers record its certificate and take its key's use).
const CREATE_SQL: &str =
    "INSERT INTO devices(uuid, fleet, wg_public_key, overlay_ip, cert_serial, \
    cert_public_key, cert_expires_at, created_at, updated_at, key_id, device_type, hostname) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11)";

/// A new certificate (and maybe WireGuard key) for an existing device (the trigger records
/// the certificate).
const RECERTIFY_SQL: &str = "UPDATE devices SET wg_public_key = ?1, cert_serial = ?2, \
    cert_public_key = ?3, cert_expires_at = ?4, updated_at = ?5, device_type = ?6, hostname = ?7 \
    WHERE uuid = ?8";

struct Facts {
    key: Option<ProvisioningKey>,
    device: Option<Device>,
    owner: Option<DeviceId>,
    /// The highest overlay address given out, if any.
    max_ip: Option<Ipv4Addr>,
}

async fn facts(
    tx: &mut Transaction<'static, Sqlite>,
    key_hash: Option<&[u8; 32]>,
    device: &DeviceId,
    wg_key: Option<&WgKey>,
) -> Result<Facts, StoreError> {
    let row = sqlx::query(&FACTS_SQL)
        .bind(key_hash.map(|h| h.to_vec()))
        .bind(device.to_string())
        .bind(wg_key.map(WgKey::to_base64))
        .fetch_one(&mut **tx)
        .await?;
    let key_id: Option<String> = row.try_get("k_id")?;
    let device_uuid: Option<String> = row.try_get("d_uuid")?;
    let owner: Option<String> = row.try_get("owner")?;
    let max_ip: Option<i64> = row.try_get("max_ip")?;
    Ok(Facts {
        key: key_id.map(|_| key_from_prefixed(&row, "k_")).transpose()?,
        device: device_uuid
            .map(|_| device_from_prefixed(&row, "d_"))
            .transpose()?,
        owner: owner
            .map(|u| {
                u.parse()
                    .map_err(|e| StoreError::Corrupt(format!("device uuid {u:?}: {e}")))
            })
            .transpose()?,
        max_ip: max_ip.map(ip_from_db),
    })
}

/// Timestamps are stored in whole seconds; the rows we return say what a read would.
fn whole_seconds(t: OffsetDateTime) -> Result<OffsetDateTime, StoreError> {
    from_ts(ts(t))
}

async fn enroll_in(
    tx: &mut Transaction<'static, Sqlite>,
    overlay: Ipv4Net,
    c: &EnrollCommit,
) -> Result<Result<EnrollOutcome, EnrollRefusal>, StoreError> {
    let f = facts(tx, Some(&c.key_hash), &c.device, Some(&c.wg_public_key)).await?;
    let decision =
        match enroll::decide_enrollment(f.key.as_ref(), f.device.as_ref(), f.owner.as_ref(), c) {
            Ok(d) => d,
            Err(refusal) => return Ok(Err(refusal)),
        };
    let (Some(key), now) = (f.key, whole_seconds(c.now)?) else {
        return Ok(Err(EnrollRefusal::KeyUnknown));
    };
    let expires = whole_seconds(c.cert_expires_at)?;
    match (decision, f.device) {
        (EnrollDecision::Create, _) => {
            let Some(ip) = enroll::next_overlay_address(overlay, f.max_ip) else {
                return Ok(Err(EnrollRefusal::AddressPoolExhausted { overlay }));
            };
            sqlx::query(CREATE_SQL)
                .bind(c.device.to_string())
                .bind(&key.fleet)
                .bind(c.wg_public_key.to_base64())
                .bind(ip_to_db(ip))
                .bind(&c.cert_serial)
                .bind(&c.cert_public_key)
                .bind(ts(expires))
                .bind(ts(now))
                .bind(&key.id)
                .bind(&c.device_type)
                .bind(&c.hostname)
                .execute(&mut **tx)
                .await?;
            Ok(Ok(EnrollOutcome::Created(Device {
                id: c.device,
                fleet: key.fleet,
                wg_public_key: c.wg_public_key,
                overlay_ip: ip,
                cert_serial: c.cert_serial.clone(),
                cert_public_key: c.cert_public_key.clone(),
                cert_expires_at: expires,
                created_at: now,
                updated_at: now,
                revoked_at: None,
                key_id: Some(key.id),
                device_type: c.device_type.clone(),
                hostname: c.hostname.clone(),
                last_endpoint: None,
                last_seen: None,
            })))
        }
        (EnrollDecision::Reenroll, Some(existing)) => {
            let previous_wg_key = Some(existing.wg_public_key).filter(|k| *k != c.wg_public_key);
            let device = Device {
                wg_public_key: c.wg_public_key,
                cert_serial: c.cert_serial.clone(),
                cert_public_key: c.cert_public_key.clone(),
                cert_expires_at: expires,
                updated_at: now,
                device_type: c.device_type.clone().or(existing.device_type.clone()),
                hostname: c.hostname.clone().or(existing.hostname.clone()),
                ..existing
            };
            recertify(tx, &device).await?;
            Ok(Ok(EnrollOutcome::Reenrolled {
                device,
                previous_wg_key,
            }))
        }
        (EnrollDecision::Reenroll, None) => Err(StoreError::Inconsistent(
            "re-enrollment decided for a device that is not there".into(),
        )),
    }
}

async fn recertify(tx: &mut Transaction<'static, Sqlite>, d: &Device) -> Result<(), StoreError> {
    sqlx::query(RECERTIFY_SQL)
        .bind(d.wg_public_key.to_base64())
        .bind(&d.cert_serial)
        .bind(&d.cert_public_key)
        .bind(ts(d.cert_expires_at))
        .bind(ts(d.updated_at))
        .bind(&d.device_type)
        .bind(&d.hostname)
        .bind(d.id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn renew_in(
    tx: &mut Transaction<'static, Sqlite>,
    c: &RenewCommit,
) -> Result<Result<Renewed, RenewRefusal>, StoreError> {
    let f = facts(tx, None, &c.device, c.new_wg_public_key.as_ref()).await?;
    let before = match enroll::decide_renewal(f.device.as_ref(), f.owner.as_ref(), c) {
        Ok(d) => d.clone(),
        Err(refusal) => return Ok(Err(refusal)),
    };
    let new_key = c.new_wg_public_key.unwrap_or(before.wg_public_key);
    let device = Device {
        wg_public_key: new_key,
        cert_serial: c.cert_serial.clone(),
        cert_public_key: c.cert_public_key.clone(),
        cert_expires_at: whole_seconds(c.cert_expires_at)?,
        updated_at: whole_seconds(c.now)?,
        ..before.clone()
    };
    recertify(tx, &device).await?;
    Ok(Ok(Renewed {
        previous_wg_key: Some(before.wg_public_key).filter(|k| *k != new_key),
        device,
    }))
}

type EnrollResult = Result<Result<EnrollOutcome, EnrollRefusal>, StoreError>;
type RenewResult = Result<Result<Renewed, RenewRefusal>, StoreError>;

/// An enrollment or renewal waiting for the writer.
enum Job {
    Enroll(EnrollCommit, oneshot::Sender<EnrollResult>),
    Renew(RenewCommit, oneshot::Sender<RenewResult>),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Enroll(c, _) => write!(f, "Enroll({})", c.device),
            Job::Renew(c, _) => write!(f, "Renew({})", c.device),
        }
    }
}

/// A job's result, before it is sent back.
enum Done {
    Enroll(Result<EnrollOutcome, EnrollRefusal>),
    Renew(Result<Renewed, RenewRefusal>),
}

/// The writer: takes every job that is waiting (up to [`MAX_BATCH`]), runs them one after
/// the other in one IMMEDIATE transaction, commits once, and answers each. Jobs in a batch
/// see each other's writes, so races are decided exactly as if each had its own
/// transaction; one fsync serves the batch. If the batch fails, each job is retried alone
/// so that one bad job cannot fail the others.
async fn group_commit(pool: SqlitePool, overlay: Ipv4Net, mut queue: mpsc::Receiver<Job>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match run_batch(&pool, overlay, &batch).await {
            Ok(done) => {
                for (job, result) in batch.into_iter().zip(done) {
                    reply(job, Ok(result));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(job) = batch.pop() {
                    reply(job, Err(e));
                }
            }
            Err(_) => {
                for job in batch {
                    let one = std::slice::from_ref(&job);
                    let result = run_batch(&pool, overlay, one)
                        .await
                        .map(|mut d| {
                            d.pop()
                                .ok_or_else(|| StoreError::Inconsistent("empty batch".into()))
                        })
                        .and_then(|r| r);
                    reply(job, result);
                }
            }
        }
    }
}

async fn run_batch(
    pool: &SqlitePool,
    overlay: Ipv4Net,
    batch: &[Job],
) -> Result<Vec<Done>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        done.push(match job {
            Job::Enroll(c, _) => Done::Enroll(enroll_in(&mut tx, overlay, c).await?),
            Job::Renew(c, _) => Done::Renew(renew_in(&mut tx, c).await?),
        });
    }
    tx.commit().await?;
    Ok(done)
}

fn reply(job: Job, result: Result<Done, StoreError>) {
    // A caller that went away no longer needs its answer; the commit stands.
    match (job, result) {
        (Job::Enroll(_, tx), Ok(Done::Enroll(r))) => {
            let _ = tx.send(Ok(r));
        }
        (Job::Renew(_, tx), Ok(Done::Renew(r))) => {
            let _ = tx.send(Ok(r));
        }
        (Job::Enroll(_, tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Job::Renew(_, tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Job::Enroll(_, tx), Ok(_)) => {
            let _ = tx.send(Err(StoreError::Inconsistent(
                "mismatched job result".into(),
            )));
        }
        (Job::Renew(_, tx), Ok(_)) => {
            let _ = tx.send(Err(StoreError::Inconsistent(
                "mismatched job result".into(),
            )));
        }
    }
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

    async fn enroll(&self, c: EnrollCommit) -> EnrollResult {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Enroll(c, tx))
            .await
            .map_err(|_| StoreError::Inconsistent("the registry writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Inconsistent("the registry writer stopped".into()))?
    }

    async fn renew(&self, c: RenewCommit) -> RenewResult {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Renew(c, tx))
            .await
            .map_err(|_| StoreError::Inconsistent("the registry writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Inconsistent("the registry writer stopped".into()))?
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
        let device = sqlx::query("SELECT * FROM devices WHERE uuid = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()?;
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

    async fn operator_by_api_token(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<Operator, TokenRefusal>, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn commit(key: [u8; 32], device: DeviceId, wg: u8, now: OffsetDateTime) -> EnrollCommit {
        EnrollCommit {
            key_hash: key,
            device,
            wg_public_key: WgKey([wg; 32]),
            cert_serial: format!("{:032x}", rand::random::<u128>()),
            cert_public_key: vec![wg],
            cert_expires_at: now + Duration::from_secs(3600),
            device_type: None,
            hostname: None,
            now,
        }
    }

    async fn registry(overlay: &str) -> (tempfile::TempDir, SqliteRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let r = SqliteRegistry::open(&dir.path().join("db"), overlay.parse().unwrap())
            .await
            .unwrap();
        (dir, r)
    }

    async fn key(r: &SqliteRegistry, hash: u8, uses: Option<u32>, now: OffsetDateTime) {
        r.create_key(NewKey {
            id: format!("k{hash}"),
            hash: [hash; 32],
            fleet: "lab".into(),
            uses,
            expires_at: None,
            created_at: now,
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn enrollment_records_certificate_takes_a_use_and_allocates_in_order() {
        let (_d, r) = registry("10.240.0.0/16").await;
        let now = OffsetDateTime::now_utc();
        key(&r, 1, Some(2), now).await;
        let a = r
            .enroll(commit([1; 32], DeviceId::new_random(), 1, now))
            .await
            .unwrap()
            .unwrap();
        let b = r
            .enroll(commit([1; 32], DeviceId::new_random(), 2, now))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(b.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 3));
        // What enroll returned is what a read says.
        assert_eq!(
            r.device(&a.device().id).await.unwrap().as_ref(),
            Some(a.device())
        );
        assert_eq!(r.list_keys().await.unwrap()[0].uses_left, Some(0));
        assert_eq!(
            r.enroll(commit([1; 32], DeviceId::new_random(), 3, now))
                .await
                .unwrap(),
            Err(EnrollRefusal::KeyUsedUp)
        );
        // The triggers recorded both certificates; revocation marks them.
        r.revoke_device(&a.device().id, now).await.unwrap();
        let revoked = r.revoked_certificates(now).await.unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, a.device().cert_serial);
        // A revoked device keeps its address: the next device gets a new one.
        key(&r, 2, None, now).await;
        let c = r
            .enroll(commit([2; 32], DeviceId::new_random(), 4, now))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 4));
    }

    #[tokio::test]
    async fn reenrollment_keeps_the_address_and_records_the_new_certificate() {
        let (_d, r) = registry("10.240.0.0/16").await;
        let now = OffsetDateTime::now_utc();
        key(&r, 1, Some(1), now).await;
        let id = DeviceId::new_random();
        let first = r
            .enroll(commit([1; 32], id, 1, now))
            .await
            .unwrap()
            .unwrap();
        let mut again = commit([1; 32], id, 9, now);
        again.cert_public_key = vec![1]; // the same device key
        let second = r.enroll(again.clone()).await.unwrap().unwrap();
        match &second {
            EnrollOutcome::Reenrolled {
                device,
                previous_wg_key,
            } => {
                assert_eq!(device.overlay_ip, first.device().overlay_ip);
                assert_eq!(device.wg_public_key, WgKey([9; 32]));
                assert_eq!(*previous_wg_key, Some(WgKey([1; 32])));
            }
            other => panic!("expected a re-enrollment, got {other:?}"),
        }
        assert_eq!(r.device(&id).await.unwrap().as_ref(), Some(second.device()));
        r.revoke_device(&id, now).await.unwrap();
        assert_eq!(r.revoked_certificates(now).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_full_overlay_is_refused_without_writing() {
        let (_d, r) = registry("10.240.0.0/30").await;
        let now = OffsetDateTime::now_utc();
        key(&r, 1, None, now).await;
        r.enroll(commit([1; 32], DeviceId::new_random(), 1, now))
            .await
            .unwrap()
            .unwrap();
        let refused = r
            .enroll(commit([1; 32], DeviceId::new_random(), 2, now))
            .await
            .unwrap();
        assert!(matches!(
            refused,
            Err(EnrollRefusal::AddressPoolExhausted { .. })
        ));
        assert_eq!(r.count_devices().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn concurrent_jobs_in_one_batch_see_each_other() {
        let (_d, r) = registry("10.240.0.0/16").await;
        let r = Arc::new(r);
        let now = OffsetDateTime::now_utc();
        key(&r, 1, Some(1), now).await;
        key(&r, 2, None, now).await;
        let same = DeviceId::new_random();
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                // Half race for the last use of key 1, half for one UUID under key 2.
                if i % 2 == 0 {
                    r.enroll(commit([1; 32], DeviceId::new_random(), i + 1, now))
                        .await
                } else {
                    r.enroll(commit([2; 32], same, i + 1, now)).await
                }
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap().unwrap());
        }
        let created = results
            .iter()
            .filter(|r| matches!(r, Ok(EnrollOutcome::Created(_))))
            .count();
        let used_up = results
            .iter()
            .filter(|r| matches!(r, Err(EnrollRefusal::KeyUsedUp)))
            .count();
        let held = results
            .iter()
            .filter(|r| matches!(r, Err(EnrollRefusal::UuidHeldByAnotherKey)))
            .count();
        assert_eq!(created, 2, "one winner per race");
        assert_eq!(used_up, 31);
        assert_eq!(held, 31);
        let ips: std::collections::HashSet<_> = r
            .devices()
            .await
            .unwrap()
            .iter()
            .map(|d| d.overlay_ip)
            .collect();
        assert_eq!(ips.len(), 2);
    }

    #[tokio::test]
    async fn one_failing_job_does_not_fail_its_batch() {
        let (_d, r) = registry("10.240.0.0/16").await;
        let r = Arc::new(r);
        let now = OffsetDateTime::now_utc();
        key(&r, 1, None, now).await;
        // A certificate serial that is already recorded makes the trigger's INSERT fail.
        let first = r
            .enroll(commit([1; 32], DeviceId::new_random(), 1, now))
            .await
            .unwrap()
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let r = r.clone();
            let mut c = commit([1; 32], DeviceId::new_random(), i + 10, now);
            if i == 7 {
                c.cert_serial = first.device().cert_serial.clone();
            }
            tasks.push(tokio::spawn(async move { (i, r.enroll(c).await) }));
        }
        for t in tasks {
            let (i, result) = t.await.unwrap();
            if i == 7 {
                assert!(matches!(result, Err(StoreError::Database(_))), "{result:?}");
            } else {
                assert!(
                    matches!(result, Ok(Ok(EnrollOutcome::Created(_)))),
                    "{i}: {result:?}"
                );
            }
        }
        assert_eq!(r.count_devices().await.unwrap(), 16);
    }

    #[tokio::test]
    async fn login_tokens_are_single_use_and_expire() {
        let (_d, r) = registry("10.240.0.0/16").await;
        let now = OffsetDateTime::now_utc();
        let op = |name: &str, hash: u8, expires: OffsetDateTime| NewOperator {
            name: name.into(),
            role: Role::Operator,
            fleets: vec!["lab".into()],
            token_kind: TokenKind::Login,
            token_hash: [hash; 32],
            token_expires_at: Some(expires),
            now,
        };
        assert!(r
            .add_operator(op("alice", 1, now + Duration::from_secs(60)))
            .await
            .unwrap()
            .is_some());
        assert!(
            r.add_operator(op("alice", 2, now)).await.unwrap().is_none(),
            "names are unique"
        );
        assert!(r.add_operator(op("bob", 3, now)).await.unwrap().is_some());
        assert_eq!(
            r.consume_login_token(&[1; 32], now)
                .await
                .unwrap()
                .unwrap()
                .name,
            "alice"
        );
        assert_eq!(
            r.consume_login_token(&[1; 32], now).await.unwrap(),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            r.consume_login_token(&[3; 32], now).await.unwrap(),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            r.consume_login_token(&[9; 32], now).await.unwrap(),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            r.operator("alice").await.unwrap().unwrap().fleets,
            vec!["lab".to_owned()]
        );
    }

    #[tokio::test]
    async fn a_registry_from_another_overlay_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let now = OffsetDateTime::now_utc();
        {
            let r = SqliteRegistry::open(&path, "10.240.0.0/16".parse().unwrap())
                .await
                .unwrap();
            key(&r, 1, None, now).await;
            r.enroll(commit([1; 32], DeviceId::new_random(), 1, now))
                .await
                .unwrap()
                .unwrap();
            r.close().await;
        }
        let err = SqliteRegistry::open(&path, "10.9.0.0/16".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("outside the configured overlay"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn api_tokens_identify_viewers_until_they_expire_or_are_revoked() {
        let (_d, r) = registry("10.240.0.0/16").await;
        let now = OffsetDateTime::now_utc();
        let viewer = |name: &str, hash: u8, expires: Option<OffsetDateTime>| NewOperator {
            name: name.into(),
            role: Role::Viewer,
            fleets: Vec::new(),
            token_kind: TokenKind::Api,
            token_hash: [hash; 32],
            token_expires_at: expires,
            now,
        };
        r.add_operator(viewer("prometheus", 1, None)).await.unwrap();
        r.add_operator(viewer("old", 2, Some(now - Duration::from_secs(1))))
            .await
            .unwrap();
        // An API token is not a login token, and is not used up by use.
        assert_eq!(
            r.consume_login_token(&[1; 32], now).await.unwrap(),
            Err(TokenRefusal::Unknown)
        );
        for _ in 0..2 {
            let op = r
                .operator_by_api_token(&[1; 32], now)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(op.name, "prometheus");
        }
        assert_eq!(
            r.operator_by_api_token(&[2; 32], now).await.unwrap(),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            r.operator_by_api_token(&[3; 32], now).await.unwrap(),
            Err(TokenRefusal::Unknown)
        );
        r.revoke_operator("prometheus", now).await.unwrap();
        assert_eq!(
            r.operator_by_api_token(&[1; 32], now).await.unwrap(),
            Err(TokenRefusal::OperatorRevoked)
        );
    }

    #[tokio::test]
    async fn a_version_1_registry_is_migrated_forward_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // A version-1 registry as a server of that version left it.
        {
            let opts = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .unwrap();
            sqlx::raw_sql(SCHEMA_V1).execute(&pool).await.unwrap();
            sqlx::raw_sql(
                "INSERT INTO meta(key, value) VALUES ('crl_number', '0'); \
                 INSERT INTO operators(name, role, fleets, created_at) VALUES ('admin', 'admin', '[]', 0); \
                 PRAGMA user_version = 1;",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let r = SqliteRegistry::open(&path, "10.240.0.0/16".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(
            r.operator("admin").await.unwrap().unwrap().role,
            Role::Admin
        );
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&r.reader)
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // A registry from a newer server is refused, not misread.
        sqlx::raw_sql("PRAGMA user_version = 99")
            .execute(&r.writer)
            .await
            .unwrap();
        r.close().await;
        let err = SqliteRegistry::open(&path, "10.240.0.0/16".parse().unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("newer than this server"), "{err}");
    }
}
