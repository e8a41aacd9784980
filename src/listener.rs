//! `elb-quorum listen`: the only code that touches stdin and stdout. Writes `READY`, reads one
//! event, acknowledges it at once, hands restart requests to the worker, and writes `READY` again.
//! Stdout carries the protocol and nothing else; logs go through `tracing` (journald or stderr).

use std::io::{self, Read, Write};

use tracing::{debug, error, info, warn};

use crate::protocol::{EventDecoder, ProtocolError, ACK_READY, READY};
use crate::trigger::{Action, Origin, RestartRequest, Triggers};
use crate::worker::WorkerHandle;

/// Signals the listener reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: restart every `--program`.
    Hup,
    /// SIGTERM or SIGINT: finish the cycle in progress, then exit.
    Term,
}

/// Why the listener stopped.
#[derive(Debug)]
pub enum End {
    /// supervisord closed stdin.
    Eof,
    /// SIGTERM or SIGINT (seen by the runtime, not by the protocol loop).
    Signal,
    /// The stream cannot be resynchronised (exit 2; supervisord restarts the listener).
    Fatal(ProtocolError),
    /// Reading stdin or writing stdout failed.
    Io(io::Error),
    /// The restart worker ended without being asked to (a panicking cycle): the listener must
    /// not go on acknowledging requests that nothing will act on.
    WorkerDied(String),
}

/// Stdin and stdout as plain files (duplicates of fds 0 and 1): one `read` and one `write` system
/// call per event, no buffering layer that could split or delay a reply.
pub fn stdio() -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::AsFd;
    let input = io::stdin().as_fd().try_clone_to_owned()?;
    let output = io::stdout().as_fd().try_clone_to_owned()?;
    Ok((input.into(), output.into()))
}

fn write_all(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    out.write_all(bytes)?;
    out.flush()
}

/// Runs the protocol loop on the calling thread until EOF or a fatal protocol error, with blocking
/// reads and writes: per event one `read` and one `write`, as the C floor makes, and no reactor in
/// between (the restart cycles and signals live on the tokio runtime, on another thread; a request
/// reaches the worker through `WorkerHandle::submit`, which wakes it).
pub fn run(mut input: impl Read, mut out: impl Write, triggers: &Triggers, worker: &WorkerHandle) -> End {
    let mut decoder = EventDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    if let Err(e) = write_all(&mut out, READY) {
        return End::Io(e);
    }
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => {
                if !decoder.is_idle() {
                    warn!(buffered = decoder.buffered(), "stdin closed in the middle of an event");
                }
                info!("stdin closed: supervisord is stopping the listener");
                return End::Eof;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return End::Io(e),
            Ok(n) => n,
        };
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_event() {
                Ok(None) => break,
                Ok(Some(event)) => match triggers.classify(&event, |p| worker.is_own(p)) {
                    Action::Restart(req) => {
                        info!(event = %event.describe(), programs = ?req.programs, origin = %req.origins[0], "restart requested");
                        worker.submit(req);
                    }
                    Action::Ignore(why) => debug!(event = %event.describe(), "ignored: {why}"),
                    Action::Reject(why) => {
                        warn!(event = %event.describe(), "unusable request acknowledged and dropped: {why}")
                    }
                },
                Err(e) if e.is_recoverable() => warn!(error = %e, "event acknowledged and dropped"),
                Err(e) => {
                    error!(error = %e, "cannot continue reading events; exiting so that supervisord restarts the listener");
                    return End::Fatal(e);
                }
            }
            if let Err(e) = write_all(&mut out, ACK_READY) {
                return End::Io(e);
            }
        }
    }
}

/// SIGHUP: restart every `--program`.
pub fn on_hup(worker: &WorkerHandle, hup_programs: &[String]) {
    if hup_programs.is_empty() {
        warn!("SIGHUP received but no --program is configured; nothing to restart");
    } else {
        info!(programs = ?hup_programs, "SIGHUP: restart requested");
        worker.submit(RestartRequest::new(hup_programs.iter().cloned(), Origin::Signal));
    }
}
