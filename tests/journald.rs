//! The journald log path, for real: the listener runs in a private mount namespace (`unshare -m`,
//! as root) where a tmpfs hides the machine's /run and `tests/fixtures/journal_sink.py` listens at
//! /run/systemd/journal/socket. With `--log-target auto` the listener finds the socket and logs
//! there in journald's native protocol; the test reads the datagrams and checks the structured
//! fields of a request and of the cycle's outcome.

mod common;

use std::process::Command;

use common::*;

/// The datagrams the sink wrote (each a 4-byte little-endian length and the bytes), read as
/// journald reads them: `KEY=value\n`, or `KEY\n`, a 64-bit little-endian length, the value and
/// `\n`. Each entry becomes `KEY=value` lines; the input stays open until the outcome is logged (a
/// bounded wait on that condition), and only then does the listener see EOF and exit.
fn entries(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (mut gram, tail) = rest[4..].split_at(n);
        rest = tail;
        let mut entry = String::new();
        while let Some(nl) = gram.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&gram[..nl]).into_owned();
            gram = &gram[nl + 1..];
            if line.contains('=') {
                entry.push_str(&line);
            } else {
                let len = u64::from_le_bytes(gram[..8].try_into().unwrap()) as usize;
                entry.push_str(&format!("{line}={}", String::from_utf8_lossy(&gram[8..8 + len])));
                gram = &gram[8 + len + 1..];
            }
            entry.push('\n');
        }
        if !entry.is_empty() {
            out.push(entry);
        }
    }
    out
}

#[test]
fn the_listener_logs_structured_fields_to_journald() {
    let dir = tempfile::tempdir().unwrap();
    let sink_out = dir.path().join("journal.bin");
    let input = dir.path().join("events");
    let payload = "type:elb-quorum\nrestart web";
    std::fs::write(
        &input,
        format!(
            "ver:3.0 server:supervisor serial:1 pool:elb-quorum poolserial:1 eventname:REMOTE_COMMUNICATION len:{}\n{payload}",
            payload.len()
        ),
    )
    .unwrap();
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; \
         {py} {sink} /run/systemd/journal/socket {out} & sink=$!; \
         while [ ! -S /run/systemd/journal/socket ]; do sleep 0.05; done; \
         status=0; (cat {input}; i=0; while ! grep -aq OUTCOME {out} && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done) \
           | {bin} listen --lb web-example-com --instance-id i-0001 --hostname node0.web.example.com \
           --members static:3 --state-dir {state} > {dir}/stdout || status=$?; \
         kill $sink; exit $status",
        py = python().display(),
        sink = fixture("journal_sink.py").display(),
        out = sink_out.display(),
        bin = bin().display(),
        state = dir.path().join("state").display(),
        input = input.display(),
        dir = dir.path().display(),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env_remove("ELB_QUORUM_LOG_TARGET")
        .env_remove("AWS_PROFILE")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SUPERVISOR_SERVER_URL", format!("unix://{}/missing.sock", dir.path().display()))
        .output()
        .expect("running unshare (util-linux)");
    assert!(
        out.status.success(),
        "the listener in a private mount namespace failed (this test needs root and `unshare -m`, from util-linux): {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).is_empty(), "logs went to journald, not stderr: {}", text(&out.stderr));
    let grams = entries(&std::fs::read(&sink_out).expect("the sink wrote datagrams"));
    let find = |message: &str| {
        grams
            .iter()
            .find(|g| g.lines().any(|l| l.starts_with("MESSAGE=") && l.contains(message)))
            .unwrap_or_else(|| panic!("no datagram with {message:?} among {grams:#?}"))
    };
    assert!(grams.iter().all(|g| g.contains("SYSLOG_IDENTIFIER=elb-quorum\n")), "{grams:#?}");
    let request = find("restart requested");
    for field in ["EVENT=REMOTE_COMMUNICATION serial 1", "PROGRAMS={\"web\"}", "ORIGIN=remote request", "PRIORITY=5"] {
        assert!(request.lines().any(|l| l == field), "{field:?} in {request}");
    }
    let outcome = find("restart cycle failed");
    for field in ["OUTCOME=failed", "PRIORITY=3"] {
        assert!(outcome.lines().any(|l| l == field), "{field:?} in {outcome}");
    }
    assert!(outcome.contains("supervisord's socket"), "the cause is in the message: {outcome}");
}
