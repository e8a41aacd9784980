//! One instance's cycle over several attachments, on the in-process fakes (tokio's paused clock:
//! simulated seconds). `cargo bench --bench attachments`.
//!
//! - Cycle time against a target group's deregistration delay (0, 30, 300 s): AWS shows `draining`
//!   for the whole delay, connections or not, so the delay is paid in full.
//! - Load-balancer API calls per cycle for 1, 2 and 4 attachments, Classic and target group, as the
//!   real backends make them (a Classic `timings` is two calls, a target group's one plus the
//!   `DescribeTargetGroups` that resolves it each cycle).
//! - Overhead beyond drain + restart + health with 3 attachments of different timings: the waits run
//!   in shared poll rounds, so the slowest attachment sets the pace and the overhead stays within
//!   one poll interval.
//!
//! Common settings: 4 members, all serving, quorum 0.75; restart 10 s; 80 ms per API call (±50 %);
//! poll interval 5 s (±20 %, the default); no settle pause (a settle confirmation adds one read per
//! attachment and one members read); 20 seeds. Under `cargo test --all-targets` it runs one quick
//! configuration of each and checks its own figures.

use std::time::Duration;

use elb_quorum::cycle::state_file::StateFile;
use elb_quorum::cycle::{Outcome, Timing};
use elb_quorum::fake::{fake_cycle, FakeLb, FakeServices, Op};
use elb_quorum::lb::Kind;
use elb_quorum::trigger::{Origin, RestartRequest};

const RESTART: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_secs(5);

/// One attachment of the simulated instance: kind, deregistration delay (Classic: draining
/// timeout), seconds until healthy after registering.
#[derive(Clone, Copy)]
struct Spec {
    kind: Kind,
    delay: u64,
    health: u64,
}

/// What one cycle measured.
struct Run {
    total: Duration,
    drain: Duration,
    back: Duration,
    /// API calls as the real backends make them.
    calls: usize,
}

async fn one_cycle(specs: &[Spec]) -> Run {
    let ids: Vec<String> = (0..4).map(|i| format!("i-{i}")).collect();
    let lbs: Vec<FakeLb> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (delay, health) = (Duration::from_secs(s.delay), Duration::from_secs(s.health));
            let mut lb = match s.kind {
                Kind::Classic => FakeLb::new(&format!("lb{i}"), &ids, delay, health),
                Kind::TargetGroup => FakeLb::target_group(&format!("tg{i}"), &ids, 80, delay, health),
            };
            lb.latency = Duration::from_millis(80);
            lb
        })
        .collect();
    let services = FakeServices::new(RESTART, &["web"]);
    let dir = std::env::temp_dir().join(format!("elb-quorum-bench-att-{}-{}", std::process::id(), fastrand::u64(..)));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let cycle = fake_cycle(lbs.clone(), &ids, &ids[0], &services, StateFile::new(&dir), rx).with_timing(Timing {
        check_interval: Duration::from_secs(30),
        max_checks: 10,
        poll_interval: POLL,
        drain_timeout: None,
        health_timeout: None,
        settle: Duration::ZERO,
    });
    let start = tokio::time::Instant::now();
    let outcome = cycle.run(&RestartRequest::new(["web".to_string()], Origin::Cli)).await;
    let total = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(Outcome::Done(s)) = outcome else { panic!("cycle did not finish: {outcome:?}") };
    let calls = lbs
        .iter()
        .zip(specs)
        .flat_map(|(lb, spec)| lb.calls().into_iter().map(move |c| (c.op, spec.kind)))
        .map(|(op, kind)| match (op, kind) {
            (Op::Timings, Kind::Classic) => 2,
            _ => 1,
        })
        .sum();
    Run { total, drain: s.drain, back: s.back_in_service, calls }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

