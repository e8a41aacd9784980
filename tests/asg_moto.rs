//! Auto Scaling groups against the moto emulator (server mode on 127.0.0.1): membership and
//! attachments found from the group (`--members asg`), Standby as the way out
//! (`--leave-via standby`, every call recorded by `tests/fixtures/moto_locked.py`), the minimum-size
//! refusal, and the listener under a real supervisord. moto puts instances in Standby and back at
//! once and never shows `EnteringStandby`, and keeps a Standby instance in target groups: what it
//! cannot show is in `tests/asg_fake.rs`.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const WEB: &str = "[program:web]\ncommand=sleep 100000\nstartsecs=1\n";

/// A unique group name and its Classic load balancer's name.
fn names() -> (String, String) {
    let n = unique();
    (format!("g{n}"), format!("g{n}-lb"))
}

#[test]
fn status_counts_the_group_and_finds_its_load_balancer() {
    let moto = Moto::start();
    let (group, lb) = names();
    let ids = moto.asg(&group, 4, &lb, 0);
    let run = |members: &str, id: &str| {
        run_bin(&["status", "--json", "--members", members, "--instance-id", id, "--hostname", "host"], &moto.env())
    };
    let out = run("asg", &ids[0]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["members_source"], format!("asg:{group}"));
    assert_eq!(v["attachments_source"], format!("Auto Scaling group {group}"));
    assert_eq!(
        (v["attachments"][0]["kind"].as_str(), v["attachments"][0]["name"].as_str()),
        (Some("classic"), Some(lb.as_str()))
    );
    assert_eq!((v["verdict"]["members"].as_u64(), v["verdict"]["required"].as_u64()), (Some(4), Some(3)));
    assert!(text(&out.stderr).contains("can get this instance terminated and replaced"), "ELB health checks: warned");
    assert_eq!(v["lifecycle"], "InService");
    assert_eq!((v["zone"]["name"].as_str(), v["zone"]["members"].as_u64()), (Some("us-east-1a"), Some(4)));

    // asg:NAME names the same group.
    let out = run(&format!("asg:{group}"), &ids[1]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // A peer stopped: OutOfService in the load balancer, still a member: refused.
    moto.fixture(&["stop", &ids[3]]);
    let out = run("asg", &ids[0]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["verdict"]["members"].as_u64(), v["verdict"]["reason"].as_str()), (Some(4), Some("below-quorum")));

    // In Standby (an operator put it there): it serves nothing, may restart at once, in place.
    moto.fixture(&["asg-standby", &group, &ids[1]]);
    let out = run_bin(&["status", "--members", "asg", "--instance-id", &ids[1], "--hostname", "host"], &moto.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(t.contains("lifecycle         Standby") && t.contains("may leave now     yes (in Standby"), "{t}");

    // Configuration errors: exit 2, clear words.
    let out = run("asg:no-such-group", &ids[0]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no-such-group"), "{}", text(&out.stderr));
    let out = run("asg", "i-00000000000000000");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not in any Auto Scaling group"), "{}", text(&out.stderr));
}

/// The serialized emulator recording every call (the record emptied after the set-up), a group of
/// 4 with its Classic load balancer and MinSize `min`, and a supervisord running `web`.
struct Recorded {
    _dir: tempfile::TempDir,
    record: std::path::PathBuf,
    moto: Moto,
    group: String,
    lb: String,
    ids: Vec<String>,
    sup: Supervisord,
    before: u32,
    env: Vec<(String, String)>,
}

fn recorded_group(min: usize) -> Recorded {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_locked(Some(&record));
    let (group, lb) = names();
    let ids = moto.asg(&group, 4, &lb, min);
    let sup = Supervisord::start(WEB, false, &[]);
    let before = eventually(T, "web RUNNING", || sup.pid("web"));
    let mut env = moto.env();
    env.extend(sup.client_env());
    std::fs::write(&record, "").unwrap();
    Recorded { _dir: dir, record, moto, group, lb, ids, sup, before, env }
}

/// `--leave-via standby` with the Classic load balancer: EnterStandby before the restart and
/// ExitStandby after, in the recorder's applied order, and no deregistration by the tool itself;
/// the instance ends InService in the group and in the load balancer, the desired capacity as it was.
#[test]
fn a_restart_through_standby() {
    let r = recorded_group(0);
    let (record, moto, group, lb, ids, sup, before, env) =
        (&r.record, &r.moto, &r.group, &r.lb, &r.ids, &r.sup, r.before, &r.env);
    let out = run_bin(
        &[
            "restart",
            "web",
            "--members",
            "asg",
            "--leave-via",
            "standby",
            "--instance-id",
            &ids[0],
            "--hostname",
            "host",
            "--state-dir",
            sup.path("state").to_str().unwrap(),
            "--poll-interval",
            "0.2",
            "--settle",
            "0",
        ],
        env,
    );
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_ne!(sup.pid("web"), Some(before), "web restarted");
    let calls = recorded(record);
    let actions: Vec<&str> = calls.iter().map(|c| c.action.as_str()).collect();
    let enter = actions.iter().position(|a| *a == "EnterStandby").expect("EnterStandby");
    let exit = actions.iter().position(|a| *a == "ExitStandby").expect("ExitStandby");
    assert!(enter < exit, "{actions:?}");
    assert!(mutating(&calls).is_empty(), "the group takes the instance out, not the tool: {actions:?}");
    let (entering, restarted, left) = (
        log.find("entering Standby").unwrap(),
        log.find("programs restarted").unwrap(),
        log.find("left Standby").unwrap(),
    );
    assert!(entering < restarted && restarted < left, "{log}");
    let (lifecycle, desired) = moto.asg_state(group);
    assert_eq!((lifecycle[&ids[0]].as_str(), desired), ("InService", 4));
    assert_eq!(moto.health(lb).get(&ids[0]).map(String::as_str), Some("InService"));
    assert!(!sup.path("state/state.json").exists());
}

/// A group at its minimum size cannot take an instance into Standby: refused before any change.
#[test]
fn standby_below_the_minimum_size_is_refused() {
    let r = recorded_group(4);
    let (record, ids, sup, before, env) = (&r.record, &r.ids, &r.sup, r.before, &r.env);
    let out = run_bin(
        &["restart", "web", "--members", "asg", "--leave-via", "standby", "--instance-id", &ids[0], "--hostname", "h"],
        env,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("MinSize 4"), "{err}");
    let calls = recorded(record);
    assert!(calls.iter().all(|c| !c.action.contains("Standby")) && mutating(&calls).is_empty(), "{calls:?}");
    assert_eq!(sup.pid("web"), Some(before));
}

/// The listener under a real supervisord, with its group for members and attachments, restarts on
/// request by deregistering and ends InService. (moto keeps a group's instance listed in the
/// group's Classic load balancer after deregistering it, so this cycle waits out its drain bound,
/// 15 s, instead of seeing the instance leave.)
/// The listener takes its attachments from the group, and keeps them between requests: a load
/// balancer attached to the group meanwhile is found at the next request's check (the group's
/// attachments changed: nothing left), the listener builds its cycle again and restarts over both.
#[test]
fn the_listener_cycles_in_an_auto_scaling_group() {
    let moto = Moto::start();
    let (group, lb) = names();
    let ids = moto.asg(&group, 4, &lb, 0);
    let (sup, _, log) =
        listener_restarts_web(&moto, &format!("--members asg --instance-id {} --hostname host", ids[0]));
    assert!(log.contains(&format!("load balancer {lb}")) && log.contains("4 members"), "{log}");
    assert_eq!(moto.health(&lb).get(&ids[0]).map(String::as_str), Some("InService"));

    let second = format!("{lb}-2");
    moto.fixture(&["asg-attach", &group, &second]);
    let before = sup.pid("web").expect("web RUNNING");
    let log = request_web(&sup, &moto, 2);
    let changed = log.find("building the cycle again").expect("the change was seen");
    let done = log.rfind("cycle done").unwrap();
    assert!(changed < done, "{log}");
    assert!(log[changed..].contains(&format!("load balancer {second}")), "the rebuilt cycle has both: {log}");
    assert_ne!(sup.pid("web"), Some(before), "web restarted once more");
    for name in [&lb, &second] {
        assert_eq!(moto.health(name).get(&ids[0]).map(String::as_str), Some("InService"), "{name}");
    }
}

/// What a process asks Auto Scaling before its first check. The first one-shot looks the group up
/// (`DescribeAutoScalingInstances`, then `DescribeAutoScalingGroups`) and keeps the group's name
/// in the state directory; the next one asks nothing for the name, and in strict mode takes the
/// group's attachments from the shared view the first one's refreshes left, so that every
/// `DescribeAutoScalingGroups` it makes is a refresh of that view (one per publication). A name
/// kept for another instance (an image made of a running instance) is not used.
#[test]
fn the_group_is_looked_up_once_and_then_kept() {
    let r = recorded_group(0);
    let (record, moto, group, ids, sup, env) = (&r.record, &r.moto, &r.group, &r.ids, &r.sup, &r.env);
    moto.permit_table("permits");
    let state = sup.path("state");
    let one_shot = |id: &str| {
        let out = run_bin(
            &[
                "restart",
                "web",
                "--members",
                "asg",
                "--strict",
                "--lease-table",
                "permits",
                "--instance-id",
                id,
                "--hostname",
                "host",
                "--state-dir",
                state.to_str().unwrap(),
                "--poll-interval",
                "0.2",
                "--check-interval",
                "0.5",
            ],
            env,
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let calls = recorded(record);
        std::fs::write(record, "").unwrap();
        let count = |action: &str| calls.iter().filter(|c| c.action == action).count();
        let publications = calls.iter().filter(|c| c.kind.as_deref() == Some("view-publish")).count();
        (count("DescribeAutoScalingInstances"), count("DescribeAutoScalingGroups"), publications)
    };
    let cache = state.join("asg-group");

    let (instances, groups, publications) = one_shot(&ids[0]);
    assert_eq!(instances, 1, "the first run looks the group up");
    assert!(publications >= 1 && groups == publications + 1, "{groups} group reads, {publications} publications");
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), format!("{} {group}\n", ids[0]));

    let (instances, groups, publications) = one_shot(&ids[0]);
    assert_eq!(instances, 0, "the name is kept");
    assert_eq!(groups, publications, "every group read is a view refresh: the attachments came from the view");

    // Another instance's line (the state directory copied with an image): looked up again, kept anew.
    let (instances, _, _) = one_shot(&ids[1]);
    assert_eq!(instances, 1);
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), format!("{} {group}\n", ids[1]));
}

