//! End to end: the listener under a real supervisord, against the moto emulator, for every trigger,
//! refusal, kill -9 mid-cycle, SIGTERM mid-cycle and bad requests. The instance must end registered
//! and InService every time.

mod common;

use std::time::Duration;

use common::*;
use elb_quorum::config::SupervisorSettings;
use elb_quorum::cycle::state_file::StateFile;
use elb_quorum::secret::Secret;
use elb_quorum::supervisor::SupervisorClient;

const T: Duration = Duration::from_secs(60);

struct Node {
    sup: Supervisord,
    id: String,
    lb: String,
}

fn node(moto: &Moto, lb: &str, ns: &str, ids: &[String], extra_args: &str) -> Node {
    let conf = format!(
        "[program:web]\ncommand=sleep 100000\nstartsecs=1\n\n\
         [program:slow]\ncommand=sh -c 'hold() {{ i=0; while [ -e {{here}}/hold-slow ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 0; }}; trap hold TERM; while :; do sleep 0.1; done'\nstartsecs=1\nstopwaitsecs=90\n\n\
         [program:talker]\ncommand=sh -c 'while :; do if [ -e {{here}}/ask ]; then rm -f {{here}}/ask; printf \"<!--XSUPERVISOR:BEGIN-->restart<!--XSUPERVISOR:END-->\"; fi; sleep 0.1; done'\nstdout_capture_maxbytes=1MB\nstartsecs=1\n\n\
         [program:gated]\ncommand=sleep 100000\nautorestart=false\nstartsecs=1\n\n\
         [program:flaky]\ncommand=sh -c '[ -e {{here}}/broken ] && exit 1; exec sleep 100000'\nstartsecs=1\nstartretries=1\n\n\
         [eventlistener:elb-quorum]\ncommand={bin} listen --hostname node0.{ns} --domain example.com --instance-id {id} --program web --gate gated --check-interval 0.3 --max-checks 5 --poll-interval 0.2 --settle 0.2 --state-dir {{here}}/state {extra_args}\n\
         events=PROCESS_STATE,PROCESS_COMMUNICATION,REMOTE_COMMUNICATION,TICK_5\nbuffer_size=50\nstopwaitsecs=60\n\
         stderr_logfile={{here}}/listener.log\nenvironment=SUPERVISOR_USERNAME=\"{USER}\",SUPERVISOR_PASSWORD=\"{PASSWORD}\",ELB_QUORUM_LOG_TARGET=\"stderr\"\n",
        bin = bin().display(),
        id = ids[0],
    );
    let sup = Supervisord::start(&conf, false, &moto.env());
    for p in ["web", "slow", "talker", "gated", "flaky"] {
        eventually(T, "programs RUNNING", || sup.pid(p));
    }
    eventually(T, "listener RUNNING", || sup.status("elb-quorum").contains("RUNNING").then_some(()));
    Node { sup, id: ids[0].clone(), lb: lb.to_owned() }
}

impl Node {
    fn log(&self) -> String {
        self.sup.read("listener.log")
    }

    fn cycles(&self) -> usize {
        count(&self.log(), "cycle done")
    }

    fn wait_cycles(&self, n: usize) {
        eventually(T, &format!("{n} finished cycles"), || (self.cycles() >= n).then_some(()));
    }

    fn in_service(&self, moto: &Moto) -> bool {
        moto.health(&self.lb).get(&self.id).map(String::as_str) == Some("InService")
    }

    fn listener_pid(&self) -> u32 {
        text(&self.sup.ctl(&["pid", "elb-quorum"]).stdout).trim().parse().expect("listener pid")
    }

    fn client(&self) -> SupervisorClient {
        SupervisorClient::new(&SupervisorSettings {
            url: self.sup.url(),
            username: Some(USER.into()),
            password: Some(Secret::new(PASSWORD)),
            rpc_timeout: Duration::from_secs(10),
        })
        .unwrap()
    }
}

