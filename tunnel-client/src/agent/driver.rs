//! The agent's I/O shell: one task that owns the UDP socket, the TLS stream (when one is
//! open), boringtun's `Tunn`, the link supervisor, the transport selector and the renewal
//! planner, and moves packets between the network and the local side. All decisions are the
//! sans-IO cores' ([`LinkSupervisor`], [`TransportSelector`], [`RenewalPlanner`]); this
//! module only reads, writes and reports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use boringtun::noise::{Packet, Tunn, TunnResult};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use time::OffsetDateTime;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use floto_proto::wireguard::is_initiation;

use super::backoff::{jittered, Backoff};
use super::certs::{self, Failed};
use super::config::AgentConfig;
use super::endpoints::{self, Rotation};
use super::link::{LinkAction, LinkEvent, LinkParams, LinkSupervisor};
use super::local::{self, LocalSide};
use super::probe;
use super::renewal::{CertAction, RenewalPlanner, REVOKED_RETRY};
use super::sshd;
use super::status::AgentStatus;
use super::tls_stream::{self, OpenError, StreamEvent, StreamHandle, StreamTarget};
use super::transport::{
    AttemptVia, Transport, TransportAction, TransportEvent, TransportParams, TransportSelector,
};
use super::wg_tls::authority;
use crate::enroll::{enroll, EnrollError};
use crate::servers::{self, ServerUrl};
use crate::state::{DeviceState, StateDir, StateError};

/// How often the driver runs its timers.
const TICK: Duration = Duration::from_millis(100);

/// How often the device's own address is looked at.
const ADDRESS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The status file is rewritten at least this often (its `updated_at` shows the agent lives).
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// How long resolving the endpoint candidates may take, all names together.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Events from the TLS stream's tasks waiting for the driver at most.
const STREAM_EVENTS: usize = 1024;

/// Runs the agent until `shutdown` completes: enrolls if needed, then keeps the tunnel up.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    let dir = StateDir::new(&config.state_dir);
    let mut rng = StdRng::from_os_rng();
    let Some(state) = obtain_identity(&dir, &config, &mut rng, &token).await? else {
        return Ok(());
    };
    let result = Driver::start(config, dir, state, rng, &token)
        .await?
        .run(&token)
        .await;
    token.cancel();
    result
}

