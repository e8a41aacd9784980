//! Attachments as the cycle sees them: Classic load balancers (`classic`) and ELBv2 target groups
//! (`target_group`) behind one trait, each turning its own health answer into one neutral
//! `TargetState`; `Attachment` dispatches statically over both. Where the cluster's membership comes
//! from is `members`. Tests put an in-process fake behind the same trait for what the AWS emulator
//! cannot show (draining, slow health, throttling, faults). Nothing above a backend compares the
//! backends' own state or description strings.

pub mod classic;
pub mod ec2;
pub mod members;
pub mod target_group;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What an attachment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A Classic ELB (API 2012-06-01): targets are instances, no port.
    Classic,
    /// An ELBv2 target group (ALB, NLB): targets are instance and port.
    TargetGroup,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Classic => "classic",
            Kind::TargetGroup => "target-group",
        }
    }

    /// For messages: "load balancer" or "target group".
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Classic => "load balancer",
            Kind::TargetGroup => "target group",
        }
    }
}

/// One attachment as configured: a Classic load balancer's name, or a target group's name or ARN.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentSpec {
    pub kind: Kind,
    pub name: String,
}

impl std::fmt::Display for AttachmentSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.name)
    }
}

/// What the load balancer routes to: an instance, and for target groups a port. One instance may be
/// registered in one target group on several ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Target {
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl Target {
    pub fn instance(id: impl Into<String>) -> Self {
        Self { instance_id: id.into(), port: None }
    }

    pub fn on_port(id: impl Into<String>, port: i32) -> Self {
        Self { instance_id: id.into(), port: Some(port) }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.instance_id),
            None => f.write_str(&self.instance_id),
        }
    }
}

/// A target's state, whatever the backend. Only `Serving` counts as in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetState {
    /// Classic `InService` (not draining); target group `healthy`.
    Serving,
    /// Leaving: Classic `InService` with "deregistration in progress"; target group `draining` or
    /// `unhealthy.draining`.
    Draining,
    /// Registration in progress: target group `initial`; Classic `Unknown`.
    Starting,
    /// Registered but failing, or any state the backend does not know.
    Unhealthy,
    /// Not registered: target group `unused` / `Target.NotRegistered`.
    NotRegistered,
    /// Waiting will not fix it: Classic zone not enabled; target group `unused` / `Target.NotInUse`.
    NeverHeals,
}

impl TargetState {
    /// Out of the load balancer for good: no traffic and none coming (drained).
    pub fn is_out(self) -> bool {
        !matches!(self, TargetState::Serving | TargetState::Draining)
    }
}

/// One target's health, with the backend's raw answer kept for logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetHealth {
    pub target: Target,
    pub state: TargetState,
    /// The backend's own words: Classic `State (Description)`, target group `state (Reason)`.
    pub raw: String,
}

impl TargetHealth {
    pub fn serving(&self) -> bool {
        self.state == TargetState::Serving
    }
}

/// An attachment's own timings, which bound the waits. Each backend clamps what it reads to the
/// documented ranges (and warns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbTimings {
    /// How long a deregistered target may keep draining: Classic connection-draining timeout
    /// (`None`: draining disabled); target group `deregistration_delay.timeout_seconds`.
    pub drain: Option<Duration>,
    /// How long a healthy target takes to be counted in service: Classic interval × healthy
    /// threshold; target group interval × healthy threshold + timeout.
    pub healthy_after: Duration,
}

