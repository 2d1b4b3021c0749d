//! The device agent (`floto-tunnel run`): keeps the WireGuard tunnel to the server up (over
//! UDP, or over TLS to the server's HTTPS port where UDP is blocked), renews the certificate,
//! heals itself. The decisions are sans-IO cores driven by `now` ([`link`], [`transport`],
//! [`renewal`], [`backoff`]) or by what was resolved ([`endpoints`]), and the TLS transport's
//! wire protocol is plain functions ([`wg_tls`]); [`run`] is the tokio shell around them (UDP
//! socket, TLS streams, boringtun, a TUN interface or the userspace stack, the state dir).

pub mod backoff;
pub mod certs;
pub mod config;
mod driver;
pub mod endpoints;
pub mod link;
mod local;
pub mod probe;
pub mod renewal;
mod socket;
pub mod sshd;
pub mod status;
mod tls_stream;
pub mod transport;
pub mod wg_tls;

pub use driver::run;
