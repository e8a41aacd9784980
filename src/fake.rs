//! In-process fakes behind the real traits, for what the AWS emulator cannot show: connection
//! draining and deregistration delays, slow health checks (`initial`), throttling, 5xx and
//! `HealthUnavailable`, zones not enabled, one instance on several ports of a target group, peers
//! racing; and, for fleets, AWS's per-account API throttling (`Throttle`: a token bucket per API
//! family, the SDK's attempts each taking a token). Used by tests and benchmarks only; time is
//! tokio's clock, so `tokio::time::pause()` makes them deterministic.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::lb::members::{GroupInfo, MembersError, Membership, Roster};
use crate::lb::{AttachmentSpec, Kind, LbError, LbTimings, LoadBalancer, Target, TargetHealth, TargetState};
use crate::lease::{
    BoxFuture, Kind as PermitKind, LeaseError, PermitStore, Record, Shared, SharedWrite, Write, Written,
};
use crate::quorum::Members;
use crate::supervisor::{Services, SupervisorError};

/// Which call a scripted fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `targets()`: DescribeInstanceHealth / DescribeTargetHealth.
    Targets,
    Deregister,
    Register,
    Timings,
    /// `resolve()`: DescribeTargetGroups.
    Resolve,
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Throttled,
    ServerError,
    /// Target groups' `HealthUnavailable` (HTTP 500).
    HealthUnavailable,
    Unreachable,
    NotFound,
    /// AccessDenied (HTTP 403).
    Denied,
    /// `InvalidTarget` / `InvalidInstance` (HTTP 400), the call not applied.
    InvalidTarget,
    /// `InvalidTarget` after the call took the valid targets out anyway (moto does this for a
    /// `DeregisterTargets` batch with one invalid target).
    InvalidTargetApplied,
    /// The call took effect, then its reply was lost: a timeout to the caller.
    LostReply,
}

/// One target's registration.
#[derive(Debug, Clone)]
struct Reg {
    registered: bool,
    deregistered_at: Option<Instant>,
    registered_at: Option<Instant>,
}

/// One instance's process, shared by all its targets.
#[derive(Debug, Clone)]
struct Proc {
    /// Healthy as a process (its health check passes).
    healthy: bool,
    /// Its zone is enabled on the load balancer.
    az_ok: bool,
}

/// What the fake records: every call, in order, with its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub at: Duration,
    pub op: Op,
    /// The instance of the first target the call names.
    pub instance: Option<String>,
    pub targets: Vec<Target>,
}

#[derive(Debug)]
struct State {
    start: Instant,
    targets: BTreeMap<Target, Reg>,
    procs: BTreeMap<String, Proc>,
    faults: BTreeMap<Op, VecDeque<Fault>>,
    calls: Vec<Call>,
    /// Instances that stop serving when `trigger` deregisters (a peer racing us).
    race: Option<(String, Vec<String>)>,
    /// Lowest serving count seen by any `targets` call, for fleet tests.
    min_serving: usize,
}

/// A Classic ELB or a target group in memory. Draining keeps a deregistered target listed for
/// `drain` (Classic: InService with the deregistration description; target group: `draining`),
/// then it is gone; a registered target serves `healthy_after` after registration if its process
/// is healthy (target group: `initial` until then).
#[derive(Clone)]
pub struct FakeLb {
    spec: AttachmentSpec,
    pub drain: Duration,
    pub healthy_after: Duration,
    /// Time each call takes before it acts (an API round trip).
    pub latency: Duration,
    /// AWS's account-wide API throttling, shared by every instance's copy (`Throttle::aws`).
    pub throttle: Option<Throttle>,
    state: Arc<Mutex<State>>,
}

impl FakeLb {
    /// A Classic load balancer with `ids` registered and InService.
    pub fn new(name: &str, ids: &[String], drain: Duration, healthy_after: Duration) -> Self {
        let targets: Vec<Target> = ids.iter().map(Target::instance).collect();
        Self::with(AttachmentSpec { kind: Kind::Classic, name: name.into() }, &targets, drain, healthy_after)
    }

    /// A target group with `ids` registered and healthy on `port`.
    pub fn target_group(name: &str, ids: &[String], port: i32, drain: Duration, healthy_after: Duration) -> Self {
        let targets: Vec<Target> = ids.iter().map(|id| Target::on_port(id, port)).collect();
        Self::with(AttachmentSpec { kind: Kind::TargetGroup, name: name.into() }, &targets, drain, healthy_after)
    }

    fn with(spec: AttachmentSpec, targets: &[Target], drain: Duration, healthy_after: Duration) -> Self {
        let reg = Reg { registered: true, deregistered_at: None, registered_at: None };
        Self {
            spec,
            drain,
            healthy_after,
            latency: Duration::ZERO,
            throttle: None,
            state: Arc::new(Mutex::new(State {
                start: Instant::now(),
                targets: targets.iter().map(|t| (t.clone(), reg.clone())).collect(),
                procs: targets.iter().map(|t| (t.instance_id.clone(), Proc { healthy: true, az_ok: true })).collect(),
                faults: BTreeMap::new(),
                calls: vec![],
                race: None,
                min_serving: usize::MAX,
            })),
        }
    }

    /// Registers one more healthy target (a second port of an instance).
    pub fn add_target(&self, target: Target) {
        let mut s = self.state.lock().unwrap();
        s.procs.entry(target.instance_id.clone()).or_insert(Proc { healthy: true, az_ok: true });
        s.targets.insert(target, Reg { registered: true, deregistered_at: None, registered_at: None });
    }

    /// The next `n` calls of `op` fail with `fault`.
    pub fn inject(&self, op: Op, fault: Fault, n: usize) {
        let mut s = self.state.lock().unwrap();
        s.faults.entry(op).or_default().extend(std::iter::repeat_n(fault, n));
    }

    /// Drops the faults still queued for `op` (a fault that found no call in its time).
    pub fn clear_faults(&self, op: Op) {
        self.state.lock().unwrap().faults.remove(&op);
    }

    /// The fault the next call of `op` meets, without taking it (`enter` takes it).
    fn next_fault(&self, op: Op) -> Option<Fault> {
        self.state.lock().unwrap().faults.get(&op).and_then(|q| q.front()).copied()
    }

    /// Marks an instance's process healthy or not (a stopped peer).
    pub fn set_healthy(&self, id: &str, healthy: bool) {
        self.state.lock().unwrap().procs.get_mut(id).expect("known instance").healthy = healthy;
    }

    /// The instance's zone is not enabled (target group: no balancer uses it for this target): it
    /// never serves.
    pub fn set_zone_disabled(&self, id: &str) {
        self.state.lock().unwrap().procs.get_mut(id).expect("known instance").az_ok = false;
    }

    /// Removes an instance's targets directly (as a crashed cycle left them).
    pub fn force_deregistered(&self, id: &str) {
        let targets: Vec<Target> =
            self.state.lock().unwrap().targets.keys().filter(|t| t.instance_id == id).cloned().collect();
        self.force_out(&targets);
    }

    /// Takes `targets` out at once, without a call.
    fn force_out(&self, targets: &[Target]) {
        let mut s = self.state.lock().unwrap();
        for t in targets {
            if let Some(r) = s.targets.get_mut(t) {
                r.registered = false;
                r.deregistered_at = None;
            }
        }
    }

