//! Settings, resolved once: flags, then environment (both through clap), then the TOML file, then the
//! defaults below. Validated here; nothing reads the environment after this.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

use crate::cycle::state_file::LeaveVia;
use crate::quorum::Rule;
use crate::secret::Secret;

/// Default quorum: three quarters of the cluster keep serving (the original tool's value).
pub const DEFAULT_QUORUM: &str = "0.75";
/// Longest one run of a hook may take, in seconds, before its process group is killed.
pub const DEFAULT_HOOK_TIMEOUT: f64 = 60.0;
/// How long `--ready-check` is retried, in seconds (as long as the programs may take to restart).
pub const DEFAULT_READY_TIMEOUT: f64 = 120.0;
/// How an instance leaves: deregistering from every attachment.
pub const DEFAULT_LEAVE_VIA: &str = "deregister";
/// Never leave unless at least this many other members serve.
pub const DEFAULT_MIN_IN_SERVICE: usize = 1;
/// Gate: seconds between quorum checks (±20 % jitter).
pub const DEFAULT_CHECK_INTERVAL: f64 = 30.0;
/// Gate: checks before giving up (10 × 30 s = about 5 minutes, longer than one peer's restart).
pub const DEFAULT_MAX_CHECKS: u32 = 10;
/// Seconds between polls of this instance's health while leaving and coming back. At 5 s with
/// jitter, a fleet of 12 cycling at once stays under 3 Describe calls/s, far below the account's
/// 10/s refill (AWS throttles Describe calls per account and region: 40 tokens, refilled 10 per second).
pub const DEFAULT_POLL_INTERVAL: f64 = 5.0;
/// Period of the confirming-check schedule: after a passed check each member confirms once more in
/// its own slot (settle / members) of this period (README, "Races").
pub const DEFAULT_SETTLE: f64 = 5.0;
/// How long programs may take to stop and reach RUNNING again.
pub const DEFAULT_RESTART_TIMEOUT: f64 = 120.0;
/// Timeout of one XML-RPC call to supervisord (stop with wait can take `stopwaitsecs`, default 10).
pub const DEFAULT_RPC_TIMEOUT: f64 = 30.0;
/// Added to the load balancer's connection-draining timeout when waiting for deregistration.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(15);
/// Added to interval × healthy threshold when waiting for InService.
pub const HEALTH_MARGIN: Duration = Duration::from_secs(30);
/// Strict mode: the DynamoDB table holding each cluster's permit record.
pub const DEFAULT_LEASE_TABLE: &str = "elb-quorum-permits";
/// Strict mode: a permit entry's lifetime D, renewed every D/4. Peers wait at most D + G for the
/// entry of a holder that died (kill -9) before it is dropped.
pub const DEFAULT_LEASE_DURATION: f64 = 120.0;
/// Strict mode: G, the clock skew tolerated between instances. An expired entry still counts for G;
/// a holder trusts its permit only until expiry − G. Must be below D/2.
pub const DEFAULT_LEASE_GRACE: f64 = 30.0;
/// Strict mode: H, the longest a permit is renewed. Longer than a whole cycle: draining (up to 300 s
/// by default on a Classic ELB, 3600 s at most) + restart + coming back InService.
pub const DEFAULT_MAX_HOLD: f64 = 3600.0;
/// Strict mode's leaves per second across a cluster: four registration calls per second, the
/// refill of an account's registration bucket (20 + 4/s per API version; benches/README.md,
/// "Fleets under AWS's API throttling"); 1 leaves half of it to the account's other tools.
pub const DEFAULT_LEAVE_RATE: f64 = 2.0;
/// Where supervisord listens when neither flag nor `SUPERVISOR_SERVER_URL` says.
pub const DEFAULT_SUPERVISOR_URL: &str = "unix:///var/run/supervisor.sock";
/// Crash-safety state and the lock file.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/elb-quorum";
/// Read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/elb-quorum/elb-quorum.toml";

