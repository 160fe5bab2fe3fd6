//! `VramActor`: owns the ledger, serialises loads and unloads through one
//! FIFO, and supervises one `BackendActor` per kind.
//!
//! Load, Unload, CrashBackend and any Acquire that needs a load become jobs
//! in an internal queue; one job runs at a time, spawned on the actor's
//! context (never `ctx.wait`, which would stop the mailbox), so Status,
//! Release and Acquire of a resident model that no queued job is about are
//! answered at once, even while a long load runs (and a Load of a resident
//! model when nothing is queued). Requests for the model of a queued or
//! running load join that load instead of queueing a second one.
//!
//! The handlers of the public messages are in `handlers.rs`.
//!
//! Start: `started()` starts one supervised `BackendActor` per backend, on
//! this actor's arbiter, each told to report its restarts here.
//!
//! Backend restart: a [`BackendRestarted`] report queues a reconcile job at
//! the front of the queue (unless a `CrashBackend` job of that kind is
//! running, which reconciles itself): the ledger is made equal to what the
//! restarted backend reports as loaded, and `backend_restarted` published.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{Notify, oneshot};

use crate::backend::Backend;
use crate::backend_actor::BackendActor;
use crate::error::VramError;
use crate::job::{self, JobOp, JobResult};
use crate::kind::Kinds;
use crate::ledger::Ledger;
use crate::messages::{Lease, Loaded, Unloaded, VramEvent};
use crate::model::Catalog;
use crate::policy::expired;
use crate::probe::GpuProbe;

/// What a `VramActor` is built from.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Usable bytes of the card (total less reserve).
    pub capacity: u64,
    /// Eviction tiers.
    pub kinds: Kinds,
    /// Every model that may be loaded.
    pub catalog: Catalog,
    /// How long a load waits for leases to be released.
    pub lease_wait: Duration,
    /// How long a backend may take to load.
    pub load_timeout: Duration,
    /// How long a backend may take to unload.
    pub unload_timeout: Duration,
    /// Waiting jobs beyond this are refused with `busy`.
    pub max_queue: usize,
    /// Delay before a restarted backend takes its next message.
    pub restart_backoff: Duration,
    /// Cap of that delay, which doubles with each restart in a row.
    pub restart_backoff_max: Duration,
    /// Bytes of the card never planned for (with a probe, the card's free
    /// memory counts only above this).
    pub reserve: u64,
    /// After unloading victims, wait until the card shows this fraction of
    /// the memory they really held (measured, else declared) back before
    /// loading (with a probe); never more than the card can show.
    pub release_fraction: f64,
    /// The longest pause between two readings of the card while waiting
    /// (the first pause is 10 ms, doubling up to this).
    pub release_poll: Duration,
    /// Give up waiting after this long (and load anyway, with a warning).
    pub release_timeout: Duration,
    /// Idle time after which a model is unloaded, by model id (models
    /// without an entry never expire).
    pub ttl: HashMap<String, Duration>,
}

impl ManagerConfig {
    /// A configuration with the voice-assistant kinds, no lease wait,
    /// generous timeouts and a queue of 64.
    pub fn new(capacity: u64, catalog: Catalog) -> Self {
        Self {
            capacity,
            kinds: Kinds::voice_assistant(),
            catalog,
            lease_wait: Duration::ZERO,
            load_timeout: Duration::from_secs(120),
            unload_timeout: Duration::from_secs(30),
            max_queue: 64,
            restart_backoff: Duration::from_millis(10),
            restart_backoff_max: Duration::from_secs(2),
            reserve: 0,
            release_fraction: 0.75,
            release_poll: Duration::from_millis(250),
            release_timeout: Duration::from_secs(5),
            ttl: HashMap::new(),
        }
    }
}

/// Called with the ledger after every job; see [`VramActor::observe_jobs`].
pub type JobObserver = Box<dyn FnMut(&Ledger)>;

/// Someone waiting for a job's outcome.
pub(crate) enum Waiter {
    Load(oneshot::Sender<Result<Loaded, VramError>>),
    Acquire(oneshot::Sender<Result<Lease, VramError>>),
    Unload(oneshot::Sender<Result<Unloaded, VramError>>),
    Done(oneshot::Sender<Result<(), VramError>>),
}

impl Waiter {
    /// Answers this waiter with `error`.
    pub(crate) fn refuse(self, error: VramError) {
        match self {
            Waiter::Load(tx) => drop(tx.send(Err(error))),
            Waiter::Acquire(tx) => drop(tx.send(Err(error))),
            Waiter::Unload(tx) => drop(tx.send(Err(error))),
            Waiter::Done(tx) => drop(tx.send(Err(error))),
        }
    }
}

/// What a manager that is shutting down answers.
pub(crate) fn shutting_down() -> VramError {
    VramError::Unavailable {
        reason: "the manager is shutting down".to_string(),
    }
}

/// A queued operation and everyone waiting for it.
pub(crate) struct Job {
    pub(crate) op: JobOp,
    pub(crate) waiters: Vec<Waiter>,
}

