//! The manager's own restart and its shutdown against a running job: queued
//! work is answered and never runs later as a ghost; no model server starts
//! after `Shutdown`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use vram_manager::{
    Acquire, Backend, BackendFuture, Kind, Load, ManagerConfig, ModelSpec, Shutdown, Status,
    StopManager, VramActor,
};

const GIB: u64 = 1 << 30;

/// Loads take 200 ms; every call is logged.
#[derive(Default)]
struct Slow {
    held: RefCell<Vec<String>>,
    log: Rc<RefCell<Vec<String>>>,
}

impl Backend for Slow {
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        self.log.borrow_mut().push(format!("load {}", model.id));
        self.held.borrow_mut().push(model.id.to_string());
        Box::pin(async {
            actix::clock::sleep(Duration::from_millis(200)).await;
            Ok(())
        })
    }
    fn unload(&self, id: &str) -> BackendFuture<()> {
        self.log.borrow_mut().push(format!("unload {id}"));
        self.held.borrow_mut().retain(|m| m != id);
        Box::pin(async { Ok(()) })
    }
    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let held = self.held.borrow().clone();
        Box::pin(async move { Ok(held) })
    }
    fn shutdown(self: Rc<Self>) -> BackendFuture<()> {
        self.log.borrow_mut().push("shutdown".into());
        self.held.borrow_mut().clear();
        Box::pin(async { Ok(()) })
    }
}

fn config(lease_wait: Duration) -> ManagerConfig {
    let defaults = vram_manager::config::Settings::defaults().unwrap();
    ManagerConfig {
        kinds: [Kind::new("llm", 0, false)].into_iter().collect(),
        catalog: [
            ModelSpec::new("a", "llm", 8 * GIB),
            ModelSpec::new("b", "llm", 12 * GIB),
            ModelSpec::new("c", "llm", GIB),
        ]
        .into_iter()
        .collect(),
        lease_wait,
        ..vram_manager::Manager::config(&defaults).unwrap()
    }
}

fn backends(log: &Rc<RefCell<Vec<String>>>) -> BTreeMap<String, Rc<dyn Backend>> {
    let slow: Rc<dyn Backend> = Rc::new(Slow {
        log: log.clone(),
        ..Default::default()
    });
    [("llm".to_string(), slow)].into_iter().collect()
}

#[actix_rt::test]
async fn after_a_restart_of_the_manager_nothing_queued_runs_as_a_ghost() {
    tokio::time::pause();
    let log = Rc::new(RefCell::new(vec![]));
    let (cfg, be) = (config(Duration::ZERO), backends(&log));
    let addr = Supervisor::start(move |_| VramActor::new(cfg, be));
    let first = addr.send(Load::new("a"));
    let queued = addr.send(Load::new("c"));
    // Let "a" start loading, then stop the manager under its supervisor.
    assert!(addr.send(Status).await.unwrap().running);
    addr.send(StopManager).await.unwrap();
    // A restart drops the running and queued jobs; their callers are
    // answered `unavailable` (not left to see the mailbox close).
    let reason = |answer: Result<Result<_, vram_manager::VramError>, MailboxError>| match answer {
        Ok(Err(vram_manager::VramError::Unavailable { reason })) => reason,
        other => panic!("expected unavailable, got {other:?}"),
    };
    assert_eq!(
        reason(first.await),
        "the manager stopped before answering for a"
    );
    assert_eq!(reason(queued.await), "the manager restarted");
    actix::clock::sleep(Duration::from_secs(1)).await;
    let status = addr.send(Status).await.unwrap();
    assert_eq!(status.queued, 0);
    assert!(!status.running);
    // The ledger was rebuilt from the backend, and "c" was never loaded.
    assert_eq!(status.resident(), ["a"]);
    assert!(
        !log.borrow().contains(&"load c".to_string()),
        "{:?}",
        log.borrow()
    );
}

#[actix_rt::test]
async fn a_backend_call_still_queued_when_the_manager_restarts_never_runs() {
    tokio::time::pause();
    let log = Rc::new(RefCell::new(vec![]));
    let (cfg, be) = (config(Duration::ZERO), backends(&log));
    let addr = Supervisor::start(move |_| VramActor::new(cfg, be));
    // One mailbox batch: the load's job sends its backend call, then the
    // manager restarts before the backend actor has run it.
    let first = addr.send(Load::new("a"));
    let stop = addr.send(StopManager);
    let answer = first.await.unwrap();
    stop.await.unwrap();
    assert!(
        matches!(answer, Err(vram_manager::VramError::Unavailable { .. })),
        "{answer:?}"
    );
    actix::clock::sleep(Duration::from_secs(1)).await;
    // The call went with the job: no server was started for it, and the
    // rebuilt ledger agrees with the backend.
    assert!(
        !log.borrow().contains(&"load a".to_string()),
        "a ghost load: {:?}",
        log.borrow()
    );
    assert!(addr.send(Status).await.unwrap().resident().is_empty());
}

#[actix_rt::test]
async fn no_model_server_starts_after_shutdown() {
    tokio::time::pause();
    let log = Rc::new(RefCell::new(vec![]));
    let addr = VramActor::new(config(Duration::from_millis(300)), backends(&log)).start();
    addr.send(Load::new("a")).await.unwrap().unwrap();
    let lease = addr.send(Acquire::new("a")).await.unwrap().unwrap();
    // "a" is leased: the load of "b" waits for a release.
    let pending = addr.send(Load::new("b"));
    assert!(addr.send(Status).await.unwrap().running);
    addr.send(Shutdown).await.unwrap();
    let answer = pending.await.unwrap().unwrap_err();
    assert_eq!(answer.code(), "unavailable", "{answer}");
    drop(lease);
    let log = log.borrow();
    let shutdown = log.iter().position(|l| l == "shutdown").unwrap();
    assert!(
        !log[shutdown..].iter().any(|l| l == "load b"),
        "a model server was started after Shutdown: {log:?}"
    );
}

