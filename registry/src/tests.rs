//! The registry's test suite, run against both backends: every test below runs once on
//! SQLite (a temporary file) and once on PostgreSQL (a throwaway server started by
//! floto-pgtest; PostgreSQL must be installed, and the test fails loudly when it is not).
//! "Two nodes" are two registries opened on the same database.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use floto_pgtest::Postgres;
use floto_proto::admin::{Role, TokenKind};
use floto_proto::{DeviceId, WgKey};

use crate::postgres::PgRegistry;
use crate::sqlite::SqliteRegistry;
use crate::*;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Where one test's registry lives, kept alive for the test.
enum Store {
    Sqlite(tempfile::TempDir),
    Postgres { _server: Postgres, url: String },
}

struct Fixture {
    store: Store,
    r: Arc<dyn Registry>,
}

impl Fixture {
    async fn new(backend: Backend, overlay: &str) -> Self {
        let store = match backend {
            Backend::Sqlite => Store::Sqlite(tempfile::tempdir().unwrap()),
            Backend::Postgres => {
                let pg = Postgres::start();
                let url = pg.create_database("registry");
                Store::Postgres { _server: pg, url }
            }
        };
        let r = open_on(&store, overlay).await.unwrap();
        Self { store, r }
    }

    /// Another registry on the same database: a second node.
    async fn open(&self, overlay: &str) -> Result<Arc<dyn Registry>, StoreError> {
        open_on(&self.store, overlay).await
    }
}

/// `overlay`: one network, or several separated by commas (the first one first).
async fn open_on(store: &Store, overlay: &str) -> Result<Arc<dyn Registry>, StoreError> {
    let nets: Vec<ipnet::Ipv4Net> = overlay.split(',').map(|n| n.parse().unwrap()).collect();
    let overlay = Overlays::new(nets[0], &nets[1..]).unwrap();
    Ok(match store {
        Store::Sqlite(dir) => {
            Arc::new(SqliteRegistry::open(&dir.path().join("db"), overlay).await?)
        }
        Store::Postgres { url, .. } => Arc::new(PgRegistry::connect(url, overlay).await?),
    })
}

fn commit(key: [u8; 32], device: DeviceId, wg: u8, now: OffsetDateTime) -> EnrollCommit {
    EnrollCommit {
        key_hash: key,
        device,
        wg_public_key: WgKey([wg; 32]),
        cert_serial: format!("{:032x}", rand::random::<u128>()),
        cert_public_key: vec![wg],
        cert_expires_at: now + Duration::from_secs(3600),
        device_type: None,
        hostname: None,
        now,
        reuse_addresses_revoked_before: now - Duration::from_secs(30 * 86_400),
    }
}

async fn key(r: &dyn Registry, hash: u8, uses: Option<u32>, now: OffsetDateTime) {
    r.create_key(NewKey {
        id: format!("k{hash}"),
        hash: [hash; 32],
        fleet: "lab".into(),
        uses,
        expires_at: None,
        created_at: now,
    })
    .await
    .unwrap();
}

async fn enrollment_records_certificate_takes_a_use_and_allocates_in_order(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = &*f.r;
    let now = OffsetDateTime::now_utc();
    key(r, 1, Some(2), now).await;
    let a = r
        .enroll(commit([1; 32], DeviceId::new_random(), 1, now))
        .await
        .unwrap()
        .unwrap();
    let b = r
        .enroll(commit([1; 32], DeviceId::new_random(), 2, now))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 2));
    assert_eq!(b.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 3));
    // What enroll returned is what a read says.
    assert_eq!(
        r.device(&a.device().id).await.unwrap().as_ref(),
        Some(a.device())
    );
    assert_eq!(r.list_keys().await.unwrap()[0].uses_left, Some(0));
    assert_eq!(
        r.enroll(commit([1; 32], DeviceId::new_random(), 3, now))
            .await
            .unwrap(),
        Err(EnrollRefusal::KeyUsedUp)
    );
    // The triggers recorded both certificates; revocation marks them.
    r.revoke_device(&a.device().id, now).await.unwrap();
    let revoked = r.revoked_certificates(now).await.unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].serial, a.device().cert_serial);
    // A revoked device keeps its address: the next device gets a new one.
    key(r, 2, None, now).await;
    let c = r
        .enroll(commit([2; 32], DeviceId::new_random(), 4, now))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 4));
}

