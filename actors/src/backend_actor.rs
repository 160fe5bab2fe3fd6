//! `BackendActor`: one per model kind, wrapping a [`Backend`] and run under
//! an actix `Supervisor`.
//!
//! Start: the `VramActor` starts one per kind with `Supervisor::start`, on
//! the manager's arbiter, handing it a recipient for [`BackendRestarted`].
//!
//! Crash: every backend call (and the `Crash` test message) runs inside
//! `catch_unwind`. A panic answers the request in flight with
//! `backend_failed` and stops the actor, because a supervisor restarts an
//! actor only when it stops; an uncaught panic would kill the task with no
//! restart at all.
//!
//! Restart: `Supervised::restarting` calls [`Backend::reset`], counts the
//! restart and tells the `VramActor`, which then makes its ledger equal to
//! what the backend reports as [`loaded`](Backend::loaded) (and, of that,
//! [`parked`](Backend::parked)). Messages queued
//! in the mailbox survive the restart and are handled afterwards, after a
//! back-off (`restart_backoff`, doubling with every restart that is not
//! followed by a successful call, capped at `restart_backoff_max`) so a
//! backend that crashes at once cannot spin.
//!
//! Calls: the `VramActor`'s own loads, wakes, unloads and lists come as a
//! [`Call`] answered by a [`CallAnswered`] put in the manager's [`Caller`]
//! queue (no reply channel and no message back per call); the public
//! messages ([`LoadModel`], [`UnloadModels`], ...) do the same work for
//! anyone else holding the actor's address and answer through actix's reply
//! channel.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use arcstr::ArcStr;
use futures::FutureExt;

use crate::backend::Held;
use crate::backend::{Backend, BackendError, BackendFuture, ModelExit};
use crate::config::ManagerConfig;
use crate::error::{VramError, panic_text};
use crate::model::{Ids, ModelSpec, Unloads};
use crate::probe::{GpuMemory, GpuProbe, ProbeError, guarded_read, guarded_read_at_once};

/// Told to the `VramActor` each time a backend actor restarts.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct BackendRestarted {
    /// The kind whose backend restarted.
    pub kind: String,
    /// How many times it has restarted so far.
    pub restarts: u32,
}

/// Told to the `VramActor` when a loaded model left by itself (its server
/// process exited).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ModelExited {
    /// The backend's kind.
    pub kind: String,
    /// The model that left.
    pub model: String,
    /// Why (exit status, last lines of stderr).
    pub reason: String,
}

/// Load a model through the backend. Answers when it is usable.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VramError>")]
pub struct LoadModel(pub Arc<ModelSpec>);

/// Unload a model through the backend. Answers when its memory is back.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VramError>")]
pub struct UnloadModel(pub String);

/// Unload several models through the backend, one after the other, in
/// order. Answers each model it tried with its result: it stops at the
/// first failure, so the models after it were not touched. One message for all
/// the victims a load takes from one backend: an eviction of k models costs
/// one round trip, not k.
#[derive(Debug, Message)]
#[rtype(result = "Vec<(ArcStr, Result<(), VramError>)>")]
pub struct UnloadModels(pub Vec<ArcStr>);

/// Park a model through the backend (it leaves the card, its server
/// stays). Answers when it is asleep.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VramError>")]
pub struct ParkModel(pub String);

/// Wake a parked model through the backend.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VramError>")]
pub struct WakeModel(pub String);

/// Ask the backend which models it holds.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, VramError>")]
pub struct ListLoaded;

/// A call from the `VramActor` whose answer ([`CallAnswered`]) comes back
/// through its [`Caller`] instead of through a reply channel: on the
/// manager's side a call costs no channel, no spawned future and no second
/// message, which is most of what an instant backend's round trip costs
/// beyond a bare one.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Call {
    pub(crate) what: CallKind,
    pub(crate) answer: AnswerTo,
}

