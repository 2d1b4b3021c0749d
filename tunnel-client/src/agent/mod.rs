//! The device agent (`floto-tunnel run`): keeps the WireGuard tunnel to the server up, renews
//! the certificate, heals itself. The decisions are sans-IO cores driven by `now` ([`link`],
//! [`renewal`], [`backoff`]) or by what was resolved ([`endpoints`]); [`run`] is the tokio shell around them (UDP socket, boringtun,
//! a TUN interface or the userspace stack, the state dir).

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

pub use driver::run;
