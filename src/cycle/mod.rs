//! The gated restart cycle, shared by `listen` and the one-shot `restart`:
//! validate programs → gate (quorum) → deregister → recheck → wait drained → restart programs →
//! register → wait InService. In strict mode the gate takes a permit first (`crate::lease`), holds
//! it until InService again and skips the recheck, which the permit makes unnecessary. The state file is written before each side effect; `reconcile`
//! finishes a cycle that a previous process left half done.
//!
//! Invariant: whatever fails after deregistering, the instance is registered again before `run`
//! returns — unless its programs did not come back (`CycleError::ServicesDown`, said loudly) or AWS
//! stayed unreachable for the whole retry budget (`CycleError::StillDeregistered`, said loudly).

pub mod state_file;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::{DRAIN_MARGIN, HEALTH_MARGIN};
use crate::lb::members::Membership;
use crate::lb::{InstanceHealth, LbError, LoadBalancer};
use crate::lease::{decide_with_holders, Acquired, Kind, LeaseError, Permit, Permits};
use crate::quorum::{decide, holds_without_me, Members, Reason, Rule, Snapshot, Verdict};
use crate::supervisor::{Services, SupervisorError};
use crate::trigger::RestartRequest;
use state_file::{Record, StateFile, StateFileError, Step};

/// How long registering again is retried while AWS is unreachable before giving up loudly.
pub const REGISTER_RETRY_FOR: Duration = Duration::from_secs(300);
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
    /// Before leaving on a passed check, wait a random 0..settle and check once more, so that
    /// instances asked at the same moment see each other leave (see README, "Races").
    pub settle: Duration,
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
    #[error("cannot count the cluster's members: {0}")]
    Members(String),
    #[error(transparent)]
    Lb(#[from] LbError),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("no permit after {checks} checks (strict mode fails closed; nothing changed): {source}")]
    NoPermit {
        checks: u32,
        #[source]
        source: LeaseError,
    },
    #[error("permit lost before deregistering ({why}); nothing changed")]
    PermitLost { why: String },
    #[error("INSTANCE {instance} LEFT DEREGISTERED FROM {lb}: its programs did not come back ({source}). Fix them, then run `elb-quorum restart {programs}` (or restart the listener) to register it again")]
    ServicesDown {
        lb: String,
        instance: String,
        programs: String,
        #[source]
        source: SupervisorError,
    },
    #[error("INSTANCE {instance} IS STILL DEREGISTERED FROM {lb}: registering again failed for {tried:?} ({source}). Register it by hand: aws elb register-instances-with-load-balancer --load-balancer-name {lb} --instances {instance}")]
    StillDeregistered {
        lb: String,
        instance: String,
        tried: Duration,
        #[source]
        source: LbError,
    },
    #[error("instance {instance} is registered with {lb} again but not InService: {detail}")]
    NotInService { lb: String, instance: String, detail: String },
}

