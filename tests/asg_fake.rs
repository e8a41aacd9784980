//! Auto Scaling groups against the in-process fakes (`elb_quorum::fake::FakeGroup` over
//! `FakeLb`s), for what moto cannot show: it never shows `EnteringStandby` nor draining, keeps a
//! Standby instance registered in target groups (AWS takes it out of both kinds), never throttles
//! or fails EnterStandby/ExitStandby, and does not check the minimum size. Each test says which of
//! these it needs. Time is tokio's paused clock. Every test checks where the instance ends: in
//! service, or loudly out.

use std::time::Duration;

use elb_quorum::cycle::state_file::{LeaveVia, Record, StateFile, Step};
use elb_quorum::cycle::{Cycle, CycleError, Outcome};
use elb_quorum::fake::{test_timing, FakeGroup, FakeLb, FakeServices, Fault, GroupOp, Op};
use elb_quorum::lb::LoadBalancer;
use elb_quorum::quorum::{Reason, Rule};
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
    cycle: Cycle<FakeLb, FakeGroup, FakeServices>,
    group: FakeGroup,
    services: FakeServices,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

/// `n` instances in a group over two zones (a, b, a, b, ...) behind two target groups (drain
/// 30 s, healthy 10 s after registering); this instance is the first; restart takes 10 s.
fn harness(n: usize, via: LeaveVia) -> Harness {
    let all = ids(n);
    let lbs = vec![
        FakeLb::target_group("http", &all, 80, S(30), S(10)),
        FakeLb::target_group("grpc", &all, 9000, S(30), S(10)),
    ];
    let group = FakeGroup::new("web-asg", &all, &["us-east-1a", "us-east-1b"], lbs.clone());
    let mut services = FakeServices::new(S(10), &["web"]);
    services.lbs = lbs.iter().map(|lb| (lb.clone(), all[0].clone())).collect();
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = watch::channel(false);
    let cycle = Cycle::new(lbs, group.clone(), services.clone(), all[0].clone(), StateFile::new(dir.path()), rx)
        .with_rule(Rule { quorum_ppm: 750_000, min_in_service: 1 })
        .with_timing(test_timing())
        .with_leave_via(via);
    Harness { cycle, group, services, _dir: dir, _shutdown: tx }
}

fn web() -> RestartRequest {
    RestartRequest::new(["web".to_string()], Origin::Cli)
}

fn group_ops(h: &Harness) -> Vec<GroupOp> {
    h.group.calls().into_iter().map(|(_, op)| op).filter(|op| *op != GroupOp::Describe).collect()
}

/// InService in the group, serving in both target groups, desired capacity as before, state file gone.
fn back_in_service(h: &Harness, desired: i32) {
    assert_eq!(h.group.lifecycle(&me()).as_deref(), Some("InService"));
    assert_eq!(h.group.desired(), desired, "desired capacity restored");
    for lb in &h.cycle.lbs {
        assert!(lb.is_serving(&me()), "{}: serving", lb.label());
    }
    assert_eq!(h.cycle.state.load().unwrap(), None);
}

/// Why the fake: moto neither drains nor removes a Standby instance from target groups. Standby
/// with two target groups: the group takes the instance out of both, the cycle waits out the
/// draining of both (side by side), restarts, leaves Standby and waits until both serve.
#[tokio::test(start_paused = true)]
async fn standby_with_two_target_groups_waits_out_draining() {
    let h = harness(4, LeaveVia::Standby);
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!("not done") };
    assert_eq!(group_ops(&h), vec![GroupOp::EnterStandby, GroupOp::ExitStandby]);
    assert!(s.drain >= S(30) && s.drain <= S(40), "both groups drained, side by side: {:?}", s.drain);
    assert!(s.back_in_service >= S(10), "waited until healthy: {:?}", s.back_in_service);
    for lb in &h.cycle.lbs {
        let ops: Vec<Op> =
            lb.calls().iter().filter(|c| matches!(c.op, Op::Deregister | Op::Register)).map(|c| c.op).collect();
        assert_eq!(ops, vec![Op::Deregister, Op::Register], "{}: by the group, once each", lb.label());
    }
    assert_eq!(*h.services.restarts.lock().unwrap(), 1);
    back_in_service(&h, 4);
}

/// Why the fake: moto does not check the minimum size. At the minimum, Standby is refused before
/// anything changes, naming the setting.
#[tokio::test(start_paused = true)]
async fn standby_at_the_minimum_size_is_refused_before_any_change() {
    let h = harness(4, LeaveVia::Standby);
    h.group.set_min(4);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(matches!(e, CycleError::StandbyForbidden { .. }) && e.is_configuration(), "{e}");
    assert!(e.to_string().contains("MinSize 4"), "{e}");
    assert_eq!(group_ops(&h), vec![]);
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
    back_in_service(&h, 4);
}

