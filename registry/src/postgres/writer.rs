//! PostgreSQL's statements for the writer of [`crate::commit`], and the registry's write
//! lock: a transaction-level advisory lock that every write touching shared decisions or
//! the change feed takes first and holds until it commits.

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;

use floto_proto::{DeviceId, WgKey};

use crate::commit::{CommitTx, Writer};
use crate::rows::{facts_sql, ip_to_db, ts, Facts};
use crate::{ChangeKind, Device, StoreError};

/// The advisory lock key of the registry's writes.
const WRITE_LOCK: i64 = 0x666c_6f74_6f02;

static FACTS_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| facts_sql("$1", "$2", "$3"));

/// A new device (the trigger records its certificate and takes its key's use).
const CREATE_SQL: &str =
    "INSERT INTO devices(uuid, fleet, wg_public_key, overlay_ip, cert_serial, \
    cert_public_key, cert_expires_at, created_at, updated_at, key_id, device_type, hostname) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11)";

/// A new certificate (and maybe WireGuard key) for an existing device.
const RECERTIFY_SQL: &str = "UPDATE devices SET wg_public_key = $1, cert_serial = $2, \
    cert_public_key = $3, cert_expires_at = $4, updated_at = $5, device_type = $6, hostname = $7 \
    WHERE uuid = $8";

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

#[async_trait]
impl CommitTx for Transaction<'static, Postgres> {
    async fn facts(
        &mut self,
        key_hash: Option<&[u8; 32]>,
        device: &DeviceId,
        wg_key: Option<&WgKey>,
    ) -> Result<Facts, StoreError> {
        let row = sqlx::query(&FACTS_SQL)
            .bind(key_hash.map(|h| h.to_vec()))
            .bind(device.to_string())
            .bind(wg_key.map(WgKey::to_base64))
            .fetch_one(&mut **self)
            .await?;
        Facts::from_row(&row)
    }

    async fn insert_device(&mut self, d: &Device) -> Result<(), StoreError> {
        sqlx::query(CREATE_SQL)
            .bind(d.id.to_string())
            .bind(&d.fleet)
            .bind(d.wg_public_key.to_base64())
            .bind(ip_to_db(d.overlay_ip))
            .bind(&d.cert_serial)
            .bind(&d.cert_public_key)
            .bind(ts(d.cert_expires_at))
            .bind(ts(d.created_at))
            .bind(&d.key_id)
            .bind(&d.device_type)
            .bind(&d.hostname)
            .execute(&mut **self)
            .await?;
        Ok(())
    }

    async fn recertify(&mut self, d: &Device) -> Result<(), StoreError> {
        sqlx::query(RECERTIFY_SQL)
            .bind(d.wg_public_key.to_base64())
            .bind(&d.cert_serial)
            .bind(&d.cert_public_key)
            .bind(ts(d.cert_expires_at))
            .bind(ts(d.updated_at))
            .bind(&d.device_type)
            .bind(&d.hostname)
            .bind(d.id.to_string())
            .execute(&mut **self)
            .await?;
        Ok(())
    }

    async fn reusable_address(
        &mut self,
        cutoff: OffsetDateTime,
    ) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(d.overlay_ip) FROM devices AS d \
             WHERE d.revoked_at IS NOT NULL AND d.revoked_at <= $1 AND NOT EXISTS \
             (SELECT 1 FROM devices AS l WHERE l.overlay_ip = d.overlay_ip AND l.revoked_at IS NULL)",
        )
        .bind(ts(cutoff))
        .fetch_one(&mut **self)
        .await?)
    }

    async fn record_change(
        &mut self,
        kind: ChangeKind,
        subject: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO changes(at, kind, subject) VALUES ($1, $2, $3)")
            .bind(ts(at))
            .bind(kind.as_str())
            .bind(subject)
            .execute(&mut **self)
            .await?;
        Ok(())
    }
}
