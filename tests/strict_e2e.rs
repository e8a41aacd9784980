//! Strict mode end to end: six real supervisords, each with the listener for its own instance in
//! `--strict` mode (every other one with `--batch-registrations`), against moto (serialized by
//! `tests/fixtures/moto_locked.py`, whose recorder logs every call in the order moto applied it),
//! all asked to restart at the same moment.
//!
//! The cluster: 6 members, quorum 0.75 → 5 must serve, 1 permit. An outside sampler polls the load
//! balancer every 50 ms: serving never drops below 5. The recorder shows, for every instance:
//! permit acquired < Deregister < Register < permit released.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use elb_quorum::config::SupervisorSettings;
use elb_quorum::lb::classic::ClassicElb;
use elb_quorum::lb::LoadBalancer;
use elb_quorum::secret::Secret;
use elb_quorum::supervisor::SupervisorClient;

const TABLE: &str = "elb-quorum-permits";
const T: Duration = Duration::from_secs(180);

fn strict_node(moto: &Moto, id: &str, hostname: &str, batch: bool) -> Supervisord {
    let batch = if batch { " --batch-registrations" } else { "" };
    let conf = format!(
        "[program:web]\ncommand=sleep 100000\nstartsecs=1\n\n\
         [eventlistener:elb-quorum]\ncommand={bin} listen --hostname {hostname} --domain example.com --instance-id {id} --strict --lease-table {TABLE} --program web --check-interval 0.5 --max-checks 200 --poll-interval 0.2 --state-dir {{here}}/state{batch}\n\
         events=REMOTE_COMMUNICATION\nbuffer_size=50\nstopwaitsecs=60\n\
         stderr_logfile={{here}}/listener.log\nenvironment=SUPERVISOR_USERNAME=\"{USER}\",SUPERVISOR_PASSWORD=\"{PASSWORD}\",ELB_QUORUM_LOG_TARGET=\"stderr\"\n",
        bin = bin().display(),
    );
    Supervisord::start(&conf, false, &moto.env())
}

