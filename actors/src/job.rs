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
    BeginUnload, Landing, LoadDone, PlanLoad, PlanOutcome, Reconcile, Refused, ReplaceBackend,
    Settle, UnloadDone, UnloadOutcome, VictimDone, Victims,
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

/// A backend actor that cannot be reached: `backend_failed`.
fn stopped(model: &str) -> impl FnOnce(MailboxError) -> VramError + '_ {
    move |e| VramError::BackendFailed {
        model: model.to_string(),
        reason: format!("backend actor unavailable: {e}"),
    }
}

/// The `VramActor` itself cannot be reached (it stopped): `unavailable`.
fn gone(model: &str) -> impl FnOnce(MailboxError) -> VramError + '_ {
    move |e| VramError::Unavailable {
        reason: format!("the manager stopped during the job for {model}: {e}"),
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

    /// Waits until the card's free memory reaches `target` bytes, for at
    /// most the timeout; on the cap, warns and goes on. Asks the card at
    /// once, then after 10 ms, doubling the pause each time up to the poll
    /// interval, and never sleeping past the deadline.
    async fn wait_for_free(&self, target: u64) {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut pause = first_pause(self.poll);
        loop {
            let Some(memory) = self.read().await else {
                return;
            };
            if memory.free >= target {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    free = memory.free,
                    target,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "evicted memory not returned in time; loading anyway"
                );
                return;
            }
            actix::clock::sleep(pause.min(deadline - now)).await;
            pause = next_pause(pause, self.poll);
        }
    }
}

/// The first pause between two readings of the card: 10 ms, or the poll
/// interval when that is shorter (but at least 1 ms, so a zero interval
/// cannot spin).
fn first_pause(poll: Duration) -> Duration {
    Duration::from_millis(10)
        .min(poll)
        .max(Duration::from_millis(1))
}

/// The pause after `pause`: twice as long, capped at the poll interval
/// (and never shorter than `pause`).
fn next_pause(pause: Duration, poll: Duration) -> Duration {
    pause.saturating_mul(2).min(poll.max(pause))
}

/// The free bytes to wait for after evicting victims that really held
/// `back` bytes, when the card showed `before` at plan time and the
/// ledger's models really held `ledger` bytes then (victims included).
///
/// The card cannot show more free than its total less what other
/// processes use (`before.used` less the ledger's models), so the memory
/// expected back is capped there; the wait is for `fraction` of it.
fn release_target(before: GpuMemory, back: u64, ledger: u64, fraction: f64) -> u64 {
    let others = before.used.saturating_sub(ledger);
    let max_free = before.total.saturating_sub(others);
    let expected = before.free.saturating_add(back).min(max_free);
    let gain = expected.saturating_sub(before.free);
    before.free + (gain as f64 * fraction) as u64
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
            .map_err(gone(&model))?;
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
    evict(&me, &model, go.victims, false, &mut evicted).await?;
    if let Some(before) = before
        && go.victim_bytes > 0
    {
        let target = release_target(before, go.victim_bytes, go.ledger_bytes, card.fraction);
        card.wait_for_free(target).await;
    }
    let used_before = card.read().await.map(|m| m.used);
    let kind = go.spec.kind.clone();
    let backend = go.backend;
    let result = ask(&me, &kind, &backend, LoadModel(go.spec), &model).await;
    // Loads are serialised, so the card's growth is this model's footprint.
    let measured = match (used_before, &result) {
        (Some(before), Ok(())) => card
            .read()
            .await
            .map(|after| after.used.saturating_sub(before)),
        _ => None,
    };
    let landing = me
        .send(LoadDone {
            model: model.clone(),
            evicted: evicted.clone(),
            result,
            measured,
        })
        .await
        .map_err(gone(&model))?;
    let error = match landing {
        Landing::Done(result) => return result,
        // Measured larger than planned: make room for the real size by
        // the same policy, with the model charged its planned size until
        // the victims are gone.
        Landing::Evict(victims) => match evict(&me, &model, victims, true, &mut evicted).await {
            Ok(()) => {
                return me
                    .send(Settle {
                        model: model.clone(),
                        evicted,
                        measured: measured.unwrap_or_default(),
                    })
                    .await
                    .map_err(gone(&model))?;
            }
            Err(e) => e,
        },
        Landing::Refuse(e) => e,
    };
    // The model cannot stay: take it off the card again.
    let unloaded = ask(&me, &kind, &backend, UnloadModel(model.clone()), &model).await;
    me.send(Refused {
        model: model.clone(),
        error,
        unloaded,
    })
    .await
    .map_err(gone(&model))?
}

