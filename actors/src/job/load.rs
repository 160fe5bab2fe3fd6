//! The load job: plan (policy), reserve, evict the victims one by one,
//! wait for the card to give their memory back, load, measure, and keep
//! `used <= capacity` when the measurement is larger than planned.
//!
//! ```text
//! Start ─▶ [ReadCard] ─▶ plan ─┬─ resident ─────────────────────────▶ done
//!                              ├─ refuse ──────────────────────────▶ done (load_failed)
//!                              ├─ leased victims ─▶ [WaitRelease] ─▶ plan again
//!                              ├─ victims ─▶ [Unload]* ─▶ [ReadCard/Wait]* ─▶ [Load]
//!                              └─ victims on the model's backend ─▶ [UnloadThenLoad]
//!                                   (the backend reads the card; short of the
//!                                    target it does not load: [Wait/ReadCard]* ─▶ [Load])
//!   ─▶ [ReadCard] (measure) ─┬─ fits ─────────────────────────────▶ done (loaded)
//!                            ├─ room by policy ─▶ [Unload]* ──────▶ done (loaded)
//!                            └─ no room ─▶ [Unload self] ─────────▶ done (insufficient_vram)
//! ```

use std::time::{Duration, Instant};

use arcstr::ArcStr;

use super::{Books, Command, Event, Job, after, first_pause, load_failed, next_pause, true_bytes};
use crate::error::VramError;
use crate::events::{Loaded, VramEvent};
use crate::ledger::{Ledger, ModelState};
use crate::model::Ids;
use crate::policy::{Plan, candidates, owed, plan_in_order};
use crate::probe::GpuMemory;

/// Where a load is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the card, to plan.
    Planning,
    /// Waiting for a lease release (or the deadline), to plan again.
    WaitingLeases,
    /// Unloading the planned victims: each backend its own, in order, all
    /// backends at once.
    Evicting {
        /// Backends whose unloads have not all answered.
        pending: usize,
        /// The first unload that failed, if one did.
        failed: Option<VramError>,
        /// The card's use at plan time (`None`: no reading).
        used: Option<u64>,
        /// The free bytes to wait for once they have left, when the card
        /// can show some back (see [`release_target`]).
        release: Option<u64>,
        /// The backend loads the model as soon as its victims have left
        /// ([`Command::UnloadThenLoad`]): no load to ask for after them.
        load_follows: bool,
    },
    /// Waiting for the card to show the victims' memory back.
    Releasing {
        target: u64,
        since: Instant,
        until: Instant,
        pause: Duration,
        /// The backend reads the card first, and loads if the target is
        /// met ([`Command::UnloadThenLoad`]).
        load_follows: bool,
    },
    /// The backend is loading the model.
    Loading { used_before: Option<u64> },
    /// Reading the card after the load, to measure the model.
    Measuring { used_before: u64 },
    /// The model measured larger than planned: evicting to keep
    /// `used <= capacity`.
    MakingRoom {
        /// Backends whose unloads have not all answered.
        pending: usize,
        /// The first unload that failed, if one did.
        failed: Option<VramError>,
        measured: u64,
    },
    /// No room for the measured size (or a victim would not leave):
    /// unloading the model again, then answering `error`.
    Refusing { error: VramError },
    /// Finished.
    Done,
}

/// Victims with their kind's position in a [`VictimKinds`] list. Stack-held:
/// a load has a few victims of one or two kinds.
type Planned = smallvec::SmallVec<[(ArcStr, usize); 4]>;

/// The kinds of a plan's victims, each named once.
type VictimKinds = smallvec::SmallVec<[ArcStr; 2]>;

/// Loads one model; see the module docs.
#[derive(Debug)]
pub(crate) struct LoadJob {
    model: ArcStr,
    /// Until when a plan blocked by leases may wait for their release.
    lease_deadline: Option<Instant>,
    phase: Phase,
    evicted: Vec<ArcStr>,
    /// Every victim planned, in the policy's order: the answer lists the
    /// evicted in this order, however the backends' answers interleaved.
    planned: Vec<ArcStr>,
    /// How long it waited for evicted memory to come back, if it did.
    release_waited: Option<Duration>,
    /// The model was parked: this load wakes it.
    waking: bool,
    /// Victims that were parked (their residual bytes): should the load
    /// stop before they leave, they sleep on, not come back resident.
    parked_victims: Vec<(ArcStr, u64)>,
    outcome: Option<Result<Loaded, VramError>>,
}

