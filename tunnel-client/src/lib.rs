//! floto-tunnel-client: the two client programs of floto-connect. `floto-tunnel`, the
//! device agent (enrolls once, keeps its identity in a state dir, prints its wg-quick
//! config), and `floto`, the operator CLI (login, devices, ssh, exec, proxy, tunnel). The
//! protocol types and the HTTPS/QUIC client live in floto-proto and floto-client.

pub mod agent;
pub mod enroll;
pub mod exec;
pub mod forward;
pub mod operator;
pub mod servers;
pub mod ssh;
pub mod state;

/// Logging to stderr, filtered by `FLOTO_LOG` (or `RUST_LOG`), `default` otherwise.
pub fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLOTO_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
