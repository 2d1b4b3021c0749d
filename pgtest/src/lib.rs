//! floto-pgtest: a throwaway PostgreSQL server for tests. `initdb` into a temporary
//! directory, `postgres` listening on a Unix socket only (no TCP port to collide on), run as
//! the `postgres` user when the test runs as root (PostgreSQL refuses root), stopped and
//! removed when dropped. Nothing is mocked: this is the PostgreSQL the cluster runs on
//! (Debian's `postgresql` package; `tools/test.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The port in the socket's name (`.s.PGSQL.<port>`); no TCP port is opened.
const PORT: u16 = 5432;

/// A running throwaway PostgreSQL.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// uid/gid the server runs as (`postgres` when we are root).
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

/// Why no PostgreSQL could be started; the message says what to install or fix.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Postgres {
    /// Initialises and starts a server. Panics with the reason when PostgreSQL is not
    /// installed or does not start: a test that needs it must not pass without it.
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("no PostgreSQL for this test: {e}"))
    }

    pub fn try_start() -> Result<Self, Unavailable> {
        let bin = find_bin_dir()?;
        let owner = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("floto-pg-")
            .tempdir()
            .map_err(|e| Unavailable(format!("temporary directory: {e}")))?;
        if let Some((uid, gid)) = owner {
            chown(dir.path(), uid, gid)?;
        }
        let mut pg = Self {
            bin,
            dir,
            owner,
            child: None,
        };
        let out = pg
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "-D"])
            .arg(pg.data_dir())
            .output()
            .map_err(|e| Unavailable(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(Unavailable(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        pg.launch()?;
        Ok(pg)
    }

    /// The URL of database `name` (see [`Postgres::create_database`]), for sqlx and for
    /// `--database-url`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}&port={PORT}",
            self.socket_dir().display()
        )
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs one SQL command as the superuser on database `postgres`; panics if it fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on("postgres", sql)
    }

    /// Runs one SQL command as the superuser on database `db`; panics if it fails.
    pub fn psql_on(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &PORT.to_string(), "-d", db, "-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops the server abruptly (SIGQUIT: no checkpoint, like a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data and socket.
    pub fn restart(&mut self) {
        self.kill();
        self.launch()
            .unwrap_or_else(|e| panic!("restarting PostgreSQL: {e}"));
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn launch(&mut self) -> Result<(), Unavailable> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .map_err(|e| Unavailable(format!("server log: {e}")))?;
        if let Some((uid, gid)) = self.owner {
            chown(&self.dir.path().join("log"), uid, gid)?;
        }
        let stderr = log
            .try_clone()
            .map_err(|e| Unavailable(format!("server log: {e}")))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-p", &PORT.to_string()])
            // Unix socket only; a throwaway server need not survive a power cut.
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args([
                "-c",
                "max_connections=200",
                "-c",
                "log_min_messages=warning",
            ])
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| Unavailable(format!("starting postgres: {e}")))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.socket_dir())
                .args(["-p", &PORT.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(Unavailable(format!(
                    "postgres exited ({status}): {}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(Unavailable(format!(
                    "postgres not ready after 60 s: {}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PostgreSQL program, as the server's owner.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(gid).env("HOME", self.dir.path());
            // The postgres user may not be able to enter the caller's directory.
            cmd.current_dir(self.dir.path());
        }
        cmd.stdin(Stdio::null());
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fast shutdown: disconnect clients, no waiting for them.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), or `FLOTO_PG_BIN`.
fn find_bin_dir() -> Result<PathBuf, Unavailable> {
    if let Some(dir) = std::env::var_os("FLOTO_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            Unavailable(
                "PostgreSQL is not installed (/usr/lib/postgresql is missing): \
                 `apt-get install postgresql`, or run tools/test.sh, which installs it"
                    .into(),
            )
        })?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| Unavailable("no /usr/lib/postgresql/<version>/bin/postgres".into()))
}

/// The `postgres` user's uid and gid (the Debian package creates it).
fn postgres_user() -> Result<(u32, u32), Unavailable> {
    let name = c"postgres";
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(Unavailable(
            "running as root, but there is no `postgres` user to run PostgreSQL as \
             (it refuses root); install Debian's postgresql package"
                .into(),
        ));
    }
    let pw = unsafe { &*pw };
    Ok((pw.pw_uid, pw.pw_gid))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), Unavailable> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| Unavailable(format!("chown {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_survives_a_crash_and_is_removed() {
        let mut pg = Postgres::start();
        let url = pg.create_database("t");
        assert!(url.starts_with("postgres://"), "{url}");
        pg.psql_on("t", "CREATE TABLE x (v int); INSERT INTO x VALUES (7)");
        pg.restart();
        assert_eq!(pg.psql_on("t", "SELECT v FROM x"), "7");
        let dir = pg.dir.path().to_owned();
        drop(pg);
        assert!(!dir.exists(), "the data directory is removed");
    }
}
