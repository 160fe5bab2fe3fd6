//! The soak: many concurrent clients issue random loads, unloads, acquires
//! and releases against backends that fault at a chosen rate, while the
//! manager's invariants are checked after every job and at the end.
//!
//! Invariants checked:
//! - after every job (unless a reconcile after a crash is pending), the
//!   ledger's models are exactly the union of what the backends hold, and
//!   used <= capacity;
//! - no backend is ever asked to unload a model a client holds a valid
//!   lease on (a lease on a model lost in a crash is void);
//! - no protected model is evicted for a request of a lower kind;
//! - at the end, with every client done: no lease is left in the ledger,
//!   and the ledger again equals the backends.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use vram_actors::{
    Acquire, Backend, Catalog, Kinds, Lease, Ledger, Load, ManagerConfig, ModelSpec, ModelState,
    Order, Status, Subscribe, Unload, VramActor, VramEvent,
};

use crate::backends::{FaultBackend, FaultRates};
use crate::config::{Settings, SettingsError};
use crate::manager::Manager;

const GIB: u64 = 1 << 30;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct SoakOptions {
    /// Concurrent clients.
    pub clients: usize,
    /// Operations in all (split between the clients).
    pub operations: u64,
    /// Share of backend calls that fault (split evenly between fail,
    /// panic, hang and slow unload).
    pub fault_rate: f64,
    /// Seed of the clients' choices and of the faults.
    pub seed: u64,
    /// Backend timeout; an injected hang lasts far longer.
    pub timeout: Duration,
    /// How long a load waits for leases before it fails.
    pub lease_wait: Duration,
    /// The eviction order under test.
    pub order: Order,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            clients: 32,
            operations: 10_000,
            fault_rate: 0.05,
            seed: 1,
            timeout: Duration::from_millis(5),
            lease_wait: Duration::from_millis(2),
            order: Order::Strict,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// Operations issued by the clients.
    pub operations: u64,
    /// Results by code ("ok", "insufficient_vram", ...).
    pub results: BTreeMap<String, u64>,
    /// Backend calls made.
    pub backend_calls: u64,
    /// Faults injected.
    pub faults: u64,
    /// Backend restarts.
    pub restarts: u64,
    /// Invariant checks made.
    pub checks: u64,
    /// Every invariant violation seen (empty when all held).
    pub violations: Vec<String>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Peak resident memory of the process, in KiB (Linux only).
    pub peak_rss_kib: Option<u64>,
}

fn models() -> Vec<ModelSpec> {
    let sizes = [("asr", [2, 3, 4]), ("tts", [1, 2, 3]), ("llm", [4, 6, 8])];
    sizes
        .iter()
        .flat_map(|(kind, gibs)| {
            gibs.iter()
                .enumerate()
                .map(move |(i, g)| ModelSpec::new(format!("{kind}-{i}"), *kind, g * GIB))
        })
        .collect()
}

type Violations = Rc<RefCell<Vec<String>>>;

/// Leases the clients hold now, by lease id.
type Held = Rc<RefCell<HashMap<u64, Lease>>>;

/// Compares the ledger with the union of the backends' holdings.
fn check_ledger(ledger: &Ledger, backends: &[FaultBackend]) -> Option<String> {
    if ledger.used() > ledger.capacity() {
        return Some(format!(
            "used {} > capacity {}",
            ledger.used(),
            ledger.capacity()
        ));
    }
    let in_flight: Vec<_> = ledger
        .entries()
        .filter(|e| e.state != ModelState::Resident)
        .map(|e| e.id.clone())
        .collect();
    if !in_flight.is_empty() {
        return Some(format!("models in flight between jobs: {in_flight:?}"));
    }
    let ledger_ids: BTreeSet<String> = ledger.entries().map(|e| e.id.to_string()).collect();
    let held: BTreeSet<String> = backends.iter().flat_map(FaultBackend::holding).collect();
    (ledger_ids != held).then(|| format!("ledger {ledger_ids:?} != backends {held:?}"))
}

