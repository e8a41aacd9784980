//! The restart cycle against the in-process fake load balancer (`elb_quorum::fake`), for what the
//! moto emulator cannot model: connection draining (a leaving instance still says InService), slow
//! return to InService, throttling, 5xx, AWS unreachable, zones not enabled, peers racing below
//! quorum, and crash recovery from the state file. Time is tokio's paused clock. Every test checks
//! where the instance ends: registered, unless the programs failed to come back (said loudly).

use std::collections::BTreeSet;
use std::time::Duration;

use elb_quorum::cycle::state_file::{Record, StateFile, Step};
use elb_quorum::cycle::{Cycle, CycleError, Outcome, Timing};
use elb_quorum::fake::{FakeLb, FakeMembers, FakeServices, Fault, Op};
use elb_quorum::lb::LoadBalancer;
use elb_quorum::quorum::{Reason, Rule};
use elb_quorum::trigger::{Origin, RestartRequest};
use tokio::sync::watch;

const S: fn(u64) -> Duration = Duration::from_secs;

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("i-{i:04}")).collect()
}

struct Harness {
    cycle: Cycle<FakeLb, FakeMembers, FakeServices>,
    lb: FakeLb,
    services: FakeServices,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

fn harness(n: usize, drain: Duration, healthy_after: Duration) -> Harness {
    let all = ids(n);
    let lb = FakeLb::new("web-example-com", &all, drain, healthy_after);
    let mut services = FakeServices::new(S(10), &["web"]);
    services.lb = Some((lb.clone(), all[0].clone()));
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = watch::channel(false);
    let cycle = Cycle {
        lb: lb.clone(),
        members: FakeMembers(all.iter().cloned().collect::<BTreeSet<_>>()),
        services: services.clone(),
        me: all[0].clone(),
        rule: Rule { quorum_ppm: 750_000, min_in_service: 1 },
        timing: Timing {
            check_interval: S(30),
            max_checks: 10,
            poll_interval: S(5),
            drain_timeout: None,
            health_timeout: None,
            settle: S(0),
        },
        dry_run: false,
        state: StateFile::new(dir.path()),
        shutdown: rx,
        permits: None,
    };
    Harness { cycle, lb, services, _dir: dir, _shutdown: tx }
}

fn web() -> RestartRequest {
    RestartRequest::new(["web".to_string()], Origin::Cli)
}

fn me() -> String {
    ids(1)[0].clone()
}

/// A state file as a cycle writes it, for `web` on web-example-com.
fn record(step: Step, instance_id: &str) -> Record {
    Record {
        step,
        instance_id: instance_id.into(),
        lb: "web-example-com".into(),
        programs: vec!["web".into()],
        since: 1,
        pid: 1,
    }
}

fn ops(h: &Harness) -> Vec<Op> {
    h.lb.calls().iter().filter(|c| c.op != Op::Registered && c.op != Op::Timings).map(|c| c.op).collect()
}

/// Why the fake: moto deregisters at once and never shows draining.
#[tokio::test(start_paused = true)]
async fn waits_out_draining_that_still_says_in_service() {
    let h = harness(4, S(60), S(20));
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!("not done") };
    assert!(s.drain >= S(60) && s.drain < S(60) + S(10), "waited the 60 s draining out, not less: {:?}", s.drain);
    assert!(s.back_in_service >= S(20), "waited for the health checks: {:?}", s.back_in_service);
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
    assert!(h.lb.is_serving(&me()));
    assert_eq!(*h.services.restarts.lock().unwrap(), 1);
    assert_eq!(h.cycle.state.load().unwrap(), None, "state file cleared");
}