impl CycleError {
    /// True when the instance is (or may be) out of the load balancer after this error.
    pub fn left_out(&self) -> bool {
        matches!(self, CycleError::ServicesDown { .. } | CycleError::StillDeregistered { .. })
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

/// One instance's restart cycle.
pub struct Cycle<L, M, S> {
    pub lb: L,
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
}

enum Gate {
    Allowed { verdict: Verdict, checks: u32, permit: Option<Box<Permit>> },
    GaveUp { verdict: Verdict, checks: u32 },
    NoPermit { holders: Vec<String>, permits: usize, checks: u32 },
    Aborted,
}

/// One strict check's answer.
enum StrictCheck {
    Allowed(Verdict, Box<Permit>),
    /// A permit was free, but quorum does not hold; it is released already.
    Wait(Verdict),
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
}

impl<L: LoadBalancer, M: Membership, S: Services> Cycle<L, M, S> {
    /// Members and load-balancer health, as one snapshot.
    pub async fn snapshot(&self, known_down: bool) -> Result<(Snapshot, Option<InstanceHealth>), CycleError> {
        let members = self.members.members().await.map_err(CycleError::Members)?;
        let registered = self.lb.registered().await?;
        let mine = registered.iter().find(|h| h.instance_id == self.me).cloned();
        let serving = registered.into_iter().filter(|h| h.serving()).map(|h| h.instance_id).collect();
        Ok((Snapshot { members, serving, me: self.me.clone(), known_down }, mine))
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
            let verdict = match self.snapshot(req.serves_nothing()).await {
                Ok((snap, _)) => {
                    slot = settle_slot(&snap.members, &self.me);
                    Some(decide(&snap, &self.rule))
                }
                Err(CycleError::Lb(e)) if e.is_retryable() => {
                    warn!(lb = self.lb.name(), check, error = %e, "quorum check failed; counts as a failed check");
                    None
                }
                Err(e) => return Err(e),
            };
            if let Some(v) = &verdict {
                info!(lb = self.lb.name(), instance_id = %self.me, check, max_checks = self.timing.max_checks, may_leave = v.may_leave, reason = ?v.reason, "quorum check: {}", v.summary());
                if v.may_leave && (settled || v.reason != Reason::QuorumHolds || self.timing.settle.is_zero()) {
                    return Ok(Gate::Allowed { verdict: v.clone(), checks: check, permit: None });
                }
                if v.may_leave {
                    settled = true;
                    let wait = settle_wait(self.timing.settle, slot, crate::clock::wall_now());
                    if !self.pause(wait).await {
                        return Ok(Gate::Aborted);
                    }
                    continue;
                }
            }
            settled = false;
            if check >= self.timing.max_checks {
                let verdict = match verdict {
                    Some(v) => v,
                    None => {
                        return Err(CycleError::Lb(LbError::Unreachable {
                            lb: self.lb.name().into(),
                            action: "quorum check",
                            detail: format!("no check succeeded in {check}"),
                        }))
                    }
                };
                return Ok(Gate::GaveUp { verdict, checks: check });
            }
            if !self.pause(jitter(self.timing.check_interval)).await {
                return Ok(Gate::Aborted);
            }
        }
    }

    /// The strict gate: each check takes a permit first, then reads the load balancer with every
    /// other holder counted out. Errors of the permit store fail closed: a failed check.
    async fn strict_gate(&self, permits: &Permits, req: &RestartRequest, first_check: u32) -> Result<Gate, CycleError> {
        let mut check = first_check;
        loop {
            check += 1;
            let last = match self.strict_check(permits, req).await {
                Ok(StrictCheck::Allowed(verdict, permit)) => {
                    info!(lb = self.lb.name(), instance_id = %self.me, check, kind = permit.kind().as_str(), holders = permit.others.len(), reason = ?verdict.reason, "quorum check with permit: {}; leaving", verdict.summary());
                    return Ok(Gate::Allowed { verdict, checks: check, permit: Some(permit) });
                }
                Ok(StrictCheck::Wait(verdict)) => {
                    info!(lb = self.lb.name(), instance_id = %self.me, check, max_checks = self.timing.max_checks, reason = ?verdict.reason, "quorum check with permit: {}; permit released, waiting", verdict.summary());
                    Ok(Gate::GaveUp { verdict, checks: check })
                }
                Ok(StrictCheck::Full { holders, permits }) => {
                    info!(lb = self.lb.name(), instance_id = %self.me, check, max_checks = self.timing.max_checks, permits, "no free permit: {}", held_by(&holders));
                    Ok(Gate::NoPermit { holders, permits, checks: check })
                }
                Err(CycleError::Lease(e)) if e.is_retryable() => {
                    warn!(check, error = %e, "taking a permit failed; counts as a failed check (strict mode fails closed)");
                    Err(CycleError::NoPermit { checks: check, source: e })
                }
                Err(CycleError::Lb(e)) if e.is_retryable() => {
                    warn!(lb = self.lb.name(), check, error = %e, "quorum check failed; counts as a failed check");
                    Err(CycleError::Lb(e))
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
            if !self.pause(jitter(self.timing.check_interval)).await {
                return Ok(Gate::Aborted);
            }
        }
    }

    /// One strict check: members → permit → load balancer → decision. A slot refused to an instance
    /// that serves nothing already becomes an exempt entry; an exempt instance found serving again
    /// loses the exemption and tries for a slot once.
    async fn strict_check(&self, permits: &Permits, req: &RestartRequest) -> Result<StrictCheck, CycleError> {
        let members = self.members.members().await.map_err(CycleError::Members)?;
        let limit = self.rule.permits(members.len());
        let mut kind = if req.serves_nothing() { Kind::Exempt } else { Kind::Slot };
        let mut exemption_lost = false;
        loop {
            let permit = match permits.acquire(kind, limit).await? {
                Acquired::Granted(p) => p,
                Acquired::Refused { holders } => {
                    if exemption_lost {
                        return Ok(StrictCheck::Full { holders, permits: limit });
                    }
                    let registered = self.lb.registered().await?;
                    if registered.iter().any(|h| h.instance_id == self.me && h.serving()) {
                        return Ok(StrictCheck::Full { holders, permits: limit });
                    }
                    info!(instance_id = %self.me, "no free slot, but the load balancer counts this instance out: taking an exempt entry");
                    kind = Kind::Exempt;
                    continue;
                }
            };
            let registered = match self.lb.registered().await {
                Ok(r) => r,
                Err(e) => {
                    permit.release().await;
                    return Err(e.into());
                }
            };
            let serving = registered.into_iter().filter(|h| h.serving()).map(|h| h.instance_id).collect();
            let snapshot =
                Snapshot { members: members.clone(), serving, me: self.me.clone(), known_down: req.serves_nothing() };
            let verdict = decide_with_holders(snapshot, &permit.others, &self.rule);
            if permit.kind() == Kind::Exempt && verdict.self_serving && !req.serves_nothing() {
                info!(instance_id = %self.me, "this instance serves again: exemption dropped");
                permit.release().await;
                kind = Kind::Slot;
                exemption_lost = true;
                continue;
            }
            if verdict.may_leave {
                return Ok(StrictCheck::Allowed(verdict, Box::new(permit)));
            }
            permit.release().await;
            return Ok(StrictCheck::Wait(verdict));
        }
    }

    fn record(&self, step: Step, programs: &[String], since: u64) -> Record {
        Record {
            step,
            instance_id: self.me.clone(),
            lb: self.lb.name().to_owned(),
            programs: programs.to_vec(),
            since,
            pid: std::process::id(),
        }
    }

    /// Runs one gated restart of `req.programs`.
    pub async fn run(&self, req: &RestartRequest) -> Result<Outcome, CycleError> {
        let programs: Vec<String> = req.programs.iter().cloned().collect();
        let started = Instant::now();
        self.services.validate(&programs).await?;
        let mut summary = Summary { programs: programs.clone(), ..Default::default() };
        let mut checks = 0;
        loop {
            let gate = match &self.permits {
                Some(permits) => self.strict_gate(permits, req, checks).await?,
                None => self.gate(req, checks).await?,
            };
            let (verdict, permit) = match gate {
                Gate::Allowed { verdict, checks: used, permit } => {
                    checks = used;
                    (verdict, permit)
                }
                Gate::GaveUp { verdict, checks } => {
                    warn!(lb = self.lb.name(), instance_id = %self.me, checks, "giving up: quorum not reached after {checks} checks ({}); nothing changed", verdict.summary());
                    return Ok(Outcome::GaveUp { verdict, checks });
                }
                Gate::NoPermit { holders, permits, checks } => {
                    warn!(lb = self.lb.name(), instance_id = %self.me, checks, "giving up: no free permit after {checks} checks ({}); nothing changed", held_by(&holders));
                    return Ok(Outcome::NoPermit { holders, permits, checks });
                }
                Gate::Aborted => {
                    info!("shutdown requested while waiting for quorum; nothing changed");
                    return Ok(Outcome::Aborted);
                }
            };
            summary.checks = checks;
            summary.waited_for_quorum = started.elapsed();
            let left = self.leave(&programs, &verdict, permit.as_deref(), &mut summary).await;
            if let Some(permit) = permit {
                permit.release().await;
            }
            match left? {
                Left::Done => {
                    summary.total = started.elapsed();
                    info!(
                        lb = self.lb.name(),
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
                Left::Raced(verdict) => {
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

    /// Past the gate: deregister → (recheck) → drain → restart → register → InService. With a
    /// permit, a permit found lost before deregistering stops the cycle with nothing changed; one
    /// lost later is logged loudly and the cycle finishes (the instance must come back).
    async fn leave(
        &self,
        programs: &[String],
        verdict: &Verdict,
        permit: Option<&Permit>,
        summary: &mut Summary,
    ) -> Result<Left, CycleError> {
        if self.dry_run {
            info!(lb = self.lb.name(), instance_id = %self.me, "dry run: would deregister, restart {}, register; nothing changed", programs.join(" "));
            return Ok(Left::DryRun(verdict.clone()));
        }
        // The gate may have waited minutes: the programs must still exist before we leave.
        self.services.validate(programs).await?;
        let timings = self.lb.timings().await?;
        if let Some(why) = permit.and_then(Permit::lost) {
            error!(lb = self.lb.name(), instance_id = %self.me, "permit lost before deregistering ({why}); not leaving");
            return Err(CycleError::PermitLost { why });
        }
        let since = unix_now();
        self.state.save(&self.record(Step::Deregistering, programs, since))?;
        let t = Instant::now();
        info!(lb = self.lb.name(), instance_id = %self.me, "deregistering");
        if let Err(e) = self.lb.deregister(&self.me).await {
            error!(lb = self.lb.name(), instance_id = %self.me, error = %e, "deregistering failed; making sure the instance is registered");
            self.come_back(timings.healthy_after).await?;
            return Err(e.into());
        }
        // Recheck only when this instance was serving: if it served nothing already (out of the
        // load balancer, or its program down), its leaving took nothing from anyone, and going
        // back would only register an instance that does not serve. In strict mode the permit
        // already excludes the race the recheck looks for.
        if verdict.reason == Reason::QuorumHolds && permit.is_none() {
            match self.snapshot(false).await {
                Ok((snap, _)) => {
                    let v = holds_without_me(&snap, &self.rule);
                    if !v.may_leave {
                        summary.races += 1;
                        warn!(lb = self.lb.name(), instance_id = %self.me, "peers left at the same time ({}); registering again and going back to the gate", v.summary());
                        self.come_back(timings.healthy_after).await?;
                        return Ok(Left::Raced(v));
                    }
                }
                Err(e) => {
                    error!(error = %e, "quorum recheck after deregistering failed; registering again");
                    self.come_back(timings.healthy_after).await?;
                    return Err(e);
                }
            }
        }
        let drain_bound = self.timing.drain_timeout.unwrap_or(timings.drain.unwrap_or(Duration::ZERO) + DRAIN_MARGIN);
        if let Err(e) = self.wait_out(drain_bound).await {
            self.come_back(timings.healthy_after).await?;
            return Err(e);
        }
        summary.drain = t.elapsed();
        info!(lb = self.lb.name(), instance_id = %self.me, drain_s = summary.drain.as_secs_f64(), "out of the load balancer");

        self.state.save(&self.record(Step::Restarting, programs, since))?;
        let t = Instant::now();
        if let Err(source) = self.services.restart(programs).await {
            // Healthy after all (the failure came before anything was stopped, or the programs
            // recovered)? Then they must not stay out of the load balancer.
            if matches!(self.services.running(programs).await, Ok(true)) {
                error!(error = %source, "restarting failed, but the programs are RUNNING: registering again");
                self.come_back(timings.healthy_after).await?;
                return Err(source.into());
            }
            self.state.save(&self.record(Step::ServicesDown, programs, since))?;
            return Err(self.services_down(programs, source));
        }
        summary.restart = t.elapsed();
        info!(programs = %programs.join(" "), restart_s = summary.restart.as_secs_f64(), "programs restarted and RUNNING");

        let t = Instant::now();
        self.state.save(&self.record(Step::Registering, programs, since))?;
        self.register_and_wait(timings.healthy_after).await?;
        summary.back_in_service = t.elapsed();
        if let Some(why) = permit.and_then(Permit::lost) {
            error!(lb = self.lb.name(), instance_id = %self.me, "PERMIT LOST WHILE OUT OF THE LOAD BALANCER ({why}): the cycle finished, but peers may have counted this instance as serving meanwhile");
        }
        Ok(Left::Done)
    }

    /// Polls until this instance is out of service (absent or not serving), within `bound`.
    /// Past the bound the load balancer has cut connections anyway: go on, with a warning.
    async fn wait_out(&self, bound: Duration) -> Result<(), CycleError> {
        let deadline = Instant::now() + bound;
        loop {
            match self.lb.registered().await {
                Ok(reg) => match reg.iter().find(|h| h.instance_id == self.me) {
                    None => return Ok(()),
                    Some(h) if !h.serving() && h.description != crate::lb::DEREGISTRATION_IN_PROGRESS => return Ok(()),
                    Some(h) => info!(state = ?h.state, description = %h.description, "draining"),
                },
                Err(e) if e.is_retryable() => warn!(error = %e, "polling deregistration failed; retrying"),
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                warn!(lb = self.lb.name(), instance_id = %self.me, bound_s = bound.as_secs_f64(), "deregistration not confirmed within the draining bound; going on");
                return Ok(());
            }
            tokio::time::sleep(
                jitter(self.timing.poll_interval)
                    .min(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))),
            )
            .await;
        }
    }

    /// Registers again, retrying retryable errors for `REGISTER_RETRY_FOR`, then clears the state
    /// file. Does not wait for InService (see `register_and_wait`).
    async fn register(&self) -> Result<(), CycleError> {
        let start = Instant::now();
        let mut pause = Duration::from_secs(1);
        loop {
            match self.lb.register(&self.me).await {
                Ok(()) => {
                    info!(lb = self.lb.name(), instance_id = %self.me, "registered");
                    self.state.clear()?;
                    return Ok(());
                }
                Err(e) if e.is_retryable() && start.elapsed() < REGISTER_RETRY_FOR => {
                    error!(lb = self.lb.name(), instance_id = %self.me, error = %e, "registering failed; the instance is deregistered; retrying in {pause:?}");
                    tokio::time::sleep(jitter(pause)).await;
                    pause = (pause * 2).min(REGISTER_RETRY_MAX_PAUSE);
                }
                Err(source) => {
                    let e = CycleError::StillDeregistered {
                        lb: self.lb.name().into(),
                        instance: self.me.clone(),
                        tried: start.elapsed(),
                        source,
                    };
                    error!("{e}");
                    return Err(e);
                }
            }
        }
    }

    /// Registers and waits until InService, bounded by the health check (× threshold) + margin.
    async fn register_and_wait(&self, healthy_after: Duration) -> Result<(), CycleError> {
        self.register().await?;
        let bound = self.timing.health_timeout.unwrap_or(healthy_after + HEALTH_MARGIN);
        let deadline = Instant::now() + bound;
        loop {
            match self.lb.registered().await {
                Ok(reg) => match reg.iter().find(|h| h.instance_id == self.me) {
                    Some(h) if h.serving() => {
                        info!(lb = self.lb.name(), instance_id = %self.me, "InService");
                        return Ok(());
                    }
                    Some(h) if h.never_heals() => {
                        return Err(CycleError::NotInService {
                            lb: self.lb.name().into(),
                            instance: self.me.clone(),
                            detail: h.description.clone(),
                        });
                    }
                    Some(h) => info!(state = ?h.state, description = %h.description, "waiting for InService"),
                    None => warn!("registered but not listed yet"),
                },
                Err(e) if e.is_retryable() => warn!(error = %e, "polling health failed; retrying"),
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                return Err(CycleError::NotInService {
                    lb: self.lb.name().into(),
                    instance: self.me.clone(),
                    detail: format!(
                        "not InService within {bound:?}; it stays registered (check the health check target)"
                    ),
                });
            }
            tokio::time::sleep(jitter(self.timing.poll_interval)).await;
        }
    }

    /// Best effort after a failure: register again (bounded retries) and wait InService, bounded by
    /// the load balancer's timings the cycle already read.
    async fn come_back(&self, healthy_after: Duration) -> Result<(), CycleError> {
        match self.register_and_wait(healthy_after).await {
            Ok(()) => Ok(()),
            Err(e @ CycleError::StillDeregistered { .. }) => Err(e),
            Err(e) => {
                warn!(error = %e, "registered again, but not InService yet");
                Ok(())
            }
        }
    }

    /// The loud error for an instance deliberately left out: its programs are down.
    fn services_down(&self, programs: &[String], source: SupervisorError) -> CycleError {
        let e = CycleError::ServicesDown {
            lb: self.lb.name().into(),
            instance: self.me.clone(),
            programs: programs.join(" "),
            source,
        };
        error!(lb = self.lb.name(), instance_id = %self.me, "{e}");
        e
    }

    /// Finishes a cycle a previous process left half done (found in the state file). A record of
    /// another instance or load balancer is set aside, never acted on.
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
        if record.instance_id != self.me || record.lb != self.lb.name() {
            let moved = self.state.set_aside("foreign")?;
            error!(
                recorded_instance = %record.instance_id,
                recorded_lb = %record.lb,
                "state file names instance {} on {}, not this one ({} on {}): a copied disk image? Moved to {} and not acted on",
                record.instance_id, record.lb, self.me, self.lb.name(), moved.display()
            );
            self.forget_old_permit().await?;
            return Ok(false);
        }
        warn!(step = ?record.step, programs = %record.programs.join(" "), "a previous run stopped mid-cycle; finishing it");
        let running = self.services.running(&record.programs).await?;
        if !running {
            if record.step == Step::ServicesDown {
                let source = SupervisorError::ProgramFailed {
                    program: record.programs.join(" "),
                    state: "not RUNNING".into(),
                    detail: " (they failed to come back in an earlier cycle)".into(),
                };
                return Err(self.services_down(&record.programs, source));
            }
            // Out of the load balancer already: restarting takes nothing from the cluster.
            self.state.save(&Record { step: Step::Restarting, pid: std::process::id(), ..record.clone() })?;
            if let Err(source) = self.services.restart(&record.programs).await {
                self.state.save(&Record { step: Step::ServicesDown, pid: std::process::id(), ..record.clone() })?;
                return Err(self.services_down(&record.programs, source));
            }
        }
        let healthy_after = self.lb.timings().await.map(|t| t.healthy_after).unwrap_or(Duration::from_secs(300));
        self.register_and_wait(healthy_after).await?;
        info!(lb = self.lb.name(), instance_id = %self.me, "reconciled: registered and InService again");
        self.forget_old_permit().await?;
        Ok(true)
    }

    /// Strict mode: removes this instance's entry left by an earlier run (kill -9 while holding a
    /// permit), so that peers need not wait for it to expire. A store that cannot be reached is
    /// not fatal here (the entry expires); a missing table or a denial is.
    async fn forget_old_permit(&self) -> Result<(), CycleError> {
        let Some(permits) = &self.permits else { return Ok(()) };
        match permits.remove_mine().await {
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

#[cfg(test)]
mod tests {
    use super::*;

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