    /// When `trigger` deregisters, `peers` stop serving at the same moment (they raced us).
    pub fn race_on_deregister(&self, trigger: &str, peers: &[String]) {
        self.state.lock().unwrap().race = Some((trigger.to_owned(), peers.to_vec()));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Calls of `op` (naming one instance, if given).
    pub fn count(&self, op: Op, instance: Option<&str>) -> usize {
        self.calls().iter().filter(|c| c.op == op && (instance.is_none() || c.instance.as_deref() == instance)).count()
    }

    /// Whether every target `id` has here is registered (and it has one).
    pub fn is_registered(&self, id: &str) -> bool {
        let s = self.state.lock().unwrap();
        let mut regs = s.targets.iter().filter(|(t, _)| t.instance_id == id).peekable();
        regs.peek().is_some() && regs.all(|(_, r)| r.registered)
    }

    /// The registered targets of `id`.
    pub fn registered_targets(&self, id: &str) -> Vec<Target> {
        let s = self.state.lock().unwrap();
        s.targets.iter().filter(|(t, r)| t.instance_id == id && r.registered).map(|(t, _)| t.clone()).collect()
    }

    /// Whether every target of `id` would be reported serving now.
    pub fn is_serving(&self, id: &str) -> bool {
        let list = self.list(Instant::now());
        let mine: Vec<&TargetHealth> = list.iter().filter(|h| h.target.instance_id == id).collect();
        !mine.is_empty() && mine.iter().all(|h| h.serving())
    }

    /// Instances with a target not registered now: out of the load balancer.
    pub fn out_now(&self) -> usize {
        let s = self.state.lock().unwrap();
        let out: BTreeSet<&str> =
            s.targets.iter().filter(|(_, r)| !r.registered).map(|(t, _)| t.instance_id.as_str()).collect();
        out.len()
    }

    /// Instances serving now (every target serving), as the load balancer's own view.
    pub fn serving_now(&self) -> usize {
        crate::cycle::serving_ids(&self.list(Instant::now()), "").len()
    }

    /// The fewest serving instances any `targets` call saw.
    pub fn min_serving_seen(&self) -> usize {
        self.state.lock().unwrap().min_serving
    }

    fn list(&self, now: Instant) -> Vec<TargetHealth> {
        let s = self.state.lock().unwrap();
        s.targets.iter().filter_map(|(t, r)| self.health_of(t, r, &s.procs[&t.instance_id], now)).collect()
    }

    fn health_of(&self, target: &Target, r: &Reg, p: &Proc, now: Instant) -> Option<TargetHealth> {
        let classic = self.spec.kind == Kind::Classic;
        let h = |state, raw: &str| Some(TargetHealth { target: target.clone(), state, raw: raw.to_owned() });
        if !r.registered {
            return match r.deregistered_at {
                Some(t) if now < t + self.drain => h(
                    TargetState::Draining,
                    if classic {
                        "InService (Instance deregistration currently in progress.)"
                    } else {
                        "draining (Target.DeregistrationInProgress)"
                    },
                ),
                _ => None,
            };
        }
        if !p.az_ok {
            return h(
                TargetState::NeverHeals,
                if classic { "OutOfService (zone not enabled)" } else { "unused (Target.NotInUse)" },
            );
        }
        let warming = r.registered_at.is_some_and(|t| now < t + self.healthy_after);
        match (p.healthy, warming, classic) {
            (true, false, _) => h(TargetState::Serving, if classic { "InService (N/A)" } else { "healthy" }),
            (true, true, false) => h(TargetState::Starting, "initial (Elb.RegistrationInProgress)"),
            (_, _, false) => h(TargetState::Unhealthy, "unhealthy (Target.FailedHealthChecks)"),
            (_, _, true) => h(TargetState::Unhealthy, "OutOfService (failed health checks)"),
        }
    }

    async fn wait(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency.mul_f64(0.5 + fastrand::f64())).await;
        }
    }

    /// The SDK's attempts against the account's bucket for `op`: `Throttled` once they all were.
    async fn budget(&self, op: Op) -> Result<(), LbError> {
        let Some(throttle) = &self.throttle else { return Ok(()) };
        let v2 = self.spec.kind == Kind::TargetGroup;
        let api = match (op, v2) {
            (Op::Deregister | Op::Register, false) => Api::ElbV1Mutate,
            (Op::Deregister | Op::Register, true) => Api::ElbV2Mutate,
            (_, false) => Api::ElbV1Describe,
            (_, true) => Api::ElbV2Describe,
        };
        match throttle.call(api).await {
            Ok(()) => Ok(()),
            Err(()) => Err(LbError::Throttled { lb: self.label(), action: "(throttled by the fake account budget)" }),
        }
    }

    fn enter(&self, op: Op, targets: &[Target]) -> Result<(), LbError> {
        let mut s = self.state.lock().unwrap();
        let at = Instant::now() - s.start;
        s.calls.push(Call {
            at,
            op,
            instance: targets.first().map(|t| t.instance_id.clone()),
            targets: targets.to_vec(),
        });
        let fault = s.faults.get_mut(&op).and_then(|q| q.pop_front());
        let lb = self.label();
        let classic = self.spec.kind == Kind::Classic;
        let action = match (op, classic) {
            (Op::Targets, true) => "DescribeInstanceHealth",
            (Op::Targets, false) => "DescribeTargetHealth",
            (Op::Deregister, true) => "DeregisterInstancesFromLoadBalancer",
            (Op::Deregister, false) => "DeregisterTargets",
            (Op::Register, true) => "RegisterInstancesWithLoadBalancer",
            (Op::Register, false) => "RegisterTargets",
            (Op::Timings, true) => "DescribeLoadBalancerAttributes",
            (Op::Timings, false) => "DescribeTargetGroupAttributes",
            (Op::Resolve, _) => "DescribeTargetGroups",
        };
        let target = targets.iter().map(Target::to_string).collect::<Vec<_>>().join(" ");
        match fault {
            None => Ok(()),
            Some(Fault::Throttled) => Err(LbError::Throttled { lb, action }),
            Some(Fault::ServerError) => {
                Err(LbError::Service { lb, action, code: "InternalFailure".into(), message: "HTTP 503".into() })
            }
            Some(Fault::HealthUnavailable) => Err(LbError::Service {
                lb,
                action,
                code: "HealthUnavailable".into(),
                message: "health information is unavailable (fake, HTTP 500)".into(),
            }),
            Some(Fault::Unreachable) => {
                Err(LbError::Unreachable { lb, action, detail: "connection refused (fake)".into() })
            }
            Some(Fault::LostReply) => {
                Err(LbError::Unreachable { lb, action, detail: "timed out after the call took effect (fake)".into() })
            }
            Some(Fault::NotFound) => Err(LbError::NotFound {
                lb,
                code: if classic { "LoadBalancerNotFound" } else { "TargetGroupNotFound" }.into(),
            }),
            Some(Fault::Denied) => Err(LbError::Rejected {
                lb,
                action,
                code: "AccessDenied".into(),
                message: "User is not authorized to perform this action (fake)".into(),
            }),
            Some(Fault::InvalidTarget | Fault::InvalidTargetApplied) => Err(LbError::InvalidTarget {
                lb,
                target,
                action,
                code: if classic { "InvalidInstance" } else { "InvalidTarget" }.into(),
                message: "the target is not valid (fake)".into(),
            }),
        }
    }
}

impl LoadBalancer for FakeLb {
    fn spec(&self) -> &AttachmentSpec {
        &self.spec
    }

    fn id(&self) -> String {
        match self.spec.kind {
            Kind::Classic => self.spec.name.clone(),
            Kind::TargetGroup => {
                format!("arn:aws:elasticloadbalancing:us-east-1:000000000000:targetgroup/{}/fake", self.spec.name)
            }
        }
    }

    async fn resolve(&self) -> Result<(), LbError> {
        if self.spec.kind == Kind::TargetGroup {
            self.budget(Op::Resolve).await?;
            self.enter(Op::Resolve, &[])?;
        }
        Ok(())
    }

    async fn targets(&self) -> Result<Vec<TargetHealth>, LbError> {
        self.budget(Op::Targets).await?;
        self.wait().await;
        self.enter(Op::Targets, &[])?;
        let list = self.list(Instant::now());
        let serving = crate::cycle::serving_ids(&list, "").len();
        let mut s = self.state.lock().unwrap();
        s.min_serving = s.min_serving.min(serving);
        Ok(list)
    }

    async fn deregister(&self, targets: &[Target]) -> Result<(), LbError> {
        self.budget(Op::Deregister).await?;
        self.wait().await;
        let next = self.next_fault(Op::Deregister);
        if next == Some(Fault::InvalidTargetApplied) {
            self.force_out(targets);
        }
        // A lost reply: the call goes through as below, then the caller sees the fault.
        let lost = next == Some(Fault::LostReply);
        if !lost {
            self.enter(Op::Deregister, targets)?;
        }
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        // A target group refuses an unregistered target (the rest of the batch still goes out, as
        // moto does); a Classic load balancer does not mind.
        let mut invalid = None;
        for t in targets {
            match s.targets.get_mut(t) {
                Some(r) if r.registered => {
                    r.registered = false;
                    r.deregistered_at = Some(now);
                }
                _ if self.spec.kind == Kind::TargetGroup => invalid = Some(t.clone()),
                _ => {}
            }
        }
        if let Some((trigger, peers)) = s.race.clone() {
            if targets.iter().any(|t| t.instance_id == trigger) {
                for p in peers {
                    if let Some(proc) = s.procs.get_mut(&p) {
                        proc.healthy = false;
                    }
                }
                s.race = None;
            }
        }
        drop(s);
        if lost {
            return self.enter(Op::Deregister, targets);
        }
        match invalid {
            Some(t) => Err(LbError::InvalidTarget {
                lb: self.label(),
                target: t.to_string(),
                action: "DeregisterTargets",
                code: "InvalidTarget".into(),
                message: "The target is not registered (fake)".into(),
            }),
            None => Ok(()),
        }
    }

    async fn register(&self, targets: &[Target]) -> Result<(), LbError> {
        self.budget(Op::Register).await?;
        self.wait().await;
        // A lost reply: the call goes through as below, then the caller sees the fault.
        let lost = self.next_fault(Op::Register) == Some(Fault::LostReply);
        if !lost {
            self.enter(Op::Register, targets)?;
        }
        let mut s = self.state.lock().unwrap();
        for t in targets {
            s.procs.entry(t.instance_id.clone()).or_insert(Proc { healthy: true, az_ok: true });
            let r = s.targets.entry(t.clone()).or_insert(Reg {
                registered: false,
                deregistered_at: None,
                registered_at: None,
            });
            if !r.registered {
                r.registered = true;
                r.deregistered_at = None;
                r.registered_at = Some(Instant::now());
            }
        }
        drop(s);
        if lost {
            return self.enter(Op::Register, targets);
        }
        Ok(())
    }

    async fn timings(&self) -> Result<LbTimings, LbError> {
        self.budget(Op::Timings).await?;
        self.enter(Op::Timings, &[])?;
        let drain = match self.spec.kind {
            Kind::Classic => (!self.drain.is_zero()).then_some(self.drain),
            Kind::TargetGroup => Some(self.drain),
        };
        Ok(LbTimings { drain, healthy_after: self.healthy_after })
    }
}

