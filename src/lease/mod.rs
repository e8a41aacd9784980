//! Strict mode's leave permits: one shared record per cluster, changed only by conditional writes,
//! so that two instances checking at the same moment cannot both leave. Knows the record, the rules
//! for taking and keeping a permit, the shared view of the cluster that holders read instead of
//! the load balancer, and a store behind a trait (`dynamo.rs` for DynamoDB, the fake in
//! `crate::fake`); never the load balancer itself.
//!
//! The record (one DynamoDB item, or shards of it: below; hash key `pk` = the cluster's
//! namespace): `ver` (number, bumped by every write), `holders` = `{instance id → {tok, exp,
//! since}}` (slots, at most L) and `exempt` (the same, for instances that serve nothing already;
//! uncapped), the pace's window (`ws`, `wn`, `wq`, `wqs`) and `--batch-registrations`' sets and
//! claim (`wo`, `wi`, `bt`, `bu`, `bi`, `bn`, `wd`: `batch.rs`), times in Unix milliseconds.
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
//! - Shards: a cluster of more than `SLOTS_PER_SHARD` (50) permits and no pace spreads its slots
//!   over items `KEY#p1`..`KEY#pN` of at most 50 each (`shards_for`, `np` in shard 0, which keeps
//!   the pace, the batch claim and exemptions and holds no slot then), so that no item takes more
//!   writes, nor write units, than one DynamoDB item takes. Every read reads shard 0, then the
//!   others at once, merged (`Permits::read`); a member claims in its home shard (members dealt to
//!   the slot shards in proportion to their slots, by their place among the members in the shared
//!   view: `home_shard`), so a shard's waiters contend only among themselves. Any two holders
//!   still count each other out: each reads every shard after its own grant. `np` is an entry of
//!   `exempt` with no token, which versions that know no shards read as malformed: they fail
//!   closed rather than count shard 0 alone.
//! - The shared view (a second item, `pk` = namespace + `#view`): members, every attachment's
//!   targets and timings as one instance read them, `sv` = the record's `ver` it read just before
//!   (summed over the shards; `svs` each shard's), `n` = publications so far, `at` its clock. A
//!   holder needs a view whose version of its shard is ≥ that of its own last write (its grant,
//!   or a touch after registering: `After`): that view was read after the write, so after what
//!   the write followed. One instance refreshes at a time, at most once per
//!   `cycle::view::VIEW_REFRESH` per attachment (a short lease, kept by its last holder while it
//!   refreshes on time: `VIEW_HANDOFF`), so the load balancer and EC2 see about two reads per
//!   second whatever the fleet's size. The lease lives in a third, small item, the view's head
//!   (`pk` = namespace + `#vh`: `head_key`), with a copy of the last publication's numbers:
//!   pollers read the head and read the view only when the head names one they can use.

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
    /// `np` (shard 0 only): the items the cluster's entries are spread over (`shard_key`); 0 and 1
    /// both mean this item alone (and the item has no `np`, so its size is as without shards).
    #[serde(skip_serializing_if = "one_item")]
    pub shards: usize,
    /// A merged read (`Permits::read`): every shard's `ver`, by shard.
    #[serde(skip)]
    pub vers: Vec<u64>,
    /// A merged read: the shard of each entry held outside shard 0.
    #[serde(skip)]
    pub shard_of: BTreeMap<String, usize>,
    /// A merged read of several shards: each as read, alone, by shard (empty for one item).
    #[serde(skip)]
    pub parts: Vec<Record>,
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

/// A shard count that means the record is one item.
fn one_item(shards: &usize) -> bool {
    *shards <= 1
}

impl Record {
    /// The shard holding `id`'s entry in a merged read (0 when none does).
    pub fn shard(&self, id: &str) -> usize {
        self.shard_of.get(id).copied().unwrap_or(0)
    }

