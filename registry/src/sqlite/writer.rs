//! The writer task: enrollments and renewals decided and committed in groups, one
//! transaction and one fsync per group.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sqlx::sqlite::SqlitePool;
use sqlx::{Row as _, Sqlite, Transaction};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use floto_proto::admin::KeyInfo;
use floto_proto::{DeviceId, WgKey};

use super::rows::*;
use crate::rules::{self, EnrollDecision, EnrollRefusal, RenewRefusal};
use crate::{Device, EnrollCommit, EnrollOutcome, RenewCommit, Renewed, StoreError};

/// Enrollments and renewals committed together at most.
pub(super) const MAX_BATCH: usize = 256;

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
    key: Option<KeyInfo>,
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

async fn enroll_in(
    tx: &mut Transaction<'static, Sqlite>,
    overlay: Ipv4Net,
    c: &EnrollCommit,
) -> Result<Result<EnrollOutcome, EnrollRefusal>, StoreError> {
    let f = facts(tx, Some(&c.key_hash), &c.device, Some(&c.wg_public_key)).await?;
    let decision =
        match rules::decide_enrollment(f.key.as_ref(), f.device.as_ref(), f.owner.as_ref(), c) {
            Ok(d) => d,
            Err(refusal) => return Ok(Err(refusal)),
        };
    let (Some(key), now) = (f.key, whole_seconds(c.now)?) else {
        return Ok(Err(EnrollRefusal::KeyUnknown));
    };
    let expires = whole_seconds(c.cert_expires_at)?;
    match (decision, f.device) {
        (EnrollDecision::Create, _) => {
            let fresh = rules::next_overlay_address(overlay, f.max_ip);
            let ip = match fresh {
                Some(ip) => Some(ip),
                None => reusable_address(tx, overlay, c.reuse_addresses_revoked_before).await?,
            };
            let Some(ip) = ip else {
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

/// The lowest address of a device revoked at or before `cutoff` that no live device holds,
/// for when the overlay has no fresh address left.
async fn reusable_address(
    tx: &mut Transaction<'static, Sqlite>,
    overlay: Ipv4Net,
    cutoff: OffsetDateTime,
) -> Result<Option<Ipv4Addr>, StoreError> {
    let ip: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(d.overlay_ip) FROM devices AS d \
         WHERE d.revoked_at IS NOT NULL AND d.revoked_at <= ?1 AND NOT EXISTS \
         (SELECT 1 FROM devices AS l WHERE l.overlay_ip = d.overlay_ip AND l.revoked_at IS NULL)",
    )
    .bind(ts(cutoff))
    .fetch_one(&mut **tx)
    .await?;
    Ok(ip.map(ip_from_db).filter(|ip| overlay.contains(ip)))
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
    let before = match rules::decide_renewal(f.device.as_ref(), f.owner.as_ref(), c) {
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

pub(super) type EnrollResult = Result<Result<EnrollOutcome, EnrollRefusal>, StoreError>;
pub(super) type RenewResult = Result<Result<Renewed, RenewRefusal>, StoreError>;

/// An enrollment or renewal waiting for the writer.
pub(super) enum Job {
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
pub(super) async fn group_commit(
    pool: SqlitePool,
    overlay: Ipv4Net,
    mut queue: mpsc::Receiver<Job>,
) {
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
