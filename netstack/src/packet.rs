//! A first look at inbound packets, before smoltcp parses them properly: which connection a
//! TCP segment belongs to, and whether it opens one. Never trusts a length field.

use std::net::{Ipv4Addr, SocketAddrV4};

/// A connection as seen from this stack: the peer and our port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    pub(crate) remote: SocketAddrV4,
    pub(crate) local_port: u16,
}

/// What the driver needs to know about an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// Not an IPv4 packet (IPv6 or garbage): dropped.
    NotIpv4,
    /// IPv4 but not a TCP segment we can attribute (another protocol, a fragment, too short):
    /// smoltcp decides.
    Other,
    /// A TCP segment (checksums not verified yet).
    Tcp {
        tuple: Tuple,
        /// SYN without ACK: a connection attempt.
        opens: bool,
    },
}

const PROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

pub(crate) fn classify(packet: &[u8]) -> Inbound {
    let Some(&first) = packet.first() else {
        return Inbound::NotIpv4;
    };
    if first >> 4 != 4 {
        return Inbound::NotIpv4;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    let (Some(header), Some(segment)) = (packet.get(..header_len), packet.get(header_len..)) else {
        return Inbound::Other;
    };
    if header_len < 20 {
        return Inbound::Other;
    }
    let (Some(&protocol), Some(frag)) = (header.get(9), header.get(6..8)) else {
        return Inbound::Other;
    };
    // More-fragments flag or a fragment offset: not a whole segment.
    let fragmented = frag.first().is_some_and(|b| b & 0x3f != 0) || frag.get(1) != Some(&0);
    if protocol != PROTO_TCP || fragmented {
        return Inbound::Other;
    }
    let (Some(src), Some(ports), Some(&flags)) =
        (header.get(12..16), segment.get(0..4), segment.get(13))
    else {
        return Inbound::Other;
    };
    let (Ok(src), Ok(ports)) = (<[u8; 4]>::try_from(src), <[u8; 4]>::try_from(ports)) else {
        return Inbound::Other;
    };
    let src_port = u16::from_be_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    Inbound::Tcp {
        tuple: Tuple {
            remote: SocketAddrV4::new(Ipv4Addr::from(src), src_port),
            local_port: dst_port,
        },
        opens: flags & TCP_SYN != 0 && flags & TCP_ACK == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte IPv4 header + 20-byte TCP header from 10.0.0.9:4000 to port 22.
    fn segment(flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 9]);
        p[16..20].copy_from_slice(&[10, 0, 0, 1]);
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p[22..24].copy_from_slice(&22u16.to_be_bytes());
        p[32] = 0x50;
        p[33] = flags;
        p
    }

    #[test]
    fn syn_is_an_opening_segment() {
        let tuple = Tuple {
            remote: "10.0.0.9:4000".parse().unwrap(),
            local_port: 22,
        };
        assert_eq!(
            classify(&segment(TCP_SYN)),
            Inbound::Tcp { tuple, opens: true }
        );
        assert_eq!(
            classify(&segment(TCP_SYN | TCP_ACK)),
            Inbound::Tcp {
                tuple,
                opens: false
            }
        );
        assert_eq!(
            classify(&segment(TCP_ACK)),
            Inbound::Tcp {
                tuple,
                opens: false
            }
        );
    }

    #[test]
    fn ipv6_and_garbage_are_not_ipv4() {
        assert_eq!(classify(&[]), Inbound::NotIpv4);
        assert_eq!(classify(&[0x60; 60]), Inbound::NotIpv4);
        assert_eq!(classify(&[0x00, 1, 2]), Inbound::NotIpv4);
    }

    #[test]
    fn truncated_and_odd_headers_are_left_to_smoltcp() {
        let full = segment(TCP_SYN);
        for len in 0..full.len() {
            let verdict = classify(&full[..len]);
            if len == 0 {
                assert_eq!(verdict, Inbound::NotIpv4);
            } else if len < 34 {
                assert_eq!(verdict, Inbound::Other, "length {len}");
            }
        }
        let mut short_ihl = full.clone();
        short_ihl[0] = 0x44;
        assert_eq!(classify(&short_ihl), Inbound::Other);
        let mut long_ihl = full.clone();
        long_ihl[0] = 0x4f;
        assert_eq!(classify(&long_ihl), Inbound::Other);
        let mut fragment = full.clone();
        fragment[6] = 0x20; // more fragments
        assert_eq!(classify(&fragment), Inbound::Other);
        let mut udp = full;
        udp[9] = 17;
        assert_eq!(classify(&udp), Inbound::Other);
    }

    #[test]
    fn never_panics_on_any_short_input() {
        for a in 0..=255u8 {
            for len in 0..48 {
                let mut p = vec![a; len];
                if let Some(b) = p.get_mut(0) {
                    *b = 0x40 | (a & 0x0f);
                }
                let _ = classify(&p);
            }
        }
    }
}
