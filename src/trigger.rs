//! Which event asks for which restart. Pure: no I/O, no clock (the caller says which programs the
//! listener itself is restarting).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use crate::protocol::{quote, Event, EventBody, ProcessStateName};

/// The `type` of REMOTE_COMMUNICATION events meant for elb-quorum (`elb-quorum request` sends it).
pub const REMOTE_TYPE: &str = "elb-quorum";

/// Bytes of a rejected request quoted in its log line: programs may talk at length on stdout, and
/// a log line per message must stay short.
pub const QUOTED: usize = 80;

/// Where a restart request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// REMOTE_COMMUNICATION `type:elb-quorum` (e.g. `elb-quorum request`).
    Remote,
    /// A managed program asked through PROCESS_COMMUNICATION_STDOUT.
    Program(String),
    /// A gated program exited unexpectedly or went FATAL.
    Gate { program: String, state: ProcessStateName },
    /// SIGHUP to the listener (`supervisorctl signal HUP elb-quorum`).
    Signal,
    /// The one-shot `restart` command.
    Cli,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Remote => write!(f, "remote request"),
            Origin::Program(p) => write!(f, "request from program {p}"),
            Origin::Gate { program, state } => write!(f, "gated program {program} is {state:?}"),
            Origin::Signal => write!(f, "SIGHUP"),
            Origin::Cli => write!(f, "command line"),
        }
    }
}

/// A request to restart programs. `down` names those known to be down already (a gated crash): the
/// instance then serves nothing and need not wait for quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartRequest {
    pub programs: BTreeSet<String>,
    pub down: BTreeSet<String>,
    pub origins: Vec<Origin>,
}

impl RestartRequest {
    pub fn new(programs: impl IntoIterator<Item = String>, origin: Origin) -> Self {
        Self { programs: programs.into_iter().collect(), down: BTreeSet::new(), origins: vec![origin] }
    }

    /// Folds another request into this one (coalescing requests that arrive during a cycle).
    pub fn merge(&mut self, other: RestartRequest) {
        self.programs.extend(other.programs);
        self.down.extend(other.down);
        for o in other.origins {
            if !self.origins.contains(&o) {
                self.origins.push(o);
            }
        }
    }

    /// Whether the instance serves nothing already: some gated program is down.
    pub fn serves_nothing(&self) -> bool {
        !self.down.is_empty()
    }
}

/// What the listener should do with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Restart(RestartRequest),
    /// Nothing to do (debug log). Borrowed for the common case: no allocation per ignored event.
    Ignore(Cow<'static, str>),
    /// Meant for us but unusable: acknowledged and logged as a warning.
    Reject(String),
}

/// Trigger settings: gated programs and the REMOTE_COMMUNICATION type.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    /// Programs whose unexpected exit or FATAL asks for a gated restart (`--gate`).
    pub gated: BTreeSet<String>,
}

/// Checks a program name as supervisord takes it: `prog`, `group:prog` or `group:*`.
pub fn valid_program_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid program name {}: {why}", quote(name.as_bytes(), QUOTED)));
    if name.is_empty() {
        return bad("empty");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains white space");
    }
    let parts: Vec<&str> = name.split(':').collect();
    match parts.as_slice() {
        [p] if *p != "*" => Ok(()),
        [g, p] if !g.is_empty() && !p.is_empty() && !g.contains('*') && (*p == "*" || !p.contains('*')) => Ok(()),
        _ => bad("expected PROGRAM, GROUP:PROGRAM or GROUP:*"),
    }
}

/// Parses the command text of a request: `restart PROGRAM...` (or `restart` alone, when `sender`
/// names the program that asked). Surrounding white space and a trailing newline are allowed.
pub fn parse_command(text: &str, sender: Option<&str>) -> Result<BTreeSet<String>, String> {
    let mut words = text.split_whitespace();
    match words.next() {
        None => return Err("empty request (expected `restart PROGRAM...`)".into()),
        Some("restart") => {}
        Some(verb) => return Err(format!("unknown verb {verb:?} (expected `restart PROGRAM...`)")),
    }
    let mut programs = BTreeSet::new();
    for w in words {
        valid_program_name(w)?;
        programs.insert(w.to_owned());
    }
    if programs.is_empty() {
        match sender {
            Some(s) => {
                programs.insert(s.to_owned());
            }
            None => return Err("`restart` names no program".into()),
        }
    }
    Ok(programs)
}

fn gate_matches(gate: &str, processname: &str, groupname: &str) -> bool {
    gate == processname && (groupname.is_empty() || groupname == processname)
        || gate == format!("{groupname}:{processname}")
        || gate == format!("{groupname}:*")
}

