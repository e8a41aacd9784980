//! Target groups and several attachments per instance against the in-process fake
//! (`elb_quorum::fake::FakeLb`), for what moto never shows: it reports `healthy` at once and
//! `unused` right after deregistering (never `initial`, `draining` or `unhealthy`), keeps one port
//! per instance, calls a group with no balancer `healthy`, and neither throttles nor answers
//! `HealthUnavailable`. Each test says which of these it needs. Time is tokio's paused clock. Every
//! test checks where each (attachment, target) pair ends: registered, unless said loudly.

use std::time::Duration;

use elb_quorum::cycle::state_file::{StateFile, Step};
use elb_quorum::cycle::{Cycle, CycleError, Outcome};
use elb_quorum::fake::{fake_cycle, test_timing, FakeLb, FakeMembers, FakeServices, Fault, Op};
use elb_quorum::lb::{Kind, LoadBalancer, Target};
use elb_quorum::quorum::Reason;
use elb_quorum::trigger::{Origin, RestartRequest};
use tokio::sync::watch;

const S: fn(u64) -> Duration = Duration::from_secs;

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("i-{i:04}")).collect()
}

fn me() -> String {
    ids(1)[0].clone()
}

struct Harness {
    cycle: Cycle<FakeLb, FakeMembers, FakeServices>,
    lbs: Vec<FakeLb>,
    services: FakeServices,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

/// Four members on `lbs` (each holding all four), this instance is the first; restart takes 10 s.
fn harness(lbs: Vec<FakeLb>) -> Harness {
    let all = ids(4);
    let services = FakeServices::new(S(10), &["web"]);
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = watch::channel(false);
    let cycle =
        fake_cycle(lbs.clone(), &all, &all[0], &services, StateFile::new(dir.path()), rx).with_timing(test_timing());
    Harness { cycle, lbs, services, _dir: dir, _shutdown: tx }
}

fn group(name: &str, drain: u64, healthy_after: u64) -> FakeLb {
    FakeLb::target_group(name, &ids(4), 80, S(drain), S(healthy_after))
}

fn classic(name: &str, drain: u64, healthy_after: u64) -> FakeLb {
    FakeLb::new(name, &ids(4), S(drain), S(healthy_after))
}

fn web() -> RestartRequest {
    RestartRequest::new(["web".to_string()], Origin::Cli)
}

/// Register and deregister calls of one attachment, in order.
fn changes(lb: &FakeLb) -> Vec<(Op, Vec<Target>)> {
    lb.calls()
        .into_iter()
        .filter(|c| matches!(c.op, Op::Deregister | Op::Register))
        .map(|c| (c.op, c.targets))
        .collect()
}

/// Every attachment lists this instance's targets as serving, and the state file is gone.
fn all_back(h: &Harness) {
    for lb in &h.lbs {
        assert!(lb.is_serving(&me()), "{}: serving again", lb.label());
    }
    assert_eq!(h.cycle.state.load().unwrap(), None, "state file cleared");
}

/// Why the fake: moto never shows `draining` (it ignores the deregistration delay) nor `initial`.
/// Three target groups with 30 s delays and 20 s health: the waits run side by side, so the cycle
/// costs one delay and one health bound, not three of each.
#[tokio::test(start_paused = true)]
async fn draining_and_initial_are_waited_out_in_every_group_side_by_side() {
    let h = harness(vec![group("a", 30, 20), group("b", 30, 20), group("c", 30, 20)]);
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!("not done") };
    assert!(s.drain >= S(30) && s.drain <= S(30) + S(6), "one delay plus at most one poll: {:?}", s.drain);
    assert!(
        s.back_in_service >= S(20) && s.back_in_service <= S(20) + S(6),
        "initial until healthy, one poll of slack: {:?}",
        s.back_in_service
    );
    for lb in &h.lbs {
        let mine = vec![Target::on_port(me(), 80)];
        assert_eq!(changes(lb), vec![(Op::Deregister, mine.clone()), (Op::Register, mine)]);
    }
    all_back(&h);
}

