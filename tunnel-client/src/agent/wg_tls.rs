//! WireGuard over TLS, the wire protocol as the agent speaks it. No I/O: the bytes to send
//! and the parsers of what comes back; [`super::tls_stream`] moves them.
//!
//! 1. TCP to the server's API address, optionally through an HTTP proxy first:
//!    [`connect_request`], then a `2xx` answer ([`check_connect`]).
//! 2. TLS (ALPN `http/1.1`) with the device certificate.
//! 3. [`upgrade_request`]; `101 Switching Protocols` is success ([`check_upgrade`]); anything
//!    else is a refusal with an [`ApiError`] body ([`refusal`]).
//! 4. Frames both ways: a 2-byte big-endian length `N` in `1..=2048`, then `N` bytes: one
//!    WireGuard datagram ([`encode_frame`], [`FrameDecoder`]). A frame whose first byte is
//!    `0x00` is the server's close reason (WireGuard messages start with 1 to 4).
//!
//! Response heads are read exactly: [`parse_head`] says where the head ends, so the bytes
//! after it (frames) are never lost.

use std::fmt;
use std::str::FromStr;

use floto_proto::{ApiError, ErrorCode};

use crate::servers::{split_authority, ServerUrl};

/// The path of the upgrade request.
pub const UPGRADE_PATH: &str = floto_proto::paths::WG;

/// The protocol named in `Upgrade:`.
pub const UPGRADE_PROTOCOL: &str = floto_proto::wireguard::TLS_UPGRADE;

/// The ALPN protocol of the TLS connection.
pub const ALPN: &[u8] = b"http/1.1";

/// The largest datagram a frame carries.
pub const MAX_DATAGRAM: usize = floto_proto::wireguard::TLS_MAX_FRAME;

/// The first payload byte of a close frame.
pub const CLOSE_MARK: u8 = 0x00;

/// A response head longer than this is refused.
pub const MAX_HEAD: usize = 8 * 1024;

/// Of a refusal's body, at most this much is read.
pub const MAX_ERROR_BODY: usize = 64 * 1024;

/// A frame that cannot be: the stream is broken and must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame announced length 0.
    #[error("a frame of length 0")]
    Empty,
    /// A frame announced more than [`MAX_DATAGRAM`] bytes.
    #[error("a frame of {0} bytes (at most {MAX_DATAGRAM})")]
    TooLong(usize),
}

/// What a frame from the server carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One WireGuard datagram.
    Datagram(&'a [u8]),
    /// Why the server closes the stream (it closes it right after).
    Close(String),
}

/// Appends `datagram` as one frame to `out`. A datagram that is empty or longer than
/// [`MAX_DATAGRAM`] is refused (and nothing is appended).
pub fn encode_frame(datagram: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = check_length(datagram.len())?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    Ok(())
}

fn check_length(n: usize) -> Result<u16, FrameError> {
    match n {
        0 => Err(FrameError::Empty),
        n if n > MAX_DATAGRAM => Err(FrameError::TooLong(n)),
        // At most 2048: fits.
        n => Ok(u16::try_from(n).unwrap_or(u16::MAX)),
    }
}

/// Splits the byte stream from the server into frames, whatever pieces it arrives in.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`.
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame; `Ok(None)` until one is complete. After an error the stream
    /// is unusable.
    #[must_use = "a frame carries a datagram or the reason the stream closes"]
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        let rest = &self.buf[self.start..];
        let [hi, lo, ..] = *rest else {
            return Ok(None);
        };
        let n = usize::from(u16::from_be_bytes([hi, lo]));
        check_length(n)?;
        if rest.len() < 2 + n {
            return Ok(None);
        }
        let payload = self.start + 2..self.start + 2 + n;
        self.start = payload.end;
        let payload = &self.buf[payload];
        Ok(Some(match payload.split_first() {
            Some((&CLOSE_MARK, reason)) => {
                Frame::Close(String::from_utf8_lossy(reason).into_owned())
            }
            _ => Frame::Datagram(payload),
        }))
    }
}

