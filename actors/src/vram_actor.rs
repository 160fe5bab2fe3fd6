//! `VramActor`: owns the manager's books (the ledger and what goes with
//! it), runs one job at a time from a FIFO, and supervises one
//! `BackendActor` per kind.
//!
//! The decisions are in the job machines (`job/`): the actor feeds the
//! running job events and executes the commands it answers — a backend
//! call is a message whose answer comes back to the actor directly (no
//! trip through its own mailbox), a card read that is ready at once is fed
//! back at once, a wait is a timer. Between two events the actor is free,
//! so Status, Release and Acquire of a resident model that no queued job
//! touches are answered at once, even while a long load runs. Requests for
//! the model of a queued or running load join that load.
//!
//! The handlers of the public messages are in `handlers.rs`.
//!
//! Start: `started()` starts one supervised `BackendActor` per backend, on
//! this actor's arbiter, each told to report its restarts here.
//!
//! Backend restart: a `BackendRestarted` report queues a reconcile job at
//! the front of the queue (unless a crash job of that kind is running,
//! which reconciles itself): the ledger is made equal to what the restarted
//! backend reports as loaded, and `backend_restarted` published. A backend
//! actor found dead (a panic escaped its guards) is replaced the same way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::FutureExt;
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::backend_actor::{BackendActor, Crash, ListLoaded, LoadModel, UnloadModel};
use crate::config::ManagerConfig;
use crate::error::VramError;
use crate::events::{Loaded, Unloaded, VramEvent};
use crate::job::{Books, Command, Event, Job as _, LoadJob, ReleaseWait, RestartJob, UnloadJob};
use crate::ledger::Ledger;
use crate::messages::{Lease, Release};
use crate::policy::expired;
use crate::probe::{GpuMemory, GpuProbe, ProbeError};

/// Called with the ledger after every job; see [`VramActor::observe_jobs`].
pub type JobObserver = Box<dyn FnMut(&Ledger)>;

/// The time as the manager's jobs see it (paused with tokio's clock in
/// tests).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Someone waiting for a load: a `Load` or an `Acquire` that needs one.
pub(crate) enum LoadWaiter {
    Load(oneshot::Sender<Result<Loaded, VramError>>),
    Acquire(oneshot::Sender<Result<Lease, VramError>>),
}

/// A queued or running job with everyone waiting for it, typed by kind.
pub(crate) enum Queued {
    Load(LoadJob, Vec<LoadWaiter>),
    Unload(UnloadJob, Vec<oneshot::Sender<Result<Unloaded, VramError>>>),
    Restart(RestartJob, Vec<oneshot::Sender<Result<(), VramError>>>),
}

impl Queued {
    /// The model this job is about, if any.
    pub(crate) fn model(&self) -> Option<&str> {
        match self {
            Queued::Load(job, _) => Some(job.model()),
            Queued::Unload(job, _) => Some(job.model()),
            Queued::Restart(..) => None,
        }
    }

    /// Whether this job could change whether `model` (of `kind`) is
    /// resident: a load or unload of it, or a restart of its backend.
    fn touches(&self, model: &str, kind: Option<&str>) -> bool {
        match self {
            Queued::Load(job, _) => job.model() == model,
            Queued::Unload(job, _) => !job.is_expiry() && job.model() == model,
            Queued::Restart(job, _) => Some(job.kind()) == kind,
        }
    }

    fn handle(&mut self, event: Event, books: &mut Books, now: Instant, out: &mut Vec<Command>) {
        match self {
            Queued::Load(job, _) => job.handle(event, books, now, out),
            Queued::Unload(job, _) => job.handle(event, books, now, out),
            Queued::Restart(job, _) => job.handle(event, books, now, out),
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Queued::Load(job, _) => job.is_done(),
            Queued::Unload(job, _) => job.is_done(),
            Queued::Restart(job, _) => job.is_done(),
        }
    }

