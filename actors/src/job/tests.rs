//! The job machines driven by a scripted world: random interleavings of
//! backend answers (including failures), card readings, lease takes and
//! releases, deadlines and crashes that lose models, with the invariants
//! checked after every event:
//!
//! - the bytes promised to resident and loading models never exceed the
//!   capacity, and between jobs `used <= capacity`;
//! - no leased, pinned or protected-for-a-lower-tier model is unloaded for
//!   a load, and no leased model is unloaded on request;
//! - a load that fails leaves no reservation and no model half-unloaded;
//! - every job answers exactly once.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::kind::Kind;
use crate::ledger::ModelState;
use crate::order::Order;

const GIB: u64 = 1 << 30;
const CAPACITY: u64 = 16 * GIB;

/// (id, kind, GiB, pinned); "big" measures larger than declared.
fn catalog() -> Vec<(&'static str, &'static str, u64, bool)> {
    vec![
        ("llm-a", "llm", 8, false),
        ("llm-b", "llm", 10, false),
        ("llm-c", "llm", 4, false),
        ("tts-a", "tts", 2, false),
        ("tts-b", "tts", 3, false),
        ("asr-a", "asr", 3, false),
        ("asr-pin", "asr", 1, true),
        ("big", "llm", 6, false),
        ("huge", "llm", 17, false),
    ]
}

/// How a model parks: (residual on the card, host RAM).
fn parks(id: &str) -> Option<(u64, u64)> {
    match id {
        "llm-a" => Some((GIB, 8 * GIB)),
        "llm-c" => Some((GIB / 2, 4 * GIB)),
        "tts-b" => Some((GIB / 4, 2 * GIB)),
        _ => None,
    }
}

fn books() -> Books {
    let mut declared = Catalog::new();
    for (id, kind, gib, pinned) in catalog() {
        let mut spec = ModelSpec::new(id, kind, gib * GIB).pinned(pinned);
        // Some models park instead of stopping (host budget: 12 GiB, so
        // not all of them at once).
        if let Some((vram, host)) = parks(id) {
            spec = spec.parks(crate::model::Park { vram, host });
        }
        declared.insert(spec);
    }
    let mut kinds = Kinds::new();
    kinds.insert(Kind::new("llm", 0, false));
    kinds.insert(Kind::new("tts", 1, false));
    kinds.insert(Kind::new("asr", 2, true));
    Books {
        ledger: Ledger::new(CAPACITY),
        kinds,
        planned: declared.clone(),
        declared,
        leases: Default::default(),
        last_used: Default::default(),
        ttl: [("tts-a".to_string(), Duration::from_secs(5))]
            .into_iter()
            .collect(),
        reserve: 0,
        lease_wait: Duration::from_secs(2),
        order: Order::Strict,
        host_budget: 12 * GIB,
        listening: true,
        release: ReleaseWait {
            fraction: 0.75,
            poll: Duration::from_millis(250),
            timeout: Duration::from_secs(5),
        },
    }
}

/// What the world does next, drawn at random.
#[derive(Debug, Clone)]
enum Req {
    Load(usize),
    Unload(usize),
    Expire(usize),
    Crash(usize),
    Reconcile(usize),
    Acquire(usize),
    Release(usize),
    /// The manager restarts: its ledger is rebuilt from every backend.
    RestartManager,
}

fn req() -> impl Strategy<Value = Req> {
    let n = catalog().len();
    prop_oneof![
        6 => (0..n).prop_map(Req::Load),
        2 => (0..n).prop_map(Req::Unload),
        1 => (0..n).prop_map(Req::Expire),
        1 => (0..3usize).prop_map(Req::Crash),
        1 => (0..3usize).prop_map(Req::Reconcile),
        3 => (0..n).prop_map(Req::Acquire),
        3 => (0..n).prop_map(Req::Release),
        1 => Just(Req::RestartManager),
    ]
}

const KINDS: [&str; 3] = ["llm", "tts", "asr"];

/// The scripted world: backends, the card, leases and the clock.
struct World {
    books: Books,
    now: Instant,
    /// What each backend really holds.
    loaded: BTreeSet<ArcStr>,
    /// Which of those sleep (parked: only their residual on the card).
    parked: BTreeSet<ArcStr>,
    /// Sleeping models whose stop was refused: the manager can no longer
    /// tell whether they sleep, so once a reconcile finds them it counts
    /// them whole (never less than they may hold).
    unknown: BTreeSet<ArcStr>,
    next_lease: u64,
    /// Models the running job has asked to start.
    started: BTreeSet<ArcStr>,
    /// Random choices, consumed in order (cycled).
    dice: Vec<u8>,
    roll: usize,
}

impl World {
    fn new(dice: Vec<u8>) -> Self {
        Self {
            books: books(),
            now: Instant::now(),
            loaded: BTreeSet::new(),
            parked: BTreeSet::new(),
            unknown: BTreeSet::new(),
            next_lease: 0,
            started: BTreeSet::new(),
            dice,
            roll: 0,
        }
    }

    /// Loads `model`, which must succeed (for the scripted tests).
    fn load(&mut self, model: &str) {
        let loaded = self.run(LoadJob::new(model), Some(model));
        assert!(matches!(loaded, Ok(Ok(_))), "{model}: {loaded:?}");
    }

    fn die(&mut self) -> u8 {
        let d = self.dice[self.roll % self.dice.len()];
        self.roll += 1;
        d
    }

    fn memory(&self) -> GpuMemory {
        // The card: every loaded model's true bytes ("big" takes 7 GiB
        // more than declared, "llm-b" 8 GiB less).
        let used: u64 = self
            .loaded
            .iter()
            .map(|m| match m.as_str() {
                parked if self.parked.contains(parked) => parks(parked).map_or(0, |p| p.0),
                "big" => 13 * GIB,
                "llm-b" => 2 * GIB,
                other => self.books.declared.get(other).map_or(0, |s| s.bytes),
            })
            .sum();
        GpuMemory {
            total: CAPACITY,
            used,
            free: CAPACITY.saturating_sub(used),
        }
    }

