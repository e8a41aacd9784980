//! `--batch-registrations`: a holder's deregistration and registration made by whichever instance
//! takes the permit record's batch claim, one call per attachment for every holder asking
//! (`crate::lease::batch` has the record's side and the rules that keep the first invariant).

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::state_file::Taken;
use super::{jitter, Cycle};
use crate::lb::members::Membership;
use crate::lb::{LoadBalancer, Target};
use crate::lease::batch::{
    attachment_tag, element, plan_batch, BatchPlan, Way, BATCH_CALL_MARGIN, BATCH_CLAIM, BATCH_POLL, BATCH_WAIT,
};
use crate::lease::{Permit, Permits, Record};
use crate::supervisor::Services;

impl<L: LoadBalancer, M: Membership, S: Services> Cycle<L, M, S> {
    /// This instance's attachments by tag.
    fn tags(&self) -> BTreeMap<String, usize> {
        self.lbs.iter().enumerate().map(|(i, lb)| (attachment_tag(lb.spec().kind.as_str(), &lb.id()), i)).collect()
    }

    /// `plan`'s targets as batch elements, asked under the permit `tok`.
    fn elements(plan: &[Taken], tok: &str) -> BTreeSet<String> {
        plan.iter()
            .flat_map(|t| {
                let tag = attachment_tag(t.kind.as_str(), &t.id);
                t.targets.iter().map(move |target| element(&tag, target, tok))
            })
            .collect()
    }

    /// Moves `plan`'s targets `way` through the cluster's batches. True when batches did it; false
    /// when they did not within `BATCH_WAIT` (or asking failed): this instance's elements are then
    /// withdrawn, so no batch calls for it any more, and the caller makes its own calls (some
    /// attachments may be done already: its calls are idempotent).
    pub(super) async fn batched(&self, permits: &Permits, permit: &Permit, way: Way, plan: &[Taken]) -> bool {
        let elems = Self::elements(plan, &permit.holder.tok);
        if elems.is_empty() {
            return false;
        }
        let shard = permit.after.shard;
        let mut known = match permits.ask(shard, &permit.holder, way, elems.clone()).await {
            // Shard 0's record after the ask is the whole record's first part; another shard's
            // alone is not (the claim is in shard 0): read it all.
            Ok(Some(after)) => (shard == 0 && after.shards <= 1).then_some(after),
            Ok(None) => {
                warn!(instance_id = %self.me, "the permit entry is gone: making the registration calls itself");
                return false;
            }
            Err(e) => {
                // The write may have been applied, its reply lost.
                warn!(instance_id = %self.me, error = %e, "asking the batches failed; making the registration calls itself");
                self.withdraw_batched(permits).await;
                return false;
            }
        };
        let tags = self.tags();
        let start = Instant::now();
        while start.elapsed() < BATCH_WAIT {
            // The ask's reply is the record after it: the first round needs no read.
            let read = match known.take() {
                Some(r) => Ok(r),
                None => permits.read().await,
            };
            match read {
                Ok(record) => {
                    let asked = match way {
                        Way::Out => &record.batches.want_out,
                        Way::In => &record.batches.want_in,
                    };
                    if asked.is_disjoint(&elems) {
                        info!(instance_id = %self.me, waited_s = start.elapsed().as_secs_f64(), "{} by a batch", match way { Way::Out => "deregistered", Way::In => "registered" });
                        return true;
                    }
                    if let Some(batch) = plan_batch(&record, permits.now(), permits.grace, &tags) {
                        if self.run_batch(permits, &record, batch, &tags).await {
                            continue;
                        }
                    }
                }
                Err(e) => warn!(error = %e, "reading the permit record for the batches failed; retrying"),
            }
            tokio::time::sleep(jitter(BATCH_POLL)).await;
        }
        warn!(instance_id = %self.me, waited_s = BATCH_WAIT.as_secs(), "no batch took this instance's targets in time; withdrawing them and making the calls itself");
        self.withdraw_batched(permits).await;
        false
    }

    /// Withdraws this instance's elements from the batches, waiting out any claim naming it. A
    /// store that stays unreachable is logged, not fatal: the instance must still come back (a
    /// batch needs the store too, to begin).
    pub(super) async fn withdraw_batched(&self, permits: &Permits) {
        if let Err(e) = permits.withdraw(BATCH_CLAIM + permits.grace * 2).await {
            error!(instance_id = %self.me, error = %e, "WITHDRAWING FROM THE BATCHES FAILED: a batch that claimed this instance's targets before may still call for them; making its own calls anyway (it must come back)");
        }
    }

    /// Takes the batch claim and makes `batch`'s calls, each attachment's deregistration then
    /// registration (`tags`: this instance's attachments by tag), all begun before the claim's end
    /// less `BATCH_CALL_MARGIN`; then ends the claim with what was done and the calls made (they
    /// set the gap before the next batch). False when the claim went to another instance.
    async fn run_batch(
        &self,
        permits: &Permits,
        record: &Record,
        batch: BatchPlan,
        tags: &BTreeMap<String, usize>,
    ) -> bool {
        let claim = match permits.take_batch(batch.ids.clone(), record.batches.withdrawals).await {
            Ok(Some(c)) => c,
            Ok(None) => return false,
            Err(e) => {
                warn!(error = %e, "taking the batch claim failed");
                return false;
            }
        };
        let (mut out, mut back, mut calls) = (BTreeSet::new(), BTreeSet::new(), 0);
        for (way, side, done) in [(Way::Out, &batch.out, &mut out), (Way::In, &batch.back, &mut back)] {
            for (tag, items) in side {
                let Some(&i) = tags.get(tag) else { continue };
                let lb = &self.lbs[i];
                let targets: Vec<Target> = items.iter().map(|(_, t)| t.clone()).collect();
                let end = claim.until.saturating_sub(BATCH_CALL_MARGIN.as_millis() as u64);
                let left = std::time::Duration::from_millis(end.saturating_sub(permits.now()));
                if left.is_zero() {
                    warn!(lb = %lb.label(), "the batch claim ran out before this call; leaving it to the next batch");
                    continue;
                }
                let call = async {
                    match way {
                        Way::Out => lb.deregister(&targets).await,
                        Way::In => lb.register(&targets).await,
                    }
                };
                // Dropped at the claim's end: no attempt begins after it.
                calls += 1;
                match tokio::time::timeout(left, call).await {
                    Ok(Ok(())) => {
                        done.extend(items.iter().map(|(e, _)| e.clone()));
                        let verb = if way == Way::Out { "deregistered" } else { "registered" };
                        info!(lb = %lb.label(), targets = targets.len(), "batch: {verb} {} targets for the cluster", targets.len());
                    }
                    Ok(Err(e)) => warn!(lb = %lb.label(), error = %e, "a batch call failed; its holders try again"),
                    Err(_) => warn!(lb = %lb.label(), "a batch call outlasted the claim; its holders try again"),
                }
            }
        }
        if let Err(e) = permits.end_batch(record, &claim, out, back, calls).await {
            warn!(error = %e, "ending the batch claim failed; it expires by itself");
        }
        true
    }
}