/// A named group in strict mode (`--members asg:NAME`) is the permit record's key as named: a
/// one-shot's first run asks no `DescribeAutoScalingInstances` (the group's read checks that it
/// lists the instance) and looks the group up once for the view it then publishes; `lease
/// release`, run from an instance outside the group, finds the record under that key without a
/// lookup either.
#[test]
fn a_named_group_is_its_records_key_without_a_lookup() {
    let r = recorded_group(0);
    let (record, moto, group, ids, sup, env) = (&r.record, &r.moto, &r.group, &r.ids, &r.sup, &r.env);
    moto.permit_table("permits");
    let named = format!("asg:{group}");
    let state = sup.path("state");
    let common = ["--members", &named, "--lease-table", "permits", "--hostname", "host"];
    let counts = || {
        let calls = recorded(record);
        std::fs::write(record, "").unwrap();
        let count = |action: &str| calls.iter().filter(|c| c.action == action).count();
        let publications = calls.iter().filter(|c| c.kind.as_deref() == Some("view-publish")).count();
        (count("DescribeAutoScalingInstances"), count("DescribeAutoScalingGroups"), publications)
    };

    let mut args = vec!["restart", "web", "--strict", "--instance-id", &ids[0], "--state-dir", state.to_str().unwrap()];
    args.extend(common);
    args.extend(["--poll-interval", "0.2", "--check-interval", "0.5"]);
    let out = run_bin(&args, env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (instances, groups, publications) = counts();
    assert_eq!(instances, 0, "the name as named");
    assert!(publications >= 1 && groups == publications + 1, "{groups} group reads, {publications} publications");

    let mut args = vec!["lease", "release", "--instance", &ids[1], "--instance-id", "i-0000000000000adm1"];
    args.extend(common);
    let out = run_bin(&args, env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("key {named})")), "{}", text(&out.stdout));
    assert_eq!(counts().0, 0, "no lookup for the key");
}
