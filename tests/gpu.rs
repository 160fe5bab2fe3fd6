//! GPU truth: planning against the card, waiting for memory to come back,
//! calibration, the simulated card, and falling back without NVML.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{GIB, load, model, outcome, run_cli, settings, start, status, temp_file};
use vram_manager::config::ProbeChoice;
use vram_manager::gpu::{self, SimCard};
use vram_manager::scenario::{self, Scenario};

#[actix_rt::test]
async fn other_processes_force_more_eviction_than_the_ledger_alone() {
    let m = start(&format!(
        "[gpu]\nexternal = \"3GiB\"\n{}{}",
        model("a", "llm", 8, ""),
        model("b", "llm", 6, "")
    ));
    load(&m, "a").await.unwrap();
    // The ledger has 8 GiB free; the card 16 - 3 - 8 = 5 GiB.
    assert_eq!(status(&m).await.free, 8 * GIB);
    assert_eq!(load(&m, "b").await, Ok(vec!["a".to_string()]));
    assert!(!m.card.overcommitted());
}

#[actix_rt::test]
async fn the_reserve_is_kept_free_on_the_card() {
    let m = start(&format!(
        "[gpu]\nreserve = \"2GiB\"\nexternal = \"1GiB\"\n{}{}",
        model("a", "llm", 6, ""),
        model("b", "llm", 7, "")
    ));
    load(&m, "a").await.unwrap();
    // Ledger: 14 - 6 = 8 free. Card: 16 - 1 - 6 = 9, less the 2 GiB
    // reserve = 7 < ... b needs 7: fits exactly.
    assert_eq!(load(&m, "b").await, Ok(vec![]));
}

fn slow_release() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scenarios/slow-release.toml");
    Scenario::load(&path).unwrap()
}

#[test]
fn a_slow_release_is_waited_for() {
    // On the paused clock the step's time is exact: the memory comes back
    // 400 ms after the unload, and the polls (10, 20, 40, 50, 50, ... ms)
    // see it within one poll of that.
    let report = scenario::run_paused(&slow_release(), |_| {}).unwrap();
    assert_eq!(report.failed(), 0, "{:?}", report.steps);
    assert!(!report.overcommitted);
    let ms = report.steps[1].ms;
    assert!((400.0..=450.0).contains(&ms), "waited {ms} ms for 400 ms");
}

#[test]
fn an_over_declared_victim_does_not_stall_the_swap() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scenarios/over-declared.toml");
    let scenario = Scenario::load(&path).unwrap();
    let timeout = scenario.settings.gpu.release_timeout;
    assert_eq!(timeout, Duration::from_secs(20));
    let report = scenario::run_paused(&scenario, |_| {}).unwrap();
    assert_eq!(report.failed(), 0, "{:?}", report.steps);
    assert!(!report.overcommitted);
    let swap = &report.steps[1];
    assert_eq!(swap.evicted, ["llama-3.1-8b"]);
    // The victim really held 2 GiB and gives it back after 100 ms: on the
    // paused clock the load waits that plus part of one poll (the pauses
    // double from 10 ms: the check at 150 ms sees it), not the 20 s
    // release_timeout (which a wait for its declared 8 GiB could never end
    // before).
    assert!(
        (100.0..=160.0).contains(&swap.ms),
        "waited {} ms for a 100 ms release (timeout {timeout:?})",
        swap.ms
    );
}

#[test]
fn without_the_wait_slow_release_runs_out_of_memory() {
    let mut scenario = slow_release();
    scenario.settings.gpu.release_timeout = Duration::ZERO;
    let report = scenario::run(&scenario, |_| {}).unwrap();
    assert_eq!(report.failed(), 1);
    assert_eq!(report.steps[1].result, "backend_failed");
    assert!(
        report.overcommitted,
        "the load asked the card for more than it had"
    );
}

