//! The ledger side of each job step: the internal messages a job driver
//! (see `job.rs`) sends to the `VramActor`, and their handlers. Every change
//! a job makes to the ledger happens here, inside the actor; the drivers
//! only await backends and send these.

use actix::prelude::*;

use crate::backend_actor::BackendActor;
use crate::error::VramError;
use crate::kind::Kinds;
use crate::ledger::{Entry, Ledger, ModelState};
use crate::messages::{BackendOf, Loaded, Unloaded, VramEvent};
use crate::model::ModelSpec;
use crate::policy::{Plan, is_expired, plan};
use crate::vram_actor::{VramActor, shutting_down};

/// Victims to unload, in order: (model, kind, that kind's backend actor).
pub(crate) type Victims = Vec<(String, String, Addr<BackendActor>)>;

/// A planned load, ready to carry out.
pub(crate) struct Go {
    pub(crate) spec: ModelSpec,
    pub(crate) backend: Addr<BackendActor>,
    pub(crate) victims: Victims,
    /// Bytes the victims really hold (measured when known, else declared):
    /// what the card can give back once they are unloaded.
    pub(crate) victim_bytes: u64,
    /// Bytes every model in the ledger really held when the load was
    /// planned (victims included, this model not), measured the same way:
    /// the card's use beyond this belongs to other processes.
    pub(crate) ledger_bytes: u64,
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
    pub(crate) model: String,
    pub(crate) may_wait: bool,
    /// The card's free bytes, when a probe could tell.
    pub(crate) card_free: Option<u64>,
}

impl Handler<PlanLoad> for VramActor {
    type Result = MessageResult<PlanLoad>;