/// Why the fake: moto keeps one port per instance (the last registered wins). One instance on two
/// ports of a group: both are taken out, recorded, and put back.
#[tokio::test(start_paused = true)]
async fn an_instance_on_two_ports_leaves_and_rejoins_on_both() {
    let tg = group("grpc", 0, 5);
    tg.add_target(Target::on_port(me(), 8080));
    let h = harness(vec![classic("web", 0, 5), tg.clone()]);
    let ports = vec![Target::on_port(me(), 80), Target::on_port(me(), 8080)];
    let (lb, services) = (tg.clone(), h.services.clone());
    let during = tokio::spawn(async move {
        // While restarting, the state file and the group agree: both ports out.
        tokio::time::sleep(S(3)).await;
        (lb.registered_targets(&me()), *services.running.lock().unwrap())
    });
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    let (registered, running) = during.await.unwrap();
    assert!(registered.is_empty() && !running, "both ports out while restarting: {registered:?}");
    assert_eq!(changes(&tg), vec![(Op::Deregister, ports.clone()), (Op::Register, ports.clone())]);
    assert_eq!(tg.registered_targets(&me()), ports);
    all_back(&h);
}

/// Why the fake: moto's health is `healthy` or `unused`, never `unhealthy`. A peer unhealthy in one
/// group only blocks, and the refusal names that group; nothing changes anywhere.
#[tokio::test(start_paused = true)]
async fn a_peer_unhealthy_in_one_group_blocks_and_is_named() {
    let mut h = harness(vec![group("http", 0, 5), group("grpc", 0, 5)]);
    h.cycle.timing.max_checks = 2;
    h.lbs[1].set_healthy(&ids(4)[2], false);
    match h.cycle.run(&web()).await.unwrap() {
        Outcome::GaveUp { verdict, checks: 2 } => {
            assert_eq!((verdict.attachment.as_str(), verdict.reason), ("target group grpc", Reason::BelowQuorum))
        }
        other => panic!("{other:?}"),
    }
    assert!(h.lbs.iter().all(|lb| changes(lb).is_empty()), "nothing changed");
}

/// Why the fake: moto calls a group with no balancer `healthy` (AWS: `unused` /
/// `Target.NotInUse`). Such a target never heals: refused before leaving.
#[tokio::test(start_paused = true)]
async fn not_in_use_is_refused_before_leaving() {
    let h = harness(vec![classic("web", 0, 5), group("grpc", 0, 5)]);
    h.lbs[1].set_zone_disabled(&me());
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(matches!(e, CycleError::NeverHeals { .. }) && e.is_configuration(), "{e}");
    assert!(e.to_string().contains("target group grpc") && e.to_string().contains("Target.NotInUse"), "{e}");
    assert!(h.lbs.iter().all(|lb| changes(lb).is_empty()), "nothing changed");
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
}

/// Why the fake: moto does not throttle, and never answers `HealthUnavailable`. Both count as failed
/// checks at the gate; the cycle then goes through.
#[tokio::test(start_paused = true)]
async fn throttling_and_health_unavailable_are_failed_checks() {
    let h = harness(vec![group("http", 0, 5), group("grpc", 0, 5)]);
    h.lbs[0].inject(Op::Targets, Fault::Throttled, 2);
    h.lbs[1].inject(Op::Targets, Fault::HealthUnavailable, 1);
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(s.checks, 4, "three failed checks, then one that passed");
    all_back(&h);
}

