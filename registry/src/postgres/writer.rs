//! PostgreSQL's statements for the writer of [`crate::commit`], and the registry's write
//! lock: a transaction-level advisory lock that every write touching shared decisions or
//! the change feed takes first and holds until it commits.

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use crate::commit::{commit_tx, CommitSql, Writer};
use crate::rows::facts_sql;
use crate::StoreError;

/// The advisory lock key of the registry's writes.
const WRITE_LOCK: i64 = 0x666c_6f74_6f02;

static SQL: CommitSql = CommitSql {
    facts: std::sync::LazyLock::new(|| facts_sql("$1", "$2", "$3")),
    // The trigger records the certificate and takes the key's use.
    create: "INSERT INTO devices(uuid, fleet, wg_public_key, overlay_ip, cert_serial, \
        cert_public_key, cert_expires_at, created_at, updated_at, key_id, device_type, hostname) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11)",
    recertify: "UPDATE devices SET wg_public_key = $1, cert_serial = $2, \
        cert_public_key = $3, cert_expires_at = $4, updated_at = $5, device_type = $6, \
        hostname = $7 WHERE uuid = $8",
    reusable_address: "SELECT MIN(d.overlay_ip) FROM devices AS d \
        WHERE d.revoked_at IS NOT NULL AND d.revoked_at <= $1 AND NOT EXISTS \
        (SELECT 1 FROM devices AS l WHERE l.overlay_ip = d.overlay_ip AND l.revoked_at IS NULL)",
    highest_address_in: "SELECT MAX(overlay_ip) FROM devices WHERE overlay_ip BETWEEN $1 AND $2",
    record_change: "INSERT INTO changes(at, kind, subject) VALUES ($1, $2, $3)",
};

/// Begins a transaction holding the registry's write lock: writers on every node run one
/// after the other, as SQLite's one writer does.
pub(super) async fn begin_locked(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

#[derive(Debug, Clone)]
pub(super) struct PgWriter(pub PgPool);

#[async_trait]
impl Writer for PgWriter {
    type Tx = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx, StoreError> {
        begin_locked(&self.0).await
    }

    async fn commit(tx: Self::Tx) -> Result<(), StoreError> {
        Ok(tx.commit().await?)
    }
}

commit_tx!(Postgres, SQL);
