//! The unload job, on request or because a model sat idle for its TTL
//! (expiry): refuse or wait while leased, then unload through the backend
//! (an expiring model that can park, within the host budget, parks
//! instead; an unload on request always stops the server).
//! An expiry never waits and quietly does nothing if the model was used,
//! leased or removed since it was queued.

use std::time::Instant;

use arcstr::ArcStr;

use super::{Books, Command, Event, Job};
use crate::error::VramError;
use crate::events::{Unloaded, VramEvent};
use crate::policy::is_expired;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Checking,
    WaitingLeases,
    Unloading,
    Done,
}

/// Unloads one model; see the module docs.
#[derive(Debug)]
pub(crate) struct UnloadJob {
    model: ArcStr,
    expiry: bool,
    lease_deadline: Option<Instant>,
    phase: Phase,
    /// The model was parked before this unload (a failure leaves it so).
    was_parked: bool,
    outcome: Option<Result<Unloaded, VramError>>,
}

impl UnloadJob {
    /// An unload of `model` on request.
    pub(crate) fn new(model: impl Into<ArcStr>) -> Self {
        Self::with(model.into(), false)
    }

    /// An unload of `model` if it is still idle past its TTL.
    pub(crate) fn expiry(model: impl Into<ArcStr>) -> Self {
        Self::with(model.into(), true)
    }

    fn with(model: ArcStr, expiry: bool) -> Self {
        Self {
            model,
            expiry,
            lease_deadline: None,
            phase: Phase::Checking,
            was_parked: false,
            outcome: None,
        }
    }

    /// The model this job unloads.
    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    /// Whether this is an expiry rather than a request.
    pub(crate) fn is_expiry(&self) -> bool {
        self.expiry
    }

    fn finish(&mut self, result: Result<Unloaded, VramError>) {
        self.phase = Phase::Done;
        self.outcome = Some(result);
    }

    fn check(&mut self, books: &mut Books, now: Instant, out: &mut Vec<Command>) {
        let deadline = *self
            .lease_deadline
            .get_or_insert(super::after(now, books.lease_wait));
        let Some(entry) = books
            .ledger
            .get(&self.model)
            .filter(|e| !self.expiry || is_expired(e, &books.ttl, &books.last_used, now))
        else {
            let model = self.model.clone();
            return self.finish(Ok(Unloaded {
                model,
                was_resident: false,
            }));
        };
        if entry.leases > 0 {
            if !self.expiry && now < deadline {
                self.phase = Phase::WaitingLeases;
                out.push(Command::WaitRelease { until: deadline });
            } else {
                let leases = entry.leases;
                let model = self.model.to_string();
                self.finish(Err(VramError::InUse { model, leases }));
            }
            return;
        }
        let kind = entry.kind.clone();
        let resident = entry.state == crate::ledger::ModelState::Resident;
        self.was_parked = entry.state == crate::ledger::ModelState::Parked;
        let park = self.expiry && resident && books.may_park(&self.model, 0).is_some();
        books.ledger.begin_unload(&self.model);
        self.phase = Phase::Unloading;
        if park {
            out.push(Command::Park {
                kind,
                model: self.model.clone(),
            });
        } else {
            out.push(Command::Unload {
                kind,
                models: smallvec::smallvec![self.model.clone()],
            });
        }
    }
}

impl Job for UnloadJob {
    type Output = Result<Unloaded, VramError>;

    fn handle(&mut self, event: Event, books: &mut Books, now: Instant, out: &mut Vec<Command>) {
        if let Event::Unloads(results) = event {
            return self.unloads(results, books, now, out);
        }
        match (self.phase, event) {
            (Phase::Checking, Event::Start) | (Phase::WaitingLeases, Event::Released) => {
                self.check(books, now, out)
            }
            (Phase::WaitingLeases, Event::Deadline) => {
                // The wait is over, whatever the clock says: a manager
                // that is shutting down ends every wait at once, and a
                // check against the old deadline would wait again.
                self.lease_deadline = Some(now);
                self.check(books, now, out)
            }
            (
                Phase::Unloading,
                Event::Parked {
                    result: Ok(true), ..
                },
            ) => {
                out.extend(books.park(&self.model, None));
                let model = self.model.clone();
                self.finish(Ok(Unloaded {
                    model,
                    was_resident: true,
                }));
            }
            (
                Phase::Unloading,
                Event::Unloaded { result: Ok(()), .. }
                | Event::Parked {
                    result: Ok(false), ..
                },
            ) => {
                if let Some(entry) = books.forget(&self.model) {
                    let (model, kind, gpu, bytes) = (entry.id, entry.kind, entry.gpu, entry.bytes);
                    let event = if self.expiry {
                        tracing::info!(model = %model, kind = %kind, gpu, bytes, "expired");
                        VramEvent::Expired {
                            model,
                            kind,
                            gpu,
                            bytes,
                        }
                    } else {
                        tracing::info!(model = %model, kind = %kind, gpu, bytes, "unloaded");
                        VramEvent::Unloaded {
                            model,
                            kind,
                            gpu,
                            bytes,
                        }
                    };
                    out.push(Command::Publish(event));
                }
                let model = self.model.clone();
                self.finish(Ok(Unloaded {
                    model,
                    was_resident: true,
                }));
            }
            (
                Phase::Unloading,
                Event::Unloaded { result: Err(e), .. } | Event::Parked { result: Err(e), .. },
            ) => {
                books.ledger.cancel_unload(&self.model);
                if self.was_parked {
                    // Still asleep: back to parked, at its residual.
                    let bytes = books.ledger.get(&self.model).map_or(0, |e| e.bytes);
                    books.ledger.park(&self.model, bytes);
                }
                self.finish(Err(e));
            }
            (_, event) => {
                tracing::debug!(model = %self.model, ?event, "unload job ignored an event");
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
