//! The broker's stream header: the first line an operator sends on a QUIC stream, and the
//! line the broker answers before splicing bytes.
//!
//! Framing is one JSON object terminated by `\n`, at most [`MAX_HEADER`] bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ApiError;

/// QUIC ALPN of the broker.
pub const ALPN: &[u8] = b"floto-broker/1";

/// QUIC ALPN of the node-to-node link of a cluster (on the broker's port: no new port).
pub const ALPN_NODE: &[u8] = b"floto-node/1";

/// Longest header line accepted, newline included.
pub const MAX_HEADER: usize = 4096;

/// "Connect me to this port of this device."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerRequest {
    /// Device UUID (also accepts `UUID.floto` / `UUID.balena`).
    pub device: String,
    pub port: u16,
}

/// What a node asks the node holding a device's session, on the node link: dial this port
/// of this device for an operator whom the asking node has authorized and audited. The
/// node asked never relays further (the loop guard): it dials only a device it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRequest {
    pub device: crate::DeviceId,
    pub port: u16,
    /// For the log of the node asked.
    pub operator: String,
    /// The asking node's session number, for the logs of both nodes.
    pub session: u64,
}

/// The broker's answer: `{"ok":true}` and then raw bytes, or an error and the stream ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No newline within [`MAX_HEADER`] bytes.
    #[error("header line longer than {MAX_HEADER} bytes")]
    TooLong,
    /// The line is not the expected JSON object.
    #[error("malformed header: {0}")]
    Malformed(String),
}

/// Decodes one header from the front of `buf`. `Ok(None)` means the line is not complete
/// yet; `Ok(Some((value, used)))` gives the value and how many bytes it took.
pub fn decode_header<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, HeaderError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(pos) if pos < MAX_HEADER => {
            let value = serde_json::from_slice(&buf[..pos])
                .map_err(|e| HeaderError::Malformed(e.to_string()))?;
            Ok(Some((value, pos + 1)))
        }
        Some(_) => Err(HeaderError::TooLong),
        None if buf.len() >= MAX_HEADER => Err(HeaderError::TooLong),
        None => Ok(None),
    }
}

/// Encodes a header line.
pub fn encode_header<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_incomplete_and_limits() {
        let req = BrokerRequest {
            device: "3f2a6b1c0d4e4f5a8b6c7d8e9f0a1b2c".into(),
            port: 22,
        };
        let mut line = encode_header(&req);
        let n = line.len();
        line.extend_from_slice(b"SSH-2.0-after");
        assert_eq!(
            decode_header::<BrokerRequest>(&line).unwrap(),
            Some((req, n))
        );
        assert_eq!(
            decode_header::<BrokerRequest>(&line[..n - 1]).unwrap(),
            None
        );
        assert!(matches!(
            decode_header::<BrokerRequest>(&vec![b'a'; MAX_HEADER]),
            Err(HeaderError::TooLong)
        ));
        assert!(matches!(
            decode_header::<BrokerRequest>(b"{\"device\":1}\n"),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            decode_header::<BrokerRequest>(b"{\"device\":\"x\",\"port\":70000}\n"),
            Err(HeaderError::Malformed(_))
        ));
    }

    /// The header reader against any bytes an operator's stream can start with.
    mod proptests {
        use proptest::prelude::*;

        use super::*;

        /// Any bytes, of lengths often near the [`MAX_HEADER`] boundary; or a real header
        /// line; either with one byte made a newline, or changed, or neither.
        fn stream_start() -> impl Strategy<Value = Vec<u8>> {
            let len = prop_oneof![0usize..=64, MAX_HEADER - 3..=MAX_HEADER + 3, 0usize..=6000];
            let junk = len.prop_flat_map(|n| prop::collection::vec(any::<u8>(), n));
            let real = (any::<String>(), any::<u16>())
                .prop_map(|(device, port)| encode_header(&BrokerRequest { device, port }));
            let edit = prop_oneof![Just(None), any::<u8>().prop_map(Some), Just(Some(b'\n'))];
            (prop_oneof![junk, real], any::<prop::sample::Index>(), edit).prop_map(
                |(mut b, at, edit)| {
                    if let (Some(byte), false) = (edit, b.is_empty()) {
                        let at = at.index(b.len());
                        b[at] = byte;
                    }
                    b
                },
            )
        }

        proptest! {
            /// Incomplete exactly while no newline has come and the line can still fit;
            /// too long exactly when the line (newline included) cannot; otherwise one
            /// value or a malformed line, never a panic. What follows the line is not
            /// touched.
            #[test]
            fn a_header_is_incomplete_too_long_or_read_by_its_first_line(
                buf in stream_start(),
                trailer in prop::collection::vec(any::<u8>(), 0..=16),
            ) {
                let newline = buf.iter().position(|&b| b == b'\n');
                let got = decode_header::<BrokerRequest>(&buf);
                match newline {
                    None if buf.len() < MAX_HEADER => prop_assert_eq!(got, Ok(None)),
                    None => prop_assert_eq!(got, Err(HeaderError::TooLong)),
                    Some(pos) if pos + 1 > MAX_HEADER => {
                        prop_assert_eq!(got, Err(HeaderError::TooLong));
                    }
                    Some(pos) => {
                        match &got {
                            Ok(Some((req, used))) => {
                                prop_assert_eq!(*used, pos + 1);
                                let again = encode_header(req);
                                let n = again.len();
                                prop_assert_eq!(decode_header(&again), Ok(Some((req.clone(), n))));
                            }
                            Err(HeaderError::Malformed(_)) => {}
                            other => prop_assert!(false, "{:?} for a complete line", other),
                        }
                        let mut longer = buf[..=pos].to_vec();
                        longer.extend_from_slice(&trailer);
                        prop_assert_eq!(decode_header::<BrokerRequest>(&longer), got);
                    }
                }
            }

            /// Every request encodes to one line ending in its only newline, which reads
            /// back as the same request, or is too long to send.
            #[test]
            fn any_request_round_trips_through_its_header_line(
                device in prop_oneof![any::<String>(), "[\\x00-\\x7f]{0,200}", ".{1000,2100}"],
                port in any::<u16>(),
                trailer in prop::collection::vec(any::<u8>(), 0..=16),
            ) {
                let req = BrokerRequest { device, port };
                let mut line = encode_header(&req);
                prop_assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1));
                let n = line.len();
                line.extend_from_slice(&trailer);
                let got = decode_header::<BrokerRequest>(&line);
                if n <= MAX_HEADER {
                    prop_assert_eq!(got, Ok(Some((req, n))));
                } else {
                    prop_assert_eq!(got, Err(HeaderError::TooLong));
                }
            }
        }
    }
}