/// The supervising actor that owns the ledger; see the module docs.
pub struct VramActor {
    pub(crate) config: ManagerConfig,
    pub(crate) ledger: Ledger,
    pub(crate) backends: BTreeMap<String, Rc<dyn Backend>>,
    pub(crate) actors: HashMap<String, Addr<BackendActor>>,
    pub(crate) queue: VecDeque<Job>,
    pub(crate) running: Option<Job>,
    /// Granted leases: id -> (model, validity shared with the guard).
    pub(crate) leases: HashMap<u64, (String, Arc<AtomicBool>)>,
    pub(crate) next_lease: u64,
    pub(crate) subscribers: Vec<Recipient<VramEvent>>,
    pub(crate) released: Rc<Notify>,
    /// This actor's own address, handed to every lease it grants.
    pub(crate) me: Option<Addr<VramActor>>,
    /// Called with the ledger after every job (tests check invariants).
    observer: Option<JobObserver>,
    /// The card, when it can be asked.
    pub(crate) probe: Option<Rc<dyn GpuProbe>>,
    /// The catalog as configured; `config.catalog` carries calibrated sizes.
    pub(crate) declared: Catalog,
    /// Wall-clock time of each resident model's last load, acquire,
    /// release or touch (for TTLs).
    pub(crate) last_used: HashMap<String, Instant>,
    /// Set by `Shutdown`: no more work is taken or started.
    pub(crate) shutting_down: bool,
}

