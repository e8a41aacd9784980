//! Strict mode's shared registration calls (`--batch-registrations`). AWS's registration budget
//! (20 calls + 4/s per account and API version, `crate::fake::Api::ElbV2Mutate`) cannot take a
//! thousand instances each deregistering and registering itself in one 45 s cycle, yet one
//! `DeregisterTargets` takes many targets. So a holder asks instead: it adds its targets to the
//! record's `wo` (want out) or `wi` (want in) string set, and whichever instance takes the record's
//! batch claim makes one call per attachment for every live holder asking, then removes what was
//! done. The asker waits until its targets are gone from the set; past `BATCH_WAIT` it withdraws
//! them and makes its own calls.
//!
//! The claim (`bt` token, `bu` until, `bi` the instance ids in it) is what keeps the first
//! invariant across instances: a batcher calls the load balancer only before `bu` (on its clock),
//! and an instance withdraws its targets only when no claim naming it is live (`bu + G < now` on
//! its clock, G the clock skew tolerated), so a batch cannot take out an instance that withdrew and
//! registered itself. A claim is taken only `IF` the withdrawal count `wd` is the one the batcher
//! read, so a withdrawal between its read and its claim fails the claim. After a batch comes a gap
//! of `BATCH_GAP_PER_CALL` per call it made: at most two calls per second, whatever the fleet's
//! size.
//!
//! An element of a set is `TAG/TARGET@TOK`: `TAG` names the attachment by eight hex digits of its
//! kind and id (`attachment_tag`: instances may list their attachments in another order), `TARGET`
//! is `i-…` or `i-…:PORT`, `TOK` the first eight characters of the asking permit's token. A batch
//! takes an element only while the instance's entry holds that permit: an element left by an
//! earlier permit (a process killed while asking, whose withdrawal failed) is never acted on,
//! whatever permit the instance holds later.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use super::{shard_key, token, Holder, LeaseError, Permits, Record, Write, Written};
use crate::lb::Target;

/// A batch claim's lifetime: its calls are made within it.
pub const BATCH_CLAIM: Duration = Duration::from_secs(10);
/// A batcher starts no call later than this before its claim ends (a call under way at the end
/// reached AWS well before it).
pub const BATCH_CALL_MARGIN: Duration = Duration::from_secs(1);
/// No batch begins sooner than this many times the calls the last one made after it ended (once
/// if it made none): at most two registration calls per second for the whole cluster, half the
/// registration bucket's refill (`crate::fake::Api::ElbV2Mutate`), however many attachments.
pub const BATCH_GAP_PER_CALL: Duration = Duration::from_millis(500);
/// A holder waiting for a batch reads the record this often (jittered). At 0.5 s the unpaced
/// batched fleet of 1,000 took 0.1 s longer (seed 0), its shard 0 read less (the busiest second's
/// read units 654 against 717).
pub const BATCH_POLL: Duration = Duration::from_millis(250);
/// A holder whose targets no batch took within this long withdraws them and makes its own calls.
pub const BATCH_WAIT: Duration = Duration::from_secs(20);
/// The most instances one batch takes.
pub const BATCH_MAX_IDS: usize = 200;

/// The batches' part of the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Batches {
    /// `wo`: targets asked to be taken out.
    pub want_out: BTreeSet<String>,
    /// `wi`: targets asked to be put back.
    pub want_in: BTreeSet<String>,
    /// The claim of the batch under way, if any (live or not).
    pub claim: Option<Claim>,
    /// `bn`: no batch begins before this (Unix ms).
    pub next: u64,
    /// `wd`: withdrawals so far.
    pub withdrawals: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub tok: String,
    /// The batcher makes no call after this, on its clock (Unix ms).
    pub until: u64,
    /// The instances whose targets it may call for.
    pub ids: BTreeSet<String>,
}

impl Claim {
    /// Whether an instance must still count on this claim's calls at `now` (its clock): until
    /// `until + grace`.
    pub fn live(&self, now: u64, grace: Duration) -> bool {
        self.until.saturating_add(grace.as_millis() as u64) >= now
    }
}

/// Which way a batch moves targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Out,
    In,
}