impl LoadJob {
    /// A load of `model`.
    pub(crate) fn new(model: impl Into<ArcStr>) -> Self {
        Self {
            model: model.into(),
            lease_deadline: None,
            phase: Phase::Planning,
            evicted: Vec::new(),
            planned: Vec::new(),
            release_waited: None,
            waking: false,
            parked_victims: Vec::new(),
            outcome: None,
        }
    }

    /// The model this job loads (empty once it answered `Ok`: the
    /// answer took the id).
    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    /// How long it waited for evicted memory to come back, if it did.
    pub(crate) fn release_waited(&self) -> Option<Duration> {
        self.release_waited
    }

    fn finish(&mut self, result: Result<Loaded, VramError>) {
        self.phase = Phase::Done;
        self.outcome = Some(result);
    }

    fn plan(
        &mut self,
        card: Option<GpuMemory>,
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let deadline = *self
            .lease_deadline
            .get_or_insert(after(now, books.lease_wait));
        // A parked model is planned for its full size, as any load: against
        // the ledger without its residual (which it keeps on the card).
        let parked = books
            .ledger
            .get(&self.model)
            .filter(|e| e.state == ModelState::Parked)
            .map(|e| e.bytes);
        let view = parked.map(|_| {
            let mut view = books.ledger.clone();
            view.remove(&self.model);
            view
        });
        let ledger = view.as_ref().unwrap_or(&books.ledger);
        // What the plan owes beyond the model's bytes, on its own view.
        let owed = owed(ledger);
        // Plan against the tighter of the ledger and the card: memory held
        // by other processes, or not yet returned, is not free.
        let free = match card {
            Some(card) => ledger.free().min(
                card.free
                    .saturating_sub(books.reserve)
                    .saturating_add(parked.unwrap_or(0)),
            ),
            None => ledger.free(),
        };
        let planned = plan_in_order(
            ledger,
            &books.kinds,
            &books.planned,
            &self.model,
            free,
            books.order,
        );
        match planned {
            Ok(Plan::Resident) => {
                books.touch(&self.model, now);
                let model = self.model.clone();
                self.finish(Ok(Loaded {
                    model,
                    evicted: vec![],
                    already_resident: true,
                }));
            }
            Ok(Plan::Load { victims }) => {
                self.reserve(victims, card, (free, owed), books, now, out)
            }
            Err(VramError::InsufficientVram {
                needed,
                free,
                evictable,
                leased,
                ..
            }) if now < deadline
                && leased > 0
                && free.saturating_add(evictable).saturating_add(leased) >= needed =>
            {
                tracing::debug!(model = %self.model, leased, "waiting for leases to be released");
                self.phase = Phase::WaitingLeases;
                out.push(Command::WaitRelease { until: deadline });
            }
            Err(e) => {
                out.push(load_failed(&self.model, &e));
                self.finish(Err(e));
            }
        }
    }