/// What a [`Call`] asks of the backend.
pub(crate) enum CallKind {
    /// Load the model; answered [`Answer::Done`].
    Load(Arc<ModelSpec>),
    /// Wake the parked model; answered [`Answer::Done`].
    Wake(ArcStr),
    /// Unload the models in order, as [`UnloadModels`] does; answered
    /// [`Answer::Unloaded`].
    Unload(Ids),
    /// Unload the models in order, answered [`Answer::Unloaded`]; if every
    /// one left, load the model, answered [`Answer::Done`] next. With a
    /// number of free bytes to wait for, first read the card: it loads
    /// only if the card shows them ([`Answer::LoadingAfter`], then
    /// [`Answer::Done`]); otherwise the reading is the last answer
    /// ([`Answer::Card`]). A caller that has closed gets no load: its
    /// [`Answer::Done`] is `unavailable`.
    UnloadThenLoad(Ids, Arc<ModelSpec>, Option<u64>),
    /// List what the backend holds; answered [`Answer::Listed`].
    List,
}

/// The answer to a [`Call`] of job `job`, from the backend actor in
/// position `slot` of the manager's list.
pub(crate) struct CallAnswered {
    pub(crate) job: u64,
    pub(crate) slot: usize,
    pub(crate) answer: Answer,
}

/// How a [`Call`] ended.
pub(crate) enum Answer {
    /// A load or a wake.
    Done(Result<(), VramError>),
    /// An unload: each model tried, with its result.
    Unloaded(Unloads),
    /// A list: what the backend holds, and which of it is parked.
    Listed(Result<Held, VramError>),
    /// The card read after the unloads of an unload-then-load, which did
    /// not load.
    Card(Result<GpuMemory, ProbeError>),
    /// The card read after the unloads of an unload-then-load showed the
    /// memory back: the load goes on ([`Answer::Done`] follows; it is
    /// `unavailable`, with no load, for a caller that has closed).
    LoadingAfter(GpuMemory),
    /// The call was dropped unanswered: its actor stopped, or restarted
    /// with the call in flight.
    Lost(Lost),
}

/// What a lost [`Call`] was, so the manager can fail it as its kind of
/// call fails.
pub(crate) enum Lost {
    /// A load or a wake.
    Done,
    /// A list.
    Listed,
    /// An unload; its first model names the failure.
    Unloaded(ArcStr),
    /// The card read between the unloads and the load of an
    /// unload-then-load.
    Card,
}

/// The `VramActor` instance that calls come from: the answers it has not
/// fed yet, its task to wake when one comes, and whether it has stopped.
/// One per instance, shared by all of its calls.
///
/// An answer is not a message: it skips the mailbox's envelope and
/// channel, and the manager feeds it after its mailbox is empty (see
/// `FeedAnswers`), as it would a message handled last.
#[derive(Default)]
pub(crate) struct Caller {
    /// Backend actors share the manager's thread, so the lock is never
    /// contended; it is a `Mutex` because a [`Call`] crosses an `Addr`,
    /// which asks for `Send`.
    inbox: Mutex<Inbox>,
    stopped: AtomicBool,
    /// The manager is shutting down: no call of its starts a model.
    closed: AtomicBool,
}

#[derive(Default)]
struct Inbox {
    /// Answers in the order they came.
    answers: VecDeque<CallAnswered>,
    /// The manager's task, woken by each answer (kept: a context runs in
    /// one task for its whole life).
    waker: Option<std::task::Waker>,
}

impl Caller {
    /// The calling instance stopped (or restarts as a new one): its calls
    /// still queued are dropped unrun, as actix drops a message whose
    /// sender stopped waiting, so no backend loads a model for a job that
    /// no longer exists; answers not yet fed are for jobs that are gone.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.inbox().answers.clear();
    }

    /// The manager is shutting down: a load that would follow unloads
    /// asked for before is refused instead (the manager refuses the loads
    /// it has not asked for yet itself).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Each answer that comes from now on wakes `waker`.
    pub(crate) fn wake(&self, waker: &std::task::Waker) {
        self.inbox().waker = Some(waker.clone());
    }

    /// Moves every answer not fed yet, in order, into the empty `batch`
    /// (one lock for all of them; the inbox keeps `batch`'s buffer, so
    /// neither side allocates once both have grown).
    pub(crate) fn take_all(&self, batch: &mut VecDeque<CallAnswered>) {
        debug_assert!(batch.is_empty(), "a batch is fed whole before the next");
        std::mem::swap(&mut self.inbox().answers, batch);
    }

    fn answer(&self, answer: CallAnswered) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        let mut inbox = self.inbox();
        inbox.answers.push_back(answer);
        if let Some(waker) = &inbox.waker {
            waker.wake_by_ref();
        }
    }

    /// The inbox (a panic elsewhere while the lock was held left it as it
    /// was: still good).
    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where a [`Call`]'s answer goes. Dropped unanswered (in a mailbox that