/// A fixed member list.
#[derive(Debug, Clone)]
pub struct FakeMembers(pub BTreeSet<String>);

impl Membership for FakeMembers {
    async fn members(&self) -> Result<Roster, MembersError> {
        Ok(Roster::of(Members::Ids(self.0.clone())))
    }
    fn describe(&self) -> String {
        format!("fake:{}", self.0.len())
    }
}

/// A fixed member list read, with a throttle, the way `--members ec2-name` reads it (`api`
/// `Ec2Describe`: one `DescribeInstances` per read, one page up to 1,000 instances) or `--members
/// asg` does (`AutoScaling`: one `DescribeAutoScalingGroups` per read). Without a throttle, never
/// throttled.
#[derive(Debug, Clone)]
pub struct ThrottledMembers {
    pub ids: BTreeSet<String>,
    pub throttle: Option<Throttle>,
    pub api: Api,
}

impl ThrottledMembers {
    /// What one read finds: the members, and for `AutoScaling` their lifecycle and the group
    /// ("fleet", with the fleet's Classic load balancer), as `AsgMembers` reads them.
    pub fn roster(&self) -> Roster {
        let mut roster = Roster::of(Members::Ids(self.ids.clone()));
        if self.api == Api::AutoScaling {
            roster.lifecycle = self.ids.iter().map(|id| (id.clone(), "InService".to_owned())).collect();
            roster.group = Some(Box::new(GroupInfo {
                name: "fleet".into(),
                load_balancers: vec!["fleet".into()],
                ..GroupInfo::default()
            }));
        }
        roster
    }
}

impl Membership for ThrottledMembers {
    async fn members(&self) -> Result<Roster, MembersError> {
        let Some(throttle) = &self.throttle else { return Ok(self.roster()) };
        let pages = if self.api == Api::Ec2Describe { self.ids.len().div_ceil(1000).max(1) } else { 1 };
        for _ in 0..pages {
            throttle.call(self.api).await.map_err(|()| {
                MembersError::Transient(format!("{:?} failed: throttled (fake account budget)", self.api))
            })?;
        }
        Ok(self.roster())
    }
    fn describe(&self) -> String {
        format!("fake-ec2:{}", self.ids.len())
    }
}

/// An API family AWS throttles with its own token bucket, per account and region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Api {
    /// ELB API version 1 (Classic) `Describe*`.
    ElbV1Describe,
    /// ELB API version 2 (target groups) `Describe*`.
    ElbV2Describe,
    /// Classic `RegisterInstancesWithLoadBalancer` / `DeregisterInstancesFromLoadBalancer`.
    ElbV1Mutate,
    /// `RegisterTargets` / `DeregisterTargets`.
    ElbV2Mutate,
    /// EC2 `DescribeInstances`.
    Ec2Describe,
    /// Every EC2 Auto Scaling call, reads and `EnterStandby`/`ExitStandby` alike: one shared bucket.
    AutoScaling,
}

impl Api {
    /// Bucket size and refill per second. `Describe*`: the figures, from AWS's ELB and EC2
    /// documentation (40 and 10/s for each ELB API version; 100 and 20/s for `DescribeInstances`;
    /// ELB's page has since raised `Describe*` to 200 and 50/s, and the model keeps the smaller
    /// figures). The registration calls (`RegisterTargets`, `DeregisterTargets`): 20 and 4/s, ELB's
    /// table as AWS's own Load Balancer Controller copies it into its client-side limits
    /// (benches/README.md); Classic's registration calls are assumed the same. EC2 Auto Scaling
    /// throttles every call of the account from one shared bucket (its API reference); the size is
    /// not in what this project could read: ELB's `Describe*` figures, 40 and 10/s, assumed.
    pub fn bucket(self) -> (f64, f64) {
        match self {
            Api::ElbV1Describe | Api::ElbV2Describe | Api::AutoScaling => (40.0, 10.0),
            Api::ElbV1Mutate | Api::ElbV2Mutate => (20.0, 4.0),
            Api::Ec2Describe => (100.0, 20.0),
        }
    }
}

/// The retries the product's SDK configuration makes (`identity::aws_config`: adaptive mode,
/// 5 attempts, backoff from 0.5 s doubling to at most 20 s, full jitter); each attempt takes a
/// token. The adaptive mode's client-side rate limiter is not modelled: it only delays attempts.
pub const SDK_ATTEMPTS: u32 = 5;
pub const SDK_BACKOFF: Duration = Duration::from_millis(500);
pub const SDK_MAX_BACKOFF: Duration = Duration::from_secs(20);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Size and refill per second, scaled.
    size: f64,
    refill: f64,
}

#[derive(Debug)]
struct ThrottleState {
    start: Instant,
    buckets: BTreeMap<Api, Bucket>,
    /// Every attempt: when, which family, and whether it was throttled.
    attempts: Vec<(Duration, Api, bool)>,
    /// Calls that failed after all attempts.
    lost: BTreeMap<Api, usize>,
}

/// One AWS account's API throttling in one region, on tokio's clock: a token bucket per family.
#[derive(Debug, Clone)]
pub struct Throttle {
    inner: Arc<Mutex<ThrottleState>>,
    /// Bucket sizes and refills multiplied by this (1.0: AWS's).
    pub scale: f64,
}

impl Throttle {
    /// AWS's buckets, full.
    pub fn aws() -> Self {
        Self::scaled(1.0)
    }

    pub fn scaled(scale: f64) -> Self {
        let now = Instant::now();
        let buckets = ALL_APIS
            .into_iter()
            .map(|api| {
                let (size, refill) = api.bucket();
                (api, Bucket { tokens: size * scale, at: now, size: size * scale, refill: refill * scale })
            })
            .collect();
        let state = ThrottleState { start: now, buckets, attempts: Vec::new(), lost: BTreeMap::new() };
        Throttle { inner: Arc::new(Mutex::new(state)), scale }
    }

    /// The same world with `api`'s bucket set to `size` tokens refilled `refill` per second
    /// (unscaled), full.
    pub fn with_bucket(self, api: Api, size: f64, refill: f64) -> Self {
        {
            let mut st = self.inner.lock().unwrap();
            let b = st.buckets.get_mut(&api).expect("every family has a bucket");
            (b.size, b.refill, b.tokens) = (size * self.scale, refill * self.scale, size * self.scale);
        }
        self
    }

    /// One attempt: takes a token if there is one.
    fn attempt(&self, api: Api) -> bool {
        let mut st = self.inner.lock().unwrap();
        let now = Instant::now();
        let at = now - st.start;
        let b = st.buckets.get_mut(&api).expect("every family has a bucket");
        b.tokens = (b.tokens + (now - b.at).as_secs_f64() * b.refill).min(b.size);
        b.at = now;
        let ok = b.tokens >= 1.0;
        if ok {
            b.tokens -= 1.0;
        }
        st.attempts.push((at, api, !ok));
        ok
    }

    /// A call as the SDK makes it: up to `SDK_ATTEMPTS` attempts with backoff; `Err` once all were throttled.
    pub async fn call(&self, api: Api) -> Result<(), ()> {
        for attempt in 0..SDK_ATTEMPTS {
            if self.attempt(api) {
                return Ok(());
            }
            if attempt + 1 < SDK_ATTEMPTS {
                let cap = (SDK_BACKOFF * (1u32 << attempt)).min(SDK_MAX_BACKOFF);
                tokio::time::sleep(cap.mul_f64(fastrand::f64())).await;
            }
        }
        *self.inner.lock().unwrap().lost.entry(api).or_default() += 1;
        Err(())
    }

    /// Attempts of `apis` in the busiest `window` (sliding, at each attempt), per second.
    pub fn peak_per_s(&self, apis: &[Api], window: Duration) -> f64 {
        let st = self.inner.lock().unwrap();
        let times: Vec<Duration> =
            st.attempts.iter().filter(|(_, a, _)| apis.contains(a)).map(|(t, _, _)| *t).collect();
        peak_rate(&times, window)
    }

    /// Attempts of `apis` that were throttled, and calls lost after all attempts.
    pub fn throttled(&self, apis: &[Api]) -> (usize, usize) {
        let st = self.inner.lock().unwrap();
        let attempts = st.attempts.iter().filter(|(_, a, t)| *t && apis.contains(a)).count();
        let lost = apis.iter().map(|a| st.lost.get(a).copied().unwrap_or(0)).sum();
        (attempts, lost)
    }
}

/// The busiest `window` of sorted `times` (sliding, starting at each event): the index range of
/// its events, the first such window when several tie.
fn busiest_span(times: &[Duration], window: Duration) -> (usize, usize) {
    let (mut best, mut j) = ((0, 0), 0);
    for i in 0..times.len() {
        while j < times.len() && times[j] < times[i] + window {
            j += 1;
        }
        if j - i > best.1 - best.0 {
            best = (i, j);
        }
    }
    best
}

/// The highest number of events in any `window` (sliding, starting at each event), per second.
pub fn peak_rate(times: &[Duration], window: Duration) -> f64 {
    let mut times = times.to_vec();
    times.sort();
    let (i, j) = busiest_span(&times, window);
    (j - i) as f64 / window.as_secs_f64()
}