    /// Reserves the model's bytes, marks the victims unloading and starts
    /// the first unload.
    /// `room` is what the plan found: the free bytes, and what a ledger
    /// over its capacity owes on top of the model's own bytes.
    fn reserve(
        &mut self,
        victims: Vec<ArcStr>,
        card: Option<GpuMemory>,
        room: (u64, u64),
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let Some(declared) = books.declared.shared(&self.model) else {
            let e = VramError::UnknownModel {
                model: self.model.to_string(),
            };
            return self.finish(Err(e));
        };
        let declared_bytes = declared.bytes;
        let charged = books
            .planned
            .get(&self.model)
            .map_or(declared_bytes, |s| s.bytes);
        // What the card can give back: the victims' true bytes, and what
        // other processes hold (the card's use less our models' true bytes).
        let ours: u64 = books.ledger.entries().map(true_bytes).sum();
        let others = card.map_or(0, |c| c.used.saturating_sub(ours));
        let mut back: u64 = 0;
        let mut planned = Planned::new();
        let mut parking = Vec::new();
        // Host RAM promised to victims parking in this plan; bytes the
        // victims free on the ledger.
        let mut promised = 0u64;
        let mut freed = 0u64;
        // Catalog lookups only when some model can park at all.
        let any_parks = books.declared.any_parks();
        // Host RAM the parked models hold now, counted before any victim
        // starts leaving: a parked victim being stopped keeps its share
        // until it is gone (its stop may fail), so no victim parks on it.
        let parked_host = if any_parks { books.host_parked() } else { 0 };
        // The victims' kinds, each named once: victims refer to them by
        // position.
        let mut kinds = VictimKinds::new();
        for victim in victims {
            let Some(entry) = books.ledger.get(&victim) else {
                continue;
            };
            // A resident victim that can park (and fits the host budget)
            // sleeps; anything else, parked ones included, stops.
            let (state, bytes) = (entry.state, entry.bytes);
            let kind = kind_slot(&mut kinds, &entry.kind);
            let true_size = true_bytes(entry);
            let host = (any_parks && state == ModelState::Resident)
                .then(|| books.may_park_beside(&victim, parked_host.saturating_add(promised)))
                .flatten();
            let leaving = match host {
                Some(host) => {
                    let residual = books.residual(&victim);
                    promised = promised.saturating_add(host);
                    freed = freed.saturating_add(bytes.saturating_sub(residual));
                    true_size.saturating_sub(residual)
                }
                None => {
                    freed = freed.saturating_add(bytes);
                    true_size
                }
            };
            back = back.saturating_add(leaving);
            if state == ModelState::Parked {
                // A cancelled stop leaves it parked.
                self.parked_victims.push((victim.clone(), bytes));
            }
            books.ledger.begin_unload(&victim);
            if host.is_some() {
                parking.push((victim, kind));
            } else {
                planned.push((victim, kind));
            }
        }
        // The plan may have counted victims whole (parking them all would
        // not make room, with what a ledger over its capacity owes on top):
        // those stop, the last planned first.
        let (free, owed) = room;
        while free.saturating_add(freed) < charged.saturating_add(owed) {
            let Some(pair) = parking.pop() else { break };
            let residual = books.residual(&pair.0);
            freed = freed.saturating_add(residual);
            back = back.saturating_add(residual);
            planned.push(pair);
        }
        if books.ledger.wake(&self.model, charged) {
            self.waking = true;
        } else {
            books.ledger.reserve(&declared);
            // The weights can be read while the victims leave.
            out.push(Command::Warm);
            if charged > declared_bytes {
                books.ledger.calibrate(&self.model, charged);
            }
        }
        tracing::info!(
            model = %self.model,
            kind = %declared.kind,
            bytes = charged,
            victims = planned.len(),
            "loading"
        );
        // Events are built only when someone listens.
        if books.listening
            && let Some(entry) = books.ledger.get(&self.model)
        {
            out.push(Command::Publish(VramEvent::Loading {
                model: entry.id.clone(),
                kind: entry.kind.clone(),
                gpu: entry.gpu,
                bytes: charged,
                victims: planned
                    .iter()
                    .chain(&parking)
                    .map(|(v, _)| v.clone())
                    .collect(),
            }));
        }
        if parking.is_empty() {
            self.note_plan_order(&planned);
        } else {
            // Parks and stops answer separately: keep the plan's order.
            self.planned
                .extend(planned.iter().chain(&parking).map(|(m, _)| m.clone()));
        }
        // The free bytes to wait for once the victims have left (none
        // without a card, or with nothing it could show back).
        let release = card
            .filter(|_| back > 0)
            .map(|before| release_target(before, back, others, books.release.fraction));
        // Between the last unload and the load the job decides only
        // whether every victim left and the card shows `release` free:
        // when the victims share the model's backend, that backend checks
        // both and loads right after them, which saves a message to it
        // and an answer back. (A card that shows nothing coming back is
        // read after the unloads only to measure: not combined.)
        let follows = match &*kinds {
            [kind]
                if parking.is_empty()
                    && !self.waking
                    && !planned.is_empty()
                    && (card.is_none() || release.is_some()) =>
            {
                (declared.kind == *kind).then(|| declared.clone())
            }
            _ => None,
        };
        let load_follows = follows.is_some();
        let mut pending = match follows {
            Some(spec) => {
                out.push(Command::UnloadThenLoad {
                    models: planned.into_iter().map(|(model, _)| model).collect(),
                    spec,
                    when_free: release,
                });
                1
            }
            None => unload_all(planned, &kinds, out),
        };
        for (model, kind) in parking {
            out.push(Command::Park {
                kind: kinds[kind].clone(),
                model,
            });
            pending += 1;
        }
        self.phase = Phase::Evicting {
            pending,
            failed: None,
            used: card.map(|c| c.used),
            release,
            load_follows,
        };
        self.evictions_done(books, now, out);
    }

