//! What the `VramActor` answers: the handlers of its public messages. Each
//! either answers at once from the books (Status, Release, Acquire of a
//! resident model no queued job is about, Load of a resident model when
//! nothing is queued) or queues a job (see `vram_actor.rs` for the queue,
//! `job/` for the jobs).

use actix::prelude::*;
use arcstr::ArcStr;

use crate::backend_actor::{BackendActor, BackendRestarted, ModelExited};
use crate::error::VramError;
use crate::events::{Loaded, Unloaded, VramEvent};
use crate::job::{RestartJob, UnloadJob};
use crate::messages::{
    Acquire, BackendOf, CardSnapshot, CardStatus, CrashBackend, Lease, Load, Release, SetPinned,
    Shutdown, Snapshot, Status, StatusReport, Subscribe, Unload,
};
use crate::order::Order;
use crate::policy::{scores, servable};
use crate::probe::{guarded_read, guarded_read_at_once};
use crate::queue::{LoadWaiter, Queued};
use crate::reply::{Deferred, deferred};
use crate::vram_actor::{VramActor, now};

impl VramActor {
    /// Policy step 1 against the sizes plans use now.
    /// Answers the catalog's shared id of a servable model.
    fn servable(&self, model: &str) -> Result<ArcStr, VramError> {
        servable(&self.books.planned, self.books.ledger.capacity(), model).map(|s| s.id.clone())
    }
}

impl Handler<Load> for VramActor {
    type Result = Deferred<Loaded>;

    fn handle(&mut self, msg: Load, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Deferred::now(Err(VramError::shutting_down()));
        }
        let model = match self.servable(&msg.model) {
            Ok(model) => model,
            Err(e) => return Deferred::now(Err(e)),
        };
        // Already resident and nothing queued or running that could change
        // that first: policy step 2 (touch, nothing else) needs no trip
        // through the queue.
        if self.books.ledger.is_resident(&msg.model) && !self.is_busy() {
            // Every accepted request counts in the history the adaptive
            // order predicts from (a counter and two small updates; under
            // the strict order, nothing).
            self.books.note_request(&msg.model, false);
            self.books.touch(&msg.model, now());
            return Deferred::now(Ok(Loaded {
                model,
                evicted: vec![],
                already_resident: true,
            }));
        }
        let miss = self.counted_miss(&msg.model);
        // The catalog's id, shared by the answer's label and the job.
        let (reply, answer) = deferred(model.clone());
        match self.submit_load(model, LoadWaiter::Load(reply), ctx) {
            Ok(()) => {
                self.books.note_request(&msg.model, miss);
                answer
            }
            Err(e) => Deferred::now(Err(e)),
        }
    }
}

impl Handler<Acquire> for VramActor {
    type Result = Deferred<Lease>;

    fn handle(&mut self, msg: Acquire, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Deferred::now(Err(VramError::shutting_down()));
        }
        if self.books.ledger.is_resident(&msg.model) && !self.job_pending_for(&msg.model) {
            self.books.note_request(&msg.model, false);
            return Deferred::now(self.lease(&msg.model, Vec::new()));
        }
        let model = match self.servable(&msg.model) {
            Ok(model) => model,
            Err(e) => return Deferred::now(Err(e)),
        };
        let miss = self.counted_miss(&msg.model);
        let (reply, answer) = deferred(model.clone());
        match self.submit_load(model, LoadWaiter::Acquire(reply), ctx) {
            Ok(()) => {
                self.books.note_request(&msg.model, miss);
                answer
            }
            Err(e) => Deferred::now(Err(e)),
        }
    }
}

impl Handler<SetPinned> for VramActor {
    type Result = Result<(), VramError>;

    fn handle(&mut self, msg: SetPinned, _ctx: &mut Context<Self>) -> Self::Result {
        let unknown = || VramError::UnknownModel {
            model: msg.model.clone(),
        };
        let mut spec = self
            .books
            .declared
            .get(&msg.model)
            .cloned()
            .ok_or_else(unknown)?;
        spec.pinned = msg.pinned;
        self.books.declared.insert(spec);
        if let Some(mut planned) = self.books.planned.get(&msg.model).cloned() {
            planned.pinned = msg.pinned;
            self.books.planned.insert(planned);
        }
        self.books.ledger.set_pinned(&msg.model, msg.pinned);
        tracing::info!(model = %msg.model, pinned = msg.pinned, "pinning changed");
        Ok(())
    }
}

impl Handler<Release> for VramActor {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) {
        if self.books.release(msg.lease, now()) {
            self.released(ctx);
        }
    }
}

impl Handler<Unload> for VramActor {
    type Result = Deferred<Unloaded>;

    fn handle(&mut self, msg: Unload, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Deferred::now(Err(VramError::shutting_down()));
        }
        let Some(model) = self.books.declared.get(&msg.model).map(|s| s.id.clone()) else {
            return Deferred::now(Err(VramError::UnknownModel { model: msg.model }));
        };
        if self.books.ledger.get(&msg.model).is_none() && !self.job_pending_for(&msg.model) {
            return Deferred::now(Ok(Unloaded {
                model,
                was_resident: false,
            }));
        }
        let job = UnloadJob::new(model.clone());
        let (reply, answer) = deferred(model);
        match self.submit(Queued::Unload(job, vec![reply]), ctx) {
            Ok(()) => answer,
            Err(e) => Deferred::now(Err(e)),
        }
    }
}

impl Handler<CrashBackend> for VramActor {
    type Result = Deferred<()>;

