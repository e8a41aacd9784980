//! ELBv2 target groups against the moto emulator (server mode on 127.0.0.1), alone and mixed with a
//! Classic load balancer: the backend through the real SDK, `status` per attachment, one-shot
//! `restart` over two target groups and a Classic load balancer with every mutating call recorded
//! (`tests/fixtures/moto_locked.py`), the listener under a real supervisord, and the refusals
//! (unknown group, instance not in a named group, a peer out of one group only).
//!
//! moto keeps one port per instance and reports `healthy` at once: draining, `initial`, several
//! ports and `Target.NotInUse` are in `tests/cycle_fake.rs`.

mod common;

use std::time::Duration;

use common::*;
use elb_quorum::lb::target_group::TargetGroup;
use elb_quorum::lb::{LbError, LoadBalancer, Target, TargetState};

const T: Duration = Duration::from_secs(60);
const WEB: &str = "[program:web]\ncommand=sleep 100000\nstartsecs=1\n";

/// A four-instance cluster named by the hostname rule (Classic load balancer `lb`, members tagged
/// `nodeI.ns`) behind an ALB with target groups `groups` (unique per test).
fn cluster(moto: &Moto, groups: &[&str]) -> (String, String, Vec<String>, Vec<String>, Vec<String>) {
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let suffix = lb.trim_end_matches("-example-com").to_owned();
    let names: Vec<String> = groups.iter().map(|g| format!("{g}-{suffix}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let arns = moto.alb(&format!("alb-{suffix}"), &refs, &ids);
    let arns = names.iter().map(|n| arns[n].clone()).collect();
    (lb, ns, ids, names, arns)
}

/// Flags for the Classic load balancer and both target groups, polling fast, no settle pause.
fn every_attachment<'a>(lb: &'a str, groups: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["--lb", lb, "--poll-interval", "0.2", "--settle", "0"];
    for g in groups {
        args.extend(["--target-group", g.as_str()]);
    }
    args
}

fn identity<'a>(host: &'a str, id: &'a str) -> Vec<&'a str> {
    vec!["--hostname", host, "--domain", "example.com", "--instance-id", id]
}

#[tokio::test(flavor = "current_thread")]
async fn target_group_backend_through_the_sdk() {
    let moto = Moto::start();
    let (_lb, _ns, ids, names, arns) = cluster(&moto, &["http"]);
    let cfg = moto.sdk_config().await;

    let tg = TargetGroup::new(&cfg, &names[0]);
    tg.resolve().await.unwrap();
    assert_eq!(tg.id(), arns[0], "the name resolves to the group's ARN");
    let listed = tg.targets().await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|h| h.serving() && h.target.port == Some(80) && h.raw == "healthy"), "{listed:?}");
    assert_eq!(tg.own_targets(&ids[0], &listed), vec![Target::on_port(&ids[0], 80)]);

    // The deregistration delay and the health bound come from the group.
    let t = tg.timings().await.unwrap();
    assert_eq!(t.drain, Some(Duration::from_secs(300)), "AWS's default delay");
    assert_eq!(t.healthy_after, Duration::from_secs(5 * 2 + 2), "interval × threshold + timeout");
    moto.fixture(&["tg-delay", &arns[0], "30"]);
    assert_eq!(tg.timings().await.unwrap().drain, Some(Duration::from_secs(30)));

    // A peer stopped: `unused` (Target.InvalidState), out of service.
    moto.fixture(&["stop", &ids[3]]);
    let stopped = tg.targets().await.unwrap().into_iter().find(|h| h.target.instance_id == ids[3]).unwrap();
    assert_eq!(stopped.state, TargetState::Unhealthy, "{stopped:?}");
    assert!(stopped.raw.starts_with("unused"), "{}", stopped.raw);

    // Out and back, by ARN this time.
    let by_arn = TargetGroup::new(&cfg, &arns[0]);
    let mine = [Target::on_port(&ids[0], 80)];
    by_arn.deregister(&mine).await.unwrap();
    let gone = by_arn.targets().await.unwrap().into_iter().find(|h| h.target.instance_id == ids[0]);
    assert!(gone.as_ref().is_none_or(|h| h.state.is_out()), "out after deregistering: {gone:?}");
    assert!(by_arn.own_targets(&ids[0], &by_arn.targets().await.unwrap()).is_empty());
    by_arn.register(&mine).await.unwrap();
    assert!(by_arn.targets().await.unwrap().iter().any(|h| h.target.instance_id == ids[0] && h.serving()));

    // Unknown group by name, by ARN, and a malformed ARN: configuration errors naming the group.
    for bad in [
        "no-such-group".to_string(),
        arns[0].replace(names[0].as_str(), "gone"),
        "arn:aws:elasticloadbalancing:garbage".to_string(),
    ] {
        let e = TargetGroup::new(&cfg, &bad).resolve().await.unwrap_err();
        assert!(matches!(e, LbError::NotFound { .. }) && e.is_configuration(), "{bad}: {e:?}");
        assert!(e.to_string().contains(&format!("target group {bad}")), "{e}");
    }
}

