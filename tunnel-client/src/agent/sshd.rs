//! The device's sshd, set up so that operators log in with certificates and devices are
//! verified by theirs: the agent sends sshd's public host keys at enrollment and renewal,
//! and installs what the server answers (host certificates, the user CA, the logins its
//! fleet allows) with an sshd drop-in:
//!
//! ```text
//! <sshd dir>/sshd_config.d/50-floto.conf   TrustedUserCAKeys, AuthorizedPrincipalsFile, HostCertificate
//! <sshd dir>/floto/user_ca.pub             the user CA
//! <sshd dir>/floto/<host key>-cert.pub     one host certificate per host key
//! <sshd dir>/floto/principals/<login>      the logins operators may use
//! ```
//!
//! A new configuration is checked with `sshd -t` before sshd is reloaded, and the previous
//! drop-in is put back when the check fails. A system whose `sshd_config` does not include
//! `sshd_config.d/*.conf` is left unchanged, with a message saying so. `--manage-sshd=false`
//! turns all of this off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use floto_pki::ssh::Certificate;
use floto_proto::ssh::DeviceSsh;

/// The drop-in's file name (read after most distributions' own drop-ins).
pub const DROP_IN: &str = "50-floto.conf";

/// How the agent manages sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshdConfig {
    /// sshd's configuration directory (`sshd_config`, the host keys, `sshd_config.d`).
    pub dir: PathBuf,
    /// A shell command that makes sshd read its configuration again; `None`: SIGHUP to the
    /// pid in `/run/sshd.pid`, else `systemctl reload ssh` (or `sshd`).
    pub reload: Option<String>,
    /// How often the agent asks the server for the user CA and its fleet's logins, so that
    /// a change reaches the device without waiting for a renewal.
    pub refresh: std::time::Duration,
}

/// Default of [`SshdConfig::refresh`].
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(300);

impl Default for SshdConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/etc/ssh"),
            reload: None,
            refresh: REFRESH,
        }
    }
}

/// Why sshd could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SshdError {
    #[error("{0}")]
    Io(#[from] floto_files::FileError),
    #[error("the server sent {certs} host certificates for {keys} host keys")]
    Mismatch { certs: usize, keys: usize },
    #[error("sshd refused the new configuration (the previous one is kept): {0}")]
    Invalid(String),
    #[error("reloading sshd failed (the new configuration is in place): {0}")]
    Reload(String),
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// Files changed; `reloaded` when sshd had to read its configuration again (the drop-in
    /// or a host certificate changed: the user CA and the principals files are read at each
    /// login).
    Changed { reloaded: bool },
    /// Everything was already in place.
    Unchanged,
    /// This system's sshd reads no drop-ins; nothing was touched.
    Unsupported(String),
}

/// sshd's public host keys in `dir` (`ssh_host_*_key.pub`), by file name, in name order.
pub fn host_keys(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut keys: Vec<(String, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".pub")?;
            (base.starts_with("ssh_host_") && base.ends_with("_key")).then_some(())?;
            let line = std::fs::read_to_string(e.path()).ok()?;
            let line = line.lines().next()?.trim().to_owned();
            (!line.is_empty()).then(|| (base.to_owned(), line))
        })
        .collect();
    keys.sort();
    keys
}

/// Whether `ssh` holds a host certificate for every key of `keys` (else the agent asks for
/// new ones: a new device, new host keys after a re-flash, an agent that did not manage sshd
/// before).
pub fn certifies_all(ssh: Option<&DeviceSsh>, keys: &[(String, String)]) -> bool {
    let Some(ssh) = ssh else {
        return keys.is_empty();
    };
    // Keys compare by their data, whatever the comments.
    let certified: Vec<_> = ssh
        .host_certificates
        .iter()
        .filter_map(|c| Certificate::from_openssh(c).ok())
        .map(|c| c.public_key().clone())
        .collect();
    keys.iter().all(|(_, line)| {
        floto_pki::ssh::parse_public_key(line).is_ok_and(|k| certified.contains(k.key_data()))
    })
}

/// Whether `sshd_config` includes the drop-in directory.
fn reads_drop_ins(sshd_config: &str, dir: &Path) -> bool {
    let absolute = format!("{}/sshd_config.d/", dir.display());
    sshd_config.lines().any(|l| {
        let mut words = l.split_whitespace();
        words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("include"))
            && words.any(|p| {
                let p = p.trim_matches('"');
                (p.starts_with("sshd_config.d/") || p.starts_with(&absolute))
                    && (p.ends_with("/*.conf") || p.ends_with("/*") || p.ends_with(DROP_IN))
            })
    })
}

