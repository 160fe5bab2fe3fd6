//! A tour of supervision: load models, crash the TTS backend in the middle
//! of a load, watch it restart, see the ledger reconciled with what the
//! restarted backend holds, and load TTS again.
//!
//! `cargo run --example supervised_restart` exits non-zero if any of that
//! does not happen.

use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use vram_manager::config::Settings;
use vram_manager::{BackendOf, Crash, Load, Manager, ModelState, Status, Subscribe, VramEvent};

const SETTINGS: &str = r#"
[[models]]
id = "whisper-large-v3"
kind = "asr"
vram = "3GiB"
load_ms = 50

[[models]]
id = "kokoro-82m"
kind = "tts"
vram = "1GiB"
load_ms = 400

[[models]]
id = "llama-3.1-8b"
kind = "llm"
vram = "6.5GiB"
load_ms = 100
"#;

/// Prints every event and keeps them for the checks at the end.
struct Printer(Rc<RefCell<Vec<VramEvent>>>);

impl Actor for Printer {
    type Context = Context<Self>;
}

impl Handler<VramEvent> for Printer {
    type Result = ();
    fn handle(&mut self, event: VramEvent, _ctx: &mut Context<Self>) {
        println!(
            "  event: {}",
            serde_json::to_string(&event).unwrap_or_default()
        );
        self.0.borrow_mut().push(event);
    }
}

async fn show(manager: &Manager, title: &str) -> Vec<String> {
    let status = manager.addr.send(Status).await.expect("manager answers");
    println!("{title}: {} of {} bytes used", status.used, status.capacity);
    for m in &status.models {
        println!(
            "  {:<18} {:<4} {:>12} bytes  {:?}",
            m.id, m.kind, m.bytes, m.state
        );
    }
    status.resident()
}

async fn tour() -> Result<(), String> {
    let settings = Settings::parse(SETTINGS).map_err(|e| e.to_string())?;
    let manager = Manager::start(&settings).map_err(|e| e.to_string())?;
    let events = Rc::new(RefCell::new(Vec::new()));
    let printer = Printer(events.clone()).start();
    let mailbox = |e: MailboxError| e.to_string();
    manager
        .addr
        .send(Subscribe(printer.recipient()))
        .await
        .map_err(mailbox)?;

    for id in ["whisper-large-v3", "llama-3.1-8b"] {
        manager
            .addr
            .send(Load::new(id))
            .await
            .map_err(mailbox)?
            .map_err(|e| e.to_string())?;
    }
    show(&manager, "loaded").await;

    println!("loading kokoro-82m (400 ms) and crashing the TTS backend half-way");
    let load = manager.addr.send(Load::new("kokoro-82m"));
    futures::pin_mut!(load);
    let _ = futures::poll!(&mut load); // queue it
    loop {
        let status = manager.addr.send(Status).await.map_err(mailbox)?;
        if status
            .models
            .iter()
            .any(|m| m.id == "kokoro-82m" && m.state == ModelState::Loading)
        {
            break;
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    actix::clock::sleep(Duration::from_millis(150)).await;
    let tts = manager
        .addr
        .send(BackendOf("tts".into()))
        .await
        .map_err(mailbox)?
        .ok_or("no tts backend")?;
    tts.send(Crash::default()).await.map_err(mailbox)?;
    match load.await.map_err(mailbox)? {
        Err(e) => println!(
            "the interrupted load failed as it should: {} ({e})",
            e.code()
        ),
        Ok(_) => return Err("the interrupted load succeeded".into()),
    }

    // Wait for the reconcile the restart queued.
    loop {
        let status = manager.addr.send(Status).await.map_err(mailbox)?;
        if !status.running && status.queued == 0 {
            break;
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let resident = show(&manager, "after the restart").await;
    if resident != ["llama-3.1-8b", "whisper-large-v3"] {
        return Err(format!("ledger not reconciled: {resident:?}"));
    }
    let restarted = events
        .borrow()
        .iter()
        .any(|e| matches!(e, VramEvent::BackendRestarted { kind, .. } if kind == "tts"));
    if !restarted {
        return Err("no backend_restarted event for tts".into());
    }

    println!("loading kokoro-82m again");
    manager
        .addr
        .send(Load::new("kokoro-82m"))
        .await
        .map_err(mailbox)?
        .map_err(|e| e.to_string())?;
    let resident = show(&manager, "reloaded").await;
    if resident != ["kokoro-82m", "llama-3.1-8b", "whisper-large-v3"]
        || manager.sims["tts"].holding() != ["kokoro-82m"]
    {
        return Err(format!("reload did not take: {resident:?}"));
    }
    Ok(())
}

fn main() -> ExitCode {
    // The crash below is a real panic, caught by the backend actor; print
    // it as one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("  panic: {info}")));
    match actix::System::new().block_on(tour()) {
        Ok(()) => {
            println!("supervised restart: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("supervised restart failed: {e}");
            ExitCode::FAILURE
        }
    }
}
