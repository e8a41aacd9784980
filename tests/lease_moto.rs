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
use elb_quorum::lease::{
    head_key, view_key, Acquired, Kind, LeaseError, PermitStore, Permits, Record, SharedWrite, Write, Written,
};

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
        seen_shards: Default::default(),
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
    let held = granted(a.acquire(Kind::Slot, 1, None).await.unwrap());
    let r = a.read().await.unwrap();
    assert_eq!((r.ver, held.after.ver), (2, 2), "the record made (ver 1), then the claim (ver 2)");
    assert!(r.complete);
    assert_eq!(r.holders["i-a"].tok, held.holder.tok);
    assert_eq!(r.holders["i-a"].kind, Kind::Slot);
    match b.acquire(Kind::Slot, 1, None).await.unwrap() {
        Acquired::Refused { holders } => assert_eq!(holders, vec!["i-a".to_string()]),
        Acquired::Granted(_) | Acquired::Paced { .. } => panic!("one permit, already held"),
    }
    let exempt = granted(b.acquire(Kind::Exempt, 1, None).await.unwrap());
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
    let dead = granted(permits(&store, key, "i-dead").acquire(Kind::Slot, 1, None).await.unwrap());
    drop(dead); // kill -9: no renewal, no release
    let peer = permits(&store, key, "i-peer");
    assert!(matches!(peer.acquire(Kind::Slot, 1, None).await.unwrap(), Acquired::Refused { .. }));
    // The peer's clock 11 s later (> D + G = 11 s after the entry was taken), without waiting.
    let later = Permits { skew_ms: 11_500, ..peer };
    let held = granted(later.acquire(Kind::Slot, 1, None).await.unwrap());
    assert!(held.others.is_empty());
    let r = later.read().await.unwrap();
    assert_eq!(r.holders.keys().collect::<Vec<_>>(), ["i-peer"], "the dead entry was removed, by its token");
}

