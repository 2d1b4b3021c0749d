//! `floto exec`: one command on every device of a fleet, through the broker, at most N at
//! once, each within a timeout, reported as one row per device. Each device gets what
//! `floto ssh` does ([`Session`]): its own certificate and broker session (both audited by
//! the server), then OpenSSH in batch mode with its output captured. It does not retry,
//! and does not try devices the device list shows offline.
//!
//! The rules (which devices, rows, their order, the exit status) are plain functions of
//! the device list, the outcomes and `now`; [`run`] is the shell that starts the sessions.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;
use tracing::{debug, instrument};

use floto_client::broker::{BrokerError, Transport};
use floto_client::ClientError;
use floto_proto::devices::DeviceInfo;
use floto_proto::DeviceId;

use crate::operator::Operator;
use crate::ssh::{self, OpenError, Session, SshFiles};

/// Exit status when every device ran the command and it exited 0.
pub const ALL_OK: u8 = 0;
/// Exit status when at least one device did not (rows were printed).
pub const SOME_FAILED: u8 = 1;
/// Exit status when nothing could be run at all (not logged in, server unreachable, no
/// devices): no rows, an error on stderr. The same as ssh's "could not connect".
pub const NOTHING_RAN: u8 = 255;

/// How much of a device's stdout and stderr is kept in memory, for the first line; the
/// rest goes only to `--output-dir`.
const HEAD: usize = 4096;

/// How long the output of a finished or killed ssh may take to drain (its ProxyCommand
/// holds ssh's stderr until it sees the socket close).
const DRAIN: Duration = Duration::from_secs(2);

/// What `floto exec` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    pub fleet: String,
    /// Skip devices the list shows offline (no row for them).
    pub online_only: bool,
    /// Devices at once (at least 1).
    pub parallel: usize,
    /// Per device, from the start of its certificate request to the end of ssh.
    pub timeout: Duration,
    pub login: String,
    pub port: u16,
    /// The remote command, as ssh joins it: words separated by spaces, run by the login's
    /// shell on the device.
    pub command: Vec<String>,
    /// Per device `<uuid>.out` and `<uuid>.err`, for each device whose ssh ran.
    pub output_dir: Option<PathBuf>,
    pub transport: Transport,
}

/// Why there is nothing to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The operator sees no device of the fleet (none enrolled, all revoked, or not one of
    /// the operator's fleets).
    #[error("fleet {fleet:?} has no devices you may see{}", others_hint(.others))]
    NoDevices {
        fleet: String,
        /// The fleets of the devices the operator does see.
        others: Vec<String>,
    },
    /// `--online` and every device of the fleet is offline.
    #[error("fleet {fleet:?} has no online devices ({enrolled} enrolled, all offline); run without --online to list them")]
    NoneOnline { fleet: String, enrolled: usize },
}

fn others_hint(others: &[String]) -> String {
    if others.is_empty() {
        String::new()
    } else {
        format!(" (you see devices of: {})", others.join(", "))
    }
}

/// One device of the run, as the list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Online: the command is tried.
    Try(DeviceId),
    /// Offline in the list: not tried, reported with why.
    Offline { uuid: DeviceId, reason: String },
}

impl Planned {
    pub fn uuid(&self) -> DeviceId {
        match self {
            Self::Try(uuid) | Self::Offline { uuid, .. } => *uuid,
        }
    }
}

