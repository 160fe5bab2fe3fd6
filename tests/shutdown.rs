//! Shutdown: the manager stops taking work, answers what was queued with
//! `unavailable`, stops every model server without waiting for a running
//! load, and leaves nothing on the card or in the ledger.

mod common;

use actix::dev::Request;
use common::{GIB, load, model, start, status};
use vram_manager::{Acquire, CrashBackend, Load, Manager, Shutdown, Unload, VramActor, VramError};

#[actix_rt::test]
async fn after_shutdown_nothing_is_held_and_new_work_is_unavailable() {
    let m = start(
        &[
            model("asr", "asr", 3, ""),
            model("tts", "tts", 2, ""),
            model("llm", "llm", 8, ""),
        ]
        .concat(),
    );
    for id in ["asr", "tts", "llm"] {
        load(&m, id).await.unwrap();
    }
    let lease = m.addr.send(Acquire::new("tts")).await.unwrap().unwrap();
    assert_eq!(m.card.memory_now().used, 13 * GIB);

    m.shutdown().await;

    for kind in ["asr", "tts", "llm"] {
        assert!(m.sims[kind].holding().is_empty(), "{kind} holds nothing");
    }
    assert_eq!(m.card.memory_now().used, 0, "every model left the card");
    let s = status(&m).await;
    assert!(s.models.is_empty(), "{:?}", s.models);
    assert_eq!(s.used, 0);
    assert!(!lease.is_valid(), "leases are void after shutdown");
    drop(lease);

    assert_eq!(load(&m, "tts").await, Err("unavailable"));
    let acquire = m.addr.send(Acquire::new("tts")).await.unwrap();
    assert_eq!(acquire.unwrap_err().code(), "unavailable");
    let unload = m.addr.send(Unload::new("llm")).await.unwrap();
    assert_eq!(unload.unwrap_err().code(), "unavailable");
    let crash = m
        .addr
        .send(CrashBackend { kind: "llm".into() })
        .await
        .unwrap();
    assert_eq!(
        crash,
        Err(VramError::Unavailable {
            reason: "the manager is shutting down".into()
        })
    );
    assert!(
        m.sims["tts"].holding().is_empty(),
        "nothing was loaded again"
    );
    // A second shutdown is harmless.
    m.shutdown().await;
    m.addr.send(Shutdown).await.unwrap();
}

#[actix_rt::test]
async fn queued_work_is_unavailable_and_a_running_load_does_not_delay_the_shutdown() {
    let m = start(
        &[
            model("tts", "tts", 2, ""),
            model("slow", "llm", 4, "load_ms = 1500"),
            model("next", "llm", 4, ""),
        ]
        .concat(),
    );
    load(&m, "tts").await.unwrap();
    let running = m.addr.send(Load::new("slow"));
    let queued = m.addr.send(Load::new("next"));
    futures::pin_mut!(running, queued);
    assert!(futures::poll!(&mut running).is_pending());
    assert!(futures::poll!(&mut queued).is_pending());
    let s = status(&m).await;
    assert!(s.running && s.queued == 1, "{s:?}");

    let shutdown = m.shutdown();
    futures::pin_mut!(shutdown);
    // The shutdown goes straight to the backends: it is done while the
    // slow load is still in its backend.
    match futures::future::select(&mut running, shutdown).await {
        futures::future::Either::Right(((), _)) => {}
        futures::future::Either::Left(_) => panic!("the running load finished first"),
    }
    let queued = queued.await.unwrap().unwrap_err();
    assert_eq!(queued.code(), "unavailable", "{queued}");
    assert_eq!(m.sims["llm"].load_count(), 0, "the queued load never ran");
    assert!(m.sims["tts"].holding().is_empty());

    // The running load ends after the shutdown: its model cannot stay.
    let running = running.await.unwrap().unwrap_err();
    assert_eq!(running.code(), "unavailable", "{running}");
    assert!(m.sims["llm"].holding().is_empty());
    assert_eq!(m.card.memory_now().used, 0);
    assert!(status(&m).await.models.is_empty());
}

/// A manager over "old" (an 8 GiB LLM, with `old_keys`) and "new" (a
/// 12 GiB LLM, whose load evicts "old"), after `prefix`, with "old" loaded.
async fn old_and_new(prefix: &str, old_keys: &str) -> Manager {
    let m = start(&format!(
        "{prefix}{}{}",
        model("old", "llm", 8, old_keys),
        model("new", "llm", 12, "")
    ));
    load(&m, "old").await.unwrap();
    m
}

/// Sends the load of "new" and answers it once it runs.
async fn swap_running(m: &Manager) -> std::pin::Pin<Box<Request<VramActor, Load>>> {
    let mut swap = Box::pin(m.addr.send(Load::new("new")));
    assert!(futures::poll!(&mut swap).is_pending());
    while !status(m).await.running {}
    swap
}

/// Runs `test` on a thread and system of its own and answers what it
/// answers: a manager that never answers fails the calling test (after a
/// minute) instead of hanging it.
fn within_a_minute<T, F>(test: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let (answered, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = answered.send(actix::System::new().block_on(test()));
    });
    answer
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the manager answers the swap after a shutdown")
}

#[actix_rt::test]
async fn a_shutdown_while_a_swaps_victims_leave_starts_no_model() {
    // "new" evicts "old" on the same backend: one call unloads "old" and
    // would load "new" right after.
    let m = old_and_new("", "unload_ms = 300").await;
    let swap = swap_running(&m).await;

    // The shutdown lands while "old" is still leaving.
    m.shutdown().await;
    let swap = swap.await.unwrap().unwrap_err();
    assert_eq!(swap.code(), "unavailable", "{swap}");
    assert_eq!(
        m.sims["llm"].load_count(),
        1,
        "only \"old\" was ever loaded"
    );
    assert!(m.sims["llm"].holding().is_empty());
    assert_eq!(m.card.memory_now().used, 0);
    assert!(status(&m).await.models.is_empty());
}

#[test]
fn a_shutdown_during_a_release_wait_that_never_ends_answers_the_load() {
    // "old" leaves the backend, but the card never shows its memory back:
    // the swap waits for it.
    let (swap, loads) = within_a_minute(|| async {
        let m = old_and_new("", "release_ms = 3600000").await;
        let swap = swap_running(&m).await;
        m.shutdown().await;
        let swap = swap.await.unwrap().map(|_| ()).map_err(|e| e.code());
        (swap, m.sims["llm"].load_count())
    });
    assert_eq!(swap, Err("unavailable"));
    assert_eq!(loads, 1, "only \"old\" was ever loaded");
}

#[test]
fn a_shutdown_during_a_wait_for_leases_answers_the_load() {
    // "new" needs "old" out, but "old" is leased twice: the load waits for
    // the leases. A shutdown ends every wait at once, and one lease given
    // back afterwards must not start the wait over and over.
    let (swap, loads) = within_a_minute(|| async {
        let m = old_and_new("[policy]\nlease_wait = \"60s\"\n", "").await;
        let first = m.addr.send(Acquire::new("old")).await.unwrap().unwrap();
        let second = m.addr.send(Acquire::new("old")).await.unwrap().unwrap();
        let swap = swap_running(&m).await;
        let shutdown = m.addr.send(Shutdown);
        drop(first);
        shutdown.await.unwrap();
        let swap = swap.await.unwrap().map(|_| ()).map_err(|e| e.code());
        drop(second);
        (swap, m.sims["llm"].load_count())
    });
    assert!(swap.is_err(), "the swap cannot succeed: {swap:?}");
    assert_eq!(loads, 1, "only \"old\" was ever loaded");
}
