//! Enrollment and renewal, without HTTP: the checks of every field a device sends, what a
//! refusal tells the device, and the response it gets. The decisions that need the
//! registry's facts (key, UUID, WireGuard key, addresses) are the registry's rules
//! ([`floto_registry::rules`]), taken inside its transaction; the HTTP handlers that tie
//! these together are in `api::enroll`.

use std::net::IpAddr;

use time::OffsetDateTime;

use floto_pki::VerifiedCsr;
use floto_proto::enroll::{Assignment, EnrollRequest, EnrollResponse};
use floto_proto::{ApiError, DeviceId, ErrorCode, WgKey};
use floto_registry::{Device, EnrollRefusal, Overlays, RenewRefusal};

/// Longest `device_type` and `hostname` accepted.
const MAX_LABEL: usize = 253;

/// An enrollment request whose every field has been checked.
#[derive(Debug)]
pub struct ValidEnroll {
    pub device: Option<DeviceId>,
    pub csr: VerifiedCsr,
    pub wg_public_key: WgKey,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// Checks every field of an enrollment request, naming the field that is wrong.
pub fn validate_enroll_request(req: &EnrollRequest) -> Result<ValidEnroll, ApiError> {
    let device = req
        .uuid
        .as_deref()
        .map(|u| u.parse::<DeviceId>())
        .transpose()
        .map_err(|e| bad_request(format!("uuid: {e}")))?;
    let wg_public_key = validate_wg_key(&req.wg_public_key)?;
    let csr = parse_csr_field(&req.csr_pem)?;
    Ok(ValidEnroll {
        device,
        csr,
        wg_public_key,
        device_type: validate_label("device_type", req.device_type.as_deref())?,
        hostname: validate_label("hostname", req.hostname.as_deref())?,
    })
}

/// The CSR of a request's `csr_pem` field, checked (signature, key type).
pub fn parse_csr_field(pem: &str) -> Result<VerifiedCsr, ApiError> {
    floto_pki::parse_csr(pem).map_err(|e| bad_request(format!("csr_pem: {e}")))
}

/// A WireGuard public key: 32 bytes of base64 that is a usable Curve25519 point (a
/// low-order point would make every shared secret zero).
pub fn validate_wg_key(s: &str) -> Result<WgKey, ApiError> {
    let key: WgKey = s
        .parse()
        .map_err(|e| bad_request(format!("wg_public_key: {e}")))?;
    let probe = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
    let shared = probe.diffie_hellman(&x25519_dalek::PublicKey::from(*key.as_bytes()));
    if !shared.was_contributory() {
        return Err(bad_request(
            "wg_public_key: not a usable Curve25519 public key (low-order point)",
        ));
    }
    Ok(key)
}

fn validate_label(field: &str, value: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    if v.is_empty() || v.len() > MAX_LABEL || !v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(bad_request(format!(
            "{field}: must be 1 to {MAX_LABEL} printable ASCII characters"
        )));
    }
    Ok(Some(v.to_owned()))
}

/// What a device is told when its enrollment is refused.
pub fn enroll_refusal(refusal: &EnrollRefusal, device: &DeviceId) -> ApiError {
    use EnrollRefusal::*;
    let (code, message) = match refusal {
            KeyUnknown => (ErrorCode::Unauthorized, "unknown provisioning key".to_owned()),
            KeyRevoked => (ErrorCode::Unauthorized, "provisioning key was revoked; ask an admin for a new one".to_owned()),
            KeyExpired { at } => (ErrorCode::Unauthorized, format!("provisioning key expired at {}; ask an admin for a new one", floto_proto::timestamp::rfc3339(*at))),
            KeyUsedUp => (ErrorCode::Unauthorized, "provisioning key has no uses left; ask an admin for a new one".to_owned()),
            // No fleet names: the key's holder may not learn the other fleet.
            WrongFleet { .. } => (ErrorCode::Forbidden, format!("device {device} is enrolled in another fleet; use a provisioning key of its own fleet")),
            DeviceRevoked => (ErrorCode::Revoked, format!("device {device} was revoked; an admin must enroll it under a new UUID")),
            UuidHeldByAnotherKey => (ErrorCode::Conflict, format!("device {device} is enrolled with a different device key; re-enrollment must use the key of its current certificate")),
            WgKeyBound { other } => (ErrorCode::Conflict, format!("this WireGuard public key is already bound to device {other}; generate a new WireGuard key")),
            AddressPoolExhausted { overlay } => (ErrorCode::Unavailable, format!("no overlay address left in {overlay}; an admin must add an overlay network (--extra-overlay)")),
        };
    ApiError::new(code, message)
}