/// The devices of `fleet` in `devices` (the operator's list), by UUID. Revoked devices are
/// no longer in any fleet and are left out; offline ones are left out with `online_only`,
/// planned as offline rows otherwise.
pub fn select(
    devices: &[DeviceInfo],
    fleet: &str,
    online_only: bool,
    now: OffsetDateTime,
) -> Result<Vec<Planned>, SelectError> {
    let mut members: Vec<&DeviceInfo> = devices
        .iter()
        .filter(|d| d.fleet == fleet && d.revoked_at.is_none())
        .collect();
    if members.is_empty() {
        let others: BTreeSet<&str> = devices
            .iter()
            .filter(|d| d.revoked_at.is_none())
            .map(|d| d.fleet.as_str())
            .collect();
        return Err(SelectError::NoDevices {
            fleet: fleet.to_owned(),
            others: others.into_iter().map(str::to_owned).collect(),
        });
    }
    members.sort_by_key(|d| d.uuid);
    let enrolled = members.len();
    let planned: Vec<Planned> = members
        .into_iter()
        .filter(|d| d.online || !online_only)
        .map(|d| {
            if d.online {
                Planned::Try(d.uuid)
            } else {
                Planned::Offline {
                    uuid: d.uuid,
                    reason: offline_reason(&d.uuid, d.last_seen, now),
                }
            }
        })
        .collect();
    if planned.is_empty() {
        return Err(SelectError::NoneOnline {
            fleet: fleet.to_owned(),
            enrolled,
        });
    }
    Ok(planned)
}

/// "device ... is offline (last seen 4m 12s ago)", to the second under an hour, to the
/// minute above.
pub fn offline_reason(
    uuid: &DeviceId,
    last_seen: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> String {
    let when = match last_seen {
        None => "never seen".to_owned(),
        Some(t) => {
            let secs = u64::try_from((now - t).whole_seconds()).unwrap_or(0);
            let secs = if secs < 3600 { secs } else { secs / 60 * 60 };
            format!(
                "last seen {} ago",
                humantime::format_duration(Duration::from_secs(secs))
            )
        }
    };
    format!("device {uuid} is offline ({when})")
}

/// How one device's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ssh ran and exited with this status: the command's, ssh's own 255 when it could not
    /// log in, or 128 + the signal that ended it.
    Exited(u8),
    /// The device list shows it offline: not tried.
    Offline { reason: String },
    /// No result within the timeout; ssh was killed.
    TimedOut { after: Duration },
    /// The server refused the certificate, or the broker the session, with its reason.
    Refused { reason: String },
    /// Anything else: the server or broker unreachable, ssh not runnable, I/O.
    Failed { reason: String },
}

impl Outcome {
    /// The STATUS column: the exit code, or `offline`, `timeout`, `refused`, `error`.
    pub fn status(&self) -> String {
        match self {
            Self::Exited(code) => code.to_string(),
            Self::Offline { .. } => "offline".to_owned(),
            Self::TimedOut { .. } => "timeout".to_owned(),
            Self::Refused { .. } => "refused".to_owned(),
            Self::Failed { .. } => "error".to_owned(),
        }
    }

    /// The command ran and exited 0.
    pub fn is_ok(&self) -> bool {
        *self == Self::Exited(0)
    }

    /// Why the command did not run to an exit status.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Exited(_) => None,
            Self::Offline { reason } | Self::Refused { reason } | Self::Failed { reason } => {
                Some(reason.clone())
            }
            Self::TimedOut { after } => Some(format!(
                "no result within {}; ssh was killed",
                humantime::format_duration(*after)
            )),
        }
    }
}

/// One device's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub uuid: DeviceId,
    pub outcome: Outcome,
    /// From the start of its turn; zero for a device not tried.
    pub duration: Duration,
    /// The first non-blank line of its stdout, else of its stderr (where ssh says why it
    /// could not log in).
    pub first_line: Option<String>,
}

impl Row {
    /// The OUTPUT column: the first line of output for a command that ran, the reason
    /// otherwise.
    pub fn output(&self) -> String {
        self.outcome
            .reason()
            .or_else(|| self.first_line.clone())
            .unwrap_or_default()
    }
}

/// The columns of [`table`] and the least width of each; the last is not padded.
const COLUMNS: [(&str, usize); 4] = [("UUID", 38), ("STATUS", 9), ("DURATION", 10), ("OUTPUT", 0)];

/// The rows as `floto exec` prints them: a header line, then one line per row, in the
/// order given (by UUID, as [`run`] returns them).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    push_line(&mut out, COLUMNS.map(|(name, _)| name.to_owned()));
    for r in rows {
        let duration = match r.outcome {
            Outcome::Offline { .. } => "-".to_owned(),
            _ => format!("{:.1}s", r.duration.as_secs_f64()),
        };
        push_line(
            &mut out,
            [
                r.uuid.to_string(),
                r.outcome.status(),
                duration,
                printable(&r.output()),
            ],
        );
    }
    out
}