    fn handle(&mut self, msg: CrashBackend, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Deferred::now(Err(VramError::shutting_down()));
        }
        let (reply, answer) = deferred(format!("<{} backend>", msg.kind));
        match self.submit(
            Queued::Restart(RestartJob::crash(msg.kind), vec![reply]),
            ctx,
        ) {
            Ok(()) => answer,
            Err(e) => Deferred::now(Err(e)),
        }
    }
}

impl Handler<BackendRestarted> for VramActor {
    type Result = ();

    fn handle(&mut self, msg: BackendRestarted, ctx: &mut Context<Self>) {
        // A running crash job of this kind reconciles by itself.
        if !self.crashing(&msg.kind) {
            self.reconcile_first(msg.kind, ctx);
        }
    }
}

impl Handler<ModelExited> for VramActor {
    type Result = ();

    /// A resident model's server exited: it is gone from the card, so it
    /// leaves the ledger now and its leases become void. A model that a
    /// running job is loading or unloading is left to that job.
    fn handle(&mut self, msg: ModelExited, ctx: &mut Context<Self>) {
        if !self.books.server_exited(&msg.model) {
            // Not resident: if a job is loading it, that job cannot see the
            // exit; make the ledger agree with the backend right after it.
            if self.books.ledger.get(&msg.model).is_some() {
                self.reconcile_first(msg.kind, ctx);
            }
            return;
        }
        // Its leases are void: a job waiting for a release may go on.
        self.released(ctx);
        tracing::warn!(model = %msg.model, kind = %msg.kind, reason = %msg.reason, "model server exited");
        self.publish(VramEvent::ModelExited {
            model: msg.model.into(),
            kind: msg.kind.into(),
            reason: msg.reason,
        });
    }
}

/// Stop the manager actor (fault testing). Under a `Supervisor` it is
/// started again and rebuilds its ledger from the backends before taking
/// the next job; otherwise it stays stopped. Unlike [`Shutdown`], model
/// servers are left running.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopManager;

impl Handler<StopManager> for VramActor {
    type Result = ();

    fn handle(&mut self, _msg: StopManager, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Shutdown> for VramActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        self.caller.close();
        self.refuse_queued();
        tracing::info!(
            running = self.is_running(),
            "shutting down; stopping every backend"
        );
        // Straight to the backends, not through their actors: a long load
        // in an actor's mailbox must not hold the shutdown back.
        let stops: Vec<_> = self
            .backends
            .iter()
            .map(|(kind, backend)| {
                let (kind, stop) = (kind.clone(), backend.clone().shutdown());
                async move { (kind, stop.await) }
            })
            .collect();
        Box::pin(
            futures::future::join_all(stops)
                .into_actor(self)
                .map(|results, act, _ctx| {
                    for (kind, result) in results {
                        if let Err(e) = result {
                            tracing::warn!(kind = %kind, error = %e, "backend did not shut down cleanly");
                        }
                    }
                    for (_, (_, valid)) in act.books.leases.drain() {
                        valid.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                    act.books.ledger.clear();
                    act.books.last_used.clear();
                    tracing::info!("shut down");
                }),
        )
    }
}

impl Handler<Status> for VramActor {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _msg: Status, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(StatusReport {
            capacity: self.books.ledger.capacity(),
            used: self.books.ledger.used(),
            free: self.books.ledger.free(),
            queued: self.queue.len(),
            running: self.is_running(),
            models: self.books.ledger.entries().cloned().collect(),
            idle_ms: {
                let now = now();
                self.books
                    .last_used
                    .iter()
                    .map(|(id, at)| {
                        let idle = now.saturating_duration_since(*at).as_millis();
                        (id.to_string(), u64::try_from(idle).unwrap_or(u64::MAX))
                    })
                    .collect()
            },
            card: self.last_card,
            order: self.books.order,
            scores: match self.books.order {
                Order::Adaptive => scores(&self.books.ledger),
                Order::Strict => Vec::new(),
            },
            gpus: vec![CardStatus {
                gpu: self.books.ledger.gpu(),
                capacity: self.books.ledger.capacity(),
                used: self.books.ledger.used(),
                free: self.books.ledger.free(),
                card: self.last_card,
            }],
        })
    }
}

impl Handler<Snapshot> for VramActor {
    type Result = ActorResponse<Self, CardSnapshot>;

    fn handle(&mut self, _msg: Snapshot, _ctx: &mut Context<Self>) -> Self::Result {
        let mut snapshot = CardSnapshot {
            ledger: self.books.ledger.clone(),
            pending: self.pending_loads(),
            card_free: None,
        };
        let reserve = self.books.reserve;
        let Some(probe) = self.probe.clone() else {
            return ActorResponse::reply(snapshot);
        };
        // A card that fails to answer is left out (the ledger stands).
        if let Some(read) = guarded_read_at_once(probe.as_ref()) {
            snapshot.card_free = read.ok().map(|m| m.free.saturating_sub(reserve));
            return ActorResponse::reply(snapshot);
        }
        ActorResponse::r#async(fut::wrap_future(async move {
            snapshot.card_free = guarded_read(probe.as_ref())
                .await
                .ok()
                .map(|m| m.free.saturating_sub(reserve));
            snapshot
        }))
    }
}

impl Handler<Subscribe> for VramActor {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) {
        self.subscribers.push(msg.0);
        self.books.listening = true;
    }
}

impl Handler<BackendOf> for VramActor {
    type Result = Option<Addr<BackendActor>>;

    fn handle(&mut self, msg: BackendOf, _ctx: &mut Context<Self>) -> Self::Result {
        self.actor(&msg.0).cloned()
    }
}