/// Why the fake: moto cannot fail one call of three. Deregistering from group 2 of 3 fails (5xx):
/// groups 1 and 2 are registered again, group 3 was never touched, and nothing restarted.
#[tokio::test(start_paused = true)]
async fn a_failure_deregistering_from_the_second_of_three_groups_puts_back_the_first_two() {
    let h = harness(vec![group("a", 0, 5), group("b", 0, 5), group("c", 0, 5)]);
    h.lbs[1].inject(Op::Deregister, Fault::ServerError, 1);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(!e.left_out(), "{e}");
    let mine = vec![Target::on_port(me(), 80)];
    assert_eq!(changes(&h.lbs[0]), vec![(Op::Deregister, mine.clone()), (Op::Register, mine.clone())]);
    assert_eq!(changes(&h.lbs[1]), vec![(Op::Deregister, mine.clone()), (Op::Register, mine.clone())]);
    assert_eq!(changes(&h.lbs[2]), vec![], "the third group was never touched");
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
    all_back(&h);
}

/// Why the fake: an `InvalidTarget` answer that moto gives only for a target it does not list.
/// Deregistering an unregistered target: counted as out when the group then lists it as not
/// registered; refused (and registered again) when the group still lists it serving.
#[tokio::test(start_paused = true)]
async fn invalid_target_on_deregister_counts_out_only_when_the_group_agrees() {
    // The call took the target out but answered InvalidTarget (as moto does for a batch with one
    // invalid target): the group lists it as not registered, so it counts as out.
    let h = harness(vec![group("http", 0, 5)]);
    h.lbs[0].inject(Op::Deregister, Fault::InvalidTargetApplied, 1);
    let outcome = h.cycle.run(&web()).await;
    assert!(matches!(outcome, Ok(Outcome::Done(_))), "{outcome:?}");
    assert_eq!(*h.services.restarts.lock().unwrap(), 1);
    all_back(&h);

    // The group still lists the target serving: exit 3 after registering again.
    let h = harness(vec![group("http", 0, 5)]);
    h.lbs[0].inject(Op::Deregister, Fault::InvalidTarget, 1);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(matches!(e, CycleError::Lb(_)) && !e.left_out() && !e.is_configuration(), "{e}");
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
    all_back(&h);
}

