//! The actor core end to end: each policy rule through the real
//! VramActor and BackendActors with simulated backends, status during a
//! long load, shared loads, leases, waiting for leases, timeouts, events.

mod common;

use common::{Events, GIB, load, model, resident, start, status};
use vram_manager::{Acquire, Load, Unload, VramEvent};

fn seed_models() -> String {
    [
        model("asr1", "asr", 3, ""),
        model("tts1", "tts", 2, ""),
        model("tts2", "tts", 2, ""),
        model("llm1", "llm", 8, ""),
        model("llm2", "llm", 8, ""),
        model("llm3", "llm", 12, ""),
    ]
    .concat()
}

#[actix_rt::test]
async fn seed_day_through_the_actors() {
    let m = start(&seed_models());
    for id in ["asr1", "tts1", "llm1"] {
        assert_eq!(load(&m, id).await, Ok(vec![]));
    }
    assert_eq!(
        load(&m, "llm2").await,
        Ok(vec!["llm1".into()]),
        "same-tier replacement"
    );
    assert_eq!(
        load(&m, "llm3").await,
        Ok(vec!["llm2".into(), "tts1".into()])
    );
    assert_eq!(load(&m, "tts2").await, Ok(vec!["llm3".into()]));
    assert_eq!(resident(&m).await, ["asr1", "tts2"]);
    // The backends agree with the ledger.
    assert_eq!(m.sims["asr"].holding(), ["asr1"]);
    assert_eq!(m.sims["tts"].holding(), ["tts2"]);
    assert!(m.sims["llm"].holding().is_empty());
}

#[actix_rt::test]
async fn protection_and_no_collateral_eviction() {
    let m = start(
        &[
            model("asr1", "asr", 10, ""),
            model("llm1", "llm", 4, ""),
            model("llm2", "llm", 7, ""),
            model("tts1", "tts", 4, ""),
        ]
        .concat(),
    );
    load(&m, "asr1").await.unwrap();
    load(&m, "llm1").await.unwrap();
    assert_eq!(load(&m, "llm2").await, Err("insufficient_vram"));
    assert_eq!(
        resident(&m).await,
        ["asr1", "llm1"],
        "nothing evicted for a refused request"
    );
    assert_eq!(m.sims["llm"].unload_count(), 0);
    // TTS may evict the LLM but never the protected ASR.
    assert_eq!(load(&m, "tts1").await, Ok(vec!["llm1".into()]));
}

#[actix_rt::test]
async fn trim_and_lru_through_the_actors() {
    let m = start(
        &[
            model("small", "llm", 2, ""),
            model("big", "llm", 8, ""),
            model("tts", "tts", 2, ""),
            model("huge", "llm", 12, ""),
        ]
        .concat(),
    );
    for id in ["small", "big", "tts"] {
        load(&m, id).await.unwrap();
    }
    assert_eq!(
        load(&m, "huge").await,
        Ok(vec!["big".into()]),
        "small spared by trim"
    );

    let m = start(
        &[
            model("a", "llm", 6, ""),
            model("b", "llm", 6, ""),
            model("c", "llm", 6, ""),
        ]
        .concat(),
    );
    load(&m, "a").await.unwrap();
    load(&m, "b").await.unwrap();
    load(&m, "a").await.unwrap(); // touch
    assert_eq!(
        load(&m, "c").await,
        Ok(vec!["b".into()]),
        "least recently used goes first"
    );
}

#[actix_rt::test]
async fn unknown_exceeds_and_failed_loads_leave_no_trace() {
    let m = start(
        &[
            model("big", "llm", 20, ""),
            model("bad", "tts", 2, "fail_load = true"),
            model("llm", "llm", 15, ""),
        ]
        .concat(),
    );
    assert_eq!(load(&m, "ghost").await, Err("unknown_model"));
    assert_eq!(load(&m, "big").await, Err("exceeds_capacity"));
    load(&m, "llm").await.unwrap();
    // The failed load evicted the LLM first: that eviction stays done.
    assert_eq!(load(&m, "bad").await, Err("backend_failed"));
    let s = status(&m).await;
    assert!(
        s.models.is_empty(),
        "no reservation remains: {:?}",
        s.models
    );
    assert_eq!(s.used, 0);
}

#[actix_rt::test]
async fn pinned_models_stay_until_explicitly_unloaded() {
    let m = start(
        &[
            model("pin", "llm", 8, "pinned = true"),
            model("a", "llm", 8, ""),
            model("b", "llm", 8, ""),
        ]
        .concat(),
    );
    load(&m, "pin").await.unwrap();
    load(&m, "a").await.unwrap();
    assert_eq!(load(&m, "b").await, Ok(vec!["a".into()]));
    let unloaded = m.addr.send(Unload::new("pin")).await.unwrap().unwrap();
    assert!(unloaded.was_resident);
    assert_eq!(resident(&m).await, ["b"]);
}

