//! Strict mode's shared view of the cluster: the members, every attachment's targets and timings,
//! as one instance read them, kept in the permit table (`crate::lease::Shared`) so that a fleet
//! reads the load balancer and EC2 about once per `VIEW_REFRESH` instead of once per instance and
//! poll. Only the encoding lives here; when a view is fresh enough is `Cycle::shared_view`'s rule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::lb::members::{GroupInfo, Roster};
use crate::lb::{LbTimings, Target, TargetHealth, TargetState};
use crate::quorum::Members;

/// At most one refresh of the shared view per this long per attachment, fleet-wide (the refresh
/// lease): about two `Describe*` calls per second on the load balancer's API, whatever the
/// number of attachments, and two `DescribeInstances` or fewer.
pub const VIEW_REFRESH: Duration = Duration::from_millis(500);
/// A holder waiting for a view newer than the one it has reads the view's head this often (about
/// 100 bytes: `crate::lease::head_key`), and the view only when the head names one it can use.
/// At 0.5 s the unpaced batched fleet of 1,000 took 2.4 s longer (seed 0: 200.6 s against 198.1).
pub const VIEW_POLL: Duration = Duration::from_millis(250);
/// A holder gives up waiting for a fresh view after this long (a failed check or poll).
pub const VIEW_WAIT: Duration = Duration::from_secs(30);
/// A waiter sizes the cluster (L) from a view at most this old; an older one is refreshed first.
pub const VIEW_MAX_AGE: Duration = Duration::from_secs(60);
/// A cluster's first view in a while (no item yet, or one older than `VIEW_MAX_AGE`) is taken
/// after a random pause of up to this long, so that instances asked at once do not all try to take
/// the refresh; longer in a large cluster (`first_view_spread`).
pub const FIRST_VIEW_SPREAD: Duration = Duration::from_secs(2);
/// After that pause each instance reads the item again: a stale view's members say how many may
/// be doing so, and the pause's window keeps their reads to about this many per second.
pub const FIRST_VIEW_READS_PER_S: f64 = 250.0;
/// The attachments' timings are read again when the view's are older than this.
pub const TIMINGS_MAX_AGE: Duration = Duration::from_secs(300);

/// The window of the random pause before a cluster's first view in a while: `FIRST_VIEW_SPREAD`,
/// or longer when the stale view it replaces lists `members` that may all be reading it now. A
/// fleet of 1,000 restarted at once reads the 12 KB item once each in the same second (2,000 read
/// units of one item's 3,000); with the pause's reads spread over 4 s instead of 2, that second
/// stays within the item's capacity. The first of the fleet still begins the refresh within a few
/// milliseconds; a lone instance of such a fleet waits 2 s on average (1 s in a cluster of 500
/// or fewer).
pub fn first_view_spread(members: usize) -> Duration {
    FIRST_VIEW_SPREAD.max(Duration::from_secs_f64(members as f64 / FIRST_VIEW_READS_PER_S))
}

/// Whether the view's `item` holds a view at most `VIEW_MAX_AGE` old at `now` (Unix ms): recent
/// enough to size the cluster from.
pub fn is_fresh(item: &crate::lease::Shared, now: u64) -> bool {
    !item.data.is_empty() && now.saturating_sub(item.at) <= VIEW_MAX_AGE.as_millis() as u64
}