/// An attachment's tag: FNV-1a of `kind:id`, eight hex digits.
pub fn attachment_tag(kind: &str, id: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in kind.bytes().chain([b':']).chain(id.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// How much of the permit's token an element carries.
const TOK_LEN: usize = 8;

/// The set element for `target` in the attachment tagged `tag`, asked under the permit `tok`.
pub fn element(tag: &str, target: &Target, tok: &str) -> String {
    format!("{tag}/{target}@{}", tok.get(..TOK_LEN).unwrap_or(tok))
}

/// `TAG/TARGET@TOK` back into its parts; `None` for anything else.
pub fn parse_element(e: &str) -> Option<(&str, Target, &str)> {
    let (tag, rest) = e.split_once('/')?;
    let (target, tok) = rest.rsplit_once('@')?;
    let target = match target.rsplit_once(':') {
        Some((id, port)) => Target::on_port(id, port.parse().ok()?),
        None => Target::instance(target),
    };
    let ok = !tag.is_empty() && !tok.is_empty() && target.instance_id.starts_with("i-");
    ok.then_some((tag, target, tok))
}

/// The elements of instance `me` in either set, under any permit.
pub fn mine(b: &Batches, me: &str) -> BTreeSet<String> {
    let of_me = |e: &&String| parse_element(e).is_some_and(|(_, t, _)| t.instance_id == me);
    b.want_out.iter().chain(&b.want_in).filter(of_me).cloned().collect()
}

/// One batch's work: per attachment tag, the targets to take out and to put back, with their
/// elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchPlan {
    pub out: BTreeMap<String, Vec<(String, Target)>>,
    pub back: BTreeMap<String, Vec<(String, Target)>>,
    /// Every instance named.
    pub ids: BTreeSet<String>,
}

/// What a batch taken at `now` would do, from the record: the elements asked under the permit
/// their instance holds, unexpired (a holder whose permit lapsed is never taken out for it, and is
/// put back by its own calls; an element of an earlier permit is never acted on), in attachments
/// this instance has (`tags`: its attachments by tag), at most `BATCH_MAX_IDS` instances, outs
/// first. `None` when there is nothing to do, or a batch may not begin yet.
pub fn plan_batch<T>(record: &Record, now: u64, grace: Duration, tags: &BTreeMap<String, T>) -> Option<BatchPlan> {
    let b = &record.batches;
    if b.claim.as_ref().is_some_and(|c| c.live(now, grace)) || now < b.next {
        return None;
    }
    let mut plan = BatchPlan::default();
    for (way, set) in [(Way::Out, &b.want_out), (Way::In, &b.want_in)] {
        for e in set {
            let Some((tag, target, tok)) = parse_element(e) else { continue };
            let asking = record.holders.get(&target.instance_id).is_some_and(|h| h.exp > now && h.tok.starts_with(tok));
            if !asking || !tags.contains_key(tag) {
                continue;
            }
            if !plan.ids.contains(&target.instance_id) {
                if plan.ids.len() >= BATCH_MAX_IDS {
                    continue;
                }
                plan.ids.insert(target.instance_id.clone());
            }
            let side = match way {
                Way::Out => &mut plan.out,
                Way::In => &mut plan.back,
            };
            side.entry(tag.to_owned()).or_default().push((e.clone(), target));
        }
    }
    (!plan.ids.is_empty()).then_some(plan)
}

impl Permits {
    /// Asks the batches to move `elems` (this holder's targets) `way`, in the shard holding its
    /// entry: that shard's record after the ask, or `None` when the entry is no longer `holder`'s
    /// (the permit is lost).
    pub async fn ask(
        &self,
        shard: usize,
        holder: &Holder,
        way: Way,
        elems: BTreeSet<String>,
    ) -> Result<Option<Record>, LeaseError> {
        let write = Write::Ask { id: self.me.clone(), tok: holder.tok.clone(), kind: holder.kind, way, elems };
        Ok(match self.store.write(&shard_key(&self.key, shard), write).await? {
            Written::Applied(after) => Some(after),
            Written::Conflict(_) => None,
        })
    }

    /// Removes this instance's elements from both sets once no claim naming it is live, waiting
    /// that claim out (`Claim::live`): after it, no batch calls the load balancer for this
    /// instance. Elements in other shards than 0 go first (`Write::Forget`), then shard 0's with
    /// the withdrawal counted there, where the claim is: a batcher reads shard 0 before the others,
    /// so one that read an element since forgotten read the count before it and cannot claim.
    /// Throttled or failed store calls are tried again (pauses from 0.5 s doubling to 4 s); gives
    /// up after `wait`, or at once on a permanent error.
    pub async fn withdraw(&self, wait: Duration) -> Result<(), LeaseError> {
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut next_backoff = || {
            let pause = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(4));
            pause
        };
        // Elements forgotten in another shard: the withdrawal must still be counted in shard 0.
        let mut forgot = false;
        loop {
            // A store failure is kept: it is the answer if the wait runs out on it.
            let (pause, failed) = match self.read().await {
                Err(e) if e.is_retryable() => (next_backoff(), Some(e)),
                Err(e) => return Err(e),
                Ok(record) => {
                    let now = self.now();
                    let b = &record.batches;
                    let elems = mine(b, &self.me);
                    let claimed = b.claim.as_ref().filter(|c| c.ids.contains(&self.me) && c.live(now, self.grace));
                    match (claimed, elems.is_empty() && !forgot) {
                        (None, true) => return Ok(()),
                        (Some(c), _) => (Duration::from_millis(c.until + Self::ms(self.grace) + 1 - now), None),
                        (None, false) => match self.withdraw_once(&record, elems, now, &mut forgot).await {
                            Ok(true) => return Ok(()),
                            Ok(false) => (Duration::from_millis(100), None),
                            // Applied with its reply lost, or not: the next round's read tells.
                            Err(e) if e.is_retryable() => (next_backoff(), Some(e)),
                            Err(e) => return Err(e),
                        },
                    }
                }
            };
            if start.elapsed() + pause > wait {
                return Err(failed.unwrap_or_else(|| LeaseError::Unavailable {
                    table: self.store.table().into(),
                    action: "withdraw",
                    detail: format!("a batch claim naming this instance stayed live for {wait:?}"),
                }));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// One withdrawal of `elems` (this instance's, in the merged `record`): true when counted.
    async fn withdraw_once(
        &self,
        record: &Record,
        elems: BTreeSet<String>,
        now: u64,
        forgot: &mut bool,
    ) -> Result<bool, LeaseError> {
        // `elems` that shard `s`'s sets hold.
        let held_in = |s: usize| -> BTreeSet<String> {
            let Some(b) = record.part(s).map(|p| &p.batches) else { return BTreeSet::new() };
            elems.iter().filter(|e| b.want_out.contains(*e) || b.want_in.contains(*e)).cloned().collect()
        };
        for s in 1..record.shards.max(1) {
            let here = held_in(s);
            if !here.is_empty() {
                self.store.write(&shard_key(&self.key, s), Write::Forget { elems: here }).await?;
                *forgot = true;
            }
        }
        let elems = held_in(0);
        let stale = now.saturating_sub(Self::ms(self.grace));
        let write = Write::Withdraw { id: self.me.clone(), elems, stale };
        let applied = self.store.write(&self.key, write).await?.applied();
        if applied {
            *forgot = false;
        }
        Ok(applied)
    }

    /// Takes the batch claim for `ids`, read with `withdrawals`: the claim, or `None` when another
    /// instance took one (or a withdrawal came) since.
    pub async fn take_batch(&self, ids: BTreeSet<String>, withdrawals: u64) -> Result<Option<Claim>, LeaseError> {
        let now = self.now();
        let claim = Claim { tok: token(), until: now + Self::ms(BATCH_CLAIM), ids };
        let stale = now.saturating_sub(Self::ms(self.grace));
        let write = Write::TakeBatch { claim: claim.clone(), now, stale, withdrawals };
        Ok(self.store.write(&self.key, write).await?.applied().then_some(claim))
    }

    /// Ends `claim` after `calls` load-balancer calls, the elements in `out` taken out and those
    /// in `back` put back (`record`: the merged read the batch was planned on). Each other shard's
    /// done elements are removed there first, then the claim ends in shard 0.
    pub async fn end_batch(
        &self,
        record: &Record,
        claim: &Claim,
        out: BTreeSet<String>,
        back: BTreeSet<String>,
        calls: u32,
    ) -> Result<bool, LeaseError> {
        for s in 1..record.shards.max(1) {
            let Some(b) = record.part(s).map(|p| &p.batches) else { continue };
            let here: BTreeSet<String> = out
                .iter()
                .filter(|e| b.want_out.contains(*e))
                .chain(back.iter().filter(|e| b.want_in.contains(*e)))
                .cloned()
                .collect();
            if !here.is_empty() {
                self.store.write(&shard_key(&self.key, s), Write::Forget { elems: here }).await?;
            }
        }
        let next = self.now() + Self::ms(BATCH_GAP_PER_CALL * calls.max(1));
        let write = Write::EndBatch { tok: claim.tok.clone(), out, back, next };
        Ok(self.store.write(&self.key, write).await?.applied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Holder, Kind};

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn elements_round_trip_and_tags_differ_by_kind_and_id() {
        let tag = attachment_tag("target-group", "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1");
        assert_eq!(tag.len(), 8);
        assert_ne!(tag, attachment_tag("classic", "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1"));
        assert_ne!(attachment_tag("classic", "web"), attachment_tag("classic", "web2"));
        for t in [Target::instance("i-0abc"), Target::on_port("i-0abc", 8080)] {
            let e = element(&tag, &t, "0123456789abcdef");
            assert!(e.ends_with("@01234567"), "{e}");
            assert_eq!(parse_element(&e), Some((tag.as_str(), t, "01234567")));
        }
        for bad in ["", "x", "/i-1@t", "abc/web@t", "abc/i-1:port@t", "abc/i-1", "abc/i-1@"] {
            assert_eq!(parse_element(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_batch_takes_unexpired_askers_in_known_attachments_and_waits_for_claims_and_gaps() {
        let now = 1_000_000;
        let holder = |exp| Holder { tok: "t0123456789".into(), exp, since: 0, kind: Kind::Slot };
        let mut r = Record::default();
        r.holders.insert("i-1".into(), holder(now + 1));
        r.holders.insert("i-2".into(), holder(now + 1));
        r.holders.insert("i-3".into(), holder(now));
        r.batches.want_out = set(&["aa/i-1:80@t0123456", "aa/i-3@t0123456", "bb/i-1@t0123456", "zz/i-1@t0123456"]);
        // i-2's first element was asked under an earlier permit.
        r.batches.want_in = set(&["aa/i-2@old01234", "aa/i-2:81@t0123456", "aa/i-9@t0123456"]);
        let tags: BTreeMap<String, usize> = [("aa".to_string(), 0), ("bb".to_string(), 1)].into();
        let g = Duration::from_secs(30);
        let p = plan_batch(&r, now, g, &tags).unwrap();
        let targets = |m: &BTreeMap<String, Vec<(String, Target)>>| -> Vec<String> {
            m.values().flatten().map(|(e, _)| e.clone()).collect()
        };
        // i-3's permit lapsed, i-9 holds none, zz is not an attachment of this instance, and
        // i-2's permit is not the one its first element was asked under.
        assert_eq!(targets(&p.out), vec!["aa/i-1:80@t0123456", "bb/i-1@t0123456"]);
        assert_eq!(targets(&p.back), vec!["aa/i-2:81@t0123456"]);
        assert_eq!(p.ids, set(&["i-1", "i-2"]));
        // A live claim (until + G) holds every other batch back; so does the gap.
        let claim = Claim { tok: "c".into(), until: now - 30_000, ids: set(&["i-1"]) };
        r.batches.claim = Some(claim.clone());
        assert_eq!(plan_batch(&r, now, g, &tags), None);
        r.batches.claim = Some(Claim { until: now - 30_001, ..claim });
        assert!(plan_batch(&r, now, g, &tags).is_some());
        r.batches.next = now + 1;
        assert_eq!(plan_batch(&r, now, g, &tags), None);
        assert_eq!(mine(&r.batches, "i-1"), set(&["aa/i-1:80@t0123456", "bb/i-1@t0123456", "zz/i-1@t0123456"]));
        assert_eq!(mine(&r.batches, "i-2"), set(&["aa/i-2:81@t0123456", "aa/i-2@old01234"]), "under any permit");
    }
}
