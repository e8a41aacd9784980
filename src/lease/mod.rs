//! Strict mode's leave permits: one shared record per cluster, changed only by conditional writes,
//! so that two instances checking at the same moment cannot both leave. Knows the record, the rules
//! for taking and keeping a permit, the shared view of the cluster that holders read instead of
//! the load balancer, and a store behind a trait (`dynamo.rs` for DynamoDB, the fake in
//! `crate::fake`); never the load balancer itself.
//!
//! The record (one DynamoDB item, hash key `pk` = the cluster's namespace): `ver` (number, bumped
//! by every write), `holders` = `{instance id → {tok, exp, since}}` (slots, at most L) and `exempt`
//! (the same, for instances that serve nothing already; uncapped), the pace's window (`ws`, `wn`,
//! `wq`, `wqs`) and `--batch-registrations`' sets and claim (`wo`, `wi`, `bt`, `bu`, `bi`, `bn`,
//! `wd`: `batch.rs`), times in Unix milliseconds.
//!
//! - Acquire: read; remove expired entries (`exp + G < now`) and an entry of my own from an earlier
//!   run, each `IF` its token; refuse a slot when the other live slots are L or more; else add my
//!   entry `IF size(holders) < :L` (a slot) and no entry of mine exists. A thousand contenders do
//!   not serialize on one version number: every claim that fits is applied, a claim that no longer
//!   fits fails and reads as full. The write returns the record after it (`ALL_NEW`): the other
//!   holders are those the store held at my grant (the strict check then counts out those of a
//!   read made after its view: `Cycle::strict_check`). A write whose reply was lost is found by
//!   reading my token.
//! - Heartbeat (every D/4) and release change only my own entry, `IF` its token is mine.
//! - A holder trusts its permit until `exp − G` (G covers clock skew between instances); one past
//!   the max hold H stops renewing.
//! - The shared view (a second item, `pk` = namespace + `#view`): members, every attachment's
//!   targets and timings as one instance read them, `sv` = the record's `ver` it read just before,
//!   `n` = publications so far, `at` its clock. A holder needs a view with `sv` ≥ the version of
//!   its own last write (its grant, or a touch after registering): that view was read after the
//!   write, so after what the write followed. One instance refreshes at a time, at most once per
//!   `cycle::view::VIEW_REFRESH` per attachment (a short lease in the same item, kept by its last
//!   holder while it refreshes on time: `VIEW_HANDOFF`), so the load balancer and EC2 see about
//!   two reads per second whatever the fleet's size.

pub mod batch;
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
    /// Every entry, slots and exemptions (`Holder::kind` says which map it is stored in).
    pub holders: BTreeMap<String, Holder>,
    /// Both maps exist (a claim can add to them).
    #[serde(skip)]
    pub complete: bool,
    /// The pacing of `--leave-rate`: when the current window of `PACE_WINDOW` began (Unix ms on
    /// the clock of the instance that began it; 0: never), the permits granted in it, and its
    /// quota as the claim that began it set it (`None`: a record without one, or a quota set for
    /// another window, as a version before the burst leaves it: `pace_steady` is used).
    pub window_start: u64,
    pub window_grants: u32,
    pub window_quota: Option<u32>,
    /// `--batch-registrations`: targets asking to be taken out or put back, and the batch claim.
    pub batches: batch::Batches,
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