    /// Goes on once every backend has answered its unloads: aborts if one
    /// failed, else waits for the card and loads.
    fn evictions_done(&mut self, books: &mut Books, now: Instant, out: &mut Vec<Command>) {
        let Phase::Evicting {
            pending,
            failed,
            used,
            release,
            load_follows,
        } = &mut self.phase
        else {
            return;
        };
        if *pending > 0 {
            return;
        }
        if let Some(error) = failed.take() {
            return self.abort(error, books, out);
        }
        let load_follows = *load_follows;
        match (*release, *used) {
            (Some(target), _) => {
                self.phase = Phase::Releasing {
                    target,
                    since: now,
                    until: after(now, books.release.timeout),
                    pause: first_pause(books.release.poll),
                    load_follows,
                };
                // A backend that loads after its unloads reads the card
                // itself.
                if !load_follows {
                    out.push(Command::ReadCard);
                }
            }
            // Asked for with the unloads; no card to measure it on.
            (None, None) if load_follows => self.phase = Phase::Loading { used_before: None },
            (None, used) => self.start_load(used, books, out),
        }
    }

    fn start_load(&mut self, used_before: Option<u64>, books: &mut Books, out: &mut Vec<Command>) {
        match books.declared.shared(&self.model) {
            Some(spec) if self.waking => {
                // Its residual is on the card already: the card's growth
                // would not be its size, so a wake is not measured.
                out.push(Command::Wake(spec));
                self.phase = Phase::Loading { used_before: None };
            }
            Some(spec) => {
                out.push(Command::Load(spec));
                self.phase = Phase::Loading { used_before };
            }
            None => {
                let e = VramError::UnknownModel {
                    model: self.model.to_string(),
                };
                self.abort(e, books, out);
            }
        }
    }

    /// Undoes a load that cannot go on: victims not yet unloaded are
    /// resident again, the reservation is dropped.
    fn abort(&mut self, error: VramError, books: &mut Books, out: &mut Vec<Command>) {
        self.cancel_unloads(books);
        if self.waking {
            // It never woke: it sleeps on, holding its residual.
            let residual = books.residual(&self.model);
            books.ledger.park(&self.model, residual);
        } else {
            books.ledger.remove(&self.model);
        }
        tracing::warn!(model = %self.model, code = error.code(), error = %error, "load failed");
        out.push(load_failed(&self.model, &error));
        self.finish(Err(error));
    }

    /// Keeps the policy's order of `victims` when more than one backend
    /// gives up some (their answers may interleave); one backend answers
    /// in that order already.
    fn note_plan_order(&mut self, victims: &[(ArcStr, usize)]) {
        let one_backend = victims.windows(2).all(|w| w[0].1 == w[1].1);
        if !one_backend || !self.planned.is_empty() {
            self.planned
                .extend(victims.iter().map(|(model, _)| model.clone()));
        }
    }

