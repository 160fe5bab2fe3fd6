//! Supervision and faults: backends that panic, fail and hang are
//! restarted, the ledger stays true, and everything else keeps serving.

mod common;

use std::time::Duration;

use actix::prelude::*;
use common::{Events, GIB, faulty, model, start, start_faulty};
use vram_manager::backends::Fault;
use vram_manager::soak::{self, SoakOptions};
use vram_manager::{
    Acquire, BackendActor, BackendOf, Crash, CrashBackend, Load, ModelState, Status, StopManager,
    Unload, VramActor, VramError, VramEvent,
};

fn models() -> String {
    [
        model("asr", "asr", 3, ""),
        model("tts", "tts", 1, ""),
        model("llm", "llm", 6, ""),
        model("llm2", "llm", 12, ""),
    ]
    .concat()
}

async fn resident(addr: &Addr<VramActor>) -> Vec<String> {
    addr.send(Status).await.unwrap().resident()
}

#[actix_rt::test]
async fn a_backend_panicking_100_times_in_a_row_leaves_the_system_serving() {
    let (addr, backends) = start_faulty(&models());
    addr.send(Load::new("asr")).await.unwrap().unwrap();
    backends["tts"].script(std::iter::repeat_n(Fault::Panic, 100));
    for i in 0..100 {
        let err = addr.send(Load::new("tts")).await.unwrap().unwrap_err();
        assert_eq!(err.code(), "backend_failed", "attempt {i}");
        let status = addr.send(Status).await.unwrap();
        assert_eq!(status.resident(), ["asr"], "attempt {i}");
        assert_eq!(
            status.used,
            3 * GIB,
            "no reservation left after attempt {i}"
        );
    }
    assert_eq!(backends["tts"].counts().panics, 100);
    assert_eq!(
        backends["tts"].counts().resets,
        100,
        "restarted after every panic"
    );
    // The script is used up: the next load succeeds.
    addr.send(Load::new("tts")).await.unwrap().unwrap();
    assert_eq!(resident(&addr).await, ["asr", "tts"]);
    assert_eq!(backends["tts"].holding(), ["tts"]);
}

#[actix_rt::test]
async fn crash_op_restarts_the_backend_and_reconciles() {
    let m = start(&models());
    for id in ["asr", "tts", "llm"] {
        m.addr.send(Load::new(id)).await.unwrap().unwrap();
    }
    m.addr
        .send(CrashBackend { kind: "tts".into() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.addr.send(Status).await.unwrap().resident(),
        ["asr", "llm"]
    );
    assert!(m.sims["tts"].holding().is_empty());
    // Twice in a row, and with nothing loaded, works.
    m.addr
        .send(CrashBackend { kind: "tts".into() })
        .await
        .unwrap()
        .unwrap();
    m.addr
        .send(CrashBackend { kind: "tts".into() })
        .await
        .unwrap()
        .unwrap();
    // The restarted backend serves again.
    m.addr.send(Load::new("tts")).await.unwrap().unwrap();
    assert_eq!(m.sims["tts"].holding(), ["tts"]);
    assert_eq!(
        m.addr.send(Status).await.unwrap().resident(),
        ["asr", "llm", "tts"]
    );
}

#[actix_rt::test]
async fn jobs_queued_behind_a_crash_proceed_after_the_restart() {
    let m = start(&models());
    m.addr.send(Load::new("tts")).await.unwrap().unwrap();
    let crash = m.addr.send(CrashBackend { kind: "tts".into() });
    let reload = m.addr.send(Load::new("tts"));
    let other = m.addr.send(Load::new("llm"));
    let (crash, reload, other) = futures::join!(crash, reload, other);
    crash.unwrap().unwrap();
    let reload = reload.unwrap().unwrap();
    assert!(
        !reload.already_resident,
        "the crash took it; it was loaded again"
    );
    other.unwrap().unwrap();
    assert_eq!(m.sims["tts"].load_count(), 2);
    assert_eq!(
        m.addr.send(Status).await.unwrap().resident(),
        ["llm", "tts"]
    );
}

#[actix_rt::test]
async fn a_panic_mid_load_fails_that_load_and_is_reconciled() {
    let (addr, backends) = start_faulty(&models());
    addr.send(Load::new("tts")).await.unwrap().unwrap();
    let mut events = Events::subscribe(&addr).await;
    backends["llm"].script([Fault::Panic]);
    let err = addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, VramError::BackendFailed { reason, .. } if reason.contains("panicked")),
        "{err}"
    );
    let status = addr.send(Status).await.unwrap();
    assert_eq!(status.resident(), ["tts"]);
    assert!(
        status
            .models
            .iter()
            .all(|m| m.state == ModelState::Resident)
    );
    // The reconcile was queued first, so this load runs after it.
    addr.send(Load::new("llm")).await.unwrap().unwrap();
    let seen = events.drain().await;
    let failed = seen
        .iter()
        .position(|e| matches!(e, VramEvent::LoadFailed { model, .. } if model == "llm"));
    let restarted = seen
        .iter()
        .position(|e| matches!(e, VramEvent::BackendRestarted { kind, .. } if kind == "llm"));
    assert!(failed.unwrap() < restarted.unwrap(), "{seen:?}");
}