    fn lease(&mut self, model: &str) {
        if self.books.ledger.lease(model) {
            self.next_lease += 1;
            self.books.leases.insert(
                self.next_lease,
                (ArcStr::from(model), Arc::new(AtomicBool::new(true))),
            );
        }
    }

    /// Releases one lease on `model`; answers whether one was held.
    fn release(&mut self, model: &str) -> bool {
        let id = self
            .books
            .leases
            .iter()
            .find(|(_, (m, _))| m == model)
            .map(|(id, _)| *id);
        match id {
            Some(id) => {
                self.books.leases.remove(&id);
                self.books.ledger.release(model);
                true
            }
            None => false,
        }
    }

    fn check(&self, context: &str) -> Result<(), TestCaseError> {
        let promised: u64 = self
            .books
            .ledger
            .entries()
            .filter(|e| e.state != ModelState::Unloading)
            .map(|e| e.bytes)
            .sum();
        // Over the capacity only to mirror a card that really is (a model
        // that refused to unload, then found by a reconcile).
        let held: u64 = self
            .loaded
            .iter()
            .filter_map(|m| self.books.planned.get(m))
            .map(|s| match parks(&s.id) {
                // A model of unknown state counts whole unless the ledger
                // has it asleep again.
                Some((vram, _))
                    if self.parked.contains(&s.id)
                        && (!self.unknown.contains(&s.id)
                            || self
                                .books
                                .ledger
                                .get(&s.id)
                                .is_some_and(|e| e.state == ModelState::Parked)) =>
                {
                    vram
                }
                _ => s.bytes,
            })
            .sum();
        prop_assert!(
            promised <= CAPACITY || held > CAPACITY,
            "{context}: {promised} bytes promised > capacity ({held} held)"
        );
        // Parked models hold their residual on the books and stay within
        // the host budget.
        prop_assert!(
            self.books.host_parked() <= self.books.host_budget,
            "{context}: parked models hold {} host bytes > budget",
            self.books.host_parked()
        );
        for entry in self.books.ledger.entries() {
            if entry.state == ModelState::Parked {
                let residual = parks(&entry.id).map(|p| p.0);
                prop_assert_eq!(Some(entry.bytes), residual, "{} parked", &entry.id);
                prop_assert_eq!(entry.leases, 0, "{} parked with leases", &entry.id);
            }
        }
        Ok(())
    }