/// A four-instance cluster in the emulator and node0's supervisord with the listener.
fn setup() -> (Moto, String, Node) {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let n = node(&moto, &lb, &ns, &ids, "");
    (moto, ns, n)
}

/// Asks for a restart of `slow` and waits until the instance is out of the load balancer: the
/// cycle is then in its restart step, and stays there until `release_slow`: `slow` does not finish
/// stopping while its hold file exists (at most 60 s), so the test acts inside the cycle however
/// slow the machine is.
fn restart_slow_until_out(n: &Node) {
    std::fs::write(n.sup.path("hold-slow"), "").unwrap();
    request(n, &["slow"]);
    eventually(T, "the instance out of the load balancer", || {
        n.log().contains("out of every attachment").then_some(())
    });
    eventually(T, "slow held while stopping", || n.sup.status("slow").contains("STOPPING").then_some(()));
}

fn release_slow(n: &Node) {
    std::fs::remove_file(n.sup.path("hold-slow")).unwrap();
}

fn request(n: &Node, programs: &[&str]) {
    let mut args = vec!["request"];
    args.extend(programs);
    let out = run_bin(&args, &n.sup.client_env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn every_trigger_leaves_restarts_and_comes_back() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    // Debug: the listener logs each event it ignores, which the end of the test waits on.
    let n = node(&moto, &lb, &ns, &ids, "--log-level debug");

    // REMOTE_COMMUNICATION through `elb-quorum request`.
    let web = n.sup.pid("web").unwrap();
    request(&n, &["web"]);
    n.wait_cycles(1);
    assert_ne!(n.sup.pid("web"), Some(web), "web restarted");
    assert!(n.in_service(&moto));

    // PROCESS_COMMUNICATION: the program asks for its own restart.
    let talker = n.sup.pid("talker").unwrap();
    std::fs::write(n.sup.path("ask"), "").unwrap();
    n.wait_cycles(2);
    assert_ne!(n.sup.pid("talker"), Some(talker), "talker restarted");
    assert!(n.in_service(&moto));

    // A gated program (autorestart=false) dies: elb-quorum owns its recovery.
    let gated = n.sup.pid("gated").unwrap();
    unsafe_kill(gated, "KILL");
    n.wait_cycles(3);
    let after = n.sup.pid("gated").expect("gated RUNNING again");
    assert_ne!(after, gated);
    assert!(n.in_service(&moto));
    assert!(n.log().contains("gated program gated is Exited"), "{}", n.log());

    // SIGHUP to the listener: restart every --program.
    let web = n.sup.pid("web").unwrap();
    assert!(n.sup.ctl(&["signal", "HUP", "elb-quorum"]).status.success());
    n.wait_cycles(4);
    assert_ne!(n.sup.pid("web"), Some(web));
    assert!(n.in_service(&moto));

    // Our own restarts triggered nothing more, and each cycle left and came back once. Events
    // reach the listener in order: once it has logged a marker event sent now, it has handled
    // every event our restarts caused before it.
    let marker = std::process::Command::new(python())
        .args([
            "-c",
            "from supervisor import childutils; import os; \
             childutils.getRPCInterface(os.environ).supervisor.sendRemoteCommEvent('e2e-marker', 'end')",
        ])
        .envs(n.sup.client_env())
        .output()
        .unwrap();
    assert!(marker.status.success(), "{}", text(&marker.stderr));
    eventually(T, "the listener to log the marker", || n.log().contains("\"e2e-marker\"").then_some(()));
    let log = n.log();
    assert_eq!(n.cycles(), 4, "{log}");
    assert_eq!(count(&log, "restart requested"), 4, "{log}");
    assert_eq!(count(&log, "deregistering"), 4, "{log}");
    assert_eq!(count(&log, "serving again"), 4, "{log}");
    assert!(n.sup.status("elb-quorum").contains("RUNNING"));
}

#[test]
fn below_quorum_the_request_is_given_up_and_the_listener_keeps_serving() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    moto.fixture(&["stop", &ids[2]]);
    let n = node(&moto, &lb, &ns, &ids, "");
    let web = n.sup.pid("web").unwrap();
    request(&n, &["web"]);
    let log = eventually(T, "the request given up", || {
        let l = n.log();
        l.contains("restart request given up").then_some(l)
    });
    assert!(
        log.contains(&format!(
            "quorum not reached after 5 checks (load balancer {}: 4 members, 3 serving, 2 after leaving, 3 required",
            n.lb
        )),
        "{log}"
    );
    assert_eq!(count(&log, "deregistering"), 0);
    assert_eq!(n.sup.pid("web"), Some(web), "web untouched");
    assert!(n.in_service(&moto));
    assert!(n.sup.status("elb-quorum").contains("RUNNING"), "still serving events");
    // Quorum back: the next request goes through, so the listener is still taking events.
    moto.fixture(&["start", &ids[2]]);
    request(&n, &["web"]);
    n.wait_cycles(1);
    assert_ne!(n.sup.pid("web"), Some(web));
    assert!(n.in_service(&moto));
}

