//! The device's state dir: its identity (UUID, certificate and key, WireGuard key) and
//! what the server told it at enrollment. Loaded strictly: a damaged state dir is an
//! error that says what is wrong, never a reason to make a new identity.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use floto_client::{ApiClient, Identity};
use floto_files::FileError;
use floto_proto::enroll::{Assignment, EnrollResponse};
use floto_proto::WgKey;

/// Version of `state.json` this code writes.
const STATE_VERSION: u32 = 1;

/// Why the state dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// There is no identity here yet.
    #[error("{} holds no device identity; run `floto-tunnel enroll` first", .0.display())]
    NotEnrolled(PathBuf),
    /// A file is missing, unreadable or does not parse.
    #[error("state dir {} is damaged: {file}: {reason}. Not creating a new identity: restore the state dir from a backup, or move it away and enroll again (the device then gets a new UUID)", dir.display())]
    Damaged {
        dir: PathBuf,
        file: &'static str,
        reason: String,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    File(#[from] FileError),
}

/// `state.json`: what the server assigned the device, and where the device enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub version: u32,
    /// The API URL the device enrolled with (of the configured servers, the one that
    /// answered). Renewals ask it first.
    pub server: String,
    /// Its fields are at the top level of the JSON, as in the enrollment response.
    #[serde(flatten)]
    pub assignment: Assignment,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl StateFile {
    /// What the server said in an enrollment or renewal response, for the device enrolled
    /// with `server`.
    fn from_response(resp: &EnrollResponse, server: String, now: OffsetDateTime) -> Self {
        Self {
            version: STATE_VERSION,
            server,
            assignment: resp.assignment.clone(),
            updated_at: now,
        }
    }
}

/// A loaded, consistent identity.
#[derive(Clone)]
pub struct DeviceState {
    pub file: StateFile,
    pub device_key_pem: String,
    pub cert_pem: String,
    /// The CA the server's TLS certificate chains to (from `--ca` at enrollment).
    pub server_ca_pem: String,
    pub wg_private: [u8; 32],
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl DeviceState {
    pub fn wg_public(&self) -> WgKey {
        let secret = x25519_dalek::StaticSecret::from(self.wg_private);
        WgKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// The complete wg-quick config, private key included.
    pub fn wg_quick_config(&self) -> String {
        self.file
            .assignment
            .wg_quick_config()
            .render(Some(&WgKey(self.wg_private).to_base64()))
    }

    pub fn identity(&self) -> Identity {
        Identity {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.device_key_pem.clone(),
        }
    }

    /// A client of the API at `server` that presents the device certificate (`server` is
    /// [`StateFile::server`] or another node of its cluster).
    pub fn api(&self, server: &str) -> Result<ApiClient, floto_client::ClientError> {
        self.api_via(server, None)
    }

    /// As [`DeviceState::api`], through the HTTP proxy `proxy` when one is given.
    pub fn api_via(
        &self,
        server: &str,
        proxy: Option<&str>,
    ) -> Result<ApiClient, floto_client::ClientError> {
        ApiClient::via_proxy(server, &self.server_ca_pem, Some(&self.identity()), proxy)
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn state_json(&self) -> PathBuf {
        self.root.join("state.json")
    }
    /// What the server last said about SSH (host certificates, user CA, logins).
    pub fn ssh_json(&self) -> PathBuf {
        self.root.join("ssh.json")
    }

    /// What the server last said about SSH; `None` when it said nothing, or the file is
    /// unreadable (it is asked for again at the next renewal).
    pub fn load_ssh(&self) -> Option<floto_proto::ssh::DeviceSsh> {
        let text = std::fs::read_to_string(self.ssh_json()).ok()?;
        serde_json::from_str(&text)
            .inspect_err(|e| tracing::warn!(error = %e, "ssh.json is damaged; ignoring it"))
            .ok()
    }

    /// Records the fleet's current logins and user CA; returns whether they changed.
    pub fn save_ssh_policy(
        &self,
        policy: &floto_proto::ssh::DeviceSshPolicy,
    ) -> Result<bool, StateError> {
        let Some(mut ssh) = self.load_ssh() else {
            return Ok(false);
        };
        if ssh.logins == policy.logins && ssh.user_ca == policy.user_ca {
            return Ok(false);
        }
        ssh.logins.clone_from(&policy.logins);
        ssh.user_ca.clone_from(&policy.user_ca);
        let json = serde_json::to_vec_pretty(&ssh).map_err(|e| self.damaged("ssh.json", e))?;
        floto_files::write_public(&self.ssh_json(), &json)?;
        Ok(true)
    }

    fn save_ssh(&self, resp: &EnrollResponse) -> Result<(), StateError> {
        if let Some(ssh) = &resp.ssh {
            let json = serde_json::to_vec_pretty(ssh).map_err(|e| self.damaged("ssh.json", e))?;
            floto_files::write_public(&self.ssh_json(), &json)?;
        }
        Ok(())
    }
    pub fn device_key(&self) -> PathBuf {
        self.root.join("device.key")
    }
    pub fn device_cert(&self) -> PathBuf {
        self.root.join("device.pem")
    }
    pub fn server_ca(&self) -> PathBuf {
        self.root.join("server-ca.pem")
    }
    pub fn wg_key(&self) -> PathBuf {
        self.root.join("wg.key")
    }
    /// Written before an enrollment request, so a retry reuses the same keys.
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending.json")
    }
    /// Written by a running agent.
    pub fn status(&self) -> PathBuf {
        self.root.join("status.json")
    }
    /// The key of a renewal in flight (written before the request, kept until committed).
    pub fn device_key_next(&self) -> PathBuf {
        self.root.join("device.key.next")
    }
    /// The certificate of a renewal that is being committed.
    pub fn device_cert_next(&self) -> PathBuf {
        self.root.join("device.pem.next")
    }
    /// Whether a renewal's key is waiting (the renewal was cut short).
    pub fn has_pending_key(&self) -> bool {
        self.device_key_next().exists()
    }

    pub fn is_enrolled(&self) -> bool {
        self.state_json().exists()
    }

    fn damaged(&self, file: &'static str, reason: impl std::fmt::Display) -> StateError {
        StateError::Damaged {
            dir: self.root.clone(),
            file,
            reason: reason.to_string(),
        }
    }

    /// Reads a file that must be there, turning a parse failure into `Damaged`.
    fn read(&self, path: &Path, name: &'static str, secret: bool) -> Result<String, StateError> {
        let read = if secret {
            self.check_private(path, name)?;
            floto_files::read_secret(path)
        } else {
            floto_files::read_to_string(path)
        };
        read.map_err(|e| {
            if e.is_not_found() {
                self.damaged(name, "missing")
            } else {
                self.damaged(name, e.source)
            }
        })
    }

    /// A secret readable by group or others may have leaked: refuse it (with what to do).
    fn check_private(&self, path: &Path, name: &'static str) -> Result<(), StateError> {
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(()); // the read reports it
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(self.damaged(
                name,
                format!(
                    "it is readable by group or others (mode {mode:o}), so the key may have leaked. If you are sure it did not, `chmod 600 {}` and start again; otherwise have the device revoked and enrolled anew",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Completes a renewal that was cut short while its files were being put in place
    /// (`device.pem.next` written, renames not all done). A renewal whose request was in
    /// flight (`device.key.next` alone) is left for the agent to finish.
    pub fn finish_interrupted_renewal(&self) -> Result<bool, StateError> {
        let cert_next = self.device_cert_next();
        if !cert_next.exists() {
            return Ok(false);
        }
        let key_next = self.device_key_next();
        let cert_pem = self.read(&cert_next, "device.pem.next", false)?;
        let (key_path, key_name) = if key_next.exists() {
            (key_next.clone(), "device.key.next")
        } else {
            (self.device_key(), "device.key")
        };
        let key_pem = self.read(&key_path, key_name, true)?;
        match floto_pki::key_matches_cert(&key_pem, &cert_pem) {
            Ok(true) => {}
            Ok(false) => {
                return Err(self.damaged(
                    "device.pem.next",
                    "an interrupted renewal left a certificate that matches neither key",
                ))
            }
            Err(e) => return Err(self.damaged("device.pem.next", e)),
        }
        self.commit_next()?;
        tracing::info!(dir = %self.root.display(), "completed a renewal that was interrupted");
        Ok(true)
    }

    /// Puts `device.key.next` (if any) and `device.pem.next` in place, key first.
    fn commit_next(&self) -> Result<(), StateError> {
        let rename = |from: PathBuf, to: PathBuf| {
            std::fs::rename(&from, &to).map_err(|source| FileError {
                action: "renaming",
                path: from,
                source,
            })
        };
        if self.device_key_next().exists() {
            rename(self.device_key_next(), self.device_key())?;
        }
        rename(self.device_cert_next(), self.device_cert())?;
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Stores a certificate obtained by renewal or re-enrollment. `with_next_key`: it
    /// certifies `device.key.next` (a fresh key), which then replaces `device.key`. The
    /// certificate is written as `device.pem.next` first, so a crash at any point leaves a
    /// consistent identity (the old one, or the new one after [`Self::load`] completes it).
    pub fn save_renewal(
        &self,
        resp: &EnrollResponse,
        with_next_key: bool,
        now: OffsetDateTime,
    ) -> Result<DeviceState, StateError> {
        let current = self.load()?;
        if resp.assignment.uuid != current.file.assignment.uuid {
            return Err(self.damaged(
                "device.pem",
                format!(
                    "the server returned a certificate for {} instead of {}",
                    resp.assignment.uuid, current.file.assignment.uuid
                ),
            ));
        }
        if with_next_key {
            floto_files::write_public(&self.device_cert_next(), resp.certificate_pem.as_bytes())?;
            self.commit_next()?;
        } else {
            floto_files::write_public(&self.device_cert(), resp.certificate_pem.as_bytes())?;
        }
        // Same UUID (checked above); the version and server it enrolled with stay.
        let file = StateFile {
            version: current.file.version,
            ..StateFile::from_response(resp, current.file.server, now)
        };
        self.write_state_json(&file)?;
        self.save_ssh(resp)?;
        self.load()
    }

    /// Loads and cross-checks the identity.
    pub fn load(&self) -> Result<DeviceState, StateError> {
        if !self.is_enrolled() {
            return Err(StateError::NotEnrolled(self.root.clone()));
        }
        self.finish_interrupted_renewal()?;
        let text = self.read(&self.state_json(), "state.json", false)?;
        let file: StateFile =
            serde_json::from_str(&text).map_err(|e| self.damaged("state.json", e))?;
        if file.version != STATE_VERSION {
            return Err(self.damaged(
                "state.json",
                format!("version {} is not {STATE_VERSION}", file.version),
            ));
        }
        let device_key_pem = self.read(&self.device_key(), "device.key", true)?;
        let cert_pem = self.read(&self.device_cert(), "device.pem", false)?;
        let server_ca_pem = self.read(&self.server_ca(), "server-ca.pem", false)?;
        let wg_text = self.read(&self.wg_key(), "wg.key", true)?;
        let wg: WgKey = wg_text
            .trim()
            .parse()
            .map_err(|e| self.damaged("wg.key", e))?;
        let cert =
            floto_pki::parse_cert_pem(&cert_pem).map_err(|e| self.damaged("device.pem", e))?;
        if cert.device_id() != Some(file.assignment.uuid) {
            return Err(self.damaged(
                "device.pem",
                format!("the certificate is not for device {}", file.assignment.uuid),
            ));
        }
        match floto_pki::key_matches_cert(&device_key_pem, &cert_pem) {
            Ok(true) => {}
            Ok(false) => return Err(self.damaged("device.key", "does not belong to device.pem")),
            Err(e) => return Err(self.damaged("device.key", e)),
        }
        // The certificate is the truth about its validity: state.json lags behind a renewal
        // that was interrupted after the certificate was in place. The server backdates
        // `not_before`, so the renewal point keeps its distance from expiry.
        let mut file = file;
        let a = &mut file.assignment;
        if a.expires_at != cert.not_after {
            let before_expiry = (a.expires_at - a.renew_after)
                .max(time::Duration::ZERO)
                .min(cert.not_after - cert.not_before);
            a.expires_at = cert.not_after;
            a.renew_after = cert.not_after - before_expiry;
        }
        Ok(DeviceState {
            file,
            device_key_pem,
            cert_pem,
            server_ca_pem,
            wg_private: wg.0,
        })
    }

    /// Writes a new certificate and what the server said, after the keys it belongs to.
    pub fn save_enrollment(
        &self,
        resp: &EnrollResponse,
        server: &str,
        server_ca_pem: &str,
        now: OffsetDateTime,
    ) -> Result<StateFile, StateError> {
        let file = StateFile::from_response(resp, server.to_owned(), now);
        floto_files::write_public(&self.server_ca(), server_ca_pem.as_bytes())?;
        floto_files::write_public(&self.device_cert(), resp.certificate_pem.as_bytes())?;
        self.save_ssh(resp)?;
        // state.json last: its presence means the rest is complete.
        self.write_state_json(&file)?;
        Ok(file)
    }

    fn write_state_json(&self, file: &StateFile) -> Result<(), StateError> {
        let json = serde_json::to_string_pretty(file).map_err(|e| self.damaged("state.json", e))?;
        floto_files::write_public(&self.state_json(), json.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use time::macros::datetime;

    use super::*;

    const UUID: &str = "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c";

    /// `state.json` exactly as floto-tunnel wrote it before the state file held an
    /// [`Assignment`] (values fake but valid). Devices in the field have such a file.
    const STATE_JSON_V1: &str = r#"{
  "version": 1,
  "uuid": "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c",
  "server": "https://vpn.example.org:8443",
  "overlay_ip": "10.240.0.7",
  "server_overlay_ip": "10.240.0.1",
  "overlay_network": "10.240.0.0/16",
  "endpoint": "vpn.example.org:51820",
  "server_public_key": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
  "persistent_keepalive": 25,
  "renew_after": "2025-06-21T10:00:00Z",
  "expires_at": "2025-07-01T10:00:00Z",
  "updated_at": "2025-06-01T10:00:00.123456789Z"
}"#;

    fn state_v1() -> StateFile {
        StateFile {
            version: 1,
            server: "https://vpn.example.org:8443".into(),
            assignment: Assignment {
                uuid: UUID.parse().unwrap(),
                overlay_ip: Ipv4Addr::new(10, 240, 0, 7),
                server_overlay_ip: Ipv4Addr::new(10, 240, 0, 1),
                overlay_network: "10.240.0.0/16".into(),
                endpoint: "vpn.example.org:51820".into(),
                server_public_key: WgKey([7; 32]),
                persistent_keepalive: 25,
                renew_after: datetime!(2025-06-21 10:00:00 UTC),
                expires_at: datetime!(2025-07-01 10:00:00 UTC),
            },
            updated_at: datetime!(2025-06-01 10:00:00.123456789 UTC),
        }
    }

    #[test]
    fn state_json_of_the_first_version_parses_and_is_written_the_same() {
        let file: StateFile = serde_json::from_str(STATE_JSON_V1).unwrap();
        assert_eq!(file, state_v1());
        let before: serde_json::Value = serde_json::from_str(STATE_JSON_V1).unwrap();
        assert_eq!(serde_json::to_value(&file).unwrap(), before);
    }

    #[test]
    fn state_json_with_unknown_or_missing_fields_is_refused() {
        let extra = STATE_JSON_V1.replacen("\"version\": 1,", "\"version\": 1, \"extra\": 2,", 1);
        let err = serde_json::from_str::<StateFile>(&extra).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        let missing = STATE_JSON_V1.replacen("\"persistent_keepalive\": 25,", "", 1);
        let err = serde_json::from_str::<StateFile>(&missing).unwrap_err();
        assert!(err.to_string().contains("persistent_keepalive"), "{err}");
    }

    /// A whole state dir with that `state.json` and a certificate that expires when it says.
    #[test]
    fn a_state_dir_of_the_first_version_loads() {
        let dir = tempfile::tempdir().unwrap();
        let issued = datetime!(2025-06-01 10:00:00 UTC);
        let day = Duration::from_secs(24 * 3600);
        let ca = floto_pki::Ca::generate("floto test CA", issued, 3650 * day).unwrap();
        let key = floto_pki::generate_key().unwrap();
        let csr = floto_pki::parse_csr(&floto_pki::make_csr(&key, UUID).unwrap()).unwrap();
        let uuid = UUID.parse().unwrap();
        let serial = floto_pki::Serial::random();
        let cert = ca
            .sign_device(&csr, &uuid, &serial, issued, 30 * day)
            .unwrap();
        let state_dir = StateDir::new(dir.path());
        floto_files::write_public(&state_dir.state_json(), STATE_JSON_V1.as_bytes()).unwrap();
        floto_files::write_secret(&state_dir.device_key(), key.as_bytes()).unwrap();
        floto_files::write_public(&state_dir.device_cert(), cert.pem.as_bytes()).unwrap();
        floto_files::write_public(&state_dir.server_ca(), ca.cert_pem().as_bytes()).unwrap();
        let wg = WgKey([9; 32]).to_base64();
        floto_files::write_secret(&state_dir.wg_key(), wg.as_bytes()).unwrap();

        let state = state_dir.load().unwrap();
        assert_eq!(state.file, state_v1());
        assert!(state
            .wg_quick_config()
            .contains("Address = 10.240.0.7/32\n"));
    }

    /// `state.json` damaged in any way is refused, never read with a value made up.
    mod proptests {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        /// Fields of `state.json` that hold any string.
        const TEXT_FIELDS: [&str; 3] = ["server", "overlay_network", "endpoint"];

        /// A value that no field of `state.json` takes: a string ending in `!` is no
        /// UUID, address, key or time.
        fn junk() -> impl Strategy<Value = Option<Value>> {
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                any::<bool>().prop_map(|b| Some(Value::Bool(b))),
                any::<i64>().prop_map(|n| Some(Value::from(n.min(-1)))),
                (1u64 << 32..=u64::MAX).prop_map(|n| Some(Value::from(n))),
                any::<f64>().prop_map(|x| Some(Value::from(x))),
                Just(Some(Value::Array(vec![]))),
                Just(Some(serde_json::json!({"value": 1}))),
                ".{0,40}!".prop_map(|s| Some(Value::String(s))),
            ]
        }

        proptest! {
            /// Any bytes as `state.json` are refused without a panic.
            #[test]
            fn any_bytes_as_state_json_are_refused(
                bytes in prop::collection::vec(any::<u8>(), 0..=600),
            ) {
                prop_assert!(serde_json::from_slice::<StateFile>(&bytes).is_err());
            }

            /// A good `state.json` with one field removed, or its value replaced by one of
            /// another type (or a string the field cannot read), is refused.
            #[test]
            fn state_json_with_one_field_damaged_is_refused(
                field in prop::sample::Index::arbitrary(),
                junk in junk(),
            ) {
                let Value::Object(mut object) = serde_json::from_str(STATE_JSON_V1).unwrap() else {
                    unreachable!("state.json is an object");
                };
                let names: Vec<String> = object.keys().cloned().collect();
                let name = field.get(&names);
                // A string is a valid value of the fields that hold any string.
                let junk = match junk {
                    Some(Value::String(_)) if TEXT_FIELDS.contains(&name.as_str()) => {
                        Some(Value::Null)
                    }
                    other => other,
                };
                match junk.clone() {
                    Some(v) => object.insert(name.clone(), v),
                    None => object.remove(name),
                };
                let text = Value::Object(object).to_string();
                let read = serde_json::from_str::<StateFile>(&text);
                prop_assert!(read.is_err(), "{} = {:?} read as {:?}", name, junk, read);
            }
        }
    }
}
