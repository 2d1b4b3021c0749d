//! The rules a registry commit is checked against: which provisioning keys may enroll, what
//! an enrollment or renewal may do given what the registry holds at the moment of the
//! transaction, and how overlay addresses are given out. Pure functions of the facts; each
//! [`Registry`](crate::Registry) implementation calls them inside its transaction, so a
//! decision and the write it leads to are atomic.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use time::OffsetDateTime;

use floto_proto::admin::KeyInfo;
use floto_proto::DeviceId;

use crate::{Device, EnrollCommit, RenewCommit};

/// The overlay networks devices get addresses in: the first one (the network the registry
/// was made with) and any added later, filled in that order. In each network the first host
/// is the server's own address there, so a device's overlay network always holds the
/// server address it talks to, and devices are never renumbered when a network is added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlays(Vec<Ipv4Net>);

/// Why a set of overlay networks is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlaysError {
    #[error("overlay {0} overlaps overlay {1}")]
    Overlap(Ipv4Net, Ipv4Net),
    #[error("overlay {net} has prefix /{}: use a network between /8 and /30", net.prefix_len())]
    Prefix { net: Ipv4Net },
    #[error("overlay {net} is not a network address: did you mean {}?", net.trunc())]
    NotANetwork { net: Ipv4Net },
}

impl Overlays {
    /// `first`, then `more`: each a network between /8 and /30, none overlapping another.
    pub fn new(first: Ipv4Net, more: &[Ipv4Net]) -> Result<Self, OverlaysError> {
        let nets: Vec<Ipv4Net> = std::iter::once(first).chain(more.iter().copied()).collect();
        for (i, net) in nets.iter().enumerate() {
            if !(8..=30).contains(&net.prefix_len()) {
                return Err(OverlaysError::Prefix { net: *net });
            }
            if net.network() != net.addr() {
                return Err(OverlaysError::NotANetwork { net: *net });
            }
            if let Some(other) = nets[..i]
                .iter()
                .find(|o| o.contains(&net.network()) || net.contains(&o.network()))
            {
                return Err(OverlaysError::Overlap(*net, *other));
            }
        }
        Ok(Self(nets))
    }

    /// The networks, the first one first.
    pub fn networks(&self) -> &[Ipv4Net] {
        &self.0
    }

    /// The network the registry was made with.
    pub fn first(&self) -> Ipv4Net {
        self.0[0]
    }

    /// The network `ip` is in.
    pub fn network_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.0.iter().copied().find(|n| n.contains(&ip))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.network_of(ip).is_some()
    }

    /// Devices all networks hold together.
    pub fn capacity(&self) -> u64 {
        self.0.iter().map(|n| overlay_capacity(*n)).sum()
    }

    /// The server's addresses, one per network (the first network's first).
    pub fn server_addresses(&self) -> Vec<Ipv4Addr> {
        self.0.iter().map(|n| server_address(*n)).collect()
    }
}

impl From<Ipv4Net> for Overlays {
    /// One network, as given (its prefix is checked where it is configured).
    fn from(net: Ipv4Net) -> Self {
        Self(vec![net])
    }
}

impl std::fmt::Display for Overlays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// The server's own address in `overlay`: its first host.
pub fn server_address(overlay: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(overlay.network()) + 1)
}

#[cfg(test)]
mod overlays_tests {
    use super::*;

