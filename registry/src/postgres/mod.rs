//! The PostgreSQL registry, for several nodes on one database (`--database-url
//! postgres://...`). Every write that decides on shared facts (enrollment, renewal, a
//! revocation: anything that appends to the change feed) holds one transaction-level
//! advisory lock until it commits, so the cluster decides races exactly as SQLite's single
//! writer does, and the feed's sequence numbers become visible in order. Reads use the
//! pool freely. Other nodes' changes arrive as `LISTEN/NOTIFY` wake-ups carrying only a
//! sequence number (see [`PgRegistry::wait_for_changes`]).

mod cluster;
#[cfg(test)]
mod cluster_tests;
pub mod import;
mod schema;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;
use tokio::sync::Notify;

use floto_proto::admin::{KeyInfo, OperatorInfo, TokenKind};
use floto_proto::DeviceId;

pub use schema::SCHEMA_VERSION;

use crate::commit::{CommitTx as _, EnrollResult, Jobs, RenewResult};
use crate::rows::*;
use crate::*;
use writer::{begin_locked, PgWriter};

/// The channel the change feed's wake-ups are sent on.
pub const CHANNEL: &str = "floto_changes";
/// The channel the cluster's device events wake nodes on.
pub const EVENTS_CHANNEL: &str = "floto_events";

/// The PostgreSQL registry.
#[derive(Debug, Clone)]
pub struct PgRegistry {
    pool: PgPool,
    overlay: Overlays,
    jobs: Jobs,
    /// Woken by NOTIFY, and after the listener reconnects (notifications sent meanwhile are
    /// lost, so the reader must look at the table).
    changed: Arc<Notify>,
    /// The same for the cluster's device events.
    events_changed: Arc<Notify>,
}

