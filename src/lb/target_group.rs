//! `LoadBalancer` for an ELBv2 target group (behind an ALB or NLB) through
//! `aws-sdk-elasticloadbalancingv2`. Every target-group state and reason string stays here. The
//! group is named by name or ARN; `resolve` looks it up once per cycle (`DescribeTargetGroups`) and
//! keeps its ARN and health-check settings.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::config::http::HttpResponse;
use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_elasticloadbalancingv2::types::TargetDescription;
use aws_sdk_elasticloadbalancingv2::Client;

use crate::identity::aws_failure;

use super::{clamp_read, AttachmentSpec, Kind, LbError, LbTimings, LoadBalancer, Target, TargetHealth, TargetState};

/// The attribute that bounds draining (AWS default 300 s, range 0–3600).
pub const DEREGISTRATION_DELAY: &str = "deregistration_delay.timeout_seconds";

/// The neutral state of a target-group `State` and `Reason`. Serving means `healthy` and nothing
/// else; any state the SDK does not know is out.
pub fn state_of(state: &str, reason: &str) -> TargetState {
    match (state, reason) {
        ("healthy", _) => TargetState::Serving,
        ("draining" | "unhealthy.draining", _) => TargetState::Draining,
        ("initial", _) => TargetState::Starting,
        ("unused", "Target.NotRegistered") => TargetState::NotRegistered,
        // Its zone is not enabled, or no load balancer uses the group: waiting will not fix it.
        ("unused", "Target.NotInUse") => TargetState::NeverHeals,
        _ => TargetState::Unhealthy,
    }
}

/// What `resolve` found.
#[derive(Debug, Clone)]
struct Found {
    arn: String,
    /// interval × healthy threshold + timeout, clamped to the documented ranges.
    healthy_after: Duration,
}

/// A target group by name or ARN.
#[derive(Debug, Clone)]
pub struct TargetGroup {
    client: Client,
    spec: AttachmentSpec,
    found: Arc<Mutex<Option<Found>>>,
}

impl TargetGroup {
    pub fn new(config: &aws_config::SdkConfig, name_or_arn: impl Into<String>) -> Self {
        Self {
            client: Client::new(config),
            spec: AttachmentSpec { kind: Kind::TargetGroup, name: name_or_arn.into() },
            found: Arc::default(),
        }
    }

    fn is_arn(&self) -> bool {
        self.spec.name.starts_with("arn:")
    }

    fn map<E>(&self, action: &'static str, targets: &[Target], err: SdkError<E, HttpResponse>) -> LbError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let ids = targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
        LbError::from_failure(aws_failure(&err), self.label(), action, (!targets.is_empty()).then_some(ids.as_str()))
    }

    /// The ARN, resolving first when needed.
    async fn arn(&self) -> Result<String, LbError> {
        if let Some(f) = self.found.lock().unwrap().as_ref() {
            return Ok(f.arn.clone());
        }
        self.resolve().await?;
        Ok(self.found.lock().unwrap().as_ref().expect("resolved").arn.clone())
    }

    fn descriptions(targets: &[Target]) -> Vec<TargetDescription> {
        targets.iter().map(|t| TargetDescription::builder().id(&t.instance_id).set_port(t.port).build()).collect()
    }
}

impl LoadBalancer for TargetGroup {
    fn spec(&self) -> &AttachmentSpec {
        &self.spec
    }

    fn id(&self) -> String {
        self.found.lock().unwrap().as_ref().map(|f| f.arn.clone()).unwrap_or_else(|| self.spec.name.clone())
    }

