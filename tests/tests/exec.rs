//! `floto exec` on a fleet of 20: 15 wireguard-go devices online, each in its own
//! namespace with a real sshd that has no keys and trusts only the server's user CA, and 5
//! enrolled but never connected. One row per device, by UUID, each online device's own
//! output in its row and in `--output-dir`, the offline ones said offline, the exit status,
//! `--json`, `--online`, the per-device timeout, and an operator who sees no device of the
//! fleet.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use floto_e2e::device::WgGoDevice;
use floto_e2e::net::Netns;
use floto_e2e::server::Server;
use floto_e2e::{bin, floto, last_line, output, require, require_root, run, stdout, wait_for};

const TOOLS: &[&str] = &["wireguard-go", "wg", "sshd", "ssh", "ssh-keygen", "ss"];
const ONLINE: usize = 15;
const OFFLINE: usize = 5;

/// Each device's sshd gives sessions the device's own dir as HOME, where the test leaves
/// the device's UUID: what a device prints says which device it is.
const PRINT_UUID: &str = "cat \"$HOME/uuid\"";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `floto exec ARGS`, timed.
fn exec(cfg: &Path, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = output(floto(cfg).arg("exec").args(args));
    let took = started.elapsed();
    eprintln!(
        "floto exec {args:?}: {:?} in {took:.1?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    (out, took)
}

/// The table's rows (header checked and dropped), as (uuid, status, duration, output);
/// the output's words joined by single spaces.
fn rows(out: &Output) -> Vec<(String, String, String, String)> {
    let text = stdout(out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["UUID", "STATUS", "DURATION", "OUTPUT"]);
    lines
        .map(|l| {
            let mut words = l.split_whitespace();
            let uuid = words.next().unwrap().to_owned();
            let status = words.next().unwrap().to_owned();
            let duration = words.next().unwrap().to_owned();
            let rest: Vec<&str> = words.collect();
            (uuid, status, duration, rest.join(" "))
        })
        .collect()
}

/// Seconds of a DURATION cell (`1.2s`).
fn seconds(cell: &str) -> f64 {
    cell.strip_suffix('s').unwrap().parse().unwrap()
}

/// A device enrolled from the host (over loopback) that never brings its tunnel up.
fn enroll_offline(server: &Server, key: &str, state: &Path) -> String {
    last_line(&run(Command::new(bin("floto-tunnel"))
        .arg("enroll")
        .arg("--server")
        .arg(server.local_url())
        .arg("--ca")
        .arg(server.ca_path())
        .arg("--provisioning-key")
        .arg(key)
        .arg("--state-dir")
        .arg(state)))
}

#[test]
fn exec_runs_on_every_online_device_and_says_which_are_offline() {
    require_root();
    require(TOOLS);
    let setup = Instant::now();
    let nss: Vec<Netns> = (0..ONLINE).map(|_| Netns::new()).collect();
    let names: Vec<String> = nss.iter().map(|n| n.host_ip().to_string()).collect();
    let server = Server::start(&["--tls-name", &names.join(",")]);
    let key = server.create_key("lab", None);
    let dirs = tempfile::tempdir().unwrap();

    // The devices' sshd trust the user CA and have no keys at all.
    let shown = server.admin(&["ssh-ca", "show", "--user"]);
    assert!(shown.status.success(), "{shown:?}");
    let ca_file = dirs.path().join("user_ca.pub");
    std::fs::write(&ca_file, stdout(&shown)).unwrap();
    let sshd_extra = format!("TrustedUserCAKeys {}\n", ca_file.display());
    let devices: Vec<WgGoDevice> = std::thread::scope(|s| {
        let started: Vec<_> = nss
            .into_iter()
            .map(|ns| {
                let (server, key, extra) = (&server, &key, &sshd_extra);
                s.spawn(move || {
                    let mut d = WgGoDevice::enroll(ns, server, key);
                    std::fs::write(d.dir.path().join("uuid"), format!("{}\n", d.uuid)).unwrap();
                    d.up();
                    d.start_sshd_with("", extra);
                    d
                })
            })
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let offline: Vec<String> = (0..OFFLINE)
        .map(|i| enroll_offline(&server, &key, &dirs.path().join(format!("offline-{i}"))))
        .collect();
    // A device of another fleet the operator also sees: never part of the run.
    let field_key = server.create_key("field", None);
    let elsewhere = enroll_offline(&server, &field_key, &dirs.path().join("field"));
    for d in &devices {
        server.wait_online(&d.uuid, true, Duration::from_secs(30));
    }
    let alice = dirs.path().join("alice");
    server.login_operator("alice", "operator", &["lab", "field"], &alice);
    let online: BTreeSet<String> = devices.iter().map(|d| d.uuid.clone()).collect();
    let all: BTreeSet<String> = online.iter().chain(&offline).cloned().collect();
    eprintln!("setup: {:.1?}", setup.elapsed());

    // 1. The acceptance run: 20 rows by UUID, 15 ran with exit 0, 5 offline; exit 1.
    let out_dir = dirs.path().join("out");
    let command = format!("{PRINT_UUID}; echo second line; echo on-stderr >&2");
    let (out, took) = exec(
        &alice,
        &[
            "--fleet",
            "lab",
            "--parallel",
            "5",
            "--timeout",
            "20s",
            "--output-dir",
            out_dir.to_str().unwrap(),
            "--",
            &command,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let table = rows(&out);
    let uuids: Vec<String> = table.iter().map(|r| r.0.clone()).collect();
    assert_eq!(
        uuids,
        all.iter().cloned().collect::<Vec<_>>(),
        "every device once, by UUID"
    );
    assert!(!uuids.contains(&elsewhere));
    for (uuid, status, duration, first) in &table {
        if online.contains(uuid) {
            assert_eq!(status, "0", "{uuid}");
            assert_eq!(first, uuid, "the row of {uuid} has its own output");
            assert!(seconds(duration) < 20.0, "{uuid} took {duration}");
        } else {
            assert_eq!(status, "offline", "{uuid}");
            assert_eq!(duration, "-");
            assert_eq!(first, &format!("device {uuid} is offline (never seen)"));
        }
    }
    assert!(
        stderr(&out).contains("20 devices: 15 ok, 5 offline"),
        "{}",
        stderr(&out)
    );
    // 15 sessions, 5 at a time, well inside one per-device timeout.
    assert!(took < Duration::from_secs(20), "took {took:?}");

    // Each session's stdout and stderr, in files only the operator reads.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&out_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    for uuid in &online {
        let read = |ext: &str| std::fs::read_to_string(out_dir.join(format!("{uuid}.{ext}")));
        assert_eq!(read("out").unwrap(), format!("{uuid}\nsecond line\n"));
        assert_eq!(read("err").unwrap(), "on-stderr\n", "no ssh notes");
    }
    let mut saved: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    saved.sort();
    assert_eq!(
        saved.len(),
        2 * ONLINE,
        "files only for devices that ran: {saved:?}"
    );

    // Every session was audited as any other: a certificate and a broker session each.
    let audited = |action: &str| -> BTreeSet<String> {
        let out = server.admin(&["audit", "--json", "--operator", "alice", "--limit", "1000"]);
        let records: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        records
            .iter()
            .filter(|r| r["action"] == action)
            .map(|r| r["device"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(audited("ssh.certificate"), online);
    wait_for(
        Duration::from_secs(10),
        "a broker.session record per device",
        || (audited("broker.session") == online).then_some(()),
    );

    // 2. --json: the same facts; one device's command fails with its own status.
    let failing = devices[0].uuid.clone();
    let command = format!("{PRINT_UUID}; test \"$(cat \"$HOME/uuid\")\" != {failing}");
    let (out, _) = exec(&alice, &["--fleet", "lab", "--json", "--", &command]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.len(), ONLINE + OFFLINE);
    let json_uuids: Vec<&str> = json.iter().map(|r| r["uuid"].as_str().unwrap()).collect();
    assert_eq!(json_uuids, uuids);
    for r in &json {
        let uuid = r["uuid"].as_str().unwrap();
        if uuid == failing {
            assert_eq!(r["status"], "1");
            assert_eq!(r["exit_code"], 1);
            assert_eq!(r["ok"], false);
            assert_eq!(r["output"], uuid);
        } else if online.contains(uuid) {
            assert_eq!(r["status"], "0", "{r}");
            assert_eq!(r["ok"], true);
            assert_eq!(r["output"], uuid);
            assert_eq!(r["reason"], Value::Null);
            assert!(r["duration_seconds"].as_f64().unwrap() > 0.0);
        } else {
            assert_eq!(r["status"], "offline");
            assert_eq!(r["ok"], false);
            assert_eq!(r["exit_code"], Value::Null);
            assert!(r["reason"].as_str().unwrap().contains("is offline"), "{r}");
        }
    }

    // 3. --online: the 15, all exit 0, so floto exits 0.
    let (out, _) = exec(
        &alice,
        &[
            "--fleet",
            "lab",
            "--online",
            "--parallel",
            "15",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = rows(&out);
    assert_eq!(table.len(), ONLINE);
    for (uuid, status, _, printed) in &table {
        assert!(online.contains(uuid) && status == "0", "{uuid} {status}");
        // Nothing on stdout or stderr: not even the ProxyCommand's end.
        assert_eq!(printed, "", "{uuid}");
    }

    // 4. The per-device timeout: every session killed at 3 s, rows say so.
    let (out, took) = exec(
        &alice,
        &[
            "--fleet",
            "lab",
            "--online",
            "--parallel",
            "15",
            "--timeout",
            "3s",
            "--",
            "sleep 60",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let table = rows(&out);
    assert_eq!(table.len(), ONLINE);
    for (uuid, status, duration, why) in &table {
        assert_eq!(status, "timeout", "{uuid}");
        assert_eq!(why, "no result within 3s; ssh was killed");
        assert!(seconds(duration) < 6.0, "{uuid} took {duration}");
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // 5. An operator who sees no device of the fleet: nothing ran, 255, and why.
    let bob = dirs.path().join("bob");
    server.login_operator("bob", "operator", &["pumps"], &bob);
    let (out, _) = exec(&bob, &["--fleet", "lab", "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("fleet \"lab\" has no devices you may see"),
        "{}",
        stderr(&out)
    );
}
