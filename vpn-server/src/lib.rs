//! floto-vpn-server: the floto-connect server. A userspace WireGuard concentrator
//! (boringtun, no kernel module, no root), the HTTPS enrollment and REST API, the device
//! registry, the operator broker, and Prometheus metrics, in one process.
//!
//! [`start`] binds every port and returns a handle; [`run`] is `start` plus waiting for a
//! shutdown future and draining. Signals are handled only by the binary.
//!
//! Who owns what (imports run down this list, never back up):
//!
//! - [`api`]: the HTTP handlers (enrollment, REST, admin, events, CONNECT) and the state
//!   they share; turns refusals into HTTP answers.
//! - [`broker`]: operator sessions into devices (authorize, dial, splice, audit) and its
//!   QUIC front end; refusals of its own.
//! - [`changes`]: the one applier of committed registry changes to the running parts.
//! - [`enroll`]: enrollment and renewal checks and responses, without HTTP.
//! - [`identify`]: credentials (client certificate, API token) to a device or an operator.
//! - [`audit`], [`metrics`], [`events`]: the audit writer, Prometheus, online/offline events.
//! - [`netstack`]: the server's TCP stack on its overlay address, for the broker's dials.
//! - [`wg`]: the concentrator; it knows nothing of the registry, the API or events.
//! - [`crl`]: the published CRL, signed when the revoked set changes.
//! - [`tls`], [`config`], [`datadir`], [`backup`], [`secret`], [`authz`], [`limits`]: leaves.
//! - The registry (records, refusals, rules, SQLite) is its own crate, `floto-registry`.
//!
//! A datagram: `wg` (driver) reads it from a UDP socket, the core (`wg::peers`) admits,
//! routes and decrypts it, and the driver carries out the effects: an IP packet for the
//! server goes to [`netstack`] (a broker session's TCP), an online transition to
//! [`events`] (SSE, presence).
//!
//! An enrollment: `api::enroll` checks the key and the body with [`enroll`], has the CA
//! sign, commits through the registry (whose `rules` decide inside the transaction), hands
//! the returned change to [`changes`] (the concentrator learns the peer), and answers with
//! [`enroll::enroll_response`].

pub mod api;
pub mod audit;
pub mod authz;
pub mod backup;
pub mod broker;
pub mod changes;
pub mod cluster;
pub mod config;
pub mod crl;
pub mod datadir;
pub mod enroll;
pub mod events;
pub mod identify;
pub mod limits;
pub mod metrics;
pub mod netstack;
pub mod secret;
pub mod tls;
pub mod wg;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use time::OffsetDateTime;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use floto_pki::{Ca, Serial};
use floto_proto::admin::Role;
use floto_proto::DeviceId;
use floto_registry::cluster::Cluster;
use floto_registry::postgres::PgRegistry;
use floto_registry::sqlite::SqliteRegistry;
use floto_registry::{CertKind, IssuedCertRecord, NewOperator, Registry};

use crate::api::AppState;
use crate::audit::Auditor;
use crate::broker::{Broker, BrokerDeps};
use crate::changes::{Applier, Feed};
use crate::config::Config;
use crate::datadir::{DataDir, InitOptions, LOCAL_ADMIN};
use crate::events::{EventHub, WallClock};
use crate::identify::{Identifier, RevokedSerials};
use crate::metrics::Metrics;
use crate::wg::{Concentrator, PeerTable};

pub use crate::datadir::{Bound, RuntimeInfo};

