//! The randomized fault campaign: a seeded fleet over the fake services and the real cycle code,
//! in strict mode, with faults drawn at random while it restarts, and the invariants checked
//! while it runs and once it is quiet. `cargo bench --bench campaign` runs many seeds; the test
//! command runs some (`tests/campaign.rs`). One seed reproduces exactly (tokio's paused clock and
//! a seeded RNG): `cargo bench --bench campaign -- --seed N`.
//!
//! Faults: the load balancer throttling, failing with 5xx or unreachable on any call, or losing
//! the reply of a deregistration or registration that took effect; the permit
//! store throttling, failing, timing out, or losing the reply of a write it applied; a peer's
//! health flipping for a while; a program that fails to come back, is slow to stop, or is killed
//! while starting (supervisord starts it again), past the restart timeout (20–60 s) or not; a
//! process killed (`kill -9`) at a random moment, its supervisord finishing the restart it was
//! doing, and a fresh process reconciling from the state file; each instance's clock skewed within
//! half the lease grace. Once the cycles end, each listener's idle watch (`Cycle::recover`, every
//! 5 s) runs while faults go on, and once more when quiet.
//!
//! `run_seed_batched` runs the same with every instance on `--batch-registrations` (the batches'
//! writes among the store faults).
//!
//! Invariants (numbered as in issue #15):
//! 1. never more than L slots held (an instance that serves nothing already leaves under an
//!    uncapped exempt entry), and never fewer serving than quorum needs once the instances hit
//!    from outside this seed (health flipped, programs made to fail) are counted as serving;
//! 2. once quiet, no instance out of the load balancer while its programs are RUNNING;
//! 3. once quiet, no permit entry left (batched: and no target still asking a batch);
//! 4. every request restarted its programs exactly once, or ended with nothing changed (still
//!    registered, not restarted) and an error, or said loudly that the programs are down.
//!
//! (Invariant 5, a listener that keeps acknowledging, concerns the protocol loop, which this
//! simulation does not run: `tests/listener.rs` and `tests/e2e.rs` cover it.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::cycle::state_file::StateFile;
use crate::cycle::{CycleError, Outcome};
use crate::fake::{fake_cycle, fake_permits, FakeLb, FakeServices, FakeStore, Fault, Hitch, Op, StoreFault, StoreOp};
use crate::quorum::Rule;
use crate::trigger::{Origin, RestartRequest};

/// What one seed did and found.
#[derive(Debug, Clone, Default)]
pub struct SeedReport {
    pub seed: u64,
    pub instances: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Invariants broken (number → what was seen), empty when none.
    pub violations: BTreeMap<u8, String>,
    /// How the requests ended: `done`, `nothing-changed` (gave up, no permit, or an error before
    /// leaving), `left-out` (said loudly: programs down, or AWS refused for the whole retry
    /// budget), `killed` (then reconciled by a fresh process).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Batched: the batches' writes the store applied (asks, withdrawals, claims, ends).
    pub batch_writes: u64,
}

const KEY: &str = "campaign.example.com";

fn pick<T: Copy>(items: &[T]) -> T {
    items[fastrand::usize(..items.len())]
}

/// Runs seed `seed` (call inside a runtime with paused time).
pub async fn run_seed(seed: u64) -> SeedReport {
    run(seed, false).await
}

/// Runs seed `seed` with every instance on `--batch-registrations`: the batches' writes join the
/// store faults drawn, and once quiet no target may still ask a batch (invariant 3). A seed draws
/// the same fleet (size, timings, clocks) as `run_seed`'s; its faults differ.
pub async fn run_seed_batched(seed: u64) -> SeedReport {
    run(seed, true).await
}

