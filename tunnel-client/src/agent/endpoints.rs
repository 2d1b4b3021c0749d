//! The server's WireGuard endpoints: which addresses the agent may handshake with, and which
//! one to try next. The nodes of a cluster share one WireGuard identity, so the address of
//! any node is an endpoint of the same peer.
//!
//! The candidates, in this order and each address once: every IPv4 address the assigned
//! endpoint's name resolves to (in the resolver's order), then, for each configured server
//! URL, the addresses of its host with the assigned endpoint's port. No I/O here: the shell
//! resolves what [`lookups`] lists, again before every attempt (so DNS changes are picked
//! up), and [`candidates`] merges the answers.
//!
//! Which candidate is [`Rotation`]'s decision. The agent stays on the endpoint that answers.
//! An attempt that gets no answer, or a session that dies, marks its endpoint silent, and the
//! next attempt goes to the next candidate after it that has not been silent since the server
//! last answered; when all have been, a new round starts with the one after. Addresses are
//! compared, not positions, so a resolver that shuffles its answers still has each address
//! tried once per round. When attempts are made is the link supervisor's decision
//! ([`super::link`]): rotating never adds an attempt.

use std::net::SocketAddr;

use crate::servers::{split_authority, ServerUrl};

/// A name (or an address) to resolve, and the port its addresses get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// A DNS name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

/// What to resolve for the candidates: the assigned `endpoint` (`HOST:PORT`) first, then
/// each server's host with the endpoint's port; each host once. `Err` when the endpoint is
/// not `HOST:PORT` (then no port is known for the servers' hosts either).
pub fn lookups(endpoint: &str, servers: &[ServerUrl]) -> Result<Vec<Lookup>, String> {
    let Some((host, Some(port))) = split_authority(endpoint.trim()) else {
        return Err(format!(
            "the server's endpoint {endpoint:?} is not HOST:PORT; enroll the device again"
        ));
    };
    let mut lookups = vec![Lookup {
        host: host.to_owned(),
        port,
    }];
    for server in servers {
        if !lookups
            .iter()
            .any(|l| l.host.eq_ignore_ascii_case(server.host()))
        {
            lookups.push(Lookup {
                host: server.host().to_owned(),
                port,
            });
        }
    }
    Ok(lookups)
}

