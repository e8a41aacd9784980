//! Strict mode's permit store (`DynamoStore`) through the real SDK against moto's DynamoDB.
//!
//! moto runs serialized (`tests/fixtures/moto_locked.py`): its DynamoDB checks a condition and
//! writes without a lock, so under concurrency two conditional writes can both win (measured: 3
//! winners for 2 permits in 1 of 500 rounds), which real DynamoDB never does per item. The lock
//! makes each call atomic as DynamoDB's are; without it the race test below would be flaky for
//! moto's sake, not ours.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use elb_quorum::lease::dynamo::DynamoStore;
use elb_quorum::lease::{Acquired, Kind, LeaseError, PermitStore, Permits};

const TABLE: &str = "elb-quorum-permits";

async fn setup() -> (Moto, Arc<DynamoStore>) {
    let moto = Moto::start_locked(None);
    moto.permit_table(TABLE);
    let store = Arc::new(DynamoStore::new(&moto.sdk_config().await, TABLE));
    (moto, store)
}

/// D = 8 s (renewed every 2 s), G = 3 s.
fn permits(store: &Arc<DynamoStore>, key: &str, me: &str) -> Permits {
    Permits {
        store: store.clone(),
        key: key.into(),
        me: me.into(),
        duration: Duration::from_secs(8),
        grace: Duration::from_secs(3),
        max_hold: Duration::from_secs(3600),
        skew_ms: 0,
        clock: Default::default(),
    }
}

fn granted(a: Acquired) -> elb_quorum::lease::Permit {
    match a {
        Acquired::Granted(p) => *p,
        Acquired::Refused { holders } => panic!("refused; held by {holders:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn acquire_full_exempt_heartbeat_release() {
    let (_moto, store) = setup().await;
    let key = "web.example.com";
    let (a, b) = (permits(&store, key, "i-a"), permits(&store, key, "i-b"));
    let held = granted(a.acquire(Kind::Slot, 1).await.unwrap());
    let r = a.read().await.unwrap();
    assert_eq!(r.ver, 1);
    assert_eq!(r.holders["i-a"].tok, held.holder.tok);
    assert_eq!(r.holders["i-a"].kind, Kind::Slot);
    match b.acquire(Kind::Slot, 1).await.unwrap() {
        Acquired::Refused { holders } => assert_eq!(holders, vec!["i-a".to_string()]),
        Acquired::Granted(_) => panic!("one permit, already held"),
    }
    let exempt = granted(b.acquire(Kind::Exempt, 1).await.unwrap());
    assert_eq!(exempt.others, ["i-a".to_string()].into(), "the slot holder counts as out");
    let first = a.read().await.unwrap();
    // The heartbeats renew every D/4 (2 s here): wait for both renewals, not for a time.
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let r = a.read().await.unwrap();
            if ["i-a", "i-b"].iter().all(|id| r.holders[*id].exp > first.holders[*id].exp) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("both renewed after D/4");
    assert!(r.ver >= 4, "every write bumps ver (two acquires, two renewals): {}", r.ver);
    assert!(held.lost().is_none());
    held.release().await;
    exempt.release().await;
    assert!(a.read().await.unwrap().holders.is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_entry_is_taken_over_and_pruned() {
    let (_moto, store) = setup().await;
    let key = "web.example.com";
    let dead = granted(permits(&store, key, "i-dead").acquire(Kind::Slot, 1).await.unwrap());
    drop(dead); // kill -9: no renewal, no release
    let peer = permits(&store, key, "i-peer");
    assert!(matches!(peer.acquire(Kind::Slot, 1).await.unwrap(), Acquired::Refused { .. }));
    // The peer's clock 11 s later (> D + G = 11 s after the entry was taken), without waiting.
    let later = Permits { skew_ms: 11_500, ..peer };
    let held = granted(later.acquire(Kind::Slot, 1).await.unwrap());
    assert!(held.others.is_empty());
    let r = later.read().await.unwrap();
    assert_eq!(r.holders.keys().collect::<Vec<_>>(), ["i-peer"], "the dead entry was removed in the same write");
}

#[tokio::test(flavor = "current_thread")]
async fn a_holder_notices_when_its_entry_is_removed() {
    let (_moto, store) = setup().await;
    let key = "web.example.com";
    let a = permits(&store, key, "i-a");
    let held = granted(a.acquire(Kind::Slot, 1).await.unwrap());
    // An operator's `lease release --instance i-a`: conditional on the token read.
    let tok = a.read().await.unwrap().holders["i-a"].tok.clone();
    assert!(!a.remove("i-a", "not-the-token").await.unwrap(), "a stale token removes nothing");
    assert!(a.remove("i-a", &tok).await.unwrap());
    // The next renewal (D/4 = 2 s) finds the token gone; `trusted until` (5 s) is not reached yet.
    let why = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(why) = held.lost() {
                return why;
            }
        }
    })
    .await
    .expect("the heartbeat noticed within 4 s");
    assert!(why.contains("removed or taken over"), "{why}");
    assert!(a.read().await.unwrap().holders.is_empty(), "the failed renewal wrote nothing back");
}

#[tokio::test(flavor = "current_thread")]
async fn a_missing_table_is_a_permanent_error() {
    let (moto, _store) = setup().await;
    let other = DynamoStore::new(&moto.sdk_config().await, "no-such-table");
    match other.load("k").await {
        Err(e @ LeaseError::NoTable { .. }) => assert!(!e.is_retryable()),
        other => panic!("{other:?}"),
    }
}

/// 20 contenders, 2 permits, 50 rounds (a fresh record each round): exactly 2 winners every round.
#[tokio::test(flavor = "current_thread")]
async fn twenty_contenders_two_permits_fifty_rounds() {
    let (_moto, store) = setup().await;
    let start = std::time::Instant::now();
    for round in 0..50 {
        let key = format!("race-{round}.example.com");
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let p = permits(&store, &key, &format!("i-{i:02}"));
                tokio::spawn(async move { p.acquire(Kind::Slot, 2).await })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            if let Acquired::Granted(p) = t.await.unwrap().unwrap() {
                winners.push(p);
            }
        }
        assert_eq!(winners.len(), 2, "round {round}");
        let r = winners[0].others.len() + winners[1].others.len();
        assert!(r <= 1, "round {round}: each winner saw at most the other");
        let holders = permits(&store, &key, "x").read().await.unwrap().holders;
        assert_eq!(holders.len(), 2, "round {round}: the record holds exactly the winners");
    }
    eprintln!("50 rounds in {:.1} s", start.elapsed().as_secs_f64());
}
