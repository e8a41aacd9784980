//! Issue #14, item 4, with real processes: twelve one-shot `elb-quorum restart --strict` started at
//! the same moment, each its own instance (its own `--instance-id`, hostname and program under one
//! real supervisord), against moto behind a rate-limiting proxy (`tests/fixtures/moto_locked.py
//! --buckets`) that answers calls over one account's budget the way AWS does.
//!
//! The buckets are the budget a fleet may take (half of AWS's: the account's other tools need the
//! rest): ELB `Describe*` 20 tokens + 5/s per API version, EC2 `Describe*` 50 + 10/s, registration
//! calls 10 + 2/s. They are not scaled down by 12/1,000: strict mode's reads do not grow with the
//! number of instances (one shared view, about two load-balancer reads per second at any size), so
//! the fleet-wide budget is what twelve must keep, as a thousand must; and a registration bucket
//! scaled to 12/1,000 (0.06/s) would make the test last over 400 s (benches/README.md shows the
//! same floor at K = 1,000 in simulation).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const TABLE: &str = "elb-quorum-permits";
const K: usize = 12;
const T: Duration = Duration::from_secs(60);

/// The most calls of `family` (attempts, throttled or not) in any 10 s window.
fn peak_in_10s(calls: &[Call], family: &str) -> usize {
    let t: Vec<f64> = calls.iter().filter(|c| c.family.as_deref() == Some(family)).map(|c| c.t).collect();
    (0..t.len()).map(|i| t[i..].iter().take_while(|x| **x < t[i] + 10.0).count()).max().unwrap_or(0)
}

/// `K` programs `web0`... under one real supervisord (moto's endpoints in its environment), all
/// RUNNING: the supervisord, their pids, and the environment a one-shot needs (moto's and the
/// supervisord client's).
fn twelve_programs(moto: &Moto) -> (Supervisord, Vec<u32>, Vec<(String, String)>) {
    let programs: String =
        (0..K).map(|i| format!("[program:web{i}]\ncommand=sleep 100000\nstartsecs=1\nstopwaitsecs=5\n")).collect();
    let sup = Supervisord::start(&programs, false, &moto.env());
    let pids = (0..K).map(|i| eventually(T, "web RUNNING", || sup.pid(&format!("web{i}")))).collect();
    let mut env = moto.env();
    env.extend(sup.client_env());
    (sup, pids, env)
}

/// Starts `elb-quorum restart --strict` for every (instance, its own arguments) at the same moment,
/// instance i restarting `web{i}` with its own state directory under `dir`; each must end with
/// exit 0, its program restarted. Returns the pids after.
fn at_once(
    ids: &[(String, Vec<String>)],
    dir: &std::path::Path,
    sup: &Supervisord,
    before: &[u32],
    env: &[(String, String)],
) -> Vec<u32> {
    let children: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, (id, own))| {
            let state = dir.join(format!("state-{i}"));
            let program = format!("web{i}");
            let mut args = vec![
                "restart",
                &program,
                "--strict",
                "--lease-table",
                TABLE,
                "--instance-id",
                id,
                "--state-dir",
                state.to_str().unwrap(),
                "--check-interval",
                "1",
                "--poll-interval",
                "1",
                "--max-checks",
                "300",
            ];
            args.extend(own.iter().map(String::as_str));
            bin_command(&args, env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(0), "instance {i} ({}): {}", ids[i].0, text(&out.stderr));
    }
    before
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let after = sup.pid(&format!("web{i}")).expect("RUNNING again");
            assert_ne!(after, *pid, "web{i} restarted");
            after
        })
        .collect()
}

/// A Classic cluster of K members named by hostname, behind the half-budget proxy (recording to
/// `record`, emptied once the set-up is done), with their twelve programs, and each instance's
/// own arguments: its hostname and domain, then `extra`.
struct HostnameFleet {
    moto: Moto,
    members: Vec<String>,
    sup: Supervisord,
    before: Vec<u32>,
    env: Vec<(String, String)>,
    ids: Vec<(String, Vec<String>)>,
}

