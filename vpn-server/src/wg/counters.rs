//! The concentrator core's counters, read by the metrics exporter: handshakes, bytes, and
//! every dropped datagram or packet by reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Declares [`DropReason`] from one list: each variant with its doc and metric label.
macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])+ $name:ident => $label:literal,)+) => {
        /// Why a datagram or packet was dropped. Each has a counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $($(#[doc = $doc])+ $name,)+
        }

        impl DropReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)+];

            /// The `reason` label of `floto_wg_dropped_total`.
            pub fn label(self) -> &'static str {
                match self {
                    $(DropReason::$name => $label,)+
                }
            }
        }
    };
}

drop_reasons! {
    /// Not a WireGuard message, or the wrong length for its type.
    Malformed => "malformed",
    /// A handshake message whose MAC1 is wrong (not for our key).
    BadMac => "bad_mac",
    /// A handshake initiation that does not decrypt to a static key.
    BadHandshake => "bad_handshake",
    /// A valid initiation from a key that is not enrolled (or was revoked).
    UnknownPeer => "unknown_peer",
    /// A message for a receiver index no peer holds.
    UnknownIndex => "unknown_index",
    /// Rejected by the peer's session: bad tag, replayed counter or timestamp, no session.
    Rejected => "rejected",
    /// Decrypted, but its inner source address is not the device's own.
    Spoofed => "spoofed",
    /// Decrypted, addressed to another device; devices are isolated.
    Isolated => "isolated",
    /// Decrypted, but not IPv4, or addressed outside the overlay.
    NotRoutable => "not_routable",
    /// An outgoing packet for a device that has no known endpoint.
    NoEndpoint => "no_endpoint",
    /// An outgoing packet for an address no device holds.
    NoPeer => "no_peer",
    /// A handshake initiation shed because the handshake queue was full, or it waited
    /// there so long that the device has retried since.
    Overloaded => "overloaded",
    /// A packet for the server's own stack dropped because its device already had its
    /// share of the queue waiting (or the queue was full).
    HostQueueFull => "host_queue_full",
}

/// Counters of the core, read by the metrics exporter.
#[derive(Debug)]
pub struct Counters {
    /// Initiations answered with a response.
    pub handshakes_completed: AtomicU64,
    /// Initiations this server sent (after a restart, or when boringtun's timers ask).
    pub handshakes_initiated: AtomicU64,
    /// Responses to our initiations that completed a session.
    pub handshakes_responded: AtomicU64,
    pub cookie_replies: AtomicU64,
    /// Decapsulated payload bytes from devices.
    pub rx_bytes: AtomicU64,
    /// Payload bytes encapsulated to devices.
    pub tx_bytes: AtomicU64,
    pub tunns_created: AtomicU64,
    pub tunns_dropped: AtomicU64,
    /// Answers to [`super::PeerTable::initiate`]'s call-backs, and their round trips in
    /// nanoseconds, summed.
    call_backs_answered: AtomicU64,
    call_back_rtt_ns: AtomicU64,
    /// One per [`DropReason`], indexed by its discriminant.
    drops: Vec<AtomicU64>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            handshakes_completed: AtomicU64::new(0),
            handshakes_initiated: AtomicU64::new(0),
            handshakes_responded: AtomicU64::new(0),
            cookie_replies: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            tunns_created: AtomicU64::new(0),
            tunns_dropped: AtomicU64::new(0),
            call_backs_answered: AtomicU64::new(0),
            call_back_rtt_ns: AtomicU64::new(0),
            drops: DropReason::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    pub(super) fn call_back_answered(&self, rtt: Duration) {
        bump(&self.call_backs_answered, 1);
        bump(
            &self.call_back_rtt_ns,
            u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    pub(super) fn call_back_answers(&self) -> (u64, Duration) {
        (
            self.call_backs_answered.load(Ordering::Relaxed),
            Duration::from_nanos(self.call_back_rtt_ns.load(Ordering::Relaxed)),
        )
    }

    pub(super) fn drop(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: DropReason) -> u64 {
        self.drops[why as usize].load(Ordering::Relaxed)
    }
}

/// Adds `n` to a counter.
pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_label() {
        let c = Counters::default();
        for (i, why) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i);
            c.drop(*why);
        }
        assert!(DropReason::ALL.iter().all(|w| c.dropped(*w) == 1));
        let mut labels: Vec<_> = DropReason::ALL.iter().map(|w| w.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
