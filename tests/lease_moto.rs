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
use elb_quorum::lease::{view_key, Acquired, Kind, LeaseError, PermitStore, Permits, SharedWrite, Write, Written};

const TABLE: &str = "elb-quorum-permits";

async fn setup() -> (Moto, Arc<DynamoStore>) {
    let moto = Moto::start_locked(None);
    moto.permit_table(TABLE);
    let store = Arc::new(DynamoStore::new(&moto.sdk_config().await, TABLE));
    (moto, store)
}

/// D = 8 s (renewed every 2 s), G = 3 s.
fn permits<S: PermitStore + 'static>(store: &Arc<S>, key: &str, me: &str) -> Permits {
    Permits {
        store: store.clone(),
        key: key.into(),
        me: me.into(),
        duration: Duration::from_secs(8),
        grace: Duration::from_secs(3),
        max_hold: Duration::from_secs(3600),
        skew_ms: 0,
        leave_rate: 0.0,
        clock: Default::default(),
    }
}

fn granted(a: Acquired) -> elb_quorum::lease::Permit {
    match a {
        Acquired::Granted(p) => *p,
        Acquired::Refused { holders } => panic!("refused; held by {holders:?}"),
        Acquired::Paced { wait } => panic!("paced ({wait:?}) without a gap"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn acquire_full_exempt_heartbeat_release() {
    let (_moto, store) = setup().await;
    let key = "web.example.com";
    let (a, b) = (permits(&store, key, "i-a"), permits(&store, key, "i-b"));
    let held = granted(a.acquire(Kind::Slot, 1).await.unwrap());
    let r = a.read().await.unwrap();
    assert_eq!((r.ver, held.ver), (2, 2), "the record made (ver 1), then the claim (ver 2)");
    assert!(r.complete);
    assert_eq!(r.holders["i-a"].tok, held.holder.tok);
    assert_eq!(r.holders["i-a"].kind, Kind::Slot);
    match b.acquire(Kind::Slot, 1).await.unwrap() {
        Acquired::Refused { holders } => assert_eq!(holders, vec!["i-a".to_string()]),
        Acquired::Granted(_) | Acquired::Paced { .. } => panic!("one permit, already held"),
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
    assert!(r.ver >= 5, "every write bumps ver (the record made, two claims, two renewals): {}", r.ver);
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
    assert_eq!(r.holders.keys().collect::<Vec<_>>(), ["i-peer"], "the dead entry was removed, by its token");
}

#[tokio::test(flavor = "current_thread")]
async fn a_holder_notices_when_its_entry_is_removed() {
    let (_moto, store) = setup().await;
    let key = "web.example.com";
    let a = permits(&store, key, "i-a");
    let held = granted(a.acquire(Kind::Slot, 1).await.unwrap());
    // An operator's `lease release --instance i-a`: conditional on the token read.
    let tok = a.read().await.unwrap().holders["i-a"].tok.clone();
    assert!(!a.remove("i-a", "not-the-token", Kind::Slot).await.unwrap(), "a stale token removes nothing");
    assert!(a.remove("i-a", &tok, Kind::Slot).await.unwrap());
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

/// The conditions the claim and the shared view rely on, as DynamoDB (here moto) evaluates them:
/// `size(holders) < :limit`, an exemption outside the cap, one entry per instance, the refresh
/// lease, and a publication never replacing one read after a later permit write.
#[tokio::test(flavor = "current_thread")]
async fn claims_are_capped_by_size_and_the_shared_view_is_leased_and_ordered() {
    let (_moto, store) = setup().await;
    let key = "cap.example.com";
    let ps: Vec<Permits> = (0..4).map(|i| permits(&store, key, &format!("i-{i}"))).collect();
    let a = granted(ps[0].acquire(Kind::Slot, 2).await.unwrap());
    let b = granted(ps[1].acquire(Kind::Slot, 2).await.unwrap());
    assert_eq!((a.others.len(), b.others.len()), (0, 1), "each grant counts the holders the store had then");
    // A claim written past a stale read: the store's size condition refuses it.
    let holder = elb_quorum::lease::Holder { tok: "t".into(), exp: u64::MAX / 2, since: 1, kind: Kind::Slot };
    let claim = |id: &str, kind: Kind| Write::Claim {
        id: id.into(),
        holder: elb_quorum::lease::Holder { kind, ..holder.clone() },
        limit: 2,
        pace: None,
    };
    match store.write(key, claim("i-2", Kind::Slot)).await.unwrap() {
        Written::Conflict(Some(r)) => assert_eq!(r.holders.len(), 2, "the record as it was"),
        other => panic!("{other:?}"),
    }
    // An exemption is not capped, but one instance holds one entry.
    assert!(store.write(key, claim("i-2", Kind::Exempt)).await.unwrap().applied());
    assert!(!store.write(key, claim("i-2", Kind::Slot)).await.unwrap().applied());
    assert!(!store.write(key, claim("i-0", Kind::Exempt)).await.unwrap().applied());
    let r = ps[3].read().await.unwrap();
    assert_eq!((r.holders["i-2"].kind, r.holders.len()), (Kind::Exempt, 3));
    // Paced: a claim that begins a window, then one counted in it up to the quota; a claim
    // that read another window is refused.
    let paced = |id: &str, window_start: u64, new_window: bool| Write::Claim {
        id: id.into(),
        holder: elb_quorum::lease::Holder { kind: Kind::Exempt, since: 1000, ..holder.clone() },
        limit: 2,
        pace: Some(elb_quorum::lease::Pace { window_start, new_window, quota: 2 }),
    };
    assert!(store.write(key, paced("i-3", 0, true)).await.unwrap().applied());
    assert!(!store.write(key, paced("i-4", 0, true)).await.unwrap().applied(), "the window was begun already");
    assert!(store.write(key, paced("i-4", 1000, false)).await.unwrap().applied());
    assert!(!store.write(key, paced("i-5", 1000, false)).await.unwrap().applied(), "quota 2 reached");
    let r = ps[3].read().await.unwrap();
    assert_eq!((r.window_start, r.window_grants), (1000, 2));
    // The shared view: one refresh lease at a time; publications ordered by the version read.
    let vk = view_key(key);
    assert!(store.load_shared(&vk).await.unwrap().is_none());
    let now = ps[0].now();
    // Its last holder takes it again as soon as it ends; anyone else only VIEW_HANDOFF later.
    let lease = |me: &str, now: u64, until: u64| SharedWrite::Lease { now, until, me: me.into() };
    let handoff = elb_quorum::lease::VIEW_HANDOFF.as_millis() as u64;
    assert!(store.write_shared(&vk, lease("i-a", now, now + 1000)).await.unwrap());
    assert!(!store.write_shared(&vk, lease("i-a", now + 500, now + 1500)).await.unwrap(), "held");
    assert!(!store.write_shared(&vk, lease("i-b", now + 1001, now + 2000)).await.unwrap(), "the holder's turn");
    assert!(store.write_shared(&vk, lease("i-a", now + 1001, now + 2000)).await.unwrap());
    assert!(!store.write_shared(&vk, lease("i-b", now + 2000 + handoff, now + 3000)).await.unwrap());
    assert!(store.write_shared(&vk, lease("i-b", now + 2001 + handoff, now + 3000)).await.unwrap(), "handed off");
    let publish = |v: u64, d: &str| SharedWrite::Publish { seen_ver: v, at: now, data: d.into() };
    assert!(store.write_shared(&vk, publish(5, "five")).await.unwrap());
    assert!(store.write_shared(&vk, publish(5, "five again")).await.unwrap(), "the same version: a later read");
    assert!(!store.write_shared(&vk, publish(4, "older")).await.unwrap());
    let s = store.load_shared(&vk).await.unwrap().unwrap();
    assert_eq!((s.seen_ver, s.n, s.data.as_str(), s.lease_until), (5, 2, "five again", now + 3000));
    assert_eq!(s.lease_holder, "i-b");
    a.release().await;
    b.release().await;
}

/// `--batch-registrations`' writes as DynamoDB (moto) evaluates them, and the fake store the
/// same way (the fleet model relies on it): asks only by the entry's holder, one live claim at a
/// time, a withdrawal refused while a live claim names the instance, the gap after a batch, and
/// a claim refused after a withdrawal it did not read.
async fn batch_writes(store: Arc<dyn PermitStore>) {
    use elb_quorum::lease::batch::{Way, BATCH_CLAIM};
    let key = "batch.example.com";
    let ps = |me: &str| Permits { store: store.clone(), ..permits_on(key, me) };
    let (a, b, c) = (ps("i-a"), ps("i-b"), ps("i-c"));
    let held_a = granted(a.acquire(Kind::Slot, 2).await.unwrap());
    let held_b = granted(b.acquire(Kind::Slot, 2).await.unwrap());
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<String>>();
    let after = a.ask(&held_a.holder, Way::Out, set(&["t1/i-a@0000000a"])).await.unwrap().expect("a's entry");
    assert_eq!(after.batches.want_out, set(&["t1/i-a@0000000a"]), "the record after the ask");
    assert!(b.ask(&held_b.holder, Way::Out, set(&["t1/i-b:80@0000000a", "t2/i-b@0000000a"])).await.unwrap().is_some());
    assert!(c.ask(&held_a.holder, Way::In, set(&["t1/i-c@0000000a"])).await.unwrap().is_none(), "i-c holds no entry");
    let r = c.read().await.unwrap();
    assert_eq!(r.batches.want_out, set(&["t1/i-a@0000000a", "t1/i-b:80@0000000a", "t2/i-b@0000000a"]));
    assert!(r.batches.want_in.is_empty() && r.batches.claim.is_none());
    let claim = c.take_batch(set(&["i-a", "i-b"]), 0).await.unwrap().expect("no claim yet");
    assert!(c.take_batch(set(&["i-a"]), 0).await.unwrap().is_none(), "one live claim at a time");
    // i-a is named by a live claim: its withdrawal waits (and gives up within a short wait).
    assert!(a.withdraw(Duration::from_secs(1)).await.is_err());
    // The store's own condition, written past the client's check: refused for i-a, not for i-c.
    let stale = c.now() - 3000;
    let withdraw = |id: &str, e: &str| Write::Withdraw { id: id.into(), elems: set(&[e]), stale };
    assert!(!store.write(key, withdraw("i-a", "t1/i-a@0000000a")).await.unwrap().applied());
    assert!(store.write(key, withdraw("i-c", "t1/i-c@0000000a")).await.unwrap().applied());
    let claim_after = c.read().await.unwrap().batches;
    assert_eq!((claim_after.withdrawals, claim_after.want_out.len()), (1, 3), "i-c's withdrawal counted");
    let ended = c.now();
    assert!(c.end_batch(&claim, set(&["t1/i-b:80@0000000a"]), set(&[]), 3).await.unwrap());
    assert!(!c.end_batch(&claim, set(&["t1/i-a@0000000a"]), set(&[]), 1).await.unwrap(), "ended already");
    let r = c.read().await.unwrap();
    assert_eq!(r.batches.want_out, set(&["t1/i-a@0000000a", "t2/i-b@0000000a"]));
    assert!(r.batches.claim.is_none(), "{:?}", r.batches);
    // Three calls: a gap of 3 × 0.5 s before the next batch.
    assert!(r.batches.next >= ended + 1500 && r.batches.next < c.now() + 1500, "{:?}", r.batches);
    // No claim: the withdrawal goes through at once and is counted.
    a.withdraw(Duration::from_secs(1)).await.unwrap();
    let r = c.read().await.unwrap();
    assert_eq!((r.batches.want_out.clone(), r.batches.withdrawals), (set(&["t2/i-b@0000000a"]), 2));
    assert!(b.ask(&held_b.holder, Way::In, set(&["t1/i-b:80@0000000a"])).await.unwrap().is_some());
    // Past the gap, a claim that read the withdrawals before the last one is refused.
    let gap = r.batches.next.saturating_sub(c.now());
    tokio::time::sleep(Duration::from_millis(gap + 1)).await;
    assert!(c.take_batch(set(&["i-b"]), 1).await.unwrap().is_none(), "a withdrawal came since");
    let claim = c.take_batch(set(&["i-b"]), 2).await.unwrap().expect("the gap is over");
    assert!(claim.until >= c.now() + BATCH_CLAIM.as_millis() as u64 - 1000);
    assert!(c.end_batch(&claim, set(&["t2/i-b@0000000a"]), set(&["t1/i-b:80@0000000a"]), 2).await.unwrap());
    let r = c.read().await.unwrap();
    assert!(r.batches.want_out.is_empty() && r.batches.want_in.is_empty(), "{:?}", r.batches);
    held_a.release().await;
    held_b.release().await;
}

fn permits_on(key: &str, me: &str) -> Permits {
    permits(&Arc::new(elb_quorum::fake::FakeStore::new()), key, me)
}

#[tokio::test(flavor = "current_thread")]
async fn batch_writes_in_dynamodb() {
    let (_moto, store) = setup().await;
    batch_writes(store).await;
}

#[tokio::test(flavor = "current_thread")]
async fn batch_writes_in_the_fake_store() {
    batch_writes(Arc::new(elb_quorum::fake::FakeStore::new())).await;
}