/// closed, or in a future a restart dropped), it answers [`Answer::Lost`],
/// as a dropped reply channel would: no call is ever left unanswered.
pub(crate) struct AnswerTo {
    job: u64,
    slot: usize,
    to: Arc<Caller>,
    lost: Option<Lost>,
}

impl AnswerTo {
    /// Answers for job `job` go to `to`, from the actor in `slot`; `lost`
    /// is what the call was, should it be dropped.
    pub(crate) fn new(job: u64, slot: usize, to: Arc<Caller>, lost: Lost) -> Self {
        Self {
            job,
            slot,
            to,
            lost: Some(lost),
        }
    }

    /// Whether the caller stopped (nobody waits for this answer).
    fn caller_stopped(&self) -> bool {
        self.to.stopped.load(Ordering::Relaxed)
    }

    /// Whether the caller is shutting down (it starts no model).
    fn caller_closed(&self) -> bool {
        self.to.closed.load(Ordering::Relaxed)
    }

    fn send(mut self, answer: Answer) {
        self.lost = None;
        self.send_then(answer, None);
    }

    /// Sends `answer` and stays armed for a next one: dropped unanswered
    /// from now on, it answers `next` lost.
    fn send_then(&mut self, answer: Answer, next: Option<Lost>) {
        self.lost = next;
        self.to.answer(CallAnswered {
            job: self.job,
            slot: self.slot,
            answer,
        });
    }
}

impl Drop for AnswerTo {
    fn drop(&mut self) {
        if let Some(lost) = self.lost.take()
            && !self.caller_stopped()
        {
            self.to.answer(CallAnswered {
                job: self.job,
                slot: self.slot,
                answer: Answer::Lost(lost),
            });
        }
    }
}

/// Make the actor panic inside a handler, as a crashing backend would
/// (fault testing). Answers just before the actor stops.
#[derive(Debug, Default, Message)]
#[rtype(result = "()")]
pub struct Crash {
    /// Let the panic escape the handler instead of catching it: the actor's
    /// task dies without a restart and senders see `MailboxError::Closed`,
    /// which is what a bug outside the guarded calls would do.
    pub escape: bool,
}

/// Wraps one kind's [`Backend`]; see the module docs for its lifecycle.
pub struct BackendActor {
    kind: String,
    backend: Rc<dyn Backend>,
    load_timeout: Duration,
    unload_timeout: Duration,
    backoff: Duration,
    backoff_max: Duration,
    on_restart: Option<Recipient<BackendRestarted>>,
    on_exit: Option<Recipient<ModelExited>>,
    /// The card, read between an unload-then-load's unloads and its load.
    probe: Option<Rc<dyn GpuProbe>>,
    restarts: u32,
    /// Restarts since the last call that finished without a panic.
    consecutive: u32,
}

impl BackendActor {
    /// An actor for `kind` around `backend`, with the timeouts and restart
    /// back-off of `config`.
    pub fn new(kind: impl Into<String>, backend: Rc<dyn Backend>, config: &ManagerConfig) -> Self {
        Self {
            kind: kind.into(),
            backend,
            load_timeout: config.load_timeout,
            unload_timeout: config.unload_timeout,
            backoff: config.restart_backoff,
            backoff_max: config.restart_backoff_max,
            on_restart: None,
            on_exit: None,
            probe: None,
            restarts: 0,
            consecutive: 0,
        }
    }