/// Loads, unloads, parks and wakes at once, keeping what it holds and
/// which of it sleeps; wakes are logged.
#[derive(Default)]
struct Sleepy {
    held: RefCell<std::collections::BTreeSet<String>>,
    asleep: RefCell<std::collections::BTreeSet<String>>,
    wakes: Rc<RefCell<Vec<String>>>,
    /// `parked()` fails.
    cannot_tell: bool,
}

impl Backend for Sleepy {
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        self.held.borrow_mut().insert(model.id.to_string());
        Box::pin(async { Ok(()) })
    }
    fn unload(&self, id: &str) -> BackendFuture<()> {
        self.held.borrow_mut().remove(id);
        self.asleep.borrow_mut().remove(id);
        Box::pin(async { Ok(()) })
    }
    fn park(&self, id: &str) -> BackendFuture<()> {
        self.asleep.borrow_mut().insert(id.to_string());
        Box::pin(async { Ok(()) })
    }
    fn wake(&self, id: &str) -> BackendFuture<()> {
        self.asleep.borrow_mut().remove(id);
        self.wakes.borrow_mut().push(id.to_string());
        Box::pin(async { Ok(()) })
    }
    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let held = self.held.borrow().iter().cloned().collect();
        Box::pin(async move { Ok(held) })
    }
    fn parked(&self) -> BackendFuture<Vec<String>> {
        if self.cannot_tell {
            return Box::pin(async { Err(vram_manager::BackendError::new("no answer")) });
        }
        let asleep = self.asleep.borrow().iter().cloned().collect();
        Box::pin(async move { Ok(asleep) })
    }
}

/// A supervised manager over one `Sleepy` backend where "a" (8 GiB) has
/// parked (holding 1 GiB) for "b" (12 GiB) on a 16 GiB card.
async fn a_parked_for_b(sleepy: Sleepy) -> (Addr<VramActor>, u64) {
    let sleepy: Rc<dyn Backend> = Rc::new(sleepy);
    let be: BTreeMap<String, Rc<dyn Backend>> = [("llm".to_string(), sleepy)].into_iter().collect();
    // "a" (8 GiB) parks holding 1 GiB; "b" (12 GiB) needs its room.
    let mut a = ModelSpec::new("a", "llm", 8 * GIB);
    a.park = Some(vram_manager::Park {
        vram: GIB,
        host: 8 * GIB,
    });
    let cfg = ManagerConfig {
        catalog: [a, ModelSpec::new("b", "llm", 12 * GIB)]
            .into_iter()
            .collect(),
        host_budget: 8 * GIB,
        ..config(Duration::ZERO)
    };
    let capacity = cfg.capacity;
    let addr = Supervisor::start(move |_| VramActor::new(cfg, be));
    addr.send(Load::new("a")).await.unwrap().unwrap();
    let loaded = addr.send(Load::new("b")).await.unwrap().unwrap();
    assert_eq!(loaded.evicted, ["a"]);
    (addr, capacity)
}

#[actix_rt::test]
async fn after_a_restart_of_the_manager_a_parked_model_is_still_asleep_and_woken_for_a_request() {
    tokio::time::pause();
    let wakes = Rc::new(RefCell::new(vec![]));
    let (addr, capacity) = a_parked_for_b(Sleepy {
        wakes: wakes.clone(),
        ..Default::default()
    })
    .await;
    let parked = |status: &vram_manager::StatusReport| {
        let a = status
            .models
            .iter()
            .find(|m| m.id == "a")
            .map(|m| (m.state, m.bytes));
        (a, status.used)
    };
    let before = parked(&addr.send(Status).await.unwrap());
    assert_eq!(
        before,
        (Some((vram_manager::ModelState::Parked, GIB)), 13 * GIB)
    );
    // The manager restarts; its ledger is rebuilt from the backend, which
    // says "a" sleeps.
    addr.send(StopManager).await.unwrap();
    actix::clock::sleep(Duration::from_secs(1)).await;
    let status = addr.send(Status).await.unwrap();
    assert!(status.used <= capacity, "{} > {capacity}", status.used);
    assert_eq!(parked(&status), before, "asleep, charged its residual");
    // A request for "a" wakes it (making room: "b" leaves).
    let lease = addr.send(Acquire::new("a")).await.unwrap().unwrap();
    assert_eq!(*wakes.borrow(), ["a"]);
    assert_eq!(lease.evicted(), ["b"]);
}

#[actix_rt::test]
async fn a_backend_that_cannot_say_what_sleeps_still_has_its_ledger_rebuilt_counting_all_whole() {
    tokio::time::pause();
    let (addr, _) = a_parked_for_b(Sleepy {
        cannot_tell: true,
        ..Default::default()
    })
    .await;
    addr.send(StopManager).await.unwrap();
    actix::clock::sleep(Duration::from_secs(1)).await;
    // Both rebuilt, "a" at its whole size: never less than it may hold.
    let status = addr.send(Status).await.unwrap();
    assert_eq!(status.resident(), ["a", "b"]);
    assert_eq!(status.used, 20 * GIB);
}
