//! The jobs of the `VramActor`'s queue and the drivers that carry them out.
//!
//! A driver is a plain future spawned on the actor's context. It never
//! touches the ledger itself: each step that changes state is an internal
//! message to the actor (plan, victim unloaded, load done, ...), and each
//! backend call is an awaited message to that kind's `BackendActor`. So an
//! eviction is a sequence of awaited messages, and between two steps the
//! actor stays free to answer Status, Release and Acquire.

use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend_actor::{BackendActor, Crash, ListLoaded, LoadModel, UnloadModel};
use crate::error::VramError;
use crate::ledger::ModelState;
use crate::messages::{BackendOf, Loaded, Unloaded, VramEvent};
use crate::model::ModelSpec;
use crate::policy::{Plan, expired, plan};
use crate::probe::{GpuMemory, GpuProbe};
use crate::vram_actor::VramActor;

/// One operation of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobOp {
    /// Load a model (also serves Acquires that need a load).
    Load(String),
    /// Unload a model.
    Unload(String),
    /// Crash a kind's backend and wait for its restart.
    Crash(String),
    /// Make the ledger agree with a restarted backend of this kind.
    Reconcile(String),
    /// Unload a model that has been idle for its TTL (if it still is).
    Expire(String),
}

impl JobOp {
    /// The model this job is about, if any.
    pub(crate) fn model(&self) -> Option<&str> {
        match self {
            JobOp::Load(m) | JobOp::Unload(m) | JobOp::Expire(m) => Some(m),
            JobOp::Crash(_) | JobOp::Reconcile(_) => None,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone)]
pub(crate) enum JobResult {
    Loaded(Result<Loaded, VramError>),
    Unloaded(Result<Unloaded, VramError>),
    Done(Result<(), VramError>),
}

fn mismatch() -> VramError {
    VramError::BackendFailed {
        model: String::new(),
        reason: "internal: job answered with the wrong result".to_string(),
    }
}

impl JobResult {
    pub(crate) fn loaded(&self) -> Result<Loaded, VramError> {
        match self {
            JobResult::Loaded(r) => r.clone(),
            _ => Err(mismatch()),
        }
    }

    pub(crate) fn unloaded(&self) -> Result<Unloaded, VramError> {
        match self {
            JobResult::Unloaded(r) => r.clone(),
            _ => Err(mismatch()),
        }
    }

    pub(crate) fn done(&self) -> Result<(), VramError> {
        match self {
            JobResult::Done(r) => r.clone(),
            _ => Err(mismatch()),
        }
    }
}

fn stopped(model: &str) -> impl FnOnce(MailboxError) -> VramError + '_ {
    move |e| VramError::BackendFailed {
        model: model.to_string(),
        reason: format!("actor unavailable: {e}"),
    }
}

/// Sends `msg` to the backend actor of `kind`. If that actor is gone (a
/// panic escaped its guards, so its supervisor could not restart it), asks
/// the manager to start a fresh one; the request itself fails.
async fn ask<M, T>(
    me: &Addr<VramActor>,
    kind: &str,
    backend: &Addr<BackendActor>,
    msg: M,
    label: &str,
) -> Result<T, VramError>
where
    M: Message<Result = Result<T, VramError>> + Send + 'static,
    T: Send + 'static,
    BackendActor: Handler<M>,
{
    match backend.send(msg).await {
        Ok(result) => result,
        Err(e) => {
            if backend.connected() {
                // The supervisor restarted the actor while it handled this
                // call; the call's future went with the old instance.
                return Err(VramError::BackendFailed {
                    model: label.to_string(),
                    reason: "the backend restarted during the call".to_string(),
                });
            }
            let _ = me
                .send(ReplaceBackend {
                    kind: kind.to_string(),
                    dead: backend.clone(),
                })
                .await;
            Err(stopped(label)(e))
        }
    }
}