#[actix_rt::test]
async fn an_under_declared_model_is_calibrated() {
    let m = start(
        &[
            model("llm", "llm", 4, "actual_vram = \"6GiB\""),
            model("tts", "tts", 11, ""),
        ]
        .concat(),
    );
    load(&m, "llm").await.unwrap();
    let s = status(&m).await;
    let llm = &s.models[0];
    assert_eq!(
        (llm.declared, llm.measured, llm.bytes),
        (4 * GIB, Some(6 * GIB), 6 * GIB)
    );
    assert_eq!(s.used, 6 * GIB);
    m.addr
        .send(vram_manager::Unload::new("llm"))
        .await
        .unwrap()
        .unwrap();
    load(&m, "tts").await.unwrap();
    // 5 GiB free: the declared 4 GiB would fit; the measured 6 do not.
    assert_eq!(load(&m, "llm").await, Ok(vec!["tts".to_string()]));
    assert!(!m.card.overcommitted());
}

#[actix_rt::test]
async fn an_over_declared_model_keeps_its_declared_size() {
    let m = start(&model("llm", "llm", 8, "actual_vram = \"5GiB\""));
    load(&m, "llm").await.unwrap();
    let s = status(&m).await;
    assert_eq!(
        (s.models[0].bytes, s.models[0].measured),
        (8 * GIB, Some(5 * GIB))
    );
}

#[test]
fn calibration_never_takes_the_ledger_over_capacity() {
    for name in ["calibration", "calibration-evicts", "calibration-overflow"] {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/scenarios/{name}.toml"));
        let report = scenario::run(&Scenario::load(&path).unwrap(), |_| {}).unwrap();
        assert_eq!(report.failed(), 0, "{name}: {:?}", report.steps);
        for step in &report.steps {
            assert!(
                step.used <= report.capacity,
                "{name} step {}: used {} > capacity {}",
                step.step,
                step.used,
                report.capacity
            );
        }
        assert!(!report.overcommitted, "{name}");
    }
}