/// The busiest `window` of `events` (time, kind), as `peak_rate` finds it: when it began and its
/// events by kind.
pub fn busiest(events: &[(Duration, String)], window: Duration) -> (Duration, BTreeMap<String, usize>) {
    let mut events = events.to_vec();
    events.sort();
    let times: Vec<Duration> = events.iter().map(|e| e.0).collect();
    let (i, j) = busiest_span(&times, window);
    let mut by_kind = BTreeMap::new();
    for (_, kind) in &events[i..j] {
        *by_kind.entry(kind.clone()).or_insert(0) += 1;
    }
    (times.get(i).copied().unwrap_or_default(), by_kind)
}

/// The largest sum of weights within any `window`, per second.
pub fn peak_sum(events: &[(Duration, f64)], window: Duration) -> f64 {
    let mut events = events.to_vec();
    events.sort_by_key(|e| e.0);
    let (mut best, mut sum, mut j) = (0.0f64, 0.0, 0);
    for i in 0..events.len() {
        while j < events.len() && events[j].0 < events[i].0 + window {
            sum += events[j].1;
            j += 1;
        }
        best = best.max(sum);
        sum -= events[i].1;
    }
    best / window.as_secs_f64()
}

/// Which Auto Scaling call a scripted fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupOp {
    /// `members()` and `group()`: DescribeAutoScalingGroups.
    Describe,
    EnterStandby,
    ExitStandby,
}

#[derive(Debug)]
struct GroupState {
    start: Instant,
    /// Instance id → (zone, lifecycle state).
    instances: BTreeMap<String, (String, String)>,
    min: i32,
    desired: i32,
    faults: BTreeMap<GroupOp, VecDeque<Fault>>,
    calls: Vec<(Duration, GroupOp)>,
    /// Targets an instance had in each attachment (by index) when it entered Standby.
    parked: BTreeMap<String, Vec<(usize, Vec<Target>)>>,
    /// Attachments added to the group after it was made (`FakeGroup::attach`).
    attached: Vec<AttachmentSpec>,
}

/// An Auto Scaling group in memory, for what moto cannot show: `EnteringStandby`, Standby taking
/// the instance out of target groups too (moto keeps it there), throttled or failing
/// Enter/ExitStandby, the minimum size. Standby deregisters the instance from every attached fake
/// (so draining shows as on AWS) and `ExitStandby` registers it again.
#[derive(Clone)]
pub struct FakeGroup {
    pub name: String,
    /// The attachments the group manages.
    pub lbs: Vec<FakeLb>,
    state: Arc<Mutex<GroupState>>,
}

impl FakeGroup {
    /// `ids` InService, spread over `zones` in turn; desired = `ids.len()`, min 0.
    pub fn new(name: &str, ids: &[String], zones: &[&str], lbs: Vec<FakeLb>) -> Self {
        let instances = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), (zones[i % zones.len()].to_owned(), "InService".to_owned())))
            .collect();
        FakeGroup {
            name: name.into(),
            lbs,
            state: Arc::new(Mutex::new(GroupState {
                start: Instant::now(),
                instances,
                min: 0,
                desired: ids.len() as i32,
                faults: BTreeMap::new(),
                calls: vec![],
                parked: BTreeMap::new(),
                attached: vec![],
            })),
        }
    }

    pub fn set_min(&self, min: i32) {
        self.state.lock().unwrap().min = min;
    }

    /// Attaches one more load balancer or target group to the group (an operator's change).
    pub fn attach(&self, spec: AttachmentSpec) {
        self.state.lock().unwrap().attached.push(spec);
    }

    fn info(&self, s: &GroupState) -> GroupInfo {
        let names = |kind| {
            let own = self.lbs.iter().filter(|l| l.spec().kind == kind).map(|l| l.id());
            own.chain(s.attached.iter().filter(|a| a.kind == kind).map(|a| a.name.clone())).collect()
        };
        GroupInfo {
            name: self.name.clone(),
            load_balancers: names(Kind::Classic),
            target_groups: names(Kind::TargetGroup),
            min_size: s.min,
            desired: s.desired,
            health_check_type: "ELB".into(),
            health_check_grace_s: 300,
        }
    }

    /// The next `n` calls of `op` fail with `fault`.
    pub fn inject(&self, op: GroupOp, fault: Fault, n: usize) {
        self.state.lock().unwrap().faults.entry(op).or_default().extend(std::iter::repeat_n(fault, n));
    }

    pub fn lifecycle(&self, id: &str) -> Option<String> {
        self.state.lock().unwrap().instances.get(id).map(|(_, l)| l.clone())
    }

    /// Sets an instance's lifecycle state directly (an operator's Standby, a scale-in).
    pub fn set_lifecycle(&self, id: &str, state: &str) {
        self.state.lock().unwrap().instances.get_mut(id).expect("known instance").1 = state.to_owned();
    }

    pub fn desired(&self) -> i32 {
        self.state.lock().unwrap().desired
    }

    /// Calls in order, with their times.
    pub fn calls(&self) -> Vec<(Duration, GroupOp)> {
        self.state.lock().unwrap().calls.clone()
    }

    fn enter(&self, op: GroupOp) -> Result<(), MembersError> {
        let mut s = self.state.lock().unwrap();
        let at = Instant::now() - s.start;
        s.calls.push((at, op));
        let what = format!("{op:?} on Auto Scaling group {} (fake)", self.name);
        match s.faults.get_mut(&op).and_then(|q| q.pop_front()) {
            None => Ok(()),
            Some(Fault::Throttled) => Err(MembersError::Transient(format!("{what}: Throttling: Rate exceeded"))),
            Some(Fault::ServerError | Fault::HealthUnavailable | Fault::Unreachable) => {
                Err(MembersError::Transient(format!("{what}: InternalFailure")))
            }
            Some(Fault::Denied) => Err(MembersError::Configuration(format!("{what}: AccessDenied"))),
            Some(_) => Err(MembersError::Failed(format!("{what}: ValidationError"))),
        }
    }
}

impl Membership for FakeGroup {
    async fn members(&self) -> Result<Roster, MembersError> {
        self.enter(GroupOp::Describe)?;
        let s = self.state.lock().unwrap();
        let mut roster = Roster::of(Members::Ids(BTreeSet::new()));
        for (id, (zone, state)) in s.instances.iter().filter(|(_, (_, l))| crate::lb::members::counts_as_member(l)) {
            if let Members::Ids(ids) = &mut roster.members {
                ids.insert(id.clone());
            }
            roster.zones.insert(id.clone(), zone.clone());
            roster.lifecycle.insert(id.clone(), state.clone());
        }
        roster.group = Some(Box::new(self.info(&s)));
        Ok(roster)
    }

    fn describe(&self) -> String {
        format!("asg:{} (fake)", self.name)
    }

    fn group_name(&self) -> Option<String> {
        Some(self.name.clone())
    }

    async fn group(&self) -> Result<GroupInfo, MembersError> {
        self.enter(GroupOp::Describe)?;
        let s = self.state.lock().unwrap();
        Ok(self.info(&s))
    }

    async fn enter_standby(&self, me: &str) -> Result<(), MembersError> {
        self.enter(GroupOp::EnterStandby)?;
        {
            let mut s = self.state.lock().unwrap();
            if s.desired - 1 < s.min {
                return Err(MembersError::Failed(format!(
                    "EnterStandby: ValidationError: desired capacity {} would go below the minimum {} (fake)",
                    s.desired, s.min
                )));
            }
            s.desired -= 1;
            s.instances.get_mut(me).expect("known instance").1 = "Standby".into();
            let parked = self.lbs.iter().enumerate().map(|(i, lb)| (i, lb.registered_targets(me))).collect();
            s.parked.insert(me.to_owned(), parked);
        }
        for lb in &self.lbs {
            let targets = lb.registered_targets(me);
            if !targets.is_empty() {
                lb.deregister(&targets).await.map_err(|e| MembersError::Failed(e.to_string()))?;
            }
        }
        Ok(())
    }