/// One conditional write. Every applied write bumps `ver` and returns the record after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Makes the record and its two maps exist (`SET holders = if_not_exists(holders, {})`, the
    /// same for `exempt` and `ver`); unconditional, so it changes nothing when they exist already.
    Init,
    /// Adds my entry, a slot or an exemption by `holder.kind`: `IF` no entry of mine exists and,
    /// for a slot, `size(holders) < :limit`; paced, it also counts the grant in the window.
    Claim { id: String, holder: Holder, limit: usize, pace: Option<Pace> },
    /// Renews an entry's expiry: `IF holders.id.tok = :tok` (or `exempt.id.tok`).
    Renew { id: String, tok: String, exp: u64, kind: Kind },
    /// Removes an entry: `IF holders.id.tok = :tok` (or `exempt.id.tok`).
    Remove { id: String, tok: String, kind: Kind },
    /// Asks the batches (`batch.rs`) to take `elems` out (`ADD wo :elems`) or put them back (`ADD
    /// wi`): `IF` my entry's token is `tok`.
    Ask { id: String, tok: String, kind: Kind, way: batch::Way, elems: BTreeSet<String> },
    /// Removes `elems` (mine) from both sets and counts a withdrawal (`wd`): `IF` no claim naming
    /// `id` is live (`attribute_not_exists(bt) OR bu < :stale OR NOT contains(bi, :id)`).
    Withdraw { id: String, elems: BTreeSet<String>, stale: u64 },
    /// Takes the batch claim: `IF` none is live (`bu < :stale`), the gap is over (`bn <= :now`)
    /// and no withdrawal came since the batcher's read (`wd = :withdrawals`).
    TakeBatch { claim: batch::Claim, now: u64, stale: u64, withdrawals: u64 },
    /// Ends claim `tok`: removes the elements done from `wo` and `wi`, `bn = :next`: `IF bt = :tok`.
    EndBatch { tok: String, out: BTreeSet<String>, back: BTreeSet<String>, next: u64 },
}

/// Strict mode's pacing window: permits are counted in windows of this length, each with the
/// quota the claim that began it set: `rate` × this many (`pace_steady`), or the burst when the
/// last window began at least `PACE_BURST` earlier. Short windows keep each bunch of
/// deregistrations (and the registrations that follow them a cycle later) within the account's
/// registration bucket (20 tokens) at the default rate; the burst lets a wave of L = 25 go
/// together in a fleet of a hundred at the default rate. No stretch of T seconds grants more than
/// the burst plus `rate` × (T + the window).
pub const PACE_WINDOW: Duration = Duration::from_secs(10);
/// The pace's burst, in seconds of `--leave-rate`: a window begun this long or longer after the
/// last one may grant `rate` × this many permits.
pub const PACE_BURST: Duration = Duration::from_secs(15);

/// The most permits a cluster without a pace (`--leave-rate 0`) is measured to hold while its
/// record's writes stay within one DynamoDB item's capacity (about 1,000 write units a second; each
/// write costs the record's size, which grows with its holders): 50 (K = 200 in the fleet bench:
/// 602 write units in the busiest second, 704 batched), not 75 (K = 300: 1,228). Beyond it
/// DynamoDB throttles some writes, which strict mode counts as failed checks (slower, never
/// unsafe); `record_beyond_item` says when to warn.
pub const PERMITS_WITHIN_ITEM: usize = 50;

/// The fastest pace measured to keep the record within one item however many permits: the
/// default (K = 1,000: 502 write units, 710 batched), not 3 (1,408 batched) nor 4 (2,395 batched).
pub const PACE_WITHIN_ITEM: f64 = 2.0;

/// Whether a cluster of `permits` slots at `leave_rate` (0: no pace) may make more record writes
/// than one item takes: more than `PERMITS_WITHIN_ITEM` permits, with no pace or one above
/// `PACE_WITHIN_ITEM`.
pub fn record_beyond_item(leave_rate: f64, permits: usize) -> bool {
    permits > PERMITS_WITHIN_ITEM && (leave_rate == 0.0 || leave_rate > PACE_WITHIN_ITEM)
}

/// How a paced claim counts itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    /// The window the claim read (`ws`; 0: none yet).
    pub window_start: u64,
    /// Begin a new window at the claim's time (`SET ws = :now, wn = 1, wq = :quota, wqs = :now IF
    /// ws = :ws`), the read one being over; else count in it (`SET wn = wn + 1 IF ws = :ws AND wn
    /// < :quota`).
    pub new_window: bool,
    /// The window's quota: the one the claim begins, or the one it counts in.
    pub quota: u32,
}

/// The most permits the pace grants at once at `rate` per second (at least one).
pub fn pace_burst(rate: f64) -> u32 {
    ((rate * PACE_BURST.as_secs_f64()).floor() as u32).max(1)
}

/// A window's quota when the pace is busy, or when the record does not say (at least one; below
/// one per window, windows are `1 / rate` apart instead: `Record::pace_opens`).
pub fn pace_steady(rate: f64) -> u32 {
    ((rate * PACE_WINDOW.as_secs_f64()).floor() as u32).max(1)
}

