//! The restart job: crash a kind's backend on request (fault testing) or
//! follow a restart that happened, then make the ledger's models of that
//! kind equal to what the restarted backend holds.

use std::time::Instant;

use arcstr::ArcStr;

use super::{Books, Command, Event, Job};
use crate::backend::Held;
use crate::error::VramError;
use crate::events::VramEvent;
use crate::ledger::ModelState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Crashing,
    Listing,
    Done,
}

/// Crashes (when asked) and reconciles one kind's backend.
#[derive(Debug)]
pub(crate) struct RestartJob {
    kind: ArcStr,
    crash: bool,
    phase: Phase,
    outcome: Option<Result<(), VramError>>,
}

impl RestartJob {
    /// Crash the backend of `kind`, then reconcile.
    pub(crate) fn crash(kind: impl Into<ArcStr>) -> Self {
        Self::with(kind.into(), true)
    }

    /// Reconcile with the backend of `kind` after it restarted.
    pub(crate) fn reconcile(kind: impl Into<ArcStr>) -> Self {
        Self::with(kind.into(), false)
    }

    fn with(kind: ArcStr, crash: bool) -> Self {
        Self {
            kind,
            crash,
            phase: Phase::Starting,
            outcome: None,
        }
    }

    /// The kind whose backend this job restarts.
    pub(crate) fn kind(&self) -> &str {
        &self.kind
    }

    /// Whether it crashes the backend itself.
    pub(crate) fn crashes(&self) -> bool {
        self.crash
    }

    fn finish(&mut self, result: Result<(), VramError>) {
        self.phase = Phase::Done;
        self.outcome = Some(result);
    }
}

impl Job for RestartJob {
    type Output = Result<(), VramError>;

    fn handle(&mut self, event: Event, books: &mut Books, now: Instant, out: &mut Vec<Command>) {
        if let Event::Unloads(results) = event {
            return self.unloads(results, books, now, out);
        }
        let kind = self.kind.clone();
        match (self.phase, event) {
            (Phase::Starting, Event::Start) if self.crash => {
                self.phase = Phase::Crashing;
                out.push(Command::Crash { kind });
            }
            (Phase::Starting, Event::Start) | (Phase::Crashing, Event::Crashed(Ok(()))) => {
                self.phase = Phase::Listing;
                out.push(Command::List { kind });
            }
            (Phase::Crashing, Event::Crashed(Err(e))) | (Phase::Listing, Event::Listed(Err(e))) => {
                self.finish(Err(e))
            }
            (Phase::Listing, Event::Listed(Ok(held))) => {
                let lost = reconcile(books, &kind, &held, now);
                tracing::warn!(kind = %kind, lost = ?lost, "ledger reconciled with restarted backend");
                out.push(Command::Publish(VramEvent::BackendRestarted { kind, lost }));
                self.finish(Ok(()));
            }
            (_, event) => {
                tracing::debug!(kind = %self.kind, ?event, "restart job ignored an event");
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

/// Makes the ledger's models of `kind` equal to what the backend `held`;
/// answers the models it dropped. Leases on models the backend no longer
/// holds become void; a model the backend holds that the ledger did not
/// know of becomes resident (counting the leases still held on it, as
/// after a restart of the manager itself), or parked, charged only its
/// residual, when the backend says it sleeps: a request for it then wakes
/// it first, and the ledger does not count its whole size on a card
/// where it holds only the residual.
pub(crate) fn reconcile(books: &mut Books, kind: &str, held: &Held, now: Instant) -> Vec<ArcStr> {
    let loaded = &held.loaded;
    let lost: Vec<ArcStr> = books
        .ledger
        .entries()
        .filter(|e| {
            e.kind == kind && e.state != ModelState::Loading && !loaded.iter().any(|m| *m == e.id)
        })
        .map(|e| e.id.clone())
        .collect();
    for id in &lost {
        books.forget(id);
    }
    let void: Vec<ArcStr> = books
        .leases
        .values()
        .map(|(m, _)| m.clone())
        .filter(|m| !loaded.iter().any(|l| l == m))
        .filter(|m| books.declared.get(m).is_some_and(|s| s.kind == kind))
        .collect();
    for id in void {
        books.void_leases(&id);
    }
    for id in loaded {
        if let Some(spec) = books.declared.get(id).cloned()
            && books.ledger.get(id).is_none()
        {
            books.ledger.insert_resident(&spec);
            // Charged as measured before, not as declared.
            if let Some(planned) = books.planned.get(id).filter(|p| p.bytes > spec.bytes) {
                let bytes = planned.bytes;
                books.ledger.calibrate(id, bytes);
            }
            if spec.park.is_some() && held.parked.iter().any(|p| p == id) {
                // Asleep, as `Books::park` leaves a model it parks: no
                // lease (one kept from before the restart is void) and no
                // idle clock.
                let residual = books.residual(id);
                books.ledger.park(id, residual);
                books.void_leases(id);
                books.last_used.remove(id.as_str());
                continue;
            }
            books.used_now_id(&spec.id, now);
            let held = books.leases.values().filter(|(m, _)| m == id).count();
            for _ in 0..held {
                books.ledger.lease(id);
            }
        }
    }
    lost
}