#[actix_rt::test]
async fn hangs_time_out_and_failed_unloads_keep_the_model() {
    tokio::time::pause();
    let (mut config, backends) = faulty(&models());
    config.load_timeout = Duration::from_millis(20);
    config.unload_timeout = Duration::from_millis(20);
    let by_kind = backends
        .iter()
        .map(|(k, b)| {
            (
                k.clone(),
                std::rc::Rc::new(b.clone()) as std::rc::Rc<dyn vram_manager::Backend>,
            )
        })
        .collect();
    let addr = VramActor::new(config, by_kind).start();
    backends["llm"].script([Fault::Hang]);
    assert_eq!(
        addr.send(Load::new("llm"))
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        "timeout"
    );
    assert!(addr.send(Status).await.unwrap().models.is_empty());
    addr.send(Load::new("llm")).await.unwrap().unwrap();
    backends["llm"].script([Fault::Fail]);
    assert_eq!(
        addr.send(Unload::new("llm"))
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        "backend_failed"
    );
    assert_eq!(
        resident(&addr).await,
        ["llm"],
        "a failed unload leaves it resident"
    );
    assert_eq!(backends["llm"].holding(), ["llm"]);
    // A victim whose unload hangs aborts the load; nothing else changes.
    backends["llm"].script([Fault::Hang]);
    assert_eq!(
        addr.send(Load::new("llm2"))
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        "timeout"
    );
    assert_eq!(resident(&addr).await, ["llm"]);
    assert_eq!(addr.send(Status).await.unwrap().used, 6 * GIB);
}

#[actix_rt::test]
async fn an_escaped_panic_gets_a_fresh_backend_actor() {
    let m = start(&models());
    m.addr.send(Load::new("tts")).await.unwrap().unwrap();
    // Reach the tts backend actor the way the manager does, through its
    // crash job, but let the panic escape the guards this time.
    let backend: Addr<BackendActor> = m.addr.send(BackendOf("tts".into())).await.unwrap().unwrap();
    let _ = backend.send(Crash { escape: true }).await;
    assert!(
        !backend.connected(),
        "the actor's task died with no restart"
    );
    // The next request meets the dead actor: it fails, and the manager
    // starts a fresh actor and reconciles.
    let first = m.addr.send(Unload::new("tts")).await.unwrap();
    assert_eq!(first.unwrap_err().code(), "backend_failed");
    let mut reloaded = m.addr.send(Load::new("tts")).await.unwrap();
    for _ in 0..10 {
        if reloaded.is_ok() {
            break;
        }
        reloaded = m.addr.send(Load::new("tts")).await.unwrap();
    }
    reloaded.unwrap();
    assert_eq!(m.sims["tts"].holding(), ["tts"]);
    assert_eq!(m.addr.send(Status).await.unwrap().resident(), ["tts"]);
}

