//! The AWS side against the moto emulator (server mode on 127.0.0.1): ClassicElb through the SDK,
//! the EC2 name membership through elb-quorum's own EC2 client (`lb::ec2`), and `status` / one-shot `restart` as a user runs them.

mod common;

use std::time::Duration;

use common::*;
use elb_quorum::lb::classic::ClassicElb;
use elb_quorum::lb::members::{Ec2NameMembers, Membership};
use elb_quorum::lb::{LbError, LoadBalancer, Target, TargetState};
use elb_quorum::quorum::Members;

#[tokio::test(flavor = "current_thread")]
async fn classic_elb_through_the_sdk_and_ec2_members_through_describe_instances() {
    let moto = Moto::start();
    let (lb_name, ns) = unique_cluster();
    let v = moto.fixture(&[
        "create",
        "--lb",
        &lb_name,
        "--namespace",
        &ns,
        "--count",
        "4",
        "--others",
        "2",
        "--unregistered",
        "1",
    ]);
    let members: Vec<String> = serde_json::from_value(v["members"].clone()).unwrap();
    let spare: Vec<String> = serde_json::from_value(v["unregistered"].clone()).unwrap();
    let cfg = moto.sdk_config().await;

    let m = Ec2NameMembers::new(&cfg, ns.clone()).members().await.unwrap();
    let mut want: std::collections::BTreeSet<String> = members.iter().cloned().collect();
    want.extend(spare.iter().cloned());
    assert_eq!(m.members, Members::Ids(want.clone()), "members in the namespace, strangers of a deeper name left out");
    assert!(want.iter().all(|id| m.zones.get(id).map(String::as_str) == Some("us-east-1a")), "zones from EC2: {m:?}");
    moto.fixture(&["terminate", &spare[0]]);
    let m = Ec2NameMembers::new(&cfg, ns.clone()).members().await.unwrap();
    want.remove(&spare[0]);
    assert_eq!(m.members, Members::Ids(want), "terminated instances are not members");
    moto.fixture(&["stop", &members[3]]);
    let Members::Ids(ids) = Ec2NameMembers::new(&cfg, ns.clone()).members().await.unwrap().members else { panic!() };
    assert!(ids.contains(&members[3]), "a stopped instance is still a member (counted as not serving)");

    let lb = ClassicElb::new(&cfg, &lb_name);
    let reg = lb.targets().await.unwrap();
    assert_eq!(reg.len(), 4);
    assert_eq!(reg.iter().filter(|h| h.serving()).count(), 3, "the stopped member is OutOfService");
    let stopped = reg.iter().find(|h| h.target.instance_id == members[3]).unwrap();
    assert_eq!((stopped.state, stopped.target.port), (TargetState::Unhealthy, None));
    assert!(stopped.raw.starts_with("OutOfService"), "{}", stopped.raw);

    let t = lb.timings().await.unwrap();
    assert_eq!(t.drain, None, "moto's default: draining disabled");
    moto.fixture(&["draining", &lb_name, "45"]);
    assert_eq!(lb.timings().await.unwrap().drain, Some(Duration::from_secs(45)));

    let first = [Target::instance(&members[0])];
    lb.deregister(&first).await.unwrap();
    assert!(
        lb.targets().await.unwrap().iter().all(|h| h.target.instance_id != members[0]),
        "deregistered vanishes from the list"
    );
    lb.register(&first).await.unwrap();
    assert!(lb.targets().await.unwrap().iter().any(|h| h.target == first[0] && h.serving()));

    let e = ClassicElb::new(&cfg, "no-such-lb").targets().await.unwrap_err();
    assert!(matches!(e, LbError::NotFound { ref lb, .. } if lb == "load balancer no-such-lb"), "{e:?}");
    assert!(e.is_configuration() && e.to_string().contains("no-such-lb"), "{e}");
}

fn identity_args<'a>(ns: &'a str, id: &'a str, host: &'a str) -> Vec<&'a str> {
    let _ = ns;
    vec!["--hostname", host, "--domain", "example.com", "--instance-id", id]
}

