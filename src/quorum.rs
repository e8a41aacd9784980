//! May this instance leave? Pure: a snapshot and a rule in, a verdict with its numbers out.
//!
//! Rule: the serving members other than this instance must be at least `ceil(members × q)` and at
//! least `min_in_service`. An instance that serves nothing already (the load balancer counts it out,
//! or its program is known to be down) may always leave: leaving takes nothing from the cluster.
//! Integers only: `q` is in parts per million.
//!
//! With several attachments (Classic load balancers, target groups) the rule must hold in every
//! one, each with the same members: `combine` keeps each attachment's verdict and names the one
//! that governs.

use std::collections::BTreeSet;

use serde::Serialize;

/// The policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Quorum fraction in parts per million (750_000 = 0.75).
    pub quorum_ppm: u32,
    /// Other members that must keep serving, whatever the fraction says.
    pub min_in_service: usize,
}

impl Rule {
    /// `ceil(members × q)`.
    pub fn required(&self, members: usize) -> usize {
        let num = members as u128 * self.quorum_ppm as u128;
        num.div_ceil(1_000_000) as usize
    }

    /// How many members may be out at once: `max(0, min(m − ceil(q·m), m − min_in_service))`.
    pub fn permits(&self, members: usize) -> usize {
        let by_fraction = members - self.required(members).min(members);
        let by_min = members.saturating_sub(self.min_in_service);
        by_fraction.min(by_min)
    }
}

/// Who is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// Instance ids (EC2 instances in the hostname namespace).
    Ids(BTreeSet<String>),
    /// Only a count is known (`--members static:N`): every serving instance counts as a member.
    Count(usize),
}

impl Members {
    /// The cluster's size as the membership source gives it.
    pub fn len(&self) -> usize {
        match self {
            Members::Ids(ids) => ids.len(),
            Members::Count(n) => *n,
        }
    }

    /// `id`'s place among the members by id (`None`: not a member, or only a count is known).
    pub fn rank(&self, id: &str) -> Option<usize> {
        match self {
            Members::Ids(ids) => ids.contains(id).then(|| ids.iter().take_while(|m| m.as_str() < id).count()),
            Members::Count(_) => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This instance's Availability Zone, for the per-zone rule (`--zone-quorum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    /// The members in this zone, this instance included.
    pub members: BTreeSet<String>,
    /// The zone's fraction in parts per million.
    pub quorum_ppm: u32,
}

impl Zone {
    /// `ceil(zone members × fraction)`.
    pub fn required(&self) -> usize {
        (self.members.len() as u128 * self.quorum_ppm as u128).div_ceil(1_000_000) as usize
    }
}

/// What the load balancer and membership source said at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub members: Members,
    /// Instances the load balancer reports InService and not draining.
    pub serving: BTreeSet<String>,
    /// This instance.
    pub me: String,
    /// This instance's program is known to be down (a gated crash).
    pub known_down: bool,
    /// The per-zone rule, when it applies.
    pub zone: Option<Zone>,
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Enough others serve.
    QuorumHolds,
    /// The load balancer already counts this instance out.
    NotServing,
    /// This instance's program is down: it serves nothing.
    ProgramDown,
    /// Too few others would serve.
    BelowQuorum,
    /// Fewer others than `min_in_service` would serve.
    BelowMinimum,
    /// Too few others would serve in this instance's Availability Zone.
    BelowZoneQuorum,
}

impl Reason {
    /// Kebab-case, as in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::QuorumHolds => "quorum-holds",
            Reason::NotServing => "not-serving",
            Reason::ProgramDown => "program-down",
            Reason::BelowQuorum => "below-quorum",
            Reason::BelowMinimum => "below-minimum",
            Reason::BelowZoneQuorum => "below-zone-quorum",
        }
    }
}

/// The answer and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The attachment this verdict is about ("target group web-tg"); empty before `combine`.
    pub attachment: String,
    pub may_leave: bool,
    pub reason: Reason,
    /// Cluster size (the denominator).
    pub members: usize,
    /// Members serving now, this instance included.
    pub serving: usize,
    /// Members that would serve once this instance is out.
    pub serving_after: usize,
    /// `ceil(members × q)`.
    pub required: usize,
    pub min_in_service: usize,
    pub self_serving: bool,
    pub self_member: bool,
    /// This instance's zone, when the per-zone rule applies.
    pub zone: Option<String>,
    /// Members in the zone, this instance included.
    pub zone_members: usize,
    /// Zone members that would serve once this instance is out.
    pub zone_serving_after: usize,
    /// `ceil(zone members × zone fraction)`.
    pub zone_required: usize,
}

