//! Who is in the cluster: the denominator of the quorum fraction, each member's Availability Zone
//! where the source knows it, and (Auto Scaling) each member's lifecycle state. Never the load
//! balancer's own list (deregistered instances vanish from it, so the fraction would look better
//! every time one leaves). The Auto Scaling source also knows its group: the attachments, the sizes,
//! and Standby, through which an instance can leave instead of deregistering.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use thiserror::Error;

use crate::identity::AwsFailure;
use crate::lb::{AttachmentSpec, Kind};
use crate::quorum::Members;

/// Instance states that still belong to the cluster (terminated and shutting-down do not).
pub const MEMBER_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// What the membership source said at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub members: Members,
    /// Instance id → Availability Zone, for every member whose zone the source knows.
    pub zones: BTreeMap<String, String>,
    /// Instance id → Auto Scaling lifecycle state (`InService`, `Standby`, ...); empty elsewhere.
    pub lifecycle: BTreeMap<String, String>,
    /// Auto Scaling: the group as the same read found it (its attachments), so that a cycle built
    /// on the group's attachments sees them change.
    pub group: Option<Box<GroupInfo>>,
}

impl Roster {
    /// Members only, no zones, lifecycle or group.
    pub fn of(members: Members) -> Self {
        Roster { members, zones: BTreeMap::new(), lifecycle: BTreeMap::new(), group: None }
    }

    /// `id`'s Availability Zone and the members in it (`id` included), when the source knows it.
    pub fn zone_of(&self, id: &str) -> Option<(&str, BTreeSet<String>)> {
        let zone = self.zones.get(id)?;
        let Members::Ids(ids) = &self.members else { return None };
        Some((zone, ids.iter().filter(|m| self.zones.get(*m) == Some(zone)).cloned().collect()))
    }

    /// Whether `id` is a member.
    pub fn members_contains(&self, id: &str) -> bool {
        match &self.members {
            Members::Ids(ids) => ids.contains(id),
            Members::Count(_) => true,
        }
    }

    /// Whether `id` is in Standby (or entering it): a member that serves nothing.
    pub fn in_standby(&self, id: &str) -> bool {
        matches!(self.lifecycle.get(id).map(String::as_str), Some("Standby" | "EnteringStandby"))
    }
}

/// What asking the membership source can fail with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembersError {
    /// The configuration is wrong (unknown group, instance in no group, access denied): exit 2.
    #[error("{0}")]
    Configuration(String),
    /// Throttling, 5xx, AWS unreachable: worth another check.
    #[error("{0}")]
    Transient(String),
    /// A refusal that waiting does not heal (validation, a state that forbids the call).
    #[error("{0}")]
    Failed(String),
    /// The source cannot do this (Standby needs an Auto Scaling group).
    #[error("{0} needs --members asg (an Auto Scaling group)")]
    Unsupported(&'static str),
}

/// How long a process goes on retrying its start-up lookup of the Auto Scaling group
/// (`retry_at_start`).
pub const START_RETRY_FOR: Duration = Duration::from_secs(300);
/// The largest pause between two tries of the start-up lookup.
pub const START_RETRY_MAX_PAUSE: Duration = Duration::from_secs(30);

/// Runs a lookup every process makes before anything else (the Auto Scaling group: its name,
/// attachments and sizes). A fleet asked at once makes them all in the same second, against one
/// Auto Scaling bucket per account: a throttled, failing or unreachable call is tried again after
/// a pause drawn in 0..P, P from 1 s doubling to `START_RETRY_MAX_PAUSE` (full jitter spreads the
/// fleet over the bucket's refill), for up to `START_RETRY_FOR`; anything else fails at once.
pub async fn retry_at_start<T, F, Fut>(what: &str, mut call: F) -> Result<T, MembersError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MembersError>>,
{
    let start = tokio::time::Instant::now();
    let mut cap = Duration::from_secs(1);
    loop {
        match call().await {
            Err(e) if e.is_retryable() && start.elapsed() < START_RETRY_FOR => {
                let pause = cap.mul_f64(fastrand::f64());
                tracing::info!(error = %e, "{what} failed; trying again in {:.1} s", pause.as_secs_f64());
                tokio::time::sleep(pause).await;
                cap = (cap * 2).min(START_RETRY_MAX_PAUSE);
            }
            result => return result,
        }
    }
}