/// What a device is told when its renewal is refused.
pub fn renew_refusal(refusal: &RenewRefusal, device: &DeviceId) -> ApiError {
    match refusal {
            RenewRefusal::UnknownDevice => ApiError::new(ErrorCode::Unauthorized, format!("device {device} is not enrolled here")),
            RenewRefusal::DeviceRevoked => ApiError::new(ErrorCode::Revoked, format!("device {device} was revoked")),
            RenewRefusal::NotNewestSerial { presented, .. } => ApiError::new(
                ErrorCode::Forbidden,
                format!("certificate {presented} of device {device} has been superseded; only the newest certificate may renew"),
            ),
            RenewRefusal::WgKeyBound { other } => ApiError::new(
                ErrorCode::Conflict,
                format!("this WireGuard public key is already bound to device {other}; generate a new WireGuard key"),
            ),
        }
}

/// When a device should renew: at 2/3 of its certificate's lifetime.
pub fn renew_after(issued: OffsetDateTime, expires: OffsetDateTime) -> OffsetDateTime {
    issued + (expires - issued) * 2 / 3
}

/// What a device is told about the server it enrolled with.
#[derive(Debug, Clone)]
pub struct ServerFacts<'a> {
    pub overlays: &'a Overlays,
    /// The WireGuard endpoint, `HOST:PORT` (see [`device_endpoint`]).
    pub endpoint: String,
    pub server_public_key: WgKey,
    pub ca_pem: &'a str,
}

/// The enrollment or renewal response for `device` with its new certificate.
pub fn enroll_response(
    device: &Device,
    certificate_pem: String,
    issued: OffsetDateTime,
    server: &ServerFacts<'_>,
    ssh: Option<floto_proto::ssh::DeviceSsh>,
) -> EnrollResponse {
    // The device's own network, and the server's address there. (A device outside every
    // configured network cannot be: the registry refuses to open.)
    let network = server
        .overlays
        .network_of(device.overlay_ip)
        .unwrap_or_else(|| server.overlays.first());
    let assignment = Assignment {
        uuid: device.id,
        overlay_ip: device.overlay_ip,
        server_overlay_ip: floto_registry::rules::server_address(network),
        overlay_network: network.to_string(),
        endpoint: server.endpoint.clone(),
        server_public_key: server.server_public_key,
        persistent_keepalive: floto_proto::defaults::PERSISTENT_KEEPALIVE_SECS,
        renew_after: renew_after(issued, device.cert_expires_at),
        expires_at: device.cert_expires_at,
    };
    EnrollResponse {
        wg_quick_config: assignment.wg_quick_config().render(None),
        assignment,
        certificate_pem,
        ca_pem: server.ca_pem.to_owned(),
        ssh,
    }
}

