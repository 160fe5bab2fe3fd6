//! Several cards: settings, placement through the fleet, requests arriving
//! together, status and events per card, and process servers started on
//! their card.

mod common;

use common::{Events, GIB, free_port, outcome, run_cli, settings, temp_file};
use vram_manager::config::Settings;
use vram_manager::{Manager, VramEvent};

const STAND_IN: &str = env!("CARGO_BIN_EXE_vram-stand-in");

/// Two cards (16 and 8 GiB unless given) and `models`.
fn two_cards(big: u64, small: u64, models: &str) -> String {
    format!(
        "[gpu]\nprobe = \"none\"\n[[gpus]]\ntotal = \"{big}GiB\"\n[[gpus]]\ntotal = \"{small}GiB\"\n{models}"
    )
}

fn model(id: &str, kind: &str, gib: u64, extra: &str) -> String {
    format!("[[models]]\nid = \"{id}\"\nkind = \"{kind}\"\nvram = \"{gib}GiB\"\n{extra}\n")
}

#[test]
fn without_gpus_the_gpu_section_is_the_one_card() {
    let s = Settings::parse("[gpu]\ntotal = \"12GiB\"\ndevice = \"GPU-x\"\nreserve = \"1GiB\"\n")
        .unwrap();
    assert_eq!(s.gpus.len(), 1);
    assert_eq!(s.gpus[0].device, "GPU-x");
    assert_eq!(s.gpus[0].capacity(), Some(11 * GIB));
    assert_eq!(s.capacity(), Some(11 * GIB));
}

#[test]
fn gpus_entries_are_checked_and_named() {
    let s = Settings::parse(&two_cards(16, 8, &model("a", "llm", 1, "gpus = [1]"))).unwrap();
    assert_eq!(s.gpus.len(), 2);
    assert_eq!(
        (s.gpus[0].device.as_str(), s.gpus[1].device.as_str()),
        ("0", "1")
    );
    assert_eq!(s.total_capacity(), Some(24 * GIB));
    assert_eq!(s.models[0].gpus, Some(vec![1]));
    let error = |text: &str| Settings::parse(text).unwrap_err().to_string();
    let e = error(&two_cards(16, 8, &model("a", "llm", 1, "gpus = [2]")));
    assert!(
        e.contains("models[0].gpus") && e.contains("2 is not a card") && e.contains("2 cards"),
        "{e}"
    );
    let e = error(&two_cards(16, 8, &model("a", "llm", 1, "gpus = []")));
    assert!(
        e.contains("models[0].gpus") && e.contains("at least one card"),
        "{e}"
    );
    let e = error(
        "[[gpus]]\ndevice = \"GPU-a\"\ntotal = \"8GiB\"\n[[gpus]]\ndevice = \"GPU-a\"\ntotal = \"8GiB\"\n",
    );
    assert!(e.contains("gpus[1].device") && e.contains("twice"), "{e}");
    let e = error("[[gpus]]\ntotal = \"8GiB\"\nreserve = \"9GiB\"\n");
    assert!(e.contains("gpus[0].reserve"), "{e}");
    let e = error("[[gpus]]\ntotal = \"lots\"\n");
    assert!(e.contains("gpus[0].total"), "{e}");
    let e = error("[[gpus]]\ntotal = \"8GiB\"\nsize = \"1GiB\"\n");
    assert!(e.contains("size"), "{e}");
}

