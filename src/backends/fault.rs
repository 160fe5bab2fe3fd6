//! A fault-injecting backend for tests and soaks: at chosen rates (and a
//! seed, so a failing run can be replayed) its loads and unloads fail,
//! panic, hang past the timeout, or unload slowly. Faults can also be
//! scripted one by one. `loaded()` never faults, so the manager can always
//! learn the truth after a crash.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use vram_actors::{Backend, BackendError, BackendFuture, ModelSpec};

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Answer an error.
    Fail,
    /// Panic part-way through the call.
    Panic,
    /// Never finish (the manager's timeout must cut it off).
    Hang,
    /// Unload, but slowly (within the timeout). Loads treat it as no fault.
    SlowUnload,
}

/// How often each fault happens, per backend call (0.0 to 1.0 each).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultRates {
    /// Rate of [`Fault::Fail`].
    pub fail: f64,
    /// Rate of [`Fault::Panic`].
    pub panic: f64,
    /// Rate of [`Fault::Hang`].
    pub hang: f64,
    /// Rate of [`Fault::SlowUnload`].
    pub slow_unload: f64,
}

impl FaultRates {
    /// `total` split evenly between the four faults.
    pub fn even(total: f64) -> Self {
        let each = total / 4.0;
        Self {
            fail: each,
            panic: each,
            hang: each,
            slow_unload: each,
        }
    }
}

/// Counts of what a fault backend did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultCounts {
    /// Backend calls (load and unload).
    pub calls: u64,
    /// Faults injected, of every sort.
    pub faults: u64,
    /// Panics injected.
    pub panics: u64,
    /// Restarts (calls of `reset`).
    pub resets: u64,
}

#[derive(Debug)]
struct State {
    loaded: BTreeSet<String>,
    rng: fastrand::Rng,
    scripted: VecDeque<Fault>,
    counts: FaultCounts,
}

/// Called with a model id as each unload starts (for invariant checks).
pub type UnloadHook = Rc<dyn Fn(&str)>;

/// A backend that injects faults; clones share state.
#[derive(Clone)]
pub struct FaultBackend {
    rates: FaultRates,
    hang: Duration,
    slow: Duration,
    state: Rc<RefCell<State>>,
    on_unload: Option<UnloadHook>,
}

impl std::fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultBackend")
            .field("rates", &self.rates)
            .field("state", &self.state)
            .finish()
    }
}

impl FaultBackend {
    /// A backend with these rates and seed. A hang lasts `hang` (make it
    /// longer than the manager's timeouts); a slow unload takes `slow`.
    pub fn new(rates: FaultRates, seed: u64, hang: Duration, slow: Duration) -> Self {
        Self {
            rates,
            hang,
            slow,
            state: Rc::new(RefCell::new(State {
                loaded: BTreeSet::new(),
                rng: fastrand::Rng::with_seed(seed),
                scripted: VecDeque::new(),
                counts: FaultCounts::default(),
            })),
            on_unload: None,
        }
    }

    /// A backend that faults only when told to with [`FaultBackend::script`].
    pub fn scripted() -> Self {
        Self::new(
            FaultRates::default(),
            0,
            Duration::from_secs(3600),
            Duration::from_millis(50),
        )
    }

    /// Makes the next calls fault in this order, before any random fault.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.borrow_mut().scripted.extend(faults);
    }

    /// Calls `hook` with the model id as each unload starts.
    pub fn on_unload(mut self, hook: UnloadHook) -> Self {
        self.on_unload = Some(hook);
        self
    }

    /// What has happened so far.
    pub fn counts(&self) -> FaultCounts {
        self.state.borrow().counts
    }

    /// The models this backend holds now.
    pub fn holding(&self) -> Vec<String> {
        self.state.borrow().loaded.iter().cloned().collect()
    }

    /// Draws the fault (if any) for the next call.
    fn draw(&self) -> Option<Fault> {
        let mut state = self.state.borrow_mut();
        state.counts.calls += 1;
        let fault = state.scripted.pop_front().or_else(|| {
            let x = state.rng.f64();
            let r = self.rates;
            [
                (Fault::Fail, r.fail),
                (Fault::Panic, r.panic),
                (Fault::Hang, r.hang),
                (Fault::SlowUnload, r.slow_unload),
            ]
            .into_iter()
            .scan(0.0, |acc, (fault, rate)| {
                *acc += rate;
                Some((fault, *acc))
            })
            .find(|(_, upto)| x < *upto)
            .map(|(fault, _)| fault)
        });
        if let Some(fault) = fault {
            state.counts.faults += 1;
            if fault == Fault::Panic {
                state.counts.panics += 1;
            }
        }
        fault
    }
}

impl Backend for FaultBackend {
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        let fault = self.draw();
        let (state, hang, id) = (self.state.clone(), self.hang, model.id.clone());
        Box::pin(async move {
            match fault {
                Some(Fault::Fail) => {
                    return Err(BackendError::new(format!("injected failure loading {id}")));
                }
                Some(Fault::Panic) => {
                    actix::clock::sleep(Duration::ZERO).await;
                    panic!("injected panic loading {id}");
                }
                Some(Fault::Hang) => actix::clock::sleep(hang).await,
                Some(Fault::SlowUnload) | None => {}
            }
            state.borrow_mut().loaded.insert(id.to_string());
            Ok(())
        })
    }

    fn unload(&self, id: &str) -> BackendFuture<()> {
        if let Some(hook) = &self.on_unload {
            hook(id);
        }
        let fault = self.draw();
        let (state, hang, slow, id) = (self.state.clone(), self.hang, self.slow, id.to_string());
        Box::pin(async move {
            match fault {
                Some(Fault::Fail) => {
                    return Err(BackendError::new(format!(
                        "injected failure unloading {id}"
                    )));
                }
                Some(Fault::Panic) => {
                    actix::clock::sleep(Duration::ZERO).await;
                    panic!("injected panic unloading {id}");
                }
                Some(Fault::Hang) => actix::clock::sleep(hang).await,
                Some(Fault::SlowUnload) => actix::clock::sleep(slow).await,
                None => {}
            }
            state.borrow_mut().loaded.remove(&id);
            Ok(())
        })
    }

    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let holding = self.holding();
        Box::pin(async move { Ok(holding) })
    }

    /// A crash loses everything the simulated server held.
    fn reset(&self) {
        let mut state = self.state.borrow_mut();
        state.loaded.clear();
        state.counts.resets += 1;
    }
}