fn hostname_fleet(record: &std::path::Path, extra: &[&str]) -> HostnameFleet {
    let moto = Moto::start_limited(record, "elb1=20:5,elb2=20:5,ec2=50:10,reg=10:2");
    moto.permit_table(TABLE);
    let (lb, ns) = unique_cluster();
    let v = moto.fixture(&["create", "--lb", &lb, "--namespace", &ns, "--count", &K.to_string()]);
    let members: Vec<String> = serde_json::from_value(v["members"].clone()).unwrap();
    let hostnames: BTreeMap<String, String> = serde_json::from_value(v["hostnames"].clone()).unwrap();
    let (sup, before, env) = twelve_programs(&moto);
    std::fs::write(record, "").unwrap();
    let ids = members
        .iter()
        .map(|id| {
            let own = ["--hostname", hostnames[id].as_str(), "--domain", "example.com"]
                .into_iter()
                .chain(extra.iter().copied());
            (id.clone(), own.map(str::to_owned).collect())
        })
        .collect();
    HostnameFleet { moto, members, sup, before, env, ids }
}

#[test]
fn twelve_strict_one_shots_at_once_stay_within_the_account_budget() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let HostnameFleet { moto: _moto, members, sup, before, env, ids } = hostname_fleet(&record, &[]);
    at_once(&ids, dir.path(), &sup, &before, &env);

    let calls: Vec<Call> =
        std::fs::read_to_string(&record).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for id in &members {
        let left = calls
            .iter()
            .filter(|c| {
                c.instance.as_deref() == Some(id)
                    && c.action == "DeregisterInstancesFromLoadBalancer"
                    && c.status == 200
            })
            .count();
        assert_eq!(left, 1, "{id} left exactly once");
    }
    let throttled: Vec<&Call> = calls.iter().filter(|c| c.throttled == Some(true)).collect();
    let (elb, ec2) = (peak_in_10s(&calls, "elb1"), peak_in_10s(&calls, "ec2"));
    eprintln!(
        "{} calls; ELB Describe* peak {elb} per 10 s, EC2 {ec2} per 10 s; {} throttled",
        calls.len(),
        throttled.len()
    );
    assert!(elb <= 50, "ELB Describe*: {elb} calls in 10 s, above the fleet's 5/s");
    assert!(ec2 <= 100, "EC2 Describe*: {ec2} calls in 10 s, above the fleet's 10/s");
    assert!(throttled.iter().all(|c| c.family.as_deref() == Some("reg")), "no read was throttled: {throttled:?}");
}

