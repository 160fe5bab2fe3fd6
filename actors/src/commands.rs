//! How the `VramActor` carries out its running job's commands: a backend
//! call is a [`Call`] message to that kind's `BackendActor`, answered by a
//! [`CallAnswered`] put in the manager's [`Caller`] queue and fed to the job
//! once the mailbox is empty (no reply channel, no spawned future and no
//! message back per call; an answer dropped unsent answers "lost", as a
//! dropped reply channel would); a card read that is ready at once is
//! answered at once; a wait is a timer. A backend actor found dead is
//! replaced.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use arcstr::ArcStr;
use futures::FutureExt;

use crate::backend::Held;
use crate::backend_actor::{
    Answer, AnswerTo, Call, CallAnswered, CallKind, Caller, Crash, Lost, ParkModel, UnloadModels,
};
use crate::error::VramError;
use crate::job::RestartJob;
use crate::job::{Command, Event};
use crate::model::Ids;
use crate::probe::{GpuMemory, ProbeError, guarded_read, guarded_read_at_once};
use crate::queue::Queued;
use crate::vram_actor::{VramActor, now};

impl VramActor {
    /// Carries out one command of job `id`; answers its event when it is
    /// known at once.
    pub(crate) fn execute(
        &mut self,
        id: u64,
        command: Command,
        ctx: &mut Context<Self>,
    ) -> Option<Event> {
        match command {
            Command::Publish(event) => {
                self.publish(event);
                None
            }
            Command::CountEviction { model, kind } => {
                self.count_eviction(&model, &kind);
                None
            }
            // No new reading once the manager is stopping: a release wait
            // would spin (its waits answer at once), so the job goes on as
            // without a probe, and its load is refused.
            Command::ReadCard if self.shutting_down => Some(Event::Card(None)),
            Command::ReadCard => {
                let Some(probe) = self.probe.clone() else {
                    return Some(Event::Card(None));
                };
                if let Some(result) = guarded_read_at_once(probe.as_ref()) {
                    self.last_card = card(result);
                    return Some(Event::Card(self.last_card));
                }
                let mut read = guarded_read(probe.as_ref());
                // A simulated card answers at once: no trip through the
                // actor's context.
                if let Some(result) = (&mut read).now_or_never() {
                    self.last_card = card(result);
                    return Some(Event::Card(self.last_card));
                }
                ctx.spawn(read.into_actor(self).map(move |result, act, ctx| {
                    act.last_card = card(result);
                    let memory = act.last_card;
                    act.feed(id, Event::Card(memory), ctx)
                }));
                None
            }
            Command::Unload { kind, models } => self.unload(id, kind, models, ctx),
            // After `Shutdown` the backend unloads but does not load (it
            // sees its caller closed): the job aborts.
            Command::UnloadThenLoad {
                models,
                spec,
                when_free,
            } => match self.actor_slot(&spec.kind) {
                Some(slot) => {
                    self.call(id, slot, CallKind::UnloadThenLoad(models, spec, when_free));
                    None
                }
                // No backend: the first victim fails (the job aborts), or
                // with none, the load does.
                None if models.is_empty() => {
                    // As the backend would answer: a job waiting for its
                    // reading gets none (and asks for the load itself).
                    let next = match when_free {
                        Some(_) => Event::Card(None),
                        None => Event::Loaded(Err(no_backend(&spec.kind, &spec.id))),
                    };
                    ctx.spawn(ActorFutureExt::map(
                        fut::ready(()),
                        move |(), act: &mut Self, ctx| {
                            act.feed_all(id, [Event::UnloadsDone, next], ctx);
                        },
                    ));
                    None
                }
                None => self.unload(id, spec.kind.clone(), models, ctx),
            },
            Command::Park { kind, model } => self.park(id, kind, model, ctx),
            // After `Shutdown` no model server wakes: the job aborts.
            Command::Wake(_) if self.shutting_down => {
                Some(Event::Loaded(Err(VramError::shutting_down())))
            }
            Command::Wake(spec) => self.ask(id, &spec.kind, CallKind::Wake(spec.id.clone())),
            // After `Shutdown` no model server starts: the job aborts.
            Command::Load(_) if self.shutting_down => {
                Some(Event::Loaded(Err(VramError::shutting_down())))
            }
            Command::WaitRelease { .. } | Command::Wait { .. } if self.shutting_down => {
                Some(Event::Deadline)
            }
            Command::Load(spec) => match self.actor_slot(&spec.kind) {
                Some(slot) => {
                    self.call(id, slot, CallKind::Load(spec));
                    None
                }
                None => self.ask(id, &spec.kind.clone(), CallKind::Load(spec)),
            },
            Command::Crash { kind } => {
                let label = format!("<{kind} backend>");
                let Some(backend) = self.actor(&kind).cloned() else {
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
            Command::List { kind } => self.ask(id, &kind, CallKind::List),
            Command::WaitRelease { until } => {
                self.waits_release = true;
                self.wait(id, until, ctx);
                None
            }
            Command::Wait { until } => {
                self.wait(id, until, ctx);
                None
            }
            // No new reading once the manager is stopping.
            Command::Warm if self.shutting_down => None,
            Command::Warm => {
                let model = self.running_model();
                if let (Some(warm), Some(model)) = (&self.warm, model) {
                    warm(model);
                }
                None
            }
            Command::Reconcile { kind } => {
                self.queue
                    .push_front(Queued::Restart(RestartJob::reconcile(kind), vec![]));
                None
            }
        }
    }

    /// Asks the backend of `kind` for a load, a wake or a list (see
    /// [`VramActor::call`]), or answers the failure at once: no backend
    /// for that kind.
    fn ask(&mut self, id: u64, kind: &str, what: CallKind) -> Option<Event> {
        if let Some(slot) = self.actor_slot(kind) {
            self.call(id, slot, what);
            return None;
        }
        let failed = Err(no_backend(kind, &self.call_label(kind)));
        Some(match what {
            CallKind::List => Event::Listed(failed.map(|()| Held::default())),
            _ => Event::Loaded(failed),
        })
    }

    /// Sends `what` to the backend actor in `slot` of `actors`; its answer
    /// comes back through [`Caller`] as a [`CallAnswered`] for job `id`.
    fn call(&mut self, id: u64, slot: usize, what: CallKind) {
        let lost = match &what {
            CallKind::Load(_) | CallKind::Wake(_) => Lost::Done,
            CallKind::List => Lost::Listed,
            CallKind::Unload(models) | CallKind::UnloadThenLoad(models, ..) => {
                Lost::Unloaded(models.first().cloned().unwrap_or_default())
            }
        };
        let answer = AnswerTo::new(id, slot, self.caller.clone(), lost);
        self.actors[slot].1.do_send(Call { what, answer });
    }

    /// What a failed call to `kind`'s backend is about: the running job's
    /// model, else that backend.
    fn call_label(&self, kind: &str) -> String {
        match self.running_model() {
            Some(model) => model.to_string(),
            None => format!("<{kind} backend>"),
        }
    }

    /// Unloads `models` on the backend of `kind` with one message; its
    /// answer feeds job `id` one `Unloads` event (with no backend: one
    /// failed `Unloaded`, then `UnloadsDone`).
    fn unload(
        &mut self,
        id: u64,
        kind: ArcStr,
        models: Ids,
        ctx: &mut Context<Self>,
    ) -> Option<Event> {
        if let Some(slot) = self.actor_slot(&kind) {
            if models.is_empty() {
                return Some(Event::UnloadsDone);
            }
            self.call(id, slot, CallKind::Unload(models));
            return None;
        }
        let Some(first) = models.into_iter().next() else {
            return Some(Event::UnloadsDone);
        };
        // Answered as a backend would: the first fails, then done.
        let result = Err(no_backend(&kind, &first));
        ctx.spawn(ActorFutureExt::map(
            fut::ready(()),
            move |(), act: &mut Self, ctx| {
                let unloaded = Event::Unloaded {
                    model: first,
                    result,
                };
                act.feed(id, unloaded, ctx);
                act.feed(id, Event::UnloadsDone, ctx);
            },
        ));
        None
    }

    /// Parks `model` on the backend of `kind`; if its sleep fails, stops
    /// it instead. Feeds job `id` one `Parked`, then `UnloadsDone`.
    fn park(
        &mut self,
        id: u64,
        kind: ArcStr,
        model: ArcStr,
        ctx: &mut Context<Self>,
    ) -> Option<Event> {
        let Some(backend) = self.actor(&kind).cloned() else {
            let result = Err(no_backend(&kind, &model));
            ctx.spawn(ActorFutureExt::map(
                fut::ready(()),
                move |(), act: &mut Self, ctx| {
                    act.feed(id, Event::Parked { model, result }, ctx);
                    act.feed(id, Event::UnloadsDone, ctx);
                },
            ));
            return None;
        };
        let label = model.clone();
        ctx.spawn(
            backend
                .send(ParkModel(model.to_string()))
                .into_actor(self)
                .then(move |answer, act, _ctx| {
                    let stop = match answer {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                    let backend = backend.clone();
                    let model = label.clone();
                    async move {
                        match stop {
                            None => Ok(true),
                            Some(reason) => {
                                // A failed sleep falls back to stopping.
                                tracing::warn!(model = %model, reason = %reason, "park failed; stopping the server instead");
                                match backend.send(UnloadModels(vec![model.clone()])).await {
                                    Ok(mut results) => results
                                        .pop()
                                        .map_or(Ok(false), |(_, r)| r.map(|()| false)),
                                    Err(e) => Err(VramError::BackendFailed {
                                        model: model.to_string(),
                                        reason: format!("backend actor unavailable: {e}"),
                                    }),
                                }
                            }
                        }
                    }
                    .into_actor(act)
                })
                .map(move |result, act, ctx| {
                    act.feed(id, Event::Parked { model, result }, ctx);
                    act.feed(id, Event::UnloadsDone, ctx);
                }),
        );
        None
    }

    /// A call found its backend actor (the one in `slot` of `actors`)
    /// gone: if it is dead (a panic escaped its guards, so its supervisor
    /// could not restart it), start a fresh one and reconcile with it first
    /// thing.
    fn backend_lost(
        &mut self,
        slot: usize,
        label: &str,
        error: MailboxError,
        ctx: &mut Context<Self>,
    ) -> VramError {
        if self.actors[slot].1.connected() {
            // The supervisor restarted the actor while it handled this
            // call (or it was replaced already); the call's future went
            // with the old instance.
            return VramError::BackendFailed {
                model: label.to_string(),
                reason: "the backend restarted during the call".to_string(),
            };
        }
        let kind = self.actors[slot].0.clone();
        self.replace_backend(&kind, ctx);
        VramError::BackendFailed {
            model: label.to_string(),
            reason: format!("backend actor unavailable: {error}"),
        }
    }

    /// Replaces the backend actor of `kind` if it is dead, and queues a
    /// reconcile with the fresh one ahead of everything.
    pub(crate) fn replace_backend(&mut self, kind: &str, ctx: &mut Context<Self>) {
        if self.actor(kind).is_none_or(|a| a.connected()) {
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
}

/// Feeds the backend answers that came in, once the mailbox is empty
/// (actix polls an actor's spawned futures after its mailbox). An answer
/// so waits for the messages already in the mailbox: a backend that
/// restarts (after a panic in this call or in another) announces it just
/// behind its answer, and the reconcile that restart calls for must be
/// queued before the job ends, so that no other job plans on the stale
/// ledger. Spawned once per instance of the `VramActor`; it never
/// finishes, and is woken by each answer.
struct FeedAnswers {
    caller: Arc<Caller>,
    /// Whether the caller wakes this future's task. A context runs in one
    /// task for its whole life, so its waker is given once, not at every
    /// pass of the context (each pass polls this future).
    registered: bool,
    /// The answers being fed (kept: its buffer and the inbox's are
    /// swapped, not made anew).
    batch: VecDeque<CallAnswered>,
}

impl ActorFuture<VramActor> for FeedAnswers {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        act: &mut VramActor,
        ctx: &mut Context<VramActor>,
        task: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.get_mut();
        if !this.registered {
            this.caller.wake(task.waker());
            this.registered = true;
        }
        // In order, batch after batch: feeding an answer may drop a call
        // whose answer comes back into the inbox, behind the batch. One
        // reading of the clock per batch: its answers came together (a
        // backend's unloads, card reading and load, answered at once),
        // and a job started while the batch is fed (the next in the
        // queue, which reads the clock itself) has its answers in a later
        // batch, never timed before it started.
        loop {
            this.caller.take_all(&mut this.batch);
            if this.batch.is_empty() {
                break;
            }
            let now = crate::vram_actor::now();
            while let Some(msg) = this.batch.pop_front() {
                act.answered(msg, now, ctx);
            }
        }
        std::task::Poll::Pending
    }
}

impl VramActor {
    /// Starts feeding backend answers to jobs (at every start of this
    /// actor, restarts included). Answers to an earlier instance's calls
    /// are for jobs that are gone.
    pub(crate) fn feed_answers(&mut self, ctx: &mut Context<Self>) {
        self.caller = Arc::default();
        if self.shutting_down {
            self.caller.close();
        }
        ctx.spawn(FeedAnswers {
            caller: self.caller.clone(),
            registered: false,
            batch: VecDeque::new(),
        });
    }

    /// Feeds one backend answer to its job, at `now`.
    fn answered(&mut self, msg: CallAnswered, now: Instant, ctx: &mut Context<Self>) {
        let CallAnswered { job, slot, answer } = msg;
        match answer {
            Answer::Done(result) => {
                self.feed_at(job, Event::Loaded(result), now, ctx);
            }
            Answer::Listed(result) => {
                self.feed_at(job, Event::Listed(result), now, ctx);
            }
            Answer::Unloaded(results) => {
                self.feed_at(job, Event::Unloads(results), now, ctx);
            }
            Answer::Card(read) => {
                self.last_card = card(read);
                self.feed_at(job, Event::Card(self.last_card), now, ctx);
            }
            Answer::LoadingAfter(memory) => {
                self.last_card = Some(memory);
                self.feed_at(job, Event::LoadingAfter(memory), now, ctx);
            }
            Answer::Lost(Lost::Unloaded(first)) => {
                let result = Err(self.backend_lost(slot, &first, MailboxError::Closed, ctx));
                let unloaded = Event::Unloaded {
                    model: first,
                    result,
                };
                self.feed_all_at(job, [unloaded, Event::UnloadsDone], now, ctx);
            }
            Answer::Lost(lost) => {
                let label = self.call_label(&self.actors[slot].0);
                let error = self.backend_lost(slot, &label, MailboxError::Closed, ctx);
                let event = match lost {
                    Lost::Listed => Event::Listed(Err(error)),
                    // The backend went before it read the card (so it did
                    // not load): the read falls back to the manager.
                    Lost::Card => match self.execute(job, Command::ReadCard, ctx) {
                        Some(read) => read,
                        None => return,
                    },
                    _ => Event::Loaded(Err(error)),
                };
                self.feed_at(job, event, now, ctx);
            }
        }
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
