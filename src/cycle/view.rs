//! Strict mode's shared view of the cluster: the members, every attachment's targets and timings,
//! as one instance read them, kept in the permit table (`crate::lease::Shared`) so that a fleet
//! reads the load balancer and EC2 about once per `VIEW_REFRESH` instead of once per instance and
//! poll. Only the encoding lives here; when a view is fresh enough is `Cycle::shared_view`'s rule.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::lb::members::{GroupInfo, Roster};
use crate::lb::{LbTimings, Target, TargetHealth, TargetState};
use crate::quorum::Members;

/// At most one refresh of the shared view per this long per attachment, fleet-wide (the refresh
/// lease): about two `Describe*` calls per second on the load balancer's API, whatever the
/// number of attachments, and two `DescribeInstances` or fewer.
pub const VIEW_REFRESH: Duration = Duration::from_millis(500);
/// A holder waiting for a view newer than the one it has reads the item this often.
pub const VIEW_POLL: Duration = Duration::from_millis(500);
/// A holder gives up waiting for a fresh view after this long (a failed check or poll).
pub const VIEW_WAIT: Duration = Duration::from_secs(30);
/// A waiter sizes the cluster (L) from a view at most this old; an older one is refreshed first.
pub const VIEW_MAX_AGE: Duration = Duration::from_secs(60);
/// A cluster's very first view (no item yet) is taken after a random pause of up to this long, so
/// that instances asked at once do not all try to take the refresh.
pub const FIRST_VIEW_SPREAD: Duration = Duration::from_secs(2);
/// The attachments' timings are read again when the view's are older than this.
pub const TIMINGS_MAX_AGE: Duration = Duration::from_secs(300);

/// What one refresh read.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub roster: Roster,
    /// Every attachment's targets, in the cycle's order.
    pub listed: Vec<Vec<TargetHealth>>,
    pub timings: Vec<LbTimings>,
    /// When the timings were read, Unix ms on the reader's clock.
    pub timings_at: u64,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    /// Member ids, or only a count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<usize>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    z: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    l: BTreeMap<String, String>,
    /// The Auto Scaling group as the members' read found it (its attachments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    g: Option<Box<GroupInfo>>,
    a: Vec<WireLb>,
    t: u64,
}

/// One attachment: serving targets as `id` or `id:port` sharing one description `r` (most of a
/// large group), every other target in full.
#[derive(Serialize, Deserialize)]
struct WireLb {
    s: Vec<String>,
    #[serde(default)]
    r: String,
    o: Vec<(String, Option<i32>, TargetState, String)>,
    d: Option<u64>,
    h: u64,
}

impl View {
    /// The compact JSON kept in the shared item (about 25 bytes per serving target).
    pub fn encode(&self) -> String {
        let (m, c) = match &self.roster.members {
            Members::Ids(ids) => (Some(ids.iter().cloned().collect()), None),
            Members::Count(n) => (None, Some(*n)),
        };
        let a = self
            .listed
            .iter()
            .zip(&self.timings)
            .map(|(listed, t)| {
                let r = listed.iter().find(|h| h.serving()).map(|h| h.raw.clone()).unwrap_or_default();
                let (mut s, mut o) = (Vec::new(), Vec::new());
                for h in listed {
                    if h.serving() && h.raw == r {
                        s.push(match h.target.port {
                            Some(p) => format!("{}:{p}", h.target.instance_id),
                            None => h.target.instance_id.clone(),
                        });
                    } else {
                        o.push((h.target.instance_id.clone(), h.target.port, h.state, h.raw.clone()));
                    }
                }
                WireLb { s, r, o, d: t.drain.map(|d| d.as_millis() as u64), h: t.healthy_after.as_millis() as u64 }
            })
            .collect();
        let wire = Wire {
            m,
            c,
            z: self.roster.zones.clone(),
            l: self.roster.lifecycle.clone(),
            g: self.roster.group.clone(),
            a,
            t: self.timings_at,
        };
        serde_json::to_string(&wire).expect("a view always serializes")
    }