/// Lifetime of the local admin's certificate; renewed at start when under a third remains.
const LOCAL_ADMIN_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// A started server.
pub struct RunningServer {
    pub bound: Bound,
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The graceful shutdown: takes no new broker sessions (and says so on `/readyz`),
    /// lets the open ones finish for up to `grace` while devices stay connected, closes
    /// what is left, then [`stop`](Self::stop)s. `hurry` (a second signal) cuts the grace
    /// period short.
    pub async fn shut_down(self, grace: Duration, hurry: impl Future<Output = ()>) {
        let broker = &self.state.broker;
        broker.start_draining();
        let open = broker.active();
        if open > 0 {
            info!(
                open,
                ?grace,
                "draining: new broker sessions are refused, open ones may finish"
            );
            tokio::select! {
                _ = broker.idle() => info!("every broker session ended"),
                _ = tokio::time::sleep(grace) => {
                    warn!(left = broker.active(), "grace period over; closing the remaining broker sessions");
                }
                _ = hurry => warn!(left = broker.active(), "asked again: closing the remaining broker sessions"),
            }
        }
        let closed = broker.close_all();
        if closed > 0 {
            // Let the cancelled sessions write their audit records.
            let _ = tokio::time::timeout(Duration::from_secs(2), broker.idle()).await;
        }
        self.stop().await;
    }

    /// Stops accepting, drains, persists endpoints, closes the registry.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        let state = &self.state;
        persist_presence(state, None).await;
        let _ = std::fs::remove_file(state.data.runtime());
        info!("stopped");
    }
}

/// Runs the server until `shutdown` completes, then shuts down gracefully within the
/// configured grace period (cut short when `hurry` completes).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let grace = config.shutdown_grace;
    let server = start(config).await?;
    shutdown.await;
    info!(?grace, "shutting down");
    server.shut_down(grace, hurry).await;
    Ok(())
}

