//! The API servers a device is configured with (one URL per node of a cluster, or one for a
//! single server) and calls that go to each in turn until one answers.
//!
//! A call moves on to the next server only when the one asked did not answer: it could not be
//! reached, timed out, or failed on its side (5xx, or 429 while it sheds load). A server that
//! answered with a refusal (any other 4xx) is final: the nodes share one registry, so another
//! would refuse too. Nothing here retries over time; the callers' backoff does that.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use tracing::debug;

use floto_client::{ApiClient, ClientError};
use floto_proto::ErrorCode;

/// An API server's URL, `https://HOST[:PORT]` (port 8443 when not given), checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// The URL as given, without a trailing `/`.
    url: String,
    /// The host, IPv6 addresses without their brackets.
    host: String,
    port: u16,
}

impl ServerUrl {
    /// The URL, as given without a trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The host name or address (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The API's port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for ServerUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let url = s.trim().trim_end_matches('/');
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("server URL {s:?} must start with https://"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        let (host, port) = split_authority(authority).ok_or_else(|| {
            format!("server URL {s:?} has no valid host (expected https://HOST[:PORT])")
        })?;
        Ok(Self {
            url: url.to_owned(),
            host: host.to_owned(),
            port: port.unwrap_or(floto_proto::defaults::API_PORT),
        })
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl<'de> serde::Deserialize<'de> for ServerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Url;
        impl serde::de::Visitor<'_> for Url {
            type Value = ServerUrl;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a server URL, https://HOST[:PORT]")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ServerUrl, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Url)
    }
}

/// `HOST[:PORT]` (an IPv6 host in brackets) into the host, without brackets, and the port.
/// `None` when the host is empty or the port is not 1-65535.
pub(crate) fn split_authority(s: &str) -> Option<(&str, Option<u16>)> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(port(p)?)),
            None if after.is_empty() => (host, None),
            None => return None,
        }
    } else {
        let (host, port) = match s.rsplit_once(':') {
            Some((host, p)) => (host, Some(port(p)?)),
            None => (s, None),
        };
        if host.contains(':') {
            return None; // an IPv6 address without brackets, or junk
        }
        (host, port)
    };
    (!host.is_empty() && !host.contains(['[', ']', '/', ' ', '@'])).then_some((host, port))
}

/// `first`, then each of `others` that is not `first`: the order in which a device renews
/// (the server it enrolled with first).
pub fn preferring(first: &str, others: &[ServerUrl]) -> Vec<String> {
    let first = first.trim_end_matches('/');
    std::iter::once(first.to_owned())
        .chain(
            others
                .iter()
                .filter(|s| s.as_str() != first)
                .map(|s| s.as_str().to_owned()),
        )
        .collect()
}

/// Why a call failed on every server it went to.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A server answered with a refusal (or with something this client does not
    /// understand): no other server was asked.
    #[error("{0}")]
    Refused(ClientError),
    /// No server answered: each could not be reached, timed out or failed on its side. One
    /// error per server, in the order they were asked.
    #[error("{}", describe_unanswered(.0))]
    Unanswered(Vec<(String, ClientError)>),
}

impl CallError {
    /// True when trying again later may help: no server answered.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unanswered(_))
    }

    /// The API error code of a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused(e) => e.code(),
            Self::Unanswered(_) => None,
        }
    }

    /// Every server's error.
    pub fn errors(&self) -> impl Iterator<Item = &ClientError> {
        let (one, many) = match self {
            Self::Refused(e) => (Some(e), &[][..]),
            Self::Unanswered(all) => (None, &all[..]),
        };
        one.into_iter().chain(many.iter().map(|(_, e)| e))
    }
}

/// One server's failure says it as it is (a transport error names its server); several say
/// which server failed how.
fn describe_unanswered(failures: &[(String, ClientError)]) -> String {
    let one = |(server, e): &(String, ClientError)| match e {
        ClientError::Transport { .. } => e.to_string(),
        _ => format!("{server} answered: {e}"),
    };
    match failures {
        [] => "no server is configured".to_owned(),
        [(_, e)] => e.to_string(),
        all => format!(
            "none of the {} servers answered: {}",
            all.len(),
            all.iter().map(one).collect::<Vec<_>>().join("; ")
        ),
    }
}