async fn reenrollment_keeps_the_address_and_records_the_new_certificate(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = &*f.r;
    let now = OffsetDateTime::now_utc();
    key(r, 1, Some(1), now).await;
    let id = DeviceId::new_random();
    let first = r
        .enroll(commit([1; 32], id, 1, now))
        .await
        .unwrap()
        .unwrap();
    let mut again = commit([1; 32], id, 9, now);
    again.cert_public_key = vec![1]; // the same device key
    let second = r.enroll(again.clone()).await.unwrap().unwrap();
    match &second {
        EnrollOutcome::Reenrolled {
            device,
            previous_wg_key,
        } => {
            assert_eq!(device.overlay_ip, first.device().overlay_ip);
            assert_eq!(device.wg_public_key, WgKey([9; 32]));
            assert_eq!(*previous_wg_key, Some(WgKey([1; 32])));
        }
        other => panic!("expected a re-enrollment, got {other:?}"),
    }
    assert_eq!(r.device(&id).await.unwrap().as_ref(), Some(second.device()));
    r.revoke_device(&id, now).await.unwrap();
    assert_eq!(r.revoked_certificates(now).await.unwrap().len(), 2);
}

async fn a_full_overlay_is_refused_without_writing(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/30").await;
    let r = &*f.r;
    let now = OffsetDateTime::now_utc();
    key(r, 1, None, now).await;
    r.enroll(commit([1; 32], DeviceId::new_random(), 1, now))
        .await
        .unwrap()
        .unwrap();
    let refused = r
        .enroll(commit([1; 32], DeviceId::new_random(), 2, now))
        .await
        .unwrap();
    assert!(matches!(
        refused,
        Err(EnrollRefusal::AddressPoolExhausted { .. })
    ));
    assert_eq!(r.count_devices().await.unwrap(), 1);
}

/// An installation whose overlay is full adds a second network: the devices it has keep
/// their addresses, new ones are given addresses in the added network (even one below the
/// first numerically), and a server started without the added network refuses the registry
/// with its reason.
async fn an_added_overlay_network_takes_new_devices_without_renumbering(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/30").await;
    let now = OffsetDateTime::now_utc();
    key(&*f.r, 1, None, now).await;
    let first =
        f.r.enroll(commit([1; 32], DeviceId::new_random(), 1, now))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(first.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 2));
    let r = f.open("10.240.0.0/30,10.9.0.0/29").await.unwrap();
    let mut given = Vec::new();
    for wg in 2..=6 {
        let e = r
            .enroll(commit([1; 32], DeviceId::new_random(), wg, now))
            .await
            .unwrap()
            .unwrap();
        given.push(e.device().overlay_ip);
    }
    // .0 is the network, .1 the server's address there, .7 the broadcast.
    assert_eq!(
        given,
        (2..=6)
            .map(|h| Ipv4Addr::new(10, 9, 0, h))
            .collect::<Vec<_>>()
    );
    assert!(matches!(
        r.enroll(commit([1; 32], DeviceId::new_random(), 7, now))
            .await
            .unwrap(),
        Err(EnrollRefusal::AddressPoolExhausted { .. })
    ));
    let kept = r.device(&first.device().id).await.unwrap().unwrap();
    assert_eq!(kept.overlay_ip, first.device().overlay_ip, "renumbered");
    drop(r);
    let refused = f.open("10.240.0.0/30").await.map(|_| ()).unwrap_err();
    let why = refused.to_string();
    assert!(
        why.contains("5 enrolled device(s) have addresses outside") && why.contains("10.9.0.2"),
        "{why}"
    );
}

