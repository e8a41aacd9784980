//! `elb-quorum listen`: the exact protocol bytes on stdout (driven over pipes, as supervisord does),
//! bad input, and a run under a real supervisord.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Starts the listener on pipes with an identity that needs no AWS call at start-up. AWS and
/// supervisord point at closed local addresses: nothing leaves the machine.
fn spawn_listener(state_dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args([
            "listen",
            "--lb",
            "web-example-com",
            "--instance-id",
            "i-0001",
            "--hostname",
            "node0.web.example.com",
            "--members",
            "static:3",
        ])
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .env_remove("AWS_PROFILE")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SUPERVISOR_SERVER_URL", format!("unix://{}/missing.sock", state_dir.display()))
        .env("ELB_QUORUM_LOG_TARGET", "stderr")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning elb-quorum listen")
}

fn run_with_input(input: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_listener(dir.path(), &[]);
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    (status.code(), out.join().unwrap(), text(&err.join().unwrap()))
}

fn expected_stdout(events: usize) -> Vec<u8> {
    let mut v = b"READY\n".to_vec();
    for _ in 0..events {
        v.extend_from_slice(b"RESULT 2\nOKREADY\n");
    }
    v
}

#[test]
fn captured_stream_gets_exact_acks_and_eof_exits_zero() {
    let stream = std::fs::read(fixture("captured_stream.txt")).unwrap();
    let (code, stdout, log) = run_with_input(&stream);
    assert_eq!(code, Some(0), "EOF ends the listener cleanly; log:\n{log}");
    assert_eq!(text(&stdout), text(&expected_stdout(8)), "stdout carries the protocol and nothing else");
    assert_eq!(count(&log, "restart requested"), 1, "the REMOTE_COMMUNICATION request is recognised:\n{log}");
    assert!(log.contains("programs={\"web\"}"), "{log}");
    assert_eq!(count(&log, "unusable request"), 0, "`hello café ✓` is not addressed to us: no warning:\n{log}");
    assert!(
        log.contains("ignored: program output not addressed to elb-quorum event=PROCESS_COMMUNICATION_STDOUT"),
        "{log}"
    );
    assert!(log.contains("ignored: not a trigger event=TICK_5 serial 7"), "ignored events are logged at debug:\n{log}");
}

#[test]
fn malformed_payload_is_acknowledged_and_the_listener_goes_on() {
    let input = b"ver:3.0 server:supervisor serial:1 pool:p poolserial:1 eventname:TICK_5 len:9\nwhen:soonver:3.0 server:supervisor serial:2 pool:p poolserial:2 eventname:TICK_5 len:6\nwhen:1";
    let (code, stdout, log) = run_with_input(input);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(stdout, expected_stdout(2));
    assert!(log.contains("event acknowledged and dropped") && log.contains("`when` is not a number"), "{log}");
}

#[test]
fn unparsable_header_exits_2_quoting_it_and_writes_nothing_more() {
    let input = b"ver:3.0 server:supervisor serial:1 pool:p poolserial:1 eventname:TICK_5 len:6\nwhen:1garbage without length\nmore bytes";
    let (code, stdout, log) = run_with_input(input);
    assert_eq!(code, Some(2), "{log}");
    assert_eq!(stdout, expected_stdout(1), "nothing after the last good event's ack");
    assert!(log.contains("garbage without length"), "the offending header is quoted:\n{log}");
}