/// `HOST:PORT` for a request line or a `Host:` header (an IPv6 host in brackets).
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The HTTP/1.1 request that turns the TLS connection to `server` into a frame stream.
pub fn upgrade_request(server: &ServerUrl) -> String {
    format!(
        "GET {UPGRADE_PATH} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n\r\n",
        authority(server.host(), server.port())
    )
}

/// The request that asks an HTTP proxy for a tunnel to `host:port`.
pub fn connect_request(host: &str, port: u16) -> String {
    let target = authority(host, port);
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// A response's status line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// The reason phrase, for messages.
    pub reason: String,
    /// Names as sent; compare them without case.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, when present and a number.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }
}

/// A response head that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// No end of the head within [`MAX_HEAD`] bytes.
    #[error("the answer's head is longer than {MAX_HEAD} bytes")]
    TooLong,
    /// Not an HTTP/1.x response.
    #[error("not an HTTP/1.1 answer: {0:?}")]
    Malformed(String),
}

/// Parses the response head at the start of `buf`: `Ok(None)` while it is incomplete, else
/// the head and its length (the bytes after it belong to what follows).
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HeadError::TooLong)
        } else {
            Ok(None)
        };
    };
    if end + 4 > MAX_HEAD {
        return Err(HeadError::TooLong);
    }
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| HeadError::Malformed(String::from_utf8_lossy(&buf[..end.min(80)]).into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let malformed = || HeadError::Malformed(status_line.chars().take(80).collect());
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(malformed)?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status: u16 = code
        .parse()
        .ok()
        .filter(|s| (100..=999).contains(s) && code.len() == 3)
        .ok_or_else(malformed)?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .filter(|(name, _)| !name.is_empty() && !name.contains([' ', '\t']))
            .ok_or_else(|| HeadError::Malformed(line.chars().take(80).collect()))?;
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(Some((
        ResponseHead {
            status,
            reason: reason.to_owned(),
            headers,
        },
        end + 4,
    )))
}

/// Whether the proxy opened the tunnel (any `2xx`); else what it said.
pub fn check_connect(head: &ResponseHead) -> Result<(), String> {
    if (200..300).contains(&head.status) {
        Ok(())
    } else {
        Err(format!(
            "the proxy refused the tunnel: HTTP {} {}",
            head.status, head.reason
        ))
    }
}

/// What the server answered to the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeAnswer {
    /// `101`: frames follow.
    Switched,
    /// Any other status: the refusal's body follows (`Content-Length` bytes, at most
    /// [`MAX_ERROR_BODY`]); give it to [`refusal`].
    Refused { status: u16, body_length: usize },
}

/// Reads the server's answer to [`upgrade_request`]. `Err` for a `101` to another protocol.
pub fn check_upgrade(head: &ResponseHead) -> Result<UpgradeAnswer, String> {
    if head.status != 101 {
        return Ok(UpgradeAnswer::Refused {
            status: head.status,
            body_length: head.content_length().unwrap_or(0).min(MAX_ERROR_BODY),
        });
    }
    match head.header("upgrade") {
        Some(p) if !p.eq_ignore_ascii_case(UPGRADE_PROTOCOL) => Err(format!(
            "the server switched to {p:?}, not {UPGRADE_PROTOCOL}"
        )),
        _ => Ok(UpgradeAnswer::Switched),
    }
}

/// The server's refusal from its JSON body, or one made from the status when the body is
/// not an [`ApiError`].
pub fn refusal(status: u16, body: &[u8]) -> ApiError {
    serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| {
        ApiError::new(
            ErrorCode::from_http_status(status),
            format!("the server refused WireGuard over TLS with HTTP {status}"),
        )
    })
}

/// An HTTP proxy, `http://HOST[:PORT]` (port 80 when not given; `HOST:PORT` alone is read
/// as `http://`). No credentials: a proxy that wants them refuses the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    host: String,
    port: u16,
}