/// A fleet's SSH logins: unset until set, replaced by a new setting, back to unset on
/// reset, and seen by another node at once.
async fn fleet_ssh_logins_are_set_replaced_and_reset(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let (r, other) = (&*f.r, f.open("10.240.0.0/16").await.unwrap());
    let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    assert_eq!(r.fleet_ssh_logins("lab").await.unwrap(), None);
    let pi = vec!["pi".to_owned()];
    r.set_fleet_ssh_logins("lab", Some(&pi), t).await.unwrap();
    let both = vec!["pi".to_owned(), "admin".to_owned()];
    r.set_fleet_ssh_logins("field", Some(&both), t)
        .await
        .unwrap();
    r.set_fleet_ssh_logins("lab", Some(&both), t + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        other.fleet_ssh_logins("lab").await.unwrap(),
        Some(both.clone())
    );
    let all = other.fleet_settings().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|s| (s.name.as_str(), s.ssh_logins.clone(), s.updated_at))
            .collect::<Vec<_>>(),
        [
            ("field", both.clone(), t),
            ("lab", both.clone(), t + Duration::from_secs(5))
        ]
    );
    r.set_fleet_ssh_logins("lab", None, t).await.unwrap();
    assert_eq!(other.fleet_ssh_logins("lab").await.unwrap(), None);
    assert_eq!(other.fleet_settings().await.unwrap().len(), 1);

    // A device's SSH host keys: replaced as a whole, forgotten with an empty list.
    let d = DeviceId::new_random();
    assert!(r.device_ssh_host_keys(&d).await.unwrap().is_empty());
    let keys = vec![
        "ssh-ed25519 AAAA a".to_owned(),
        "ecdsa-sha2-nistp256 BBBB b".to_owned(),
    ];
    r.set_device_ssh_host_keys(&d, &keys, t).await.unwrap();
    assert_eq!(other.device_ssh_host_keys(&d).await.unwrap(), keys);
    r.set_device_ssh_host_keys(&d, &keys[1..], t).await.unwrap();
    assert_eq!(other.device_ssh_host_keys(&d).await.unwrap(), keys[1..]);
    r.set_device_ssh_host_keys(&d, &[], t).await.unwrap();
    assert!(other.device_ssh_host_keys(&d).await.unwrap().is_empty());
}

async fn a_revoked_devices_address_is_given_again_only_after_the_grace_period(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/30").await;
    let r = &*f.r;
    let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    key(r, 1, None, t0).await;
    let first = DeviceId::new_random();
    let created = r
        .enroll(commit([1; 32], first, 1, t0))
        .await
        .unwrap()
        .unwrap();
    let ip = created.device().overlay_ip;
    let revoked_at = t0 + Duration::from_secs(60);
    r.revoke_device(&first, revoked_at).await.unwrap().unwrap();
    // Within the grace period the pool stays exhausted...
    let mut early = commit(
        [1; 32],
        DeviceId::new_random(),
        2,
        t0 + Duration::from_secs(120),
    );
    early.reuse_addresses_revoked_before = revoked_at - Duration::from_secs(1);
    assert!(matches!(
        r.enroll(early).await.unwrap(),
        Err(EnrollRefusal::AddressPoolExhausted { .. })
    ));
    // ...after it, the address goes to the next device, and only to one.
    let second = DeviceId::new_random();
    let mut later = commit([1; 32], second, 3, t0 + Duration::from_secs(7200));
    later.reuse_addresses_revoked_before = revoked_at;
    let reused = r.enroll(later.clone()).await.unwrap().unwrap();
    assert_eq!(reused.device().overlay_ip, ip);
    later.device = DeviceId::new_random();
    later.wg_public_key = WgKey([4; 32]);
    assert!(matches!(
        r.enroll(later).await.unwrap(),
        Err(EnrollRefusal::AddressPoolExhausted { .. })
    ));
    // The revoked device keeps its row (and its address in its history).
    let old = r.device(&first).await.unwrap().unwrap();
    assert!(old.is_revoked());
    assert_eq!(old.overlay_ip, ip);
    assert_eq!(r.count_devices().await.unwrap(), 1);
}

