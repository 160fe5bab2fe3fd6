//! The jobs of the manager as pure state machines: each job (load, unload,
//! expire, crash, reconcile) is a value that takes an [`Event`] together
//! with the manager's [`Books`] and the time, changes the books, and
//! answers [`Command`]s for the actor to carry out. No actix, no clock of
//! its own, no I/O; the `VramActor` only executes commands and feeds back
//! what they produced, the way quinn's driver runs quinn-proto's
//! `Connection`.
//!
//! A job finishes by leaving its typed outcome in place
//! ([`Job::outcome`]): a load answers `Result<Loaded, VramError>`, an
//! unload `Result<Unloaded, VramError>`, a restart `Result<(), VramError>`.

mod load;
mod restart;
mod unload;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arcstr::ArcStr;

pub(crate) use load::LoadJob;
pub(crate) use restart::RestartJob;
pub(crate) use unload::UnloadJob;

use crate::backend::Held;
use crate::error::VramError;
use crate::events::VramEvent;
use crate::kind::Kinds;
use crate::ledger::{Entry, Ledger};
use crate::model::{Catalog, Ids, ModelSpec, Unloads};
use crate::order::Order;
use crate::probe::GpuMemory;

/// What happened, fed to the running job.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// The job starts.
    Start,
    /// The card was read (`None`: no probe, or it failed).
    Card(Option<GpuMemory>),
    /// A backend finished unloading `model`.
    Unloaded {
        /// The model.
        model: ArcStr,
        /// How it went.
        result: Result<(), VramError>,
    },
    /// The end of a backend's answer to a [`Command::Park`], or to a
    /// [`Command::Unload`] answered as single events (see
    /// [`Event::Unloads`]): every `Unloaded` or `Parked` of it came before
    /// this.
    UnloadsDone,
    /// A backend answered a whole [`Command::Unload`] at once: the same as
    /// one [`Event::Unloaded`] per model it tried, in order, then
    /// [`Event::UnloadsDone`] (one event instead of several).
    Unloads(Unloads),
    /// A backend finished parking `model`: `Ok(true)` it sleeps, `Ok(false)`
    /// its sleep failed and it was stopped instead.
    Parked {
        /// The model.
        model: ArcStr,
        /// How it went.
        result: Result<bool, VramError>,
    },
    /// The backend finished loading the job's model.
    Loaded(Result<(), VramError>),
    /// After the unloads of a [`Command::UnloadThenLoad`], the card showed
    /// the memory asked for (this reading), and the load started.
    LoadingAfter(GpuMemory),
    /// The backend crashed as asked and restarted.
    Crashed(Result<(), VramError>),
    /// The backend listed the models it holds.
    Listed(Result<Held, VramError>),
    /// A lease was released while the job waited for one.
    Released,
    /// The time the job waited for has come.
    Deadline,
}

