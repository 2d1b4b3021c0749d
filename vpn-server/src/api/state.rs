//! What the request handlers share: the server's parts, as `start` wired them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;

use floto_pki::Ca;
use floto_proto::devices::DeviceInfo;
use floto_proto::{DeviceId, WgKey};
use floto_registry::cluster::{Cluster, SessionRecord};
use floto_registry::{Device, Registry};

use super::devices::device_info;
use super::ConnInfo;
use crate::audit::Auditor;
use crate::broker::Broker;
use crate::changes::Feed;
use crate::cluster::Node;
use crate::config::Config;
use crate::crl::CrlPublisher;
use crate::datadir::{Bound, DataDir, SshCas};
use crate::enroll::{device_endpoint, ServerFacts};
use crate::events::EventHub;
use crate::identify::Identifier;
use crate::limits::PerKeyRate;
use crate::metrics::Metrics;
use crate::wg::Concentrator;

/// Everything the request handlers share.
pub struct AppState {
    pub config: Config,
    pub data: DataDir,
    pub store: Arc<dyn Registry>,
    pub ca: Arc<Ca>,
    /// The SSH user and host CAs.
    pub ssh: Arc<SshCas>,
    pub wg: Arc<Concentrator>,
    pub server_wg_public: WgKey,
    /// Who is calling (certificates, tokens, the revoked set).
    pub identify: Arc<Identifier>,
    /// Where committed registry changes reach the running server.
    pub changes: Arc<Feed>,
    pub audit: Auditor,
    pub metrics: Arc<Metrics>,
    pub enroll_slots: Arc<Semaphore>,
    pub bound: Bound,
    pub events: Arc<EventHub>,
    pub broker: Arc<Broker>,
    /// The published CRL.
    pub crl: CrlPublisher,
    /// Enrollments per provisioning key (by key id).
    pub enroll_rate: PerKeyRate<String>,
    /// In a cluster: this node, and the cluster's leases and sessions.
    pub node: Option<Arc<Node>>,
    pub cluster: Option<Arc<dyn Cluster>>,
}

/// Devices online in the cluster, by UUID (see [`AppState::elsewhere`]).
#[derive(Debug, Default)]
pub struct Elsewhere(HashMap<DeviceId, SessionRecord>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// A device's registry row joined with its live state.
    pub fn live_info(&self, d: &Device, elsewhere: &Elsewhere) -> DeviceInfo {
        let mut live = self.wg.table.status(&d.id);
        // A TLS stream's endpoint is an address of our own: show its TCP peer.
        let mut transport = live.as_ref().filter(|s| s.online).map(|_| "udp");
        if let Some(s) = live.as_mut() {
            if let Some(e) = s.endpoint.filter(crate::wg::streams::is_stream) {
                s.endpoint = self.wg.streams.remote(&e);
                transport = transport.map(|_| "tls");
            }
        }
        let mut info = device_info(
            d,
            live.as_ref(),
            self.events.clock(),
            self.node.as_ref().map(|n| n.name()),
            elsewhere.0.get(&d.id),
        );
        info.transport = transport.map(str::to_owned);
        info
    }

    /// In a cluster, the devices online on any node (one device, or all): for the device
    /// views. Empty on a single node; a database fault shows this node's view alone.
    pub async fn elsewhere(&self, device: Option<&DeviceId>) -> Elsewhere {
        let Some(cluster) = &self.cluster else {
            return Elsewhere::default();
        };
        let window = self.config.online_window;
        let read = match device {
            Some(id) => cluster
                .online_session(id, window)
                .await
                .map(|s| s.into_iter().collect()),
            None => cluster.online_sessions(window).await,
        };
        match read {
            Ok(sessions) => Elsewhere(sessions.into_iter().map(|s| (s.device, s)).collect()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's sessions; showing this node's");
                Elsewhere::default()
            }
        }
    }

    /// What an enrolling device on connection `conn` is told about this server.
    pub fn server_facts(&self, conn: &ConnInfo) -> ServerFacts<'_> {
        ServerFacts {
            overlays: &self.config.overlays,
            endpoint: device_endpoint(
                self.config.endpoint.as_deref(),
                conn.host.as_deref(),
                conn.local.ip(),
                self.bound.wg.port(),
            ),
            server_public_key: self.server_wg_public,
            ca_pem: self.ca.cert_pem(),
        }
    }
}