async fn concurrent_jobs_in_one_batch_see_each_other(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = f.r.clone();
    let now = OffsetDateTime::now_utc();
    key(&*r, 1, Some(1), now).await;
    key(&*r, 2, None, now).await;
    let same = DeviceId::new_random();
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            // Half race for the last use of key 1, half for one UUID under key 2.
            if i % 2 == 0 {
                r.enroll(commit([1; 32], DeviceId::new_random(), i + 1, now))
                    .await
            } else {
                r.enroll(commit([2; 32], same, i + 1, now)).await
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    let created = results
        .iter()
        .filter(|r| matches!(r, Ok(EnrollOutcome::Created(_))))
        .count();
    let used_up = results
        .iter()
        .filter(|r| matches!(r, Err(EnrollRefusal::KeyUsedUp)))
        .count();
    let held = results
        .iter()
        .filter(|r| matches!(r, Err(EnrollRefusal::UuidHeldByAnotherKey)))
        .count();
    assert_eq!(created, 2, "one winner per race");
    assert_eq!(used_up, 31);
    assert_eq!(held, 31);
    let ips: std::collections::HashSet<_> = r
        .devices()
        .await
        .unwrap()
        .iter()
        .map(|d| d.overlay_ip)
        .collect();
    assert_eq!(ips.len(), 2);
}

async fn one_failing_job_does_not_fail_its_batch(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = f.r.clone();
    let now = OffsetDateTime::now_utc();
    key(&*r, 1, None, now).await;
    // A certificate serial that is already recorded makes the trigger's INSERT fail.
    let first = r
        .enroll(commit([1; 32], DeviceId::new_random(), 1, now))
        .await
        .unwrap()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let r = r.clone();
        let mut c = commit([1; 32], DeviceId::new_random(), i + 10, now);
        if i == 7 {
            c.cert_serial = first.device().cert_serial.clone();
        }
        tasks.push(tokio::spawn(async move { (i, r.enroll(c).await) }));
    }
    for t in tasks {
        let (i, result) = t.await.unwrap();
        if i == 7 {
            assert!(matches!(result, Err(StoreError::Database(_))), "{result:?}");
        } else {
            assert!(
                matches!(result, Ok(Ok(EnrollOutcome::Created(_)))),
                "{i}: {result:?}"
            );
        }
    }
    assert_eq!(r.count_devices().await.unwrap(), 16);
}

async fn login_tokens_are_single_use_and_expire(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = &*f.r;
    let now = OffsetDateTime::now_utc();
    let op = |name: &str, hash: u8, expires: OffsetDateTime| NewOperator {
        name: name.into(),
        role: Role::Operator,
        fleets: vec!["lab".into()],
        token_kind: TokenKind::Login,
        token_hash: [hash; 32],
        token_expires_at: Some(expires),
        now,
    };
    assert!(r
        .add_operator(op("alice", 1, now + Duration::from_secs(60)))
        .await
        .unwrap()
        .is_some());
    assert!(
        r.add_operator(op("alice", 2, now)).await.unwrap().is_none(),
        "names are unique"
    );
    assert!(r.add_operator(op("bob", 3, now)).await.unwrap().is_some());
    assert_eq!(
        r.consume_login_token(&[1; 32], now)
            .await
            .unwrap()
            .unwrap()
            .name,
        "alice"
    );
    assert_eq!(
        r.consume_login_token(&[1; 32], now).await.unwrap(),
        Err(TokenRefusal::Used)
    );
    assert_eq!(
        r.consume_login_token(&[3; 32], now).await.unwrap(),
        Err(TokenRefusal::Expired)
    );
    assert_eq!(
        r.consume_login_token(&[9; 32], now).await.unwrap(),
        Err(TokenRefusal::Unknown)
    );
    assert_eq!(
        r.operator("alice").await.unwrap().unwrap().fleets,
        vec!["lab".to_owned()]
    );
}

async fn a_registry_from_another_overlay_is_refused(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let now = OffsetDateTime::now_utc();
    key(&*f.r, 1, None, now).await;
    f.r.enroll(commit([1; 32], DeviceId::new_random(), 1, now))
        .await
        .unwrap()
        .unwrap();
    let err = f.open("10.9.0.0/16").await.err().expect("refused");
    assert!(
        err.to_string().contains("outside the configured overlay"),
        "{err}"
    );
}