/// Initialises the data dir if needed, opens the registry, binds every port and starts
/// serving. Fails before binding anything if the configuration or data dir is unusable.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let data = DataDir::new(&config.data_dir);
    if !data.is_initialised() {
        let report = data.init(
            &InitOptions {
                overlay: Some(config.overlay),
                endpoint: config.endpoint.clone(),
                import_ca: None,
                import_ssh: None,
            },
            OffsetDateTime::now_utc(),
        )?;
        info!(created = ?report.created, dir = %data.root().display(), "initialised the data dir");
    }
    // A data dir from before the SSH CAs gets them now. Cluster nodes must share them, so a
    // node never makes its own.
    if !data.ssh_user_ca().exists() || !data.ssh_host_ca().exists() {
        if config.database_url.is_some() {
            anyhow::bail!(
                "{} has no SSH CAs, and cluster nodes must share them: run `floto-vpn-server \
                 init` on one node's data dir, back it up (`floto-vpn-server backup`), and restore \
                 that backup on every node (in Kubernetes: the floto-identity Secret)",
                data.root().display()
            );
        }
        let mut report = datadir::InitReport::default();
        data.ensure_ssh_cas(None, &mut report)?;
        info!(created = ?report.created, "made the SSH CAs");
    }
    let ssh = Arc::new(data.load_ssh_cas()?);
    let ca = Arc::new(data.load_ca()?);
    let wg_private = data.load_wg_key()?;
    let (store, cluster): (Arc<dyn Registry>, Option<Arc<dyn Cluster>>) = match &config.database_url
    {
        None => (
            Arc::new(
                SqliteRegistry::open(&data.database(), config.overlays.clone())
                    .await
                    .with_context(|| {
                        format!("opening the registry {}", data.database().display())
                    })?,
            ),
            None,
        ),
        Some(url) => {
            let pg = Arc::new(
                PgRegistry::connect(url.expose(), config.overlays.clone())
                    .await
                    .with_context(|| format!("opening the registry at {url}"))?,
            );
            (pg.clone(), Some(pg))
        }
    };
    ensure_local_admin(&data, &ca, store.as_ref()).await?;

    // The concentrator, with every enrolled device as a peer.
    let clock = WallClock::new();
    let events = Arc::new(match &config.database_url {
        Some(_) => EventHub::for_cluster(clock, config.node_name.clone()),
        None => EventHub::new(clock),
    });
    let table = Arc::new(PeerTable::new(
        wg_private,
        config.overlays.networks().to_vec(),
        config.online_window,
        config.handshake_rate_limit,
        rand::random(),
    ));
    let server_cert = tls::ServerCert::load(&config, &data, &ca)?;
    let metrics = Arc::new(Metrics::with_certificates(
        table.clone(),
        Some(metrics::CertWatch {
            tls: server_cert.clone(),
            ca_not_after: ca.not_after(),
        }),
    ));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (concentrator, from_devices) = Concentrator::bind(
        config.wg_listen,
        workers,
        table.clone(),
        events.clone(),
        metrics.handshake_histogram(),
    )?;
    let concentrator = Arc::new(concentrator);
    metrics.watch(
        concentrator.streams.clone(),
        concentrator.handshakes.clone(),
    );

    // Sockets, all bound before anything is served.
    let api_listener = TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the HTTPS API on TCP {}", config.api_listen))?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics on TCP {}", config.metrics_listen))?;
    let quic_socket = UdpSocket::bind(config.quic_listen)
        .await
        .with_context(|| format!("binding the QUIC broker on UDP {}", config.quic_listen))?
        .into_std()?;
    let wg_tls_listener = match config.wg_tls_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("binding the extra HTTPS listener for WireGuard over TLS on TCP {addr}")
        })?),
        None => None,
    };
    let bound = Bound {
        wg: concentrator.local_addr(),
        api: api_listener.local_addr()?,
        quic: quic_socket.local_addr()?,
        metrics: metrics_listener.local_addr()?,
        wg_tls: wg_tls_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?,
    };
    let https = tls::https_config(server_cert.clone())?;
    // In a cluster, the QUIC port also carries the node link, with a node certificate.
    let node_cert = match config.database_url {
        Some(_) => Some(tls::NodeCert::issue(
            &ca,
            &config.node_name,
            &config.node_address,
            &data,
        )?),
        None => None,
    };
    let quic = tls::quic_config(server_cert.clone(), node_cert.as_ref())?;

    let shutdown = CancellationToken::new();
    let (netstack, netstack_task) =
        netstack::Netstack::new(&config.overlays, concentrator.clone(), from_devices);
    let audit = Auditor::new(store.clone());
    let broker = Arc::new(Broker::new(BrokerDeps {
        caps: broker::SessionCaps {
            per_operator: config.max_sessions_per_operator,
            per_device: config.max_sessions_per_device,
        },
        registry: store.clone(),
        table: table.clone(),
        clock,
        netstack,
        metrics: metrics.clone(),
        audit: audit.clone(),
    }));
    let revoked = Arc::new(RevokedSerials::default());
    let applier = Arc::new(Applier::new(
        concentrator.clone(),
        broker.clone(),
        revoked.clone(),
    ));
    // What the registry holds, through the same applier as every later change.
    let changes = Arc::new(Feed::new(store.clone(), applier));
    let mut call_back = changes.load(OffsetDateTime::now_utc()).await?;
    // In a cluster, devices held by live nodes must not be called away from them, and a dead
    // node's devices come from the takeover: this node calls back only its share of the
    // devices nobody holds.
    let node = match &cluster {
        Some(cluster) => {
            let address = match config.node_address.parse::<std::net::Ipv6Addr>() {
                Ok(v6) => format!("[{v6}]:{}", bound.quic.port()),
                Err(_) => format!("{}:{}", config.node_address, bound.quic.port()),
            };
            Some(
                cluster::Node::join(
                    cluster.clone(),
                    config.node_name.clone(),
                    address,
                    broker.clone(),
                    metrics.clone(),
                )
                .await?,
            )
        }
        None => None,
    };

    let state = Arc::new(AppState {
        enroll_slots: Arc::new(Semaphore::new(config.max_concurrent_enrollments)),
        server_wg_public: concentrator.public_key(),
        identify: Arc::new(Identifier::new(store.clone(), revoked.clone())),
        crl: crl::CrlPublisher::new(store.clone(), ca.clone(), revoked),
        enroll_rate: limits::PerKeyRate::new(config.enroll_rate_per_key),
        changes,
        node: node.clone(),
        cluster,
        audit,
        broker: broker.clone(),
        config,
        data,
        store,
        ca: ca.clone(),
        ssh,
        wg: concentrator.clone(),
        metrics,
        bound,
        events,
    });

    let mut tasks = JoinSet::new();
    tasks.spawn(concentrator.clone().run(shutdown.clone()));
    tasks.spawn(netstack_task.run(shutdown.clone()));
    if let Some(listener) = wg_tls_listener {
        // The same HTTPS service: devices that may only reach 443 use it for /v1/wg (and
        // enrollment and renewal, which they need too).
        tasks.spawn(api::server::serve_https(
            listener,
            https.clone(),
            state.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(api::server::serve_https(
        api_listener,
        https,
        state.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(api::server::serve_metrics(
        metrics_listener,
        state.clone(),
        shutdown.clone(),
    ));
    let quic_endpoint = broker::quic::endpoint(quic_socket, quic)?;
    if let (Some(node), Some(cluster), Some(cert)) = (&state.node, &state.cluster, &node_cert) {
        let this = node.clone();
        let link = broker::relay::NodeLink::new(
            quic_endpoint.clone(),
            cert.client_config(&ca)?,
            cluster.clone(),
            state.config.online_window,
            Box::new(move || this.id()),
        )?;
        state.broker.set_relay(Arc::new(link));
    }
    tasks.spawn(broker::quic::serve(
        quic_endpoint,
        broker::quic::QuicFrontEnd {
            ca,
            identify: state.identify.clone(),
            broker,
        },
        shutdown.clone(),
    ));
    tasks.spawn(presence_loop(state.clone(), shutdown.clone()));
    tasks.spawn(state.changes.clone().follow(shutdown.clone()));
    if let Some(node) = node {
        tasks.spawn(node.run(
            table.clone(),
            concentrator.clone(),
            state.events.clone(),
            state.config.online_window,
            shutdown.clone(),
        ));
    }
    tasks.spawn(
        state
            .broker
            .clone()
            .audit_repeated_refusals(shutdown.clone()),
    );
    tasks.spawn(tls_refresh_loop(
        state.clone(),
        server_cert.clone(),
        shutdown.clone(),
    ));
    {
        let wg = concentrator.clone();
        let shutdown = shutdown.clone();
        let node = state.node.clone();
        let window = state.config.online_window;
        tasks.spawn(async move {
            if let Some(node) = node {
                // Only this node's share of the devices nobody holds (see there).
                call_back = match node.share_to_call_back(call_back, window).await {
                    Ok(share) => share,
                    Err(e) => {
                        warn!(error = %e, "cannot read the cluster's sessions; calling no device back");
                        Vec::new()
                    }
                };
            }
            wg.call_back(call_back, CALL_BACK_RATE, shutdown).await
        });
    }

    let runtime = RuntimeInfo {
        pid: std::process::id(),
        bound,
        started_at: OffsetDateTime::now_utc(),
    };
    datadir::write_public(
        &state.data.runtime(),
        serde_json::to_string_pretty(&runtime)?.as_bytes(),
    )?;
    info!(
        wg = %bound.wg,
        api = %bound.api,
        quic = %bound.quic,
        metrics = %bound.metrics,
        devices = table.len(),
        public_key = %state.server_wg_public,
        "floto-vpn-server listening"
    );
    Ok(RunningServer {
        bound,
        state,
        shutdown,
        tasks,
    })
}

/// Handshakes per second the server starts calling devices back at after a restart; it then
/// goes as fast as their answers come back without queueing (`wg::pacer`).
const CALL_BACK_RATE: u32 = 2000;
/// How often endpoints are checked for changes, besides being woken by a device coming
/// online or roaming; written so that even after a SIGKILL the server can call back the
/// devices that were connected.
const PRESENCE_EVERY: Duration = Duration::from_secs(5);
/// After a write prompted by a device coming online or roaming, how long to gather more
/// before the next one: a lone device is written at once, a storm of reconnecting devices
/// in a few batches rather than one transaction each.
const PRESENCE_GATHER: Duration = Duration::from_millis(500);

/// How often the API's TLS certificate is checked for rotation.
const TLS_REFRESH_EVERY: Duration = Duration::from_secs(5);

async fn tls_refresh_loop(
    state: Arc<AppState>,
    cert: Arc<tls::ServerCert>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TLS_REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match cert.refresh(&state.config, &state.data, &state.ca) {
            Ok(_) => failing = false,
            // Logged once per failure spell, not every few seconds.
            Err(e) if !failing => {
                failing = true;
                warn!(error = %format!("{e:#}"), "cannot load the new TLS certificate; still serving the current one");
            }
            Err(_) => {}
        }
    }
}

async fn presence_loop(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PRESENCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut written = std::collections::HashMap::new();
    loop {
        let prompted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            _ = state.events.endpoint_changed() => true,
        };
        persist_presence(&state, Some(&mut written)).await;
        if prompted {
            // Changes meanwhile leave a stored wake-up: they are written as one batch.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PRESENCE_GATHER) => {}
            }
        }
    }
}

/// Writes device endpoints and last-seen times: only endpoints not in `written` (which it
/// updates), or all of them when `written` is `None` (at shutdown).
async fn persist_presence(
    state: &AppState,
    written: Option<&mut std::collections::HashMap<DeviceId, SocketAddr>>,
) {
    let clock = *state.events.clock();
    let mut live = state.wg.table.endpoints();
    if let Some(written) = &written {
        live.retain(|(device, endpoint, _)| written.get(device) != Some(endpoint));
    }
    let presence: Vec<floto_registry::Presence> = live
        .iter()
        .map(|(device, endpoint, seen)| floto_registry::Presence {
            device: *device,
            endpoint: *endpoint,
            last_seen: clock.wall(*seen),
        })
        .collect();
    match state.store.save_presence(&presence).await {
        Ok(()) => {
            if let Some(written) = written {
                written.extend(live.into_iter().map(|(d, e, _)| (d, e)));
            }
        }
        Err(e) => warn!(error = %e, "could not persist device endpoints"),
    }
}

/// Makes sure the local admin operator exists and holds a valid certificate from the
/// current CA in the data dir.
async fn ensure_local_admin(data: &DataDir, ca: &Ca, store: &dyn Registry) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    if store.operator(LOCAL_ADMIN).await?.is_none() {
        store
            .add_operator(NewOperator {
                name: LOCAL_ADMIN.into(),
                role: Role::Admin,
                fleets: Vec::new(),
                // No usable login token: the local admin's credential lives in the data dir.
                token_kind: floto_proto::admin::TokenKind::Login,
                token_hash: rand::random(),
                token_expires_at: Some(now),
                now,
            })
            .await?;
    }
    let current = std::fs::read_to_string(data.admin_cert())
        .ok()
        .and_then(|pem| {
            use rustls_pki_types::pem::PemObject as _;
            let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
            ca.verify_client_cert(&der, now).ok()
        });
    let fresh_enough = current.is_some_and(|c| {
        c.not_after - now > LOCAL_ADMIN_CERT_LIFETIME / 3 && data.admin_key().exists()
    });
    if fresh_enough {
        return Ok(());
    }
    let key = floto_pki::generate_key()?;
    let csr = floto_pki::parse_csr(&floto_pki::make_csr(&key, LOCAL_ADMIN)?)?;
    let serial = Serial::random();
    let cert = ca.sign_operator(&csr, LOCAL_ADMIN, &serial, now, LOCAL_ADMIN_CERT_LIFETIME)?;
    store
        .record_certificate(IssuedCertRecord {
            serial: serial.to_hex(),
            kind: CertKind::Operator,
            subject: LOCAL_ADMIN.into(),
            issued_at: now,
            expires_at: cert.not_after,
            revoked_at: None,
        })
        .await?;
    datadir::write_secret(&data.admin_key(), key.as_bytes())?;
    datadir::write_public(&data.admin_cert(), cert.pem.as_bytes())?;
    info!("issued the local admin certificate");
    Ok(())
}
