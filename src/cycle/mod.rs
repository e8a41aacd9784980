//! The gated restart cycle, shared by `listen` and the one-shot `restart`, over every attachment of
//! the instance (Classic load balancers and target groups) at once:
//! validate programs → gate (quorum in every attachment) → deregister from each → recheck → wait
//! until drained in each → restart programs → register in each → wait until serving in each. The
//! waits on several attachments run side by side (one poll round reads them all). In strict mode
//! the gate takes one permit for the cluster first (`crate::lease`), holds it until serving again
//! and skips the recheck, which the permit makes unnecessary; its checks and polls read the
//! cluster's shared view (`view`, refreshed by one instance at a time) instead of the load
//! balancer, so that a fleet's API rate does not grow with its size. The state file records every
//! (attachment, target) pair before the first deregistration; `reconcile` finishes a cycle that a
//! previous process left half done and puts back exactly those pairs.
//!
//! Invariant: whatever fails after the first deregistration, every pair taken out is registered
//! again before `run` returns — unless the programs did not come back (`CycleError::ServicesDown`,
//! said loudly) or AWS refused or stayed unreachable for the whole retry budget
//! (`CycleError::StillDeregistered`, said loudly).

mod batch;
pub mod start;
pub mod state_file;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::{DRAIN_MARGIN, HEALTH_MARGIN};
use crate::hooks::{self, Context as HookContext, HookError, Hooks, Phase};
use crate::lb::members::{MembersError, Membership, Roster};
use crate::lb::{
    AttachmentSpec, Kind as AttachmentKind, LbError, LbTimings, LoadBalancer, Target, TargetHealth, TargetState,
};
use crate::lease::batch::Way;
use crate::lease::{
    home_members, home_shard, plan, record_beyond_item, shard_limit, Acquired, After, Holder, Kind, LeaseError, Permit,
    Permits, Plan, Shared, Toucher, PACE_WITHIN_ITEM, PERMITS_WITHIN_ITEM,
};
use crate::quorum::{combine, decide, holds_without_me, Decision, Members, Reason, Rule, Snapshot, Verdict, Zone};
use crate::supervisor::{Services, SupervisorError};
use crate::trigger::RestartRequest;
use state_file::{LeaveVia, Record, StateFile, StateFileError, Step, Taken};
use view::{first_view_pause, is_fresh, View, TIMINGS_MAX_AGE, VIEW_MAX_AGE, VIEW_POLL, VIEW_REFRESH, VIEW_WAIT};

/// Strict mode: the fleet's waiters check (view, permit) about this many times per second in all:
/// each every `members / WAITER_CHECKS_PER_S` seconds or `--check-interval` if longer.
pub const WAITER_CHECKS_PER_S: f64 = 100.0;
/// Strict mode: between checks a waiter watches the record (its home shard when spread) for a free
/// slot every `waiters / WATCH_READS_PER_S` seconds (at least `WATCH_EVERY`), the waiters counted
/// from the record itself (`Watch`): a freed slot is taken within about half a second at any
/// size, while each item's watchers read it about this many times a second in all (at K = 1,000
/// a shard's 150 waiters every 0.75 s: the shard's busiest second 1,660 read units of its 3,000;
/// 100 per second made it 1.5 s, and the unpaced batched fleet 1.1 s slower, seed 0).
pub const WATCH_READS_PER_S: f64 = 200.0;
/// Strict mode: a waiter refused a slot reads the permit record at most this often while it waits
/// for one to free up.
pub const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Strict mode: a watching waiter that sees `f` slots free checks at once with a chance of `f`
/// over the waiters' reads in this long (at least one): about the time from a read to its claim
/// in the record. Measured on the fleet model (45 ms per table call; K = 100, 10 seeds): 0.42
/// conflicts per granted permit against 0.68 when every waiter goes, the makespans unchanged.
pub const WATCH_CLAIM_WINDOW: Duration = Duration::from_millis(50);

/// Strict mode: instances asked at the same moment spread their first check over `members /
/// FIRST_CHECKS_PER_S` seconds, so that the permit table sees about this many claims per second
/// (spread over the slot shards when the record is: 80 a second in each at K = 1,000). The first
/// wave's grants then come within about a second, and every later wave follows its slot's first:
/// K = 1,000 unpaced batched took 197.4 s (3 seeds, worst) against 198.0 s at 200 and 198.1 s at
/// 100, its busiest item 2,318 read units a second against 1,938 and 1,854.
pub const FIRST_CHECKS_PER_S: f64 = 400.0;
/// Strict mode: an instance refused by the pacing (`--leave-rate`) asks again within this long after
/// the gap (or within `members / WAITER_CHECKS_PER_S` seconds if longer).
pub const PACED_SPREAD: Duration = Duration::from_secs(1);
/// Strict mode: an instance refused a slot takes an exempt entry if a view at most this old
/// shows it serving nowhere (an older one is refreshed first).
pub const EXEMPTION_VIEW_AGE: Duration = Duration::from_secs(10);

/// How long registering again is retried while AWS is unreachable before giving up loudly.
pub const REGISTER_RETRY_FOR: Duration = Duration::from_secs(300);
/// How long a throttled deregistration is tried again before the cycle comes back (strict mode:
/// and goes back to the gate, permit released; else it fails).
pub const DEREGISTER_RETRY_FOR: Duration = Duration::from_secs(20);
/// Largest pause between registration retries.
pub const REGISTER_RETRY_MAX_PAUSE: Duration = Duration::from_secs(30);

/// Timing settings of one cycle.
#[derive(Debug, Clone)]
pub struct Timing {
    pub check_interval: Duration,
    pub max_checks: u32,
    pub poll_interval: Duration,
    /// Overrides the load balancer's draining timeout (+ margin) when set.
    pub drain_timeout: Option<Duration>,
    /// Overrides interval × healthy threshold (+ margin) when set.
    pub health_timeout: Option<Duration>,
    /// Before leaving on a passed check, wait for this instance's slot of a `settle` schedule
    /// and check once more, so that instances asked at the same moment see each other leave
    /// (see README, "Races").
    pub settle: Duration,
}

impl Default for Timing {
    /// The documented defaults (`crate::config`).
    fn default() -> Self {
        use crate::config::*;
        Timing {
            check_interval: Duration::from_secs_f64(DEFAULT_CHECK_INTERVAL),
            max_checks: DEFAULT_MAX_CHECKS,
            poll_interval: Duration::from_secs_f64(DEFAULT_POLL_INTERVAL),
            drain_timeout: None,
            health_timeout: None,
            settle: Duration::from_secs_f64(DEFAULT_SETTLE),
        }
    }
}

/// What a finished cycle measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub programs: Vec<String>,
    pub checks: u32,
    pub waited_for_quorum: Duration,
    pub drain: Duration,
    pub restart: Duration,
    pub back_in_service: Duration,
    pub total: Duration,
    pub races: u32,
}

/// What the idle listener's watch (`Cycle::recover`) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No cycle left unfinished.
    Nothing,
    /// Out, with the programs still not RUNNING: nothing to do yet.
    StillDown,
    /// The unfinished cycle is finished: the instance is back in service.
    Back,
}

/// How a cycle ended without an error.
#[derive(Debug, Clone)]
pub enum Outcome {
    Done(Summary),
    /// `--dry-run`: every check made, nothing changed.
    DryRun(Verdict),
    /// Quorum not reached after the bounded checks; nothing changed.
    GaveUp {
        verdict: Verdict,
        checks: u32,
    },
    /// Strict mode: every permit was taken at each of the bounded checks; nothing changed.
    NoPermit {
        holders: Vec<String>,
        permits: usize,
        checks: u32,
    },
    /// Shutdown requested while waiting at the gate; nothing changed.
    Aborted,
}