#[actix_rt::test]
async fn backend_timeout_gives_timeout_and_no_reservation() {
    tokio::time::pause();
    let m = start(&format!(
        "[policy]\nload_timeout = \"50ms\"\n{}",
        model("slow", "llm", 4, "load_ms = 5000")
    ));
    assert_eq!(load(&m, "slow").await, Err("timeout"));
    assert_eq!(status(&m).await.used, 0);
    assert!(
        m.sims["llm"].holding().is_empty(),
        "the timed-out load was dropped"
    );
}

#[actix_rt::test]
async fn status_is_answered_while_a_long_load_runs() {
    let m = start(&model("slow", "llm", 4, "load_ms = 2000"));
    let loading = m.addr.send(Load::new("slow"));
    futures::pin_mut!(loading);
    // Poll the load once so it is queued, then wait (on messages, not
    // time) until its plan has reserved the bytes.
    assert!(futures::poll!(&mut loading).is_pending());
    let mut polls = 0;
    while status(&m).await.models.is_empty() {
        polls += 1;
        assert!(polls < 1000, "the load was never planned");
    }
    let status = m.addr.send(vram_manager::Status);
    // Whichever completes first wins the select; it must be the status,
    // and it must show the reservation of the load in flight.
    futures::pin_mut!(status);
    match futures::future::select(loading, status).await {
        futures::future::Either::Right((report, loading)) => {
            let report = report.unwrap();
            assert_eq!(report.used, 4 * GIB, "bytes reserved from planning");
            assert_eq!(report.models[0].state, vram_manager::ModelState::Loading);
            assert!(loading.await.unwrap().is_ok());
        }
        futures::future::Either::Left(_) => panic!("the load finished before status was answered"),
    }
}

#[actix_rt::test]
async fn concurrent_loads_of_one_model_share_one_backend_load() {
    let m = start(&model("m", "llm", 4, "load_ms = 50"));
    let (a, b, c) = futures::join!(
        m.addr.send(Load::new("m")),
        m.addr.send(Load::new("m")),
        m.addr.send(Acquire::new("m")),
    );
    assert!(a.unwrap().is_ok() && b.unwrap().is_ok());
    let lease = c.unwrap().unwrap();
    assert_eq!(m.sims["llm"].load_count(), 1);
    assert_eq!(status(&m).await.models[0].leases, 1);
    drop(lease);
}

#[actix_rt::test]
async fn every_waiter_of_one_load_hears_its_whole_answer() {
    // "m" needs "x" out; four requests wait for the one load, two of them
    // acquires: each hears the eviction, each acquire gets its own lease.
    let m = start(
        &[
            model("x", "llm", 8, ""),
            model("m", "llm", 10, "load_ms = 50"),
        ]
        .concat(),
    );
    load(&m, "x").await.unwrap();
    let (a, b, c, d) = futures::join!(
        m.addr.send(Load::new("m")),
        m.addr.send(Acquire::new("m")),
        m.addr.send(Acquire::new("m")),
        m.addr.send(Load::new("m")),
    );
    let (a, d) = (a.unwrap().unwrap(), d.unwrap().unwrap());
    let (b, c) = (b.unwrap().unwrap(), c.unwrap().unwrap());
    for evicted in [&a.evicted[..], &d.evicted, b.evicted(), c.evicted()] {
        assert_eq!(evicted, ["x"]);
    }
    assert_ne!(b.id(), c.id(), "one lease each");
    assert_eq!(m.sims["llm"].load_count(), 2, "x, then m once");
    let leases_on_m = |status: vram_manager::StatusReport| {
        status.models.iter().find(|e| e.id == "m").map(|e| e.leases)
    };
    assert_eq!(leases_on_m(status(&m).await), Some(2));
    drop((b, c));
    assert_eq!(leases_on_m(status(&m).await), Some(0));
}

#[actix_rt::test]
async fn dropping_a_lease_releases_the_model() {
    let m = start(&[model("a", "llm", 10, ""), model("b", "llm", 10, "")].concat());
    let lease = m.addr.send(Acquire::new("a")).await.unwrap().unwrap();
    assert_eq!(lease.model(), "a");
    assert_eq!(status(&m).await.models[0].leases, 1);
    assert_eq!(
        load(&m, "b").await,
        Err("insufficient_vram"),
        "a leased model is never evicted"
    );
    assert_eq!(
        m.addr
            .send(Unload::new("a"))
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        "in_use"
    );
    drop(lease);
    assert_eq!(status(&m).await.models[0].leases, 0);
    assert_eq!(load(&m, "b").await, Ok(vec!["a".into()]));
}

