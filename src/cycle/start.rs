//! Strict mode with `--members asg`: the Auto Scaling group at a process's start. A process needs
//! the group's attachments before it can build its cycle; the cluster's shared view holds them (its
//! refreshes read the group with the members), so a process whose instance the view lists takes
//! them from it and asks Auto Scaling nothing. When there is no view yet, or only a stale one
//! without this instance (a fleet's first run), the processes started at once do not each look
//! the group up: one at a time takes the view's refresh lease, looks the group up and publishes a
//! view (`Cycle::prime_view`), and the others wait for it. Auto Scaling then sees about one lookup
//! per `VIEW_REFRESH` + `VIEW_HANDOFF` while no view comes, whatever the fleet's size.

use std::future::Future;

use tokio::time::Instant;
use tracing::info;

use super::jitter;
use super::view::{first_view_pause, is_fresh, View, VIEW_POLL, VIEW_REFRESH, VIEW_WAIT};
use crate::lb::members::{GroupInfo, MembersError};
use crate::lease::{Permits, Shared};

/// Auto Scaling group `name` as the shared view holds it, when it does and lists `me` (a stale
/// view too: every check compares it with the group's attachments read after the grant).
pub fn group_in_view(shared: &Shared, name: &str, me: &str) -> Option<GroupInfo> {
    let view = View::decode(&shared.data).ok()?;
    view.roster.group.filter(|g| g.name == name && view.roster.lifecycle.contains_key(me)).map(|g| *g)
}

/// The group at the start, and how it was found.
#[derive(Debug)]
pub struct GroupAtStart {
    pub group: GroupInfo,
    /// The view's item that held the group, for the first check to take over
    /// (`Cycle::with_view_read`); `None` when the group was looked up.
    pub read: Option<Shared>,
    /// This process looked the group up holding the view's refresh lease: others may be waiting
    /// for the view it publishes once its cycle is built (`Cycle::prime_view`).
    pub publish: bool,
}