    /// The delay before handling messages after the `n`th restart in a row.
    fn backoff_delay(&self, n: u32) -> Duration {
        let factor = 1u32
            .checked_shl(n.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }

    /// Tells `recipient` of every restart.
    pub fn notify_restarts(mut self, recipient: Recipient<BackendRestarted>) -> Self {
        self.on_restart = Some(recipient);
        self
    }

    /// Reads `probe` when a call asks to load only once memory is back.
    pub(crate) fn with_probe(mut self, probe: Option<Rc<dyn GpuProbe>>) -> Self {
        self.probe = probe;
        self
    }

    /// Tells `recipient` of every model that leaves by itself.
    pub fn notify_exits(mut self, recipient: Recipient<ModelExited>) -> Self {
        self.on_exit = Some(recipient);
        self
    }

    /// Runs one backend call: catches a panic (while the future is built or
    /// polled), applies the timeout, and stops the actor after a panic so
    /// the supervisor restarts it. A call that is done at once (a simulated
    /// backend) is answered at once, with no timer and no spawned future.
    fn guarded<T: 'static>(
        &mut self,
        model: &str,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
        call: impl FnOnce(&dyn Backend) -> BackendFuture<T>,
    ) -> ActorResponse<Self, Result<T, VramError>> {
        match self.begin(timeout, call) {
            Begun::Ready(outcome) => ActorResponse::reply(self.conclude(model, outcome, ctx)),
            Begun::Pending(fut) => {
                let model = model.to_string();
                ActorResponse::r#async(
                    fut.into_actor(self)
                        .map(move |outcome, act, ctx| act.conclude(&model, outcome, ctx)),
                )
            }
        }
    }

    /// [`BackendActor::guarded`] for a [`Call`]: hands the result to
    /// `done` (at once when the call is ready at once).
    fn guarded_then<T: 'static>(
        &mut self,
        model: &str,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
        call: impl FnOnce(&dyn Backend) -> BackendFuture<T>,
        done: impl FnOnce(Result<T, VramError>) + 'static,
    ) {
        match self.begin(timeout, call) {
            Begun::Ready(outcome) => done(self.conclude(model, outcome, ctx)),
            Begun::Pending(fut) => {
                let model = model.to_string();
                ctx.spawn(
                    fut.into_actor(self)
                        .map(move |outcome, act, ctx| done(act.conclude(&model, outcome, ctx))),
                );
            }
        }
    }

    /// Starts one guarded call: its outcome if it is ready at once, else
    /// the future of its outcome (timed out after `timeout`).
    fn begin<T: 'static>(
        &mut self,
        timeout: Option<Duration>,
        call: impl FnOnce(&dyn Backend) -> BackendFuture<T>,
    ) -> Begun<T> {
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| call(self.backend.as_ref())));
        let mut fut = match started {
            Ok(fut) => AssertUnwindSafe(fut).catch_unwind(),
            Err(panic) => return Begun::Ready(CallEnd::Panicked(panic_text(&panic))),
        };
        if let Some(result) = (&mut fut).now_or_never() {
            return Begun::Ready(CallEnd::from(result));
        }
        Begun::Pending(Box::pin(async move {
            match timeout {
                Some(limit) => match actix::clock::timeout(limit, fut).await {
                    Ok(result) => CallEnd::from(result),
                    Err(_) => CallEnd::TimedOut(limit),
                },
                None => CallEnd::from(fut.await),
            }
        }))
    }

    /// Unloads `rest` one after the other, adding each result to `done`;
    /// stops at the first failure. Unloads that finish at once are
    /// handled in a loop; the first that does not continues as a future.
    fn unload_in_order(
        &mut self,
        mut rest: smallvec::IntoIter<[ArcStr; 4]>,
        mut done: Unloads,
        ctx: &mut Context<Self>,
    ) -> InOrder {
        let timeout = Some(self.unload_timeout);
        for id in rest.by_ref() {
            match self.begin(timeout, |b| b.unload(&id)) {
                Begun::Ready(outcome) => {
                    let result = self.conclude(&id, outcome, ctx);
                    let failed = result.is_err();
                    done.push((id, result));
                    if failed {
                        return Ok(done);
                    }
                }
                Begun::Pending(fut) => {
                    return Err(Box::pin(fut.into_actor(self).then(
                        move |outcome, act, ctx| {
                            let result = act.conclude(&id, outcome, ctx);
                            let failed = result.is_err();
                            done.push((id, result));
                            if failed {
                                return Box::pin(actix::fut::ready(done)) as Pending<_>;
                            }
                            match act.unload_in_order(rest, done, ctx) {
                                Ok(done) => Box::pin(actix::fut::ready(done)),
                                Err(next) => next,
                            }
                        },
                    )));
                }
            }
        }
        Ok(done)
    }

    fn conclude<T>(
        &mut self,
        model: &str,
        outcome: CallEnd<T>,
        ctx: &mut Context<Self>,
    ) -> Result<T, VramError> {
        match outcome {
            CallEnd::Done(value) => {
                self.consecutive = 0;
                Ok(value)
            }
            CallEnd::Failed(e) => {
                self.consecutive = 0;
                Err(match e.timed_out_after {
                    Some(after) => VramError::Timeout {
                        model: model.to_string(),
                        after_ms: after.as_millis() as u64,
                        reason: e.message,
                    },
                    None => VramError::BackendFailed {
                        model: model.to_string(),
                        reason: e.message,
                    },
                })
            }
            CallEnd::TimedOut(limit) => {
                self.consecutive = 0;
                Err(VramError::Timeout {
                    model: model.to_string(),
                    after_ms: limit.as_millis() as u64,
                    reason: String::new(),
                })
            }
            CallEnd::Panicked(text) => {
                tracing::warn!(kind = %self.kind, model = %model, panic = %text, "backend panicked; restarting it");
                ctx.stop();
                Err(VramError::BackendFailed {
                    model: model.to_string(),
                    reason: format!("backend panicked: {text}"),
                })
            }
        }
    }
}