struct EvictionChecker {
    kinds: Kinds,
    catalog: Catalog,
    violations: Violations,
}

impl Actor for EvictionChecker {
    type Context = Context<Self>;
}

impl Handler<VramEvent> for EvictionChecker {
    type Result = ();

    fn handle(&mut self, event: VramEvent, _ctx: &mut Context<Self>) {
        if let VramEvent::Evicted {
            model,
            kind,
            for_model,
            ..
        } = event
        {
            let victim = self.kinds.get(&kind);
            let requester = self
                .catalog
                .get(&for_model)
                .and_then(|m| self.kinds.get(&m.kind));
            if let (Some(victim), Some(requester)) = (victim, requester)
                && !victim.evictable_by(requester)
            {
                self.violations
                    .borrow_mut()
                    .push(format!("protected {model} evicted for {for_model}"));
            }
        }
    }
}

/// Runs a soak on a fresh actix system and reports it.
pub fn run(options: SoakOptions) -> Result<SoakReport, SettingsError> {
    // The default settings (kinds, queue, release wait) on a 16 GiB card.
    let settings = Settings::parse("[gpu]\ntotal = \"16GiB\"\nprobe = \"none\"")?;
    let base = Manager::config(&settings)?;
    Ok(actix::System::new().block_on(soak(options, base)))
}

async fn soak(options: SoakOptions, base: ManagerConfig) -> SoakReport {
    let started = Instant::now();
    let catalog: Catalog = models().into_iter().collect();
    let kinds = base.kinds.clone();
    let violations: Violations = Rc::default();
    let held: Held = Rc::default();
    let checks = Rc::new(RefCell::new(0u64));

    let mut backends = Vec::new();
    let mut by_kind = BTreeMap::new();
    for (i, kind) in kinds.iter().enumerate() {
        let (held, violations) = (held.clone(), violations.clone());
        let hook = Rc::new(move |id: &str| {
            let leased = held
                .borrow()
                .values()
                .any(|l| l.model() == id && l.is_valid());
            if leased {
                violations
                    .borrow_mut()
                    .push(format!("leased {id} was unloaded"));
            }
        });
        let backend = FaultBackend::new(
            FaultRates::even(options.fault_rate),
            options.seed.wrapping_mul(31).wrapping_add(i as u64),
            Duration::from_secs(3600),
            options.timeout / 2,
        )
        .on_unload(hook);
        by_kind.insert(
            kind.name.clone(),
            Rc::new(backend.clone()) as Rc<dyn Backend>,
        );
        backends.push(backend);
    }

    let config = ManagerConfig {
        lease_wait: options.lease_wait,
        order: options.order,
        host_budget: 0,
        load_timeout: options.timeout,
        unload_timeout: options.timeout,
        restart_backoff: Duration::from_millis(1),
        restart_backoff_max: Duration::from_millis(10),
        catalog: catalog.clone(),
        ..base
    };
    let observed = (backends.clone(), violations.clone(), checks.clone());
    let manager = VramActor::new(config, by_kind)
        .observe_jobs(move |ledger| {
            *observed.2.borrow_mut() += 1;
            if let Some(v) = check_ledger(ledger, &observed.0) {
                observed.1.borrow_mut().push(format!("after a job: {v}"));
            }
        })
        .start();
    let checker = EvictionChecker {
        kinds: kinds.clone(),
        catalog: catalog.clone(),
        violations: violations.clone(),
    }
    .start();
    if manager.send(Subscribe(checker.recipient())).await.is_err() {
        violations
            .borrow_mut()
            .push("manager did not answer Subscribe".into());
    }

    let ids: Rc<Vec<String>> = Rc::new(catalog.iter().map(|m| m.id.to_string()).collect());
    let results: Rc<RefCell<BTreeMap<String, u64>>> = Rc::default();
    let per_client = options.operations / options.clients as u64;
    let clients: Vec<_> = (0..options.clients)
        .map(|c| {
            let ctx = Client {
                manager: manager.clone(),
                ids: ids.clone(),
                held: held.clone(),
                results: results.clone(),
                violations: violations.clone(),
                rng: fastrand::Rng::with_seed(options.seed ^ ((c as u64 + 1) << 20)),
            };
            actix::spawn(ctx.run(per_client))
        })
        .collect();
    for client in clients {
        if client.await.is_err() {
            violations
                .borrow_mut()
                .push("a client task panicked".into());
        }
    }

    // Let the queue drain, then check the end state.
    let status = loop {
        match manager.send(Status).await {
            Ok(s) if s.queued == 0 && !s.running => break Some(s),
            Ok(_) => actix::clock::sleep(Duration::from_millis(1)).await,
            Err(_) => break None,
        }
    };
    match status {
        None => violations
            .borrow_mut()
            .push("manager stopped answering".into()),
        Some(status) => {
            let leaked: Vec<_> = status
                .models
                .iter()
                .filter(|m| m.leases > 0)
                .map(|m| m.id.clone())
                .collect();
            if !leaked.is_empty() {
                violations
                    .borrow_mut()
                    .push(format!("leases leaked on {leaked:?}"));
            }
            let ledger: BTreeSet<String> = status.models.iter().map(|m| m.id.to_string()).collect();
            let backends_hold: BTreeSet<String> =
                backends.iter().flat_map(FaultBackend::holding).collect();
            if ledger != backends_hold {
                violations.borrow_mut().push(format!(
                    "at the end: ledger {ledger:?} != backends {backends_hold:?}"
                ));
            }
        }
    }
    let counts = backends.iter().map(FaultBackend::counts);
    let (calls, faults, restarts) = counts.fold((0, 0, 0), |acc, c| {
        (acc.0 + c.calls, acc.1 + c.faults, acc.2 + c.resets)
    });
    let results = results.borrow().clone();
    SoakReport {
        operations: results.values().sum(),
        results,
        backend_calls: calls,
        faults,
        restarts,
        checks: *checks.borrow(),
        violations: violations.borrow().clone(),
        wall: started.elapsed(),
        peak_rss_kib: peak_rss_kib(),
    }
}