#[test]
fn six_strict_listeners_asked_at_once_never_take_the_cluster_below_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_locked(Some(&record));
    moto.permit_table(TABLE);
    let (lb, ns) = unique_cluster();
    let v = moto.fixture(&["create", "--lb", &lb, "--namespace", &ns, "--count", "6"]);
    let members: Vec<String> = serde_json::from_value(v["members"].clone()).unwrap();
    let hostnames: BTreeMap<String, String> = serde_json::from_value(v["hostnames"].clone()).unwrap();
    // Every other member with --batch-registrations: a mixed cluster, both ways of leaving. With
    // one permit each batch holds only its holder, who makes the calls itself.
    let batched: Vec<bool> = (0..members.len()).map(|i| i % 2 == 1).collect();
    let nodes: Vec<Supervisord> =
        members.iter().zip(&batched).map(|(id, &b)| strict_node(&moto, id, &hostnames[id], b)).collect();
    for n in &nodes {
        eventually(T, "web RUNNING", || n.pid("web"));
        eventually(T, "listener RUNNING", || n.status("elb-quorum").contains("RUNNING").then_some(()));
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let elb = rt.block_on(async { ClassicElb::new(&moto.sdk_config().await, lb.clone()) });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (mut min, mut samples) = (usize::MAX, 0);
            while !stop.load(Ordering::SeqCst) {
                let serving = rt.block_on(elb.targets()).unwrap().iter().filter(|h| h.serving()).count();
                min = min.min(serving);
                samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (min, samples)
        })
    };

    // All six asked at the same moment.
    rt.block_on(async {
        let tasks: Vec<_> = nodes
            .iter()
            .map(|n| {
                let client = SupervisorClient::new(&SupervisorSettings {
                    url: n.url(),
                    username: Some(USER.into()),
                    password: Some(Secret::new(PASSWORD)),
                    rpc_timeout: Duration::from_secs(10),
                })
                .unwrap();
                tokio::spawn(async move { client.send_remote_comm_event("elb-quorum", "restart web").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    for n in &nodes {
        eventually(T, "every listener finished its cycle", || {
            (count(&n.read("listener.log"), "cycle done") == 1).then_some(())
        });
    }
    stop.store(true, Ordering::SeqCst);
    let (min_serving, samples) = sampler.join().unwrap();
    assert!(samples > 20, "the sampler ran ({samples} samples)");
    assert!(min_serving >= 5, "serving dropped to {min_serving} of 6; quorum needs 5");

    let calls: Vec<Call> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|c: &Call| c.status == 200)
        .collect();
    assert!(calls.windows(2).all(|w| w[0].t <= w[1].t), "the recorder logs in applied order");
    for (id, &batch) in members.iter().zip(&batched) {
        let mine: Vec<String> = calls
            .iter()
            .filter(|c| c.instance.as_deref() == Some(id.as_str()) && c.kind.as_deref() != Some("renew"))
            .map(|c| c.kind.clone().unwrap_or_else(|| c.action.clone()))
            .collect();
        let dereg = mine.iter().position(|k| k == "DeregisterInstancesFromLoadBalancer").expect("deregistered");
        let reg = mine.iter().position(|k| k == "RegisterInstancesWithLoadBalancer").expect("registered");
        let acquired = mine[..dereg].iter().rposition(|k| k == "acquire").expect("a permit before deregistering");
        assert!(!mine[acquired..dereg].contains(&"release".to_string()), "{id}: held until deregistering: {mine:?}");
        let released = mine[reg..].iter().position(|k| k == "release").map(|p| p + reg);
        assert!(released.is_some(), "{id}: released after registering: {mine:?}");
        assert_eq!(mine.iter().filter(|k| k.contains("Deregister")).count(), 1, "{id}: left once: {mine:?}");
        // Batched: asked out after the grant and before the call, asked back before registering.
        let asks: Vec<usize> = mine.iter().enumerate().filter(|(_, k)| *k == "batch-ask").map(|(i, _)| i).collect();
        if batch {
            assert!(
                asks.len() == 2 && acquired < asks[0] && asks[0] < dereg && dereg < asks[1] && asks[1] < reg,
                "{id}: {mine:?}"
            );
        } else {
            assert!(asks.is_empty(), "{id}: {mine:?}");
        }
    }
    // The record is empty again: every permit was released.
    let status = run_bin(
        &[
            "status",
            "--json",
            "--strict",
            "--lease-table",
            TABLE,
            "--hostname",
            &hostnames[&members[0]],
            "--domain",
            "example.com",
            "--instance-id",
            &members[0],
        ],
        &moto.env(),
    );
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!((s["strict"]["permits"].as_u64(), s["strict"]["free"].as_u64()), (Some(1), Some(1)), "{s}");
    // The pace (default 2/s: 20 per 10 s window, 30 at once after 15 s without one; the window
    // now is the last grant's, or the next, either kind) and the shared view the listeners read.
    let pace = &s["strict"]["pace"];
    assert_eq!(
        (pace["leave_rate"].as_f64(), pace["burst"].as_u64(), pace["window_s"].as_u64()),
        (Some(2.0), Some(30), Some(10)),
        "{s}"
    );
    assert!(matches!(pace["quota"].as_u64(), Some(20 | 30)), "{s}");
    assert!(s["strict"]["view"]["publications"].as_u64().is_some_and(|n| n >= 1), "{s}");
    assert!(s["strict"]["view"]["read_after_version"].as_u64().is_some_and(|v| v >= 6), "six grants came first: {s}");
    assert_eq!(s["strict"]["holders"], serde_json::json!([]), "every permit released: {s}");
    let b = &s["strict"]["batches"];
    assert_eq!(
        (b["want_out"].as_u64(), b["want_in"].as_u64(), b["enabled"].as_bool()),
        (Some(0), Some(0), Some(false)),
        "{s}"
    );
    assert_eq!(s["verdict"]["serving"].as_u64(), Some(6));
}

/// The binary's strict-mode edges, as an operator meets them: a missing table stops a one-shot
/// restart with exit 3 before any load-balancer call; `lease release` removes a stuck entry (and
/// says so when there is none); bad lease values are usage errors.
#[test]
fn missing_table_stuck_entries_and_bad_values_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_locked(Some(&record));
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let sup = Supervisord::start("[program:web]\ncommand=sleep 100000\nstartsecs=1\n", false, &moto.env());
    eventually(T, "web RUNNING", || sup.pid("web"));
    let before = sup.pid("web");
    let mut env = moto.env();
    env.extend(sup.client_env());
    let host = format!("node0.{ns}");
    let state = sup.path("state");

    std::fs::write(&record, "").unwrap();
    let out = one_shot("web", &host, &ids[0], &state, &["--strict", "--lease-table", "missing"], &env);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("permit table missing does not exist"), "{err}");
    let recorded = std::fs::read_to_string(&record).unwrap();
    let calls: Vec<Call> = recorded.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(calls.iter().any(|c| c.action == "GetItem"), "{recorded}");
    assert!(calls.iter().all(|c| !c.action.contains("Instance")), "no load-balancer call: {recorded}");
    assert_eq!(sup.pid("web"), before, "web untouched");

    // A stuck entry (a holder killed before it could release): removed by hand.
    moto.permit_table(TABLE);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let permits = rt.block_on(async {
        elb_quorum::lease::Permits {
            store: Arc::new(elb_quorum::lease::dynamo::DynamoStore::new(&moto.sdk_config().await, TABLE)),
            key: ns.clone(),
            me: ids[1].clone(),
            duration: Duration::from_secs(120),
            grace: Duration::from_secs(30),
            max_hold: Duration::from_secs(3600),
            skew_ms: 0,
            leave_rate: 0.0,
            clock: Default::default(),
            seen_shards: Default::default(),
        }
    });
    rt.block_on(async {
        let held = permits.acquire(elb_quorum::lease::Kind::Slot, 1, None).await.unwrap();
        std::mem::forget(held); // never released
    });
    let release = ["lease", "release", "--instance", &ids[1], "--hostname", &host, "--domain", "example.com"];
    let release: Vec<&str> = release.into_iter().chain(["--instance-id", &ids[0]]).collect();
    let out = run_bin(&release, &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("removed the slot entry of {}", ids[1])), "{}", text(&out.stdout));
    assert!(rt.block_on(permits.read()).unwrap().holders.is_empty());
    let out = run_bin(&release, &env);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("no permit entry"), "{}", text(&out.stdout));

    for (flags, needle) in [
        (&["--lease-duration", "60", "--lease-grace", "30"][..], "--lease-grace"),
        (&["--lease-duration", "2"][..], "--lease-duration"),
        (&["--max-hold", "10"][..], "--max-hold"),
    ] {
        let mut extra = vec!["--strict"];
        extra.extend(flags);
        let out = one_shot("web", &host, &ids[0], &state, &extra, &env);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{flags:?}: {}", text(&out.stderr));
    }
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"), "never left");
}
