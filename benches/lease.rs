//! Strict mode's acquire against moto's DynamoDB through the real SDK, serialized by
//! `tests/fixtures/moto_locked.py` (moto is not atomic under concurrency otherwise): 20 contenders
//! for 2 permits at once, 20 rounds; acquire latency p50/p95, store calls per contender and the
//! latency of one call. `cargo bench --bench lease` (needs the test venv: `scripts/test-env`).
//! Under `cargo test --all-targets`: one round, checked, so the benchmark cannot rot unnoticed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elb_quorum::lease::dynamo::DynamoStore;
use elb_quorum::lease::{
    Acquired, BoxFuture, Kind, LeaseError, PermitStore, Permits, Record, Shared, SharedWrite, Write, Written,
};

/// Counts and times every call of the store it wraps.
struct Timed {
    inner: DynamoStore,
    calls: AtomicUsize,
    latencies: Mutex<Vec<f64>>,
}

impl Timed {
    async fn time<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let out = f.await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.latencies.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0);
        out
    }
}

impl PermitStore for Timed {
    fn table(&self) -> &str {
        self.inner.table()
    }
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, LeaseError>> {
        Box::pin(self.time(self.inner.load(key)))
    }
    fn write<'a>(&'a self, key: &'a str, write: Write) -> BoxFuture<'a, Result<Written, LeaseError>> {
        Box::pin(self.time(self.inner.write(key, write)))
    }
    fn load_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Shared>, LeaseError>> {
        Box::pin(self.time(self.inner.load_shared(key)))
    }
    fn write_shared<'a>(&'a self, key: &'a str, write: SharedWrite) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.time(self.inner.write_shared(key, write)))
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench { 20 } else { 1 };
    let (contenders, permits) = (20, 2);
    let moto = common::Moto::start_locked(None);
    moto.permit_table("elb-quorum-permits");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Arc::new(Timed {
        inner: DynamoStore::new(&rt.block_on(moto.sdk_config()), "elb-quorum-permits"),
        calls: AtomicUsize::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let mut acquire_ms = Vec::new();
    for round in 0..rounds {
        let key = format!("bench-{round}.example.com");
        let results: Vec<(bool, f64)> = rt.block_on(async {
            let tasks: Vec<_> = (0..contenders)
                .map(|i| {
                    let p = Permits {
                        store: store.clone(),
                        key: key.clone(),
                        me: format!("i-{i:02}"),
                        duration: Duration::from_secs(120),
                        grace: Duration::from_secs(30),
                        max_hold: Duration::from_secs(3600),
                        skew_ms: 0,
                        leave_rate: 0.0,
                        clock: Default::default(),
                        seen_shards: Default::default(),
                    };
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let granted =
                            matches!(p.acquire(Kind::Slot, permits, None).await.unwrap(), Acquired::Granted(_));
                        (granted, t.elapsed().as_secs_f64() * 1000.0)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert_eq!(results.iter().filter(|(g, _)| *g).count(), permits, "round {round}: exactly {permits} winners");
        acquire_ms.extend(results.iter().map(|(_, ms)| *ms));
    }
    let calls = store.calls.load(Ordering::SeqCst) as f64 / (rounds * contenders) as f64;
    let mut per_call = store.latencies.lock().unwrap().clone();
    println!(
        "lease acquire vs serialized moto: {contenders} contenders, {permits} permits, {rounds} round(s): \
         acquire p50 {:.0} ms, p95 {:.0} ms; {calls:.2} store calls per contender; one call p50 {:.1} ms, p95 {:.1} ms",
        percentile(&mut acquire_ms, 0.5),
        percentile(&mut acquire_ms, 0.95),
        percentile(&mut per_call, 0.5),
        percentile(&mut per_call, 0.95),
    );
}