async fn api_tokens_identify_viewers_until_they_expire_or_are_revoked(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = &*f.r;
    let now = OffsetDateTime::now_utc();
    let viewer = |name: &str, hash: u8, expires: Option<OffsetDateTime>| NewOperator {
        name: name.into(),
        role: Role::Viewer,
        fleets: Vec::new(),
        token_kind: TokenKind::Api,
        token_hash: [hash; 32],
        token_expires_at: expires,
        now,
    };
    r.add_operator(viewer("prometheus", 1, None)).await.unwrap();
    r.add_operator(viewer("old", 2, Some(now - Duration::from_secs(1))))
        .await
        .unwrap();
    // An API token is not a login token, and is not used up by use.
    assert_eq!(
        r.consume_login_token(&[1; 32], now).await.unwrap(),
        Err(TokenRefusal::Unknown)
    );
    for _ in 0..2 {
        let op = r
            .operator_by_api_token(&[1; 32], now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(op.name, "prometheus");
    }
    assert_eq!(
        r.operator_by_api_token(&[2; 32], now).await.unwrap(),
        Err(TokenRefusal::Expired)
    );
    assert_eq!(
        r.operator_by_api_token(&[3; 32], now).await.unwrap(),
        Err(TokenRefusal::Unknown)
    );
    r.revoke_operator("prometheus", now).await.unwrap();
    assert_eq!(
        r.operator_by_api_token(&[1; 32], now).await.unwrap(),
        Err(TokenRefusal::OperatorRevoked)
    );
}

/// Two nodes race: for the last use of a key, for one UUID, and for the addresses of a
/// small overlay. Exactly one wins each, and no address is given twice.
async fn two_nodes_race_for_a_key_a_uuid_and_addresses(backend: Backend) {
    // 10.240.0.0/28: 13 addresses for devices.
    let f = Fixture::new(backend, "10.240.0.0/28").await;
    let nodes = [f.r.clone(), f.open("10.240.0.0/28").await.unwrap()];
    let now = OffsetDateTime::now_utc();
    key(&*f.r, 1, Some(1), now).await;
    key(&*f.r, 2, None, now).await;
    key(&*f.r, 3, None, now).await;
    let same = DeviceId::new_random();
    // First the key's last use and the UUID, then the addresses left.
    let mut won = [0; 3];
    for phase in [0..40u8, 40..80u8] {
        let mut tasks = tokio::task::JoinSet::new();
        for i in phase {
            let node = nodes[usize::from(i % 2)].clone();
            tasks.spawn(async move {
                let race = if i < 40 { i % 2 } else { 2 };
                let c = match race {
                    0 => commit([1; 32], DeviceId::new_random(), i + 1, now),
                    1 => commit([2; 32], same, i + 1, now),
                    _ => commit([3; 32], DeviceId::new_random(), i + 1, now),
                };
                (race, node.enroll(c).await.unwrap())
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (race, result) = done.unwrap();
            match result {
                Ok(EnrollOutcome::Created(_)) => won[usize::from(race)] += 1,
                Err(EnrollRefusal::KeyUsedUp) => assert_eq!(race, 0),
                Err(EnrollRefusal::UuidHeldByAnotherKey) => assert_eq!(race, 1),
                Err(EnrollRefusal::AddressPoolExhausted { .. }) => assert_eq!(race, 2),
                other => panic!("race {race}: {other:?}"),
            }
        }
    }
    assert_eq!(
        won,
        [1, 1, 11],
        "one device takes the key's last use, one the UUID"
    );
    let devices = f.r.devices().await.unwrap();
    assert_eq!(devices.len(), 13, "every address is given out");
    let ips: std::collections::HashSet<_> = devices.iter().map(|d| d.overlay_ip).collect();
    assert_eq!(ips.len(), devices.len(), "no address twice");
}

/// Two nodes race for one login token: it is taken once.
async fn two_nodes_race_for_one_login_token(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let nodes = [f.r.clone(), f.open("10.240.0.0/16").await.unwrap()];
    let now = OffsetDateTime::now_utc();
    f.r.add_operator(NewOperator {
        name: "alice".into(),
        role: Role::Operator,
        fleets: vec!["lab".into()],
        token_kind: TokenKind::Login,
        token_hash: [5; 32],
        token_expires_at: None,
        now,
    })
    .await
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let node = nodes[i % 2].clone();
        tasks.spawn(async move { node.consume_login_token(&[5; 32], now).await.unwrap() });
    }
    let mut taken = 0;
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            Ok(op) => {
                assert_eq!(op.name, "alice");
                taken += 1;
            }
            Err(refusal) => assert_eq!(refusal, TokenRefusal::Used),
        }
    }
    assert_eq!(taken, 1);
}