    /// Runs one job to its end with random answers; checks every event.
    fn run<J: Job + 'static>(
        &mut self,
        mut job: J,
        requester: Option<&str>,
    ) -> Result<J::Output, TestCaseError>
    where
        J::Output: std::fmt::Debug,
    {
        let restarting = std::any::TypeId::of::<J>() == std::any::TypeId::of::<RestartJob>();
        self.started.clear();
        let mut events = VecDeque::from([Event::Start]);
        let mut steps = 0;
        loop {
            let Some(event) = events.pop_front() else {
                self.check("after the job")?;
                // Asleep in the ledger exactly when asleep in the world
                // (a restart may leave the books to the reconcile after it).
                if !restarting {
                    for entry in self.books.ledger.entries() {
                        let asleep = self.parked.contains(&entry.id);
                        match entry.state {
                            ModelState::Parked => prop_assert!(
                                asleep,
                                "{} parked in the ledger, awake in the world",
                                entry.id
                            ),
                            ModelState::Resident => prop_assert!(
                                !asleep || self.unknown.contains(&entry.id),
                                "{} resident in the ledger, asleep in the world",
                                entry.id
                            ),
                            _ => {}
                        }
                    }
                }
                let outcome = job.outcome();
                prop_assert!(outcome.is_some(), "the job stopped without an answer");
                prop_assert!(job.outcome().is_none(), "a job answered twice");
                // A finished job takes no more events.
                let mut out = Vec::new();
                job.handle(Event::Deadline, &mut self.books, self.now, &mut out);
                prop_assert!(out.is_empty() && job.outcome().is_none());
                return Ok(outcome.unwrap_or_else(|| unreachable!()));
            };
            steps += 1;
            prop_assert!(steps < 1000, "the job never finished");
            // Requests keep coming while a job runs: leases are taken on
            // resident models and given back between any two events.
            match self.die() % 8 {
                6 => {
                    let resident: Vec<ArcStr> = self
                        .books
                        .ledger
                        .entries()
                        .filter(|e| e.state == ModelState::Resident)
                        .map(|e| e.id.clone())
                        .collect();
                    if !resident.is_empty() {
                        let i = self.die() as usize % resident.len();
                        self.lease(&resident[i]);
                    }
                }
                7 => {
                    if let Some(id) = self.books.leases.keys().next().copied() {
                        self.books.release(id, self.now);
                    }
                }
                _ => {}
            }
            let mut out = Vec::new();
            job.handle(event, &mut self.books, self.now, &mut out);
            // A restart job knowingly holds a stale ledger until the
            // backend's list arrives (the crash lost models); it is checked
            // when it ends.
            if !restarting {
                self.check("after an event")?;
            }
            // Each command's answers keep their order; the answers of
            // different backends' unloads interleave at random, as they do
            // when backends work at once.
            let mut streams: Vec<VecDeque<Event>> = Vec::new();
            for command in out {
                streams.push(self.answers(command, requester)?.into());
            }
            streams.retain(|s| !s.is_empty());
            while !streams.is_empty() {
                let i = self.die() as usize % streams.len();
                if let Some(event) = streams[i].pop_front() {
                    events.push_back(event);
                }
                streams.retain(|s| !s.is_empty());
            }
            // A job finishes only when nothing it asked for is under way:
            // all that may still come is the closing `UnloadsDone` of the
            // unload that finished it.
            if job.is_done() {
                prop_assert!(
                    events.iter().all(|e| matches!(e, Event::UnloadsDone)),
                    "the job finished with answers still to come: {events:?}"
                );
            }
        }
    }

    /// The world's answer to the unload of one victim (checked first).
    fn unload(
        &mut self,
        model: ArcStr,
        kind: &str,
        requester: Option<&str>,
    ) -> Result<Event, TestCaseError> {
        let entry = self.books.ledger.get(&model);
        prop_assert!(entry.is_some(), "unload of {model}, which the ledger lacks");
        let entry = entry.unwrap_or_else(|| unreachable!());
        prop_assert_eq!(&entry.kind, kind);
        prop_assert_eq!(entry.leases, 0, "{} is leased", model);
        if let Some(requester) = requester
            && requester != model
        {
            prop_assert!(!entry.pinned, "{} is pinned", model);
            let them = self.books.kinds.get(&entry.kind).cloned();
            let us = self
                .books
                .declared
                .get(requester)
                .and_then(|s| self.books.kinds.get(&s.kind))
                .cloned();
            if let (Some(them), Some(us)) = (them, us) {
                prop_assert!(them.evictable_by(&us), "{} is protected", model);
            }
        }
        let result = if self.die().is_multiple_of(10) {
            if self.parked.contains(&model) {
                self.unknown.insert(model.clone());
            }
            Err(VramError::BackendFailed {
                model: model.to_string(),
                reason: "refused".into(),
            })
        } else {
            self.loaded.remove(&model);
            self.parked.remove(&model);
            self.unknown.remove(&model);
            Ok(())
        };
        Ok(Event::Unloaded { model, result })
    }

    /// The world's answer to parking one victim (checked as an unload):
    /// asleep, or (its sleep failed) stopped, or a failure.
    fn park(
        &mut self,
        model: ArcStr,
        kind: &str,
        requester: Option<&str>,
    ) -> Result<Event, TestCaseError> {
        let Event::Unloaded { model, result } = self.unload(model, kind, requester)? else {
            unreachable!("`unload` answers Unloaded");
        };
        prop_assert!(parks(&model).is_some(), "{} cannot park", model);
        let result = match result {
            Ok(()) if self.die().is_multiple_of(5) => Ok(false),
            Ok(()) => {
                // `unload` took it off; parked, it stays loaded, asleep.
                self.loaded.insert(model.clone());
                self.parked.insert(model.clone());
                Ok(true)
            }
            Err(e) => Err(e),
        };
        Ok(Event::Parked { model, result })
    }

    /// The world's answers to one command (checked first): one per victim
    /// of an unload, up to the first failure; at most one otherwise.
    fn answers(
        &mut self,
        command: Command,
        requester: Option<&str>,
    ) -> Result<Vec<Event>, TestCaseError> {
        if let Command::Park { kind, model } = command {
            return Ok(vec![
                self.park(model, &kind, requester)?,
                Event::UnloadsDone,
            ]);
        }
        if let Command::UnloadThenLoad {
            models,
            spec,
            when_free,
        } = command
        {
            // The unloads as one backend answers them; the load only if
            // every victim left (and the card, read when asked, shows the
            // memory back).
            let kind = spec.kind.clone();
            let mut events = self.answers(Command::Unload { kind, models }, requester)?;
            let failed = events.iter().any(|e| match e {
                Event::Unloaded { result, .. } => result.is_err(),
                Event::Unloads(batch) => batch.iter().any(|(_, r)| r.is_err()),
                _ => false,
            });
            if failed {
                return Ok(events);
            }
            if let Some(target) = when_free {
                match self.answer(Command::ReadCard)? {
                    Some(Event::Card(Some(card))) if card.free >= target => {
                        events.push(Event::LoadingAfter(card));
                    }
                    reading => {
                        events.extend(reading);
                        return Ok(events);
                    }
                }
            }
            events.extend(self.answer(Command::Load(spec))?);
            return Ok(events);
        }
        let Command::Unload { kind, models } = command else {
            return Ok(self.answer(command)?.into_iter().collect());
        };
        let mut events = Vec::with_capacity(models.len() + 1);
        for model in models {
            let event = self.unload(model, &kind, requester)?;
            let failed = matches!(&event, Event::Unloaded { result: Err(_), .. });
            events.push(event);
            if failed {
                break;
            }
        }
        // A backend's answer comes as one batch (as the actor feeds it) or
        // as single events: both must lead to the same books.
        if self.die().is_multiple_of(2) {
            let batch = events
                .into_iter()
                .filter_map(|e| match e {
                    Event::Unloaded { model, result } => Some((model, result)),
                    _ => None,
                })
                .collect();
            return Ok(vec![Event::Unloads(batch)]);
        }
        events.push(Event::UnloadsDone);
        Ok(events)
    }

    /// The world's answer to one command other than an unload.
    fn answer(&mut self, command: Command) -> Result<Option<Event>, TestCaseError> {
        Ok(Some(match command {
            Command::ReadCard => {
                if self.die().is_multiple_of(8) {
                    Event::Card(None)
                } else {
                    Event::Card(Some(self.memory()))
                }
            }
            Command::Unload { .. } | Command::UnloadThenLoad { .. } | Command::Park { .. } => {
                unreachable!("unloads and parks are answered by `answers`")
            }
            Command::Wake(spec) => {
                prop_assert!(
                    self.parked.contains(&spec.id),
                    "{} woken but not asleep",
                    spec.id
                );
                if self.die().is_multiple_of(8) {
                    Event::Loaded(Err(VramError::BackendFailed {
                        model: spec.id.to_string(),
                        reason: "would not wake".into(),
                    }))
                } else {
                    self.parked.remove(&spec.id);
                    self.unknown.remove(&spec.id);
                    Event::Loaded(Ok(()))
                }
            }
            Command::Load(spec) => {
                // One job starts its model once (a backend that loads
                // after its unloads answers `LoadingAfter`, and the job
                // must not ask again).
                prop_assert!(
                    self.started.insert(spec.id.clone()),
                    "{} started twice by one job",
                    spec.id
                );
                if self.die().is_multiple_of(8) {
                    Event::Loaded(Err(VramError::Timeout {
                        model: spec.id.to_string(),
                        after_ms: 5,
                        reason: String::new(),
                    }))
                } else {
                    // A fresh start: awake, its state known again.
                    self.loaded.insert(spec.id.clone());
                    self.parked.remove(&spec.id);
                    self.unknown.remove(&spec.id);
                    Event::Loaded(Ok(()))
                }
            }
            Command::Crash { kind } => {
                // The crash loses the kind's models now and then.
                if self.die().is_multiple_of(2) {
                    let lost: Vec<ArcStr> = self
                        .loaded
                        .iter()
                        .filter(|m| self.books.declared.get(m).is_some_and(|s| s.kind == kind))
                        .cloned()
                        .collect();
                    for m in lost {
                        self.loaded.remove(&m);
                        self.parked.remove(&m);
                        self.unknown.remove(&m);
                    }
                }
                Event::Crashed(Ok(()))
            }
            Command::List { kind } => {
                let of_kind = |set: &BTreeSet<ArcStr>| {
                    set.iter()
                        .filter(|m| self.books.declared.get(m).is_some_and(|s| s.kind == kind))
                        .map(ToString::to_string)
                        .collect()
                };
                // Only the surely asleep: a sleeper whose stop was refused
                // is in doubt (see `unknown`).
                let asleep = self.parked.difference(&self.unknown).cloned().collect();
                Event::Listed(Ok(Held {
                    loaded: of_kind(&self.loaded),
                    parked: of_kind(&asleep),
                }))
            }
            Command::WaitRelease { until } => {
                let leased: Vec<ArcStr> =
                    self.books.leases.values().map(|(m, _)| m.clone()).collect();
                if !leased.is_empty() && self.die().is_multiple_of(2) {
                    let i = self.die() as usize % leased.len();
                    self.release(&leased[i]);
                    // Time passes while a job waits, release or not.
                    self.now += Duration::from_millis(50);
                    Event::Released
                } else {
                    self.now = self.now.max(until);
                    Event::Deadline
                }
            }
            Command::Wait { until } => {
                prop_assert!(until > self.now, "a wait into the past");
                self.now = until;
                Event::Deadline
            }
            Command::Publish(_)
            | Command::CountEviction { .. }
            | Command::Reconcile { .. }
            | Command::Warm => return Ok(None),
        }))
    }
}