#[actix_rt::test]
async fn a_crash_voids_leases_on_lost_models() {
    let m = start(&models());
    let lease = m.addr.send(Acquire::new("tts")).await.unwrap().unwrap();
    assert!(lease.is_valid());
    m.addr
        .send(CrashBackend { kind: "tts".into() })
        .await
        .unwrap()
        .unwrap();
    assert!(!lease.is_valid(), "the model died under the lease");
    let again = m.addr.send(Acquire::new("tts")).await.unwrap().unwrap();
    drop(lease); // a void lease's release must not release the new one
    let status = m.addr.send(Status).await.unwrap();
    assert_eq!(status.models[0].leases, 1);
    drop(again);
}

#[actix_rt::test]
async fn a_request_past_max_queue_is_busy() {
    let m = start(&format!(
        "[policy]\nmax_queue = 2\n{}{}{}{}",
        model("a", "llm", 1, "load_ms = 200"),
        model("b", "llm", 1, ""),
        model("c", "llm", 1, ""),
        model("d", "llm", 1, "")
    ));
    let running = m.addr.send(Load::new("a"));
    futures::pin_mut!(running);
    assert!(futures::poll!(&mut running).is_pending());
    let b = m.addr.send(Load::new("b"));
    let c = m.addr.send(Load::new("c"));
    futures::pin_mut!(b, c);
    assert!(futures::poll!(&mut b).is_pending());
    assert!(futures::poll!(&mut c).is_pending());
    // a runs, b and c wait: the queue is full.
    let err = m.addr.send(Load::new("d")).await.unwrap().unwrap_err();
    assert_eq!(err, VramError::Busy { queued: 2 });
    // A load joining a queued one of the same model is not a new job.
    assert!(m.addr.send(Load::new("b")).await.unwrap().is_ok());
    assert!(running.await.unwrap().is_ok() && b.await.unwrap().is_ok() && c.await.unwrap().is_ok());
    assert!(
        m.addr.send(Load::new("d")).await.unwrap().is_ok(),
        "room again"
    );
}

#[actix_rt::test]
async fn a_restarted_manager_rebuilds_its_ledger_from_the_backends() {
    let (config, backends) = faulty(&models());
    let by_kind: std::collections::BTreeMap<_, _> = backends
        .iter()
        .map(|(k, b)| {
            (
                k.clone(),
                std::rc::Rc::new(b.clone()) as std::rc::Rc<dyn vram_manager::Backend>,
            )
        })
        .collect();
    let addr = Supervisor::start(move |_| VramActor::new(config, by_kind));
    addr.send(Load::new("asr")).await.unwrap().unwrap();
    addr.send(Load::new("llm")).await.unwrap().unwrap();
    let lease = addr.send(Acquire::new("asr")).await.unwrap().unwrap();
    addr.send(StopManager).await.unwrap();
    // The first job after the restart sees the rebuilt ledger.
    let loaded = addr.send(Load::new("tts")).await.unwrap().unwrap();
    assert!(loaded.evicted.is_empty());
    let status = addr.send(Status).await.unwrap();
    assert_eq!(status.resident(), ["asr", "llm", "tts"]);
    assert_eq!(status.used, 10 * GIB);
    let asr = status.models.iter().find(|m| m.id == "asr").unwrap();
    assert_eq!(
        asr.leases, 1,
        "the lease granted before the restart still counts"
    );
    assert!(lease.is_valid());
    drop(lease);
    assert_eq!(addr.send(Status).await.unwrap().models[0].leases, 0);
}

#[test]
fn bounded_soak_holds_every_invariant() {
    // 32 clients, 5% of backend calls faulty (fail, panic, hang, slow).
    let report = soak::run(SoakOptions {
        operations: 20_000,
        ..SoakOptions::default()
    })
    .expect("the soak's settings are valid");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!(report.operations, 20_000);
    assert!(
        report.faults > 0 && report.restarts > 0,
        "faults were injected: {report:?}"
    );
    assert!(
        report.checks > 1000,
        "invariants checked after every job: {report:?}"
    );
    assert!(
        report.results.get("ok").copied().unwrap_or(0) > 10_000,
        "{report:?}"
    );
}

