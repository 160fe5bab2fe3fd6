//! The jobs of the `VramActor`'s queue and the drivers that carry them out
//! (the ledger side of each step is in `job_steps.rs`).
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
use crate::job_steps::{
    BeginUnload, LoadDone, PlanLoad, PlanOutcome, Reconcile, ReplaceBackend, UnloadDone,
    UnloadOutcome, VictimDone,
};
use crate::messages::{BackendOf, Loaded, Unloaded};
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