impl Record {
    /// A window began and is not over at `now`.
    pub fn in_window(&self, now: u64) -> bool {
        self.window_start != 0 && now < self.window_start.saturating_add(PACE_WINDOW.as_millis() as u64)
    }

    /// The current window's quota (`pace_steady` when the record does not say).
    pub fn quota(&self, rate: f64) -> u32 {
        self.window_quota.unwrap_or_else(|| pace_steady(rate))
    }

    /// The quota of a window begun at `now` (once `pace_opens` allows): the burst for the first
    /// window and after a pause of `PACE_BURST`, else `pace_steady`.
    pub fn next_quota(&self, rate: f64, now: u64) -> u32 {
        let paused = now.saturating_sub(self.window_start) >= PACE_BURST.as_millis() as u64;
        if self.window_start == 0 || paused {
            pace_burst(rate)
        } else {
            pace_steady(rate)
        }
    }

    /// When a claim may begin the next window: once the current one is over, and at least
    /// `1 / rate` seconds after it began.
    pub fn pace_opens(&self, rate: f64) -> u64 {
        let gap = PACE_WINDOW.as_secs_f64().max(1.0 / rate);
        self.window_start.saturating_add((gap * 1000.0).ceil() as u64)
    }
}

/// How a conditional write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Applied; the record after the write.
    Applied(Record),
    /// The condition failed; the record as it was, when the store returned it.
    Conflict(Option<Record>),
}

impl Written {
    pub fn applied(&self) -> bool {
        matches!(self, Written::Applied(_))
    }
}

#[derive(Debug, Clone, Error)]
pub enum LeaseError {
    #[error("permit table {table} does not exist: create it (README, \"Strict mode\") or fix --lease-table")]
    NoTable { table: String },
    #[error("permit table {table}: {action} denied ({message}); the role needs dynamodb:GetItem and dynamodb:UpdateItem on it, for the cluster's key and the same key + \"#view\" (README, \"Strict mode\")")]
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

/// The shared view's item as stored: what one instance read, and the refresh lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shared {
    /// The permit record's `ver` read just before the view was read (0: never published).
    pub seen_ver: u64,
    /// Publications so far: a poller waits for a higher number to see a newer read.
    pub n: u64,
    /// When it was read, Unix ms on the reader's clock (for its age only).
    pub at: u64,
    /// The view itself (`crate::cycle::view`'s encoding).
    pub data: String,
    /// No other instance refreshes before this (Unix ms, on the taker's clock).
    pub lease_until: u64,
    /// Who took the refresh lease last (`lh`): it may take it again as soon as it ends, everyone
    /// else only `VIEW_HANDOFF` later (empty: nobody yet).
    pub lease_holder: String,
}

/// The refresh lease's last holder keeps it as long as it refreshes on time: another instance
/// takes it only this long after it ended, so that the fleet's pollers, which all see it end at
/// the same moment, do not all try to take it (each try is a write the table charges for).
pub const VIEW_HANDOFF: Duration = Duration::from_millis(250);

impl Shared {
    /// Whether `me` may take the refresh lease at `now`: its last holder once it ended, anyone
    /// else `VIEW_HANDOFF` later (the table's condition on `SharedWrite::Lease`).
    pub fn lease_free(&self, me: &str, now: u64) -> bool {
        let handoff = if self.lease_holder == me { 0 } else { VIEW_HANDOFF.as_millis() as u64 };
        self.lease_until.saturating_add(handoff) < now
    }
}

/// One write to the shared view's item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedWrite {
    /// Take the refresh: `SET lu = :until, lh = :me IF attribute_not_exists(lu) OR lu < :open OR
    /// (lu < :now AND lh = :me)`, `open` = `now − VIEW_HANDOFF`.
    Lease { now: u64, until: u64, me: String },
    /// Publish a view: `SET sv, at, d, n = n + 1 IF attribute_not_exists(sv) OR sv <= :sv` (never
    /// replaces a view read after a later permit write).
    Publish { seen_ver: u64, at: u64, data: String },
}