fn push_line(out: &mut String, cells: [String; COLUMNS.len()]) {
    let start = out.len();
    for (cell, (_, width)) in cells.iter().zip(COLUMNS) {
        let _ = write!(out, "{cell:<width$} ");
    }
    out.truncate(out[start..].trim_end().len() + start);
    out.push('\n');
}

/// One row of `--json`.
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    uuid: &'a DeviceId,
    /// As the STATUS column.
    status: String,
    /// The command ran and exited 0.
    ok: bool,
    exit_code: Option<u8>,
    duration_seconds: f64,
    /// The first line of output (stdout, else stderr), when the command ran.
    output: Option<&'a str>,
    /// Why it did not run to an exit status, in full.
    reason: Option<String>,
}

/// The rows as a JSON array, in the order given.
pub fn json(rows: &[Row]) -> serde_json::Result<String> {
    let rows: Vec<JsonRow<'_>> = rows
        .iter()
        .map(|r| JsonRow {
            uuid: &r.uuid,
            status: r.outcome.status(),
            ok: r.outcome.is_ok(),
            exit_code: match r.outcome {
                Outcome::Exited(code) => Some(code),
                _ => None,
            },
            duration_seconds: (r.duration.as_secs_f64() * 1000.0).round() / 1000.0,
            output: r.first_line.as_deref(),
            reason: r.outcome.reason(),
        })
        .collect();
    serde_json::to_string_pretty(&rows)
}

/// The exit status of the run: [`ALL_OK`] only when every device ran the command and it
/// exited 0, [`SOME_FAILED`] otherwise (offline, timeout, refused and error rows count as
/// failed).
pub fn exit_status(rows: &[Row]) -> u8 {
    if !rows.is_empty() && rows.iter().all(|r| r.outcome.is_ok()) {
        ALL_OK
    } else {
        SOME_FAILED
    }
}

/// One line for stderr: "20 devices: 15 ok, 5 offline".
pub fn summary(rows: &[Row]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for r in rows {
        let kind = match r.outcome {
            Outcome::Exited(0) => "ok",
            Outcome::Exited(_) => "failed",
            Outcome::Offline { .. } => "offline",
            Outcome::TimedOut { .. } => "timeout",
            Outcome::Refused { .. } => "refused",
            Outcome::Failed { .. } => "error",
        };
        match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((kind, 1)),
        }
    }
    let order = ["ok", "failed", "offline", "timeout", "refused", "error"];
    counts.sort_by_key(|(k, _)| order.iter().position(|o| o == k));
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let noun = if rows.len() == 1 { "device" } else { "devices" };
    format!("{} {noun}: {}", rows.len(), parts.join(", "))
}

/// Where `--output-dir` keeps a device's stdout and stderr: `<uuid>.out`, `<uuid>.err`.
pub fn output_paths(dir: &Path, uuid: &DeviceId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{uuid}.out")),
        dir.join(format!("{uuid}.err")),
    )
}

/// The first non-blank line of some output, as text.
pub fn first_line(head: &[u8]) -> Option<String> {
    String::from_utf8_lossy(head)
        .lines()
        .map(str::trim_end)
        .find(|l| !l.trim().is_empty())
        .map(str::to_owned)
}

/// Text from a device or the server made safe for a terminal line: control characters
/// (escapes, carriage returns) become `?`, tabs spaces.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect()
}

/// The outcome of a session that could not be opened.
fn open_failure(e: &OpenError) -> Outcome {
    match e {
        OpenError::Broker(BrokerError::Refused(r)) => Outcome::Refused {
            reason: r.message.clone(),
        },
        OpenError::Certificate(c)
            if matches!(
                c.downcast_ref::<ClientError>(),
                Some(ClientError::Api { .. })
            ) =>
        {
            Outcome::Refused {
                reason: format!("no SSH certificate: {c:#}"),
            }
        }
        e => Outcome::Failed {
            reason: format!("{e:#}"),
        },
    }
}