impl PgRegistry {
    /// Connects to `url`, migrates the schema (one node at a time), and starts listening
    /// for other nodes' changes.
    pub async fn connect(url: &str, overlay: impl Into<Overlays>) -> Result<Self, StoreError> {
        let overlay = overlay.into();
        let opts: PgConnectOptions = url.parse()?;
        let opts = opts.application_name("floto-vpn-server");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        schema::migrate(&pool).await?;
        let changed = Arc::new(Notify::new());
        let events_changed = Arc::new(Notify::new());
        tokio::spawn(listen(
            pool.clone(),
            changed.clone(),
            events_changed.clone(),
        ));
        let jobs = Jobs::start(PgWriter(pool.clone()), overlay.clone());
        let registry = Self {
            pool,
            overlay,
            jobs,
            changed,
            events_changed,
        };
        registry.check_overlay().await?;
        Ok(registry)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn check_overlay(&self) -> Result<(), StoreError> {
        let addresses: Vec<i64> = sqlx::query_scalar("SELECT overlay_ip FROM devices")
            .fetch_all(&self.pool)
            .await?;
        check_addresses(&addresses, &self.overlay)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        begin_locked(&self.pool).await
    }
}

/// Follows NOTIFY on [`CHANNEL`] and [`EVENTS_CHANNEL`] for as long as the pool is open,
/// waking the readers of each on its notifications, and both whenever the connection was
/// lost and made again.
async fn listen(pool: PgPool, changed: Arc<Notify>, events: Arc<Notify>) {
    let wake_all = || {
        changed.notify_waiters();
        events.notify_waiters();
    };
    let mut listener: Option<PgListener> = None;
    while !pool.is_closed() {
        let Some(l) = listener.as_mut() else {
            match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen_all([CHANNEL, EVENTS_CHANNEL]).await {
                    Ok(()) => {
                        // Anything sent while we were not listening is lost: look.
                        wake_all();
                        listener = Some(l);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "change listener cannot connect; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        };
        // `try_recv` says when the connection was lost (`Ok(None)`): the next call
        // reconnects, and the gap means notifications were missed.
        match l.try_recv().await {
            Ok(Some(n)) if n.channel() == EVENTS_CHANNEL => events.notify_waiters(),
            Ok(Some(_)) => changed.notify_waiters(),
            Ok(None) => wake_all(),
            Err(e) => {
                tracing::warn!(error = %e, "change listener failed; reconnecting");
                listener = None;
                wake_all();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[async_trait]
impl Registry for PgRegistry {
    async fn create_key(&self, key: NewKey) -> Result<KeyInfo, StoreError> {
        sqlx::query(
            "INSERT INTO provisioning_keys(id, hash, fleet, uses_left, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.hash[..])
        .bind(&key.fleet)
        .bind(key.uses.map(i64::from))
        .bind(key.expires_at.map(ts))
        .bind(ts(key.created_at))
        .execute(&self.pool)
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
        sqlx::query("SELECT * FROM provisioning_keys WHERE hash = $1")
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        sqlx::query("SELECT * FROM provisioning_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
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
            "UPDATE provisioning_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let key = sqlx::query("SELECT * FROM provisioning_keys WHERE id = $1")
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
        sqlx::query("SELECT * FROM devices WHERE uuid = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        sqlx::query("SELECT * FROM devices ORDER BY overlay_ip, uuid")
            .fetch_all(&self.pool)
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
        let uuid = id.to_string();
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE devices SET revoked_at = $1, updated_at = $1 \
             WHERE uuid = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(&uuid)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE certificates SET revoked_at = $1 \
             WHERE subject = $2 AND kind = 'device' AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(&uuid)
        .execute(&mut *tx)
        .await?;
        let device = sqlx::query("SELECT * FROM devices WHERE uuid = $1")
            .bind(&uuid)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()?;
        let serials = revoked_serials(&mut *tx, CertKind::Device, &uuid).await?;
        if device.is_some() {
            tx.record_change(ChangeKind::Device, &uuid, now).await?;
        }
        tx.commit().await?;
        Ok(device.map(|device| DeviceRevocation { device, serials }))
    }

    async fn save_presence(&self, presence: &[Presence]) -> Result<(), StoreError> {
        if presence.is_empty() {
            return Ok(());
        }
        // One statement for the whole batch.
        let uuids: Vec<String> = presence.iter().map(|p| p.device.to_string()).collect();
        let endpoints: Vec<String> = presence.iter().map(|p| p.endpoint.to_string()).collect();
        let seen: Vec<i64> = presence.iter().map(|p| ts(p.last_seen)).collect();
        sqlx::query(
            "UPDATE devices AS d SET last_endpoint = p.endpoint, last_seen = p.seen \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS p(uuid, endpoint, seen) \
             WHERE d.uuid = p.uuid",
        )
        .bind(&uuids)
        .bind(&endpoints)
        .bind(&seen)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn count_devices(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn record_certificate(&self, cert: IssuedCertRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO certificates(serial, kind, subject, issued_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&cert.serial)
        .bind(cert.kind.as_str())
        .bind(&cert.subject)
        .bind(ts(cert.issued_at))
        .bind(ts(cert.expires_at))
        .bind(cert.revoked_at.map(ts))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revoked_certificates(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<IssuedCertRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM certificates WHERE revoked_at IS NOT NULL AND expires_at > $1 \
             ORDER BY revoked_at, serial",
        )
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(cert_from_row)
        .collect()
    }

    async fn next_crl_number(&self) -> Result<u64, StoreError> {
        let v: String = sqlx::query_scalar(
            "UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'crl_number' \
             RETURNING value",
        )
        .fetch_one(&self.pool)
        .await?;
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&op.name)
        .bind(op.role.to_string())
        .bind(fleets)
        .bind(ts(op.now))
        .bind(login)
        .bind(op.token_expires_at.map(ts))
        .bind(api)
        .execute(&self.pool)
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
        sqlx::query("SELECT * FROM operators WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(operator_from_row)
            .transpose()
    }

    async fn operators(&self) -> Result<Vec<OperatorInfo>, StoreError> {
        sqlx::query("SELECT * FROM operators ORDER BY name")
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE: two nodes presenting the same token queue here; the second sees it used.
        let Some(row) = sqlx::query("SELECT * FROM operators WHERE token_hash = $1 FOR UPDATE")
            .bind(&hash[..])
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let op = operator_from_row(&row)?;
        if row.opt_int("token_used_at")?.is_some() {
            return Ok(Err(TokenRefusal::Used));
        }
        if op.revoked_at.is_some() {
            return Ok(Err(TokenRefusal::OperatorRevoked));
        }
        if row
            .opt_int("token_expires_at")?
            .is_some_and(|e| e <= ts(now))
        {
            return Ok(Err(TokenRefusal::Expired));
        }
        sqlx::query("UPDATE operators SET token_used_at = $1 WHERE name = $2")
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
        let Some(row) = sqlx::query("SELECT * FROM operators WHERE api_token_hash = $1")
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let op = operator_from_row(&row)?;
        if op.revoked_at.is_some() {
            return Ok(Err(TokenRefusal::OperatorRevoked));
        }
        if row
            .opt_int("api_token_expires_at")?
            .is_some_and(|e| e <= ts(now))
        {
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
        sqlx::query("UPDATE operators SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
            .bind(ts(now))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE certificates SET revoked_at = $1 \
             WHERE subject = $2 AND kind = 'operator' AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let op = sqlx::query("SELECT * FROM operators WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(operator_from_row)
            .transpose()?;
        let serials = revoked_serials(&mut *tx, CertKind::Operator, name).await?;
        if op.is_some() {
            tx.record_change(ChangeKind::Operator, name, now).await?;
        }
        tx.commit().await?;
        Ok(op.map(|operator| OperatorRevocation { operator, serials }))
    }

    async fn last_change(&self) -> Result<u64, StoreError> {
        let (max, pruned): (Option<i64>, String) = sqlx::query_as(
            "SELECT (SELECT MAX(seq) FROM changes), \
             (SELECT value FROM meta WHERE key = 'changes_pruned_through')",
        )
        .fetch_one(&self.pool)
        .await?;
        let pruned = parse_pruned_through(Some(&pruned))?;
        Ok(max.map_or(0, |m| m.max(0) as u64).max(pruned))
    }

    async fn change_rows_after(
        &self,
        seq: u64,
        limit: u32,
    ) -> Result<Result<Vec<ChangeRow>, u64>, StoreError> {
        // REPEATABLE READ: the pruning mark and the rows come from one snapshot.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let pruned: String =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'changes_pruned_through'")
                .fetch_one(&mut *tx)
                .await?;
        let pruned = parse_pruned_through(Some(&pruned))?;
        if seq < pruned {
            let max: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM changes")
                .fetch_one(&mut *tx)
                .await?;
            return Ok(Err(max.map_or(0, |m| m.max(0) as u64).max(pruned)));
        }
        let rows = sqlx::query(
            "SELECT seq, kind, subject FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
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
        revoked_serials(&self.pool, kind, subject).await
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let through: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM changes WHERE at < $1")
            .bind(ts(before))
            .fetch_one(&mut *tx)
            .await?;
        let Some(through) = through else {
            return Ok(0);
        };
        let done = sqlx::query("DELETE FROM changes WHERE seq <= $1")
            .bind(through)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'changes_pruned_through'")
            .bind(through.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn wait_for_changes(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    async fn fleet_ssh_logins(&self, fleet: &str) -> Result<Option<Vec<String>>, StoreError> {
        let logins: Option<String> =
            sqlx::query_scalar("SELECT ssh_logins FROM fleets WHERE name = $1")
                .bind(fleet)
                .fetch_optional(&self.pool)
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
                    "INSERT INTO fleets(name, ssh_logins, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET ssh_logins = EXCLUDED.ssh_logins, \
                     updated_at = EXCLUDED.updated_at",
                )
                .bind(fleet)
                .bind(logins.join(","))
                .bind(ts(at))
                .execute(&self.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM fleets WHERE name = $1")
                    .bind(fleet)
                    .execute(&self.pool)
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
            sqlx::query("DELETE FROM device_ssh WHERE uuid = $1")
                .bind(device.to_string())
                .execute(&self.pool)
                .await?;
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO device_ssh(uuid, host_keys, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (uuid) DO UPDATE SET host_keys = EXCLUDED.host_keys, \
             updated_at = EXCLUDED.updated_at",
        )
        .bind(device.to_string())
        .bind(keys.join("\n"))
        .bind(ts(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn device_ssh_host_keys(&self, device: &DeviceId) -> Result<Vec<String>, StoreError> {
        let keys: Option<String> =
            sqlx::query_scalar("SELECT host_keys FROM device_ssh WHERE uuid = $1")
                .bind(device.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(keys
            .map(|k| k.lines().map(str::to_owned).collect())
            .unwrap_or_default())
    }

    async fn fleet_settings(&self) -> Result<Vec<FleetSettings>, StoreError> {
        sqlx::query("SELECT * FROM fleets ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(fleet_from_row)
            .collect()
    }

    async fn append_audit(&self, r: AuditRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit(at, actor, action, device, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(ts(r.at))
        .bind(&r.actor)
        .bind(&r.action)
        .bind(r.device.map(|d| d.to_string()))
        .bind(&r.detail)
        .execute(&self.pool)
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
            "SELECT * FROM audit WHERE ($1::text IS NULL OR device = $1) \
             AND ($2::text IS NULL OR actor = $2) AND ($3::bigint IS NULL OR at >= $3) \
             ORDER BY id DESC LIMIT $4",
        )
        .bind(device.map(|d| d.to_string()))
        .bind(actor)
        .bind(since.map(ts))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }
}

/// Serials of the revoked certificates of one subject.
async fn revoked_serials<'c>(
    conn: impl sqlx::Executor<'c, Database = Postgres>,
    kind: CertKind,
    subject: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT serial FROM certificates \
         WHERE subject = $1 AND kind = $2 AND revoked_at IS NOT NULL ORDER BY serial",
    )
    .bind(subject)
    .bind(kind.as_str())
    .fetch_all(conn)
    .await?)
}