/// What talking to an attachment can fail with. `lb` names it ("load balancer web-example-com",
/// "target group web-tg"); Display names the action.
#[derive(Debug, Error)]
pub enum LbError {
    #[error("{lb} not found ({code}): check --lb, --target-group or the hostname's domain")]
    NotFound { lb: String, code: String },
    #[error("{lb} rejected target {target} in {action} ({code}): {message}")]
    InvalidTarget { lb: String, target: String, action: &'static str, code: String, message: String },
    #[error("{action} on {lb} was throttled (Rate exceeded) even after retries")]
    Throttled { lb: String, action: &'static str },
    /// AWS failed on its side (HTTP 5xx, `HealthUnavailable`) even after the SDK's retries.
    #[error("{action} on {lb} failed: {code}: {message}")]
    Service { lb: String, action: &'static str, code: String, message: String },
    /// AWS refused the request (HTTP 4xx other than throttling): permissions, validation.
    #[error("{action} on {lb} was refused: {code}: {message} (for AccessDenied, see the IAM policy in the README)")]
    Rejected { lb: String, action: &'static str, code: String, message: String },
    #[error("{action} on {lb}: no usable AWS credentials ({detail}); give the instance an IAM role (instance profile), or set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")]
    Credentials { lb: String, action: &'static str, detail: String },
    #[error("{action} on {lb} could not reach AWS: {detail}")]
    Unreachable { lb: String, action: &'static str, detail: String },
}

impl LbError {
    /// Worth trying again later (the SDK has already retried with backoff). A refusal is not: an
    /// AccessDenied at the gate fails at once instead of spending every check.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LbError::Throttled { .. } | LbError::Unreachable { .. } | LbError::Service { .. })
    }

    /// The configuration names something that does not exist: a usage error, not a runtime one.
    pub fn is_configuration(&self) -> bool {
        matches!(self, LbError::NotFound { .. })
    }

    /// Builds the error for an AWS answer, by error code, shared by both backends.
    pub(crate) fn from_failure(
        failure: crate::identity::AwsFailure,
        lb: String,
        action: &'static str,
        target: Option<&str>,
    ) -> LbError {
        use crate::identity::AwsFailure;
        match failure {
            AwsFailure::Service { code, message, server_error } => match code.as_str() {
                "LoadBalancerNotFound" | "TargetGroupNotFound" => LbError::NotFound { lb, code },
                "InvalidInstance" | "InvalidTarget" => {
                    LbError::InvalidTarget { lb, target: target.unwrap_or_default().to_owned(), action, code, message }
                }
                c if crate::identity::is_throttling(c) => LbError::Throttled { lb, action },
                // AWS's side (5xx, HealthUnavailable): worth another check. Anything else is our
                // request or our permissions (AccessDenied, validation): waiting does not heal it.
                "HealthUnavailable" => LbError::Service { lb, action, code, message },
                _ if server_error => LbError::Service { lb, action, code, message },
                _ => LbError::Rejected { lb, action, code, message },
            },
            AwsFailure::Credentials(detail) => LbError::Credentials { lb, action, detail },
            AwsFailure::Unreachable(detail) => LbError::Unreachable { lb, action, detail },
        }
    }
}

/// An attachment this instance can leave and rejoin.
pub trait LoadBalancer: Send + Sync {
    /// As configured, for logs and messages.
    fn spec(&self) -> &AttachmentSpec;
    /// What the state file records to find it again: a Classic name, a target group's ARN (once
    /// resolved; its name or ARN as given before).
    fn id(&self) -> String;
    /// Looks up what the configuration names (a target group's ARN); once per cycle. Fails with
    /// `NotFound` for an attachment that does not exist.
    fn resolve(&self) -> impl Future<Output = Result<(), LbError>> + Send;
    /// Health of every registered target, every instance's (a deregistered one may be absent).
    fn targets(&self) -> impl Future<Output = Result<Vec<TargetHealth>, LbError>> + Send;
    /// This instance's targets, from what `targets` listed: the ones to take out and put back.
    /// Classic: the instance itself, listed or not. Target group: every listed port.
    fn own_targets(&self, me: &str, listed: &[TargetHealth]) -> Vec<Target> {
        match self.spec().kind {
            Kind::Classic => vec![Target::instance(me)],
            Kind::TargetGroup => {
                let mut own: Vec<Target> = listed
                    .iter()
                    .filter(|h| h.target.instance_id == me && h.state != TargetState::NotRegistered)
                    .map(|h| h.target.clone())
                    .collect();
                own.sort();
                own.dedup();
                own
            }
        }
    }
    /// Starts deregistering `targets` (returns at once; completion must be polled).
    fn deregister(&self, targets: &[Target]) -> impl Future<Output = Result<(), LbError>> + Send;
    /// Registers `targets` (returns at once; serving must be polled).
    fn register(&self, targets: &[Target]) -> impl Future<Output = Result<(), LbError>> + Send;
    /// Draining and health-check timing.
    fn timings(&self) -> impl Future<Output = Result<LbTimings, LbError>> + Send;

    /// "load balancer NAME" or "target group NAME".
    fn label(&self) -> String {
        self.spec().to_string()
    }
}

impl<T: LoadBalancer> LoadBalancer for std::sync::Arc<T> {
    fn spec(&self) -> &AttachmentSpec {
        (**self).spec()
    }
    fn id(&self) -> String {
        (**self).id()
    }
    fn resolve(&self) -> impl Future<Output = Result<(), LbError>> + Send {
        (**self).resolve()
    }
    fn targets(&self) -> impl Future<Output = Result<Vec<TargetHealth>, LbError>> + Send {
        (**self).targets()
    }
    fn own_targets(&self, me: &str, listed: &[TargetHealth]) -> Vec<Target> {
        (**self).own_targets(me, listed)
    }
    fn deregister(&self, targets: &[Target]) -> impl Future<Output = Result<(), LbError>> + Send {
        (**self).deregister(targets)
    }
    fn register(&self, targets: &[Target]) -> impl Future<Output = Result<(), LbError>> + Send {
        (**self).register(targets)
    }
    fn timings(&self) -> impl Future<Output = Result<LbTimings, LbError>> + Send {
        (**self).timings()
    }
}

/// Either backend, dispatched statically (no boxed futures): what production cycles hold.
#[derive(Debug, Clone)]
pub enum Attachment {
    Classic(classic::ClassicElb),
    TargetGroup(target_group::TargetGroup),
}

impl Attachment {
    /// The backend for `spec`, on one AWS configuration.
    pub fn new(config: &aws_config::SdkConfig, spec: &AttachmentSpec) -> Self {
        match spec.kind {
            Kind::Classic => Attachment::Classic(classic::ClassicElb::new(config, spec.name.clone())),
            Kind::TargetGroup => Attachment::TargetGroup(target_group::TargetGroup::new(config, spec.name.clone())),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Attachment::Classic($b) => $e,
            Attachment::TargetGroup($b) => $e,
        }
    };
}

impl LoadBalancer for Attachment {
    fn spec(&self) -> &AttachmentSpec {
        dispatch!(self, b => b.spec())
    }
    fn id(&self) -> String {
        dispatch!(self, b => b.id())
    }
    async fn resolve(&self) -> Result<(), LbError> {
        dispatch!(self, b => b.resolve().await)
    }
    async fn targets(&self) -> Result<Vec<TargetHealth>, LbError> {
        dispatch!(self, b => b.targets().await)
    }
    async fn deregister(&self, targets: &[Target]) -> Result<(), LbError> {
        dispatch!(self, b => b.deregister(targets).await)
    }
    async fn register(&self, targets: &[Target]) -> Result<(), LbError> {
        dispatch!(self, b => b.register(targets).await)
    }
    async fn timings(&self) -> Result<LbTimings, LbError> {
        dispatch!(self, b => b.timings().await)
    }
}

/// Clamps `value` read from AWS into `[lo, hi]`, warning when it was outside.
pub(crate) fn clamp_read(lb: &str, what: &str, value: i64, lo: i64, hi: i64) -> u64 {
    let c = value.clamp(lo, hi);
    if c != value {
        tracing::warn!(lb, what, value, used = c, "{what} {value} read from {lb} is outside {lo}–{hi}; using {c}");
    }
    c as u64
}

/// The load balancer named by the hostname rule: `i-0abc.web.example.com`, with `example.com`
/// supported, belongs to `web-example-com` (hostname minus its first label, dots to dashes).
pub fn lb_name_from_hostname(hostname: &str, domains: &[String]) -> Result<String, String> {
    let ns = namespace(hostname)?;
    let supported = domains.iter().any(|d| ns == *d || ns.ends_with(&format!(".{d}")));
    if !supported {
        let list = if domains.is_empty() { "none configured".to_owned() } else { domains.join(", ") };
        return Err(format!(
            "hostname {hostname:?} is outside every supported domain ({list}): give --lb NAME or --target-group NAME, or --domain for its domain"
        ));
    }
    Ok(ns.replace('.', "-"))
}

/// The cluster's namespace: the hostname minus its first label (`web.example.com`).
pub fn namespace(hostname: &str) -> Result<String, String> {
    let host = hostname.trim().trim_end_matches('.').to_ascii_lowercase();
    match host.split_once('.') {
        Some((first, rest)) if !first.is_empty() && rest.contains('.') => Ok(rest.to_owned()),
        _ => Err(format!(
            "hostname {hostname:?} has no cluster domain: expected NODE.CLUSTER.DOMAIN (e.g. i-0abc.web.example.com); give --hostname"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_from_aws_are_clamped_to_their_documented_ranges() {
        assert_eq!(clamp_read("target group t", "delay", 99_999, 0, 3600), 3600);
        assert_eq!(clamp_read("target group t", "delay", -5, 0, 3600), 0);
        assert_eq!(clamp_read("target group t", "interval", 30, 5, 300), 30);
        assert_eq!(clamp_read("target group t", "threshold", 1, 2, 10), 2);
    }

    #[test]
    fn naming_rule() {
        let d = vec!["example.com".to_string()];
        assert_eq!(lb_name_from_hostname("i-0abc.web.example.com", &d).unwrap(), "web-example-com");
        assert_eq!(lb_name_from_hostname("I-0ABC.Web.Example.COM.", &d).unwrap(), "web-example-com");
        assert_eq!(lb_name_from_hostname("i-1.api.eu.example.com", &d).unwrap(), "api-eu-example-com");
        assert!(lb_name_from_hostname("i-1.web.example.org", &d)
            .unwrap_err()
            .contains("outside every supported domain"));
        assert!(lb_name_from_hostname("i-1.web.badexample.com", &d).is_err());
        assert!(lb_name_from_hostname("localhost", &d).unwrap_err().contains("no cluster domain"));
        assert!(lb_name_from_hostname("i-1.example", &d).is_err());
    }
}