    /// The victims that left, in the order they were planned.
    fn in_plan_order(&mut self) -> Vec<ArcStr> {
        let gone = std::mem::take(&mut self.evicted);
        if gone.len() < 2 || self.planned.is_empty() {
            return gone;
        }
        // Victims of a one-backend plan left in order, before any noted.
        let mut ordered: Vec<ArcStr> = gone
            .iter()
            .filter(|model| !self.planned.contains(model))
            .cloned()
            .collect();
        ordered.extend(
            self.planned
                .iter()
                .filter(|model| gone.contains(model))
                .cloned(),
        );
        ordered
    }

    /// The victim `model` left the card for this load.
    fn evicted(&mut self, model: ArcStr, books: &mut Books, out: &mut Vec<Command>) {
        if let Some(entry) = books.forget(&model) {
            tracing::info!(model = %entry.id, kind = %entry.kind, bytes = entry.bytes, for_model = %self.model, "evicted");
            out.push(match books.listening {
                true => Command::Publish(VramEvent::Evicted {
                    model: entry.id,
                    kind: entry.kind,
                    gpu: entry.gpu,
                    bytes: entry.bytes,
                    for_model: self.model.clone(),
                    order: books.order,
                }),
                // Nobody listens: only the eviction metric counts it.
                false => Command::CountEviction {
                    model: entry.id,
                    kind: entry.kind,
                },
            });
        }
        self.evicted.push(model);
    }

    /// Remembers `victim` if it is parked, so a cancelled stop leaves it
    /// parked.
    fn note_parked(&mut self, victim: &str, books: &Books) {
        if let Some(entry) = books.ledger.get(victim)
            && entry.state == ModelState::Parked
        {
            self.parked_victims.push((entry.id.clone(), entry.bytes));
        }
    }

    /// Victims not unloaded yet are back as they were: resident, or
    /// parked (at their residual) if they were.
    fn cancel_unloads(&mut self, books: &mut Books) {
        cancel_unloads(&mut books.ledger);
        for (victim, residual) in std::mem::take(&mut self.parked_victims) {
            if books.ledger.is_resident(&victim) {
                books.ledger.park(&victim, residual);
            }
        }
    }

    /// The victim `model` left the card for this load by parking.
    fn parked(&mut self, model: ArcStr, books: &mut Books, out: &mut Vec<Command>) {
        out.extend(books.park(&model, Some(&self.model)));
        self.evicted.push(model);
    }

    /// The model is loaded and measured (when the card could tell).
    fn commit(
        &mut self,
        measured: Option<u64>,
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if let Some(measured) = measured {
            let entry = books.ledger.get(&self.model);
            let (charged, declared) = entry.map_or((0, 0), |e| (e.bytes, e.declared));
            let would_use = books
                .ledger
                .used_exact()
                .saturating_sub(u128::from(charged))
                + u128::from(declared.max(measured));
            if would_use > u128::from(books.ledger.capacity()) {
                return self.make_room(measured, books, now, out);
            }
        }
        self.resident(measured, books, now, out);
    }

    /// Commits the model: resident, measured, announced.
    fn resident(
        &mut self,
        measured: Option<u64>,
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        books.ledger.commit(&self.model);
        books.used_now_id(&self.model, now);
        if let Some(measured) = measured {
            books.calibrate(&self.model, measured);
        }
        if let Some(entry) = books.ledger.get(&self.model) {
            if self.waking {
                tracing::info!(model = %entry.id, kind = %entry.kind, bytes = entry.bytes, "woke");
            }
            tracing::info!(model = %entry.id, kind = %entry.kind, bytes = entry.bytes, measured = ?entry.measured, "loaded");
            // The events are built only for subscribers.
            if books.listening {
                if self.waking {
                    out.push(Command::Publish(VramEvent::Woke {
                        model: entry.id.clone(),
                        kind: entry.kind.clone(),
                        gpu: entry.gpu,
                        bytes: entry.bytes,
                    }));
                }
                out.push(Command::Publish(VramEvent::Loaded {
                    model: entry.id.clone(),
                    kind: entry.kind.clone(),
                    gpu: entry.gpu,
                    bytes: entry.bytes,
                    declared: entry.declared,
                    measured: entry.measured,
                }));
            }
        }
        // The job is done: its answer takes the model's id.
        let loaded = Loaded {
            model: std::mem::take(&mut self.model),
            evicted: self.in_plan_order(),
            already_resident: false,
        };
        self.finish(Ok(loaded));
    }

