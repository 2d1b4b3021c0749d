//! Enrollments and renewals, decided by [`crate::rules`] and committed in groups, one
//! transaction (and one fsync) per group, for both backends. A backend supplies the few
//! statements ([`CommitTx`]) and how a write transaction begins ([`Writer`]); the order of
//! reads, decisions and writes is here once.

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use floto_proto::{DeviceId, WgKey};

use crate::rows::{whole_seconds, Facts};
use crate::rules::{self, EnrollDecision, EnrollRefusal, Overlays, RenewRefusal};
use crate::{ChangeKind, Device, EnrollCommit, EnrollOutcome, RenewCommit, Renewed, StoreError};

/// Enrollments and renewals committed together at most.
pub(crate) const MAX_BATCH: usize = 256;

/// The statements of an enrollment or renewal, inside one write transaction.
#[async_trait]
pub(crate) trait CommitTx: Send {
    /// The key (by hash), the device (by UUID), the holder of the WireGuard key, and the
    /// highest address given out.
    async fn facts(
        &mut self,
        key_hash: Option<&[u8; 32]>,
        device: &DeviceId,
        wg_key: Option<&WgKey>,
    ) -> Result<Facts, StoreError>;
    /// Inserts a new device row (the database records its certificate and takes a use of
    /// its key).
    async fn insert_device(&mut self, d: &Device) -> Result<(), StoreError>;
    /// Writes a device's new certificate (and maybe WireGuard key).
    async fn recertify(&mut self, d: &Device) -> Result<(), StoreError>;
    /// The lowest address of a device revoked at or before `cutoff` that no live device
    /// holds.
    async fn reusable_address(&mut self, cutoff: OffsetDateTime)
        -> Result<Option<i64>, StoreError>;
    /// The highest address given out between `low` and `high` (inclusive).
    async fn highest_address_in(&mut self, low: u32, high: u32) -> Result<Option<i64>, StoreError>;
    /// Appends to the change feed, in this transaction.
    async fn record_change(
        &mut self,
        kind: ChangeKind,
        subject: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;
}

/// The statements of [`CommitTx`] in one backend's SQL dialect.
pub(crate) struct CommitSql {
    /// [`crate::rows::facts_sql`] with the backend's placeholders.
    pub facts: std::sync::LazyLock<String>,
    /// A new device (the database records its certificate and takes its key's use).
    pub create: &'static str,
    /// A new certificate (and maybe WireGuard key) for an existing device.
    pub recertify: &'static str,
    /// The lowest address of a device revoked at or before the first parameter that no live
    /// device holds.
    pub reusable_address: &'static str,
    /// The highest address between the two parameters.
    pub highest_address_in: &'static str,
    /// A change-feed row.
    pub record_change: &'static str,
}

/// Implements [`CommitTx`] for a backend's transactions with its [`CommitSql`]: the binding
/// and reading are the same for both backends, only the SQL text differs.
macro_rules! commit_tx {
    ($db:ty, $sql:expr) => {
        #[async_trait::async_trait]
        impl $crate::commit::CommitTx for sqlx::Transaction<'static, $db> {
            async fn facts(
                &mut self,
                key_hash: Option<&[u8; 32]>,
                device: &floto_proto::DeviceId,
                wg_key: Option<&floto_proto::WgKey>,
            ) -> Result<$crate::rows::Facts, $crate::StoreError> {
                let row = sqlx::query(&$sql.facts)
                    .bind(key_hash.map(|h| h.to_vec()))
                    .bind(device.to_string())
                    .bind(wg_key.map(floto_proto::WgKey::to_base64))
                    .fetch_one(&mut **self)
                    .await?;
                $crate::rows::Facts::from_row(&row)
            }

            async fn insert_device(
                &mut self,
                d: &$crate::Device,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query($sql.create)
                    .bind(d.id.to_string())
                    .bind(&d.fleet)
                    .bind(d.wg_public_key.to_base64())
                    .bind($crate::rows::ip_to_db(d.overlay_ip))
                    .bind(&d.cert_serial)
                    .bind(&d.cert_public_key)
                    .bind($crate::rows::ts(d.cert_expires_at))
                    .bind($crate::rows::ts(d.created_at))
                    .bind(&d.key_id)
                    .bind(&d.device_type)
                    .bind(&d.hostname)
                    .execute(&mut **self)
                    .await?;
                Ok(())
            }

            async fn recertify(&mut self, d: &$crate::Device) -> Result<(), $crate::StoreError> {
                sqlx::query($sql.recertify)
                    .bind(d.wg_public_key.to_base64())
                    .bind(&d.cert_serial)
                    .bind(&d.cert_public_key)
                    .bind($crate::rows::ts(d.cert_expires_at))
                    .bind($crate::rows::ts(d.updated_at))
                    .bind(&d.device_type)
                    .bind(&d.hostname)
                    .bind(d.id.to_string())
                    .execute(&mut **self)
                    .await?;
                Ok(())
            }

            async fn reusable_address(
                &mut self,
                cutoff: time::OffsetDateTime,
            ) -> Result<Option<i64>, $crate::StoreError> {
                Ok(sqlx::query_scalar($sql.reusable_address)
                    .bind($crate::rows::ts(cutoff))
                    .fetch_one(&mut **self)
                    .await?)
            }

            async fn highest_address_in(
                &mut self,
                low: u32,
                high: u32,
            ) -> Result<Option<i64>, $crate::StoreError> {
                Ok(sqlx::query_scalar($sql.highest_address_in)
                    .bind(i64::from(low))
                    .bind(i64::from(high))
                    .fetch_one(&mut **self)
                    .await?)
            }
            async fn record_change(
                &mut self,
                kind: $crate::ChangeKind,
                subject: &str,
                at: time::OffsetDateTime,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query($sql.record_change)
                    .bind($crate::rows::ts(at))
                    .bind(kind.as_str())
                    .bind(subject)
                    .execute(&mut **self)
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use commit_tx;

/// Where the writer's transactions come from.
#[async_trait]
pub(crate) trait Writer: Send + Sync + 'static {
    type Tx: CommitTx;
    /// Begins a write transaction that no other writer of the registry runs beside.
    async fn begin(&self) -> Result<Self::Tx, StoreError>;
    async fn commit(tx: Self::Tx) -> Result<(), StoreError>;
}

/// The next address never given out, in the first network that has one left. With one
/// network that is the address after the highest one (`highest`, read with the facts).
async fn fresh_address(
    tx: &mut impl CommitTx,
    overlay: &Overlays,
    highest: Option<std::net::Ipv4Addr>,
) -> Result<Option<std::net::Ipv4Addr>, StoreError> {
    if let [only] = overlay.networks() {
        return Ok(rules::next_overlay_address(*only, highest));
    }
    for net in overlay.networks() {
        let top = u32::from(net.broadcast());
        let highest = tx
            .highest_address_in(u32::from(net.network()), top)
            .await?
            .map(crate::rows::ip_from_db);
        if let Some(ip) = rules::next_overlay_address(*net, highest) {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

pub(crate) async fn enroll_in(
    tx: &mut impl CommitTx,
    overlay: &Overlays,
    c: &EnrollCommit,
) -> Result<Result<EnrollOutcome, EnrollRefusal>, StoreError> {
    let f = tx
        .facts(Some(&c.key_hash), &c.device, Some(&c.wg_public_key))
        .await?;
    let decision =
        match rules::decide_enrollment(f.key.as_ref(), f.device.as_ref(), f.owner.as_ref(), c) {
            Ok(d) => d,
            Err(refusal) => return Ok(Err(refusal)),
        };
    let (Some(key), now) = (f.key, whole_seconds(c.now)?) else {
        return Ok(Err(EnrollRefusal::KeyUnknown));
    };
    let expires = whole_seconds(c.cert_expires_at)?;
    let outcome = match (decision, f.device) {
        (EnrollDecision::Create, _) => {
            let ip = match fresh_address(tx, overlay, f.max_ip).await? {
                Some(ip) => Some(ip),
                None => tx
                    .reusable_address(c.reuse_addresses_revoked_before)
                    .await?
                    .map(crate::rows::ip_from_db)
                    .filter(|ip| overlay.contains(*ip)),
            };
            let Some(ip) = ip else {
                return Ok(Err(EnrollRefusal::AddressPoolExhausted {
                    overlay: overlay.clone(),
                }));
            };
            let device = Device {
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
            };
            tx.insert_device(&device).await?;
            EnrollOutcome::Created(device)
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
            tx.recertify(&device).await?;
            EnrollOutcome::Reenrolled {
                device,
                previous_wg_key,
            }
        }
        (EnrollDecision::Reenroll, None) => {
            return Err(StoreError::Inconsistent(
                "re-enrollment decided for a device that is not there".into(),
            ))
        }
    };
    tx.record_change(ChangeKind::Device, &c.device.to_string(), now)
        .await?;
    Ok(Ok(outcome))
}

pub(crate) async fn renew_in(
    tx: &mut impl CommitTx,
    c: &RenewCommit,
) -> Result<Result<Renewed, RenewRefusal>, StoreError> {
    let f = tx
        .facts(None, &c.device, c.new_wg_public_key.as_ref())
        .await?;
    let before = match rules::decide_renewal(f.device.as_ref(), f.owner.as_ref(), c) {
        Ok(d) => d.clone(),
        Err(refusal) => return Ok(Err(refusal)),
    };
    let new_key = c.new_wg_public_key.unwrap_or(before.wg_public_key);
    let now = whole_seconds(c.now)?;
    let device = Device {
        wg_public_key: new_key,
        cert_serial: c.cert_serial.clone(),
        cert_public_key: c.cert_public_key.clone(),
        cert_expires_at: whole_seconds(c.cert_expires_at)?,
        updated_at: now,
        ..before.clone()
    };
    tx.recertify(&device).await?;
    tx.record_change(ChangeKind::Device, &c.device.to_string(), now)
        .await?;
    Ok(Ok(Renewed {
        previous_wg_key: Some(before.wg_public_key).filter(|k| *k != new_key),
        device,
    }))
}

pub(crate) type EnrollResult = Result<Result<EnrollOutcome, EnrollRefusal>, StoreError>;
pub(crate) type RenewResult = Result<Result<Renewed, RenewRefusal>, StoreError>;

/// An enrollment or renewal waiting for the writer.
pub(crate) enum Job {
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

/// The sending side of the writer's queue, as a registry holds it.
#[derive(Debug, Clone)]
pub(crate) struct Jobs(mpsc::Sender<Job>);

impl Jobs {
    /// Starts the writer task on `writer`.
    pub(crate) fn start(writer: impl Writer, overlay: Overlays) -> Self {
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(group_commit(writer, overlay, queue));
        Self(jobs)
    }

    pub(crate) async fn enroll(&self, c: EnrollCommit) -> EnrollResult {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Job::Enroll(c, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub(crate) async fn renew(&self, c: RenewCommit) -> RenewResult {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Job::Renew(c, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Inconsistent("the registry writer stopped".into())
}

/// A job's result, before it is sent back.
enum Done {
    Enroll(Result<EnrollOutcome, EnrollRefusal>),
    Renew(Result<Renewed, RenewRefusal>),
}

/// The writer: takes every job that is waiting (up to [`MAX_BATCH`]), runs them one after
/// the other in one transaction, commits once, and answers each. Jobs in a batch see each
/// other's writes, so races are decided exactly as if each had its own transaction; one
/// fsync serves the batch. If the batch fails, each job is retried alone so that one bad
/// job cannot fail the others.
async fn group_commit<W: Writer>(writer: W, overlay: Overlays, mut queue: mpsc::Receiver<Job>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match run_batch(&writer, &overlay, &batch).await {
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
                    let result = run_batch(&writer, &overlay, one)
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

async fn run_batch<W: Writer>(
    writer: &W,
    overlay: &Overlays,
    batch: &[Job],
) -> Result<Vec<Done>, StoreError> {
    let mut tx = writer.begin().await?;
    let mut done = Vec::with_capacity(batch.len());
    for job in batch {
        done.push(match job {
            Job::Enroll(c, _) => Done::Enroll(enroll_in(&mut tx, overlay, c).await?),
            Job::Renew(c, _) => Done::Renew(renew_in(&mut tx, c).await?),
        });
    }
    W::commit(tx).await?;
    Ok(done)
}

fn reply(job: Job, result: Result<Done, StoreError>) {
    // A caller that went away no longer needs its answer; the commit stands.
    let mismatch = || StoreError::Inconsistent("mismatched job result".into());
    match (job, result) {
        (Job::Enroll(_, tx), Ok(Done::Enroll(r))) => drop(tx.send(Ok(r))),
        (Job::Renew(_, tx), Ok(Done::Renew(r))) => drop(tx.send(Ok(r))),
        (Job::Enroll(_, tx), Err(e)) => drop(tx.send(Err(e))),
        (Job::Renew(_, tx), Err(e)) => drop(tx.send(Err(e))),
        (Job::Enroll(_, tx), Ok(_)) => drop(tx.send(Err(mismatch()))),
        (Job::Renew(_, tx), Ok(_)) => drop(tx.send(Err(mismatch()))),
    }
}
