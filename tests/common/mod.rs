//! Test harness: the real components (supervisord, the moto AWS emulator) started per test on
//! 127.0.0.1 and stopped by Drop guards, plus helpers. The tools come from the project's venv
//! (`scripts/test-env`); a missing one fails the test with the command that installs it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const INSTALL_HINT: &str = "run `scripts/test-env` (the README's test command, `scripts/test`, does it) to create the venv with supervisor and moto[server]";

/// The project's venv (`ELB_QUORUM_VENV`, default `.venv` at the repository root).
pub fn venv() -> PathBuf {
    std::env::var_os("ELB_QUORUM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"))
}

/// A tool from the venv, or a failure that says how to install it.
pub fn tool(name: &str) -> PathBuf {
    let p = venv().join("bin").join(name);
    assert!(p.exists(), "{} not found: {INSTALL_HINT}", p.display());
    p
}

pub fn python() -> PathBuf {
    tool("python")
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_elb-quorum"))
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 50 ms until it returns Some, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a child on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The moto AWS emulator in server mode on 127.0.0.1.
pub struct Moto {
    pub endpoint: String,
    _child: Guard,
}

impl Moto {
    pub fn start() -> Moto {
        let mut cmd = Command::new(python());
        cmd.arg(fixture("moto_locked.py")).args(["127.0.0.1", "0", "--unlocked"]);
        Self::spawn(&mut cmd)
    }

    /// moto serving one request at a time (`tests/fixtures/moto_locked.py`): its DynamoDB is not
    /// atomic under concurrency otherwise. With `record`, every call is logged there as a JSON line.
    pub fn start_locked(record: Option<&Path>) -> Moto {
        let mut cmd = Command::new(python());
        cmd.arg(fixture("moto_locked.py")).args(["127.0.0.1", "0"]);
        if let Some(r) = record {
            cmd.arg(r);
        }
        Self::spawn(&mut cmd)
    }

    /// `start_locked` behind one account's API throttling: `buckets` is
    /// `family=size:refill,...` (`elb1`, `elb2`, `ec2`, `reg`; see `tests/fixtures/moto_locked.py`).
    pub fn start_limited(record: &Path, buckets: &str) -> Moto {
        let mut cmd = Command::new(python());
        cmd.arg(fixture("moto_locked.py")).args(["127.0.0.1", "0"]).arg(record).args(["--buckets", buckets]);
        Self::spawn(&mut cmd)
    }

    /// Starts moto on a port the kernel picks (port 0) and reads the port it bound from its first
    /// line of output, printed once it listens: no free-port guess another test could take first.
    fn spawn(cmd: &mut Command) -> Moto {
        let mut child = cmd
            .env_remove("AWS_PROFILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting moto: {e}; {INSTALL_HINT}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = Guard(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading moto's port");
        let port: u16 = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("moto did not start (first line {line:?}); {INSTALL_HINT}"));
        Moto { endpoint: format!("http://127.0.0.1:{port}"), _child: guard }
    }

    /// Environment for anything that talks to this emulator (and nothing else).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Runs `tests/fixtures/moto_cluster.py` against this emulator and parses its JSON.
    pub fn fixture(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(python())
            .arg(fixture("moto_cluster.py"))
            .arg(&self.endpoint)
            .args(args)
            .env_remove("AWS_PROFILE")
            .output()
            .expect("running moto_cluster.py");
        assert!(out.status.success(), "moto_cluster.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("moto_cluster.py prints JSON")
    }

    /// Creates a Classic ELB `lb` with `count` members named `nodeI.<ns>`; returns their ids.
    pub fn cluster(&self, lb: &str, ns: &str, count: usize) -> Vec<String> {
        let v = self.fixture(&["create", "--lb", lb, "--namespace", ns, "--count", &count.to_string()]);
        v["members"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
    }

    /// Creates a strict-mode permit table.
    pub fn permit_table(&self, name: &str) {
        self.fixture(&["table", name]);
    }

    /// An AWS configuration that reaches this emulator only.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "tests");
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .load()
            .await
    }

    /// An ALB in two subnets with instance target groups `groups` (health check every 5 s, healthy
    /// after 2, timeout 2 s), `ids` registered on port 80, and a listener forwarding to the first.
    /// Returns group name → ARN.
    pub fn alb(&self, name: &str, groups: &[&str], ids: &[String]) -> std::collections::BTreeMap<String, String> {
        let v = self.fixture(&["alb", "--name", name, "--groups", &groups.join(","), "--ids", &ids.join(",")]);
        serde_json::from_value(v["groups"].clone()).unwrap()
    }

    /// Instance id → "state (reason)" for every target of a target group.
    pub fn tg_health(&self, arn: &str) -> std::collections::BTreeMap<String, String> {
        serde_json::from_value(self.fixture(&["tg-health", arn])).unwrap()
    }

    /// An Auto Scaling group of `count` (health checks from the load balancer, grace 120 s) with the
    /// Classic load balancer `lb` attached, and its minimum size; returns the instance ids.
    pub fn asg(&self, name: &str, count: usize, lb: &str, min: usize) -> Vec<String> {
        let v = self.fixture(&[
            "asg",
            "--name",
            name,
            "--count",
            &count.to_string(),
            "--lb",
            lb,
            "--min",
            &min.to_string(),
        ]);
        serde_json::from_value(v["ids"].clone()).unwrap()
    }

    /// The group's lifecycle states by instance, and its desired capacity.
    pub fn asg_state(&self, name: &str) -> (std::collections::BTreeMap<String, String>, u64) {
        let v = self.fixture(&["asg-state", name]);
        (serde_json::from_value(v["lifecycle"].clone()).unwrap(), v["desired"].as_u64().unwrap())
    }

    /// Instance id → State, as the load balancer reports registered instances.
    pub fn health(&self, lb: &str) -> std::collections::BTreeMap<String, String> {
        serde_json::from_value(self.fixture(&["health", lb])).unwrap()
    }
}

/// One call the serialized emulator's recorder logged (`tests/fixtures/moto_locked.py`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Call {
    pub t: f64,
    pub action: String,
    pub status: u16,
    pub kind: Option<String>,
    pub instance: Option<String>,
    /// Every instance an ELB call names (a batch names several).
    #[serde(default)]
    pub instances: Vec<String>,
    /// The target group ARN the call names.
    pub group: Option<String>,
    /// The Classic load balancer the call names.
    pub lb: Option<String>,
    /// Behind `start_limited`: the call's throttling family, and whether it was throttled.
    #[serde(default)]
    pub family: Option<String>,
    #[serde(default)]
    pub throttled: Option<bool>,
}