    /// The model measured more than the card has room for: plan for its
    /// measured size by the same policy (as if it were not there yet), or
    /// unload it again.
    fn make_room(
        &mut self,
        measured: u64,
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        books.plan_with(&self.model, measured);
        let mut view = books.ledger.clone();
        view.remove(&self.model);
        let planned = plan_in_order(
            &view,
            &books.kinds,
            &books.planned,
            &self.model,
            view.free(),
            books.order,
        );
        match planned {
            Ok(Plan::Load { victims }) if !victims.is_empty() => {
                tracing::warn!(model = %self.model, measured, victims = ?victims, "measured larger than planned; making room");
                let mut planned = Planned::new();
                let mut kinds = VictimKinds::new();
                for victim in victims {
                    if let Some(entry) = books.ledger.get(&victim) {
                        let kind = kind_slot(&mut kinds, &entry.kind);
                        planned.push((victim.clone(), kind));
                    }
                    self.note_parked(&victim, books);
                    books.ledger.begin_unload(&victim);
                }
                self.note_plan_order(&planned);
                let pending = unload_all(planned, &kinds, out);
                if pending == 0 {
                    return self.resident(Some(measured), books, now, out);
                }
                self.phase = Phase::MakingRoom {
                    pending,
                    failed: None,
                    measured,
                };
            }
            Err(error @ VramError::InsufficientVram { .. }) => self.refuse(error, books, out),
            _ => {
                // Larger than the whole card: no eviction helps; say what
                // could have been evicted all the same.
                let requester = books
                    .declared
                    .get(&self.model)
                    .and_then(|s| books.kinds.get(&s.kind));
                let (evictable, leased) = requester.map_or((0, 0), |kind| {
                    let (found, leased) =
                        candidates(&view, &books.kinds, &books.planned, kind, &self.model);
                    (found.iter().map(|(_, bytes, _)| bytes).sum(), leased)
                });
                let error = VramError::InsufficientVram {
                    model: self.model.to_string(),
                    needed: measured,
                    free: view.free(),
                    evictable,
                    leased,
                };
                self.refuse(error, books, out)
            }
        }
    }

    /// Unloads the model again: it cannot stay within the capacity.
    fn refuse(&mut self, error: VramError, books: &mut Books, out: &mut Vec<Command>) {
        self.cancel_unloads(books);
        let kind = books
            .ledger
            .get(&self.model)
            .map(|e| e.kind.clone())
            .unwrap_or_default();
        tracing::warn!(model = %self.model, error = %error, "no room for the measured size; unloading it");
        out.push(Command::Unload {
            kind,
            models: smallvec::smallvec![self.model.clone()],
        });
        self.phase = Phase::Refusing { error };
    }
}

/// Asks every backend at once for its victims (each backend's in the
/// policy's order, one message); answers how many backends were asked.
/// Each victim names its kind by position in `kinds`.
fn unload_all(victims: Planned, kinds: &[ArcStr], out: &mut Vec<Command>) -> usize {
    // One message per backend, in the order its first victim was planned.
    let mut by_kind: smallvec::SmallVec<[(usize, Ids); 2]> = smallvec::SmallVec::new();
    for (model, kind) in victims {
        match by_kind.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, models)) => models.push(model),
            None => by_kind.push((kind, smallvec::smallvec![model])),
        }
    }
    let asked = by_kind.len();
    for (kind, models) in by_kind {
        out.push(Command::Unload {
            kind: kinds[kind].clone(),
            models,
        });
    }
    asked
}

/// The free bytes a load waits for after its evictions: what the card can
/// really show back (the victims' true bytes `back`, capped by the card's
/// total less what `others` hold), times the release `fraction`, on top of
/// what was free `before`.
fn release_target(before: GpuMemory, back: u64, others: u64, fraction: f64) -> u64 {
    let max_free = before.total.saturating_sub(others);
    let expected = before.free.saturating_add(back).min(max_free);
    let gain = expected.saturating_sub(before.free);
    before.free.saturating_add((gain as f64 * fraction) as u64)
}

