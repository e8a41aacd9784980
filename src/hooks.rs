//! The operator's own commands around a cycle: `--before-leave` (after the gate, before anything
//! changes; a failure aborts with nothing changed), `--ready-check` (after the programs are RUNNING,
//! before rejoining; retried every poll interval until it passes or `--ready-timeout`), and
//! `--after-return` (once serving again; a failure is logged). Each runs as `/bin/sh -c CMD` in its
//! own process group, with a timeout after which the whole group is killed; its output goes to the
//! log, never to stdout. It gets `ELB_QUORUM_HOOK`, `ELB_QUORUM_INSTANCE_ID`, `ELB_QUORUM_PROGRAMS`
//! and `ELB_QUORUM_ATTACHMENTS` in its environment.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BeforeLeave,
    ReadyCheck,
    AfterReturn,
}

impl Phase {
    pub fn option(self) -> &'static str {
        match self {
            Phase::BeforeLeave => "--before-leave",
            Phase::ReadyCheck => "--ready-check",
            Phase::AfterReturn => "--after-return",
        }
    }

    fn env_name(self) -> &'static str {
        match self {
            Phase::BeforeLeave => "before-leave",
            Phase::ReadyCheck => "ready-check",
            Phase::AfterReturn => "after-return",
        }
    }
}

/// The configured hooks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub before_leave: Option<String>,
    pub ready_check: Option<String>,
    pub after_return: Option<String>,
    /// Longest one run of a hook may take before its process group is killed.
    pub timeout: Duration,
    /// Longest `--ready-check` is retried for.
    pub ready_timeout: Duration,
}

impl Hooks {
    pub fn get(&self, phase: Phase) -> Option<&str> {
        match phase {
            Phase::BeforeLeave => self.before_leave.as_deref(),
            Phase::ReadyCheck => self.ready_check.as_deref(),
            Phase::AfterReturn => self.after_return.as_deref(),
        }
    }

    /// The configured hooks, for the dry run's log line.
    pub fn describe(&self) -> String {
        let all: Vec<String> = [Phase::BeforeLeave, Phase::ReadyCheck, Phase::AfterReturn]
            .iter()
            .filter_map(|p| self.get(*p).map(|c| format!("{} {c:?}", p.option())))
            .collect();
        if all.is_empty() {
            "no hooks".into()
        } else {
            all.join(", ")
        }
    }
}

/// What the hook is told about the cycle.
#[derive(Debug, Clone)]
pub struct Context {
    pub instance_id: String,
    pub programs: Vec<String>,
    pub attachments: String,
}

#[derive(Debug, Error)]
pub enum HookError {
    #[error("{option} `{command}` exited with status {status}")]
    Failed { option: &'static str, command: String, status: i32 },
    #[error("{option} `{command}` was killed by a signal")]
    Killed { option: &'static str, command: String },
    #[error("{option} `{command}` did not finish within {after:?}; its process group was killed")]
    TimedOut { option: &'static str, command: String, after: Duration },
    #[error("{option} `{command}` could not be started")]
    Spawn {
        option: &'static str,
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// Checks at start that a hook's command can run: its first word, when it is a plain word, must
/// be an executable file (a path) or found on PATH.
pub fn check_command(option: &str, command: &str) -> Result<(), String> {
    let Some(first) = command.split_whitespace().next() else {
        return Err(format!("{option}: an empty command"));
    };
    let plain = first.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c));
    if !plain {
        return Ok(()); // shell syntax: sh will say
    }
    let executable = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if first.contains('/') {
        executable(std::path::Path::new(first))
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(first))))
    };
    if found {
        Ok(())
    } else {
        Err(format!("{option} {command:?}: {first} is not an executable file or a command on PATH"))
    }
}

/// Runs `phase`'s hook once (nothing to do when it is not configured).
pub async fn run(hooks: &Hooks, phase: Phase, ctx: &Context) -> Result<(), HookError> {
    let Some(command) = hooks.get(phase).map(str::to_owned) else { return Ok(()) };
    let timeout = hooks.timeout;
    let ctx = ctx.clone();
    tokio::task::spawn_blocking(move || run_blocking(phase, &command, &ctx, timeout))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn run_blocking(phase: Phase, command: &str, ctx: &Context, timeout: Duration) -> Result<(), HookError> {
    let option = phase.option();
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("ELB_QUORUM_HOOK", phase.env_name())
        .env("ELB_QUORUM_INSTANCE_ID", &ctx.instance_id)
        .env("ELB_QUORUM_PROGRAMS", ctx.programs.join(" "))
        .env("ELB_QUORUM_ATTACHMENTS", &ctx.attachments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| HookError::Spawn { option, command: command.to_owned(), source })?;
    let pgid = child.id();
    let readers: Vec<_> = [
        child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
        child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out);
            out
        })
    })
    .collect();
    let status = loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            // The whole group (the hook's own, made at spawn): a shell's children must not
            // outlive it. A negative pid names the group; pgid is the child's pid, never 0 or 1.
            if pgid > 1 {
                // SAFETY: kill(2) has no memory effects; the group is the hook's own.
                unsafe {
                    libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
                }
            }
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for r in readers {
        let out = r.join().unwrap_or_default();
        for line in String::from_utf8_lossy(&out).lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(hook = option, "{line}");
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    match status {
        None => Err(HookError::TimedOut { option, command: command.to_owned(), after: timeout }),
        Some(s) if s.success() => {
            tracing::info!(hook = option, elapsed_s, "{option} passed");
            Ok(())
        }
        Some(s) => match s.code() {
            Some(status) => Err(HookError::Failed { option, command: command.to_owned(), status }),
            None => Err(HookError::Killed { option, command: command.to_owned() }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked_at_start() {
        assert!(check_command("--ready-check", "true").is_ok());
        assert!(check_command("--ready-check", "/bin/sh -c 'exit 0'").is_ok());
        assert!(check_command("--ready-check", "FOO=1 true").is_ok(), "shell syntax is left to sh");
        let e = check_command("--before-leave", "no-such-command-xyz --flag").unwrap_err();
        assert!(e.contains("--before-leave") && e.contains("no-such-command-xyz"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("notes.txt");
        std::fs::write(&plain, "not a program").unwrap();
        assert!(check_command("--after-return", plain.to_str().unwrap()).is_err(), "not executable");
        assert!(check_command("--after-return", "  ").is_err());
    }
}
