//! The randomized fault campaign (`elb_quorum::campaign`, issue #15) in the test command: 500
//! seeded fleets of 4–8 strict instances over the fake services and the real cycle code, faults
//! drawn at random (load balancer and permit store failing, replies lost after the write, peers'
//! health flipping, programs failing to come back, slow to stop or killed while starting, `kill -9`
//! then a fresh process, skewed clocks, the idle watch),
//! every invariant checked. A failing seed is printed; `cargo bench --bench campaign -- --seed N
//! --log` runs it again with the cycle's logs. The bench runs thousands more.

use elb_quorum::campaign::{run_seed, run_seed_batched, SeedReport};

/// Runs seeds `0..n` (every instance batched or none), checks that no seed broke an invariant and
/// that most requests restarted their programs (not a campaign of cycles that all stop early),
/// and returns the reports and the requests done.
fn campaign(n: u64, batched: bool) -> (Vec<SeedReport>, u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let reports: Vec<SeedReport> = (0..n)
        .map(|seed| if batched { rt.block_on(run_seed_batched(seed)) } else { rt.block_on(run_seed(seed)) })
        .collect();
    let failed: Vec<_> = reports.iter().filter(|r| !r.violations.is_empty()).map(|r| (r.seed, &r.violations)).collect();
    assert!(failed.is_empty(), "violations (seed, invariant → what): {failed:?}");
    let cycles: u64 = reports.iter().map(|r| r.instances as u64).sum();
    let done: u64 = reports.iter().map(|r| r.outcomes.get("done").copied().unwrap_or(0)).sum();
    assert!(done * 10 >= cycles * 7, "{done} of {cycles} requests done");
    (reports, done)
}

#[test]
fn five_hundred_seeds_of_faults_break_no_invariant() {
    let (reports, _) = campaign(500, false);
    let faults: u64 = reports.iter().map(|r| r.faults.values().sum::<u64>()).sum();
    assert!(faults > 5_000, "the campaign injected faults: {faults}");
}

/// Seeds that broke invariant 2 before the idle watch existed: a program killed while starting
/// came up after the restart timeout, and its instance stayed deregistered while RUNNING.
#[test]
fn seeds_that_left_a_running_instance_out_before_the_idle_watch() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    for seed in [2, 22, 49] {
        let r = rt.block_on(run_seed(seed));
        assert!(r.faults.keys().any(|k| k.starts_with("program-")), "seed {seed}: {:?}", r.faults);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
}

/// Seed 5139 broke invariant 3: a process killed while holding a slot, its program then failing
/// to come back; the fresh process's reconcile left the instance out (loudly) but kept the old
/// permit entry, which a cycle ending the same way releases.
#[test]
fn a_reconcile_that_leaves_the_instance_out_removes_the_old_permit_entry() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let r = rt.block_on(run_seed(5139));
    assert_eq!(r.faults.get("kill-9"), Some(&1), "{:?}", r.faults);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}

/// `--batch-registrations` under the same faults: 100 seeds with every instance batched (one
/// instance's batch calls deregistering and registering the others, the batches' writes failing
/// among the store faults, `kill -9` then a fresh process's reconcile withdrawing first); the
/// bench runs thousands (`cargo bench --bench campaign -- --batch-registrations`). Seed 70 broke
/// invariant 3 while a withdrawal gave up at its first failed read: a process killed while
/// asking left its element in the set, harmless only because elements carry their permit's token.
#[test]
fn a_hundred_batched_seeds_of_faults_break_no_invariant() {
    let (reports, done) = campaign(100, true);
    // The cycles went through the batches: at least an ask each way for most requests.
    let batch_writes: u64 = reports.iter().map(|r| r.batch_writes).sum();
    assert!(batch_writes >= 2 * done, "{batch_writes} batch writes for {done} requests done");
}