/// What the running job asks the actor to do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// Read the card; answer with [`Event::Card`].
    ReadCard,
    /// Unload `models`, one after the other, on the backend of `kind`
    /// (one message for them all); answer [`Event::Unloads`] with each
    /// model in order, up to and including the first failure (the models
    /// after a failure were not touched), or the same as single events:
    /// one [`Event::Unloaded`] per model, then [`Event::UnloadsDone`] (a
    /// lost call, or no backend for `kind`). Unloads on different backends
    /// run at once.
    Unload {
        /// Their kind (which backend).
        kind: ArcStr,
        /// The models, in the order they leave.
        models: Ids,
    },
    /// Load this model on its kind's backend; answer with
    /// [`Event::Loaded`].
    Load(Arc<ModelSpec>),
    /// Unload `models` on the backend of the model's kind, as
    /// [`Command::Unload`] does, and once every one of them has left,
    /// load the model there, as [`Command::Load`] does: one message for a
    /// load whose victims share its backend. Answer as the unload would;
    /// then, if every victim left:
    /// - with no `when_free`, the load's [`Event::Loaded`];
    /// - with `when_free`, read the card: if it shows at least that many
    ///   bytes free, [`Event::LoadingAfter`] and the load's
    ///   [`Event::Loaded`]; else (or if it cannot be read) no load, and
    ///   the reading as [`Event::Card`].
    ///
    /// The job decides the condition; the backend only checks it, which
    /// saves the round trip back to the job between the unloads and the
    /// load.
    UnloadThenLoad {
        /// The victims, in the order they leave.
        models: Ids,
        /// The model to load after them.
        spec: Arc<ModelSpec>,
        /// Load only once the card shows this many bytes free.
        when_free: Option<u64>,
    },
    /// Park `model` on the backend of `kind` (its server sleeps); should
    /// the sleep fail, stop it. Answer [`Event::Parked`], then
    /// [`Event::UnloadsDone`].
    Park {
        /// Its kind (which backend).
        kind: ArcStr,
        /// The model.
        model: ArcStr,
    },
    /// Wake this parked model on its kind's backend; answer with
    /// [`Event::Loaded`].
    Wake(Arc<ModelSpec>),
    /// Make the backend of `kind` crash and restart; answer with
    /// [`Event::Crashed`].
    Crash {
        /// The backend's kind.
        kind: ArcStr,
    },
    /// Ask the backend of `kind` what it holds; answer with
    /// [`Event::Listed`].
    List {
        /// The backend's kind.
        kind: ArcStr,
    },
    /// Answer [`Event::Released`] at the next lease release, or
    /// [`Event::Deadline`] at `until`, whichever is first.
    WaitRelease {
        /// The latest moment to wake.
        until: Instant,
    },
    /// Answer [`Event::Deadline`] at `until`.
    Wait {
        /// When to wake.
        until: Instant,
    },
    /// Send this event to the subscribers.
    Publish(VramEvent),
    /// Count an eviction in the metrics (what an `evicted` event does when
    /// no one subscribes, so none is built).
    CountEviction {
        /// The evicted model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
    },
    /// Start reading the job's model's weight files into the page cache,
    /// in the background (no answer): its load is planned, and its server
    /// will find them in memory while the victims leave.
    Warm,
    /// Make the ledger agree with the backend of `kind` before anything
    /// else runs (a model it was asked to unload may still be there).
    Reconcile {
        /// The backend's kind.
        kind: ArcStr,
    },
}

/// A job: events in, commands out, a typed outcome at the end.
pub(crate) trait Job {
    /// What the job answers its waiters.
    type Output;

    /// Takes one event; changes `books`; pushes commands to `out`.
    fn handle(&mut self, event: Event, books: &mut Books, now: Instant, out: &mut Vec<Command>);

    /// Takes a batch of unload answers as the events it stands for: one
    /// `Unloaded` per model, then `UnloadsDone`. A job that can take the
    /// batch whole does so in `handle`.
    fn unloads(
        &mut self,
        results: Unloads,
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        for (model, result) in results {
            if self.is_done() {
                return;
            }
            self.handle(Event::Unloaded { model, result }, books, now, out);
        }
        if !self.is_done() {
            self.handle(Event::UnloadsDone, books, now, out);
        }
    }

    /// The outcome, once the job has finished (taken once).
    fn outcome(&mut self) -> Option<Self::Output>;

    /// Whether the job has finished and its outcome is still to be taken.
    fn is_done(&self) -> bool;
}

/// How a load waits for evicted memory to come back on the card.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ReleaseWait {
    /// The share of the victims' true bytes the card must show back.
    pub(crate) fraction: f64,
    /// The longest pause between two reads of the card.
    pub(crate) poll: Duration,
    /// Load anyway (with a warning) after this long.
    pub(crate) timeout: Duration,
}

/// `duration` after `now`; a duration too long for the clock (a library
/// caller may pass any) means "not in this process's life": 30 years.
pub(crate) fn after(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration).unwrap_or_else(|| {
        now.checked_add(Duration::from_secs(30 * 365 * 86_400))
            .unwrap_or(now)
    })
}

/// The first pause between two reads of the card while waiting for
/// memory (at most `poll`); it doubles up to `poll`.
pub(crate) fn first_pause(poll: Duration) -> Duration {
    Duration::from_millis(10)
        .min(poll)
        .max(Duration::from_millis(1))
}

