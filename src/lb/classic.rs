//! `LoadBalancer` for a Classic ELB through `aws-sdk-elasticloadbalancing`. All `SdkError` mapping
//! and every Classic state and description string stay here; throttling is retried by the SDK's
//! adaptive retry (see `identity::aws_config()`).

use std::time::Duration;

use aws_sdk_elasticloadbalancing::config::http::HttpResponse;
use aws_sdk_elasticloadbalancing::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_elasticloadbalancing::types::Instance;
use aws_sdk_elasticloadbalancing::Client;

use crate::identity::aws_failure;

use super::{clamp_read, AttachmentSpec, Kind, LbError, LbTimings, LoadBalancer, Target, TargetHealth, TargetState};

/// Description of a Classic ELB instance that is still draining: it says InService but is leaving.
pub const DEREGISTRATION_IN_PROGRESS: &str = "Instance deregistration currently in progress.";
/// Description that never heals by waiting: the instance's zone is not enabled on the load balancer.
pub const AZ_NOT_CONFIGURED: &str =
    "Instance is in the EC2 Availability Zone for which LoadBalancer is not configured to route traffic to.";

/// The neutral state of a Classic `State` and `Description`. A draining instance still says
/// `InService`: it counts as draining.
pub fn state_of(state: &str, description: &str) -> TargetState {
    match (state, description) {
        (_, AZ_NOT_CONFIGURED) => TargetState::NeverHeals,
        ("InService", DEREGISTRATION_IN_PROGRESS) => TargetState::Draining,
        ("InService", _) => TargetState::Serving,
        ("Unknown", _) => TargetState::Starting,
        _ => TargetState::Unhealthy,
    }
}

/// A Classic ELB by name.
#[derive(Debug, Clone)]
pub struct ClassicElb {
    client: Client,
    spec: AttachmentSpec,
}

impl ClassicElb {
    pub fn new(config: &aws_config::SdkConfig, name: impl Into<String>) -> Self {
        Self { client: Client::new(config), spec: AttachmentSpec { kind: Kind::Classic, name: name.into() } }
    }

    fn map<E>(&self, action: &'static str, targets: &[Target], err: SdkError<E, HttpResponse>) -> LbError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let ids = targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
        LbError::from_failure(aws_failure(&err), self.label(), action, (!targets.is_empty()).then_some(ids.as_str()))
    }

    fn instances(targets: &[Target]) -> Vec<Instance> {
        targets.iter().map(|t| Instance::builder().instance_id(&t.instance_id).build()).collect()
    }
}

impl LoadBalancer for ClassicElb {
    fn spec(&self) -> &AttachmentSpec {
        &self.spec
    }

    fn id(&self) -> String {
        self.spec.name.clone()
    }

    async fn resolve(&self) -> Result<(), LbError> {
        Ok(())
    }

    /// `DescribeInstanceHealth` without ids: only registered instances are listed (with ids, AWS
    /// answers `InvalidInstance` for a deregistered one).
    async fn targets(&self) -> Result<Vec<TargetHealth>, LbError> {
        let out = self
            .client
            .describe_instance_health()
            .load_balancer_name(&self.spec.name)
            .send()
            .await
            .map_err(|e| self.map("DescribeInstanceHealth", &[], e))?;
        Ok(out
            .instance_states()
            .iter()
            .filter_map(|s| {
                let (state, description) = (s.state().unwrap_or_default(), s.description().unwrap_or_default());
                Some(TargetHealth {
                    target: Target::instance(s.instance_id()?),
                    state: state_of(state, description),
                    raw: format!("{state} ({description})"),
                })
            })
            .collect())
    }

    async fn deregister(&self, targets: &[Target]) -> Result<(), LbError> {
        self.client
            .deregister_instances_from_load_balancer()
            .load_balancer_name(&self.spec.name)
            .set_instances(Some(Self::instances(targets)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map("DeregisterInstancesFromLoadBalancer", targets, e))
    }

    async fn register(&self, targets: &[Target]) -> Result<(), LbError> {
        self.client
            .register_instances_with_load_balancer()
            .load_balancer_name(&self.spec.name)
            .set_instances(Some(Self::instances(targets)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map("RegisterInstancesWithLoadBalancer", targets, e))
    }

    async fn timings(&self) -> Result<LbTimings, LbError> {
        let attrs = self
            .client
            .describe_load_balancer_attributes()
            .load_balancer_name(&self.spec.name)
            .send()
            .await
            .map_err(|e| self.map("DescribeLoadBalancerAttributes", &[], e))?;
        let lb = self.label();
        let drain = attrs.load_balancer_attributes().and_then(|a| a.connection_draining()).and_then(|d| {
            // Draining disabled: deregistration cuts connections at once. Timeout: 1–3600 s.
            d.enabled().then(|| {
                Duration::from_secs(clamp_read(
                    &lb,
                    "connection draining timeout",
                    d.timeout().unwrap_or(300).into(),
                    1,
                    3600,
                ))
            })
        });
        let lbs = self
            .client
            .describe_load_balancers()
            .load_balancer_names(&self.spec.name)
            .send()
            .await
            .map_err(|e| self.map("DescribeLoadBalancers", &[], e))?;
        let healthy_after = lbs
            .load_balancer_descriptions()
            .first()
            .and_then(|d| d.health_check())
            .map(|h| {
                // Documented ranges: interval 5–300 s, healthy threshold 2–10.
                let interval = clamp_read(&lb, "health check interval", h.interval().into(), 5, 300);
                let threshold = clamp_read(&lb, "healthy threshold", h.healthy_threshold().into(), 2, 10);
                Duration::from_secs(interval * threshold)
            })
            // AWS's defaults: 30 s interval, 10 healthy checks.
            .unwrap_or(Duration::from_secs(300));
        Ok(LbTimings { drain, healthy_after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_states() {
        assert_eq!(state_of("InService", "N/A"), TargetState::Serving);
        assert_eq!(state_of("InService", DEREGISTRATION_IN_PROGRESS), TargetState::Draining);
        assert_eq!(state_of("OutOfService", "N/A"), TargetState::Unhealthy);
        assert_eq!(state_of("Unknown", "N/A"), TargetState::Starting);
        assert_eq!(state_of("OutOfService", AZ_NOT_CONFIGURED), TargetState::NeverHeals);
        assert_eq!(state_of("Weird", ""), TargetState::Unhealthy);
    }
}