impl VramActor {
    /// A manager over `backends`, one per kind name.
    pub fn new(config: ManagerConfig, backends: BTreeMap<String, Rc<dyn Backend>>) -> Self {
        Self {
            ledger: Ledger::new(config.capacity),
            declared: config.catalog.clone(),
            config,
            backends,
            actors: HashMap::new(),
            queue: VecDeque::new(),
            running: None,
            leases: HashMap::new(),
            next_lease: 0,
            subscribers: Vec::new(),
            released: Rc::new(Notify::new()),
            me: None,
            observer: None,
            probe: None,
            last_used: HashMap::new(),
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

    /// Whether the running job or a queued one is about `model`: a load or
    /// unload of it, or a crash or reconcile of its kind's backend.
    pub(crate) fn touches(&self, model: &str) -> bool {
        let kind = self.ledger.get(model).map(|e| e.kind.as_str());
        self.running.iter().chain(&self.queue).any(|j| match &j.op {
            JobOp::Load(m) | JobOp::Unload(m) => m == model,
            JobOp::Crash(k) | JobOp::Reconcile(k) => Some(k.as_str()) == kind,
            JobOp::Expire(_) => false,
        })
    }

    /// The load of `model` a new request can join: the last job about the
    /// model, if that job is a load.
    pub(crate) fn joinable_load(&mut self, model: &str) -> Option<&mut Job> {
        let last = self
            .queue
            .iter_mut()
            .rev()
            .find(|j| j.op.model() == Some(model));
        match last {
            Some(job) => matches!(job.op, JobOp::Load(_)).then_some(job),
            None => self
                .running
                .as_mut()
                .filter(|j| matches!(&j.op, JobOp::Load(m) if m == model)),
        }
    }

    /// Queues `op` (or joins an equal load), then starts the next job.
    pub(crate) fn submit(
        &mut self,
        op: JobOp,
        waiter: Waiter,
        ctx: &mut Context<Self>,
    ) -> Result<(), VramError> {
        if let JobOp::Load(model) = &op
            && let Some(job) = self.joinable_load(&model.clone())
        {
            job.waiters.push(waiter);
            return Ok(());
        }
        if self.queue.len() >= self.config.max_queue {
            return Err(VramError::Busy {
                queued: self.queue.len(),
            });
        }
        self.queue.push_back(Job {
            op,
            waiters: vec![waiter],
        });
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
        let driver = job::drive(job.op.clone(), self, ctx.address());
        self.running = Some(job);
        ctx.spawn(driver.into_actor(self).map(|result, act, ctx| {
            act.finish(result);
            act.start_next(ctx);
        }));
    }

    /// Empties the queue, answering everyone waiting `unavailable`.
    pub(crate) fn refuse_queued(&mut self) {
        for job in std::mem::take(&mut self.queue) {
            for waiter in job.waiters {
                waiter.refuse(shutting_down());
            }
        }
    }

    /// Answers everyone waiting for the running job.
    fn finish(&mut self, result: JobResult) {
        let Some(job) = self.running.take() else {
            return;
        };
        let stale = self
            .queue
            .front()
            .is_some_and(|j| matches!(j.op, JobOp::Reconcile(_)));
        if let Some(observer) = self.observer.as_mut()
            && !stale
        {
            observer(&self.ledger);
        }
        for waiter in job.waiters {
            match waiter {
                Waiter::Load(tx) => {
                    let _ = tx.send(result.loaded());
                }
                Waiter::Acquire(tx) => {
                    let lease = result
                        .loaded()
                        .and_then(|loaded| self.lease(&loaded.model, loaded.evicted));
                    let _ = tx.send(lease);
                }
                Waiter::Unload(tx) => {
                    let _ = tx.send(result.unloaded());
                }
                Waiter::Done(tx) => {
                    let _ = tx.send(result.done());
                }
            }
        }
    }

    /// Takes a lease on a resident model.
    pub(crate) fn lease(&mut self, model: &str, evicted: Vec<String>) -> Result<Lease, VramError> {
        self.used_now(model);
        if !self.ledger.lease(model) {
            // Only reachable if the model left between its load and now.
            return Err(VramError::BackendFailed {
                model: model.to_string(),
                reason: "model left the card before it could be leased".to_string(),
            });
        }
        self.next_lease += 1;
        let valid = Arc::new(AtomicBool::new(true));
        self.leases
            .insert(self.next_lease, (model.to_string(), valid.clone()));
        Ok(Lease {
            id: self.next_lease,
            model: model.to_string(),
            evicted,
            owner: self.me.clone(),
            valid,
        })
    }

    /// Marks a resident `model` as just used: most recent in the ledger's
    /// order, and its idle clock restarted (policy step 2).
    pub(crate) fn touch(&mut self, model: &str) {
        self.ledger.touch(model);
        self.used_now(model);
    }

    /// Restarts `model`'s idle clock (without allocating on the hot path
    /// of acquire and release).
    pub(crate) fn used_now(&mut self, model: &str) {
        let now = Instant::now();
        match self.last_used.get_mut(model) {
            Some(at) => *at = now,
            None => {
                self.last_used.insert(model.to_string(), now);
            }
        }
    }

    /// Ids of the leases held on `model`.
    pub(crate) fn leases_of<'a>(&'a self, model: &'a str) -> impl Iterator<Item = u64> + 'a {
        self.leases
            .iter()
            .filter(move |(_, (m, _))| *m == model)
            .map(|(id, _)| *id)
    }

    /// The models that leases are held on (with repeats).
    pub(crate) fn leased_models(&self) -> impl Iterator<Item = String> + '_ {
        self.leases.values().map(|(m, _)| m.clone())
    }

    /// Voids every lease on `model` (it was lost in a crash): the guards
    /// report `is_valid() == false` and their release does nothing.
    pub(crate) fn void_leases(&mut self, model: &str) {
        self.leases.retain(|_, (m, valid)| {
            if m == model {
                valid.store(false, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
    }

    pub(crate) fn known(&self, model: &str) -> Result<(), VramError> {
        let spec = self
            .config
            .catalog
            .get(model)
            .ok_or_else(|| VramError::UnknownModel {
                model: model.to_string(),
            })?;
        if spec.bytes > self.ledger.capacity() {
            return Err(VramError::ExceedsCapacity {
                model: model.to_string(),
                needed: spec.bytes,
                capacity: self.ledger.capacity(),
            });
        }
        Ok(())
    }
}

impl Actor for VramActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.me = Some(ctx.address());
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
        if let Some(shortest) = self.config.ttl.values().min() {
            // Check often enough that a model leaves within a quarter of
            // its TTL of expiring, but not busily.
            let period = (*shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
            ctx.run_interval(period, |act, ctx| act.expire_idle(ctx));
        }
    }
}

/// A restart of the manager itself (when run under a `Supervisor`): the
/// running job's future is gone, so its waiters are answered with
/// `unavailable`; the ledger is rebuilt from every backend's `loaded()`
/// by reconcile jobs placed ahead of everything queued.
impl Supervised for VramActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(
            queued = self.queue.len(),
            "manager restarting; rebuilding the ledger from the backends"
        );
        self.running = None;
        self.ledger = Ledger::new(self.config.capacity);
        for kind in self.backends.keys().rev() {
            self.queue.push_front(Job {
                op: JobOp::Reconcile(kind.clone()),
                waiters: vec![],
            });
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
            &self.ledger,
            &self.config.ttl,
            &self.last_used,
            Instant::now(),
        );
        for model in idle {
            let queued = self
                .running
                .iter()
                .chain(&self.queue)
                .any(|j| j.op == JobOp::Expire(model.clone()));
            if queued || self.queue.len() >= self.config.max_queue {
                continue;
            }
            self.queue.push_back(Job {
                op: JobOp::Expire(model),
                waiters: vec![],
            });
        }
        self.start_next(ctx);
    }

    /// Queues a reconcile of `kind` ahead of everything else, unless one
    /// is already first in line.
    pub(crate) fn reconcile_first(&mut self, kind: String, ctx: &mut Context<Self>) {
        let first = |j: &Job| matches!(&j.op, JobOp::Reconcile(k) if *k == kind);
        if self.queue.front().is_some_and(first) {
            return;
        }
        self.queue.push_front(Job {
            op: JobOp::Reconcile(kind),
            waiters: vec![],
        });
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