fn name(i: usize) -> &'static str {
    catalog()[i % catalog().len()].0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_interleaving_keeps_the_invariants(
        reqs in proptest::collection::vec(req(), 1..40),
        dice in proptest::collection::vec(any::<u8>(), 1..64),
        adaptive in any::<bool>(),
        listening in any::<bool>(),
    ) {
        let mut world = World::new(dice);
        if adaptive {
            world.books.order = Order::Adaptive;
        }
        // Without subscribers the jobs build fewer events; the books must
        // come out the same either way.
        world.books.listening = listening;
        for req in reqs {
            world.now += Duration::from_secs(1);
            match req {
                Req::Load(i) => {
                    let model = name(i);
                    world.books.ledger.note_request(model);
                    let was_parked = world.books.ledger.get(model).is_some_and(|e| e.state == ModelState::Parked);
                    let result = world.run(LoadJob::new(model), Some(model))?;
                    let entry = world.books.ledger.get(model);
                    match &result {
                        Ok(_) => prop_assert!(entry.is_some_and(|e| e.state == ModelState::Resident)),
                        Err(e) => {
                            let was_there = entry.is_some_and(|e| e.state == ModelState::Resident)
                                && matches!(e, VramError::InUse { .. });
                            // A wake that never happened leaves it asleep.
                            let asleep = was_parked && entry.is_some_and(|e| e.state == ModelState::Parked);
                            prop_assert!(entry.is_none() || was_there || asleep, "a reservation remains after {e}");
                        }
                    }
                    let unloading = world
                        .books
                        .ledger
                        .entries()
                        .filter(|e| !matches!(e.state, ModelState::Resident | ModelState::Parked))
                        .count();
                    prop_assert_eq!(unloading, 0, "a model is left loading or unloading");
                    if model == "huge" {
                        prop_assert_eq!(result.map_err(|e| e.code()).err(), Some("exceeds_capacity"));
                    }
                }
                Req::Unload(i) | Req::Expire(i) => {
                    let model = name(i);
                    let job = if matches!(req, Req::Expire(_)) { UnloadJob::expiry(model) } else { UnloadJob::new(model) };
                    let result = world.run(job, None)?;
                    if let Ok(done) = result && done.was_resident {
                        prop_assert!(world.books.ledger.get(model).is_none());
                    }
                }
                Req::Crash(k) => {
                    world.run(RestartJob::crash(KINDS[k]), None)?.map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                Req::Reconcile(k) => {
                    world.run(RestartJob::reconcile(KINDS[k]), None)?.map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                Req::Acquire(i) => world.lease(name(i)),
                Req::Release(i) => {
                    world.release(name(i));
                }
                Req::RestartManager => {
                    // As `VramActor::restarting`: the ledger is emptied
                    // (leases and history kept), then rebuilt kind by kind.
                    world.books.ledger.clear();
                    for kind in KINDS {
                        world.run(RestartJob::reconcile(kind), None)?.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                    // Each model the backends hold is back: asleep at its
                    // residual if it surely sleeps, else whole.
                    for model in &world.loaded {
                        let entry = world.books.ledger.get(model);
                        let asleep = world.parked.contains(model) && !world.unknown.contains(model);
                        let state = if asleep { ModelState::Parked } else { ModelState::Resident };
                        prop_assert_eq!(entry.map(|e| e.state), Some(state), "{} after the restart", model);
                    }
                    prop_assert_eq!(world.books.ledger.len(), world.loaded.len());
                }
            }
            let held: u64 = world
                .loaded
                .iter()
                .filter_map(|m| world.books.planned.get(m))
                .map(|s| s.bytes)
                .sum();
            prop_assert!(
                world.books.ledger.used() <= CAPACITY || held > CAPACITY,
                "used > capacity between jobs"
            );
            // After a restart job the ledger matches the backends; loads
            // and unloads keep them equal unless an unload failed.
            if matches!(req, Req::Crash(_) | Req::Reconcile(_)) {
                for entry in world.books.ledger.entries() {
                    if KINDS.iter().any(|k| *k == entry.kind) {
                        let kind_listed = world.loaded.contains(&entry.id);
                        let same_kind = matches!(req, Req::Crash(k) | Req::Reconcile(k) if KINDS[k] == entry.kind);
                        prop_assert!(!same_kind || kind_listed, "{} kept after reconcile", entry.id);
                    }
                }
            }
        }
    }
}

#[test]
fn an_over_declared_victim_does_not_stall_the_release_wait() {
    // llm-b is declared 10 GiB and really holds 2 GiB (measured on load).
    let mut world = World::new(vec![1]);
    world.load("llm-b");
    assert_eq!(
        world.books.ledger.get("llm-b").unwrap().measured,
        Some(2 * GIB)
    );
    // llm-a (8 GiB) needs llm-b out: the wait targets 2 GiB back, which
    // the card shows at once; no pause is asked for.
    world
        .books
        .declared
        .insert(ModelSpec::new("llm-a", "llm", 15 * GIB));
    world.books.planned = world.books.declared.clone();
    let mut job = LoadJob::new("llm-a");
    let mut out = Vec::new();
    job.handle(Event::Start, &mut world.books, world.now, &mut out);
    assert_eq!(out, vec![Command::ReadCard]);
    let mut events = VecDeque::from([Event::Card(Some(world.memory()))]);
    let mut waits = 0;
    while let Some(event) = events.pop_front() {
        let mut out = Vec::new();
        job.handle(event, &mut world.books, world.now, &mut out);
        for command in out {
            waits += usize::from(matches!(command, Command::Wait { .. }));
            if let Ok(next) = world.answers(command, Some("llm-a")) {
                events.extend(next);
            }
        }
    }
    assert_eq!(
        waits, 0,
        "the release wait paused for memory that was already back"
    );
    assert_eq!(
        job.outcome().unwrap().unwrap().evicted,
        vec!["llm-b".to_string()]
    );
}

#[test]
fn a_model_measured_past_the_capacity_is_unloaded_and_refused() {
    let mut world = World::new(vec![1]);
    for model in ["asr-a", "tts-b"] {
        world.load(model);
    }
    world.lease("tts-b");
    // "big" is declared 6 GiB and takes 13: with asr-a (3 GiB, protected)
    // and tts-b (3 GiB, leased) there is no room by any plan.
    let err = world
        .run(LoadJob::new("big"), Some("big"))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "insufficient_vram");
    assert!(err.to_string().contains(&(13 * GIB).to_string()), "{err}");
    assert!(world.books.ledger.get("big").is_none());
    assert!(!world.loaded.contains("big"), "it was unloaded again");
    // Later plans use the measured size.
    assert_eq!(world.books.planned.get("big").unwrap().bytes, 13 * GIB);
}

#[test]
fn a_server_exit_forgets_a_resident_model_and_voids_its_leases() {
    let mut world = World::new(vec![1]);
    world.load("tts-a");
    world.lease("tts-a");
    let valid = world.books.leases.values().next().unwrap().1.clone();
    assert!(world.books.server_exited("tts-a"));
    assert!(world.books.ledger.get("tts-a").is_none());
    assert!(!world.books.last_used.contains_key("tts-a"));
    assert!(
        !valid.load(std::sync::atomic::Ordering::Relaxed),
        "the lease is void"
    );
    // Its release then changes nothing; an exit of a model not resident
    // is left alone.
    assert!(!world.books.release(1, world.now));
    assert!(!world.books.server_exited("tts-a"));
}

#[test]
fn a_release_restarts_the_idle_clock_once() {
    let mut world = World::new(vec![1]);
    world.load("tts-a");
    world.lease("tts-a");
    let later = world.now + Duration::from_secs(3);
    assert!(world.books.release(1, later));
    assert_eq!(world.books.last_used["tts-a"], later);
    assert_eq!(world.books.ledger.get("tts-a").unwrap().leases, 0);
    assert!(!world.books.release(1, later), "released once");
}

#[test]
fn a_reconcile_keeps_the_measured_size() {
    let mut world = World::new(vec![1]);
    world.load("big");
    let entry = world.books.ledger.get("big").unwrap().clone();
    assert_eq!((entry.bytes, entry.measured), (13 * GIB, Some(13 * GIB)));
    // The manager restarts: its ledger is rebuilt from the backends.
    world.books.ledger = Ledger::new(CAPACITY);
    let held = Held {
        loaded: vec!["big".to_string()],
        parked: vec![],
    };
    restart::reconcile(&mut world.books, "llm", &held, world.now);
    let entry = world.books.ledger.get("big").unwrap();
    assert_eq!((entry.bytes, entry.measured), (13 * GIB, Some(13 * GIB)));
}

#[test]
fn a_manager_restart_finds_a_parked_model_asleep_and_wakes_it_for_its_next_load() {
    // llm-a (8 GiB) parks holding 1 GiB for llm-b (10 GiB).
    let mut world = World::new(vec![1]);
    world.load("llm-a");
    world
        .run(LoadJob::new("llm-b"), Some("llm-b"))
        .unwrap()
        .unwrap();
    let held = |world: &World| -> Vec<(ArcStr, ModelState, u64)> {
        let entries = world.books.ledger.entries();
        entries.map(|e| (e.id.clone(), e.state, e.bytes)).collect()
    };
    let before = held(&world);
    // The manager restarts: its ledger is rebuilt from the backend, which
    // holds both servers, llm-a asleep.
    world.books.ledger = Ledger::new(CAPACITY);
    world
        .run(RestartJob::reconcile("llm"), None)
        .unwrap()
        .unwrap();
    let entry = world.books.ledger.get("llm-a").unwrap();
    assert_eq!((entry.state, entry.bytes), (ModelState::Parked, GIB));
    assert!(
        !world.books.last_used.contains_key("llm-a"),
        "no idle clock"
    );
    assert_eq!(
        held(&world),
        before,
        "each model held as before the restart"
    );
    assert_eq!(world.books.ledger.used(), 11 * GIB);
    // Its next load wakes it (the world fails a wake of a model awake).
    world.books.ledger.note_request("llm-a");
    let woke = world
        .run(LoadJob::new("llm-a"), Some("llm-a"))
        .unwrap()
        .unwrap();
    assert_eq!(woke.evicted, ["llm-b"]);
    assert!(!world.parked.contains("llm-a") && world.loaded.contains("llm-a"));
}

#[test]
fn a_victim_that_can_park_sleeps_and_wakes_on_its_next_load() {
    // llm-a (8 GiB) parks holding 1 GiB; llm-b (10 GiB) needs its room.
    let mut world = World::new(vec![1]);
    world.load("llm-a");
    let loaded = world.run(LoadJob::new("llm-b"), Some("llm-b")).unwrap();
    assert_eq!(loaded.unwrap().evicted, ["llm-a"]);
    let entry = world.books.ledger.get("llm-a").unwrap();
    assert_eq!((entry.state, entry.bytes), (ModelState::Parked, GIB));
    assert!(world.parked.contains("llm-a"), "its server sleeps");
    assert_eq!(world.books.host_parked(), 8 * GIB);
    // Its next load wakes it (the world checks a wake is of a sleeper).
    world.books.ledger.note_request("llm-a");
    let woke = world
        .run(LoadJob::new("llm-a"), Some("llm-a"))
        .unwrap()
        .unwrap();
    assert_eq!(woke.evicted, ["llm-b"], "llm-b cannot park: it stops");
    let entry = world.books.ledger.get("llm-a").unwrap();
    assert_eq!((entry.state, entry.bytes), (ModelState::Resident, 8 * GIB));
    assert!(!world.parked.contains("llm-a") && world.loaded.contains("llm-a"));
    assert!(world.books.ledger.get("llm-b").is_none());
}

#[test]
fn a_spent_host_budget_stops_instead_of_parking() {
    let mut world = World::new(vec![1]);
    world.books.host_budget = 4 * GIB; // llm-a needs 8 to park
    world.load("llm-a");
    world
        .run(LoadJob::new("llm-b"), Some("llm-b"))
        .unwrap()
        .unwrap();
    assert!(
        world.books.ledger.get("llm-a").is_none(),
        "stopped, not parked"
    );
    assert!(!world.loaded.contains("llm-a"));
}

#[test]
fn a_parked_victim_keeps_its_host_ram_until_it_is_stopped() {
    let mut world = World::new(vec![1]);
    world.books.host_budget = 10 * GIB;
    let expired = park_idle(&mut world, "llm-a");
    assert!(expired.was_resident);
    assert_eq!(world.books.host_parked(), 8 * GIB, "llm-a sleeps");
    for model in ["llm-c", "tts-a", "tts-b"] {
        world.load(model);
    }
    // llm-b needs llm-a (asleep, 8 GiB of host RAM) stopped and llm-c out.
    // llm-c may not park on the RAM llm-a holds until its stop is done:
    // were that stop refused, 12 GiB would sleep on a 10 GiB budget.
    world
        .run(LoadJob::new("llm-b"), Some("llm-b"))
        .unwrap()
        .unwrap();
    assert!(world.books.ledger.get("llm-a").is_none());
    assert!(
        world.books.ledger.get("llm-c").is_none(),
        "stopped, not parked"
    );
    assert!(!world.loaded.contains("llm-c"));
}

#[test]
fn a_victim_stops_instead_of_parking_when_the_ledger_owes_an_excess() {
    let mut world = World::new(vec![1]);
    world.load("llm-a");
    world.load("tts-a");
    // A reconcile found `big` on the card, measured at 13 GiB, and it is
    // leased: the ledger is 7 GiB over its 16.
    let big = world.books.declared.get("big").cloned().unwrap();
    world.books.ledger.insert_resident(&big);
    world.books.calibrate("big", 13 * GIB);
    world.loaded.insert("big".into());
    world.lease("big");
    assert_eq!(world.books.ledger.used(), 23 * GIB);
    // asr-a (3 GiB) takes llm-a and tts-a. Parking llm-a frees 7 GiB of
    // its 8: with tts-a's 2 that makes room for asr-a but leaves the
    // excess owed, so llm-a stops.
    world
        .run(LoadJob::new("asr-a"), Some("asr-a"))
        .unwrap()
        .unwrap();
    assert!(
        world.books.ledger.get("llm-a").is_none(),
        "stopped, not parked"
    );
    assert_eq!(world.books.ledger.used(), 16 * GIB);
}

#[test]
fn batched_and_single_unload_answers_leave_the_same_books() {
    // Die 1 answers every unload as single events, die 2 as one batch;
    // nothing else the world decides differs between them (no failures,
    // no sleep refused, no leases taken in between).
    let run = |die: u8| {
        let mut world = World::new(vec![die]);
        let mut answers = Vec::new();
        for model in [
            "llm-a", "llm-b", "big", "llm-c", "tts-a", "tts-b", "asr-a", "llm-b", "big",
        ] {
            let loaded = world.run(LoadJob::new(model), Some(model)).unwrap();
            answers.push(format!("{loaded:?}"));
        }
        let books: Vec<_> = world.books.ledger.entries().cloned().collect();
        (answers, books, world.loaded.clone())
    };
    let (single, batched) = (run(1), run(2));
    assert!(
        single.0.iter().any(|a| a.contains("evicted: [\"")),
        "some load evicted: {:?}",
        single.0
    );
    assert_eq!(single, batched);
}

#[test]
fn an_idle_model_parks_and_an_explicit_unload_stops_it() {
    let mut world = World::new(vec![1]);
    let expired = park_idle(&mut world, "llm-a");
    assert!(expired.was_resident);
    assert_eq!(
        world.books.ledger.get("llm-a").unwrap().state,
        ModelState::Parked
    );
    // A parked model is a candidate too: stopping it frees its residual.
    world.run(UnloadJob::new("llm-a"), None).unwrap().unwrap();
    assert!(world.books.ledger.get("llm-a").is_none());
    assert!(!world.loaded.contains("llm-a"));
}

/// Loads `model` (it can park), lets it sit past its TTL and expires it:
/// it parks. Answers the expiry's outcome.
fn park_idle(world: &mut World, model: &str) -> crate::events::Unloaded {
    world.books.ttl.insert(model.into(), Duration::from_secs(5));
    world.load(model);
    world.now += Duration::from_secs(10);
    world.run(UnloadJob::expiry(model), None).unwrap().unwrap()
}

/// Runs a load of `model` in `world`, answering every command; answers
/// the commands the job gave (it must load).
fn load_collecting(world: &mut World, model: &str) -> Vec<Command> {
    let (given, outcome) = load_driven(world, model, true);
    assert!(matches!(outcome, Some(Ok(_))), "{model} did not load");
    given
}

/// Runs a load of `model` in `world`, answering every command (every card
/// read with `None` unless `card`); answers the commands the job gave and
/// its outcome.
fn load_driven(
    world: &mut World,
    model: &str,
    card: bool,
) -> (
    Vec<Command>,
    Option<Result<crate::events::Loaded, VramError>>,
) {
    let mut job = LoadJob::new(model);
    let mut given = Vec::new();
    let mut events = VecDeque::from([Event::Start]);
    while let Some(event) = events.pop_front() {
        let mut out = Vec::new();
        job.handle(event, &mut world.books, world.now, &mut out);
        for command in out {
            given.push(command.clone());
            if !card && command == Command::ReadCard {
                events.push_back(Event::Card(None));
            } else if let Ok(next) = world.answers(command, Some(model)) {
                events.extend(next);
            }
        }
    }
    (given, job.outcome())
}

#[test]
fn events_are_built_only_for_subscribers_and_evictions_count_either_way() {
    let run = |listening: bool| {
        let mut world = World::new(vec![1]);
        world.books.listening = listening;
        world.load("llm-b"); // 10 GiB
        // llm-a (8 GiB) needs llm-b out of the 16 GiB card.
        let commands = load_collecting(&mut world, "llm-a");
        (commands, world.books.ledger.clone())
    };
    let published = |commands: &[Command]| -> Vec<&'static str> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Publish(VramEvent::Loading { .. }) => Some("loading"),
                Command::Publish(VramEvent::Evicted { model, .. }) if model == "llm-b" => {
                    Some("evicted")
                }
                Command::Publish(VramEvent::Loaded { .. }) => Some("loaded"),
                Command::CountEviction { model, kind } if model == "llm-b" && kind == "llm" => {
                    Some("counted")
                }
                _ => None,
            })
            .collect()
    };
    let (heard, with) = run(true);
    let (silent, without) = run(false);
    assert_eq!(published(&heard), ["loading", "evicted", "loaded"]);
    assert_eq!(published(&silent), ["counted"]);
    assert_eq!(with, without, "the books do not depend on who listens");
}