/// Sleeps the random pause before a cluster's first view in a while: within `first_view_spread`
/// of the members of the stale view in `item` (the view's item as read; none: 0 members).
pub async fn first_view_pause(item: Option<&crate::lease::Shared>) {
    let members = item.and_then(|s| View::decode(&s.data).ok()).map_or(0, |v| v.roster.members.len());
    tokio::time::sleep(first_view_spread(members).mul_f64(fastrand::f64())).await;
}

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
    /// Member ids as they are (`ids`' fallback), or packed (`mp`), or only a count (`c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<usize>,
    /// Zones and lifecycle states: a column over the members (`Column`), the rest as a map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zc: Option<Column>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    z: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lc: Option<Column>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    l: BTreeMap<String, String>,
    /// The Auto Scaling group as the members' read found it (its attachments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    g: Option<Box<GroupInfo>>,
    /// The attachments. Written as `e` (`WireGroups`); `b` (`WireLb`: only serving targets in a
    /// bitmap) and `a` (every target written out) are how earlier listeners wrote them, still
    /// read. Each earlier listener fails to read the later form (no `a`, or no `a` nor `b`): a
    /// failed check, never a misread view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<Vec<WireLb>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<Vec<WireLb>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<Vec<WireGroups>>,
    t: u64,
}

/// One attachment: the members' targets in groups of one state, description and port, each a
/// bitmap over the members' order (a wave of 250 out of 1,000 then costs a few bitmaps of 167
/// bytes instead of 250 targets written out: 37 KB of view against 16 KB); every other target
/// (not a member's, a member's listed twice, or one whose group would cost more as a bitmap than
/// written out) in full in `o`.
#[derive(Serialize, Deserialize)]
struct WireGroups {
    g: Vec<WireGroup>,
    o: Vec<InFull>,
    d: Option<u64>,
    h: u64,
}

#[derive(Serialize, Deserialize)]
struct WireGroup {
    t: TargetState,
    r: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<i32>,
    k: String,
}

/// A target written out in full (`o`): id, port, state, description.
type InFull = (String, Option<i32>, TargetState, String);

fn in_full(h: &TargetHealth) -> InFull {
    (h.target.instance_id.clone(), h.target.port, h.state, h.raw.clone())
}

/// About what one target written out in full costs in the view (its id, port, state and
/// description): a group of members whose bitmap costs more than its targets so is written out.
const TARGET_IN_FULL_BYTES: usize = 64;

/// Attachment `listed`'s targets as groups over the members `index` (of `members` in all).
fn groups(listed: &[TargetHealth], index: &HashMap<&str, usize>, members: usize, t: &LbTimings) -> WireGroups {
    // (state, description, port), the bitmap, the targets in it.
    type Group<'a> = ((TargetState, &'a str, Option<i32>), Vec<u8>, Vec<&'a TargetHealth>);
    let mut groups: Vec<Group> = Vec::new();
    let mut o = Vec::new();
    for h in listed {
        let Some(&i) = index.get(h.target.instance_id.as_str()) else {
            o.push(in_full(h));
            continue;
        };
        let key = (h.state, h.raw.as_str(), h.target.port);
        let g = match groups.iter().position(|g| g.0 == key) {
            Some(g) => g,
            None => {
                groups.push((key, vec![0u8; members.div_ceil(8)], Vec::new()));
                groups.len() - 1
            }
        };
        let (_, bits, of) = &mut groups[g];
        match bits[i / 8] & (1 << (i % 8)) {
            0 => {
                bits[i / 8] |= 1 << (i % 8);
                of.push(h);
            }
            _ => o.push(in_full(h)),
        }
    }
    let bitmap_bytes = members.div_ceil(8).div_ceil(3) * 4;
    let mut g = Vec::new();
    for ((state, raw, port), bits, of) in groups {
        if of.len() * TARGET_IN_FULL_BYTES > bitmap_bytes {
            g.push(WireGroup { t: state, r: raw.to_owned(), p: port, k: B64.encode(bits) });
        } else {
            o.extend(of.into_iter().map(in_full));
        }
    }
    WireGroups { g, o, d: t.drain.map(|d| d.as_millis() as u64), h: t.healthy_after.as_millis() as u64 }
}

/// One attachment. Serving targets share one description `r` (most of a large group): those of
/// members on one port `p` as a bitmap `k` over the members' order, the other serving ones as
/// `id` or `id:port` in `s`; every other target in full in `o`.
#[derive(Serialize, Deserialize)]
struct WireLb {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    k: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<i32>,
    s: Vec<String>,
    #[serde(default)]
    r: String,
    o: Vec<InFull>,
    d: Option<u64>,
    h: u64,
}

