//! Enrolling many simulated devices through the real `POST /v1/enroll`: each with its own
//! ECDSA key and CSR and its own WireGuard key, `concurrency` at a time over keep-alive
//! HTTPS connections. The result feeds a [`crate::fleet::Fleet`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use floto_client::ApiClient;
use floto_proto::enroll::EnrollRequest;
use floto_proto::{DeviceId, WgKey};

use crate::fleet::FleetDevice;
use crate::server::Server;

/// An enrolled device's secrets and address.
pub struct Enrolled {
    pub uuid: DeviceId,
    pub secret: StaticSecret,
    pub overlay_ip: Ipv4Addr,
}

/// What enrolling a fleet gave.
pub struct EnrolledFleet {
    pub devices: Vec<Enrolled>,
    pub server_public: PublicKey,
    pub server_overlay_ip: Ipv4Addr,
    /// Time spent in HTTPS enrollment (CSRs and keys made before).
    pub elapsed: Duration,
}

impl EnrolledFleet {
    /// The devices as a fleet takes them (keys are copied; the fleet owns its copies).
    pub fn fleet_devices(&self) -> Vec<FleetDevice> {
        self.devices
            .iter()
            .map(|d| FleetDevice {
                secret: d.secret.clone(),
                overlay_ip: Some(d.overlay_ip),
            })
            .collect()
    }
}

struct Material {
    uuid: DeviceId,
    csr_pem: String,
    secret: StaticSecret,
}

/// Makes `n` devices' keys and CSRs on every core.
fn material(n: usize) -> Vec<Material> {
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let count = per.min(n.saturating_sub(t * per));
                (0..count)
                    .map(|_| {
                        let uuid = DeviceId::new_random();
                        let key = floto_pki::generate_key().expect("ECDSA key");
                        let csr_pem = floto_pki::make_csr(&key, &uuid.to_string()).expect("CSR");
                        Material {
                            uuid,
                            csr_pem,
                            secret: StaticSecret::from(rand_bytes()),
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("material thread"))
        .collect()
}

fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we pass.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(got, 32, "getrandom failed");
    b
}

/// Enrolls `n` devices into the server with `key`, `concurrency` requests in flight.
/// Panics, saying why, if any enrollment fails.
pub async fn enroll_devices(
    server: &Server,
    key: &str,
    n: usize,
    concurrency: usize,
) -> EnrolledFleet {
    let ca = std::fs::read_to_string(server.ca_path()).expect("server CA");
    let url = server.local_url();
    let queue = Arc::new(std::sync::Mutex::new(material(n)));
    let key = Arc::new(key.to_owned());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (queue, key) = (queue.clone(), key.clone());
        let client = ApiClient::new(&url, &ca, None).expect("API client");
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut server_keys = None;
            loop {
                let Some(m) = queue.lock().expect("queue").pop() else {
                    break;
                };
                let public = WgKey(PublicKey::from(&m.secret).to_bytes());
                let req = EnrollRequest {
                    uuid: Some(m.uuid.to_string()),
                    csr_pem: m.csr_pem,
                    wg_public_key: public.to_base64(),
                    device_type: None,
                    hostname: None,
                    ssh_host_keys: Vec::new(),
                };
                let mut attempt = 0;
                let resp = loop {
                    match client.enroll(&key, &req).await {
                        Ok((201, r)) => break r,
                        // Shedding load: back off and retry, as a device would.
                        Ok((429, _)) if attempt < 50 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok((status, _)) => panic!("enrollment answered {status}"),
                        Err(e) => panic!("enrollment failed: {e}"),
                    }
                };
                let a = resp.assignment;
                server_keys = Some((a.server_public_key, a.server_overlay_ip));
                done.push(Enrolled {
                    uuid: a.uuid,
                    secret: m.secret,
                    overlay_ip: a.overlay_ip,
                });
            }
            (done, server_keys)
        }));
    }
    let mut devices = Vec::with_capacity(n);
    let mut server_keys = None;
    for t in tasks {
        let (done, keys) = t.await.expect("enrollment task");
        devices.extend(done);
        server_keys = server_keys.or(keys);
    }
    let (public, server_overlay_ip) = server_keys.expect("at least one device enrolled");
    EnrolledFleet {
        devices,
        server_public: PublicKey::from(*public.as_bytes()),
        server_overlay_ip,
        elapsed: started.elapsed(),
    }
}