/// Every write a running server must follow appends to the feed, in commit order; an entry
/// reads its subject as it is now, so a renewal read after the revocation that followed it
/// says "revoked".
async fn the_change_feed_carries_every_write_in_order(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let other = f.open("10.240.0.0/16").await.unwrap();
    let r = &*f.r;
    let now = OffsetDateTime::now_utc();
    assert_eq!(r.last_change().await.unwrap(), 0);
    key(r, 1, None, now).await;
    let id = DeviceId::new_random();
    let enrolled = r
        .enroll(commit([1; 32], id, 1, now))
        .await
        .unwrap()
        .unwrap();
    let start = r.last_change().await.unwrap();
    assert!(start > 0);
    let Feed::Entries(entries) = other.changes_after(0, 100).await.unwrap() else {
        panic!("nothing was pruned");
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].change,
        Some(Change::DeviceUpdated {
            device: enrolled.device().clone(),
            previous_wg_key: None
        })
    );
    // A renewal, then a revocation on the other node.
    let renewed = r
        .renew(RenewCommit {
            device: id,
            presented_serial: enrolled.device().cert_serial.clone(),
            new_wg_public_key: Some(WgKey([7; 32])),
            cert_serial: "feed01".into(),
            cert_public_key: vec![1],
            cert_expires_at: now + Duration::from_secs(7200),
            now,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.device.wg_public_key, WgKey([7; 32]));
    other.revoke_device(&id, now).await.unwrap().unwrap();
    f.r.add_operator(NewOperator {
        name: "op".into(),
        role: Role::Operator,
        fleets: vec![],
        token_kind: TokenKind::Login,
        token_hash: [8; 32],
        token_expires_at: None,
        now,
    })
    .await
    .unwrap();
    other.revoke_operator("op", now).await.unwrap().unwrap();
    let Feed::Entries(entries) = r.changes_after(start, 100).await.unwrap() else {
        panic!("nothing was pruned");
    };
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
    for e in &entries[..2] {
        let Some(Change::DeviceRevoked(rev)) = &e.change else {
            panic!("the renewal reads as revoked now: {e:?}");
        };
        assert_eq!(rev.device.id, id);
        assert_eq!(rev.serials.len(), 2, "both certificates are revoked");
    }
    assert!(matches!(
        &entries[2].change,
        Some(Change::OperatorRevoked(rev)) if rev.operator.name == "op"
    ));
    // Paged reads see the same entries.
    let Feed::Entries(page) = r.changes_after(start, 1).await.unwrap() else {
        panic!("nothing was pruned");
    };
    assert_eq!(page, entries[..1]);
    assert_eq!(r.last_change().await.unwrap(), entries[2].seq);
    // Refusals and reads append nothing.
    assert!(r
        .enroll(commit([9; 32], DeviceId::new_random(), 3, now))
        .await
        .unwrap()
        .is_err());
    r.devices().await.unwrap();
    assert_eq!(r.last_change().await.unwrap(), entries[2].seq);
}

/// A reader that was away past the pruning horizon is told to load everything again, and
/// where to continue from.
async fn a_reader_behind_pruned_changes_is_told_to_reload(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = &*f.r;
    let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    key(r, 1, None, t0).await;
    for i in 0..3 {
        r.enroll(commit([1; 32], DeviceId::new_random(), i + 1, t0))
            .await
            .unwrap()
            .unwrap();
    }
    let later = t0 + Duration::from_secs(86_400);
    let id = DeviceId::new_random();
    r.enroll(commit([1; 32], id, 9, later))
        .await
        .unwrap()
        .unwrap();
    let last = r.last_change().await.unwrap();
    assert_eq!(
        r.prune_changes(t0 + Duration::from_secs(60)).await.unwrap(),
        3
    );
    assert_eq!(r.last_change().await.unwrap(), last);
    assert_eq!(
        r.changes_after(1, 100).await.unwrap(),
        Feed::Pruned { resume_after: last }
    );
    let Feed::Entries(rest) = r.changes_after(last - 1, 100).await.unwrap() else {
        panic!("the newest entry is kept");
    };
    assert_eq!(rest.len(), 1);
}

