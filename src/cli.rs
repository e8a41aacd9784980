//! Command-line interface (clap). Every option can also come from the environment
//! (`ELB_QUORUM_<OPTION>`) and the TOML config file (key = the long option's name).
//! Precedence: flag > environment > config file > default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "elb-quorum",
    version,
    about = "Restart this instance's supervisord programs without taking its load-balanced cluster below quorum",
    long_about = "Restart this instance's supervisord programs without taking its load-balanced cluster below quorum.\n\n\
Before leaving the load balancer, elb-quorum counts the cluster's members (EC2 instances named NODE.<cluster domain>) \
and those the load balancer reports InService. It leaves only if the others serving are at least ceil(members × quorum) \
and at least --min-in-service; otherwise it waits and checks again, up to --max-checks times. Then it deregisters \
(waiting out connection draining), restarts the programs through supervisord, registers again and waits until InService.\n\n\
Settings: flag > environment (ELB_QUORUM_<OPTION>) > config file (TOML, key = option name) > default.\n\
Exit codes: 0 done (status: may leave now); 1 quorum not reached, nothing changed; 2 usage or configuration error; \
3 runtime failure (AWS, supervisord), after which the instance is registered again unless the message says loudly that it is not."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub opts: CommonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as supervisord event listener ([eventlistener:elb-quorum]); speaks the protocol on stdin/stdout.
    Listen,
    /// One-shot gated restart of PROGRAM... (prog, group:prog or group:*), for cron or by hand.
    Restart {
        #[arg(required = true, value_name = "PROGRAM")]
        programs: Vec<String>,
    },
    /// Ask the running listener to restart PROGRAM... (sends a REMOTE_COMMUNICATION event through supervisord).
    Request {
        #[arg(required = true, value_name = "PROGRAM")]
        programs: Vec<String>,
    },
    /// Show the load balancer, members, serving count, quorum numbers and whether this instance may leave now.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML config file (keys are the long option names) [default: /etc/elb-quorum/elb-quorum.toml if it exists]
    #[arg(long, global = true, env = "ELB_QUORUM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Classic ELB name [default: from the hostname: i-0abc.web.example.com → web-example-com]
    #[arg(long, global = true, env = "ELB_QUORUM_LB", value_name = "NAME")]
    pub lb: Option<String>,
    /// Supported domain for the hostname rule; repeatable (environment: comma-separated) [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_DOMAIN", value_delimiter = ',', value_name = "DOMAIN")]
    pub domain: Vec<String>,
    /// This machine's fully qualified hostname, NODE.CLUSTER.DOMAIN [default: the system hostname]
    #[arg(long, global = true, env = "ELB_QUORUM_HOSTNAME")]
    pub hostname: Option<String>,
    /// This instance's id [default: from the EC2 metadata service (IMDSv2)]
    #[arg(long, global = true, env = "ELB_QUORUM_INSTANCE_ID", value_name = "ID")]
    pub instance_id: Option<String>,
    /// Where the cluster size comes from: ec2-name (EC2 instances, not terminated, tagged Name=*.CLUSTER.DOMAIN) or static:N [default: ec2-name]
    #[arg(long, global = true, env = "ELB_QUORUM_MEMBERS", value_name = "SOURCE")]
    pub members: Option<String>,
    /// Fraction of the members that must keep serving, 0 < q ≤ 1 (0.75 or 75%) [default: 0.75]
    #[arg(long, global = true, env = "ELB_QUORUM_QUORUM", value_name = "FRACTION")]
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
    /// Largest random pause, in seconds, between a passed quorum check and the confirming check before leaving, so that instances asked at once see each other go [default: 5]
    #[arg(long, global = true, env = "ELB_QUORUM_SETTLE", value_name = "SECS")]
    pub settle: Option<f64>,
    /// Seconds the programs may take to stop and be RUNNING again [default: 120]
    #[arg(long, global = true, env = "ELB_QUORUM_RESTART_TIMEOUT", value_name = "SECS")]
    pub restart_timeout: Option<f64>,
    /// Timeout of one call to supervisord, in seconds [default: 30]
    #[arg(long, global = true, env = "ELB_QUORUM_RPC_TIMEOUT", value_name = "SECS")]
    pub rpc_timeout: Option<f64>,
    /// Bound on waiting for deregistration, in seconds [default: the load balancer's draining timeout + 15]
    #[arg(long, global = true, env = "ELB_QUORUM_DRAIN_TIMEOUT", value_name = "SECS")]
    pub drain_timeout: Option<f64>,
    /// Bound on waiting for InService, in seconds [default: health check interval × healthy threshold + 30]
    #[arg(long, global = true, env = "ELB_QUORUM_HEALTH_TIMEOUT", value_name = "SECS")]
    pub health_timeout: Option<f64>,
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
    /// Program restarted on SIGHUP (supervisorctl signal HUP elb-quorum); repeatable [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_PROGRAM", value_delimiter = ',', value_name = "PROGRAM")]
    pub program: Vec<String>,
    /// Program (autorestart=false) whose unexpected exit or FATAL triggers a gated restart; repeatable [default: none]
    #[arg(long, global = true, env = "ELB_QUORUM_GATE", value_delimiter = ',', value_name = "PROGRAM")]
    pub gate: Vec<String>,
    /// Directory for the crash-safety state file and the lock [default: /var/lib/elb-quorum]
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

impl CommonArgs {
    /// The values for `Settings::resolve` (the password comes from `SUPERVISOR_PASSWORD`, read by main).
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            lb: self.lb.clone(),
            domain: self.domain.clone(),
            hostname: self.hostname.clone(),
            instance_id: self.instance_id.clone(),
            members: self.members.clone(),
            quorum: self.quorum.clone(),
            min_in_service: self.min_in_service,
            check_interval: self.check_interval,
            max_checks: self.max_checks,
            poll_interval: self.poll_interval,
            settle: self.settle,
            restart_timeout: self.restart_timeout,
            rpc_timeout: self.rpc_timeout,
            drain_timeout: self.drain_timeout,
            health_timeout: self.health_timeout,
            dry_run: self.dry_run,
            supervisor_url: self.supervisor_url.clone(),
            supervisor_username: self.supervisor_username.clone(),
            supervisor_password_file: self.supervisor_password_file.clone(),
            supervisor_password: None,
            program: self.program.clone(),
            gate: self.gate.clone(),
            state_dir: self.state_dir.clone(),
            log_format: self.log_format.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use clap::CommandFactory;

    #[test]
    fn help_documents_every_default() {
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            format!("[default: {DEFAULT_QUORUM}]"),
            format!("[default: {DEFAULT_MIN_IN_SERVICE}]"),
            format!("[default: {DEFAULT_CHECK_INTERVAL}]"),
            format!("[default: {DEFAULT_MAX_CHECKS}]"),
            format!("[default: {DEFAULT_POLL_INTERVAL}]"),
            format!("[default: {DEFAULT_RESTART_TIMEOUT}]"),
            format!("[default: {DEFAULT_SETTLE}]"),
            format!("[default: {DEFAULT_RPC_TIMEOUT}]"),
            format!("[default: {DEFAULT_STATE_DIR}]"),
            format!("{DEFAULT_SUPERVISOR_URL}]"),
            format!("[default: {DEFAULT_CONFIG_FILE} if it exists]"),
            format!("draining timeout + {}]", DRAIN_MARGIN.as_secs()),
            format!("healthy threshold + {}]", HEALTH_MARGIN.as_secs()),
        ] {
            assert!(help.contains(&want), "--help lacks {want:?}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