/// What every device's session shares.
struct Shared {
    op: Operator,
    files: SshFiles,
    options: Options,
}

/// Runs the command on the fleet's devices and returns one row per device, by UUID. An
/// error means nothing was run (no rows): the list could not be had, the fleet has no
/// devices to run on, the output dir or the SSH key could not be made.
pub async fn run(op: &Operator, files: SshFiles, options: Options) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(!options.command.is_empty(), "no command given (after --)");
    let devices = op
        .api()?
        .devices(None)
        .await
        .context("listing the devices")?;
    let plan = select(
        &devices,
        &options.fleet,
        options.online_only,
        OffsetDateTime::now_utc(),
    )?;
    if let Some(dir) = &options.output_dir {
        floto_files::create_private_dir(dir)?;
    }
    // A key that cannot be made fails the run once, not every row.
    files.ensure_key()?;
    let parallel = options.parallel.max(1);
    let shared = Arc::new(Shared {
        op: op.clone(),
        files,
        options,
    });
    let turns = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut rows = Vec::with_capacity(plan.len());
    let mut running = tokio::task::JoinSet::new();
    let mut devices_of_tasks = std::collections::HashMap::new();
    for planned in plan {
        let uuid = match planned {
            Planned::Offline { uuid, reason } => {
                rows.push(Row {
                    uuid,
                    outcome: Outcome::Offline { reason },
                    duration: Duration::ZERO,
                    first_line: None,
                });
                continue;
            }
            Planned::Try(uuid) => uuid,
        };
        // A device's time starts with its turn.
        let turn = turns.clone().acquire_owned().await?;
        let shared = shared.clone();
        let task = running.spawn(async move {
            let row = run_device(&shared, uuid).await;
            drop(turn);
            row
        });
        devices_of_tasks.insert(task.id(), uuid);
    }
    while let Some(joined) = running.join_next_with_id().await {
        match joined {
            Ok((_, row)) => rows.push(row),
            Err(e) => {
                // Every task's id was recorded as it was spawned.
                let Some(&uuid) = devices_of_tasks.get(&e.id()) else {
                    anyhow::bail!("a task of floto exec failed: {e}");
                };
                rows.push(Row {
                    uuid,
                    outcome: Outcome::Failed {
                        reason: format!("floto's task for the device failed: {e}"),
                    },
                    duration: Duration::ZERO,
                    first_line: None,
                });
            }
        }
    }
    rows.sort_by_key(|r| r.uuid);
    Ok(rows)
}

#[instrument(skip_all, fields(device = %uuid))]
async fn run_device(shared: &Shared, uuid: DeviceId) -> Row {
    let started = Instant::now();
    let deadline = started + shared.options.timeout;
    let (outcome, first_line) = match attempt(shared, uuid, deadline).await {
        Ok((outcome, first_line)) => (outcome, first_line),
        Err(outcome) => (outcome, None),
    };
    let duration = started.elapsed();
    debug!(status = %outcome.status(), ?duration, "device done");
    Row {
        uuid,
        outcome,
        duration,
        first_line,
    }
}