/// How one backend call ended.
/// Unloads in order: all results at once, or the rest as a future.
type InOrder = Result<Unloads, Pending<Unloads>>;

/// Work the actor goes on with.
type Pending<T> = std::pin::Pin<Box<dyn ActorFuture<BackendActor, Output = T>>>;

/// A guarded call, started.
enum Begun<T> {
    /// It finished at once.
    Ready(CallEnd<T>),
    /// It goes on.
    Pending(futures::future::LocalBoxFuture<'static, CallEnd<T>>),
}

enum CallEnd<T> {
    Done(T),
    Failed(BackendError),
    TimedOut(Duration),
    Panicked(String),
}

impl<T> From<Result<Result<T, BackendError>, Box<dyn std::any::Any + Send>>> for CallEnd<T> {
    fn from(result: Result<Result<T, BackendError>, Box<dyn std::any::Any + Send>>) -> Self {
        match result {
            Ok(Ok(value)) => CallEnd::Done(value),
            Ok(Err(e)) => CallEnd::Failed(e),
            Err(panic) => CallEnd::Panicked(panic_text(&panic)),
        }
    }
}

impl Actor for BackendActor {
    type Context = Context<Self>;

    /// (Re)registers the exit watch: runs at the first start and after
    /// every restart.
    fn started(&mut self, _ctx: &mut Context<Self>) {
        if let Some(recipient) = self.on_exit.clone() {
            let kind = self.kind.clone();
            self.backend.watch(Rc::new(move |exit: ModelExit| {
                recipient.do_send(ModelExited {
                    kind: kind.clone(),
                    model: exit.model,
                    reason: exit.reason,
                });
            }));
        }
    }
}

impl Supervised for BackendActor {
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        self.restarts += 1;
        self.consecutive += 1;
        self.backend.reset();
        let delay = self.backoff_delay(self.consecutive);
        tracing::warn!(kind = %self.kind, restarts = self.restarts, delay_ms = delay.as_millis() as u64, "backend restarted");
        if !delay.is_zero() {
            // Holds the mailbox for the back-off; nothing else runs here.
            ctx.wait(actix::clock::sleep(delay).into_actor(self));
        }
        if let Some(recipient) = &self.on_restart {
            recipient.do_send(BackendRestarted {
                kind: self.kind.clone(),
                restarts: self.restarts,
            });
        }
    }
}

