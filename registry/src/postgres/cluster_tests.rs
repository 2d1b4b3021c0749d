//! Leases and sessions on a throwaway PostgreSQL: conditional writes never let a late
//! event undo a newer session, and a dead node's devices turn offline by themselves.

use std::time::Duration;

use floto_pgtest::Postgres;
use floto_proto::devices::{DeviceEvent, DeviceEventKind};
use floto_proto::DeviceId;

use super::PgRegistry;
use crate::cluster::{Cluster, SessionWrite};

async fn registry() -> (Postgres, PgRegistry) {
    let pg = Postgres::start();
    let url = pg.create_database("cluster");
    let r = PgRegistry::connect(&url, "10.240.0.0/16".parse::<ipnet::Ipv4Net>().unwrap())
        .await
        .unwrap();
    (pg, r)
}

fn claim(device: DeviceId, epoch: i64) -> SessionWrite {
    SessionWrite::Claim {
        device,
        epoch,
        endpoint: Some("192.0.2.1:51820".parse().unwrap()),
    }
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_lost_lease_cannot_be_renewed_under_the_same_id() {
    let (_pg, r) = registry().await;
    assert!(r
        .renew_lease("a", "node-a", "127.0.0.1:1", LONG)
        .await
        .unwrap());
    assert!(r
        .renew_lease("a", "node-a", "127.0.0.1:1", LONG)
        .await
        .unwrap());
    assert!(r
        .renew_lease("b", "node-b", "127.0.0.1:2", Duration::from_millis(200))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !r.renew_lease("b", "node-b", "127.0.0.1:2", LONG)
            .await
            .unwrap(),
        "an expired lease came back"
    );
    let nodes = r.nodes().await.unwrap();
    let alive: Vec<(&str, bool)> = nodes.iter().map(|n| (n.id.as_str(), n.alive)).collect();
    assert_eq!(alive, [("a", true), ("b", false)]);
    r.end_lease("a").await.unwrap();
    assert!(r.nodes().await.unwrap().iter().all(|n| !n.alive));
}

#[tokio::test]
async fn a_late_event_from_an_old_node_never_undoes_a_newer_session() {
    let (_pg, r) = registry().await;
    for id in ["a", "b"] {
        r.renew_lease(id, id, "127.0.0.1:1", LONG).await.unwrap();
    }
    let d = DeviceId::new_random();
    r.write_sessions("a", &[claim(d, 100)]).await.unwrap();
    // The device moves to b with a newer session.
    r.write_sessions("b", &[claim(d, 200)]).await.unwrap();
    // a's late claim refresh and its late release change nothing; a is told to let go.
    assert_eq!(r.write_sessions("a", &[claim(d, 100)]).await.unwrap(), [d]);
    r.write_sessions(
        "a",
        &[SessionWrite::Release {
            device: d,
            epoch: 100,
        }],
    )
    .await
    .unwrap();
    let s = r.online_session(&d, LONG).await.unwrap().expect("online");
    assert_eq!((s.node.as_str(), s.epoch), ("b", 200));
    // A release by the holder of another epoch changes nothing either...
    r.write_sessions(
        "b",
        &[SessionWrite::Release {
            device: d,
            epoch: 199,
        }],
    )
    .await
    .unwrap();
    assert!(r.online_session(&d, LONG).await.unwrap().is_some());
    // ...the holder's own release ends it.
    r.write_sessions(
        "b",
        &[SessionWrite::Release {
            device: d,
            epoch: 200,
        }],
    )
    .await
    .unwrap();
    assert!(r.online_session(&d, LONG).await.unwrap().is_none());
}

#[tokio::test]
async fn a_dead_nodes_devices_turn_offline_by_themselves_and_are_orphans() {
    let (_pg, r) = registry().await;
    r.renew_lease("a", "a", "127.0.0.1:1", LONG).await.unwrap();
    r.renew_lease("b", "b", "127.0.0.1:2", Duration::from_millis(300))
        .await
        .unwrap();
    let on_a: Vec<DeviceId> = (0..3).map(|_| DeviceId::new_random()).collect();
    let on_b: Vec<DeviceId> = (0..5).map(|_| DeviceId::new_random()).collect();
    let batch = |ds: &[DeviceId]| ds.iter().map(|d| claim(*d, 1)).collect::<Vec<_>>();
    r.write_sessions("a", &batch(&on_a)).await.unwrap();
    r.write_sessions("b", &batch(&on_b)).await.unwrap();
    assert_eq!(r.online_sessions(LONG).await.unwrap().len(), 8);
    assert!(r.orphaned_sessions().await.unwrap().is_empty());
    // b stops renewing: its devices are offline and orphaned, with no write by anyone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let online = r.online_sessions(LONG).await.unwrap();
    assert_eq!(online.len(), 3);
    assert!(online.iter().all(|s| s.node == "a"));
    let mut orphans: Vec<DeviceId> = r
        .orphaned_sessions()
        .await
        .unwrap()
        .iter()
        .map(|s| s.device)
        .collect();
    orphans.sort_by_key(|d| d.to_string());
    let mut expected = on_b.clone();
    expected.sort_by_key(|d| d.to_string());
    assert_eq!(orphans, expected);
    // A row not refreshed within the window is not online either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(r
        .online_sessions(Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    // Another node takes one over with a newer epoch, and one with the same epoch (the dead
    // node's claim no longer holds): they are no orphans any more.
    r.write_sessions("a", &[claim(on_b[0], 2), claim(on_b[1], 1)])
        .await
        .unwrap();
    assert_eq!(r.orphaned_sessions().await.unwrap().len(), 3);
    let counts: Vec<(String, u64)> = r
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.id, n.sessions))
        .collect();
    assert_eq!(counts, [("a".to_owned(), 5), ("b".to_owned(), 3)]);
    assert_eq!(r.counts(LONG).await.unwrap(), (1, 5));
    // Long-dead nodes are pruned with their rows.
    assert_eq!(r.prune_nodes(Duration::from_millis(100)).await.unwrap(), 1);
    assert!(r.orphaned_sessions().await.unwrap().is_empty());
}