/// The files of a configuration: path to content.
fn files(
    cfg: &SshdConfig,
    ssh: &DeviceSsh,
    keys: &[(String, String)],
) -> BTreeMap<PathBuf, String> {
    let ours = cfg.dir.join("floto");
    let mut files = BTreeMap::new();
    let user_ca = ours.join("user_ca.pub");
    files.insert(user_ca.clone(), format!("{}\n", ssh.user_ca.trim()));
    let mut drop_in = format!(
        "# Written by floto-tunnel: operators log in with certificates of the floto-connect\n\
         # server's user CA, as the logins their fleet allows; devices show host certificates.\n\
         # Replaced at every renewal; turn off with floto-tunnel --manage-sshd=false.\n\
         TrustedUserCAKeys {}\n\
         AuthorizedPrincipalsFile {}/principals/%u\n",
        user_ca.display(),
        ours.display()
    );
    for ((name, _), cert) in keys.iter().zip(&ssh.host_certificates) {
        let path = ours.join(format!("{name}-cert.pub"));
        drop_in.push_str(&format!("HostCertificate {}\n", path.display()));
        files.insert(path, format!("{}\n", cert.trim()));
    }
    for login in &ssh.logins {
        if floto_pki::ssh::check_login(login).is_ok() {
            files.insert(ours.join("principals").join(login), format!("{login}\n"));
        }
    }
    files.insert(cfg.dir.join("sshd_config.d").join(DROP_IN), drop_in);
    files
}

/// Installs `ssh` (the server's answer for host keys `keys`), checks it with `sshd -t` and
/// reloads sshd; nothing is written when everything is in place already.
pub fn install(
    cfg: &SshdConfig,
    ssh: &DeviceSsh,
    keys: &[(String, String)],
) -> Result<Installed, SshdError> {
    let main = cfg.dir.join("sshd_config");
    let text = floto_files::read_to_string(&main)?;
    if !reads_drop_ins(&text, &cfg.dir) {
        return Ok(Installed::Unsupported(format!(
            "{} does not include sshd_config.d/*.conf, so floto-tunnel leaves sshd alone: add \
             `Include {}/sshd_config.d/*.conf` at its top to let operators log in with \
             certificates, or run with --manage-sshd=false",
            main.display(),
            cfg.dir.display()
        )));
    }
    if ssh.host_certificates.len() != keys.len() {
        return Err(SshdError::Mismatch {
            certs: ssh.host_certificates.len(),
            keys: keys.len(),
        });
    }
    let want = files(cfg, ssh, keys);
    let principals = cfg.dir.join("floto").join("principals");
    let stale: Vec<PathBuf> = std::fs::read_dir(&principals)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| !want.contains_key(p))
                .collect()
        })
        .unwrap_or_default();
    let changed: Vec<&PathBuf> = want
        .iter()
        .filter(|(path, content)| std::fs::read_to_string(path).ok().as_ref() != Some(*content))
        .map(|(path, _)| path)
        .collect();
    if changed.is_empty() && stale.is_empty() {
        return Ok(Installed::Unchanged);
    }
    let drop_in = cfg.dir.join("sshd_config.d").join(DROP_IN);
    let reload_needed = changed
        .iter()
        .any(|p| **p == drop_in || p.to_string_lossy().ends_with("-cert.pub"));
    let previous = std::fs::read(&drop_in).ok();
    for dir in [cfg.dir.join("sshd_config.d"), principals.clone()] {
        floto_files::create_public_dir(&dir)?;
    }
    for (path, content) in &want {
        if *path != drop_in {
            floto_files::write_public(path, content.as_bytes())?;
        }
    }
    for path in &stale {
        let _ = std::fs::remove_file(path);
    }
    if !reload_needed {
        return Ok(Installed::Changed { reloaded: false });
    }
    floto_files::write_public(&drop_in, want[&drop_in].as_bytes())?;
    if let Err(why) = check(&main) {
        match previous {
            Some(old) => floto_files::write_public(&drop_in, &old)?,
            None => {
                let _ = std::fs::remove_file(&drop_in);
            }
        }
        return Err(SshdError::Invalid(why));
    }
    reload(cfg).map_err(SshdError::Reload)?;
    Ok(Installed::Changed { reloaded: true })
}

