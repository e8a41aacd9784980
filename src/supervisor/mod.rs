//! supervisord's XML-RPC API: typed calls, typed faults, and the restart semantics the cycle needs.
//! XML-RPC encoding and decoding is `dxr`'s; HTTP is in `transport`. Never logs the password.

mod transport;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use dxr::{MethodCall, Value};
use thiserror::Error;
use tokio::time::Instant;

pub use transport::{Endpoint, Transport};

use crate::config::SupervisorSettings;
use crate::protocol::{quote, ProcessStateName};

/// supervisord's fault codes (`supervisor/xmlrpc.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultCode {
    UnknownMethod,
    IncorrectParameters,
    BadArguments,
    SignatureUnsupported,
    ShutdownState,
    BadName,
    BadSignal,
    NoFile,
    NotExecutable,
    Failed,
    AbnormalTermination,
    SpawnError,
    AlreadyStarted,
    NotRunning,
    Success,
    AlreadyAdded,
    StillRunning,
    CantReread,
    Other(i32),
}

impl FaultCode {
    pub fn from_code(code: i32) -> Self {
        use FaultCode::*;
        match code {
            1 => UnknownMethod,
            2 => IncorrectParameters,
            3 => BadArguments,
            4 => SignatureUnsupported,
            6 => ShutdownState,
            10 => BadName,
            11 => BadSignal,
            20 => NoFile,
            21 => NotExecutable,
            30 => Failed,
            40 => AbnormalTermination,
            50 => SpawnError,
            60 => AlreadyStarted,
            70 => NotRunning,
            80 => Success,
            90 => AlreadyAdded,
            91 => StillRunning,
            92 => CantReread,
            other => Other(other),
        }
    }
}

/// What a supervisord call can fail with.
#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("supervisord's socket {path} does not exist: is supervisord running, and is --supervisor-url right?")]
    SocketMissing { path: String },
    #[error("permission denied on supervisord's socket {path}: run as the user that owns it (see `chown`/`chmod` in [unix_http_server])")]
    PermissionDenied { path: String },
    /// `--supervisor-url` is not a URL we can use (a configuration error).
    #[error("{why}")]
    BadUrl { why: String },
    #[error("cannot connect to supervisord at {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("supervisord at {url} rejected the credentials: set SUPERVISOR_USERNAME and SUPERVISOR_PASSWORD (or --supervisor-username/--supervisor-password-file) to match supervisord.conf")]
    Unauthorized { url: String },
    #[error("supervisord at {url} did not answer {method} within {after:?}")]
    Timeout { url: String, method: String, after: Duration },
    #[error("HTTP error talking to supervisord at {url}: {detail}")]
    Http { url: String, detail: String },
    #[error("supervisord's answer to {method} is not valid XML-RPC: {quoted}")]
    InvalidResponse { method: String, quoted: String },
    #[error("supervisord refused {method}: {message}")]
    Fault { method: String, code: FaultCode, message: String },
    #[error("unknown program {name:?}: supervisord has no such program or group (supervisorctl status lists them)")]
    UnknownProgram { name: String },
    #[error("program {program} did not come back: {state}{detail}")]
    ProgramFailed { program: String, state: String, detail: String },
    #[error("programs {programs} were not RUNNING within {after:?} (last states: {states})")]
    RestartTimeout { programs: String, after: Duration, states: String },
}

