//! Liveness probes: ICMP echo requests from the device's overlay address to the server's,
//! built and recognised here as raw IPv4 packets (no sockets). The server's userspace stack
//! answers them, so an answer proves the session works end to end.

use std::net::Ipv4Addr;

/// Length of the probe's ICMP payload.
const PAYLOAD: &[u8] = b"floto-probe";

/// Builds the IPv4 packet of an ICMP echo request.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16) -> Vec<u8> {
    let icmp_len = 8 + PAYLOAD.len();
    let total = 20 + icmp_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45; // IPv4, 20-byte header
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    p[4..6].copy_from_slice(&seq.to_be_bytes()); // identification
    p[8] = 64; // TTL
    p[9] = 1; // ICMP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let icmp = &mut p[20..];
    icmp[0] = 8; // echo request
    icmp[4..6].copy_from_slice(&ident.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    icmp[8..].copy_from_slice(PAYLOAD);
    let icmp_sum = checksum(icmp);
    icmp[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
    p
}

/// Whether `packet` is an ICMP echo reply from `from` to one of our probes (`ident`).
pub fn is_echo_reply(packet: &[u8], from: Ipv4Addr, ident: u16) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let header = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header < 20 || packet.len() < header + 8 {
        return false;
    }
    let icmp = &packet[header..];
    packet[9] == 1
        && packet[12..16] == from.octets()
        && icmp[0] == 0
        && icmp[4..6] == ident.to_be_bytes()
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_valid_checksums_and_replies_are_recognised() {
        let dev = Ipv4Addr::new(10, 240, 0, 7);
        let srv = Ipv4Addr::new(10, 240, 0, 1);
        let req = echo_request(dev, srv, 0xbeef, 3);
        assert_eq!(checksum(&req[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&req[20..]), 0, "ICMP checksum");
        assert!(!is_echo_reply(&req, srv, 0xbeef), "a request is no reply");
        // The reply a stack makes: addresses swapped, type 0.
        let mut reply = req.clone();
        reply[12..16].copy_from_slice(&srv.octets());
        reply[16..20].copy_from_slice(&dev.octets());
        reply[20] = 0;
        assert!(is_echo_reply(&reply, srv, 0xbeef));
        assert!(!is_echo_reply(&reply, srv, 0xbeee), "another ident");
        assert!(!is_echo_reply(&reply, dev, 0xbeef), "another source");
        assert!(!is_echo_reply(&reply[..25], srv, 0xbeef), "truncated");
        assert!(!is_echo_reply(&[], srv, 0xbeef));
    }
}
