//! Prometheus metrics. Gauges of online state and the data-plane counters are read from
//! the live session table at each scrape, so they are right after a restart; request
//! counters and latency histograms are kept here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::wg::{DropReason, HandshakeQueue, PeerTable, StreamEndpoints};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    enrollments: Family<ResultLabel, Counter>,
    enrollment_seconds: Histogram,
    handshake_seconds: Histogram,
    broker_sessions: Family<ResultLabel, Counter>,
    broker_active: Gauge,
    cluster: Arc<ClusterCounts>,
    /// The concentrator's TLS streams and handshake queue, once it runs.
    watched: Arc<std::sync::OnceLock<Watched>>,
}

/// What the metrics read of a running concentrator.
#[derive(Debug)]
struct Watched {
    streams: Arc<StreamEndpoints>,
    handshakes: Arc<HandshakeQueue>,
}

/// What a cluster node last read of the whole cluster; exported only in a cluster.
#[derive(Debug, Default)]
struct ClusterCounts {
    known: std::sync::atomic::AtomicBool,
    nodes: std::sync::atomic::AtomicI64,
    online: std::sync::atomic::AtomicI64,
}

impl Collector for ClusterCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.known.load(Relaxed) {
            return Ok(());
        }
        gauge(
            &mut encoder,
            "floto_cluster_nodes",
            "Nodes of the cluster whose lease is alive (the same on every node)",
            self.nodes.load(Relaxed),
        )?;
        gauge(
            &mut encoder,
            "floto_cluster_devices_online",
            "Devices online on any node of the cluster (the same on every node: take one, do not sum)",
            self.online.load(Relaxed),
        )
    }
}

impl Metrics {
    pub fn new(table: Arc<PeerTable>) -> Self {
        Self::with_certificates(table, None)
    }