/// One client: random operations; an acquired model is "used" for one
/// message round trip and then released, as a request would.
struct Client {
    manager: Addr<VramActor>,
    ids: Rc<Vec<String>>,
    held: Held,
    results: Rc<RefCell<BTreeMap<String, u64>>>,
    violations: Violations,
    rng: fastrand::Rng,
}

impl Client {
    async fn run(mut self, operations: u64) {
        for _ in 0..operations {
            let id = self.ids[self.rng.usize(..self.ids.len())].clone();
            let result = match self.rng.u8(..10) {
                0..=4 => self.manager.send(Load::new(&id)).await.map(|r| r.map(drop)),
                5 => self
                    .manager
                    .send(Unload::new(&id))
                    .await
                    .map(|r| r.map(drop)),
                _ => match self.manager.send(Acquire::new(&id)).await {
                    Ok(Ok(lease)) => {
                        let lease_id = lease.id();
                        self.held.borrow_mut().insert(lease_id, lease);
                        let used = self.manager.send(Status).await;
                        self.held.borrow_mut().remove(&lease_id);
                        used.map(|_| Ok(()))
                    }
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(e) => Err(e),
                },
            };
            let code = match result {
                Ok(Ok(())) => "ok",
                Ok(Err(e)) => e.code(),
                Err(_) => {
                    self.violations
                        .borrow_mut()
                        .push("manager mailbox closed".into());
                    "mailbox"
                }
            };
            *self
                .results
                .borrow_mut()
                .entry(code.to_string())
                .or_default() += 1;
        }
    }
}

/// Peak resident set size of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