/// A configuration error: exit status 2.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// One layer of settings: the command line (with its environment fallbacks, through clap) or the
/// TOML file (through serde, keys = long option names). The doc comments are `--help`.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Layer {
    /// TOML config file (keys are the long option names) [default: /etc/elb-quorum/elb-quorum.toml if it exists]
    #[arg(long, global = true, env = "ELB_QUORUM_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Classic load balancer to leave and rejoin; repeatable, may be mixed with --target-group (environment: comma-separated) [default: with no --target-group either, from the hostname: i-0abc.web.example.com → web-example-com]
    #[arg(long, global = true, env = "ELB_QUORUM_LB", value_delimiter = ',', value_name = "NAME")]
    #[serde(deserialize_with = "one_or_many")]
    pub lb: Vec<String>,
    /// ELBv2 target group (ALB/NLB), by name or ARN, to leave and rejoin with every port this instance has in it; repeatable (environment: comma-separated) [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_TARGET_GROUP", value_delimiter = ',', value_name = "NAME|ARN")]
    #[serde(deserialize_with = "one_or_many")]
    pub target_group: Vec<String>,
    /// Supported domain for the hostname rule; repeatable (environment: comma-separated) [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_DOMAIN", value_delimiter = ',', value_name = "DOMAIN")]
    pub domain: Vec<String>,
    /// This machine's fully qualified hostname, NODE.CLUSTER.DOMAIN [default: the system hostname]
    #[arg(long, global = true, env = "ELB_QUORUM_HOSTNAME")]
    pub hostname: Option<String>,
    /// This instance's id [default: from the EC2 metadata service (IMDSv2)]
    #[arg(long, global = true, env = "ELB_QUORUM_INSTANCE_ID", value_name = "ID")]
    pub instance_id: Option<String>,
    /// Where the cluster size comes from: ec2-name (EC2 instances, not terminated, tagged Name=*.CLUSTER.DOMAIN), asg (this instance's Auto Scaling group; its attachments too unless --lb/--target-group), asg:NAME (a named group: with --strict, a fleet asks Auto Scaling nothing for its name, even on its first run), or static:N [default: ec2-name]
    #[arg(long, global = true, env = "ELB_QUORUM_MEMBERS", value_name = "SOURCE")]
    pub members: Option<String>,
    /// How to leave: deregister (from every attachment) or standby (Auto Scaling Standby, with --members asg) [default: deregister]
    #[arg(long, global = true, env = "ELB_QUORUM_LEAVE_VIA", value_name = "HOW")]
    pub leave_via: Option<String>,
    /// Per-zone quorum: the serving members in this instance's Availability Zone, other than itself, must be at least ceil(zone members × FRACTION), besides the cluster-wide rule [default: off]
    #[arg(long, global = true, env = "ELB_QUORUM_ZONE_QUORUM", value_name = "FRACTION")]
    #[serde(deserialize_with = "number_or_string")]
    pub zone_quorum: Option<String>,
    /// Fraction of the members that must keep serving, 0 < q ≤ 1 (0.75 or 75%) [default: 0.75]
    #[arg(long, global = true, env = "ELB_QUORUM_QUORUM", value_name = "FRACTION")]
    #[serde(deserialize_with = "number_or_string")]
    pub quorum: Option<String>,
    /// Other members that must keep serving, whatever the fraction [default: 1]
    #[arg(long, global = true, env = "ELB_QUORUM_MIN_IN_SERVICE", value_name = "N")]
    pub min_in_service: Option<usize>,
    /// Seconds between quorum checks, ±20% jitter [default: 30]
    #[arg(long, global = true, env = "ELB_QUORUM_CHECK_INTERVAL", value_name = "SECS")]
    pub check_interval: Option<f64>,
    /// Quorum checks before giving up (exit 1, nothing changed) [default: 10]
    #[arg(long, global = true, env = "ELB_QUORUM_MAX_CHECKS", value_name = "N")]
    pub max_checks: Option<u32>,
    /// Seconds between load-balancer polls while leaving and coming back, ±20% jitter [default: 5]
    #[arg(long, global = true, env = "ELB_QUORUM_POLL_INTERVAL", value_name = "SECS")]
    pub poll_interval: Option<f64>,
    /// Period, in seconds, of the confirming-check schedule: after a passed check each member checks once more in its own slot of it, so that instances asked at once see each other go; not used with --strict [default: 5]
    #[arg(long, global = true, env = "ELB_QUORUM_SETTLE", value_name = "SECS")]
    pub settle: Option<f64>,
    /// Seconds the programs may take to stop and be RUNNING again [default: 120]
    #[arg(long, global = true, env = "ELB_QUORUM_RESTART_TIMEOUT", value_name = "SECS")]
    pub restart_timeout: Option<f64>,
    /// Timeout of one call to supervisord, in seconds [default: 30]
    #[arg(long, global = true, env = "ELB_QUORUM_RPC_TIMEOUT", value_name = "SECS")]
    pub rpc_timeout: Option<f64>,
    /// Bound on waiting for deregistration, in seconds [default: each attachment's deregistration delay or draining timeout + 15]
    #[arg(long, global = true, env = "ELB_QUORUM_DRAIN_TIMEOUT", value_name = "SECS")]
    pub drain_timeout: Option<f64>,
    /// Bound on waiting until serving again, in seconds [default: each attachment's (target groups: timeout +) interval × healthy threshold + 30]
    #[arg(long, global = true, env = "ELB_QUORUM_HEALTH_TIMEOUT", value_name = "SECS")]
    pub health_timeout: Option<f64>,
    /// Strict mode: take a permit in a DynamoDB table before leaving, so instances asked at the same moment cannot race below quorum. Needs the same on every member [default: off]
    #[arg(long, global = true, env = "ELB_QUORUM_STRICT")]
    pub strict: bool,
    /// Strict mode: DynamoDB table of permits (hash key `pk`, a string) [default: elb-quorum-permits]
    #[arg(long, global = true, env = "ELB_QUORUM_LEASE_TABLE", value_name = "TABLE")]
    pub lease_table: Option<String>,
    /// Strict mode: lifetime of a permit entry in seconds, renewed every quarter of it [default: 120]
    #[arg(long, global = true, env = "ELB_QUORUM_LEASE_DURATION", value_name = "SECS")]
    pub lease_duration: Option<f64>,
    /// Strict mode: clock skew tolerated between instances, in seconds; below half the lease duration [default: 30]
    #[arg(long, global = true, env = "ELB_QUORUM_LEASE_GRACE", value_name = "SECS")]
    pub lease_grace: Option<f64>,
    /// Strict mode: longest a permit is renewed, in seconds [default: 3600]
    #[arg(long, global = true, env = "ELB_QUORUM_MAX_HOLD", value_name = "SECS")]
    pub max_hold: Option<f64>,
    /// Strict mode: permits granted per second across the whole cluster (up to 15 s worth at once after a pause), 0 for no pacing (with more than 50 permits, about 200 instances: unpaced, the permit record is spread over several DynamoDB items; a pace above 2 may take its one item's writes beyond the item's capacity: warned of); each leave costs two calls per attachment of the account's registration budget, 20 + 4/s per API version: 2 can take all of it, 1 half [default: 2]
    #[arg(long, global = true, env = "ELB_QUORUM_LEAVE_RATE", value_name = "PER_SEC")]
    pub leave_rate: Option<f64>,
    /// Strict mode: let one instance deregister and register every holder asking, at most two calls a second for the whole cluster, instead of each making its own two calls per attachment: above a few hundred instances the account's registration budget needs it. The instance taking a batch calls for others only within a 10 s claim that a restarting instance waits out before registering itself [default: off]
    #[arg(long, global = true, env = "ELB_QUORUM_BATCH_REGISTRATIONS")]
    pub batch_registrations: bool,
    /// Make every check and log what would be done; change nothing
    #[arg(long, global = true, env = "ELB_QUORUM_DRY_RUN")]
    pub dry_run: bool,
    /// supervisord's XML-RPC endpoint, unix:///path.sock or http://host:port [default: $SUPERVISOR_SERVER_URL, else unix:///var/run/supervisor.sock]
    #[arg(long, global = true, env = "SUPERVISOR_SERVER_URL", value_name = "URL")]
    pub supervisor_url: Option<String>,
    /// supervisord user name [default: $SUPERVISOR_USERNAME, else none]
    #[arg(long, global = true, env = "SUPERVISOR_USERNAME", value_name = "USER")]
    pub supervisor_username: Option<String>,
    /// File whose first line is supervisord's password [default: $SUPERVISOR_PASSWORD, else none]
    #[arg(long, global = true, env = "ELB_QUORUM_SUPERVISOR_PASSWORD_FILE", value_name = "FILE")]
    pub supervisor_password_file: Option<PathBuf>,
    /// `SUPERVISOR_PASSWORD`, read by main: never a flag (flags show in `ps`), never in the file.
    #[arg(skip)]
    #[serde(skip)]
    pub supervisor_password: Option<Secret>,
    /// Program restarted on SIGHUP (supervisorctl signal HUP elb-quorum); repeatable [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_PROGRAM", value_delimiter = ',', value_name = "PROGRAM")]
    pub program: Vec<String>,
    /// Program (autorestart=false) whose unexpected exit or FATAL triggers a gated restart; repeatable [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_GATE", value_delimiter = ',', value_name = "PROGRAM")]
    pub gate: Vec<String>,
    /// Command run (sh -c) after the quorum check passes and before leaving; a failure aborts the cycle with nothing changed [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_BEFORE_LEAVE", value_name = "CMD")]
    pub before_leave: Option<String>,
    /// Command run (sh -c) after the programs are RUNNING and before rejoining, retried every poll interval until it exits 0; failing past --ready-timeout leaves the instance out (exit 3) [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_READY_CHECK", value_name = "CMD")]
    pub ready_check: Option<String>,
    /// Command run (sh -c) once the instance serves again; a failure is logged [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_AFTER_RETURN", value_name = "CMD")]
    pub after_return: Option<String>,
    /// Seconds one run of a hook may take before its process group is killed (a failure) [default: 60]
    #[arg(long, global = true, env = "ELB_QUORUM_HOOK_TIMEOUT", value_name = "SECS")]
    pub hook_timeout: Option<f64>,
    /// Seconds --ready-check is retried for [default: 120]
    #[arg(long, global = true, env = "ELB_QUORUM_READY_TIMEOUT", value_name = "SECS")]
    pub ready_timeout: Option<f64>,
    /// Prometheus text file for node_exporter's textfile collector, rewritten atomically after every check and cycle [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_METRICS_FILE", value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Directory for the crash-safety state file, the lock and (--members asg) the group's name [default: /var/lib/elb-quorum]
    #[arg(long, global = true, env = "ELB_QUORUM_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log format: text or json [default: text]
    #[arg(long, global = true, env = "ELB_QUORUM_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log level or filter (error, warn, info, debug, trace; or RUST_LOG syntax) [default: $RUST_LOG, else info]
    #[arg(long, global = true, env = "ELB_QUORUM_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Where logs go: auto (journald when its socket exists, else stderr), journald or stderr. Never stdout [default: auto]
    #[arg(long, global = true, env = "ELB_QUORUM_LOG_TARGET", value_name = "TARGET")]
    pub log_target: Option<String>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    Ok(Some(match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => n.to_string(),
        NumOrStr::Str(s) => s,
    }))
}

