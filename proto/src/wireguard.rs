//! WireGuard message shapes that the server and the agent both look at before handing a
//! datagram to boringtun (which parses everything else).

/// Length of a WireGuard handshake initiation (message type 1).
pub const INITIATION_LEN: usize = 148;

/// WireGuard over TLS (`GET /v1/wg`): the protocol named in `Upgrade:`.
pub const TLS_UPGRADE: &str = "floto-wg/1";

/// WireGuard over TLS: the largest datagram one frame carries (a frame is a 2-byte
/// big-endian length, 1 to this, and the datagram).
pub const TLS_MAX_FRAME: usize = 2048;

/// Whether `datagram` is a WireGuard handshake initiation: type 1 (three reserved zero
/// bytes) and exactly [`INITIATION_LEN`] bytes.
pub fn is_initiation(datagram: &[u8]) -> bool {
    datagram.len() == INITIATION_LEN && datagram[..4] == [1, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_type_1_of_the_right_length_is_an_initiation() {
        let mut init = [0u8; INITIATION_LEN];
        init[0] = 1;
        assert!(is_initiation(&init));
        assert!(!is_initiation(&init[..INITIATION_LEN - 1]));
        init[1] = 1;
        assert!(!is_initiation(&init));
        let mut response = [0u8; 92];
        response[0] = 2;
        assert!(!is_initiation(&response));
        assert!(!is_initiation(&[]));
    }
}