/// The loads and unloads among `commands`.
fn backend_calls(commands: &[Command]) -> Vec<&Command> {
    commands
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Load(_) | Command::Unload { .. } | Command::UnloadThenLoad { .. }
            )
        })
        .collect()
}

#[test]
fn with_no_card_victims_on_the_models_backend_and_its_load_are_one_call() {
    let mut world = World::new(vec![1]);
    world.load("llm-b"); // 10 GiB
    // llm-a (8 GiB) needs llm-b out: same backend, nothing to wait for.
    let (commands, outcome) = load_driven(&mut world, "llm-a", false);
    let calls = backend_calls(&commands);
    assert!(
        matches!(calls.as_slice(), [Command::UnloadThenLoad { models, spec, when_free: None }]
            if models.as_slice() == ["llm-b"] && spec.id == "llm-a"),
        "{calls:?}"
    );
    assert_eq!(outcome.unwrap().unwrap().evicted, vec!["llm-b".to_string()]);
    assert_eq!(
        world.books.ledger.get("llm-a").map(|e| e.state),
        Some(ModelState::Resident)
    );
    assert!(world.books.ledger.get("llm-b").is_none());
    assert_eq!(world.loaded, BTreeSet::from([ArcStr::from("llm-a")]));
}

#[test]
fn victims_on_another_backend_are_unloaded_before_the_load_is_asked_for() {
    let mut world = World::new(vec![1]);
    world.load("llm-b"); // 10 GiB
    world.load("llm-c"); // 4 GiB
    // tts-b (3 GiB) evicts an LLM: another backend, so two calls.
    let (commands, outcome) = load_driven(&mut world, "tts-b", false);
    let calls = backend_calls(&commands);
    assert!(
        matches!(calls.as_slice(), [Command::Unload { kind, .. }, Command::Load(spec)]
            if kind == "llm" && spec.id == "tts-b"),
        "{calls:?}"
    );
    assert!(outcome.unwrap().is_ok());
}