/// Where the record lives.
pub trait PermitStore: Send + Sync {
    /// The table's name, for messages.
    fn table(&self) -> &str;
    /// A consistent read of the record; `None` when there is none yet.
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, LeaseError>>;
    /// One conditional write.
    fn write<'a>(&'a self, key: &'a str, write: Write) -> BoxFuture<'a, Result<Written, LeaseError>>;
    /// A read of the shared view's item (eventually consistent is enough: a reader checks `sv`).
    fn load_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Shared>, LeaseError>>;
    /// One conditional write to the shared view's item: true when applied.
    fn write_shared<'a>(&'a self, key: &'a str, write: SharedWrite) -> BoxFuture<'a, Result<bool, LeaseError>>;
}

/// The shared view's key for the record `key`.
pub fn view_key(key: &str) -> String {
    format!("{key}#view")
}

/// What an acquire does next, from the record it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The record or one of its maps does not exist yet.
    Init,
    /// Remove these entries first (expired, or mine from an earlier run), each if its token is
    /// still the one read.
    Remove(Vec<Write>),
    /// Claim my entry.
    Claim(Write),
    /// Every slot is taken by these (live) holders.
    Refuse { holders: Vec<String> },
    /// Another permit was granted less than the pacing gap ago: not before this time (Unix ms).
    Paced { until: u64 },
}