    #[test]
    fn overlay_networks_are_checked() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let o = Overlays::new(net("10.240.0.0/16"), &[net("10.9.0.0/24")]).unwrap();
        assert_eq!(o.to_string(), "10.240.0.0/16, 10.9.0.0/24");
        assert_eq!(o.capacity(), 65_533 + 253);
        assert_eq!(
            o.server_addresses(),
            [Ipv4Addr::new(10, 240, 0, 1), Ipv4Addr::new(10, 9, 0, 1)]
        );
        assert_eq!(
            o.network_of(Ipv4Addr::new(10, 9, 0, 7)),
            Some(net("10.9.0.0/24"))
        );
        assert!(!o.contains(Ipv4Addr::new(10, 10, 0, 1)));
        for (first, more, why) in [
            ("10.240.0.0/16", "10.240.1.0/24", "overlaps"),
            ("10.240.1.0/24", "10.240.0.0/16", "overlaps"),
            ("10.240.0.0/16", "10.9.0.0/31", "prefix /31"),
            ("10.240.0.0/16", "10.9.0.1/24", "not a network address"),
            ("10.0.0.0/7", "10.9.0.0/24", "prefix /7"),
        ] {
            let e = Overlays::new(net(first), &[net(more)]).unwrap_err();
            assert!(e.to_string().contains(why), "{first} {more}: {e}");
        }
    }
}

/// The overlay address at `offset` from the network address, if it is a usable device
/// address: offsets 0 (network) and 1 (the server) and the broadcast address are not.
pub fn overlay_address(overlay: Ipv4Net, offset: u32) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - overlay.prefix_len());
    if offset < 2 || u64::from(offset) >= size - 1 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(overlay.network()) + offset))
}

/// The address after the highest one given out (`None` before the first device), or
/// `None` when the overlay is full.
pub fn next_overlay_address(overlay: Ipv4Net, highest: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    let offset = match highest {
        None => 2,
        Some(ip) => u32::from(ip)
            .checked_sub(u32::from(overlay.network()))?
            .checked_add(1)?,
    };
    overlay_address(overlay, offset)
}

/// How many devices an overlay can hold.
pub fn overlay_capacity(overlay: Ipv4Net) -> u64 {
    (1u64 << (32 - overlay.prefix_len())).saturating_sub(3)
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No key with this secret.
    KeyUnknown,
    /// The key was revoked.
    KeyRevoked,
    /// The key expired.
    KeyExpired { at: OffsetDateTime },
    /// The key has enrolled as many devices as it may.
    KeyUsedUp,
    /// The UUID belongs to a device of another fleet.
    WrongFleet { device_fleet: String },
    /// The UUID belongs to a revoked device.
    DeviceRevoked,
    /// The UUID is enrolled with a different device key.
    UuidHeldByAnotherKey,
    /// The WireGuard key is bound to another device.
    WgKeyBound { other: DeviceId },
    /// Every address of every overlay network is taken.
    AddressPoolExhausted { overlay: Overlays },
}

/// What to do with a valid enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollDecision {
    /// A new device: allocate an address, take a use of the key.
    Create,
    /// The device proved the key of its current certificate again: same UUID and address,
    /// no use of the key taken. This is how a device whose certificate expired comes back.
    Reenroll,
}

/// Checks a provisioning key on its own (before any work is done for the request).
pub fn check_key(key: Option<&KeyInfo>, now: OffsetDateTime) -> Result<&KeyInfo, EnrollRefusal> {
    let key = key.ok_or(EnrollRefusal::KeyUnknown)?;
    if key.revoked_at.is_some() {
        return Err(EnrollRefusal::KeyRevoked);
    }
    if let Some(at) = key.expires_at {
        if at <= now {
            return Err(EnrollRefusal::KeyExpired { at });
        }
    }
    Ok(key)
}