    async fn exit_standby(&self, me: &str) -> Result<(), MembersError> {
        self.enter(GroupOp::ExitStandby)?;
        let parked = {
            let mut s = self.state.lock().unwrap();
            let entry = s.instances.get_mut(me).expect("known instance");
            if entry.1 != "Standby" {
                return Err(MembersError::Failed(format!(
                    "ExitStandby: ValidationError: instance {me} is not in Standby (fake)"
                )));
            }
            entry.1 = "InService".into();
            s.desired += 1;
            s.parked.remove(me).unwrap_or_default()
        };
        for (i, targets) in parked {
            if !targets.is_empty() {
                self.lbs[i].register(&targets).await.map_err(|e| MembersError::Failed(e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// What the next restart of fake programs meets (then it is cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hitch {
    /// The stop takes this long (a program slow to stop, up to its `stopwaitsecs`). Past the
    /// restart timeout supervisord's stop ends with the programs STOPPED: nothing starts them.
    SlowStop(Duration),
    /// The process is killed while starting and supervisord starts it again (BACKOFF): RUNNING
    /// this much later, after the restart timeout if that is shorter.
    KilledWhileStarting(Duration),
}

/// Programs that take `restart_time` to restart; `fail` makes restarts fail; `running` is what
/// `running()` answers; `hitch` delays the next restart, and past `timeout` it fails as
/// supervisord's client does (`RestartTimeout`). Marks the instance's process unhealthy in the
/// fake LB while restarting.
#[derive(Clone)]
pub struct FakeServices {
    pub restart_time: Duration,
    pub timeout: Duration,
    pub hitch: Arc<Mutex<Option<Hitch>>>,
    /// Programs supervisord is still starting after a restart timed out (they come up later).
    pub coming_up: Arc<Mutex<bool>>,
    pub fail: Arc<Mutex<bool>>,
    /// Restarts fail without having stopped anything (e.g. the program vanished meanwhile).
    pub fail_before_stop: Arc<Mutex<bool>>,
    pub running: Arc<Mutex<bool>>,
    pub restarts: Arc<Mutex<u32>>,
    pub known: BTreeSet<String>,
    /// Attachments whose health follows this instance's programs: (attachment, instance id).
    pub lbs: Vec<(FakeLb, String)>,
}

impl FakeServices {
    pub fn new(restart_time: Duration, known: &[&str]) -> Self {
        Self {
            restart_time,
            timeout: Duration::from_secs(120),
            hitch: Arc::default(),
            coming_up: Arc::default(),
            fail: Arc::default(),
            fail_before_stop: Arc::default(),
            running: Arc::new(Mutex::new(true)),
            restarts: Arc::default(),
            known: known.iter().map(|s| s.to_string()).collect(),
            lbs: Vec::new(),
        }
    }

    /// RUNNING, and healthy again in every attachment.
    pub fn up(&self) {
        *self.running.lock().unwrap() = true;
        for (lb, me) in &self.lbs {
            lb.set_healthy(me, true);
        }
    }
}

impl Services for FakeServices {
    async fn validate(&self, programs: &[String]) -> Result<(), SupervisorError> {
        match programs.iter().find(|p| !self.known.contains(*p)) {
            Some(p) => Err(SupervisorError::UnknownProgram { name: p.clone() }),
            None => Ok(()),
        }
    }

    async fn restart(&self, programs: &[String]) -> Result<(), SupervisorError> {
        self.validate(programs).await?;
        for (lb, me) in &self.lbs {
            lb.set_healthy(me, false);
        }
        *self.running.lock().unwrap() = false;
        let (total, started) = match self.hitch.lock().unwrap().take() {
            None => (self.restart_time, true),
            Some(Hitch::SlowStop(d)) => (d + self.restart_time, d < self.timeout),
            Some(Hitch::KilledWhileStarting(d)) => (self.restart_time + d, true),
        };
        if total > self.timeout {
            tokio::time::sleep(self.timeout).await;
            if started {
                // supervisord goes on starting them: RUNNING later, unless they fail.
                let me = self.clone();
                *me.coming_up.lock().unwrap() = true;
                tokio::spawn(async move {
                    tokio::time::sleep(total - me.timeout).await;
                    *me.restarts.lock().unwrap() += 1;
                    if !*me.fail.lock().unwrap() {
                        me.up();
                    }
                    *me.coming_up.lock().unwrap() = false;
                });
            }
            return Err(SupervisorError::RestartTimeout {
                programs: programs.join(" "),
                after: self.timeout,
                states: if started { "STARTING" } else { "STOPPING" }.into(),
            });
        }
        tokio::time::sleep(total).await;
        *self.restarts.lock().unwrap() += 1;
        if *self.fail_before_stop.lock().unwrap() {
            *self.running.lock().unwrap() = true;
            for (lb, me) in &self.lbs {
                lb.set_healthy(me, true);
            }
            return Err(SupervisorError::UnknownProgram { name: programs.join(" ") });
        }
        if *self.fail.lock().unwrap() {
            return Err(SupervisorError::ProgramFailed {
                program: programs.join(" "),
                state: "FATAL".into(),
                detail: " (fake)".into(),
            });
        }
        self.up();
        Ok(())
    }

    async fn running(&self, _programs: &[String]) -> Result<bool, SupervisorError> {
        Ok(*self.running.lock().unwrap())
    }
}

/// Which permit-store call a scripted fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoreOp {
    Load,
    /// `Init`: the record's maps made to exist.
    Init,
    /// `Claim`.
    Acquire,
    Renew,
    Remove,
    /// `--batch-registrations`: asks, withdrawals, batch claims and their ends.
    Batch,
    /// The shared view's item and its head: reads, refresh lease, publication.
    LoadView,
    LeaseView,
    PublishView,
    /// The view's head after a publication (`SharedWrite::Head`).
    PublishHead,
}

impl StoreOp {
    pub fn is_read(self) -> bool {
        matches!(self, StoreOp::Load | StoreOp::LoadView)
    }
}

/// A permit-store fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    Throttled,
    ServerError,
    /// Times out, not applied.
    Timeout,
    /// Applied, then the reply is lost (a timeout to the caller).
    LostReply,
    NoTable,
    AccessDenied,
}

/// One call the fake store answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    pub at: Duration,
    /// The item's key (the record's shards and the shared view are items of their own).
    pub key: String,
    pub op: StoreOp,
    /// The entry written (writes only).
    pub id: Option<String>,
    /// `read`, `applied`, `conflict` or `error`.
    pub result: &'static str,
    /// The item's size in bytes (its JSON's; a write's, the larger of before and after), 0 for a
    /// missing item.
    pub bytes: usize,
}

/// The permit record's size as DynamoDB would count it, about its JSON's.
fn record_bytes(r: Option<&Record>) -> usize {
    r.map_or(0, |r| serde_json::to_string(r).map_or(0, |j| j.len()))
}

/// The shared view's item size (or its head's): the view, about 64 bytes for the key and numbers
/// (`n`, `sv`, `at`, `lu`), the lease's holder and the shards' versions (`svs`).
fn shared_bytes(s: Option<&Shared>) -> usize {
    s.map_or(0, |s| s.data.len() + 64 + s.lease_holder.len() + 6 * s.seen.len())
}

impl StoreCall {
    /// The read units DynamoDB charges for this call: one per 4 KB of the item (at least one) for a
    /// strongly consistent read (the record's), half that for an eventually consistent one (the
    /// shared view's); none for a write.
    pub fn read_units(&self) -> f64 {
        let per_4k = match self.op {
            StoreOp::Load => 1.0,
            StoreOp::LoadView => 0.5,
            _ => return 0.0,
        };
        self.bytes.div_ceil(4096).max(1) as f64 * per_4k
    }

    /// The write units DynamoDB charges for this call, applied or refused by its condition: one per
    /// 1 KB of the item (at least one); none for a read.
    pub fn write_units(&self) -> f64 {
        match self.op.is_read() {
            true => 0.0,
            false => self.bytes.div_ceil(1024).max(1) as f64,
        }
    }
}

#[derive(Debug)]
struct StoreState {
    start: Instant,
    records: BTreeMap<String, Record>,
    shared: BTreeMap<String, Shared>,
    faults: BTreeMap<StoreOp, VecDeque<StoreFault>>,
    sticky: BTreeMap<StoreOp, StoreFault>,
    calls: Vec<StoreCall>,
}

/// An in-memory permit store with DynamoDB's conditional-write semantics (each call atomic), a
/// latency, and faults moto cannot produce: throttling, 5xx, timeouts, replies lost after the write.
#[derive(Debug, Clone)]
pub struct FakeStore {
    inner: Arc<Mutex<StoreState>>,
    pub latency: Duration,
}

impl Default for FakeStore {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeStore {
    pub fn new() -> Self {
        let state = StoreState {
            start: Instant::now(),
            records: BTreeMap::new(),
            shared: BTreeMap::new(),
            faults: BTreeMap::new(),
            sticky: BTreeMap::new(),
            calls: Vec::new(),
        };
        Self { inner: Arc::new(Mutex::new(state)), latency: Duration::ZERO }
    }

    /// The next call of `op` fails with `fault` (queued: one fault per call).
    pub fn fault(&self, op: StoreOp, fault: StoreFault) {
        self.inner.lock().unwrap().faults.entry(op).or_default().push_back(fault);
    }

    /// Drops the faults still queued for `op`.
    pub fn clear_faults(&self, op: StoreOp) {
        self.inner.lock().unwrap().faults.remove(&op);
    }

    /// Every call of `op` fails with `fault` from now on (`None`: none again).
    pub fn fault_always(&self, op: StoreOp, fault: Option<StoreFault>) {
        let mut st = self.inner.lock().unwrap();
        match fault {
            Some(f) => st.sticky.insert(op, f),
            None => st.sticky.remove(&op),
        };
    }

    pub fn calls(&self) -> Vec<StoreCall> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn record(&self, key: &str) -> Option<Record> {
        self.inner.lock().unwrap().records.get(key).cloned()
    }

    pub fn set_record(&self, key: &str, record: Record) {
        self.inner.lock().unwrap().records.insert(key.into(), record);
    }

    fn take_fault(&self, op: StoreOp) -> Option<StoreFault> {
        let mut st = self.inner.lock().unwrap();
        st.faults.get_mut(&op).and_then(|q| q.pop_front()).or_else(|| st.sticky.get(&op).copied())
    }

    fn log(&self, key: &str, op: StoreOp, id: Option<&str>, result: &'static str) {
        let mut st = self.inner.lock().unwrap();
        let at = st.start.elapsed();
        st.calls.push(StoreCall { at, key: key.to_owned(), op, id: id.map(str::to_owned), result, bytes: 0 });
    }

    fn error(fault: StoreFault, action: &'static str) -> LeaseError {
        let table = "fake-permits".to_owned();
        match fault {
            StoreFault::Throttled => LeaseError::Throttled { table, action },
            StoreFault::ServerError => {
                LeaseError::Unavailable { table, action, detail: "InternalServerError: injected".into() }
            }
            StoreFault::Timeout | StoreFault::LostReply => {
                LeaseError::Unavailable { table, action, detail: "timeout (injected)".into() }
            }
            StoreFault::NoTable => LeaseError::NoTable { table },
            StoreFault::AccessDenied => LeaseError::AccessDenied { table, action, message: "injected".into() },
        }
    }

    /// DynamoDB's semantics for one conditional write, atomically.
    fn apply(&self, key: &str, write: &Write) -> Written {
        let mut st = self.inner.lock().unwrap();
        let current = st.records.get(key).cloned();
        let conflict = || Written::Conflict(current.clone());
        let entry = |rec: &Record, id: &str, tok: &str, kind: PermitKind| {
            rec.holders.get(id).is_some_and(|h| h.tok == tok && h.kind == kind)
        };
        match write {
            Write::Init => {
                let rec = st.records.entry(key.into()).or_default();
                rec.complete = true;
                rec.ver += 1;
            }
            Write::Claim { id, holder, limit, pace } => {
                let Some(rec) = st.records.get_mut(key).filter(|r| r.complete) else { return conflict() };
                let slots = rec.holders.values().filter(|h| h.kind == PermitKind::Slot).count();
                let paced_out = pace.as_ref().is_some_and(|p| {
                    rec.window_start != p.window_start || (!p.new_window && rec.window_grants >= p.quota)
                });
                if rec.holders.contains_key(id) || (holder.kind == PermitKind::Slot && slots >= *limit) || paced_out {
                    return conflict();
                }
                rec.holders.insert(id.clone(), holder.clone());
                match pace {
                    Some(p) if p.new_window => {
                        (rec.window_start, rec.window_grants, rec.window_quota) = (holder.since, 1, Some(p.quota))
                    }
                    Some(_) => rec.window_grants += 1,
                    None => {}
                }
                rec.ver += 1;
            }
            Write::Renew { id, tok, exp, kind } => {
                let Some(rec) = st.records.get_mut(key).filter(|r| entry(r, id, tok, *kind)) else { return conflict() };
                rec.holders.get_mut(id).expect("checked").exp = *exp;
                rec.ver += 1;
            }
            Write::Remove { id, tok, kind } => {
                let Some(rec) = st.records.get_mut(key).filter(|r| entry(r, id, tok, *kind)) else { return conflict() };
                rec.holders.remove(id);
                rec.ver += 1;
            }
            Write::Ask { id, tok, kind, way, elems } => {
                let Some(rec) = st.records.get_mut(key).filter(|r| entry(r, id, tok, *kind)) else { return conflict() };
                let set = match way {
                    crate::lease::batch::Way::Out => &mut rec.batches.want_out,
                    crate::lease::batch::Way::In => &mut rec.batches.want_in,
                };
                set.extend(elems.iter().cloned());
                rec.ver += 1;
            }
            Write::Withdraw { id, elems, stale } => {
                let Some(rec) = st.records.get_mut(key) else { return conflict() };
                let b = &mut rec.batches;
                if b.claim.as_ref().is_some_and(|c| c.until >= *stale && c.ids.contains(id)) {
                    return conflict();
                }
                b.want_out.retain(|e| !elems.contains(e));
                b.want_in.retain(|e| !elems.contains(e));
                b.withdrawals += 1;
                rec.ver += 1;
            }
            Write::TakeBatch { claim, now, stale, withdrawals } => {
                let Some(rec) = st.records.get_mut(key) else { return conflict() };
                let b = &mut rec.batches;
                if b.claim.as_ref().is_some_and(|c| c.until >= *stale) || b.next > *now || b.withdrawals != *withdrawals
                {
                    return conflict();
                }
                b.claim = Some(claim.clone());
                rec.ver += 1;
            }
            Write::Shards { n } => {
                let Some(rec) = st.records.get_mut(key).filter(|r| r.complete && r.shards < *n) else {
                    return conflict();
                };
                rec.shards = *n;
                rec.ver += 1;
            }
            Write::Forget { elems } => {
                let rec = st.records.entry(key.into()).or_default();
                rec.batches.want_out.retain(|e| !elems.contains(e));
                rec.batches.want_in.retain(|e| !elems.contains(e));
                rec.ver += 1;
            }
            Write::EndBatch { tok, out, back, next } => {
                let Some(rec) = st.records.get_mut(key) else { return conflict() };
                let b = &mut rec.batches;
                if b.claim.as_ref().is_none_or(|c| c.tok != *tok) {
                    return conflict();
                }
                b.claim = None;
                b.next = *next;
                b.want_out.retain(|e| !out.contains(e));
                b.want_in.retain(|e| !back.contains(e));
                rec.ver += 1;
            }
        }
        Written::Applied(st.records[key].clone())
    }

    /// The shared view item's conditional writes, atomically.
    fn apply_shared(&self, key: &str, write: SharedWrite) -> bool {
        let mut st = self.inner.lock().unwrap();
        let item = st.shared.entry(key.into()).or_default();
        match write {
            SharedWrite::Lease { now, until, me } => {
                if item.lease_until != 0 && !item.lease_free(&me, now) {
                    return false;
                }
                (item.lease_until, item.lease_holder) = (until, me);
            }
            SharedWrite::Publish { seen_ver, seen, at, data } => {
                if item.n > 0 && item.seen_ver > seen_ver {
                    return false;
                }
                *item = Shared { seen_ver, seen, n: item.n + 1, at, data, ..std::mem::take(item) };
            }
            SharedWrite::Head { n, seen_ver, seen, at } => {
                if item.n >= n {
                    return false;
                }
                *item = Shared { seen_ver, seen, n, at, ..std::mem::take(item) };
            }
        }
        true
    }

    /// The shared view's item under `key` (its full key, `lease::view_key`), if any.
    pub fn shared(&self, key: &str) -> Option<Shared> {
        self.inner.lock().unwrap().shared.get(key).cloned()
    }

    /// One read (`op`): the latency, a scripted fault, else `value()`.
    async fn read<T>(
        &self,
        key: &str,
        op: StoreOp,
        value: impl FnOnce() -> T,
        bytes: impl Fn(&T) -> usize,
    ) -> Result<T, LeaseError> {
        tokio::time::sleep(self.latency).await;
        if let Some(f) = self.take_fault(op) {
            self.log(key, op, None, "error");
            return Err(Self::error(f, "GetItem"));
        }
        self.log(key, op, None, "read");
        let value = value();
        if let Some(c) = self.inner.lock().unwrap().calls.last_mut() {
            c.bytes = bytes(&value);
        }
        Ok(value)
    }

    /// One conditional write (`op`, on entry `id`): the latency, a scripted fault, else `apply()`
    /// (whether it was applied says `applied`); a lost reply applies it and answers the fault.
    async fn conditional<T>(
        &self,
        key: &str,
        op: StoreOp,
        id: Option<&str>,
        apply: impl FnOnce() -> T,
        applied: impl Fn(&T) -> bool,
        bytes: impl Fn() -> usize,
    ) -> Result<T, LeaseError> {
        tokio::time::sleep(self.latency).await;
        let fault = self.take_fault(op);
        if let Some(f) = fault.filter(|f| *f != StoreFault::LostReply) {
            self.log(key, op, id, "error");
            return Err(Self::error(f, "UpdateItem"));
        }
        let before = bytes();
        let written = apply();
        self.log(key, op, id, if applied(&written) { "applied" } else { "conflict" });
        let size = before.max(bytes());
        if let Some(c) = self.inner.lock().unwrap().calls.last_mut() {
            c.bytes = size;
        }
        match fault {
            Some(f) => Err(Self::error(f, "UpdateItem")),
            None => Ok(written),
        }
    }

    async fn do_write_shared(&self, key: &str, write: SharedWrite) -> Result<bool, LeaseError> {
        let op = match write {
            SharedWrite::Lease { .. } => StoreOp::LeaseView,
            SharedWrite::Publish { .. } => StoreOp::PublishView,
            SharedWrite::Head { .. } => StoreOp::PublishHead,
        };
        let bytes = || shared_bytes(self.shared(key).as_ref());
        self.conditional(key, op, None, || self.apply_shared(key, write), |applied| *applied, bytes).await
    }

    async fn do_write(&self, key: &str, write: Write) -> Result<Written, LeaseError> {
        let (op, id) = match &write {
            Write::Init | Write::Shards { .. } => (StoreOp::Init, String::new()),
            Write::Forget { .. } => (StoreOp::Batch, String::new()),
            Write::Claim { id, .. } => (StoreOp::Acquire, id.clone()),
            Write::Renew { id, .. } => (StoreOp::Renew, id.clone()),
            Write::Remove { id, .. } => (StoreOp::Remove, id.clone()),
            Write::Ask { id, .. } | Write::Withdraw { id, .. } => (StoreOp::Batch, id.clone()),
            Write::TakeBatch { .. } | Write::EndBatch { .. } => (StoreOp::Batch, String::new()),
        };
        let bytes = || record_bytes(self.record(key).as_ref());
        self.conditional(key, op, Some(&id), || self.apply(key, &write), Written::applied, bytes).await
    }
}

impl PermitStore for FakeStore {
    fn table(&self) -> &str {
        "fake-permits"
    }
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, LeaseError>> {
        Box::pin(self.read(key, StoreOp::Load, move || self.record(key), |r: &Option<Record>| record_bytes(r.as_ref())))
    }
    fn write<'a>(&'a self, key: &'a str, write: Write) -> BoxFuture<'a, Result<Written, LeaseError>> {
        Box::pin(self.do_write(key, write))
    }
    fn load_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Shared>, LeaseError>> {
        Box::pin(self.read(
            key,
            StoreOp::LoadView,
            move || self.shared(key),
            |s: &Option<Shared>| shared_bytes(s.as_ref()),
        ))
    }
    fn write_shared<'a>(&'a self, key: &'a str, write: SharedWrite) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.do_write_shared(key, write))
    }
}

/// The fake tests' timings: checks every 30 s (at most 10), polls every 5 s, no settle pause.
pub fn test_timing() -> crate::cycle::Timing {
    crate::cycle::Timing {
        check_interval: Duration::from_secs(30),
        max_checks: 10,
        poll_interval: Duration::from_secs(5),
        drain_timeout: None,
        health_timeout: None,
        settle: Duration::ZERO,
    }
}

/// A cycle for `me` over the fake attachments `lbs`, every instance of `ids` a member, and
/// `services` making `me` unhealthy in each attachment while it restarts; quorum 0.75, at least one
/// other serving, default timings (set others with `with_timing`).
pub fn fake_cycle(
    lbs: Vec<FakeLb>,
    ids: &[String],
    me: &str,
    services: &FakeServices,
    state: crate::cycle::state_file::StateFile,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> crate::cycle::Cycle<FakeLb, FakeMembers, FakeServices> {
    let services = FakeServices { lbs: lbs.iter().map(|lb| (lb.clone(), me.to_owned())).collect(), ..services.clone() };
    crate::cycle::Cycle::new(lbs, FakeMembers(ids.iter().cloned().collect()), services, me, state, shutdown)
        .with_rule(crate::quorum::Rule { quorum_ppm: 750_000, min_in_service: 1 })
        .with_clock(crate::clock::WallClock::tokio())
}

/// Strict-mode settings for a fake fleet: D 120 s, G 30 s, H 3600 s, no skew.
pub fn fake_permits(store: &FakeStore, key: &str, me: &str) -> crate::lease::Permits {
    crate::lease::Permits {
        store: Arc::new(store.clone()),
        key: key.into(),
        me: me.into(),
        duration: Duration::from_secs(120),
        grace: Duration::from_secs(30),
        max_hold: Duration::from_secs(3600),
        skew_ms: 0,
        leave_rate: 0.0,
        clock: crate::clock::WallClock::tokio(),
        seen_shards: Default::default(),
    }
}

/// A simulated fleet: K instances on one fake load balancer, all asked to restart at once.
#[derive(Debug, Clone)]
pub struct FleetParams {
    pub k: usize,
    /// API round trip of each load-balancer call (±50 %).
    pub latency: Duration,
    pub rule: crate::quorum::Rule,
    pub drain: Duration,
    pub restart: Duration,
    pub healthy_after: Duration,
    pub timing: crate::cycle::Timing,
    /// Strict mode: a fake permit store with this round trip per call.
    pub strict: Option<Duration>,
    /// AWS's account-wide throttling (`Throttle::aws()`) on the load balancer, and the members read
    /// through EC2's `DescribeInstances` budget; without it, no call is ever throttled.
    pub throttle: bool,
    /// With `throttle`: the registration calls' bucket (size, refill per second) instead of
    /// `Api::ElbV1Mutate.bucket()`.
    pub registration: Option<(f64, f64)>,
    /// Strict mode: `--leave-rate` (permits per second across the fleet; 0: unpaced).
    pub leave_rate: f64,
    /// How members are read: `Api::Ec2Describe` (`--members ec2-name`) or `Api::AutoScaling`
    /// (`--members asg`, attachments from the group: each process first looks its group up,
    /// `DescribeAutoScalingInstances` then `DescribeAutoScalingGroups`, before any other call).
    pub members: Api,
    /// The fleet ran before: strict mode finds the shared view its last restart left (stale; with
    /// `--members asg` holding the group), and `--members asg` the group's name kept in each state
    /// directory. Else the fleet's first run: no view, every process looks its group up.
    pub ran_before: bool,
    /// Strict mode: `--batch-registrations`.
    pub batch: bool,
    /// `--members asg:NAME`: the group named, so a process needs no lookup for its name.
    pub named_group: bool,
}

/// What a fleet run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetReport {
    pub k: usize,
    pub makespan: Duration,
    /// Waves of `permits` instances, each drain + restart + health: the best any schedule can do.
    pub theoretical: Duration,
    pub permits: usize,
    pub required: usize,
    /// Fewest serving instances the outside sampler (every 100 ms) saw.
    pub min_serving: usize,
    /// Sum over samples of instances below `required` × 100 ms: how long and how deep any dip was.
    pub below_quorum_instance_seconds: f64,
    pub restarts: Vec<u32>,
    pub lb_calls: usize,
    pub lb_calls_per_second: f64,
    pub races: u32,
    pub failures: usize,
    /// Strict mode: permit-store calls (reads and writes, heartbeats included).
    pub store_calls: usize,
    /// Strict mode: acquire writes that met a conflict, and those that were applied.
    pub conflicts: usize,
    pub acquires: usize,
    /// Most instances out of the load balancer at once (the outside sampler, every 100 ms).
    pub most_out: usize,
    /// With `throttle`: attempts per second in the busiest 10 s window, ELB `Describe*` (both
    /// versions) and EC2 `Describe*`, throttled attempts included (AWS counts them too).
    pub elb_describe_peak_per_s: f64,
    pub ec2_describe_peak_per_s: f64,
    /// Auto Scaling attempts per second in the busiest 10 s window (`--members asg`).
    pub autoscaling_peak_per_s: f64,
    /// Attempts AWS throttled, and calls that failed after all the SDK's attempts (each a check
    /// or a poll lost).
    pub throttled_attempts: usize,
    /// Reads (ELB and EC2 `Describe*`: quorum checks, polls, shared-view refreshes) lost after all
    /// attempts.
    pub calls_lost_to_throttling: usize,
    /// Registration attempts (`Register*`, `Deregister*`, both versions) per second in the busiest
    /// 10 s window, throttled ones included, and the attempts throttled.
    pub registration_peak_per_s: f64,
    pub registration_throttled: usize,
    /// Registration calls lost after all the SDK's attempts (the cycle tries them again: a
    /// deregistration for `DEREGISTER_RETRY_FOR`, a registration for `REGISTER_RETRY_FOR`).
    pub registration_calls_lost: usize,
    /// Registration calls made (`Register*` and `Deregister*`, each call once whatever its
    /// attempts): 2 × K when every instance makes its own.
    pub registration_calls: usize,
    /// Permit-store writes (all items: the record's shards and the shared view) in the busiest second.
    pub store_writes_peak_per_s: f64,
    /// That second: when it began, and its writes by kind and result (`acquire applied`, ...).
    pub store_writes_peak_at: Duration,
    pub store_writes_peak_by_op: BTreeMap<String, usize>,
    /// Each item's busiest second (writes, read units, write units), by key.
    pub store_items: BTreeMap<String, [f64; 3]>,
    /// Permit-store writes in the busiest second of the busiest item (a shard of the record, or the
    /// shared view).
    pub store_item_writes_peak_per_s: f64,
    /// Permit-store reads (the record's and the shared view's) in the busiest second.
    pub store_reads_peak_per_s: f64,
    /// DynamoDB read units those reads would cost in the busiest second of the busiest item (a
    /// shard of the record, or the view; `StoreCall::read_units`): one partition key takes at most
    /// about 3,000 per second.
    pub store_read_units_peak_per_s: f64,
    /// The same for write units (`StoreCall::write_units`): one partition key takes at most about
    /// 1,000 per second.
    pub store_write_units_peak_per_s: f64,
}

/// Runs the fleet on tokio's clock (call inside a runtime with paused time for instant results).
pub async fn simulate_fleet(p: &FleetParams) -> FleetReport {
    use crate::cycle::{state_file::StateFile, Outcome};
    use crate::trigger::{Origin, RestartRequest};

    // Ids as long as AWS's (17 hex digits): the permit record's and the shared view's sizes, hence
    // their DynamoDB units, grow with them.
    let ids: Vec<String> = (0..p.k).map(|i| format!("i-{i:017x}")).collect();
    let mut lb = FakeLb::new("fleet", &ids, p.drain, p.healthy_after);
    lb.latency = p.latency;
    let throttle = p.throttle.then(|| match p.registration {
        Some((size, refill)) => Throttle::aws().with_bucket(Api::ElbV1Mutate, size, refill),
        None => Throttle::aws(),
    });
    lb.throttle = throttle.clone();
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let base = std::env::temp_dir().join(format!("elb-quorum-fleet-{}-{run}", std::process::id()));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let required = p.rule.required(p.k);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (lb, done) = (lb.clone(), done.clone());
        tokio::spawn(async move {
            let (mut min, mut deficit, mut most_out) = (usize::MAX, 0.0, 0);
            loop {
                let n = lb.serving_now();
                min = min.min(n);
                most_out = most_out.max(lb.out_now());
                deficit += required.saturating_sub(n) as f64 * 0.1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break (min, deficit, most_out);
                }
            }
        })
    };
    let store = p.strict.map(|latency| FakeStore { latency, ..FakeStore::new() });
    let members = ThrottledMembers { ids: ids.iter().cloned().collect(), throttle: throttle.clone(), api: p.members };
    if let (Some(store), true) = (&store, p.ran_before) {
        // The view the fleet's last restart left: the group in it, long stale.
        let (listed, timings) =
            (vec![lb.list(Instant::now())], vec![LbTimings { drain: Some(p.drain), healthy_after: p.healthy_after }]);
        let view = crate::cycle::view::View { roster: members.roster(), listed, timings, timings_at: 0 };
        let old = Shared { seen_ver: 0, n: 1, at: 0, data: view.encode(), ..Shared::default() };
        store.inner.lock().unwrap().shared.insert(crate::lease::view_key("fleet"), old);
    }
    // What a group lookup answers (`--members asg`).
    let group = members.roster().group.map(|g| *g).unwrap_or_default();
    // One wall clock for the whole simulated fleet, as NTP gives real ones.
    let clock = crate::clock::WallClock::tokio();
    let mut tasks = Vec::new();
    for id in &ids {
        let services = FakeServices::new(p.restart, &["web"]);
        let permits = store.as_ref().map(|s| crate::lease::Permits {
            clock,
            leave_rate: p.leave_rate,
            ..fake_permits(s, "fleet", id)
        });
        let cycle = fake_cycle(vec![lb.clone()], &ids, id, &services, StateFile::new(base.join(id)), rx.clone())
            .with_clock(clock)
            .with_rule(p.rule)
            .with_timing(p.timing.clone())
            .with_permits(permits.clone());
        let cycle = cycle.with_members(members.clone()).with_batch_registrations(p.batch);
        let (throttle, api, group) = (throttle.clone(), p.members, group.clone());
        let name_known = p.ran_before || p.named_group;
        tasks.push(tokio::spawn(async move {
            let mut cycle = cycle;
            // `--members asg`: the process's start as `build_for` makes it: the group's name
            // (`DescribeAutoScalingInstances`, unless kept or named), then the group (strict mode:
            // `group_at_start`, from the shared view or one process's lookup; else
            // `DescribeAutoScalingGroups`), retried as the product does; failing it for good, the
            // process ends (exit 3) with nothing changed.
            if let (Some(t), Api::AutoScaling) = (&throttle, api) {
                let lookup = || {
                    crate::lb::members::retry_at_start("the group lookup", || async {
                        let throttled = || MembersError::Transient("Auto Scaling: throttled".into());
                        t.call(Api::AutoScaling).await.map_err(|()| throttled())?;
                        Ok(group.clone())
                    })
                };
                let started = async {
                    if !name_known {
                        lookup().await?;
                    }
                    match &permits {
                        Some(permits) => crate::cycle::start::group_at_start(permits, "fleet", lookup).await.map(Some),
                        None => lookup().await.map(|_| None),
                    }
                };
                match started.await {
                    Ok(Some(start)) => {
                        if let Some(read) = start.read {
                            cycle = cycle.with_view_read(read);
                        }
                        if start.publish {
                            let _ = cycle.prime_view().await;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return (Ok(Outcome::Aborted), 0),
                }
            }
            let r = cycle.run(&RestartRequest::new(["web".to_string()], Origin::Remote)).await;
            let restarts = *services.restarts.lock().unwrap();
            (r, restarts)
        }));
    }
    let (mut restarts, mut races, mut failures) = (vec![], 0, 0);
    for t in tasks {
        let (r, n) = t.await.expect("cycle task");
        restarts.push(n);
        match r {
            Ok(Outcome::Done(s)) => races += s.races,
            _ => failures += 1,
        }
    }
    let makespan = start.elapsed();
    let calls = lb.calls().len();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (min_serving, deficit, most_out) = sampler.await.expect("sampler");
    let _ = std::fs::remove_dir_all(&base);
    let permits = p.rule.permits(p.k).max(1);
    let waves = p.k.div_ceil(permits) as u32;
    let (throttled_attempts, _) = throttle.as_ref().map_or((0, 0), |t| t.throttled(&ALL_APIS));
    let reads = [Api::ElbV1Describe, Api::ElbV2Describe, Api::Ec2Describe, Api::AutoScaling];
    let calls_lost_to_throttling = throttle.as_ref().map_or(0, |t| t.throttled(&reads).1);
    let mutate = [Api::ElbV1Mutate, Api::ElbV2Mutate];
    let (registration_throttled, registration_calls_lost) = throttle.as_ref().map_or((0, 0), |t| t.throttled(&mutate));
    let items = store.as_ref().map_or_else(Default::default, |s| item_peaks(&s.calls()));
    let busiest_writes = store.as_ref().map_or_else(Default::default, |s| {
        let writes: Vec<(Duration, String)> = s
            .calls()
            .iter()
            .filter(|c| !c.op.is_read())
            .map(|c| (c.at, format!("{:?} {}", c.op, c.result).to_lowercase()))
            .collect();
        busiest(&writes, Duration::from_secs(1))
    });
    FleetReport {
        k: p.k,
        makespan,
        theoretical: (p.drain + p.restart + p.healthy_after) * waves,
        permits,
        required,
        min_serving,
        below_quorum_instance_seconds: deficit,
        restarts,
        lb_calls: calls,
        lb_calls_per_second: calls as f64 / makespan.as_secs_f64().max(1e-9),
        races,
        failures,
        store_calls: store.as_ref().map_or(0, |s| s.calls().len()),
        conflicts: store
            .as_ref()
            .map_or(0, |s| s.calls().iter().filter(|c| c.op == StoreOp::Acquire && c.result == "conflict").count()),
        acquires: store
            .as_ref()
            .map_or(0, |s| s.calls().iter().filter(|c| c.op == StoreOp::Acquire && c.result == "applied").count()),
        most_out,
        elb_describe_peak_per_s: throttle
            .as_ref()
            .map_or(0.0, |t| t.peak_per_s(&[Api::ElbV1Describe, Api::ElbV2Describe], Duration::from_secs(10))),
        ec2_describe_peak_per_s: throttle
            .as_ref()
            .map_or(0.0, |t| t.peak_per_s(&[Api::Ec2Describe], Duration::from_secs(10))),
        autoscaling_peak_per_s: throttle
            .as_ref()
            .map_or(0.0, |t| t.peak_per_s(&[Api::AutoScaling], Duration::from_secs(10))),
        throttled_attempts,
        calls_lost_to_throttling,
        registration_peak_per_s: throttle.as_ref().map_or(0.0, |t| t.peak_per_s(&mutate, Duration::from_secs(10))),
        registration_throttled,
        registration_calls_lost,
        registration_calls: lb.calls().iter().filter(|c| matches!(c.op, Op::Register | Op::Deregister)).count(),
        // The busiest second's writes, counted.
        store_writes_peak_per_s: busiest_writes.1.values().sum::<usize>() as f64,
        store_writes_peak_at: busiest_writes.0,
        store_writes_peak_by_op: busiest_writes.1,
        store_reads_peak_per_s: store.as_ref().map_or(0.0, |s| {
            let reads: Vec<Duration> = s.calls().iter().filter(|c| c.op.is_read()).map(|c| c.at).collect();
            peak_rate(&reads, Duration::from_secs(1))
        }),
        store_item_writes_peak_per_s: busiest_item(&items, 0),
        store_read_units_peak_per_s: busiest_item(&items, 1),
        store_write_units_peak_per_s: busiest_item(&items, 2),
        store_items: items,
    }
}

/// Each item's busiest second for writes, read units and write units, by key.
fn item_peaks(calls: &[StoreCall]) -> BTreeMap<String, [f64; 3]> {
    let keys: BTreeSet<&str> = calls.iter().map(|c| c.key.as_str()).collect();
    keys.into_iter()
        .map(|k| {
            let of = |amount: &dyn Fn(&StoreCall) -> Option<f64>| -> f64 {
                let v: Vec<(Duration, f64)> =
                    calls.iter().filter(|c| c.key == k).filter_map(|c| amount(c).map(|a| (c.at, a))).collect();
                peak_sum(&v, Duration::from_secs(1))
            };
            let writes = of(&|c| (!c.op.is_read()).then_some(1.0));
            let reads = of(&|c| c.op.is_read().then(|| c.read_units()));
            let units = of(&|c| (!c.op.is_read()).then(|| c.write_units()));
            (k.to_owned(), [writes, reads, units])
        })
        .collect()
}

/// The busiest item's (one DynamoDB partition key: a shard of the record, or the shared view)
/// figure `i` of `item_peaks` (0 writes, 1 read units, 2 write units) in its busiest second.
fn busiest_item(items: &BTreeMap<String, [f64; 3]>, i: usize) -> f64 {
    items.values().map(|v| v[i]).fold(0.0, f64::max)
}

const ALL_APIS: [Api; 6] =
    [Api::ElbV1Describe, Api::ElbV2Describe, Api::ElbV1Mutate, Api::ElbV2Mutate, Api::Ec2Describe, Api::AutoScaling];