/// The candidates from the answers to [`lookups`], given in its order: the IPv4 addresses
/// (the agent's socket is IPv4), each once, where it first appears.
pub fn candidates<A>(answers: impl IntoIterator<Item = A>) -> Vec<SocketAddr>
where
    A: IntoIterator<Item = SocketAddr>,
{
    let mut out: Vec<SocketAddr> = Vec::new();
    for addr in answers.into_iter().flatten() {
        if addr.is_ipv4() && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// Which candidate the next handshake goes to. See the module documentation. The TLS
/// transport rotates the same way through the servers' URLs (`A` = [`ServerUrl`]).
#[derive(Debug, Clone)]
pub struct Rotation<A = SocketAddr> {
    /// The endpoint picked last, or the one that answered since.
    current: Option<A>,
    /// Endpoints that got no answer since the server last answered.
    silent: Vec<A>,
}

impl<A> Default for Rotation<A> {
    fn default() -> Self {
        Self {
            current: None,
            silent: Vec::new(),
        }
    }
}

impl<A: Clone + PartialEq> Rotation<A> {
    /// A rotation that starts with the first candidate.
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint picked last, or the one that answered since.
    pub fn current(&self) -> Option<&A> {
        self.current.as_ref()
    }

    /// Endpoints that got no answer since the server last answered.
    pub fn silent(&self) -> &[A] {
        &self.silent
    }

    /// The endpoint for the next attempt among `candidates` (as resolved now): the current
    /// one while it has not been silent, else the next one after it that has not been, else
    /// (a new round) the one after it. `None` when there is no candidate.
    #[must_use]
    pub fn pick(&mut self, candidates: &[A]) -> Option<A> {
        self.silent.retain(|a| candidates.contains(a));
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let at = self
            .current
            .as_ref()
            .and_then(|c| candidates.iter().position(|a| a == c));
        let start = at.unwrap_or(0);
        let next = (0..n)
            .map(|i| &candidates[(start + i) % n])
            .find(|a| !self.silent.contains(a))
            .unwrap_or_else(|| {
                // Every candidate was silent: a new round, going on from the current one.
                self.silent.clear();
                &candidates[at.map_or(0, |i| (i + 1) % n)]
            })
            .clone();
        self.current = Some(next.clone());
        Some(next)
    }

    /// An attempt to `endpoint` got no answer, or the session with it died.
    pub fn handle_silent(&mut self, endpoint: A) {
        if !self.silent.contains(&endpoint) {
            self.silent.push(endpoint);
        }
    }

    /// The server answered from `endpoint` (a candidate or not: a node that took the device
    /// over calls it back from its own address). The agent stays there, and every candidate
    /// may be tried again.
    pub fn handle_answered(&mut self, endpoint: A) {
        self.current = Some(endpoint);
        self.silent.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn v4(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(10, 0, 0, last), port))
    }

    fn url(s: &str) -> ServerUrl {
        s.parse().unwrap()
    }

    fn lookup(host: &str, port: u16) -> Lookup {
        Lookup {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn the_assigned_endpoint_comes_first_then_each_server_host_with_its_port() {
        let servers = [
            url("https://node-a.example:8443"),
            url("https://10.0.0.9:8443"),
            url("https://VPN.example/"),
            url("https://[fd00::1]:9443"),
            url("https://node-a.example:9443"),
        ];
        assert_eq!(
            lookups("vpn.example:51820", &servers).unwrap(),
            [
                lookup("vpn.example", 51820),
                lookup("node-a.example", 51820),
                lookup("10.0.0.9", 51820),
                lookup("fd00::1", 51820),
            ]
        );
        assert_eq!(lookups("[fd00::2]:1", &[]).unwrap(), [lookup("fd00::2", 1)]);
        for bad in ["vpn.example", "vpn.example:0", ":51820", ""] {
            let err = lookups(bad, &servers).unwrap_err();
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn candidates_are_every_ipv4_address_once_in_order() {
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 51820));
        let got = candidates([
            // The endpoint's name has three addresses (one IPv6, one twice).
            vec![v4(1, 51820), v6, v4(2, 51820), v4(1, 51820)],
            // A server whose host is one of them.
            vec![v4(2, 51820)],
            // A server that did not resolve.
            vec![],
            vec![v4(3, 51820)],
        ]);
        assert_eq!(got, [v4(1, 51820), v4(2, 51820), v4(3, 51820)]);
        assert!(candidates(Vec::<Vec<SocketAddr>>::new()).is_empty());
    }

    #[test]
    fn one_candidate_is_always_the_one() {
        let mut r = Rotation::new();
        let only = [v4(1, 1)];
        for _ in 0..3 {
            assert_eq!(r.pick(&only), Some(v4(1, 1)));
            r.handle_silent(v4(1, 1));
        }
        assert_eq!(r.pick(&[]), None);
    }

    #[test]
    fn silent_endpoints_are_left_in_turn_and_a_working_one_is_kept() {
        let (a, b, c) = (v4(1, 1), v4(2, 1), v4(3, 1));
        let all = [a, b, c];
        let mut r = Rotation::new();
        assert_eq!(r.pick(&all), Some(a));
        r.handle_silent(a);
        assert_eq!(r.pick(&all), Some(b));
        // b answers: the agent stays on it, attempt after attempt (a key change, say).
        r.handle_answered(b);
        assert_eq!(r.pick(&all), Some(b));
        assert_eq!(r.pick(&all), Some(b));
        // The session with b dies: on to c, then a new round from a.
        r.handle_silent(b);
        assert_eq!(r.pick(&all), Some(c));
        r.handle_silent(c);
        assert_eq!(r.pick(&all), Some(a));
        r.handle_silent(a);
        // Every candidate was silent: a new round, from the one after a.
        assert_eq!(r.pick(&all), Some(b));
        assert!(r.silent().is_empty());
    }

    #[test]
    fn after_a_node_outside_the_list_called_back_and_went_silent_the_list_starts_over() {
        let (a, b, takeover) = (v4(1, 1), v4(2, 1), v4(7, 1));
        let mut r = Rotation::new();
        assert_eq!(r.pick(&[a, b]), Some(a));
        r.handle_silent(a);
        r.handle_answered(takeover);
        assert_eq!(r.current(), Some(&takeover));
        r.handle_silent(takeover);
        assert_eq!(r.pick(&[a, b]), Some(a));
    }

    #[test]
    fn a_new_address_in_dns_is_tried_in_its_turn() {
        let (a, b, c) = (v4(1, 1), v4(2, 1), v4(3, 1));
        let mut r = Rotation::new();
        assert_eq!(r.pick(&[a, b]), Some(a));
        r.handle_silent(a);
        // The name now also has c, and a is gone.
        assert_eq!(r.pick(&[b, c]), Some(b));
        r.handle_silent(b);
        assert_eq!(r.pick(&[b, c]), Some(c));
    }

    /// Lists of 1 to 5 distinct candidates.
    fn candidate_list() -> impl Strategy<Value = Vec<SocketAddr>> {
        prop::collection::btree_set((1u8..=8, 1u16..=3), 1..=5)
            .prop_map(|set| set.into_iter().map(|(last, port)| v4(last, port)).collect())
    }

    proptest! {
        /// While no endpoint answers, the attempts go round the candidates in their order,
        /// each once per round, whatever candidate the rotation was on before.
        #[test]
        fn with_no_answer_the_attempts_go_round_in_order(
            list in candidate_list(),
            answered_before in prop::option::of(0usize..5),
            rounds in 1usize..4,
        ) {
            let n = list.len();
            let mut r = Rotation::new();
            let mut first = 0;
            if let Some(i) = answered_before {
                // The link was up on one of them, then died.
                first = i % n;
                r.handle_answered(list[first]);
                r.handle_silent(list[first]);
                first = (first + 1) % n;
            }
            for k in 0..rounds * n {
                let picked = r.pick(&list);
                prop_assert_eq!(picked, Some(list[(first + k) % n]), "attempt {}", k);
                r.handle_silent(picked.unwrap());
            }
        }

        /// A resolver that returns the addresses in any order each time: every round of
        /// `n` attempts still tries every address once, and never one twice in a row
        /// (unless it is the only one).
        #[test]
        fn shuffled_answers_still_try_every_address_once_per_round(
            list in candidate_list(),
            shuffles in prop::collection::vec(any::<prop::sample::Index>(), 20),
        ) {
            let n = list.len();
            let mut r = Rotation::new();
            let mut order = list.clone();
            let mut picks = Vec::new();
            for s in &shuffles {
                // A rotation of the list by a random amount, then a swap: any order comes up.
                order.rotate_left(s.index(n));
                order.swap(0, s.index(n));
                let picked = r.pick(&order).unwrap();
                r.handle_silent(picked);
                picks.push(picked);
            }
            for round in picks.chunks_exact(n) {
                let mut seen = round.to_vec();
                seen.sort();
                seen.dedup();
                prop_assert_eq!(seen.len(), n, "round {:?} of {:?}", round, list);
            }
            if n > 1 {
                prop_assert!(picks.windows(2).all(|w| w[0] != w[1]), "{:?}", picks);
            }
        }

        /// Whatever happened before, an endpoint that answers is the one picked next, until
        /// it is silent.
        #[test]
        fn the_endpoint_that_answers_is_kept(
            list in candidate_list(),
            events in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..12),
            answering in any::<prop::sample::Index>(),
        ) {
            let mut r = Rotation::new();
            for (answered, i) in &events {
                let _ = r.pick(&list);
                let at = list[i.index(list.len())];
                if *answered {
                    r.handle_answered(at);
                } else {
                    r.handle_silent(at);
                }
            }
            let keep = list[answering.index(list.len())];
            r.handle_answered(keep);
            prop_assert_eq!(r.pick(&list), Some(keep));
            prop_assert_eq!(r.pick(&list), Some(keep));
        }
    }
}
