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

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use actix::prelude::*;
use arcstr::ArcStr;

use crate::backend::Backend;
use crate::backend_actor::{BackendActor, UnloadModel};
use crate::config::ManagerConfig;
use crate::error::VramError;
use crate::events::VramEvent;
use crate::job::{Books, Command, Event, Job as _, LoadJob, ReleaseWait, RestartJob, UnloadJob};
use crate::ledger::Ledger;
use crate::messages::{Lease, Release};
use crate::meters::Meters;
use crate::order::Order;
use crate::policy::expired;
use crate::probe::GpuProbe;
use crate::queue::{LoadWaiter, LoadWaiters, Queued, refuse_load};

/// Called with a model's id when its load is planned; see
/// [`VramActor::warm_with`].
pub type Warmer = Box<dyn Fn(&str)>;

/// Called with the ledger after every job; see [`VramActor::observe_jobs`].
pub type JobObserver = Box<dyn FnMut(&Ledger)>;

/// The time as the manager's jobs see it (paused with tokio's clock in
/// tests).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The running job and the bookkeeping of its commands.
struct Running {
    job: Queued,
    /// Its number: answers to an earlier job's commands are dropped.
    id: u64,
    span: tracing::Span,
    /// When it started (for the load duration metric).
    started: Instant,
}

/// The supervising actor that owns the books; see the module docs.
pub struct VramActor {
    pub(crate) config: ManagerConfig,
    pub(crate) books: Books,
    pub(crate) backends: BTreeMap<String, Rc<dyn Backend>>,
    /// The backend actor of each kind (few: looked up by a short scan,
    /// and named by position in calls in flight).
    pub(crate) actors: Vec<(String, Addr<BackendActor>)>,
    pub(crate) queue: VecDeque<Queued>,
    running: Option<Running>,
    /// Numbers the jobs.
    runs: u64,
    /// Numbers the waits: a timer of an older wait is dropped.
    pub(crate) wait_token: u64,
    /// Whether the running job waits for a lease release.
    pub(crate) waits_release: bool,
    pub(crate) next_lease: u64,
    pub(crate) subscribers: Vec<Recipient<VramEvent>>,
    /// Where leases send their release.
    me: Option<Recipient<Release>>,
    /// Called with the ledger after every job (tests check invariants).
    observer: Option<JobObserver>,
    /// Called with a model's id when its load is planned, to warm its
    /// weight files (see [`VramActor::warm_with`]).
    pub(crate) warm: Option<Warmer>,
    /// The card, when it can be asked.
    pub(crate) probe: Option<Rc<dyn GpuProbe>>,
    /// Set by `Shutdown`: no more work is taken or started.
    pub(crate) shutting_down: bool,
    /// The commands of one event, kept to spare an allocation per event.
    scratch: Vec<Command>,
    /// The card as last read, for `Status`.
    pub(crate) last_card: Option<crate::probe::GpuMemory>,
    /// The metric handles, kept once registered.
    meters: Meters,
    /// Where backend actors put their answers to calls (made when this
    /// instance starts, shared by all of its calls; marked stopped when
    /// the instance stops).
    pub(crate) caller: Arc<crate::backend_actor::Caller>,
}

impl VramActor {
    /// A manager over `backends`, one per kind name.
    pub fn new(config: ManagerConfig, backends: BTreeMap<String, Rc<dyn Backend>>) -> Self {
        let books = Books {
            ledger: Ledger::on_card(config.capacity, config.gpu),
            kinds: config.kinds.clone(),
            declared: config.catalog.clone(),
            planned: config.catalog.clone(),
            leases: Default::default(),
            last_used: Default::default(),
            ttl: config.ttl.clone(),
            reserve: config.reserve,
            lease_wait: config.lease_wait,
            order: config.order,
            host_budget: config.host_budget,
            listening: false,
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
            actors: Vec::new(),
            queue: VecDeque::new(),
            running: None,
            runs: 0,
            wait_token: 0,
            waits_release: false,
            next_lease: 0,
            subscribers: Vec::new(),
            me: None,
            observer: None,
            warm: None,
            probe: None,
            shutting_down: false,
            scratch: Vec::new(),
            last_card: None,
            meters: Meters::new(),
            caller: Arc::default(),
        }
    }