/// The WireGuard endpoint to give a device: the configured one, else the host the device
/// used to reach the API (`api_host`, else the address it connected to) with the
/// concentrator's port.
pub fn device_endpoint(
    configured: Option<&str>,
    api_host: Option<&str>,
    api_local_ip: IpAddr,
    wg_port: u16,
) -> String {
    if let Some(e) = configured {
        return e.to_owned();
    }
    match api_host {
        Some(host) if host.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{host}]:{wg_port}"),
        Some(host) => format!("{host}:{wg_port}"),
        None => format!("{api_local_ip}:{wg_port}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn wg_keys_that_are_low_order_points_are_refused() {
        // The all-zero key is refused at parse; 1 (a low-order point) by the DH check.
        let mut one = [0u8; 32];
        one[0] = 1;
        let err = validate_wg_key(&WgKey(one).to_base64()).unwrap_err();
        assert!(err.message.contains("low-order"), "{}", err.message);
        let good = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32]));
        assert!(validate_wg_key(&WgKey(good.to_bytes()).to_base64()).is_ok());
    }

    #[test]
    fn labels() {
        assert!(validate_label("hostname", Some("sensor-1")).is_ok());
        assert!(validate_label("hostname", Some("")).is_err());
        assert!(validate_label("hostname", Some("a\nb")).is_err());
        assert!(validate_label("hostname", Some(&"a".repeat(300))).is_err());
    }

    #[test]
    fn renew_after_is_two_thirds() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(
            renew_after(t0, t0 + Duration::from_secs(90)),
            t0 + Duration::from_secs(60)
        );
    }

    /// Enrollment requests from anyone: whatever the fields hold, a refusal names a field
    /// that is wrong, and the JSON reader takes exactly the documented shape.
    mod proptests {
        use std::sync::LazyLock;

        use base64::engine::general_purpose::STANDARD;
        use base64::Engine as _;
        use proptest::prelude::*;
        use proptest::sample::Index;
        use serde_json::{Map, Value};

        use super::*;

        const FIELDS: [&str; 5] = [
            "uuid",
            "wg_public_key",
            "csr_pem",
            "device_type",
            "hostname",
        ];

        /// A request whose every field is valid.
        static GOOD: LazyLock<EnrollRequest> = LazyLock::new(|| {
            let key = floto_pki::generate_key().unwrap();
            let wg = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32]));
            EnrollRequest {
                uuid: Some(DeviceId::new_random().to_string()),
                csr_pem: floto_pki::make_csr(&key, "device").unwrap(),
                wg_public_key: WgKey(wg.to_bytes()).to_base64(),
                device_type: Some("raspberrypi4-64".into()),
                hostname: Some("sensor-1".into()),
                ssh_host_keys: Vec::new(),
            }
        });

        /// The DER of the good request's CSR.
        static GOOD_DER: LazyLock<Vec<u8>> = LazyLock::new(|| {
            let body: String = GOOD
                .csr_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect();
            STANDARD.decode(body).unwrap()
        });

        /// The offsets of the good CSR's DER that its signature protects: the request info
        /// it signs, and the signature value itself (the BIT STRING's bytes after its count
        /// of unused bits).
        static SIGNED: LazyLock<Vec<usize>> = LazyLock::new(|| {
            // (header length, content length) of the DER element at `at`.
            let tlv = |at: usize| match GOOD_DER[at + 1] {
                short @ 0..0x80 => (2, usize::from(short)),
                long => {
                    let n = usize::from(long & 0x7f);
                    let len = GOOD_DER[at + 2..at + 2 + n]
                        .iter()
                        .fold(0, |len, b| len << 8 | usize::from(*b));
                    (2 + n, len)
                }
            };
            let info = tlv(0).0;
            let algorithm = info + tlv(info).0 + tlv(info).1;
            let signature = algorithm + tlv(algorithm).0 + tlv(algorithm).1;
            (info..algorithm)
                .chain(signature + tlv(signature).0 + 1..GOOD_DER.len())
                .collect()
        });

        fn pem(der: &[u8]) -> String {
            let b64 = STANDARD.encode(der);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                lines.join("\n")
            )
        }

        fn base64_of(len: impl Strategy<Value = usize>) -> impl Strategy<Value = String> {
            len.prop_flat_map(|n| prop::collection::vec(any::<u8>(), n))
                .prop_map(|b| STANDARD.encode(b))
        }

        fn uuid_junk() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9a-fA-F-]{30,38}",
                "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                "[0-9a-fA-F]{32}",
                Just("00000000-0000-0000-0000-000000000000".to_owned()),
                ".{60,300}",
            ]
        }

        fn wg_key_junk() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                base64_of(0usize..=64),
                base64_of(Just(32)),
                base64_of(Just(32)).prop_map(|k| format!(" {k}\n")),
                "[A-Za-z0-9+/=]{40,48}",
                // Low-order points.
                Just(WgKey([0; 32]).to_base64()),
                Just(WgKey(std::array::from_fn(|i| u8::from(i == 0))).to_base64()),
            ]
        }

        fn csr_junk() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                base64_of(0usize..=800).prop_map(|b| format!(
                    "-----BEGIN CERTIFICATE REQUEST-----\n{b}\n-----END CERTIFICATE REQUEST-----"
                )),
                prop::collection::vec(any::<u8>(), 0..=800).prop_map(|der| pem(&der)),
                "-----BEGIN [^\n]{0,200}-----\n[A-Za-z0-9+/=\n]{0,200}(-----END [^\n]{0,40}-----)?",
                // The good CSR with one byte of its DER changed.
                (any::<Index>(), 1u8..=255).prop_map(|(i, x)| {
                    let mut der = GOOD_DER.clone();
                    let i = i.index(der.len());
                    der[i] ^= x;
                    pem(&der)
                }),
                Just(pem(&GOOD_DER[..GOOD_DER.len() - 1])),
            ]
        }

        fn label_junk() -> impl Strategy<Value = String> {
            prop_oneof![any::<String>(), "[ -~]{0,300}", "[\\x00-\\x7f]{1,20}"]
        }

        /// `None`: the good value; `Some(v)`: `v`, which may be valid or not.
        fn junk_or_good<T: std::fmt::Debug + Clone>(
            junk: impl Strategy<Value = T>,
        ) -> impl Strategy<Value = Option<T>> {
            prop::option::weighted(0.5, junk)
        }

        /// The good request with the fields that `junk` names set as it says.
        fn request(junk: &[(&str, Option<String>)]) -> EnrollRequest {
            let mut req = GOOD.clone();
            for (field, value) in junk {
                match *field {
                    "uuid" => req.uuid = value.clone(),
                    "wg_public_key" => req.wg_public_key = value.clone().unwrap_or_default(),
                    "csr_pem" => req.csr_pem = value.clone().unwrap_or_default(),
                    "device_type" => req.device_type = value.clone(),
                    _ => req.hostname = value.clone(),
                }
            }
            req
        }

        proptest! {
            /// Whatever the fields hold, validation does not panic, and a refusal is a bad
            /// request whose message starts with the name of a field that was sent wrong:
            /// that field alone in an otherwise good request is refused the same way.
            #[test]
            fn a_refused_enrollment_names_a_field_that_is_wrong(
                uuid in junk_or_good(prop::option::of(uuid_junk())),
                wg_public_key in junk_or_good(wg_key_junk().prop_map(Some)),
                csr_pem in junk_or_good(csr_junk().prop_map(Some)),
                device_type in junk_or_good(prop::option::of(label_junk())),
                hostname in junk_or_good(prop::option::of(label_junk())),
            ) {
                let junk: Vec<(&str, Option<String>)> = FIELDS
                    .into_iter()
                    .zip([uuid, wg_public_key, csr_pem, device_type, hostname])
                    .filter_map(|(f, v)| Some((f, v?)))
                    .collect();
                let req = request(&junk);
                let err = match validate_enroll_request(&req) {
                    Ok(valid) => {
                        prop_assert_eq!(valid.device_type, req.device_type);
                        prop_assert_eq!(valid.hostname, req.hostname);
                        prop_assert_eq!(
                            valid.device.map(|d| d.simple()),
                            req.uuid.map(|u| u.replace('-', "").to_lowercase())
                        );
                        return Ok(());
                    }
                    Err(err) => err,
                };
                prop_assert!(!junk.is_empty(), "the good request was refused: {}", err.message);
                prop_assert_eq!(err.error, ErrorCode::BadRequest);
                let named = junk.iter().find(|(f, _)| err.message.starts_with(&format!("{f}: ")));
                let Some(named) = named else {
                    let why = format!("names no field it was sent wrong: {:?}", err.message);
                    return Err(TestCaseError::fail(why));
                };
                let alone = validate_enroll_request(&request(std::slice::from_ref(named)));
                prop_assert!(
                    alone.is_err_and(|e| e.message.starts_with(&format!("{}: ", named.0))),
                    "{} alone is not refused as {:?}",
                    named.0,
                    err.message
                );
            }

            /// The good CSR with any one byte changed in what it signs or in its signature
            /// is refused. (Outside those, x509-parser lets some changes through that alter
            /// nothing that is used: the class of the wrapper's tags, the tag of the
            /// algorithm's OID, a count of unused bits whose bits are zero.)
            #[test]
            fn a_csr_changed_in_what_it_signs_or_its_signature_is_refused(
                i in any::<Index>(),
                x in 1u8..=255,
            ) {
                let mut der = GOOD_DER.clone();
                let i = *i.get(&SIGNED);
                der[i] ^= x;
                let err = parse_csr_field(&pem(&der)).map(|_| ()).unwrap_err();
                prop_assert!(err.message.starts_with("csr_pem: "), "{}", err.message);
            }

            /// Any bytes as the body of `POST /v1/enroll`: the JSON reader does not panic.
            #[test]
            fn any_bytes_as_an_enrollment_body_do_not_panic(
                body in prop::collection::vec(any::<u8>(), 0..=600),
            ) {
                let _ = serde_json::from_slice::<EnrollRequest>(&body);
            }

            /// A JSON object of known and unknown keys with values of any JSON type is read
            /// exactly when it has only the five fields, `csr_pem` and `wg_public_key` as
            /// strings, and the optional ones as strings or null; then its strings are taken
            /// as sent.
            #[test]
            fn an_enrollment_body_is_read_exactly_when_its_shape_is_right(
                fields in prop::collection::btree_map(
                    prop_oneof![
                        4 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
                        1 => "[a-z_]{1,12}",
                    ],
                    prop_oneof![
                        4 => any::<String>().prop_map(Value::String),
                        1 => Just(Value::Null),
                        1 => any::<bool>().prop_map(Value::Bool),
                        1 => any::<i64>().prop_map(Value::from),
                        1 => any::<f64>().prop_map(Value::from),
                        1 => Just(Value::Array(vec![])),
                        1 => Just(Value::Object(Map::new())),
                    ],
                    0..=6,
                ),
            ) {
                let object: Map<String, Value> = fields.clone().into_iter().collect();
                let body = serde_json::to_vec(&object).unwrap();
                let read = serde_json::from_slice::<EnrollRequest>(&body);
                let is_string = |k: &str| object.get(k).is_some_and(Value::is_string);
                let optional = |k: &str| object.get(k).is_none_or(|v| v.is_string() || v.is_null());
                let shape_right = object.keys().all(|k| FIELDS.contains(&k.as_str()))
                    && is_string("csr_pem")
                    && is_string("wg_public_key")
                    && optional("uuid")
                    && optional("device_type")
                    && optional("hostname");
                prop_assert_eq!(read.is_ok(), shape_right, "{:?}: {:?}", object, read);
                if let Ok(req) = read {
                    let text = |k: &str| object.get(k).and_then(Value::as_str).map(str::to_owned);
                    prop_assert_eq!(Some(req.csr_pem), text("csr_pem"));
                    prop_assert_eq!(Some(req.wg_public_key), text("wg_public_key"));
                    prop_assert_eq!(req.uuid, text("uuid"));
                    prop_assert_eq!(req.device_type, text("device_type"));
                    prop_assert_eq!(req.hostname, text("hostname"));
                }
            }
        }
    }
}
