//! Talking to the API with an outside client: `curl`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::server::Server;

/// A request built up and sent with curl.
#[derive(Debug)]
pub struct Curl<'a> {
    server: &'a Server,
    method: &'static str,
    path: String,
    bearer: Option<String>,
    body: Option<String>,
    client: Option<(PathBuf, PathBuf)>,
    headers: Vec<String>,
    /// Extra curl options (`--http2`, ...).
    options: Vec<&'static str>,
}

/// `curl -X METHOD https://127.0.0.1:PORT/PATH`, trusting the server's CA only.
pub fn curl<'a>(server: &'a Server, method: &'static str, path: &str) -> Curl<'a> {
    Curl {
        server,
        method,
        path: path.to_owned(),
        bearer: None,
        body: None,
        client: None,
        headers: Vec::new(),
        options: Vec::new(),
    }
}

impl Curl<'_> {
    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// A JSON body.
    pub fn body(mut self, json: &str) -> Self {
        self.body = Some(json.to_owned());
        self
    }

    /// A client certificate and key (mTLS).
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((cert.into(), key.into()));
        self
    }

    /// Speaks HTTP/2 (with prior knowledge from ALPN) instead of curl's default.
    pub fn http2(mut self) -> Self {
        self.options.push("--http2");
        self
    }

    pub fn header(mut self, header: &str) -> Self {
        self.headers.push(header.to_owned());
        self
    }

    /// Sends it; returns the status (0 when there was no HTTP answer) and the body, as JSON
    /// when it parses, else as a JSON string.
    pub fn send(self) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            self.method,
            "--cacert",
        ])
        .arg(self.server.ca_path())
        .args(&self.options);
        if let Some(b) = &self.bearer {
            cmd.args(["-H", &format!("Authorization: Bearer {b}")]);
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        if let Some((cert, key)) = &self.client {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if self.body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(format!("{}{}", self.server.local_url(), self.path));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("curl");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            if let Some(body) = &self.body {
                stdin.write_all(body.as_bytes()).expect("curl stdin");
            }
        }
        let out = child.wait_with_output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let status = code.trim().parse().unwrap_or(0);
        let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
        (status, value)
    }
}

/// Asserts an error answer: status, `error` code, and words of the message.
pub fn assert_error(
    status: u16,
    body: &Value,
    want_status: u16,
    want_code: &str,
    want_words: &str,
) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error"], want_code, "body: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.to_lowercase().contains(&want_words.to_lowercase()),
        "message {message:?} should mention {want_words:?}"
    );
}

/// `(id, data)` of each server-sent event in a stream.
pub fn parse_sse(text: &str) -> Vec<(u64, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let id = block
                .lines()
                .find_map(|l| l.strip_prefix("id: "))?
                .parse()
                .ok()?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((id, serde_json::from_str(data).ok()?))
        })
        .collect()
}