/// Builds the driver of `op`. Everything it needs is taken now, so the
/// future owns it and the actor stays free.
pub(crate) fn drive(
    op: JobOp,
    actor: &VramActor,
    me: Addr<VramActor>,
) -> impl Future<Output = JobResult> + 'static {
    let released = actor.released.clone();
    let lease_wait = actor.config.lease_wait;
    let card = Card {
        probe: actor.probe.clone(),
        fraction: actor.config.release_fraction,
        poll: actor.config.release_poll,
        timeout: actor.config.release_timeout,
    };
    let backend = |kind: &str| actor.actors.get(kind).cloned();
    let (span, kind_backend) = match &op {
        JobOp::Load(m) => {
            let spec = actor.config.catalog.get(m);
            let span = tracing::info_span!(
                "load",
                model = %m,
                kind = spec.map(|s| s.kind.as_str()).unwrap_or(""),
                bytes = spec.map(|s| s.bytes).unwrap_or(0),
                victims = tracing::field::Empty,
            );
            (span, None)
        }
        JobOp::Unload(m) => (tracing::info_span!("unload", model = %m), None),
        JobOp::Expire(m) => (tracing::info_span!("expire", model = %m), None),
        JobOp::Crash(k) => (tracing::info_span!("crash", kind = %k), backend(k)),
        JobOp::Reconcile(k) => (tracing::info_span!("reconcile", kind = %k), backend(k)),
    };
    async move {
        let deadline = Instant::now() + lease_wait;
        match op {
            JobOp::Load(model) => {
                JobResult::Loaded(load(model, me, released, deadline, card).await)
            }
            JobOp::Unload(model) => {
                JobResult::Unloaded(unload(model, me, released, deadline, false).await)
            }
            JobOp::Expire(model) => {
                JobResult::Unloaded(unload(model, me, released, deadline, true).await)
            }
            JobOp::Crash(kind) => JobResult::Done(restart(kind, kind_backend, me, true).await),
            JobOp::Reconcile(kind) => JobResult::Done(restart(kind, kind_backend, me, false).await),
        }
    }
    .instrument(span)
}

/// The card as a load sees it: the probe (if any) and how to wait for
/// memory to come back after an eviction.
struct Card {
    probe: Option<Rc<dyn GpuProbe>>,
    fraction: f64,
    poll: Duration,
    timeout: Duration,
}

impl Card {
    /// The card's memory now; `None` without a probe or when it fails.
    async fn read(&self) -> Option<GpuMemory> {
        let probe = self.probe.as_ref()?;
        match probe.memory().await {
            Ok(memory) => Some(memory),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the card; planning on the ledger alone");
                None
            }
        }
    }

    /// Waits until the card's free memory reaches `target` bytes, polling,
    /// for at most the timeout; on the cap, warns and goes on.
    async fn wait_for_free(&self, target: u64) {
        let started = Instant::now();
        loop {
            let Some(memory) = self.read().await else {
                return;
            };
            if memory.free >= target {
                return;
            }
            if started.elapsed() >= self.timeout {
                tracing::warn!(
                    free = memory.free,
                    target,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "evicted memory not returned in time; loading anyway"
                );
                return;
            }
            actix::clock::sleep(
                self.poll
                    .min(self.timeout.saturating_sub(started.elapsed())),
            )
            .await;
        }
    }
}