    /// Shard `s` of a merged read as read, alone (a read of one item is its own shard 0; `None`:
    /// no such shard).
    pub fn part(&self, s: usize) -> Option<&Record> {
        match self.parts.get(s) {
            None if s == 0 && self.parts.is_empty() => Some(self),
            p => p,
        }
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
    /// Spreads the cluster's entries over `n` shards (shard 0 only): `SET np = :n IF np < :n` (or
    /// none yet). Never fewer: an entry in a shard stays counted.
    Shards { n: usize },
    /// Removes `elems` from both sets, unconditionally: a shard's part of a batch's end or of a
    /// withdrawal (the conditions are shard 0's: `EndBatch`, `Withdraw`).
    Forget { elems: BTreeSet<String> },
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

/// The most permits a cluster without a pace (`--leave-rate 0`) is measured to hold in one item
/// while its record's writes stay within one DynamoDB item's capacity (about 1,000 write units a
/// second; each write costs the record's size, which grows with its holders): 50 (K = 200 in the
/// fleet bench: 602 write units in the busiest second, 704 batched), not 75 (K = 300: 1,228 in
/// one item). Beyond it an unpaced cluster spreads its slots over shards of at most this many
/// (`shards_for`); a paced one keeps one item, and DynamoDB throttles some writes at a pace above
/// `PACE_WITHIN_ITEM`, which strict mode counts as failed checks (slower, never unsafe):
/// `record_beyond_item` says when to warn.
pub const PERMITS_WITHIN_ITEM: usize = 50;

/// The fastest pace measured to keep the record within one item however many permits: the
/// default (K = 1,000: 502 write units, 710 batched), not 3 (1,408 batched) nor 4 (2,395 batched).
pub const PACE_WITHIN_ITEM: f64 = 2.0;

/// Whether a cluster of `permits` slots at `leave_rate` (0: no pace, the record then spread over
/// shards) may make more writes to one item than it takes: more than `PERMITS_WITHIN_ITEM`
/// permits at a pace above `PACE_WITHIN_ITEM`.
pub fn record_beyond_item(leave_rate: f64, permits: usize) -> bool {
    permits > PERMITS_WITHIN_ITEM && leave_rate > PACE_WITHIN_ITEM
}

/// The most slots one shard holds: a cluster with more permits and no pace spreads its entries
/// over `ceil(L / SLOTS_PER_SHARD)` items besides shard 0 (`shards_for`), so that each item's
/// writes and size, and so its write units, stay within one item's capacity
/// (`PERMITS_WITHIN_ITEM`).
pub const SLOTS_PER_SHARD: usize = PERMITS_WITHIN_ITEM;

/// The shards a claimant of `limit` slots at `leave_rate` wants: one when paced (the pace's window
/// lives in shard 0, and a pace within `PACE_WITHIN_ITEM` keeps one item within its capacity) or
/// when the slots fit one, else shard 0 and `ceil(limit / SLOTS_PER_SHARD)` slot shards. Spread,
/// shard 0 holds no slots: the batch claim, the pace's window, `np` and exemptions.
pub fn shards_for(limit: usize, leave_rate: f64) -> usize {
    if leave_rate > 0.0 || limit <= SLOTS_PER_SHARD {
        1
    } else {
        1 + limit.div_ceil(SLOTS_PER_SHARD)
    }
}

/// Shard `s`'s share of `limit` slots over `shards` shards: all of them for one shard, else none
/// in shard 0 and the rest dealt over the others; they add up to `limit`.
pub fn shard_limit(limit: usize, shards: usize, s: usize) -> usize {
    match (shards, s) {
        (0 | 1, _) => limit,
        (_, 0) => 0,
        (n, s) => limit / (n - 1) + usize::from(s - 1 < limit % (n - 1)),
    }
}

/// The home shard of the member ranked `rank` (its place among the `members` by id, which every
/// instance reads the same from the shared view) when `limit` slots are spread over `shards`:
/// members are dealt to the slot shards in proportion to their slots, so that every shard needs
/// the same number of waves (within one member) and each shard's waiters contend only among
/// themselves, for that shard's share of L.
pub fn home_shard(rank: usize, members: usize, limit: usize, shards: usize) -> usize {
    (1..shards).find(|&s| rank < home_bound(members, limit, shards, s)).unwrap_or(0)
}

/// How many of `members` have `home` as their home shard (`home_shard`).
pub fn home_members(members: usize, limit: usize, shards: usize, home: usize) -> usize {
    match (shards, home) {
        (0 | 1, _) => members,
        (_, 0) => 0,
        _ => home_bound(members, limit, shards, home) - home_bound(members, limit, shards, home - 1),
    }
}

/// The ranks below which members are at home in shards 1..=`s`: `members` × their slots / L.
fn home_bound(members: usize, limit: usize, shards: usize, s: usize) -> usize {
    if s + 1 >= shards {
        return members;
    }
    let slots: usize = (1..=s).map(|t| shard_limit(limit, shards, t)).sum();
    members * slots / limit.max(1)
}

/// Shard `s`'s item: the record's own key for shard 0, else `KEY#pS`.
pub fn shard_key(key: &str, s: usize) -> String {
    match s {
        0 => key.to_owned(),
        s => format!("{key}#p{s}"),
    }
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
    #[error("permit table {table}: {action} denied ({message}); the role needs dynamodb:GetItem and dynamodb:UpdateItem on it, for the cluster's key and the keys beginning with it and \"#\" (its shards and view; README, \"Strict mode\")")]
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

/// The shared view's item as stored (what one instance read), or its head (the refresh lease and
/// the last publication's numbers, `data` empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shared {
    /// The permit record's `ver` read just before the view was read, summed over its shards (0:
    /// never published): the order of publications (a later read has no smaller sum).
    pub seen_ver: u64,
    /// Every shard's `ver` as read (`svs`; empty from a read of one item: `seen_ver` is shard 0's).
    pub seen: Vec<u64>,
    /// Publications so far: a poller waits for a higher number to see a newer read.
    pub n: u64,
    /// When it was read, Unix ms on the reader's clock (for its age only).
    pub at: u64,
    /// The view itself (`crate::cycle::view`'s encoding).
    pub data: String,
    /// The head: no other instance refreshes before this (Unix ms, on the taker's clock). Read
    /// from the view's item too, where versions before the head kept the lease.
    pub lease_until: u64,
    /// Who took the refresh lease last (`lh`): it may take it again as soon as it ends, everyone
    /// else only `VIEW_HANDOFF` later (empty: nobody yet).
    pub lease_holder: String,
}

/// The refresh lease's last holder keeps it as long as it refreshes on time: another instance
/// takes it only this long after it ended, so that the fleet's pollers, which all see it end at
/// the same moment, do not all try to take it (each try is a write the table charges for).
pub const VIEW_HANDOFF: Duration = Duration::from_millis(250);

/// A permit write a view must have been read after: its shard and that shard's `ver` after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct After {
    pub shard: usize,
    pub ver: u64,
}

impl Shared {
    /// Whether this view was read after `after`: its read of the write's shard saw that version.
    pub fn read_after(&self, after: After) -> bool {
        let seen = match self.seen.get(after.shard) {
            Some(v) => *v,
            None if after.shard == 0 && self.seen.is_empty() => self.seen_ver,
            None => 0,
        };
        seen >= after.ver
    }

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
    /// Publish a view: `SET sv, svs, at, d, n = n + 1 IF attribute_not_exists(sv) OR sv <= :sv`
    /// (never replaces a view read after later permit writes).
    Publish { seen_ver: u64, seen: Vec<u64>, at: u64, data: String },
    /// The view's head (`head_key`) after publication `n`: `SET n, sv, svs, at IF
    /// attribute_not_exists(n) OR n < :n` (never goes back).
    Head { n: u64, seen_ver: u64, seen: Vec<u64>, at: u64 },
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

/// The shared view's head for the record `key`: a small item with the refresh lease and a copy of
/// the last publication's `n`, `sv`, `svs` and `at` (no view), which pollers read until it names a
/// publication they can use. Every refused try at the lease, and every poll that finds nothing
/// new, is then charged about 100 bytes instead of the view's size (about 16 KB at K = 1,000;
/// 37 KB with 250 out when out-of-service targets were written out in full).
pub fn head_key(key: &str) -> String {
    format!("{key}#vh")
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
    let removals = removals(current, me, now, grace);
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

/// The removals an acquire makes first in `record`: expired entries (`exp + G < now`) and `me`'s
/// from an earlier run, each conditional on the token read.
fn removals(record: &Record, me: &str, now: u64, grace: Duration) -> Vec<Write> {
    record
        .holders
        .iter()
        .filter(|(id, h)| id.as_str() == me || !h.counts(now, grace))
        .map(|(id, h)| Write::Remove { id: id.clone(), tok: h.tok.clone(), kind: h.kind })
        .collect()
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
    /// The shard count (`np`) last read.
    pub seen_shards: Arc<std::sync::atomic::AtomicUsize>,
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

    /// The record (empty when none exists yet), merged over its shards: shard 0 first (it says how
    /// many there are), then the others in order. Each shard's entries, sets and `ver` are kept
    /// apart too (`Record::part`, `vers`).
    pub async fn read(&self) -> Result<Record, LeaseError> {
        let first = self.store.load(&self.key).await?.unwrap_or_default();
        self.read_rest(first).await
    }

    /// The shards after shard 0 (`first`, as read), merged into it.
    async fn read_rest(&self, first: Record) -> Result<Record, LeaseError> {
        let n = first.shards.max(1);
        let mut merged = first;
        merged.vers = vec![merged.ver];
        if n == 1 {
            return Ok(merged);
        }
        merged.parts = vec![merged.clone()];
        // The other shards at once, each after shard 0.
        let mut reads = tokio::task::JoinSet::new();
        for s in 1..n {
            let (store, key) = (self.store.clone(), shard_key(&self.key, s));
            reads.spawn(async move { (s, store.load(&key).await) });
        }
        let mut parts = vec![None; n];
        while let Some(done) = reads.join_next().await {
            let (s, read) = done.map_err(|e| LeaseError::Unavailable {
                table: self.store.table().into(),
                action: "GetItem",
                detail: e.to_string(),
            })?;
            parts[s] = Some(read?.unwrap_or_default());
        }
        for (s, part) in parts.into_iter().enumerate().skip(1) {
            let part = part.expect("every shard read");
            merged.vers.push(part.ver);
            for (id, h) in &part.holders {
                merged.shard_of.insert(id.clone(), s);
                merged.holders.insert(id.clone(), h.clone());
            }
            merged.batches.want_out.extend(part.batches.want_out.iter().cloned());
            merged.batches.want_in.extend(part.batches.want_in.iter().cloned());
            merged.parts.push(part);
        }
        Ok(merged)
    }

    /// Takes a permit of `kind` with `limit` slots (L), or says who holds them all. Shard 0 first:
    /// it is made, or spread over more shards (`shards_for`), before anything else; then every
    /// shard's expired entries and mine from an earlier run go, and a slot is claimed with that
    /// shard's share of L in this instance's home shard (`home_shard`, from `rank`: its place
    /// among the members, and their number), or, with no rank, in a shard with room drawn by its
    /// room.
    pub async fn acquire(
        &self,
        kind: Kind,
        limit: usize,
        rank: Option<(usize, usize)>,
    ) -> Result<Acquired, LeaseError> {
        let tok = token();
        let mut known: Option<Option<Record>> = None;
        let (mut conflicts, mut rounds) = (0, 0);
        loop {
            let first = match known.take() {
                Some(r) => r,
                None => self.store.load(&self.key).await?,
            };
            let now = self.now();
            let holder = Holder { tok: tok.clone(), exp: now + Self::ms(self.duration), since: now, kind };
            let Some(first) = first.filter(|r| r.complete) else {
                if kind == Kind::Slot && limit == 0 {
                    return Ok(Acquired::Refused { holders: Vec::new() });
                }
                if let Written::Applied(r) = self.store.write(&self.key, Write::Init).await? {
                    known = Some(Some(r));
                }
                continue;
            };
            let want = if kind == Kind::Slot { shards_for(limit, self.leave_rate) } else { 1 };
            if first.shards.max(1) < want {
                if let Written::Applied(r) = self.store.write(&self.key, Write::Shards { n: want }).await? {
                    known = Some(Some(r));
                }
                rounds += 1;
                if rounds > MAX_CONFLICTS {
                    return Err(self.too_many(rounds));
                }
                continue;
            }
            let merged = self.read_rest(first).await?;
            let n = merged.shards.max(1);
            self.seen_shards.store(n, std::sync::atomic::Ordering::Relaxed);
            let slots = merged.other_slots(&self.me, now, self.grace);
            if kind == Kind::Slot && slots.len() >= limit {
                return Ok(Acquired::Refused { holders: slots });
            }
            // Expired entries, or mine from an earlier run, in any shard: each removed if
            // unchanged, then the record is read again.
            let mut removed = false;
            for s in 0..n {
                for w in merged.part(s).map_or_else(Vec::new, |p| removals(p, &self.me, now, self.grace)) {
                    self.store.write(&shard_key(&self.key, s), w).await?;
                    removed = true;
                }
            }
            if removed {
                rounds += 1;
                if rounds > MAX_CONFLICTS {
                    return Err(self.too_many(rounds));
                }
                continue;
            }
            let Some(s) = self.pick_shard(&merged, kind, limit, now, rank) else {
                // Its home shard is full (others may not be): the holders it waits for are there.
                let home = rank.map(|(r, m)| home_shard(r, m, limit, n)).filter(|h| *h > 0);
                let home = home.and_then(|h| merged.part(h));
                let holders = home.map_or(slots, |p| p.other_slots(&self.me, now, self.grace));
                return Ok(Acquired::Refused { holders });
            };
            let (lim, rate) = (shard_limit(limit, n, s), if s == 0 { self.leave_rate } else { 0.0 });
            let key = shard_key(&self.key, s);
            let write = match plan(merged.part(s), &self.me, holder.clone(), lim, now, self.grace, rate) {
                Plan::Paced { until } => return Ok(Acquired::Paced { wait: Duration::from_millis(until - now) }),
                Plan::Claim(w) => w,
                Plan::Init => {
                    self.store.write(&key, Write::Init).await?;
                    continue;
                }
                // Changed since the read: read again.
                Plan::Remove(_) | Plan::Refuse { .. } => {
                    conflicts += 1;
                    if conflicts > MAX_CONFLICTS {
                        return Err(self.too_many(conflicts));
                    }
                    continue;
                }
            };
            let others_with = |after: &Record| {
                let mut all: BTreeSet<String> =
                    others(&merged, &self.me, now, self.grace).into_iter().filter(|id| merged.shard(id) != s).collect();
                all.extend(others(after, &self.me, now, self.grace));
                all
            };
            match self.store.write(&key, write).await {
                Ok(Written::Applied(after)) => {
                    let at = After { shard: s, ver: after.ver };
                    return Ok(Acquired::Granted(Box::new(self.granted(holder, others_with(&after), conflicts, at))));
                }
                Ok(Written::Conflict(old)) => {
                    // Full by now, or an entry of mine appeared (a lost reply): the next round
                    // tells which.
                    conflicts += 1;
                    if conflicts > MAX_CONFLICTS {
                        return Err(self.too_many(conflicts));
                    }
                    if let Some(r) = old.as_ref().filter(|r| r.holders.get(&self.me).is_some_and(|h| h.tok == tok)) {
                        let at = After { shard: s, ver: r.ver };
                        return Ok(Acquired::Granted(Box::new(self.granted(holder, others_with(r), conflicts, at))));
                    }
                    if s == 0 {
                        known = old.map(Some);
                    }
                }
                Err(e) if e.is_retryable() => {
                    // The write may have been applied and only its reply lost: my token tells.
                    return match self.read().await {
                        Ok(r) if r.holders.get(&self.me).is_some_and(|h| h.tok == tok) => {
                            warn!(error = %e, "the permit write's reply was lost, but the write was applied");
                            let s = r.shard(&self.me);
                            let at = After { shard: s, ver: r.vers.get(s).copied().unwrap_or(r.ver) };
                            let others = others(&r, &self.me, self.now(), self.grace);
                            Ok(Acquired::Granted(Box::new(self.granted(holder, others, conflicts, at))))
                        }
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The shard to claim in: shard 0 for an exemption or in a record of one item; else the home
    /// shard (`home_shard`) if it has room, or with no rank one with room, drawn with a chance in
    /// proportion to its room (`None`: none has room). A paced claim in a spread record is not
    /// paced: the window is in shard 0 and its slots in the others (a cluster spreads only when
    /// its claimants have no pace).
    fn pick_shard(
        &self,
        merged: &Record,
        kind: Kind,
        limit: usize,
        now: u64,
        rank: Option<(usize, usize)>,
    ) -> Option<usize> {
        let n = merged.shards.max(1);
        if kind == Kind::Exempt || n == 1 {
            return Some(0);
        }
        let room = |s: usize| {
            let held = merged.part(s).map_or(0, |p| p.other_slots(&self.me, now, self.grace).len());
            shard_limit(limit, n, s).saturating_sub(held)
        };
        if let Some((rank, members)) = rank {
            let home = home_shard(rank, members, limit, n);
            return (room(home) > 0).then_some(home);
        }
        let rooms: Vec<usize> = (0..n).map(room).collect();
        let total: usize = rooms.iter().sum();
        if total == 0 {
            return None;
        }
        let mut draw = fastrand::usize(..total);
        rooms.iter().position(|r| {
            if draw < *r {
                return true;
            }
            draw -= r;
            false
        })
    }

    /// The shard count last read (1 until a read says more).
    pub fn shards_seen(&self) -> usize {
        self.seen_shards.load(std::sync::atomic::Ordering::Relaxed).max(1)
    }

    /// Shard `s` alone, as read (empty when it does not exist yet).
    pub async fn read_shard(&self, s: usize) -> Result<Record, LeaseError> {
        Ok(self.store.load(&shard_key(&self.key, s)).await?.unwrap_or_default())
    }

    fn too_many(&self, conflicts: u32) -> LeaseError {
        LeaseError::Unavailable {
            table: self.store.table().into(),
            action: "acquire",
            detail: format!("{conflicts} conflicting writes in a row"),
        }
    }

    fn granted(&self, holder: Holder, others: BTreeSet<String>, conflicts: u32, after: After) -> Permit {
        let health = Arc::new(Mutex::new(PermitHealth {
            trusted_until: holder.exp.saturating_sub(Self::ms(self.grace)),
            lost: None,
        }));
        info!(key = %self.key, instance_id = %self.me, kind = holder.kind.as_str(), others = others.len(), conflicts, "permit acquired");
        let toucher =
            Toucher { permits: self.clone(), holder: holder.clone(), shard: after.shard, health: health.clone() };
        let heartbeat = tokio::spawn(heartbeat(toucher));
        Permit { holder, others, conflicts, after, permits: self.clone(), health, heartbeat }
    }

    /// Removes entry `id` of `kind` from shard `shard` if its token is still `tok`. True when
    /// removed, false when it was gone or changed.
    pub async fn remove(&self, shard: usize, id: &str, tok: &str, kind: Kind) -> Result<bool, LeaseError> {
        let write = Write::Remove { id: id.into(), tok: tok.into(), kind };
        Ok(self.store.write(&shard_key(&self.key, shard), write).await?.applied())
    }

    /// Removes this instance's own entry, whatever its token (one left by an earlier run).
    pub async fn remove_mine(&self) -> Result<bool, LeaseError> {
        let record = self.read().await?;
        match record.holders.get(&self.me) {
            Some(h) => self.remove(record.shard(&self.me), &self.me, &h.tok, h.kind).await,
            None => Ok(false),
        }
    }

    /// The shared view's item, if any.
    pub async fn shared(&self) -> Result<Option<Shared>, LeaseError> {
        self.store.load_shared(&view_key(&self.key)).await
    }

    /// The shared view's head (`head_key`), if any: the refresh lease and the last publication's
    /// numbers, with no view (`data` empty).
    pub async fn head(&self) -> Result<Option<Shared>, LeaseError> {
        self.store.load_shared(&head_key(&self.key)).await
    }

    /// Takes the right to refresh the shared view for `every` (in the head): false when another
    /// instance holds it (or took it less than `every` ago).
    pub async fn lease_view(&self, every: Duration) -> Result<bool, LeaseError> {
        let now = self.now();
        let write = SharedWrite::Lease { now, until: now + Self::ms(every), me: self.me.clone() };
        self.store.write_shared(&head_key(&self.key), write).await
    }

    /// Publishes a view read after the record's versions `vers` (by shard), at `at` (this clock),
    /// as publication `n` (the one before it, as the publisher read it, plus one), then the head
    /// that names it. False when a view read after later permit writes is there (the head is left).
    /// When another version's listener published in between, the head names a lower `n` than the
    /// view's: its pollers then wait for the next publication, never take an older one. A head
    /// that could not be written is only warned of: the view is published, and the pollers the
    /// head leaves waiting take the refresh lease once it ends and publish again.
    pub async fn publish_view(&self, vers: &[u64], at: u64, data: String, n: u64) -> Result<bool, LeaseError> {
        let seen_ver = vers.iter().sum();
        let seen = if vers.len() > 1 { vers.to_vec() } else { Vec::new() };
        let publish = SharedWrite::Publish { seen_ver, seen: seen.clone(), at, data };
        if !self.store.write_shared(&view_key(&self.key), publish).await? {
            return Ok(false);
        }
        let head = SharedWrite::Head { n, seen_ver, seen, at };
        if let Err(e) = self.store.write_shared(&head_key(&self.key), head).await {
            warn!(error = %e, "the shared view is published, its head is not: the next refresh writes it");
        }
        Ok(true)
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
    /// The write of the grant (its shard and version): a shared view read after it is fresh enough.
    pub after: After,
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
        Toucher {
            permits: self.permits.clone(),
            holder: self.holder.clone(),
            shard: self.after.shard,
            health: self.health.clone(),
        }
    }

    /// Stops renewing and removes the entry (a few tries; if they all fail it expires by itself).
    pub async fn release(self) {
        self.heartbeat.abort();
        let (p, holder) = (&self.permits, &self.holder);
        let shard = self.after.shard;
        match removal_retried("releasing the permit", || p.remove(shard, &p.me, &holder.tok, holder.kind)).await {
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
    /// The shard holding the entry.
    shard: usize,
    health: Arc<Mutex<PermitHealth>>,
}

/// Why a renewal that met a changed entry loses the permit.
const TAKEN_OVER: &str = "its entry was removed or taken over";

impl Toucher {
    /// One renewal: the entry's shard's version after it, or `None` when the entry was removed or
    /// taken over (the permit is then lost for good, see `Permit::lost`).
    async fn renew(&self) -> Result<Option<u64>, LeaseError> {
        let p = &self.permits;
        let now = p.now();
        let write = Write::Renew {
            id: p.me.clone(),
            tok: self.holder.tok.clone(),
            exp: now + Permits::ms(p.duration),
            kind: self.holder.kind,
        };
        match p.store.write(&shard_key(&p.key, self.shard), write).await? {
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

    /// Renews the entry now and returns the write: a shared view read after it
    /// (`Shared::read_after`) was read after this moment.
    pub async fn touch(&self) -> Result<After, LeaseError> {
        let ver = self.renew().await?.ok_or_else(|| LeaseError::Unavailable {
            table: self.permits.store.table().into(),
            action: "renew",
            detail: TAKEN_OVER.into(),
        })?;
        Ok(After { shard: self.shard, ver })
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
            ..Record::default()
        }
    }

    fn remove(id: &str, kind: Kind) -> Write {
        Write::Remove { id: id.into(), tok: id.into(), kind }
    }

    #[test]
    fn a_cluster_whose_record_may_outgrow_one_item_is_warned_of() {
        // Unpaced: K = 200 (50 permits) was measured within one item; beyond, the record spreads.
        let rule = crate::quorum::Rule { quorum_ppm: 750_000, min_in_service: 1 };
        for k in [200, 300, 1000] {
            assert!(!record_beyond_item(0.0, rule.permits(k)), "{k}");
        }
        assert_eq!(shards_for(rule.permits(200), 0.0), 1);
        assert_eq!(shards_for(rule.permits(300), 0.0), 3);
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

/// The record spread over shards (`shards_for`), on the in-process store: claims racing in many
/// shards at once are what this needs to show, and moto answers them one at a time (its side of
/// the shard writes is in `tests/lease_moto.rs`).
#[cfg(test)]
mod shard_tests {
    use super::batch::{Way, BATCH_CLAIM};
    use super::*;
    use crate::fake::{fake_permits, FakeStore, StoreFault, StoreOp};

    #[test]
    fn shards_add_up_to_l_and_deal_the_members_so_every_shard_needs_the_same_waves() {
        assert_eq!(shards_for(250, 2.0), 1, "paced: one item");
        assert_eq!(shards_for(SLOTS_PER_SHARD, 0.0), 1);
        assert_eq!(shards_for(SLOTS_PER_SHARD + 1, 0.0), 3);
        assert_eq!(shards_for(250, 0.0), 6, "shard 0 and five of 50");
        for (members, limit) in [(1000, 250), (300, 75), (240, 60), (1001, 250), (999, 249), (5000, 1250)] {
            let n = shards_for(limit, 0.0);
            assert!(n > 1);
            assert_eq!(shard_limit(limit, n, 0), 0, "shard 0 holds no slot once spread");
            assert_eq!((0..n).map(|s| shard_limit(limit, n, s)).sum::<usize>(), limit, "{members}/{limit}");
            assert!((1..n).all(|s| shard_limit(limit, n, s) <= SLOTS_PER_SHARD));
            let mut dealt = vec![0; n];
            for rank in 0..members {
                dealt[home_shard(rank, members, limit, n)] += 1;
            }
            assert_eq!(dealt[0], 0);
            let waves = members.div_ceil(limit);
            for (s, &got) in dealt.iter().enumerate().skip(1) {
                assert_eq!(got, home_members(members, limit, n, s), "{members}/{limit} shard {s}");
                let own = got.div_ceil(shard_limit(limit, n, s));
                assert!(own <= waves + 1, "{members}/{limit} shard {s}: {own} waves of {waves}");
            }
            if members % limit == 0 {
                assert!((1..n).all(|s| dealt[s].div_ceil(shard_limit(limit, n, s)) == waves), "{members}/{limit}");
            }
        }
        assert_eq!(home_shard(7, 10, 2, 1), 0);
        assert_eq!(home_members(10, 2, 1, 0), 10);
    }

    #[test]
    fn a_view_is_read_after_a_write_in_its_own_shard() {
        let one = Shared { seen_ver: 9, ..Shared::default() };
        assert!(one.read_after(After { shard: 0, ver: 9 }));
        assert!(!one.read_after(After { shard: 0, ver: 10 }));
        assert!(!one.read_after(After { shard: 1, ver: 1 }), "a view of one item knows no other shard");
        let spread = Shared { seen_ver: 14, seen: vec![3, 7, 4], ..Shared::default() };
        assert!(spread.read_after(After { shard: 1, ver: 7 }));
        assert!(!spread.read_after(After { shard: 2, ver: 7 }), "the sum is not a shard's version");
        assert!(!spread.read_after(After { shard: 3, ver: 1 }));
    }

    fn permits(store: &FakeStore, me: &str) -> Permits {
        fake_permits(store, "web", me)
    }

    fn slots_in(store: &FakeStore, s: usize) -> usize {
        store.record(&shard_key("web", s)).map_or(0, |r| r.holders.len())
    }

    #[tokio::test(start_paused = true)]
    async fn racing_claims_spread_over_shards_never_hold_more_than_l_nor_a_shard_more_than_its_share() {
        let (members, limit) = (500, 120);
        let mut store = FakeStore::new();
        store.latency = Duration::from_millis(40);
        let n = shards_for(limit, 0.0);
        assert_eq!(n, 4);
        // Half claim at home, half with no rank (drawn by room): all at once.
        let tasks: Vec<_> = (0..members)
            .map(|i| {
                let p = permits(&store, &format!("i-{i:05}"));
                let rank = (i % 2 == 0).then_some((i, members));
                tokio::spawn(async move { (p.acquire(Kind::Slot, limit, rank).await.unwrap(), p) })
            })
            .collect();
        let mut held = Vec::new();
        for t in tasks {
            if let (Acquired::Granted(permit), p) = t.await.unwrap() {
                held.push((permit, p));
            }
        }
        assert_eq!(held.len(), limit, "every slot taken, none more");
        assert_eq!(slots_in(&store, 0), 0);
        for s in 1..n {
            assert_eq!(slots_in(&store, s), shard_limit(limit, n, s), "shard {s}");
        }
        let merged = held[0].1.read().await.unwrap();
        assert_eq!((merged.shards, merged.vers.len(), merged.holders.len()), (n, n, limit));
        for (permit, p) in &held {
            assert!(permit.after.shard >= 1);
            assert_eq!(merged.shard(&p.me), permit.after.shard, "the merged read knows each entry's shard");
        }
        // A released slot goes to a waiter at home there; a waiter of another shard is refused.
        let (freed, p) = held.pop().unwrap();
        let shard = freed.after.shard;
        let me = p.me.clone();
        freed.release().await;
        assert_eq!(slots_in(&store, shard), shard_limit(limit, n, shard) - 1);
        assert!(!p.read().await.unwrap().holders.contains_key(&me));
        let holding = p.read().await.unwrap().holders;
        let waiter = |home: usize| {
            (0..members)
                .find(|&r| home_shard(r, members, limit, n) == home && !holding.contains_key(&format!("i-{r:05}")))
                .expect("a waiter")
        };
        let full = if shard == 1 { 2 } else { 1 };
        let other = waiter(full);
        let refused = permits(&store, &format!("i-{other:05}"));
        let Acquired::Refused { holders } = refused.acquire(Kind::Slot, limit, Some((other, members))).await.unwrap()
        else {
            panic!("its home shard is full")
        };
        let in_full: Vec<String> = store.record(&shard_key("web", full)).unwrap().holders.into_keys().collect();
        assert_eq!(holders, in_full, "the refusal names the holders of its own shard");
        let at_home = waiter(shard);
        let taker = permits(&store, &format!("i-{at_home:05}"));
        let taken = taker.acquire(Kind::Slot, limit, Some((at_home, members))).await.unwrap();
        let Acquired::Granted(taken) = taken else { panic!("the freed slot") };
        assert_eq!(taken.after.shard, shard);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_in_a_shard_is_found_by_its_token_and_the_entry_renewed_and_released_there() {
        let store = FakeStore::new();
        let (limit, members) = (60, 240);
        let other = permits(&store, "i-00000");
        let Acquired::Granted(first) = other.acquire(Kind::Slot, limit, Some((0, members))).await.unwrap() else {
            panic!()
        };
        assert_eq!(first.after.shard, 1);
        store.fault(StoreOp::Acquire, StoreFault::LostReply);
        let p = permits(&store, "i-00201");
        let Acquired::Granted(held) = p.acquire(Kind::Slot, limit, Some((201, members))).await.unwrap() else {
            panic!("the write was applied")
        };
        let home = home_shard(201, members, limit, shards_for(limit, 0.0));
        assert_eq!(held.after.shard, home);
        assert_eq!(held.after.ver, store.record(&shard_key("web", home)).unwrap().ver);
        let after = held.toucher().touch().await.unwrap();
        assert_eq!(after.shard, home);
        assert!(after.ver > held.after.ver);
        held.release().await;
        assert_eq!(slots_in(&store, home), 0);
        assert_eq!(slots_in(&store, 1), 1, "the other shard's holder kept");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_take_asks_from_every_shard_and_a_withdrawal_is_counted_in_shard_0() {
        let store = FakeStore::new();
        let (limit, members) = (60, 240);
        let ranks = [0, 121, 200];
        let ps: Vec<Permits> = ranks.iter().map(|r| permits(&store, &format!("i-{r:05}"))).collect();
        let mut held = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let rank = Some((ranks[i], members));
            let Acquired::Granted(h) = p.acquire(Kind::Slot, limit, rank).await.unwrap() else { panic!() };
            held.push(h);
        }
        assert_eq!(held.iter().map(|h| h.after.shard).collect::<Vec<_>>(), vec![1, 2, 2]);
        let elem = |i: usize| format!("aa/i-{:05}@{}", ranks[i], &held[i].holder.tok[..8]);
        for i in 0..3 {
            let set: BTreeSet<String> = [elem(i)].into();
            assert!(ps[i].ask(held[i].after.shard, &held[i].holder, Way::Out, set).await.unwrap().is_some());
        }
        // An ask in another shard than the entry's finds no entry there: refused.
        let wrong: BTreeSet<String> = [elem(0)].into();
        assert!(ps[0].ask(2, &held[0].holder, Way::Out, wrong).await.unwrap().is_none());
        let record = ps[0].read().await.unwrap();
        assert_eq!(record.batches.want_out.len(), 3, "merged from shards 1 and 2");
        let tags: BTreeMap<String, usize> = [("aa".to_string(), 0)].into();
        let plan = batch::plan_batch(&record, ps[0].now(), ps[0].grace, &tags).unwrap();
        assert_eq!(plan.ids.len(), 3);
        let claim = ps[0].take_batch(plan.ids.clone(), record.batches.withdrawals).await.unwrap().unwrap();
        // Instance 2 withdraws while the claim names it: it waits the claim out (claim + G).
        let withdrawing = {
            let p = ps[2].clone();
            tokio::spawn(async move { p.withdraw(BATCH_CLAIM + p.grace * 2).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let done: BTreeSet<String> = [elem(0), elem(1)].into();
        assert!(ps[0].end_batch(&record, &claim, done, BTreeSet::new(), 1).await.unwrap());
        let after = ps[0].read().await.unwrap();
        assert_eq!(after.batches.want_out, [elem(2)].into(), "done elements gone from their shards");
        withdrawing.await.unwrap().unwrap();
        let after = ps[0].read().await.unwrap();
        assert!(after.batches.want_out.is_empty(), "forgotten in shard 2");
        assert_eq!(after.batches.withdrawals, 1, "and counted in shard 0");
        assert_eq!(store.record("web").unwrap().batches.withdrawals, 1);
    }
}
