//! The XML-RPC client against a real supervisord, over the unix socket (with credentials) and TCP,
//! and against small local servers that answer slowly or with garbage.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use elb_quorum::config::SupervisorSettings;
use elb_quorum::protocol::ProcessStateName;
use elb_quorum::secret::Secret;
use elb_quorum::supervisor::{FaultCode, SupervisorClient, SupervisorError};

const PROGRAMS: &str = "[program:web]\ncommand=sleep 100000\nstartsecs=1\nstopwaitsecs=5\n\n\
[program:pool]\ncommand=sleep 100000\nprocess_name=%(program_name)s_%(process_num)d\nnumprocs=2\nstartsecs=1\n\n\
[program:broken]\ncommand=sh -c 'exit 7'\nstartsecs=1\nstartretries=1\nautostart=false\n\n\
[eventlistener:recorder]\ncommand=python {fixture} {here}/events.txt\nevents=REMOTE_COMMUNICATION\n";

fn start() -> Supervisord {
    let conf = PROGRAMS.replace("{fixture}", &fixture("record_listener.py").display().to_string());
    Supervisord::start(&conf, true, &[])
}

fn client(url: &str, user: Option<&str>, password: Option<&str>) -> SupervisorClient {
    SupervisorClient::new(&SupervisorSettings {
        url: url.to_owned(),
        username: user.map(str::to_owned),
        password: password.map(Secret::new),
        rpc_timeout: Duration::from_secs(10),
    })
    .unwrap()
}

fn unix(sup: &Supervisord) -> SupervisorClient {
    client(&sup.url(), Some(USER), Some(PASSWORD))
}