/// Why the fake: moto registers a stopped instance's target only with a 400 it cannot be made to
/// give mid-cycle. `RegisterTargets` → `InvalidTarget`: exit 3, loud, with the command that
/// registers by hand; every other group is still registered.
#[tokio::test(start_paused = true)]
async fn invalid_target_on_register_says_loudly_it_is_left_out() {
    let h = harness(vec![group("http", 0, 5), group("grpc", 0, 5)]);
    h.lbs[0].inject(Op::Register, Fault::InvalidTarget, 1);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(e.left_out(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("IS STILL DEREGISTERED FROM target group http"), "{msg}");
    assert!(msg.contains("aws elbv2 register-targets --target-group-arn arn:") && msg.contains("Port=80"), "{msg}");
    assert!(h.lbs[1].is_serving(&me()), "the other group was registered anyway");
    assert!(!h.lbs[0].is_registered(&me()));
    assert_eq!(h.cycle.state.load().unwrap().map(|r| r.step), Some(Step::Registering), "reconcile can finish it");
}

/// Why the fake: a process killed between two deregistrations needs a group that is not yet
/// touched. kill -9 after group 1 of 2 (state file written, group 2 still registered): the next
/// start registers every recorded pair again.
#[tokio::test(start_paused = true)]
async fn reconcile_after_kill_between_two_groups_registers_every_pair() {
    let tg = group("grpc", 0, 5);
    tg.add_target(Target::on_port(me(), 8080));
    let h = harness(vec![group("http", 0, 5), tg.clone(), classic("web", 0, 5)]);
    // What the killed process had recorded before its first deregistration.
    let obs = h.cycle.observe().await.unwrap();
    let plan = h.cycle.plan(&obs).unwrap();
    assert_eq!(plan.iter().map(|t| t.targets.len()).collect::<Vec<_>>(), vec![1, 2, 1]);
    assert_eq!(plan[1].kind, Kind::TargetGroup);
    assert!(plan[1].id.starts_with("arn:"), "the state file keeps the ARN: {}", plan[1].id);
    h.cycle
        .state
        .save(&elb_quorum::cycle::state_file::Record {
            step: Step::Deregistering,
            instance_id: me(),
            via: Default::default(),
            group: None,
            attachments: plan,
            programs: vec!["web".into()],
            since: 1,
            pid: 1,
        })
        .unwrap();
    h.lbs[0].force_deregistered(&me()); // group 1 done; killed before group 2
    assert!(h.cycle.reconcile().await.unwrap());
    assert_eq!(tg.registered_targets(&me()).len(), 2, "both ports");
    all_back(&h);
}

/// Why the fake: only the fake has a deregistration delay. Past the delay + margin the cycle goes
/// on with a warning, as on AWS (the load balancer has cut connections by then).
#[tokio::test(start_paused = true)]
async fn drain_timeout_overrides_the_delay() {
    let mut h = harness(vec![group("slow", 600, 5)]);
    h.cycle.timing.drain_timeout = Some(S(20));
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert!(s.drain >= S(20) && s.drain < S(30), "{:?}", s.drain);
    assert_eq!(h.lbs[0].count(Op::Register, Some(&me())), 1);
}

/// Why the fakes: moto cannot show draining, and its DynamoDB is not atomic under concurrency.
/// Strict mode with two attachments takes one permit for the cluster, holds it from before the
/// first deregistration until serving again in both, and releases it once.
#[tokio::test(start_paused = true)]
async fn strict_mode_takes_one_permit_for_every_attachment() {
    use elb_quorum::fake::{fake_permits, FakeStore, StoreOp};
    let (mut web_lb, mut grpc) = (classic("web", 20, 5), group("grpc", 30, 10));
    // Calls take time, so that their order shows in their times.
    web_lb.latency = Duration::from_millis(100);
    grpc.latency = Duration::from_millis(100);
    let mut h = harness(vec![web_lb, grpc]);
    let store = FakeStore::new();
    h.cycle.permits = Some(fake_permits(&store, "web.example.com", &me()));
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    let writes = |result| store.calls().iter().filter(|c| c.op == StoreOp::Acquire && c.result == result).count();
    assert_eq!(writes("applied"), 1, "one permit for the cluster, not one per attachment");
    let acquired = store.calls().iter().find(|c| c.op == StoreOp::Acquire && c.result == "applied").unwrap().at;
    let released = store.calls().iter().find(|c| c.op == StoreOp::Remove && c.result == "applied").unwrap().at;
    for lb in &h.lbs {
        let at = |op| lb.calls().iter().find(|c| c.op == op).unwrap().at;
        assert!(acquired < at(Op::Deregister) && at(Op::Register) < released, "{}", lb.label());
    }
    assert!(store.record("web.example.com").is_none_or(|r| r.holders.is_empty()), "released");
    all_back(&h);
}

/// Why the fake: moto cannot make one target unhealthy in one group only. An attachment where this
/// instance was already out costs it nothing: neither the gate nor the recheck after deregistering
/// holds the instance back for it, even though that group is below quorum.
#[tokio::test(start_paused = true)]
async fn a_group_where_this_instance_is_already_out_does_not_hold_it_back() {
    let h = harness(vec![group("http", 0, 5), group("grpc", 0, 5)]);
    h.lbs[1].set_healthy(&me(), false);
    h.lbs[1].set_healthy(&ids(4)[2], false); // grpc: 2 of 4 serving, below 3, without this instance
    let (lb, id) = (h.lbs[1].clone(), me());
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!((s.checks, s.races), (1, 0), "no wait, no race");
    assert_eq!(changes(&h.lbs[1]).len(), 2, "left and rejoined grpc too");
    lb.set_healthy(&id, true);
    assert!(h.lbs[0].is_serving(&me()) && lb.is_registered(&me()));
}