#[actix_rt::test]
async fn a_load_waits_for_a_lease_within_lease_wait() {
    tokio::time::pause();
    let m = start(&format!(
        "[policy]\nlease_wait = \"10s\"\n{}{}",
        model("a", "llm", 10, ""),
        model("b", "llm", 10, "")
    ));
    let lease = m.addr.send(Acquire::new("a")).await.unwrap().unwrap();
    let pending = m.addr.send(Load::new("b"));
    // Let the load plan and start waiting, then release.
    let report = status(&m).await;
    assert_eq!(report.resident(), ["a"]);
    drop(lease);
    assert_eq!(pending.await.unwrap().unwrap().evicted, ["a"]);
}

#[actix_rt::test]
async fn lease_wait_runs_out_with_insufficient_vram_and_in_use() {
    tokio::time::pause();
    let m = start(&format!(
        "[policy]\nlease_wait = \"30ms\"\n{}{}",
        model("a", "llm", 10, ""),
        model("b", "llm", 10, "")
    ));
    let _lease = m.addr.send(Acquire::new("a")).await.unwrap().unwrap();
    assert_eq!(load(&m, "b").await, Err("insufficient_vram"));
    assert_eq!(
        m.addr
            .send(Unload::new("a"))
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        "in_use"
    );
    assert_eq!(resident(&m).await, ["a"]);
}