    fn handle(&mut self, msg: PlanLoad, _ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return MessageResult(PlanOutcome::Done(Err(shutting_down())));
        }
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
                self.touch(&model);
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

/// The bytes a model really holds on the card: what the card showed when
/// it loaded, or its declared size when that was never measured. (The
/// ledger charges the larger of the two; a model declared larger than it
/// is cannot give back what it never took.)
fn true_bytes(entry: &Entry) -> u64 {
    entry.measured.unwrap_or(entry.declared)
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
        let ledger_bytes = self.ledger.entries().map(true_bytes).sum();
        let victim_bytes = victims
            .iter()
            .filter_map(|v| self.ledger.get(v))
            .map(true_bytes)
            .sum();
        let planned = self.begin_evicting(model, victims)?;
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
            ledger_bytes,
        })
    }

    /// Resolves each victim's backend, then marks them all unloading
    /// (none of them if one has no backend).
    fn begin_evicting(&mut self, model: &str, victims: Vec<String>) -> Result<Victims, VramError> {
        let mut planned = Vec::with_capacity(victims.len());
        for victim in victims {
            let kind = self
                .ledger
                .get(&victim)
                .map(|e| e.kind.clone())
                .unwrap_or_default();
            let backend = self.backend_of(&kind, model)?;
            planned.push((victim, kind, backend));
        }
        for (victim, _, _) in &planned {
            self.ledger.begin_unload(victim);
        }
        Ok(planned)
    }

    /// Records a measured footprint: the ledger charges the larger of
    /// declared and measured, and later plans for this model use it too.
    fn calibrate(&mut self, model: &str, measured: u64) {
        self.ledger.calibrate(model, measured);
        self.remember(model, measured);
    }

    /// Keeps a measured footprint in the catalog, so later plans (and the
    /// `exceeds_capacity` check) use the larger of declared and measured.
    fn remember(&mut self, model: &str, measured: u64) {
        let Some(mut spec) = self.declared.get(model).cloned() else {
            return;
        };
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

    /// Victims not yet unloaded are resident again.
    fn cancel_evictions(&mut self) {
        let unloading: Vec<String> = self
            .ledger
            .entries()
            .filter(|e| e.state == ModelState::Unloading)
            .map(|e| e.id.clone())
            .collect();
        for id in unloading {
            self.ledger.cancel_unload(&id);
        }
    }

    /// Undoes a load that cannot go on: victims not yet unloaded are
    /// resident again, the reservation is dropped.
    fn abort_load(&mut self, model: &str, error: &VramError) {
        self.cancel_evictions();
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
    pub(crate) victim: String,
    pub(crate) for_model: String,
    pub(crate) result: Result<(), VramError>,
    /// The model is already on the card (it measured larger than planned
    /// and these victims make room for its real size): a failure leaves
    /// it to the driver to take the model off again (see [`Refused`]).
    pub(crate) after_load: bool,
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
            Err(e) if msg.after_load => {
                self.cancel_evictions();
                Err(e)
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
#[rtype(result = "Landing")]
pub(crate) struct LoadDone {
    pub(crate) model: String,
    pub(crate) evicted: Vec<String>,
    pub(crate) result: Result<(), VramError>,
    /// How much the card's use grew during the load, when a probe could
    /// tell.
    pub(crate) measured: Option<u64>,
}

/// What a finished backend load leads to.
pub(crate) enum Landing {
    /// The job is over.
    Done(Result<Loaded, VramError>),
    /// The model measured larger than planned, and charging its real size
    /// would take the ledger over capacity: unload these victims (marked
    /// unloading, the model still charged its planned size), then send
    /// [`Settle`].
    Evict(Victims),
    /// No eviction can make room for the measured size: take the model
    /// off the card again, then send [`Refused`] with this error.
    Refuse(VramError),
}

impl Handler<LoadDone> for VramActor {
    type Result = MessageResult<LoadDone>;

    fn handle(&mut self, msg: LoadDone, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(match msg.result {
            // Loaded while the manager shut down: it cannot stay.
            Ok(()) if self.shutting_down => Landing::Refuse(shutting_down()),
            Ok(()) => match msg.measured {
                Some(measured) if self.overflows(&msg.model, measured) => {
                    self.make_room(&msg.model, measured)
                }
                measured => {
                    if let Some(measured) = measured {
                        self.calibrate(&msg.model, measured);
                    }
                    Landing::Done(Ok(self.land(msg.model, msg.evicted)))
                }
            },
            Err(e) => {
                self.abort_load(&msg.model, &e);
                Landing::Done(Err(e))
            }
        })
    }
}

impl VramActor {
    /// Whether charging `model` its measured size would take the ledger's
    /// use above capacity.
    fn overflows(&self, model: &str, measured: u64) -> bool {
        self.ledger.get(model).is_some_and(|entry| {
            let used = self.ledger.used() - entry.bytes + entry.declared.max(measured);
            used > self.ledger.capacity()
        })
    }

    /// Plans room for a model already on the card at its measured size, by
    /// the same policy as any load: against the ledger without the model,
    /// the model charged the larger of declared and measured.
    fn make_room(&mut self, model: &str, measured: u64) -> Landing {
        self.remember(model, measured);
        let Some((spec, charge)) = self.ledger.get(model).and_then(|entry| {
            let spec = self.declared.get(model)?.clone();
            Some((spec, entry.declared.max(measured)))
        }) else {
            return Landing::Done(Err(VramError::UnknownModel {
                model: model.to_string(),
            }));
        };
        let mut view = self.ledger.clone();
        view.remove(model);
        let mut catalog = self.config.catalog.clone();
        catalog.insert(ModelSpec {
            bytes: charge,
            ..spec.clone()
        });
        let refused = |free, evictable, leased| VramError::InsufficientVram {
            model: model.to_string(),
            needed: charge,
            free,
            evictable,
            leased,
        };
        match plan(&view, &self.config.kinds, &catalog, model, view.free()) {
            Ok(Plan::Load { victims }) if !victims.is_empty() => {
                match self.begin_evicting(model, victims) {
                    Ok(victims) => {
                        let ids: Vec<&str> = victims.iter().map(|(v, _, _)| v.as_str()).collect();
                        tracing::warn!(model, measured, victims = ?ids, "measured larger than planned; evicting to stay within capacity");
                        Landing::Evict(victims)
                    }
                    Err(e) => Landing::Refuse(e),
                }
            }
            Ok(_) => {
                // Unreachable while `overflows` holds; charge it anyway.
                self.ledger.calibrate(model, measured);
                Landing::Done(Ok(self.land(model.to_string(), vec![])))
            }
            Err(VramError::InsufficientVram {
                free,
                evictable,
                leased,
                ..
            }) => Landing::Refuse(refused(free, evictable, leased)),
            Err(_) => {
                // Larger than the whole card: no eviction helps.
                let (evictable, leased) = evictable_for(&view, &self.config.kinds, &spec.kind);
                Landing::Refuse(refused(view.free(), evictable, leased))
            }
        }
    }

    /// Makes a loaded model resident and publishes `loaded`.
    fn land(&mut self, model: String, evicted: Vec<String>) -> Loaded {
        self.ledger.commit(&model);
        self.used_now(&model);
        if let Some(entry) = self.ledger.get(&model) {
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
        Loaded {
            model,
            evicted,
            already_resident: false,
        }
    }
}

/// Bytes of the resident models in `view` that a request of `kind` may
/// evict: (not leased, leased). Pinned models never count.
fn evictable_for(view: &Ledger, kinds: &Kinds, kind: &str) -> (u64, u64) {
    let Some(requester) = kinds.get(kind) else {
        return (0, 0);
    };
    let mut sums = (0, 0);
    for entry in view.entries() {
        let may_go = entry.state == ModelState::Resident
            && !entry.pinned
            && kinds
                .get(&entry.kind)
                .is_some_and(|k| k.evictable_by(requester));
        if may_go && entry.leases == 0 {
            sums.0 += entry.bytes;
        } else if may_go {
            sums.1 += entry.bytes;
        }
    }
    sums
}

/// The victims of a [`Landing::Evict`] are gone: charge the model its
/// measured size and make it resident.
#[derive(Message)]
#[rtype(result = "Result<Loaded, VramError>")]
pub(crate) struct Settle {
    pub(crate) model: String,
    pub(crate) evicted: Vec<String>,
    pub(crate) measured: u64,
}

impl Handler<Settle> for VramActor {
    type Result = Result<Loaded, VramError>;

    fn handle(&mut self, msg: Settle, _ctx: &mut Context<Self>) -> Self::Result {
        self.ledger.calibrate(&msg.model, msg.measured);
        Ok(self.land(msg.model, msg.evicted))
    }
}

/// A loaded model that cannot stay (see [`Landing::Refuse`], or a victim
/// that would not unload after the load) was unloaded again, or tried to
/// be: it leaves the ledger and the load fails with `error`.
#[derive(Message)]
#[rtype(result = "Result<Loaded, VramError>")]
pub(crate) struct Refused {
    pub(crate) model: String,
    pub(crate) error: VramError,
    /// How the model's own unload went.
    pub(crate) unloaded: Result<(), VramError>,
}

impl Handler<Refused> for VramActor {
    type Result = Result<Loaded, VramError>;

    fn handle(&mut self, msg: Refused, ctx: &mut Context<Self>) -> Self::Result {
        let kind = self.ledger.get(&msg.model).map(|e| e.kind.clone());
        self.abort_load(&msg.model, &msg.error);
        self.last_used.remove(&msg.model);
        if let (Err(e), Some(kind)) = (msg.unloaded, kind) {
            // The backend may still hold it: learn the truth from it.
            tracing::error!(model = %msg.model, error = %e, "could not unload a model that does not fit; reconciling");
            self.reconcile_first(kind, ctx);
        }
        Err(msg.error)
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
    pub(crate) model: String,
    pub(crate) may_wait: bool,
    pub(crate) expiry: bool,
}

impl Handler<BeginUnload> for VramActor {
    type Result = MessageResult<BeginUnload>;

    fn handle(&mut self, msg: BeginUnload, _ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return MessageResult(UnloadOutcome::Done(Err(shutting_down())));
        }
        let now = std::time::Instant::now();
        let Some(entry) = self
            .ledger
            .get(&msg.model)
            .filter(|e| !msg.expiry || is_expired(e, &self.config.ttl, &self.last_used, now))
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
    pub(crate) model: String,
    pub(crate) result: Result<(), VramError>,
    pub(crate) expiry: bool,
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
    pub(crate) kind: String,
    pub(crate) loaded: Vec<String>,
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
    pub(crate) kind: String,
    pub(crate) dead: Addr<BackendActor>,
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