    /// Answers everyone waiting `error`.
    pub(crate) fn refuse(self, error: VramError) {
        match self {
            Queued::Load(_, waiters) => {
                for waiter in waiters {
                    match waiter {
                        LoadWaiter::Load(tx) => drop(tx.send(Err(error.clone()))),
                        LoadWaiter::Acquire(tx) => drop(tx.send(Err(error.clone()))),
                    }
                }
            }
            Queued::Unload(_, waiters) => waiters
                .into_iter()
                .for_each(|tx| drop(tx.send(Err(error.clone())))),
            Queued::Restart(_, waiters) => waiters
                .into_iter()
                .for_each(|tx| drop(tx.send(Err(error.clone())))),
        }
    }

    fn span(&self) -> tracing::Span {
        match self {
            Queued::Load(job, _) => tracing::info_span!("load", model = %job.model()),
            Queued::Unload(job, _) if job.is_expiry() => {
                tracing::info_span!("expire", model = %job.model())
            }
            Queued::Unload(job, _) => tracing::info_span!("unload", model = %job.model()),
            Queued::Restart(job, _) if job.crashes() => {
                tracing::info_span!("crash", kind = %job.kind())
            }
            Queued::Restart(job, _) => tracing::info_span!("reconcile", kind = %job.kind()),
        }
    }
}

/// What a manager that is shutting down answers.
pub(crate) fn shutting_down() -> VramError {
    VramError::Unavailable {
        reason: "the manager is shutting down".to_string(),
    }
}

/// The running job and the bookkeeping of its commands.
struct Running {
    job: Queued,
    /// Its number: answers to an earlier job's commands are dropped.
    id: u64,
    span: tracing::Span,
}

/// The supervising actor that owns the books; see the module docs.
pub struct VramActor {
    pub(crate) config: ManagerConfig,
    pub(crate) books: Books,
    pub(crate) backends: BTreeMap<String, Rc<dyn Backend>>,
    pub(crate) actors: HashMap<String, Addr<BackendActor>>,
    pub(crate) queue: VecDeque<Queued>,
    running: Option<Running>,
    /// Numbers the jobs.
    runs: u64,
    /// Numbers the waits: a timer of an older wait is dropped.
    wait_token: u64,
    /// Whether the running job waits for a lease release.
    waits_release: bool,
    pub(crate) next_lease: u64,
    pub(crate) subscribers: Vec<Recipient<VramEvent>>,
    /// Where leases send their release.
    me: Option<Recipient<Release>>,
    /// Called with the ledger after every job (tests check invariants).
    observer: Option<JobObserver>,
    /// The card, when it can be asked.
    pub(crate) probe: Option<Rc<dyn GpuProbe>>,
    /// Set by `Shutdown`: no more work is taken or started.
    pub(crate) shutting_down: bool,
}

impl VramActor {
    /// A manager over `backends`, one per kind name.
    pub fn new(config: ManagerConfig, backends: BTreeMap<String, Rc<dyn Backend>>) -> Self {
        let books = Books {
            ledger: Ledger::new(config.capacity),
            kinds: config.kinds.clone(),
            declared: config.catalog.clone(),
            planned: config.catalog.clone(),
            leases: HashMap::new(),
            last_used: HashMap::new(),
            ttl: config.ttl.clone(),
            reserve: config.reserve,
            lease_wait: config.lease_wait,
            release: ReleaseWait {
                fraction: config.release_fraction,
                poll: config.release_poll,
                timeout: config.release_timeout,
            },
        };
        Self {
            books,
            config,
            backends,
            actors: HashMap::new(),
            queue: VecDeque::new(),
            running: None,
            runs: 0,
            wait_token: 0,
            waits_release: false,
            next_lease: 0,
            subscribers: Vec::new(),
            me: None,
            observer: None,
            probe: None,
            shutting_down: false,
        }
    }

    /// Sends `event` to every live subscriber.
    pub(crate) fn publish(&mut self, event: VramEvent) {
        self.subscribers.retain(|s| s.connected());
        for subscriber in &self.subscribers {
            subscriber.do_send(event.clone());
        }
    }

    /// Whether the running job or a queued one could change whether
    /// `model` is resident.
    pub(crate) fn touches(&self, model: &str) -> bool {
        let kind = self.books.ledger.get(model).map(|e| e.kind.as_str());
        self.running
            .iter()
            .map(|r| &r.job)
            .chain(&self.queue)
            .any(|j| j.touches(model, kind))
    }

    /// Whether any job runs or waits.
    pub(crate) fn is_busy(&self) -> bool {
        self.running.is_some() || !self.queue.is_empty()
    }

