//! nom parsers for the header line and for each event family's payload.
//!
//! Frame layer (streaming, `.parse()`): finds the header line; a missing `\n` is `Incomplete`.
//! Content layer (complete, `.parse_complete()`): the `key:value` tokens of a finished line.

use std::sync::Arc;

use nom::bytes::{tag, take_until, take_while, take_while1};
use nom::sequence::{preceded, separated_pair};
use nom::{IResult, Parser};

use super::{quote, Channel, EventBody, Header, ProcessState, ProcessStateName, ProtocolError, Source};

/// Longest header line accepted; supervisor's are about 120 bytes.
pub const MAX_HEADER_LINE: usize = 4096;

/// Most `key:value` tokens one line may carry (supervisor's have at most 7).
pub const MAX_TOKENS: usize = 16;

/// Frame layer, streaming:
/// ```text
/// header-line = *(%x00-09 / %x0B-FF) LF
/// ```
/// Returns the line without its `\n`. (`take_until` finds the `\n` with memchr.)
pub(crate) fn header_line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    let (rest, line) = take_until(&b"\n"[..]).parse(input)?;
    let (rest, _) = tag(&b"\n"[..]).parse(rest)?;
    Ok((rest, line))
}

/// The tokens of one line, borrowed from it: no allocation per event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tokens<'a> {
    items: [(&'a str, &'a str); MAX_TOKENS],
    n: usize,
    /// More than `MAX_TOKENS` were present.
    overflow: bool,
}

impl<'a> Tokens<'a> {
    fn new() -> Self {
        Tokens { items: [("", ""); MAX_TOKENS], n: 0, overflow: false }
    }

    fn push(&mut self, token: (&'a str, &'a str)) {
        match self.items.get_mut(self.n) {
            Some(slot) => {
                *slot = token;
                self.n += 1;
            }
            None => self.overflow = true,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(&'a str, &'a str)> {
        self.items[..self.n].iter()
    }
}

/// Content layer, complete, on the line's bytes (no character decoding):
/// ```text
/// tokens = token *(SP token)
/// token  = key ":" value
/// key    = 1*(ALPHA / DIGIT / "_")
/// value  = *(%x21-FF)            ; anything but space and control characters
/// ```
/// Token boundaries are ASCII bytes, so every part is also a `&str` slice of `line`.
fn tokens<'a>(line: &'a str, toks: &mut Tokens<'a>) -> IResult<&'a [u8], ()> {
    let text = move |part: &[u8]| {
        let at = part.as_ptr() as usize - line.as_ptr() as usize;
        &line[at..at + part.len()]
    };
    let token = move || {
        separated_pair(
            take_while1(|b: u8| b.is_ascii_alphanumeric() || b == b'_'),
            tag(&b":"[..]),
            take_while(|b: u8| b != b' ' && b != b'\n'),
        )
        .map(move |(k, v)| (text(k), text(v)))
    };
    let (mut rest, first) = token().parse_complete(line.as_bytes())?;
    toks.push(first);
    // `many0` by hand: nom's fold would move the token array through every step.
    loop {
        match preceded(tag(&b" "[..]), token()).parse_complete(rest) {
            Ok((r, t)) => {
                toks.push(t);
                rest = r;
            }
            Err(nom::Err::Error(_)) => return Ok((rest, ())),
            Err(e) => return Err(e),
        }
    }
}

/// Parses a whole token line (nothing may be left over) into `toks`, in place: the array is not
/// moved around, which would cost more than the parse.
fn token_line<'a>(line: &'a str, toks: &mut Tokens<'a>) -> Result<(), String> {
    match tokens(line, toks) {
        Ok(_) if toks.overflow => Err(format!("more than {MAX_TOKENS} tokens in {}", quote(line.as_bytes(), 40))),
        Ok((b"", ())) => Ok(()),
        Ok((rest, ())) => Err(format!("unexpected text {}", quote(rest, 40))),
        Err(_) => Err(format!("expected key:value tokens, got {}", quote(line.as_bytes(), 40))),
    }
}

fn field<'a>(toks: &Tokens<'a>, key: &str) -> Option<&'a str> {
    toks.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

fn required<'a>(toks: &Tokens<'a>, key: &str) -> Result<&'a str, String> {
    field(toks, key).ok_or_else(|| format!("missing `{key}`"))
}

fn number<T: std::str::FromStr>(toks: &Tokens<'_>, key: &str) -> Result<Option<T>, String> {
    match field(toks, key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| format!("`{key}` is not a number: {}", quote(v.as_bytes(), 20))),
    }
}

/// The header strings seen last, shared between events instead of allocated for each: supervisord
/// repeats `ver`, `server` and `pool` on every event and uses a handful of event names.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    seen: Vec<Arc<str>>,
}