#[test]
fn check_config_lists_every_card() {
    let path = temp_file(
        "cards.toml",
        &two_cards(16, 8, &model("a", "asr", 1, "gpus = [1]")),
    );
    let (code, out, err) = outcome(&run_cli(&["check-config", path.to_str().unwrap()], &[]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gpus: 2 cards"), "{out}");
    assert!(out.contains("gpu 1: device 1, total 8.0 GiB"), "{out}");
    assert!(out.contains("gpus 1"), "the model's cards: {out}");
}

#[actix_rt::test]
async fn two_requests_arriving_together_never_share_room_only_one_fits() {
    // Card 1 (8 GiB) is busy loading `c` (1 GiB). Both 6 GiB models fit it
    // best after that (1 GiB left, against 10 on card 0), but only one of
    // them does: the first queues behind `c` on card 1 holding no bytes
    // yet, and the second must still see that room as taken and go to
    // card 0. Slow loads keep everything in flight.
    let m = Manager::start(&settings(&two_cards(
        16,
        8,
        &[
            model("c", "tts", 1, "load_ms = 300\ngpus = [1]"),
            model("a", "llm", 6, "load_ms = 200"),
            model("b", "llm", 6, "load_ms = 200"),
        ]
        .concat(),
    )))
    .unwrap();
    let vram = m.handle();
    let mut events = Events::subscribe_handle(&vram).await;
    let first = vram.clone();
    let c = actix::spawn(async move { first.load("c").await });
    // Let `c` start on card 1.
    events
        .next(|e| matches!(e, VramEvent::Loading { ref model, .. } if model == "c").then_some(()))
        .await;
    let (a, b) = futures::join!(vram.load("a"), vram.load("b"));
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert!(c.await.unwrap().is_ok());
    let status = vram.status().await.unwrap();
    let gpu_of = |id: &str| status.models.iter().find(|e| e.id == id).unwrap().gpu;
    let mut cards = [gpu_of("a"), gpu_of("b")];
    cards.sort();
    assert_eq!(cards, [0, 1], "{status:?}");
    assert_eq!(gpu_of("c"), 1);
    assert!(m.sim_cards.iter().all(|c| !c.overcommitted()));
    // Card 0's load ran while card 1 was busy: it started before `c`
    // finished.
    let order: Vec<String> = events
        .drain()
        .await
        .into_iter()
        .filter_map(|e| match e {
            VramEvent::Loading { gpu: 0, model, .. } => Some(format!("loading {model} on 0")),
            VramEvent::Loaded { model, .. } if model == "c" => Some("loaded c".to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(order.len(), 2, "{order:?}");
    assert!(order[0].starts_with("loading"), "{order:?}");
    m.shutdown().await;
}

#[actix_rt::test]
async fn status_unload_and_restricted_models_follow_their_cards() {
    let m = Manager::start(&settings(&two_cards(
        16,
        8,
        &[
            model("asr", "asr", 2, "gpus = [0]"),
            model("tts", "tts", 1, ""),
        ]
        .concat(),
    )))
    .unwrap();
    let vram = m.handle();
    // Card 1 would be the tighter fit; the ASR may only use card 0.
    vram.load("asr").await.unwrap();
    vram.load("tts").await.unwrap();
    let status = vram.status().await.unwrap();
    assert_eq!(status.capacity, 24 * GIB);
    assert_eq!(status.used, 3 * GIB);
    let per_card: Vec<(usize, u64, u64)> = status
        .gpus
        .iter()
        .map(|g| (g.gpu, g.capacity, g.used))
        .collect();
    assert_eq!(per_card, [(0, 16 * GIB, 2 * GIB), (1, 8 * GIB, GIB)]);
    let gpu_of = |id: &str| status.models.iter().find(|e| e.id == id).unwrap().gpu;
    assert_eq!((gpu_of("asr"), gpu_of("tts")), (0, 1));
    // An unload goes to the card that holds the model.
    vram.unload("tts").await.unwrap();
    assert!(m.card_sims[1]["tts"].holding().is_empty());
    assert_eq!(vram.status().await.unwrap().used, 2 * GIB);
    // Too large for every card it may use: exceeds_capacity.
    let m2 = Manager::start(&settings(&two_cards(
        16,
        8,
        &model("big", "llm", 10, "gpus = [1]"),
    )))
    .unwrap();
    let e = m2.handle().load("big").await.unwrap_err();
    assert_eq!(e.code(), "exceeds_capacity");
    m.shutdown().await;
    m2.shutdown().await;
}

#[actix_rt::test]
async fn a_server_is_started_on_the_card_it_was_placed_on() {
    let port = free_port();
    let process = format!(
        "[[models]]\nid = \"llm\"\nkind = \"llm\"\nvram = \"4GiB\"\nbackend = \"process\"\n\
         command = [\"{STAND_IN}\", \"--port\", \"{port}\", \"--name\", \"gpu-{{gpu}}\"]\n\
         ready = \"tcp://127.0.0.1:{port}\"\ngpus = [1]\n"
    );
    let text = format!(
        "[gpu]\nprobe = \"none\"\n[[gpus]]\ndevice = \"GPU-aaaa\"\ntotal = \"16GiB\"\n\
         [[gpus]]\ndevice = \"GPU-bbbb\"\ntotal = \"8GiB\"\n{process}"
    );
    let m = Manager::start(&settings(&text)).unwrap();
    m.handle().load("llm").await.unwrap();
    let pid = m.card_processes[1]["llm"].pids()["llm"];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"CUDA_VISIBLE_DEVICES=GPU-bbbb"),
        "the server sees card 1 only"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.split(|b| *b == 0).any(|v| v == b"gpu-GPU-bbbb"),
        "{{gpu}} in the command is the card's device"
    );
    m.handle().unload("llm").await.unwrap();
    m.shutdown().await;
}

#[actix_rt::test]
async fn a_card_whose_manager_is_gone_leaves_the_others_serving() {
    let m = Manager::start(&settings(&two_cards(
        16,
        8,
        &[
            model("any", "llm", 2, ""),
            model("only-1", "tts", 1, "gpus = [1]"),
        ]
        .concat(),
    )))
    .unwrap();
    // Card 1 (the tighter fit) stops for good.
    m.cards[1].send(vram_manager::StopManager).await.unwrap();
    for _ in 0..100 {
        if !m.cards[1].connected() {
            break;
        }
        actix::clock::sleep(std::time::Duration::from_millis(10)).await;
    }
    let vram = m.handle();
    vram.load("any").await.unwrap();
    let status = vram.status().await.unwrap();
    let any = status.models.iter().find(|e| e.id == "any").unwrap();
    assert_eq!(any.gpu, 0, "placed on the card that answers");
    let e = vram.load("only-1").await.unwrap_err();
    assert_eq!(e.code(), "unavailable", "its only card is gone: {e}");
    m.shutdown().await;
}
