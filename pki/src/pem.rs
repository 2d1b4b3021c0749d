//! A small, strict PEM reader and writer (RFC 7468 "strict" textual encoding).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// One decoded PEM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PemBlock {
    pub(crate) label: String,
    pub(crate) der: Vec<u8>,
}

/// What is allowed outside the `BEGIN`/`END` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outside {
    /// Only whitespace (used for CSRs from the network).
    WhitespaceOnly,
    /// Any text (explanatory text such as `openssl x509 -text` output or PKCS#12 "Bag
    /// Attributes", found in files an operator hands us).
    AnyText,
}

/// Why input is not PEM. Messages are completed by the caller, which knows what it expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PemError {
    /// Nothing but whitespace.
    Empty,
    /// No `-----BEGIN ...-----` line at all.
    NoBlock,
    /// Text other than whitespace outside the blocks.
    TextOutside { line: usize },
    /// A `BEGIN` without its `END` (truncated input).
    Unterminated { label: String },
    /// `END` label differs from `BEGIN`, or a nested `BEGIN`.
    Mismatched { label: String, line: usize },
    /// RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`): an encrypted legacy key.
    Headers { label: String },
    /// Body is not valid base64.
    BadBase64 { label: String },
    /// Body decodes to nothing.
    EmptyBody { label: String },
}

impl std::fmt::Display for PemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "input is empty"),
            Self::NoBlock => write!(f, "no \"-----BEGIN ...-----\" line found"),
            Self::TextOutside { line } => {
                write!(f, "unexpected text on line {line}, outside the PEM block")
            }
            Self::Unterminated { label } => write!(
                f,
                "the {label} block has no \"-----END {label}-----\" line (truncated input?)"
            ),
            Self::Mismatched { label, line } => write!(
                f,
                "line {line} does not close the {label} block that is open (mismatched or nested BEGIN/END)"
            ),
            Self::Headers { label } => write!(
                f,
                "the {label} block has headers such as Proc-Type (an encrypted legacy key); decrypt it first, e.g. with `openssl pkey -in old.pem -out new.pem`"
            ),
            Self::BadBase64 { label } => write!(f, "the {label} block is not valid base64"),
            Self::EmptyBody { label } => write!(f, "the {label} block is empty"),
        }
    }
}

/// Splits `input` into PEM blocks and decodes them.
pub(crate) fn parse_blocks(input: &str, outside: Outside) -> Result<Vec<PemBlock>, PemError> {
    if input.trim().is_empty() {
        return Err(PemError::Empty);
    }
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None; // (label, base64 body)
    for (index, raw_line) in input.lines().enumerate() {
        let line_no = index + 1;
        let line = raw_line.trim();
        match &mut open {
            None => {
                if let Some(label) = begin_label(line) {
                    open = Some((label.to_owned(), String::new()));
                } else if !line.is_empty() && outside == Outside::WhitespaceOnly {
                    return Err(PemError::TextOutside { line: line_no });
                }
            }
            Some((label, body)) => {
                if line.starts_with("-----") {
                    if end_label(line) != Some(label.as_str()) {
                        return Err(PemError::Mismatched {
                            label: label.clone(),
                            line: line_no,
                        });
                    }
                    let der =
                        STANDARD
                            .decode(body.as_bytes())
                            .map_err(|_| PemError::BadBase64 {
                                label: label.clone(),
                            })?;
                    if der.is_empty() {
                        return Err(PemError::EmptyBody {
                            label: label.clone(),
                        });
                    }
                    blocks.push(PemBlock {
                        label: std::mem::take(label),
                        der,
                    });
                    open = None;
                } else if line.contains(':') {
                    return Err(PemError::Headers {
                        label: label.clone(),
                    });
                } else {
                    body.extend(line.chars().filter(|c| !c.is_whitespace()));
                }
            }
        }
    }
    if let Some((label, _)) = open {
        return Err(PemError::Unterminated { label });
    }
    if blocks.is_empty() {
        return Err(PemError::NoBlock);
    }
    Ok(blocks)
}

fn begin_label(line: &str) -> Option<&str> {
    line.strip_prefix("-----BEGIN ")?.strip_suffix("-----")
}

fn end_label(line: &str) -> Option<&str> {
    line.strip_prefix("-----END ")?.strip_suffix("-----")
}

/// Encodes DER as PEM with 64-character lines and `\n` line endings.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = encode("THING", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let blocks = parse_blocks(&pem, Outside::WhitespaceOnly).unwrap();
        assert_eq!(
            blocks,
            vec![PemBlock {
                label: "THING".into(),
                der
            }]
        );
    }

    #[test]
    fn crlf_and_surrounding_whitespace_are_fine() {
        let pem = encode("THING", b"hello").replace('\n', "\r\n");
        let blocks = parse_blocks(&format!("\n\n  {pem}\n  \n"), Outside::WhitespaceOnly).unwrap();
        assert_eq!(blocks[0].der, b"hello");
    }

    #[test]
    fn strictness() {
        let pem = encode("THING", b"hello");
        assert_eq!(parse_blocks("", Outside::AnyText), Err(PemError::Empty));
        assert_eq!(
            parse_blocks("hello", Outside::AnyText),
            Err(PemError::NoBlock)
        );
        assert_eq!(
            parse_blocks(&format!("junk\n{pem}"), Outside::WhitespaceOnly),
            Err(PemError::TextOutside { line: 1 })
        );
        assert_eq!(
            parse_blocks(&format!("junk\n{pem}"), Outside::AnyText)
                .unwrap()
                .len(),
            1
        );
        let truncated = &pem[..pem.len() - 20];
        assert!(matches!(
            parse_blocks(truncated, Outside::AnyText),
            Err(PemError::Mismatched { .. }) | Err(PemError::Unterminated { .. })
        ));
        let no_end: String = pem.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(
            parse_blocks(&no_end, Outside::AnyText),
            Err(PemError::Unterminated {
                label: "THING".into()
            })
        );
        let wrong_end = pem.replace("END THING", "END OTHER");
        assert!(matches!(
            parse_blocks(&wrong_end, Outside::AnyText),
            Err(PemError::Mismatched { .. })
        ));
        let bad_b64 = pem.replace("aGVsbG8=", "aGV*bG8=");
        assert!(matches!(
            parse_blocks(&bad_b64, Outside::AnyText),
            Err(PemError::BadBase64 { .. })
        ));
        let headers = pem.replace("aGVsbG8=", "Proc-Type: 4,ENCRYPTED\naGVsbG8=");
        assert!(matches!(
            parse_blocks(&headers, Outside::AnyText),
            Err(PemError::Headers { .. })
        ));
    }
}