    /// Counts an eviction of `model` (of `kind`) in the metrics.
    pub(crate) fn count_eviction(&mut self, model: &str, kind: &str) {
        self.meters.evicted(model, kind);
    }

    /// Sends `event` to every live subscriber.
    pub(crate) fn publish(&mut self, event: VramEvent) {
        match &event {
            VramEvent::Evicted { model, kind, .. } => self.meters.evicted(model, kind),
            VramEvent::BackendRestarted { kind, .. } => {
                metrics::counter!("vram_manager_backend_restarts_total", "kind" => kind.to_string())
                    .increment(1);
            }
            _ => {}
        }
        self.subscribers.retain(|s| s.connected());
        self.books.listening = !self.subscribers.is_empty();
        for subscriber in &self.subscribers {
            subscriber.do_send(event.clone());
        }
    }

    /// Whether the running job or a queued one could change whether
    /// `model` is resident (so an answer from the ledger now could be
    /// overtaken by it).
    pub(crate) fn job_pending_for(&self, model: &str) -> bool {
        let kind = self.books.ledger.get(model).map(|e| e.kind.as_str());
        self.running
            .iter()
            .map(|r| &r.job)
            .chain(&self.queue)
            .any(|j| j.may_change(model, kind))
    }

    /// Whether a request for `model` counts as a miss in the request
    /// history. Only the adaptive order reads that history, so under the
    /// strict order nothing is worked out (and nothing counted).
    pub(crate) fn counted_miss(&self, model: &str) -> bool {
        self.books.order == Order::Adaptive && self.needs_load(model)
    }

    /// Whether a request for `model` needs a load of its own: it holds no
    /// VRAM (or is leaving) and no load of it is queued or running to join.
    pub(crate) fn needs_load(&self, model: &str) -> bool {
        let live = self.books.ledger.get(model).is_some_and(|e| {
            matches!(
                e.state,
                crate::ledger::ModelState::Resident | crate::ledger::ModelState::Loading
            )
        });
        let joins = self
            .running
            .iter()
            .map(|r| &r.job)
            .chain(&self.queue)
            .any(|j| matches!(j, Queued::Load(job, _) if job.model() == model));
        !live && !joins
    }

