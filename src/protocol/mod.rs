//! supervisor's event-listener protocol: typed events, the nom parsers, a streaming decoder and the
//! reply bytes. Knows bytes and nothing else: no I/O, no clock, no logging.
//!
//! Wire format (supervisor 4.3, `ver:3.0`): a header line of space-separated `key:value` tokens ending
//! in `\n`, then exactly `len` *characters* (not bytes: supervisor issue #1243) of UTF-8 payload with no
//! terminator. `tests/fixtures/captured_stream.txt` holds bytes captured from supervisor 4.3.0.

mod decoder;
mod parse;
mod reply;

pub use decoder::{DecoderLimits, EventDecoder};
pub use parse::{parse_body, parse_header_line};
pub use reply::{ACK_READY, READY, RESULT_FAIL, RESULT_OK};

use std::sync::Arc;

use thiserror::Error;

/// The header line supervisord writes before each payload. Its strings are shared between events
/// (`Arc<str>`): they repeat on every event, and allocating them each time was a third of the parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub ver: Arc<str>,
    pub server: Arc<str>,
    pub serial: u64,
    pub pool: Arc<str>,
    pub poolserial: u64,
    pub eventname: Arc<str>,
    /// Payload length in characters (Unicode scalar values), as supervisord counts it.
    pub len: usize,
}

/// One event: its header and its typed body. Owns its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub header: Header,
    pub body: EventBody,
}

/// Output channel of a PROCESS_COMMUNICATION or PROCESS_LOG event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stdout,
    Stderr,
}

/// A process state: what a PROCESS_STATE_* event announces, and what `getProcessInfo` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStateName {
    Stopped,
    Starting,
    Running,
    Backoff,
    Stopping,
    Exited,
    Fatal,
    Unknown,
}

impl ProcessStateName {
    /// Maps supervisord's numeric state (`supervisor/states.py`) to a state.
    pub fn from_code(code: i32) -> Self {
        match code {
            0 => Self::Stopped,
            10 => Self::Starting,
            20 => Self::Running,
            30 => Self::Backoff,
            40 => Self::Stopping,
            100 => Self::Exited,
            200 => Self::Fatal,
            _ => Self::Unknown,
        }
    }

    /// Maps the suffix of `PROCESS_STATE_<NAME>` (and supervisor's state descriptions) to a state.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "STOPPED" => Self::Stopped,
            "STARTING" => Self::Starting,
            "RUNNING" => Self::Running,
            "BACKOFF" => Self::Backoff,
            "STOPPING" => Self::Stopping,
            "EXITED" => Self::Exited,
            "FATAL" => Self::Fatal,
            "UNKNOWN" => Self::Unknown,
            _ => return None,
        })
    }
}

/// Payload of a PROCESS_STATE_* event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    pub state: ProcessStateName,
    pub processname: String,
    pub groupname: String,
    pub from_state: Option<ProcessStateName>,
    /// Only on EXITED: whether the exit code was one of `exitcodes`.
    pub expected: Option<bool>,
    pub pid: Option<u32>,
    /// Only on STARTING and BACKOFF.
    pub tries: Option<u32>,
}

/// Which process an output event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub processname: String,
    pub groupname: String,
    pub pid: Option<u32>,
}

impl Source {
    /// The name supervisord's XML-RPC API takes for this process: `group:process`, or the bare name
    /// when group and process share it.
    pub fn namespec(&self) -> String {
        if self.groupname.is_empty() || self.groupname == self.processname {
            self.processname.clone()
        } else {
            format!("{}:{}", self.groupname, self.processname)
        }
    }
}

/// Typed payload of every event family supervisor emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    ProcessState(ProcessState),
    ProcessCommunication {
        channel: Channel,
        source: Source,
        data: String,
    },
    ProcessLog {
        channel: Channel,
        source: Source,
        data: String,
    },
    RemoteCommunication {
        kind: String,
        data: String,
    },
    Tick {
        period: u32,
        when: u64,
    },
    SupervisorStateChange {
        running: bool,
    },
    ProcessGroup {
        added: bool,
        groupname: String,
    },
    EventBufferOverflow {
        groupname: String,
        fields: Vec<(String, String)>,
    },
    /// An event name this version does not know: kept with its raw payload, never an error.
    Unknown {
        payload: String,
    },
}

/// What went wrong in the input stream.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The header line cannot be parsed: the stream cannot be resynchronised.
    #[error("unparsable event header {quoted}: {reason}")]
    BadHeader { quoted: String, reason: &'static str },
    /// A well-framed event (fully consumed) whose payload does not fit its event name.
    #[error("event {serial} ({eventname}) has a malformed payload: {reason}")]
    BadPayload { serial: u64, eventname: String, reason: String },
    /// A well-framed event whose payload is larger than the decoder keeps; it was skipped whole.
    #[error("event {serial} ({eventname}) skipped: payload of {len} characters exceeds the limit of {limit}")]
    Oversized { serial: u64, eventname: String, len: usize, limit: usize },
}

impl ProtocolError {
    /// Whether the decoder is still in sync after this error (the event was consumed whole).
    pub fn is_recoverable(&self) -> bool {
        !matches!(self, ProtocolError::BadHeader { .. })
    }
}

/// Quotes at most `max` bytes of `bytes` for an error message, escaping what is not printable.
pub fn quote(bytes: &[u8], max: usize) -> String {
    let shown = &bytes[..bytes.len().min(max)];
    let mut s = format!("{:?}", String::from_utf8_lossy(shown));
    if bytes.len() > max {
        s.push_str(&format!(" (+{} bytes)", bytes.len() - max));
    }
    s
}