    /// Whether a job runs now.
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether the running job is a crash of `kind`'s backend (which
    /// reconciles by itself).
    pub(crate) fn crashing(&self, kind: &str) -> bool {
        self.running.as_ref().is_some_and(
            |r| matches!(&r.job, Queued::Restart(job, _) if job.crashes() && job.kind() == kind),
        )
    }

    /// Joins the load of `model` a new request can join (the last job
    /// about the model, if it is a load), or gives the waiter back.
    fn join_load(&mut self, model: &str, waiter: LoadWaiter) -> Option<LoadWaiter> {
        let last = self
            .queue
            .iter_mut()
            .rev()
            .find(|j| j.model() == Some(model));
        let target = match last {
            Some(job) => Some(job),
            None => self.running.as_mut().map(|r| &mut r.job),
        };
        match target {
            Some(Queued::Load(job, waiters)) if job.model() == model => {
                waiters.push(waiter);
                None
            }
            _ => Some(waiter),
        }
    }

    /// Queues a load of `model` for `waiter` (or joins an equal load).
    pub(crate) fn submit_load(
        &mut self,
        model: &str,
        waiter: LoadWaiter,
        ctx: &mut Context<Self>,
    ) -> Result<(), VramError> {
        let Some(waiter) = self.join_load(model, waiter) else {
            return Ok(());
        };
        self.submit(Queued::Load(LoadJob::new(model), vec![waiter]), ctx)
    }

    /// Queues `job`, then starts the next job.
    pub(crate) fn submit(&mut self, job: Queued, ctx: &mut Context<Self>) -> Result<(), VramError> {
        if self.queue.len() >= self.config.max_queue {
            return Err(VramError::Busy {
                queued: self.queue.len(),
            });
        }
        self.queue.push_back(job);
        self.start_next(ctx);
        Ok(())
    }