    /// The models of the loads queued or running that hold no ledger
    /// entry yet.
    pub(crate) fn pending_loads(&self) -> Vec<String> {
        self.running
            .iter()
            .map(|r| &r.job)
            .chain(&self.queue)
            .filter_map(|j| match j {
                Queued::Load(job, _) if self.books.ledger.get(job.model()).is_none() => {
                    Some(job.model().to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// Whether any job runs or waits.
    pub(crate) fn is_busy(&self) -> bool {
        self.running.is_some() || !self.queue.is_empty()
    }

    /// The model of the running job, if it is about one.
    pub(crate) fn running_model(&self) -> Option<&str> {
        self.running.as_ref().and_then(|r| r.job.model())
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
        model: ArcStr,
        waiter: LoadWaiter,
        ctx: &mut Context<Self>,
    ) -> Result<(), VramError> {
        let Some(waiter) = self.join_load(&model, waiter) else {
            return Ok(());
        };
        self.submit(
            Queued::Load(LoadJob::new(model), smallvec::smallvec![waiter]),
            ctx,
        )
    }

    /// Queues `job`, then starts the next job.
    pub(crate) fn submit(&mut self, job: Queued, ctx: &mut Context<Self>) -> Result<(), VramError> {
        if self.queue.len() >= self.config.max_queue {
            return Err(VramError::Busy {
                queued: self.queue.len(),
            });
        }
        if self.running.is_none() && self.queue.is_empty() && !self.shutting_down {
            // Nothing ahead of it: it runs now, without a trip through
            // the queue (a job is a few hundred bytes to move).
            self.start(job, ctx);
        } else {
            self.queue.push_back(job);
            self.start_next(ctx);
        }
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
        if let Some(job) = self.queue.pop_front() {
            self.start(job, ctx);
        }
    }

    /// Runs `job` (none is running).
    fn start(&mut self, job: Queued, ctx: &mut Context<Self>) {
        self.runs += 1;
        let id = self.runs;
        let span = job.span();
        let started = now();
        self.running = Some(Running {
            job,
            id,
            span,
            started,
        });
        self.meters.queue_length(self.queue.len());
        self.feed_at(id, Event::Start, started, ctx);
    }

    /// Empties the queue, answering everyone waiting `unavailable`.
    pub(crate) fn refuse_queued(&mut self) {
        self.refuse_queued_with(VramError::shutting_down);
    }

    /// Empties the queue, answering everyone waiting `error()`.
    fn refuse_queued_with(&mut self, error: impl Fn() -> VramError) {
        for job in std::mem::take(&mut self.queue) {
            job.refuse(error());
        }
    }

    /// Feeds `event` to job number `id` if it is still the running one,
    /// carries out what it answers, and finishes it when it is done.
    pub(crate) fn feed(&mut self, id: u64, event: Event, ctx: &mut Context<Self>) {
        self.feed_at(id, event, now(), ctx);
    }

    /// Feeds `events` in order, as [`VramActor::feed`] does, reading the
    /// clock once for them all.
    pub(crate) fn feed_all(
        &mut self,
        id: u64,
        events: impl IntoIterator<Item = Event>,
        ctx: &mut Context<Self>,
    ) {
        self.feed_all_at(id, events, now(), ctx);
    }

    /// [`VramActor::feed_all`] at `now`.
    pub(crate) fn feed_all_at(
        &mut self,
        id: u64,
        events: impl IntoIterator<Item = Event>,
        now: Instant,
        ctx: &mut Context<Self>,
    ) {
        for event in events {
            if !self.feed_at(id, event, now, ctx) {
                break;
            }
        }
    }

    /// [`VramActor::feed`] at `now`; answers whether job `id` still runs.
    pub(crate) fn feed_at(
        &mut self,
        id: u64,
        event: Event,
        now: Instant,
        ctx: &mut Context<Self>,
    ) -> bool {
        let (mut next, mut later) = (Some(event), VecDeque::new());
        let mut out = std::mem::take(&mut self.scratch);
        while let Some(event) = next.take().or_else(|| later.pop_front()) {
            let Some(running) = self.running.as_mut().filter(|r| r.id == id) else {
                self.scratch = out;
                return false;
            };
            // Entered only when someone records spans: entering a
            // disabled span still costs a clone and a log check per event.
            let _entered = (!running.span.is_disabled()).then(|| running.span.clone().entered());
            running.job.handle(event, &mut self.books, now, &mut out);
            let done = running.job.is_done();
            for command in out.drain(..) {
                // A command answered at once (a ready card read) feeds
                // its answer next, without a trip through the context.
                if let Some(answer) = self.execute(id, command, ctx) {
                    match next {
                        None => next = Some(answer),
                        Some(_) => later.push_back(answer),
                    }
                }
            }
            if done {
                self.scratch = out;
                self.finish(now, ctx);
                return false;
            }
        }
        self.scratch = out;
        true
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
    fn finish(&mut self, now: Instant, ctx: &mut Context<Self>) {
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
                let waited = job.release_waited();
                let Some(result) = job.outcome() else {
                    return self.start_next(ctx);
                };
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.code(),
                };
                let took = now.saturating_duration_since(running.started);
                // A loaded model's id went into the answer.
                let model = match &result {
                    Ok(loaded) => loaded.model.as_str(),
                    Err(_) => job.model(),
                };
                self.meters.load(model, outcome, took.as_secs_f64());
                if let Some(waited) = waited {
                    self.meters.release_wait(waited.as_secs_f64());
                }
                if self.shutting_down
                    && let Ok(loaded) = &result
                    && !loaded.already_resident
                {
                    self.unload_after_shutdown(&loaded.model, waiters, ctx);
                    return self.start_next(ctx);
                }
                // The last waiter takes the result itself: one waiter (the
                // usual case) costs no copy.
                let last = waiters.len().saturating_sub(1);
                let mut result = Some(result);
                for (i, waiter) in waiters.into_iter().enumerate() {
                    let answer = match i == last {
                        true => result.take(),
                        false => result.clone(),
                    };
                    let Some(answer) = answer else { break };
                    match waiter {
                        LoadWaiter::Load(reply) => reply.send(answer),
                        LoadWaiter::Acquire(reply) => {
                            let lease =
                                answer.and_then(|loaded| self.lease(&loaded.model, loaded.evicted));
                            reply.send(lease);
                        }
                    }
                }
            }
            Queued::Unload(mut job, waiters) => {
                if let Some(result) = job.outcome() {
                    for reply in waiters {
                        reply.send(result.clone());
                    }
                }
            }
            Queued::Restart(mut job, waiters) => {
                if let Some(result) = job.outcome() {
                    for reply in waiters {
                        reply.send(result.clone());
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
        waiters: LoadWaiters,
        ctx: &mut Context<Self>,
    ) {
        let refuse = move || refuse_load(waiters, VramError::shutting_down());
        // The ledger was emptied by the shutdown: the kind comes from the
        // catalog.
        self.books.forget(model);
        let backend = self
            .books
            .declared
            .get(model)
            .and_then(|spec| self.actor(&spec.kind).cloned());
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
    pub(crate) fn lease(&mut self, model: &str, evicted: Vec<ArcStr>) -> Result<Lease, VramError> {
        let id = self.books.ledger.get(model).map(|e| e.id.clone());
        let (Some(id), true) = (id, self.books.ledger.lease(model)) else {
            // Only reachable if the model left between its load and now.
            return Err(VramError::BackendFailed {
                model: model.to_string(),
                reason: "model left the card before it could be leased".to_string(),
            });
        };
        self.next_lease += 1;
        let valid = Arc::new(AtomicBool::new(true));
        self.books
            .leases
            .insert(self.next_lease, (id.clone(), valid.clone()));
        self.books.used_now_id(&id, now());
        Ok(Lease {
            id: self.next_lease,
            model: id,
            evicted,
            owner: self.me.clone(),
            valid,
        })
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
            .filter(|k| self.actor(k).is_none())
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
        self.feed_answers(ctx);
        // After a restart, the reconcile jobs queued by `restarting` run
        // now.
        self.start_next(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Calls still queued at a backend belong to jobs that are gone:
        // they are dropped unrun (a restarted instance calls anew).
        self.caller.stop();
    }
}

/// A restart of the manager itself (when run under a `Supervisor`): the
/// running and queued jobs are dropped (their callers' answers went with
/// the old context: they see `unavailable`); the ledger is rebuilt from
/// every backend's `loaded()` and `parked()` by reconcile jobs, started
/// with the actor.
impl Supervised for VramActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(
            queued = self.queue.len(),
            "manager restarting; rebuilding the ledger from the backends"
        );
        self.running = None;
        self.waits_release = false;
        self.wait_token += 1;
        self.books.ledger.clear();
        self.refuse_queued_with(|| VramError::Unavailable {
            reason: "the manager restarted".to_string(),
        });
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
            .with_probe(self.probe.clone())
            .notify_restarts(ctx.address().recipient())
            .notify_exits(ctx.address().recipient());
        let addr = Supervisor::start(move |_| actor);
        match self.actor_slot(kind) {
            Some(slot) => self.actors[slot].1 = addr,
            None => self.actors.push((kind.to_string(), addr)),
        }
    }

    /// The position of `kind`'s backend actor in `actors`.
    pub(crate) fn actor_slot(&self, kind: &str) -> Option<usize> {
        self.actors.iter().position(|(k, _)| k == kind)
    }

    /// The backend actor of `kind`.
    pub(crate) fn actor(&self, kind: &str) -> Option<&Addr<BackendActor>> {
        self.actors.iter().find(|(k, _)| k == kind).map(|(_, a)| a)
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

    /// Calls `warm` with a model's id as soon as its load is planned, before
    /// the victims leave: the embedder starts reading the model's weight
    /// files into the page cache (in the background; `warm` must return at
    /// once), so the server finds them in memory.
    pub fn warm_with(mut self, warm: impl Fn(&str) + 'static) -> Self {
        self.warm = Some(Box::new(warm));
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