async fn running_pid(c: &SupervisorClient, name: &str) -> u32 {
    for _ in 0..100 {
        let info = c.process_info(name).await.unwrap();
        if info.state == ProcessStateName::Running {
            return info.pid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never RUNNING");
}

#[tokio::test(flavor = "current_thread")]
async fn info_restart_and_faults_over_the_unix_socket() {
    let sup = start();
    let c = unix(&sup);
    assert_eq!(c.get_state().await.unwrap(), (1, "RUNNING".to_string()));
    let before = running_pid(&c, "web").await;
    let infos = c.restart(&["web".to_string()], Duration::from_secs(30), Duration::from_millis(100)).await.unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].state, ProcessStateName::Running);
    assert_ne!(infos[0].pid, before, "a new process");
    assert_eq!(infos[0].pid, sup.pid("web").unwrap(), "supervisorctl agrees");

    // A whole group.
    let a = running_pid(&c, "pool:pool_0").await;
    let b = running_pid(&c, "pool:pool_1").await;
    let infos = c.restart(&["pool:*".to_string()], Duration::from_secs(30), Duration::from_millis(100)).await.unwrap();
    let pids: Vec<u32> = infos.iter().map(|i| i.pid).collect();
    assert_eq!(infos.iter().map(|i| i.namespec()).collect::<Vec<_>>(), ["pool:pool_0", "pool:pool_1"]);
    assert!(!pids.contains(&a) && !pids.contains(&b), "both restarted: {pids:?} vs {a} {b}");

    // Typed faults.
    let e = c.process_info("nope").await.unwrap_err();
    assert_eq!(e.fault_code(), Some(FaultCode::BadName), "{e}");
    let e = c.start("web", false, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(e.fault_code(), Some(FaultCode::AlreadyStarted), "{e}");
    c.stop("web", true, Duration::from_secs(10)).await.unwrap();
    let e = c.stop("web", true, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(e.fault_code(), Some(FaultCode::NotRunning), "{e}");

    // Restart semantics: a stopped program is fine (NOT_RUNNING at stop is success).
    let infos = c.restart(&["web".to_string()], Duration::from_secs(30), Duration::from_millis(100)).await.unwrap();
    assert_eq!(infos[0].state, ProcessStateName::Running);

    // Unknown names fail before anything changes.
    let pid = sup.pid("web").unwrap();
    let e = c
        .restart(&["web".to_string(), "nope".to_string()], Duration::from_secs(30), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(&e, SupervisorError::UnknownProgram { name } if name == "nope"), "{e}");
    assert_eq!(sup.pid("web"), Some(pid), "web untouched");
    for bad in ["pool", "ghost:*", "pool:pool_9"] {
        assert!(matches!(c.resolve(&[bad.to_string()]).await, Err(SupervisorError::UnknownProgram { .. })), "{bad}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_program_that_cannot_start_is_reported_with_its_state() {
    let sup = start();
    let c = unix(&sup);
    let e = c.restart(&["broken".to_string()], Duration::from_secs(30), Duration::from_millis(100)).await.unwrap_err();
    match &e {
        SupervisorError::ProgramFailed { program, state, .. } => {
            assert_eq!(program, "broken:broken");
            assert_eq!(state, "FATAL", "BACKOFF is waited out; FATAL after startretries is the failure");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("did not come back"), "{e}");
}

#[tokio::test(flavor = "current_thread")]
async fn tcp_transport_works_too() {
    let sup = start();
    let c = client(&format!("http://127.0.0.1:{}", sup.inet_port.unwrap()), Some(USER), Some(PASSWORD));
    let before = running_pid(&c, "web").await;
    let infos = c.restart(&["web".to_string()], Duration::from_secs(30), Duration::from_millis(100)).await.unwrap();
    assert_ne!(infos[0].pid, before);
}

#[tokio::test(flavor = "current_thread")]
async fn wrong_password_and_missing_socket_say_so() {
    let sup = start();
    let e = client(&sup.url(), Some(USER), Some("wrong")).get_state().await.unwrap_err();
    assert!(matches!(e, SupervisorError::Unauthorized { .. }), "{e:?}");
    assert!(e.to_string().contains("rejected the credentials") && !e.to_string().contains("wrong"), "{e}");
    let e = client(&sup.url(), None, None).get_state().await.unwrap_err();
    assert!(matches!(e, SupervisorError::Unauthorized { .. }), "{e:?}");
    let missing = sup.path("nope.sock");
    let e = client(&format!("unix://{}", missing.display()), None, None).get_state().await.unwrap_err();
    assert!(matches!(e, SupervisorError::SocketMissing { .. }), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()), "names the path: {e}");
}

/// A local server that accepts and answers after `delay` with `answer` (None: never).
fn fake_server(answer: Option<&'static [u8]>, delay: Duration) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                std::thread::sleep(delay);
                if let Some(a) = answer {
                    let _ =
                        write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n", a.len());
                    let _ = s.write_all(a);
                } else {
                    std::thread::sleep(Duration::from_secs(30));
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "current_thread")]
async fn slow_and_garbage_answers_are_errors_not_hangs() {
    let port = fake_server(None, Duration::ZERO);
    let c = SupervisorClient::new(&SupervisorSettings {
        url: format!("http://127.0.0.1:{port}"),
        username: None,
        password: None,
        rpc_timeout: Duration::from_millis(300),
    })
    .unwrap();
    let e = c.get_state().await.unwrap_err();
    assert!(matches!(e, SupervisorError::Timeout { .. }), "{e:?}");
    let port = fake_server(Some(b"<html><body>Not XML-RPC</body></html>"), Duration::ZERO);
    let e = client(&format!("http://127.0.0.1:{port}"), None, None).get_state().await.unwrap_err();
    match e {
        SupervisorError::InvalidResponse { quoted, .. } => {
            assert!(quoted.contains("<html><body>Not XML-RPC"), "{quoted}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn request_delivers_a_remote_communication_event() {
    let sup = start();
    eventually(Duration::from_secs(20), "recorder RUNNING", || {
        sup.status("recorder").contains("RUNNING").then_some(())
    });
    let out = run_bin(&["request", "web", "pool:*"], &sup.client_env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events = eventually(Duration::from_secs(10), "the recorded event", || {
        let t = sup.read("events.txt");
        t.contains("---").then_some(t)
    });
    assert_eq!(events, "REMOTE_COMMUNICATION\ntype:elb-quorum\nrestart web pool:*\n---\n");

    let out = run_bin(&["request", "nope"], &sup.client_env());
    assert_eq!(out.status.code(), Some(2), "unknown program is a usage error");
    assert!(text(&out.stderr).contains("unknown program \"nope\""), "{}", text(&out.stderr));

    let out = run_bin(
        &["request", "web", "--supervisor-url", &format!("unix://{}/gone.sock", sup.dir.path().display())],
        &[],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("gone.sock"), "{}", text(&out.stderr));

    let mut env = sup.client_env();
    env[2].1 = "wrong".into();
    let out = run_bin(&["request", "web"], &env);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(err.contains("rejected the credentials") && !err.contains("wrong"), "{err}");

    let out = run_bin(&["request", "bad name"], &sup.client_env());
    assert_eq!(out.status.code(), Some(2));
}