/// A TOML value that is one string or a list of strings (`lb = "web"` or `lb = ["a", "b"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Layer {
    /// Reads a TOML file as a layer.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
    }
}

/// Where the cluster's size comes from (never from the load balancer's own list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembersSource {
    /// EC2 instances, not terminated, whose `Name` tag is `*.<namespace>`.
    Ec2Name,
    /// An Auto Scaling group: this instance's (`None`) or one named.
    Asg(Option<String>),
    /// A fixed number of members.
    Static(usize),
}

impl MembersSource {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        if s == "ec2-name" {
            return Ok(Self::Ec2Name);
        }
        if s == "asg" {
            return Ok(Self::Asg(None));
        }
        if let Some(name) = s.strip_prefix("asg:") {
            return match name.trim() {
                "" => err(format!("--members {s:?}: asg:NAME needs a group name")),
                n => Ok(Self::Asg(Some(n.to_owned()))),
            };
        }
        if let Some(n) = s.strip_prefix("static:") {
            return match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Self::Static(n)),
                _ => err(format!("--members {s:?}: static:N needs a whole number N ≥ 1")),
            };
        }
        err(format!("--members {s:?}: expected `ec2-name`, `asg`, `asg:NAME` or `static:N`"))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How to reach supervisord.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub rpc_timeout: Duration,
}