impl Interner {
    /// Most distinct strings kept (supervisor has about 30 event names).
    const KEEP: usize = 64;

    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(hit) = self.seen.iter().find(|k| ***k == *s) {
            return hit.clone();
        }
        let new: Arc<str> = Arc::from(s);
        if self.seen.len() < Self::KEEP {
            self.seen.push(new.clone());
        }
        new
    }
}

/// Parses a finished header line (without its `\n`) into a [`Header`].
/// `ver`, `eventname` and a numeric `len` are required; the rest default to empty or zero.
pub fn parse_header_line(line: &[u8]) -> Result<Header, ProtocolError> {
    parse_header_interned(line, &mut Interner::default())
}

pub(crate) fn parse_header_interned(line: &[u8], strings: &mut Interner) -> Result<Header, ProtocolError> {
    let bad = |reason| ProtocolError::BadHeader { quoted: quote(line, 120), reason };
    let text = std::str::from_utf8(line).map_err(|_| bad("not UTF-8"))?;
    let mut toks = Tokens::new();
    token_line(text, &mut toks).map_err(|_| bad("expected space-separated key:value tokens"))?;
    let len = field(&toks, "len").ok_or_else(|| bad("no `len` token"))?;
    let len = len.parse::<usize>().map_err(|_| bad("`len` is not a number"))?;
    let eventname = field(&toks, "eventname").filter(|e| !e.is_empty()).ok_or_else(|| bad("no `eventname` token"))?;
    let ver = field(&toks, "ver").ok_or_else(|| bad("no `ver` token"))?;
    let serial = number::<u64>(&toks, "serial").map_err(|_| bad("`serial` is not a number"))?;
    let poolserial = number::<u64>(&toks, "poolserial").map_err(|_| bad("`poolserial` is not a number"))?;
    Ok(Header {
        ver: strings.get(ver),
        server: strings.get(field(&toks, "server").unwrap_or_default()),
        serial: serial.unwrap_or(0),
        pool: strings.get(field(&toks, "pool").unwrap_or_default()),
        poolserial: poolserial.unwrap_or(0),
        eventname: strings.get(eventname),
        len,
    })
}

fn source(toks: &Tokens<'_>) -> Result<Source, String> {
    Ok(Source {
        processname: required(toks, "processname")?.to_owned(),
        groupname: field(toks, "groupname").unwrap_or_default().to_owned(),
        pid: field(toks, "pid").and_then(|p| p.parse().ok()),
    })
}

fn channel(name: &str) -> Option<Channel> {
    match name {
        "STDOUT" => Some(Channel::Stdout),
        "STDERR" => Some(Channel::Stderr),
        _ => None,
    }
}

/// Parses a complete payload according to the header's event name.
///
/// Errors describe what does not fit; an unknown event name is not an error (`EventBody::Unknown`).
pub fn parse_body(eventname: &str, payload: &str) -> Result<EventBody, String> {
    let (mut body, data_at) = parse_parts(eventname, payload)?;
    if let Some(at) = data_at {
        *data_mut(&mut body) = payload[at..].to_owned();
    }
    Ok(body)
}

fn data_mut(body: &mut EventBody) -> &mut String {
    match body {
        EventBody::ProcessCommunication { data, .. }
        | EventBody::ProcessLog { data, .. }
        | EventBody::RemoteCommunication { data, .. } => data,
        EventBody::Unknown { payload } => payload,
        _ => unreachable!("only bodies with free data get a data offset"),
    }
}

/// Splits `header-line LF data`: the header line and the offset of the data.
fn split_at_data(payload: &str) -> (&str, usize) {
    match payload.find('\n') {
        Some(nl) => (&payload[..nl], nl + 1),
        None => (payload, payload.len()),
    }
}