/// A per-member value as a column: the distinct values in `v`, and one byte per member in `i`
/// (base64): the value's index + 1, 0 for none.
#[derive(Serialize, Deserialize)]
struct Column {
    v: Vec<String>,
    i: String,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// Member ids packed: `N:` and base64 of each id's hex digits (`i-` and N of them, lowercase,
/// N = 8 or 17, AWS's two lengths) as ⌈N/2⌉ bytes, left-padded with a zero digit. `None` when
/// the ids are not all of one such form.
fn pack_ids(ids: &[&String]) -> Option<String> {
    let n = ids.first()?.len().checked_sub(2)?;
    if n != 8 && n != 17 {
        return None;
    }
    let width = n.div_ceil(2);
    let mut bytes = Vec::with_capacity(ids.len() * width);
    for id in ids {
        let hex = id.strip_prefix("i-").filter(|h| h.len() == n)?;
        if !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        let padded = format!("{}{hex}", "0".repeat(width * 2 - n));
        for pair in padded.as_bytes().chunks(2) {
            bytes.push(u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?);
        }
    }
    Some(format!("{n}:{}", B64.encode(bytes)))
}

fn unpack_ids(packed: &str) -> Result<Vec<String>, String> {
    let bad = || format!("bad packed members {:.40}", packed);
    let (n, data) = packed.split_once(':').ok_or_else(bad)?;
    let n: usize = n.parse().map_err(|_| bad())?;
    let bytes = B64.decode(data).map_err(|_| bad())?;
    let width = n.div_ceil(2);
    if n == 0 || bytes.len() % width != 0 {
        return Err(bad());
    }
    Ok(bytes
        .chunks(width)
        .map(|id| {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            format!("i-{}", &hex[width * 2 - n..])
        })
        .collect())
}

/// `map`'s values for `ids` as a column, and the entries for anything else (or everything, when
/// the values are too many for a byte).
fn column(ids: &[&String], map: &BTreeMap<String, String>) -> (Option<Column>, BTreeMap<String, String>) {
    let values: BTreeSet<&String> = map.values().collect();
    let in_ids = ids.iter().filter(|id| map.contains_key(id.as_str())).count();
    if in_ids == 0 || values.len() > 255 {
        return (None, map.clone());
    }
    let v: Vec<String> = values.into_iter().cloned().collect();
    let index: BTreeMap<&String, u8> = v.iter().enumerate().map(|(i, s)| (s, i as u8 + 1)).collect();
    let i = ids.iter().map(|id| map.get(id.as_str()).map_or(0, |s| index[s])).collect::<Vec<u8>>();
    let known: BTreeSet<&str> = ids.iter().map(|id| id.as_str()).collect();
    let rest = map.iter().filter(|(id, _)| !known.contains(id.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    (Some(Column { v, i: B64.encode(i) }), rest)
}

fn uncolumn(
    ids: &[String],
    col: Option<Column>,
    mut rest: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let Some(col) = col else { return Ok(rest) };
    let bytes = B64.decode(&col.i).map_err(|_| "bad column in the shared view".to_string())?;
    if bytes.len() != ids.len() {
        return Err(format!("a column of {} for {} members in the shared view", bytes.len(), ids.len()));
    }
    for (id, b) in ids.iter().zip(bytes) {
        if b > 0 {
            let v = col.v.get(b as usize - 1).ok_or_else(|| "bad column index in the shared view".to_string())?;
            rest.insert(id.clone(), v.clone());
        }
    }
    Ok(rest)
}

/// Bitmap `k` over the members `ids`: each member whose bit is set.
fn bitmap<'a>(k: &str, ids: &'a [String]) -> Result<impl Iterator<Item = &'a String> + 'a, String> {
    let bits = B64.decode(k).map_err(|_| "bad target bitmap in the shared view".to_string())?;
    if bits.len() != ids.len().div_ceil(8) {
        return Err(format!("a target bitmap of {} bytes for {} members", bits.len(), ids.len()));
    }
    Ok(ids.iter().enumerate().filter(move |(i, _)| bits[i / 8] & (1 << (i % 8)) != 0).map(|(_, id)| id))
}

fn timings(d: Option<u64>, h: u64) -> LbTimings {
    LbTimings { drain: d.map(Duration::from_millis), healthy_after: Duration::from_millis(h) }
}

fn written_out(o: Vec<InFull>) -> impl Iterator<Item = TargetHealth> {
    o.into_iter().map(|(id, port, state, raw)| TargetHealth { target: Target { instance_id: id, port }, state, raw })
}

impl WireGroups {
    fn decode(self, ids: &[String]) -> Result<(Vec<TargetHealth>, LbTimings), String> {
        let mut targets = Vec::with_capacity(self.o.len());
        for g in self.g {
            for id in bitmap(&g.k, ids)? {
                let target = Target { instance_id: id.clone(), port: g.p };
                targets.push(TargetHealth { target, state: g.t, raw: g.r.clone() });
            }
        }
        targets.extend(written_out(self.o));
        Ok((targets, timings(self.d, self.h)))
    }
}

impl WireLb {
    fn decode(self, ids: &[String]) -> Result<(Vec<TargetHealth>, LbTimings), String> {
        let mut targets = Vec::with_capacity(self.s.len() + self.o.len());
        if !self.k.is_empty() {
            for id in bitmap(&self.k, ids)? {
                let target = Target { instance_id: id.clone(), port: self.p };
                targets.push(TargetHealth { target, state: TargetState::Serving, raw: self.r.clone() });
            }
        }
        for s in self.s {
            let target = match s.rsplit_once(':') {
                Some((id, port)) => Target::on_port(id, port.parse().map_err(|_| format!("bad target {s:?}"))?),
                None => Target::instance(s),
            };
            targets.push(TargetHealth { target, state: TargetState::Serving, raw: self.r.clone() });
        }
        targets.extend(written_out(self.o));
        Ok((targets, timings(self.d, self.h)))
    }
}

impl View {
    /// The compact JSON kept in the shared item: members packed, zones and lifecycle states as
    /// columns over them, the members' targets as bitmaps over them, one per state, description
    /// and port (`WireGroups`). 1,000 members with AWS-length ids in three zones, each with its
    /// lifecycle state, serving in a target group and listed on a Classic load balancer: under
    /// 16 KB (the test's fleet), where the ids alone take 22 KB written out; with 240 of them out
    /// in three states, 16.5 KB. DynamoDB charges reads per 4 KB of the item.
    pub fn encode(&self) -> String {
        let ids: Vec<&String> = match &self.roster.members {
            Members::Ids(ids) => ids.iter().collect(),
            Members::Count(_) => Vec::new(),
        };
        let (m, mp, c) = match &self.roster.members {
            Members::Ids(_) => match pack_ids(&ids) {
                Some(packed) => (None, Some(packed), None),
                None => (Some(ids.iter().map(|id| (*id).clone()).collect()), None, None),
            },
            Members::Count(n) => (None, None, Some(*n)),
        };
        let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let e = self.listed.iter().zip(&self.timings).map(|(listed, t)| groups(listed, &index, ids.len(), t)).collect();
        let (zc, z) = column(&ids, &self.roster.zones);
        let (lc, l) = column(&ids, &self.roster.lifecycle);
        let wire = Wire {
            m,
            mp,
            c,
            zc,
            z,
            lc,
            l,
            g: self.roster.group.clone(),
            a: None,
            b: None,
            e: Some(e),
            t: self.timings_at,
        };
        serde_json::to_string(&wire).expect("a view always serializes")
    }

    pub fn decode(data: &str) -> Result<View, String> {
        let w: Wire = serde_json::from_str(data).map_err(|e| format!("the shared view is malformed: {e}"))?;
        let ids = match (w.m, w.mp) {
            (Some(ids), _) => Some(ids),
            (None, Some(packed)) => Some(unpack_ids(&packed)?),
            (None, None) => None,
        };
        let (ids, members) = match (ids, w.c) {
            (Some(ids), _) => (ids.clone(), Members::Ids(ids.into_iter().collect())),
            (None, Some(n)) => (Vec::new(), Members::Count(n)),
            (None, None) => return Err("the shared view has no members".into()),
        };
        let lbs: Vec<(Vec<TargetHealth>, LbTimings)> = match (w.e, w.b.or(w.a)) {
            (Some(e), _) => e.into_iter().map(|lb| lb.decode(&ids)).collect::<Result<_, _>>()?,
            (None, Some(b)) => b.into_iter().map(|lb| lb.decode(&ids)).collect::<Result<_, _>>()?,
            (None, None) => return Err("the shared view has no attachments".into()),
        };
        let (listed, timings) = lbs.into_iter().unzip();
        let zones = uncolumn(&ids, w.zc, w.z)?;
        let lifecycle = uncolumn(&ids, w.lc, w.l)?;
        Ok(View { roster: Roster { members, zones, lifecycle, group: w.g }, listed, timings, timings_at: w.t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(back: &View, view: &View) {
        // Order within an attachment is not kept: bitmap targets first, then the other serving
        // ones, then the rest.
        assert_eq!(back.listed.len(), view.listed.len());
        for (a, b) in back.listed.iter().zip(&view.listed) {
            let (mut a, mut b) = (a.clone(), b.clone());
            a.sort_by(|x, y| (&x.target, &x.raw).cmp(&(&y.target, &y.raw)));
            b.sort_by(|x, y| (&x.target, &x.raw).cmp(&(&y.target, &y.raw)));
            assert_eq!(a, b);
        }
        assert_eq!((&back.roster, &back.timings, back.timings_at), (&view.roster, &view.timings, view.timings_at));
    }

    fn serving(target: Target, raw: &str) -> TargetHealth {
        TargetHealth { target, state: TargetState::Serving, raw: raw.into() }
    }

    /// 1,000 members with AWS-length ids in three zones, InService but one, in a target group
    /// (port 8080) and a Classic load balancer; with what the bitmap cannot hold beside it.
    fn fleet() -> (Vec<String>, View) {
        let ids: Vec<String> = (0..1000u64).map(|i| format!("i-{:017x}", 0x0abc_0000_0000_0000 + i * 7919)).collect();
        let mut tg: Vec<TargetHealth> = ids.iter().map(|id| serving(Target::on_port(id, 8080), "healthy")).collect();
        tg[3].state = TargetState::Draining;
        tg[3].raw = "draining (Target.DeregistrationInProgress)".into();
        // Serving but not a member, a member on a second port, the same target listed twice, and
        // a member serving with another description: all outside the bitmap.
        tg.push(serving(Target::on_port("i-0fffffffffffffff0", 8080), "healthy"));
        tg.push(serving(Target::on_port(&ids[5], 9090), "healthy"));
        tg.push(serving(Target::on_port(&ids[6], 8080), "healthy"));
        tg[7].raw = "healthy (warming)".into();
        let classic = vec![
            serving(Target::instance(&ids[0]), "InService"),
            serving(Target::instance(&ids[1]), "InService (Instance deregistration currently in progress.)"),
        ];
        let zones = ["us-east-1a", "us-east-1b", "us-east-1c"];
        let mut roster = Roster::of(Members::Ids(ids.iter().cloned().collect()));
        roster.zones = ids.iter().enumerate().map(|(i, id)| (id.clone(), zones[i % 3].to_owned())).collect();
        roster.zones.insert("i-0fffffffffffffff0".into(), "us-east-1d".into());
        roster.lifecycle = ids.iter().map(|id| (id.clone(), "InService".to_owned())).collect();
        roster.lifecycle.insert(ids[9].clone(), "Standby".into());
        roster.group = Some(Box::new(GroupInfo {
            name: "web".into(),
            target_groups: vec!["arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web/2".into()],
            health_check_type: "ELB".into(),
            health_check_grace_s: 300,
            ..GroupInfo::default()
        }));
        let view = View {
            roster,
            listed: vec![tg, classic],
            timings: vec![
                LbTimings { drain: Some(Duration::from_secs(20)), healthy_after: Duration::from_secs(15) },
                LbTimings { drain: None, healthy_after: Duration::from_millis(10_500) },
            ],
            timings_at: 1_700_000_000_000,
        };
        (ids, view)
    }

    #[test]
    fn a_fleets_view_round_trips_in_a_fraction_of_its_ids_written_out() {
        let (ids, view) = fleet();
        let data = view.encode();
        same(&View::decode(&data).unwrap(), &view);
        // The ids alone, written out as a JSON list, take 22 KB.
        let written_out: usize = ids.iter().map(|id| id.len() + 3).sum();
        assert!(written_out > 21_000);
        assert!(data.len() < 16_000, "{} bytes", data.len());
    }

    /// A wave out: 240 of the 1,000 members' targets draining, unused or starting (each state
    /// with one description) take a bitmap per state, not 240 targets written out (a 37 KB view
    /// in the fleet model before); a lone target of its own state and description stays written
    /// out. Written as `e` only: listeners that know only `a` or `b` fail to read it rather than
    /// misread it.
    #[test]
    fn a_wave_out_takes_a_bitmap_per_state_and_round_trips() {
        let (_, mut view) = fleet();
        let states = [
            (TargetState::Draining, "draining (Target.DeregistrationInProgress)"),
            (TargetState::NotRegistered, "unused (Target.NotRegistered)"),
            (TargetState::Starting, "initial (Elb.RegistrationInProgress)"),
        ];
        for (i, h) in view.listed[0].iter_mut().enumerate().skip(10).step_by(4).take(240) {
            let (state, raw) = states[i % 3];
            (h.state, h.raw) = (state, raw.into());
        }
        view.listed[0][11].raw = "unhealthy (Target.FailedHealthChecks)".into();
        view.listed[0][11].state = TargetState::Unhealthy;
        let data = view.encode();
        same(&View::decode(&data).unwrap(), &view);
        assert!(data.len() < 17_000, "{} bytes", data.len());
        let wire: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert!(wire.get("a").is_none() && wire.get("b").is_none(), "{data:.200}");
        let tg = &wire["e"][0];
        assert_eq!(tg["g"].as_array().unwrap().len(), 4, "healthy on 8080, and the three states out");
        let full: Vec<&str> = tg["o"].as_array().unwrap().iter().map(|t| t[3].as_str().unwrap()).collect();
        assert!(full.contains(&"unhealthy (Target.FailedHealthChecks)") && full.len() == 5, "{full:?}");
    }

    #[test]
    fn a_view_of_the_serving_bitmap_form_still_reads() {
        // `b`: members' serving targets on one port as a bitmap (bit 0: i-1234abcd), the rest out.
        let b = r#"{"m":["i-1234abcd","i-89abcdef"],"b":[{"k":"AQ","p":80,"s":["i-0000000f"],"r":"healthy","o":[["i-89abcdef",80,"draining","draining"]],"d":20000,"h":15000}],"t":7}"#;
        let view = View::decode(b).unwrap();
        let draining = TargetHealth {
            target: Target::on_port("i-89abcdef", 80),
            state: TargetState::Draining,
            raw: "draining".into(),
        };
        assert_eq!(
            view.listed,
            vec![vec![
                serving(Target::on_port("i-1234abcd", 80), "healthy"),
                serving(Target::instance("i-0000000f"), "healthy"),
                draining
            ]]
        );
        assert_eq!(view.timings[0].drain, Some(Duration::from_secs(20)));
    }

    #[test]
    fn ids_of_other_forms_counts_and_empty_views_round_trip() {
        for members in [
            vec!["i-1234abcd".to_string(), "i-89abcdef".into()],
            vec!["i-1234abcd".to_string(), "i-0123456789abcdef0".into()],
            vec!["i-ABCDEF12".to_string()],
            vec!["web-1".to_string(), "web-2".into()],
            vec![],
        ] {
            let listed = vec![members.iter().map(|id| serving(Target::instance(id), "InService")).collect()];
            let mut roster = Roster::of(Members::Ids(members.iter().cloned().collect()));
            roster.zones = members.iter().map(|id| (id.clone(), "z".to_owned())).collect();
            let timings = vec![LbTimings { drain: None, healthy_after: Duration::from_secs(3) }];
            let view = View { roster, listed, timings, timings_at: 5 };
            same(&View::decode(&view.encode()).unwrap(), &view);
        }
        let listed = vec![vec![serving(Target::instance("i-1234abcd"), "InService")]];
        let timings = vec![LbTimings { drain: Some(Duration::ZERO), healthy_after: Duration::from_secs(3) }];
        let view = View { roster: Roster::of(Members::Count(4)), listed, timings, timings_at: 5 };
        same(&View::decode(&view.encode()).unwrap(), &view);
    }

    #[test]
    fn a_view_written_out_in_full_still_reads_and_bad_ones_are_refused() {
        let old = r#"{"m":["i-1234abcd","i-89abcdef"],"z":{"i-1234abcd":"us-east-1a"},"a":[{"s":["i-1234abcd:80"],"r":"healthy","o":[["i-89abcdef",80,"draining","draining"]],"d":20000,"h":15000}],"t":7}"#;
        let view = View::decode(old).unwrap();
        assert_eq!(view.roster.members, Members::Ids(["i-1234abcd".to_string(), "i-89abcdef".into()].into()));
        assert_eq!(view.roster.zones.get("i-1234abcd").map(String::as_str), Some("us-east-1a"));
        assert_eq!(
            view.listed,
            vec![vec![
                serving(Target::on_port("i-1234abcd", 80), "healthy"),
                TargetHealth {
                    target: Target::on_port("i-89abcdef", 80),
                    state: TargetState::Draining,
                    raw: "draining".into()
                },
            ]]
        );
        assert!(View::decode("{").unwrap_err().contains("malformed"));
        assert!(View::decode(r#"{"c":3,"t":1}"#).unwrap_err().contains("no attachments"));
        assert!(View::decode(r#"{"b":[],"t":1}"#).unwrap_err().contains("no members"));
        let short = r#"{"mp":"8:EjSrzQ","b":[{"k":"AAAA","s":[],"o":[],"d":null,"h":1}],"t":1}"#;
        assert!(View::decode(short).unwrap_err().contains("bitmap"), "{:?}", View::decode(short).err());
        assert!(View::decode(r#"{"mp":"8:EjSr","b":[],"t":1}"#).unwrap_err().contains("packed"));
    }

    #[test]
    fn a_large_clusters_first_view_waits_in_a_window_sized_by_its_members() {
        // The window of the 250 second reads per second: 4 s for 1,000 members.
        assert_eq!(first_view_spread(1000), Duration::from_secs(4));
        assert_eq!(first_view_spread(750), Duration::from_secs(3));
        // No view yet (0), or a cluster small enough: the floor.
        for small in [0, 1, 12, 100, 500] {
            assert_eq!(first_view_spread(small), FIRST_VIEW_SPREAD, "{small} members");
        }
    }
}