#[test]
fn events_split_into_single_bytes_are_all_acknowledged() {
    let stream = std::fs::read(fixture("captured_stream.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_listener(dir.path(), &[]);
    let out = drain(child.stdout.take().unwrap());
    let _err = drain(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    for b in &stream {
        stdin.write_all(std::slice::from_ref(b)).unwrap();
        stdin.flush().unwrap();
    }
    drop(stdin);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(out.join().unwrap(), expected_stdout(8));
}

#[test]
fn sigterm_at_rest_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_listener(dir.path(), &[]);
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut ready).unwrap();
    assert_eq!(&ready, b"READY\n");
    unsafe_kill(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The listener under a real supervisord: it receives real events (program state changes, TICK_5,
/// sendRemoteCommEvent), stays RUNNING, and recognises the restart request. `--dry-run` against the
/// AWS emulator: the cycle makes every check and changes nothing.
#[test]
fn under_real_supervisord_stays_running_and_recognises_requests() {
    let moto = Moto::start();
    let (lb, ns) = unique_cluster();
    let ids = moto.cluster(&lb, &ns, 4);
    let listener = format!(
        "[program:web]\ncommand=sleep 100000\nstartsecs=1\n\n\
         [program:flappy]\ncommand=sh -c 'sleep 0.2; exit 3'\nstartsecs=0\nautorestart=false\n\n\
         [eventlistener:elb-quorum]\ncommand={bin} listen --hostname node0.{ns} --domain example.com --instance-id {id} --dry-run --check-interval 0.2 --max-checks 3 --poll-interval 0.1 --state-dir {{here}}/state --log-level debug\n\
         events=PROCESS_STATE,PROCESS_COMMUNICATION,REMOTE_COMMUNICATION,TICK_5\n\
         stderr_logfile={{here}}/listener.log\nenvironment=SUPERVISOR_USERNAME=\"{USER}\",SUPERVISOR_PASSWORD=\"{PASSWORD}\",ELB_QUORUM_LOG_TARGET=\"stderr\"\n",
        bin = bin().display(),
        id = ids[0],
    );
    let sup = Supervisord::start(&listener, false, &moto.env());
    eventually(Duration::from_secs(20), "listener RUNNING", || {
        sup.status("elb-quorum").contains("RUNNING").then_some(())
    });
    eventually(Duration::from_secs(20), "web RUNNING", || sup.pid("web"));
    assert!(sup.ctl(&["restart", "web"]).status.success());
    let out = run_bin(&["request", "web"], &sup.client_env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = eventually(Duration::from_secs(30), "the dry-run cycle in the listener log", || {
        let log = sup.read("listener.log");
        log.contains("dry run: would deregister").then_some(log)
    });
    assert!(log.contains("restart requested") && log.contains("REMOTE_COMMUNICATION"), "{log}");
    assert!(log.contains("PROCESS_STATE_RUNNING"), "state changes reach the listener:\n{log}");
    assert!(log.contains("4 members, 4 serving, 3 after leaving, 3 required"), "{log}");
    eventually(Duration::from_secs(12), "a TICK_5", || sup.read("listener.log").contains("event=TICK_5").then_some(()));
    assert!(sup.status("elb-quorum").contains("RUNNING"), "still RUNNING, not UNKNOWN or BACKOFF");
    let health = moto.health(&lb);
    assert_eq!(health.get(&ids[0]).map(String::as_str), Some("InService"), "dry run changed nothing");
}

/// A restart cycle that panics must not leave a listener that acknowledges requests and acts on
/// none: the listener exits non-zero (supervisord restarts it, and its start reconciles from the
/// state file). The panic is injected by a debug-build-only switch.
#[test]
fn a_panicking_cycle_ends_the_listener_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd_child = {
        let mut c = Command::new(bin());
        c.args(["listen", "--lb", "web-example-com", "--instance-id", "i-0001", "--hostname", "node0.web.example.com"])
            .args(["--members", "static:3", "--state-dir"])
            .arg(dir.path())
            .env_remove("AWS_PROFILE")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("SUPERVISOR_SERVER_URL", format!("unix://{}/missing.sock", dir.path().display()))
            .env("ELB_QUORUM_LOG_TARGET", "stderr")
            .env("ELB_QUORUM_TEST_PANIC_IN_CYCLE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().expect("spawning elb-quorum listen")
    };
    let out = drain(cmd_child.stdout.take().unwrap());
    let err = drain(cmd_child.stderr.take().unwrap());
    let mut stdin = cmd_child.stdin.take().unwrap();
    let payload = "type:elb-quorum\nrestart web";
    write!(
        stdin,
        "ver:3.0 server:supervisor serial:1 pool:elb-quorum poolserial:1 eventname:REMOTE_COMMUNICATION len:{}\n{payload}",
        payload.len()
    )
    .unwrap();
    stdin.flush().unwrap();
    // stdin stays open: only the dead worker can end the listener.
    let status = eventually(Duration::from_secs(30), "the listener to exit", || cmd_child.try_wait().unwrap());
    drop(stdin);
    let err = text(&err.join().unwrap());
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("the restart worker stopped (it panicked: injected"), "{err}");
    assert_eq!(out.join().unwrap(), expected_stdout(1), "the request was acknowledged, then nothing more");
}