impl MembersError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, MembersError::Transient(_))
    }

    pub fn is_configuration(&self) -> bool {
        matches!(self, MembersError::Configuration(_) | MembersError::Unsupported(_))
    }

    /// Reads an AWS failure of `what`: throttling, 5xx and no answer are transient; a missing
    /// credential or AccessDenied is configuration; anything else failed.
    pub fn from_aws(what: &str, failure: AwsFailure) -> Self {
        match failure {
            AwsFailure::Service { code, message, server_error } => {
                let text = format!("{what} failed: {code}: {message}");
                match code.as_str() {
                    c if crate::identity::is_throttling(c) => MembersError::Transient(text),
                    "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation" => {
                        MembersError::Configuration(format!("{text} (see the IAM policy in the README)"))
                    }
                    _ if server_error => MembersError::Transient(text),
                    _ => MembersError::Failed(text),
                }
            }
            AwsFailure::Credentials(detail) => {
                MembersError::Configuration(format!("{what}: no usable AWS credentials ({detail})"))
            }
            AwsFailure::Unreachable(detail) => MembersError::Transient(format!("{what} could not reach AWS: {detail}")),
        }
    }
}

/// What an Auto Scaling group says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GroupInfo {
    pub name: String,
    /// Classic load balancers attached to the group.
    pub load_balancers: Vec<String>,
    /// Target groups attached to the group (ARNs).
    pub target_groups: Vec<String>,
    pub min_size: i32,
    pub desired: i32,
    /// `EC2`, `ELB`, or several comma-separated.
    pub health_check_type: String,
    pub health_check_grace_s: i32,
}

impl GroupInfo {
    /// The group replaces instances that fail the load balancer's health check.
    pub fn uses_elb_health(&self) -> bool {
        self.health_check_type.split(',').any(|t| t.trim() == "ELB")
    }

    /// Its attachments: the Classic load balancers, then the target groups.
    pub fn attachments(&self) -> Vec<AttachmentSpec> {
        let classic = self.load_balancers.iter().map(|n| AttachmentSpec { kind: Kind::Classic, name: n.clone() });
        let groups = self.target_groups.iter().map(|n| AttachmentSpec { kind: Kind::TargetGroup, name: n.clone() });
        classic.chain(groups).collect()
    }

    fn of(name: String, g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Self {
        GroupInfo {
            name,
            load_balancers: g.load_balancer_names().to_vec(),
            target_groups: g.target_group_arns().to_vec(),
            min_size: g.min_size().unwrap_or(0),
            desired: g.desired_capacity().unwrap_or(0),
            health_check_type: g.health_check_type().unwrap_or("EC2").to_owned(),
            health_check_grace_s: g.health_check_grace_period().unwrap_or(0),
        }
    }
}

/// The file in the state directory that keeps this instance's Auto Scaling group's name, so that
/// a process does not ask Auto Scaling again at every start (one line: instance id, group name).
pub const GROUP_CACHE_FILE: &str = "asg-group";

/// The group name `path` keeps for instance `me` (another instance's line, from an image made of a
/// running instance, does not count).
pub fn read_group_cache(path: &std::path::Path, me: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let (id, name) = text.trim().split_once(' ')?;
    (id == me && !name.is_empty() && !name.contains(char::is_whitespace)).then(|| name.to_owned())
}

/// Keeps `name` for `me` (atomically: a temporary file renamed, the directory made as the state
/// file makes it); best effort, a failure is logged and only costs the next start one more call.
pub fn write_group_cache(path: &std::path::Path, me: &str, name: &str) {
    use std::os::unix::fs::DirBuilderExt;
    let tmp = path.with_file_name(format!(".{GROUP_CACHE_FILE}.{}", std::process::id()));
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let written = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::write(&tmp, format!("{me} {name}\n")))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::debug!(path = %path.display(), error = %e, "keeping the Auto Scaling group's name failed");
    }
}