    /// Also exports `floto_certificate_expiry_timestamp_seconds{cert="tls"|"ca"}`.
    pub fn with_certificates(table: Arc<PeerTable>, certs: Option<CertWatch>) -> Self {
        let mut registry = Registry::default();
        if let Some(certs) = certs {
            registry.register_collector(Box::new(certs));
        }
        let enrollments = Family::<ResultLabel, Counter>::default();
        registry.register(
            "floto_enrollments",
            "Enrollment requests by result",
            enrollments.clone(),
        );
        let enrollment_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "floto_enrollment_duration_seconds",
            "Time to answer an enrollment request",
            enrollment_seconds.clone(),
        );
        let handshake_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 12));
        registry.register(
            "floto_handshake_duration_seconds",
            "Time to process one WireGuard handshake initiation",
            handshake_seconds.clone(),
        );
        let broker_sessions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "floto_broker_sessions",
            "Broker sessions by result",
            broker_sessions.clone(),
        );
        let broker_active = Gauge::default();
        registry.register(
            "floto_broker_sessions_active",
            "Broker sessions open now",
            broker_active.clone(),
        );
        let watched = Arc::new(std::sync::OnceLock::new());
        registry.register_collector(Box::new(LiveCollector {
            table,
            watched: watched.clone(),
        }));
        let cluster = Arc::new(ClusterCounts::default());
        registry.register_collector(Box::new(SharedCounts(cluster.clone())));
        Self {
            cluster,
            watched,
            registry,
            enrollments,
            enrollment_seconds,
            handshake_seconds,
            broker_sessions,
            broker_active,
        }
    }

    pub fn enrollment(&self, result: &'static str, elapsed: Duration) {
        self.enrollments
            .get_or_create(&ResultLabel { result })
            .inc();
        self.enrollment_seconds.observe(elapsed.as_secs_f64());
    }

    /// The `floto_handshake_duration_seconds` histogram, for the concentrator to observe
    /// each handshake it answers.
    pub fn handshake_histogram(&self) -> Histogram {
        self.handshake_seconds.clone()
    }

    pub fn broker_session_started(&self) {
        self.broker_active.inc();
    }

    pub fn broker_session_ended(&self, result: &'static str) {
        self.broker_active.dec();
        self.broker_sessions
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// What a cluster node read of the whole cluster: live nodes and devices online.
    pub fn cluster_counts(&self, nodes: u64, online: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.cluster.nodes.store(nodes as i64, Relaxed);
        self.cluster.online.store(online as i64, Relaxed);
        self.cluster.known.store(true, Relaxed);
    }

    /// Exports the concentrator's TLS streams (sessions by transport, stream bytes) and its
    /// handshake queue (length, expected wait).
    pub fn watch(&self, streams: Arc<StreamEndpoints>, handshakes: Arc<HandshakeQueue>) {
        let _ = self.watched.set(Watched {
            streams,
            handshakes,
        });
    }

    /// A broker request refused before a session started.
    pub fn broker_refused(&self, result: &'static str) {
        self.broker_sessions
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The OpenMetrics text exposition (what Prometheus asks for).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The classic Prometheus text format 0.0.4 (for curl, promtool and older scrapers).
    pub fn encode_classic(&self) -> Result<String, std::fmt::Error> {
        Ok(openmetrics_to_classic(&self.encode()?))
    }
}

/// The expiry of the API's TLS certificate (which may be rotated while the server runs) and
/// of the CA, read at scrape time.
#[derive(Debug)]
pub struct CertWatch {
    pub tls: Arc<crate::tls::ServerCert>,
    pub ca_not_after: time::OffsetDateTime,
}

impl Collector for CertWatch {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Cert {
            cert: &'static str,
        }
        let mut family = encoder.encode_descriptor(
            "floto_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the API's TLS certificate and of the CA, Unix time",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let tls = self.tls.not_after().map(|t| t.unix_timestamp());
        for (cert, at) in [
            ("tls", tls),
            ("ca", Some(self.ca_not_after.unix_timestamp())),
        ] {
            if let Some(at) = at {
                ConstGauge::new(at).encode(family.encode_family(&Cert { cert })?)?;
            }
        }
        Ok(())
    }
}

/// The cluster counts, shared between the metrics and the registry they are registered in.
#[derive(Debug)]
struct SharedCounts(Arc<ClusterCounts>);

impl Collector for SharedCounts {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// Reads the session table at scrape time.
#[derive(Debug)]
struct LiveCollector {
    table: Arc<PeerTable>,
    watched: Arc<std::sync::OnceLock<Watched>>,
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.table;
        let c = &t.counters;
        gauge(
            &mut encoder,
            "floto_devices_online",
            "Devices with an authenticated packet within the online window",
            t.online_count() as i64,
        )?;
        gauge(
            &mut encoder,
            "floto_devices_enrolled",
            "Enrolled devices that are not revoked",
            t.len() as i64,
        )?;
        {
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            struct Transport {
                transport: &'static str,
            }
            let (udp, tls) = t.sessions_by_transport();
            let mut family = encoder.encode_descriptor(
                "floto_wg_sessions",
                "Peers holding a WireGuard session state (Tunn), by the transport of their endpoint (udp, or tls: WireGuard over TLS)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (transport, n) in [("udp", udp), ("tls", tls)] {
                ConstGauge::new(n as i64)
                    .encode(family.encode_family(&Transport { transport })?)?;
            }
        }
        if let Some(h) = self.watched.get().map(|w| &w.handshakes) {
            gauge(
                &mut encoder,
                "floto_handshake_queue",
                "Handshake initiations waiting for a worker",
                h.len() as i64,
            )?;
            let family = encoder.encode_descriptor(
                "floto_handshake_queue_wait_seconds",
                "How long an initiation queued now would wait, at the workers' measured pace; from 3.5 s the server asks for cookies",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(h.expected_wait().map_or(0.0, |d| d.as_secs_f64())).encode(family)?;
        }
        if let Some(s) = self.watched.get().map(|w| &w.streams) {
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            struct Direction {
                direction: &'static str,
            }
            let mut family = encoder.encode_descriptor(
                "floto_wg_tls_bytes",
                "WireGuard datagram bytes carried over TLS streams",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (direction, v) in [
                ("rx", s.rx_bytes.load(Ordering::Relaxed)),
                ("tx", s.tx_bytes.load(Ordering::Relaxed)),
            ] {
                ConstCounter::new(v).encode(family.encode_family(&Direction { direction })?)?;
            }
            gauge(
                &mut encoder,
                "floto_wg_tls_streams",
                "WireGuard over TLS streams open now",
                s.len() as i64,
            )?;
            counter(
                &mut encoder,
                "floto_wg_tls_streams_opened",
                "WireGuard over TLS streams opened",
                s.opened.load(Ordering::Relaxed),
            )?;
            counter(
                &mut encoder,
                "floto_wg_tls_streams_refused",
                "WireGuard over TLS streams the server closed (a bad frame, silence, a revoked device)",
                s.refused.load(Ordering::Relaxed),
            )?;
            counter(
                &mut encoder,
                "floto_wg_tls_dropped",
                "Datagrams for a TLS stream dropped because its queue was full or it had closed",
                s.dropped.load(Ordering::Relaxed),
            )?;
        }
        {
            let help = "WireGuard handshakes by result";
            let mut family = encoder.encode_descriptor(
                "floto_handshakes",
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (result, value) in [
                ("completed", c.handshakes_completed.load(Ordering::Relaxed)),
                ("initiated", c.handshakes_initiated.load(Ordering::Relaxed)),
                ("responded", c.handshakes_responded.load(Ordering::Relaxed)),
                ("unknown_peer", c.dropped(DropReason::UnknownPeer)),
                (
                    "invalid",
                    c.dropped(DropReason::BadHandshake) + c.dropped(DropReason::BadMac),
                ),
            ] {
                let labels = ResultLabel { result };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut encoder,
            "floto_cookie_replies",
            "Cookie replies sent under handshake load",
            c.cookie_replies.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "floto_wg_rx_bytes",
            "Decapsulated payload bytes received from devices",
            c.rx_bytes.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "floto_wg_tx_bytes",
            "Payload bytes encapsulated to devices",
            c.tx_bytes.load(Ordering::Relaxed),
        )?;
        {
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            struct Reason {
                reason: &'static str,
            }
            let mut family = encoder.encode_descriptor(
                "floto_wg_dropped",
                "Datagrams and packets dropped by reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for &why in DropReason::ALL {
                ConstCounter::new(c.dropped(why)).encode(family.encode_family(&Reason {
                    reason: why.label(),
                })?)?;
            }
        }
        Ok(())
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?)
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?)
}

/// Rewrites an OpenMetrics exposition in the classic text format: counter families are
/// named with their `_total` suffix, and the `# UNIT` and `# EOF` lines go.
pub fn openmetrics_to_classic(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, "counter")) = rest.split_once(' ') {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Finds a sample's value in an exposition (for tests and the status command).
pub fn sample(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        let mut parts = rest.split_whitespace();
        let first = parts.next()?;
        first.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counter_families_with_total() {
        let om =
            "# HELP a_requests Requests.\n# TYPE a_requests counter\n# UNIT a_requests requests\n\
                  a_requests_total{r=\"x\"} 3\n# HELP b Gauge.\n# TYPE b gauge\nb 1\n# EOF\n";
        let classic = openmetrics_to_classic(om);
        assert_eq!(
            classic,
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{r=\"x\"} 3\n# HELP b Gauge.\n# TYPE b gauge\nb 1\n"
        );
    }

    #[test]
    fn live_gauges_come_from_the_table() {
        let table = Arc::new(PeerTable::new(
            boringtun::x25519::StaticSecret::from([5u8; 32]),
            vec!["10.240.0.0/16".parse().unwrap_or_else(|_| unreachable!())],
            Duration::from_secs(85),
            100,
            1,
        ));
        let m = Metrics::new(table);
        m.enrollment("created", Duration::from_millis(3));
        let text = m.encode().unwrap();
        assert_eq!(sample(&text, "floto_devices_online "), Some(0.0));
        assert_eq!(
            sample(&text, "floto_enrollments_total{result=\"created\"} "),
            Some(1.0)
        );
        assert!(text.ends_with("# EOF\n"));
        let classic = m.encode_classic().unwrap();
        assert!(classic.contains("# TYPE floto_enrollments_total counter"));
        assert!(!classic.contains("# EOF"));
    }
}