/// Strict-mode settings (used by `lease` and `status` even without `--strict`).
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseSettings {
    pub table: String,
    pub duration: Duration,
    pub grace: Duration,
    pub max_hold: Duration,
    /// Permits granted per second across the cluster (0: unpaced).
    pub leave_rate: f64,
    /// `--batch-registrations`.
    pub batch_registrations: bool,
}

/// Every setting, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Classic load balancers named outright (none: the hostname rule, unless target groups are).
    pub lbs: Vec<String>,
    /// Target groups by name or ARN.
    pub target_groups: Vec<String>,
    pub domains: Vec<String>,
    pub hostname: Option<String>,
    pub instance_id: Option<String>,
    pub members: MembersSource,
    pub rule: Rule,
    pub leave_via: LeaveVia,
    /// `--zone-quorum` in parts per million.
    pub zone_quorum_ppm: Option<u32>,
    pub check_interval: Duration,
    pub max_checks: u32,
    pub poll_interval: Duration,
    pub settle: Duration,
    pub restart_timeout: Duration,
    pub drain_timeout: Option<Duration>,
    pub health_timeout: Option<Duration>,
    pub dry_run: bool,
    pub strict: bool,
    pub lease: LeaseSettings,
    pub supervisor: SupervisorSettings,
    pub programs: Vec<String>,
    pub gates: Vec<String>,
    pub state_dir: PathBuf,
    /// `--metrics-file`, checked writable.
    pub metrics_file: Option<PathBuf>,
    /// `--before-leave`, `--ready-check`, `--after-return`, checked at start.
    pub hooks: crate::hooks::Hooks,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    pub log_target: Option<String>,
}