/// Certificate, broker session, ssh, killed at `deadline`: how it ended and the first line
/// of its output, or (`Err`) how it ended before ssh could start.
async fn attempt(
    shared: &Shared,
    uuid: DeviceId,
    deadline: Instant,
) -> Result<(Outcome, Option<String>), Outcome> {
    let o = &shared.options;
    let timed_out = Outcome::TimedOut { after: o.timeout };
    let open = Session::open(
        &shared.op,
        &shared.files,
        &uuid,
        &o.login,
        o.port,
        o.transport,
        false,
    );
    let mut session = match tokio::time::timeout_at(deadline, open).await {
        Err(_) => return Err(timed_out),
        Ok(Err(e)) => return Err(open_failure(&e)),
        Ok(Ok(s)) => s,
    };
    let host = session.host().to_owned();
    session
        .command()
        // No terminal, no prompts, no "Permanently added" notes in the output.
        .args(["-T", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
        // Everything after the destination is the remote command, never ssh options.
        .arg("--")
        .arg(host)
        .args(&o.command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let files = match &o.output_dir {
        None => (None, None),
        Some(dir) => {
            let (out, err) = output_paths(dir, &uuid);
            let open = |p: PathBuf| async move {
                tokio::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&p)
                    .await
                    .map_err(|e| Outcome::Failed {
                        reason: format!("cannot write {}: {e}", p.display()),
                    })
            };
            (Some(open(out).await?), Some(open(err).await?))
        }
    };
    let (mut child, splice) = session.spawn().map_err(|e| Outcome::Failed {
        reason: e.to_string(),
    })?;
    let stdout = child
        .stdout
        .take()
        .map(|s| tokio::spawn(capture(s, files.0)));
    let stderr = child
        .stderr
        .take()
        .map(|s| tokio::spawn(capture(s, files.1)));
    let outcome = match tokio::time::timeout_at(deadline, splice.run(&mut child)).await {
        Ok(Ok(status)) => Outcome::Exited(ssh::exit_code(status)),
        Ok(Err(e)) => Outcome::Failed {
            reason: format!("ssh: {e}"),
        },
        Err(_) => {
            // The splice is dropped: the ProxyCommand sees its socket close and ends.
            let _ = child.kill().await;
            timed_out
        }
    };
    let mut heads = Vec::new();
    for task in [stdout, stderr] {
        let head = match task {
            Some(mut task) => match tokio::time::timeout(DRAIN, &mut task).await {
                Ok(Ok(head)) => head,
                Ok(Err(_)) => Vec::new(),
                Err(_) => {
                    task.abort();
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        heads.push(head);
    }
    let first = first_line(&heads[0]).or_else(|| first_line(&heads[1]));
    Ok((outcome, first))
}

/// Reads `from` to its end, writing everything to `to` (when given); returns the first
/// [`HEAD`] bytes.
async fn capture(mut from: impl AsyncRead + Unpin, mut to: Option<tokio::fs::File>) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let keep = n.min(HEAD - head.len());
        head.extend_from_slice(&buf[..keep]);
        if let Some(file) = &mut to {
            if let Err(e) = file.write_all(&buf[..n]).await {
                debug!(error = %e, "cannot save the output; going on without the file");
                to = None;
            }
        }
    }
    if let Some(mut file) = to {
        let _ = file.flush().await;
    }
    head
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use floto_proto::WgKey;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2025-06-01 10:00:00 UTC);

    fn uuid(n: u8) -> DeviceId {
        format!("00000000-0000-4000-8000-0000000000{n:02x}")
            .parse()
            .unwrap()
    }

    fn device(n: u8, fleet: &str, online: bool) -> DeviceInfo {
        DeviceInfo {
            uuid: uuid(n),
            fleet: fleet.into(),
            overlay_ip: [10, 240, 0, n].into(),
            wg_public_key: WgKey([n; 32]),
            online,
            online_since: None,
            last_seen: Some(datetime!(2025-06-01 09:55:48 UTC)),
            endpoint: None,
            generation: 1,
            rx_bytes: 0,
            tx_bytes: 0,
            cert_serial: "01".into(),
            cert_expires_at: datetime!(2025-07-01 10:00:00 UTC),
            created_at: datetime!(2025-05-01 10:00:00 UTC),
            revoked_at: None,
            device_type: None,
            hostname: None,
            node: None,
            transport: None,
        }
    }

    fn row(n: u8, outcome: Outcome, first_line: Option<&str>) -> Row {
        Row {
            uuid: uuid(n),
            outcome,
            duration: Duration::from_millis(1234),
            first_line: first_line.map(str::to_owned),
        }
    }

    #[test]
    fn the_fleets_devices_by_uuid_offline_ones_as_rows() {
        let revoked = DeviceInfo {
            revoked_at: Some(NOW),
            ..device(4, "lab", false)
        };
        let list = [
            device(3, "lab", true),
            device(9, "field", true),
            device(1, "lab", false),
            revoked,
            device(2, "lab", true),
        ];
        let plan = select(&list, "lab", false, NOW).unwrap();
        assert_eq!(
            plan,
            [
                Planned::Offline {
                    uuid: uuid(1),
                    reason: format!("device {} is offline (last seen 4m 12s ago)", uuid(1)),
                },
                Planned::Try(uuid(2)),
                Planned::Try(uuid(3)),
            ]
        );
        // --online: no row at all for the offline one.
        let plan = select(&list, "lab", true, NOW).unwrap();
        assert_eq!(plan, [Planned::Try(uuid(2)), Planned::Try(uuid(3))]);
    }

    #[test]
    fn nothing_to_run_says_why() {
        let list = [device(1, "lab", false), device(2, "field", true)];
        let e = select(&list, "pumps", false, NOW).unwrap_err();
        assert_eq!(
            e.to_string(),
            "fleet \"pumps\" has no devices you may see (you see devices of: field, lab)"
        );
        assert_eq!(
            select(&[], "pumps", false, NOW).unwrap_err().to_string(),
            "fleet \"pumps\" has no devices you may see"
        );
        let e = select(&list, "lab", true, NOW).unwrap_err();
        assert_eq!(
            e.to_string(),
            "fleet \"lab\" has no online devices (1 enrolled, all offline); run without --online to list them"
        );
    }

    #[test]
    fn offline_reasons() {
        let id = uuid(1);
        assert_eq!(
            offline_reason(&id, None, NOW),
            format!("device {id} is offline (never seen)")
        );
        assert_eq!(
            offline_reason(&id, Some(datetime!(2025-06-01 07:29:59 UTC)), NOW),
            format!("device {id} is offline (last seen 2h 30m ago)")
        );
        // A clock behind the server's: not "ago" in the future.
        assert_eq!(
            offline_reason(&id, Some(datetime!(2025-06-01 10:00:05 UTC)), NOW),
            format!("device {id} is offline (last seen 0s ago)")
        );
    }

    #[test]
    fn rows_line_up_under_their_headers() {
        let rows = [
            row(1, Outcome::Exited(0), Some("dev-1")),
            row(2, Outcome::Exited(3), Some("no such file")),
            Row {
                duration: Duration::ZERO,
                ..row(
                    3,
                    Outcome::Offline {
                        reason: "device 3 is offline (never seen)".into(),
                    },
                    None,
                )
            },
            row(
                4,
                Outcome::TimedOut {
                    after: Duration::from_secs(20),
                },
                Some("partial"),
            ),
            row(5, Outcome::Exited(0), None),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "UUID                                   STATUS    DURATION   OUTPUT"
        );
        assert_eq!(
            lines[1],
            format!("{}   0         1.2s       dev-1", uuid(1))
        );
        assert_eq!(
            lines[3],
            format!(
                "{}   offline   -          device 3 is offline (never seen)",
                uuid(3)
            )
        );
        assert_eq!(
            lines[4],
            format!(
                "{}   timeout   1.2s       no result within 20s; ssh was killed",
                uuid(4)
            )
        );
        // No output: no trailing spaces.
        assert_eq!(lines[5], format!("{}   0         1.2s", uuid(5)));
        let at = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(at(lines[2], " 3 ") + 1, at(lines[0], "STATUS"));
        assert_eq!(at(lines[2], "no such"), at(lines[0], "OUTPUT"));
    }

    #[test]
    fn device_output_cannot_drive_the_terminal() {
        let r = row(1, Outcome::Exited(0), Some("\u{1b}[2Jhi\tthere\r"));
        let text = table(&[r]);
        assert!(
            text.lines().nth(1).unwrap().ends_with("?[2Jhi there?"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn the_first_line_is_the_first_with_text() {
        assert_eq!(first_line(b"\n  \nhello\r\nworld\n"), Some("hello".into()));
        assert_eq!(first_line(b"only"), Some("only".into()));
        assert_eq!(first_line(b"\n\n"), None);
        assert_eq!(first_line(b""), None);
        // Not UTF-8: still a line.
        assert_eq!(first_line(b"a\xffb\n"), Some("a\u{fffd}b".into()));
    }

    #[test]
    fn exit_status_is_0_only_when_every_device_exited_0() {
        let ok = || row(1, Outcome::Exited(0), None);
        assert_eq!(exit_status(&[ok(), ok()]), ALL_OK);
        for failed in [
            Outcome::Exited(1),
            Outcome::Exited(255),
            Outcome::Offline { reason: "x".into() },
            Outcome::TimedOut {
                after: Duration::from_secs(1),
            },
            Outcome::Refused { reason: "x".into() },
            Outcome::Failed { reason: "x".into() },
        ] {
            assert_eq!(
                exit_status(&[ok(), row(2, failed.clone(), None)]),
                SOME_FAILED,
                "{failed:?}"
            );
        }
        assert_eq!(exit_status(&[]), SOME_FAILED, "nothing ran is not success");
        assert_ne!(SOME_FAILED, NOTHING_RAN);
    }

    #[test]
    fn json_has_the_same_facts_and_the_full_reason() {
        let rows = [
            row(1, Outcome::Exited(0), Some("dev-1")),
            row(
                2,
                Outcome::Refused {
                    reason: "device 2 is offline (last seen 3s ago)".into(),
                },
                None,
            ),
        ];
        let v: serde_json::Value = serde_json::from_str(&json(&rows).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"uuid": uuid(1).to_string(), "status": "0", "ok": true, "exit_code": 0,
                 "duration_seconds": 1.234, "output": "dev-1", "reason": null},
                {"uuid": uuid(2).to_string(), "status": "refused", "ok": false, "exit_code": null,
                 "duration_seconds": 1.234, "output": null,
                 "reason": "device 2 is offline (last seen 3s ago)"},
            ])
        );
    }

    #[test]
    fn summaries_count_by_kind() {
        let rows = [
            row(1, Outcome::Offline { reason: "x".into() }, None),
            row(2, Outcome::Exited(0), None),
            row(3, Outcome::Exited(0), None),
            row(4, Outcome::Exited(2), None),
        ];
        assert_eq!(summary(&rows), "4 devices: 2 ok, 1 failed, 1 offline");
        assert_eq!(summary(&rows[1..2]), "1 device: 1 ok");
    }

    #[test]
    fn output_files_are_named_by_uuid() {
        let (out, err) = output_paths(Path::new("/tmp/run"), &uuid(1));
        assert_eq!(out, Path::new(&format!("/tmp/run/{}.out", uuid(1))));
        assert_eq!(err, Path::new(&format!("/tmp/run/{}.err", uuid(1))));
    }

    #[test]
    fn refusals_are_told_from_failures() {
        use floto_proto::{ApiError, ErrorCode};
        let api = |code, message: &str| ApiError {
            error: code,
            message: message.into(),
        };
        let refused = OpenError::Broker(BrokerError::Refused(api(
            ErrorCode::Unavailable,
            "device x is offline (last seen 1s ago)",
        )));
        assert_eq!(
            open_failure(&refused),
            Outcome::Refused {
                reason: "device x is offline (last seen 1s ago)".into()
            }
        );
        let unreachable = OpenError::Broker(BrokerError::Transport("no route".into()));
        assert_eq!(open_failure(&unreachable).status(), "error");
        let forbidden = OpenError::Certificate(
            ClientError::Api {
                status: 403,
                error: api(ErrorCode::Forbidden, "login \"root\" is not allowed"),
            }
            .into(),
        );
        assert_eq!(
            open_failure(&forbidden),
            Outcome::Refused {
                reason: "no SSH certificate: login \"root\" is not allowed (HTTP 403)".into()
            }
        );
        let down = OpenError::Certificate(
            ClientError::Transport {
                server: "https://s".into(),
                detail: "connection refused".into(),
            }
            .into(),
        );
        assert_eq!(open_failure(&down).status(), "error");
    }

    #[tokio::test]
    async fn capture_keeps_the_head_and_saves_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.out");
        let file = tokio::fs::File::create(&path).await.unwrap();
        let data: Vec<u8> = (0..3 * HEAD).map(|i| b'a' + (i % 26) as u8).collect();
        let head = capture(&data[..], Some(file)).await;
        assert_eq!(head, data[..HEAD]);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
