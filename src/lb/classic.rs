//! `LoadBalancer` for a Classic ELB through `aws-sdk-elasticloadbalancing`. All `SdkError` mapping
//! happens here; throttling is retried by the SDK's adaptive retry (see `aws_config()`).

use std::time::Duration;

use aws_sdk_elasticloadbalancing::config::http::HttpResponse;
use aws_sdk_elasticloadbalancing::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_elasticloadbalancing::types::Instance;
use aws_sdk_elasticloadbalancing::Client;

use crate::identity::{aws_failure, AwsFailure};

use super::{HealthState, InstanceHealth, LbError, LbTimings, LoadBalancer};

/// A Classic ELB by name.
#[derive(Debug, Clone)]
pub struct ClassicElb {
    client: Client,
    name: String,
}

impl ClassicElb {
    pub fn new(config: &aws_config::SdkConfig, name: impl Into<String>) -> Self {
        Self { client: Client::new(config), name: name.into() }
    }

    fn map<E>(&self, action: &'static str, instance: Option<&str>, err: SdkError<E, HttpResponse>) -> LbError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let lb = self.name.clone();
        match aws_failure(&err) {
            AwsFailure::Service { code, message, server_error } => match code.as_str() {
                "LoadBalancerNotFound" => LbError::LoadBalancerNotFound { lb },
                "InvalidInstance" => {
                    LbError::InvalidInstance { lb, instance: instance.unwrap_or_default().to_owned(), action, message }
                }
                "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => LbError::Throttled { lb, action },
                // AWS's side (5xx): worth another check. Anything else is our request or our
                // permissions (AccessDenied, validation): waiting does not heal it.
                _ if server_error => LbError::Service { lb, action, code, message },
                _ => LbError::Rejected { lb, action, code, message },
            },
            AwsFailure::Credentials(detail) => LbError::Credentials { lb, action, detail },
            AwsFailure::Unreachable(detail) => LbError::Unreachable { lb, action, detail },
        }
    }
}

impl LoadBalancer for ClassicElb {
    fn name(&self) -> &str {
        &self.name
    }

    async fn registered(&self) -> Result<Vec<InstanceHealth>, LbError> {
        let out = self
            .client
            .describe_instance_health()
            .load_balancer_name(&self.name)
            .send()
            .await
            .map_err(|e| self.map("DescribeInstanceHealth", None, e))?;
        Ok(out
            .instance_states()
            .iter()
            .filter_map(|s| {
                Some(InstanceHealth {
                    instance_id: s.instance_id()?.to_owned(),
                    state: HealthState::parse(s.state().unwrap_or_default()),
                    description: s.description().unwrap_or_default().to_owned(),
                })
            })
            .collect())
    }

    async fn deregister(&self, instance: &str) -> Result<(), LbError> {
        self.client
            .deregister_instances_from_load_balancer()
            .load_balancer_name(&self.name)
            .instances(Instance::builder().instance_id(instance).build())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map("DeregisterInstancesFromLoadBalancer", Some(instance), e))
    }

    async fn register(&self, instance: &str) -> Result<(), LbError> {
        self.client
            .register_instances_with_load_balancer()
            .load_balancer_name(&self.name)
            .instances(Instance::builder().instance_id(instance).build())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map("RegisterInstancesWithLoadBalancer", Some(instance), e))
    }

    async fn timings(&self) -> Result<LbTimings, LbError> {
        let attrs = self
            .client
            .describe_load_balancer_attributes()
            .load_balancer_name(&self.name)
            .send()
            .await
            .map_err(|e| self.map("DescribeLoadBalancerAttributes", None, e))?;
        let drain = attrs.load_balancer_attributes().and_then(|a| a.connection_draining()).and_then(|d| {
            // Draining disabled: deregistration cuts connections at once.
            d.enabled().then(|| Duration::from_secs(d.timeout().unwrap_or(300).max(0) as u64))
        });
        let lbs = self
            .client
            .describe_load_balancers()
            .load_balancer_names(&self.name)
            .send()
            .await
            .map_err(|e| self.map("DescribeLoadBalancers", None, e))?;
        let healthy_after = lbs
            .load_balancer_descriptions()
            .first()
            .and_then(|d| d.health_check())
            .map(|h| Duration::from_secs((h.interval().max(1) as u64) * (h.healthy_threshold().max(1) as u64)))
            // AWS's defaults: 30 s interval, 10 healthy checks.
            .unwrap_or(Duration::from_secs(300));
        Ok(LbTimings { drain, healthy_after })
    }
}