/// p50 and max of `f` over `seeds` runs of `specs`.
fn over_seeds(rt: &tokio::runtime::Runtime, seeds: u64, specs: &[Spec], f: impl Fn(&Run) -> f64) -> (f64, f64) {
    let mut v: Vec<f64> = (0..seeds)
        .map(|seed| {
            fastrand::seed(seed);
            f(&rt.block_on(one_cycle(specs)))
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[v.len() - 1])
}

/// Seconds beyond the slowest attachment's delay + restart + the slowest health.
fn overhead(specs: &[Spec]) -> impl Fn(&Run) -> f64 + '_ {
    move |r: &Run| {
        let delay = specs.iter().map(|s| s.delay).max().unwrap_or(0);
        let health = specs.iter().map(|s| s.health).max().unwrap_or(0);
        r.total.as_secs_f64() - (delay + RESTART.as_secs() + health) as f64
    }
}

fn tg(delay: u64, health: u64) -> Spec {
    Spec { kind: Kind::TargetGroup, delay, health }
}

fn classic(delay: u64, health: u64) -> Spec {
    Spec { kind: Kind::Classic, delay, health }
}

fn main() {
    let rt = runtime();
    let mixed = [classic(30, 15), tg(60, 20), tg(90, 25)];
    if !std::env::args().any(|a| a == "--bench") {
        // Under `cargo test --all-targets`: one run of each table, checked.
        fastrand::seed(1);
        let r = rt.block_on(one_cycle(&[tg(30, 15)]));
        assert!(r.drain >= Duration::from_secs(30), "the delay is paid: {:?}", r.drain);
        let one = rt.block_on(one_cycle(&[classic(0, 15)])).calls;
        let four = rt.block_on(one_cycle(&[classic(0, 15); 4])).calls;
        let per = four as f64 / 4.0;
        assert!((per - one as f64).abs() <= one as f64 * 0.25, "calls per attachment stay the same: {one} → {four}");
        let r = rt.block_on(one_cycle(&mixed));
        assert!(overhead(&mixed)(&r) <= POLL.as_secs_f64() * 1.2 + 1.0, "{:?}", r.total);
        return;
    }
    println!("one cycle, one target group: cycle time against the deregistration delay (restart 10 s, healthy after 15 s, poll 5 s; 20 seeds)");
    println!("{:>9} {:>12} {:>12} {:>12} {:>14}", "delay", "cycle p50", "drain p50", "back p50", "overhead max");
    for delay in [0, 30, 300] {
        let specs = [tg(delay, 15)];
        let (total, _) = over_seeds(&rt, 20, &specs, |r| r.total.as_secs_f64());
        let (drain, _) = over_seeds(&rt, 20, &specs, |r| r.drain.as_secs_f64());
        let (back, _) = over_seeds(&rt, 20, &specs, |r| r.back.as_secs_f64());
        let (_, over) = over_seeds(&rt, 20, &specs, overhead(&specs));
        println!("{:>8}s {total:>11.1}s {drain:>11.1}s {back:>11.1}s {over:>13.1}s", delay);
    }
    println!();
    println!("load-balancer API calls per cycle (drain 30 s, healthy after 15 s, poll 5 s; p50 and max of 20 seeds)");
    println!("{:>12} {:>10} {:>10}", "attachments", "Classic", "target group");
    for n in [1, 2, 4] {
        let (c, cmax) = over_seeds(&rt, 20, &vec![classic(30, 15); n], |r| r.calls as f64);
        let (t, tmax) = over_seeds(&rt, 20, &vec![tg(30, 15); n], |r| r.calls as f64);
        println!("{n:>12} {:>10} {:>12}", format!("{c:.0}/{cmax:.0}"), format!("{t:.0}/{tmax:.0}"));
    }
    println!();
    println!("overhead beyond the slowest drain + restart + the slowest health (poll 5 s; 20 seeds)");
    for (label, specs) in [
        ("1 target group (delay 90 s, healthy after 25 s)", vec![tg(90, 25)]),
        ("Classic 30/15 + target groups 60/20 and 90/25", mixed.to_vec()),
    ] {
        let (p50, max) = over_seeds(&rt, 20, &specs, overhead(&specs));
        println!("  {label:<50} p50 {p50:.1} s, max {max:.1} s");
    }
}
