//! The restart cycle against the in-process fake load balancer (`elb_quorum::fake`), for what the
//! moto emulator cannot model: connection draining (a leaving instance still says InService), slow
//! return to InService, throttling, 5xx, AWS unreachable, zones not enabled, peers racing below
//! quorum, and crash recovery from the state file. Time is tokio's paused clock. Every test checks
//! where the instance ends: registered, unless the programs failed to come back (said loudly).

use std::time::Duration;

use elb_quorum::cycle::state_file::{Record, StateFile, Step, Taken};
use elb_quorum::cycle::{Cycle, CycleError, Outcome, Recovery};
use elb_quorum::fake::{fake_cycle, test_timing, FakeLb, FakeMembers, FakeServices, Fault, Op};
use elb_quorum::lb::{Kind, LoadBalancer, Target};
use elb_quorum::quorum::Reason;
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
    let services = FakeServices::new(S(10), &["web"]);
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = watch::channel(false);
    let cycle = fake_cycle(vec![lb.clone()], &all, &all[0], &services, StateFile::new(dir.path()), rx)
        .with_timing(test_timing());
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
        via: Default::default(),
        group: None,
        attachments: vec![Taken {
            kind: Kind::Classic,
            id: "web-example-com".into(),
            name: "web-example-com".into(),
            targets: vec![Target::instance(instance_id)],
        }],
        programs: vec!["web".into()],
        since: 1,
        pid: 1,
    }
}

fn ops(h: &Harness) -> Vec<Op> {
    h.lb.calls().iter().filter(|c| matches!(c.op, Op::Deregister | Op::Register)).map(|c| c.op).collect()
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
    h.lb.deregister(&[Target::instance(&ids(4)[1])]).await.unwrap(); // peer 1 is draining: InService + deregistration description
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
    h.lb.inject(Op::Targets, Fault::Throttled, 3);
    let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(s.checks, 4, "three throttled checks, then one that passed");
    assert!(h.lb.is_serving(&me()));
}

