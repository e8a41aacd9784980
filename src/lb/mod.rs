//! The load balancer as the cycle sees it: a trait, its Classic ELB implementation (`classic`), and
//! where the cluster's membership comes from (`members`). Tests put an in-process fake behind the
//! same trait for what the AWS emulator cannot show (draining, slow health, throttling, faults).

pub mod classic;
pub mod members;

use std::future::Future;
use std::time::Duration;

use thiserror::Error;

/// Description of a Classic ELB instance that is still draining: it says InService but is leaving.
pub const DEREGISTRATION_IN_PROGRESS: &str = "Instance deregistration currently in progress.";
/// Description that never heals by waiting: the instance's zone is not enabled on the load balancer.
pub const AZ_NOT_CONFIGURED: &str =
    "Instance is in the EC2 Availability Zone for which LoadBalancer is not configured to route traffic to.";

/// `InService`, `OutOfService` or `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HealthState {
    InService,
    OutOfService,
    Unknown,
}

impl HealthState {
    pub fn parse(s: &str) -> Self {
        match s {
            "InService" => Self::InService,
            "OutOfService" => Self::OutOfService,
            _ => Self::Unknown,
        }
    }
}

/// One registered instance's health.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceHealth {
    pub instance_id: String,
    pub state: HealthState,
    pub description: String,
}

impl InstanceHealth {
    /// Serving = InService and not draining (a draining instance still says InService).
    pub fn serving(&self) -> bool {
        self.state == HealthState::InService && self.description != DEREGISTRATION_IN_PROGRESS
    }

    /// A state that waiting will not fix.
    pub fn never_heals(&self) -> bool {
        self.description == AZ_NOT_CONFIGURED
    }
}

/// The load balancer's own timings, which bound the waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbTimings {
    /// Connection draining timeout, `None` when draining is disabled.
    pub drain: Option<Duration>,
    /// Health check interval × healthy threshold: how long a healthy instance takes to be InService.
    pub healthy_after: Duration,
}

/// What talking to the load balancer can fail with. Display names the load balancer and the action.
#[derive(Debug, Error)]
pub enum LbError {
    #[error("load balancer {lb} not found (LoadBalancerNotFound): check --lb or the hostname's domain")]
    LoadBalancerNotFound { lb: String },
    #[error("load balancer {lb} rejected instance {instance} in {action} (InvalidInstance): {message}")]
    InvalidInstance { lb: String, instance: String, action: &'static str, message: String },
    #[error("{action} on load balancer {lb} was throttled (Rate exceeded) even after retries")]
    Throttled { lb: String, action: &'static str },
    /// AWS failed on its side (HTTP 5xx) even after the SDK's retries.
    #[error("{action} on load balancer {lb} failed: {code}: {message}")]
    Service { lb: String, action: &'static str, code: String, message: String },
    /// AWS refused the request (HTTP 4xx other than throttling): permissions, validation.
    #[error("{action} on load balancer {lb} was refused: {code}: {message} (for AccessDenied, see the IAM policy in the README)")]
    Rejected { lb: String, action: &'static str, code: String, message: String },
    #[error("{action} on load balancer {lb}: no usable AWS credentials ({detail}); give the instance an IAM role (instance profile), or set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")]
    Credentials { lb: String, action: &'static str, detail: String },
    #[error("{action} on load balancer {lb} could not reach AWS: {detail}")]
    Unreachable { lb: String, action: &'static str, detail: String },
}

impl LbError {
    /// Worth trying again later (the SDK has already retried with backoff). A refusal is not: an
    /// AccessDenied at the gate fails at once instead of spending every check.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LbError::Throttled { .. } | LbError::Unreachable { .. } | LbError::Service { .. })
    }
}

/// A load balancer this instance can leave and rejoin.
pub trait LoadBalancer: Send + Sync {
    /// Its name, for logs.
    fn name(&self) -> &str;
    /// Health of every registered instance (a deregistered instance is absent).
    fn registered(&self) -> impl Future<Output = Result<Vec<InstanceHealth>, LbError>> + Send;
    /// Starts deregistering `instance` (returns at once; completion must be polled).
    fn deregister(&self, instance: &str) -> impl Future<Output = Result<(), LbError>> + Send;
    /// Registers `instance` (returns at once; InService must be polled).
    fn register(&self, instance: &str) -> impl Future<Output = Result<(), LbError>> + Send;
    /// Draining timeout and health-check timing.
    fn timings(&self) -> impl Future<Output = Result<LbTimings, LbError>> + Send;
}

impl<T: LoadBalancer> LoadBalancer for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn registered(&self) -> impl Future<Output = Result<Vec<InstanceHealth>, LbError>> + Send {
        (**self).registered()
    }
    fn deregister(&self, instance: &str) -> impl Future<Output = Result<(), LbError>> + Send {
        (**self).deregister(instance)
    }
    fn register(&self, instance: &str) -> impl Future<Output = Result<(), LbError>> + Send {
        (**self).register(instance)
    }
    fn timings(&self) -> impl Future<Output = Result<LbTimings, LbError>> + Send {
        (**self).timings()
    }
}

/// The load balancer named by the hostname rule: `i-0abc.web.example.com`, with `example.com`
/// supported, belongs to `web-example-com` (hostname minus its first label, dots to dashes).
pub fn lb_name_from_hostname(hostname: &str, domains: &[String]) -> Result<String, String> {
    let ns = namespace(hostname)?;
    let supported = domains.iter().any(|d| ns == *d || ns.ends_with(&format!(".{d}")));
    if !supported {
        let list = if domains.is_empty() { "none configured".to_owned() } else { domains.join(", ") };
        return Err(format!(
            "hostname {hostname:?} is outside every supported domain ({list}): give --lb NAME, or --domain for its domain"
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

    #[test]
    fn serving_excludes_draining() {
        let h = |state, d: &str| InstanceHealth { instance_id: "i".into(), state, description: d.into() };
        assert!(h(HealthState::InService, "N/A").serving());
        assert!(!h(HealthState::InService, DEREGISTRATION_IN_PROGRESS).serving());
        assert!(!h(HealthState::OutOfService, "N/A").serving());
        assert!(!h(HealthState::Unknown, "N/A").serving());
        assert!(h(HealthState::OutOfService, AZ_NOT_CONFIGURED).never_heals());
    }
}