impl Handler<LoadModel> for BackendActor {
    type Result = ActorResponse<Self, Result<(), VramError>>;

    fn handle(&mut self, msg: LoadModel, ctx: &mut Context<Self>) -> Self::Result {
        let spec = msg.0;
        let timeout = Some(self.load_timeout);
        self.guarded(&spec.id, timeout, ctx, |b| b.load(&spec))
    }
}

impl Handler<UnloadModel> for BackendActor {
    type Result = ActorResponse<Self, Result<(), VramError>>;

    fn handle(&mut self, msg: UnloadModel, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let timeout = Some(self.unload_timeout);
        self.guarded(&id, timeout, ctx, |b| b.unload(&id))
    }
}

impl Handler<UnloadModels> for BackendActor {
    type Result = ActorResponse<Self, Vec<(ArcStr, Result<(), VramError>)>>;

    fn handle(&mut self, msg: UnloadModels, ctx: &mut Context<Self>) -> Self::Result {
        let done = Unloads::with_capacity(msg.0.len());
        match self.unload_in_order(Ids::from_vec(msg.0).into_iter(), done, ctx) {
            Ok(done) => ActorResponse::reply(done.into_vec()),
            Err(rest) => ActorResponse::r#async(rest.map(|done, _, _| done.into_vec())),
        }
    }
}

impl Handler<ParkModel> for BackendActor {
    type Result = ActorResponse<Self, Result<(), VramError>>;

    fn handle(&mut self, msg: ParkModel, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let timeout = Some(self.unload_timeout);
        self.guarded(&id, timeout, ctx, |b| b.park(&id))
    }
}

impl Handler<WakeModel> for BackendActor {
    type Result = ActorResponse<Self, Result<(), VramError>>;

    fn handle(&mut self, msg: WakeModel, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let timeout = Some(self.load_timeout);
        self.guarded(&id, timeout, ctx, |b| b.wake(&id))
    }
}

impl Handler<Call> for BackendActor {
    type Result = ();

    fn handle(&mut self, msg: Call, ctx: &mut Context<Self>) {
        let Call { what, answer } = msg;
        if answer.caller_stopped() {
            return;
        }
        match what {
            CallKind::Load(spec) => self.load_now(spec, answer, ctx),
            CallKind::Wake(id) => {
                let timeout = Some(self.load_timeout);
                self.guarded_then(
                    &id,
                    timeout,
                    ctx,
                    |b| b.wake(&id),
                    |r| answer.send(Answer::Done(r)),
                );
            }
            CallKind::Unload(models) => {
                // A load's victims on one backend are usually one: its
                // answer stays inline.
                let done = Unloads::new();
                match self.unload_in_order(models.into_iter(), done, ctx) {
                    Ok(done) => answer.send(Answer::Unloaded(done)),
                    Err(rest) => {
                        ctx.spawn(rest.map(move |done, _, _| answer.send(Answer::Unloaded(done))));
                    }
                }
            }
            CallKind::UnloadThenLoad(models, spec, when_free) => {
                let done = Unloads::new();
                match self.unload_in_order(models.into_iter(), done, ctx) {
                    Ok(done) => self.load_after(done, spec, when_free, answer, ctx),
                    Err(rest) => {
                        ctx.spawn(rest.map(move |done, act, ctx| {
                            act.load_after(done, spec, when_free, answer, ctx)
                        }));
                    }
                }
            }
            CallKind::List => {
                let label = format!("<{} backend>", self.kind);
                let timeout = Some(self.unload_timeout);
                self.guarded_then(
                    &label,
                    timeout,
                    ctx,
                    |b| {
                        let (loaded, parked) = (b.loaded(), b.parked());
                        Box::pin(async move {
                            let loaded = loaded.await?;
                            // Not knowing which models sleep is no reason
                            // to leave the ledger unrebuilt: all count whole.
                            let parked = parked.await.unwrap_or_else(|e| {
                                tracing::warn!(error = %e.message, "could not list the parked models; counting every model whole");
                                Vec::new()
                            });
                            Ok(Held { loaded, parked })
                        })
                    },
                    |r| answer.send(Answer::Listed(r)),
                );
            }
        }
    }
}