/// Whether a failure hands the call to the next server: the server did not answer it
/// (unreachable, timed out, 5xx, 429).
fn moves_on(e: &ClientError) -> bool {
    e.is_transient()
}

/// Calls `call` with each client in turn (a clone: they are cheap) until a server answers:
/// returns the client that answered and its answer, or why none did. See the module
/// documentation for which failures move on.
pub async fn call_in_turn<T, Fut>(
    clients: &[ApiClient],
    mut call: impl FnMut(ApiClient) -> Fut,
) -> Result<(&ApiClient, T), CallError>
where
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut unanswered = Vec::new();
    for (i, api) in clients.iter().enumerate() {
        match call(api.clone()).await {
            Ok(answer) => return Ok((api, answer)),
            Err(e) if moves_on(&e) => {
                if let Some(next) = clients.get(i + 1) {
                    debug!(server = api.server(), error = %e, next = next.server(), "no answer; asking the next server");
                }
                unanswered.push((api.server().to_owned(), e));
            }
            Err(e) => return Err(CallError::Refused(e)),
        }
    }
    Err(CallError::Unanswered(unanswered))
}

#[cfg(test)]
mod tests {
    use floto_proto::ApiError;

    use super::*;

    fn url(s: &str) -> ServerUrl {
        s.parse().unwrap()
    }

    #[test]
    fn server_urls_parse_into_host_and_port() {
        let u = url("https://vpn.example.org");
        assert_eq!((u.host(), u.port()), ("vpn.example.org", 8443));
        let u = url("https://10.0.0.1:9443/");
        assert_eq!(
            (u.as_str(), u.host(), u.port()),
            ("https://10.0.0.1:9443", "10.0.0.1", 9443)
        );
        let u = url("https://[::1]:8443");
        assert_eq!((u.host(), u.port()), ("::1", 8443));
        assert_eq!(
            url(" https://a.example/api ").as_str(),
            "https://a.example/api"
        );
        for bad in [
            "http://x",
            "https://",
            "https://x:notaport",
            "https://x:0",
            "https://x:70000",
            "https://:8443",
            "https://user@x",
            "https://[::1",
            "https://[::1]x",
            "https://fd00::1",
            "https://a:b:8443",
            "vpn.example.org",
            "",
        ] {
            let err = bad.parse::<ServerUrl>().unwrap_err();
            assert!(err.contains("server URL"), "{bad}: {err}");
        }
    }

    mod proptests {
        use std::net::{Ipv4Addr, Ipv6Addr};

        use proptest::prelude::*;

        use super::*;

        /// A host as a URL writes it, and as [`ServerUrl::host`] gives it back.
        fn host() -> impl Strategy<Value = (String, String)> {
            prop_oneof![
                "[a-z][a-z0-9-]{0,15}(\\.[a-z][a-z0-9]{0,6}){0,3}".prop_map(|h| (h.clone(), h)),
                any::<Ipv4Addr>().prop_map(|ip| (ip.to_string(), ip.to_string())),
                any::<Ipv6Addr>().prop_map(|ip| (format!("[{ip}]"), ip.to_string())),
            ]
        }

        proptest! {
            /// Any text is a URL or refused with a message, never a panic.
            #[test]
            fn any_text_is_parsed_or_refused(s in "\\PC{0,40}") {
                if let Err(e) = s.parse::<ServerUrl>() {
                    prop_assert!(e.contains("server URL"), "{}", e);
                }
            }

            /// `https://HOST[:PORT][/PATH]` gives back its host and port (8443 when none).
            #[test]
            fn a_url_gives_back_its_host_and_port(
                (written, bare) in host(),
                port in prop::option::of(1u16..),
                path in "(/[a-z0-9]{0,6}){0,2}/?",
            ) {
                let text = match port {
                    Some(p) => format!("https://{written}:{p}{path}"),
                    None => format!("https://{written}{path}"),
                };
                let url: ServerUrl = text.parse().map_err(TestCaseError::fail)?;
                prop_assert_eq!(url.host(), bare.as_str());
                prop_assert_eq!(url.port(), port.unwrap_or(8443));
                prop_assert_eq!(url.as_str(), text.trim_end_matches('/'));
            }
        }
    }