/// The identity in the state dir, enrolling first when there is none and a provisioning key
/// is configured. A damaged state dir is an error, never a reason to enroll anew. `None`
/// when shut down while waiting.
async fn obtain_identity(
    dir: &StateDir,
    config: &AgentConfig,
    rng: &mut StdRng,
    token: &CancellationToken,
) -> anyhow::Result<Option<DeviceState>> {
    let backoff = Backoff::new(Duration::from_secs(1), config.backoff_cap);
    let mut attempt = 0u32;
    loop {
        match dir.load() {
            Ok(state) => return Ok(Some(state)),
            Err(StateError::NotEnrolled(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(settings) = &config.enroll else {
            bail!(
                "{} holds no device identity and no provisioning key is configured: set `provisioning_key` (or `provisioning_key_file`), `server` and `ca` in the config file, or run `floto-tunnel enroll`",
                dir.root().display()
            );
        };
        // sshd's host keys go with the enrollment, for host certificates.
        let mut settings = settings.clone();
        settings.ssh_host_keys = host_key_lines(config);
        let wait = match enroll(dir, &settings).await {
            Ok((state, _created)) => return Ok(Some(state)),
            Err(EnrollError::Client(e)) if e.is_transient() => {
                let wait = backoff.delay(attempt, rng);
                attempt = attempt.saturating_add(1);
                warn!(error = %e, retry_in = ?wait, "cannot enroll yet");
                wait
            }
            Err(EnrollError::Client(e)) => {
                let wait = jittered(REVOKED_RETRY, 0.25, rng);
                error!(error = %e, retry_in = ?wait, "enrollment refused; check the provisioning key, server and CA in the config");
                wait
            }
            Err(EnrollError::State(e)) => return Err(e.into()),
            Err(e) => return Err(e.into()),
        };
        tokio::select! {
            _ = token.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Where a datagram came from, or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The UDP socket, from or to this address.
    Udp(SocketAddr),
    /// The TLS stream.
    Stream,
}

impl Route {
    fn transport(self) -> Transport {
        match self {
            Self::Udp(_) => Transport::Udp,
            Self::Stream => Transport::Tls,
        }
    }
}

/// Kind of an incoming datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initiation,
    Response,
    CookieReply,
    Data,
}

/// The running agent.
struct Driver {
    config: AgentConfig,
    dir: StateDir,
    state: DeviceState,
    tunn: Tunn,
    udp: Arc<UdpSocket>,
    /// The server's WireGuard endpoint in use.
    endpoint: Option<SocketAddr>,
    /// Which endpoint candidate the next handshake goes to.
    rotation: Rotation,
    /// The candidate the current attempt's initiation went to (silent if it fails).
    attempt_endpoint: Option<SocketAddr>,
    /// The endpoint candidates as last resolved (where UDP probes go).
    candidates: Vec<SocketAddr>,
    /// UDP or TLS, and the stream's life.
    selector: TransportSelector,
    /// The open stream.
    stream: Option<StreamHandle>,
    /// The server the open stream goes to.
    stream_server: Option<ServerUrl>,
    /// The stream being opened: its id and server.
    opening: Option<(u64, ServerUrl)>,
    next_stream_id: u64,
    /// Which server's API the next stream goes to.
    tls_rotation: Rotation<ServerUrl>,
    /// The server the current attempt's stream went to (silent if it fails).
    attempt_server: Option<ServerUrl>,
    /// Where the stream tasks report; the receiver is the main loop's.
    stream_tx: mpsc::Sender<StreamEvent>,
    stream_rx: Option<mpsc::Receiver<StreamEvent>>,
    /// Stream tasks end with it.
    token: CancellationToken,
    link: LinkSupervisor,
    planner: RenewalPlanner,
    cert_busy: bool,
    rng: StdRng,
    probe_ident: u16,
    probe_seq: u16,
    /// The device's own address toward the endpoint in use, and that endpoint.
    local_address: Option<(SocketAddr, IpAddr)>,
    next_address_check: Instant,
    status: AgentStatus,
    status_dirty: bool,
    next_status_write: Instant,
    /// When to ask for the fleet's SSH logins next (when sshd is managed).
    next_ssh_refresh: Instant,
    buf: Vec<u8>,
    local: Option<LocalSide>,
}

impl Driver {
    async fn start(
        config: AgentConfig,
        dir: StateDir,
        state: DeviceState,
        mut rng: StdRng,
        token: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let (net, prefix) = overlay_network(&state.file.assignment.overlay_network)?;
        let _ = net;
        let local = local::open(
            config.mode,
            &config.tun_name,
            state.file.assignment.overlay_ip,
            prefix,
            &config.forwards,
            token,
        )
        .await?;
        let udp = super::socket::wireguard_socket().context("binding the WireGuard UDP socket")?;
        let keepalive = config.keepalive.unwrap_or(Duration::from_secs(u64::from(
            state.file.assignment.persistent_keepalive.max(1),
        )));
        let link = LinkSupervisor::new(LinkParams::new(keepalive, config.backoff_cap));
        let selector = TransportSelector::new(TransportParams::new(
            config.transport,
            config.udp_probe_every,
            config.backoff_cap,
        ));
        let (stream_tx, stream_rx) = mpsc::channel(STREAM_EVENTS);
        // Host keys without host certificates (a new device, a re-flash, an agent that did not
        // manage sshd before): renew at once to get them.
        let uncertified = config.sshd.as_ref().is_some_and(|cfg| {
            !sshd::certifies_all(dir.load_ssh().as_ref(), &sshd::host_keys(&cfg.dir))
        });
        if uncertified {
            info!("sshd's host keys have no host certificates yet; renewing now to get them");
        }
        let planner = RenewalPlanner::new(
            state.file.assignment.expires_at,
            state.file.assignment.renew_after,
            config.enroll.is_some(),
            config.backoff_cap,
            dir.has_pending_key() || uncertified,
            &mut rng,
        );
        let tunn = new_tunn(&state, &mut rng);
        let now_utc = OffsetDateTime::now_utc();
        let status = AgentStatus {
            pid: std::process::id(),
            mode: config.mode,
            uuid: state.file.assignment.uuid,
            overlay_ip: state.file.assignment.overlay_ip,
            connected: false,
            since: Some(now_utc),
            endpoint: None,
            transport: Some(selector.current()),
            proxy: None,
            cert_expires_at: state.file.assignment.expires_at,
            last_error: None,
            last_error_at: None,
            revoked: false,
            failed_attempts: 0,
            connects: 0,
            renewals: 0,
            started_at: now_utc,
            updated_at: now_utc,
        };
        info!(
            device = %state.file.assignment.uuid,
            ip = %state.file.assignment.overlay_ip,
            mode = %config.mode,
            transport = %config.transport,
            proxy = ?config.proxy.as_ref().map(ToString::to_string),
            ?keepalive,
            backoff_cap = ?config.backoff_cap,
            cert_expires_at = %state.file.assignment.expires_at,
            renew_at = %planner.renew_at(),
            "agent started"
        );
        let now = Instant::now();
        let config_refresh = config.sshd.as_ref().map_or(Duration::ZERO, |c| c.refresh);
        Ok(Self {
            config,
            dir,
            state,
            tunn,
            udp: Arc::new(udp),
            endpoint: None,
            rotation: Rotation::new(),
            attempt_endpoint: None,
            candidates: Vec::new(),
            selector,
            stream: None,
            stream_server: None,
            opening: None,
            next_stream_id: 0,
            tls_rotation: Rotation::new(),
            attempt_server: None,
            stream_tx,
            stream_rx: Some(stream_rx),
            token: token.clone(),
            link,
            planner,
            cert_busy: false,
            probe_ident: rng.random(),
            probe_seq: 0,
            rng,
            local_address: None,
            next_address_check: now,
            status,
            status_dirty: true,
            next_status_write: now,
            next_ssh_refresh: now + config_refresh,
            buf: vec![0u8; 65_536 + 256],
            local: Some(local),
        })
    }

    async fn run(mut self, token: &CancellationToken) -> anyhow::Result<()> {
        // What the last enrollment or renewal said (a renewal for new host keys may be due).
        self.install_sshd();
        let udp = self.udp.clone();
        let Some(LocalSide {
            to_local,
            mut from_local,
        }) = self.local.take()
        else {
            bail!("the local side is gone");
        };
        let Some(mut stream_rx) = self.stream_rx.take() else {
            bail!("the stream events are gone");
        };
        let (cert_tx, mut cert_rx) = mpsc::channel(4);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut datagram = vec![0u8; 65_536];
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                r = udp.recv_from(&mut datagram) => match r {
                    Ok((n, from)) => self.on_datagram(&datagram[..n], Route::Udp(from), &to_local),
                    Err(e) => debug!(error = %e, "UDP receive failed"),
                },
                Some(event) = stream_rx.recv() => self.on_stream_event(event, &to_local),
                p = from_local.recv() => match p {
                    Some(p) => self.on_local_packet(&p),
                    None if token.is_cancelled() => break,
                    None => bail!("the local side stopped"),
                },
                Some((action, result)) = cert_rx.recv() => self.on_cert_result(action, result),
                _ = tick.tick() => self.on_tick(&cert_tx).await,
            }
        }
        self.status.connected = false;
        self.status.since = Some(OffsetDateTime::now_utc());
        self.write_status();
        info!("agent stopped");
        Ok(())
    }

    // ---- network input ---------------------------------------------------------------

    fn on_datagram(&mut self, data: &[u8], from: Route, to_local: &mpsc::Sender<Vec<u8>>) {
        if !self.selector.allows(from.transport()) {
            trace!(?from, "not a transport this agent uses; datagram dropped");
            return;
        }
        let now = Instant::now();
        let kind = match Tunn::parse_incoming_packet(data) {
            Ok(Packet::HandshakeInit(_)) => Kind::Initiation,
            Ok(Packet::HandshakeResponse(_)) => Kind::Response,
            Ok(Packet::PacketCookieReply(_)) => Kind::CookieReply,
            Ok(Packet::PacketData(_)) => Kind::Data,
            Err(_) => {
                trace!(?from, len = data.len(), "not a WireGuard datagram");
                return;
            }
        };
        let src = match from {
            Route::Udp(addr) => Some(addr.ip()),
            Route::Stream => None,
        };
        let mut flush = false;
        let authenticated = match self.tunn.decapsulate(src, data, &mut self.buf) {
            TunnResult::Done => kind == Kind::Data,
            TunnResult::Err(e) => {
                debug!(?from, ?kind, error = ?e, "datagram refused");
                return;
            }
            TunnResult::WriteToNetwork(p) => {
                transmit(
                    &self.udp,
                    self.stream.as_ref(),
                    &mut self.link,
                    p,
                    from,
                    now,
                );
                flush = true;
                matches!(kind, Kind::Response | Kind::Data)
            }
            TunnResult::WriteToTunnelV4(p, _src) => {
                if probe::is_echo_reply(
                    p,
                    self.state.file.assignment.server_overlay_ip,
                    self.probe_ident,
                ) {
                    trace!(?from, "probe answered");
                } else if to_local.try_send(p.to_vec()).is_err() {
                    trace!("local side full; packet dropped");
                }
                true
            }
            TunnResult::WriteToTunnelV6(..) => true,
        };
        if flush {
            // Packets queued while there was no session go out now.
            while let TunnResult::WriteToNetwork(p) =
                self.tunn.decapsulate(None, &[], &mut self.buf)
            {
                transmit(
                    &self.udp,
                    self.stream.as_ref(),
                    &mut self.link,
                    p,
                    from,
                    now,
                );
            }
        }
        if kind == Kind::Initiation {
            debug!(?from, "the server initiated a handshake");
        }
        if authenticated {
            // First: an answer over UDP while on TLS moves the session back to UDP.
            self.selector.handle_authenticated(from.transport(), now);
            match from {
                Route::Udp(from) => {
                    if !self.link.is_up()
                        || self.endpoint != Some(from)
                        || self.rotation.silent().contains(&from)
                    {
                        // Also a server that calls the device back from another address:
                        // followed.
                        self.rotation.handle_answered(from);
                    }
                    if self.endpoint != Some(from) {
                        info!(endpoint = %from, "server endpoint");
                        self.endpoint = Some(from);
                        self.status_dirty = true;
                    }
                }
                Route::Stream => {
                    if let Some(server) = &self.stream_server {
                        if self.tls_rotation.current() != Some(server) || !self.link.is_up() {
                            self.tls_rotation.handle_answered(server.clone());
                        }
                    }
                }
            }
            self.link.handle_authenticated(now);
            self.drain_transport(now);
            self.show_route();
        }
    }

    fn on_local_packet(&mut self, packet: &[u8]) {
        if packet.first().is_none_or(|b| b >> 4 != 4) {
            return; // IPv4 only
        }
        self.encapsulate_and_send(packet);
    }

    fn encapsulate_and_send(&mut self, packet: &[u8]) {
        let now = Instant::now();
        let route = self.route();
        match self.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => {
                if is_initiation(p) && !self.link.allows_initiation() {
                    trace!("initiation held back by the backoff");
                    return;
                }
                if let Some(route) = route {
                    transmit(
                        &self.udp,
                        self.stream.as_ref(),
                        &mut self.link,
                        p,
                        route,
                        now,
                    );
                }
            }
            TunnResult::Err(e) => debug!(error = ?e, "encapsulation failed"),
            _ => {}
        }
    }

    /// Where datagrams to the server go now: the UDP endpoint in use, or the stream.
    fn route(&self) -> Option<Route> {
        match self.selector.current() {
            Transport::Udp => self.endpoint.map(Route::Udp),
            Transport::Tls => Some(Route::Stream),
        }
    }

    // ---- the TLS stream ----------------------------------------------------------------

    fn on_stream_event(&mut self, event: StreamEvent, to_local: &mpsc::Sender<Vec<u8>>) {
        let now = Instant::now();
        match event {
            // Datagrams from any stream of ours: one still on its way after a switch is as
            // good as any.
            StreamEvent::Datagram(datagram) => {
                self.on_datagram(&datagram, Route::Stream, to_local);
            }
            StreamEvent::Opened { id, result } => {
                let Some((_, server)) = self.opening.take_if(|(o, _)| *o == id) else {
                    return; // no longer wanted: dropping the handle closes it
                };
                match result {
                    Ok(handle) => {
                        info!(server = %authority(server.host(), server.port()), proxy = ?self.config.proxy.as_ref().map(ToString::to_string), "TLS stream open");
                        self.stream = Some(handle);
                        self.stream_server = Some(server);
                        self.selector.handle_stream_opened(now);
                    }
                    Err(e) => {
                        match &e {
                            OpenError::Refused { error, .. } => {
                                warn!(error = %error.message, code = %error.error, "the server refused WireGuard over TLS");
                            }
                            _ => info!(error = %e, "cannot open a TLS stream"),
                        }
                        self.set_error(e.to_string());
                        self.tls_rotation.handle_silent(server);
                        self.selector.handle_stream_failed(now, &mut self.rng);
                    }
                }
            }
            StreamEvent::Closed { id, reason } => {
                if self.stream.as_ref().is_none_or(|s| s.id != id) {
                    return;
                }
                self.stream = None;
                self.stream_server = None;
                info!(%reason, "TLS stream closed");
                self.set_error(format!("the TLS stream closed: {reason}"));
                self.selector.handle_stream_closed(now, &mut self.rng);
            }
        }
        self.drain_transport(now);
        self.show_route();
    }

    /// Reports what the link supervisor and the transport selector say, and does what the
    /// selector asks, until neither has anything left (each one's news can be the other's
    /// input: a stream that cannot open fails the link's attempt, a failed attempt switches
    /// the transport).
    fn drain_transport(&mut self, now: Instant) {
        loop {
            self.drain_link_events(now);
            while let Some(TransportEvent::Switched { to, why }) = self.selector.poll_event() {
                info!(transport = %to, why, "transport");
                self.status_dirty = true;
            }
            let Some(action) = self.selector.poll_action() else {
                break;
            };
            match action {
                TransportAction::OpenStream => self.open_stream(now),
                TransportAction::CloseStream => {
                    if self.stream.take().is_some() {
                        debug!("TLS stream closed by the agent");
                    }
                    self.stream_server = None;
                    self.opening = None;
                }
                TransportAction::SendInitiation => self.initiate_over_stream(now),
                TransportAction::AttemptFailed => {
                    self.link.handle_attempt_failed(now, &mut self.rng);
                }
                TransportAction::StreamKeepalive => {
                    if let TunnResult::WriteToNetwork(p) = self.tunn.encapsulate(&[], &mut self.buf)
                    {
                        if !is_initiation(p) {
                            transmit(
                                &self.udp,
                                self.stream.as_ref(),
                                &mut self.link,
                                p,
                                Route::Stream,
                                now,
                            );
                        }
                    }
                }
                TransportAction::ProbeUdp => self.probe_udp(now),
            }
        }
    }

    /// The servers a stream may go to: the one the device enrolled with first, then the
    /// others configured.
    fn tls_servers(&self) -> Vec<ServerUrl> {
        servers::preferring(&self.state.file.server, &self.config.servers)
            .iter()
            .filter_map(|u| u.parse().ok())
            .collect()
    }

    /// Opens a stream to the next server in turn (in the background).
    fn open_stream(&mut self, now: Instant) {
        let Some(server) = self.tls_rotation.pick(&self.tls_servers()) else {
            self.set_error("no server URL to open a TLS stream to".to_owned());
            self.selector.handle_stream_failed(now, &mut self.rng);
            return;
        };
        let tls = match tls_stream::client_config(&self.state.server_ca_pem, &self.state.identity())
        {
            Ok(tls) => tls,
            Err(e) => {
                self.set_error(format!("TLS for WireGuard over TLS: {e}"));
                self.selector.handle_stream_failed(now, &mut self.rng);
                return;
            }
        };
        self.next_stream_id += 1;
        let id = self.next_stream_id;
        let target = StreamTarget {
            server: server.clone(),
            proxy: self.config.proxy.clone(),
            tls,
        };
        debug!(id, target = %target.describe(), "opening a TLS stream");
        self.opening = Some((id, server));
        tls_stream::spawn(id, target, self.stream_tx.clone(), &self.token);
    }

    /// The waiting attempt's initiation, over the stream.
    fn initiate_over_stream(&mut self, now: Instant) {
        self.attempt_server.clone_from(&self.stream_server);
        let sent = match (
            &self.stream,
            self.tunn.format_handshake_initiation(&mut self.buf, true),
        ) {
            (Some(stream), TunnResult::WriteToNetwork(p)) => {
                debug!(server = ?self.stream_server.as_ref().map(|s| authority(s.host(), s.port())), "handshaking over TLS");
                stream.send(p)
            }
            _ => false,
        };
        if sent {
            self.link.handle_sent(now);
            self.link.handle_attempt_started(now);
        } else {
            self.set_error("cannot send a handshake initiation over the TLS stream".to_owned());
            self.link.handle_attempt_failed(now, &mut self.rng);
        }
    }

    /// A handshake initiation over UDP, to the endpoint candidate in turn: its answer
    /// comes over UDP only when UDP works both ways, and moves the session back to UDP.
    fn probe_udp(&mut self, now: Instant) {
        let Some(to) = self.rotation.pick(&self.candidates) else {
            return;
        };
        if let TunnResult::WriteToNetwork(p) =
            self.tunn.format_handshake_initiation(&mut self.buf, true)
        {
            debug!(endpoint = %to, "probing UDP");
            // Unanswered, the next probe goes to the next candidate.
            self.rotation.handle_silent(to);
            transmit(&self.udp, None, &mut self.link, p, Route::Udp(to), now);
        }
    }

    /// The transport and endpoint in the status file.
    fn show_route(&mut self) {
        let transport = self.selector.current();
        let endpoint = self.route_name();
        let proxy = match transport {
            Transport::Tls => self.config.proxy.as_ref().map(ToString::to_string),
            Transport::Udp => None,
        };
        if self.status.transport != Some(transport)
            || (endpoint.is_some() && self.status.endpoint != endpoint)
            || self.status.proxy != proxy
        {
            self.status.transport = Some(transport);
            if endpoint.is_some() {
                self.status.endpoint = endpoint;
            }
            self.status.proxy = proxy;
            self.status_dirty = true;
        }
    }

    // ---- timers ----------------------------------------------------------------------

    async fn on_tick(&mut self, cert_tx: &mpsc::Sender<(CertAction, Result<DeviceState, Failed>)>) {
        let now = Instant::now();
        let route = self.route();
        match self.tunn.update_timers(&mut self.buf) {
            // boringtun's own initiations (retransmits, rekeys) wait while backing off.
            TunnResult::WriteToNetwork(p) if !is_initiation(p) || self.link.allows_initiation() => {
                if let Some(route) = route {
                    transmit(
                        &self.udp,
                        self.stream.as_ref(),
                        &mut self.link,
                        p,
                        route,
                        now,
                    );
                }
            }
            TunnResult::Err(e) => trace!(error = ?e, "boringtun timers"),
            _ => {}
        }
        if now >= self.next_address_check {
            self.next_address_check = now + ADDRESS_CHECK_EVERY;
            self.check_local_address(now);
        }
        self.link.handle_timeout(now, &mut self.rng);
        // Before acting: a failed attempt or a lost session decides the next endpoint and
        // transport.
        self.drain_transport(now);
        while let Some(action) = self.link.poll_action() {
            match action {
                LinkAction::Connect => self.connect(now).await,
                LinkAction::Probe => {
                    self.probe_seq = self.probe_seq.wrapping_add(1);
                    let p = probe::echo_request(
                        self.state.file.assignment.overlay_ip,
                        self.state.file.assignment.server_overlay_ip,
                        self.probe_ident,
                        self.probe_seq,
                    );
                    self.encapsulate_and_send(&p);
                }
                LinkAction::Keepalive => self.encapsulate_and_send(&[]),
            }
        }
        self.selector.handle_timeout(now);
        self.drain_transport(now);
        self.show_route();
        if !self.cert_busy {
            if let Some(action) = self.planner.poll_action(OffsetDateTime::now_utc()) {
                self.start_cert_action(action, cert_tx);
            }
        }
        if self.status_dirty || now >= self.next_status_write {
            self.write_status();
            self.next_status_write = now + STATUS_EVERY;
        }
        if let Some(cfg) = &self.config.sshd {
            if now >= self.next_ssh_refresh {
                self.next_ssh_refresh = now + jittered(cfg.refresh, 0.2, &mut self.rng);
                self.refresh_ssh_policy();
            }
        }
    }

    /// Starts an attempt over the transport the selector says: over UDP, resolves the
    /// server's endpoint candidates again, picks the one to try and sends it a fresh
    /// handshake initiation; over TLS, sends it over the stream, once one is open.
    async fn connect(&mut self, now: Instant) {
        self.attempt_endpoint = None;
        self.attempt_server = None;
        match self.selector.handle_connect(now) {
            AttemptVia::Udp => self.connect_udp(now).await,
            AttemptVia::Stream => self.initiate_over_stream(now),
            AttemptVia::StreamWhenOpen => {}
        }
        self.drain_transport(now);
    }

    async fn connect_udp(&mut self, now: Instant) {
        let name = self.state.file.assignment.endpoint.clone();
        let candidates = self.resolve_candidates().await;
        self.candidates.clone_from(&candidates);
        let Some(addr) = self.rotation.pick(&candidates) else {
            self.link.handle_attempt_failed(now, &mut self.rng);
            return;
        };
        self.attempt_endpoint = Some(addr);
        if self.endpoint != Some(addr) {
            info!(endpoint = %addr, %name, candidates = candidates.len(), "handshaking with the server");
            self.endpoint = Some(addr);
            self.status_dirty = true;
        } else {
            debug!(endpoint = %addr, "handshaking with the server");
        }
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(p) => match self.udp.try_send_to(p, addr) {
                Ok(_) => {
                    self.link.handle_sent(now);
                    self.link.handle_attempt_started(now);
                }
                Err(e) => {
                    self.set_error(format!("sending to {addr}: {e}"));
                    self.link.handle_attempt_failed(now, &mut self.rng);
                }
            },
            other => {
                let what = match other {
                    TunnResult::Err(e) => format!("{e:?}"),
                    _ => "no initiation".to_owned(),
                };
                self.set_error(format!("making a handshake initiation: {what}"));
                self.link.handle_attempt_failed(now, &mut self.rng);
            }
        }
    }

    /// The endpoint candidates as the names resolve now, all looked up at once (within
    /// [`RESOLVE_TIMEOUT`] together). Names that do not resolve are left out; the status
    /// says why when nothing is left.
    async fn resolve_candidates(&mut self) -> Vec<SocketAddr> {
        let lookups =
            match endpoints::lookups(&self.state.file.assignment.endpoint, &self.config.servers) {
                Ok(lookups) => lookups,
                Err(e) => {
                    self.set_error(e);
                    return Vec::new();
                }
            };
        let mut tasks = tokio::task::JoinSet::new();
        for (i, lookup) in lookups.iter().enumerate() {
            let (host, port) = (lookup.host.clone(), lookup.port);
            tasks.spawn(async move {
                let addrs = tokio::net::lookup_host((host.as_str(), port)).await;
                (i, addrs.map(Iterator::collect::<Vec<_>>))
            });
        }
        let mut answers: Vec<Option<std::io::Result<Vec<SocketAddr>>>> =
            lookups.iter().map(|_| None).collect();
        let _timed_out = tokio::time::timeout(RESOLVE_TIMEOUT, async {
            while let Some(joined) = tasks.join_next().await {
                if let Ok((i, addrs)) = joined {
                    answers[i] = Some(addrs);
                }
            }
        })
        .await;
        let mut problems = Vec::new();
        let mut resolved = Vec::new();
        for (lookup, answer) in lookups.iter().zip(answers) {
            match answer {
                Some(Ok(addrs)) => {
                    if !addrs.iter().any(SocketAddr::is_ipv4) {
                        problems.push(format!("{} has no IPv4 address", lookup.host));
                    }
                    resolved.push(addrs);
                }
                Some(Err(e)) => problems.push(format!("resolving {}: {e}", lookup.host)),
                None => problems.push(format!("resolving {}: timed out", lookup.host)),
            }
        }
        let candidates = endpoints::candidates(resolved);
        if candidates.is_empty() {
            self.set_error(problems.join("; "));
        } else if !problems.is_empty() {
            debug!(
                ?problems,
                ?candidates,
                "some endpoint names did not resolve"
            );
        } else {
            trace!(?candidates, "endpoint candidates");
        }
        candidates
    }

    /// Notices a change of the device's own address toward the server (not a change of the
    /// endpoint: that is the rotation's doing, and a fresh attempt is under way anyway).
    fn check_local_address(&mut self, now: Instant) {
        let Some(endpoint) = self.endpoint else {
            return;
        };
        let current = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| {
                s.connect(endpoint)?;
                s.local_addr()
            })
            .ok()
            .map(|a| a.ip());
        let Some(current) = current else {
            return;
        };
        if let Some((toward, old)) = self.local_address {
            if toward == endpoint && old != current {
                info!(%old, new = %current, "the device's address changed");
                self.link.handle_local_address_changed(now);
            }
        }
        self.local_address = Some((endpoint, current));
    }

    fn drain_link_events(&mut self, now: Instant) {
        while let Some(event) = self.link.poll_event() {
            let now_utc = OffsetDateTime::now_utc();
            match event {
                LinkEvent::Connected { failed_attempts } => {
                    let transport = self.selector.current();
                    info!(%transport, endpoint = ?self.route_name(), failed_attempts, "connected");
                    self.status.connected = true;
                    self.status.since = Some(now_utc);
                    self.status.connects += 1;
                    self.status.failed_attempts = 0;
                    self.selector.handle_link_up(now);
                }
                LinkEvent::Lost { silent_for } => {
                    warn!(?silent_for, transport = %self.selector.current(), "no answer from the server; handshaking again");
                    match self.selector.current() {
                        Transport::Udp => {
                            if let Some(ep) = self.endpoint {
                                self.rotation.handle_silent(ep);
                            }
                        }
                        Transport::Tls => {
                            if let Some(server) = &self.stream_server {
                                self.tls_rotation.handle_silent(server.clone());
                            }
                        }
                    }
                    self.status.connected = false;
                    self.status.since = Some(now_utc);
                    self.set_error(format!(
                        "no answer from the server for {} s",
                        silent_for.as_secs()
                    ));
                    self.selector.handle_link_down(now);
                }
                LinkEvent::AttemptFailed { attempt, retry_in } => {
                    let transport = self.selector.current();
                    info!(attempt, ?retry_in, %transport, endpoint = ?self.route_name(), "handshake failed; retrying");
                    if let Some(ep) = self.attempt_endpoint.take() {
                        self.rotation.handle_silent(ep);
                    }
                    if let Some(server) = self.attempt_server.take() {
                        self.tls_rotation.handle_silent(server);
                    }
                    // Over UDP, a dead node's address is left for the next candidate before
                    // the transport changes; over TLS, the same for the servers.
                    let tried_all = match transport {
                        Transport::Udp => self
                            .candidates
                            .iter()
                            .all(|c| self.rotation.silent().contains(c)),
                        Transport::Tls => self
                            .tls_servers()
                            .iter()
                            .all(|u| self.tls_rotation.silent().contains(u)),
                    };
                    self.status.failed_attempts = self.link.consecutive_failures();
                    if let Some(to) = self.route_name() {
                        let recent = self
                            .status
                            .last_error_at
                            .is_some_and(|t| now_utc - t < time::Duration::seconds(1));
                        if !recent {
                            self.set_error(format!(
                                "handshake with {to} over {transport} got no answer"
                            ));
                        }
                    }
                    if self
                        .planner
                        .handle_link_failing(self.link.consecutive_failures(), now_utc)
                    {
                        info!("checking in with the API (renewal) while the tunnel fails");
                    }
                    self.selector.handle_attempt_failed(now, tried_all);
                }
            }
            self.status_dirty = true;
        }
    }

    /// The server's address on the transport in use: the UDP endpoint, or the stream's
    /// `HOST:PORT`.
    fn route_name(&self) -> Option<String> {
        match self.selector.current() {
            Transport::Udp => self.endpoint.map(|e| e.to_string()),
            Transport::Tls => self
                .stream_server
                .as_ref()
                .or(self.opening.as_ref().map(|(_, s)| s))
                .map(|s| authority(s.host(), s.port())),
        }
    }

    // ---- certificates ----------------------------------------------------------------

    fn start_cert_action(
        &mut self,
        action: CertAction,
        tx: &mpsc::Sender<(CertAction, Result<DeviceState, Failed>)>,
    ) {
        self.cert_busy = true;
        info!(?action, expires_at = %self.state.file.assignment.expires_at, "renewing the certificate");
        let dir = self.dir.clone();
        let state = self.state.clone();
        let settings = self.config.enroll.clone();
        let servers = self.config.servers.clone();
        let host_keys = host_key_lines(&self.config);
        let proxy = self.config.proxy.as_ref().map(ToString::to_string);
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = certs::perform(
                action,
                &dir,
                &state,
                &servers,
                settings.as_ref(),
                &host_keys,
                proxy.as_deref(),
            )
            .await;
            let _ = tx.send((action, result)).await;
        });
    }

    fn on_cert_result(&mut self, action: CertAction, result: Result<DeviceState, Failed>) {
        self.cert_busy = false;
        let now_utc = OffsetDateTime::now_utc();
        match result {
            Ok(state) => {
                let was_revoked = self.planner.is_revoked();
                self.planner.handle_success(
                    state.file.assignment.expires_at,
                    state.file.assignment.renew_after,
                    &mut self.rng,
                );
                info!(
                    ?action,
                    expires_at = %state.file.assignment.expires_at,
                    next_renewal = %self.planner.renew_at(),
                    "new certificate"
                );
                if state.file.assignment.overlay_ip != self.state.file.assignment.overlay_ip {
                    warn!(old = %self.state.file.assignment.overlay_ip, new = %state.file.assignment.overlay_ip, "the server moved the device to another overlay address; restart the agent to use it");
                }
                if state.file.assignment.server_public_key
                    != self.state.file.assignment.server_public_key
                {
                    warn!("the server's WireGuard key changed; handshaking with the new one");
                    self.state = state;
                    self.tunn = new_tunn(&self.state, &mut self.rng);
                    self.link.reconnect(Instant::now());
                } else {
                    self.state = state;
                }
                if was_revoked {
                    info!("the server accepts the device again; reconnecting");
                    self.status.revoked = false;
                    self.link.reconnect(Instant::now());
                }
                self.status.cert_expires_at = self.state.file.assignment.expires_at;
                self.status.renewals += 1;
                self.install_sshd();
            }
            Err(Failed { failure, message }) => {
                let newly_revoked = self.planner.handle_failure(failure, now_utc, &mut self.rng);
                let next = self.planner.poll_timeout();
                if newly_revoked {
                    error!(
                        device = %self.state.file.assignment.uuid,
                        reason = %message,
                        "this device was REVOKED by the server: it stops reconnecting and asks again only about every 30 minutes; an admin must enroll it under a new UUID"
                    );
                    self.link.suspend();
                    self.selector.handle_link_down(Instant::now());
                    self.status.revoked = true;
                    self.status.connected = false;
                    self.status.since = Some(now_utc);
                } else {
                    warn!(?action, ?failure, error = %message, retry_at = ?next, "certificate renewal failed");
                }
                self.set_error(message);
            }
        }
        self.status_dirty = true;
    }

    /// Asks the server for the fleet's current logins and user CA (in the background), and
    /// sets sshd up again when they changed.
    fn refresh_ssh_policy(&self) {
        let Some(cfg) = self.config.sshd.clone() else {
            return;
        };
        let dir = self.dir.clone();
        let state = self.state.clone();
        let servers = self.config.servers.clone();
        let proxy = self.config.proxy.as_ref().map(ToString::to_string);
        tokio::spawn(async move {
            let Ok(clients) = servers::preferring(&state.file.server, &servers)
                .iter()
                .map(|server| state.api_via(server, proxy.as_deref()))
                .collect::<Result<Vec<_>, _>>()
            else {
                return;
            };
            let policy =
                match servers::call_in_turn(
                    &clients,
                    |api| async move { api.ssh_device_policy().await },
                )
                .await
                {
                    Ok((_, policy)) => policy,
                    Err(e) => {
                        debug!(error = %e, "cannot ask for the fleet's SSH logins now");
                        return;
                    }
                };
            match dir.save_ssh_policy(&policy) {
                Ok(true) => {
                    info!(logins = %policy.logins.join(","), "the fleet's SSH logins changed");
                    install_sshd_now(cfg, dir).await;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot record the fleet's SSH logins"),
            }
        });
    }

    /// Sets sshd up with what the server last said (in the background: it runs `sshd -t`
    /// and a reload). Nothing to do when sshd is not managed or nothing changed.
    fn install_sshd(&self) {
        if let Some(cfg) = self.config.sshd.clone() {
            tokio::spawn(install_sshd_now(cfg, self.dir.clone()));
        }
    }

    // ---- status ----------------------------------------------------------------------

    fn set_error(&mut self, message: String) {
        debug!(error = %message, "agent error");
        self.status.last_error = Some(message);
        self.status.last_error_at = Some(OffsetDateTime::now_utc());
        self.status_dirty = true;
    }

    fn write_status(&mut self) {
        self.status.updated_at = OffsetDateTime::now_utc();
        if let Err(e) = self.status.write(&self.dir.status()) {
            warn!(error = %e, "cannot write the status file");
        }
        self.status_dirty = false;
    }
}