/// The enrollment rules, given what the registry holds at the moment of the transaction.
pub fn decide_enrollment(
    key: Option<&KeyInfo>,
    existing: Option<&Device>,
    wg_key_owner: Option<&DeviceId>,
    c: &EnrollCommit,
) -> Result<EnrollDecision, EnrollRefusal> {
    let key = check_key(key, c.now)?;
    let bound_elsewhere = wg_key_owner.filter(|owner| **owner != c.device);
    match existing {
        Some(device) => {
            if device.fleet != key.fleet {
                return Err(EnrollRefusal::WrongFleet {
                    device_fleet: device.fleet.clone(),
                });
            }
            if device.is_revoked() {
                return Err(EnrollRefusal::DeviceRevoked);
            }
            if device.cert_public_key != c.cert_public_key {
                return Err(EnrollRefusal::UuidHeldByAnotherKey);
            }
            if let Some(other) = bound_elsewhere {
                return Err(EnrollRefusal::WgKeyBound { other: *other });
            }
            Ok(EnrollDecision::Reenroll)
        }
        None => {
            if key.uses_left == Some(0) {
                return Err(EnrollRefusal::KeyUsedUp);
            }
            if let Some(other) = bound_elsewhere {
                return Err(EnrollRefusal::WgKeyBound { other: *other });
            }
            Ok(EnrollDecision::Create)
        }
    }
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewRefusal {
    /// The certificate names a device the registry does not have.
    UnknownDevice,
    /// The device was revoked.
    DeviceRevoked,
    /// An older certificate tried to renew: the device key was cloned, or an old backup
    /// came back to life.
    NotNewestSerial { presented: String, newest: String },
    /// The new WireGuard key is bound to another device.
    WgKeyBound { other: DeviceId },
}

/// The renewal rules. Returns the device as it was before the renewal.
pub fn decide_renewal<'a>(
    device: Option<&'a Device>,
    wg_key_owner: Option<&DeviceId>,
    c: &RenewCommit,
) -> Result<&'a Device, RenewRefusal> {
    let device = device.ok_or(RenewRefusal::UnknownDevice)?;
    if device.is_revoked() {
        return Err(RenewRefusal::DeviceRevoked);
    }
    if device.cert_serial != c.presented_serial {
        return Err(RenewRefusal::NotNewestSerial {
            presented: c.presented_serial.clone(),
            newest: device.cert_serial.clone(),
        });
    }
    if let Some(other) = wg_key_owner.filter(|o| **o != c.device) {
        return Err(RenewRefusal::WgKeyBound { other: *other });
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use floto_proto::WgKey;

    use super::*;

    fn key(uses: Option<u32>) -> KeyInfo {
        KeyInfo {
            id: "k".into(),
            fleet: "lab".into(),
            uses_left: uses,
            expires_at: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
        }
    }

    fn commit(device: DeviceId, spki: &[u8]) -> EnrollCommit {
        EnrollCommit {
            key_hash: [0; 32],
            device,
            wg_public_key: WgKey([9; 32]),
            cert_serial: "01".into(),
            cert_public_key: spki.to_vec(),
            cert_expires_at: OffsetDateTime::UNIX_EPOCH,
            device_type: None,
            hostname: None,
            now: OffsetDateTime::UNIX_EPOCH + Duration::from_secs(100),
            reuse_addresses_revoked_before: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn device(id: DeviceId, fleet: &str, spki: &[u8]) -> Device {
        Device {
            id,
            fleet: fleet.into(),
            wg_public_key: WgKey([9; 32]),
            overlay_ip: Ipv4Addr::new(10, 240, 0, 2),
            cert_serial: "01".into(),
            cert_public_key: spki.to_vec(),
            cert_expires_at: OffsetDateTime::UNIX_EPOCH,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
            key_id: None,
            device_type: None,
            hostname: None,
            last_endpoint: None,
            last_seen: None,
        }
    }

    #[test]
    fn overlay_addresses_skip_network_server_and_broadcast() {
        let net: Ipv4Net = "10.240.0.0/30".parse().unwrap();
        assert_eq!(overlay_address(net, 0), None);
        assert_eq!(overlay_address(net, 1), None);
        assert_eq!(overlay_address(net, 2), Some(Ipv4Addr::new(10, 240, 0, 2)));
        assert_eq!(overlay_address(net, 3), None);
        assert_eq!(overlay_capacity(net), 1);
        let big: Ipv4Net = "10.240.0.0/16".parse().unwrap();
        assert_eq!(overlay_capacity(big), 65533);
        assert_eq!(
            overlay_address(big, 65534),
            Some(Ipv4Addr::new(10, 240, 255, 254))
        );
        assert_eq!(overlay_address(big, 65535), None);
        assert_eq!(
            next_overlay_address(net, None),
            Some(Ipv4Addr::new(10, 240, 0, 2))
        );
        assert_eq!(
            next_overlay_address(net, Some(Ipv4Addr::new(10, 240, 0, 2))),
            None
        );
        assert_eq!(
            next_overlay_address(big, Some(Ipv4Addr::new(10, 240, 1, 255))),
            Some(Ipv4Addr::new(10, 240, 2, 0))
        );
        assert_eq!(
            next_overlay_address(big, Some(Ipv4Addr::new(10, 240, 255, 254))),
            None
        );
    }

    #[test]
    fn key_states() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(check_key(None, now), Err(EnrollRefusal::KeyUnknown));
        let mut k = key(None);
        k.revoked_at = Some(now);
        assert_eq!(check_key(Some(&k), now), Err(EnrollRefusal::KeyRevoked));
        let mut k = key(None);
        k.expires_at = Some(now);
        assert!(matches!(
            check_key(Some(&k), now),
            Err(EnrollRefusal::KeyExpired { .. })
        ));
        k.expires_at = Some(now + Duration::from_secs(1));
        assert!(check_key(Some(&k), now).is_ok());
    }

    #[test]
    fn decisions() {
        let id = DeviceId::new_random();
        let other = DeviceId::new_random();
        let c = commit(id, b"spki-a");
        // New device.
        assert_eq!(
            decide_enrollment(Some(&key(None)), None, None, &c),
            Ok(EnrollDecision::Create)
        );
        assert_eq!(
            decide_enrollment(Some(&key(Some(0))), None, None, &c),
            Err(EnrollRefusal::KeyUsedUp)
        );
        assert_eq!(
            decide_enrollment(Some(&key(Some(1))), None, Some(&other), &c),
            Err(EnrollRefusal::WgKeyBound { other })
        );
        // Existing device.
        let d = device(id, "lab", b"spki-a");
        assert_eq!(
            decide_enrollment(Some(&key(Some(0))), Some(&d), Some(&id), &c),
            Ok(EnrollDecision::Reenroll)
        );
        assert_eq!(
            decide_enrollment(
                Some(&key(None)),
                Some(&device(id, "lab", b"spki-b")),
                None,
                &c
            ),
            Err(EnrollRefusal::UuidHeldByAnotherKey)
        );
        assert!(matches!(
            decide_enrollment(
                Some(&key(None)),
                Some(&device(id, "prod", b"spki-a")),
                None,
                &c
            ),
            Err(EnrollRefusal::WrongFleet { .. })
        ));
        let mut revoked = d.clone();
        revoked.revoked_at = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(
            decide_enrollment(Some(&key(None)), Some(&revoked), None, &c),
            Err(EnrollRefusal::DeviceRevoked)
        );
        assert_eq!(
            decide_enrollment(Some(&key(None)), Some(&d), Some(&other), &c),
            Err(EnrollRefusal::WgKeyBound { other })
        );
    }

    #[test]
    fn renewal_decisions() {
        let id = DeviceId::new_random();
        let d = device(id, "lab", b"spki");
        let c = RenewCommit {
            device: id,
            presented_serial: "01".into(),
            new_wg_public_key: None,
            cert_serial: "02".into(),
            cert_public_key: b"spki2".to_vec(),
            cert_expires_at: OffsetDateTime::UNIX_EPOCH,
            now: OffsetDateTime::UNIX_EPOCH,
        };
        assert!(decide_renewal(Some(&d), None, &c).is_ok());
        assert_eq!(
            decide_renewal(None, None, &c),
            Err(RenewRefusal::UnknownDevice)
        );
        let old = RenewCommit {
            presented_serial: "00".into(),
            ..c.clone()
        };
        assert!(matches!(
            decide_renewal(Some(&d), None, &old),
            Err(RenewRefusal::NotNewestSerial { .. })
        ));
        let mut revoked = d.clone();
        revoked.revoked_at = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(
            decide_renewal(Some(&revoked), None, &c),
            Err(RenewRefusal::DeviceRevoked)
        );
    }
}