/// Parses a quorum fraction `0 < q ≤ 1` (e.g. `0.75`, or `75%`) into parts per million.
pub fn parse_quorum(s: &str) -> Result<u32, ConfigError> {
    let bad = || ConfigError(format!("--quorum {s:?}: expected a fraction 0 < q ≤ 1 such as 0.75 (or 75%)"));
    let s = s.trim();
    let (num, scale) = match s.strip_suffix('%') {
        Some(p) => (p.trim(), 10_000u64),
        None => (s, 1_000_000u64),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    if frac.len() > 6 {
        return Err(bad());
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
    let frac_val: u64 =
        if frac.is_empty() { 0 } else { frac.parse::<u64>().map_err(|_| bad())? * 10u64.pow(6 - frac.len() as u32) };
    let ppm = int.checked_mul(scale).ok_or_else(bad)? + frac_val * scale / 1_000_000;
    if ppm == 0 || ppm > 1_000_000 {
        return Err(bad());
    }
    Ok(ppm as u32)
}

/// Parses seconds (decimals allowed) for `option`.
pub fn seconds(option: &str, v: f64) -> Result<Duration, ConfigError> {
    if !(0.0..=86_400.0).contains(&v) {
        return err(format!("--{option} {v}: expected seconds between 0 and 86400"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Attachment names: trimmed, none empty, each once.
fn names(option: &str, given: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(given.len());
    for n in given.iter().map(|n| n.trim()) {
        if n.is_empty() || n.contains(char::is_whitespace) {
            return err(format!("--{option} {n:?}: not a name or ARN"));
        }
        if !out.iter().any(|o| o == n) {
            out.push(n.to_owned());
        }
    }
    Ok(out)
}

fn vec_or(flag: Vec<String>, file: Vec<String>) -> Vec<String> {
    if flag.is_empty() {
        file
    } else {
        flag
    }
}

impl Settings {
    /// Merges flags/env over the config file over the defaults and validates the result.
    pub fn resolve(o: Layer) -> Result<Settings, ConfigError> {
        let file = match &o.config {
            Some(path) => Layer::load(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => Layer::load(Path::new(DEFAULT_CONFIG_FILE))?,
            None => Layer::default(),
        };
        let quorum = o.quorum.or(file.quorum).unwrap_or_else(|| DEFAULT_QUORUM.to_owned());
        let quorum_ppm = parse_quorum(&quorum)?;
        let members = MembersSource::parse(o.members.as_deref().or(file.members.as_deref()).unwrap_or("ec2-name"))?;
        let via = o.leave_via.as_deref().or(file.leave_via.as_deref()).unwrap_or(DEFAULT_LEAVE_VIA);
        let leave_via = LeaveVia::parse(via)
            .ok_or_else(|| ConfigError(format!("--leave-via {via:?}: expected `deregister` or `standby`")))?;
        if leave_via == LeaveVia::Standby && !matches!(members, MembersSource::Asg(_)) {
            return err(
                "--leave-via standby needs --members asg (or asg:NAME): Standby belongs to an Auto Scaling group",
            );
        }
        let zone_quorum_ppm = match o.zone_quorum.or(file.zone_quorum) {
            None => None,
            Some(z) => Some(parse_quorum(&z).map_err(|e| ConfigError(e.0.replace("--quorum", "--zone-quorum")))?),
        };
        if zone_quorum_ppm.is_some() && matches!(members, MembersSource::Static(_)) {
            return err("--zone-quorum needs members with zones (ec2-name or asg): static:N has none");
        }
        let hooks = crate::hooks::Hooks {
            before_leave: o.before_leave.or(file.before_leave).filter(|c| !c.trim().is_empty()),
            ready_check: o.ready_check.or(file.ready_check).filter(|c| !c.trim().is_empty()),
            after_return: o.after_return.or(file.after_return).filter(|c| !c.trim().is_empty()),
            timeout: seconds("hook-timeout", o.hook_timeout.or(file.hook_timeout).unwrap_or(DEFAULT_HOOK_TIMEOUT))?,
            ready_timeout: seconds(
                "ready-timeout",
                o.ready_timeout.or(file.ready_timeout).unwrap_or(DEFAULT_READY_TIMEOUT),
            )?,
        };
        for phase in
            [crate::hooks::Phase::BeforeLeave, crate::hooks::Phase::ReadyCheck, crate::hooks::Phase::AfterReturn]
        {
            if let Some(cmd) = hooks.get(phase) {
                crate::hooks::check_command(phase.option(), cmd).map_err(ConfigError)?;
            }
        }
        let metrics_file = o.metrics_file.or(file.metrics_file);
        if let Some(path) = &metrics_file {
            crate::metrics::Metrics::check_writable(path).map_err(ConfigError)?;
        }
        let max_checks = o.max_checks.or(file.max_checks).unwrap_or(DEFAULT_MAX_CHECKS);
        if max_checks == 0 {
            return err("--max-checks 0: at least one check is needed");
        }
        let secs = |name: &str, flag: Option<f64>, file: Option<f64>, default: f64| {
            seconds(name, flag.or(file).unwrap_or(default))
        };
        let opt_secs =
            |name: &str, flag: Option<f64>, file: Option<f64>| flag.or(file).map(|v| seconds(name, v)).transpose();
        let poll_interval = secs("poll-interval", o.poll_interval, file.poll_interval, DEFAULT_POLL_INTERVAL)?;
        if poll_interval.is_zero() {
            return err("--poll-interval 0: polls need a pause between them");
        }
        let log_format = match o.log_format.as_deref().or(file.log_format.as_deref()).unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return err(format!("--log-format {other:?}: expected `text` or `json`")),
        };
        let domains: Vec<String> = vec_or(o.domain, file.domain)
            .into_iter()
            .map(|d| d.trim().trim_matches('.').to_ascii_lowercase())
            .collect();
        if let Some(d) = domains.iter().find(|d| d.is_empty() || d.contains(char::is_whitespace)) {
            return err(format!("--domain {d:?}: not a domain name"));
        }
        let programs = vec_or(o.program, file.program);
        let gates = vec_or(o.gate, file.gate);
        for p in programs.iter().chain(&gates) {
            crate::trigger::valid_program_name(p).map_err(ConfigError)?;
        }
        let password_file = o.supervisor_password_file.or(file.supervisor_password_file);
        let password = match (password_file, o.supervisor_password) {
            (Some(path), _) => Some(Secret::from_file(&path).map_err(ConfigError)?),
            (None, p) => p,
        };
        let lbs = names("lb", vec_or(o.lb, file.lb))?;
        let target_groups = names("target-group", vec_or(o.target_group, file.target_group))?;
        let lease = LeaseSettings {
            table: o.lease_table.or(file.lease_table).unwrap_or_else(|| DEFAULT_LEASE_TABLE.to_owned()),
            duration: secs("lease-duration", o.lease_duration, file.lease_duration, DEFAULT_LEASE_DURATION)?,
            grace: secs("lease-grace", o.lease_grace, file.lease_grace, DEFAULT_LEASE_GRACE)?,
            max_hold: secs("max-hold", o.max_hold, file.max_hold, DEFAULT_MAX_HOLD)?,
            leave_rate: o.leave_rate.or(file.leave_rate).unwrap_or(DEFAULT_LEAVE_RATE),
            batch_registrations: o.batch_registrations || file.batch_registrations,
        };
        if !lease.leave_rate.is_finite() || lease.leave_rate < 0.0 {
            return err(format!("--leave-rate {}: a number of permits per second, 0 or more", lease.leave_rate));
        }
        if lease.table.is_empty() {
            return err("--lease-table \"\": a table name is needed");
        }
        if lease.duration < Duration::from_secs(4) {
            return err(format!(
                "--lease-duration {:?}: at least 4 seconds (it is renewed every quarter)",
                lease.duration
            ));
        }
        if lease.grace * 2 >= lease.duration {
            return err(format!(
                "--lease-grace {:?} must be below half of --lease-duration {:?}: a holder trusts its permit only until expiry − grace",
                lease.grace, lease.duration
            ));
        }
        if lease.max_hold < lease.duration {
            return err(format!("--max-hold {:?}: at least --lease-duration {:?}", lease.max_hold, lease.duration));
        }
        Ok(Settings {
            lbs,
            target_groups,
            domains,
            hostname: o.hostname.or(file.hostname).filter(|s| !s.is_empty()),
            instance_id: o.instance_id.or(file.instance_id).filter(|s| !s.is_empty()),
            members,
            leave_via,
            zone_quorum_ppm,
            rule: Rule {
                quorum_ppm,
                min_in_service: o.min_in_service.or(file.min_in_service).unwrap_or(DEFAULT_MIN_IN_SERVICE),
            },
            check_interval: secs("check-interval", o.check_interval, file.check_interval, DEFAULT_CHECK_INTERVAL)?,
            max_checks,
            poll_interval,
            settle: secs("settle", o.settle, file.settle, DEFAULT_SETTLE)?,
            restart_timeout: secs("restart-timeout", o.restart_timeout, file.restart_timeout, DEFAULT_RESTART_TIMEOUT)?,
            drain_timeout: opt_secs("drain-timeout", o.drain_timeout, file.drain_timeout)?,
            health_timeout: opt_secs("health-timeout", o.health_timeout, file.health_timeout)?,
            dry_run: o.dry_run || file.dry_run,
            strict: o.strict || file.strict,
            lease,
            supervisor: SupervisorSettings {
                url: o.supervisor_url.or(file.supervisor_url).unwrap_or_else(|| DEFAULT_SUPERVISOR_URL.to_owned()),
                username: o.supervisor_username.or(file.supervisor_username),
                password,
                rpc_timeout: secs("rpc-timeout", o.rpc_timeout, file.rpc_timeout, DEFAULT_RPC_TIMEOUT)?,
            },
            programs,
            gates,
            state_dir: o.state_dir.or(file.state_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            metrics_file,
            hooks,
            log_format,
            log_level: o.log_level.or(file.log_level),
            log_target: o.log_target.or(file.log_target),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_fractions() {
        let cases = [
            ("0.75", Some(750_000)),
            ("1", Some(1_000_000)),
            ("75%", Some(750_000)),
            (".5", Some(500_000)),
            ("0.333333", Some(333_333)),
            ("1.0", Some(1_000_000)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_quorum(s).ok(), want, "{s}");
        }
        for bad in ["0", "0.0", "1.01", "2", "-0.5", "abc", "", ".", "0.1234567", "150%", "nan"] {
            assert!(parse_quorum(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn members_source() {
        assert_eq!(MembersSource::parse("ec2-name").unwrap(), MembersSource::Ec2Name);
        assert_eq!(MembersSource::parse("static:6").unwrap(), MembersSource::Static(6));
        assert_eq!(MembersSource::parse("asg").unwrap(), MembersSource::Asg(None));
        assert_eq!(MembersSource::parse("asg:web").unwrap(), MembersSource::Asg(Some("web".into())));
        for bad in ["static:0", "static:x", "asg:", "auto", ""] {
            assert!(MembersSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("supervisor.d/elb-quorum.toml.example");
        let s = Settings::resolve(Layer { config: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.domains, vec!["example.com".to_string()]);
        assert_eq!(s.gates, vec!["web".to_string()]);
        assert_eq!(s.rule.quorum_ppm, 750_000);
        // Its commented strict-mode block is valid too, once uncommented.
        let text = std::fs::read_to_string(&path).unwrap();
        let strict = text.lines().skip_while(|l| !l.starts_with("# Strict mode")).skip(2);
        let uncommented: String = strict.map(|l| l.trim_start_matches("# ").to_owned() + "\n").collect();
        let layer: Layer = toml::from_str(&uncommented).unwrap();
        assert!(layer.strict);
        assert_eq!((layer.lease_duration, layer.lease_grace, layer.max_hold), (Some(120.0), Some(30.0), Some(3600.0)));
        assert_eq!(layer.leave_rate, Some(DEFAULT_LEAVE_RATE));
        assert!(!layer.batch_registrations);
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "quorum = 0.5\nmax-checks = 3\ndomain = [\"example.com\"]\ncheck-interval = 2.5\n")
            .unwrap();
        let s =
            Settings::resolve(Layer { config: Some(path.clone()), max_checks: Some(7), ..Default::default() }).unwrap();
        assert_eq!(s.rule.quorum_ppm, 500_000, "file over default");
        assert_eq!(s.max_checks, 7, "flag over file");
        assert_eq!(s.domains, vec!["example.com".to_string()]);
        assert_eq!(s.check_interval, Duration::from_millis(2500));
        assert_eq!(s.poll_interval, Duration::from_secs(5), "default");
        std::fs::write(&path, "quorum = \"60%\"\nlog-target = \"stderr\"\n").unwrap();
        let s = Settings::resolve(Layer { config: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!((s.rule.quorum_ppm, s.log_target.as_deref()), (600_000, Some("stderr")), "quorum as text too");
        std::fs::write(&path, "config = \"/etc/other.toml\"\n").unwrap();
        assert!(
            Settings::resolve(Layer { config: Some(path.clone()), ..Default::default() }).is_err(),
            "no config key in a config file"
        );
        std::fs::write(&path, "strict = true\nlease-table = \"permits\"\nlease-duration = 60\n").unwrap();
        let s = Settings::resolve(Layer { config: Some(path.clone()), lease_grace: Some(10.0), ..Default::default() })
            .unwrap();
        assert!(s.strict);
        assert_eq!(
            s.lease,
            LeaseSettings {
                table: "permits".into(),
                duration: Duration::from_secs(60),
                grace: Duration::from_secs(10),
                max_hold: Duration::from_secs(3600),
                leave_rate: DEFAULT_LEAVE_RATE,
                batch_registrations: false,
            }
        );
        let paced = Layer { leave_rate: Some(-1.0), ..Default::default() };
        assert!(Settings::resolve(paced).unwrap_err().to_string().contains("--leave-rate -1"));
        for (d, g) in [(60.0, 30.0), (60.0, 45.0), (2.0, 0.5)] {
            let layer = Layer { lease_duration: Some(d), lease_grace: Some(g), ..Default::default() };
            let e = Settings::resolve(layer).unwrap_err();
            assert!(e.0.contains("--lease-"), "D={d} G={g}: {e}");
        }
        std::fs::write(&path, "quorum = 0.5\nbogus = 1\n").unwrap();
        let e = Settings::resolve(Layer { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(e.0.contains("bogus"), "{e}");
    }

    /// `--lb` and `--target-group` mix, in flags and in the file (one name or a list), flags
    /// replacing the file's list; duplicates collapse; an empty name is an error.
    #[test]
    fn attachments_mix_in_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lb = \"web\"\ntarget-group = [\"http\", \"arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/grpc/2\"]\n").unwrap();
        let s = Settings::resolve(Layer { config: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.lbs, vec!["web".to_string()]);
        assert_eq!(s.target_groups.len(), 2);
        let s = Settings::resolve(Layer {
            config: Some(path.clone()),
            target_group: vec!["tg".into(), " tg ".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!((s.lbs, s.target_groups), (vec!["web".to_string()], vec!["tg".to_string()]));
        let e = Settings::resolve(Layer { config: Some(path), lb: vec!["".into()], ..Default::default() }).unwrap_err();
        assert!(e.0.contains("--lb"), "{e}");
        // The shipped example's commented attachment lines are valid once uncommented.
        let example =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("supervisor.d/elb-quorum.toml.example"))
                .unwrap();
        let lines: String = example
            .lines()
            .filter(|l| l.starts_with("# lb =") || l.starts_with("# target-group ="))
            .map(|l| l.trim_start_matches("# ").to_owned() + "\n")
            .collect();
        let layer: Layer = toml::from_str(&lines).unwrap();
        assert_eq!((layer.lb.len(), layer.target_group.len()), (1, 2), "{lines}");
    }

    /// Standby needs an Auto Scaling group; the zone rule needs zones.
    #[test]
    fn leave_via_and_zone_quorum_need_the_right_members() {
        let ok = Settings::resolve(Layer {
            members: Some("asg".into()),
            leave_via: Some("standby".into()),
            zone_quorum: Some("0.5".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((ok.leave_via, ok.zone_quorum_ppm), (LeaveVia::Standby, Some(500_000)));
        let d = Settings::resolve(Layer::default()).unwrap();
        assert_eq!((d.leave_via, d.zone_quorum_ppm), (LeaveVia::Deregister, None));
        for (layer, needle) in [
            (
                Layer { leave_via: Some("standby".into()), ..Default::default() },
                "--leave-via standby needs --members asg",
            ),
            (Layer { leave_via: Some("sideways".into()), ..Default::default() }, "--leave-via \"sideways\""),
            (
                Layer { members: Some("static:4".into()), zone_quorum: Some("0.5".into()), ..Default::default() },
                "--zone-quorum needs members with zones",
            ),
            (Layer { zone_quorum: Some("1.5".into()), ..Default::default() }, "--zone-quorum \"1.5\""),
        ] {
            let e = Settings::resolve(layer).unwrap_err();
            assert!(e.0.contains(needle), "{e}");
        }
    }
}
