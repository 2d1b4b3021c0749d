//! floto-e2e: end-to-end tests of floto-connect with real peers: the real binaries,
//! wireguard-go and `wg` as devices, OpenSSH, curl and openssl, inside network namespaces
//! the tests create and delete. This library is the harness; the tests are in `tests/`.
//!
//! Tests that need root or packages fail loudly when they are missing; they never pass by
//! skipping.
#![allow(clippy::print_stderr, clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod api;
pub mod device;
pub mod enroll;
pub mod fleet;
pub mod net;
pub mod ping;
pub mod server;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The directory with the workspace's built binaries: next to the running program
/// (`target/<profile>/`), or its parent for test binaries (`target/<profile>/deps/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FLOTO_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Path of one of our binaries; panics with the command to build it when it is missing or
/// older than the sources it is built from (so a test never runs stale code).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: build the binaries first (`cargo build --workspace --bins`, as tools/test.sh does)",
                path.display()
            )
        });
    if let Some((newest, file)) = newest_source(name) {
        assert!(
            newest <= built,
            "{} is older than {}: rebuild with `cargo build --workspace --bins` before running the e2e tests",
            path.display(),
            file.display()
        );
    }
    path
}

/// The most recently modified of the sources a binary was built from, as cargo's dep-info
/// file next to it (`target/<profile>/<binary>.d`) lists them.
fn newest_source(binary: &str) -> Option<(std::time::SystemTime, PathBuf)> {
    let dep_info = std::fs::read_to_string(bin_dir().join(format!("{binary}.d"))).ok()?;
    let (_, deps) = dep_info.lines().next()?.split_once(": ")?;
    // Paths are separated by spaces; a space inside a path is escaped as `\ `.
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for path in deps
        .replace("\\ ", "\u{0}")
        .split(' ')
        .filter(|p| !p.is_empty())
    {
        let path = PathBuf::from(path.replace('\u{0}', " "));
        if let Ok(t) = std::fs::metadata(&path).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                newest = Some((t, path));
            }
        }
    }
    newest
}

/// Panics, loudly, unless we are root (network namespaces and TUN devices need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this end-to-end test needs root (network namespaces, TUN devices); run the suite as root (tools/test.sh)"
    );
}

/// Panics, loudly, unless every tool is installed.
pub fn require(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "this end-to-end test needs {missing:?}, which are not installed; tools/test.sh installs them when run as root"
    );
}

/// `floto --config-dir DIR`: the operator CLI with its own config.
pub fn floto(config_dir: &std::path::Path) -> Command {
    let mut c = Command::new(bin("floto"));
    c.arg("--config-dir").arg(config_dir);
    c
}

/// Options that make OpenSSH's client non-interactive for tests.
pub fn ssh_opts(key: &std::path::Path) -> Vec<String> {
    [
        "-i",
        &key.display().to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Finds a program on PATH (and in the sbin directories, which a non-login PATH may lack).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| PathBuf::from(d).join(program))
        .find(|p| p.is_file());
    found
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "command failed: {cmd:?}\nstatus: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command to completion and returns its output, whatever the status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout as a trimmed string.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The last line of stdout (where commands print new secrets).
pub fn last_line(out: &Output) -> String {
    stdout(out).lines().last().unwrap_or_default().to_owned()
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Child {
    pub name: String,
    pub inner: std::process::Child,
    log: PathBuf,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr going to a log file.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &std::path::Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdout(file.try_clone().expect("log file")).stderr(file);
        let inner = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_owned(),
            inner,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe {
            libc::kill(self.inner.id() as i32, sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }

    /// SIGTERM, then wait up to `grace` before SIGKILL. Returns the exit status if it exited.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(status)) = self.inner.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log());
        }
    }
}