/// `status` with two target groups and the Classic load balancer: a row each, the overall verdict,
/// and a refusal that names the one group where a peer is out.
#[test]
fn status_has_a_row_per_attachment_and_names_the_group_that_blocks() {
    let moto = Moto::start();
    let (lb, ns, ids, names, arns) = cluster(&moto, &["http", "grpc"]);
    let host = format!("node0.{ns}");
    let mut args = vec!["status", "--json", "--lb", &lb, "--target-group", &names[0], "--target-group", &arns[1]];
    args.extend(identity(&host, &ids[0]));
    let out = run_bin(&args, &moto.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["attachments"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[0]["kind"].as_str(), rows[0]["name"].as_str()), (Some("classic"), Some(lb.as_str())));
    assert_eq!((rows[1]["kind"].as_str(), rows[1]["id"].as_str()), (Some("target-group"), Some(arns[0].as_str())));
    assert_eq!(rows[2]["name"], arns[1].as_str(), "named by ARN");
    for r in rows {
        assert_eq!((r["verdict"]["serving"].as_u64(), r["verdict"]["required"].as_u64()), (Some(4), Some(3)), "{r}");
    }
    assert_eq!(rows[1]["self_targets"][0]["target"]["port"], 80);
    assert_eq!(rows[1]["self_targets"][0]["state"], "serving");
    assert_eq!(v["may_leave"], true);

    // A peer out of the grpc group only: that group blocks, and is named.
    moto.fixture(&["tg-deregister", &arns[1], &ids[2]]);
    let out = run_bin(&args, &moto.env());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"]["attachment"], format!("target group {}", arns[1]));
    assert_eq!(v["verdict"]["reason"], "below-quorum");
    assert_eq!(v["attachments"][1]["verdict"]["may_leave"], true, "the http group alone would allow it");

    args.remove(1);
    let out = run_bin(&args, &moto.env());
    let t = text(&out.stdout);
    assert!(t.contains(&format!("target group      {}", names[0])), "{t}");
    assert!(t.contains(&format!("this instance   {}:80 healthy", ids[0])), "{t}");
    assert!(t.contains("may leave now     no (BelowQuorum, target group arn:"), "{t}");

    // A stopped peer (`unused`, Target.InvalidState in the groups; OutOfService in the Classic
    // one) with the grpc group whole again: the first attachment already refuses.
    moto.fixture(&["tg-register", &arns[1], &ids[2]]);
    moto.fixture(&["stop", &ids[3]]);
    let out = run_bin(&args, &moto.env());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("may leave now     no (BelowQuorum, load balancer {lb})")));
}

/// One-shot `restart` over two target groups and a Classic load balancer: every pair is taken out
/// before the programs restart and put back after, in the recorder's applied order; the instance
/// ends healthy in every group and InService in the Classic one.
#[test]
fn one_shot_restart_leaves_and_rejoins_every_attachment() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_locked(Some(&record));
    let (lb, ns, ids, names, arns) = cluster(&moto, &["http", "grpc"]);
    let sup = Supervisord::start(WEB, false, &[]);
    let before = eventually(T, "web RUNNING", || sup.pid("web"));
    let mut env = moto.env();
    env.extend(sup.client_env());
    let host = format!("node0.{ns}");
    std::fs::write(&record, "").unwrap();
    let out = one_shot("web", &host, &ids[0], &sup.path("state"), &every_attachment(&lb, &names), &env);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_ne!(sup.pid("web"), Some(before), "web restarted");
    let calls = recorded(&record);
    let changes: Vec<(String, String)> = mutating(&calls)
        .iter()
        .map(|c| (c.action.clone(), c.group.clone().or(c.lb.clone()).unwrap_or_default()))
        .collect();
    assert_eq!(
        changes,
        vec![
            ("DeregisterInstancesFromLoadBalancer".into(), lb.clone()),
            ("DeregisterTargets".into(), arns[0].clone()),
            ("DeregisterTargets".into(), arns[1].clone()),
            ("RegisterInstancesWithLoadBalancer".into(), lb.clone()),
            ("RegisterTargets".into(), arns[0].clone()),
            ("RegisterTargets".into(), arns[1].clone()),
        ],
        "{log}"
    );
    assert!(mutating(&calls).iter().all(|c| c.instance.as_deref() == Some(ids[0].as_str()) && c.status == 200));
    for arn in &arns {
        assert_eq!(moto.tg_health(arn).get(&ids[0]).map(String::as_str), Some("healthy"));
    }
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"));
    assert!(log.contains("waiting for the deregistration delay"), "{log}");
    assert!(!sup.path("state/state.json").exists(), "state file cleared");
}