/// The position of `kind` in `kinds`, added if it is new.
fn kind_slot(kinds: &mut VictimKinds, kind: &ArcStr) -> usize {
    match kinds.iter().position(|k| k == kind) {
        Some(slot) => slot,
        None => {
            kinds.push(kind.clone());
            kinds.len() - 1
        }
    }
}

/// One answer about the victims: an unload done (the victim is gone) or
/// failed (the first failure is kept; its backend is reconciled), or a
/// backend done with all of its victims.
fn victim_answer(
    job: &mut LoadJob,
    event: Event,
    books: &mut Books,
    out: &mut Vec<Command>,
    pending: &mut usize,
    failed: &mut Option<VramError>,
) {
    match event {
        Event::Unloaded {
            model,
            result: Ok(()),
        }
        | Event::Parked {
            model,
            result: Ok(false),
        } => job.evicted(model, books, out),
        Event::Parked {
            model,
            result: Ok(true),
        } => job.parked(model, books, out),
        Event::Unloaded {
            model,
            result: Err(e),
        }
        | Event::Parked {
            model,
            result: Err(e),
        } => {
            // A failed unload may have half happened: the victim's backend
            // says what it still holds.
            if let Some(kind) = books.ledger.get(&model).map(|e| e.kind.clone()) {
                out.push(Command::Reconcile { kind });
            }
            failed.get_or_insert(e);
        }
        Event::UnloadsDone => *pending = pending.saturating_sub(1),
        _ => {}
    }
}

/// Victims not unloaded yet are resident again.
fn cancel_unloads(ledger: &mut Ledger) {
    let unloading: Vec<ArcStr> = ledger
        .entries()
        .filter(|e| e.state == ModelState::Unloading)
        .map(|e| e.id.clone())
        .collect();
    for id in unloading {
        ledger.cancel_unload(&id);
    }
}

impl Job for LoadJob {
    type Output = Result<Loaded, VramError>;

