//! A voice assistant embedding vram-manager the way an actix application
//! would: each turn goes ASR -> LLM -> TTS, and each stage holds a `Lease`
//! on its model while it works, so nothing it uses can be evicted under it.
//! Half-way, the user switches to a bigger LLM; the TTS model is evicted to
//! make room and comes back when the assistant next speaks. Every event is
//! printed as it happens.
//!
//! `cargo run --example voice_assistant` exits 0 only if every turn
//! completed.

use std::process::ExitCode;
use std::time::Duration;

use actix::prelude::*;
use vram_manager::config::Settings;
use vram_manager::{Acquire, Load, Manager, Status, Subscribe, VramActor, VramError, VramEvent};

/// Scaled-down load times so the tour takes a couple of seconds.
const SETTINGS: &str = r#"
[gpu]
total = "16GiB"

[[models]]
id = "whisper-large-v3"
kind = "asr"
vram = "3GiB"
load_ms = 150

[[models]]
id = "kokoro-82m"
kind = "tts"
vram = "1GiB"
load_ms = 50

[[models]]
id = "llama-3.1-8b"
kind = "llm"
vram = "6.5GiB"
load_ms = 250

[[models]]
id = "qwen2.5-14b"
kind = "llm"
vram = "12.5GiB"
load_ms = 400
"#;

/// Why a turn failed.
#[derive(Debug, thiserror::Error)]
enum TurnError {
    #[error("{0} ({code})", code = .0.code())]
    Vram(VramError),
    #[error("a stage stopped answering: {0}")]
    Mailbox(MailboxError),
}

impl From<VramError> for TurnError {
    fn from(e: VramError) -> Self {
        Self::Vram(e)
    }
}

impl From<MailboxError> for TurnError {
    fn from(e: MailboxError) -> Self {
        Self::Mailbox(e)
    }
}

/// One stage of the pipeline: holds a lease on its model while it works.
struct Stage {
    name: &'static str,
    manager: Addr<VramActor>,
}

impl Actor for Stage {
    type Context = Context<Self>;
}

/// Work for a stage: run `model` over `input`.
#[derive(Message)]
#[rtype(result = "Result<String, TurnError>")]
struct Work {
    model: String,
    input: String,
}

impl Handler<Work> for Stage {
    type Result = ResponseFuture<Result<String, TurnError>>;

    fn handle(&mut self, work: Work, _ctx: &mut Context<Self>) -> Self::Result {
        let (manager, name) = (self.manager.clone(), self.name);
        Box::pin(async move {
            let lease = manager.send(Acquire::new(&work.model)).await??;
            // The model cannot be evicted while `lease` lives.
            actix::clock::sleep(Duration::from_millis(30)).await;
            let output = format!("{name}({})", work.input);
            drop(lease);
            Ok(output)
        })
    }
}

/// Prints every event as it happens.
struct Printer;

impl Actor for Printer {
    type Context = Context<Self>;
}

impl Handler<VramEvent> for Printer {
    type Result = ();
    fn handle(&mut self, event: VramEvent, _ctx: &mut Context<Self>) {
        let line = match &event {
            VramEvent::Loading { model, victims, .. } if victims.is_empty() => {
                format!("loading {model}")
            }
            VramEvent::Loading { model, victims, .. } => {
                format!("loading {model}, evicting {}", victims.join(", "))
            }
            VramEvent::Loaded { model, bytes, .. } => format!("loaded {model} ({bytes} bytes)"),
            VramEvent::Evicted {
                model, for_model, ..
            } => format!("evicted {model} for {for_model}"),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        println!("    [vram] {line}");
    }
}

async fn turn(
    n: usize,
    llm: &str,
    stages: &(Addr<Stage>, Addr<Stage>, Addr<Stage>),
) -> Result<String, TurnError> {
    println!("turn {n} (LLM {llm})");
    let heard = stages
        .0
        .send(Work {
            model: "whisper-large-v3".into(),
            input: format!("audio{n}"),
        })
        .await??;
    let answer = stages
        .1
        .send(Work {
            model: llm.into(),
            input: heard,
        })
        .await??;
    let spoken = stages
        .2
        .send(Work {
            model: "kokoro-82m".into(),
            input: answer,
        })
        .await??;
    println!("  -> {spoken}");
    Ok(spoken)
}

async fn run() -> Result<usize, String> {
    let settings = Settings::parse(SETTINGS).map_err(|e| e.to_string())?;
    let manager = Manager::start(&settings).map_err(|e| e.to_string())?;
    let addr = manager.addr.clone();
    addr.send(Subscribe(Printer.start().recipient()))
        .await
        .map_err(|e| e.to_string())?;
    let stages = (
        Stage {
            name: "asr",
            manager: addr.clone(),
        }
        .start(),
        Stage {
            name: "llm",
            manager: addr.clone(),
        }
        .start(),
        Stage {
            name: "tts",
            manager: addr.clone(),
        }
        .start(),
    );
    let plan = [
        "llama-3.1-8b",
        "llama-3.1-8b",
        "qwen2.5-14b", // the user asks for the bigger model
        "qwen2.5-14b",
        "llama-3.1-8b", // and goes back
    ];
    let mut completed = 0;
    for (i, llm) in plan.iter().enumerate() {
        if i == 2 {
            println!("user: switch to the 14B model");
            let loaded = addr
                .send(Load::new("qwen2.5-14b"))
                .await
                .map_err(|e| e.to_string())?;
            let loaded = loaded.map_err(|e| e.to_string())?;
            println!("  evicted for it: {:?}", loaded.evicted);
        }
        match turn(i + 1, llm, &stages).await {
            Ok(_) => completed += 1,
            Err(e) => println!("  turn {} failed: {e}", i + 1),
        }
    }
    let status = addr.send(Status).await.map_err(|e| e.to_string())?;
    println!(
        "resident at the end: {:?} ({} of {} bytes)",
        status.resident(),
        status.used,
        status.capacity
    );
    if !status.resident().contains(&"whisper-large-v3".to_string()) {
        return Err("ASR left the card".into());
    }
    Ok(completed)
}

fn main() -> ExitCode {
    // A program that runs process-backed models keeps their process trees
    // from its own executable (a no-op for this simulated card).
    vram_manager::keeper::run_if_keeper();
    let turns = 5;
    match actix::System::new().block_on(run()) {
        Ok(completed) if completed == turns => {
            println!("{completed} of {turns} turns completed");
            ExitCode::SUCCESS
        }
        Ok(completed) => {
            eprintln!("only {completed} of {turns} turns completed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("voice assistant failed: {e}");
            ExitCode::FAILURE
        }
    }
}
