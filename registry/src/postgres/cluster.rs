//! PostgreSQL's node leases and device sessions ([`crate::cluster`]). Times are the
//! database's (`clock_timestamp()`, in milliseconds since the epoch).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

use floto_proto::devices::{DeviceEvent, DeviceEventKind};
use floto_proto::DeviceId;

use super::PgRegistry;
use crate::cluster::{Cluster, NodeRecord, SessionRecord, SessionWrite};
use crate::rows::{parse_device_id, RegistryRow};
use crate::StoreError;

/// The database's clock, in milliseconds since the epoch.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint";

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> Result<time::OffsetDateTime, StoreError> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {v} ms")))
}

/// The advisory lock key of event appends: one writer at a time, so that event numbers
/// become visible in order and a reader that has seen N has seen everything before N.
const EVENTS_LOCK: i64 = 0x666c_6f74_6f03;

fn kind_name(kind: DeviceEventKind) -> &'static str {
    match kind {
        DeviceEventKind::Online => "online",
        DeviceEventKind::Offline => "offline",
        DeviceEventKind::Revoked => "revoked",
    }
}

fn event_from_row(row: &sqlx::postgres::PgRow) -> Result<DeviceEvent, StoreError> {
    let kind = match row.text("kind")?.as_str() {
        "online" => DeviceEventKind::Online,
        "offline" => DeviceEventKind::Offline,
        "revoked" => DeviceEventKind::Revoked,
        other => return Err(StoreError::Corrupt(format!("event kind {other:?}"))),
    };
    Ok(DeviceEvent {
        seq: row.int("seq")?.max(0) as u64,
        uuid: parse_device_id(&row.text("device")?)?,
        fleet: row.text("fleet")?,
        kind,
        generation: row.int("generation")?.max(0) as u64,
        at: from_ms(row.int("at_ms")?)?,
        endpoint: row.opt_text("endpoint")?,
        node: row.opt_text("node")?,
    })
}

fn session_from_row(row: &sqlx::postgres::PgRow) -> Result<SessionRecord, StoreError> {
    Ok(SessionRecord {
        device: parse_device_id(&row.text("device")?)?,
        node: row.text("node")?,
        node_name: row.opt_text("node_name")?,
        node_address: row.opt_text("node_address")?,
        epoch: row.int("epoch")?,
        endpoint: row
            .opt_text("endpoint")?
            .and_then(|e| e.parse::<SocketAddr>().ok()),
        refreshed_at: from_ms(row.int("refreshed_at")?)?,
    })
}

#[async_trait]
impl Cluster for PgRegistry {
    async fn renew_lease(
        &self,
        id: &str,
        name: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // A new id inserts; a live lease extends; an expired one stays expired.
        let sql = format!(
            "INSERT INTO nodes(id, name, address, started_at, lease_expires_at) \
             VALUES ($1, $2, $3, {NOW_MS}, {NOW_MS} + $4) \
             ON CONFLICT (id) DO UPDATE SET lease_expires_at = {NOW_MS} + $4, \
             address = EXCLUDED.address \
             WHERE nodes.lease_expires_at > {NOW_MS}"
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(name)
            .bind(address)
            .bind(ms(ttl))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn end_lease(&self, id: &str) -> Result<(), StoreError> {
        let sql = format!("UPDATE nodes SET lease_expires_at = {NOW_MS} WHERE id = $1");
        sqlx::query(&sql).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!(
            "SELECT n.*, n.lease_expires_at > {NOW_MS} AS alive, \
             (SELECT COUNT(*) FROM sessions AS s WHERE s.node = n.id) AS sessions \
             FROM nodes AS n ORDER BY n.started_at, n.id"
        );
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(NodeRecord {
                    id: row.text("id")?,
                    name: row.text("name")?,
                    address: row.text("address")?,
                    started_at: from_ms(row.int("started_at")?)?,
                    lease_expires_at: from_ms(row.int("lease_expires_at")?)?,
                    alive: sqlx::Row::try_get(row, "alive")?,
                    sessions: row.int("sessions")?.max(0) as u64,
                })
            })
            .collect()
    }