impl Verdict {
    /// One line for logs: `6 members, 5 serving, 4 after leaving, 5 required`.
    pub fn summary(&self) -> String {
        let numbers = format!(
            "{} members, {} serving, {} after leaving, {} required (min {})",
            self.members, self.serving, self.serving_after, self.required, self.min_in_service
        );
        let numbers = match &self.zone {
            Some(z) => format!(
                "{numbers}; zone {z}: {} members, {} after leaving, {} required",
                self.zone_members, self.zone_serving_after, self.zone_required
            ),
            None => numbers,
        };
        if self.attachment.is_empty() {
            numbers
        } else {
            format!("{}: {numbers}", self.attachment)
        }
    }
}

fn count(snapshot: &Snapshot) -> (usize, usize, bool, bool) {
    let me = snapshot.me.as_str();
    let self_serving = snapshot.serving.contains(me);
    match &snapshot.members {
        Members::Ids(ids) => {
            let self_member = ids.contains(me);
            // A serving instance that the membership source misses is still in the cluster.
            let members = ids.len() + usize::from(!self_member && self_serving);
            let others = snapshot.serving.iter().filter(|s| s.as_str() != me && ids.contains(*s)).count();
            (members, others, self_serving, self_member)
        }
        Members::Count(n) => {
            let others = snapshot.serving.iter().filter(|s| s.as_str() != me).count();
            (*n, others, self_serving, true)
        }
    }
}

/// The gate's question: may this instance leave now?
pub fn decide(snapshot: &Snapshot, rule: &Rule) -> Verdict {
    let (members, others, self_serving, self_member) = count(snapshot);
    let required = rule.required(members);
    let quorum_ok = others >= required;
    let min_ok = others >= rule.min_in_service;
    let me = snapshot.me.as_str();
    let (zone_serving_after, zone_required) = match &snapshot.zone {
        Some(z) => {
            (snapshot.serving.iter().filter(|s| s.as_str() != me && z.members.contains(*s)).count(), z.required())
        }
        None => (0, 0),
    };
    let reason = if !self_serving {
        Reason::NotServing
    } else if snapshot.known_down {
        Reason::ProgramDown
    } else if !quorum_ok {
        Reason::BelowQuorum
    } else if !min_ok {
        Reason::BelowMinimum
    } else if zone_serving_after < zone_required {
        Reason::BelowZoneQuorum
    } else {
        Reason::QuorumHolds
    };
    Verdict {
        attachment: String::new(),
        may_leave: matches!(reason, Reason::NotServing | Reason::ProgramDown | Reason::QuorumHolds),
        reason,
        members,
        serving: others + usize::from(self_serving),
        serving_after: others,
        required,
        min_in_service: rule.min_in_service,
        self_serving,
        self_member,
        zone: snapshot.zone.as_ref().map(|z| z.name.clone()),
        zone_members: snapshot.zone.as_ref().map_or(0, |z| z.members.len()),
        zone_serving_after,
        zone_required,
    }
}

/// The recheck right after deregistering: does the cluster still hold quorum with this instance out?
/// The serve-nothing exemption does not apply.
pub fn holds_without_me(snapshot: &Snapshot, rule: &Rule) -> Verdict {
    let mut v = decide(&Snapshot { known_down: false, ..snapshot.clone() }, rule);
    let zone_ok = v.zone_serving_after >= v.zone_required;
    v.may_leave = v.serving_after >= v.required && v.serving_after >= rule.min_in_service && zone_ok;
    v.reason = if v.may_leave {
        Reason::QuorumHolds
    } else if v.serving_after < v.required {
        Reason::BelowQuorum
    } else if v.serving_after < rule.min_in_service {
        Reason::BelowMinimum
    } else {
        Reason::BelowZoneQuorum
    };
    v
}

/// Every attachment's verdict and the one that governs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The first attachment that refuses; when all allow, the one with the least room
    /// (serving after leaving − required) among those this instance serves in.
    pub overall: Verdict,
    /// One per attachment, in the configured order.
    pub per_attachment: Vec<Verdict>,
}

impl Decision {
    pub fn may_leave(&self) -> bool {
        self.overall.may_leave
    }
}

