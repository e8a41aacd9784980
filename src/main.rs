//! Wiring: parses the command line, resolves settings, sets up logging, builds the cycle from its
//! parts, runs the subcommand and maps the outcome to the exit code:
//! 0 done (status: may leave now), 1 quorum not reached (nothing changed), 2 usage or configuration
//! error, 3 runtime failure.

use std::process::ExitCode;

use clap::Parser;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use elb_quorum::cli::{Cli, Command, LeaseCommand};
use elb_quorum::config::{ConfigError, MembersSource, Settings};
use elb_quorum::cycle::start::group_at_start;
use elb_quorum::cycle::state_file::LeaveVia;
use elb_quorum::cycle::state_file::{StateFile, StateFileError};
use elb_quorum::cycle::{chain, held_by, Cycle, CycleError, Outcome, Recovery, Timing};
use elb_quorum::identity::{self, Identity};
use elb_quorum::lb::members::{
    retry_at_start, AnyMembers, AsgMembers, Ec2NameMembers, Membership, StaticMembers, GROUP_CACHE_FILE,
};
use elb_quorum::lb::{Attachment, LoadBalancer, TargetState};
use elb_quorum::lease::dynamo::DynamoStore;
use elb_quorum::lease::{self, Permits};
use elb_quorum::listener::{self, End, Signal};
use elb_quorum::metrics::Metrics;
use elb_quorum::quorum::Reason;
use elb_quorum::secret::Secret;
use elb_quorum::supervisor::{SupervisorClient, SupervisorError, Supervisord};
use elb_quorum::trigger::{valid_program_name, Origin, RestartRequest, Triggers, REMOTE_TYPE};
use elb_quorum::worker::{self, Handler};

/// Where logs go, once set up.
static LOG_TARGET: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

const OK: u8 = 0;
const NO_QUORUM: u8 = 1;
const USAGE: u8 = 2;
const RUNTIME: u8 = 3;

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(m: impl std::fmt::Display) -> Self {
        Self { code: USAGE, message: m.to_string() }
    }
    fn runtime(m: impl std::fmt::Display) -> Self {
        Self { code: RUNTIME, message: m.to_string() }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::usage(e)
    }
}