    pub fn decode(data: &str) -> Result<View, String> {
        let w: Wire = serde_json::from_str(data).map_err(|e| format!("the shared view is malformed: {e}"))?;
        let members = match (w.m, w.c) {
            (Some(ids), _) => Members::Ids(ids.into_iter().collect()),
            (None, Some(n)) => Members::Count(n),
            (None, None) => return Err("the shared view has no members".into()),
        };
        let mut listed = Vec::with_capacity(w.a.len());
        let mut timings = Vec::with_capacity(w.a.len());
        for lb in w.a {
            let mut targets = Vec::with_capacity(lb.s.len() + lb.o.len());
            for s in lb.s {
                let target = match s.rsplit_once(':') {
                    Some((id, port)) => Target::on_port(id, port.parse().map_err(|_| format!("bad target {s:?}"))?),
                    None => Target::instance(s),
                };
                targets.push(TargetHealth { target, state: TargetState::Serving, raw: lb.r.clone() });
            }
            for (id, port, state, raw) in lb.o {
                targets.push(TargetHealth { target: Target { instance_id: id, port }, state, raw });
            }
            listed.push(targets);
            timings
                .push(LbTimings { drain: lb.d.map(Duration::from_millis), healthy_after: Duration::from_millis(lb.h) });
        }
        Ok(View {
            roster: Roster { members, zones: w.z, lifecycle: w.l, group: w.g },
            listed,
            timings,
            timings_at: w.t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_round_trips_and_stays_small() {
        let ids: Vec<String> = (0..1000).map(|i| format!("i-{i:017x}")).collect();
        let mut tg: Vec<TargetHealth> = ids
            .iter()
            .map(|id| TargetHealth {
                target: Target::on_port(id, 8080),
                state: TargetState::Serving,
                raw: "healthy".into(),
            })
            .collect();
        tg[3].state = TargetState::Draining;
        tg[3].raw = "draining (Target.DeregistrationInProgress)".into();
        let classic = vec![
            TargetHealth { target: Target::instance(&ids[0]), state: TargetState::Serving, raw: "InService".into() },
            TargetHealth {
                target: Target::instance(&ids[1]),
                state: TargetState::Serving,
                raw: "InService (Instance deregistration currently in progress.)".into(),
            },
        ];
        let view = View {
            roster: Roster {
                members: Members::Ids(ids.iter().cloned().collect()),
                zones: BTreeMap::from([(ids[0].clone(), "us-east-1a".into())]),
                lifecycle: BTreeMap::new(),
                group: Some(Box::new(GroupInfo {
                    name: "web".into(),
                    target_groups: vec!["arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web/2".into()],
                    health_check_type: "ELB".into(),
                    health_check_grace_s: 300,
                    ..GroupInfo::default()
                })),
            },
            listed: vec![tg, classic],
            timings: vec![
                LbTimings { drain: Some(Duration::from_secs(20)), healthy_after: Duration::from_secs(15) },
                LbTimings { drain: None, healthy_after: Duration::from_millis(10_500) },
            ],
            timings_at: 1_700_000_000_000,
        };
        let data = view.encode();
        let mut back = View::decode(&data).unwrap();
        // Order within an attachment is not kept: serving targets come first.
        for (a, b) in back.listed.iter_mut().zip(&view.listed) {
            a.sort_by(|x, y| x.target.cmp(&y.target));
            let mut b = b.clone();
            b.sort_by(|x, y| x.target.cmp(&y.target));
            assert_eq!(*a, b);
        }
        assert_eq!((back.roster, back.timings, back.timings_at), (view.roster, view.timings, view.timings_at));
        // 1,000 members and 1,000 targets: well under DynamoDB's 400 KB item.
        assert!(data.len() < 60_000, "{} bytes", data.len());
        assert!(View::decode("{").unwrap_err().contains("malformed"));
    }
}