    #[test]
    fn renewal_goes_to_the_enrolled_server_first_then_the_others_once() {
        let configured = [
            url("https://b:8443"),
            url("https://a:8443/"),
            url("https://c"),
        ];
        assert_eq!(
            preferring("https://a:8443", &configured),
            ["https://a:8443", "https://b:8443", "https://c"]
        );
        assert_eq!(preferring("https://z/", &[]), ["https://z"]);
    }

    fn transport(server: &str) -> ClientError {
        ClientError::Transport {
            server: server.into(),
            detail: "connection refused".into(),
        }
    }

    fn api(status: u16, code: ErrorCode, message: &str) -> ClientError {
        ClientError::Api {
            status,
            error: ApiError::new(code, message),
        }
    }

    fn clients(servers: &[&str]) -> Vec<ApiClient> {
        floto_client::tls::install_default_provider();
        let ca = floto_pki::Ca::generate(
            "test CA",
            time::OffsetDateTime::now_utc(),
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        servers
            .iter()
            .map(|s| ApiClient::new(s, ca.cert_pem(), None).unwrap())
            .collect()
    }

    /// Runs `call_in_turn` over `servers`, each answering as `answers` says; returns the
    /// servers asked and the outcome.
    fn run(
        servers: &[&str],
        answers: Vec<Result<u32, ClientError>>,
    ) -> (Vec<String>, Result<(String, u32), CallError>) {
        let clients = clients(servers);
        let mut answers = answers.into_iter();
        let mut asked = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let outcome = rt.block_on(call_in_turn(&clients, |api| {
            asked.push(api.server().to_owned());
            std::future::ready(answers.next().unwrap())
        }));
        (asked, outcome.map(|(api, v)| (api.server().to_owned(), v)))
    }

    #[test]
    fn a_call_moves_on_past_servers_that_do_not_answer() {
        let (asked, got) = run(
            &["https://a", "https://b", "https://c"],
            vec![
                Err(transport("https://a")),
                Err(api(503, ErrorCode::Unavailable, "not ready")),
                Ok(7),
            ],
        );
        assert_eq!(asked, ["https://a", "https://b", "https://c"]);
        assert_eq!(got.unwrap(), ("https://c".to_owned(), 7));
        let (asked, got) = run(
            &["https://a", "https://b"],
            vec![Err(api(429, ErrorCode::TooManyRequests, "busy")), Ok(1)],
        );
        assert_eq!(asked.len(), 2);
        assert_eq!(got.unwrap().0, "https://b");
    }

    #[test]
    fn a_refusal_is_final() {
        let (asked, got) = run(
            &["https://a", "https://b", "https://c"],
            vec![
                Err(transport("https://a")),
                Err(api(
                    401,
                    ErrorCode::Unauthorized,
                    "unknown provisioning key",
                )),
                Ok(1),
            ],
        );
        assert_eq!(asked, ["https://a", "https://b"], "c is never asked");
        let err = got.unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
        assert_eq!(err.to_string(), "unknown provisioning key (HTTP 401)");
    }

    #[test]
    fn when_no_server_answers_the_error_says_how_each_failed() {
        let (_, got) = run(&["https://a"], vec![Err(transport("https://a"))]);
        let err = got.unwrap_err();
        assert!(err.is_transient());
        // One server: its error, word for word, as before there were several.
        assert_eq!(
            err.to_string(),
            "cannot reach https://a: connection refused"
        );
        let (_, got) = run(
            &["https://a", "https://b"],
            vec![
                Err(transport("https://a")),
                Err(api(500, ErrorCode::Internal, "database down")),
            ],
        );
        let err = got.unwrap_err();
        assert!(err.is_transient());
        assert_eq!(err.errors().count(), 2);
        assert_eq!(
            err.to_string(),
            "none of the 2 servers answered: cannot reach https://a: connection refused; https://b answered: database down (HTTP 500)"
        );
    }
}