async fn load(
    model: String,
    me: Addr<VramActor>,
    released: Rc<Notify>,
    deadline: Instant,
    card: Card,
) -> Result<Loaded, VramError> {
    let (go, before) = loop {
        // Registered before planning, so a release in between is not lost.
        let notified = released.notified();
        let may_wait = Instant::now() < deadline;
        let before = card.read().await;
        let outcome = me
            .send(PlanLoad {
                model: model.clone(),
                may_wait,
                card_free: before.map(|m| m.free),
            })
            .await
            .map_err(stopped(&model))?;
        match outcome {
            PlanOutcome::Done(result) => return result,
            PlanOutcome::Wait => {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
            PlanOutcome::Go(go) => break (go, before),
        }
    };
    let victims: Vec<&str> = go.victims.iter().map(|(v, _, _)| v.as_str()).collect();
    tracing::Span::current().record("victims", tracing::field::debug(&victims));
    let mut evicted = Vec::with_capacity(go.victims.len());
    for (victim, kind, backend) in go.victims {
        let result = ask(&me, &kind, &backend, UnloadModel(victim.clone()), &victim).await;
        let failed = result.is_err();
        me.send(VictimDone {
            victim: victim.clone(),
            for_model: model.clone(),
            result,
        })
        .await
        .map_err(stopped(&model))??;
        if !failed {
            evicted.push(victim);
        }
    }
    if let Some(before) = before
        && go.victim_bytes > 0
    {
        let back = (go.victim_bytes as f64 * card.fraction) as u64;
        card.wait_for_free(before.free.saturating_add(back)).await;
    }
    let used_before = card.read().await.map(|m| m.used);
    let kind = go.spec.kind.clone();
    let result = ask(&me, &kind, &go.backend, LoadModel(go.spec), &model).await;
    // Loads are serialised, so the card's growth is this model's footprint.
    let measured = match (used_before, &result) {
        (Some(before), Ok(())) => card
            .read()
            .await
            .map(|after| after.used.saturating_sub(before)),
        _ => None,
    };
    me.send(LoadDone {
        model: model.clone(),
        evicted,
        result,
        measured,
    })
    .await
    .map_err(stopped(&model))?
}

/// Unloads a model on request, or (`expiry`) because it sat idle for its
/// TTL: an expiry never waits and quietly does nothing if the model was
/// used, leased or removed since it was queued.
async fn unload(
    model: String,
    me: Addr<VramActor>,
    released: Rc<Notify>,
    deadline: Instant,
    expiry: bool,
) -> Result<Unloaded, VramError> {
    let backend = loop {
        let notified = released.notified();
        let may_wait = !expiry && Instant::now() < deadline;
        let outcome = me
            .send(BeginUnload {
                model: model.clone(),
                may_wait,
                expiry,
            })
            .await
            .map_err(stopped(&model))?;
        match outcome {
            UnloadOutcome::Done(result) => return result,
            UnloadOutcome::Wait => {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
            UnloadOutcome::Go(kind, backend) => break (kind, backend),
        }
    };
    let (kind, backend) = backend;
    let result = ask(&me, &kind, &backend, UnloadModel(model.clone()), &model).await;
    me.send(UnloadDone {
        model: model.clone(),
        result,
        expiry,
    })
    .await
    .map_err(stopped(&model))?
}

/// Crashes the backend (when `crash`), then reconciles with what the
/// restarted backend holds. Messages sent after `Crash` wait in the
/// backend's mailbox and are handled after its restart.
async fn restart(
    kind: String,
    backend: Option<Addr<BackendActor>>,
    me: Addr<VramActor>,
    crash: bool,
) -> Result<(), VramError> {
    let label = format!("<{kind} backend>");
    let backend = backend.ok_or_else(|| VramError::BackendFailed {
        model: label.clone(),
        reason: format!("no backend for kind {kind:?}"),
    })?;
    if crash {
        backend
            .send(Crash::default())
            .await
            .map_err(stopped(&label))?;
    }
    let loaded = match ask(&me, &kind, &backend, ListLoaded, &label).await {
        Ok(loaded) => loaded,
        Err(_) if !backend.connected() => {
            // The dead actor was replaced by a fresh one: ask that one.
            let fresh = me
                .send(BackendOf(kind.clone()))
                .await
                .map_err(stopped(&label))?;
            let fresh = fresh.ok_or_else(|| stopped(&label)(MailboxError::Closed))?;
            fresh.send(ListLoaded).await.map_err(stopped(&label))??
        }
        Err(e) => return Err(e),
    };
    me.send(Reconcile { kind, loaded })
        .await
        .map_err(stopped(&label))
}

// ------------------------------------------------------ internal messages

/// A planned load, ready to carry out.
pub(crate) struct Go {
    spec: ModelSpec,
    backend: Addr<BackendActor>,
    victims: Vec<(String, String, Addr<BackendActor>)>,
    /// Bytes the victims are charged (what the card should give back).
    victim_bytes: u64,
}

pub(crate) enum PlanOutcome {
    Done(Result<Loaded, VramError>),
    Wait,
    Go(Go),
}

/// Plan a load; on success reserve its bytes and mark the victims.
#[derive(Message)]
#[rtype(result = "PlanOutcome")]
pub(crate) struct PlanLoad {
    model: String,
    may_wait: bool,
    /// The card's free bytes, when a probe could tell.
    card_free: Option<u64>,
}

impl Handler<PlanLoad> for VramActor {
    type Result = MessageResult<PlanLoad>;

    fn handle(&mut self, msg: PlanLoad, _ctx: &mut Context<Self>) -> Self::Result {
        let model = msg.model;
        // Plan against the tighter of the ledger and the card: memory held
        // by other processes, or not yet returned, is not free.
        let free = match msg.card_free {
            Some(card) => self
                .ledger
                .free()
                .min(card.saturating_sub(self.config.reserve)),
            None => self.ledger.free(),
        };
        let planned = plan(
            &self.ledger,
            &self.config.kinds,
            &self.config.catalog,
            &model,
            free,
        );
        let outcome = match planned {
            Ok(Plan::Resident) => {
                self.ledger.touch(&model);
                self.used_now(&model);
                PlanOutcome::Done(Ok(Loaded {
                    model,
                    evicted: vec![],
                    already_resident: true,
                }))
            }
            Ok(Plan::Load { victims }) => match self.reserve(&model, victims) {
                Ok(go) => PlanOutcome::Go(go),
                Err(e) => PlanOutcome::Done(Err(e)),
            },
            Err(VramError::InsufficientVram {
                needed,
                free,
                evictable,
                leased,
                ..
            }) if msg.may_wait && leased > 0 && free + evictable + leased >= needed => {
                tracing::debug!(model = %model, leased, "waiting for leases to be released");
                PlanOutcome::Wait
            }
            Err(e) => {
                self.publish(VramEvent::LoadFailed {
                    model,
                    code: e.code().to_string(),
                    reason: e.to_string(),
                });
                PlanOutcome::Done(Err(e))
            }
        };
        MessageResult(outcome)
    }
}

impl VramActor {
    fn backend_of(&self, kind: &str, model: &str) -> Result<Addr<BackendActor>, VramError> {
        self.actors
            .get(kind)
            .cloned()
            .ok_or_else(|| VramError::BackendFailed {
                model: model.to_string(),
                reason: format!("no backend for kind {kind:?}"),
            })
    }

    /// Reserves `model` and marks `victims` unloading, answering the
    /// addresses to carry the plan out with.
    fn reserve(&mut self, model: &str, victims: Vec<String>) -> Result<Go, VramError> {
        let unknown = || VramError::UnknownModel {
            model: model.to_string(),
        };
        // Charged at its declared size, or what it measured last time.
        let declared = self.declared.get(model).cloned().ok_or_else(unknown)?;
        let charged = self
            .config
            .catalog
            .get(model)
            .map_or(declared.bytes, |s| s.bytes);
        let backend = self.backend_of(&declared.kind, model)?;
        let mut planned = Vec::with_capacity(victims.len());
        let mut victim_bytes = 0;
        for victim in victims {
            let entry = self.ledger.get(&victim);
            let kind = entry.map(|e| e.kind.clone()).unwrap_or_default();
            victim_bytes += entry.map_or(0, |e| e.bytes);
            let backend = self.backend_of(&kind, model)?;
            planned.push((victim, kind, backend));
        }
        for (victim, _, _) in &planned {
            self.ledger.begin_unload(victim);
        }
        self.ledger.reserve(&declared);
        if charged > declared.bytes {
            self.ledger.calibrate(model, charged);
        }
        tracing::info!(model = %declared.id, kind = %declared.kind, bytes = charged, victims = planned.len(), "loading");
        self.publish(VramEvent::Loading {
            model: declared.id.clone(),
            kind: declared.kind.clone(),
            bytes: charged,
            victims: planned.iter().map(|(v, _, _)| v.clone()).collect(),
        });
        Ok(Go {
            spec: declared,
            backend,
            victims: planned,
            victim_bytes,
        })
    }

    /// Records a measured footprint: the ledger charges the larger of
    /// declared and measured, and later plans for this model use it too.
    fn calibrate(&mut self, model: &str, measured: u64) {
        let Some(mut spec) = self.declared.get(model).cloned() else {
            return;
        };
        self.ledger.calibrate(model, measured);
        if measured.abs_diff(spec.bytes) > spec.bytes / 10 {
            tracing::warn!(
                model,
                declared = spec.bytes,
                measured,
                "measured footprint differs from the declared size by more than 10%"
            );
        }
        let planned = self.config.catalog.get(model).map_or(0, |s| s.bytes);
        spec.bytes = spec.bytes.max(measured).max(planned);
        self.config.catalog.insert(spec);
    }

    /// Undoes a load that cannot go on: victims not yet unloaded are
    /// resident again, the reservation is dropped.
    fn abort_load(&mut self, model: &str, error: &VramError) {
        let unloading: Vec<String> = self
            .ledger
            .entries()
            .filter(|e| e.state == ModelState::Unloading)
            .map(|e| e.id.clone())
            .collect();
        for id in unloading {
            self.ledger.cancel_unload(&id);
        }
        self.ledger.remove(model);
        tracing::warn!(model = %model, code = error.code(), error = %error, "load failed");
        self.publish(VramEvent::LoadFailed {
            model: model.to_string(),
            code: error.code().to_string(),
            reason: error.to_string(),
        });
    }
}

/// A victim's unload finished (or failed, which aborts the load).
#[derive(Message)]
#[rtype(result = "Result<(), VramError>")]
pub(crate) struct VictimDone {
    victim: String,
    for_model: String,
    result: Result<(), VramError>,
}

impl Handler<VictimDone> for VramActor {
    type Result = Result<(), VramError>;

    fn handle(&mut self, msg: VictimDone, _ctx: &mut Context<Self>) -> Self::Result {
        match msg.result {
            Ok(()) => {
                self.last_used.remove(&msg.victim);
                if let Some(entry) = self.ledger.remove(&msg.victim) {
                    tracing::info!(model = %entry.id, kind = %entry.kind, bytes = entry.bytes, for_model = %msg.for_model, "evicted");
                    self.publish(VramEvent::Evicted {
                        model: entry.id,
                        kind: entry.kind,
                        bytes: entry.bytes,
                        for_model: msg.for_model,
                    });
                }
                Ok(())
            }
            Err(e) => {
                self.abort_load(&msg.for_model, &e);
                Err(e)
            }
        }
    }
}

/// The requested model's load finished.
#[derive(Message)]
#[rtype(result = "Result<Loaded, VramError>")]
pub(crate) struct LoadDone {
    model: String,
    evicted: Vec<String>,
    result: Result<(), VramError>,
    /// How much the card's use grew during the load, when a probe could
    /// tell.
    measured: Option<u64>,
}

impl Handler<LoadDone> for VramActor {
    type Result = Result<Loaded, VramError>;

    fn handle(&mut self, msg: LoadDone, _ctx: &mut Context<Self>) -> Self::Result {
        match msg.result {
            Ok(()) => {
                self.ledger.commit(&msg.model);
                self.used_now(&msg.model);
                if let Some(measured) = msg.measured {
                    self.calibrate(&msg.model, measured);
                }
                if let Some(entry) = self.ledger.get(&msg.model) {
                    let event = VramEvent::Loaded {
                        model: entry.id.clone(),
                        kind: entry.kind.clone(),
                        bytes: entry.bytes,
                        declared: entry.declared,
                        measured: entry.measured,
                    };
                    tracing::info!(model = %entry.id, kind = %entry.kind, bytes = entry.bytes, measured = ?entry.measured, "loaded");
                    self.publish(event);
                }
                Ok(Loaded {
                    model: msg.model,
                    evicted: msg.evicted,
                    already_resident: false,
                })
            }
            Err(e) => {
                self.abort_load(&msg.model, &e);
                Err(e)
            }
        }
    }
}

pub(crate) enum UnloadOutcome {
    Done(Result<Unloaded, VramError>),
    Wait,
    Go(String, Addr<BackendActor>),
}

/// Start an unload: refuse or wait while leased, else mark it unloading.
#[derive(Message)]
#[rtype(result = "UnloadOutcome")]
pub(crate) struct BeginUnload {
    model: String,
    may_wait: bool,
    expiry: bool,
}

impl Handler<BeginUnload> for VramActor {
    type Result = MessageResult<BeginUnload>;

    fn handle(&mut self, msg: BeginUnload, _ctx: &mut Context<Self>) -> Self::Result {
        let still_idle = || {
            let now = std::time::Instant::now();
            expired(&self.ledger, &self.config.ttl, &self.last_used, now).contains(&msg.model)
        };
        let Some(entry) = self
            .ledger
            .get(&msg.model)
            .filter(|_| !msg.expiry || still_idle())
        else {
            return MessageResult(UnloadOutcome::Done(Ok(Unloaded {
                model: msg.model,
                was_resident: false,
            })));
        };
        if entry.leases > 0 {
            return MessageResult(if msg.may_wait {
                UnloadOutcome::Wait
            } else {
                UnloadOutcome::Done(Err(VramError::InUse {
                    model: msg.model,
                    leases: entry.leases,
                }))
            });
        }
        let kind = entry.kind.clone();
        MessageResult(match self.backend_of(&kind, &msg.model) {
            Ok(backend) => {
                self.ledger.begin_unload(&msg.model);
                UnloadOutcome::Go(kind, backend)
            }
            Err(e) => UnloadOutcome::Done(Err(e)),
        })
    }
}

/// An unload finished.
#[derive(Message)]
#[rtype(result = "Result<Unloaded, VramError>")]
pub(crate) struct UnloadDone {
    model: String,
    result: Result<(), VramError>,
    expiry: bool,
}

impl Handler<UnloadDone> for VramActor {
    type Result = Result<Unloaded, VramError>;

    fn handle(&mut self, msg: UnloadDone, _ctx: &mut Context<Self>) -> Self::Result {
        match msg.result {
            Ok(()) => {
                if let Some(entry) = self.ledger.remove(&msg.model) {
                    self.last_used.remove(&entry.id);
                    let (model, kind, bytes) = (entry.id, entry.kind, entry.bytes);
                    if msg.expiry {
                        tracing::info!(model = %model, kind = %kind, bytes, "expired");
                        self.publish(VramEvent::Expired { model, kind, bytes });
                    } else {
                        tracing::info!(model = %model, kind = %kind, bytes, "unloaded");
                        self.publish(VramEvent::Unloaded { model, kind, bytes });
                    }
                }
                Ok(Unloaded {
                    model: msg.model,
                    was_resident: true,
                })
            }
            Err(e) => {
                self.ledger.cancel_unload(&msg.model);
                Err(e)
            }
        }
    }
}

/// Make the ledger's models of `kind` equal to what its backend holds.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Reconcile {
    kind: String,
    loaded: Vec<String>,
}

impl Handler<Reconcile> for VramActor {
    type Result = ();

    fn handle(&mut self, msg: Reconcile, _ctx: &mut Context<Self>) {
        let lost: Vec<String> = self
            .ledger
            .entries()
            .filter(|e| {
                e.kind == msg.kind && e.state != ModelState::Loading && !msg.loaded.contains(&e.id)
            })
            .map(|e| e.id.clone())
            .collect();
        for id in &lost {
            self.ledger.remove(id);
        }
        // Leases on models of this kind that the backend no longer holds
        // are void (also after a restart of the manager itself).
        let void: Vec<String> = self
            .leased_models()
            .filter(|m| !msg.loaded.contains(m))
            .filter(|m| {
                self.config
                    .catalog
                    .get(m)
                    .is_some_and(|s| s.kind == msg.kind)
            })
            .collect();
        for id in void {
            self.void_leases(&id);
        }
        for id in &msg.loaded {
            if let Some(spec) = self.declared.get(id)
                && self.ledger.get(id).is_none()
            {
                self.ledger.insert_resident(&spec.clone());
                self.used_now(id);
                // After a restart of the manager, leases it granted before
                // are still held: count them again.
                let held = self.leases_of(id).count();
                for _ in 0..held {
                    self.ledger.lease(id);
                }
            }
        }
        tracing::warn!(kind = %msg.kind, lost = ?lost, "ledger reconciled with restarted backend");
        self.publish(VramEvent::BackendRestarted {
            kind: msg.kind,
            lost,
        });
    }
}

/// Replace the backend actor of `kind` if it is still the dead one.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ReplaceBackend {
    kind: String,
    dead: Addr<BackendActor>,
}

impl Handler<ReplaceBackend> for VramActor {
    type Result = ();

    fn handle(&mut self, msg: ReplaceBackend, ctx: &mut Context<Self>) {
        if self.actors.get(&msg.kind) != Some(&msg.dead) {
            return; // already replaced
        }
        tracing::error!(kind = %msg.kind, "backend actor died without a restart; starting a fresh one");
        if let Some(backend) = self.backends.get(&msg.kind) {
            backend.reset();
        }
        self.start_backend(&msg.kind, ctx);
        self.reconcile_first(msg.kind, ctx);
    }
}

impl Handler<BackendOf> for VramActor {
    type Result = Option<Addr<BackendActor>>;

    fn handle(&mut self, msg: BackendOf, _ctx: &mut Context<Self>) -> Self::Result {
        self.actors.get(&msg.0).cloned()
    }
}