/// A source of cluster membership. Standby and the group's own settings exist only for Auto
/// Scaling; the other sources answer `Unsupported`.
pub trait Membership: Send + Sync {
    fn members(&self) -> impl Future<Output = Result<Roster, MembersError>> + Send;
    /// What it counts, for logs and `status`.
    fn describe(&self) -> String;
    /// The Auto Scaling group's name, once known.
    fn group_name(&self) -> Option<String> {
        None
    }
    /// The group's settings and attachments.
    fn group(&self) -> impl Future<Output = Result<GroupInfo, MembersError>> + Send {
        async { Err(MembersError::Unsupported("reading the Auto Scaling group")) }
    }
    /// Puts `me` in Standby, decrementing the desired capacity (so no replacement is launched).
    fn enter_standby(&self, _me: &str) -> impl Future<Output = Result<(), MembersError>> + Send {
        async { Err(MembersError::Unsupported("--leave-via standby")) }
    }
    /// Brings `me` back from Standby (the desired capacity goes up again).
    fn exit_standby(&self, _me: &str) -> impl Future<Output = Result<(), MembersError>> + Send {
        async { Err(MembersError::Unsupported("--leave-via standby")) }
    }
}

/// A fixed count (`--members static:N`).
#[derive(Debug, Clone)]
pub struct StaticMembers(pub usize);

impl Membership for StaticMembers {
    async fn members(&self) -> Result<Roster, MembersError> {
        Ok(Roster::of(Members::Count(self.0)))
    }
    fn describe(&self) -> String {
        format!("static:{}", self.0)
    }
}

/// EC2 instances, not terminated, whose `Name` tag is `<node>.<namespace>` (the original tool's rule,
/// the same namespace as the hostname), with their zones.
#[derive(Debug, Clone)]
pub struct Ec2NameMembers {
    client: super::ec2::Ec2,
    namespace: String,
}

impl Ec2NameMembers {
    pub fn new(config: &aws_config::SdkConfig, namespace: impl Into<String>) -> Self {
        Self { client: super::ec2::Ec2::new(config), namespace: namespace.into() }
    }
}

/// Whether a `Name` tag belongs to the namespace: exactly one label in front of it.
pub fn in_namespace(name: &str, namespace: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    matches!(name.split_once('.'), Some((node, rest)) if !node.is_empty() && rest == namespace)
}

impl Membership for Ec2NameMembers {
    async fn members(&self) -> Result<Roster, MembersError> {
        let mut ids = BTreeSet::new();
        let mut zones = BTreeMap::new();
        let what = format!("EC2 DescribeInstances for members *.{}", self.namespace);
        let filters = [
            ("tag:Name", vec![format!("*.{}", self.namespace)]),
            ("instance-state-name", MEMBER_STATES.map(String::from).to_vec()),
        ];
        let instances = self.client.describe_instances(&filters).await.map_err(|e| MembersError::from_aws(&what, e))?;
        for inst in instances {
            if in_namespace(inst.name.as_deref().unwrap_or_default(), &self.namespace) {
                if let Some(zone) = inst.zone {
                    zones.insert(inst.id.clone(), zone);
                }
                ids.insert(inst.id);
            }
        }
        Ok(Roster { members: Members::Ids(ids), zones, lifecycle: BTreeMap::new(), group: None })
    }

    fn describe(&self) -> String {
        format!("ec2-name:*.{}", self.namespace)
    }
}

/// Lifecycle states of instances leaving the group, or parked in its warm pool: not members.
pub fn counts_as_member(lifecycle: &str) -> bool {
    !(lifecycle.starts_with("Terminat")
        || lifecycle.starts_with("Detach")
        || lifecycle.starts_with("Warmed")
        || lifecycle == "Quarantined")
}

