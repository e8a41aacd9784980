//! The randomized fault campaign (`elb_quorum::campaign`): `cargo bench --bench campaign` runs
//! 2,000 seeds (each a fleet of 4–8 strict instances, all asked at once, faults drawn at random)
//! and prints cycles, faults by kind, and violations by invariant with the seeds that broke them;
//! `-- --seeds N` for another count, `-- --seed N [--log]` to run one seed again (with the cycle's logs),
//! `-- --batch-registrations` for every instance batched (`campaign::run_seed_batched`). Under `cargo test
//! --all-targets`: 20 seeds, checked, so the benchmark cannot rot unnoticed (`tests/campaign.rs`
//! runs more in the test command).

use std::collections::BTreeMap;

use elb_quorum::campaign::{run_seed, run_seed_batched};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let bench = args.iter().any(|a| a == "--bench");
    let batched = args.iter().any(|a| a == "--batch-registrations");
    let seeds: Vec<u64> = match value("--seed") {
        Some(s) => vec![s.parse().expect("--seed N")],
        None => {
            (0..value("--seeds").map_or(if bench { 2000 } else { 20 }, |n| n.parse().expect("--seeds N"))).collect()
        }
    };
    if args.iter().any(|a| a == "--log") {
        tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let start = std::time::Instant::now();
    let (mut cycles, mut faults, mut violations) =
        (0usize, BTreeMap::<&str, u64>::new(), BTreeMap::<u8, Vec<u64>>::new());
    let mut outcomes = BTreeMap::<&str, u64>::new();
    for &seed in &seeds {
        let r = if batched { rt.block_on(run_seed_batched(seed)) } else { rt.block_on(run_seed(seed)) };
        cycles += r.instances;
        for (kind, n) in &r.faults {
            *faults.entry(kind).or_default() += n;
        }
        for (kind, n) in &r.outcomes {
            *outcomes.entry(kind).or_default() += n;
        }
        for (inv, what) in &r.violations {
            if violations.get(inv).is_none_or(|v| v.len() < 5) && seeds.len() == 1 {
                eprintln!("seed {seed}: invariant {inv}: {what}");
            }
            violations.entry(*inv).or_default().push(seed);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    println!("fault campaign: {} seeds, {cycles} cycles in {wall:.1} s", seeds.len());
    println!("faults injected: {}", faults.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "));
    println!("requests: {}", outcomes.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "));
    for inv in 1..=4u8 {
        let seeds = violations.get(&inv).cloned().unwrap_or_default();
        let shown: Vec<String> = seeds.iter().take(10).map(u64::to_string).collect();
        println!(
            "invariant {inv}: {} violations{}",
            seeds.len(),
            if seeds.is_empty() {
                String::new()
            } else {
                format!(
                    " (seeds {}; reproduce one: cargo bench --bench campaign -- --seed {})",
                    shown.join(" "),
                    seeds[0]
                )
            }
        );
    }
    if !bench {
        assert!(violations.is_empty(), "violations: {violations:?}");
    }
}