    /// Runs the next job if none is running (after `Shutdown`, answers
    /// every queued job `unavailable` instead).
    pub(crate) fn start_next(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            self.refuse_queued();
            return;
        }
        if self.running.is_some() {
            return;
        }
        let Some(job) = self.queue.pop_front() else {
            return;
        };
        self.runs += 1;
        let id = self.runs;
        let span = job.span();
        self.running = Some(Running { job, id, span });
        self.feed(id, Event::Start, ctx);
    }

    /// Empties the queue, answering everyone waiting `unavailable`.
    pub(crate) fn refuse_queued(&mut self) {
        for job in std::mem::take(&mut self.queue) {
            job.refuse(shutting_down());
        }
    }

    /// Feeds `event` to job number `id` if it is still the running one,
    /// carries out what it answers, and finishes it when it is done.
    pub(crate) fn feed(&mut self, id: u64, event: Event, ctx: &mut Context<Self>) {
        let mut next = VecDeque::from([event]);
        let mut out = Vec::new();
        while let Some(event) = next.pop_front() {
            let Some(running) = self.running.as_mut().filter(|r| r.id == id) else {
                return;
            };
            let span = running.span.clone();
            let _entered = span.enter();
            running.job.handle(event, &mut self.books, now(), &mut out);
            let done = running.job.is_done();
            for command in out.drain(..) {
                // A command answered at once (a ready card read) feeds
                // its answer next, without a trip through the context.
                if let Some(answer) = self.execute(id, command, ctx) {
                    next.push_back(answer);
                }
            }
            if done {
                self.finish(ctx);
                return;
            }
        }
    }

    /// Carries out one command of job `id`; answers its event when it is
    /// known at once.
    fn execute(&mut self, id: u64, command: Command, ctx: &mut Context<Self>) -> Option<Event> {
        match command {
            Command::Publish(event) => {
                self.publish(event);
                None
            }
            Command::ReadCard => {
                let Some(probe) = self.probe.clone() else {
                    return Some(Event::Card(None));
                };
                let mut read = probe.memory();
                // A simulated card answers at once: no trip through the
                // actor's context.
                if let Some(result) = (&mut read).now_or_never() {
                    return Some(Event::Card(card(result)));
                }
                ctx.spawn(
                    read.into_actor(self)
                        .map(move |result, act, ctx| act.feed(id, Event::Card(card(result)), ctx)),
                );
                None
            }
            Command::Unload { model, kind } => {
                let label = model.clone();
                self.call(
                    id,
                    &kind,
                    UnloadModel(model.clone()),
                    label,
                    ctx,
                    move |result| Event::Unloaded { model, result },
                )
            }
            Command::Load(spec) => {
                let (kind, label) = (spec.kind.clone(), spec.id.clone());
                self.call(id, &kind, LoadModel(spec), label, ctx, Event::Loaded)
            }
            Command::Crash { kind } => {
                let label = format!("<{kind} backend>");
                let Some(backend) = self.actors.get(&kind).cloned() else {
                    return Some(Event::Crashed(Err(no_backend(&kind, &label))));
                };
                ctx.spawn(backend.send(Crash::default()).into_actor(self).map(
                    move |answer, act, ctx| {
                        let result = answer.map_err(|e| VramError::BackendFailed {
                            model: label,
                            reason: format!("backend actor unavailable: {e}"),
                        });
                        act.feed(id, Event::Crashed(result), ctx)
                    },
                ));
                None
            }
            Command::List { kind } => {
                let label = format!("<{kind} backend>");
                self.call(id, &kind.clone(), ListLoaded, label, ctx, Event::Listed)
            }
            Command::WaitRelease { until } => {
                self.waits_release = true;
                self.wait(id, until, ctx);
                None
            }
            Command::Wait { until } => {
                self.wait(id, until, ctx);
                None
            }
            Command::Reconcile { kind } => {
                self.queue
                    .push_front(Queued::Restart(RestartJob::reconcile(kind), vec![]));
                None
            }
        }
    }

    /// Sends `msg` to the backend actor of `kind` and feeds the answer
    /// back to job `id` (a dead actor is replaced; the call fails).
    fn call<M, T>(
        &mut self,
        id: u64,
        kind: &str,
        msg: M,
        label: String,
        ctx: &mut Context<Self>,
        event: impl FnOnce(Result<T, VramError>) -> Event + 'static,
    ) -> Option<Event>
    where
        M: Message<Result = Result<T, VramError>> + Send + 'static,
        T: Send + 'static,
        BackendActor: Handler<M>,
    {
        let Some(backend) = self.actors.get(kind).cloned() else {
            return Some(event(Err(no_backend(kind, &label))));
        };
        let kind = kind.to_string();
        ctx.spawn(
            backend
                .send(msg)
                .into_actor(self)
                .map(move |answer, act, ctx| {
                    let result = match answer {
                        Ok(result) => result,
                        Err(e) => Err(act.backend_lost(&kind, &backend, &label, e, ctx)),
                    };
                    act.feed(id, event(result), ctx)
                }),
        );
        None
    }

    /// A call found its backend actor gone: if it is dead (a panic escaped
    /// its guards, so its supervisor could not restart it), start a fresh
    /// one and reconcile with it first thing.
    fn backend_lost(
        &mut self,
        kind: &str,
        backend: &Addr<BackendActor>,
        label: &str,
        error: MailboxError,
        ctx: &mut Context<Self>,
    ) -> VramError {
        if backend.connected() {
            // The supervisor restarted the actor while it handled this
            // call; the call's future went with the old instance.
            return VramError::BackendFailed {
                model: label.to_string(),
                reason: "the backend restarted during the call".to_string(),
            };
        }
        self.replace_backend(kind, backend, ctx);
        VramError::BackendFailed {
            model: label.to_string(),
            reason: format!("backend actor unavailable: {error}"),
        }
    }

    /// Replaces the backend actor of `kind` if it is still the dead one,
    /// and queues a reconcile with the fresh one ahead of everything.
    pub(crate) fn replace_backend(
        &mut self,
        kind: &str,
        dead: &Addr<BackendActor>,
        ctx: &mut Context<Self>,
    ) {
        if self.actors.get(kind) != Some(dead) {
            return; // already replaced
        }
        tracing::error!(kind = %kind, "backend actor died without a restart; starting a fresh one");
        if let Some(backend) = self.backends.get(kind) {
            backend.reset();
        }
        self.start_backend(kind, ctx);
        self.reconcile_first(kind.to_string(), ctx);
    }

    /// Feeds [`Event::Deadline`] to job `id` at `until` unless another
    /// wait or a release comes first.
    fn wait(&mut self, id: u64, until: Instant, ctx: &mut Context<Self>) {
        self.wait_token += 1;
        let token = self.wait_token;
        let delay = until.saturating_duration_since(now());
        ctx.run_later(delay, move |act, ctx| {
            if act.wait_token == token {
                act.waits_release = false;
                act.feed(id, Event::Deadline, ctx);
            }
        });
    }

    /// A lease was released: wakes the running job if it waits for one.
    pub(crate) fn released(&mut self, ctx: &mut Context<Self>) {
        if !self.waits_release {
            return;
        }
        self.waits_release = false;
        self.wait_token += 1;
        if let Some(id) = self.running.as_ref().map(|r| r.id) {
            self.feed(id, Event::Released, ctx);
        }
    }

    /// Answers everyone waiting for the running job, then starts the next.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        let Some(running) = self.running.take() else {
            return;
        };
        self.waits_release = false;
        self.wait_token += 1;
        let stale = self
            .queue
            .front()
            .is_some_and(|j| matches!(j, Queued::Restart(job, _) if !job.crashes()));
        if let Some(observer) = self.observer.as_mut()
            && !stale
        {
            observer(&self.books.ledger);
        }
        match running.job {
            Queued::Load(mut job, waiters) => {
                let Some(result) = job.outcome() else {
                    return self.start_next(ctx);
                };
                if self.shutting_down
                    && let Ok(loaded) = &result
                    && !loaded.already_resident
                {
                    self.unload_after_shutdown(&loaded.model, waiters, ctx);
                    return self.start_next(ctx);
                }
                for waiter in waiters {
                    match waiter {
                        LoadWaiter::Load(tx) => drop(tx.send(result.clone())),
                        LoadWaiter::Acquire(tx) => {
                            let lease = result
                                .clone()
                                .and_then(|loaded| self.lease(&loaded.model, loaded.evicted));
                            drop(tx.send(lease));
                        }
                    }
                }
            }
            Queued::Unload(mut job, waiters) => {
                if let Some(result) = job.outcome() {
                    for tx in waiters {
                        drop(tx.send(result.clone()));
                    }
                }
            }
            Queued::Restart(mut job, waiters) => {
                if let Some(result) = job.outcome() {
                    for tx in waiters {
                        drop(tx.send(result.clone()));
                    }
                }
            }
        }
        self.start_next(ctx);
    }

    /// A load that finished after `Shutdown` started: its server came up
    /// after the backends were stopped, so it is stopped again before its
    /// waiters hear `unavailable`.
    fn unload_after_shutdown(
        &mut self,
        model: &str,
        waiters: Vec<LoadWaiter>,
        ctx: &mut Context<Self>,
    ) {
        let refuse = move || Queued::Load(LoadJob::new(""), waiters).refuse(shutting_down());
        // The ledger was emptied by the shutdown: the kind comes from the
        // catalog.
        self.books.forget(model);
        let backend = self
            .books
            .declared
            .get(model)
            .and_then(|spec| self.actors.get(&spec.kind).cloned());
        let Some(backend) = backend else {
            return refuse();
        };
        tracing::info!(model = %model, "loaded during shutdown; unloading it again");
        ctx.spawn(
            backend
                .send(UnloadModel(model.to_string()))
                .into_actor(self)
                .map(move |_, _, _| refuse()),
        );
    }

    /// Takes a lease on a resident model.
    pub(crate) fn lease(&mut self, model: &str, evicted: Vec<String>) -> Result<Lease, VramError> {
        self.books.used_now(model, now());
        if !self.books.ledger.lease(model) {
            // Only reachable if the model left between its load and now.
            return Err(VramError::BackendFailed {
                model: model.to_string(),
                reason: "model left the card before it could be leased".to_string(),
            });
        }
        self.next_lease += 1;
        let valid = Arc::new(AtomicBool::new(true));
        self.books
            .leases
            .insert(self.next_lease, (model.to_string(), valid.clone()));
        Ok(Lease {
            id: self.next_lease,
            model: model.to_string(),
            evicted,
            owner: self.me.clone(),
            valid,
        })
    }
}