#[test]
fn kill_9_mid_cycle_is_reconciled_by_the_restarted_listener() {
    let (moto, _, n) = setup();

    // During the restart (slow held while stopping): deregistered, state file says so.
    restart_slow_until_out(&n);
    assert!(!n.in_service(&moto), "deregistered");
    let pid = n.listener_pid();
    unsafe_kill(pid, "KILL");
    release_slow(&n);
    eventually(T, "reconciled", || n.log().contains("reconciled: registered and serving again").then_some(()));
    assert!(n.in_service(&moto));
    eventually(T, "slow RUNNING", || n.sup.pid("slow"));

    // Killed right after deregistering, and right before registering: the state file the cycle
    // writes before each step, with the emulator in the matching state.
    for step in ["deregistering", "registering"] {
        // The lock is held while the record is written and the listener killed, as the cycle holds
        // it: with the lock free, the running listener's idle watch would finish the cycle itself.
        let state = StateFile::new(n.sup.path("state"));
        let lock = eventually(T, "the state file's lock", || state.try_lock().ok());
        moto.fixture(&["deregister", &n.lb, &n.id]);
        let record = serde_json::json!({"step": step, "instance_id": n.id, "lb": n.lb, "programs": ["web"], "since": 1, "pid": 1});
        std::fs::write(n.sup.path("state/state.json"), record.to_string()).unwrap();
        let before = count(&n.log(), "reconciled");
        unsafe_kill(n.listener_pid(), "KILL");
        drop(lock);
        eventually(T, "reconciled again", || (count(&n.log(), "reconciled") > before).then_some(()));
        assert!(n.in_service(&moto), "{step}");
        assert!(!n.sup.path("state/state.json").exists(), "{step}: state file cleared");
    }
    eventually(T, "the listener RUNNING again", || n.sup.status("elb-quorum").contains("RUNNING").then_some(()));
}

/// A program that does not come back leaves the instance out, loudly; once the operator fixes it
/// and starts it, the idle listener sees it RUNNING and registers the instance by itself (no
/// request, no restart of the listener).
#[test]
fn an_instance_left_out_comes_back_once_its_programs_run_again() {
    let (moto, _, n) = setup();
    std::fs::write(n.sup.path("broken"), "").unwrap();
    request(&n, &["flaky"]);
    let log = eventually(T, "the instance left out", || {
        let l = n.log();
        l.contains("outcome=\"left-out\"").then_some(l)
    });
    assert!(log.contains("LEFT DEREGISTERED"), "{log}");
    assert!(n.sup.status("flaky").contains("FATAL"), "{}", n.sup.status("flaky"));
    assert!(!n.in_service(&moto), "out while flaky is down");
    std::fs::remove_file(n.sup.path("broken")).unwrap();
    assert!(n.sup.ctl(&["start", "flaky"]).status.success());
    let log = eventually(T, "back in service by itself", || {
        let l = n.log();
        l.contains("outcome=\"recovered\"").then_some(l)
    });
    assert!(n.in_service(&moto), "{log}");
    assert!(!n.sup.path("state/state.json").exists(), "state file cleared");
    assert_eq!(count(&log, "starting restart cycle"), 1, "no second cycle: {log}");
}