#[test]
fn status_numbers_naming_rule_and_refusal() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let host = format!("node0.{ns}");
    let mut args = vec!["status", "--json"];
    args.extend(identity_args(&ns, &ids[0], &host));
    let out = run_bin(&args, &moto.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["attachments"][0]["name"], lb.as_str(), "the hostname rule names the load balancer");
    assert_eq!(v["attachments"][0]["kind"], "classic");
    assert_eq!(v["attachments"][0]["verdict"]["required"], 3);
    assert_eq!(v["verdict"]["members"], 4);
    assert_eq!(v["verdict"]["serving"], 4);
    assert_eq!(v["verdict"]["serving_after"], 3);
    assert_eq!(v["verdict"]["required"], 3);
    assert_eq!(v["verdict"]["may_leave"], true);

    moto.fixture(&["stop", &ids[2]]);
    let out = run_bin(&args, &moto.env());
    assert_eq!(out.status.code(), Some(1), "a stopped peer: may not leave");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["verdict"]["serving_after"].as_u64(), v["verdict"]["reason"].as_str()),
        (Some(2), Some("below-quorum"))
    );

    let mut table = vec!["status"];
    table.extend(identity_args(&ns, &ids[0], &host));
    let out = run_bin(&table, &moto.env());
    let t = text(&out.stdout);
    assert!(
        t.contains("may leave now     no (BelowQuorum)") && t.contains(&format!("load balancer     {lb}\n")),
        "{t}"
    );

    let out = run_bin(
        &["status", "--hostname", &format!("node0.{ns}"), "--domain", "example.org", "--instance-id", &ids[0]],
        &moto.env(),
    );
    assert_eq!(out.status.code(), Some(2), "hostname outside the supported domains is a configuration error");
    assert!(text(&out.stderr).contains("outside every supported domain"), "{}", text(&out.stderr));

    let out = run_bin(
        &["status", "--hostname", "node0.missing.example.com", "--domain", "example.com", "--instance-id", &ids[0]],
        &moto.env(),
    );
    assert_eq!(out.status.code(), Some(2), "an unknown load balancer is a configuration error");
    assert!(text(&out.stderr).contains("load balancer missing-example-com not found"), "{}", text(&out.stderr));
}

const WEB: &str = "[program:web]\ncommand=sleep 100000\nstartsecs=1\n";

/// One-shot `restart`: gate → deregister → restart → register → InService, seen from outside by
/// the emulator's own log of the calls it applied (a sampler polling health could miss the second
/// the instance is out on a loaded machine).
#[test]
fn one_shot_restart_runs_the_whole_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_locked(Some(&record));
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let sup = Supervisord::start(WEB, false, &[]);
    let before = eventually(Duration::from_secs(20), "web RUNNING", || sup.pid("web"));
    let state = sup.path("state");
    let host = format!("node0.{ns}");
    let mut env = moto.env();
    env.extend(sup.client_env());
    let setup = recorded(&record).len(); // the cluster's own registration
    let out = one_shot("web", &host, &ids[0], &state, &["--poll-interval", "0.2"], &env);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let calls = recorded(&record).split_off(setup);
    let changes: Vec<(&str, Option<&str>, u16)> =
        mutating(&calls).iter().map(|c| (c.action.as_str(), c.instance.as_deref(), c.status)).collect();
    assert_eq!(
        changes,
        vec![
            ("DeregisterInstancesFromLoadBalancer", Some(ids[0].as_str()), 200),
            ("RegisterInstancesWithLoadBalancer", Some(ids[0].as_str()), 200)
        ],
        "the instance left the load balancer once and came back"
    );
    let after = sup.pid("web").expect("web RUNNING again");
    assert_ne!(after, before, "web restarted");
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"));
    let check = format!("quorum check: load balancer {lb}: 4 members, 4 serving, 3 after leaving, 3 required");
    for step in [check.as_str(), "deregistering", "programs restarted and RUNNING", "registered", "cycle done"] {
        assert!(log.contains(step), "missing {step:?} in:\n{log}");
    }
    assert!(!state.join("state.json").exists(), "state file cleared");

    // Dry run: every check, nothing changed.
    let out = one_shot("web", &host, &ids[0], &state, &["--dry-run"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("dry run: would deregister"));
    assert_eq!(sup.pid("web"), Some(after), "dry run restarted nothing");
}