impl From<CycleError> for Failure {
    fn from(e: CycleError) -> Self {
        if e.is_configuration() {
            Failure::usage(chain(&e))
        } else {
            Failure::runtime(chain(&e))
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { USAGE } else { OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building the tokio runtime");
    let code = runtime.block_on(run(cli)).unwrap_or_else(|f| {
        // Always on stderr (logging may not be set up yet); in the journal too when logs go there.
        if LOG_TARGET.get() == Some(&"journald") {
            error!("{}", f.message);
        }
        eprintln!("elb-quorum: {}", f.message);
        f.code
    });
    ExitCode::from(code)
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let mut layer = cli.opts.clone();
    layer.supervisor_password = std::env::var("SUPERVISOR_PASSWORD").ok().map(Secret::new);
    let settings = Settings::resolve(layer)?;
    let target =
        elb_quorum::logging::init(settings.log_format, settings.log_level.as_deref(), settings.log_target.as_deref())
            .map_err(Failure::usage)?;
    let _ = LOG_TARGET.set(target);
    match cli.command {
        Command::Listen => listen(settings).await,
        Command::Restart { programs } => restart(settings, programs).await,
        Command::Request { programs } => request(settings, programs).await,
        Command::Status { json } => status(settings, json).await,
        Command::Lease { action: LeaseCommand::Release { instance } } => lease_release(settings, instance).await,
    }
}

type ProdCycle = Cycle<Attachment, AnyMembers, Supervisord>;

async fn build(settings: &Settings, shutdown: watch::Receiver<bool>) -> Result<(ProdCycle, Identity), Failure> {
    let identity = identity::resolve(settings).await.map_err(|e| Failure::usage(chain(&e)))?;
    let cycle = build_for(settings, &identity, shutdown).await?;
    Ok((cycle, identity))
}

/// The cycle for a resolved identity: loads the AWS configuration and makes the clients.
async fn build_for(
    settings: &Settings,
    identity: &Identity,
    shutdown: watch::Receiver<bool>,
) -> Result<ProdCycle, Failure> {
    let aws = identity::aws_config().await;
    let members = match &settings.members {
        MembersSource::Static(n) => AnyMembers::Static(StaticMembers(*n)),
        MembersSource::Ec2Name => AnyMembers::Ec2Name(Ec2NameMembers::new(&aws, identity.namespace.clone())),
        MembersSource::Asg(named) => AnyMembers::Asg(
            AsgMembers::new(&aws, named.clone(), identity.instance_id.clone())
                .with_cache(settings.state_dir.join(GROUP_CACHE_FILE)),
        ),
    };
    let mut specs = identity.attachments.clone();
    let mut key = identity.cluster_key().to_owned();
    let from_group = specs.is_empty() && matches!(members, AnyMembers::Asg(_));
    let (mut view_read, mut prime) = (None, false);
    if let AnyMembers::Asg(asg) = &members {
        let failed = |e| Failure::from(CycleError::from(e));
        // Strict mode: the group as the cluster's shared view holds it, when the view lists this
        // instance (no Auto Scaling call; every check compares it with the group's attachments
        // read after the grant), or as one process looks it up for the others at a fleet's start
        // (`start::group_at_start`); else the group itself.
        let lookup = || retry_at_start("looking the Auto Scaling group up", || members.group());
        let group = match settings.strict {
            true => {
                let name = match asg.presume_name() {
                    Some(name) => name,
                    None => retry_at_start("looking the Auto Scaling group up", || asg.name()).await.map_err(failed)?,
                };
                let permits = permits(settings, &format!("asg:{name}"), &identity.instance_id, &aws);
                let start = group_at_start(&permits, &name, lookup).await.map_err(failed)?;
                view_read = start.read;
                prime = start.publish;
                start.group
            }
            false => lookup().await.map_err(failed)?,
        };
        key = format!("asg:{}", group.name);
        if specs.is_empty() {
            specs = group.attachments();
            if specs.is_empty() {
                return Err(Failure::usage(format!(
                    "Auto Scaling group {} has no load balancer or target group attached: give --lb or --target-group",
                    group.name
                )));
            }
        }
        if settings.leave_via == LeaveVia::Deregister && group.uses_elb_health() {
            warn!(group = %group.name, grace_s = group.health_check_grace_s, "Auto Scaling group {} replaces instances that fail the load balancer's health check: a restart longer than its grace period ({} s) can get this instance terminated and replaced; --leave-via standby avoids that", group.name, group.health_check_grace_s);
        }
    }
    let permits = settings.strict.then(|| permits(settings, &key, &identity.instance_id, &aws));
    let client = SupervisorClient::new(&settings.supervisor).map_err(Failure::usage)?;
    let services =
        Supervisord { client, restart_timeout: settings.restart_timeout, poll: std::time::Duration::from_millis(250) };
    let lbs = specs.iter().map(|spec| Attachment::new(&aws, spec)).collect();
    let cycle =
        Cycle::new(lbs, members, services, identity.instance_id.clone(), StateFile::new(&settings.state_dir), shutdown)
            .with_rule(settings.rule)
            .with_timing(Timing {
                check_interval: settings.check_interval,
                max_checks: settings.max_checks,
                poll_interval: settings.poll_interval,
                drain_timeout: settings.drain_timeout,
                health_timeout: settings.health_timeout,
                settle: settings.settle,
            })
            .with_dry_run(settings.dry_run)
            .with_permits(permits)
            .with_leave_via(settings.leave_via)
            .with_zone_quorum(settings.zone_quorum_ppm)
            .with_metrics(settings.metrics_file.as_ref().map(|p| std::sync::Arc::new(Metrics::open(p))))
            .with_hooks(settings.hooks.clone())
            .with_attachments_from_group(from_group)
            .with_batch_registrations(settings.lease.batch_registrations);
    let cycle = match view_read {
        Some(read) => cycle.with_view_read(read),
        None => cycle,
    };
    if prime {
        // Others may be waiting for the view this process took the lease to make.
        if let Err(e) = cycle.prime_view().await {
            warn!(error = %chain(&e), "publishing the cluster's shared view failed; the next check tries again");
        }
    }
    info!(attachments = %cycle.attachments(), leave_via = ?settings.leave_via, instance_id = %identity.instance_id, hostname = %identity.hostname, members = %cycle.members.describe(), quorum_ppm = settings.rule.quorum_ppm, dry_run = settings.dry_run, strict = settings.strict, "elb-quorum {}", env!("CARGO_PKG_VERSION"));
    Ok(cycle)
}

/// Strict mode's permits: the DynamoDB table, keyed by the cluster (its namespace, or
/// `asg:GROUP`).
fn permits(settings: &Settings, key: &str, me: &str, aws: &aws_config::SdkConfig) -> Permits {
    Permits {
        store: std::sync::Arc::new(DynamoStore::new(aws, &settings.lease.table)),
        key: key.to_owned(),
        me: me.to_owned(),
        duration: settings.lease.duration,
        grace: settings.lease.grace,
        max_hold: settings.lease.max_hold,
        skew_ms: 0,
        leave_rate: settings.lease.leave_rate,
        clock: Default::default(),
        seen_shards: Default::default(),
    }
}

/// Forwards SIGHUP, SIGTERM and SIGINT; SIGTERM/SIGINT also raise the shutdown flag.
fn signals(shutdown: watch::Sender<bool>) -> Result<mpsc::Receiver<Signal>, Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(Failure::runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(Failure::runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Failure::runtime)?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = hup.recv() => Signal::Hup,
                _ = term.recv() => Signal::Term,
                _ = int.recv() => Signal::Term,
            };
            if sig == Signal::Term {
                let _ = shutdown.send(true);
            }
            if tx.send(sig).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// The end of a cycle, with its `outcome` as a structured field (done, dry-run, aborted, gave-up,
/// no-permit, left-out, failed).
fn log_outcome(result: &Result<Outcome, CycleError>) {
    match result {
        Ok(Outcome::Done(_)) => info!(outcome = "done", "restart request done"),
        Ok(Outcome::DryRun(_)) => info!(outcome = "dry-run", "restart request done (dry run)"),
        Ok(Outcome::Aborted) => info!(outcome = "aborted", "restart request aborted at the gate"),
        Ok(Outcome::GaveUp { verdict, checks }) => {
            warn!(
                outcome = "gave-up",
                checks,
                "restart request given up: quorum not reached after {checks} checks ({}); nothing changed",
                verdict.summary()
            )
        }
        Ok(Outcome::NoPermit { holders, permits, checks }) => {
            warn!(
                outcome = "no-permit",
                checks,
                permits,
                "restart request given up: no free permit after {checks} checks ({}); nothing changed",
                held_by(holders)
            )
        }
        Err(e) if e.left_out() => error!(outcome = "left-out", "{}", chain(e)),
        Err(e) => error!(outcome = "failed", "restart cycle failed: {}; the instance is registered", chain(e)),
    }
}

/// The listener's worker. The AWS configuration and clients are made on first use (a request, or a
/// state file to reconcile): an idle listener does not carry them.
struct ListenHandler {
    settings: Settings,
    identity: Identity,
    shutdown: watch::Receiver<bool>,
    state: StateFile,
    /// Built at the first need, kept; built again when the Auto Scaling group's attachments it was
    /// built on have changed.
    cycle: std::sync::Mutex<Option<std::sync::Arc<ProdCycle>>>,
    /// After a failed attempt to finish an unfinished cycle, the idle watch tries again from then.
    retry_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long the idle watch waits after failing to finish an unfinished cycle (AWS refusing the
/// registration, a ready check failing) before it tries again.
const RECOVER_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

impl Handler for ListenHandler {
    async fn startup(&self) {
        let _lock = match self.lock().await {
            Some(l) => l,
            None => return,
        };
        // Nothing to finish: stay light (no AWS clients) unless strict mode may have left an entry.
        if matches!(self.state.load(), Ok(None)) && !self.settings.strict {
            return;
        }
        let Some(cycle) = self.cycle().await else { return };
        if let Err(e) = cycle.reconcile().await {
            error!("reconciling the state file failed: {}", chain(&e));
        }
    }

    async fn handle(&self, request: RestartRequest) {
        // Fault injection for the tests, in debug builds only: a cycle that panics.
        #[cfg(debug_assertions)]
        if std::env::var_os("ELB_QUORUM_TEST_PANIC_IN_CYCLE").is_some() {
            panic!("injected by ELB_QUORUM_TEST_PANIC_IN_CYCLE");
        }
        let Some(_lock) = self.lock().await else { return };
        let Some(cycle) = self.cycle().await else { return };
        let mut result = cycle.run(&request).await;
        if let Err(e @ CycleError::GroupChanged { .. }) = &result {
            // Nothing changed: read the group again and ask once more.
            warn!("{e}; building the cycle again");
            *self.cycle.lock().expect("cycle lock") = None;
            let Some(cycle) = self.cycle().await else { return };
            result = cycle.run(&request).await;
        }
        log_outcome(&result);
    }

    async fn idle(&self) {
        // Nothing unfinished: one stat, no supervisord or AWS call.
        if !self.state.path().exists() {
            return;
        }
        if self.retry_at.lock().expect("retry lock").is_some_and(|t| std::time::Instant::now() < t) {
            return;
        }
        // A one-shot `restart` is running its cycle: it finishes its own.
        let Ok(_lock) = self.state.try_lock() else { return };
        let Some(cycle) = self.cycle().await else {
            // Logged by `cycle()`; not again every 5 s.
            *self.retry_at.lock().expect("retry lock") = Some(std::time::Instant::now() + RECOVER_RETRY);
            return;
        };
        let next = match cycle.recover().await {
            Ok(Recovery::Back) => {
                info!(outcome = "recovered", "the unfinished cycle is finished: back in service");
                None
            }
            Ok(Recovery::Nothing | Recovery::StillDown) => None,
            Err(e) => {
                error!(
                    outcome = "left-out",
                    "finishing the unfinished cycle failed: {}; trying again in {} s",
                    chain(&e),
                    RECOVER_RETRY.as_secs()
                );
                Some(std::time::Instant::now() + RECOVER_RETRY)
            }
        };
        *self.retry_at.lock().expect("retry lock") = next;
    }
}

impl ListenHandler {
    async fn cycle(&self) -> Option<std::sync::Arc<ProdCycle>> {
        if let Some(c) = self.cycle.lock().expect("cycle lock").clone() {
            return Some(c);
        }
        // Only the worker calls the handler, one call at a time: no second build can race this one.
        match build_for(&self.settings, &self.identity, self.shutdown.clone()).await {
            Ok(c) => {
                let c = std::sync::Arc::new(c);
                *self.cycle.lock().expect("cycle lock") = Some(c.clone());
                Some(c)
            }
            Err(f) => {
                error!("{}", f.message);
                None
            }
        }
    }

    /// Waits for the lock a one-shot `restart` may hold.
    async fn lock(&self) -> Option<elb_quorum::cycle::state_file::LockGuard> {
        let mut said = false;
        loop {
            match self.state.try_lock() {
                Ok(g) => return Some(g),
                Err(StateFileError::Locked { holder, .. }) => {
                    if !said {
                        warn!(holder = %holder, "another elb-quorum cycle holds the lock; waiting");
                        said = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => {
                    error!("cannot take the lock: {}; request dropped", chain(&e));
                    return None;
                }
            }
        }
    }
}

/// Until the protocol loop ends (EOF, fatal input, I/O error) or SIGTERM/SIGINT; SIGHUP asks for
/// a restart of every `--program`.
async fn wait_for_end(
    mut end: tokio::sync::oneshot::Receiver<End>,
    mut signals: mpsc::Receiver<Signal>,
    worker: &worker::WorkerHandle,
    join: &mut tokio::task::JoinHandle<()>,
    hup_programs: &[String],
) -> End {
    loop {
        tokio::select! {
            e = &mut end => return e.unwrap_or(End::Eof),
            // The worker only ends on request: anything else is a panic (or a bug).
            r = &mut *join => return End::WorkerDied(match r {
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let text = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    format!("it panicked: {text}")
                }
                Err(e) => format!("it was cancelled: {e}"),
                Ok(()) => "it returned".into(),
            }),
            Some(sig) = signals.recv() => match sig {
                Signal::Hup => listener::on_hup(worker, hup_programs),
                Signal::Term => {
                    info!("SIGTERM/SIGINT: stopping after the cycle in progress");
                    return End::Signal;
                }
            },
        }
    }
}

async fn listen(settings: Settings) -> Result<u8, Failure> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signals = signals(shutdown_tx.clone())?;
    // Configuration errors (the hostname rule, a missing instance id) stop the listener at once.
    let identity = identity::resolve(&settings).await.map_err(|e| Failure::usage(chain(&e)))?;
    SupervisorClient::new(&settings.supervisor).map_err(Failure::usage)?;
    info!(attachments = %identity.attachment_list(), instance_id = %identity.instance_id, hostname = %identity.hostname, "elb-quorum {} listening", env!("CARGO_PKG_VERSION"));
    let triggers = Triggers { gated: settings.gates.iter().cloned().collect() };
    let handler = ListenHandler {
        state: StateFile::new(&settings.state_dir),
        settings: settings.clone(),
        identity,
        shutdown: shutdown_rx,
        cycle: std::sync::Mutex::new(None),
        retry_at: std::sync::Mutex::new(None),
    };
    let (worker, mut join) = worker::spawn(handler);
    // The protocol loop runs on its own thread with blocking I/O; this runtime keeps the worker and
    // the signals. A thread blocked reading stdin does not hold the process: returning from main
    // ends it.
    let (input, output) = listener::stdio().map_err(|e| Failure::runtime(format!("stdin/stdout: {e}")))?;
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let protocol_worker = worker.clone();
    std::thread::Builder::new()
        .name("protocol".into())
        .spawn(move || {
            let _ = end_tx.send(listener::run(input, output, &triggers, &protocol_worker));
        })
        .map_err(|e| Failure::runtime(format!("starting the protocol thread: {e}")))?;
    let end = wait_for_end(end_rx, signals, &worker, &mut join, &settings.programs).await;
    if let End::WorkerDied(why) = end {
        // supervisord restarts the listener; its start finishes a half-done cycle from the state file.
        return Err(Failure::runtime(format!(
            "the restart worker stopped ({why}); exiting so that supervisord restarts the listener and the state file finishes any cycle in progress"
        )));
    }
    // At the gate: give up; past it: the cycle finishes coming back before we exit.
    let _ = shutdown_tx.send(true);
    worker.shutdown();
    let _ = join.await;
    Ok(match end {
        End::Eof | End::Signal => OK,
        End::Fatal(_) => USAGE,
        End::Io(e) => return Err(Failure::runtime(format!("listener I/O failed: {e}"))),
        End::WorkerDied(_) => unreachable!("returned above"),
    })
}

async fn restart(settings: Settings, programs: Vec<String>) -> Result<u8, Failure> {
    for p in &programs {
        valid_program_name(p).map_err(Failure::usage)?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let _signals = signals(shutdown_tx)?;
    let (cycle, _identity) = build(&settings, shutdown_rx.clone()).await?;
    let _lock = cycle.state.try_lock().map_err(|e| Failure::runtime(chain(&e)))?;
    match cycle.reconcile().await {
        // The instance is out with its programs down: this restart is what brings it back.
        Err(e @ CycleError::ServicesDown { .. }) => warn!("{}; restarting them now", chain(&e)),
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    let request = RestartRequest::new(programs, Origin::Cli);
    let mut result = cycle.run(&request).await;
    if let Err(e @ CycleError::GroupChanged { .. }) = &result {
        // Nothing changed: read the group again and ask once more (the state file's lock is held).
        warn!("{e}; building the cycle again");
        result = build(&settings, shutdown_rx).await?.0.run(&request).await;
    }
    log_outcome(&result);
    match result? {
        Outcome::Done(s) => {
            info!("done in {:.1} s", s.total.as_secs_f64());
            Ok(OK)
        }
        Outcome::DryRun(v) => {
            info!("dry run: may leave ({}); nothing changed", v.summary());
            Ok(OK)
        }
        Outcome::GaveUp { verdict, checks } => {
            eprintln!("elb-quorum: quorum not reached after {checks} checks ({}); nothing changed", verdict.summary());
            Ok(NO_QUORUM)
        }
        Outcome::NoPermit { holders, checks, .. } => {
            eprintln!("elb-quorum: no free permit after {checks} checks ({}); nothing changed", held_by(&holders));
            Ok(NO_QUORUM)
        }
        Outcome::Aborted => {
            eprintln!("elb-quorum: interrupted while waiting for quorum; nothing changed");
            Ok(NO_QUORUM)
        }
    }
}

async fn request(settings: Settings, programs: Vec<String>) -> Result<u8, Failure> {
    for p in &programs {
        valid_program_name(p).map_err(Failure::usage)?;
    }
    let client = SupervisorClient::new(&settings.supervisor).map_err(Failure::usage)?;
    match client.resolve(&programs).await {
        Ok(_) => {}
        Err(e @ SupervisorError::UnknownProgram { .. }) => return Err(Failure::usage(e)),
        Err(e) => return Err(Failure::runtime(chain(&e))),
    }
    let data = format!("restart {}", programs.join(" "));
    client.send_remote_comm_event(REMOTE_TYPE, &data).await.map_err(|e| Failure::runtime(chain(&e)))?;
    info!(url = client.url(), "sent {data:?}; the elb-quorum listener will run the restart cycle (see its log)");
    Ok(OK)
}

/// What `status` reads of the permit record in strict mode.
struct StrictView<'a> {
    permits: &'a Permits,
    record: lease::Record,
    now: u64,
    /// Slots not held by another live holder.
    free: usize,
    /// The shared view's item, when there is one and it could be read.
    view: Option<lease::Shared>,
}

async fn status(settings: Settings, json: bool) -> Result<u8, Failure> {
    let (_tx, rx) = watch::channel(false);
    let (cycle, identity) = build(&settings, rx).await?;
    cycle.resolve().await?;
    let obs = cycle.observe().await?;
    let permits = settings.rule.permits(obs.roster.members.len());
    // Strict mode: every live holder but this instance counts as out; a slot must be free.
    let strict = match &cycle.permits {
        None => None,
        Some(p) => {
            let record = p.read().await.map_err(|e| Failure::from(CycleError::from(e)))?;
            let now = p.now();
            let free = permits.saturating_sub(record.other_slots(&p.me, now, p.grace).len());
            let view = p.shared().await.ok().flatten().filter(|s| s.n > 0);
            Some(StrictView { permits: p, record, now, free, view })
        }
    };
    let others = match &strict {
        Some(v) => lease::others(&v.record, &v.permits.me, v.now, v.permits.grace),
        None => Default::default(),
    };
    let mut decision = cycle.decide(&obs, false, &others);
    if strict.as_ref().is_some_and(|v| v.free == 0) {
        decision.overall.may_leave &= decision.overall.reason != Reason::QuorumHolds;
    }
    // A target group that does not list this instance, or a target that can never serve: leaving
    // is refused whatever the numbers say.
    // In Standby already (someone put it there): it serves nothing; a restart happens in place.
    let in_standby = obs.roster.in_standby(&identity.instance_id);
    let refusal = if in_standby { None } else { cycle.plan(&obs).err() };
    let may_leave = in_standby || (decision.may_leave() && refusal.is_none());
    let mine = |i: usize| -> Vec<&elb_quorum::lb::TargetHealth> {
        obs.listed[i]
            .iter()
            .filter(|h| h.target.instance_id == identity.instance_id && h.state != TargetState::NotRegistered)
            .collect()
    };
    if json {
        let attachments: Vec<_> = cycle
            .lbs
            .iter()
            .enumerate()
            .map(|(i, lb)| {
                serde_json::json!({
                    "kind": lb.spec().kind,
                    "name": lb.spec().name,
                    "id": lb.id(),
                    "verdict": decision.per_attachment[i],
                    "self_targets": mine(i),
                })
            })
            .collect();
        let mut out = serde_json::json!({
            "attachments": attachments,
            "attachments_source": attachments_source(&settings, &identity, &cycle),
            "zone": zone_view(&obs.roster, &identity.instance_id),
            "lifecycle": obs.roster.lifecycle.get(&identity.instance_id),
            "instance_id": identity.instance_id,
            "hostname": identity.hostname,
            "namespace": identity.namespace,
            "members_source": cycle.members.describe(),
            "quorum": settings.rule.quorum_ppm as f64 / 1e6,
            "max_out_at_once": permits,
            "verdict": decision.overall,
            "may_leave": may_leave,
            "refusal": refusal.as_ref().map(|e| chain(e)),
        });
        if let Some(StrictView { permits: p, record, now, free, view }) = &strict {
            let holders: Vec<_> = record
                .holders
                .iter()
                .map(|(id, h)| {
                    serde_json::json!({
                        "instance_id": id,
                        "kind": h.kind,
                        "shard": record.shard(id),
                        "since_ms": h.since,
                        "exp_ms": h.exp,
                        "expired": h.exp < *now,
                        "counted": h.counts(*now, p.grace),
                    })
                })
                .collect();
            out["strict"] = serde_json::json!({
                "table": settings.lease.table,
                "key": p.key,
                "ver": record.ver,
                "shards": record.shards.max(1),
                "versions": record.vers,
                "permits": permits,
                "free": free,
                "holders": holders,
                "pace": pace_json(p, record, *now),
                "batches": batches_json(&settings, record, *now, p.grace),
                "view": view.as_ref().map(|v| serde_json::json!({
                    "age_s": now.saturating_sub(v.at) as f64 / 1000.0,
                    "publications": v.n,
                    "read_after_version": v.seen_ver,
                    "read_after_versions": v.seen,
                })),
            });
        }
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        let v = &decision.overall;
        println!("instance          {} ({})", identity.instance_id, identity.hostname);
        println!("members source    {}", cycle.members.describe());
        println!("attachments from  {}", attachments_source(&settings, &identity, &cycle));
        if let Some(state) = obs.roster.lifecycle.get(&identity.instance_id) {
            println!("lifecycle         {state} (Auto Scaling)");
        }
        if let Some(z) = zone_view(&obs.roster, &identity.instance_id) {
            let rule = match settings.zone_quorum_ppm {
                Some(ppm) => format!("--zone-quorum {}", ppm as f64 / 1e6),
                None => "no zone rule (--zone-quorum)".into(),
            };
            println!("zone              {} ({} members; {rule})", z["name"].as_str().unwrap_or_default(), z["members"]);
        }
        println!("members           {}", v.members);
        println!(
            "required          {} (quorum {}, min in service {})",
            v.required,
            settings.rule.quorum_ppm as f64 / 1e6,
            settings.rule.min_in_service
        );
        for (i, lb) in cycle.lbs.iter().enumerate() {
            let a = &decision.per_attachment[i];
            let id = lb.id();
            let arn = if id != lb.spec().name { format!(" ({id})") } else { String::new() };
            println!("{:<17} {}{arn}", lb.spec().kind.noun(), lb.spec().name);
            println!(
                "  serving         {} now, {} after leaving, {} required: {} ({:?})",
                a.serving,
                a.serving_after,
                a.required,
                if a.may_leave { "may leave" } else { "may not leave" },
                a.reason
            );
            if let Some(z) = &a.zone {
                println!(
                    "  zone            {z}: {} members, {} after leaving, {} required",
                    a.zone_members, a.zone_serving_after, a.zone_required
                );
            }
            let me: Vec<String> = mine(i).iter().map(|h| format!("{} {}", h.target, h.raw)).collect();
            println!("  this instance   {}", if me.is_empty() { "not registered".into() } else { me.join("; ") });
        }
        println!("max out at once   {permits}");
        if let Some(StrictView { permits: p, record, now, free, view }) = &strict {
            println!("permits           {free} free of {permits} (table {}, key {})", settings.lease.table, p.key);
            let pace = pace_json(p, record, *now);
            match pace["quota"].as_u64() {
                Some(q) => println!(
                    "pace              {}/s in {} s windows, at most {} at once: {q} in this window, {} granted",
                    p.leave_rate,
                    lease::PACE_WINDOW.as_secs(),
                    pace["burst"],
                    pace["grants_in_window"]
                ),
                None => println!("pace              none (--leave-rate 0)"),
            }
            let b = &record.batches;
            if settings.lease.batch_registrations || !b.want_out.is_empty() || !b.want_in.is_empty() {
                println!(
                    "batches           {} ({} targets asking out, {} back{})",
                    if settings.lease.batch_registrations { "on" } else { "off here" },
                    b.want_out.len(),
                    b.want_in.len(),
                    match &b.claim {
                        Some(c) if c.live(*now, p.grace) => format!("; a claim for {} instances", c.ids.len()),
                        _ => String::new(),
                    }
                );
            }
            if let Some(v) = view {
                println!(
                    "shared view       read {:.1} s ago (publication {})",
                    now.saturating_sub(v.at) as f64 / 1000.0,
                    v.n
                );
            }
            for (id, h) in &record.holders {
                let left = (h.exp as i64 - *now as i64) / 1000;
                println!("  holder          {id} {} (expires in {left} s)", h.kind.as_str());
            }
        }
        match &refusal {
            _ if in_standby => {
                println!("may leave now     yes (in Standby: a restart happens in place, and it stays in Standby)")
            }
            Some(e) => println!("may leave now     no: {}", chain(e)),
            None if cycle.lbs.len() > 1 => println!(
                "may leave now     {} ({:?}, {})",
                if may_leave { "yes" } else { "no" },
                v.reason,
                v.attachment
            ),
            None => println!("may leave now     {} ({:?})", if may_leave { "yes" } else { "no" }, v.reason),
        }
    }
    match refusal {
        Some(e) => Err(e.into()),
        None => Ok(if may_leave { OK } else { NO_QUORUM }),
    }
}

/// Strict mode's pace (`--leave-rate`): the rate, the burst, the current window's quota (or the
/// quota a window begun now would have, once it is over) and the permits granted in it (0 once it
/// is over).
fn pace_json(p: &Permits, record: &lease::Record, now: u64) -> serde_json::Value {
    let (rate, current) = (p.leave_rate, record.in_window(now));
    let quota = if current { record.quota(rate) } else { record.next_quota(rate, now) };
    serde_json::json!({
        "leave_rate": rate,
        "window_s": lease::PACE_WINDOW.as_secs(),
        "burst": (rate > 0.0).then(|| lease::pace_burst(rate)),
        "quota": (rate > 0.0).then_some(quota),
        "grants_in_window": if current { record.window_grants } else { 0 },
    })
}

/// `--batch-registrations`: this instance's setting, the targets asking to go out and back, and
/// the batch claim (live: a batcher may still call for the instances it names).
fn batches_json(
    settings: &Settings,
    record: &lease::Record,
    now: u64,
    grace: std::time::Duration,
) -> serde_json::Value {
    let b = &record.batches;
    serde_json::json!({
        "enabled": settings.lease.batch_registrations,
        "want_out": b.want_out.len(),
        "want_in": b.want_in.len(),
        "claim": b.claim.as_ref().map(|c| serde_json::json!({
            "instances": c.ids,
            "ends_in_s": (c.until as i64 - now as i64) as f64 / 1000.0,
            "live": c.live(now, grace),
        })),
        "withdrawals": b.withdrawals,
    })
}

/// This instance's zone and how many members share it, when the membership source knows zones.
fn zone_view(roster: &elb_quorum::lb::members::Roster, me: &str) -> Option<serde_json::Value> {
    let (zone, members) = roster.zone_of(me)?;
    Some(serde_json::json!({ "name": zone, "members": members.len() }))
}

/// Where the attachments came from, for `status`.
fn attachments_source(settings: &Settings, identity: &Identity, cycle: &ProdCycle) -> String {
    if identity.attachments.is_empty() {
        format!("Auto Scaling group {}", cycle.members.group_name().unwrap_or_default())
    } else if settings.lbs.is_empty() && settings.target_groups.is_empty() {
        "the hostname rule".into()
    } else {
        "--lb / --target-group".into()
    }
}

/// `lease release --instance ID`: removes a stuck entry, if its token is still the one read.
async fn lease_release(settings: Settings, instance: String) -> Result<u8, Failure> {
    let identity = identity::resolve(&settings).await.map_err(|e| Failure::usage(chain(&e)))?;
    let aws = identity::aws_config().await;
    let key = match &settings.members {
        MembersSource::Asg(named) => {
            // A named group is the key as named (no lookup: `lease release` may run off the group).
            let asg = AsgMembers::new(&aws, named.clone(), identity.instance_id.clone());
            let name = match asg.presume_name() {
                Some(name) => name,
                None => asg.name().await.map_err(|e| Failure::from(CycleError::from(e)))?,
            };
            format!("asg:{name}")
        }
        _ => identity.cluster_key().to_owned(),
    };
    let p = permits(&settings, &key, &identity.instance_id, &aws);
    let runtime = |e: lease::LeaseError| Failure::runtime(e);
    let record = p.read().await.map_err(runtime)?;
    let Some(h) = record.holders.get(&instance) else {
        println!("no permit entry for {instance} (table {}, key {}); nothing to remove", settings.lease.table, p.key);
        return Ok(OK);
    };
    if p.remove(record.shard(&instance), &instance, &h.tok, h.kind).await.map_err(runtime)? {
        warn!(instance_id = %instance, key = %p.key, "permit entry removed by hand");
        println!(
            "removed the {} entry of {instance} (taken at {} ms, expiring at {} ms)",
            h.kind.as_str(),
            h.since,
            h.exp
        );
        Ok(OK)
    } else {
        Err(Failure::runtime(format!(
            "the entry of {instance} changed since it was read (released, or taken again); nothing removed"
        )))
    }
}