/// Unloads `victims` in order to make room for `model`, recording each in
/// the ledger (`after_load`: the model is already on the card). Stops at
/// the first that fails.
async fn evict(
    me: &Addr<VramActor>,
    model: &str,
    victims: Victims,
    after_load: bool,
    evicted: &mut Vec<String>,
) -> Result<(), VramError> {
    for (victim, kind, backend) in victims {
        let result = ask(me, &kind, &backend, UnloadModel(victim.clone()), &victim).await;
        me.send(VictimDone {
            victim: victim.clone(),
            for_model: model.to_string(),
            result,
            after_load,
        })
        .await
        .map_err(gone(model))??;
        evicted.push(victim);
    }
    Ok(())
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
            .map_err(gone(&model))?;
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
    .map_err(gone(&model))?
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
                .map_err(gone(&label))?;
            let fresh = fresh.ok_or_else(|| stopped(&label)(MailboxError::Closed))?;
            fresh.send(ListLoaded).await.map_err(stopped(&label))??
        }
        Err(e) => return Err(e),
    };
    me.send(Reconcile { kind, loaded })
        .await
        .map_err(gone(&label))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn card(total: u64, used: u64) -> GpuMemory {
        GpuMemory {
            total,
            used,
            free: total - used,
        }
    }

    #[test]
    fn the_release_target_counts_what_the_victims_really_hold() {
        // 16 GiB card; an over-declared model really holds 2 GiB.
        let before = card(16 * GIB, 2 * GIB);
        let target = release_target(before, 2 * GIB, 2 * GIB, 0.75);
        assert_eq!(target, 14 * GIB + 3 * GIB / 2);
        assert!(target <= before.total, "reachable");
    }

    #[test]
    fn the_release_target_never_asks_for_more_than_the_card_can_show() {
        // Other processes hold 3 GiB; the ledger's models 5 GiB, of which
        // the victim is said to hold 9 (inconsistent, but possible with a
        // stale measurement): at most 13 GiB can ever be free.
        let before = card(16 * GIB, 8 * GIB);
        let target = release_target(before, 9 * GIB, 5 * GIB, 1.0);
        assert_eq!(target, 13 * GIB);
        // A victim that held nothing: no wait beyond what is free now.
        assert_eq!(release_target(before, 0, 5 * GIB, 0.75), before.free);
    }

    #[test]
    fn the_release_target_is_a_fraction_of_the_expected_gain() {
        let before = card(16 * GIB, 12 * GIB);
        assert_eq!(
            release_target(before, 8 * GIB, 12 * GIB, 0.5),
            4 * GIB + 4 * GIB
        );
    }

    #[test]
    fn the_pause_between_readings_doubles_up_to_the_poll_interval() {
        let poll = Duration::from_millis(250);
        let mut pause = first_pause(poll);
        let mut pauses = vec![pause.as_millis()];
        for _ in 0..6 {
            pause = next_pause(pause, poll);
            pauses.push(pause.as_millis());
        }
        assert_eq!(pauses, [10, 20, 40, 80, 160, 250, 250]);
        assert_eq!(first_pause(Duration::from_millis(4)).as_millis(), 4);
        assert_eq!(first_pause(Duration::ZERO).as_millis(), 1, "never spins");
        assert_eq!(
            next_pause(Duration::from_millis(1), Duration::ZERO).as_millis(),
            1
        );
    }
}
