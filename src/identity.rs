//! Who am I: instance id (IMDSv2 unless `--instance-id`), the machine's hostname (unless
//! `--hostname`), and from it the cluster namespace and, when no attachment is named, the Classic
//! load balancer's name.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::BehaviorVersion;
use aws_sdk_elasticloadbalancing::config::http::HttpResponse;
use aws_sdk_elasticloadbalancing::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::config::{MembersSource, Settings};
use crate::lb::{lb_name_from_hostname, namespace, AttachmentSpec, Kind};

/// This instance and its cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub instance_id: String,
    pub hostname: String,
    /// `web.example.com` for `i-0abc.web.example.com`.
    pub namespace: String,
    /// Classic load balancers, then target groups, as configured (or the hostname rule's one);
    /// empty with `--members asg` and none named: the group's own are used.
    pub attachments: Vec<AttachmentSpec>,
}

impl Identity {
    /// The key of the cluster's permit record (strict mode): its namespace, or the first
    /// attachment's name when the hostname has none (`--members static:N` off the naming rule).
    pub fn cluster_key(&self) -> &str {
        if self.namespace.is_empty() {
            self.attachments.first().map(|a| a.name.as_str()).unwrap_or_default()
        } else {
            &self.namespace
        }
    }

    /// The attachments, for logs: "load balancer web, target group api".
    pub fn attachment_list(&self) -> String {
        self.attachments.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// The AWS configuration: the usual chains (env, profile, IMDS) for region and credentials,
/// `AWS_ENDPOINT_URL*` overrides, and adaptive retry (backs off on throttling, 5 attempts).
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::adaptive().with_max_attempts(5).with_initial_backoff(Duration::from_millis(500)))
        .load()
        .await
}

/// An AWS SDK error, reduced to what callers branch on. Every service crate's `SdkError` and HTTP
/// response are the same smithy types, so one reading serves the load balancers, Auto Scaling and
/// DynamoDB (`lb::ec2`, which is not an SDK crate, gives an `AwsFailure` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsFailure {
    /// AWS answered with an error: its code and message, and whether it was on AWS's side (5xx).
    Service { code: String, message: String, server_error: bool },
    /// No usable credentials (found by type anywhere in the error's source chain: the SDK reports
    /// them as a dispatch failure).
    Credentials(String),
    /// Never got an answer: connection, timeout, DNS.
    Unreachable(String),
}

/// The error codes AWS's Query and JSON APIs answer when they throttle: ELB (both versions), EC2
/// and Auto Scaling.
pub fn is_throttling(code: &str) -> bool {
    matches!(code, "Throttling" | "ThrottlingException" | "RequestLimitExceeded")
}

pub fn aws_failure<E>(err: &SdkError<E, HttpResponse>) -> AwsFailure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(se) = err {
        let e = se.err();
        return AwsFailure::Service {
            code: e.code().unwrap_or("Unknown").to_owned(),
            message: e.message().unwrap_or_default().to_owned(),
            server_error: se.raw().status().is_server_error(),
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>() {
            // The provider's causes on one line (the SDK's own warning, which adds a debug dump of
            // the same error, is kept for `--log-level debug`: see `logging`).
            return AwsFailure::Credentials(crate::cycle::chain(c));
        }
        source = e.source();
    }
    AwsFailure::Unreachable(DisplayErrorContext(err).to_string())
}

/// Why the identity cannot be resolved; all of them are configuration errors (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the machine's hostname is not UTF-8: give --hostname")]
    HostnameNotUtf8,
    /// The hostname rule cannot name the cluster or its load balancer.
    #[error("{0}")]
    HostnameRule(String),
    #[error("cannot read the instance id from the EC2 metadata service (IMDSv2); off EC2, give --instance-id")]
    InstanceId {
        #[source]
        source: Box<aws_config::imds::client::error::ImdsError>,
    },
}

/// Resolves the identity from settings, asking IMDS only for what no flag gave.
pub async fn resolve(settings: &Settings) -> Result<Identity, IdentityError> {
    let hostname = match &settings.hostname {
        Some(h) => h.clone(),
        None => gethostname::gethostname().into_string().map_err(|_| IdentityError::HostnameNotUtf8)?,
    };
    let mut attachments: Vec<AttachmentSpec> = settings
        .lbs
        .iter()
        .map(|n| AttachmentSpec { kind: Kind::Classic, name: n.clone() })
        .chain(settings.target_groups.iter().map(|n| AttachmentSpec { kind: Kind::TargetGroup, name: n.clone() }))
        .collect();
    let asg = matches!(settings.members, MembersSource::Asg(_));
    // With an Auto Scaling group and nothing named, the group's own attachments are used (read
    // later, from AWS): no hostname rule.
    if attachments.is_empty() && !asg {
        let name = lb_name_from_hostname(&hostname, &settings.domains).map_err(IdentityError::HostnameRule)?;
        attachments.push(AttachmentSpec { kind: Kind::Classic, name });
    }
    let ns = match (namespace(&hostname), &settings.members) {
        (Ok(ns), _) => ns,
        (Err(_), MembersSource::Static(_) | MembersSource::Asg(_)) => String::new(),
        (Err(e), _) => return Err(IdentityError::HostnameRule(e)),
    };
    let instance_id = match &settings.instance_id {
        Some(id) => id.clone(),
        None => imds_instance_id().await?,
    };
    Ok(Identity { instance_id, hostname, namespace: ns, attachments })
}

async fn imds_instance_id() -> Result<String, IdentityError> {
    let client = aws_config::imds::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(2))
        .max_attempts(2)
        .build();
    client
        .get("/latest/meta-data/instance-id")
        .await
        .map(|s| s.as_ref().trim().to_owned())
        .map_err(|source| IdentityError::InstanceId { source: Box::new(source) })
}