#[derive(Debug, Error)]
pub enum CycleError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Members(#[from] MembersError),
    /// Standby would take the group below its minimum size.
    #[error("Auto Scaling group {group} cannot put this instance in Standby: its desired capacity {desired} would drop below its minimum size (MinSize {min}); lower MinSize, or use --leave-via deregister; nothing changed")]
    StandbyForbidden { group: String, min: i32, desired: i32 },
    #[error("INSTANCE {instance} IS STILL IN STANDBY IN AUTO SCALING GROUP {group}: leaving Standby failed after {tried:?}. Bring it back by hand: aws autoscaling exit-standby --auto-scaling-group-name {group} --instance-ids {instance}")]
    StillInStandby {
        group: String,
        instance: String,
        tried: Duration,
        #[source]
        source: Box<MembersError>,
    },
    #[error(transparent)]
    Lb(#[from] LbError),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("no permit after {checks} checks (strict mode fails closed; nothing changed)")]
    NoPermit {
        checks: u32,
        #[source]
        source: LeaseError,
    },
    #[error("--before-leave failed; nothing changed")]
    BeforeLeave {
        #[source]
        source: HookError,
    },
    #[error("INSTANCE {instance} LEFT OUT OF {lb}: its programs run but --ready-check did not pass within {after:?}. Fix them, then run `elb-quorum restart {programs}` (or restart the listener) to bring it back")]
    NotReady {
        lb: String,
        instance: String,
        programs: String,
        after: Duration,
        #[source]
        source: Box<HookError>,
    },
    #[error("permit lost before deregistering ({why}); nothing changed")]
    PermitLost { why: String },
    /// A named target group does not list this instance: the configuration is wrong.
    #[error("instance {instance} is not registered in {lb}: register it there, or leave the group out of --target-group; nothing changed")]
    NotRegistered { lb: String, instance: String },
    /// This instance's target can never serve there (its zone is not enabled, or no load balancer
    /// uses the group): leaving would not come back.
    #[error("{lb} can never route to {target} ({raw}): enable its Availability Zone on the load balancer (or attach the group to one); nothing changed")]
    NeverHeals { lb: String, target: String, raw: String },
    #[error("INSTANCE {instance} LEFT DEREGISTERED FROM {lb}: its programs did not come back. Fix them, then run `elb-quorum restart {programs}` (or restart the listener) to register it again")]
    ServicesDown {
        lb: String,
        instance: String,
        programs: String,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("INSTANCE {instance} IS STILL DEREGISTERED FROM {lb}: registering again failed after {tried:?}. Register it by hand: {by_hand}")]
    StillDeregistered {
        lb: String,
        instance: String,
        tried: Duration,
        by_hand: String,
        #[source]
        source: Box<LbError>,
    },
    #[error("instance {instance} is registered with {lb} again but not serving: {detail}")]
    NotInService { lb: String, instance: String, detail: String },
    /// The attachments came from the Auto Scaling group, and the group's have changed since.
    #[error("the attachments of Auto Scaling group {group} changed since this process read them (now: {now}; then: {then}); nothing changed: ask again (the listener reads them again at the next request)")]
    GroupChanged { group: String, now: String, then: String },
}

impl CycleError {
    /// True when the instance is (or may be) out of the load balancer after this error.
    pub fn left_out(&self) -> bool {
        matches!(
            self,
            CycleError::ServicesDown { .. }
                | CycleError::StillDeregistered { .. }
                | CycleError::StillInStandby { .. }
                | CycleError::NotReady { .. }
        )
    }

    /// The configuration is wrong (unknown attachment, not registered there, a zone that is never
    /// served); nothing was changed: exit 2.
    pub fn is_configuration(&self) -> bool {
        match self {
            CycleError::Lb(e) => e.is_configuration(),
            CycleError::Members(e) => e.is_configuration(),
            CycleError::NotRegistered { .. } | CycleError::NeverHeals { .. } | CycleError::StandbyForbidden { .. } => {
                true
            }
            CycleError::Supervisor(SupervisorError::UnknownProgram { .. }) => true,
            _ => false,
        }
    }
}

/// The command that registers `taken` by hand, for the loud message.
pub fn register_by_hand(taken: &Taken) -> String {
    match taken.kind {
        AttachmentKind::Classic => format!(
            "aws elb register-instances-with-load-balancer --load-balancer-name {} --instances {}",
            taken.id,
            taken.targets.iter().map(|t| t.instance_id.as_str()).collect::<Vec<_>>().join(" ")
        ),
        AttachmentKind::TargetGroup => format!(
            "aws elbv2 register-targets --target-group-arn {} --targets {}",
            taken.id,
            taken
                .targets
                .iter()
                .map(|t| match t.port {
                    Some(p) => format!("Id={},Port={p}", t.instance_id),
                    None => format!("Id={}", t.instance_id),
                })
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

/// The attachments' labels, for messages: "load balancer a, target group b".
pub fn labels(taken: &[Taken]) -> String {
    taken.iter().map(|t| format!("{} {}", t.kind.noun(), t.name)).collect::<Vec<_>>().join(", ")
}

/// The instances serving in one attachment. A peer counts only when every target it has there is
/// serving (the cautious count); this instance counts when any of its targets serves (leaving
/// would take that from the cluster).
pub fn serving_ids(listed: &[TargetHealth], me: &str) -> BTreeSet<String> {
    let mut by_instance: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for h in listed.iter().filter(|h| h.state != TargetState::NotRegistered) {
        let e = by_instance.entry(h.target.instance_id.as_str()).or_insert((true, false));
        e.0 &= h.serving();
        e.1 |= h.serving();
    }
    by_instance
        .into_iter()
        .filter(|(id, (all, any))| if *id == me { *any } else { *all })
        .map(|(id, _)| id.to_owned())
        .collect()
}

/// One read of the cluster: members and every attachment's targets.
#[derive(Debug, Clone)]
pub struct Observation {
    pub roster: Roster,
    /// Per attachment, in the cycle's order: every target listed.
    pub listed: Vec<Vec<TargetHealth>>,
}

/// Retrying a call that must go through (registering again, entering or leaving Standby): pauses
/// from 1 s, doubling up to `REGISTER_RETRY_MAX_PAUSE`, for `REGISTER_RETRY_FOR` in all.
struct Backoff {
    start: Instant,
    pause: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { start: Instant::now(), pause: Duration::from_secs(1) }
    }

    /// Whether the budget leaves time for another try.
    fn may_retry(&self) -> bool {
        self.start.elapsed() < REGISTER_RETRY_FOR
    }

    /// Sleeps the next pause (jittered), then doubles it.
    async fn wait(&mut self) {
        tokio::time::sleep(jitter(self.pause)).await;
        self.pause = (self.pause * 2).min(REGISTER_RETRY_MAX_PAUSE);
    }
}

/// ±20 % jitter, so a fleet does not poll in lockstep.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// This instance's rank among the members (sorted ids) and their number; `None` with a static count.
fn settle_slot(members: &Members, me: &str) -> Option<(usize, usize)> {
    match members {
        Members::Ids(ids) => Some((ids.iter().filter(|id| id.as_str() < me).count(), ids.len().max(1))),
        Members::Count(_) => None,
    }
}

/// The pause before the confirming check. Every member sees the same member list, so ranks differ;
/// each rank owns a slot of `settle / members` in a schedule that repeats every `settle` on the
/// wall clock, and confirms only in its slot. Instances asked at once (or passing the gate at any
/// moments) then confirm at least a slot apart, so each sees the others that left before it. A slot
/// must be longer than two API round trips plus clock skew: settle ≥ members × 0.5 s. Without ids
/// (static count), a random pause in 0..settle.
pub fn settle_wait(settle: Duration, slot: Option<(usize, usize)>, now: Duration) -> Duration {
    match slot {
        Some((rank, members)) if !settle.is_zero() => {
            let period = settle.as_nanos();
            let offset = period * rank as u128 / members as u128;
            let phase = now.as_nanos() % period;
            Duration::from_nanos(((offset + period - phase) % period) as u64)
        }
        _ => settle.mul_f64(fastrand::f64()),
    }
}

/// Who holds every permit, for messages; none at all when the cluster allows nobody out (too
/// small for its quorum and `--min-in-service`).
pub fn held_by(holders: &[String]) -> String {
    if holders.is_empty() {
        "the cluster allows no instance out at once".into()
    } else {
        format!("held by {}", holders.join(" "))
    }
}

/// One instance's restart cycle over its attachments. Build it with `Cycle::new` and the setters.
pub struct Cycle<L, M, S> {
    /// Every attachment, left and rejoined together.
    pub lbs: Vec<L>,
    pub members: M,
    pub services: S,
    /// This instance's id.
    pub me: String,
    pub rule: Rule,
    pub timing: Timing,
    pub dry_run: bool,
    pub state: StateFile,
    /// Becomes true on SIGTERM/SIGINT: stop waiting at the gate; a cycle past the gate finishes.
    pub shutdown: watch::Receiver<bool>,
    /// Strict mode: a permit is taken before leaving (see `crate::lease`).
    pub permits: Option<Permits>,
    /// Deregister, or Auto Scaling Standby.
    pub leave_via: LeaveVia,
    /// The per-zone rule's fraction in parts per million (`--zone-quorum`), if set.
    pub zone_quorum_ppm: Option<u32>,
    /// The wall clock of the settle schedule: the system clock in production.
    pub clock: crate::clock::WallClock,
    /// `--metrics-file`.
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// `--before-leave`, `--ready-check`, `--after-return`.
    pub hooks: Hooks,
    /// Strict mode, while a permit is held: where this holder stands in the shared view.
    cursor: std::sync::Mutex<Option<Cursor>>,
    /// The attachments are the Auto Scaling group's (no --lb or --target-group): a check whose
    /// members' read shows the group's attachments changed refuses to leave (`GroupChanged`).
    pub from_group: bool,
    /// Strict mode, `--batch-registrations`: registration calls through the cluster's batches.
    pub batch: bool,
    /// Strict mode: the shared view's item as the process read it at its start, and when
    /// (`with_view_read`).
    view_read: std::sync::Mutex<Option<(Instant, Shared)>>,
    /// Strict mode: the last view a check sized the cluster from, when it was read (Unix ms, its
    /// reader's clock) and its publication number: the next checks take it while it is at most
    /// `VIEW_MAX_AGE` old instead of reading the view's item again (`view_for_limit`).
    sized_from: std::sync::Mutex<Option<(View, u64, u64)>>,
}

/// Strict mode, while a permit is held: the shared view this holder may use.
#[derive(Clone)]
struct Cursor {
    /// A view must have been read after this permit write (the grant, then the touch after
    /// registering).
    need: After,
    /// The publication last used: the next poll round waits for a later one.
    last_n: u64,
    timings: Vec<LbTimings>,
    toucher: Toucher,
}

enum Gate {
    Allowed {
        decision: Decision,
        observation: Observation,
        checks: u32,
        permit: Option<Box<Permit>>,
    },
    /// This instance is in Standby already (someone else put it there): it serves nothing.
    InStandby,
    GaveUp {
        verdict: Verdict,
        checks: u32,
    },
    NoPermit {
        holders: Vec<String>,
        permits: usize,
        checks: u32,
    },
    Aborted,
}

/// What a waiter's watch of the permit record has seen: every slot holder since it began, so
/// that the waiters left can be counted without asking anyone (`waiters`).
#[derive(Default)]
struct Watch {
    seen: BTreeSet<String>,
    holding: usize,
    /// This instance's place among the members at the last check (`Members::rank`), and their
    /// number: with the record in shards, it watches and claims in its home shard
    /// (`lease::home_shard`).
    rank: Option<(usize, usize)>,
}

impl Watch {
    fn saw(&mut self, slots: &[String]) {
        self.seen.extend(slots.iter().cloned());
        self.holding = slots.len();
    }

    /// At most how many instances wait for a slot: the members less the slot holders now and those
    /// seen holding one that have let it go since (they are done). Too many when some members were
    /// never asked (the watch is then slower, never busier); too few only if a finished instance
    /// is asked again meanwhile.
    fn waiters(&self, members: usize) -> usize {
        let done = self.seen.len().saturating_sub(self.holding);
        members.saturating_sub(self.holding + done).max(1)
    }
}

/// One strict check's answer.
enum StrictCheck {
    /// This instance is in Standby already: no permit needed.
    InStandby,
    Allowed(Decision, Observation, Box<Permit>),
    /// A permit was free, but quorum does not hold; it is released already.
    Wait(Verdict),
    /// Another instance was granted a permit less than the pacing gap ago: ask again after this.
    Paced(Duration),
    /// Every slot is held.
    Full {
        holders: Vec<String>,
        permits: usize,
    },
}

/// How leaving ended when it did not fail.
enum Left {
    Done,
    DryRun(Verdict),
    /// Peers left at the same time (non-strict recheck): registered again, back to the gate.
    Raced(Verdict),
    /// Strict mode: the registration calls stayed throttled (the fleet's shared budget is spent):
    /// back in every attachment, permit released, back to the gate.
    Throttled(Verdict),
}

impl<L: LoadBalancer, M: Membership, S: Services> Cycle<L, M, S> {
    /// A cycle with the default rule (quorum 0.75, at least 1 other serving) and timings, not a
    /// dry run, not strict.
    pub fn new(
        lbs: Vec<L>,
        members: M,
        services: S,
        me: impl Into<String>,
        state: StateFile,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Cycle {
            lbs,
            members,
            services,
            me: me.into(),
            rule: Rule { quorum_ppm: 750_000, min_in_service: crate::config::DEFAULT_MIN_IN_SERVICE },
            timing: Timing::default(),
            dry_run: false,
            state,
            shutdown,
            permits: None,
            leave_via: LeaveVia::Deregister,
            zone_quorum_ppm: None,
            clock: crate::clock::WallClock::System,
            metrics: None,
            hooks: Hooks::default(),
            cursor: std::sync::Mutex::new(None),
            from_group: false,
            batch: false,
            view_read: std::sync::Mutex::new(None),
            sized_from: std::sync::Mutex::new(None),
        }
    }

    /// The same cycle over another membership source.
    pub fn with_members<N: Membership>(self, members: N) -> Cycle<L, N, S> {
        Cycle {
            lbs: self.lbs,
            members,
            services: self.services,
            me: self.me,
            rule: self.rule,
            timing: self.timing,
            dry_run: self.dry_run,
            state: self.state,
            shutdown: self.shutdown,
            permits: self.permits,
            leave_via: self.leave_via,
            zone_quorum_ppm: self.zone_quorum_ppm,
            clock: self.clock,
            metrics: self.metrics,
            hooks: self.hooks,
            cursor: self.cursor,
            from_group: self.from_group,
            batch: self.batch,
            view_read: self.view_read,
            sized_from: self.sized_from,
        }
    }

    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Strict mode: deregister and register through the cluster's batches
    /// (`--batch-registrations`; without a permit store it changes nothing).
    pub fn with_batch_registrations(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }

    /// Strict mode: the shared view's item as the process just read it before its first check
    /// (`--members asg` takes the group's attachments from it: `start::group_at_start`). The
    /// first check takes that read instead of reading the item again when it comes within
    /// `VIEW_POLL` (a one-shot restart; not a listener's request hours later): a fleet asked at
    /// once would otherwise read the item twice in its first second, each read charged its size.
    pub fn with_view_read(self, read: Shared) -> Self {
        *self.view_read.lock().unwrap() = Some((Instant::now(), read));
        self
    }

    /// The attachments are the Auto Scaling group's: every check compares them with the group's.
    pub fn with_attachments_from_group(mut self, from_group: bool) -> Self {
        self.from_group = from_group;
        self
    }

    fn hook_context(&self, programs: &[String]) -> HookContext {
        HookContext { instance_id: self.me.clone(), programs: programs.to_vec(), attachments: self.attachments() }
    }

    /// `--ready-check`, retried every poll interval until it passes or `--ready-timeout`; on
    /// failure the instance stays out, loudly (the state file says so for the next start).
    async fn ready_check(&self, record: &Record) -> Result<(), CycleError> {
        if self.hooks.ready_check.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let ctx = self.hook_context(&record.programs);
        loop {
            match hooks::run(&self.hooks, Phase::ReadyCheck, &ctx).await {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() + self.timing.poll_interval < self.hooks.ready_timeout => {
                    warn!(error = %e, "--ready-check did not pass yet; trying again");
                    tokio::time::sleep(self.timing.poll_interval).await;
                }
                Err(source) => {
                    self.state.save(&Record { step: Step::ServicesDown, pid: std::process::id(), ..record.clone() })?;
                    let e = CycleError::NotReady {
                        lb: labels(&record.attachments),
                        instance: self.me.clone(),
                        programs: record.programs.join(" "),
                        after: started.elapsed(),
                        source: Box::new(source),
                    };
                    error!("{}", chain(&e));
                    return Err(e);
                }
            }
        }
    }

    /// `--after-return`: a failure is logged, the cycle is done either way.
    async fn after_return(&self, programs: &[String]) {
        if let Err(e) = hooks::run(&self.hooks, Phase::AfterReturn, &self.hook_context(programs)).await {
            warn!(error = %chain(&e), "--after-return failed (the instance is back in service)");
        }
    }

    pub fn with_metrics(mut self, metrics: Option<std::sync::Arc<crate::metrics::Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Records one quorum check: its refusal, and whether this instance served everywhere.
    fn count_check(&self, decision: Option<&Decision>, listed: Option<&[Vec<TargetHealth>]>) {
        let Some(m) = &self.metrics else { return };
        let refused = decision.filter(|d| !d.may_leave()).map(|d| d.overall.reason.as_str());
        let in_service = listed.map(|l| {
            l.iter().all(|attachment| attachment.iter().any(|h| h.target.instance_id == self.me && h.serving()))
        });
        m.check(refused, in_service);
    }

    pub fn with_clock(mut self, clock: crate::clock::WallClock) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_leave_via(mut self, via: LeaveVia) -> Self {
        self.leave_via = via;
        self
    }

    pub fn with_zone_quorum(mut self, ppm: Option<u32>) -> Self {
        self.zone_quorum_ppm = ppm;
        self
    }

    pub fn with_rule(mut self, rule: Rule) -> Self {
        self.rule = rule;
        self
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    pub fn with_permits(mut self, permits: Option<Permits>) -> Self {
        self.permits = permits;
        self
    }

    /// Every attachment's label, for logs.
    pub fn attachments(&self) -> String {
        self.lbs.iter().map(|l| l.label()).collect::<Vec<_>>().join(", ")
    }

    /// Looks every attachment up (a target group's ARN); `NotFound` is a configuration error.
    pub async fn resolve(&self) -> Result<(), CycleError> {
        for lb in &self.lbs {
            lb.resolve().await?;
        }
        Ok(())
    }

    /// Every attachment's targets, in order.
    async fn read_targets(&self) -> Result<Vec<Vec<TargetHealth>>, CycleError> {
        let mut listed = Vec::with_capacity(self.lbs.len());
        for lb in &self.lbs {
            listed.push(lb.targets().await?);
        }
        Ok(listed)
    }

    /// Members and every attachment's health, as one observation.
    pub async fn observe(&self) -> Result<Observation, CycleError> {
        let roster = self.members.members().await?;
        Ok(Observation { roster, listed: self.read_targets().await? })
    }

    /// The quorum decision over every attachment, with `holders` (strict mode's other permit
    /// holders) counted out of service.
    pub fn decide(&self, obs: &Observation, known_down: bool, holders: &BTreeSet<String>) -> Decision {
        combine(self.verdicts(obs, known_down, holders, decide))
    }

    fn verdicts(
        &self,
        obs: &Observation,
        known_down: bool,
        holders: &BTreeSet<String>,
        rule_of: fn(&Snapshot, &Rule) -> Verdict,
    ) -> Vec<Verdict> {
        self.lbs
            .iter()
            .zip(&obs.listed)
            .map(|(lb, listed)| {
                let mut serving = serving_ids(listed, &self.me);
                serving.retain(|id| !holders.contains(id));
                let snapshot = Snapshot {
                    members: obs.roster.members.clone(),
                    serving,
                    me: self.me.clone(),
                    known_down,
                    zone: self.zone(&obs.roster),
                };
                Verdict { attachment: lb.label(), ..rule_of(&snapshot, &self.rule) }
            })
            .collect()
    }

    /// This instance's zone for the per-zone rule, when `--zone-quorum` is set and the membership
    /// source knows the zone.
    fn zone(&self, roster: &Roster) -> Option<Zone> {
        let quorum_ppm = self.zone_quorum_ppm?;
        let (name, members) = roster.zone_of(&self.me)?;
        Some(Zone { name: name.to_owned(), members, quorum_ppm })
    }

    /// What leaving would take out: this instance's targets in every attachment. Refuses, with
    /// nothing changed, a target group that does not list this instance and a target that can
    /// never serve again.
    pub fn plan(&self, obs: &Observation) -> Result<Vec<Taken>, CycleError> {
        if let Some(group) = obs.roster.group.as_ref().filter(|_| self.from_group) {
            let label = |specs: &mut Vec<String>| {
                specs.sort();
                specs.join(", ")
            };
            let now = label(&mut group.attachments().iter().map(|a| a.to_string()).collect());
            let then = label(
                &mut self
                    .lbs
                    .iter()
                    .map(|l| AttachmentSpec { kind: l.spec().kind, name: l.id() }.to_string())
                    .collect(),
            );
            if now != then {
                return Err(CycleError::GroupChanged { group: group.name.clone(), now, then });
            }
        }
        let mut plan = Vec::with_capacity(self.lbs.len());
        for (lb, listed) in self.lbs.iter().zip(&obs.listed) {
            if let Some(h) =
                listed.iter().find(|h| h.target.instance_id == self.me && h.state == TargetState::NeverHeals)
            {
                return Err(CycleError::NeverHeals {
                    lb: lb.label(),
                    target: h.target.to_string(),
                    raw: h.raw.clone(),
                });
            }
            let targets = lb.own_targets(&self.me, listed);
            if targets.is_empty() {
                return Err(CycleError::NotRegistered { lb: lb.label(), instance: self.me.clone() });
            }
            plan.push(Taken { kind: lb.spec().kind, id: lb.id(), name: lb.spec().name.clone(), targets });
        }
        Ok(plan)
    }

    /// Whether this instance serves in any attachment.
    fn serving_anywhere(&self, listed: &[Vec<TargetHealth>]) -> bool {
        listed.iter().flatten().any(|h| h.target.instance_id == self.me && h.serving())
    }

    /// Sleeps `d`, or returns false early when shutdown is requested.
    async fn pause(&self, d: Duration) -> bool {
        let mut rx = self.shutdown.clone();
        if *rx.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = rx.wait_for(|s| *s) => false,
        }
    }

    async fn gate(&self, req: &RestartRequest, first_check: u32) -> Result<Gate, CycleError> {
        let mut check = first_check;
        let mut settled = false;
        loop {
            if !settled {
                check += 1;
            }
            let mut slot = None;
            let decided = match self.observe().await {
                Ok(obs) if obs.roster.in_standby(&self.me) => return Ok(Gate::InStandby),
                Ok(obs) => {
                    slot = settle_slot(&obs.roster.members, &self.me);
                    self.plan(&obs)?;
                    Some((self.decide(&obs, req.serves_nothing(), &BTreeSet::new()), obs))
                }
                Err(CycleError::Lb(e)) if e.is_retryable() => {
                    if let (Some(m), LbError::Throttled { .. }) = (&self.metrics, &e) {
                        m.throttled();
                    }
                    warn!(attachments = %self.attachments(), check, error = %e, "quorum check failed; counts as a failed check");
                    None
                }
                Err(CycleError::Members(e)) if e.is_retryable() => {
                    warn!(members = %self.members.describe(), check, error = %e, "reading the members failed; counts as a failed check");
                    None
                }
                Err(e) => return Err(e),
            };
            self.count_check(decided.as_ref().map(|(d, _)| d), decided.as_ref().map(|(_, o)| o.listed.as_slice()));
            if let Some((d, _)) = &decided {
                let v = &d.overall;
                info!(attachments = %self.attachments(), instance_id = %self.me, check, max_checks = self.timing.max_checks, may_leave = v.may_leave, reason = ?v.reason, "quorum check: {}", v.summary());
            }
            if let Some((d, obs)) = decided {
                let v = &d.overall;
                if v.may_leave && (settled || v.reason != Reason::QuorumHolds || self.timing.settle.is_zero()) {
                    return Ok(Gate::Allowed { decision: d, observation: obs, checks: check, permit: None });
                }
                if v.may_leave {
                    settled = true;
                    let wait = settle_wait(self.timing.settle, slot, self.clock.now());
                    if !self.pause(wait).await {
                        return Ok(Gate::Aborted);
                    }
                    continue;
                }
                settled = false;
                if check >= self.timing.max_checks {
                    return Ok(Gate::GaveUp { verdict: d.overall, checks: check });
                }
            } else {
                settled = false;
                if check >= self.timing.max_checks {
                    return Err(CycleError::Lb(LbError::Unreachable {
                        lb: self.attachments(),
                        action: "quorum check",
                        detail: format!("no check succeeded in {check}"),
                    }));
                }
            }
            if !self.pause(jitter(self.timing.check_interval)).await {
                return Ok(Gate::Aborted);
            }
        }
    }

    /// The strict gate: each check takes a permit first, then reads the shared view (read after
    /// the grant) with every other holder counted out. Errors of the permit store fail closed: a
    /// failed check. Instances asked at once spread their first check; waiters check less often in
    /// a larger cluster (`FIRST_CHECKS_PER_S`, `WAITER_CHECKS_PER_S`).
    async fn strict_gate(&self, permits: &Permits, req: &RestartRequest, first_check: u32) -> Result<Gate, CycleError> {
        let mut check = first_check;
        // Between checks a waiter refused a slot watches the record; a check it makes because the
        // watch saw a slot free, and that finds every slot taken again (another waiter was first),
        // is not counted: the checks stay `--check-interval` apart, as without the watch.
        let (mut watch, mut watched, mut next_check) = (Watch::default(), false, Instant::now());
        let mut members = match self.view_for_limit(permits).await {
            Ok((v, _, _)) => v.roster.members.len(),
            Err(CycleError::Lease(e)) if !e.is_retryable() => return Err(CycleError::Lease(e)),
            Err(_) => 0,
        };
        let limit = self.rule.permits(members);
        if record_beyond_item(permits.leave_rate, limit) {
            let rate = permits.leave_rate;
            warn!(members, permits = limit, leave_rate = rate, "--leave-rate {rate} with {limit} permits: the permit record's writes may exceed what one DynamoDB item takes (measured within up to {PERMITS_WITHIN_ITEM} permits at any pace, and at {PACE_WITHIN_ITEM} per second or slower at any size; without a pace the record is spread over several items); DynamoDB then throttles some of them and checks fail closed, slower");
        }
        let spread = Duration::from_secs_f64(members as f64 / FIRST_CHECKS_PER_S);
        if !spread.is_zero() && !self.pause(spread.mul_f64(fastrand::f64())).await {
            return Ok(Gate::Aborted);
        }
        loop {
            check += 1;
            let mut raced = false;
            let last = match self.strict_check(permits, req, &mut members, &mut watch.rank).await {
                Ok(StrictCheck::InStandby) => return Ok(Gate::InStandby),
                Ok(StrictCheck::Paced(wait)) => {
                    // Not a verdict: the cluster is leaving at its pace. Ask again after the gap,
                    // each waiter at its own moment within the window the fleet's waiters check in
                    // (so a large fleet does not come back at once); this does not use up a check.
                    check -= 1;
                    let window = PACED_SPREAD.max(Duration::from_secs_f64(members as f64 / WAITER_CHECKS_PER_S));
                    if !self.pause(wait + window.mul_f64(fastrand::f64())).await {
                        return Ok(Gate::Aborted);
                    }
                    continue;
                }
                Ok(StrictCheck::Allowed(decision, observation, permit)) => {
                    self.count_check(Some(&decision), Some(&observation.listed));
                    if let Some(m) = &self.metrics {
                        m.permit(true);
                    }
                    info!(attachments = %self.attachments(), instance_id = %self.me, check, kind = permit.kind().as_str(), holders = permit.others.len(), reason = ?decision.overall.reason, "quorum check with permit: {}; leaving", decision.overall.summary());
                    return Ok(Gate::Allowed { decision, observation, checks: check, permit: Some(permit) });
                }
                Ok(StrictCheck::Wait(verdict)) => {
                    if let Some(m) = &self.metrics {
                        m.check(Some(verdict.reason.as_str()), None);
                    }
                    info!(attachments = %self.attachments(), instance_id = %self.me, check, max_checks = self.timing.max_checks, reason = ?verdict.reason, "quorum check with permit: {}; permit released, waiting", verdict.summary());
                    Ok(Gate::GaveUp { verdict, checks: check })
                }
                Ok(StrictCheck::Full { holders, permits }) if watched => {
                    check -= 1;
                    raced = true;
                    debug!(instance_id = %self.me, "a slot seen free was taken by another waiter first: {}", held_by(&holders));
                    Ok(Gate::NoPermit { holders, permits, checks: check })
                }
                Ok(StrictCheck::Full { holders, permits }) => {
                    if let Some(m) = &self.metrics {
                        m.check(Some("no-permit"), None);
                    }
                    info!(attachments = %self.attachments(), instance_id = %self.me, check, max_checks = self.timing.max_checks, permits, "no free permit: {}", held_by(&holders));
                    Ok(Gate::NoPermit { holders, permits, checks: check })
                }
                Err(CycleError::Lease(e)) if e.is_retryable() => {
                    warn!(check, error = %e, "taking a permit failed; counts as a failed check (strict mode fails closed)");
                    Err(CycleError::NoPermit { checks: check, source: e })
                }
                Err(CycleError::Lb(e)) if e.is_retryable() => {
                    if let (Some(m), LbError::Throttled { .. }) = (&self.metrics, &e) {
                        m.throttled();
                    }
                    warn!(attachments = %self.attachments(), check, error = %e, "quorum check failed; counts as a failed check");
                    Err(CycleError::Lb(e))
                }
                Err(CycleError::Members(e)) if e.is_retryable() => {
                    warn!(members = %self.members.describe(), check, error = %e, "reading the members failed; counts as a failed check");
                    Err(CycleError::Members(e))
                }
                Err(e) => return Err(e),
            };
            if check >= self.timing.max_checks {
                if let Err(CycleError::NoPermit { .. }) = last {
                    // A write whose reply was lost may have left an entry: best effort, else it expires.
                    let _ = permits.remove_mine().await;
                }
                return last;
            }
            if !raced {
                let interval =
                    self.timing.check_interval.max(Duration::from_secs_f64(members as f64 / WAITER_CHECKS_PER_S));
                next_check = Instant::now() + jitter(interval);
            }
            watched = matches!(last, Ok(Gate::NoPermit { .. }));
            let go_on = match watched {
                true => self.watch(permits, members, next_check, &mut watch).await,
                false => self.pause(next_check - Instant::now()).await,
            };
            if !go_on {
                return Ok(Gate::Aborted);
            }
            // A watch that ran to the next check's time saw no slot free: that check is counted.
            watched = watched && Instant::now() < next_check;
        }
    }

    /// Strict mode, refused a slot: reads the permit record until one is free (true, at once) or
    /// until `until` (true); false when asked to stop. Read failures are left to the next check.
    async fn watch(&self, permits: &Permits, members: usize, until: Instant, watch: &mut Watch) -> bool {
        // With the record in shards, the home shard alone: its members, its share of L.
        let shards = permits.shards_seen();
        let all = self.rule.permits(members);
        let home = watch.rank.filter(|_| shards > 1).map(|(r, m)| home_shard(r, m, all, shards));
        let (members, limit) = match home {
            Some(h) => (home_members(members, all, shards, h), shard_limit(all, shards, h)),
            None => (members, all),
        };
        loop {
            let now = Instant::now();
            if now >= until {
                return true;
            }
            let every = WATCH_EVERY.max(Duration::from_secs_f64(watch.waiters(members) as f64 / WATCH_READS_PER_S));
            if !self.pause(jitter(every).min(until - now)).await {
                return false;
            }
            if Instant::now() >= until {
                return true;
            }
            let read = match home {
                Some(h) => permits.read_shard(h).await,
                None => permits.read().await,
            };
            if let Ok(record) = read {
                let now = permits.now();
                let slots = record.other_slots(&self.me, now, permits.grace);
                watch.saw(&slots);
                // What an acquire would do with this record: every slot held, or the pace's
                // window full, is only another refusal.
                let probe = Holder { tok: String::new(), exp: now, since: now, kind: Kind::Slot };
                let would = plan(Some(&record), &self.me, probe, limit, now, permits.grace, permits.leave_rate);
                if matches!(would, Plan::Refuse { .. } | Plan::Paced { .. }) {
                    continue;
                }
                // Every waiter that reads a slot free before the first claim lands claims it, and
                // all but one conflict: each goes with a chance of the free slots over the reads
                // the waiters make in `WATCH_CLAIM_WINDOW` (the others read again soon).
                let free = limit.saturating_sub(slots.len());
                let reads = watch.waiters(members) as f64 / every.as_secs_f64() * WATCH_CLAIM_WINDOW.as_secs_f64();
                if fastrand::f64() * reads.max(1.0) < free as f64 {
                    return true;
                }
            }
        }
    }

    /// One strict check: the shared view (members, for L) → permit → a view read after the grant
    /// → decision. A slot refused to an instance that serves nothing already becomes an exempt
    /// entry; an exempt instance found serving again loses the exemption and tries for a slot once.
    async fn strict_check(
        &self,
        permits: &Permits,
        req: &RestartRequest,
        members: &mut usize,
        rank: &mut Option<(usize, usize)>,
    ) -> Result<StrictCheck, CycleError> {
        let (seen, seen_at, seen_n) = self.view_for_limit(permits).await?;
        *members = seen.roster.members.len();
        *rank = seen.roster.members.rank(&self.me).map(|r| (r, *members));
        if seen.roster.in_standby(&self.me) {
            return Ok(StrictCheck::InStandby);
        }
        let limit = self.rule.permits(seen.roster.members.len());
        let mut kind = if req.serves_nothing() { Kind::Exempt } else { Kind::Slot };
        let mut exemption_lost = false;
        loop {
            let mut permit = match permits.acquire(kind, limit, *rank).await? {
                Acquired::Granted(p) => p,
                Acquired::Paced { wait } => return Ok(StrictCheck::Paced(wait)),
                Acquired::Refused { holders } => {
                    if exemption_lost {
                        return Ok(StrictCheck::Full { holders, permits: limit });
                    }
                    // Whether this instance serves, from a view at most `EXEMPTION_VIEW_AGE` old:
                    // the stored one when it is (the head says), else the next one published.
                    let exemption_age = EXEMPTION_VIEW_AGE.as_millis() as u64;
                    let old = |at: u64| permits.now().saturating_sub(at) > exemption_age;
                    let listed = if old(seen_at) {
                        let head = permits.head().await?;
                        let after_n = head.as_ref().filter(|h| old(h.at)).map_or(seen_n, |h| h.n.max(seen_n));
                        self.shared_view(permits, After::default(), after_n, Some(head)).await?.0.listed
                    } else {
                        seen.listed.clone()
                    };
                    if self.serving_anywhere(&listed) {
                        return Ok(StrictCheck::Full { holders, permits: limit });
                    }
                    info!(instance_id = %self.me, "no free slot, but every attachment counts this instance out: taking an exempt entry");
                    kind = Kind::Exempt;
                    continue;
                }
            };
            // Read after the permit was granted: only this view may let the instance leave.
            let (view, n) = match self.shared_view(permits, permit.after, 0, None).await {
                Ok(v) => v,
                Err(e) => {
                    permit.release().await;
                    return Err(e);
                }
            };
            if view.roster.in_standby(&self.me) {
                permit.release().await;
                return Ok(StrictCheck::InStandby);
            }
            let obs = Observation { roster: view.roster.clone(), listed: view.listed.clone() };
            if let Err(e) = self.plan(&obs) {
                permit.release().await;
                return Err(e);
            }
            // The holders to count out, read after the view: one that let its permit go since the
            // grant was back in service before it did (the view shows it so, or out: counted out
            // either way), and one granted since is counted out whatever the view shows. Counting
            // the holders at the grant instead would count an instance that took a freed slot
            // and already left twice with the one it replaced (out in the view, and a holder).
            permit.others = match permits.read().await {
                Ok(r) => crate::lease::others(&r, &self.me, permits.now(), permits.grace),
                Err(e) => {
                    permit.release().await;
                    return Err(e.into());
                }
            };
            let decision = self.decide(&obs, req.serves_nothing(), &permit.others);
            if permit.kind() == Kind::Exempt && self.serving_anywhere(&obs.listed) && !req.serves_nothing() {
                info!(instance_id = %self.me, "this instance serves again: exemption dropped");
                permit.release().await;
                kind = Kind::Slot;
                exemption_lost = true;
                continue;
            }
            if decision.may_leave() {
                *self.cursor.lock().unwrap() =
                    Some(Cursor { need: permit.after, last_n: n, timings: view.timings, toucher: permit.toucher() });
                return Ok(StrictCheck::Allowed(decision, obs, permit));
            }
            permit.release().await;
            return Ok(StrictCheck::Wait(decision.overall));
        }
    }

    /// Strict mode: a view recent enough to size the cluster (L) and to tell whether this instance
    /// serves: the one the last check sized it from, or the shared one, when at most
    /// `VIEW_MAX_AGE` old, else a fresh one. Returns it with when it was read (Unix ms, its
    /// reader's clock) and its publication number. A waiter checking again thus reads nothing
    /// here: at a wave's end every new holder's check would otherwise read the whole view (about
    /// 16 KB at K = 1,000) in the same second as its read after the grant.
    async fn view_for_limit(&self, permits: &Permits) -> Result<(View, u64, u64), CycleError> {
        let start_read = self.view_read.lock().unwrap().take();
        let max_age = VIEW_MAX_AGE.as_millis() as u64;
        if start_read.is_none() {
            let last = self.sized_from.lock().unwrap().clone();
            if let Some(last) = last.filter(|(_, at, _)| permits.now().saturating_sub(*at) <= max_age) {
                return Ok(last);
            }
        }
        let current = match start_read.filter(|(at, _)| at.elapsed() < VIEW_POLL) {
            Some((_, read)) => Some(read),
            None => permits.shared().await?,
        };
        let sized = match current {
            Some(s) if is_fresh(&s, permits.now()) => {
                (View::decode(&s.data).map_err(|d| self.malformed_view(permits, d))?, s.at, s.n)
            }
            s => {
                let after_n = s.as_ref().map_or(0, |s| s.n);
                let (view, n) = self.shared_view(permits, After::default(), after_n, Some(s)).await?;
                (view, permits.now(), n)
            }
        };
        *self.sized_from.lock().unwrap() = Some(sized.clone());
        Ok(sized)
    }

    fn malformed_view(&self, permits: &Permits, detail: String) -> CycleError {
        CycleError::Lease(LeaseError::Malformed {
            table: permits.store.table().into(),
            key: crate::lease::view_key(&permits.key),
            detail,
        })
    }

    /// Strict mode: a shared view read after the permit write `need` and published
    /// after publication `after_n`, with its publication number. When the stored one is not, this
    /// instance refreshes it if the refresh lease is free (members, every attachment's targets, and
    /// their timings when older than `TIMINGS_MAX_AGE`), else waits for the instance that holds
    /// the lease; within `VIEW_WAIT`. `read`: the view's item, or its head, as the caller just read
    /// it, if it did (at a fleet's restart every instance reads the view at once: a second read
    /// would double that second's cost, each read charged the item's size). Then it polls the head
    /// (`Permits::head`: about 100 bytes) and reads the view only when the head names a
    /// publication it can use; the view itself must then say so too (an eventually consistent
    /// read may still return the one before it): the head only saves reads, it decides nothing.
    async fn shared_view(
        &self,
        permits: &Permits,
        need: After,
        after_n: u64,
        read: Option<Option<Shared>>,
    ) -> Result<(View, u64), CycleError> {
        let deadline = Instant::now() + VIEW_WAIT;
        let (mut spread, mut known) = (false, read);
        loop {
            let current = match known.take() {
                Some(held) => held,
                None => permits.head().await?,
            };
            let usable = |s: &Shared| s.n > after_n && s.read_after(need);
            if current.as_ref().is_some_and(usable) {
                let item = match current.as_ref().filter(|s| !s.data.is_empty()) {
                    Some(s) => Some(s.clone()),
                    None => permits.shared().await?,
                };
                if let Some(s) = item.filter(|s| usable(s) && !s.data.is_empty()) {
                    let view = View::decode(&s.data).map_err(|d| self.malformed_view(permits, d))?;
                    return Ok((view, s.n));
                }
            }
            // Take the refresh only when the item says nobody holds it (so that a crowd of
            // pollers does not write at once); the cluster's first view in a while (none yet, or
            // one older than `VIEW_MAX_AGE`: instances asked at once all find it so) waits a random
            // moment first, so that they do not all try, in a window sized by the stale view's
            // members (they all read the item again after it).
            let max_age = VIEW_MAX_AGE.as_millis() as u64;
            if !spread && current.as_ref().is_none_or(|s| permits.now().saturating_sub(s.at) > max_age) {
                spread = true;
                first_view_pause(current.as_ref()).await;
                continue;
            }
            let mine = current.as_ref().is_some_and(|s| s.lease_holder == permits.me);
            let free = current.as_ref().is_none_or(|s| s.lease_free(&permits.me, permits.now()));
            if free && permits.lease_view(self.view_lease()).await? {
                return self.refresh_view(permits, current.as_ref()).await;
            }
            if Instant::now() >= deadline {
                return Err(CycleError::Lease(LeaseError::Unavailable {
                    table: permits.store.table().into(),
                    action: "shared view",
                    detail: format!(
                        "no view read after version {} of shard {} within {} s",
                        need.ver,
                        need.shard,
                        VIEW_WAIT.as_secs()
                    ),
                }));
            }
            // The lease's holder refreshes again as soon as its lease ends (nobody else publishes
            // meanwhile, so the item need not be read again; a take that failed reads it again):
            // while one holder waits for a view, the fleet sees one every `VIEW_REFRESH`.
            if mine && !free {
                let left = current.as_ref().map_or(0, |s| s.lease_until.saturating_sub(permits.now()));
                if left < VIEW_POLL.as_millis() as u64 {
                    tokio::time::sleep(Duration::from_millis(left + 1)).await;
                    known = Some(current);
                    continue;
                }
            }
            tokio::time::sleep(jitter(VIEW_POLL)).await;
        }
    }

    /// The refresh lease's length: `VIEW_REFRESH` per attachment.
    fn view_lease(&self) -> Duration {
        VIEW_REFRESH * self.lbs.len().max(1) as u32
    }

    /// Reads the members and every attachment's targets (and their timings when `current`'s are
    /// older than `TIMINGS_MAX_AGE`) and publishes them, holding the refresh lease; returns the
    /// view with its publication number. `current`: the view's item or its head as last read
    /// (when it is the head, the view's item is read for the timings and the publication number).
    async fn refresh_view(&self, permits: &Permits, current: Option<&Shared>) -> Result<(View, u64), CycleError> {
        let vers = permits.read().await?.vers;
        let at = permits.now();
        let fetched;
        let last = match current.filter(|s| !s.data.is_empty()) {
            Some(s) => Some(s),
            None => {
                fetched = permits.shared().await?;
                fetched.as_ref()
            }
        };
        // The head never names a later publication than the view's item holds.
        let n = current.into_iter().chain(last).map(|s| s.n).max().unwrap_or(0) + 1;
        let max_age = TIMINGS_MAX_AGE.as_millis() as u64;
        let previous = last
            .and_then(|s| View::decode(&s.data).ok())
            .filter(|v| v.timings.len() == self.lbs.len() && at.saturating_sub(v.timings_at) < max_age);
        let roster = self.members.members().await?;
        let listed = self.read_targets().await?;
        let (timings, timings_at) = match previous {
            Some(v) => (v.timings, v.timings_at),
            None => (self.timings().await?, at),
        };
        let view = View { roster, listed, timings, timings_at };
        permits.publish_view(&vers, at, view.encode(), n).await?;
        Ok((view, n))
    }

    /// Strict mode: publishes a view now, for the processes waiting on one at their start
    /// (`start::group_at_start`: this process took the refresh lease to look the Auto Scaling
    /// group up for them). Under that lease while it lasts, else under a new one; nothing when
    /// another instance holds it by now (it publishes).
    pub async fn prime_view(&self) -> Result<(), CycleError> {
        let Some(permits) = &self.permits else { return Ok(()) };
        let current = permits.head().await?;
        let held = current.as_ref().is_some_and(|s| s.lease_holder == permits.me && s.lease_until > permits.now());
        if held || permits.lease_view(self.view_lease()).await? {
            self.refresh_view(permits, current.as_ref()).await?;
        }
        Ok(())
    }

    /// One poll round's targets for every attachment from the shared view (one published after
    /// the last round's) while a permit is held; `None` otherwise (read each attachment).
    async fn shared_round(&self) -> Option<Result<Vec<Vec<TargetHealth>>, CycleError>> {
        let cursor = self.cursor.lock().unwrap().clone()?;
        let permits = self.permits.as_ref()?;
        Some(self.shared_view(permits, cursor.need, cursor.last_n, None).await.map(|(view, n)| {
            if let Some(c) = self.cursor.lock().unwrap().as_mut() {
                c.last_n = n;
            }
            view.listed
        }))
    }

    /// Attachment `i`'s targets this round: from the shared view when there is one.
    async fn round_targets(
        &self,
        i: usize,
        shared: &Option<Result<Vec<Vec<TargetHealth>>, CycleError>>,
    ) -> Result<Vec<TargetHealth>, LbError> {
        let lb = &self.lbs[i];
        match shared {
            None => lb.targets().await,
            Some(Ok(all)) => Ok(all.get(i).cloned().unwrap_or_default()),
            Some(Err(e)) => Err(LbError::Unreachable { lb: lb.label(), action: "shared view", detail: chain(e) }),
        }
    }

    fn record(&self, step: Step, programs: &[String], taken: &[Taken], since: u64, group: Option<&str>) -> Record {
        Record {
            step,
            instance_id: self.me.clone(),
            via: self.leave_via,
            group: group.map(str::to_owned),
            attachments: taken.to_vec(),
            programs: programs.to_vec(),
            since,
            pid: std::process::id(),
        }
    }

    /// Runs one gated restart of `req.programs`, and records how it ended in the metrics.
    pub async fn run(&self, req: &RestartRequest) -> Result<Outcome, CycleError> {
        let result = self.run_cycle(req).await;
        if let Some(m) = &self.metrics {
            let (outcome, summary, in_service) = match &result {
                Ok(Outcome::Done(s)) => ("done", Some(s), Some(true)),
                Ok(Outcome::DryRun(_)) => ("dry-run", None, None),
                Ok(Outcome::GaveUp { .. }) => ("gave-up", None, None),
                Ok(Outcome::NoPermit { .. }) => ("no-permit", None, None),
                Ok(Outcome::Aborted) => ("aborted", None, None),
                Err(e) if e.left_out() => ("left-out", None, Some(false)),
                Err(_) => ("failed", None, None),
            };
            m.cycle_end(outcome, summary, in_service);
        }
        result
    }

    async fn run_cycle(&self, req: &RestartRequest) -> Result<Outcome, CycleError> {
        let programs: Vec<String> = req.programs.iter().cloned().collect();
        let started = Instant::now();
        self.services.validate(&programs).await?;
        // Strict mode resolves when it first reads an attachment (the view's refresh, or the
        // holder before leaving): a fleet asked at once does not look its target groups up at once.
        if self.permits.is_none() {
            self.resolve().await?;
        }
        let mut summary = Summary { programs: programs.clone(), ..Default::default() };
        let mut checks = 0;
        loop {
            let gate = match &self.permits {
                Some(permits) => self.strict_gate(permits, req, checks).await?,
                None => self.gate(req, checks).await?,
            };
            let (decision, observation, permit) = match gate {
                Gate::Allowed { decision, observation, checks: used, permit } => {
                    checks = used;
                    (decision, observation, permit)
                }
                Gate::GaveUp { verdict, checks } => {
                    warn!(attachments = %self.attachments(), instance_id = %self.me, checks, "giving up: quorum not reached after {checks} checks ({}); nothing changed", verdict.summary());
                    return Ok(Outcome::GaveUp { verdict, checks });
                }
                Gate::NoPermit { holders, permits, checks } => {
                    warn!(attachments = %self.attachments(), instance_id = %self.me, checks, "giving up: no free permit after {checks} checks ({}); nothing changed", held_by(&holders));
                    return Ok(Outcome::NoPermit { holders, permits, checks });
                }
                Gate::Aborted => {
                    info!("shutdown requested while waiting for quorum; nothing changed");
                    return Ok(Outcome::Aborted);
                }
                Gate::InStandby => return self.restart_in_standby(&programs, started, summary).await,
            };
            summary.checks = checks;
            summary.waited_for_quorum = started.elapsed();
            let left = self.leave(&programs, &decision, &observation, permit.as_deref(), &mut summary).await;
            *self.cursor.lock().unwrap() = None;
            if let Some(permit) = permit {
                permit.release().await;
            }
            match left? {
                Left::Done => {
                    summary.total = started.elapsed();
                    info!(
                        attachments = %self.attachments(),
                        instance_id = %self.me,
                        programs = %programs.join(" "),
                        waited_s = summary.waited_for_quorum.as_secs_f64(),
                        drain_s = summary.drain.as_secs_f64(),
                        restart_s = summary.restart.as_secs_f64(),
                        in_service_s = summary.back_in_service.as_secs_f64(),
                        total_s = summary.total.as_secs_f64(),
                        "cycle done: {} restarted after {} quorum check(s)",
                        programs.join(" "),
                        summary.checks
                    );
                    return Ok(Outcome::Done(summary));
                }
                Left::DryRun(verdict) => return Ok(Outcome::DryRun(verdict)),
                Left::Raced(verdict) | Left::Throttled(verdict) => {
                    if checks >= self.timing.max_checks {
                        return Ok(Outcome::GaveUp { verdict, checks });
                    }
                    if !self.pause(jitter(self.timing.check_interval)).await {
                        return Ok(Outcome::Aborted);
                    }
                }
            }
        }
    }

    /// Strict mode with `--batch-registrations`: the permits the batches go through.
    fn batched_permits(&self) -> Option<&Permits> {
        self.permits.as_ref().filter(|_| self.batch)
    }

    /// Every attachment's timings, in order.
    async fn timings(&self) -> Result<Vec<LbTimings>, CycleError> {
        let mut all = Vec::with_capacity(self.lbs.len());
        for lb in &self.lbs {
            all.push(lb.timings().await?);
        }
        Ok(all)
    }

    /// The attachment `taken` names, among this cycle's.
    fn attachment(&self, taken: &Taken) -> Option<&L> {
        self.attachment_index(taken).map(|i| &self.lbs[i])
    }

    fn attachment_index(&self, taken: &Taken) -> Option<usize> {
        self.lbs.iter().position(|l| l.spec().kind == taken.kind && (l.id() == taken.id || l.spec().name == taken.id))
    }

    /// Past the gate: deregister from every attachment → (recheck) → drain → restart → register
    /// in every attachment → serving in each. With a permit, a permit found lost before
    /// deregistering stops the cycle with nothing changed; one lost later is logged loudly and the
    /// cycle finishes (the instance must come back).
    async fn leave(
        &self,
        programs: &[String],
        decision: &Decision,
        observation: &Observation,
        permit: Option<&Permit>,
        summary: &mut Summary,
    ) -> Result<Left, CycleError> {
        if permit.is_some() {
            // The state file records target groups by ARN: look them up now (the view was read by
            // whichever instance refreshed it).
            self.resolve().await?;
        }
        let plan = self.plan(observation)?;
        if self.dry_run {
            info!(attachments = %labels(&plan), instance_id = %self.me, "dry run: would deregister {}, restart {}, register again ({}); nothing changed", targets_of(&plan), programs.join(" "), self.hooks.describe());
            return Ok(Left::DryRun(decision.overall.clone()));
        }
        // The gate may have waited minutes: the programs must still exist before we leave.
        self.services.validate(programs).await?;
        // Strict mode read the timings with the shared view.
        let shared_timings = self.cursor.lock().unwrap().as_ref().map(|c| c.timings.clone());
        let timings = match shared_timings {
            Some(t) if t.len() == self.lbs.len() => t,
            _ => self.timings().await?,
        };
        if let Some(why) = permit.and_then(Permit::lost) {
            error!(attachments = %labels(&plan), instance_id = %self.me, "permit lost before deregistering ({why}); not leaving");
            return Err(CycleError::PermitLost { why });
        }
        let group = match self.leave_via {
            LeaveVia::Standby => Some(self.standby_allowed().await?),
            LeaveVia::Deregister => None,
        };
        if let Err(source) = hooks::run(&self.hooks, Phase::BeforeLeave, &self.hook_context(programs)).await {
            error!(error = %chain(&source), "--before-leave failed; not leaving");
            return Err(CycleError::BeforeLeave { source });
        }
        let group = group.as_deref();
        let since = unix_now();
        self.state.save(&self.record(Step::Deregistering, programs, &plan, since, group))?;
        let t = Instant::now();
        match self.leave_via {
            LeaveVia::Deregister => {
                let batched = match (self.batched_permits(), permit) {
                    (Some(permits), Some(p)) => self.batched(permits, p, Way::Out, &plan).await,
                    _ => false,
                };
                if !batched && self.batched_permits().is_some() {
                    // The batches may have taken some attachments out before giving up.
                    if let Some(why) = permit.and_then(Permit::lost) {
                        error!(attachments = %labels(&plan), instance_id = %self.me, "permit lost while waiting for the batches ({why}); registering again and not leaving");
                        self.come_back(&plan, &timings).await?;
                        return Err(CycleError::PermitLost { why });
                    }
                }
                for (i, taken) in plan.iter().enumerate().filter(|_| !batched) {
                    let lb = &self.lbs[i];
                    info!(lb = %lb.label(), instance_id = %self.me, targets = %targets_of(std::slice::from_ref(taken)), "deregistering");
                    if let Err(e) = self.deregister_one(lb, taken).await {
                        if permit.is_some() && matches!(e, CycleError::Lb(LbError::Throttled { .. })) {
                            warn!(lb = %lb.label(), instance_id = %self.me, error = %e, "deregistering stayed throttled; registering again every target taken out so far, releasing the permit and waiting");
                            self.come_back(&plan[..=i], &timings).await?;
                            return Ok(Left::Throttled(decision.overall.clone()));
                        }
                        error!(lb = %lb.label(), instance_id = %self.me, error = %e, "deregistering failed; registering again every target taken out so far");
                        self.come_back(&plan[..=i], &timings).await?;
                        return Err(e);
                    }
                }
            }
            LeaveVia::Standby => {
                info!(group = ?group, instance_id = %self.me, "entering Standby (desired capacity −1)");
                if let Err(e) = self.enter_standby().await {
                    error!(group = ?group, instance_id = %self.me, error = %e, "entering Standby failed; making sure the instance is back");
                    self.come_back(&plan, &timings).await?;
                    return Err(e);
                }
            }
        }
        // Recheck only when this instance was serving: if it served nothing already (out of every
        // attachment, or its program down), its leaving took nothing from anyone, and going
        // back would only register an instance that does not serve. In strict mode the permit
        // already excludes the race the recheck looks for.
        if decision.overall.reason == Reason::QuorumHolds && permit.is_none() {
            match self.observe().await {
                Ok(obs) => {
                    // Only where this instance was serving: leaving an attachment where it was
                    // already out took nothing from it.
                    let was_serving = decision.per_attachment.iter().map(|v| v.reason == Reason::QuorumHolds);
                    let rechecked: Vec<Verdict> = self
                        .verdicts(&obs, false, &BTreeSet::new(), holds_without_me)
                        .into_iter()
                        .zip(was_serving)
                        .filter_map(|(v, serving)| serving.then_some(v))
                        .collect();
                    let recheck = combine(rechecked);
                    if !recheck.may_leave() {
                        summary.races += 1;
                        warn!(attachments = %labels(&plan), instance_id = %self.me, "peers left at the same time ({}); registering again and going back to the gate", recheck.overall.summary());
                        self.come_back(&plan, &timings).await?;
                        return Ok(Left::Raced(recheck.overall));
                    }
                }
                Err(e) => {
                    error!(error = %e, "quorum recheck after deregistering failed; registering again");
                    self.come_back(&plan, &timings).await?;
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.wait_out(&plan, &timings).await {
            self.come_back(&plan, &timings).await?;
            return Err(e);
        }
        if self.leave_via == LeaveVia::Standby {
            if let Err(e) = self.wait_lifecycle(true, &timings).await {
                self.come_back(&plan, &timings).await?;
                return Err(e);
            }
        }
        summary.drain = t.elapsed();
        info!(attachments = %labels(&plan), instance_id = %self.me, drain_s = summary.drain.as_secs_f64(), "out of every attachment");

        self.state.save(&self.record(Step::Restarting, programs, &plan, since, group))?;
        let t = Instant::now();
        if let Err(source) = self.services.restart(programs).await {
            // Healthy after all (the failure came before anything was stopped, or the programs
            // recovered)? Then they must not stay out of the load balancer.
            if matches!(self.services.running(programs).await, Ok(true)) {
                error!(error = %source, "restarting failed, but the programs are RUNNING: registering again");
                self.come_back(&plan, &timings).await?;
                return Err(source.into());
            }
            self.state.save(&self.record(Step::ServicesDown, programs, &plan, since, group))?;
            return Err(self.services_down(&plan, programs, source));
        }
        summary.restart = t.elapsed();
        info!(programs = %programs.join(" "), restart_s = summary.restart.as_secs_f64(), "programs restarted and RUNNING");

        self.ready_check(&self.record(Step::Restarting, programs, &plan, since, group)).await?;
        let t = Instant::now();
        self.state.save(&self.record(Step::Registering, programs, &plan, since, group))?;
        let batched = match (self.batched_permits(), permit) {
            (Some(permits), Some(p)) if self.leave_via == LeaveVia::Deregister => {
                self.batched(permits, p, Way::In, &plan).await
            }
            _ => false,
        };
        if batched {
            self.state.clear()?;
            self.wait_serving(&plan, &timings, (0..plan.len()).collect(), None).await?;
        } else {
            self.rejoin(self.leave_via, &plan, &timings).await?;
        }
        self.after_return(programs).await;
        summary.back_in_service = t.elapsed();
        if let Some(why) = permit.and_then(Permit::lost) {
            error!(attachments = %labels(&plan), instance_id = %self.me, "PERMIT LOST WHILE OUT OF THE LOAD BALANCER ({why}): the cycle finished, but peers may have counted this instance as serving meanwhile");
        }
        Ok(Left::Done)
    }

    /// Deregisters `taken.targets` from `lb`. A target group that answers `InvalidTarget` counts the
    /// targets out only if it then lists each of them as not registered (or not at all).
    /// A throttled call is tried again for `DEREGISTER_RETRY_FOR` (nothing is out yet, and a fleet
    /// that leaves at once shares one registration budget).
    async fn deregister_one(&self, lb: &L, taken: &Taken) -> Result<(), CycleError> {
        let mut backoff = Backoff::new();
        let result = loop {
            match lb.deregister(&taken.targets).await {
                Err(e @ LbError::Throttled { .. }) if backoff.start.elapsed() < DEREGISTER_RETRY_FOR => {
                    warn!(lb = %lb.label(), instance_id = %self.me, error = %e, "deregistering throttled; trying again in about {:?}", backoff.pause);
                    backoff.wait().await;
                }
                other => break other,
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e @ LbError::InvalidTarget { .. }) if taken.kind == AttachmentKind::TargetGroup => {
                let listed = lb.targets().await?;
                let out = taken.targets.iter().all(|t| {
                    listed.iter().find(|h| h.target == *t).is_none_or(|h| h.state == TargetState::NotRegistered)
                });
                if out {
                    warn!(lb = %lb.label(), error = %e, "the target group says the targets are not registered: counted as out");
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Polls every attachment in the same rounds until this instance's targets are out of each
    /// (absent, or neither serving nor draining), each within its own bound: the draining timeout
    /// or deregistration delay + margin (or `--drain-timeout`). Past a bound the load balancer has
    /// cut connections anyway: go on, with a warning.
    async fn wait_out(&self, plan: &[Taken], timings: &[LbTimings]) -> Result<(), CycleError> {
        let start = Instant::now();
        let bounds: Vec<Duration> = timings
            .iter()
            .map(|t| self.timing.drain_timeout.unwrap_or(t.drain.unwrap_or(Duration::ZERO) + DRAIN_MARGIN))
            .collect();
        for ((taken, t), bound) in plan.iter().zip(timings).zip(&bounds) {
            if let (AttachmentKind::TargetGroup, Some(delay)) = (taken.kind, t.drain) {
                info!(lb = %format!("{} {}", taken.kind.noun(), taken.name), delay_s = delay.as_secs(), bound_s = bound.as_secs(), "waiting for the deregistration delay: the target group shows draining for up to {} s, connections or not", delay.as_secs());
            }
        }
        let mut pending: Vec<usize> = (0..plan.len()).collect();
        loop {
            let mut still = Vec::new();
            let shared = self.shared_round().await;
            for &i in &pending {
                let (lb, taken) = (&self.lbs[i], &plan[i]);
                match self.round_targets(i, &shared).await {
                    Ok(listed) => {
                        let left: Vec<&TargetHealth> =
                            listed.iter().filter(|h| taken.targets.contains(&h.target) && !h.state.is_out()).collect();
                        match left.first() {
                            None => continue,
                            Some(h) => info!(lb = %lb.label(), target = %h.target, state = %h.raw, "draining"),
                        }
                    }
                    Err(e) if e.is_retryable() => {
                        warn!(lb = %lb.label(), error = %e, "polling deregistration failed; retrying")
                    }
                    Err(e) => return Err(e.into()),
                }
                if start.elapsed() >= bounds[i] {
                    warn!(lb = %lb.label(), instance_id = %self.me, bound_s = bounds[i].as_secs_f64(), "deregistration not confirmed within the draining bound; going on");
                    continue;
                }
                still.push(i);
            }
            pending = still;
            let Some(next_deadline) = pending.iter().map(|&i| start + bounds[i]).min() else { return Ok(()) };
            if matches!(shared, Some(Ok(_))) {
                // The next round waits for a newer shared view: that paces it.
                continue;
            }
            tokio::time::sleep(
                jitter(self.timing.poll_interval)
                    .min(next_deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))),
            )
            .await;
        }
    }

    /// Registers `taken` in every attachment, each retried while AWS is unreachable or throttles
    /// for `REGISTER_RETRY_FOR`; every attachment is tried even when an earlier one failed. Clears
    /// the state file once all are registered. Returns the indexes registered and the first
    /// failure. Does not wait for serving (see `register_and_wait`).
    async fn register(&self, plan: &[Taken]) -> (Vec<usize>, Option<CycleError>) {
        let mut failed = None;
        let mut registered = Vec::with_capacity(plan.len());
        for (i, taken) in plan.iter().enumerate() {
            let Some(lb) = self.attachment(taken) else {
                let e = self.still_deregistered(
                    taken,
                    Duration::ZERO,
                    LbError::NotFound { lb: labels(std::slice::from_ref(taken)), code: "not configured".into() },
                );
                failed.get_or_insert(e);
                continue;
            };
            let mut backoff = Backoff::new();
            loop {
                match lb.register(&taken.targets).await {
                    Ok(()) => {
                        info!(lb = %lb.label(), instance_id = %self.me, targets = %targets_of(std::slice::from_ref(taken)), "registered");
                        registered.push(i);
                        break;
                    }
                    Err(e) if e.is_retryable() && backoff.may_retry() => {
                        error!(lb = %lb.label(), instance_id = %self.me, error = %e, "registering failed; the instance is deregistered; retrying in {:?}", backoff.pause);
                        backoff.wait().await;
                    }
                    Err(source) => {
                        let e = self.still_deregistered(taken, backoff.start.elapsed(), source);
                        failed.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        if failed.is_none() {
            if let Err(e) = self.state.clear() {
                failed = Some(e.into());
            }
        }
        (registered, failed)
    }

    fn still_deregistered(&self, taken: &Taken, tried: Duration, source: LbError) -> CycleError {
        let e = CycleError::StillDeregistered {
            lb: labels(std::slice::from_ref(taken)),
            instance: self.me.clone(),
            tried,
            by_hand: register_by_hand(taken),
            source: Box::new(source),
        };
        error!("{}", chain(&e));
        e
    }

    /// Comes back the way the instance left (registering in every attachment, or leaving Standby)
    /// and waits, in shared poll rounds, until every target taken out serves again, each attachment bounded by its health timing + margin (or `--health-timeout`).
    /// A target that can never serve fails at once. Never deregisters again. When registering
    /// failed somewhere, the attachments that took it are still waited for, then that failure is
    /// returned.
    async fn rejoin(&self, via: LeaveVia, plan: &[Taken], timings: &[LbTimings]) -> Result<(), CycleError> {
        let (pending, failed) = match via {
            LeaveVia::Deregister => self.register(plan).await,
            LeaveVia::Standby => {
                self.exit_standby().await?;
                self.wait_lifecycle(false, timings).await?;
                self.state.clear()?;
                ((0..plan.len()).collect(), None)
            }
        };
        self.wait_serving(plan, timings, pending, failed).await
    }

    /// Waits in shared poll rounds until every target of `plan[pending]` serves; see `rejoin`.
    async fn wait_serving(
        &self,
        plan: &[Taken],
        timings: &[LbTimings],
        mut pending: Vec<usize>,
        not_registered: Option<CycleError>,
    ) -> Result<(), CycleError> {
        let start = Instant::now();
        let bound = |i: usize| {
            let healthy_after = timings.get(i).map(|t| t.healthy_after).unwrap_or(Duration::from_secs(300));
            self.timing.health_timeout.unwrap_or(healthy_after + HEALTH_MARGIN)
        };
        let mut failed = not_registered;
        // Strict mode: renew the permit now, so that only a view read after registering counts.
        let toucher = self.cursor.lock().unwrap().as_ref().map(|c| c.toucher.clone());
        if let Some(toucher) = toucher {
            match toucher.touch().await {
                Ok(after) => {
                    if let Some(c) = self.cursor.lock().unwrap().as_mut() {
                        c.need.ver = c.need.ver.max(after.ver);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "renewing the permit after registering failed; reading each attachment directly");
                    *self.cursor.lock().unwrap() = None;
                }
            }
        }
        loop {
            let mut still = Vec::new();
            let shared = self.shared_round().await;
            for &i in &pending {
                let taken = &plan[i];
                let Some(at) = self.attachment_index(taken) else { continue };
                let lb = &self.lbs[at];
                let lb_label = lb.label();
                match self.round_targets(at, &shared).await {
                    Ok(listed) => {
                        let mine: Vec<&TargetHealth> =
                            listed.iter().filter(|h| taken.targets.contains(&h.target)).collect();
                        // Every target listed and serving (a target listed twice, as moto lists an
                        // instance registered twice, counts once).
                        let serves = |t: &Target| mine.iter().any(|h| h.target == *t && h.serving());
                        if taken.targets.iter().all(serves) {
                            info!(lb = %lb_label, instance_id = %self.me, "serving again");
                            continue;
                        }
                        if let Some(h) = mine.iter().find(|h| h.state == TargetState::NeverHeals) {
                            failed.get_or_insert(CycleError::NotInService {
                                lb: lb_label,
                                instance: self.me.clone(),
                                detail: format!("{} can never serve there: {}", h.target, h.raw),
                            });
                            continue;
                        }
                        match mine.iter().find(|h| !serves(&h.target)) {
                            Some(h) => {
                                info!(lb = %lb_label, target = %h.target, state = %h.raw, "waiting until serving")
                            }
                            None => warn!(lb = %lb_label, "registered but not listed yet"),
                        }
                    }
                    Err(e) if e.is_retryable() => warn!(lb = %lb_label, error = %e, "polling health failed; retrying"),
                    Err(e) => {
                        failed.get_or_insert(e.into());
                        continue;
                    }
                }
                if start.elapsed() >= bound(i) {
                    failed.get_or_insert(CycleError::NotInService {
                        lb: lb_label,
                        instance: self.me.clone(),
                        detail: format!(
                            "not serving within {:?}; it stays registered (check the health check target)",
                            bound(i)
                        ),
                    });
                    continue;
                }
                still.push(i);
            }
            pending = still;
            if pending.is_empty() {
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            if !matches!(shared, Some(Ok(_))) {
                // (With a shared view, the next round waits for a newer one: that paces it.)
                tokio::time::sleep(jitter(self.timing.poll_interval)).await;
            }
        }
    }

    /// Best effort after a failure: register `plan` again (bounded retries) and wait until serving,
    /// bounded by the timings the cycle already read.
    async fn come_back(&self, plan: &[Taken], timings: &[LbTimings]) -> Result<(), CycleError> {
        match self.rejoin(self.leave_via, plan, timings).await {
            Ok(()) => Ok(()),
            Err(e) if e.left_out() => Err(e),
            Err(e) => {
                warn!(error = %e, "registered again, but not serving yet");
                Ok(())
            }
        }
    }

    /// The group's name if Standby may take this instance out: refused (nothing changed) when the
    /// desired capacity would drop below the group's minimum size.
    async fn standby_allowed(&self) -> Result<String, CycleError> {
        let g = self.members.group().await?;
        if g.desired - 1 < g.min_size {
            return Err(CycleError::StandbyForbidden { group: g.name, min: g.min_size, desired: g.desired });
        }
        Ok(g.name)
    }

    fn group_label(&self) -> String {
        self.members.group_name().unwrap_or_else(|| self.members.describe())
    }

    /// `EnterStandby`, retried while AWS throttles or fails on its side. A call whose answer is lost
    /// may have taken effect: the caller comes back either way.
    async fn enter_standby(&self) -> Result<(), CycleError> {
        let mut backoff = Backoff::new();
        loop {
            match self.members.enter_standby(&self.me).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && backoff.may_retry() => {
                    warn!(instance_id = %self.me, error = %e, "entering Standby failed; retrying in {:?}", backoff.pause);
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `ExitStandby`, retried like registering. An instance the group no longer shows in Standby is
    /// back already (an earlier call went through, or someone brought it back).
    async fn exit_standby(&self) -> Result<(), CycleError> {
        let mut backoff = Backoff::new();
        loop {
            let failure = match self.members.exit_standby(&self.me).await {
                Ok(()) => {
                    info!(group = %self.group_label(), instance_id = %self.me, "left Standby (desired capacity +1)");
                    return Ok(());
                }
                Err(e) => e,
            };
            if !failure.is_retryable() || !backoff.may_retry() {
                if let Ok(roster) = self.members.members().await {
                    if roster.members_contains(&self.me) && !roster.in_standby(&self.me) {
                        warn!(instance_id = %self.me, error = %failure, "ExitStandby refused, but the group no longer shows this instance in Standby");
                        return Ok(());
                    }
                }
                let e = CycleError::StillInStandby {
                    group: self.group_label(),
                    instance: self.me.clone(),
                    tried: backoff.start.elapsed(),
                    source: Box::new(failure),
                };
                error!("{}", chain(&e));
                return Err(e);
            }
            error!(instance_id = %self.me, error = %failure, "leaving Standby failed; the instance is in Standby; retrying in {:?}", backoff.pause);
            backoff.wait().await;
        }
    }

    /// Polls the group until this instance is in Standby (`standby`) or back in service, bounded
    /// like the waits on the attachments.
    async fn wait_lifecycle(&self, standby: bool, timings: &[LbTimings]) -> Result<(), CycleError> {
        let bound = timings.iter().map(|t| t.healthy_after).max().unwrap_or(Duration::ZERO) + HEALTH_MARGIN;
        let deadline = Instant::now() + bound;
        loop {
            match self.members.members().await {
                Ok(r) => {
                    let state = r.lifecycle.get(&self.me).cloned().unwrap_or_default();
                    let done = if standby { state == "Standby" } else { state == "InService" };
                    if done {
                        return Ok(());
                    }
                    info!(instance_id = %self.me, lifecycle = %state, "waiting for the group to show {}", if standby { "Standby" } else { "InService" });
                }
                Err(e) if e.is_retryable() => warn!(error = %e, "reading the group failed; retrying"),
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                let what = if standby { "Standby" } else { "InService" };
                warn!(instance_id = %self.me, bound_s = bound.as_secs_f64(), "the group does not show this instance {what} within the bound; going on");
                return Ok(());
            }
            tokio::time::sleep(jitter(self.timing.poll_interval)).await;
        }
    }

    /// The instance was in Standby before the request (someone else put it there): it serves
    /// nothing, so the programs restart at once, and it stays in Standby: bringing it into service
    /// behind the operator's back is not this tool's call.
    async fn restart_in_standby(
        &self,
        programs: &[String],
        started: Instant,
        mut summary: Summary,
    ) -> Result<Outcome, CycleError> {
        warn!(instance_id = %self.me, group = %self.group_label(), "this instance is in Standby already: restarting {} in place and leaving it in Standby", programs.join(" "));
        if self.dry_run {
            return Ok(Outcome::Done(summary));
        }
        let t = Instant::now();
        self.services.restart(programs).await?;
        summary.restart = t.elapsed();
        summary.total = started.elapsed();
        info!(programs = %programs.join(" "), "cycle done: {} restarted in Standby (left in Standby)", programs.join(" "));
        Ok(Outcome::Done(summary))
    }

    /// The loud error for an instance deliberately left out: its programs are down.
    fn services_down(&self, plan: &[Taken], programs: &[String], source: SupervisorError) -> CycleError {
        let e = CycleError::ServicesDown {
            lb: labels(plan),
            instance: self.me.clone(),
            programs: programs.join(" "),
            source: Box::new(source),
        };
        error!(attachments = %labels(plan), instance_id = %self.me, "{}", chain(&e));
        e
    }

    /// Finishes a cycle a previous process left half done (found in the state file): puts back
    /// exactly the recorded (attachment, target) pairs. A record of another instance, or naming an
    /// attachment this configuration does not have, is set aside, never acted on.
    pub async fn reconcile(&self) -> Result<bool, CycleError> {
        let record = match self.state.load() {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.forget_old_permit().await?;
                return Ok(false);
            }
            Err(e @ StateFileError::Corrupt { .. }) => {
                error!("{e}");
                self.forget_old_permit().await?;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        self.resolve().await?;
        let unknown: Vec<&Taken> = record.attachments.iter().filter(|t| self.attachment(t).is_none()).collect();
        if record.instance_id != self.me || !unknown.is_empty() {
            let moved = self.state.set_aside("foreign")?;
            let by_hand: Vec<String> = record.attachments.iter().map(register_by_hand).collect();
            error!(
                recorded_instance = %record.instance_id,
                recorded_attachments = %labels(&record.attachments),
                "state file names instance {} in {}, not this one ({} in {}): a copied disk image, or changed attachments? Moved to {} and not acted on. If this instance is out of them: {}",
                record.instance_id, labels(&record.attachments), self.me, self.attachments(), moved.display(), by_hand.join("; ")
            );
            self.forget_old_permit().await?;
            return Ok(false);
        }
        warn!(step = ?record.step, programs = %record.programs.join(" "), attachments = %labels(&record.attachments), "a previous run stopped mid-cycle; finishing it");
        // Before registering: no batch may take this instance out after it came back.
        if let Some(permits) = &self.permits {
            self.withdraw_batched(permits).await;
        }
        // Whatever the outcome, the earlier run's permit entry goes, as a cycle releases its
        // permit however it ends (one left out with its programs down holds no slot either).
        let finished = self.finish(&record).await;
        let forgotten = self.forget_old_permit().await;
        finished?;
        forgotten?;
        Ok(true)
    }

    /// `reconcile` once the record is this instance's: programs back, ready check, rejoin.
    async fn finish(&self, record: &Record) -> Result<(), CycleError> {
        let running = self.services.running(&record.programs).await?;
        if !running {
            if record.step == Step::ServicesDown {
                let source = SupervisorError::ProgramFailed {
                    program: record.programs.join(" "),
                    state: "not RUNNING".into(),
                    detail: " (they failed to come back in an earlier cycle)".into(),
                };
                return Err(self.services_down(&record.attachments, &record.programs, source));
            }
            // Out of the load balancer already: restarting takes nothing from the cluster.
            self.state.save(&Record { step: Step::Restarting, pid: std::process::id(), ..record.clone() })?;
            if let Err(source) = self.services.restart(&record.programs).await {
                self.state.save(&Record { step: Step::ServicesDown, pid: std::process::id(), ..record.clone() })?;
                return Err(self.services_down(&record.attachments, &record.programs, source));
            }
        }
        // The ready check passed already only once the record says Registering.
        if record.step != Step::Registering {
            self.ready_check(record).await?;
        }
        let mut timings = Vec::with_capacity(record.attachments.len());
        for taken in &record.attachments {
            let t = match self.attachment(taken) {
                Some(lb) => lb.timings().await.ok(),
                None => None,
            };
            timings.push(t.unwrap_or(LbTimings { drain: None, healthy_after: Duration::from_secs(300) }));
        }
        self.rejoin(record.via, &record.attachments, &timings).await?;
        info!(attachments = %labels(&record.attachments), instance_id = %self.me, via = ?record.via, "reconciled: registered and serving again");
        self.after_return(&record.programs).await;
        Ok(())
    }

    /// The idle listener's watch over an instance left out: programs that did not come back
    /// (`services-down`), a registration AWS refused for the whole retry budget, or a one-shot
    /// killed mid-cycle. When the state file names an unfinished cycle and its programs are RUNNING
    /// (or it stopped before they went down), finishes it (`reconcile`). While the programs stay
    /// down only supervisord is asked: no AWS call. The caller holds the state file's lock.
    pub async fn recover(&self) -> Result<Recovery, CycleError> {
        let record = match self.state.load() {
            Ok(Some(r)) => r,
            // A corrupt file was reported (and set aside) by the start's reconcile.
            Ok(None) | Err(StateFileError::Corrupt { .. }) => return Ok(Recovery::Nothing),
            Err(e) => return Err(e.into()),
        };
        if record.step == Step::ServicesDown && !self.services.running(&record.programs).await? {
            return Ok(Recovery::StillDown);
        }
        info!(step = ?record.step, programs = %record.programs.join(" "), "the instance is out with its programs RUNNING: finishing the cycle");
        Ok(if self.reconcile().await? { Recovery::Back } else { Recovery::Nothing })
    }

    /// Strict mode: removes this instance's entry left by an earlier run (kill -9 while holding a
    /// permit), so that peers need not wait for it to expire. A store that cannot be reached is
    /// not fatal here (the entry expires); a missing table or a denial is.
    /// A few tries, as a release makes them (`lease::removal_retried`).
    async fn forget_old_permit(&self) -> Result<(), CycleError> {
        let Some(permits) = &self.permits else { return Ok(()) };
        match crate::lease::removal_retried("removing this instance's old permit entry", || permits.remove_mine()).await
        {
            Ok(true) => {
                warn!(key = %permits.key, instance_id = %self.me, "removed this instance's permit entry left by an earlier run")
            }
            Ok(false) => {}
            Err(e) if e.is_retryable() => {
                warn!(error = %e, "cannot remove this instance's old permit entry now; it expires by itself")
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// Every target of `plan`, for logs: `i-1 i-1:80 i-1:8080`.
fn targets_of(plan: &[Taken]) -> String {
    plan.iter().flat_map(|t| &t.targets).map(Target::to_string).collect::<Vec<_>>().join(" ")
}

/// An error and its causes on one line, each once (a cause that says what the one before it
/// said, as the SDK's layered errors do, is left out).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut out = last.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if text != last && !last.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer serves only when every target it has is serving; this instance when any is; targets
    /// not registered are ignored; any other state is out.
    #[test]
    fn serving_counts_peers_cautiously_and_this_instance_generously() {
        let h =
            |id: &str, port: i32, state| TargetHealth { target: Target::on_port(id, port), state, raw: String::new() };
        use TargetState::*;
        let listed = vec![
            h("me", 80, Serving),
            h("me", 8080, Unhealthy),
            h("a", 80, Serving),
            h("a", 8080, Serving),
            h("b", 80, Serving),
            h("b", 8080, Starting),
            h("c", 80, Serving),
            h("c", 8080, NotRegistered),
            h("d", 80, Draining),
            h("e", 80, NeverHeals),
            h("f", 80, NotRegistered),
        ];
        let want: BTreeSet<String> = ["me", "a", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(serving_ids(&listed, "me"), want);
        assert_eq!(serving_ids(&listed[1..], "me"), ["a", "c"].iter().map(|s| s.to_string()).collect());
    }

    #[test]
    fn settle_slots_keep_ranks_apart_whatever_the_start() {
        let settle = Duration::from_secs(6);
        for start_ms in [0u64, 1, 999, 2500, 5999, 123_456_789] {
            let now = Duration::from_millis(start_ms);
            let mut confirm: Vec<u128> =
                (0..6).map(|rank| (now + settle_wait(settle, Some((rank, 6)), now)).as_millis()).collect();
            for (rank, t) in confirm.iter().enumerate() {
                assert_eq!(*t % 6000, rank as u128 * 1000, "rank {rank} confirms in its own slot (start {start_ms})");
                assert!(*t - now.as_millis() < 6000, "never more than one settle period");
            }
            confirm.sort_unstable();
            assert!(confirm.windows(2).all(|w| w[1] - w[0] >= 1000), "{confirm:?}");
        }
        assert_eq!(settle_wait(Duration::ZERO, Some((3, 6)), Duration::from_secs(1)), Duration::ZERO);
        assert!(settle_wait(settle, None, Duration::ZERO) < settle);
    }
}