#[test]
fn a_victim_that_will_not_leave_stops_a_combined_call_before_its_load() {
    // Die 10: loads and card reads succeed, every unload fails.
    let mut world = World::new(vec![10]);
    world.load("llm-b");
    let (commands, outcome) = load_driven(&mut world, "llm-a", false);
    assert!(
        commands
            .iter()
            .any(|c| matches!(c, Command::UnloadThenLoad { .. })),
        "{commands:?}"
    );
    let error = outcome.unwrap().unwrap_err();
    assert_eq!(error.code(), "backend_failed");
    // No load followed the failure; the books are as before.
    assert_eq!(world.loaded, BTreeSet::from([ArcStr::from("llm-b")]));
    assert!(world.books.ledger.get("llm-a").is_none());
    assert_eq!(
        world.books.ledger.get("llm-b").map(|e| e.state),
        Some(ModelState::Resident)
    );
    assert!(world.books.ledger.used() <= CAPACITY);
}

#[test]
fn with_a_card_the_backend_loads_once_the_card_shows_the_memory_back() {
    let mut world = World::new(vec![1]);
    world.load("llm-b"); // 10 GiB declared, 2 GiB on the card
    let mut job = LoadJob::new("llm-a");
    let mut events = VecDeque::from([Event::Start]);
    let mut combined = Vec::new();
    while let Some(event) = events.pop_front() {
        let mut out = Vec::new();
        job.handle(event, &mut world.books, world.now, &mut out);
        for command in out {
            assert!(
                !matches!(command, Command::Load(_) | Command::Unload { .. }),
                "a separate call: {command:?}"
            );
            if let Command::UnloadThenLoad { when_free, .. } = &command {
                combined.push(*when_free);
            }
            events.extend(world.answers(command, Some("llm-a")).unwrap());
        }
    }
    // The card showed 14 GiB free at plan time; llm-b gives 2 GiB back,
    // three quarters of which the backend waits for.
    assert_eq!(combined, vec![Some(14 * GIB + 3 * GIB / 2)]);
    assert!(job.outcome().unwrap().is_ok());
    assert_eq!(job.release_waited(), Some(Duration::ZERO));
    assert_eq!(world.loaded, BTreeSet::from([ArcStr::from("llm-a")]));
}