/// The acquire step, pure: from the record read at `now`, my new entry, the limit L and the
/// pacing rate (`--leave-rate`; 0: unpaced).
pub fn plan(
    record: Option<&Record>,
    me: &str,
    holder: Holder,
    limit: usize,
    now: u64,
    grace: Duration,
    rate: f64,
) -> Plan {
    let Some(current) = record.filter(|r| r.complete) else {
        if holder.kind == Kind::Slot && limit == 0 {
            return Plan::Refuse { holders: Vec::new() };
        }
        return Plan::Init;
    };
    let removals: Vec<Write> = current
        .holders
        .iter()
        .filter(|(id, h)| id.as_str() == me || !h.counts(now, grace))
        .map(|(id, h)| Write::Remove { id: id.clone(), tok: h.tok.clone(), kind: h.kind })
        .collect();
    let slots = current.other_slots(me, now, grace);
    if holder.kind == Kind::Slot && slots.len() >= limit {
        return Plan::Refuse { holders: slots };
    }
    if !removals.is_empty() {
        return Plan::Remove(removals);
    }
    let pace = if rate > 0.0 {
        let (start, opens, quota) = (current.window_start, current.pace_opens(rate), current.quota(rate));
        if current.in_window(now) && current.window_grants < quota {
            Some(Pace { window_start: start, new_window: false, quota })
        } else if start == 0 || now >= opens {
            Some(Pace { window_start: start, new_window: true, quota: current.next_quota(rate, now) })
        } else {
            return Plan::Paced { until: opens };
        }
    } else {
        None
    };
    Plan::Claim(Write::Claim { id: me.into(), holder, limit, pace })
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
pub(crate) fn token() -> String {
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
    /// Permits granted per second across the cluster, in windows of `PACE_WINDOW`
    /// (`--leave-rate`); 0: unpaced.
    pub leave_rate: f64,
    /// The wall clock expiry times are computed on: the system clock in production.
    pub clock: crate::clock::WallClock,
}

/// The answer to an acquire.
pub enum Acquired {
    Granted(Box<Permit>),
    Refused {
        holders: Vec<String>,
    },
    /// Another permit was granted less than the pacing gap ago: ask again after `wait`.
    Paced {
        wait: Duration,
    },
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
        let mut known: Option<Option<Record>> = None;
        let (mut conflicts, mut rounds) = (0, 0);
        loop {
            let record = match known.take() {
                Some(r) => r,
                None => self.store.load(&self.key).await?,
            };
            let now = self.now();
            let holder = Holder { tok: tok.clone(), exp: now + Self::ms(self.duration), since: now, kind };
            let write = match plan(record.as_ref(), &self.me, holder.clone(), limit, now, self.grace, self.leave_rate) {
                Plan::Refuse { holders } => return Ok(Acquired::Refused { holders }),
                Plan::Paced { until } => return Ok(Acquired::Paced { wait: Duration::from_millis(until - now) }),
                Plan::Init => {
                    if let Written::Applied(r) = self.store.write(&self.key, Write::Init).await? {
                        known = Some(Some(r));
                    }
                    continue;
                }
                Plan::Remove(removals) => {
                    // Expired entries, or mine from an earlier run: each removed if unchanged, then
                    // the record is read again.
                    for w in removals {
                        self.store.write(&self.key, w).await?;
                    }
                    rounds += 1;
                    if rounds > MAX_CONFLICTS {
                        return Err(self.too_many(rounds));
                    }
                    continue;
                }
                Plan::Claim(w) => w,
            };
            match self.store.write(&self.key, write).await {
                Ok(Written::Applied(after)) => {
                    let others = others(&after, &self.me, now, self.grace);
                    return Ok(Acquired::Granted(Box::new(self.granted(holder, others, conflicts, after.ver))));
                }
                Ok(Written::Conflict(old)) => {
                    // Full by now, or an entry of mine appeared (a lost reply): the next round
                    // tells which, from the record the store returned.
                    conflicts += 1;
                    if conflicts > MAX_CONFLICTS {
                        return Err(self.too_many(conflicts));
                    }
                    if let Some(r) = old.as_ref().and_then(|r| r.holders.get(&self.me)) {
                        if r.tok == tok {
                            let r = old.expect("checked");
                            let others = others(&r, &self.me, self.now(), self.grace);
                            return Ok(Acquired::Granted(Box::new(self.granted(holder, others, conflicts, r.ver))));
                        }
                    }
                    known = old.map(Some);
                }
                Err(e) if e.is_retryable() => {
                    // The write may have been applied and only its reply lost: my token tells.
                    return match self.store.load(&self.key).await {
                        Ok(Some(r)) if r.holders.get(&self.me).is_some_and(|h| h.tok == tok) => {
                            warn!(error = %e, "the permit write's reply was lost, but the write was applied");
                            let others = others(&r, &self.me, self.now(), self.grace);
                            Ok(Acquired::Granted(Box::new(self.granted(holder, others, conflicts, r.ver))))
                        }
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn too_many(&self, conflicts: u32) -> LeaseError {
        LeaseError::Unavailable {
            table: self.store.table().into(),
            action: "acquire",
            detail: format!("{conflicts} conflicting writes in a row"),
        }
    }

    fn granted(&self, holder: Holder, others: BTreeSet<String>, conflicts: u32, ver: u64) -> Permit {
        let health = Arc::new(Mutex::new(PermitHealth {
            trusted_until: holder.exp.saturating_sub(Self::ms(self.grace)),
            lost: None,
        }));
        info!(key = %self.key, instance_id = %self.me, kind = holder.kind.as_str(), others = others.len(), conflicts, "permit acquired");
        let toucher = Toucher { permits: self.clone(), holder: holder.clone(), health: health.clone() };
        let heartbeat = tokio::spawn(heartbeat(toucher));
        Permit { holder, others, conflicts, ver, permits: self.clone(), health, heartbeat }
    }

    /// Removes entry `id` of `kind` if its token is still `tok`. True when removed, false when it
    /// was gone or changed.
    pub async fn remove(&self, id: &str, tok: &str, kind: Kind) -> Result<bool, LeaseError> {
        let write = Write::Remove { id: id.into(), tok: tok.into(), kind };
        Ok(self.store.write(&self.key, write).await?.applied())
    }

    /// Removes this instance's own entry, whatever its token (one left by an earlier run).
    pub async fn remove_mine(&self) -> Result<bool, LeaseError> {
        let record = self.read().await?;
        match record.holders.get(&self.me) {
            Some(h) => self.remove(&self.me, &h.tok, h.kind).await,
            None => Ok(false),
        }
    }

    /// The shared view's item, if any.
    pub async fn shared(&self) -> Result<Option<Shared>, LeaseError> {
        self.store.load_shared(&view_key(&self.key)).await
    }

    /// Takes the right to refresh the shared view for `every`: false when another instance holds
    /// it (or took it less than `every` ago).
    pub async fn lease_view(&self, every: Duration) -> Result<bool, LeaseError> {
        let now = self.now();
        let write = SharedWrite::Lease { now, until: now + Self::ms(every), me: self.me.clone() };
        self.store.write_shared(&view_key(&self.key), write).await
    }

    /// Publishes a view read after the record's version `seen_ver`, at `at` (this clock).
    pub async fn publish_view(&self, seen_ver: u64, at: u64, data: String) -> Result<bool, LeaseError> {
        self.store.write_shared(&view_key(&self.key), SharedWrite::Publish { seen_ver, at, data }).await
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
    /// The other live holders counted out of service: those at the grant, then (the strict check)
    /// those in the record read after the view its decision used.
    pub others: BTreeSet<String>,
    /// Conflicting writes before it was granted.
    pub conflicts: u32,
    /// The record's version right after the grant: a shared view read after it is fresh enough.
    pub ver: u64,
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

    /// A handle that renews this permit on demand (`Toucher::touch`).
    pub fn toucher(&self) -> Toucher {
        Toucher { permits: self.permits.clone(), holder: self.holder.clone(), health: self.health.clone() }
    }

    /// Stops renewing and removes the entry (a few tries; if they all fail it expires by itself).
    pub async fn release(self) {
        self.heartbeat.abort();
        let (p, holder) = (&self.permits, &self.holder);
        match removal_retried("releasing the permit", || p.remove(&p.me, &holder.tok, holder.kind)).await {
            Ok(true) => info!(key = %p.key, instance_id = %p.me, "permit released"),
            Ok(false) => warn!(key = %p.key, instance_id = %p.me, "permit entry was already gone or taken over"),
            Err(e) => {
                let exp = self.health.lock().unwrap().trusted_until + Permits::ms(p.grace);
                error!(error = %e, "releasing the permit failed; the entry expires by itself (exp {exp} ms, dropped {} s later)", p.grace.as_secs());
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Runs a removal (`what`, for logs) up to four times, pausing 0.5 s (doubling) after a call the
/// store throttled or failed on its side; returns the last answer. A release and a restarted
/// listener's removal of its old entry both use it: one failed call should not keep a slot from
/// the cluster for the entry's lifetime (D + G).
pub async fn removal_retried<F, Fut>(what: &str, mut remove: F) -> Result<bool, LeaseError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, LeaseError>>,
{
    let mut pause = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match remove().await {
            Err(e) if e.is_retryable() && attempt < 4 => {
                warn!(error = %e, attempt, "{what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            answer => return answer,
        }
    }
}

/// Renews a held permit on demand, apart from its heartbeat.
#[derive(Clone)]
pub struct Toucher {
    permits: Permits,
    holder: Holder,
    health: Arc<Mutex<PermitHealth>>,
}

/// Why a renewal that met a changed entry loses the permit.
const TAKEN_OVER: &str = "its entry was removed or taken over";

impl Toucher {
    /// One renewal: the record's version after it, or `None` when the entry was removed or taken
    /// over (the permit is then lost for good, see `Permit::lost`).
    async fn renew(&self) -> Result<Option<u64>, LeaseError> {
        let p = &self.permits;
        let now = p.now();
        let write = Write::Renew {
            id: p.me.clone(),
            tok: self.holder.tok.clone(),
            exp: now + Permits::ms(p.duration),
            kind: self.holder.kind,
        };
        match p.store.write(&p.key, write).await? {
            Written::Applied(r) => {
                let mut h = self.health.lock().unwrap();
                h.trusted_until = h.trusted_until.max(now + Permits::ms(p.duration.saturating_sub(p.grace)));
                Ok(Some(r.ver))
            }
            Written::Conflict(_) => {
                self.health.lock().unwrap().lost = Some(TAKEN_OVER.into());
                Ok(None)
            }
        }
    }

    /// Renews the entry now and returns the record's version after the write: a shared view with
    /// `seen_ver` at least that was read after this moment.
    pub async fn touch(&self) -> Result<u64, LeaseError> {
        self.renew().await?.ok_or_else(|| LeaseError::Unavailable {
            table: self.permits.store.table().into(),
            action: "renew",
            detail: TAKEN_OVER.into(),
        })
    }
}

/// Renews `holder` every D/4 (sooner after a failed renewal) until the max hold; a conflict means
/// the entry was removed or taken over: the permit is lost.
async fn heartbeat(toucher: Toucher) {
    let (permits, holder) = (&toucher.permits, &toucher.holder);
    let every = permits.duration / 4;
    // The first renewal at a random point of the second half of the period: holders granted
    // together (a fleet's first wave) do not renew together ever after.
    let mut next = every.mul_f64(0.5 + fastrand::f64() * 0.5);
    loop {
        tokio::time::sleep(next).await;
        let now = permits.now();
        if now >= holder.since + Permits::ms(permits.max_hold) {
            error!(key = %permits.key, instance_id = %permits.me, max_hold_s = permits.max_hold.as_secs(), "PERMIT HELD LONGER THAN --max-hold: no longer renewed; it expires and peers may leave");
            return;
        }
        match toucher.renew().await {
            Ok(Some(_)) => next = every,
            Ok(None) => {
                error!(key = %permits.key, instance_id = %permits.me, "PERMIT LOST: {TAKEN_OVER}");
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
        Record {
            ver: 7,
            holders: entries.iter().map(|(id, exp, k)| (id.to_string(), holder(id, *exp, *k))).collect(),
            complete: true,
            window_start: 0,
            window_grants: 0,
            window_quota: None,
            batches: Default::default(),
        }
    }

    fn remove(id: &str, kind: Kind) -> Write {
        Write::Remove { id: id.into(), tok: id.into(), kind }
    }

    #[test]
    fn a_cluster_whose_record_may_outgrow_one_item_is_warned_of() {
        // Unpaced: K = 200 (50 permits) was measured within one item; K = 300 (75) was not.
        let rule = crate::quorum::Rule { quorum_ppm: 750_000, min_in_service: 1 };
        assert!(!record_beyond_item(0.0, rule.permits(200)));
        assert!(record_beyond_item(0.0, rule.permits(300)));
        // K = 1,000: within at the default pace and below, not at 3 or 4 per second.
        for rate in [0.5, 1.0, crate::config::DEFAULT_LEAVE_RATE] {
            assert!(!record_beyond_item(rate, rule.permits(1000)), "{rate}");
        }
        assert!(record_beyond_item(3.0, rule.permits(1000)));
        assert!(record_beyond_item(4.0, rule.permits(1000)));
        // A small cluster at any pace.
        assert!(!record_beyond_item(8.0, rule.permits(100)));
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
        // Expired entries are removed first (each by its token), then the claim is planned again.
        assert_eq!(
            plan(Some(&r), "me", mine.clone(), 3, now, G, 0.0),
            Plan::Remove(vec![remove("a", Kind::Slot), remove("d", Kind::Exempt)])
        );
        assert_eq!(
            plan(Some(&r), "me", mine.clone(), 2, now, G, 0.0),
            Plan::Refuse { holders: vec!["b".into(), "c".into()] }
        );
        let pruned = record(&[("b", now - 30_000, Kind::Slot), ("c", now + 1, Kind::Slot)]);
        assert_eq!(
            plan(Some(&pruned), "me", mine.clone(), 3, now, G, 0.0),
            Plan::Claim(Write::Claim { id: "me".into(), holder: mine.clone(), limit: 3, pace: None })
        );
        // Paced at 1 per second: 15 at once after a pause, else 10 per 10 s window.
        assert_eq!((pace_burst(1.0), pace_steady(1.0)), (15, 10));
        assert_eq!((pace_burst(2.0), pace_steady(2.0)), (30, 20));
        assert_eq!((pace_burst(0.55), pace_steady(0.55)), (8, 5), "never above the rate");
        assert_eq!((pace_burst(0.01), pace_steady(0.01)), (1, 1), "at least one");
        let claim = |window_start, new_window, quota| {
            Plan::Claim(Write::Claim {
                id: "me".into(),
                holder: mine.clone(),
                limit: 3,
                pace: Some(Pace { window_start, new_window, quota }),
            })
        };
        let paced = |r: &Record, rate| plan(Some(r), "me", mine.clone(), 3, now, G, rate);
        // No window yet: the first begins with the whole burst.
        assert_eq!(paced(&pruned, 1.0), claim(0, true, 15));
        // Within a window, claims count up to its quota, then wait for its end.
        let window = Record { window_start: now - 1000, window_grants: 9, window_quota: Some(10), ..pruned.clone() };
        assert_eq!(paced(&window, 1.0), claim(now - 1000, false, 10));
        let full = Record { window_grants: 10, ..window.clone() };
        assert_eq!(paced(&full, 1.0), Plan::Paced { until: now + 9000 });
        // A window begun by a version without quotas: the steady quota.
        assert_eq!(paced(&Record { window_quota: None, ..window.clone() }, 1.0), claim(now - 1000, false, 10));
        assert_eq!(paced(&Record { window_quota: None, ..full.clone() }, 1.0), Plan::Paced { until: now + 9000 });
        // The next window: 10 while the pace is busy, unused permits not carried; the burst
        // again once 15 s passed since the last window began.
        let over = Record { window_start: now - 10_000, ..full.clone() };
        assert_eq!(paced(&over, 1.0), claim(now - 10_000, true, 10));
        assert_eq!(paced(&Record { window_grants: 4, ..over.clone() }, 1.0), claim(now - 10_000, true, 10));
        assert_eq!(paced(&Record { window_start: now - 14_999, ..full.clone() }, 1.0), claim(now - 14_999, true, 10));
        let paused = Record { window_start: now - 15_000, ..full.clone() };
        assert_eq!(paced(&paused, 1.0), claim(now - 15_000, true, 15));
        // Slower than one per window: windows are 1 / rate apart.
        let slow = Record { window_start: now - 10_000, window_grants: 1, window_quota: Some(1), ..record(&[]) };
        assert_eq!(paced(&slow, 0.05), Plan::Paced { until: now + 10_000 });
        assert_eq!(plan(Some(&slow), "me", mine.clone(), 3, now + 10_000, G, 0.05), claim(now - 10_000, true, 1));
    }

    #[test]
    fn slots_are_capped_exemptions_are_not_and_my_old_entry_is_removed_first() {
        let now = 5_000_000;
        let r = record(&[("a", now + 10, Kind::Slot), ("me", now + 10, Kind::Slot), ("x", now + 10, Kind::Exempt)]);
        let slot = holder("new", now + D, Kind::Slot);
        assert_eq!(plan(Some(&r), "me", slot.clone(), 2, now, G, 0.0), Plan::Remove(vec![remove("me", Kind::Slot)]));
        assert_eq!(plan(Some(&r), "me", slot.clone(), 1, now, G, 0.0), Plan::Refuse { holders: vec!["a".into()] });
        let exempt = holder("new", now + D, Kind::Exempt);
        let mut without_me = r.clone();
        without_me.holders.remove("me");
        assert!(matches!(
            plan(Some(&without_me), "me", exempt.clone(), 0, now, G, 0.0),
            Plan::Claim(Write::Claim { .. })
        ));
        assert_eq!(plan(None, "me", slot.clone(), 0, now, G, 0.0), Plan::Refuse { holders: vec![] });
        assert_eq!(plan(None, "me", slot.clone(), 1, now, G, 0.0), Plan::Init);
        let incomplete = Record { complete: false, ..without_me.clone() };
        assert_eq!(plan(Some(&incomplete), "me", slot, 1, now, G, 0.0), Plan::Init);
        assert_eq!(plan(None, "me", exempt, 0, now, G, 0.0), Plan::Init);
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
        /// Claims at any moments, each applied as the store would, never get more than the burst
        /// plus `rate` per second over the stretch and one window.
        #[test]
        fn the_pace_never_grants_more_than_its_burst_and_rate(
            rate in 0.05f64..20.0,
            gaps in proptest::collection::vec(prop_oneof![3 => 0u64..200, 1 => 0u64..60_000], 1..300),
        ) {
            let mine = holder("t", 10_000_000, Kind::Slot);
            let mut r = record(&[]);
            let (mut now, mut granted) = (1_000_000u64, Vec::new());
            for gap in gaps {
                now += gap;
                match plan(Some(&r), "me", mine.clone(), 1, now, G, rate) {
                    Plan::Claim(Write::Claim { pace: Some(p), .. }) => {
                        if p.new_window {
                            (r.window_start, r.window_grants, r.window_quota) = (now, 1, Some(p.quota));
                        } else {
                            r.window_grants += 1;
                        }
                        granted.push(now);
                    }
                    Plan::Paced { until } => prop_assert!(until > now),
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            let burst = f64::from(pace_burst(rate));
            for (i, a) in granted.iter().enumerate() {
                for (j, b) in granted.iter().enumerate().skip(i) {
                    let allowed = burst + rate * ((b - a) as f64 / 1000.0 + PACE_WINDOW.as_secs_f64());
                    prop_assert!((j - i + 1) as f64 <= allowed + 1e-9, "{} grants in {} ms", j - i + 1, b - a);
                }
            }
        }

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