/// The Auto Scaling group this instance belongs to (`--members asg`), or one named
/// (`--members asg:NAME`).
#[derive(Debug, Clone)]
pub struct AsgMembers {
    client: aws_sdk_autoscaling::Client,
    /// The group, once known.
    name: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    named: Option<String>,
    me: String,
    /// Where this instance's own group's name is kept between processes (`GROUP_CACHE_FILE`).
    cache: Option<std::path::PathBuf>,
    /// The own group's name came from `cache`: a read of the group that does not list this
    /// instance drops it.
    cached: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AsgMembers {
    pub fn new(config: &aws_config::SdkConfig, named: Option<String>, me: impl Into<String>) -> Self {
        Self {
            client: aws_sdk_autoscaling::Client::new(config),
            name: std::sync::Arc::default(),
            named,
            me: me.into(),
            cache: None,
            cached: std::sync::Arc::default(),
        }
    }

    /// Keeps this instance's own group's name in `path` between processes.
    pub fn with_cache(mut self, path: std::path::PathBuf) -> Self {
        self.cache = Some(path);
        self
    }

    /// The group's name: this instance's own group (kept in the cache file, else
    /// `DescribeAutoScalingInstances`), checked against the one named. A named group this instance
    /// is not in is looked up by name instead.
    pub async fn name(&self) -> Result<String, MembersError> {
        if let Some(name) = self.known() {
            return Ok(name);
        }
        let name = self.find(true).await?;
        *self.name.lock().expect("name lock") = Some(name.clone());
        Ok(name)
    }

    /// The group's name without asking Auto Scaling: kept from an earlier run (and matching the
    /// one named), else the one named. Taken as known until a read of the group does not list this
    /// instance; then it is looked up (`DescribeAutoScalingInstances`) as `name` does.
    pub fn presume_name(&self) -> Option<String> {
        if let Some(name) = self.known() {
            return Some(name);
        }
        let kept = self.cache.as_deref().and_then(|p| read_group_cache(p, &self.me));
        let name = kept.filter(|own| self.named.as_ref().is_none_or(|n| n == own)).or_else(|| self.named.clone())?;
        self.cached.store(true, std::sync::atomic::Ordering::SeqCst);
        *self.name.lock().expect("name lock") = Some(name.clone());
        Some(name)
    }

    fn known(&self) -> Option<String> {
        self.name.lock().expect("name lock").clone()
    }

    async fn find(&self, use_cache: bool) -> Result<String, MembersError> {
        let kept = self.cache.as_deref().filter(|_| use_cache).and_then(|p| read_group_cache(p, &self.me));
        if let Some(own) = kept.filter(|own| self.named.as_ref().is_none_or(|n| n == own)) {
            self.cached.store(true, std::sync::atomic::Ordering::SeqCst);
            return Ok(own);
        }
        let what = format!("Auto Scaling DescribeAutoScalingInstances for {}", self.me);
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(&self.me)
            .send()
            .await
            .map_err(|e| MembersError::from_aws(&what, crate::identity::aws_failure(&e)))?;
        let mine = out.auto_scaling_instances().first().and_then(|i| i.auto_scaling_group_name()).map(str::to_owned);
        if let (Some(path), Some(own)) = (&self.cache, &mine) {
            write_group_cache(path, &self.me, own);
        }
        match (&self.named, mine) {
            (None, Some(g)) => Ok(g),
            (None, None) => Err(MembersError::Configuration(format!(
                "instance {} is not in any Auto Scaling group: use --members asg:NAME, ec2-name or static:N",
                self.me
            ))),
            (Some(n), Some(g)) if *n == g => Ok(g),
            (Some(n), mine) => {
                // Not this instance's group: it must at least exist.
                self.describe_group(n).await?;
                tracing::warn!(group = %n, own_group = ?mine, instance_id = %self.me, "this instance is not in the Auto Scaling group it counts ({n}); it counts as a member only while it serves");
                Ok(n.clone())
            }
        }
    }

    async fn describe_group(&self, name: &str) -> Result<aws_sdk_autoscaling::types::AutoScalingGroup, MembersError> {
        let what = format!("Auto Scaling DescribeAutoScalingGroups for {name}");
        let out =
            self.client.describe_auto_scaling_groups().auto_scaling_group_names(name).send().await.map_err(|e| {
                match crate::identity::aws_failure(&e) {
                    // An unknown name answers an empty list on AWS; moto answers HTTP 500 with an HTML
                    // page (no error code). Said plainly either way.
                    AwsFailure::Service { code, server_error: true, .. } if code == "Unknown" => {
                        MembersError::Configuration(format!(
                            "{what} failed without an error code (HTTP 5xx): is there an Auto Scaling group {name}?"
                        ))
                    }
                    f => MembersError::from_aws(&what, f),
                }
            })?;
        out.auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .cloned()
            .ok_or_else(|| MembersError::Configuration(format!("there is no Auto Scaling group {name}")))
    }

    fn call_error(&self, action: &str, e: AwsFailure) -> MembersError {
        MembersError::from_aws(&format!("Auto Scaling {action} for {}", self.me), e)
    }

    /// The group this instance counts, read now. A name from the cache file whose group does not
    /// list this instance (detached, moved to another group) is dropped and looked up again.
    async fn read_group(&self) -> Result<(String, aws_sdk_autoscaling::types::AutoScalingGroup), MembersError> {
        let name = self.name().await?;
        let group = self.describe_group(&name).await?;
        let listed = group.instances().iter().any(|i| i.instance_id() == Some(self.me.as_str()));
        if listed || !self.cached.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok((name, group));
        }
        if let Some(path) = &self.cache {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(group = %name, instance_id = %self.me, "Auto Scaling group {name}, kept from an earlier run, does not list this instance: looking its group up again");
        let again = self.find(false).await?;
        *self.name.lock().expect("name lock") = Some(again.clone());
        match again == name {
            true => Ok((name, group)),
            false => Ok((again.clone(), self.describe_group(&again).await?)),
        }
    }
}

impl Membership for AsgMembers {
    async fn members(&self) -> Result<Roster, MembersError> {
        let (name, group) = self.read_group().await?;
        let mut roster = Roster::of(Members::Ids(BTreeSet::new()));
        let Members::Ids(ids) = &mut roster.members else { unreachable!() };
        for inst in group.instances() {
            let (Some(id), Some(state)) = (inst.instance_id(), inst.lifecycle_state()) else { continue };
            if !counts_as_member(state.as_str()) {
                continue;
            }
            ids.insert(id.to_owned());
            roster.lifecycle.insert(id.to_owned(), state.as_str().to_owned());
            if let Some(zone) = inst.availability_zone() {
                roster.zones.insert(id.to_owned(), zone.to_owned());
            }
        }
        roster.group = Some(Box::new(GroupInfo::of(name, &group)));
        Ok(roster)
    }