impl Triggers {
    /// Classifies one event. `own(namespec)` tells whether the listener itself is restarting that
    /// program now (its state changes must not trigger anything).
    pub fn classify(&self, event: &Event, own: impl Fn(&str) -> bool) -> Action {
        match &event.body {
            EventBody::RemoteCommunication { kind, data } => {
                if kind != REMOTE_TYPE {
                    return Action::Ignore(format!("REMOTE_COMMUNICATION of type {kind:?}").into());
                }
                match parse_command(data, None) {
                    Ok(programs) => Action::Restart(RestartRequest::new(programs, Origin::Remote)),
                    Err(e) => Action::Reject(format!("remote request {}: {e}", quote(data.trim().as_bytes(), QUOTED))),
                }
            }
            EventBody::ProcessCommunication { channel: crate::protocol::Channel::Stdout, source, data } => {
                // Programs talk to other listeners too: only text that starts with our verb is for us.
                if data.split_whitespace().next() != Some("restart") {
                    return Action::Ignore(Cow::Borrowed("program output not addressed to elb-quorum"));
                }
                let sender = source.namespec();
                match parse_command(data, Some(&sender)) {
                    Ok(programs) => Action::Restart(RestartRequest::new(programs, Origin::Program(sender))),
                    Err(e) => Action::Reject(format!(
                        "request from program {sender} {}: {e}",
                        quote(data.trim().as_bytes(), QUOTED)
                    )),
                }
            }
            EventBody::ProcessState(ps) if matches!(ps.state, ProcessStateName::Exited | ProcessStateName::Fatal) => {
                let Some(gate) = self.gated.iter().find(|g| gate_matches(g, &ps.processname, &ps.groupname)) else {
                    return Action::Ignore(format!("{:?} of ungated program {}", ps.state, ps.processname).into());
                };
                if ps.state == ProcessStateName::Exited && ps.expected == Some(true) {
                    return Action::Ignore(format!("expected exit of gated program {}", ps.processname).into());
                }
                let namespec = if ps.groupname.is_empty() || ps.groupname == ps.processname {
                    ps.processname.clone()
                } else {
                    format!("{}:{}", ps.groupname, ps.processname)
                };
                if own(&namespec) || own(gate) {
                    return Action::Ignore(format!("{:?} of {namespec} caused by our own restart", ps.state).into());
                }
                let mut req = RestartRequest::new(
                    [namespec.clone()],
                    Origin::Gate { program: namespec.clone(), state: ps.state },
                );
                req.down.insert(namespec);
                Action::Restart(req)
            }
            _ => Action::Ignore(Cow::Borrowed("not a trigger")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EventDecoder, Header};

    fn event(name: &str, payload: &str) -> Event {
        let body = crate::protocol::parse_body(name, payload).unwrap();
        Event {
            header: Header {
                ver: "3.0".into(),
                server: "supervisor".into(),
                serial: 1,
                pool: "elb-quorum".into(),
                poolserial: 1,
                eventname: name.into(),
                len: payload.chars().count(),
            },
            body,
        }
    }

    fn triggers() -> Triggers {
        Triggers { gated: ["web".to_string(), "api:*".to_string()].into() }
    }

    fn restart(programs: &[&str], origin: Origin, down: &[&str]) -> Action {
        let mut r = RestartRequest::new(programs.iter().map(|s| s.to_string()), origin);
        r.down = down.iter().map(|s| s.to_string()).collect();
        Action::Restart(r)
    }

    #[test]
    fn classification_table() {
        let t = triggers();
        let none = |_: &str| false;
        let cases: Vec<(&str, &str, Action)> = vec![
            ("REMOTE_COMMUNICATION", "type:elb-quorum\nrestart web", restart(&["web"], Origin::Remote, &[])),
            (
                "REMOTE_COMMUNICATION",
                "type:elb-quorum\nrestart web api:* web\n",
                restart(&["api:*", "web"], Origin::Remote, &[]),
            ),
            (
                "REMOTE_COMMUNICATION",
                "type:other\nrestart web",
                Action::Ignore("REMOTE_COMMUNICATION of type \"other\"".into()),
            ),
            (
                "REMOTE_COMMUNICATION",
                "type:elb-quorum\n",
                Action::Reject("remote request \"\": empty request (expected `restart PROGRAM...`)".into()),
            ),
            (
                "REMOTE_COMMUNICATION",
                "type:elb-quorum\nreboot web",
                Action::Reject(
                    "remote request \"reboot web\": unknown verb \"reboot\" (expected `restart PROGRAM...`)".into(),
                ),
            ),
            (
                "REMOTE_COMMUNICATION",
                "type:elb-quorum\nrestart",
                Action::Reject("remote request \"restart\": `restart` names no program".into()),
            ),
            (
                "PROCESS_COMMUNICATION_STDOUT",
                "processname:talker groupname:talker pid:1\nrestart",
                restart(&["talker"], Origin::Program("talker".into()), &[]),
            ),
            (
                "PROCESS_COMMUNICATION_STDOUT",
                "processname:w1 groupname:pool pid:1\nrestart\n",
                restart(&["pool:w1"], Origin::Program("pool:w1".into()), &[]),
            ),
            (
                "PROCESS_COMMUNICATION_STDOUT",
                "processname:talker groupname:talker pid:1\nrestart web",
                restart(&["web"], Origin::Program("talker".into()), &[]),
            ),
            (
                "PROCESS_COMMUNICATION_STDERR",
                "processname:t groupname:t pid:1\nrestart",
                Action::Ignore("not a trigger".into()),
            ),
            (
                "PROCESS_STATE_EXITED",
                "processname:web groupname:web from_state:RUNNING expected:0 pid:5",
                restart(&["web"], Origin::Gate { program: "web".into(), state: ProcessStateName::Exited }, &["web"]),
            ),
            (
                "PROCESS_STATE_EXITED",
                "processname:web groupname:web from_state:RUNNING expected:1 pid:5",
                Action::Ignore("expected exit of gated program web".into()),
            ),
            (
                "PROCESS_STATE_FATAL",
                "processname:a1 groupname:api from_state:BACKOFF",
                restart(
                    &["api:a1"],
                    Origin::Gate { program: "api:a1".into(), state: ProcessStateName::Fatal },
                    &["api:a1"],
                ),
            ),
            (
                "PROCESS_STATE_FATAL",
                "processname:db groupname:db from_state:BACKOFF",
                Action::Ignore("Fatal of ungated program db".into()),
            ),
            (
                "PROCESS_STATE_RUNNING",
                "processname:web groupname:web from_state:STARTING pid:9",
                Action::Ignore("not a trigger".into()),
            ),
            ("TICK_5", "when:1", Action::Ignore("not a trigger".into())),
        ];
        for (name, payload, want) in cases {
            assert_eq!(t.classify(&event(name, payload), none), want, "{name} {payload:?}");
        }
    }

    #[test]
    fn a_long_rejected_request_is_quoted_short() {
        let talk = format!("processname:chatty groupname:chatty pid:1\nrestart a:b:{}", "x".repeat(10_000));
        let Action::Reject(why) = triggers().classify(&event("PROCESS_COMMUNICATION_STDOUT", &talk), |_| false) else {
            panic!("not a rejection")
        };
        assert!(why.starts_with("request from program chatty \"restart a:b:xxx"), "{why}");
        assert!(why.len() < 300 && why.contains("bytes)"), "{}: {why}", why.len());
    }

    /// Output a program sends to other listeners is not a warning of ours: only a request that
    /// starts with `restart` and cannot be used is.
    #[test]
    fn program_output_not_addressed_to_us_is_ignored_quietly() {
        let t = triggers();
        for text in ["hello listener", "", "   ", "restarting soon", "metrics 1 2 3"] {
            let talk = format!("processname:chatty groupname:chatty pid:1\n{text}");
            let action = t.classify(&event("PROCESS_COMMUNICATION_STDOUT", &talk), |_| false);
            assert!(matches!(action, Action::Ignore(_)), "{text:?}: {action:?}");
        }
        let talk = "processname:chatty groupname:chatty pid:1\nrestart a:b:c";
        assert!(matches!(t.classify(&event("PROCESS_COMMUNICATION_STDOUT", talk), |_| false), Action::Reject(_)));
    }

    #[test]
    fn own_restarts_do_not_trigger() {
        let t = triggers();
        let ev = event("PROCESS_STATE_FATAL", "processname:web groupname:web from_state:BACKOFF");
        assert!(matches!(t.classify(&ev, |p| p == "web"), Action::Ignore(m) if m.contains("own restart")));
        assert!(matches!(t.classify(&ev, |p| p == "other"), Action::Restart(_)));
    }

    #[test]
    fn program_names() {
        for ok in ["web", "web:web_0", "web:*", "a-b.c_d"] {
            assert_eq!(valid_program_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "*", ":x", "x:", "a:b:c", "we b", "*:x", "a:w*"] {
            assert!(valid_program_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn merge_coalesces() {
        let mut a = RestartRequest::new(["web".to_string()], Origin::Remote);
        let mut b = RestartRequest::new(["api".to_string()], Origin::Signal);
        b.down.insert("api".into());
        a.merge(b);
        a.merge(RestartRequest::new(["web".to_string()], Origin::Remote));
        assert_eq!(a.programs, ["api".to_string(), "web".to_string()].into());
        assert_eq!(a.origins, vec![Origin::Remote, Origin::Signal]);
        assert!(a.serves_nothing());
        let _ = EventDecoder::default();
    }
}
