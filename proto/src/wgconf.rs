//! The wg-quick configuration a device needs, rendered in one place so that the server's
//! `wg_quick_config` and `floto-tunnel wg-config` agree to the byte.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::WgKey;

/// Everything but the private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickConfig {
    pub address: Ipv4Addr,
    /// The overlay network routed through the tunnel, CIDR.
    pub allowed_ips: String,
    pub server_public_key: WgKey,
    pub endpoint: String,
    pub persistent_keepalive: u16,
}

/// The placeholder line the server puts where the private key goes.
pub const PRIVATE_KEY_PLACEHOLDER: &str =
    "# PrivateKey = <the device's own key; `floto-tunnel wg-config` fills it in>";

impl WgQuickConfig {
    /// Renders the config. With `private_key` `None`, the `PrivateKey` line is a comment.
    pub fn render(&self, private_key: Option<&str>) -> String {
        let mut s = String::new();
        s.push_str("[Interface]\n");
        match private_key {
            Some(k) => {
                let _ = writeln!(s, "PrivateKey = {k}");
            }
            None => {
                let _ = writeln!(s, "{PRIVATE_KEY_PLACEHOLDER}");
            }
        }
        let _ = writeln!(s, "Address = {}/32", self.address);
        s.push('\n');
        s.push_str("[Peer]\n");
        let _ = writeln!(s, "PublicKey = {}", self.server_public_key);
        let _ = writeln!(s, "AllowedIPs = {}", self.allowed_ips);
        let _ = writeln!(s, "Endpoint = {}", self.endpoint);
        let _ = writeln!(s, "PersistentKeepalive = {}", self.persistent_keepalive);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_and_without_private_key() {
        let c = WgQuickConfig {
            address: Ipv4Addr::new(10, 240, 0, 5),
            allowed_ips: "10.240.0.0/16".into(),
            server_public_key: WgKey([1; 32]),
            endpoint: "vpn.example.org:51820".into(),
            persistent_keepalive: 25,
        };
        let public = c.render(None);
        assert!(public.contains("Address = 10.240.0.5/32\n"));
        assert!(public.contains("Endpoint = vpn.example.org:51820\n"));
        assert!(!public.contains("\nPrivateKey"));
        let full = c.render(Some("cHJpdmF0ZQ=="));
        assert!(full.contains("\nPrivateKey = cHJpdmF0ZQ==\n"));
        assert_eq!(full.lines().count(), public.lines().count());
    }
}