impl SupervisorError {
    pub fn fault_code(&self) -> Option<FaultCode> {
        match self {
            SupervisorError::Fault { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `getProcessInfo`'s answer, the fields the cycle uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub name: String,
    pub group: String,
    pub state: ProcessStateName,
    pub statename: String,
    pub pid: u32,
    pub spawnerr: String,
    pub exitstatus: i32,
    pub description: String,
}

impl ProcessInfo {
    /// `group:name`, the name every call accepts.
    pub fn namespec(&self) -> String {
        format!("{}:{}", self.group, self.name)
    }

    fn from_value(method: &str, v: Value) -> Result<Self, SupervisorError> {
        let invalid =
            |what: &str| SupervisorError::InvalidResponse { method: method.to_owned(), quoted: what.to_owned() };
        let Value::Struct(m) = v else { return Err(invalid("expected a struct")) };
        let s = |k: &str| match m.get(k) {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let i = |k: &str| match m.get(k) {
            Some(Value::Integer(i)) => *i,
            _ => 0,
        };
        if !m.contains_key("name") || !m.contains_key("state") {
            return Err(invalid("process info without name or state"));
        }
        Ok(ProcessInfo {
            name: s("name"),
            group: s("group"),
            state: ProcessStateName::from_code(i("state")),
            statename: s("statename"),
            pid: i("pid").max(0) as u32,
            spawnerr: s("spawnerr"),
            exitstatus: i("exitstatus"),
            description: s("description"),
        })
    }
}

/// An XML-RPC client for supervisord.
#[derive(Debug, Clone)]
pub struct SupervisorClient {
    transport: Transport,
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

impl SupervisorClient {
    /// Fails only on a URL it cannot use (`BadUrl`); nothing is contacted yet.
    pub fn new(settings: &SupervisorSettings) -> Result<Self, SupervisorError> {
        Ok(Self {
            transport: Transport::new(
                &settings.url,
                settings.username.as_deref(),
                settings.password.as_ref(),
                settings.rpc_timeout,
            )?,
        })
    }

    pub fn url(&self) -> &str {
        &self.transport.url
    }

    /// One call: encodes, posts, decodes the response or the fault.
    pub async fn call(&self, method: &str, params: Vec<Value>) -> Result<Value, SupervisorError> {
        self.call_with_timeout(method, params, self.transport.timeout()).await
    }

    async fn call_with_timeout(
        &self,
        method: &str,
        params: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, SupervisorError> {
        let body = MethodCall { name: method.into(), params }.to_xml().map_err(|e| {
            SupervisorError::InvalidResponse { method: method.to_owned(), quoted: format!("cannot encode call: {e}") }
        })?;
        let body = format!("<?xml version=\"1.0\"?>\n{body}");
        let bytes = self.transport.post(method, body, timeout).await?;
        decode_response(method, &bytes)
    }

    /// `supervisor.getState`: (code, name), e.g. (1, "RUNNING").
    pub async fn get_state(&self) -> Result<(i32, String), SupervisorError> {
        let v = self.call("supervisor.getState", vec![]).await?;
        match v {
            Value::Struct(m) => match (m.get("statecode"), m.get("statename")) {
                (Some(Value::Integer(c)), Some(Value::String(n))) => Ok((*c, n.clone())),
                _ => Err(SupervisorError::InvalidResponse {
                    method: "supervisor.getState".into(),
                    quoted: format!("{m:?}"),
                }),
            },
            other => Err(SupervisorError::InvalidResponse {
                method: "supervisor.getState".into(),
                quoted: format!("{other:?}"),
            }),
        }
    }

    pub async fn process_info(&self, name: &str) -> Result<ProcessInfo, SupervisorError> {
        let v = self.call("supervisor.getProcessInfo", vec![s(name)]).await?;
        ProcessInfo::from_value("supervisor.getProcessInfo", v)
    }

    pub async fn all_process_info(&self) -> Result<Vec<ProcessInfo>, SupervisorError> {
        let method = "supervisor.getAllProcessInfo";
        match self.call(method, vec![]).await? {
            Value::Array(items) => items.into_iter().map(|v| ProcessInfo::from_value(method, v)).collect(),
            _ => Err(SupervisorError::InvalidResponse { method: method.into(), quoted: "expected an array".into() }),
        }
    }

    /// `stopProcess(name, wait)`; with `wait` supervisord answers once the process has stopped.
    pub async fn stop(&self, name: &str, wait: bool, timeout: Duration) -> Result<Value, SupervisorError> {
        self.call_with_timeout("supervisor.stopProcess", vec![s(name), Value::Boolean(wait)], timeout).await
    }

    pub async fn start(&self, name: &str, wait: bool, timeout: Duration) -> Result<Value, SupervisorError> {
        self.call_with_timeout("supervisor.startProcess", vec![s(name), Value::Boolean(wait)], timeout).await
    }

    pub async fn signal(&self, name: &str, signal: &str) -> Result<(), SupervisorError> {
        self.call("supervisor.signalProcess", vec![s(name), s(signal)]).await.map(|_| ())
    }

    /// `sendRemoteCommEvent(type, data)`: a REMOTE_COMMUNICATION event for every listener subscribed.
    pub async fn send_remote_comm_event(&self, kind: &str, data: &str) -> Result<(), SupervisorError> {
        self.call("supervisor.sendRemoteCommEvent", vec![s(kind), s(data)]).await.map(|_| ())
    }

    /// Expands program names to processes; an unknown name is an error before anything changes.
    pub async fn resolve(&self, names: &[String]) -> Result<Vec<ProcessInfo>, SupervisorError> {
        let all = self.all_process_info().await?;
        let mut out: BTreeMap<String, ProcessInfo> = BTreeMap::new();
        for name in names {
            let matched: Vec<&ProcessInfo> = match name.split_once(':') {
                Some((g, "*")) => all.iter().filter(|p| p.group == g).collect(),
                Some((g, p)) => all.iter().filter(|i| i.group == g && i.name == p).collect(),
                None => all.iter().filter(|i| i.group == *name && i.name == *name).collect(),
            };
            if matched.is_empty() {
                return Err(SupervisorError::UnknownProgram { name: name.clone() });
            }
            for p in matched {
                out.insert(p.namespec(), p.clone());
            }
        }
        Ok(out.into_values().collect())
    }

    /// Stops (already stopped is fine) and starts each process, then waits until every one is
    /// RUNNING (its `startsecs` passed). FATAL, EXITED or STOPPED after the start is a failure with
    /// the process's state and spawn error; so is not being RUNNING by `timeout`.
    pub async fn restart(
        &self,
        names: &[String],
        timeout: Duration,
        poll: Duration,
    ) -> Result<Vec<ProcessInfo>, SupervisorError> {
        let deadline = Instant::now() + timeout;
        let procs = self.resolve(names).await?;
        for p in &procs {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stop(&p.namespec(), true, left).await {
                Ok(_) => {}
                Err(e) if e.fault_code() == Some(FaultCode::NotRunning) => {}
                Err(e) => return Err(e),
            }
        }
        // A stop already in flight (an operator's, or a previous listener's killed mid-cycle) answers
        // NOT_RUNNING while the process is still STOPPING: starting it then would do nothing.
        self.wait_until(&procs, deadline, timeout, poll, |s| s != ProcessStateName::Stopping, |_| false).await?;
        for p in &procs {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.start(&p.namespec(), false, left).await {
                Ok(_) => {}
                Err(e) if e.fault_code() == Some(FaultCode::AlreadyStarted) => {}
                // startProcess reaps at once: a process that exited before that answers SPAWN_ERROR,
                // yet supervisord retries it (BACKOFF, up to `startretries`) like any quick exit.
                // Whether it comes up or ends FATAL is for the wait below to see, not this race.
                Err(e) if e.fault_code() == Some(FaultCode::SpawnError) => {}
                Err(SupervisorError::Fault { code: code @ FaultCode::AbnormalTermination, message, .. }) => {
                    return Err(SupervisorError::ProgramFailed {
                        program: p.namespec(),
                        state: format!("{code:?}"),
                        detail: format!(": {message}"),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        // BACKOFF is retried by supervisord until FATAL: wait it out.
        let failed = |s| {
            matches!(
                s,
                ProcessStateName::Fatal
                    | ProcessStateName::Exited
                    | ProcessStateName::Stopped
                    | ProcessStateName::Unknown
            )
        };
        self.wait_until(&procs, deadline, timeout, poll, |s| s == ProcessStateName::Running, failed).await
    }

    /// Polls the processes until every one satisfies `done`; a process in a state `failed` says
    /// never heals is an error with its state, spawn error and exit status; so is the deadline.
    async fn wait_until(
        &self,
        procs: &[ProcessInfo],
        deadline: Instant,
        timeout: Duration,
        poll: Duration,
        done: fn(ProcessStateName) -> bool,
        failed: fn(ProcessStateName) -> bool,
    ) -> Result<Vec<ProcessInfo>, SupervisorError> {
        loop {
            let mut infos = Vec::with_capacity(procs.len());
            for p in procs {
                let info = self.process_info(&p.namespec()).await?;
                if failed(info.state) {
                    let mut detail = String::new();
                    if !info.spawnerr.is_empty() {
                        detail.push_str(&format!(" (spawn error: {})", info.spawnerr));
                    }
                    if info.state == ProcessStateName::Exited {
                        detail.push_str(&format!(" (exit status {})", info.exitstatus));
                    }
                    return Err(SupervisorError::ProgramFailed {
                        program: p.namespec(),
                        state: info.statename,
                        detail,
                    });
                }
                infos.push(info);
            }
            if infos.iter().all(|i| done(i.state)) {
                return Ok(infos);
            }
            if Instant::now() >= deadline {
                let states =
                    infos.iter().map(|i| format!("{}={}", i.namespec(), i.statename)).collect::<Vec<_>>().join(", ");
                let programs = procs.iter().map(|p| p.namespec()).collect::<Vec<_>>().join(" ");
                return Err(SupervisorError::RestartTimeout { programs, after: timeout, states });
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }
}

/// Decodes a methodResponse: the value, or the fault as `SupervisorError::Fault`.
pub fn decode_response(method: &str, bytes: &[u8]) -> Result<Value, SupervisorError> {
    let invalid = || SupervisorError::InvalidResponse { method: method.to_owned(), quoted: quote(bytes, 120) };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid())?;
    let body = strip_declaration(text);
    if body.contains("<fault>") {
        let fault = dxr::FaultResponse::from_xml(body).map_err(|_| invalid())?.fault;
        let message = fault.string().to_owned();
        return Err(SupervisorError::Fault {
            method: method.to_owned(),
            code: FaultCode::from_code(fault.code()),
            message,
        });
    }
    dxr::MethodResponse::from_xml(body).map(|r| r.value).map_err(|_| invalid())
}

fn strip_declaration(text: &str) -> &str {
    let t = text.trim_start();
    match t.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").map(|(_, r)| r.trim_start()).unwrap_or(t),
        None => t,
    }
}

/// What the restart cycle needs from the local process manager; supervisord in production, a fake
/// in the fleet tests and benchmarks.
pub trait Services: Send + Sync {
    /// Checks that every name exists; nothing changes.
    fn validate(&self, programs: &[String]) -> impl Future<Output = Result<(), SupervisorError>> + Send;
    /// Restarts and waits until RUNNING.
    fn restart(&self, programs: &[String]) -> impl Future<Output = Result<(), SupervisorError>> + Send;
    /// Whether every process of these programs is RUNNING now.
    fn running(&self, programs: &[String]) -> impl Future<Output = Result<bool, SupervisorError>> + Send;
}

/// `Services` through supervisord's XML-RPC API.
#[derive(Debug, Clone)]
pub struct Supervisord {
    pub client: SupervisorClient,
    pub restart_timeout: Duration,
    pub poll: Duration,
}

impl Services for Supervisord {
    async fn validate(&self, programs: &[String]) -> Result<(), SupervisorError> {
        self.client.resolve(programs).await.map(|_| ())
    }

    async fn restart(&self, programs: &[String]) -> Result<(), SupervisorError> {
        self.client.restart(programs, self.restart_timeout, self.poll).await.map(|_| ())
    }

    async fn running(&self, programs: &[String]) -> Result<bool, SupervisorError> {
        let procs = self.client.resolve(programs).await?;
        Ok(procs.iter().all(|p| p.state == ProcessStateName::Running))
    }
}

impl fmt::Display for ProcessInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} pid {}", self.namespec(), self.statename, self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_python_xmlrpclib_answers() {
        let ok = b"<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><boolean>1</boolean></value>\n</param>\n</params>\n</methodResponse>\n";
        assert_eq!(decode_response("m", ok).unwrap(), Value::Boolean(true));
        let fault = b"<?xml version='1.0'?>\n<methodResponse>\n<fault>\n<value><struct>\n<member>\n<name>faultCode</name>\n<value><int>10</int></value>\n</member>\n<member>\n<name>faultString</name>\n<value><string>BAD_NAME: nope</string></value>\n</member>\n</struct></value>\n</fault>\n</methodResponse>\n";
        match decode_response("supervisor.getProcessInfo", fault) {
            Err(SupervisorError::Fault { code: FaultCode::BadName, message, .. }) => {
                assert_eq!(message, "BAD_NAME: nope")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_quoted_not_panicked() {
        for body in [&b"<html>oops</html>"[..], b"", b"\xff\xfe", b"<methodResponse><params>"] {
            match decode_response("supervisor.getState", body) {
                Err(SupervisorError::InvalidResponse { quoted, .. }) => assert!(quoted.starts_with('"'), "{quoted}"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
    }
}
