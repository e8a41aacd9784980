//! Fleet makespan and cycle overhead on the in-process fake load balancer (tokio's paused clock:
//! simulated seconds, computed in milliseconds). `cargo bench --bench fleet`.
//!
//! - Fleet: K = 6 and 12 instances, quorum 0.75, drain 20 s, restart 10 s, health 15 s, 80 ms API
//!   calls, all asked at once; over 50 seeds: makespan against the theoretical minimum (waves of
//!   `permits` instances, each drain + restart + health), fewest serving, races, load-balancer calls/s.
//! - Cycle overhead: one instance of 4, zero drain, instant health, 10 s restart: cycle time minus
//!   the restart, with and without the settle pause.
//! - Strict mode (fake permit store, 45 ms per call, atomic like DynamoDB): K = 12 and 100, all asked
//!   at once; makespan against `ceil(K/L) × cycle`, store calls per cycle, conflicts per granted
//!   acquire, most instances out at once.
//! - Throttled world (`Throttle::aws`: AWS's per-account buckets, the SDK's attempts; members read
//!   through EC2's budget): K = 12, 100 and 1,000, strict and not, 3 seeds, then strict without a
//!   pace and with `--batch-registrations` (the goals' configuration at K = 1,000); or only the
//!   configurations asked for with `-- --fleet K[,K...] [--strict] [--json] [--seeds N]
//!   [--leave-rate R] [--registration SIZE,REFILL] [--members asg|asg:NAME] [--ran-before]
//!   [--batch-registrations]` (`asg`: members
//!   and attachments from the Auto Scaling group, its one shared bucket assumed at 40 + 10/s;
//!   `asg:NAME`: the group named, so that no process looks its name up;
//!   `--ran-before`: a later restart of the fleet, not its first).

use std::time::Duration;

use elb_quorum::config::DEFAULT_LEAVE_RATE;
use elb_quorum::cycle::Timing;
use elb_quorum::fake::{simulate_fleet, Api, FleetParams, FleetReport};
use elb_quorum::quorum::Rule;