#[test]
fn a_card_not_yet_showing_the_memory_back_leaves_the_wait_and_the_load_to_the_job() {
    let mut world = World::new(vec![1]);
    world.load("llm-b");
    let mut books = world.books;
    let now = world.now;
    let mut job = LoadJob::new("llm-a");
    let mut out = Vec::new();
    job.handle(Event::Start, &mut books, now, &mut out);
    let before = GpuMemory {
        total: CAPACITY,
        used: 2 * GIB,
        free: 14 * GIB,
    };
    out.clear();
    job.handle(Event::Card(Some(before)), &mut books, now, &mut out);
    let Some(Command::UnloadThenLoad {
        models, when_free, ..
    }) = out
        .iter()
        .find(|c| matches!(c, Command::UnloadThenLoad { .. }))
        .cloned()
    else {
        panic!("no combined call: {out:?}");
    };
    assert!(when_free.is_some());
    // The backend unloaded llm-b, read the card too early and did not load.
    out.clear();
    let unloads = models.into_iter().map(|m| (m, Ok(()))).collect();
    job.handle(Event::Unloads(unloads), &mut books, now, &mut out);
    assert!(
        !out.iter().any(|c| matches!(c, Command::ReadCard)),
        "{out:?}"
    );
    out.clear();
    job.handle(Event::Card(Some(before)), &mut books, now, &mut out);
    assert!(matches!(out.as_slice(), [Command::Wait { .. }]), "{out:?}");
    // The job reads again after its pause; now the memory is back and the
    // job asks for the load itself.
    out.clear();
    let later = now + Duration::from_millis(10);
    job.handle(Event::Deadline, &mut books, later, &mut out);
    assert_eq!(out, vec![Command::ReadCard]);
    out.clear();
    let back = GpuMemory {
        total: CAPACITY,
        used: 0,
        free: CAPACITY,
    };
    job.handle(Event::Card(Some(back)), &mut books, later, &mut out);
    assert!(
        matches!(out.as_slice(), [Command::Load(spec)] if spec.id == "llm-a"),
        "{out:?}"
    );
    assert_eq!(job.release_waited(), Some(Duration::from_millis(10)));
}