impl ProxyUrl {
    /// Host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for ProxyUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let rest = match t.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxy {s:?}: only http:// proxies are supported, not {scheme}://"
                ))
            }
            None => t,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(format!(
                "proxy {s:?}: proxies with credentials are not supported"
            ));
        }
        let (host, port) = split_authority(authority)
            .ok_or_else(|| format!("proxy {s:?}: expected http://HOST[:PORT]"))?;
        Ok(Self {
            host: host.to_owned(),
            port: port.unwrap_or(80),
        })
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", authority(&self.host, self.port))
    }
}

impl serde::Serialize for ProxyUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ProxyUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frames(datagrams: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for d in datagrams {
            encode_frame(d, &mut out).unwrap();
        }
        out
    }

    /// A frame, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Got {
        Datagram(Vec<u8>),
        Close(String),
    }

    /// Every frame `bytes` holds, fed in pieces of `piece` bytes.
    fn decode_all(bytes: &[u8], piece: usize) -> Result<Vec<Got>, FrameError> {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(piece.max(1)) {
            d.push(chunk);
            while let Some(frame) = d.next_frame()? {
                got.push(match frame {
                    Frame::Datagram(p) => Got::Datagram(p.to_vec()),
                    Frame::Close(r) => Got::Close(r),
                });
            }
        }
        Ok(got)
    }

    #[test]
    fn a_frame_is_a_big_endian_length_and_the_datagram() {
        let mut out = Vec::new();
        encode_frame(&[4, 5, 6], &mut out).unwrap();
        assert_eq!(out, [0, 3, 4, 5, 6]);
        let big = vec![1u8; MAX_DATAGRAM];
        out.clear();
        encode_frame(&big, &mut out).unwrap();
        assert_eq!(&out[..2], &[0x08, 0x00]);
        assert_eq!(out.len(), 2 + MAX_DATAGRAM);
        out.clear();
        assert_eq!(encode_frame(&[], &mut out), Err(FrameError::Empty));
        assert_eq!(
            encode_frame(&[1; MAX_DATAGRAM + 1], &mut out),
            Err(FrameError::TooLong(MAX_DATAGRAM + 1))
        );
        assert!(out.is_empty(), "nothing appended for a refused datagram");
    }

    #[test]
    fn frames_arrive_in_any_pieces_and_a_zero_byte_is_the_close_reason() {
        let mut bytes = frames(&[&[1, 2, 3], &[4; 1500]]);
        bytes.extend_from_slice(&[0, 8, 0]);
        bytes.extend_from_slice(b"revoked");
        for piece in [1, 2, 3, 7, 1000, 10_000] {
            let got = decode_all(&bytes, piece).unwrap();
            assert_eq!(got.len(), 3, "pieces of {piece}");
            assert_eq!(got[0], Got::Datagram(vec![1, 2, 3]));
            assert_eq!(got[1], Got::Datagram(vec![4; 1500]));
            assert_eq!(got[2], Got::Close("revoked".into()));
        }
        // Half a length, then half a datagram: incomplete, not an error.
        let mut d = FrameDecoder::new();
        d.push(&[0]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[3, 9]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 3);
        d.push(&[9, 9]);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Datagram(&[9, 9, 9]))));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_length_of_zero_or_over_2048_breaks_the_stream() {
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 1]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
        let mut d = FrameDecoder::new();
        d.push(&[0x08, 0x01]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLong(2049)));
        let mut d = FrameDecoder::new();
        d.push(&[0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLong(65_535)));
    }

    #[test]
    fn the_upgrade_request_names_the_host_and_the_protocol() {
        let url: ServerUrl = "https://vpn.example:8443".parse().unwrap();
        assert_eq!(
            upgrade_request(&url),
            "GET /v1/wg HTTP/1.1\r\nHost: vpn.example:8443\r\nConnection: Upgrade\r\nUpgrade: floto-wg/1\r\n\r\n"
        );
        let v6: ServerUrl = "https://[fd00::1]".parse().unwrap();
        assert!(upgrade_request(&v6).contains("\r\nHost: [fd00::1]:8443\r\n"));
    }

    #[test]
    fn a_101_is_read_exactly_and_frames_may_follow_it() {
        let mut bytes =
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: floto-wg/1\r\n\r\n"
                .to_vec();
        let head_len = bytes.len();
        bytes.extend_from_slice(&frames(&[&[2, 2]]));
        // Incomplete heads wait.
        for cut in [0, 10, head_len - 1] {
            assert_eq!(parse_head(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let (head, len) = parse_head(&bytes).unwrap().unwrap();
        assert_eq!(len, head_len);
        assert_eq!(head.status, 101);
        assert_eq!(head.header("UPGRADE"), Some("floto-wg/1"));
        assert_eq!(check_upgrade(&head), Ok(UpgradeAnswer::Switched));
        assert_eq!(
            decode_all(&bytes[len..], 1).unwrap(),
            [Got::Datagram(vec![2, 2])]
        );
        // A 101 without an Upgrade header is taken; one to another protocol is not.
        let (bare, _) = parse_head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(check_upgrade(&bare), Ok(UpgradeAnswer::Switched));
        let (ws, _) = parse_head(b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(check_upgrade(&ws).unwrap_err().contains("websocket"));
    }

    #[test]
    fn a_refusal_carries_the_servers_message() {
        let body = br#"{"error":"revoked","message":"device 3f2a was revoked"}"#;
        let text = format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let (head, _) = parse_head(text.as_bytes()).unwrap().unwrap();
        assert_eq!(
            check_upgrade(&head),
            Ok(UpgradeAnswer::Refused {
                status: 403,
                body_length: body.len()
            })
        );
        let e = refusal(403, body);
        assert_eq!(e.error, ErrorCode::Revoked);
        assert_eq!(e.message, "device 3f2a was revoked");
        // A body that is not ours: the status says what happened.
        let e = refusal(401, b"<html>no</html>");
        assert_eq!(e.error, ErrorCode::Unauthorized);
        assert!(e.message.contains("HTTP 401"), "{}", e.message);
        // A huge Content-Length is not believed.
        let (head, _) = parse_head(b"HTTP/1.1 500 x\r\nContent-Length: 99999999\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            check_upgrade(&head),
            Ok(UpgradeAnswer::Refused {
                status: 500,
                body_length: MAX_ERROR_BODY
            })
        );
    }

    #[test]
    fn heads_that_are_not_http_are_refused() {
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 200 \xff\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(parse_head(&long), Err(HeadError::TooLong));
        let mut late = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        late.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        late.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&late), Err(HeadError::TooLong));
    }

    #[test]
    fn the_connect_exchange() {
        assert_eq!(
            connect_request("10.0.0.1", 8443),
            "CONNECT 10.0.0.1:8443 HTTP/1.1\r\nHost: 10.0.0.1:8443\r\n\r\n"
        );
        assert_eq!(
            connect_request("fd00::1", 443),
            "CONNECT [fd00::1]:443 HTTP/1.1\r\nHost: [fd00::1]:443\r\n\r\n"
        );
        // tinyproxy's answer.
        let ok = b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";
        let (head, len) = parse_head(ok).unwrap().unwrap();
        assert_eq!(len, ok.len());
        assert_eq!(check_connect(&head), Ok(()));
        let (denied, _) = parse_head(b"HTTP/1.1 403 Access violation\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        let e = check_connect(&denied).unwrap_err();
        assert!(e.contains("403 Access violation"), "{e}");
        let (auth, _) = parse_head(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(check_connect(&auth).unwrap_err().contains("407"));
    }

    #[test]
    fn proxy_urls() {
        let p: ProxyUrl = "http://10.0.0.1:3128".parse().unwrap();
        assert_eq!((p.host(), p.port()), ("10.0.0.1", 3128));
        assert_eq!(p.to_string(), "http://10.0.0.1:3128");
        let p: ProxyUrl = "HTTP://proxy.corp/".parse().unwrap();
        assert_eq!((p.host(), p.port()), ("proxy.corp", 80));
        let p: ProxyUrl = "proxy.corp:8080".parse().unwrap();
        assert_eq!(p.to_string(), "http://proxy.corp:8080");
        let p: ProxyUrl = "http://[fd00::7]:3128".parse().unwrap();
        assert_eq!((p.host(), p.port()), ("fd00::7", 3128));
        assert_eq!(p.to_string(), "http://[fd00::7]:3128");
        for (bad, says) in [
            ("https://proxy:443", "only http://"),
            ("socks5://proxy:1080", "only http://"),
            ("http://user:pw@proxy:3128", "credentials"),
            ("http://proxy:0", "HOST[:PORT]"),
            ("http://", "HOST[:PORT]"),
            ("", "HOST[:PORT]"),
        ] {
            let e = bad.parse::<ProxyUrl>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    proptest! {
        /// Any bytes, in any pieces: the decoder never panics, returns the same frames
        /// however the bytes are split, and fails exactly at the first length that is 0 or
        /// over 2048.
        #[test]
        fn any_byte_stream_decodes_the_same_in_any_pieces_or_fails_at_a_bad_length(
            bytes in prop::collection::vec(any::<u8>(), 0..6000),
            piece in 1usize..300,
        ) {
            let whole = decode_all(&bytes, bytes.len().max(1));
            let pieces = decode_all(&bytes, piece);
            prop_assert_eq!(&whole, &pieces);
            // The reference: walk the lengths.
            let mut at = 0;
            let mut expected = Vec::new();
            let mut error = None;
            while at + 2 <= bytes.len() {
                let n = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
                if n == 0 {
                    error = Some(FrameError::Empty);
                    break;
                }
                if n > MAX_DATAGRAM {
                    error = Some(FrameError::TooLong(n));
                    break;
                }
                if at + 2 + n > bytes.len() {
                    break;
                }
                expected.push(bytes[at + 2..at + 2 + n].to_vec());
                at += 2 + n;
            }
            match (error, whole) {
                (Some(e), Err(got)) => prop_assert_eq!(e, got),
                (None, Ok(got)) => {
                    prop_assert_eq!(got.len(), expected.len());
                    for (g, e) in got.iter().zip(&expected) {
                        match g {
                            Got::Datagram(d) => prop_assert_eq!(d, e),
                            Got::Close(r) => {
                                prop_assert_eq!(e[0], CLOSE_MARK);
                                prop_assert_eq!(r, &String::from_utf8_lossy(&e[1..]));
                            }
                        }
                    }
                }
                (e, got) => prop_assert!(false, "expected {:?}, got {:?}", e, got),
            }
        }

        /// Datagrams of 1 to 2048 bytes come out as they went in, in any pieces.
        #[test]
        fn encoded_datagrams_round_trip(
            datagrams in prop::collection::vec(
                (1u8..=255, prop::collection::vec(any::<u8>(), 0..MAX_DATAGRAM)),
                0..12,
            ),
            piece in 1usize..5000,
        ) {
            // A first byte that is not 0: datagrams, not close frames.
            let datagrams: Vec<Vec<u8>> = datagrams
                .into_iter()
                .map(|(first, rest)| {
                    let mut d = vec![first];
                    d.extend(rest.into_iter().take(MAX_DATAGRAM - 1));
                    d
                })
                .collect();
            let refs: Vec<&[u8]> = datagrams.iter().map(Vec::as_slice).collect();
            let got = decode_all(&frames(&refs), piece).unwrap();
            let want: Vec<Got> = datagrams.into_iter().map(Got::Datagram).collect();
            prop_assert_eq!(got, want);
        }

        /// Any bytes as a response head: never a panic, and a head that parses ends where
        /// the first empty line does.
        #[test]
        fn any_bytes_as_a_head_never_panic(
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                "HTTP/1\\.[01] [0-9]{1,4} [ -~]{0,20}(\r\n[ -~]{0,20}){0,4}\r\n\r\n[ -~]{0,10}"
                    .prop_map(String::into_bytes),
            ],
        ) {
            if let Ok(Some((head, len))) = parse_head(&bytes) {
                prop_assert!(bytes[..len].ends_with(b"\r\n\r\n"));
                prop_assert_eq!(
                    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4),
                    Some(len)
                );
                prop_assert!((100..=999).contains(&head.status));
                let _ = check_upgrade(&head);
                let _ = check_connect(&head);
            }
        }
    }
}