/// Why the fake: moto does not enforce IAM. A refusal is not worth another check: it fails at once.
#[tokio::test(start_paused = true)]
async fn access_denied_at_the_gate_fails_at_once_changing_nothing() {
    let h = harness(4, S(0), S(5));
    h.lb.inject(Op::Targets, Fault::Denied, 1);
    let start = tokio::time::Instant::now();
    match h.cycle.run(&web()).await {
        Err(CycleError::Lb(e)) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("AccessDenied"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.lb.count(Op::Targets, None), 1, "one check, not --max-checks of them");
    assert!(start.elapsed() < S(1), "no wait at the gate: {:?}", start.elapsed());
    assert_eq!(h.lb.count(Op::Deregister, None), 0);
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

/// Why the fake: moto has no availability zones to disable. A target that can never serve is
/// refused before leaving: leaving would not come back.
#[tokio::test(start_paused = true)]
async fn zone_not_enabled_is_refused_before_leaving() {
    let h = harness(4, S(0), S(5));
    h.lb.set_zone_disabled(&me());
    match h.cycle.run(&web()).await {
        Err(e @ CycleError::NeverHeals { .. }) => {
            assert!(e.is_configuration() && e.to_string().contains("Availability Zone"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ops(&h), Vec::<Op>::new(), "nothing changed");
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);
}

/// Why the fake: moto has no availability zones to disable. A zone disabled while the instance
/// is out fails fast when it comes back, and it stays registered.
#[tokio::test(start_paused = true)]
async fn zone_disabled_while_out_fails_fast_and_stays_registered() {
    let h = harness(4, S(0), S(5));
    let (lb, id) = (h.lb.clone(), me());
    tokio::spawn(async move {
        tokio::time::sleep(S(2)).await; // during the 10 s restart
        lb.set_zone_disabled(&id);
    });
    let started = tokio::time::Instant::now();
    match h.cycle.run(&web()).await {
        Err(CycleError::NotInService { detail, .. }) => assert!(detail.contains("can never serve"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < S(60), "no waiting for a state that never heals: {:?}", started.elapsed());
    assert!(h.lb.is_registered(&me()));
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
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

/// The listener's idle watch (`recover`): an instance left out because its programs did not come
/// back asks only supervisord while they stay down (no load-balancer call at all), and comes back
/// by itself once they are RUNNING again (an operator's `supervisorctl start`, a slow start that
/// outlived the restart timeout). Why the fake: the exact call log, and no request in between.
#[tokio::test(start_paused = true)]
async fn the_idle_watch_brings_back_an_instance_whose_programs_run_again() {
    let h = harness(4, S(0), S(5));
    *h.services.fail.lock().unwrap() = true;
    assert!(h.cycle.run(&web()).await.unwrap_err().left_out());
    let calls = h.lb.calls().len();
    for _ in 0..3 {
        assert_eq!(h.cycle.recover().await.unwrap(), Recovery::StillDown);
    }
    assert_eq!(h.lb.calls().len(), calls, "no AWS call while the programs are down");
    assert!(!h.lb.is_registered(&me()));
    // The operator starts them: RUNNING, and the health check passes again.
    *h.services.running.lock().unwrap() = true;
    h.lb.set_healthy(&me(), true);
    assert_eq!(h.cycle.recover().await.unwrap(), Recovery::Back);
    assert!(h.lb.is_serving(&me()));
    assert_eq!(h.cycle.state.load().unwrap(), None);
    assert_eq!(*h.services.restarts.lock().unwrap(), 1, "the watch restarts nothing");
    assert_eq!(h.cycle.recover().await.unwrap(), Recovery::Nothing);
}

/// A registration AWS refused for the whole retry budget leaves the instance out with its programs
/// RUNNING; the idle watch registers it once AWS answers again.
#[tokio::test(start_paused = true)]
async fn the_idle_watch_registers_again_once_aws_answers() {
    let h = harness(4, S(0), S(5));
    h.lb.inject(Op::Register, Fault::Unreachable, 10_000);
    assert!(h.cycle.run(&web()).await.unwrap_err().left_out());
    assert!(!h.lb.is_registered(&me()) && *h.services.running.lock().unwrap());
    assert!(h.cycle.recover().await.unwrap_err().left_out(), "still refused: still loud");
    h.lb.clear_faults(Op::Register);
    assert_eq!(h.cycle.recover().await.unwrap(), Recovery::Back);
    assert!(h.lb.is_serving(&me()));
    assert_eq!(*h.services.restarts.lock().unwrap(), 1);
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

// ---- Strict mode (`--strict`) against the fake permit store: moto can neither throttle nor lose a
// reply after applying a write, and its clock cannot be skewed per instance.

mod strict {
    use super::*;
    use elb_quorum::fake::{fake_permits, FakeStore, StoreCall, StoreFault, StoreOp};
    use elb_quorum::lease::{
        head_key, view_key, Acquired, BoxFuture, Holder, Kind, LeaseError, PermitStore, Permits, Record, Shared,
        SharedWrite, Write, Written,
    };
    use std::sync::Arc;

    const KEY: &str = "web.example.com";

    fn strict(h: &mut Harness, store: &FakeStore) {
        h.cycle.permits = Some(fake_permits(store, KEY, &me()));
    }

    /// D = 8 s, G = 3 s, H = 1 h: a holder trusts its permit for 5 s without a renewal.
    fn short(store: &FakeStore, me: &str) -> Permits {
        Permits { duration: S(8), grace: S(3), ..fake_permits(store, KEY, me) }
    }

    fn holders(store: &FakeStore) -> Vec<String> {
        store.record(KEY).map(|r| r.holders.into_keys().collect()).unwrap_or_default()
    }

    /// The store calls' kinds before the first try at the view's refresh lease.
    fn ops_before_refresh(calls: &[StoreCall]) -> Vec<StoreOp> {
        calls.iter().map(|c| c.op).take_while(|op| *op != StoreOp::LeaseView).collect()
    }

    fn store_ops(store: &FakeStore, op: StoreOp) -> Vec<&'static str> {
        store.calls().iter().filter(|c| c.op == op).map(|c| c.result).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_strict_cycle_holds_its_permit_from_before_deregistering_until_after_in_service() {
        let mut h = harness(4, S(40), S(10));
        h.cycle.lbs[0].latency = Duration::from_millis(100);
        let store = FakeStore::new();
        strict(&mut h, &store);
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        let acquired = store.calls().iter().find(|c| c.op == StoreOp::Acquire && c.result == "applied").unwrap().at;
        let released = store.calls().iter().find(|c| c.op == StoreOp::Remove && c.result == "applied").unwrap().at;
        let lb_at = |op| h.lb.calls().iter().find(|c| c.op == op).unwrap().at;
        assert!(acquired < lb_at(Op::Deregister) && lb_at(Op::Deregister) < lb_at(Op::Register));
        assert!(lb_at(Op::Register) < released, "released only once back");
        assert!(store_ops(&store, StoreOp::Renew).contains(&"applied"), "renewed every D/4 = 30 s while draining 40 s");
        assert!(h.lb.is_serving(&me()));
        assert_eq!(holders(&store), Vec::<String>::new(), "entry gone");
    }

    /// A waiter refused a slot watches the permit record between its checks (fake: the release
    /// must come at a chosen moment of simulated time): the slot freed at 5 s is taken within a
    /// second, not at the next check 30 s later, and the checks counted are the two made.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_takes_a_freed_slot_within_a_second_not_at_its_next_check() {
        let mut h = harness(4, S(0), S(5));
        h.cycle.timing.check_interval = S(30);
        h.cycle.timing.max_checks = 2;
        let store = FakeStore::new();
        strict(&mut h, &store);
        let peer = fake_permits(&store, KEY, "i-0003");
        let Acquired::Granted(held) = peer.acquire(Kind::Slot, 1, None).await.unwrap() else { panic!() };
        let start = tokio::time::Instant::now();
        let release = tokio::spawn(async move {
            tokio::time::sleep(S(5)).await;
            held.release().await;
        });
        let Outcome::Done(report) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        release.await.unwrap();
        let granted = store
            .calls()
            .iter()
            .find(|c| c.op == StoreOp::Acquire && c.result == "applied" && c.id.as_deref() == Some(&me()[..]))
            .unwrap()
            .at;
        assert!(granted > S(5) && granted < S(6) + S(1), "granted at {granted:?} after a release at 5 s");
        assert_eq!(report.checks, 2, "the refused check and the granted one");
        assert!(start.elapsed() < S(30), "done before the next check was due: {:?}", start.elapsed());
        assert!(h.lb.is_serving(&me()));
        assert_eq!(holders(&store), Vec::<String>::new());
    }

    /// The permit store as the fake keeps it, but the first view read after `me`'s grant first
    /// lets the world move on at a wave's boundary: holder `x` (serving, back) releases, and `y`
    /// takes the freed slot and leaves. A wrapper because the boundary must fall between two of
    /// the cycle's own calls, which neither moto nor a timed peer can place.
    struct Boundary {
        inner: FakeStore,
        x: tokio::sync::Mutex<Option<Box<elb_quorum::lease::Permit>>>,
        y: Permits,
        y_held: tokio::sync::Mutex<Option<Box<elb_quorum::lease::Permit>>>,
        lb: FakeLb,
        armed: std::sync::atomic::AtomicBool,
    }

    impl PermitStore for Boundary {
        fn table(&self) -> &str {
            self.inner.table()
        }
        fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, LeaseError>> {
            self.inner.load(key)
        }
        fn write<'a>(&'a self, key: &'a str, write: Write) -> BoxFuture<'a, Result<Written, LeaseError>> {
            Box::pin(async move {
                let mine = matches!(&write, Write::Claim { id, .. } if *id == me());
                let written = self.inner.write(key, write).await?;
                if mine && written.applied() {
                    self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(written)
            })
        }
        fn load_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Shared>, LeaseError>> {
            Box::pin(async move {
                if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    self.x.lock().await.take().unwrap().release().await;
                    let Acquired::Granted(p) = self.y.acquire(Kind::Slot, 2, None).await.unwrap() else {
                        panic!("y takes the slot x freed")
                    };
                    *self.y_held.lock().await = Some(p);
                    self.lb.force_deregistered(&self.y.me);
                }
                self.inner.load_shared(key).await
            })
        }
        fn write_shared<'a>(&'a self, key: &'a str, write: SharedWrite) -> BoxFuture<'a, Result<bool, LeaseError>> {
            self.inner.write_shared(key, write)
        }
    }

    /// 8 members, q = 0.75: 6 must serve, L = 2. At this instance's grant `x` holds the other
    /// slot; by its view `x` has released and `y`, which took the slot, is out. The view shows 7
    /// serving and the holders read after it are `y` alone, already out: 6 after leaving, enough.
    /// Counting the holders at the grant (`x`, serving) beside `y` out in the view would count
    /// one slot twice, find 5 and send the instance to wait a whole check interval.
    #[tokio::test(start_paused = true)]
    async fn a_check_at_a_waves_boundary_counts_a_replaced_holder_once() {
        let mut h = harness(8, S(0), S(5));
        h.cycle.timing.max_checks = 1;
        let store = FakeStore::new();
        let (x_id, y_id) = (ids(8)[6].clone(), ids(8)[7].clone());
        let Acquired::Granted(x) = fake_permits(&store, KEY, &x_id).acquire(Kind::Slot, 2, None).await.unwrap() else {
            panic!()
        };
        let boundary = Arc::new(Boundary {
            inner: store.clone(),
            x: tokio::sync::Mutex::new(Some(x)),
            y: fake_permits(&store, KEY, &y_id),
            y_held: tokio::sync::Mutex::new(None),
            lb: h.lb.clone(),
            armed: false.into(),
        });
        h.cycle.permits = Some(Permits { store: boundary.clone(), ..fake_permits(&store, KEY, &me()) });
        let report = match h.cycle.run(&web()).await {
            Ok(Outcome::Done(report)) => report,
            other => panic!("one check, and it should have let the instance leave: {other:?}"),
        };
        assert_eq!(report.checks, 1, "allowed at its first check");
        let applied = |op, id: &str| {
            store
                .calls()
                .iter()
                .find(|c| c.op == op && c.result == "applied" && c.id.as_deref() == Some(id))
                .unwrap()
                .at
        };
        let (granted, x_gone, y_granted) =
            (applied(StoreOp::Acquire, &me()), applied(StoreOp::Remove, &x_id), applied(StoreOp::Acquire, &y_id));
        assert!(granted <= x_gone && x_gone <= y_granted, "the boundary fell after the grant");
        assert!(boundary.y_held.lock().await.is_some());
        assert!(!h.lb.is_serving(&y_id), "y still out");
        assert!(h.lb.is_serving(&me()));
        assert_eq!(holders(&store), vec![y_id]);
    }

    /// A later restart finds the view its last one left, stale: it reads the item once, waits its
    /// random moment (so that a fleet asked at once does not all try to take the refresh), reads
    /// it again and takes the refresh. Not twice at the start: at 1,000 instances each read is
    /// charged the whole item, all in the same second.
    #[tokio::test(start_paused = true)]
    async fn a_later_restart_reads_the_stale_view_once_before_its_pause() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        strict(&mut h, &store);
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        tokio::time::sleep(S(120)).await;
        let before = store.calls().len();
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        let calls = store.calls()[before..].to_vec();
        assert_eq!(ops_before_refresh(&calls), vec![StoreOp::LoadView, StoreOp::LoadView], "{calls:?}");
        // The view once (its members size the pause), then its head (the lease; about 100 bytes).
        let keys: Vec<&str> = calls.iter().take(2).map(|c| c.key.as_str()).collect();
        assert_eq!(keys, vec![view_key(KEY), head_key(KEY)], "{calls:?}");
        assert!(calls[1].bytes < 200, "{calls:?}");
        assert!(h.lb.is_serving(&me()));
    }

    /// The view's head is only a hint: when its write fails after the view's (warned of), the
    /// cycle still takes the view it published, and its later polls, which find no head naming a
    /// newer view, take the refresh themselves and publish view and head again.
    #[tokio::test(start_paused = true)]
    async fn a_head_not_written_after_a_publication_delays_nothing_and_is_written_by_the_next() {
        let mut h = harness(4, S(10), S(10));
        let store = FakeStore::new();
        store.fault(StoreOp::PublishHead, StoreFault::ServerError);
        strict(&mut h, &store);
        let Outcome::Done(report) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert_eq!(report.checks, 1, "allowed at its first check");
        assert!(h.lb.is_serving(&me()));
        let heads = store_ops(&store, StoreOp::PublishHead);
        assert_eq!(heads.first(), Some(&"error"), "{heads:?}");
        assert!(heads[1..].iter().all(|r| *r == "applied") && heads.len() >= 2, "{heads:?}");
        let (view, head) = (store.shared(&view_key(KEY)).unwrap(), store.shared(&head_key(KEY)).unwrap());
        assert_eq!((head.n, head.seen_ver, head.at), (view.n, view.seen_ver, view.at), "the head names the last view");
        assert!(head.data.is_empty() && view.n == heads.len() as u64, "{view:?} {heads:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_read_of_the_view_is_the_first_checks_read_while_recent() {
        // `--members asg` reads the view at the process's start (the group's attachments) and
        // hands that read to the first check: taken over when it is recent, read again when not.
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        strict(&mut h, &store);
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        for (late, reads) in [(Duration::ZERO, 1), (Duration::from_secs(1), 2)] {
            tokio::time::sleep(S(120)).await;
            let read = h.cycle.permits.as_ref().unwrap().shared().await.unwrap();
            h.cycle = h.cycle.with_view_read(read.expect("the first run left a view"));
            tokio::time::sleep(late).await;
            let before = store.calls().len();
            let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
            let calls = store.calls()[before..].to_vec();
            assert_eq!(
                ops_before_refresh(&calls),
                vec![StoreOp::LoadView; reads],
                "handed over {late:?} before: {calls:?}"
            );
            assert!(h.lb.is_serving(&me()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_at_acquire_fails_closed_and_never_writes_to_the_load_balancer() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        store.fault_always(StoreOp::Acquire, Some(StoreFault::Throttled));
        strict(&mut h, &store);
        h.cycle.timing.max_checks = 3;
        match h.cycle.run(&web()).await {
            Err(e @ CycleError::NoPermit { checks: 3, .. }) => {
                assert!(e.to_string().contains("no permit after 3 checks"), "{e}");
                assert!(!e.left_out());
            }
            other => panic!("{other:?}"),
        }
        // The load balancer was read only by the shared view's refreshes (the view sizes the
        // cluster; a waiter refreshes one older than 60 s: once or twice over the three checks,
        // 24–36 s apart), never written.
        assert!(h.lb.calls().iter().all(|c| c.op == Op::Targets || c.op == Op::Timings), "{:?}", h.lb.calls());
        assert!((1..=2).contains(&h.lb.count(Op::Targets, None)), "{:?}", h.lb.calls());
        assert_eq!(store_ops(&store, StoreOp::Acquire), vec!["error"; 3]);
        assert_eq!(holders(&store), Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_table_or_denial_stops_before_any_load_balancer_call() {
        for fault in [StoreFault::NoTable, StoreFault::AccessDenied] {
            let mut h = harness(4, S(0), S(5));
            let store = FakeStore::new();
            store.fault_always(StoreOp::Load, Some(fault));
            strict(&mut h, &store);
            match h.cycle.run(&web()).await {
                Err(CycleError::Lease(e)) => assert!(!e.is_retryable(), "{e}"),
                other => panic!("{fault:?}: {other:?}"),
            }
            assert_eq!(h.lb.calls(), vec![], "{fault:?}: the load balancer was never called");
            // The shared view's item, its refresh lease, then the record: the first failing call
            // ends the cycle (no retry of a permanent error).
            assert_eq!(store_ops(&store, StoreOp::Load), vec!["error"], "{fault:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_applied_whose_reply_was_lost_is_found_by_its_token() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        store.fault(StoreOp::Acquire, StoreFault::LostReply);
        strict(&mut h, &store);
        let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert_eq!(s.checks, 1, "the lost reply did not cost a check");
        assert_eq!(store_ops(&store, StoreOp::Acquire), vec!["applied"], "written once, never twice");
        assert_eq!(store_ops(&store, StoreOp::Remove), vec!["applied"]);
        assert_eq!(holders(&store), Vec::<String>::new());
        assert!(h.lb.is_serving(&me()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_before_the_write_counts_as_a_failed_check_then_succeeds() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        store.fault(StoreOp::Acquire, StoreFault::Timeout);
        store.fault(StoreOp::Acquire, StoreFault::ServerError);
        strict(&mut h, &store);
        let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert_eq!(s.checks, 3);
        assert_eq!(store_ops(&store, StoreOp::Acquire), vec!["error", "error", "applied"]);
        assert_eq!(h.lb.count(Op::Deregister, Some(&me())), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_lost_before_deregistering_aborts_and_releases() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        // Renewals fail and the load balancer answers slowly: 12 s ± 50 % per call, so reading health
        // (at least 6 s) outlasts the 5 s the permit is trusted without a renewal.
        store.fault_always(StoreOp::Renew, Some(StoreFault::Throttled));
        h.cycle.lbs[0].latency = S(12);
        h.cycle.permits = Some(short(&store, &me()));
        match h.cycle.run(&web()).await {
            Err(CycleError::PermitLost { why }) => assert!(why.contains("not renewed in time"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.lb.count(Op::Deregister, None), 0, "nothing changed");
        assert!(h.lb.is_serving(&me()));
        assert_eq!(store_ops(&store, StoreOp::Remove), vec!["applied"], "released");
        assert_eq!(*h.services.restarts.lock().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_lost_after_deregistering_finishes_the_cycle() {
        let mut h = harness(4, S(30), S(5));
        let store = FakeStore::new();
        store.fault_always(StoreOp::Renew, Some(StoreFault::ServerError));
        h.cycle.permits = Some(short(&store, &me()));
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        let deregistered = h.lb.calls().iter().find(|c| c.op == Op::Deregister).unwrap().at;
        let failed: Vec<Duration> = store.calls().iter().filter(|c| c.op == StoreOp::Renew).map(|c| c.at).collect();
        assert!(failed.iter().filter(|at| **at > deregistered + S(5)).count() > 3, "lost while draining: {failed:?}");
        assert!(h.lb.is_serving(&me()), "finished: registered and InService");
        assert_eq!(*h.services.restarts.lock().unwrap(), 1);
        assert_eq!(holders(&store), Vec::<String>::new(), "entry removed at the end");
    }

    /// Two holders' overlap when one's clock is behind by `skew` and its renewals fail: it trusts
    /// its permit until its own `exp − G`, while a peer drops the entry at `exp + G` on its clock.
    async fn overlap_with_skew(skew: Duration) -> (bool, Duration) {
        let store = FakeStore::new();
        store.fault_always(StoreOp::Renew, Some(StoreFault::Throttled));
        let slow = Permits { skew_ms: -(skew.as_millis() as i64), ..fake_permits(&store, KEY, "i-slow") };
        let peer = fake_permits(&store, KEY, "i-peer");
        let start = tokio::time::Instant::now();
        let Acquired::Granted(held) = slow.acquire(Kind::Slot, 1, None).await.unwrap() else { panic!() };
        loop {
            tokio::time::sleep(S(1)).await;
            if let Acquired::Granted(_) = peer.acquire(Kind::Slot, 1, None).await.unwrap() {
                return (held.lost().is_none(), start.elapsed());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn clock_skew_up_to_twice_the_grace_is_safe_beyond_it_is_not() {
        // D = 120 s, G = 30 s.
        let (overlap, waited) = overlap_with_skew(S(15)).await;
        assert!(!overlap, "+G/2: the peer gets the slot only after the holder stopped trusting it");
        assert!(waited <= S(120 + 30 - 15 + 2), "{waited:?}");
        let (overlap, _) = overlap_with_skew(S(70)).await;
        assert!(overlap, "+2G and more: both believe they hold the one slot (documented in the README)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_killed_holders_entry_blocks_peers_for_at_most_d_plus_g() {
        let store = FakeStore::new();
        let dead = fake_permits(&store, KEY, "i-dead");
        let peer = fake_permits(&store, KEY, "i-peer");
        let Acquired::Granted(held) = dead.acquire(Kind::Slot, 1, None).await.unwrap() else { panic!() };
        drop(held); // kill -9: no more renewals, no release
        let start = tokio::time::Instant::now();
        let waited = loop {
            match peer.acquire(Kind::Slot, 1, None).await.unwrap() {
                Acquired::Granted(_) => break start.elapsed(),
                Acquired::Refused { holders } => assert_eq!(holders, vec!["i-dead".to_string()]),
                Acquired::Paced { .. } => panic!("no pacing here"),
            }
            tokio::time::sleep(S(1)).await;
        };
        assert!(waited > S(120) && waited <= S(150) + S(1), "D + G = 150 s: {waited:?}");
        assert_eq!(holders(&store), vec!["i-peer".to_string()], "the dead entry was pruned");
    }

    #[tokio::test(start_paused = true)]
    async fn the_restarted_listener_removes_its_own_old_entry() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        let old = Holder { tok: "old".into(), exp: u64::MAX / 2, since: 1, kind: Kind::Slot };
        let peer = Holder { tok: "p".into(), ..old.clone() };
        store.set_record(
            KEY,
            Record {
                ver: 4,
                holders: [(me(), old), ("i-0003".into(), peer)].into(),
                complete: true,
                ..Record::default()
            },
        );
        strict(&mut h, &store);
        assert!(!h.cycle.reconcile().await.unwrap(), "no state file: nothing to finish");
        assert_eq!(holders(&store), vec!["i-0003".to_string()], "own entry gone, the peer's kept");
        // Killed mid-cycle (deregistered, state file written): removed once InService again.
        store.set_record(
            KEY,
            Record {
                ver: 9,
                holders: [(me(), Holder { tok: "x".into(), exp: u64::MAX / 2, since: 1, kind: Kind::Slot })].into(),
                complete: true,
                ..Record::default()
            },
        );
        h.cycle.state.save(&record(Step::Deregistering, &me())).unwrap();
        h.lb.force_deregistered(&me());
        assert!(h.cycle.reconcile().await.unwrap());
        assert!(h.lb.is_serving(&me()));
        let removed = store.calls().iter().rfind(|c| c.op == StoreOp::Remove).unwrap().at;
        let registered = h.lb.calls().iter().rfind(|c| c.op == Op::Register).unwrap().at;
        assert!(registered < removed, "removed after registering");
        assert_eq!(holders(&store), Vec::<String>::new());
    }

    /// Found by the fault campaign (seeds 355 and 431): a restarted listener whose one try to
    /// remove its old entry met a 5xx left the entry to expire (D + G, 150 s, a slot the cluster
    /// could not use). It tries again, as a release does.
    #[tokio::test(start_paused = true)]
    async fn removing_the_old_entry_at_start_is_tried_again_after_a_failure() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        let old = Holder { tok: "old".into(), exp: u64::MAX / 2, since: 1, kind: Kind::Slot };
        store.set_record(KEY, Record { ver: 4, holders: [(me(), old)].into(), complete: true, ..Record::default() });
        store.fault(StoreOp::Remove, StoreFault::ServerError);
        store.fault(StoreOp::Remove, StoreFault::Throttled);
        strict(&mut h, &store);
        assert!(!h.cycle.reconcile().await.unwrap());
        assert_eq!(store_ops(&store, StoreOp::Remove), vec!["error", "error", "applied"]);
        assert_eq!(holders(&store), Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_max_hold_a_holder_stops_renewing() {
        let store = FakeStore::new();
        let holder = Permits { max_hold: S(12), ..short(&store, "i-long") };
        let peer = short(&store, "i-peer");
        let Acquired::Granted(held) = holder.acquire(Kind::Slot, 1, None).await.unwrap() else { panic!() };
        tokio::time::sleep(S(60)).await;
        let renewals: Vec<Duration> = store.calls().iter().filter(|c| c.op == StoreOp::Renew).map(|c| c.at).collect();
        assert!(!renewals.is_empty() && renewals.iter().all(|at| *at < S(12)), "{renewals:?}");
        assert!(held.lost().is_some(), "past exp − G without renewal");
        let Acquired::Granted(_) = peer.acquire(Kind::Slot, 1, None).await.unwrap() else {
            panic!("the entry expired")
        };
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_too_small_for_any_permit_gives_up_saying_so() {
        let mut h = harness(2, S(0), S(5)); // 2 members at 0.75: both must serve, L = 0
        let store = FakeStore::new();
        strict(&mut h, &store);
        h.cycle.timing.max_checks = 2;
        match h.cycle.run(&web()).await.unwrap() {
            Outcome::NoPermit { holders, permits: 0, checks: 2 } => {
                assert_eq!(elb_quorum::cycle::held_by(&holders), "the cluster allows no instance out at once")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store_ops(&store, StoreOp::Acquire), Vec::<&str>::new(), "nothing written");
        assert_eq!(h.lb.count(Op::Deregister, None), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_the_load_balancer_counts_out_takes_an_exempt_entry_when_slots_are_full() {
        let mut h = harness(4, S(0), S(5)); // 4 members, quorum 0.75: one permit
        let store = FakeStore::new();
        let peer = Holder { tok: "p".into(), exp: u64::MAX / 2, since: 1, kind: Kind::Slot };
        store.set_record(
            KEY,
            Record { ver: 1, holders: [("i-0003".to_string(), peer)].into(), complete: true, ..Record::default() },
        );
        strict(&mut h, &store);
        h.cycle.timing.max_checks = 2;
        // Serving: no slot for it, nothing changes.
        match h.cycle.run(&web()).await.unwrap() {
            Outcome::NoPermit { holders, permits: 1, checks: 2 } => assert_eq!(holders, vec!["i-0003".to_string()]),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.lb.count(Op::Deregister, None), 0);
        // Out of the load balancer already: it leaves at once under an exempt entry (once the
        // shared view that showed it serving is older than EXEMPTION_VIEW_AGE, 10 s).
        h.lb.set_healthy(&me(), false);
        tokio::time::sleep(S(11)).await;
        let Outcome::Done(s) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert_eq!(s.checks, 1);
        assert_eq!(holders(&store), vec!["i-0003".to_string()], "the peer's slot untouched, ours released");
        assert!(h.lb.is_serving(&me()));
    }

    // ---- `--batch-registrations`: the batch claim and the fallback, where moto cannot pause a
    // batcher or hold a claim stranded by a dead one.

    fn batches(store: &FakeStore) -> elb_quorum::lease::batch::Batches {
        store.record(KEY).map(|r| r.batches).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_batched_holder_makes_the_batch_calls_itself() {
        let mut h = harness(4, S(10), S(5));
        let store = FakeStore::new();
        strict(&mut h, &store);
        h.cycle.batch = true;
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
        assert!(h.lb.is_serving(&me()));
        // Ask out, take, end; ask in, take, end.
        assert_eq!(store_ops(&store, StoreOp::Batch), vec!["applied"; 6]);
        let b = batches(&store);
        assert!(b.want_out.is_empty() && b.want_in.is_empty() && b.claim.is_none(), "{b:?}");
        assert_eq!(h.cycle.state.load().unwrap(), None, "state file cleared");
    }

    /// A batch claim stranded by a dead batcher (live for 60 s, not naming this instance) holds
    /// every batch back: the holder waits `BATCH_WAIT` each way, withdraws, and makes its own calls.
    #[tokio::test(start_paused = true)]
    async fn a_stranded_claim_sends_holders_to_their_own_calls() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        strict(&mut h, &store);
        h.cycle.batch = true;
        let now = h.cycle.permits.as_ref().unwrap().now();
        let claim = elb_quorum::lease::batch::Claim {
            tok: "dead".into(),
            until: now + 60_000,
            ids: ["i-0003".to_string()].into(),
        };
        let b = elb_quorum::lease::batch::Batches { claim: Some(claim), ..Default::default() };
        store.set_record(KEY, Record { ver: 1, complete: true, batches: b, ..Default::default() });
        let start = tokio::time::Instant::now();
        let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
        assert!(start.elapsed() >= elb_quorum::lease::batch::BATCH_WAIT * 2, "{:?}", start.elapsed());
        assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
        assert!(h.lb.is_serving(&me()));
        let b = batches(&store);
        assert!(b.want_out.is_empty() && b.want_in.is_empty(), "{b:?}");
        assert_eq!(b.withdrawals, 2, "withdrawn each way");
    }

    /// The first invariant across instances: a process that died with its targets in a batch
    /// (its state file says it is out) registers again only once no live claim names it, so that
    /// a paused batcher's late call cannot take it out after it came back.
    #[tokio::test(start_paused = true)]
    async fn reconcile_waits_out_a_claim_naming_the_instance_before_registering() {
        let mut h = harness(4, S(0), S(5));
        let store = FakeStore::new();
        strict(&mut h, &store);
        h.lb.deregister(&[Target::instance(me())]).await.unwrap();
        h.cycle.state.save(&record(Step::Registering, &me())).unwrap();
        let now = h.cycle.permits.as_ref().unwrap().now();
        let claim = elb_quorum::lease::batch::Claim { tok: "paused".into(), until: now + 5_000, ids: [me()].into() };
        let b = elb_quorum::lease::batch::Batches {
            claim: Some(claim),
            want_in: [format!("abcd0123/{}@0123abcd", me())].into(),
            ..Default::default()
        };
        store.set_record(KEY, Record { ver: 1, complete: true, batches: b, ..Default::default() });
        assert!(h.cycle.reconcile().await.unwrap());
        let registered = h.lb.calls().iter().find(|c| c.op == Op::Register).unwrap().at;
        // The claim's end + G (30 s): the earliest a batcher's call can no longer come.
        assert!(registered >= S(35), "registered at {registered:?}");
        assert!(h.lb.is_serving(&me()));
        let b = batches(&store);
        assert!(b.want_in.is_empty() && b.withdrawals == 1, "{b:?}");
    }
}