async fn run(seed: u64, batch: bool) -> SeedReport {
    fastrand::seed(seed);
    let k = fastrand::usize(4..=8);
    let ids: Vec<String> = (0..k).map(|i| format!("i-{i:04}")).collect();
    let drain = Duration::from_secs(fastrand::u64(0..=10));
    let healthy_after = Duration::from_secs(fastrand::u64(1..=10));
    let mut lb = FakeLb::new("campaign", &ids, drain, healthy_after);
    lb.latency = Duration::from_millis(fastrand::u64(10..=80));
    let mut store = FakeStore::new();
    store.latency = Duration::from_millis(fastrand::u64(5..=40));
    let rule = Rule { quorum_ppm: 750_000, min_in_service: 1 };
    let (required, limit) = (rule.required(k), rule.permits(k));
    // One directory per run: two runs of the same seed in one process (the batched and the plain
    // campaign, side by side in the test binary) must not share state files.
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nth = RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let base = std::env::temp_dir().join(format!("elb-quorum-campaign-{}-{seed}-{nth}", std::process::id()));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = Arc::new(Mutex::new(SeedReport { seed, instances: k, ..Default::default() }));
    let flipped: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    // Every instance whose health was flipped or whose programs were made to fail, this seed.
    let hit: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let count =
        |r: &Arc<Mutex<SeedReport>>, kind: &'static str| *r.lock().unwrap().faults.entry(kind).or_default() += 1;

    let restart_timeout = Duration::from_secs(fastrand::u64(20..=60));
    let services: Vec<FakeServices> = ids
        .iter()
        .map(|_| FakeServices {
            timeout: restart_timeout,
            ..FakeServices::new(Duration::from_secs(fastrand::u64(1..=5)), &["web"])
        })
        .collect();
    let skews: Vec<i64> = ids.iter().map(|_| fastrand::i64(-15_000..=15_000)).collect();
    let make = |i: usize| {
        let timing = crate::cycle::Timing {
            check_interval: Duration::from_secs(5),
            max_checks: 200,
            poll_interval: Duration::from_secs(1),
            drain_timeout: None,
            health_timeout: None,
            settle: Duration::ZERO,
        };
        let permits = crate::lease::Permits { skew_ms: skews[i], ..fake_permits(&store, KEY, &ids[i]) };
        fake_cycle(vec![lb.clone()], &ids, &ids[i], &services[i], StateFile::new(base.join(&ids[i])), rx.clone())
            .with_rule(rule)
            .with_timing(timing)
            .with_permits(Some(permits))
            .with_batch_registrations(batch)
    };

    // Invariant 1, sampled every 100 ms while the fleet works.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let sampler = {
        let (lb, store, done, hit, report, ids) =
            (lb.clone(), store.clone(), done.clone(), hit.clone(), report.clone(), ids.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                // Instances hit from outside (health flipped, programs failing) count as serving:
                // what is checked is what elb-quorum took out.
                let hit = hit.lock().unwrap().clone();
                let serving = ids.iter().filter(|id| lb.is_serving(id.as_str())).count();
                let from_outside = hit.iter().filter(|id| !lb.is_serving(id.as_str())).count();
                let slots = store
                    .record(KEY)
                    .map_or(0, |r| r.holders.values().filter(|h| h.kind == crate::lease::Kind::Slot).count());
                if slots > limit || serving + from_outside < required {
                    report.lock().unwrap().violations.entry(1).or_insert_with(|| {
                        format!("{slots} slots held (L {limit}), {serving} serving + {from_outside} hit from outside (required {required}) at {:?}", start.elapsed())
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Faults, drawn every 1–6 s while the fleet works.
    let injector = {
        let (lb, store, done, flipped, report, ids) =
            (lb.clone(), store.clone(), done.clone(), flipped.clone(), report.clone(), ids.clone());
        let (services, hit) = (services.clone(), hit.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1000..=6000))).await;
                match fastrand::u8(0..6) {
                    0 => {
                        let op = pick(&[Op::Targets, Op::Deregister, Op::Register, Op::Timings]);
                        let (fault, kind) = pick(&[
                            (Fault::Throttled, "lb-throttled"),
                            (Fault::ServerError, "lb-5xx"),
                            (Fault::Unreachable, "lb-unreachable"),
                            (Fault::LostReply, "lb-lost-reply"),
                        ]);
                        lb.inject(op, fault, fastrand::usize(1..=3));
                        count(&report, kind);
                        // A fault lasts a few seconds: one that met no call in them is dropped.
                        let lb = lb.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(fastrand::u64(1..=5))).await;
                            lb.clear_faults(op);
                        });
                    }
                    1 | 2 => {
                        let ops = [
                            StoreOp::Load,
                            StoreOp::Acquire,
                            StoreOp::Renew,
                            StoreOp::Remove,
                            StoreOp::LoadView,
                            StoreOp::LeaseView,
                            StoreOp::PublishView,
                            StoreOp::PublishHead,
                            StoreOp::Batch,
                        ];
                        let op = pick(&ops[..if batch { ops.len() } else { ops.len() - 1 }]);
                        let (fault, kind) = pick(&[
                            (StoreFault::Throttled, "store-throttled"),
                            (StoreFault::ServerError, "store-5xx"),
                            (StoreFault::Timeout, "store-timeout"),
                            (StoreFault::LostReply, "store-lost-reply"),
                        ]);
                        store.fault(op, fault);
                        count(&report, kind);
                        let store = store.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(fastrand::u64(1..=5))).await;
                            store.clear_faults(op);
                        });
                    }
                    3 => {
                        // A peer's health flips from outside for a while (only one at a time).
                        let id = ids[fastrand::usize(..ids.len())].clone();
                        if flipped.lock().unwrap().is_empty() && lb.is_serving(&id) {
                            flipped.lock().unwrap().insert(id.clone(), lb.is_registered(&id));
                            hit.lock().unwrap().insert(id.clone());
                            lb.set_healthy(&id, false);
                            count(&report, "peer-health-flip");
                            let (lb, flipped) = (lb.clone(), flipped.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(fastrand::u64(2..=15))).await;
                                lb.set_healthy(&id, true);
                                flipped.lock().unwrap().remove(&id);
                            });
                        }
                    }
                    4 => {
                        // A program fails to come back on its next restart(s), then recovers; or
                        // its next restart meets one slow to stop, or killed while starting: past
                        // the restart timeout the cycle leaves the instance out, loudly.
                        let i = fastrand::usize(..services.len());
                        let d = Duration::from_secs(fastrand::u64(1..=60));
                        hit.lock().unwrap().insert(ids[i].clone());
                        match fastrand::u8(0..3) {
                            0 => {
                                *services[i].fail.lock().unwrap() = true;
                                count(&report, "program-fails-to-start");
                                let s = services[i].clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_secs(fastrand::u64(1..=10))).await;
                                    *s.fail.lock().unwrap() = false;
                                });
                            }
                            1 => {
                                *services[i].hitch.lock().unwrap() = Some(Hitch::SlowStop(d));
                                count(&report, "program-slow-stop");
                            }
                            _ => {
                                *services[i].hitch.lock().unwrap() = Some(Hitch::KilledWhileStarting(d));
                                count(&report, "program-killed-while-starting");
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
    };

    // Every instance asked at once; one of them may be killed at a random moment.
    let victim = fastrand::bool().then(|| fastrand::usize(..k));
    let kill_at = Duration::from_millis(fastrand::u64(0..=60_000));
    let mut tasks = Vec::new();
    for (i, _) in ids.iter().enumerate() {
        let cycle = make(i);
        tasks.push(tokio::spawn(
            async move { cycle.run(&RestartRequest::new(["web".to_string()], Origin::Remote)).await },
        ));
    }
    let mut outcomes: Vec<Option<Result<Outcome, CycleError>>> = Vec::new();
    let mut killed = None;
    if let Some(v) = victim {
        tokio::time::sleep(kill_at).await;
        if !tasks[v].is_finished() {
            tasks[v].abort();
            killed = Some(v);
            count(&report, "kill-9");
        }
    }
    for t in tasks {
        outcomes.push(t.await.ok());
    }
    if let Some(v) = killed {
        // supervisord finishes a restart the killed process had asked for.
        if !*services[v].running.lock().unwrap() {
            tokio::time::sleep(services[v].restart_time).await;
            if !*services[v].fail.lock().unwrap() {
                services[v].up();
                lb.set_healthy(&ids[v], true);
            }
        }
        // A fresh process (supervisord restarts the listener) finishes the cycle from the state file.
        tokio::time::sleep(Duration::from_secs(fastrand::u64(1..=5))).await;
        let fresh = make(v);
        let _ = fresh.reconcile().await;
    }
    // Each listener's idle watch (`recover`, every 5 s) while faults go on: an instance left out
    // comes back once its programs run again (a start that outlived the restart timeout).
    // Stops early once nothing is left for it: no state file, or programs down for good.
    let watch = |rounds: usize| {
        let (make, base, ids, services) = (&make, &base, &ids, &services);
        async move {
            for _ in 0..rounds {
                let settled = ids.iter().zip(services).all(|(id, s)| {
                    matches!(StateFile::new(base.join(id)).load(), Ok(None))
                        || !(*s.running.lock().unwrap() || *s.coming_up.lock().unwrap())
                });
                if settled {
                    break;
                }
                tokio::time::sleep(crate::worker::IDLE_WATCH).await;
                for i in 0..k {
                    let _ = make(i).recover().await;
                }
            }
        }
    };
    watch(12).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sampler.await;
    let _ = injector.await;
    // Quiet: flips heal, failing programs recover; let the last renewals and releases land, and
    // the watch look once more.
    tokio::time::sleep(Duration::from_secs(20)).await;
    watch(1).await;
    let elapsed = start.elapsed();

    let mut report = report.lock().unwrap().clone();
    for (i, id) in ids.iter().enumerate() {
        let running = *services[i].running.lock().unwrap();
        let restarts = *services[i].restarts.lock().unwrap();
        // 2. Out of the load balancer while RUNNING, once quiet.
        if running && !lb.is_registered(id) {
            report.violations.entry(2).or_insert_with(|| format!("{id} deregistered while RUNNING after {elapsed:?}"));
        }
        // 4. Each request restarted once, or nothing changed with a reason, or said loudly.
        let outcome = match &outcomes[i] {
            _ if Some(i) == killed => "killed",
            Some(Ok(Outcome::Done(_))) => "done",
            Some(Err(e)) if e.left_out() => "left-out",
            _ => "nothing-changed",
        };
        *report.outcomes.entry(outcome).or_default() += 1;
        if Some(i) == killed {
            if restarts > 1 {
                report.violations.entry(4).or_insert_with(|| format!("{id} (killed) restarted {restarts} times"));
            }
            continue;
        }
        let ok = match &outcomes[i] {
            Some(Ok(Outcome::Done(_))) => restarts == 1,
            Some(Ok(_)) => restarts == 0 && lb.is_registered(id),
            Some(Err(e)) if e.left_out() => restarts <= 1,
            Some(Err(_)) => restarts <= 1 && lb.is_registered(id),
            None => false,
        };
        if !ok {
            report.violations.entry(4).or_insert_with(|| {
                format!("{id}: {:?} with {restarts} restarts", outcomes[i].as_ref().map(|r| r.as_ref().map(|_| "ok")))
            });
        }
    }
    // 3. No permit entry left once quiet, and no target still asking a batch.
    if let Some(r) = store.record(KEY) {
        if !r.holders.is_empty() {
            report
                .violations
                .entry(3)
                .or_insert_with(|| format!("entries left: {:?}", r.holders.keys().collect::<Vec<_>>()));
        }
        let b = &r.batches;
        if !b.want_out.is_empty() || !b.want_in.is_empty() {
            report.violations.entry(3).or_insert_with(|| format!("batch asks left: {b:?}"));
        }
    }
    report.batch_writes =
        store.calls().iter().filter(|c| c.op == StoreOp::Batch && c.result == "applied").count() as u64;
    let _ = std::fs::remove_dir_all(&base);
    report
}
