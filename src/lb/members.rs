//! Who is in the cluster: the denominator of the quorum fraction. Never the load balancer's own list
//! (deregistered instances vanish from it, so the fraction would look better every time one leaves).

use std::collections::BTreeSet;
use std::future::Future;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::Filter;

use crate::identity::AwsFailure;
use crate::quorum::Members;

/// Instance states that still belong to the cluster (terminated and shutting-down do not).
pub const MEMBER_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// A source of cluster membership (an Auto Scaling group source can be added behind it later).
pub trait Membership: Send + Sync {
    fn members(&self) -> impl Future<Output = Result<Members, String>> + Send;
    /// What it counts, for logs and `status`.
    fn describe(&self) -> String;
}

/// A fixed count (`--members static:N`).
#[derive(Debug, Clone)]
pub struct StaticMembers(pub usize);

impl Membership for StaticMembers {
    async fn members(&self) -> Result<Members, String> {
        Ok(Members::Count(self.0))
    }
    fn describe(&self) -> String {
        format!("static:{}", self.0)
    }
}

/// EC2 instances, not terminated, whose `Name` tag is `<node>.<namespace>` (the original tool's rule,
/// the same namespace as the hostname).
#[derive(Debug, Clone)]
pub struct Ec2NameMembers {
    client: aws_sdk_ec2::Client,
    namespace: String,
}

impl Ec2NameMembers {
    pub fn new(config: &aws_config::SdkConfig, namespace: impl Into<String>) -> Self {
        Self { client: aws_sdk_ec2::Client::new(config), namespace: namespace.into() }
    }
}

/// Whether a `Name` tag belongs to the namespace: exactly one label in front of it.
pub fn in_namespace(name: &str, namespace: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    matches!(name.split_once('.'), Some((node, rest)) if !node.is_empty() && rest == namespace)
}

impl Membership for Ec2NameMembers {
    async fn members(&self) -> Result<Members, String> {
        let mut ids = BTreeSet::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_instances()
                .filters(Filter::builder().name("tag:Name").values(format!("*.{}", self.namespace)).build())
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .set_values(Some(MEMBER_STATES.map(String::from).to_vec()))
                        .build(),
                )
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| ec2_error(&self.namespace, e))?;
            for inst in out.reservations().iter().flat_map(|r| r.instances()) {
                let name =
                    inst.tags().iter().find(|t| t.key() == Some("Name")).and_then(|t| t.value()).unwrap_or_default();
                if let (Some(id), true) = (inst.instance_id(), in_namespace(name, &self.namespace)) {
                    ids.insert(id.to_owned());
                }
            }
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(Members::Ids(ids))
    }

    fn describe(&self) -> String {
        format!("ec2-name:*.{}", self.namespace)
    }
}

fn ec2_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    ns: &str,
    e: SdkError<E, HttpResponse>,
) -> String {
    match crate::identity::aws_failure(&e) {
        AwsFailure::Service { code, message, .. } => {
            format!("EC2 DescribeInstances for members *.{ns} failed: {code}: {message}")
        }
        AwsFailure::Credentials(detail) => {
            format!("EC2 DescribeInstances for members *.{ns}: no usable AWS credentials ({detail})")
        }
        AwsFailure::Unreachable(detail) => {
            format!("EC2 DescribeInstances for members *.{ns} could not reach AWS: {detail}")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespace_match() {
        let ns = "web.example.com";
        assert!(super::in_namespace("i-1.web.example.com", ns));
        assert!(super::in_namespace("I-1.Web.Example.com.", ns));
        assert!(!super::in_namespace("x.i-1.web.example.com", ns));
        assert!(!super::in_namespace("web.example.com", ns));
        assert!(!super::in_namespace("i-1.api.example.com", ns));
        assert!(!super::in_namespace("", ns));
    }
}

/// Either source, chosen by `--members`.
#[derive(Debug, Clone)]
pub enum AnyMembers {
    Static(StaticMembers),
    Ec2Name(Ec2NameMembers),
}

impl Membership for AnyMembers {
    async fn members(&self) -> Result<Members, String> {
        match self {
            AnyMembers::Static(s) => s.members().await,
            AnyMembers::Ec2Name(e) => e.members().await,
        }
    }
    fn describe(&self) -> String {
        match self {
            AnyMembers::Static(s) => s.describe(),
            AnyMembers::Ec2Name(e) => e.describe(),
        }
    }
}