    async fn resolve(&self) -> Result<(), LbError> {
        let call = self.client.describe_target_groups();
        let call = if self.is_arn() { call.target_group_arns(&self.spec.name) } else { call.names(&self.spec.name) };
        let out = call.send().await.map_err(|e| match self.map("DescribeTargetGroups", &[], e) {
            // A malformed ARN or name is answered with ValidationError before any lookup.
            LbError::Rejected { lb, code, .. } if code == "ValidationError" => LbError::NotFound { lb, code },
            other => other,
        })?;
        let Some(tg) = out.target_groups().first() else {
            return Err(LbError::NotFound { lb: self.label(), code: "TargetGroupNotFound".into() });
        };
        let lb = self.label();
        // Documented ranges: interval 5–300 s, healthy threshold 2–10, timeout 2–120 s.
        let interval =
            clamp_read(&lb, "health check interval", tg.health_check_interval_seconds().unwrap_or(30).into(), 5, 300);
        let threshold = clamp_read(&lb, "healthy threshold", tg.healthy_threshold_count().unwrap_or(5).into(), 2, 10);
        let timeout =
            clamp_read(&lb, "health check timeout", tg.health_check_timeout_seconds().unwrap_or(5).into(), 2, 120);
        let found = Found {
            arn: tg.target_group_arn().unwrap_or(&self.spec.name).to_owned(),
            healthy_after: Duration::from_secs(interval * threshold + timeout),
        };
        *self.found.lock().unwrap() = Some(found);
        Ok(())
    }

    /// `DescribeTargetHealth` without targets: every registered target at once, every port.
    async fn targets(&self) -> Result<Vec<TargetHealth>, LbError> {
        let arn = self.arn().await?;
        let out = self
            .client
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| self.map("DescribeTargetHealth", &[], e))?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                let health = d.target_health();
                let state = health.and_then(|h| h.state()).map(|s| s.as_str()).unwrap_or("unknown");
                let reason = health.and_then(|h| h.reason()).map(|r| r.as_str()).unwrap_or("");
                Some(TargetHealth {
                    target: Target { instance_id: t.id()?.to_owned(), port: t.port() },
                    state: state_of(state, reason),
                    raw: if reason.is_empty() { state.to_owned() } else { format!("{state} ({reason})") },
                })
            })
            .collect())
    }

    async fn deregister(&self, targets: &[Target]) -> Result<(), LbError> {
        let arn = self.arn().await?;
        self.client
            .deregister_targets()
            .target_group_arn(arn)
            .set_targets(Some(Self::descriptions(targets)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map("DeregisterTargets", targets, e))
    }

    async fn register(&self, targets: &[Target]) -> Result<(), LbError> {
        let arn = self.arn().await?;
        self.client
            .register_targets()
            .target_group_arn(arn)
            .set_targets(Some(Self::descriptions(targets)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.map("RegisterTargets", targets, e))
    }

    /// The deregistration delay (draining shows for all of it, connections or not) and the health
    /// bound read by `resolve`.
    async fn timings(&self) -> Result<LbTimings, LbError> {
        let arn = self.arn().await?;
        let out = self
            .client
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| self.map("DescribeTargetGroupAttributes", &[], e))?;
        let lb = self.label();
        let delay = out
            .attributes()
            .iter()
            .find(|a| a.key() == Some(DEREGISTRATION_DELAY))
            .and_then(|a| a.value())
            .map(|v| match v.trim().parse::<i64>() {
                Ok(n) => clamp_read(&lb, DEREGISTRATION_DELAY, n, 0, 3600),
                Err(_) => {
                    tracing::warn!(lb = %lb, value = v, "{DEREGISTRATION_DELAY} {v:?} is not a number; using 300");
                    300
                }
            })
            .unwrap_or(300);
        let healthy_after =
            self.found.lock().unwrap().as_ref().map(|f| f.healthy_after).unwrap_or(Duration::from_secs(155));
        Ok(LbTimings { drain: Some(Duration::from_secs(delay)), healthy_after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_healthy_serves() {
        let table = [
            ("healthy", "", TargetState::Serving),
            ("initial", "Elb.RegistrationInProgress", TargetState::Starting),
            ("unhealthy", "Target.FailedHealthChecks", TargetState::Unhealthy),
            ("draining", "Target.DeregistrationInProgress", TargetState::Draining),
            ("unhealthy.draining", "", TargetState::Draining),
            ("unused", "Target.NotRegistered", TargetState::NotRegistered),
            ("unused", "Target.NotInUse", TargetState::NeverHeals),
            ("unused", "Target.InvalidState", TargetState::Unhealthy),
            ("unavailable", "", TargetState::Unhealthy),
            ("something-new", "", TargetState::Unhealthy),
        ];
        for (state, reason, want) in table {
            assert_eq!(state_of(state, reason), want, "{state} {reason}");
            assert_eq!(state_of(state, reason) == TargetState::Serving, state == "healthy");
        }
    }
}
