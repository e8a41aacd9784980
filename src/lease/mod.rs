//! Strict mode's leave permits: one shared record per cluster, changed only by conditional writes,
//! so that two instances checking at the same moment cannot both leave. Knows the record, the rules
//! for taking and keeping a permit, and a store behind a trait (`dynamo.rs` for DynamoDB, the fake in
//! `crate::fake`); never the load balancer.
//!
//! The record (one DynamoDB item, hash key `pk` = the cluster's namespace):
//! `ver` (number, bumped by every write) and `holders` = `{instance id → {tok, exp, since, kind}}`,
//! times in Unix milliseconds. `kind` is `slot` (capped at L, the permits) or `exempt` (an instance
//! that serves nothing already; uncapped).
//!
//! - Acquire: consistent read; drop holders with `exp + G < now`; refuse a slot when the other live
//!   slot holders are L or more; else write my entry `IF ver = :v` (a new item: `IF
//!   attribute_not_exists(pk)`). A conflict retries after 10–200 ms of jitter from the record the
//!   failed write returns (`ALL_OLD`). A write whose reply was lost is found by reading my token.
//! - Heartbeat (every D/4) and release change only my own entry, `IF` its token is mine.
//! - A holder trusts its permit until `exp − G` (G covers clock skew between instances); one past
//!   the max hold H stops renewing.

pub mod dynamo;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tracing::{error, info, warn};

use crate::quorum::{decide, Rule, Snapshot, Verdict};

/// A boxed future: the store is used a few times per cycle, so a trait object costs nothing that
/// matters and keeps `Cycle` free of one more type parameter.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Conflicting writes one acquire tolerates before it counts as a failed check.
pub const MAX_CONFLICTS: u32 = 20;

/// What an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A permit to take a serving instance out: at most L at once.
    Slot,
    /// An instance that serves nothing already (out of the load balancer, or its program down):
    /// leaving takes nothing from the cluster, so it is not capped.
    Exempt,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Slot => "slot",
            Kind::Exempt => "exempt",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "slot" => Some(Kind::Slot),
            "exempt" => Some(Kind::Exempt),
            _ => None,
        }
    }
}

/// One holder's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Random per acquire: heartbeat and release are conditional on it.
    pub tok: String,
    /// Expiry, Unix ms.
    pub exp: u64,
    /// When the permit was taken, Unix ms.
    pub since: u64,
    pub kind: Kind,
}

/// The cluster's record as read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Record {
    pub ver: u64,
    pub holders: BTreeMap<String, Holder>,
}

impl Record {
    /// Holders still counted (`exp + grace ≥ now`), expired or not.
    pub fn live(&self, now: u64, grace: Duration) -> impl Iterator<Item = (&String, &Holder)> {
        self.holders.iter().filter(move |(_, h)| h.counts(now, grace))
    }

    /// The live slot holders other than `me`: the permits in use for anyone asking for a slot.
    pub fn other_slots(&self, me: &str, now: u64, grace: Duration) -> Vec<String> {
        self.live(now, grace)
            .filter(|(id, h)| id.as_str() != me && h.kind == Kind::Slot)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl Holder {
    /// Still counted at `now`: not expired for more than `grace`.
    pub fn counts(&self, now: u64, grace: Duration) -> bool {
        self.exp.saturating_add(grace.as_millis() as u64) >= now
    }
}

/// One conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The first entry of a new record: `IF attribute_not_exists(pk)`, `ver = 1`.
    Create { id: String, holder: Holder },
    /// Set my entry and drop expired ones: `IF ver = :ver`, `ver = ver + 1`.
    Put { ver: u64, id: String, holder: Holder, prune: Vec<String> },
    /// Renew an entry's expiry: `IF holders.id.tok = :tok`, `ver = ver + 1`.
    Renew { id: String, tok: String, exp: u64 },
    /// Remove an entry: `IF holders.id.tok = :tok`, `ver = ver + 1`.
    Remove { id: String, tok: String },
}

/// How a conditional write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Applied,
    /// The condition failed; the record as it was, when the store returned it.
    Conflict(Option<Record>),
}