/// Presence is written for a whole batch at once, and read back.
async fn presence_is_saved_in_batches(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let r = &*f.r;
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    key(r, 1, None, now).await;
    let mut batch = Vec::new();
    for i in 0..50u8 {
        let id = DeviceId::new_random();
        r.enroll(commit([1; 32], id, i + 1, now))
            .await
            .unwrap()
            .unwrap();
        batch.push(Presence {
            device: id,
            endpoint: format!("192.0.2.{}:{}", i + 1, 51820 + u16::from(i))
                .parse()
                .unwrap(),
            last_seen: now + Duration::from_secs(u64::from(i)),
        });
    }
    // An IPv6 endpoint, and a device that is not (or no longer) in the registry: ignored.
    batch[0].endpoint = "[2001:db8::7]:40000".parse().unwrap();
    let mut with_unknown = batch.clone();
    with_unknown.push(Presence {
        device: DeviceId::new_random(),
        endpoint: "192.0.2.250:1".parse().unwrap(),
        last_seen: now,
    });
    r.save_presence(&with_unknown).await.unwrap();
    for p in &batch {
        let d = r.device(&p.device).await.unwrap().unwrap();
        assert_eq!(d.last_endpoint, Some(p.endpoint));
        assert_eq!(d.last_seen, Some(p.last_seen));
    }
    // A later batch of some of them moves only those.
    let later: Vec<Presence> = batch[..10]
        .iter()
        .map(|p| Presence {
            endpoint: "198.51.100.1:9".parse().unwrap(),
            last_seen: p.last_seen + Duration::from_secs(60),
            ..*p
        })
        .collect();
    r.save_presence(&later).await.unwrap();
    for (i, p) in batch.iter().enumerate() {
        let d = r.device(&p.device).await.unwrap().unwrap();
        let expected = later.get(i).unwrap_or(p);
        assert_eq!(d.last_endpoint, Some(expected.endpoint));
        assert_eq!(d.last_seen, Some(expected.last_seen));
    }
}

/// Another node's write wakes a waiting reader well within a second (PostgreSQL's NOTIFY),
/// and the wake-up is only a hint: the reader finds the change in the table.
async fn another_nodes_change_wakes_the_reader(backend: Backend) {
    let f = Fixture::new(backend, "10.240.0.0/16").await;
    let other = f.open("10.240.0.0/16").await.unwrap();
    let now = OffsetDateTime::now_utc();
    key(&*f.r, 1, None, now).await;
    // Let the listener connect first.
    f.r.wait_for_changes(Duration::from_millis(500)).await;
    let before = f.r.last_change().await.unwrap();
    let reader = f.r.clone();
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        reader.wait_for_changes(Duration::from_secs(5)).await;
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    other
        .enroll(commit([1; 32], DeviceId::new_random(), 1, now))
        .await
        .unwrap()
        .unwrap();
    let waited = waiting.await.unwrap();
    match backend {
        Backend::Postgres => assert!(waited < Duration::from_secs(1), "woken after {waited:?}"),
        // SQLite has no other writers to hear from: the reader waits out its timeout.
        Backend::Sqlite => assert!(waited >= Duration::from_secs(5), "{waited:?}"),
    }
    assert!(f.r.last_change().await.unwrap() > before);
}

/// Each test above, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    enrollment_records_certificate_takes_a_use_and_allocates_in_order,
    reenrollment_keeps_the_address_and_records_the_new_certificate,
    a_full_overlay_is_refused_without_writing,
    an_added_overlay_network_takes_new_devices_without_renumbering,
    fleet_ssh_logins_are_set_replaced_and_reset,
    a_revoked_devices_address_is_given_again_only_after_the_grace_period,
    concurrent_jobs_in_one_batch_see_each_other,
    one_failing_job_does_not_fail_its_batch,
    login_tokens_are_single_use_and_expire,
    a_registry_from_another_overlay_is_refused,
    api_tokens_identify_viewers_until_they_expire_or_are_revoked,
    two_nodes_race_for_a_key_a_uuid_and_addresses,
    two_nodes_race_for_one_login_token,
    the_change_feed_carries_every_write_in_order,
    a_reader_behind_pruned_changes_is_told_to_reload,
    presence_is_saved_in_batches,
    another_nodes_change_wakes_the_reader,
);