impl BackendActor {
    /// Answers the unloads `done` of an [`CallKind::UnloadThenLoad`]; if
    /// every one succeeded (a failure, or a panic that is stopping this
    /// actor, ends the call there), loads `spec`, at once or once the card
    /// shows `when_free` bytes free.
    fn load_after(
        &mut self,
        done: Unloads,
        spec: Arc<ModelSpec>,
        when_free: Option<u64>,
        mut answer: AnswerTo,
        ctx: &mut Context<Self>,
    ) {
        if done.iter().any(|(_, result)| result.is_err()) {
            return answer.send(Answer::Unloaded(done));
        }
        let Some(target) = when_free else {
            answer.send_then(Answer::Unloaded(done), Some(Lost::Done));
            return self.load_now(spec, answer, ctx);
        };
        answer.send_then(Answer::Unloaded(done), Some(Lost::Card));
        let Some(probe) = self.probe.clone() else {
            let unread = ProbeError("no probe for the backend to read".to_string());
            return answer.send(Answer::Card(Err(unread)));
        };
        match guarded_read_at_once(probe.as_ref()) {
            Some(read) => self.load_if_free(read, target, spec, answer, ctx),
            None => {
                ctx.spawn(
                    guarded_read(probe.as_ref())
                        .into_actor(self)
                        .map(move |read, act, ctx| {
                            act.load_if_free(read, target, spec, answer, ctx)
                        }),
                );
            }
        }
    }

    /// Loads `spec` if the card `read` shows `target` bytes free; else
    /// answers the reading.
    fn load_if_free(
        &mut self,
        read: Result<GpuMemory, ProbeError>,
        target: u64,
        spec: Arc<ModelSpec>,
        mut answer: AnswerTo,
        ctx: &mut Context<Self>,
    ) {
        match read {
            Ok(card) if card.free >= target => {
                answer.send_then(Answer::LoadingAfter(card), Some(Lost::Done));
                self.load_now(spec, answer, ctx);
            }
            read => answer.send(Answer::Card(read)),
        }
    }

    /// Loads `spec`, unless its caller has closed since it asked (it
    /// answers `unavailable`); a stopped caller gets nothing.
    fn load_now(&mut self, spec: Arc<ModelSpec>, answer: AnswerTo, ctx: &mut Context<Self>) {
        if answer.caller_stopped() {
            // Nobody waits for the load: it is not started (dropped, the
            // answer says nothing to a stopped caller).
            return;
        }
        if answer.caller_closed() {
            return answer.send(Answer::Done(Err(VramError::shutting_down())));
        }
        let timeout = Some(self.load_timeout);
        self.guarded_then(
            &spec.id,
            timeout,
            ctx,
            |b| b.load(&spec),
            |r| answer.send(Answer::Done(r)),
        );
    }
}

impl Handler<ListLoaded> for BackendActor {
    type Result = ActorResponse<Self, Result<Vec<String>, VramError>>;

    fn handle(&mut self, _msg: ListLoaded, ctx: &mut Context<Self>) -> Self::Result {
        let label = format!("<{} backend>", self.kind);
        let timeout = Some(self.unload_timeout);
        self.guarded(&label, timeout, ctx, |b| b.loaded())
    }
}

impl Handler<Crash> for BackendActor {
    type Result = ();