/// Combines per-attachment verdicts (each already named): leaving must be allowed in every one.
/// An attachment where this instance is already out allows it (leaving costs it nothing).
pub fn combine(per_attachment: Vec<Verdict>) -> Decision {
    let room = |v: &Verdict| v.serving_after as i64 - v.required.max(v.min_in_service) as i64;
    let overall = per_attachment
        .iter()
        .find(|v| !v.may_leave)
        .or_else(|| per_attachment.iter().filter(|v| v.reason == Reason::QuorumHolds).min_by_key(|v| room(v)))
        .or(per_attachment.first())
        .cloned()
        .expect("a cycle has at least one attachment");
    Decision { overall, per_attachment }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("i-{i:04}")).collect()
    }

    fn snap(members: usize, serving: &[usize], me: usize, down: bool) -> Snapshot {
        let all = ids(64);
        Snapshot {
            members: Members::Ids(all[..members].iter().cloned().collect()),
            serving: serving.iter().map(|i| all[*i].clone()).collect(),
            me: all[me].clone(),
            known_down: down,
            zone: None,
        }
    }

    const Q75: Rule = Rule { quorum_ppm: 750_000, min_in_service: 1 };

    #[test]
    fn table() {
        // (members, serving indexes, me, known_down, rule, may_leave, reason, required, serving_after)
        type Case = (usize, Vec<usize>, usize, bool, Rule, bool, Reason, usize, usize);
        let cases: Vec<Case> = vec![
            (4, vec![0, 1, 2, 3], 0, false, Q75, true, Reason::QuorumHolds, 3, 3),
            (4, vec![0, 1, 2], 0, false, Q75, false, Reason::BelowQuorum, 3, 2),
            (4, vec![1, 2, 3], 0, false, Q75, true, Reason::NotServing, 3, 3),
            (4, vec![0, 1], 0, true, Q75, true, Reason::ProgramDown, 3, 1),
            (6, vec![0, 1, 2, 3, 4, 5], 0, false, Q75, true, Reason::QuorumHolds, 5, 5),
            (6, vec![0, 1, 2, 3, 4], 0, false, Q75, false, Reason::BelowQuorum, 5, 4),
            (1, vec![0], 0, false, Q75, false, Reason::BelowQuorum, 1, 0),
            (1, vec![0], 0, false, Rule { quorum_ppm: 1, min_in_service: 0 }, false, Reason::BelowQuorum, 1, 0),
            (2, vec![0, 1], 0, false, Rule { quorum_ppm: 500_000, min_in_service: 1 }, true, Reason::QuorumHolds, 1, 1),
            (
                2,
                vec![0, 1],
                0,
                false,
                Rule { quorum_ppm: 500_000, min_in_service: 2 },
                false,
                Reason::BelowMinimum,
                1,
                1,
            ),
            // Self not a member but serving: counted in (3 members).
            (
                2,
                vec![0, 1, 2],
                2,
                false,
                Rule { quorum_ppm: 500_000, min_in_service: 1 },
                true,
                Reason::QuorumHolds,
                2,
                2,
            ),
            // Self not a member, not serving: leaves at once.
            (2, vec![0, 1], 2, false, Q75, true, Reason::NotServing, 2, 2),
            // Zero members and self not serving.
            (0, vec![], 0, false, Q75, true, Reason::NotServing, 0, 0),
            // Non-members that serve do not count.
            (3, vec![0, 1, 2, 5], 0, false, Q75, false, Reason::BelowQuorum, 3, 2),
        ];
        for (m, serving, me, down, rule, may, reason, required, after) in cases {
            let v = decide(&snap(m, &serving, me, down), &rule);
            assert_eq!(
                (v.may_leave, v.reason, v.required, v.serving_after),
                (may, reason, required, after),
                "m={m} serving={serving:?} me={me} down={down} {rule:?}"
            );
        }
    }

    #[test]
    fn static_count() {
        let s = Snapshot {
            members: Members::Count(4),
            serving: ["a", "b", "c", "me"].iter().map(|s| s.to_string()).collect(),
            me: "me".into(),
            known_down: false,
            zone: None,
        };
        let v = decide(&s, &Q75);
        assert!(v.may_leave);
        assert_eq!((v.members, v.serving, v.serving_after, v.required), (4, 4, 3, 3));
    }

    #[test]
    fn recheck_ignores_exemption() {
        let s = snap(4, &[0, 1], 0, true);
        assert!(decide(&s, &Q75).may_leave);
        let v = holds_without_me(&s, &Q75);
        assert!(!v.may_leave);
        assert_eq!(v.reason, Reason::BelowQuorum);
        let s = snap(4, &[1, 2, 3], 0, false);
        assert!(holds_without_me(&s, &Q75).may_leave, "others still hold quorum");
    }

    #[test]
    fn permits_exhaustive() {
        for m in 0..200usize {
            for q in [1u32, 250_000, 500_000, 750_000, 900_000, 1_000_000] {
                for min in 0..4usize {
                    let r = Rule { quorum_ppm: q, min_in_service: min };
                    let l = r.permits(m);
                    // Exactly l members may be out while the rest still satisfies both bounds.
                    assert!(m - l >= r.required(m) && m - l >= min.min(m), "m={m} q={q} min={min} l={l}");
                    if l < m {
                        let more = m - l - 1;
                        assert!(more < r.required(m) || more < min, "m={m} q={q} min={min}: l={l} is not the largest");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn decide_matches_definition(m in 0usize..40, mask in any::<u64>(), me in 0usize..45, down: bool, q in 1u32..=1_000_000, min in 0usize..5) {
            let serving: Vec<usize> = (0..45).filter(|i| mask >> i & 1 == 1).collect();
            let s = snap(m, &serving, me, down);
            let rule = Rule { quorum_ppm: q, min_in_service: min };
            let v = decide(&s, &rule);
            let self_serving = serving.contains(&me);
            let self_member = me < m;
            let members = m + usize::from(!self_member && self_serving);
            let others = serving.iter().filter(|&&i| i != me && i < m).count();
            let required = (members as u64 * q as u64).div_ceil(1_000_000) as usize;
            prop_assert_eq!(v.members, members);
            prop_assert_eq!(v.serving_after, others);
            prop_assert_eq!(v.required, required);
            let want = !self_serving || down || (others >= required && others >= min);
            prop_assert_eq!(v.may_leave, want);
            // Leaving by the ordinary rule never takes the cluster below quorum.
            if v.reason == Reason::QuorumHolds {
                prop_assert!(others * 1_000_000 >= members * q as usize);
            }
        }
    }

    fn named(name: &str, v: Verdict) -> Verdict {
        Verdict { attachment: name.into(), ..v }
    }

    #[test]
    fn every_attachment_must_allow() {
        // (per attachment: serving indexes; me = 0; 4 members) → may leave, governing attachment
        type Case = (Vec<Vec<usize>>, bool, &'static str, Reason);
        let cases: Vec<Case> = vec![
            // All full: the tightest (all equal) is the first.
            (vec![vec![0, 1, 2, 3], vec![0, 1, 2, 3]], true, "a0", Reason::QuorumHolds),
            // One group below quorum once this instance leaves: it blocks, and is named.
            (vec![vec![0, 1, 2, 3], vec![0, 1, 2]], false, "a1", Reason::BelowQuorum),
            (vec![vec![0, 1, 2], vec![0, 1, 2, 3], vec![0, 1, 2]], false, "a0", Reason::BelowQuorum),
            // This instance is missing from one group: that group costs nothing, the other governs.
            (vec![vec![1, 2, 3], vec![0, 1, 2, 3]], true, "a1", Reason::QuorumHolds),
            // Missing from one, and the other is too thin: still refused by the other.
            (vec![vec![1, 2, 3], vec![0, 1, 2]], false, "a1", Reason::BelowQuorum),
            // Out everywhere: may leave, nothing is taken from anyone.
            (vec![vec![1, 2], vec![2, 3]], true, "a0", Reason::NotServing),
        ];
        for (groups, may, name, reason) in cases {
            let per: Vec<Verdict> = groups
                .iter()
                .enumerate()
                .map(|(i, g)| named(&format!("a{i}"), decide(&snap(4, g, 0, false), &Q75)))
                .collect();
            let d = combine(per.clone());
            assert_eq!(
                (d.may_leave(), d.overall.attachment.as_str(), d.overall.reason),
                (may, name, reason),
                "{groups:?}"
            );
            assert_eq!(d.per_attachment, per);
            assert!(d.overall.summary().starts_with(name));
        }
        let wide = named("wide", decide(&snap(8, &[0, 1, 2, 3, 4, 5, 6, 7], 0, false), &Q75));
        let tight = named("tight", decide(&snap(8, &[0, 1, 2, 3, 4, 5, 6], 0, false), &Q75));
        let d = combine(vec![wide, tight]);
        assert!(d.may_leave());
        assert_eq!(d.overall.attachment, "tight", "least room governs");
    }

    proptest! {
        /// Whatever the groups, leaving is allowed exactly when each group allows it on its own.
        #[test]
        fn combine_is_all(masks in proptest::collection::vec(any::<u16>(), 1..5), m in 1usize..12, down: bool) {
            let per: Vec<Verdict> = masks
                .iter()
                .enumerate()
                .map(|(i, mask)| {
                    let serving: Vec<usize> = (0..16).filter(|b| mask >> b & 1 == 1).collect();
                    named(&format!("a{i}"), decide(&snap(m, &serving, 0, down), &Q75))
                })
                .collect();
            let d = combine(per.clone());
            prop_assert_eq!(d.may_leave(), per.iter().all(|v| v.may_leave));
            if !d.may_leave() {
                prop_assert_eq!(&d.overall, per.iter().find(|v| !v.may_leave).unwrap());
            }
        }
    }

    /// The per-zone rule: zones of unequal size, this instance alone in its zone, strict holders in
    /// the zone (counted out of `serving` before deciding, as the cycle does).
    #[test]
    fn zone_rule_table() {
        // Members 0..8; zone a = {0, 1, 2, 3, 4}, zone b = {5, 6, 7}; me = 0 unless said.
        let zone_of = |ids: &[usize], q: u32| Zone {
            name: "a".into(),
            members: ids.iter().map(|i| format!("i-{i:04}")).collect(),
            quorum_ppm: q,
        };
        let loose = Rule { quorum_ppm: 500_000, min_in_service: 1 };
        // (zone members, serving, holders counted out, zone fraction, may leave, reason, zone required, zone after)
        type Case = (Vec<usize>, Vec<usize>, Vec<usize>, u32, bool, Reason, usize, usize);
        let cases: Vec<Case> = vec![
            // Big zone, all serving: 4 others ≥ ceil(5 × 0.6) = 3.
            (vec![0, 1, 2, 3, 4], (0..8).collect(), vec![], 600_000, true, Reason::QuorumHolds, 3, 4),
            // Two of the zone's others out: 2 < 3, refused by the zone while the cluster holds.
            (vec![0, 1, 2, 3, 4], vec![0, 1, 2, 5, 6, 7], vec![], 600_000, false, Reason::BelowZoneQuorum, 3, 2),
            // The same, one of them a strict holder (serving, but counted out).
            (vec![0, 1, 2, 3, 4], vec![0, 1, 2, 3, 5, 6, 7], vec![3], 600_000, false, Reason::BelowZoneQuorum, 3, 2),
            // Alone in its zone: ceil(1 × 0.5) = 1 other needed, there is none: refused.
            (vec![0], (0..8).collect(), vec![], 500_000, false, Reason::BelowZoneQuorum, 1, 0),
            // Alone with a fraction that rounds to nothing is impossible (ceil ≥ 1 for q > 0), so a
            // lone instance can only leave by the serve-nothing exemption.
            (vec![0], vec![1, 2, 3, 4, 5, 6, 7], vec![], 500_000, true, Reason::NotServing, 1, 0),
            // Small zone b seen from member 5 (me = 5 below): 2 others ≥ ceil(3 × 0.5) = 2.
        ];
        for (zone, serving, holders, q, may, reason, req, after) in cases {
            let mut s = snap(8, &serving, 0, false);
            s.zone = Some(zone_of(&zone, q));
            for h in &holders {
                s.serving.remove(&format!("i-{h:04}"));
            }
            let v = decide(&s, &loose);
            assert_eq!(
                (v.may_leave, v.reason, v.zone_required, v.zone_serving_after),
                (may, reason, req, after),
                "zone {zone:?} serving {serving:?} holders {holders:?}"
            );
        }
        let mut s = snap(8, &(0..8).collect::<Vec<_>>(), 5, false);
        s.zone = Some(Zone {
            name: "b".into(),
            members: (5..8).map(|i| format!("i-{i:04}")).collect(),
            quorum_ppm: 500_000,
        });
        let v = decide(&s, &loose);
        assert_eq!((v.may_leave, v.zone_members, v.zone_required, v.zone_serving_after), (true, 3, 2, 2));
        assert!(v.summary().contains("zone b: 3 members, 2 after leaving, 2 required"), "{}", v.summary());
        // The recheck applies the zone rule too.
        s.serving.remove("i-0006");
        assert_eq!(holds_without_me(&s, &loose).reason, Reason::BelowZoneQuorum);
    }
}