#[test]
fn sigterm_mid_cycle_finishes_coming_back_before_exiting() {
    let (moto, _, n) = setup();
    restart_slow_until_out(&n);
    // `supervisorctl stop` returns once the listener has exited: run it aside, let the cycle
    // finish only once the listener has taken the SIGTERM.
    let conf = n.sup.path("supervisord.conf");
    let stop = std::thread::spawn(move || {
        std::process::Command::new(tool("supervisorctl"))
            .arg("-c")
            .arg(conf)
            .args(["stop", "elb-quorum"])
            .output()
            .unwrap()
    });
    eventually(T, "the listener to take the SIGTERM", || {
        n.log().contains("SIGTERM/SIGINT: stopping after the cycle in progress").then_some(())
    });
    release_slow(&n);
    let out = stop.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    let log = n.log();
    assert!(log.contains("cycle done"), "the cycle finished before the listener exited:\n{log}");
    assert!(n.in_service(&moto));
}

#[tokio::test(flavor = "current_thread")]
async fn bad_requests_never_take_the_instance_out() {
    let (moto, ns, n) = setup();
    let c = n.client();
    c.send_remote_comm_event("elb-quorum", "restart nope").await.unwrap();
    c.send_remote_comm_event("elb-quorum", "reboot web").await.unwrap();
    c.send_remote_comm_event("elb-quorum", "").await.unwrap();
    let log = eventually(T, "all three requests refused", || {
        let l = n.log();
        (l.contains("unknown program \"nope\"") && l.contains("unknown verb \"reboot\"") && l.contains("empty request"))
            .then_some(l)
    });
    assert_eq!(count(&log, "deregistering"), 0);
    assert!(n.in_service(&moto));
    assert!(n.sup.status("elb-quorum").contains("RUNNING"));

    // supervisord unreachable for a one-shot restart: refused before leaving.
    let mut env = moto.env();
    env.push(("SUPERVISOR_SERVER_URL".into(), format!("unix://{}/gone.sock", n.sup.dir.path().display())));
    let out = one_shot("web", &format!("node0.{ns}"), &n.id, &n.sup.path("state2"), &[], &env);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("gone.sock"));
    assert!(n.in_service(&moto));
}

#[test]
fn a_second_one_shot_restart_is_refused_while_one_runs() {
    let (moto, ns, n) = setup();
    let state = n.sup.path("state"); // the listener's state dir: it shares the lock
    let mut env = moto.env();
    env.extend(n.sup.client_env());
    let args_owned = [
        "restart",
        "slow",
        "--hostname",
        &format!("node0.{ns}"),
        "--domain",
        "example.com",
        "--instance-id",
        &n.id,
        "--poll-interval",
        "0.2",
        "--settle",
        "0",
        "--state-dir",
        state.to_str().unwrap(),
    ]
    .map(String::from);
    let args: Vec<&str> = args_owned.iter().map(String::as_str).collect();
    // The first one stays in its restart step (slow held) until the second has been refused.
    std::fs::write(n.sup.path("hold-slow"), "").unwrap();
    let first = bin_command(&args, &env).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let first_pid = first.id().to_string();
    eventually(T, "the first restart holding the lock", || {
        (std::fs::read_to_string(state.join("lock")).ok()? == first_pid).then_some(())
    });
    let second = run_bin(&args, &env);
    assert_eq!(second.status.code(), Some(3));
    assert!(text(&second.stderr).contains("another elb-quorum restart holds the lock"), "{}", text(&second.stderr));
    release_slow(&n);
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(n.in_service(&moto));
}
