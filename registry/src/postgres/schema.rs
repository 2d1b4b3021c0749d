//! The PostgreSQL schema and its forward-only migrations. The columns match SQLite's (whole
//! seconds in BIGINT, addresses as BIGINT, BYTEA for blobs), so one set of row readers
//! serves both. Nodes that start together migrate one at a time (an advisory lock).

use sqlx::PgPool;

use crate::StoreError;

/// The PostgreSQL schema this build reads and writes (numbered on its own: it began at the
/// SQLite schema's version 4).
pub const SCHEMA_VERSION: i64 = 4;

/// Held while migrating, so that nodes starting together do not race.
const MIGRATION_LOCK: i64 = 0x666c_6f74_6f01;

const SCHEMA_V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta(key, value) VALUES ('crl_number', '0'), ('changes_pruned_through', '0');
CREATE TABLE provisioning_keys (
    id         TEXT PRIMARY KEY,
    hash       BYTEA NOT NULL UNIQUE,
    fleet      TEXT NOT NULL,
    uses_left  BIGINT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE devices (
    uuid            TEXT PRIMARY KEY,
    fleet           TEXT NOT NULL,
    wg_public_key   TEXT NOT NULL UNIQUE,
    overlay_ip      BIGINT NOT NULL,
    cert_serial     TEXT NOT NULL,
    cert_public_key BYTEA NOT NULL,
    cert_expires_at BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    revoked_at      BIGINT,
    key_id          TEXT,
    device_type     TEXT,
    hostname        TEXT,
    last_endpoint   TEXT,
    last_seen       BIGINT
);
CREATE INDEX devices_fleet ON devices(fleet);
CREATE INDEX devices_overlay_ip ON devices(overlay_ip);
CREATE UNIQUE INDEX devices_live_overlay_ip ON devices(overlay_ip) WHERE revoked_at IS NULL;
CREATE INDEX devices_revoked ON devices(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE certificates (
    serial     TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    issued_at  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX certificates_subject ON certificates(subject);
CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE operators (
    name                 TEXT PRIMARY KEY,
    role                 TEXT NOT NULL,
    fleets               TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    revoked_at           BIGINT,
    token_hash           BYTEA UNIQUE,
    token_expires_at     BIGINT,
    token_used_at        BIGINT,
    api_token_hash       BYTEA,
    api_token_expires_at BIGINT
);
CREATE UNIQUE INDEX operators_api_token ON operators(api_token_hash) WHERE api_token_hash IS NOT NULL;
CREATE TABLE audit (
    id     BIGSERIAL PRIMARY KEY,
    at     BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    device TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX audit_device ON audit(device, at);
CREATE INDEX audit_actor ON audit(actor, at);
-- The change feed. Writers that append to it hold the registry's write lock until they
-- commit, so sequence numbers become visible in order and a reader that has seen N has
-- seen everything before N.
CREATE TABLE changes (
    seq     BIGSERIAL PRIMARY KEY,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL
);
-- Every certificate a device is given is recorded (for the CRL and revocation), and a new
-- device takes one use of the key that enrolled it: one INSERT or UPDATE of a device is
-- the whole write of an enrollment or renewal, as in SQLite.
CREATE FUNCTION device_certificate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.cert_serial <> OLD.cert_serial THEN
        INSERT INTO certificates(serial, kind, subject, issued_at, expires_at)
            VALUES (NEW.cert_serial, 'device', NEW.uuid, NEW.updated_at, NEW.cert_expires_at);
    END IF;
    IF TG_OP = 'INSERT' THEN
        UPDATE provisioning_keys SET uses_left = uses_left - 1
            WHERE id = NEW.key_id AND uses_left > 0;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER device_certificate AFTER INSERT OR UPDATE OF cert_serial ON devices
    FOR EACH ROW EXECUTE FUNCTION device_certificate();
-- A wake-up for the other nodes, sent at commit: only the number, never the change.
CREATE FUNCTION notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('floto_changes', NEW.seq::text);
    RETURN NULL;
END $$;
CREATE TRIGGER notify_change AFTER INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION notify_change();
"#;

/// Version 2: the cluster's node leases and device sessions (see `crate::cluster`). Times
/// in milliseconds on the database's clock.
const SCHEMA_V2: &str = r#"
CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    address          TEXT NOT NULL,
    started_at       BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);
CREATE TABLE sessions (
    device       TEXT PRIMARY KEY,
    node         TEXT NOT NULL,
    epoch        BIGINT NOT NULL,
    endpoint     TEXT,
    refreshed_at BIGINT NOT NULL
);
CREATE INDEX sessions_node ON sessions(node);
"#;

/// Version 3: the cluster's device events (online, offline, revoked), numbered in the order
/// they became visible (writers hold their own advisory lock), so `GET /v1/events` is the
/// same stream on every node. A statement-level trigger wakes the nodes.
const SCHEMA_V3: &str = r#"
CREATE TABLE events (
    seq        BIGSERIAL PRIMARY KEY,
    device     TEXT NOT NULL,
    fleet      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    generation BIGINT NOT NULL,
    at_ms      BIGINT NOT NULL,
    endpoint   TEXT,
    node       TEXT
);
CREATE FUNCTION notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('floto_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER notify_events AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events();
"#;

/// Version 4: settings per fleet and devices' SSH host keys, as SQLite's version 5.
const SCHEMA_V4: &str = r#"
CREATE TABLE fleets (
    name       TEXT PRIMARY KEY,
    ssh_logins TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- The SSH host keys a device last sent (one per line), whose host certificates it holds.
CREATE TABLE device_ssh (
    uuid       TEXT PRIMARY KEY,
    host_keys  TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
"#;

pub(super) async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = 'meta')",
    )
    .fetch_one(&mut *tx)
    .await?;
    let version: i64 = if exists {
        let v: Option<String> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'")
                .fetch_optional(&mut *tx)
                .await?;
        v.as_deref()
            .unwrap_or("0")
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("schema_version {v:?}")))?
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Inconsistent(format!(
            "the registry has schema version {version}, newer than this server understands \
             ({SCHEMA_VERSION}); run a newer floto-vpn-server"
        )));
    }
    if version < 1 {
        sqlx::raw_sql(SCHEMA_V1).execute(&mut *tx).await?;
    }
    if version < 2 {
        sqlx::raw_sql(SCHEMA_V2).execute(&mut *tx).await?;
    }
    if version < 3 {
        sqlx::raw_sql(SCHEMA_V3).execute(&mut *tx).await?;
    }
    if version < 4 {
        sqlx::raw_sql(SCHEMA_V4).execute(&mut *tx).await?;
    }
    sqlx::query(
        "INSERT INTO meta(key, value) VALUES ('schema_version', $1) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
    )
    .bind(SCHEMA_VERSION.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