/// Group `name` for this process (`permits.me`): from the shared view when it lists this
/// instance; else, when the view is missing or stale (others may be starting too), after a random
/// pause sized by the stale view's members (`first_view_spread`), from the view another process
/// publishes meanwhile, or by `lookup` once this process holds the refresh lease; by `lookup` at
/// once when a fresh view does not list this instance (a lone newcomer), when the view item cannot
/// be read, or after `VIEW_WAIT` without a view.
pub async fn group_at_start<F, Fut>(permits: &Permits, name: &str, mut lookup: F) -> Result<GroupAtStart, MembersError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<GroupInfo, MembersError>>,
{
    let deadline = Instant::now() + VIEW_WAIT;
    let mut spread = false;
    loop {
        let current = match permits.shared().await {
            Ok(current) => current,
            Err(e) => {
                info!(error = %e, "the cluster's shared view could not be read: looking the Auto Scaling group up");
                return Ok(GroupAtStart { group: lookup().await?, read: None, publish: false });
            }
        };
        if let Some(group) = current.as_ref().and_then(|s| group_in_view(s, name, &permits.me)) {
            return Ok(GroupAtStart { group, read: current, publish: false });
        }
        let now = permits.now();
        if current.as_ref().is_some_and(|s| is_fresh(s, now)) || Instant::now() >= deadline {
            return Ok(GroupAtStart { group: lookup().await?, read: None, publish: false });
        }
        if !spread {
            spread = true;
            first_view_pause(current.as_ref()).await;
            continue;
        }
        // The refresh lease is in the view's head (an unreadable head: try the lease anyway).
        let head = permits.head().await.ok().flatten();
        let free = head.as_ref().is_none_or(|s| s.lease_free(&permits.me, now));
        if free && permits.lease_view(VIEW_REFRESH).await.unwrap_or(false) {
            info!(group = %name, "no shared view lists this instance yet: looking the Auto Scaling group up for the cluster");
            return Ok(GroupAtStart { group: lookup().await?, read: None, publish: true });
        }
        tokio::time::sleep(jitter(VIEW_POLL)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::fake::{fake_permits, Api, FakeStore, StoreFault, StoreOp, ThrottledMembers};

    fn ids(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("i-{i:017x}")).collect()
    }

    /// A view of group "fleet" listing `ids`, as a refresh publishes it.
    fn view_of(ids: &[String]) -> String {
        let roster =
            ThrottledMembers { ids: ids.iter().cloned().collect(), throttle: None, api: Api::AutoScaling }.roster();
        View { roster, listed: vec![Vec::new()], timings: Vec::new(), timings_at: 0 }.encode()
    }

    type Lookup = std::pin::Pin<Box<dyn Future<Output = Result<GroupInfo, MembersError>> + Send>>;

    /// A lookup that counts its calls and takes 100 ms.
    fn counting(calls: &Arc<AtomicUsize>) -> impl FnMut() -> Lookup {
        let calls = calls.clone();
        move || {
            let calls = calls.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(GroupInfo { name: "fleet".into(), ..GroupInfo::default() })
            })
        }
    }

    /// A fleet's first run: twenty processes start at once with no view. One takes the refresh
    /// lease and looks the group up; the others find the group in the view it publishes (here
    /// published as `Cycle::prime_view` would) and ask Auto Scaling nothing.
    #[tokio::test(start_paused = true)]
    async fn processes_started_at_once_look_the_group_up_once() {
        fastrand::seed(3);
        let (store, ids) = (FakeStore::new(), ids(20));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = ids
            .iter()
            .map(|id| {
                let (permits, calls, all) = (fake_permits(&store, "asg:fleet", id), calls.clone(), ids.clone());
                tokio::spawn(async move {
                    let start = group_at_start(&permits, "fleet", counting(&calls)).await.unwrap();
                    if start.publish {
                        assert!(permits.publish_view(&[0], permits.now(), view_of(&all), 1).await.unwrap());
                    }
                    (start.group.name, start.read.is_some(), start.publish)
                })
            })
            .collect();
        let mut published = 0;
        for t in tasks {
            let (name, handed, publish) = t.await.unwrap();
            assert_eq!(name, "fleet");
            assert!(handed != publish, "a process either looked up or has the view to hand over");
            published += publish as usize;
        }
        assert_eq!((calls.load(Ordering::SeqCst), published), (1, 1), "one lookup for the fleet");
    }

    /// A view that lists this instance answers at once, stale or not; a fresh view that does not
    /// (an instance launched after it) or a view item that cannot be read sends it to Auto Scaling
    /// at once, with nothing for others to wait for.
    #[tokio::test(start_paused = true)]
    async fn a_listed_view_answers_and_a_fresh_view_without_me_or_a_failed_read_looks_up() {
        let (store, ids) = (FakeStore::new(), ids(3));
        let calls = Arc::new(AtomicUsize::new(0));
        let (listed, newcomer) =
            (fake_permits(&store, "asg:fleet", &ids[0]), fake_permits(&store, "asg:fleet", "i-new"));
        assert!(listed.publish_view(&[0], 1, view_of(&ids), 1).await.unwrap(), "a view long stale");
        let start = group_at_start(&listed, "fleet", counting(&calls)).await.unwrap();
        assert_eq!((start.group.name.as_str(), start.read.is_some(), start.publish), ("fleet", true, false));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert!(group_at_start(&listed, "other", counting(&calls)).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a view of another group does not answer");

        assert!(listed.publish_view(&[0], listed.now(), view_of(&ids), 2).await.unwrap());
        let before = tokio::time::Instant::now();
        let start = group_at_start(&newcomer, "fleet", counting(&calls)).await.unwrap();
        assert_eq!((start.read.is_some(), start.publish, calls.load(Ordering::SeqCst)), (false, false, 2));
        assert!(before.elapsed() < Duration::from_millis(200), "no pause: {:?}", before.elapsed());

        store.fault(StoreOp::LoadView, StoreFault::ServerError);
        let start = group_at_start(&listed, "fleet", counting(&calls)).await.unwrap();
        assert_eq!((start.read.is_some(), start.publish, calls.load(Ordering::SeqCst)), (false, false, 3));
    }
}
