//! Command-line interface (clap). Every option can also come from the environment
//! (`ELB_QUORUM_<OPTION>`) and the TOML config file (key = the long option's name).
//! Precedence: flag > environment > config file > default.

use clap::{Parser, Subcommand};

use crate::config::Layer;

#[derive(Debug, Parser)]
#[command(
    name = "elb-quorum",
    version,
    about = "Restart this instance's supervisord programs without taking its load-balanced cluster below quorum",
    long_about = "Restart this instance's supervisord programs without taking its load-balanced cluster below quorum.\n\n\
Before leaving, elb-quorum counts the cluster's members (EC2 instances named NODE.<cluster domain>, its Auto Scaling \
group with --members asg, or a fixed number) and those serving in each attachment (Classic load balancers, --lb; ALB/NLB \
target groups, --target-group). It leaves only if, in every attachment, the others serving are at least \
ceil(members × quorum) and at least --min-in-service; otherwise it waits and checks again, up to --max-checks times. \
Then it deregisters from all of them (or enters Standby, --leave-via standby), waits out draining, restarts the programs \
through supervisord, comes back and waits until it serves everywhere. With --strict, each check first takes a permit \
in a DynamoDB table, so instances asked at the same moment cannot race below quorum (on every member of the cluster, \
or it is not strict).\n\n\
Settings: flag > environment (ELB_QUORUM_<OPTION>) > config file (TOML, key = option name) > default.\n\
Exit codes: 0 done (status: may leave now); 1 quorum not reached, nothing changed; 2 usage or configuration error; \
3 runtime failure (AWS, supervisord), after which the instance is back in service unless the message says loudly that it is not."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub opts: Layer,
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
    /// Strict mode's permit record (DynamoDB): inspect or repair.
    Lease {
        #[command(subcommand)]
        action: LeaseCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Remove instance ID's permit entry (one stuck after a crash), if its token is still the one read.
    Release {
        /// The holder whose entry to remove.
        #[arg(long = "instance", value_name = "ID")]
        instance: String,
    },
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
            format!("[default: {DEFAULT_LEASE_TABLE}]"),
            format!("[default: {DEFAULT_LEASE_DURATION}]"),
            format!("[default: {DEFAULT_LEASE_GRACE}]"),
            format!("[default: {DEFAULT_MAX_HOLD}]"),
            format!("[default: {DEFAULT_LEAVE_RATE}]"),
            format!("[default: {DEFAULT_LEAVE_VIA}]"),
            format!("[default: {DEFAULT_HOOK_TIMEOUT}]"),
            format!("[default: {DEFAULT_READY_TIMEOUT}]"),
        ] {
            assert!(help.contains(&want), "--help lacks {want:?}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