#[actix_rt::test]
async fn a_model_measured_larger_than_capacity_is_unloaded_and_then_refused() {
    use vram_manager::{Load, VramError, VramEvent};
    let m = start(&format!(
        "[gpu]\ntotal = \"20GiB\"\nreserve = \"6GiB\"\n{}{}",
        model("tts", "tts", 3, ""),
        model("llm", "llm", 10, "actual_vram = \"15GiB\"")
    ));
    let mut events = common::Events::subscribe(&m.addr).await;
    load(&m, "tts").await.unwrap();
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(
        err,
        VramError::InsufficientVram {
            model: "llm".into(),
            needed: 15 * GIB,
            free: 11 * GIB,
            evictable: 3 * GIB,
            leased: 0,
        }
    );
    assert!(
        err.to_string()
            .contains(&format!("needs {} bytes", 15 * GIB)),
        "names the measured bytes: {err}"
    );
    let failed: Vec<_> = events
        .drain()
        .await
        .into_iter()
        .filter_map(|e| match e {
            VramEvent::LoadFailed { model, code, .. } => Some((model.to_string(), code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [("llm".to_string(), "insufficient_vram".to_string())]
    );
    assert!(
        m.sims["llm"].holding().is_empty(),
        "taken off the card again"
    );
    assert_eq!(
        m.sims["tts"].holding(),
        ["tts"],
        "nothing was evicted for it"
    );
    let s = status(&m).await;
    assert_eq!((s.used, s.resident()), (3 * GIB, vec!["tts".to_string()]));
    assert_eq!(m.card.memory_now().used, 3 * GIB);
    // The catalog remembers the real size: refused before loading.
    assert_eq!(load(&m, "llm").await, Err("exceeds_capacity"));
    assert_eq!(m.sims["llm"].load_count(), 1, "not loaded a second time");
}

#[actix_rt::test]
async fn a_model_measured_larger_than_planned_evicts_for_its_real_size() {
    use vram_manager::VramEvent;
    let m = start(&format!(
        "[gpu]\ntotal = \"20GiB\"\nreserve = \"4GiB\"\n{}{}",
        model("a", "llm", 6, ""),
        model("b", "llm", 8, "actual_vram = \"12GiB\"")
    ));
    load(&m, "a").await.unwrap();
    let mut events = common::Events::subscribe(&m.addr).await;
    assert_eq!(load(&m, "b").await, Ok(vec!["a".to_string()]));
    let names: Vec<String> = events
        .drain()
        .await
        .iter()
        .map(|e| match e {
            VramEvent::Loading { model, victims, .. } => format!("loading {model} {victims:?}"),
            VramEvent::Evicted {
                model, for_model, ..
            } => format!("evicted {model} for {for_model}"),
            VramEvent::Loaded {
                model,
                bytes,
                measured,
                ..
            } => format!(
                "loaded {model} {} {:?}",
                bytes / GIB,
                measured.map(|m| m / GIB)
            ),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        ["loading b []", "evicted a for b", "loaded b 12 Some(12)"],
        "planned without victims; the eviction came after the measurement"
    );
    let s = status(&m).await;
    assert_eq!((s.used, s.resident()), (12 * GIB, vec!["b".to_string()]));
    assert!(m.sims["llm"].holding() == ["b"]);
}

#[test]
fn sim_card_returns_memory_late_and_notes_overcommit() {
    actix::System::new().block_on(async {
        tokio::time::pause();
        let card = SimCard::new(10 * GIB, GIB);
        card.allocate("a", 6 * GIB).unwrap();
        assert_eq!(card.memory_now().free, 3 * GIB);
        card.release("a", Duration::from_millis(30));
        assert_eq!(card.memory_now().free, 3 * GIB, "not yet returned");
        assert!(card.allocate("b", 5 * GIB).is_err());
        assert!(card.overcommitted());
        actix::clock::sleep(Duration::from_millis(40)).await;
        assert_eq!(card.memory_now().free, 9 * GIB);
        assert_eq!(card.peak(), 7 * GIB);
    });
}

#[test]
fn auto_falls_back_to_the_configured_total_without_a_usable_card() {
    // No card has this UUID, so NVML (present or not) cannot serve it.
    let s =
        settings("[gpu]\ndevice = \"GPU-00000000-none\"\ntotal = \"12GiB\"\nreserve = \"1GiB\"\n");
    assert_eq!(s.gpu.probe, ProbeChoice::Auto);
    let choice = gpu::resolve(&s).unwrap();
    assert!(choice.nvml.is_none());
    assert_eq!(choice.capacity, 11 * GIB);
    assert!(choice.fallback.unwrap().contains("NVML"));
}

#[test]
fn nvml_required_or_total_auto_without_a_usable_card_is_an_error() {
    let s = settings("[gpu]\nprobe = \"nvml\"\ndevice = \"GPU-00000000-none\"\n");
    let e = gpu::resolve(&s).unwrap_err().to_string();
    assert!(e.contains("gpu.probe") && e.contains("NVML"), "{e}");
    let s = settings("[gpu]\ntotal = \"auto\"\ndevice = \"GPU-00000000-none\"\n");
    let e = gpu::resolve(&s).unwrap_err().to_string();
    assert!(e.contains("gpu.total") && e.contains("NVML"), "{e}");
    let s = settings("[gpu]\nprobe = \"none\"\n");
    assert_eq!(gpu::resolve(&s).unwrap().capacity, 16 * GIB);
}

#[test]
fn check_config_with_nvml_required_exits_2_naming_nvml() {
    // A process-backed model: the manager asks the real card, which is
    // not there.
    let path = temp_file(
        "nvml-required.toml",
        "[[models]]\nid = \"llm\"\nkind = \"llm\"\nvram = \"4GiB\"\nbackend = \"process\"\n\
         command = [\"true\"]\nready = \"tcp://127.0.0.1:9\"\n",
    );
    let nvml_absent = [
        ("VRAM__GPU__PROBE", "nvml"),
        ("VRAM__GPU__DEVICE", "GPU-00000000-none"),
    ];
    let (code, _, err) = outcome(&run_cli(
        &["check-config", path.to_str().unwrap()],
        &nvml_absent,
    ));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("NVML") && err.contains("gpu.probe"), "{err}");
    // Only simulated models: the manager never asks the card (serve and
    // scenarios start), and check-config says so instead of refusing.
    let (code, out, err) = outcome(&run_cli(&["check-config"], &nvml_absent));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("card: simulated"), "{out}");
}

#[test]
fn gpu_command_reports_the_card_or_the_fallback_and_exits_0() {
    let (code, out, err) = outcome(&run_cli(&["gpu"], &[]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("No NVIDIA driver found") || out.starts_with("GPU "),
        "{out}"
    );
    let (code, out, _) = outcome(&run_cli(&["gpu", "--json"], &[]));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    if v["nvml"] == false {
        assert_eq!(v["fallback"]["capacity"], 16u64 << 30);
        assert!(v["reason"].as_str().unwrap().contains("NVML"));
    } else {
        assert!(v["devices"].as_array().is_some_and(|d| !d.is_empty()));
    }
}

#[test]
fn the_card_scenarios_pass_without_overcommitting() {
    for name in [
        "external-use",
        "slow-release",
        "calibration",
        "calibration-evicts",
        "calibration-overflow",
        "over-declared",
    ] {
        let file = format!("config/scenarios/{name}.toml");
        let (code, out, err) = outcome(&run_cli(&["scenario", &file, "--json"], &[]));
        assert_eq!(code, 0, "{name}: {out}\n{err}");
        let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(summary["summary"]["overcommitted"], false, "{name}");
        assert!(summary["summary"]["peak"].as_u64().unwrap() > 0);
        for line in out.lines().filter(|l| l.starts_with("{\"step\"")) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["card_free"].is_u64(), "{line}");
        }
    }
}

#[actix_rt::test]
async fn a_victim_that_will_not_unload_after_the_load_takes_the_model_off_again() {
    use std::collections::{BTreeMap, HashMap};
    use std::rc::Rc;

    use actix::Actor;
    use vram_manager::backends::{Fault, FaultBackend, SimBackend};
    use vram_manager::config::SimOptions;
    use vram_manager::{Backend, Catalog, Load, ModelSpec, Status, VramActor};

    // "a" (tts) lives on a scripted fault backend; "b" (llm) on a
    // simulated card, where it measures 12 GiB against a declared 8.
    let card = SimCard::new(20 * GIB, 0);
    let options = SimOptions {
        actual_bytes: Some(12 * GIB),
        ..SimOptions::default()
    };
    let sim = SimBackend::new(HashMap::from([("b".to_string(), options)])).on_card(card.clone());
    let fault = FaultBackend::scripted();
    let catalog: Catalog = [
        ModelSpec::new("a", "tts", 6 * GIB),
        ModelSpec::new("b", "llm", 8 * GIB),
    ]
    .into_iter()
    .collect();
    let backends: BTreeMap<String, Rc<dyn Backend>> = BTreeMap::from([
        ("tts".to_string(), Rc::new(fault.clone()) as Rc<dyn Backend>),
        ("llm".to_string(), Rc::new(sim.clone()) as Rc<dyn Backend>),
    ]);
    let addr = VramActor::new(common::default_config(catalog), backends)
        .with_probe(Rc::new(card.clone()))
        .start();
    addr.send(Load::new("a")).await.unwrap().unwrap();
    // 6 + 12 > 16: "a" must go after "b" is on the card, but will not.
    fault.script([Fault::Fail]);
    let err = addr.send(Load::new("b")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "backend_failed", "{err}");
    assert_eq!(sim.load_count(), 1);
    assert!(sim.holding().is_empty(), "b was taken off the card again");
    assert_eq!(card.memory_now().used, 0);
    let s = addr.send(Status).await.unwrap();
    assert_eq!(s.resident(), ["a"], "the victim stays resident");
    assert_eq!(s.used, 6 * GIB);
    assert_eq!(fault.holding(), ["a"]);
}

#[test]
fn victims_on_different_backends_leave_at_once() {
    // An LLM and a TTS must both go, each taking 300 ms to unload: one
    // after the other that is 600 ms of silence, at once 300.
    let scenario = Scenario::parse(
        "parallel.toml",
        "[gpu]\ntotal = \"16GiB\"\n\
         [[models]]\nid = \"llm-a\"\nkind = \"llm\"\nvram = \"8GiB\"\nunload_ms = 300\n\
         [[models]]\nid = \"tts-a\"\nkind = \"tts\"\nvram = \"4GiB\"\nunload_ms = 300\n\
         [[models]]\nid = \"big\"\nkind = \"llm\"\nvram = \"14GiB\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"llm-a\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"tts-a\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"big\"\nevicted = [\"llm-a\", \"tts-a\"]\nresident = [\"big\"]\n",
    )
    .unwrap();
    let report = scenario::run_paused(&scenario, |_| {}).unwrap();
    assert_eq!(report.failed(), 0, "{:?}", report.steps);
    let ms = report.steps[2].ms;
    assert!((300.0..400.0).contains(&ms), "the swap took {ms} ms");
}

/// A probe that reads a simulated card but panics on every second read,
/// in one of the three places a probe can: in `memory_at_once`, while
/// building its future, or while that future runs.
struct PanickingProbe {
    card: SimCard,
    at: PanicAt,
    reads: std::rc::Rc<std::cell::Cell<u32>>,
}

#[derive(Clone, Copy, Debug)]
enum PanicAt {
    AtOnce,
    Building,
    Running,
}

impl PanickingProbe {
    /// Counts a read: whether this one breaks.
    fn breaks(&self) -> bool {
        self.reads.set(self.reads.get() + 1);
        self.reads.get().is_multiple_of(2)
    }
}

impl vram_manager::GpuProbe for PanickingProbe {
    fn memory(&self) -> vram_manager::ProbeFuture<vram_manager::GpuMemory> {
        let memory = self.card.memory_now();
        match self.at {
            PanicAt::Building if self.breaks() => panic!("the probe broke building its read"),
            PanicAt::Running if self.breaks() => {
                Box::pin(async { panic!("the probe broke reading") })
            }
            _ => Box::pin(std::future::ready(Ok(memory))),
        }
    }

    fn memory_at_once(&self) -> Option<Result<vram_manager::GpuMemory, vram_manager::ProbeError>> {
        match self.at {
            PanicAt::AtOnce if self.breaks() => panic!("the probe broke"),
            PanicAt::AtOnce => Some(Ok(self.card.memory_now())),
            PanicAt::Building | PanicAt::Running => None,
        }
    }
}

#[actix_rt::test]
async fn a_probe_that_panics_is_a_failed_read_not_a_dead_manager() {
    use std::collections::{BTreeMap, HashMap};
    use std::rc::Rc;

    use actix::Actor;
    use vram_manager::backends::SimBackend;
    use vram_manager::{Backend, Catalog, Load, ModelSpec, Status, VramActor};

    for at in [PanicAt::AtOnce, PanicAt::Building, PanicAt::Running] {
        // Two LLMs that do not fit together: the second load evicts the
        // first on their shared backend. The reads, in order: a's plan
        // (1) and measure (2, breaks: a stays unmeasured); b's plan (3)
        // and the backend's read between the unload and the load (4,
        // breaks: the load goes on as without a card, and b stays
        // unmeasured).
        let card = SimCard::new(16 * GIB, 0);
        let sim = SimBackend::new(HashMap::new()).on_card(card.clone());
        let catalog: Catalog = [
            ModelSpec::new("a", "llm", 8 * GIB),
            ModelSpec::new("b", "llm", 12 * GIB),
        ]
        .into_iter()
        .collect();
        let backends =
            BTreeMap::from([("llm".to_string(), Rc::new(sim.clone()) as Rc<dyn Backend>)]);
        let reads = Rc::new(std::cell::Cell::new(0));
        let probe = PanickingProbe {
            card: card.clone(),
            at,
            reads: reads.clone(),
        };
        let addr = VramActor::new(common::default_config(catalog), backends)
            .with_probe(Rc::new(probe))
            .start();
        let a = addr
            .send(Load::new("a"))
            .await
            .expect("the manager answers");
        assert!(a.is_ok(), "{at:?}: {a:?}");
        let b = addr
            .send(Load::new("b"))
            .await
            .expect("the manager answers");
        assert_eq!(b.expect("b loads").evicted, ["a"], "{at:?}");
        let s = addr.send(Status).await.expect("status is answered");
        assert_eq!(s.resident(), ["b"], "{at:?}");
        assert_eq!(sim.holding(), ["b"], "{at:?}");
        assert_eq!(card.memory_now().used, 12 * GIB, "{at:?}");
        assert_eq!(reads.get(), 4, "{at:?}: every read, broken or not");
    }
}