/// Why the fake: moto never throttles. EnterStandby throttled twice: retried with backoff, then
/// the cycle goes through.
#[tokio::test(start_paused = true)]
async fn enter_standby_throttled_is_retried() {
    let h = harness(4, LeaveVia::Standby);
    h.group.inject(GroupOp::EnterStandby, Fault::Throttled, 2);
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(
        group_ops(&h),
        vec![GroupOp::EnterStandby; 3].into_iter().chain([GroupOp::ExitStandby]).collect::<Vec<_>>()
    );
    back_in_service(&h, 4);
}

/// Why the fake: moto never fails ExitStandby. Failing on AWS's side, it is retried; refused for
/// good, the instance is said loudly to be left in Standby, with the command that brings it back.
#[tokio::test(start_paused = true)]
async fn exit_standby_failing_is_retried_then_said_loudly() {
    let h = harness(4, LeaveVia::Standby);
    h.group.inject(GroupOp::ExitStandby, Fault::ServerError, 2);
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    back_in_service(&h, 4);

    let h = harness(4, LeaveVia::Standby);
    h.group.inject(GroupOp::ExitStandby, Fault::Denied, 1);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(e.left_out(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("IS STILL IN STANDBY") && msg.contains("aws autoscaling exit-standby"), "{msg}");
    assert_eq!(h.group.lifecycle(&me()).as_deref(), Some("Standby"));
    assert_eq!(h.cycle.state.load().unwrap().map(|r| r.via), Some(LeaveVia::Standby), "reconcile can finish it");
}

/// Why the fake: moto cannot stop a process between EnterStandby and the restart. kill -9 while in
/// Standby: the next start reads the state file and leaves Standby.
#[tokio::test(start_paused = true)]
async fn reconcile_after_kill_in_standby_exits_standby() {
    let h = harness(4, LeaveVia::Standby);
    let obs = h.cycle.observe().await.unwrap();
    let plan = h.cycle.plan(&obs).unwrap();
    h.cycle
        .state
        .save(&Record {
            step: Step::Restarting,
            instance_id: me(),
            via: LeaveVia::Standby,
            group: Some("web-asg".into()),
            attachments: plan,
            programs: vec!["web".into()],
            since: 1,
            pid: 1,
        })
        .unwrap();
    elb_quorum::lb::members::Membership::enter_standby(&h.group, &me()).await.unwrap();
    assert_eq!(h.group.lifecycle(&me()).as_deref(), Some("Standby"));
    assert!(h.cycle.reconcile().await.unwrap());
    assert_eq!(group_ops(&h), vec![GroupOp::EnterStandby, GroupOp::ExitStandby]);
    back_in_service(&h, 4);
}

/// Why the fake: moto puts a group's instances in Standby only on request, with no operator. An
/// instance someone else put in Standby serves nothing: it restarts at once and stays in Standby.
#[tokio::test(start_paused = true)]
async fn an_instance_already_in_standby_restarts_in_place_and_stays() {
    for via in [LeaveVia::Deregister, LeaveVia::Standby] {
        let h = harness(4, via);
        elb_quorum::lb::members::Membership::enter_standby(&h.group, &me()).await.unwrap();
        let changes = || -> usize {
            h.cycle.lbs.iter().map(|lb| lb.count(Op::Deregister, None) + lb.count(Op::Register, None)).sum()
        };
        let before = changes();
        let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert_eq!(s.checks, 0, "no quorum check");
        assert_eq!(*h.services.restarts.lock().unwrap(), 1);
        assert_eq!(group_ops(&h), vec![GroupOp::EnterStandby], "{via:?}: only the operator's own call");
        assert_eq!(changes(), before, "{via:?}: no load-balancer change");
        assert_eq!(h.group.lifecycle(&me()).as_deref(), Some("Standby"), "{via:?}: left in Standby");
    }
}

/// Why the fake: moto's scale-in cannot be timed against a waiting gate. While the gate waits, the
/// group scales in: the members shrink and the decision uses the new count.
#[tokio::test(start_paused = true)]
async fn a_scale_in_during_the_gate_changes_the_count() {
    let mut h = harness(4, LeaveVia::Deregister);
    h.cycle.rule = Rule { quorum_ppm: 500_000, min_in_service: 1 };
    for peer in &ids(4)[1..3] {
        for lb in &h.cycle.lbs {
            lb.set_healthy(peer, false);
        }
    }
    // 4 members, 1 other serving < 2 required: wait. Then peers 1 and 2 are scaled in.
    let group = h.group.clone();
    tokio::spawn(async move {
        tokio::time::sleep(S(45)).await;
        group.set_lifecycle(&ids(4)[1], "Terminating:Wait");
        group.set_lifecycle(&ids(4)[2], "Terminated");
    });
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert!(s.checks >= 2, "waited at first: {}", s.checks);
    assert_eq!(*h.services.restarts.lock().unwrap(), 1);
}

/// Why the fake: moto places a launch batch in one zone. The per-zone rule at 0.6: in zone a (this
/// instance, 2 and 4) two others must serve; peer 2 down refuses while the cluster as a whole
/// (quorum 0.5) would allow it.
#[tokio::test(start_paused = true)]
async fn the_zone_rule_refuses_when_this_zone_is_short() {
    let mut h = harness(6, LeaveVia::Deregister);
    h.cycle.rule = Rule { quorum_ppm: 500_000, min_in_service: 1 };
    h.cycle.zone_quorum_ppm = Some(600_000);
    h.cycle.timing.max_checks = 2;
    for lb in &h.cycle.lbs {
        lb.set_healthy(&ids(6)[2], false);
    }
    match h.cycle.run(&web()).await.unwrap() {
        Outcome::GaveUp { verdict, .. } => {
            assert_eq!(verdict.reason, Reason::BelowZoneQuorum);
            assert_eq!(verdict.zone.as_deref(), Some("us-east-1a"));
            assert_eq!((verdict.zone_members, verdict.zone_serving_after, verdict.zone_required), (3, 1, 2));
        }
        other => panic!("{other:?}"),
    }
    // The same outage in the other zone does not hold this instance back.
    let mut h = harness(6, LeaveVia::Deregister);
    h.cycle.rule = Rule { quorum_ppm: 500_000, min_in_service: 1 };
    h.cycle.zone_quorum_ppm = Some(600_000);
    for lb in &h.cycle.lbs {
        lb.set_healthy(&ids(6)[1], false);
    }
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
}

/// Why the fake: moto never throttles. A throttled membership read is a failed check, not an abort.
#[tokio::test(start_paused = true)]
async fn a_throttled_membership_read_is_a_failed_check() {
    let h = harness(4, LeaveVia::Deregister);
    h.group.inject(GroupOp::Describe, Fault::Throttled, 2);
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(s.checks, 3);
    back_in_service(&h, 4);
}

/// Why the fake: moto cannot attach a target group to a group between two reads of one process.
/// A cycle built on the group's attachments (no --lb or --target-group) compares them with the
/// group's at every check, in both modes (strict: the shared view read after the grant carries the
/// group as the refresh read it): changed, it refuses to leave, with nothing changed.
#[tokio::test(start_paused = true)]
async fn a_change_to_the_groups_attachments_stops_a_cycle_built_on_the_old_ones() {
    use elb_quorum::fake::{fake_permits, FakeStore};
    use elb_quorum::lb::{AttachmentSpec, Kind};
    for strict in [false, true] {
        let mut h = harness(4, LeaveVia::Deregister);
        h.cycle.from_group = true;
        let store = FakeStore::new();
        if strict {
            h.cycle.permits = Some(fake_permits(&store, "asg:web-asg", &me()));
        }
        // Unchanged: the cycle runs.
        assert!(matches!(h.cycle.run(&web()).await.unwrap(), Outcome::Done(_)), "strict {strict}");
        back_in_service(&h, 4);
        let deregistrations = |h: &Harness| h.cycle.lbs.iter().map(|lb| lb.count(Op::Deregister, None)).sum::<usize>();
        let before = deregistrations(&h);
        assert_eq!(before, 2, "strict {strict}: left both target groups once");

        h.group.attach(AttachmentSpec { kind: Kind::TargetGroup, name: "arn:aws:elasticloadbalancing:admin".into() });
        let e = h.cycle.run(&web()).await.unwrap_err();
        let CycleError::GroupChanged { group, now, then } = &e else { panic!("strict {strict}: {e}") };
        assert_eq!(group, "web-asg");
        assert!(now.contains("admin") && !then.contains("admin"), "{e}");
        assert!(e.to_string().contains("nothing changed"), "{e}");
        assert_eq!(deregistrations(&h), before, "strict {strict}: nothing left");
        assert_eq!(*h.services.restarts.lock().unwrap(), 1, "strict {strict}: no restart");
        back_in_service(&h, 4);
        if strict {
            assert!(store.record("asg:web-asg").is_none_or(|r| r.holders.is_empty()), "permit released");
        }
    }
}