/// The typed body with its free data left empty, and where that data starts in the payload.
fn parse_parts(eventname: &str, payload: &str) -> Result<(EventBody, Option<usize>), String> {
    let unknown = || Ok((EventBody::Unknown { payload: String::new() }, Some(0)));
    if let Some(state) = eventname.strip_prefix("PROCESS_STATE_") {
        let Some(state) = ProcessStateName::from_name(state) else {
            return unknown();
        };
        let mut toks = Tokens::new();
        token_line(payload.trim_end_matches('\n'), &mut toks)?;
        return Ok((
            EventBody::ProcessState(ProcessState {
                state,
                processname: required(&toks, "processname")?.to_owned(),
                groupname: field(&toks, "groupname").unwrap_or_default().to_owned(),
                from_state: field(&toks, "from_state").and_then(ProcessStateName::from_name),
                expected: number::<u8>(&toks, "expected")?.map(|e| e != 0),
                // `pid` may be absent or 0 for a process that never ran.
                pid: field(&toks, "pid").and_then(|p| p.parse().ok()),
                tries: number(&toks, "tries")?,
            }),
            None,
        ));
    }
    if let Some(ch) = eventname.strip_prefix("PROCESS_COMMUNICATION_").and_then(channel) {
        let (line, at) = split_at_data(payload);
        let mut toks = Tokens::new();
        token_line(line, &mut toks)?;
        return Ok((
            EventBody::ProcessCommunication { channel: ch, source: source(&toks)?, data: String::new() },
            Some(at),
        ));
    }
    if let Some(ch) = eventname.strip_prefix("PROCESS_LOG_").and_then(channel) {
        let (line, at) = split_at_data(payload);
        let mut toks = Tokens::new();
        token_line(line, &mut toks)?;
        return Ok((EventBody::ProcessLog { channel: ch, source: source(&toks)?, data: String::new() }, Some(at)));
    }
    if let Some(period) = eventname.strip_prefix("TICK_") {
        let Ok(period) = period.parse() else {
            return unknown();
        };
        let mut toks = Tokens::new();
        token_line(payload.trim_end_matches('\n'), &mut toks)?;
        let when = number(&toks, "when")?.ok_or("missing `when`")?;
        return Ok((EventBody::Tick { period, when }, None));
    }
    let body = match eventname {
        "REMOTE_COMMUNICATION" => {
            let (line, at) = split_at_data(payload);
            let mut toks = Tokens::new();
            token_line(line, &mut toks)?;
            return Ok((
                EventBody::RemoteCommunication { kind: required(&toks, "type")?.to_owned(), data: String::new() },
                Some(at),
            ));
        }
        "SUPERVISOR_STATE_CHANGE_RUNNING" => EventBody::SupervisorStateChange { running: true },
        "SUPERVISOR_STATE_CHANGE_STOPPING" => EventBody::SupervisorStateChange { running: false },
        "PROCESS_GROUP_ADDED" | "PROCESS_GROUP_REMOVED" => {
            let mut toks = Tokens::new();
            token_line(payload.trim_end_matches('\n'), &mut toks)?;
            EventBody::ProcessGroup {
                added: eventname == "PROCESS_GROUP_ADDED",
                groupname: required(&toks, "groupname")?.to_owned(),
            }
        }
        "EVENT_BUFFER_OVERFLOW" => {
            let mut toks = Tokens::new();
            token_line(payload.trim_end_matches('\n'), &mut toks)?;
            EventBody::EventBufferOverflow {
                groupname: field(&toks, "groupname").unwrap_or_default().to_owned(),
                fields: toks.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            }
        }
        _ => return unknown(),
    };
    Ok((body, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_line_is_streaming() {
        // (input, expected line, expected remainder); None = Incomplete
        type Case<'a> = (&'a [u8], Option<(&'a [u8], &'a [u8])>);
        let cases: &[Case] = &[
            (b"", None),
            (b"ver:3.0", None),
            (b"ver:3.0\n", Some((b"ver:3.0", b""))),
            (b"ver:3.0\nabc", Some((b"ver:3.0", b"abc"))),
            (b"\n", Some((b"", b""))),
        ];
        for (input, expected) in cases {
            match (header_line(input), expected) {
                (Ok((rest, line)), Some((l, r))) => assert_eq!((line, rest), (*l, *r), "input {input:?}"),
                (Err(nom::Err::Incomplete(_)), None) => {}
                (got, want) => panic!("input {input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn header_from_real_bytes() {
        let h = parse_header_line(
            b"ver:3.0 server:supervisor serial:1 pool:probe poolserial:1 eventname:PROCESS_STATE_STARTING len:60",
        )
        .unwrap();
        assert_eq!(
            h,
            Header {
                ver: "3.0".into(),
                server: "supervisor".into(),
                serial: 1,
                pool: "probe".into(),
                poolserial: 1,
                eventname: "PROCESS_STATE_STARTING".into(),
                len: 60
            }
        );
    }

    #[test]
    fn bad_headers_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"ver:3.0 eventname:TICK_5", "no `len` token"),
            (b"ver:3.0 eventname:TICK_5 len:abc", "`len` is not a number"),
            (b"ver:3.0 eventname:TICK_5 len:-1", "`len` is not a number"),
            (b"ver:3.0 len:3", "no `eventname` token"),
            (b"garbage here", "expected space-separated key:value tokens"),
            (b"", "expected space-separated key:value tokens"),
            (b"eventname:TICK_5 len:3", "no `ver` token"),
            (b"ver:3.0 eventname:X len:1 \xff", "not UTF-8"),
        ];
        for (line, reason) in cases {
            match parse_header_line(line) {
                Err(ProtocolError::BadHeader { reason: r, .. }) => assert_eq!(r, *reason, "line {line:?}"),
                other => panic!("line {line:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_family_from_real_payloads() {
        let ps = |state, from, expected, pid, tries| {
            EventBody::ProcessState(ProcessState {
                state,
                processname: "probe".into(),
                groupname: "probe".into(),
                from_state: from,
                expected,
                pid,
                tries,
            })
        };
        let src = |pid| Source { processname: "talker".into(), groupname: "talker".into(), pid };
        use ProcessStateName::*;
        let cases: Vec<(&str, &str, EventBody)> = vec![
            (
                "PROCESS_STATE_STARTING",
                "processname:probe groupname:probe from_state:STOPPED tries:0",
                ps(Starting, Some(Stopped), None, None, Some(0)),
            ),
            (
                "PROCESS_STATE_EXITED",
                "processname:probe groupname:probe from_state:RUNNING expected:0 pid:13897",
                ps(Exited, Some(Running), Some(false), Some(13897), None),
            ),
            (
                "PROCESS_STATE_BACKOFF",
                "processname:probe groupname:probe from_state:STARTING tries:1",
                ps(Backoff, Some(Starting), None, None, Some(1)),
            ),
            (
                "PROCESS_STATE_FATAL",
                "processname:probe groupname:probe from_state:BACKOFF",
                ps(Fatal, Some(Backoff), None, None, None),
            ),
            (
                "PROCESS_STATE_STOPPED",
                "processname:probe groupname:probe from_state:STOPPING pid:0",
                ps(Stopped, Some(Stopping), None, Some(0), None),
            ),
            (
                "PROCESS_COMMUNICATION_STDOUT",
                "processname:talker groupname:talker pid:13898\nrestart please",
                EventBody::ProcessCommunication {
                    channel: Channel::Stdout,
                    source: src(Some(13898)),
                    data: "restart please".into(),
                },
            ),
            (
                "PROCESS_COMMUNICATION_STDERR",
                "processname:talker groupname:talker pid:1\nline one\nline two\ncafé ✓",
                EventBody::ProcessCommunication {
                    channel: Channel::Stderr,
                    source: src(Some(1)),
                    data: "line one\nline two\ncafé ✓".into(),
                },
            ),
            (
                "PROCESS_LOG_STDOUT",
                "processname:talker groupname:talker pid:7 channel:stdout\nhello\n",
                EventBody::ProcessLog { channel: Channel::Stdout, source: src(Some(7)), data: "hello\n".into() },
            ),
            (
                "REMOTE_COMMUNICATION",
                "type:elb-quorum\nrestart web",
                EventBody::RemoteCommunication { kind: "elb-quorum".into(), data: "restart web".into() },
            ),
            ("REMOTE_COMMUNICATION", "type:x\n", EventBody::RemoteCommunication { kind: "x".into(), data: "".into() }),
            ("TICK_5", "when:1795563455", EventBody::Tick { period: 5, when: 1795563455 }),
            ("TICK_3600", "when:1", EventBody::Tick { period: 3600, when: 1 }),
            ("SUPERVISOR_STATE_CHANGE_RUNNING", "", EventBody::SupervisorStateChange { running: true }),
            ("SUPERVISOR_STATE_CHANGE_STOPPING", "", EventBody::SupervisorStateChange { running: false }),
            (
                "PROCESS_GROUP_ADDED",
                "groupname:web\n",
                EventBody::ProcessGroup { added: true, groupname: "web".into() },
            ),
            (
                "PROCESS_GROUP_REMOVED",
                "groupname:web\n",
                EventBody::ProcessGroup { added: false, groupname: "web".into() },
            ),
            (
                "EVENT_BUFFER_OVERFLOW",
                "groupname:elb-quorum event:x",
                EventBody::EventBufferOverflow {
                    groupname: "elb-quorum".into(),
                    fields: vec![("groupname".into(), "elb-quorum".into()), ("event".into(), "x".into())],
                },
            ),
            ("SOMETHING_NEW", "any\nthing", EventBody::Unknown { payload: "any\nthing".into() }),
            ("PROCESS_STATE_NEWSTATE", "x", EventBody::Unknown { payload: "x".into() }),
        ];
        for (name, payload, want) in cases {
            assert_eq!(parse_body(name, payload), Ok(want), "{name}: {payload:?}");
        }
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let cases = [
            ("PROCESS_STATE_EXITED", "groupname:probe from_state:RUNNING", "missing `processname`"),
            ("PROCESS_STATE_EXITED", "processname:p expected:yes", "`expected` is not a number"),
            ("TICK_5", "when:soon", "`when` is not a number"),
            ("TICK_5", "", "expected key:value tokens"),
            ("REMOTE_COMMUNICATION", "restart web", "expected key:value tokens"),
            ("PROCESS_COMMUNICATION_STDOUT", "pid:1\nrestart", "missing `processname`"),
        ];
        for (name, payload, reason) in cases {
            let err = parse_body(name, payload).unwrap_err();
            assert!(err.contains(reason), "{name} {payload:?}: {err}");
        }
    }
}
