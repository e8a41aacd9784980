//! `--metrics-file` against the moto emulator and a real supervisord: the file parses with
//! prometheus_client's own parser (installed in the test venv), and its values after a refused and
//! then a completed one-shot restart are what happened; counters add up across the two processes.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Sample → value, as prometheus_client parsed the file, and family → type under `_types`.
fn parse(path: &std::path::Path) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
    let out = Command::new(python()).arg(fixture("parse_metrics.py")).arg(path).output().expect("parse_metrics.py");
    assert!(out.status.success(), "the file does not parse: {}", text(&out.stderr));
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let types = serde_json::from_value(v["_types"].take()).unwrap();
    let samples = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "_types")
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    (samples, types)
}

#[test]
fn metrics_after_a_refused_and_a_completed_cycle() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let sup = Supervisord::start("[program:web]\ncommand=sleep 100000\nstartsecs=1\n", false, &[]);
    eventually(Duration::from_secs(20), "web RUNNING", || sup.pid("web"));
    let mut env = moto.env();
    env.extend(sup.client_env());
    let metrics = sup.path("metrics/elb-quorum.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let m = metrics.to_str().unwrap();
    let host = format!("node0.{ns}");
    let flags = [
        "--metrics-file",
        m,
        "--check-interval",
        "0.1",
        "--max-checks",
        "2",
        "--poll-interval",
        "0.2",
        "--settle",
        "0",
    ];

    moto.fixture(&["stop", &ids[3]]);
    let out = one_shot("web", &host, &ids[0], &sup.path("state"), &flags, &env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let (s, types) = parse(&metrics);
    assert_eq!(s.get("elb_quorum_cycles_total{outcome=gave-up}"), Some(&1.0), "{s:?}");
    assert_eq!(s.get("elb_quorum_checks_total"), Some(&2.0), "{s:?}");
    assert_eq!(s.get("elb_quorum_refusals_total{reason=below-quorum}"), Some(&2.0), "{s:?}");
    assert_eq!(s.get("elb_quorum_in_service"), Some(&1.0), "{s:?}");
    assert_eq!(s.get("elb_quorum_aws_throttled_total"), Some(&0.0), "{s:?}");
    assert_eq!(types.get("elb_quorum_cycles").map(String::as_str), Some("counter"), "{types:?}");
    assert_eq!(types.get("elb_quorum_in_service").map(String::as_str), Some("gauge"), "{types:?}");

    moto.fixture(&["start", &ids[3]]);
    let out = one_shot("web", &host, &ids[0], &sup.path("state"), &flags, &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (s, _) = parse(&metrics);
    assert_eq!(s.get("elb_quorum_cycles_total{outcome=gave-up}"), Some(&1.0), "kept from the first run: {s:?}");
    assert_eq!(s.get("elb_quorum_cycles_total{outcome=done}"), Some(&1.0), "{s:?}");
    assert_eq!(s.get("elb_quorum_checks_total"), Some(&3.0), "{s:?}");
    assert_eq!(s.get("elb_quorum_last_cycle_checks"), Some(&1.0), "{s:?}");
    assert!(s["elb_quorum_last_cycle_phase_seconds{phase=restart}"] >= 1.0, "startsecs=1: {s:?}");
    let ended = s["elb_quorum_last_cycle_end_timestamp_seconds"];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - ended).abs() < 120.0, "{ended} vs {now}");
    assert_eq!(s.get("elb_quorum_permit_held"), Some(&0.0));

    // A metrics file in a directory that does not exist: a configuration error at start.
    let out = one_shot("web", &host, &ids[0], &sup.path("state"), &["--metrics-file", "/nonexistent/dir/m.prom"], &env);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--metrics-file /nonexistent/dir/m.prom: cannot write in"),
        "{}",
        text(&out.stderr)
    );
}