fn event(device: DeviceId, generation: u64, node: &str) -> DeviceEvent {
    DeviceEvent {
        seq: 0,
        uuid: device,
        fleet: "lab".into(),
        kind: DeviceEventKind::Online,
        generation,
        at: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        endpoint: Some("192.0.2.1:51820".into()),
        node: Some(node.into()),
    }
}

/// Two nodes append at once: every event is numbered once, a batch keeps its order, a
/// reader never sees a number before a smaller one, the other node is woken, and pruning
/// keeps the newest.
#[tokio::test]
async fn events_from_every_node_form_one_numbered_stream() {
    let pg = Postgres::start();
    let url = pg.create_database("events");
    let overlay: ipnet::Ipv4Net = "10.240.0.0/16".parse().unwrap();
    let a = PgRegistry::connect(&url, overlay).await.unwrap();
    let b = PgRegistry::connect(&url, overlay).await.unwrap();
    assert_eq!(a.last_event().await.unwrap(), 0);
    let d = DeviceId::new_random();
    let woken = {
        let b = b.clone();
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            b.wait_for_events(Duration::from_secs(10)).await;
            t.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let (r, node) = if i % 2 == 0 {
            (a.clone(), "a")
        } else {
            (b.clone(), "b")
        };
        let batch: Vec<DeviceEvent> = (0..10).map(|j| event(d, i * 10 + j, node)).collect();
        appends.spawn(async move { r.append_events(&batch).await });
    }
    while let Some(r) = appends.join_next().await {
        r.unwrap().unwrap();
    }
    assert!(
        woken.await.unwrap() < Duration::from_secs(5),
        "the other node was not woken"
    );
    let all = b.events_after(0, 1000).await.unwrap();
    assert_eq!(all.len(), 200);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    // A batch's events are consecutive, in the order given.
    for w in all.chunks(10) {
        let g0 = w[0].generation;
        assert_eq!(g0 % 10, 0, "{w:?}");
        assert!(w
            .iter()
            .enumerate()
            .all(|(j, e)| e.generation == g0 + j as u64));
        assert!(w.iter().all(|e| e.node == w[0].node));
    }
    let first = &all[0];
    assert_eq!(
        (first.uuid, first.kind, first.fleet.as_str(), first.at),
        (d, DeviceEventKind::Online, "lab", event(d, 0, "a").at)
    );
    assert_eq!(a.last_event().await.unwrap(), all[199].seq);
    assert_eq!(
        a.events_after(all[189].seq, 1000).await.unwrap(),
        all[190..]
    );
    assert_eq!(a.events_after(all[9].seq, 5).await.unwrap(), all[10..15]);
    assert_eq!(a.prune_events(50).await.unwrap(), 150);
    assert_eq!(a.events_after(0, 1000).await.unwrap(), all[150..]);
}