#[test]
fn a_deadline_ends_a_wait_for_leases_even_before_its_time() {
    // A manager that is shutting down answers every wait at once, with the
    // clock where it was: the jobs must not wait again.
    let mut world = World::new(vec![1]);
    world.load("llm-b"); // 10 GiB
    world.lease("llm-b");
    let now = world.now;

    let mut unload = UnloadJob::new("llm-b");
    let mut out = Vec::new();
    unload.handle(Event::Start, &mut world.books, now, &mut out);
    assert!(
        matches!(out.as_slice(), [Command::WaitRelease { .. }]),
        "{out:?}"
    );
    out.clear();
    unload.handle(Event::Deadline, &mut world.books, now, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(unload.outcome().unwrap().unwrap_err().code(), "in_use");

    // llm-a (8 GiB) needs leased llm-b out of the 16 GiB card.
    let mut load = LoadJob::new("llm-a");
    out.clear();
    load.handle(Event::Start, &mut world.books, now, &mut out);
    load.handle(Event::Card(None), &mut world.books, now, &mut out);
    assert!(
        matches!(
            out.as_slice(),
            [Command::ReadCard, Command::WaitRelease { .. }]
        ),
        "{out:?}"
    );
    out.clear();
    load.handle(Event::Deadline, &mut world.books, now, &mut out);
    assert_eq!(out, vec![Command::ReadCard]);
    out.clear();
    load.handle(Event::Card(None), &mut world.books, now, &mut out);
    assert!(
        !out.iter().any(|c| matches!(c, Command::WaitRelease { .. })),
        "{out:?}"
    );
    assert_eq!(
        load.outcome().unwrap().unwrap_err().code(),
        "insufficient_vram"
    );
    assert!(world.books.ledger.get("llm-a").is_none());
}