#[actix_rt::test]
async fn events_arrive_in_the_order_things_happened() {
    let m = start(
        &[
            model("a", "llm", 10, ""),
            model("b", "llm", 10, ""),
            model("bad", "tts", 1, "fail_load = true"),
        ]
        .concat(),
    );
    let mut events = Events::subscribe(&m.addr).await;
    load(&m, "a").await.unwrap();
    load(&m, "b").await.unwrap();
    let _ = load(&m, "bad").await;
    m.addr.send(Unload::new("b")).await.unwrap().unwrap();
    let names: Vec<String> = events
        .drain()
        .await
        .iter()
        .map(|e| {
            let v = serde_json::to_value(e).unwrap();
            format!(
                "{} {}",
                v["event"].as_str().unwrap(),
                v["model"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "loading a",
            "loaded a",
            "loading b",
            "evicted a",
            "loaded b",
            "loading bad",
            "load_failed bad",
            "unloaded b"
        ]
    );
}

async fn next_expired(events: &mut Events) -> String {
    events
        .next(|e| match e {
            VramEvent::Expired { model, .. } => Some(model.to_string()),
            _ => None,
        })
        .await
}

#[actix_rt::test]
async fn idle_models_expire_through_the_queue_and_use_restarts_the_clock() {
    tokio::time::pause();
    let m = start(
        &[
            model("short", "llm", 2, "ttl = \"50ms\""),
            model("held", "llm", 2, "ttl = \"50ms\""),
            model("pinned", "llm", 2, "ttl = \"50ms\"\npinned = true"),
            model("forever", "tts", 2, ""),
        ]
        .concat(),
    );
    let mut events = Events::subscribe(&m.addr).await;
    for id in ["short", "pinned", "forever"] {
        load(&m, id).await.unwrap();
    }
    let lease = m.addr.send(Acquire::new("held")).await.unwrap().unwrap();
    assert_eq!(next_expired(&mut events).await, "short");
    assert_eq!(
        resident(&m).await,
        ["forever", "held", "pinned"],
        "leased, pinned and TTL-less stay"
    );
    assert_eq!(m.sims["llm"].holding(), ["held", "pinned"]);
    drop(lease);
    assert_eq!(
        next_expired(&mut events).await,
        "held",
        "the clock starts at the release"
    );
    assert_eq!(resident(&m).await, ["forever", "pinned"]);
}

/// A backend whose model servers never become ready: "never" gives up
/// with its own timeout and reason; "hang" never answers at all.
struct NeverReady;

impl vram_manager::Backend for NeverReady {
    fn load(&self, model: &vram_manager::ModelSpec) -> vram_manager::BackendFuture<()> {
        let id = model.id.clone();
        Box::pin(async move {
            if id == "hang" {
                std::future::pending::<()>().await;
            }
            Err(vram_manager::BackendError::timeout(
                format!("{id}: GET /health never answered 200"),
                std::time::Duration::from_secs(3),
            ))
        })
    }
    fn unload(&self, _: &str) -> vram_manager::BackendFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn loaded(&self) -> vram_manager::BackendFuture<Vec<String>> {
        Box::pin(async { Ok(vec![]) })
    }
}

#[actix_rt::test]
async fn a_backend_timeout_carries_its_reason_to_the_caller_and_the_event() {
    tokio::time::pause();
    use actix::Actor;
    use vram_manager::{Catalog, ModelSpec, VramActor, VramError};
    let catalog: Catalog = [
        ModelSpec::new("never", "llm", GIB),
        ModelSpec::new("hang", "llm", GIB),
    ]
    .into_iter()
    .collect();
    let mut config = common::default_config(catalog);
    config.load_timeout = std::time::Duration::from_millis(50);
    let backend: std::rc::Rc<dyn vram_manager::Backend> = std::rc::Rc::new(NeverReady);
    let addr = VramActor::new(config, [("llm".to_string(), backend)].into()).start();
    let mut events = Events::subscribe(&addr).await;

    let err = addr.send(Load::new("never")).await.unwrap().unwrap_err();
    assert_eq!(
        err,
        VramError::Timeout {
            model: "never".into(),
            after_ms: 3000,
            reason: "never: GET /health never answered 200".into(),
        }
    );
    let text = err.to_string();
    assert!(
        text.ends_with("within 3000 ms: never: GET /health never answered 200"),
        "{text}"
    );
    let failed: Vec<_> = events
        .drain()
        .await
        .into_iter()
        .filter_map(|e| match e {
            VramEvent::LoadFailed {
                model,
                code,
                reason,
            } => Some((model.to_string(), code, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [("never".to_string(), "timeout".to_string(), text.clone())]
    );
    assert!(failed[0].2.contains("GET /health never answered 200"));

    // The manager's own timeout has no reason to give.
    let err = addr.send(Load::new("hang")).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, VramError::Timeout { after_ms: 50, reason, .. } if reason.is_empty()),
        "{err:?}"
    );
    assert!(err.to_string().ends_with("within 50 ms"), "{err}");
}

#[actix_rt::test]
async fn pinning_at_run_time_spares_a_model_until_it_is_unpinned() {
    let m = start(&seed_models());
    load(&m, "llm1").await.unwrap();
    load(&m, "tts1").await.unwrap();
    let handle = m.handle();
    // llm1 is the lowest tier, but pinned it stays: the TTS goes instead.
    handle.set_pinned("llm1", true).await.unwrap();
    assert!(
        status(&m)
            .await
            .models
            .iter()
            .any(|e| e.id == "llm1" && e.pinned)
    );
    assert_eq!(load(&m, "llm2").await, Ok(vec!["tts1".to_string()]));
    assert_eq!(load(&m, "llm3").await, Err("insufficient_vram"));
    // Unpinned, it may go again.
    handle.set_pinned("llm1", false).await.unwrap();
    assert_eq!(
        load(&m, "llm3").await,
        Ok(vec!["llm1".to_string(), "llm2".to_string()])
    );
    // A pin outlives the model's stay on the card: it applies on reload.
    handle.set_pinned("tts2", true).await.unwrap();
    load(&m, "tts2").await.unwrap();
    assert!(
        status(&m)
            .await
            .models
            .iter()
            .any(|e| e.id == "tts2" && e.pinned)
    );
    assert_eq!(
        handle.set_pinned("nope", true).await.unwrap_err().code(),
        "unknown_model"
    );
}

#[actix_rt::test]
async fn the_adaptive_order_shows_its_scores_and_names_itself_in_evictions() {
    let models = [
        model("asr", "asr", 2, ""),
        model("llm", "llm", 12, ""),
        model("voice-a", "tts", 1, ""),
        model("voice-b", "tts", 1, ""),
    ]
    .concat();
    let m = start(&format!(
        "[policy]\norder = \"adaptive\"\n[gpu]\ntotal = \"15GiB\"\n{models}"
    ));
    let mut events = Events::subscribe(&m.addr).await;
    for id in ["asr", "llm", "voice-a", "asr", "llm"] {
        assert_eq!(load(&m, id).await, Ok(vec![]), "{id}");
    }
    let report = status(&m).await;
    assert_eq!(report.order, vram_manager::Order::Adaptive);
    let ids: Vec<&str> = report.scores.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["asr", "llm", "voice-a"]);
    let score = |id: &str| report.scores.iter().find(|s| s.id == id).unwrap().clone();
    // The LLM comes every turn; voice-a was asked for once, long ago.
    assert!(
        score("llm").p_soon > score("voice-a").p_soon,
        "{:?}",
        report.scores
    );
    // A voice switch: voice-a is the cheaper candidate, the LLM stays.
    assert_eq!(load(&m, "voice-b").await, Ok(vec!["voice-a".to_string()]));
    let evicted: Vec<serde_json::Value> = events
        .drain()
        .await
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .filter(|v| v["event"] == "evicted")
        .collect();
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0]["model"], "voice-a");
    assert_eq!(evicted[0]["order"], "adaptive");
}

#[actix_rt::test]
async fn the_strict_order_shows_no_scores() {
    let m = start(&model("a", "llm", 1, ""));
    load(&m, "a").await.unwrap();
    let report = status(&m).await;
    assert_eq!(report.order, vram_manager::Order::Strict);
    assert!(report.scores.is_empty());
}