/// `sshd -t -f CONFIG`.
fn check(config: &Path) -> Result<(), String> {
    let sshd = find_sshd().ok_or("no sshd binary found (looked in PATH, /usr/sbin, /sbin)")?;
    let out = Command::new(&sshd)
        .arg("-t")
        .arg("-f")
        .arg(config)
        .output()
        .map_err(|e| format!("running {}: {e}", sshd.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn find_sshd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("sshd"))
        .find(|p| p.is_file())
}

fn reload(cfg: &SshdConfig) -> Result<(), String> {
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    };
    if let Some(command) = &cfg.reload {
        return run(Command::new("sh").arg("-c").arg(command));
    }
    if let Some(pid) = std::fs::read_to_string("/run/sshd.pid")
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    {
        // SAFETY: kill(2) with a pid read from sshd's own pid file and SIGHUP.
        if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
            return Ok(());
        }
    }
    run(Command::new("systemctl").args(["reload", "ssh.service"]))
        .or_else(|_| run(Command::new("systemctl").args(["reload", "sshd.service"])))
        .map_err(|e| format!("no /run/sshd.pid and systemctl reload failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_include_of_the_drop_in_directory_counts() {
        let dir = Path::new("/etc/ssh");
        for (config, reads) in [
            ("Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n", true),
            ("include sshd_config.d/*.conf\n", true),
            ("Include \"/etc/ssh/sshd_config.d/*\"\n", true),
            ("# Include /etc/ssh/sshd_config.d/*.conf\n", false),
            ("Include /elsewhere/*.conf\n", false),
            ("Port 22\n", false),
        ] {
            assert_eq!(reads_drop_ins(config, dir), reads, "{config:?}");
        }
    }

    #[test]
    fn the_files_name_every_certificate_and_login() {
        let cfg = SshdConfig {
            dir: PathBuf::from("/x"),
            ..SshdConfig::default()
        };
        let ssh = DeviceSsh {
            host_certificates: vec!["cert-a".into(), "cert-b".into()],
            user_ca: "ssh-ed25519 AAAA ca\n".into(),
            logins: vec!["pi".into(), "bad login".into()],
        };
        let keys = [
            ("ssh_host_ecdsa_key".to_owned(), "k1".to_owned()),
            ("ssh_host_ed25519_key".to_owned(), "k2".to_owned()),
        ];
        let f = files(&cfg, &ssh, &keys);
        let drop_in = &f[&PathBuf::from("/x/sshd_config.d/50-floto.conf")];
        assert!(drop_in.contains("TrustedUserCAKeys /x/floto/user_ca.pub\n"));
        assert!(drop_in.contains("AuthorizedPrincipalsFile /x/floto/principals/%u\n"));
        assert!(drop_in.contains("HostCertificate /x/floto/ssh_host_ecdsa_key-cert.pub\n"));
        assert_eq!(
            f[&PathBuf::from("/x/floto/ssh_host_ed25519_key-cert.pub")],
            "cert-b\n"
        );
        assert_eq!(f[&PathBuf::from("/x/floto/principals/pi")], "pi\n");
        assert!(!f.keys().any(|p| p.to_string_lossy().contains("bad login")));
        assert_eq!(
            f[&PathBuf::from("/x/floto/user_ca.pub")],
            "ssh-ed25519 AAAA ca\n"
        );
    }

    /// A system whose sshd reads no drop-ins is left exactly as it was, with the reason.
    #[test]
    fn without_drop_in_support_nothing_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sshd_config"), "Port 22\n").unwrap();
        let cfg = SshdConfig {
            dir: dir.path().to_owned(),
            reload: Some("false".into()),
            ..SshdConfig::default()
        };
        let ssh = DeviceSsh {
            host_certificates: vec!["c".into()],
            user_ca: "ssh-ed25519 AAAA ca".into(),
            logins: vec!["root".into()],
        };
        let keys = [("ssh_host_ed25519_key".to_owned(), "k".to_owned())];
        match install(&cfg, &ssh, &keys).unwrap() {
            Installed::Unsupported(why) => {
                assert!(why.contains("does not include sshd_config.d"), "{why}");
                assert!(why.contains("--manage-sshd=false"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "files were written: {left:?}");
    }

    #[test]
    fn host_keys_are_read_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("ssh_host_rsa_key.pub", "ssh-rsa AAAA r\n"),
            ("ssh_host_ed25519_key.pub", "ssh-ed25519 AAAA e\n"),
            ("ssh_host_ed25519_key", "PRIVATE"),
            ("other.pub", "ssh-ed25519 AAAA o\n"),
            ("ssh_host_empty_key.pub", ""),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        assert_eq!(
            host_keys(dir.path()),
            [
                (
                    "ssh_host_ed25519_key".to_owned(),
                    "ssh-ed25519 AAAA e".to_owned()
                ),
                ("ssh_host_rsa_key".to_owned(), "ssh-rsa AAAA r".to_owned()),
            ]
        );
    }
}
