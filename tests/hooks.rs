//! `--before-leave`, `--ready-check`, `--after-return`: real `/bin/sh` processes around a cycle on
//! the in-process fake load balancer (the fake for exact call logs; moto adds nothing here). These
//! tests run in real time, not on tokio's paused clock: a paused runtime waiting on a child process
//! would jump to the hook's timeout at once. Every test checks where the instance ends.

mod common;

use std::path::Path;
use std::time::Duration;

use elb_quorum::cycle::state_file::{Record, StateFile, Step};
use elb_quorum::cycle::{Cycle, CycleError, Outcome, Timing};
use elb_quorum::fake::{fake_cycle, FakeLb, FakeMembers, FakeServices, Op};
use elb_quorum::hooks::Hooks;
use elb_quorum::trigger::{Origin, RestartRequest};
use tokio::sync::watch;

fn ids() -> Vec<String> {
    (0..4).map(|i| format!("i-{i:04}")).collect()
}

struct Harness {
    cycle: Cycle<FakeLb, FakeMembers, FakeServices>,
    lb: FakeLb,
    services: FakeServices,
    dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

/// Four members on a fake Classic load balancer (no draining, healthy at once); restarts take
/// 50 ms; polls every 50 ms; hooks time out after 1 s, the ready check after 1 s.
fn harness(hooks: impl FnOnce(&Path) -> Hooks) -> Harness {
    let all = ids();
    let lb = FakeLb::new("web-example-com", &all, Duration::ZERO, Duration::ZERO);
    let services = FakeServices::new(Duration::from_millis(50), &["web"]);
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = watch::channel(false);
    let hooks = hooks(dir.path());
    let cycle = fake_cycle(vec![lb.clone()], &all, &all[0], &services, StateFile::new(dir.path().join("state")), rx)
        .with_timing(Timing {
            check_interval: Duration::from_millis(50),
            max_checks: 3,
            poll_interval: Duration::from_millis(50),
            drain_timeout: None,
            health_timeout: Some(Duration::from_secs(5)),
            settle: Duration::ZERO,
        })
        .with_hooks(Hooks { timeout: Duration::from_secs(1), ready_timeout: Duration::from_secs(1), ..hooks });
    Harness { cycle, lb, services, dir, _shutdown: tx }
}

fn web() -> RestartRequest {
    RestartRequest::new(["web".to_string()], Origin::Cli)
}

fn ops(h: &Harness) -> Vec<Op> {
    h.lb.calls().iter().filter(|c| matches!(c.op, Op::Deregister | Op::Register)).map(|c| c.op).collect()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Appends the hook's phase and environment to `log` in the test's directory.
fn record_to(dir: &Path, log: &str) -> String {
    format!(
        "echo \"$ELB_QUORUM_HOOK $ELB_QUORUM_INSTANCE_ID [$ELB_QUORUM_PROGRAMS] [$ELB_QUORUM_ATTACHMENTS]\" >> {}",
        dir.join(log).display()
    )
}

#[tokio::test]
async fn all_three_hooks_run_in_order_with_the_cycle_in_their_environment() {
    let h = harness(|d| Hooks {
        before_leave: Some(record_to(d, "hooks.log")),
        ready_check: Some(record_to(d, "hooks.log")),
        after_return: Some(format!("{}; echo said on stdout", record_to(d, "hooks.log"))),
        ..Default::default()
    });
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!("not done") };
    let lines: Vec<String> = read(h.dir.path(), "hooks.log").lines().map(str::to_owned).collect();
    let env = "i-0000 [web] [load balancer web-example-com]";
    assert_eq!(lines, vec![format!("before-leave {env}"), format!("ready-check {env}"), format!("after-return {env}")]);
    assert_eq!(ops(&h), vec![Op::Deregister, Op::Register]);
    assert!(h.lb.is_serving("i-0000"));
}

/// A failing `--before-leave` aborts the cycle with nothing changed; so does one that hangs, whose
/// whole process group is killed at the timeout.
#[tokio::test]
async fn before_leave_failing_or_hanging_changes_nothing() {
    let h = harness(|_| Hooks { before_leave: Some("echo not today >&2; exit 3".into()), ..Default::default() });
    match h.cycle.run(&web()).await {
        Err(e @ CycleError::BeforeLeave { .. }) => {
            assert!(!e.left_out());
            assert!(elb_quorum::cycle::chain(&e).contains("exited with status 3"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ops(&h), vec![], "nothing changed");
    assert_eq!(*h.services.restarts.lock().unwrap(), 0);

    let h = harness(|d| Hooks {
        before_leave: Some(format!("sleep 30 & echo $! > {}; wait", d.join("child.pid").display())),
        ..Default::default()
    });
    let started = std::time::Instant::now();
    match h.cycle.run(&web()).await {
        Err(CycleError::BeforeLeave { source }) => {
            assert!(source.to_string().contains("did not finish within"), "{source}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "killed at the 1 s timeout: {:?}", started.elapsed());
    let child: u32 = read(h.dir.path(), "child.pid").trim().parse().expect("the hook's child wrote its pid");
    // Gone, or a zombie waiting for init to reap it (its parent shell was killed too).
    let dead = || match std::fs::read_to_string(format!("/proc/{child}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !dead() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dead(), "the hook's own child was killed with it");
    assert_eq!(ops(&h), vec![]);
}

/// `--ready-check` is retried until it passes: failing twice then passing, the cycle finishes.
#[tokio::test]
async fn ready_check_is_retried_until_it_passes() {
    let h = harness(|d| {
        let count = d.join("tries");
        Hooks {
            ready_check: Some(format!(
                "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 3 ]",
                c = count.display()
            )),
            ..Default::default()
        }
    });
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert_eq!(read(h.dir.path(), "tries").trim(), "3");
    assert!(h.lb.is_serving("i-0000"));
}

/// A ready check that never passes, or hangs past its timeout every time: the instance stays out
/// loudly, and the state file says so for the next start.
#[tokio::test]
async fn ready_check_failing_or_hanging_leaves_the_instance_out_loudly() {
    for check in ["exit 1", "sleep 30"] {
        let h = harness(|_| Hooks { ready_check: Some(check.into()), ..Default::default() });
        let e = h.cycle.run(&web()).await.unwrap_err();
        assert!(matches!(e, CycleError::NotReady { .. }) && e.left_out(), "{check}: {e}");
        assert!(e.to_string().contains("LEFT OUT OF load balancer web-example-com"), "{e}");
        assert_eq!(ops(&h), vec![Op::Deregister], "{check}: never registered");
        assert_eq!(h.cycle.state.load().unwrap().map(|r| r.step), Some(Step::ServicesDown));
    }
}

/// A failing `--after-return` is logged; the cycle is done and the instance serves.
#[tokio::test]
async fn after_return_failing_is_only_logged() {
    let h = harness(|_| Hooks { after_return: Some("exit 7".into()), ..Default::default() });
    let Outcome::Done(_) = h.cycle.run(&web()).await.unwrap() else { panic!() };
    assert!(h.lb.is_serving("i-0000"));
}

/// kill -9 around the hooks: a state file left while restarting (after `--before-leave` ran) is
/// finished with the ready check first and never runs `--before-leave` again; one left while
/// registering (the ready check had passed) does not run the ready check again.
#[tokio::test]
async fn reconcile_runs_the_ready_check_unless_it_had_passed() {
    for (step, ready_runs) in [(Step::Restarting, "ready-check"), (Step::Registering, "")] {
        let h = harness(|d| Hooks {
            before_leave: Some(record_to(d, "hooks.log")),
            ready_check: Some(record_to(d, "hooks.log")),
            ..Default::default()
        });
        let obs = h.cycle.observe().await.unwrap();
        let plan = h.cycle.plan(&obs).unwrap();
        h.cycle
            .state
            .save(&Record {
                step,
                instance_id: "i-0000".into(),
                via: Default::default(),
                group: None,
                attachments: plan,
                programs: vec!["web".into()],
                since: 1,
                pid: 1,
            })
            .unwrap();
        h.lb.force_deregistered("i-0000");
        assert!(h.cycle.reconcile().await.unwrap());
        let phases: Vec<String> =
            read(h.dir.path(), "hooks.log").lines().map(|l| l.split(' ').next().unwrap().to_owned()).collect();
        assert_eq!(phases.join(" "), ready_runs, "{step:?}");
        assert!(h.lb.is_serving("i-0000"), "{step:?}");
    }
}

/// `--dry-run` names the hooks and runs none.
#[tokio::test]
async fn dry_run_runs_no_hook() {
    let mut h = harness(|d| Hooks { before_leave: Some(record_to(d, "hooks.log")), ..Default::default() });
    h.cycle.dry_run = true;
    assert!(matches!(h.cycle.run(&web()).await.unwrap(), Outcome::DryRun(_)));
    assert_eq!(read(h.dir.path(), "hooks.log"), "");
    assert!(h.cycle.hooks.describe().contains("--before-leave"));
}

/// A hook whose command does not exist, or is not executable, is a configuration error at start,
/// naming the option.
#[test]
fn a_missing_hook_command_exits_2_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (option, command) in [("--before-leave", "no-such-command-xyz"), ("--ready-check", "/nonexistent/check --fast")]
    {
        let out = common::run_bin(
            &[
                "restart",
                "web",
                option,
                command,
                "--lb",
                "web",
                "--instance-id",
                "i-1",
                "--hostname",
                "a.web.example.com",
            ],
            &[("ELB_QUORUM_STATE_DIR".to_string(), dir.path().display().to_string())],
        );
        let err = common::text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{option}: {err}");
        assert!(err.contains(option) && err.contains("is not an executable file or a command on PATH"), "{err}");
    }
}