/// The pause after `pause`: twice as long, up to `poll`.
pub(crate) fn next_pause(pause: Duration, poll: Duration) -> Duration {
    pause.saturating_mul(2).min(poll.max(pause))
}

/// The manager's books: the ledger and the records the jobs keep with it.
#[derive(Debug)]
pub(crate) struct Books {
    /// Who holds VRAM.
    pub(crate) ledger: Ledger,
    /// Eviction tiers.
    pub(crate) kinds: Kinds,
    /// The models as configured.
    pub(crate) declared: Catalog,
    /// The sizes plans use: declared, or larger once measured.
    pub(crate) planned: Catalog,
    /// Granted leases: id -> (model, validity shared with the guard).
    pub(crate) leases: foldhash::HashMap<u64, (ArcStr, Arc<AtomicBool>)>,
    /// When each resident model was last used (for TTLs).
    pub(crate) last_used: foldhash::HashMap<ArcStr, Instant>,
    /// Idle time after which a model expires, by model id.
    pub(crate) ttl: HashMap<String, Duration>,
    /// Bytes of the card never planned for.
    pub(crate) reserve: u64,
    /// How long a load or unload waits for leases.
    pub(crate) lease_wait: Duration,
    /// How a load waits for evicted memory.
    pub(crate) release: ReleaseWait,
    /// The order in which eviction candidates are taken.
    pub(crate) order: Order,
    /// Host RAM all parked models together may hold.
    pub(crate) host_budget: u64,
    /// Whether anyone subscribed to events: the events only subscribers
    /// see (`loading`, `loaded`, `woke`) are not built otherwise.
    pub(crate) listening: bool,
}

impl Books {
    /// Marks `model` as just used: most recent in the ledger's order and
    /// its idle clock restarted.
    pub(crate) fn touch(&mut self, model: &str, now: Instant) {
        self.ledger.touch(model);
        self.used_now(model, now);
    }

    /// Restarts `model`'s idle clock (no allocation: a new clock shares
    /// the ledger's id).
    pub(crate) fn used_now(&mut self, model: &str, now: Instant) {
        match self.last_used.get_mut(model) {
            Some(at) => *at = now,
            None => {
                let id = self
                    .ledger
                    .get(model)
                    .map_or_else(|| ArcStr::from(model), |e| e.id.clone());
                self.last_used.insert(id, now);
            }
        }
    }

    /// Counts a request for `model` (`miss` when it needs a load) in the
    /// history the adaptive order predicts from. Under the strict order
    /// nothing reads that history, so nothing is counted.
    pub(crate) fn note_request(&mut self, model: &str, miss: bool) {
        if self.order == Order::Adaptive {
            self.ledger.note_request_as(model, miss);
        }
    }

    /// [`Books::used_now`] for an id at hand: one map operation.
    pub(crate) fn used_now_id(&mut self, model: &ArcStr, now: Instant) {
        self.last_used.insert(model.clone(), now);
    }

    /// Gives lease `id` back: its model is used now. Answers whether the
    /// lease was held (an unknown or voided lease changes nothing).
    pub(crate) fn release(&mut self, id: u64, now: Instant) -> bool {
        let Some((model, _)) = self.leases.remove(&id) else {
            return false;
        };
        self.ledger.release(&model);
        if self.ledger.get(&model).is_some() {
            self.used_now_id(&model, now);
        }
        true
    }

    /// A model's server exited by itself: if it was resident (or parked)
    /// it is gone from the card, so it leaves the ledger and its leases
    /// become void;
    /// answers whether it was. A model a job is loading or unloading is
    /// left to that job.
    pub(crate) fn server_exited(&mut self, model: &str) -> bool {
        // A parked server that dies frees its residual too.
        let held = self.ledger.get(model).is_some_and(|e| {
            matches!(
                e.state,
                crate::ledger::ModelState::Resident | crate::ledger::ModelState::Parked
            )
        });
        if !held {
            return false;
        }
        self.forget(model);
        self.void_leases(model);
        true
    }

    /// Removes `model` from the ledger and its idle clock.
    pub(crate) fn forget(&mut self, model: &str) -> Option<Entry> {
        self.last_used.remove(model);
        self.ledger.remove(model)
    }

