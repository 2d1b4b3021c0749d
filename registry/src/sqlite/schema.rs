//! The SQLite schema, its forward-only migrations, and consistent snapshots for backups.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

use crate::StoreError;

/// The registry schema this build reads and writes. Migrations run forward only.
pub const SCHEMA_VERSION: i64 = 5;

pub(super) const SCHEMA_V1: &str = r#"
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

/// Version 3: an overlay address is unique among live devices only, so that the address of
/// a device revoked long enough ago can be given again when no fresh one is left. SQLite
/// cannot drop a column's UNIQUE, so the table is rebuilt (its triggers with it).
const SCHEMA_V3: &str = r#"
CREATE TABLE devices_v3 (
    uuid            TEXT PRIMARY KEY,
    fleet           TEXT NOT NULL,
    wg_public_key   TEXT NOT NULL UNIQUE,
    overlay_ip      INTEGER NOT NULL,
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
INSERT INTO devices_v3 (uuid, fleet, wg_public_key, overlay_ip, cert_serial, cert_public_key,
    cert_expires_at, created_at, updated_at, revoked_at, key_id, device_type, hostname,
    last_endpoint, last_seen)
SELECT uuid, fleet, wg_public_key, overlay_ip, cert_serial, cert_public_key,
    cert_expires_at, created_at, updated_at, revoked_at, key_id, device_type, hostname,
    last_endpoint, last_seen FROM devices;
DROP TABLE devices;
ALTER TABLE devices_v3 RENAME TO devices;
CREATE INDEX devices_fleet ON devices(fleet);
CREATE INDEX devices_overlay_ip ON devices(overlay_ip);
CREATE UNIQUE INDEX devices_live_overlay_ip ON devices(overlay_ip) WHERE revoked_at IS NULL;
CREATE INDEX devices_revoked ON devices(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TRIGGER device_certificate_on_insert AFTER INSERT ON devices BEGIN
    INSERT INTO certificates(serial, kind, subject, issued_at, expires_at)
        VALUES (NEW.cert_serial, 'device', NEW.uuid, NEW.updated_at, NEW.cert_expires_at);
    UPDATE provisioning_keys SET uses_left = uses_left - 1
        WHERE id = NEW.key_id AND uses_left > 0;
END;
CREATE TRIGGER device_certificate_on_update AFTER UPDATE OF cert_serial ON devices
    WHEN NEW.cert_serial <> OLD.cert_serial BEGIN
    INSERT INTO certificates(serial, kind, subject, issued_at, expires_at)
        VALUES (NEW.cert_serial, 'device', NEW.uuid, NEW.updated_at, NEW.cert_expires_at);
END;
"#;

/// Version 4: the change feed. Every write a running server must follow appends a row in
/// its own transaction; SQLite's single writer makes sequence order commit order.
const SCHEMA_V4: &str = r#"
CREATE TABLE changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL
);
INSERT INTO meta(key, value) VALUES ('changes_pruned_through', '0');
"#;

/// Version 5: settings per fleet (the SSH logins operators may use; comma-separated), and
/// the SSH host keys of devices.
const SCHEMA_V5: &str = r#"
CREATE TABLE fleets (
    name       TEXT PRIMARY KEY,
    ssh_logins TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
-- The SSH host keys a device last sent (one per line), whose host certificates it holds.
CREATE TABLE device_ssh (
    uuid       TEXT PRIMARY KEY,
    host_keys  TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"#;

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

pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
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
    // Each later version in its own transaction, so that a failed step leaves the last
    // good version in place.
    for (to, sql) in [
        (2, SCHEMA_V2),
        (3, SCHEMA_V3),
        (4, SCHEMA_V4),
        (5, SCHEMA_V5),
    ] {
        if version < to {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            let pragma = format!("PRAGMA user_version = {to}");
            sqlx::raw_sql(&pragma).execute(&mut *tx).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}