/// The same with `--members asg`: twelve instances of one Auto Scaling group (its Classic load
/// balancer their only attachment), behind the proxy with one Auto Scaling bucket (20 + 5/s: half
/// of the 40 + 10/s this project assumes, benches/README.md). The first round is a fleet's first
/// run: every process looks its group's name up (`DescribeAutoScalingInstances`) in the same
/// second, throttled calls are tried again, nobody gives up; the group itself
/// (`DescribeAutoScalingGroups`) is looked up by one process for the others, which wait for the
/// view it publishes (`start::group_at_start`). The second round is what
/// every later restart of that fleet looks like: the group's name kept in each state directory,
/// the attachments taken from the shared view, so that Auto Scaling sees only the view's refreshes
/// (one `DescribeAutoScalingGroups` per publication) and nothing is throttled but registrations.
#[test]
fn an_auto_scaling_fleet_asks_auto_scaling_only_for_the_shared_view_once_it_ran() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let moto = Moto::start_limited(&record, "elb1=20:5,elb2=20:5,ec2=50:10,reg=10:2,asg=20:5");
    moto.permit_table(TABLE);
    let n = unique();
    let (group, lb) = (format!("fleet{n}"), format!("fleet{n}-lb"));
    let members = moto.asg(&group, K, &lb, 0);
    let (sup, mut pids, env) = twelve_programs(&moto);
    let ids: Vec<(String, Vec<String>)> = members
        .iter()
        .map(|id| (id.clone(), vec!["--members".into(), "asg".into(), "--hostname".into(), "host".into()]))
        .collect();

    for round in ["first run", "later run"] {
        std::fs::write(&record, "").unwrap();
        pids = at_once(&ids, dir.path(), &sup, &pids, &env);
        let calls = recorded(&record);
        for id in &members {
            let left = calls
                .iter()
                .filter(|c| c.instance.as_deref() == Some(id) && c.action == "DeregisterInstancesFromLoadBalancer")
                .filter(|c| c.status == 200)
                .count();
            assert_eq!(left, 1, "{round}: {id} left exactly once");
        }
        let count = |action: &str| calls.iter().filter(|c| c.action == action && c.throttled != Some(true)).count();
        let publications = calls.iter().filter(|c| c.kind.as_deref() == Some("view-publish")).count();
        let throttled: Vec<&Call> = calls.iter().filter(|c| c.throttled == Some(true)).collect();
        let (asg, elb) = (peak_in_10s(&calls, "asg"), peak_in_10s(&calls, "elb1"));
        eprintln!(
            "{round}: Auto Scaling peak {asg} per 10 s, ELB Describe* {elb}; {} DescribeAutoScalingInstances, {} DescribeAutoScalingGroups, {publications} view publications; {} throttled",
            count("DescribeAutoScalingInstances"),
            count("DescribeAutoScalingGroups"),
            throttled.len()
        );
        assert!(elb <= 50, "{round}: ELB Describe*: {elb} calls in 10 s, above the fleet's 5/s");
        if round == "first run" {
            assert_eq!(count("DescribeAutoScalingInstances"), K, "each process looked its group's name up once");
            let lookups = count("DescribeAutoScalingGroups") - publications;
            assert!((1..=3).contains(&lookups), "{lookups} group lookups besides the view's refreshes, not one each");
        } else {
            assert_eq!(count("DescribeAutoScalingInstances"), 0, "the names were kept");
            assert_eq!(count("DescribeAutoScalingGroups"), publications, "every group read is a view refresh");
            assert!(asg <= 50, "Auto Scaling: {asg} calls in 10 s, above the fleet's 5/s");
            assert!(throttled.iter().all(|c| c.family.as_deref() == Some("reg")), "only registrations: {throttled:?}");
        }
    }
}

/// `--batch-registrations` with real processes: twelve one-shots at once, each asking through the
/// permit record; whichever holds the batch claim deregisters and registers every holder asking,
/// behind the same half-budget proxy. Every instance asked twice (out, back), was taken out exactly
/// once and put back exactly once (counting every instance a call names), and no registration call
/// was throttled. (That batches hold several instances, hence fewer calls, the fleet model shows
/// with fixed seeds: `tests/fleet_fake.rs`.)
#[test]
fn twelve_batched_one_shots_are_each_taken_out_and_put_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("calls.jsonl");
    let HostnameFleet { moto: _moto, members, sup, before, env, ids } =
        hostname_fleet(&record, &["--batch-registrations"]);
    at_once(&ids, dir.path(), &sup, &before, &env);

    let calls = recorded(&record);
    let named = |action: &str, id: &str| {
        calls.iter().filter(|c| c.action == action && c.status == 200 && c.instances.contains(&id.to_string())).count()
    };
    for id in &members {
        assert_eq!(named("DeregisterInstancesFromLoadBalancer", id), 1, "{id} taken out exactly once");
        assert_eq!(named("RegisterInstancesWithLoadBalancer", id), 1, "{id} put back exactly once");
        let asks = calls.iter().filter(|c| c.kind.as_deref() == Some("batch-ask") && c.instance.as_deref() == Some(id));
        assert_eq!(asks.count(), 2, "{id} asked out and back");
    }
    let registration: Vec<&Call> = calls.iter().filter(|c| c.family.as_deref() == Some("reg")).collect();
    let throttled = registration.iter().filter(|c| c.throttled == Some(true)).count();
    eprintln!(
        "{} registration calls for {K} instances ({} of each making its own), {throttled} throttled",
        registration.len(),
        2 * K
    );
    assert_eq!(throttled, 0, "{registration:?}");
}