/// The card's memory, or `None` (warned) when it could not be read.
fn card(result: Result<GpuMemory, ProbeError>) -> Option<GpuMemory> {
    result
        .inspect_err(
            |e| tracing::warn!(error = %e, "could not read the card; planning on the ledger alone"),
        )
        .ok()
}

fn no_backend(kind: &str, label: &str) -> VramError {
    VramError::BackendFailed {
        model: label.to_string(),
        reason: format!("no backend for kind {kind:?}"),
    }
}

impl Actor for VramActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.me = Some(ctx.address().recipient());
        // `started` runs again after a restart of this actor; its backend
        // actors live on and are kept.
        let kinds: Vec<String> = self
            .backends
            .keys()
            .filter(|k| !self.actors.contains_key(*k))
            .cloned()
            .collect();
        for kind in kinds {
            self.start_backend(&kind, ctx);
        }
        if let Some(shortest) = self.books.ttl.values().min() {
            // Check often enough that a model leaves within a quarter of
            // its TTL of expiring, but not busily.
            let period = (*shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
            ctx.run_interval(period, |act, ctx| act.expire_idle(ctx));
        }
    }
}

/// A restart of the manager itself (when run under a `Supervisor`): the
/// running job is dropped, so its waiters are answered `unavailable`; the
/// ledger is rebuilt from every backend's `loaded()` by reconcile jobs
/// placed ahead of everything queued.
impl Supervised for VramActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(
            queued = self.queue.len(),
            "manager restarting; rebuilding the ledger from the backends"
        );
        self.running = None;
        self.waits_release = false;
        self.wait_token += 1;
        self.books.ledger = Ledger::new(self.config.capacity);
        for kind in self.backends.keys().rev() {
            self.queue
                .push_front(Queued::Restart(RestartJob::reconcile(kind.clone()), vec![]));
        }
    }
}