fn params(k: usize, drain: u64, restart: u64, health: u64, settle: f64) -> FleetParams {
    FleetParams {
        k,
        latency: Duration::from_millis(80),
        rule: Rule { quorum_ppm: 750_000, min_in_service: 1 },
        drain: Duration::from_secs(drain),
        restart: Duration::from_secs(restart),
        healthy_after: Duration::from_secs(health),
        timing: Timing {
            check_interval: Duration::from_secs(5),
            max_checks: 500,
            poll_interval: Duration::from_secs(1),
            drain_timeout: None,
            health_timeout: None,
            settle: Duration::from_secs_f64(settle),
        },
        strict: None,
        throttle: false,
        registration: None,
        leave_rate: 0.0,
        members: Api::Ec2Describe,
        ran_before: false,
        batch: false,
        named_group: false,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `--fleet K[,K...]`, `--strict`, `--json`, `--seeds N`: the throttled-world runs alone.
struct BudgetArgs {
    ks: Vec<usize>,
    strict: Vec<bool>,
    seeds: u64,
    json: bool,
    /// Strict mode's `--leave-rate` (default: the product's).
    leave_rate: f64,
    /// The registration calls' bucket, size and refill per second (default: `Api::bucket`).
    registration: Option<(f64, f64)>,
    /// `--members asg`: members and attachments from the Auto Scaling group (default: ec2-name).
    members: Api,
    /// `--ran-before`: the fleet ran before (strict: the stale shared view its last restart left;
    /// `--members asg`: the group's name kept); else its first run.
    ran_before: bool,
    /// `--batch-registrations`.
    batch: bool,
    /// `--members asg:NAME`: the group named (no lookup for its name).
    named_group: bool,
}

fn budget_args() -> Option<BudgetArgs> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let ks = value("--fleet")?.split(',').map(|k| k.parse().expect("--fleet K[,K...]")).collect();
    Some(BudgetArgs {
        ks,
        strict: if args.iter().any(|a| a == "--strict") { vec![true] } else { vec![false] },
        seeds: value("--seeds").map_or(3, |n| n.parse().expect("--seeds N")),
        json: args.iter().any(|a| a == "--json"),
        leave_rate: value("--leave-rate").map_or(DEFAULT_LEAVE_RATE, |r| r.parse().expect("--leave-rate R")),
        registration: value("--registration").map(|v| {
            let (size, refill) = v.split_once(',').expect("--registration SIZE,REFILL");
            (size.parse().expect("SIZE"), refill.parse().expect("REFILL"))
        }),
        members: match value("--members").as_deref() {
            None | Some("ec2-name") => Api::Ec2Describe,
            Some(asg) if asg == "asg" || asg.starts_with("asg:") => Api::AutoScaling,
            Some(other) => panic!("--members ec2-name|asg|asg:NAME, not {other}"),
        },
        named_group: value("--members").is_some_and(|m| m.starts_with("asg:")),
        ran_before: args.iter().any(|a| a == "--ran-before"),
        batch: args.iter().any(|a| a == "--batch-registrations"),
    })
}

fn main() {
    let rt = runtime();
    if let Some(b) = budget_args() {
        budget_runs(&rt, &b);
        return;
    }
    if std::env::args().any(|a| a == "--strict-only") {
        strict_fleets(&rt);
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        // Under `cargo test --all-targets`: one quick run, so the benchmark cannot rot unnoticed.
        fastrand::seed(1);
        let r = rt.block_on(simulate_fleet(&params(6, 20, 10, 15, 5.0)));
        assert!(r.failures == 0 && r.restarts.iter().all(|&n| n == 1), "{r:?}");
        let r = rt.block_on(simulate_fleet(&FleetParams {
            strict: Some(Duration::from_millis(45)),
            ..params(12, 20, 10, 15, 0.0)
        }));
        assert!(r.failures == 0 && r.min_serving >= r.required, "{r:?}");
        return;
    }
    println!("fleet (simulated; quorum 0.75; drain 20 s, restart 10 s, health 15 s; 80 ms API calls; check 5 s, poll 1 s, settle 5 s; 50 seeds)");
    println!(
        "{:>3} {:>7} {:>12} {:>12} {:>12} {:>13} {:>9} {:>12} {:>10}",
        "K",
        "permits",
        "theoretical",
        "makespan p50",
        "makespan max",
        "ratio p50/max",
        "min serv",
        "races/run",
        "LB calls/s"
    );
    for k in [6, 12] {
        let reports: Vec<FleetReport> = (0..50)
            .map(|seed| {
                fastrand::seed(seed);
                rt.block_on(simulate_fleet(&params(k, 20, 10, 15, 5.0)))
            })
            .collect();
        assert!(reports.iter().all(|r| r.failures == 0 && r.restarts.iter().all(|&n| n == 1)));
        let mut spans: Vec<f64> = reports.iter().map(|r| r.makespan.as_secs_f64()).collect();
        let theo = reports[0].theoretical.as_secs_f64();
        let (p50, max) = (percentile(&mut spans, 0.5), percentile(&mut spans, 1.0));
        let min_serving = reports.iter().map(|r| r.min_serving).min().unwrap();
        let races: f64 = reports.iter().map(|r| r.races as f64).sum::<f64>() / reports.len() as f64;
        let rate = reports.iter().map(|r| r.lb_calls_per_second).fold(0.0, f64::max);
        let clean = reports.iter().filter(|r| r.min_serving >= r.required).count();
        println!(
            "{k:>3} {:>7} {theo:>11.0}s {p50:>11.1}s {max:>11.1}s {:>6.3}/{:<6.3} {min_serving:>5}/{:<3} {races:>12.2} {rate:>10.2}",
            reports[0].permits,
            p50 / theo,
            max / theo,
            reports[0].required
        );
        println!("    runs never below quorum: {clean}/50 (required {})", reports[0].required);
    }
    println!();
    println!(
        "cycle overhead (one of 4 instances; zero drain, instant health, restart 10 s, poll 1 s, 80 ms API calls)"
    );
    for settle in [0.0, 5.0] {
        let mut over: Vec<f64> = (0..50)
            .map(|seed| {
                fastrand::seed(seed);
                rt.block_on(one_cycle(&params(4, 0, 10, 0, settle)))
            })
            .collect();
        println!(
            "  settle {settle:>3.0} s: overhead p50 {:.2} s, max {:.2} s (poll interval 1 s)",
            percentile(&mut over, 0.5),
            percentile(&mut over, 1.0)
        );
    }
    strict_fleets(&rt);
    println!();
    budget_runs(
        &rt,
        &BudgetArgs {
            ks: vec![12, 100, 1000],
            strict: vec![false, true],
            seeds: 3,
            json: false,
            leave_rate: DEFAULT_LEAVE_RATE,
            registration: None,
            members: Api::Ec2Describe,
            ran_before: false,
            batch: false,
            named_group: false,
        },
    );
    // The configuration that meets the makespan goal at K = 1,000 within AWS's budgets: no pace,
    // the registration calls batched through the permit record (README, "At fleet scale").
    println!();
    println!("strict, --leave-rate 0 --batch-registrations:");
    budget_runs(
        &rt,
        &BudgetArgs {
            ks: vec![12, 100, 1000],
            strict: vec![true],
            seeds: 3,
            json: false,
            leave_rate: 0.0,
            registration: None,
            members: Api::Ec2Describe,
            ran_before: false,
            batch: true,
            named_group: false,
        },
    );
}

/// The throttled world (AWS's account buckets, the SDK's retries; `Throttle::aws`): one JSON
/// object per configuration with `--json`, else a table.
fn budget_runs(rt: &tokio::runtime::Runtime, b: &BudgetArgs) {
    if !b.json {
        println!("throttled world (AWS's buckets: ELB Describe* 40 + 10/s, EC2 DescribeInstances 100 + 20/s, registration 20 + 4/s;");
        let asg = b.members == Api::AutoScaling;
        println!(
            "  the SDK's 5 attempts each; members read through {}; same fleet settings, settle 5 s without --strict; {} seeds)",
            if asg { "Auto Scaling (40 + 10/s assumed)" } else { "EC2" },
            b.seeds
        );
        println!(
            "{:>5} {:>6} {:>10} {:>10} {:>8} {:>12} {:>14} {:>14} {:>10} {:>7} {:>12} {:>11} {:>10}",
            "K",
            "strict",
            "makespan",
            "theory",
            "most out",
            "fewest/req",
            "ELB desc/s pk",
            if asg { "ASG/s pk" } else { "EC2 desc/s pk" },
            "lost",
            "gave up",
            "writes/s pk",
            "reads/s pk",
            "confl/acq"
        );
    }
    for &strict in &b.strict {
        for &k in &b.ks {
            let p = FleetParams {
                throttle: true,
                strict: strict.then(|| Duration::from_millis(45)),
                leave_rate: b.leave_rate,
                registration: b.registration,
                members: b.members,
                ran_before: b.ran_before,
                batch: b.batch,
                named_group: b.named_group,
                ..params(k, 20, 10, 15, if strict { 0.0 } else { 5.0 })
            };
            let reports: Vec<FleetReport> = (0..b.seeds)
                .map(|seed| {
                    fastrand::seed(seed);
                    rt.block_on(simulate_fleet(&p))
                })
                .collect();
            let worst = |f: fn(&FleetReport) -> f64| reports.iter().map(f).fold(f64::MIN, f64::max);
            let makespan = worst(|r| r.makespan.as_secs_f64());
            let busiest = reports.iter().max_by(|a, b| a.store_writes_peak_per_s.total_cmp(&b.store_writes_peak_per_s));
            let row = serde_json::json!({
                "k": k,
                "strict": strict,
                "leave_rate": if strict { b.leave_rate } else { 0.0 },
                "registration_bucket": b.registration.unwrap_or(Api::ElbV1Mutate.bucket()),
                "seeds": b.seeds,
                "makespan_s": round(makespan),
                "theoretical_s": reports[0].theoretical.as_secs_f64(),
                "most_out": reports.iter().map(|r| r.most_out).max().unwrap(),
                "fewest_serving": reports.iter().map(|r| r.min_serving).min().unwrap(),
                "required": reports[0].required,
                "elb_describe_peak_per_s": round(worst(|r| r.elb_describe_peak_per_s)),
                "ec2_describe_peak_per_s": round(worst(|r| r.ec2_describe_peak_per_s)),
                "members": match (b.members, b.named_group) {
                    (Api::AutoScaling, true) => "asg:NAME",
                    (Api::AutoScaling, false) => "asg",
                    _ => "ec2-name",
                },
                "ran_before": b.ran_before,
                "batch_registrations": b.batch,
                "autoscaling_peak_per_s": round(worst(|r| r.autoscaling_peak_per_s)),
                "checks_lost_to_throttling": reports.iter().map(|r| r.calls_lost_to_throttling).sum::<usize>(),
                "throttled_attempts": reports.iter().map(|r| r.throttled_attempts).sum::<usize>(),
                "registration_peak_per_s": round(worst(|r| r.registration_peak_per_s)),
                "registration_throttled": reports.iter().map(|r| r.registration_throttled).sum::<usize>(),
                "registration_calls_lost": reports.iter().map(|r| r.registration_calls_lost).sum::<usize>(),
                "registration_calls": reports.iter().map(|r| r.registration_calls).max().unwrap(),
                "gave_up": reports.iter().map(|r| r.failures).sum::<usize>(),
                "store_writes_peak_per_s": round(worst(|r| r.store_writes_peak_per_s)),
                "store_writes_peak_at_s": busiest.map(|r| round(r.store_writes_peak_at.as_secs_f64())),
                "store_writes_peak_by_op": busiest.map(|r| r.store_writes_peak_by_op.clone()),
                "store_item_writes_peak_per_s": round(worst(|r| r.store_item_writes_peak_per_s)),
                "store_items": busiest.map(|r| r.store_items.clone()),
                "store_reads_peak_per_s": round(worst(|r| r.store_reads_peak_per_s)),
                "store_read_units_peak_per_s": round(worst(|r| r.store_read_units_peak_per_s)),
                "store_write_units_peak_per_s": round(worst(|r| r.store_write_units_peak_per_s)),
                "conflicts_per_acquire": round(
                    reports.iter().map(|r| r.conflicts as f64).sum::<f64>()
                        / reports.iter().map(|r| r.acquires as f64).sum::<f64>().max(1.0)
                ),
            });
            if b.json {
                println!("{row}");
            } else {
                let f = |key: &str| row[key].to_string();
                println!(
                    "{k:>5} {strict:>6} {makespan:>9.0}s {:>9.0}s {:>8} {:>7}/{:<4} {:>14} {:>14} {:>10} {:>7} {:>12} {:>11} {:>10}",
                    row["theoretical_s"].as_f64().unwrap(),
                    f("most_out"),
                    f("fewest_serving"),
                    f("required"),
                    f("elb_describe_peak_per_s"),
                    f(if b.members == Api::AutoScaling { "autoscaling_peak_per_s" } else { "ec2_describe_peak_per_s" }),
                    f("checks_lost_to_throttling"),
                    f("gave_up"),
                    f("store_writes_peak_per_s"),
                    f("store_reads_peak_per_s"),
                    f("conflicts_per_acquire"),
                );
            }
        }
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Strict fleets: K = 12 and 100, 20 seeds each.
fn strict_fleets(rt: &tokio::runtime::Runtime) {
    println!();
    println!("strict mode (simulated; fake permit store 45 ms per call; D 120 s, G 30 s; same fleet settings, no settle; 20 seeds)");
    println!(
        "{:>4} {:>3} {:>14} {:>13} {:>13} {:>11} {:>17} {:>13} {:>9}",
        "K",
        "L",
        "ceil(K/L)×cyc",
        "makespan p50",
        "makespan max",
        "ratio p50",
        "store calls/cyc",
        "conflicts/acq",
        "max out"
    );
    for k in [12, 100] {
        let p = FleetParams { strict: Some(Duration::from_millis(45)), ..params(k, 20, 10, 15, 0.0) };
        let reports: Vec<FleetReport> = (0..20)
            .map(|seed| {
                fastrand::seed(seed);
                rt.block_on(simulate_fleet(&p))
            })
            .collect();
        assert!(reports.iter().all(|r| r.failures == 0 && r.restarts.iter().all(|&n| n == 1)));
        let mut spans: Vec<f64> = reports.iter().map(|r| r.makespan.as_secs_f64()).collect();
        let theo = reports[0].theoretical.as_secs_f64();
        let (p50, max) = (percentile(&mut spans, 0.5), percentile(&mut spans, 1.0));
        let calls: f64 = reports.iter().map(|r| r.store_calls as f64 / k as f64).sum::<f64>() / reports.len() as f64;
        let conflicts: f64 =
            reports.iter().map(|r| r.conflicts as f64 / r.acquires.max(1) as f64).sum::<f64>() / reports.len() as f64;
        let max_out = reports.iter().map(|r| k - r.min_serving).max().unwrap();
        println!(
            "{k:>4} {:>3} {theo:>13.0}s {p50:>12.1}s {max:>12.1}s {:>11.3} {calls:>17.1} {conflicts:>13.3} {max_out:>5} (L {})",
            reports[0].permits,
            p50 / theo,
            reports[0].permits
        );
    }
}

/// One cycle of one instance among `p.k` serving peers: its duration minus the restart time.
async fn one_cycle(p: &FleetParams) -> f64 {
    use elb_quorum::cycle::{state_file::StateFile, Outcome};
    use elb_quorum::fake::{fake_cycle, FakeLb, FakeServices};
    use elb_quorum::trigger::{Origin, RestartRequest};
    let ids: Vec<String> = (0..p.k).map(|i| format!("i-{i}")).collect();
    let mut lb = FakeLb::new("bench", &ids, p.drain, p.healthy_after);
    lb.latency = p.latency;
    let services = FakeServices::new(p.restart, &["web"]);
    let dir = std::env::temp_dir().join(format!("elb-quorum-bench-{}-{}", std::process::id(), fastrand::u64(..)));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let cycle = fake_cycle(vec![lb], &ids, &ids[0], &services, StateFile::new(&dir), rx)
        .with_rule(p.rule)
        .with_timing(p.timing.clone());
    let start = tokio::time::Instant::now();
    let r = cycle.run(&RestartRequest::new(["web".to_string()], Origin::Cli)).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(matches!(r, Ok(Outcome::Done(_))));
    (start.elapsed() - p.restart).as_secs_f64()
}