/// Refusals before any mutating call: an unknown group (exit 2), this instance not registered in
/// a named group (exit 2, naming it), a peer out of one group (exit 1, naming it).
#[test]
fn refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_locked(Some(&record));
    let (_lb, ns, ids, names, arns) = cluster(&moto, &["http", "grpc"]);
    let sup = Supervisord::start(WEB, false, &[]);
    let before = eventually(T, "web RUNNING", || sup.pid("web"));
    let mut env = moto.env();
    env.extend(sup.client_env());
    let host = format!("node0.{ns}");
    let state = sup.path("state");
    let fast = ["--check-interval", "0.1", "--max-checks", "2", "--settle", "0"];
    // Runs a restart and checks that it made no mutating call.
    let run = |groups: &[&str]| {
        let mut extra: Vec<&str> = groups.iter().flat_map(|g| ["--target-group", *g]).collect();
        extra.extend(fast);
        std::fs::write(&record, "").unwrap();
        let out = one_shot("web", &host, &ids[0], &state, &extra, &env);
        let calls = recorded(&record);
        assert!(!calls.is_empty(), "the recorder works");
        assert!(mutating(&calls).is_empty(), "no mutating call: {calls:?}");
        out
    };

    let out = run(&[&names[0], "no-such-group"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("target group no-such-group not found"), "{err}");

    moto.fixture(&["tg-deregister", &arns[1], &ids[0]]);
    let out = run(&[&names[0], &names[1]]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("is not registered in target group {}", names[1])), "{err}");
    moto.fixture(&["tg-register", &arns[1], &ids[0]]);

    moto.fixture(&["tg-deregister", &arns[1], &ids[3]]);
    let out = run(&[&names[0], &names[1]]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("quorum not reached after 2 checks (target group {}", names[1])), "{err}");

    assert_eq!(sup.pid("web"), Some(before), "web untouched");
}

/// The listener under a real supervisord, attached to a target group only, restarts on request
/// and ends healthy in the group.
#[test]
fn the_listener_cycles_with_a_target_group() {
    let moto = Moto::start();
    let (_lb, ns, ids, names, arns) = cluster(&moto, &["web"]);
    let args =
        format!("--hostname node0.{ns} --domain example.com --instance-id {} --target-group {}", ids[0], names[0]);
    let (_sup, _, log) = listener_restarts_web(&moto, &args);
    assert!(log.contains(&format!("target group {}", names[0])), "{log}");
    assert_eq!(moto.tg_health(&arns[0]).get(&ids[0]).map(String::as_str), Some("healthy"));
}

/// A one-shot restart killed (-9) after leaving group 1 and before group 2 left this state file;
/// the next `restart` finishes that cycle first and registers every recorded pair (group 1 by
/// its ARN, group 2 and the Classic load balancer although they were never left), then runs its
/// own cycle.
#[test]
fn a_cycle_killed_between_two_groups_is_finished_by_the_next_start() {
    let moto = Moto::start();
    let (lb, ns, ids, names, arns) = cluster(&moto, &["http", "grpc"]);
    let sup = Supervisord::start(WEB, false, &[]);
    eventually(T, "web RUNNING", || sup.pid("web"));
    let mut env = moto.env();
    env.extend(sup.client_env());
    let state = sup.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let taken = |kind: &str, id: &str, name: &str, port: Option<u16>| {
        serde_json::json!({"kind": kind, "id": id, "name": name, "targets": [match port {
            Some(p) => serde_json::json!({"instance_id": ids[0], "port": p}),
            None => serde_json::json!({"instance_id": ids[0]}),
        }]})
    };
    let record = serde_json::json!({
        "step": "deregistering",
        "instance_id": ids[0],
        "attachments": [taken("classic", &lb, &lb, None), taken("target-group", &arns[0], &names[0], Some(80)), taken("target-group", &arns[1], &names[1], Some(80))],
        "programs": ["web"],
        "since": 1,
        "pid": 1,
    });
    std::fs::write(state.join("state.json"), record.to_string()).unwrap();
    moto.fixture(&["deregister", &lb, &ids[0]]);
    moto.fixture(&["tg-deregister", &arns[0], &ids[0]]);
    let host = format!("node0.{ns}");
    let out = one_shot("web", &host, &ids[0], &state, &every_attachment(&lb, &names), &env);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("a previous run stopped mid-cycle") && log.contains("reconciled"), "{log}");
    for arn in &arns {
        assert_eq!(moto.tg_health(arn).get(&ids[0]).map(String::as_str), Some("healthy"), "{log}");
    }
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"));
    assert!(!state.join("state.json").exists());
}