impl VramActor {
    /// Starts (or replaces) the supervised backend actor of `kind`.
    pub(crate) fn start_backend(&mut self, kind: &str, ctx: &mut Context<Self>) {
        let Some(backend) = self.backends.get(kind).cloned() else {
            return;
        };
        let actor = BackendActor::new(kind, backend, &self.config)
            .notify_restarts(ctx.address().recipient())
            .notify_exits(ctx.address().recipient());
        self.actors
            .insert(kind.to_string(), Supervisor::start(move |_| actor));
    }

    /// Queues an expiry job for each idle model that has none queued yet.
    /// The job checks again when it runs: a use in between cancels it.
    fn expire_idle(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let idle = expired(
            &self.books.ledger,
            &self.books.ttl,
            &self.books.last_used,
            now(),
        );
        for model in idle {
            let queued = self.running.iter().map(|r| &r.job).chain(&self.queue).any(
                |j| matches!(j, Queued::Unload(job, _) if job.is_expiry() && job.model() == model),
            );
            if queued || self.queue.len() >= self.config.max_queue {
                continue;
            }
            self.queue
                .push_back(Queued::Unload(UnloadJob::expiry(model), vec![]));
        }
        self.start_next(ctx);
    }

    /// Queues a reconcile of `kind` ahead of everything else, unless one
    /// is already first in line.
    pub(crate) fn reconcile_first(&mut self, kind: String, ctx: &mut Context<Self>) {
        let first = |j: &Queued| matches!(j, Queued::Restart(job, _) if !job.crashes() && job.kind() == kind);
        if self.queue.front().is_some_and(first) {
            return;
        }
        self.queue
            .push_front(Queued::Restart(RestartJob::reconcile(kind), vec![]));
        self.start_next(ctx);
    }

    /// Plans against the card as well as the ledger: effective free bytes
    /// are min(capacity - ledger used, card free - reserve); after evicting,
    /// waits for the card to show the memory back; and measures each load's
    /// real footprint.
    pub fn with_probe(mut self, probe: Rc<dyn GpuProbe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Calls `observer` with the ledger each time a job completes, except
    /// while a reconcile after a backend restart is pending (the ledger is
    /// then known to be stale until that reconcile runs).
    pub fn observe_jobs(mut self, observer: impl FnMut(&Ledger) + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }
}