#[tokio::test(flavor = "current_thread")]
async fn a_holder_notices_when_its_entry_is_removed() {
    let (_moto, store) = setup().await;
    let key = "web.example.com";
    let a = permits(&store, key, "i-a");
    let held = granted(a.acquire(Kind::Slot, 1, None).await.unwrap());
    // An operator's `lease release --instance i-a`: conditional on the token read.
    let tok = a.read().await.unwrap().holders["i-a"].tok.clone();
    assert!(!a.remove(0, "i-a", "not-the-token", Kind::Slot).await.unwrap(), "a stale token removes nothing");
    assert!(a.remove(0, "i-a", &tok, Kind::Slot).await.unwrap());
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
                tokio::spawn(async move { p.acquire(Kind::Slot, 2, None).await })
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
    let a = granted(ps[0].acquire(Kind::Slot, 2, None).await.unwrap());
    let b = granted(ps[1].acquire(Kind::Slot, 2, None).await.unwrap());
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
    let publish = |v: u64, d: &str| SharedWrite::Publish { seen_ver: v, seen: Vec::new(), at: now, data: d.into() };
    assert!(store.write_shared(&vk, publish(5, "five")).await.unwrap());
    assert!(store.write_shared(&vk, publish(5, "five again")).await.unwrap(), "the same version: a later read");
    assert!(!store.write_shared(&vk, publish(4, "older")).await.unwrap());
    let s = store.load_shared(&vk).await.unwrap().unwrap();
    assert_eq!((s.seen_ver, s.n, s.data.as_str(), s.lease_until), (5, 2, "five again", now + 3000));
    assert_eq!(s.lease_holder, "i-b");
    // The head: the lease beside a copy of a publication's numbers, which never goes back.
    let hk = head_key(key);
    let head = |n: u64, v: u64| SharedWrite::Head { n, seen_ver: v, seen: vec![v - 1, 1], at: now + n };
    assert!(store.write_shared(&hk, lease("i-a", now, now + 1000)).await.unwrap());
    assert!(store.write_shared(&hk, head(2, 5)).await.unwrap());
    assert!(!store.write_shared(&hk, head(2, 6)).await.unwrap(), "the same publication");
    assert!(!store.write_shared(&hk, head(1, 4)).await.unwrap(), "never back");
    assert!(store.write_shared(&hk, head(3, 7)).await.unwrap());
    let h = store.load_shared(&hk).await.unwrap().unwrap();
    assert_eq!((h.n, h.seen_ver, h.seen.clone(), h.at, h.data.as_str()), (3, 7, vec![6, 1], now + 3, ""));
    assert_eq!((h.lease_holder.as_str(), h.lease_until), ("i-a", now + 1000), "the lease kept beside it");
    assert!(!store.write_shared(&hk, lease("i-b", now + 500, now + 1500)).await.unwrap(), "held");
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
    let held_a = granted(a.acquire(Kind::Slot, 2, None).await.unwrap());
    let held_b = granted(b.acquire(Kind::Slot, 2, None).await.unwrap());
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<String>>();
    let after = a.ask(0, &held_a.holder, Way::Out, set(&["t1/i-a@0000000a"])).await.unwrap().expect("a's entry");
    assert_eq!(after.batches.want_out, set(&["t1/i-a@0000000a"]), "the record after the ask");
    assert!(b
        .ask(0, &held_b.holder, Way::Out, set(&["t1/i-b:80@0000000a", "t2/i-b@0000000a"]))
        .await
        .unwrap()
        .is_some());
    assert!(
        c.ask(0, &held_a.holder, Way::In, set(&["t1/i-c@0000000a"])).await.unwrap().is_none(),
        "i-c holds no entry"
    );
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
    assert!(c.end_batch(&Record::default(), &claim, set(&["t1/i-b:80@0000000a"]), set(&[]), 3).await.unwrap());
    assert!(
        !c.end_batch(&Record::default(), &claim, set(&["t1/i-a@0000000a"]), set(&[]), 1).await.unwrap(),
        "ended already"
    );
    let r = c.read().await.unwrap();
    assert_eq!(r.batches.want_out, set(&["t1/i-a@0000000a", "t2/i-b@0000000a"]));
    assert!(r.batches.claim.is_none(), "{:?}", r.batches);
    // Three calls: a gap of 3 × 0.5 s before the next batch.
    assert!(r.batches.next >= ended + 1500 && r.batches.next < c.now() + 1500, "{:?}", r.batches);
    // No claim: the withdrawal goes through at once and is counted.
    a.withdraw(Duration::from_secs(1)).await.unwrap();
    let r = c.read().await.unwrap();
    assert_eq!((r.batches.want_out.clone(), r.batches.withdrawals), (set(&["t2/i-b@0000000a"]), 2));
    assert!(b.ask(0, &held_b.holder, Way::In, set(&["t1/i-b:80@0000000a"])).await.unwrap().is_some());
    // Past the gap, a claim that read the withdrawals before the last one is refused.
    let gap = r.batches.next.saturating_sub(c.now());
    tokio::time::sleep(Duration::from_millis(gap + 1)).await;
    assert!(c.take_batch(set(&["i-b"]), 1).await.unwrap().is_none(), "a withdrawal came since");
    let claim = c.take_batch(set(&["i-b"]), 2).await.unwrap().expect("the gap is over");
    assert!(claim.until >= c.now() + BATCH_CLAIM.as_millis() as u64 - 1000);
    assert!(c
        .end_batch(&Record::default(), &claim, set(&["t2/i-b@0000000a"]), set(&["t1/i-b:80@0000000a"]), 2)
        .await
        .unwrap());
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

/// The record spread over shards (a cluster of more than `SLOTS_PER_SHARD` permits and no pace),
/// as DynamoDB (moto) evaluates its writes, and the fake store the same way: `np` only grows, a
/// slot goes to the claimant's home shard and is renewed and released there, asks are made in it,
/// `Forget` removes elements from a shard and a withdrawal with none left in shard 0 is still
/// counted there, and a view's per-shard versions read back.
async fn shard_writes(store: Arc<dyn PermitStore>) {
    use elb_quorum::lease::batch::Way;
    use elb_quorum::lease::{shard_key, shards_for, After};
    let key = "big.example.com";
    let ps = |me: &str| Permits { store: store.clone(), ..permits_on(key, me) };
    let (limit, members) = (60, 240);
    assert_eq!(shards_for(limit, 0.0), 3);
    let (a, b) = (ps("i-a"), ps("i-b"));
    let held_a = granted(a.acquire(Kind::Slot, limit, Some((0, members))).await.unwrap());
    let held_b = granted(b.acquire(Kind::Slot, limit, Some((239, members))).await.unwrap());
    assert_eq!((held_a.after.shard, held_b.after.shard), (1, 2));
    let r = a.read().await.unwrap();
    assert_eq!((r.shards, r.vers.len(), r.holders.len()), (3, 3, 2));
    assert_eq!((r.shard("i-a"), r.shard("i-b")), (1, 2));
    let first = store.load(key).await.unwrap().unwrap();
    assert!(first.holders.is_empty(), "shard 0 holds no slot once spread");
    assert_eq!(first.shards, 3);
    assert!(!store.write(key, Write::Shards { n: 2 }).await.unwrap().applied(), "never fewer shards");
    assert!(!store.write(key, Write::Shards { n: 3 }).await.unwrap().applied());
    let touched = held_a.toucher().touch().await.unwrap();
    assert_eq!(touched.shard, 1);
    assert_eq!(touched.ver, store.load(&shard_key(key, 1)).await.unwrap().unwrap().ver);
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<String>>();
    assert!(a.ask(1, &held_a.holder, Way::Out, set(&["t1/i-a@0000000a"])).await.unwrap().is_some());
    assert!(a.ask(2, &held_a.holder, Way::Out, set(&["t1/i-a@0000000b"])).await.unwrap().is_none(), "not its shard");
    assert!(b.ask(2, &held_b.holder, Way::In, set(&["t1/i-b@0000000a"])).await.unwrap().is_some());
    let r = a.read().await.unwrap();
    assert_eq!(
        (r.batches.want_out.clone(), r.batches.want_in.clone()),
        (set(&["t1/i-a@0000000a"]), set(&["t1/i-b@0000000a"]))
    );
    assert!(store
        .write(&shard_key(key, 2), Write::Forget { elems: set(&["t1/i-b@0000000a"]) })
        .await
        .unwrap()
        .applied());
    a.withdraw(Duration::from_secs(1)).await.unwrap();
    let r = a.read().await.unwrap();
    assert!(r.batches.want_out.is_empty() && r.batches.want_in.is_empty(), "{:?}", r.batches);
    assert_eq!(r.batches.withdrawals, 1, "counted in shard 0 though its element was in shard 1");
    // A view read after both shards' writes, and one read before b's grant.
    let vk = view_key(key);
    let now = a.now();
    let vers = r.vers.clone();
    assert!(a.publish_view(&vers, now, "v".into(), 1).await.unwrap());
    let s = store.load_shared(&vk).await.unwrap().unwrap();
    assert_eq!((s.seen.clone(), s.seen_ver), (vers.clone(), vers.iter().sum::<u64>()));
    assert!(s.read_after(held_b.after) && s.read_after(touched));
    assert!(!s.read_after(After { shard: 2, ver: vers[2] + 1 }));
    // Its head names it with the same versions, and no view.
    let h = a.head().await.unwrap().unwrap();
    assert_eq!((h.n, h.seen.clone(), h.seen_ver, h.data.as_str()), (1, vers.clone(), s.seen_ver, ""));
    assert!(h.read_after(held_b.after) && h.read_after(touched));
    let older: Vec<u64> = vers.iter().map(|v| v - 1).collect();
    assert!(!a.publish_view(&older, now, "older".into(), 2).await.unwrap(), "an earlier read never replaces it");
    assert_eq!(a.head().await.unwrap().unwrap().n, 1, "nor its head");
    held_a.release().await;
    held_b.release().await;
    let r = a.read().await.unwrap();
    assert!(r.holders.is_empty(), "released in their shards");
}

#[tokio::test(flavor = "current_thread")]
async fn shard_writes_in_dynamodb() {
    let (moto, store) = setup().await;
    shard_writes(store).await;
    // `np` lives in an entry of `exempt` with no token: a version that knows no shards reads the
    // record as malformed and fails closed, rather than count shard 0's holders alone.
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config().await);
    let item = client
        .get_item()
        .table_name(TABLE)
        .key("pk", aws_sdk_dynamodb::types::AttributeValue::S("big.example.com".into()))
        .send()
        .await
        .unwrap()
        .item
        .expect("shard 0");
    let entry = item["exempt"].as_m().unwrap()[elb_quorum::lease::dynamo::SHARDS_ENTRY].as_m().unwrap();
    assert_eq!(entry["n"].as_n().unwrap(), "3");
    assert!(!entry.contains_key("tok"), "{entry:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn shard_writes_in_the_fake_store() {
    shard_writes(Arc::new(elb_quorum::fake::FakeStore::new())).await;
}