/// A `Tunn` for the device's key and the server's, with a random session index.
fn new_tunn(state: &DeviceState, rng: &mut StdRng) -> Tunn {
    let secret = x25519_dalek::StaticSecret::from(state.wg_private);
    let server = x25519_dalek::PublicKey::from(state.file.assignment.server_public_key.0);
    // Keepalives are the link supervisor's job (its probes), not boringtun's.
    Tunn::new(secret, server, None, None, rng.random::<u32>() >> 8, None)
}

/// Sends one datagram without waiting (a full socket buffer or stream queue drops it, as a
/// NIC would).
fn transmit(
    udp: &UdpSocket,
    stream: Option<&StreamHandle>,
    link: &mut LinkSupervisor,
    p: &[u8],
    route: Route,
    now: Instant,
) {
    match route {
        Route::Udp(to) => match udp.try_send_to(p, to) {
            Ok(_) => link.handle_sent(now),
            Err(e) => debug!(%to, error = %e, "UDP send failed"),
        },
        Route::Stream => {
            if stream.is_some_and(|s| s.send(p)) {
                link.handle_sent(now);
            } else {
                trace!(len = p.len(), "no room on the TLS stream; datagram dropped");
            }
        }
    }
}

/// `10.240.0.0/16` as (network, prefix length).
fn overlay_network(cidr: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (net, len) = cidr
        .split_once('/')
        .with_context(|| format!("overlay network {cidr:?} has no prefix length"))?;
    let net: Ipv4Addr = net
        .parse()
        .with_context(|| format!("overlay network {cidr:?}"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .with_context(|| format!("overlay network {cidr:?}: bad prefix length"))?;
    Ok((net, len))
}

/// sshd's public host key lines, when the agent manages sshd.
fn host_key_lines(config: &AgentConfig) -> Vec<String> {
    config
        .sshd
        .as_ref()
        .map(|cfg| {
            sshd::host_keys(&cfg.dir)
                .into_iter()
                .map(|(_, line)| line)
                .collect()
        })
        .unwrap_or_default()
}

/// Sets sshd up with what the state dir holds from the server (host certificates, user CA,
/// logins); logs what happened.
async fn install_sshd_now(cfg: sshd::SshdConfig, dir: StateDir) {
    let Some(ssh) = dir.load_ssh() else {
        return;
    };
    let done = tokio::task::spawn_blocking(move || {
        let keys = sshd::host_keys(&cfg.dir);
        if !sshd::certifies_all(Some(&ssh), &keys) {
            warn!(dir = %cfg.dir.display(), "sshd's host keys changed since the last renewal; its certificates wait for the next one");
            return;
        }
        match sshd::install(&cfg, &ssh, &keys) {
            Ok(sshd::Installed::Changed { reloaded }) => info!(
                dir = %cfg.dir.display(),
                host_certificates = keys.len(),
                logins = %ssh.logins.join(","),
                reloaded,
                "sshd set up for floto-connect certificates"
            ),
            Ok(sshd::Installed::Unchanged) => debug!("sshd's floto-connect setup is current"),
            Ok(sshd::Installed::Unsupported(why)) => warn!("{why}"),
            Err(e) => error!(error = %e, "cannot set sshd up for floto-connect certificates"),
        }
    })
    .await;
    if let Err(e) = done {
        error!(error = %e, "setting sshd up failed");
    }
}
