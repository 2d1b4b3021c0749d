//! Continuous `ping` through a tunnel, and the gaps between its replies: what a user sees
//! when a session goes deaf.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::net::Netns;
use crate::Child;

/// A running `ping -D` from inside a namespace.
#[derive(Debug)]
pub struct Ping {
    child: Child,
}

/// What the replies showed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PingReport {
    pub sent: u64,
    pub received: u64,
    /// Longest time between two consecutive replies (or from the start / to the end).
    pub max_gap: Duration,
    /// Number of gaps longer than 1 s.
    pub gaps_over_1s: u64,
    /// Unix time of the last reply.
    pub last_reply: Option<f64>,
}

impl Ping {
    /// Pings `target` from `ns` every `interval`.
    pub fn start(
        ns: &Netns,
        target: Ipv4Addr,
        interval: Duration,
        log_dir: &std::path::Path,
    ) -> Self {
        crate::require(&["ping"]);
        let mut cmd = ns.command("ping");
        cmd.arg("-D")
            .arg("-n")
            .arg("-i")
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-W")
            .arg("1")
            .arg(target.to_string());
        Self {
            child: Child::spawn(&format!("ping-{}", ns.name), cmd, log_dir),
        }
    }

    /// Stops pinging (SIGINT, so ping prints its summary) and reports.
    pub fn stop(mut self) -> PingReport {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.child.signal(libc::SIGINT);
        let _ = crate::wait_for(Duration::from_secs(5), "ping to exit", || {
            self.child.inner.try_wait().ok().flatten()
        });
        parse(&self.child.log(), Some(end))
    }
}

/// Parses `ping -D` output. With `end` (unix seconds), the silence from the last reply to
/// then counts as a gap too: a tunnel that goes deaf and stays deaf.
pub fn parse(log: &str, end: Option<f64>) -> PingReport {
    let mut times = Vec::new();
    let mut sent = 0;
    for line in log.lines() {
        if line.contains("bytes from") {
            if let Some(t) = line
                .strip_prefix('[')
                .and_then(|l| l.split_once(']'))
                .and_then(|(t, _)| t.parse::<f64>().ok())
            {
                times.push(t);
            }
        } else if let Some((s, _)) = line.split_once(" packets transmitted") {
            sent = s.trim().parse().unwrap_or(0);
        }
    }
    let last_reply = times.last().copied();
    if let (Some(end), Some(last)) = (end, last_reply) {
        times.push(end.max(last));
    }
    let mut max_gap = 0f64;
    let mut over = 0;
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        if gap > max_gap {
            max_gap = gap;
        }
        if gap > 1.0 {
            over += 1;
        }
    }
    let received = times.len() as u64 - u64::from(end.is_some() && !times.is_empty());
    PingReport {
        sent,
        received,
        max_gap: Duration::from_secs_f64(max_gap),
        gaps_over_1s: over,
        last_reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_from_ping_output() {
        let log = "PING 10.240.0.1 (10.240.0.1) 56(84) bytes of data.\n\
            [1000.000] 64 bytes from 10.240.0.1: icmp_seq=1 ttl=64 time=0.3 ms\n\
            [1000.100] 64 bytes from 10.240.0.1: icmp_seq=2 ttl=64 time=0.3 ms\n\
            [1002.600] 64 bytes from 10.240.0.1: icmp_seq=27 ttl=64 time=0.3 ms\n\
            \n--- 10.240.0.1 ping statistics ---\n\
            27 packets transmitted, 3 received, 88.8889% packet loss, time 2600ms\n";
        let r = parse(log, None);
        assert_eq!(r.sent, 27);
        assert_eq!(r.received, 3);
        assert!(
            (r.max_gap.as_secs_f64() - 2.5).abs() < 1e-6,
            "{:?}",
            r.max_gap
        );
        assert_eq!(r.gaps_over_1s, 1);
        // Silence after the last reply counts.
        let r = parse(log, Some(1006.0));
        assert_eq!(r.received, 3);
        assert!(
            (r.max_gap.as_secs_f64() - 3.4).abs() < 1e-6,
            "{:?}",
            r.max_gap
        );
    }
}