#[actix_rt::test]
async fn an_acquire_behind_a_queued_crash_waits_for_it() {
    let m = start(&models());
    m.addr.send(Load::new("tts")).await.unwrap().unwrap();
    let crash = m.addr.send(CrashBackend { kind: "tts".into() });
    let acquire = m.addr.send(Acquire::new("tts"));
    let (crash, lease) = futures::join!(crash, acquire);
    crash.unwrap().unwrap();
    let lease = lease.unwrap().unwrap();
    assert!(
        lease.is_valid(),
        "granted after the crash, on the reloaded model"
    );
    assert_eq!(m.sims["tts"].load_count(), 2);
    assert_eq!(m.addr.send(Status).await.unwrap().models[0].leases, 1);
}

/// Instant; forgets what it holds when reset; loading `a` makes its own
/// actor crash right behind the call, as a panic in another call would.
#[derive(Default)]
struct CrashesBehindA {
    held: std::rc::Rc<std::cell::RefCell<Vec<String>>>,
    log: std::rc::Rc<std::cell::RefCell<Vec<String>>>,
    me: std::rc::Rc<std::cell::RefCell<Option<Addr<BackendActor>>>>,
}

impl vram_manager::Backend for CrashesBehindA {
    fn load(&self, model: &vram_manager::ModelSpec) -> vram_manager::BackendFuture<()> {
        self.log.borrow_mut().push(format!("load {}", model.id));
        self.held.borrow_mut().push(model.id.to_string());
        if let (Some(me), "a") = (self.me.borrow().as_ref(), model.id.as_str()) {
            me.do_send(Crash::default());
        }
        Box::pin(async { Ok(()) })
    }
    fn unload(&self, id: &str) -> vram_manager::BackendFuture<()> {
        self.held.borrow_mut().retain(|m| m != id);
        Box::pin(async { Ok(()) })
    }
    fn loaded(&self) -> vram_manager::BackendFuture<Vec<String>> {
        self.log.borrow_mut().push("list".into());
        let held = self.held.borrow().clone();
        Box::pin(async move { Ok(held) })
    }
    fn reset(&self) {
        self.held.borrow_mut().clear();
    }
}

#[actix_rt::test]
async fn a_restart_announced_behind_a_successful_call_is_reconciled_before_the_next_job() {
    let backend = CrashesBehindA::default();
    let (held, log, me) = (
        backend.held.clone(),
        backend.log.clone(),
        backend.me.clone(),
    );
    let (config, _) = faulty(&[model("a", "llm", 1, ""), model("b", "llm", 1, "")].concat());
    let backends = [(
        "llm".to_string(),
        std::rc::Rc::new(backend) as std::rc::Rc<dyn vram_manager::Backend>,
    )]
    .into_iter()
    .collect();
    // What the ledger and the backend held after every job.
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let (seen_in, held_in) = (seen.clone(), held.clone());
    let addr = VramActor::new(config, backends)
        .observe_jobs(move |ledger| {
            let ids: Vec<String> = ledger.entries().map(|e| e.id.to_string()).collect();
            seen_in.borrow_mut().push((ids, held_in.borrow().clone()));
        })
        .start();
    *me.borrow_mut() = addr.send(BackendOf("llm".into())).await.unwrap();
    let a = addr.send(Load::new("a"));
    let b = addr.send(Load::new("b"));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    // The load of `a` succeeded, then its backend restarted empty: the
    // reconcile that restart calls for ran before `b` was loaded, so no
    // job ended on a ledger that still had `a`.
    let log = log.borrow().clone();
    let list = log.iter().position(|l| l == "list");
    let load_b = log.iter().position(|l| l == "load b");
    assert!(
        matches!((list, load_b), (Some(l), Some(b)) if l < b),
        "{log:?}"
    );
    for (ledger, backend) in seen.borrow().iter() {
        assert_eq!(ledger, backend, "a job ended on a stale ledger");
    }
    assert_eq!(resident(&addr).await, ["b"]);
}