/// Every call the recorder logged to `path`, in applied order.
pub fn recorded(path: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("recorder line {l:?}: {e}"))).collect()
}

/// The calls that change a load balancer: register or deregister, Classic or target group.
pub fn mutating(calls: &[Call]) -> Vec<&Call> {
    calls.iter().filter(|c| c.action.starts_with("Register") || c.action.starts_with("Deregister")).collect()
}

/// A number no other call in this test process returned (for unique names within one emulator).
pub fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A unique load-balancer name and namespace per test (`t<n>-example-com`, `t<n>.example.com`).
pub fn unique_cluster() -> (String, String) {
    let n = unique();
    (format!("t{n}-example-com"), format!("t{n}.example.com"))
}

/// A real supervisord with its own directory, unix socket (user/secret) and optional inet port.
pub struct Supervisord {
    pub dir: tempfile::TempDir,
    pub inet_port: Option<u16>,
    child: Option<Guard>,
}

pub const USER: &str = "tester";
pub const PASSWORD: &str = "s3cret-pw";

impl Supervisord {
    /// Starts supervisord with `programs` (conf sections) appended to a base config.
    pub fn start(programs: &str, inet: bool, env: &[(String, String)]) -> Supervisord {
        // supervisord cannot be given port 0, so an inet port is a guess another process may take
        // first; supervisord then exits at once ("Another program is already listening"), and the
        // start is tried again with another port.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_start(programs, inet, env) {
                Ok(s) => return s,
                Err(log) if inet && attempts < 5 => eprintln!("supervisord did not start, trying another port: {log}"),
                Err(log) => panic!("supervisord did not start: {log}"),
            }
        }
    }

    fn try_start(programs: &str, inet: bool, env: &[(String, String)]) -> Result<Supervisord, String> {
        let dir = tempfile::tempdir().unwrap();
        let inet_port = inet.then(free_port);
        let here = dir.path().display().to_string();
        let mut conf = format!(
            "[unix_http_server]\nfile={here}/supervisor.sock\nusername={USER}\npassword={PASSWORD}\n\n\
             [supervisord]\nlogfile={here}/supervisord.log\npidfile={here}/supervisord.pid\nchildlogdir={here}\nnodaemon=true\nloglevel=debug\n\n\
             [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=unix://{here}/supervisor.sock\nusername={USER}\npassword={PASSWORD}\n\n"
        );
        if let Some(p) = inet_port {
            conf.push_str(&format!("[inet_http_server]\nport=127.0.0.1:{p}\nusername={USER}\npassword={PASSWORD}\n\n"));
        }
        conf.push_str(&programs.replace("{here}", &here));
        std::fs::write(dir.path().join("supervisord.conf"), conf).unwrap();
        let mut cmd = Command::new(tool("supervisord"));
        cmd.args(["-n", "-c"]).arg(dir.path().join("supervisord.conf"));
        cmd.env_remove("AWS_PROFILE").env_remove("SUPERVISOR_SERVER_URL").env("PATH", path_with_venv());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let stderr = std::fs::File::create(dir.path().join("supervisord.stderr")).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting supervisord: {e}; {INSTALL_HINT}"));
        let mut s = Supervisord { dir, inet_port, child: Some(Guard(child)) };
        // Started: both servers bound (it logs this line after making them), or gone.
        let log = s.path("supervisord.log");
        let started = eventually(Duration::from_secs(20), "supervisord to start or exit", || {
            if std::fs::read_to_string(&log).unwrap_or_default().contains("supervisord started with pid") {
                return Some(true);
            }
            let child = &mut s.child.as_mut().expect("just started").0;
            child.try_wait().ok().flatten().map(|_| false)
        });
        if started {
            return Ok(s);
        }
        Err(format!("{} {}", s.read("supervisord.stderr").trim(), s.read("supervisord.log")))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("supervisor.sock")
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Runs supervisorctl with this instance's config.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(tool("supervisorctl"))
            .arg("-c")
            .arg(self.dir.path().join("supervisord.conf"))
            .args(args)
            .output()
            .expect("running supervisorctl")
    }

    /// `supervisorctl status NAME` text.
    pub fn status(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.ctl(&["status", name]).stdout).into_owned()
    }

    /// The pid of a RUNNING program, if it is RUNNING.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let s = self.status(name);
        if !s.contains("RUNNING") {
            return None;
        }
        s.split("pid ").nth(1)?.split(',').next()?.trim().parse().ok()
    }

    /// Environment for a client of this supervisord (our binary outside supervisord).
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("SUPERVISOR_SERVER_URL".into(), self.url()),
            ("SUPERVISOR_USERNAME".into(), USER.into()),
            ("SUPERVISOR_PASSWORD".into(), PASSWORD.into()),
        ]
    }

    /// Stops supervisord and waits for it (its children get SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut g) = self.child.take() {
            unsafe_kill(g.0.id(), "TERM");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = g.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            for log in ["supervisord.log", "listener.log", "listener.err"] {
                let text = self.read(log);
                if !text.is_empty() {
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("---- {log} (last lines) ----");
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// PATH with the venv's bin first, so supervisord's children find its python.
pub fn path_with_venv() -> String {
    format!("{}:{}", venv().join("bin").display(), std::env::var("PATH").unwrap_or_default())
}

/// Sends a signal with kill(1).
pub fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Our binary with `args` and `env`, no stdin, logs on stderr, no stray AWS profile or supervisord.
pub fn bin_command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(bin());
    // A state directory of its own unless the test names one (flag or env): never the machine's
    // /var/lib/elb-quorum, whose lock another test (or another test run) may hold. Under the
    // build's own scratch directory (target/tmp), not /tmp, where each run would leave some.
    let state = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "elb-quorum-test-state-{}-{}",
        std::process::id(),
        unique()
    ));
    cmd.args(args)
        .env_remove("AWS_PROFILE")
        .env_remove("SUPERVISOR_SERVER_URL")
        .env("ELB_QUORUM_LOG_TARGET", "stderr")
        .env("ELB_QUORUM_STATE_DIR", state)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs our binary (see `bin_command`) and returns its output.