    async fn write_sessions(
        &self,
        id: &str,
        batch: &[SessionWrite],
    ) -> Result<Vec<DeviceId>, StoreError> {
        let (mut claim_dev, mut claim_epoch, mut claim_ep) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rel_dev, mut rel_epoch) = (Vec::new(), Vec::new());
        for w in batch {
            match w {
                SessionWrite::Claim {
                    device,
                    epoch,
                    endpoint,
                } => {
                    claim_dev.push(device.to_string());
                    claim_epoch.push(*epoch);
                    claim_ep.push(endpoint.map(|e| e.to_string()));
                }
                SessionWrite::Release { device, epoch } => {
                    rel_dev.push(device.to_string());
                    rel_epoch.push(*epoch);
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        let mut rejected = Vec::new();
        if !claim_dev.is_empty() {
            // A newer epoch takes the row from any node, and any claim takes it from a node
            // whose lease has expired; the same node and epoch refreshes it; otherwise an
            // older epoch changes nothing.
            let sql = format!(
                "INSERT INTO sessions(device, node, epoch, endpoint, refreshed_at) \
                 SELECT c.device, $1, c.epoch, c.endpoint, {NOW_MS} \
                 FROM UNNEST($2::text[], $3::bigint[], $4::text[]) AS c(device, epoch, endpoint) \
                 ON CONFLICT (device) DO UPDATE SET node = EXCLUDED.node, epoch = EXCLUDED.epoch, \
                 endpoint = EXCLUDED.endpoint, refreshed_at = EXCLUDED.refreshed_at \
                 WHERE sessions.epoch < EXCLUDED.epoch \
                 OR (sessions.node = EXCLUDED.node AND sessions.epoch = EXCLUDED.epoch) \
                 OR NOT EXISTS (SELECT 1 FROM nodes AS n \
                     WHERE n.id = sessions.node AND n.lease_expires_at > {NOW_MS}) \
                 RETURNING device"
            );
            let taken: std::collections::HashSet<String> = sqlx::query_scalar(&sql)
                .bind(id)
                .bind(&claim_dev)
                .bind(&claim_epoch)
                .bind(&claim_ep)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            for device in claim_dev.iter().filter(|d| !taken.contains(*d)) {
                rejected.push(parse_device_id(device)?);
            }
        }
        if !rel_dev.is_empty() {
            sqlx::query(
                "DELETE FROM sessions AS s USING UNNEST($2::text[], $3::bigint[]) AS r(device, epoch) \
                 WHERE s.device = r.device AND s.epoch = r.epoch AND s.node = $1",
            )
            .bind(id)
            .bind(&rel_dev)
            .bind(&rel_epoch)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(rejected)
    }

    async fn online_sessions(&self, fresh: Duration) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!(
            "SELECT s.*, n.name AS node_name, n.address AS node_address FROM sessions AS s JOIN nodes AS n ON n.id = s.node \
             WHERE n.lease_expires_at > {NOW_MS} AND s.refreshed_at > {NOW_MS} - $1"
        );
        sqlx::query(&sql)
            .bind(ms(fresh))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(session_from_row)
            .collect()
    }

    async fn online_session(
        &self,
        device: &DeviceId,
        fresh: Duration,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let sql = format!(
            "SELECT s.*, n.name AS node_name, n.address AS node_address FROM sessions AS s JOIN nodes AS n ON n.id = s.node \
             WHERE s.device = $2 AND n.lease_expires_at > {NOW_MS} \
             AND s.refreshed_at > {NOW_MS} - $1"
        );
        sqlx::query(&sql)
            .bind(ms(fresh))
            .bind(device.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    async fn counts(&self, fresh: Duration) -> Result<(u64, u64), StoreError> {
        let sql = format!(
            "SELECT (SELECT COUNT(*) FROM nodes WHERE lease_expires_at > {NOW_MS}), \
             (SELECT COUNT(*) FROM sessions AS s JOIN nodes AS n ON n.id = s.node \
              WHERE n.lease_expires_at > {NOW_MS} AND s.refreshed_at > {NOW_MS} - $1)"
        );
        let (nodes, online): (i64, i64) = sqlx::query_as(&sql)
            .bind(ms(fresh))
            .fetch_one(&self.pool)
            .await?;
        Ok((nodes.max(0) as u64, online.max(0) as u64))
    }

    async fn orphaned_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!(
            "SELECT s.*, n.name AS node_name, n.address AS node_address FROM sessions AS s LEFT JOIN nodes AS n ON n.id = s.node \
             WHERE n.id IS NULL OR n.lease_expires_at <= {NOW_MS}"
        );
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(session_from_row)
            .collect()
    }

    async fn prune_nodes(&self, after: Duration) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql = format!("DELETE FROM nodes WHERE lease_expires_at < {NOW_MS} - $1 RETURNING id");
        let gone: Vec<String> = sqlx::query_scalar(&sql)
            .bind(ms(after))
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE node = ANY($1)")
            .bind(&gone)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(gone.len() as u64)
    }

    async fn append_events(&self, events: &[DeviceEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut cols: (Vec<String>, Vec<String>, Vec<&str>, Vec<i64>, Vec<i64>) =
            Default::default();
        let (mut endpoints, mut nodes) = (Vec::new(), Vec::new());
        for e in events {
            cols.0.push(e.uuid.to_string());
            cols.1.push(e.fleet.clone());
            cols.2.push(kind_name(e.kind));
            cols.3.push(i64::try_from(e.generation).unwrap_or(i64::MAX));
            cols.4
                .push(i64::try_from(e.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX));
            endpoints.push(e.endpoint.clone());
            nodes.push(e.node.clone());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(EVENTS_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO events(device, fleet, kind, generation, at_ms, endpoint, node)              SELECT d, f, k, g, a, ep, n FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[],              $5::bigint[], $6::text[], $7::text[]) WITH ORDINALITY AS e(d, f, k, g, a, ep, n, i)              ORDER BY i",
        )
        .bind(&cols.0)
        .bind(&cols.1)
        .bind(&cols.2)
        .bind(&cols.3)
        .bind(&cols.4)
        .bind(&endpoints)
        .bind(&nodes)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<DeviceEvent>, StoreError> {
        sqlx::query("SELECT * FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    async fn last_event(&self) -> Result<u64, StoreError> {
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(last.unwrap_or(0).max(0) as u64)
    }

    async fn wait_for_events(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.events_changed.notified()).await;
    }

    async fn prune_events(&self, keep: u64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - $1")
                .bind(i64::try_from(keep).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }
}