#[test]
fn one_shot_restart_refuses_below_quorum_and_changes_nothing() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    moto.fixture(&["stop", &ids[3]]);
    let sup = Supervisord::start(WEB, false, &[]);
    let before = eventually(Duration::from_secs(20), "web RUNNING", || sup.pid("web"));
    let mut env = moto.env();
    env.extend(sup.client_env());
    let state = sup.path("state");
    let host = format!("node0.{ns}");
    let out = one_shot("web", &host, &ids[0], &state, &["--check-interval", "0.1", "--max-checks", "3"], &env);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "quorum not reached after 3 checks (load balancer {lb}: 4 members, 3 serving, 2 after leaving, 3 required"
        )),
        "{err}"
    );
    assert_eq!(sup.pid("web"), Some(before), "web untouched");
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"), "still registered");

    // An unknown program is refused before anything else (exit 2).
    let out = one_shot("nope", &host, &ids[0], &state, &[], &env);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown program \"nope\""));
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"));
}

/// An instance left out because its programs did not come back (state file `services-down`): the
/// next one-shot restart brings it back, without waiting for quorum (it serves nothing).
#[test]
fn one_shot_restart_brings_back_an_instance_left_out_with_its_programs_down() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    moto.fixture(&["stop", &ids[3]]); // below quorum for a serving instance: no exemption would be wrong
    let sup = Supervisord::start(WEB, false, &[]);
    eventually(Duration::from_secs(20), "web RUNNING", || sup.pid("web"));
    assert!(sup.ctl(&["stop", "web"]).status.success());
    moto.fixture(&["deregister", &lb, &ids[0]]);
    let state = sup.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let record = serde_json::json!({"step": "services-down", "instance_id": ids[0], "lb": lb, "programs": ["web"], "since": 1, "pid": 1});
    std::fs::write(state.join("state.json"), record.to_string()).unwrap();
    let mut env = moto.env();
    env.extend(sup.client_env());
    let host = format!("node0.{ns}");
    let out = one_shot("web", &host, &ids[0], &state, &["--max-checks", "1", "--poll-interval", "0.2"], &env);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("LEFT DEREGISTERED") && log.contains("restarting them now"), "{log}");
    assert!(sup.pid("web").is_some(), "web RUNNING again");
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"));
    assert!(!state.join("state.json").exists());
}

/// No credentials anywhere: `status` says so, naming the load balancer and what to do, exit 3
/// (the error is not retryable, so the gate does not spend its checks on it); `restart` checks
/// supervisord before any AWS call. Nothing leaves the machine: the endpoint is the emulator and
/// IMDS is disabled.
#[test]
fn missing_credentials_say_so_at_once() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .args([
                "--lb",
                "web-example-com",
                "--instance-id",
                "i-1",
                "--hostname",
                "a.web.example.com",
                "--members",
                "static:3",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("ELB_QUORUM_LOG_TARGET", "stderr")
            .env("ELB_QUORUM_STATE_DIR", state.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["restart", "web", "--supervisor-url", "unix:///nonexistent.sock"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("supervisord's socket /nonexistent.sock does not exist"),
        "supervisord is checked first: {err}"
    );
    let out = run(&["status"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("on load balancer web-example-com: no usable AWS credentials") && err.contains("IAM role"),
        "{err}"
    );
}

/// A credential provider that fails (here a profile's `credential_process` exiting 1): at the
/// default level, one line of the product's own names the cause, and the SDK's own warnings (the
/// provider's error again, with a debug dump of it) are left out; `--log-level debug` shows them.
#[test]
fn a_failing_credential_provider_is_one_line_at_the_default_level() {
    let moto = Moto::start();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(home.path().join(".aws/config"), "[default]\ncredential_process = /bin/false\nregion = us-east-1\n")
        .unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(bin())
            .args(["status", "--lb", "web-example-com", "--instance-id", "i-1", "--hostname", "a.web.example.com"])
            .args(["--members", "static:3"])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env("ELB_QUORUM_LOG_TARGET", "stderr")
            .env("ELB_QUORUM_STATE_DIR", home.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let mentions: Vec<&str> = err.lines().filter(|l| l.contains("credential")).collect();
    assert_eq!(mentions.len(), 1, "one line about credentials: {err}");
    assert!(
        mentions[0].starts_with("elb-quorum: ")
            && mentions[0].contains("no usable AWS credentials")
            && mentions[0].contains("external process exited"),
        "the product's own line, with the cause: {err}"
    );
    assert_eq!(mentions[0].matches("an error occurred while loading credentials").count(), 1, "each cause once: {err}");
    let out = run(&["--log-level", "debug"]);
    let err = text(&out.stderr);
    assert!(err.contains("provider failed to provide credentials"), "the SDK's warning at debug: {err}");
}
