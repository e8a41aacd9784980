//! The background worker: runs restart cycles one at a time while the listener keeps acknowledging
//! events. Requests that arrive during a cycle are merged into the next one: none is lost, none
//! runs twice.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::trigger::RestartRequest;

/// State changes of a program this long after our own restart of it are still ours (supervisord
/// may deliver them from its buffer after the cycle ended).
pub const OWN_EVENT_GRACE: Duration = Duration::from_secs(10);

/// How often an idle worker looks for a cycle left unfinished (`Handler::idle`).
pub const IDLE_WATCH: Duration = Duration::from_secs(5);

/// What the worker runs.
pub trait Handler: Send + Sync + 'static {
    /// Once, before any request (crash recovery).
    fn startup(&self) -> impl Future<Output = ()> + Send;
    /// One restart cycle.
    fn handle(&self, request: RestartRequest) -> impl Future<Output = ()> + Send;
    /// Every `IDLE_WATCH` while no request waits: finishes a cycle left unfinished once it can (an
    /// instance out with its programs RUNNING again). Must be cheap when there is nothing to do.
    fn idle(&self) -> impl Future<Output = ()> + Send;
}

#[derive(Default)]
struct Inner {
    pending: Option<RestartRequest>,
    /// Programs of the running cycle (`None` = still running) or when it ended.
    own: BTreeMap<String, Option<Instant>>,
    shutdown: bool,
}

/// Hands requests to the worker task.
#[derive(Clone)]
pub struct WorkerHandle {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

impl WorkerHandle {
    /// Queues a request, merging it with any already waiting.
    pub fn submit(&self, request: RestartRequest) {
        let mut inner = self.inner.lock().expect("worker lock");
        match &mut inner.pending {
            Some(p) => p.merge(request),
            None => inner.pending = Some(request),
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Whether the listener itself is (or just was) restarting `program`.
    pub fn is_own(&self, program: &str) -> bool {
        let inner = self.inner.lock().expect("worker lock");
        match inner.own.get(program) {
            Some(None) => true,
            Some(Some(ended)) => ended.elapsed() < OWN_EVENT_GRACE,
            None => false,
        }
    }

    /// Asks the worker to stop after the cycle in progress; queued requests are dropped.
    pub fn shutdown(&self) {
        self.inner.lock().expect("worker lock").shutdown = true;
        self.notify.notify_one();
    }
}

/// Starts the worker task.
pub fn spawn<H: Handler>(handler: H) -> (WorkerHandle, JoinHandle<()>) {
    let handle = WorkerHandle { inner: Arc::default(), notify: Arc::new(Notify::new()) };
    let h = handle.clone();
    let join = tokio::spawn(async move {
        handler.startup().await;
        loop {
            let request = {
                let mut inner = h.inner.lock().expect("worker lock");
                if inner.shutdown {
                    if let Some(p) = inner.pending.take() {
                        warn!(programs = ?p.programs, "shutting down: dropping a queued restart request");
                    }
                    break;
                }
                inner.pending.take()
            };
            let Some(request) = request else {
                tokio::select! {
                    _ = h.notify.notified() => {}
                    _ = tokio::time::sleep(IDLE_WATCH) => handler.idle().await,
                }
                continue;
            };
            {
                let mut inner = h.inner.lock().expect("worker lock");
                inner.own.retain(|_, ended| ended.is_some_and(|e| e.elapsed() < OWN_EVENT_GRACE));
                for p in &request.programs {
                    inner.own.insert(p.clone(), None);
                }
            }
            let programs = request.programs.clone();
            info!(programs = ?programs, origins = ?request.origins, "starting restart cycle");
            handler.handle(request).await;
            let mut inner = h.inner.lock().expect("worker lock");
            let now = Instant::now();
            for p in programs {
                inner.own.insert(p, Some(now));
            }
        }
    });
    (handle, join)
}