#[derive(Debug, Clone, Error)]
pub enum LeaseError {
    #[error("permit table {table} does not exist: create it (README, \"Strict mode\") or fix --lease-table")]
    NoTable { table: String },
    #[error("permit table {table}: {action} denied ({message}); the role needs dynamodb:GetItem and dynamodb:UpdateItem on it")]
    AccessDenied { table: String, action: &'static str, message: String },
    #[error("no AWS credentials for {action} on permit table {table}: {detail}")]
    Credentials { table: String, action: &'static str, detail: String },
    #[error("permit table {table}: {action} rejected: {code}: {message}")]
    Rejected { table: String, action: &'static str, code: String, message: String },
    #[error("permit table {table}: the record {key} is malformed: {detail}")]
    Malformed { table: String, key: String, detail: String },
    #[error("permit table {table}: {action} throttled")]
    Throttled { table: String, action: &'static str },
    #[error("permit table {table}: {action} failed: {detail}")]
    Unavailable { table: String, action: &'static str, detail: String },
}

impl LeaseError {
    /// Throttling, 5xx, timeouts and contention pass; a missing table or a denial do not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LeaseError::Throttled { .. } | LeaseError::Unavailable { .. })
    }
}

/// Where the record lives.
pub trait PermitStore: Send + Sync {
    /// The table's name, for messages.
    fn table(&self) -> &str;
    /// A consistent read of the record; `None` when there is none yet.
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, LeaseError>>;
    /// One conditional write.
    fn write<'a>(&'a self, key: &'a str, write: Write) -> BoxFuture<'a, Result<Written, LeaseError>>;
}

/// What an acquire should write, or why it may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Write(Write),
    /// Every slot is taken by these (live) holders.
    Refuse {
        holders: Vec<String>,
    },
}

/// The acquire step, pure: from the record read at `now`, my new entry and the limit L.
pub fn plan(record: Option<&Record>, me: &str, holder: Holder, limit: usize, now: u64, grace: Duration) -> Plan {
    let empty = Record::default();
    let current = record.unwrap_or(&empty);
    let slots = current.other_slots(me, now, grace);
    if holder.kind == Kind::Slot && slots.len() >= limit {
        return Plan::Refuse { holders: slots };
    }
    if record.is_none() {
        return Plan::Write(Write::Create { id: me.into(), holder });
    }
    let prune =
        current.holders.iter().filter(|(id, h)| id.as_str() != me && !h.counts(now, grace)).map(|(id, _)| id.clone());
    Plan::Write(Write::Put { ver: current.ver, id: me.into(), holder, prune: prune.collect() })
}

/// The live holders other than `me`: every decision counts them out, InService or not.
pub fn others(record: &Record, me: &str, now: u64, grace: Duration) -> BTreeSet<String> {
    record.live(now, grace).filter(|(id, _)| id.as_str() != me).map(|(id, _)| id.clone()).collect()
}

/// The strict decision: `decide` with every other live holder counted out of service, InService or
/// not (a holder may leave at any moment). Holders outside the members do not change the cluster's size.
pub fn decide_with_holders(mut snapshot: Snapshot, others: &BTreeSet<String>, rule: &Rule) -> Verdict {
    snapshot.serving.retain(|id| !others.contains(id));
    decide(&snapshot, rule)
}

/// A fresh random token.
fn token() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Strict-mode settings of one instance in one cluster.
#[derive(Clone)]
pub struct Permits {
    pub store: Arc<dyn PermitStore>,
    /// The record's key: the cluster's namespace.
    pub key: String,
    /// This instance.
    pub me: String,
    /// D: an entry's lifetime; renewed every D/4.
    pub duration: Duration,
    /// G: expired entries are dropped only `G` after their expiry; a holder trusts its permit only
    /// until `exp − G`.
    pub grace: Duration,
    /// H: a holder stops renewing after holding this long.
    pub max_hold: Duration,
    /// Added to this machine's clock, in ms (tests model a skewed clock with it).
    pub skew_ms: i64,
    /// The wall clock expiry times are computed on: the system clock in production.
    pub clock: crate::clock::WallClock,
}

/// The answer to an acquire.
pub enum Acquired {
    Granted(Box<Permit>),
    Refused { holders: Vec<String> },
}

impl Permits {
    /// This instance's clock, Unix ms.
    pub fn now(&self) -> u64 {
        self.clock.ms().saturating_add_signed(self.skew_ms)
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis() as u64
    }

    /// The record (empty when none exists yet).
    pub async fn read(&self) -> Result<Record, LeaseError> {
        Ok(self.store.load(&self.key).await?.unwrap_or_default())
    }

    /// Takes a permit of `kind` with `limit` slots (L), or says who holds them all.
    pub async fn acquire(&self, kind: Kind, limit: usize) -> Result<Acquired, LeaseError> {
        let tok = token();
        let mut returned: Option<Record> = None;
        let mut conflicts = 0;
        loop {
            let record = match returned.take() {
                Some(r) => Some(r),
                None => self.store.load(&self.key).await?,
            };
            let now = self.now();
            let holder = Holder { tok: tok.clone(), exp: now + Self::ms(self.duration), since: now, kind };
            let write = match plan(record.as_ref(), &self.me, holder.clone(), limit, now, self.grace) {
                Plan::Refuse { holders } => return Ok(Acquired::Refused { holders }),
                Plan::Write(w) => w,
            };
            match self.store.write(&self.key, write).await {
                Ok(Written::Applied) => {
                    let others = record.map(|r| others(&r, &self.me, now, self.grace)).unwrap_or_default();
                    return Ok(Acquired::Granted(Box::new(self.granted(holder, others, conflicts))));
                }
                Ok(Written::Conflict(old)) => {
                    conflicts += 1;
                    if conflicts > MAX_CONFLICTS {
                        return Err(LeaseError::Unavailable {
                            table: self.store.table().into(),
                            action: "acquire",
                            detail: format!("{conflicts} conflicting writes in a row"),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(10..=200))).await;
                    returned = old;
                }
                Err(e) if e.is_retryable() => {
                    // The write may have been applied and only its reply lost: my token tells.
                    return match self.store.load(&self.key).await {
                        Ok(Some(r)) if r.holders.get(&self.me).is_some_and(|h| h.tok == tok) => {
                            warn!(error = %e, "the permit write's reply was lost, but the write was applied");
                            let others = others(&r, &self.me, self.now(), self.grace);
                            Ok(Acquired::Granted(Box::new(self.granted(holder, others, conflicts))))
                        }
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn granted(&self, holder: Holder, others: BTreeSet<String>, conflicts: u32) -> Permit {
        let health = Arc::new(Mutex::new(PermitHealth {
            trusted_until: holder.exp.saturating_sub(Self::ms(self.grace)),
            lost: None,
        }));
        info!(key = %self.key, instance_id = %self.me, kind = holder.kind.as_str(), others = others.len(), conflicts, "permit acquired");
        let heartbeat = tokio::spawn(heartbeat(self.clone(), holder.clone(), health.clone()));
        Permit { holder, others, conflicts, permits: self.clone(), health, heartbeat }
    }

    /// Removes entry `id` if its token is still `tok`. True when removed, false when it was gone or
    /// changed.
    pub async fn remove(&self, id: &str, tok: &str) -> Result<bool, LeaseError> {
        let write = Write::Remove { id: id.into(), tok: tok.into() };
        Ok(self.store.write(&self.key, write).await? == Written::Applied)
    }

    /// Removes this instance's own entry, whatever its token (one left by an earlier run).
    pub async fn remove_mine(&self) -> Result<bool, LeaseError> {
        let record = self.read().await?;
        match record.holders.get(&self.me) {
            Some(h) => self.remove(&self.me, &h.tok).await,
            None => Ok(false),
        }
    }
}

#[derive(Debug)]
struct PermitHealth {
    /// `exp − G` of the last renewal that was applied.
    trusted_until: u64,
    /// Why the permit is lost for good (entry gone or taken over).
    lost: Option<String>,
}

/// A held permit. Renewed in the background until released or dropped.
pub struct Permit {
    pub holder: Holder,
    /// The other live holders when it was granted: counted out of service.
    pub others: BTreeSet<String>,
    /// Conflicting writes before it was granted.
    pub conflicts: u32,
    permits: Permits,
    health: Arc<Mutex<PermitHealth>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Permit {
    pub fn kind(&self) -> Kind {
        self.holder.kind
    }

    /// Why this permit can no longer be trusted, if so: its entry was removed or taken over, or it
    /// was not renewed in time (past `exp − G`).
    pub fn lost(&self) -> Option<String> {
        let h = self.health.lock().unwrap();
        if let Some(why) = &h.lost {
            return Some(why.clone());
        }
        let now = self.permits.now();
        (now > h.trusted_until)
            .then(|| format!("not renewed in time (trusted until {} ms, now {} ms)", h.trusted_until, now))
    }

    /// Stops renewing and removes the entry (a few tries; if they all fail it expires by itself).
    pub async fn release(self) {
        self.heartbeat.abort();
        let mut pause = Duration::from_millis(500);
        for attempt in 1..=4 {
            match self.permits.remove(&self.permits.me, &self.holder.tok).await {
                Ok(true) => {
                    info!(key = %self.permits.key, instance_id = %self.permits.me, "permit released");
                    return;
                }
                Ok(false) => {
                    warn!(key = %self.permits.key, instance_id = %self.permits.me, "permit entry was already gone or taken over");
                    return;
                }
                Err(e) if e.is_retryable() && attempt < 4 => {
                    warn!(error = %e, attempt, "releasing the permit failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => {
                    let exp = self.health.lock().unwrap().trusted_until + Permits::ms(self.permits.grace);
                    error!(error = %e, "releasing the permit failed; the entry expires by itself (exp {exp} ms, dropped {} s later)", self.permits.grace.as_secs());
                    return;
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Renews `holder` every D/4 (sooner after a failed renewal) until the max hold; a conflict means
/// the entry was removed or taken over: the permit is lost.
async fn heartbeat(permits: Permits, holder: Holder, health: Arc<Mutex<PermitHealth>>) {
    let every = permits.duration / 4;
    let mut next = every;
    loop {
        tokio::time::sleep(next).await;
        let now = permits.now();
        if now >= holder.since + Permits::ms(permits.max_hold) {
            error!(key = %permits.key, instance_id = %permits.me, max_hold_s = permits.max_hold.as_secs(), "PERMIT HELD LONGER THAN --max-hold: no longer renewed; it expires and peers may leave");
            return;
        }
        let write =
            Write::Renew { id: permits.me.clone(), tok: holder.tok.clone(), exp: now + Permits::ms(permits.duration) };
        match permits.store.write(&permits.key, write).await {
            Ok(Written::Applied) => {
                health.lock().unwrap().trusted_until =
                    now + Permits::ms(permits.duration.saturating_sub(permits.grace));
                next = every;
            }
            Ok(Written::Conflict(_)) => {
                error!(key = %permits.key, instance_id = %permits.me, "PERMIT LOST: its entry was removed or taken over");
                health.lock().unwrap().lost = Some("its entry was removed or taken over".into());
                return;
            }
            Err(e) => {
                warn!(error = %e, "renewing the permit failed; retrying");
                next = every.min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::{Members, Reason};
    use proptest::prelude::*;

    const D: u64 = 120_000;
    const G: Duration = Duration::from_secs(30);

    fn holder(tok: &str, exp: u64, kind: Kind) -> Holder {
        Holder { tok: tok.into(), exp, since: exp - D, kind }
    }

    fn record(entries: &[(&str, u64, Kind)]) -> Record {
        Record { ver: 7, holders: entries.iter().map(|(id, exp, k)| (id.to_string(), holder(id, *exp, *k))).collect() }
    }

    #[test]
    fn permits_l_for_every_size() {
        // L = max(0, min(m − ceil(q·m), m − min_in_service)), q in ppm.
        for m in 0..200usize {
            for q in [1u32, 250_000, 500_000, 666_667, 750_000, 900_000, 999_999, 1_000_000] {
                for min in [0usize, 1, 2, 5, 250] {
                    let rule = Rule { quorum_ppm: q, min_in_service: min };
                    let required = (m as u128 * q as u128).div_ceil(1_000_000) as i64;
                    let want = 0.max((m as i64 - required).min(m as i64 - min as i64)) as usize;
                    assert_eq!(rule.permits(m), want, "m={m} q={q} min={min}");
                }
            }
        }
        let q75 = Rule { quorum_ppm: 750_000, min_in_service: 1 };
        assert_eq!([4, 6, 8, 12, 100].map(|m| q75.permits(m)), [1, 1, 2, 3, 25]);
        assert_eq!(q75.permits(1), 0, "a lone instance may never leave by slot");
    }

    #[test]
    fn pruning_keeps_entries_within_grace() {
        let now = 1_000_000;
        let r = record(&[
            ("a", now - 30_001, Kind::Slot), // expired more than G ago: dropped
            ("b", now - 30_000, Kind::Slot), // expired exactly G ago: still counted
            ("c", now + 1, Kind::Slot),
            ("d", now - 40_000, Kind::Exempt),
        ]);
        let live: Vec<&String> = r.live(now, G).map(|(id, _)| id).collect();
        assert_eq!(live, ["b", "c"]);
        let mine = holder("t", now + D, Kind::Slot);
        assert_eq!(
            plan(Some(&r), "me", mine.clone(), 3, now, G),
            Plan::Write(Write::Put {
                ver: 7,
                id: "me".into(),
                holder: mine.clone(),
                prune: vec!["a".into(), "d".into()]
            })
        );
        assert_eq!(plan(Some(&r), "me", mine, 2, now, G), Plan::Refuse { holders: vec!["b".into(), "c".into()] });
    }

    #[test]
    fn slots_are_capped_exemptions_are_not_and_my_old_entry_is_replaced() {
        let now = 5_000_000;
        let r = record(&[("a", now + 10, Kind::Slot), ("me", now + 10, Kind::Slot), ("x", now + 10, Kind::Exempt)]);
        let slot = holder("new", now + D, Kind::Slot);
        assert!(
            matches!(plan(Some(&r), "me", slot.clone(), 2, now, G), Plan::Write(Write::Put { ref prune, .. }) if prune.is_empty())
        );
        assert_eq!(plan(Some(&r), "me", slot.clone(), 1, now, G), Plan::Refuse { holders: vec!["a".into()] });
        let exempt = holder("new", now + D, Kind::Exempt);
        assert!(matches!(plan(Some(&r), "me", exempt.clone(), 0, now, G), Plan::Write(Write::Put { .. })));
        assert_eq!(plan(None, "me", slot.clone(), 0, now, G), Plan::Refuse { holders: vec![] });
        assert_eq!(
            plan(None, "me", slot.clone(), 1, now, G),
            Plan::Write(Write::Create { id: "me".into(), holder: slot })
        );
        assert!(matches!(plan(None, "me", exempt, 0, now, G), Plan::Write(Write::Create { .. })));
        assert_eq!(others(&r, "me", now, G), ["a".to_string(), "x".to_string()].into());
    }

    fn ids(r: std::ops::Range<usize>) -> BTreeSet<String> {
        r.map(|i| format!("i-{i}")).collect()
    }

    #[test]
    fn holders_count_out_even_in_service_and_never_grow_the_cluster() {
        let q75 = Rule { quorum_ppm: 750_000, min_in_service: 1 };
        // 6 members, all InService; i-1 holds a permit: i-0 leaving would leave 4 < 5.
        let snap = Snapshot {
            members: Members::Ids(ids(0..6)),
            serving: ids(0..6),
            me: "i-0".into(),
            known_down: false,
            zone: None,
        };
        assert!(decide(&snap, &q75).may_leave, "without holders, quorum holds");
        let v = decide_with_holders(snap.clone(), &ids(1..2), &q75);
        assert_eq!(
            (v.may_leave, v.reason, v.members, v.serving, v.serving_after),
            (false, Reason::BelowQuorum, 6, 5, 4)
        );
        // A holder outside the members (another cluster's stray entry) changes nothing.
        let stray = BTreeSet::from(["i-99".to_string()]);
        assert_eq!(decide_with_holders(snap.clone(), &stray, &q75), decide(&snap, &q75));
        // This instance's own program is down: it may leave whatever others hold.
        let down = Snapshot { known_down: true, ..snap };
        assert!(decide_with_holders(down, &ids(1..3), &q75).may_leave);
    }

    proptest! {
        #[test]
        fn holders_only_ever_make_the_answer_stricter(
            m in 1usize..40,
            serving in proptest::collection::btree_set(0usize..45, 0..45),
            holders in proptest::collection::btree_set(0usize..45, 0..10),
            q in 1u32..=1_000_000,
            min in 0usize..5,
        ) {
            let rule = Rule { quorum_ppm: q, min_in_service: min };
            let name = |i: &usize| format!("i-{i}");
            let snap = Snapshot {
                members: Members::Ids(ids(0..m)),
                serving: serving.iter().map(name).collect(),
                me: "i-0".into(),
                known_down: false,
                zone: None,
            };
            let others: BTreeSet<String> = holders.iter().filter(|i| **i != 0).map(name).collect();
            let plain = decide(&snap, &rule);
            let strict = decide_with_holders(snap, &others, &rule);
            prop_assert_eq!(strict.members, plain.members);
            prop_assert!(strict.serving_after <= plain.serving_after);
            prop_assert!(!strict.may_leave || plain.may_leave);
            let out_members = others.iter().filter(|id| id.as_str() != "i-0" && ids(0..m).contains(*id)).count();
            prop_assert!(strict.serving_after + out_members >= plain.serving_after);
        }
    }
}