    fn handle(&mut self, msg: Crash, ctx: &mut Context<Self>) {
        let kind = self.kind.clone();
        if msg.escape {
            panic!("uncaught crash requested for {kind}");
        }
        let caught = std::panic::catch_unwind(move || panic!("crash requested for {kind}"));
        let Err(panic) = caught;
        tracing::warn!(kind = %self.kind, panic = %panic_text(&panic), "backend crashed; restarting it");
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Catalog;

    struct Nothing;

    impl Backend for Nothing {
        fn load(&self, _: &ModelSpec) -> BackendFuture<()> {
            Box::pin(async { Ok(()) })
        }
        fn unload(&self, _: &str) -> BackendFuture<()> {
            Box::pin(async { Ok(()) })
        }
        fn loaded(&self) -> BackendFuture<Vec<String>> {
            Box::pin(async { Ok(vec![]) })
        }
    }

    /// Unloads every model but `refuse`, yielding once first when `slow`;
    /// records what it was asked to unload.
    struct Recorder {
        refuse: &'static str,
        slow: bool,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Backend for Recorder {
        fn load(&self, _: &ModelSpec) -> BackendFuture<()> {
            Box::pin(async { Ok(()) })
        }
        fn unload(&self, id: &str) -> BackendFuture<()> {
            self.asked.borrow_mut().push(id.to_string());
            let (refused, slow) = (id == self.refuse, self.slow);
            Box::pin(async move {
                if slow {
                    actix::clock::sleep(Duration::from_millis(1)).await;
                }
                if refused {
                    Err(BackendError::new("refused"))
                } else {
                    Ok(())
                }
            })
        }
        fn loaded(&self) -> BackendFuture<Vec<String>> {
            Box::pin(async { Ok(vec![]) })
        }
    }

    #[actix::test]
    async fn a_batch_of_unloads_stops_at_the_first_failure() {
        for slow in [false, true] {
            let backend = Rc::new(Recorder {
                refuse: "b",
                slow,
                asked: Default::default(),
            });
            let actor = BackendActor::new("llm", backend.clone(), &config()).start();
            let models = ["a", "b", "c"].map(ArcStr::from).to_vec();
            let results = actor.send(UnloadModels(models)).await.unwrap();
            assert_eq!(results.len(), 2, "slow: {slow}");
            assert!(results[0].0 == "a" && results[0].1.is_ok());
            assert!(
                matches!(&results[1], (id, Err(VramError::BackendFailed { model, .. })) if id == "b" && model == "b"),
                "{results:?}"
            );
            assert_eq!(*backend.asked.borrow(), ["a", "b"], "c was never asked");
        }
    }

    #[actix::test]
    async fn a_batch_of_unloads_answers_each_in_order() {
        for slow in [false, true] {
            let backend = Rc::new(Recorder {
                refuse: "none",
                slow,
                asked: Default::default(),
            });
            let actor = BackendActor::new("llm", backend.clone(), &config()).start();
            let models = ["c", "a", "b"].map(ArcStr::from).to_vec();
            let results = actor.send(UnloadModels(models)).await.unwrap();
            assert_eq!(results.len(), 3);
            assert!(results.iter().all(|(_, r)| r.is_ok()));
            let ids: Vec<&str> = results.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids, ["c", "a", "b"]);
            assert_eq!(*backend.asked.borrow(), ["c", "a", "b"]);
        }
    }

    fn config() -> ManagerConfig {
        ManagerConfig {
            capacity: 1,
            kinds: Default::default(),
            catalog: Catalog::new(),
            lease_wait: Duration::ZERO,
            load_timeout: Duration::from_secs(1),
            unload_timeout: Duration::from_secs(1),
            max_queue: 1,
            order: Default::default(),
            host_budget: 0,
            gpu: 0,
            restart_backoff: Duration::from_millis(10),
            restart_backoff_max: Duration::from_millis(100),
            reserve: 0,
            release_fraction: 0.75,
            release_poll: Duration::from_millis(10),
            release_timeout: Duration::from_secs(1),
            ttl: Default::default(),
        }
    }

    #[test]
    fn restart_backoff_doubles_up_to_its_cap() {
        let actor = BackendActor::new("tts", Rc::new(Nothing), &config());
        let delays: Vec<u64> = (1..=6)
            .map(|n| actor.backoff_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 100, 100]);
        assert_eq!(
            actor.backoff_delay(1000),
            Duration::from_millis(100),
            "no overflow"
        );
    }
}