pub fn run_bin(args: &[&str], env: &[(String, String)]) -> Output {
    bin_command(args, env).output().expect("running elb-quorum")
}

/// `elb-quorum restart PROGRAM` as node `host` of the cluster, with `extra` flags.
pub fn one_shot(
    program: &str,
    host: &str,
    id: &str,
    state: &std::path::Path,
    extra: &[&str],
    env: &[(String, String)],
) -> std::process::Output {
    let mut args = vec!["restart", program, "--hostname", host, "--domain", "example.com", "--instance-id", id];
    args.extend(["--state-dir", state.to_str().unwrap()]);
    args.extend(extra);
    run_bin(&args, env)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Counts the lines of `log` containing `needle`.
pub fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Reads a child's stdout fully on a thread (for protocol tests).
pub fn drain<R: Read + Send + 'static>(r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let mut r = r;
        let _ = r.read_to_end(&mut v);
        v
    })
}

pub fn write_lines(w: &mut impl Write, lines: &[&str]) {
    for l in lines {
        writeln!(w, "{l}").unwrap();
    }
}

pub fn lines_of<R: Read>(r: R) -> Vec<String> {
    BufReader::new(r).lines().map_while(Result::ok).collect()
}

/// A real supervisord running `web` and the listener with `listen_args` (fast checks and polls),
/// against `moto`; asks it to restart `web` (`elb-quorum request web`) and waits for the cycle to
/// finish. Returns the supervisord, web's pid before the restart, and the listener's log.
pub fn listener_restarts_web(moto: &Moto, listen_args: &str) -> (Supervisord, u32, String) {
    let t = Duration::from_secs(60);
    let conf = format!(
        "[program:web]\ncommand=sleep 100000\nstartsecs=1\n\n[eventlistener:elb-quorum]\ncommand={bin} listen {listen_args} --check-interval 0.3 --max-checks 5 --poll-interval 0.2 --settle 0.2 --state-dir {{here}}/state\n\
         events=PROCESS_STATE,REMOTE_COMMUNICATION\nbuffer_size=50\n\
         stderr_logfile={{here}}/listener.log\nenvironment=SUPERVISOR_USERNAME=\"{USER}\",SUPERVISOR_PASSWORD=\"{PASSWORD}\",ELB_QUORUM_LOG_TARGET=\"stderr\"\n",
        bin = bin().display(),
    );
    let sup = Supervisord::start(&conf, false, &moto.env());
    let before = eventually(t, "web RUNNING", || sup.pid("web"));
    eventually(t, "listener RUNNING", || sup.status("elb-quorum").contains("RUNNING").then_some(()));
    let log = request_web(&sup, moto, 1);
    assert_ne!(sup.pid("web"), Some(before), "web restarted");
    (sup, before, log)
}

/// Asks the listener under `sup` to restart `web` (`elb-quorum request web`, exit 0) and waits until
/// its log shows `cycles` finished cycles in all. Returns the listener's log.
pub fn request_web(sup: &Supervisord, moto: &Moto, cycles: usize) -> String {
    let mut env = sup.client_env();
    env.extend(moto.env());
    let out = run_bin(&["request", "web"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    eventually(Duration::from_secs(60), "a finished cycle", || {
        (count(&sup.read("listener.log"), "cycle done") >= cycles).then_some(())
    });
    sup.read("listener.log")
}