    fn group_name(&self) -> Option<String> {
        self.known().or(self.named.clone())
    }

    fn describe(&self) -> String {
        match (self.known(), &self.named) {
            (Some(n), _) => format!("asg:{n}"),
            (None, Some(n)) => format!("asg:{n}"),
            (None, None) => "asg (this instance's group)".into(),
        }
    }

    async fn group(&self) -> Result<GroupInfo, MembersError> {
        let (name, g) = self.read_group().await?;
        Ok(GroupInfo::of(name, &g))
    }

    async fn enter_standby(&self, me: &str) -> Result<(), MembersError> {
        let name = self.name().await?;
        self.client
            .enter_standby()
            .auto_scaling_group_name(name)
            .instance_ids(me)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.call_error("EnterStandby", crate::identity::aws_failure(&e)))
    }

    async fn exit_standby(&self, me: &str) -> Result<(), MembersError> {
        let name = self.name().await?;
        self.client
            .exit_standby()
            .auto_scaling_group_name(name)
            .instance_ids(me)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.call_error("ExitStandby", crate::identity::aws_failure(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The kept group name: written (the directory made), read back for this instance only;
    /// another instance's line, an empty or malformed file, or none at all is no name.
    #[test]
    fn the_group_name_is_kept_for_this_instance_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(GROUP_CACHE_FILE);
        assert_eq!(read_group_cache(&path, "i-1"), None);
        write_group_cache(&path, "i-1", "web-asg");
        assert_eq!(read_group_cache(&path, "i-1").as_deref(), Some("web-asg"));
        assert_eq!(read_group_cache(&path, "i-2"), None, "another instance's");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        for bad in ["", "i-1", "i-1 ", "i-1 a b", "i-1web-asg"] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(read_group_cache(&path, "i-1"), None, "{bad:?}");
        }
    }

    /// The start-up lookup: transient failures are tried again with growing, jittered pauses; a
    /// permanent one fails at once; transient ones fail once `START_RETRY_FOR` is spent.
    #[tokio::test(start_paused = true)]
    async fn the_start_up_lookup_is_retried_only_while_it_may_heal() {
        let tries = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let r = retry_at_start("lookup", || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0..=5 => Err(MembersError::Transient("Rate exceeded".into())),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(r, Ok(7));
        assert_eq!(tries.load(Ordering::SeqCst), 7);
        assert!(start.elapsed() <= Duration::from_secs(1 + 2 + 4 + 8 + 16 + 30), "{:?}", start.elapsed());

        let tries = AtomicU32::new(0);
        let r: Result<(), _> = retry_at_start("lookup", || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err(MembersError::Configuration("there is no Auto Scaling group web".into()))
        })
        .await;
        assert!(r.unwrap_err().is_configuration());
        assert_eq!(tries.load(Ordering::SeqCst), 1, "a permanent error is not retried");

        let start = tokio::time::Instant::now();
        let r: Result<(), _> =
            retry_at_start("lookup", || async { Err(MembersError::Transient("Rate exceeded".into())) }).await;
        assert!(r.unwrap_err().is_retryable());
        let spent = start.elapsed();
        assert!(spent >= START_RETRY_FOR && spent <= START_RETRY_FOR + START_RETRY_MAX_PAUSE, "{spent:?}");
    }

    #[test]
    fn namespace_match() {
        let ns = "web.example.com";
        assert!(in_namespace("i-1.web.example.com", ns));
        assert!(in_namespace("I-1.Web.Example.com.", ns));
        assert!(!in_namespace("x.i-1.web.example.com", ns));
        assert!(!in_namespace("web.example.com", ns));
        assert!(!in_namespace("i-1.api.example.com", ns));
        assert!(!in_namespace("", ns));
    }

    #[test]
    fn lifecycle_states_that_count() {
        for s in ["Pending", "Pending:Wait", "Pending:Proceed", "InService", "EnteringStandby", "Standby"] {
            assert!(counts_as_member(s), "{s}");
        }
        for s in [
            "Terminating",
            "Terminating:Wait",
            "Terminating:Proceed",
            "Terminated",
            "Detaching",
            "Detached",
            "Warmed:Pending",
            "Warmed:Running",
            "Warmed:Stopped",
            "Quarantined",
        ] {
            assert!(!counts_as_member(s), "{s}");
        }
    }

    #[test]
    fn aws_failures_are_sorted() {
        let svc =
            |code: &str, server_error| AwsFailure::Service { code: code.into(), message: "m".into(), server_error };
        assert!(MembersError::from_aws("x", svc("Throttling", false)).is_retryable());
        assert!(MembersError::from_aws("x", svc("InternalFailure", true)).is_retryable());
        assert!(MembersError::from_aws("x", AwsFailure::Unreachable("t".into())).is_retryable());
        assert!(MembersError::from_aws("x", svc("AccessDenied", false)).is_configuration());
        assert!(MembersError::from_aws("x", AwsFailure::Credentials("none".into())).is_configuration());
        let v = MembersError::from_aws("x", svc("ValidationError", false));
        assert!(!v.is_retryable() && !v.is_configuration());
    }
}

/// Any source, chosen by `--members`.
#[derive(Debug, Clone)]
pub enum AnyMembers {
    Static(StaticMembers),
    Ec2Name(Ec2NameMembers),
    Asg(AsgMembers),
}

impl Membership for AnyMembers {
    async fn members(&self) -> Result<Roster, MembersError> {
        match self {
            AnyMembers::Static(s) => s.members().await,
            AnyMembers::Ec2Name(e) => e.members().await,
            AnyMembers::Asg(a) => a.members().await,
        }
    }
    fn describe(&self) -> String {
        match self {
            AnyMembers::Static(s) => s.describe(),
            AnyMembers::Ec2Name(e) => e.describe(),
            AnyMembers::Asg(a) => a.describe(),
        }
    }
    fn group_name(&self) -> Option<String> {
        match self {
            AnyMembers::Asg(a) => a.group_name(),
            _ => None,
        }
    }
    async fn group(&self) -> Result<GroupInfo, MembersError> {
        match self {
            AnyMembers::Asg(a) => a.group().await,
            _ => Err(MembersError::Unsupported("reading the Auto Scaling group")),
        }
    }
    async fn enter_standby(&self, me: &str) -> Result<(), MembersError> {
        match self {
            AnyMembers::Asg(a) => a.enter_standby(me).await,
            _ => Err(MembersError::Unsupported("--leave-via standby")),
        }
    }
    async fn exit_standby(&self, me: &str) -> Result<(), MembersError> {
        match self {
            AnyMembers::Asg(a) => a.exit_standby(me).await,
            _ => Err(MembersError::Unsupported("--leave-via standby")),
        }
    }
}