    /// Voids every lease on `model`: the guards report `is_valid() ==
    /// false` and their release does nothing.
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

    /// Records a measured footprint: the ledger charges the larger of
    /// declared and measured, and later plans use it too.
    pub(crate) fn calibrate(&mut self, model: &str, measured: u64) {
        self.ledger.calibrate(model, measured);
        self.plan_with(model, measured);
    }

    /// Later plans for `model` use at least `measured` bytes.
    pub(crate) fn plan_with(&mut self, model: &str, measured: u64) {
        let Some(declared) = self.declared.get(model) else {
            return;
        };
        if measured.abs_diff(declared.bytes) > declared.bytes / 10 {
            tracing::warn!(
                model,
                declared = declared.bytes,
                measured,
                "measured footprint differs from the declared size by more than 10%"
            );
        }
        let planned = self.planned.get(model).map_or(0, |s| s.bytes);
        let bytes = declared.bytes.max(measured).max(planned);
        if bytes != planned {
            let mut spec = declared.clone();
            spec.bytes = bytes;
            self.planned.insert(spec);
        }
    }
}

impl Books {
    /// Host RAM the parked models hold (entries in the `Parked` state; a
    /// parked model being stopped no longer counts here, so a load counts
    /// the host RAM it plans against before its victims start leaving).
    pub(crate) fn host_parked(&self) -> u64 {
        self.ledger
            .entries()
            .filter(|e| e.state == crate::ledger::ModelState::Parked)
            .filter_map(|e| self.declared.get(&e.id).and_then(|s| s.park))
            .fold(0u64, |sum, p| sum.saturating_add(p.host))
    }

    /// Whether `model` can park now with `more` host bytes already promised
    /// to other models parking: it declares how, and the budget allows.
    pub(crate) fn may_park(&self, model: &str, more: u64) -> Option<u64> {
        self.may_park_beside(model, self.host_parked().saturating_add(more))
    }

    /// Whether `model` can park beside `taken` host bytes (parked models
    /// and promises): answers the host bytes it would take.
    pub(crate) fn may_park_beside(&self, model: &str, taken: u64) -> Option<u64> {
        let park = self.declared.get(model)?.park?;
        (taken.saturating_add(park.host) <= self.host_budget).then_some(park.host)
    }

    /// `model`'s server is asleep: the ledger keeps only its residual and
    /// its idle clock stops. Answers the `parked` event to publish (none if
    /// the model is unknown to the ledger).
    pub(crate) fn park(&mut self, model: &str, for_model: Option<&str>) -> Option<Command> {
        let residual = self.residual(model);
        let entry = self.ledger.get(model).cloned()?;
        self.ledger.park(model, residual);
        self.last_used.remove(model);
        let freed = entry.bytes.saturating_sub(residual);
        tracing::info!(model = %entry.id, kind = %entry.kind, freed, residual, for_model = ?for_model, "parked");
        Some(Command::Publish(VramEvent::Parked {
            model: entry.id,
            kind: entry.kind,
            gpu: entry.gpu,
            bytes: residual.min(entry.bytes),
            freed,
            for_model: for_model.map(ArcStr::from),
        }))
    }

    /// The bytes `model` holds on the card while parked.
    pub(crate) fn residual(&self, model: &str) -> u64 {
        self.declared
            .get(model)
            .and_then(|s| s.park)
            .map_or(0, |p| p.vram)
    }
}

/// The bytes a model really holds: measured once calibrated, else
/// declared (which may be generous).
pub(crate) fn true_bytes(entry: &Entry) -> u64 {
    match entry.state {
        // Asleep, it holds only its residual.
        crate::ledger::ModelState::Parked => entry.bytes,
        _ => entry.measured.unwrap_or(entry.declared),
    }
}

/// A `load_failed` event for `error`.
pub(crate) fn load_failed(model: &str, error: &VramError) -> Command {
    Command::Publish(VramEvent::LoadFailed {
        model: ArcStr::from(model),
        code: error.code().to_string(),
        reason: error.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests;
