//! SQLite's statements for the writer of [`crate::commit`]: one IMMEDIATE transaction per
//! group of enrollments and renewals.

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, Transaction};

use crate::commit::{commit_tx, CommitSql, Writer};
use crate::rows::facts_sql;
use crate::StoreError;

static SQL: CommitSql = CommitSql {
    facts: std::sync::LazyLock::new(|| facts_sql("?1", "?2", "?3")),
    // The triggers record the certificate and take the key's use.
    create: "INSERT INTO devices(uuid, fleet, wg_public_key, overlay_ip, cert_serial, \
        cert_public_key, cert_expires_at, created_at, updated_at, key_id, device_type, hostname) \
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11)",
    recertify: "UPDATE devices SET wg_public_key = ?1, cert_serial = ?2, \
        cert_public_key = ?3, cert_expires_at = ?4, updated_at = ?5, device_type = ?6, \
        hostname = ?7 WHERE uuid = ?8",
    reusable_address: "SELECT MIN(d.overlay_ip) FROM devices AS d \
        WHERE d.revoked_at IS NOT NULL AND d.revoked_at <= ?1 AND NOT EXISTS \
        (SELECT 1 FROM devices AS l WHERE l.overlay_ip = d.overlay_ip AND l.revoked_at IS NULL)",
    highest_address_in: "SELECT MAX(overlay_ip) FROM devices WHERE overlay_ip BETWEEN ?1 AND ?2",
    record_change: "INSERT INTO changes(at, kind, subject) VALUES (?1, ?2, ?3)",
};

/// The writer's pool (one connection).
#[derive(Debug, Clone)]
pub(super) struct SqliteWriter(pub SqlitePool);

#[async_trait]
impl Writer for SqliteWriter {
    type Tx = Transaction<'static, Sqlite>;

    async fn begin(&self) -> Result<Self::Tx, StoreError> {
        Ok(self.0.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn commit(tx: Self::Tx) -> Result<(), StoreError> {
        Ok(tx.commit().await?)
    }
}

commit_tx!(Sqlite, SQL);
