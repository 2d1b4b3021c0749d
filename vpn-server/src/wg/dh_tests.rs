//! The vendored curve25519-dalek (`vendor/curve25519-dalek.patch`) takes a variable-base
//! X25519 (`MontgomeryPoint::mul_clamped`, which x25519-dalek calls) through the Edwards form
//! where one of its vector backends does the multiplication: AVX-512 IFMA where the CPU has
//! it (the patch enables that backend on stable Rust), else AVX2. These tests hold it to the
//! Montgomery ladder it replaces and to RFC 7748: on the curve, on its twist (which takes
//! the ladder), at the points of small order, and at non-canonical encodings. They exercise
//! whichever backend this CPU selects. The map to Edwards form (`MontgomeryPoint::to_edwards`,
//! public, and patched to skip an inversion) is held to what the published one returns.

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, X25519_BASEPOINT};
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::clamp_integer;
use rand::Rng;
use x25519_dalek::{x25519, PublicKey, StaticSecret};

/// The X25519 the patch replaced: curve25519-dalek's Montgomery ladder over the clamped
/// key's bits 254 to 0 (bit 255 is cleared by clamping), as `mul_clamped` was.
fn ladder(k: [u8; 32], u: [u8; 32]) -> [u8; 32] {
    let k = clamp_integer(k);
    let bits = (0..255).rev().map(|i| (k[i / 8] >> (i % 8)) & 1 == 1);
    MontgomeryPoint(u).mul_bits_be(bits).to_bytes()
}

fn bytes(hex_str: &str) -> [u8; 32] {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

/// Whether `u` has a point on the curve in Edwards form, so that the patched X25519 takes
/// the Edwards route (with a vector backend) instead of the ladder.
fn on_the_curve(u: [u8; 32]) -> bool {
    MontgomeryPoint(u).to_edwards(0).is_some()
}

#[test]
fn x25519_gives_the_rfc_7748_results() {
    // RFC 7748, section 5.2 (the second point has its top bit set, which X25519 ignores).
    for (k, u, out) in [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ] {
        assert_eq!(x25519(bytes(k), bytes(u)), bytes(out));
    }
    // Its iterated test: k and u start at 9; each round's result is the next k, k the next u.
    let (mut k, mut u) = ([0u8; 32], [0u8; 32]);
    k[0] = 9;
    u[0] = 9;
    for round in 1..=1000 {
        let result = x25519(k, u);
        u = k;
        k = result;
        if round == 1 {
            assert_eq!(
                k,
                bytes("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
            );
        }
    }
    assert_eq!(
        k,
        bytes("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")
    );
}

#[test]
fn x25519_agrees_with_the_ladder_at_points_of_small_order_and_odd_encodings() {
    // The points of small order (a clamped key is a multiple of 8, so X25519 gives all zeros
    // for each): 0, 1, the two of order 8, and p - 1, p and p + 1 (the non-canonical
    // encodings of -1, 0 and 1); each also with the top bit set, which X25519 ignores.
    let mut small_order = vec![
        [0; 32],
        bytes("0100000000000000000000000000000000000000000000000000000000000000"),
        bytes("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        bytes("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        bytes("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        bytes("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        bytes("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ];
    for i in 0..small_order.len() {
        let mut top = small_order[i];
        top[31] |= 0x80;
        small_order.push(top);
    }
    let mut points: Vec<[u8; 32]> = small_order.clone();
    points.push([0xff; 32]);
    // Small u, on the curve and on the twist alike.
    for small in 0..=64u8 {
        let mut u = [0u8; 32];
        u[0] = small;
        points.push(u);
        u[31] = 0x80;
        points.push(u);
    }
    let mut rng = rand::rng();
    let keys: Vec<[u8; 32]> = (0..4)
        .map(|_| rng.random())
        .chain([[0; 32], [0xff; 32]])
        .collect();
    for u in &small_order {
        for k in &keys {
            assert_eq!(x25519(*k, *u), [0; 32], "k {k:02x?} u {u:02x?}");
        }
    }
    for u in &points {
        for k in &keys {
            assert_eq!(x25519(*k, *u), ladder(*k, *u), "k {k:02x?} u {u:02x?}");
        }
    }
    // Both routes were taken: some of these points have an Edwards form, some do not.
    let on_curve = points.iter().filter(|u| on_the_curve(**u)).count();
    assert!(
        on_curve > 10 && on_curve < points.len() - 10,
        "{on_curve} of {}",
        points.len()
    );
}

/// The published `to_edwards(sign)` returns the Edwards point whose u-coordinate is `u`, with
/// x negative exactly when `sign` is odd (x = 0 has no sign), or `None` on the twist.
#[test]
fn to_edwards_gives_the_point_with_that_u_and_the_sign_asked_for() {
    let base = X25519_BASEPOINT;
    assert_eq!(base.to_edwards(0), Some(ED25519_BASEPOINT_POINT));
    assert_eq!(base.to_edwards(1), Some(-ED25519_BASEPOINT_POINT));
    assert_eq!(base.to_edwards(3), Some(-ED25519_BASEPOINT_POINT));
    // u = 0 is (0, -1), for either sign.
    let zero = MontgomeryPoint([0; 32]);
    for sign in [0, 1] {
        let p = zero.to_edwards(sign).unwrap();
        assert_eq!(
            p.compress().to_bytes(),
            bytes("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
        );
    }
    let mut rng = rand::rng();
    let mut on_curve = 0;
    for _ in 0..1000 {
        let u = MontgomeryPoint(rng.random());
        let (Some(p), Some(n)) = (u.to_edwards(0), u.to_edwards(1)) else {
            assert!(u.to_edwards(0).is_none() && u.to_edwards(1).is_none());
            continue;
        };
        on_curve += 1;
        assert_eq!(p.to_montgomery(), u);
        assert_eq!(n, -p);
        assert_eq!(p.compress().to_bytes()[31] >> 7, 0);
        assert_eq!(n.compress().to_bytes()[31] >> 7, 1);
        // A valid point in extended coordinates: its encoding decodes to it, and additions
        // (which read T) agree with doublings (which do not).
        assert_eq!(p.compress().decompress(), Some(p));
        let two = p + p;
        let four = two + two;
        assert_eq!(four + four, p.mul_by_cofactor());
    }
    assert!(on_curve > 400, "{on_curve} of 1000 on the curve");
}

#[test]
fn x25519_agrees_with_the_ladder_for_random_keys_and_points() {
    let mut rng = rand::rng();
    let (mut curve, mut twist) = (0, 0);
    for _ in 0..1500 {
        let k: [u8; 32] = rng.random();
        // Any 32 bytes: about half are points on the twist.
        let u: [u8; 32] = rng.random();
        if on_the_curve(u) {
            curve += 1;
        } else {
            twist += 1;
        }
        assert_eq!(x25519(k, u), ladder(k, u), "k {k:02x?} u {u:02x?}");
        // A public key as a peer sends it, through the API the handshake uses.
        let peer = PublicKey::from(&StaticSecret::from(rng.random::<[u8; 32]>()));
        let ours = StaticSecret::from(k);
        assert_eq!(
            ours.diffie_hellman(&peer).to_bytes(),
            ladder(k, peer.to_bytes())
        );
    }
    assert!(
        curve > 500 && twist > 500,
        "{curve} on the curve, {twist} on the twist"
    );
}