/// Why the fake: moto cannot show a draining peer; it must count as out.
#[tokio::test(start_paused = true)]
async fn a_draining_peer_counts_as_out() {
    let h = harness(4, S(300), S(10));
    h.lb.deregister(&ids(4)[1]).await.unwrap(); // peer 1 is draining: InService + deregistration description
    let mut h = h;
    h.cycle.timing.max_checks = 2;
    match h.cycle.run(&web()).await.unwrap() {
        Outcome::GaveUp { verdict, checks } => {
            assert_eq!(checks, 2);
            assert_eq!((verdict.serving_after, verdict.required), (2, 3), "the draining peer is not serving");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.lb.count(Op::Deregister, Some(&me())), 0, "nothing changed");
}

/// Why the fake: moto cannot delay InService after registration.
#[tokio::test(start_paused = true)]
async fn slow_health_checks_are_waited_for_within_the_bound() {
    let mut h = harness(4, S(0), S(90));
    h.cycle.timing.health_timeout = Some(S(60));
    match h.cycle.run(&web()).await {
        Err(CycleError::NotInService { detail, .. }) => assert!(detail.contains("stays registered"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(h.lb.is_registered(&me()), "registered even though not InService in time");
    assert_eq!(h.lb.count(Op::Deregister, Some(&me())), 1, "never deregistered again");
}

/// Why the fake: moto does not throttle.
#[tokio::test(start_paused = true)]
async fn throttling_at_the_gate_counts_as_failed_checks_then_succeeds() {
    let h = harness(4, S(0), S(5));
    h.lb.inject(Op::Registered, Fault::Throttled, 3);
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(s.checks, 4, "three throttled checks, then one that passed");
    assert!(h.lb.is_serving(&me()));
}

/// Why the fake: moto never answers 5xx.
#[tokio::test(start_paused = true)]
async fn server_errors_on_register_are_retried_until_registered() {
    let h = harness(4, S(0), S(5));
    h.lb.inject(Op::Register, Fault::ServerError, 3);
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(h.lb.count(Op::Register, Some(&me())), 4);
    assert!(h.lb.is_serving(&me()));
}

/// Why the fake: AWS cannot be made unreachable in moto mid-cycle. This is the one failure that
/// may leave the instance out, and the error says so loudly.
#[tokio::test(start_paused = true)]
async fn aws_unreachable_for_the_whole_budget_says_loudly_it_is_still_deregistered() {
    let h = harness(4, S(0), S(5));
    h.lb.inject(Op::Register, Fault::Unreachable, 10_000);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(e.left_out());
    let msg = e.to_string();
    assert!(msg.contains("IS STILL DEREGISTERED") && msg.contains("register-instances-with-load-balancer"), "{msg}");
    let tries = h.lb.count(Op::Register, Some(&me()));
    assert!((5..=20).contains(&tries), "bounded retries with backoff: {tries}");
    assert_eq!(
        h.cycle.state.load().unwrap().map(|r| r.step),
        Some(Step::Registering),
        "the state file lets the next start finish it"
    );
}

/// Why the fake: moto has no availability zones to disable.
#[tokio::test(start_paused = true)]
async fn zone_not_enabled_fails_fast_and_stays_registered() {
    let h = harness(4, S(0), S(5));
    h.lb.set_zone_disabled(&me());
    // The zone problem shows only once registered again: the instance is first InService.
    // (The fake reports it OutOfService from the start, so it may leave at once.)
    let started = tokio::time::Instant::now();
    match h.cycle.run(&web()).await {
        Err(CycleError::NotInService { detail, .. }) => assert!(detail.contains("Availability Zone"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < S(60), "no waiting for a state that never heals: {:?}", started.elapsed());
    assert!(h.lb.is_registered(&me()));
}

/// Why the fake: moto cannot make two instances deregister at the same instant.
#[tokio::test(start_paused = true)]
async fn a_peer_racing_below_quorum_sends_us_back_to_the_gate() {
    let h = harness(4, S(0), S(10));
    let peer = ids(4)[1].clone();
    h.lb.race_on_deregister(&me(), std::slice::from_ref(&peer));
    let lb = h.lb.clone();
    let p = peer.clone();
    tokio::spawn(async move {
        tokio::time::sleep(S(45)).await;
        lb.set_healthy(&p, true); // the racing peer finishes its own restart
    });
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(s.races, 1);
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register, Op::Deregister, Op::Register]);
    assert_eq!(*h.services.restarts.lock().unwrap(), 1, "restarted once, after quorum was back");
    assert!(h.lb.is_serving(&me()));
}

/// Why the fake: a program failing to come back with an exact load-balancer call log.
#[tokio::test(start_paused = true)]
async fn programs_that_fail_to_come_back_keep_the_instance_out_loudly() {
    let h = harness(4, S(0), S(5));
    *h.services.fail.lock().unwrap() = true;
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(e.left_out());
    assert!(e.to_string().contains("LEFT DEREGISTERED"), "{e}");
    assert_eq!(ops(&h), vec![Op::Deregister], "no registration of an instance whose services are down");
    assert_eq!(h.cycle.state.load().unwrap().map(|r| r.step), Some(Step::ServicesDown));
    // The next successful restart registers it: the instance serves nothing, so no quorum wait.
    *h.services.fail.lock().unwrap() = false;
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(s.checks, 1);
    assert!(h.lb.is_serving(&me()));
    assert_eq!(h.cycle.state.load().unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn deregister_failure_makes_sure_the_instance_is_registered() {
    let h = harness(4, S(0), S(5));
    h.lb.inject(Op::Deregister, Fault::NotFound, 1);
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(!e.left_out(), "{e}");
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
    assert!(h.lb.is_serving(&me()));
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn below_quorum_gives_up_after_bounded_checks_changing_nothing() {
    let h = harness(4, S(0), S(5));
    h.lb.set_healthy(&ids(4)[2], false);
    let started = tokio::time::Instant::now();
    match h.cycle.run(&web()).await.unwrap() {
        Outcome::GaveUp { verdict, checks } => {
            assert_eq!(checks, 10);
            assert_eq!(verdict.reason, Reason::BelowQuorum);
        }
        other => panic!("{other:?}"),
    }
    let waited = started.elapsed();
    assert!(waited >= S(9 * 24) && waited <= S(9 * 36), "nine jittered 30 s pauses: {waited:?}");
    assert_eq!(ops(&h), Vec::<Op>::new(), "no deregistration, no registration");
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_serves_nothing_leaves_at_once_but_still_deregisters_first() {
    let h = harness(4, S(0), S(5));
    h.lb.set_healthy(&ids(4)[2], false); // below quorum for a serving instance
    let mut req = web();
    req.down.insert("web".into()); // gated crash: the program is down
    let Outcome::Done(s) = h.cycle.run(&req).await.unwrap() else { panic!() };
    assert_eq!(s.checks, 1, "no waiting for quorum");
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
    assert!(h.lb.is_serving(&me()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_at_the_gate_changes_nothing() {
    let (tx, rx) = watch::channel(false);
    let mut h = harness(4, S(0), S(5));
    h.cycle.shutdown = rx;
    h.lb.set_healthy(&ids(4)[2], false);
    tokio::spawn(async move {
        tokio::time::sleep(S(40)).await;
        tx.send(true).unwrap();
        tokio::time::sleep(S(3600)).await;
    });
    assert!(matches!(h.cycle.run(&web()).await.unwrap(), Outcome::Aborted));
    assert_eq!(ops(&h), Vec::<Op>::new());
}

#[tokio::test(start_paused = true)]
async fn dry_run_checks_everything_and_changes_nothing() {
    let mut h = harness(4, S(0), S(5));
    h.cycle.dry_run = true;
    assert!(matches!(h.cycle.run(&web()).await.unwrap(), Outcome::DryRun(v) if v.may_leave));
    assert_eq!(ops(&h), Vec::<Op>::new());
    let e = h.cycle.run(&RestartRequest::new(["nope".to_string()], Origin::Cli)).await.unwrap_err();
    assert!(e.to_string().contains("unknown program"), "{e}");
}

/// Crash recovery: a state file left by a process killed (-9) at each step.
#[tokio::test(start_paused = true)]
async fn reconcile_finishes_a_cycle_killed_at_any_step() {
    for (step, running) in
        [(Step::Deregistering, true), (Step::Restarting, false), (Step::Restarting, true), (Step::Registering, true)]
    {
        let h = harness(4, S(0), S(5));
        h.lb.force_deregistered(&me());
        *h.services.running.lock().unwrap() = running;
        h.cycle.state.save(&record(step, &me())).unwrap();
        assert!(h.cycle.reconcile().await.unwrap(), "{step:?}");
        assert!(h.lb.is_serving(&me()), "{step:?}: registered and InService");
        assert_eq!(
            *h.services.restarts.lock().unwrap(),
            u32::from(!running),
            "{step:?}: programs restarted only when down"
        );
        assert_eq!(h.cycle.state.load().unwrap(), None);
    }
}

#[tokio::test(start_paused = true)]
async fn a_state_file_of_another_instance_is_set_aside_not_acted_on() {
    let h = harness(4, S(0), S(5));
    h.cycle.state.save(&record(Step::Restarting, "i-other")).unwrap();
    assert!(!h.cycle.reconcile().await.unwrap());
    assert_eq!(h.lb.calls().len(), 0, "no load-balancer call");
    assert_eq!(h.cycle.state.load().unwrap(), None, "moved aside");
    let aside: Vec<_> = std::fs::read_dir(h._dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("foreign"))
        .collect();
    assert_eq!(aside.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn services_still_down_after_a_crash_stay_out_loudly() {
    let h = harness(4, S(0), S(5));
    h.lb.force_deregistered(&me());
    *h.services.running.lock().unwrap() = false;
    h.cycle.state.save(&record(Step::ServicesDown, &me())).unwrap();
    let e = h.cycle.reconcile().await.unwrap_err();
    assert!(e.left_out() && e.to_string().contains("LEFT DEREGISTERED"), "{e}");
    assert!(!h.lb.is_registered(&me()));
    // Once the operator fixed the programs, the next start registers it.
    *h.services.running.lock().unwrap() = true;
    assert!(h.cycle.reconcile().await.unwrap());
    assert!(h.lb.is_serving(&me()));
}

/// A restart that fails without having stopped anything (the programs still RUNNING) must not leave
/// a healthy instance out.
#[tokio::test(start_paused = true)]
async fn a_restart_failing_with_programs_still_running_comes_back() {
    let h = harness(4, S(0), S(5));
    *h.services.fail_before_stop.lock().unwrap() = true;
    let e = h.cycle.run(&web()).await.unwrap_err();
    assert!(!e.left_out(), "{e}");
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
    assert!(h.lb.is_serving(&me()));
    assert_eq!(h.cycle.state.load().unwrap(), None);
}

/// An instance the load balancer already counts out leaves at once, and the recheck after
/// deregistering does not send it back even though the cluster is below quorum: its leaving took
/// nothing, and registering it again would only put a non-serving instance back.
#[tokio::test(start_paused = true)]
async fn an_instance_already_out_is_not_sent_back_by_the_recheck() {
    let h = harness(4, S(0), S(5));
    h.lb.set_healthy(&ids(4)[2], false);
    h.lb.set_healthy(&me(), false); // its health check fails: OutOfService
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!((s.checks, s.races), (1, 0));
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
    assert_eq!(*h.services.restarts.lock().unwrap(), 1);
}
