//! The SQLite registry's tests: group commit, races, tokens, migrations.

use super::schema::SCHEMA_V1;
use super::*;
use std::sync::Arc;

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

async fn registry(overlay: &str) -> (tempfile::TempDir, SqliteRegistry) {
    let dir = tempfile::tempdir().unwrap();
    let r = SqliteRegistry::open(&dir.path().join("db"), overlay.parse().unwrap())
        .await
        .unwrap();
    (dir, r)
}

async fn key(r: &SqliteRegistry, hash: u8, uses: Option<u32>, now: OffsetDateTime) {
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

#[tokio::test]
async fn enrollment_records_certificate_takes_a_use_and_allocates_in_order() {
    let (_d, r) = registry("10.240.0.0/16").await;
    let now = OffsetDateTime::now_utc();
    key(&r, 1, Some(2), now).await;
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
    key(&r, 2, None, now).await;
    let c = r
        .enroll(commit([2; 32], DeviceId::new_random(), 4, now))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 4));
}

#[tokio::test]
async fn reenrollment_keeps_the_address_and_records_the_new_certificate() {
    let (_d, r) = registry("10.240.0.0/16").await;
    let now = OffsetDateTime::now_utc();
    key(&r, 1, Some(1), now).await;
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

#[tokio::test]
async fn a_full_overlay_is_refused_without_writing() {
    let (_d, r) = registry("10.240.0.0/30").await;
    let now = OffsetDateTime::now_utc();
    key(&r, 1, None, now).await;
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

#[tokio::test]
async fn a_revoked_devices_address_is_given_again_only_after_the_grace_period() {
    let (_d, r) = registry("10.240.0.0/30").await;
    let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    key(&r, 1, None, t0).await;
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

#[tokio::test]
async fn concurrent_jobs_in_one_batch_see_each_other() {
    let (_d, r) = registry("10.240.0.0/16").await;
    let r = Arc::new(r);
    let now = OffsetDateTime::now_utc();
    key(&r, 1, Some(1), now).await;
    key(&r, 2, None, now).await;
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

#[tokio::test]
async fn one_failing_job_does_not_fail_its_batch() {
    let (_d, r) = registry("10.240.0.0/16").await;
    let r = Arc::new(r);
    let now = OffsetDateTime::now_utc();
    key(&r, 1, None, now).await;
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

#[tokio::test]
async fn login_tokens_are_single_use_and_expire() {
    let (_d, r) = registry("10.240.0.0/16").await;
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

#[tokio::test]
async fn a_registry_from_another_overlay_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let now = OffsetDateTime::now_utc();
    {
        let r = SqliteRegistry::open(&path, "10.240.0.0/16".parse().unwrap())
            .await
            .unwrap();
        key(&r, 1, None, now).await;
        r.enroll(commit([1; 32], DeviceId::new_random(), 1, now))
            .await
            .unwrap()
            .unwrap();
        r.close().await;
    }
    let err = SqliteRegistry::open(&path, "10.9.0.0/16".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the configured overlay"),
        "{err}"
    );
}

#[tokio::test]
async fn api_tokens_identify_viewers_until_they_expire_or_are_revoked() {
    let (_d, r) = registry("10.240.0.0/16").await;
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

#[tokio::test]
async fn a_version_1_registry_is_migrated_forward_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    // A version-1 registry as a server of that version left it.
    {
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .unwrap();
        sqlx::raw_sql(SCHEMA_V1).execute(&pool).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO meta(key, value) VALUES ('crl_number', '0'); \
             INSERT INTO operators(name, role, fleets, created_at) VALUES ('admin', 'admin', '[]', 0); \
             PRAGMA user_version = 1;",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let r = SqliteRegistry::open(&path, "10.240.0.0/16".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        r.operator("admin").await.unwrap().unwrap().role,
        Role::Admin
    );
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&r.reader)
        .await
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // A registry from a newer server is refused, not misread.
    sqlx::raw_sql("PRAGMA user_version = 99")
        .execute(&r.writer)
        .await
        .unwrap();
    r.close().await;
    let err = SqliteRegistry::open(&path, "10.240.0.0/16".parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this server"), "{err}");
}