    fn handle(&mut self, event: Event, books: &mut Books, now: Instant, out: &mut Vec<Command>) {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        match (phase, event) {
            (Phase::Planning, Event::Start) => {
                self.phase = Phase::Planning;
                out.push(Command::ReadCard);
            }
            (Phase::Planning, Event::Card(card)) => self.plan(card, books, now, out),
            (Phase::WaitingLeases, event @ (Event::Released | Event::Deadline)) => {
                if matches!(event, Event::Deadline) {
                    // The wait is over, whatever the clock says: a manager
                    // that is shutting down ends every wait at once, and a
                    // plan against the old deadline would wait again.
                    self.lease_deadline = Some(now);
                }
                self.phase = Phase::Planning;
                out.push(Command::ReadCard);
            }
            (
                Phase::Evicting {
                    mut pending,
                    mut failed,
                    used,
                    release,
                    load_follows,
                },
                event @ (Event::Unloaded { .. }
                | Event::Parked { .. }
                | Event::UnloadsDone
                | Event::Unloads(_)),
            ) => {
                match event {
                    // A backend's whole answer: its victims, then its end,
                    // as the single events would, with one pass through
                    // the phase.
                    Event::Unloads(results) => {
                        for (model, result) in results {
                            let event = Event::Unloaded { model, result };
                            victim_answer(self, event, books, out, &mut pending, &mut failed);
                        }
                        let done = Event::UnloadsDone;
                        victim_answer(self, done, books, out, &mut pending, &mut failed);
                    }
                    event => victim_answer(self, event, books, out, &mut pending, &mut failed),
                }
                self.phase = Phase::Evicting {
                    pending,
                    failed,
                    used,
                    release,
                    load_follows,
                };
                self.evictions_done(books, now, out);
            }
            (Phase::Releasing { since, .. }, Event::LoadingAfter(card)) => {
                // The backend saw the memory back and loads.
                self.release_waited = Some(now.saturating_duration_since(since));
                self.phase = Phase::Loading {
                    used_before: Some(card.used),
                };
            }
            // A reading, whoever took it: no load followed (a backend that
            // loads answers `LoadingAfter`); the wait goes on here.
            (
                Phase::Releasing {
                    target,
                    since,
                    until,
                    pause,
                    ..
                },
                Event::Card(card),
            ) => match card {
                Some(card) if card.free < target && now < until => {
                    self.phase = Phase::Releasing {
                        target,
                        since,
                        until,
                        pause: next_pause(pause, books.release.poll),
                        load_follows: false,
                    };
                    out.push(Command::Wait {
                        until: after(now, pause).min(until),
                    });
                }
                Some(card) => {
                    self.release_waited = Some(now.saturating_duration_since(since));
                    if card.free < target {
                        tracing::warn!(
                            free = card.free,
                            target,
                            "evicted memory not returned in time; loading anyway"
                        );
                    }
                    self.start_load(Some(card.used), books, out);
                }
                None => {
                    self.release_waited = Some(now.saturating_duration_since(since));
                    self.start_load(None, books, out)
                }
            },
            // While the backend reads (`load_follows`), no wait is set: a
            // deadline then is stale, and another reading could load twice.
            (
                phase @ Phase::Releasing {
                    load_follows: false,
                    ..
                },
                Event::Deadline,
            ) => {
                self.phase = phase;
                out.push(Command::ReadCard);
            }
            (Phase::Loading { used_before }, Event::Loaded(result)) => {
                match (result, used_before) {
                    (Ok(()), Some(used_before)) => {
                        self.phase = Phase::Measuring { used_before };
                        out.push(Command::ReadCard);
                    }
                    (Ok(()), None) => self.commit(None, books, now, out),
                    (Err(e), _) if self.waking => {
                        // A failed wake stops the server: its state is
                        // unknown, and a stopped server holds nothing.
                        let kind = books.ledger.get(&self.model).map(|e| e.kind.clone());
                        tracing::warn!(model = %self.model, error = %e, "wake failed; stopping the server");
                        match kind {
                            Some(kind) => {
                                out.push(Command::Unload {
                                    kind,
                                    models: smallvec::smallvec![self.model.clone()],
                                });
                                self.phase = Phase::Refusing { error: e };
                            }
                            None => self.abort(e, books, out),
                        }
                    }
                    (Err(e), _) => self.abort(e, books, out),
                }
            }
            (Phase::Measuring { used_before }, Event::Card(card)) => {
                // Loads are serialised: the card's growth is this model.
                let measured = card.map(|c| c.used.saturating_sub(used_before));
                self.commit(measured, books, now, out);
            }
            (
                Phase::MakingRoom {
                    mut pending,
                    mut failed,
                    measured,
                },
                event @ (Event::Unloaded { .. } | Event::Parked { .. } | Event::UnloadsDone),
            ) => {
                victim_answer(self, event, books, out, &mut pending, &mut failed);
                match (pending, failed) {
                    (0, Some(e)) => self.refuse(e, books, out),
                    (0, None) => self.resident(Some(measured), books, now, out),
                    (pending, failed) => {
                        self.phase = Phase::MakingRoom {
                            pending,
                            failed,
                            measured,
                        }
                    }
                }
            }
            (Phase::Refusing { error }, Event::Unloaded { result, .. }) => {
                let kind = books.forget(&self.model).map(|e| e.kind);
                if let (Err(e), Some(kind)) = (&result, kind) {
                    // It may still be on the card: ask its backend.
                    tracing::error!(model = %self.model, error = %e, "could not unload a model that does not fit");
                    out.push(Command::Reconcile { kind });
                }
                out.push(load_failed(&self.model, &error));
                self.finish(Err(error));
            }
            (phase, Event::Unloads(results)) => {
                self.phase = phase;
                self.unloads(results, books, now, out);
            }
            (phase, event) => {
                // An event this phase does not wait for (a stale timer):
                // nothing changes.
                tracing::debug!(model = %self.model, ?event, "load job ignored an event");
                self.phase = phase;
            }
        }
    }

    fn outcome(&mut self) -> Option<Self::Output> {
        self.outcome.take()
    }

    fn is_done(&self) -> bool {
        self.outcome.is_some()
    }
}
