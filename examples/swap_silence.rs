//! How much silence the swaps of a voice-assistant day cost, and what
//! warming and parking save: `cargo run --release --example swap_silence`
//! (add `--quick` for a short day).
//!
//! A generated day on a 16 GiB card (whisper 3 GiB, kokoro 1 GiB, an 8B
//! LLM of 6.5 GiB, a 14B of 12.5 GiB the user switches to now and then, a
//! 3 GiB tool-call LLM in a share of turns), each stage acquiring its model
//! and releasing it, runs on the simulated backends on a virtual clock
//! (tokio's paused time: every wait is exact and instant) with
//!
//! - a cold load: 0.2 s + size / 2 GiB/s; a warm one (files in the page
//!   cache): size / 20 GiB/s;
//! - a sleep (park): 0.1 s + size / 25 GiB/s; a wake: 0.3 s + size /
//!   25 GiB/s; the LLMs park keeping 512 MiB on the card;
//! - memory back on the card 100 ms after an unload,
//!
//! under four setups: stop-only with every load cold; warming (weights read
//! ahead while the victims leave, and a 24 GiB page cache keeping recently
//! read models); parking (a 32 GiB host budget); both. It prints the total
//! seconds requests waited for a model. Then it runs the same day in real
//! time with instant backends: each swap's wall time there is the manager's
//! own overhead (no backend time to subtract), printed as p50 / p99.

use std::process::ExitCode;

use clap::Parser;
use vram_manager::scenario::{self, Scenario};

const GIB: f64 = (1u64 << 30) as f64;

/// Measure the silence of a voice-assistant day's swaps.
#[derive(Debug, Parser)]
struct Args {
    /// A short day (for CI).
    #[arg(long)]
    quick: bool,
    /// Turns in the day.
    #[arg(long, default_value_t = 300)]
    turns: usize,
    /// Seed of the day.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// (id, kind, GiB, parks)
const MODELS: &[(&str, &str, f64, bool)] = &[
    ("whisper-large-v3", "asr", 3.0, false),
    ("kokoro-82m", "tts", 1.0, false),
    ("llama-3.1-8b", "llm", 6.5, true),
    ("qwen2.5-14b", "llm", 12.5, true),
    ("tool-3b", "llm", 3.0, true),
];

#[derive(Debug, Clone, Copy, PartialEq)]
struct Setup {
    name: &'static str,
    warm: bool,
    park: bool,
    /// Instant backends (the overhead run).
    instant: bool,
}

fn ms(seconds: f64) -> u64 {
    (seconds * 1000.0).round() as u64
}

/// The scenario's settings for `setup`.
fn settings(setup: Setup) -> String {
    let mut text = String::from("[gpu]\ntotal = \"16GiB\"\n[host]\n");
    text.push_str(if setup.park {
        "budget = \"32GiB\"\n"
    } else {
        "budget = \"0B\"\n"
    });
    text.push_str(if setup.warm {
        "keep_warm = \"24GiB\"\n"
    } else {
        "keep_warm = \"0B\"\n"
    });
    for &(id, kind, gib, parks) in MODELS {
        let bytes = gib * GIB;
        let (cold, warm) = if setup.instant {
            (0, 0)
        } else {
            (ms(0.2 + bytes / (2.0 * GIB)), ms(bytes / (20.0 * GIB)))
        };
        text.push_str(&format!(
            "[[models]]\nid = \"{id}\"\nkind = \"{kind}\"\nvram = \"{gib}GiB\"\nload_ms = {cold}\nrelease_ms = {}\n",
            if setup.instant { 0 } else { 100 }
        ));
        if setup.warm {
            text.push_str(&format!("warm_load_ms = {warm}\n"));
        }
        if parks && setup.park {
            let (sleep, wake) = if setup.instant {
                (0, 0)
            } else {
                (
                    ms(0.1 + bytes / (25.0 * GIB)),
                    ms(0.3 + bytes / (25.0 * GIB)),
                )
            };
            text.push_str(&format!(
                "[models.park]\nvram = \"512MiB\"\nhost = \"{gib}GiB\"\nsleep_ms = {sleep}\nwake_ms = {wake}\n"
            ));
        }
    }
    text
}

/// The day's requests, in order: the model each stage acquires.
fn day(turns: usize, seed: u64) -> Vec<&'static str> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut main = "llama-3.1-8b";
    let mut out = Vec::with_capacity(turns * 4);
    for _ in 0..turns {
        // Now and then the user switches LLMs.
        if rng.f64() < 0.1 {
            main = if main == "llama-3.1-8b" {
                "qwen2.5-14b"
            } else {
                "llama-3.1-8b"
            };
        }
        out.push("whisper-large-v3");
        out.push(main);
        if rng.f64() < 0.3 {
            out.push("tool-3b");
            out.push(main);
        }
        out.push("kokoro-82m");
    }
    out
}

/// The day as scenario steps: acquire, then release, per request.
fn steps(requests: &[&str]) -> String {
    let mut text = String::new();
    for (i, model) in requests.iter().enumerate() {
        text.push_str(&format!(
            "[[steps]]\nop = \"acquire\"\nmodel = \"{model}\"\nlease = \"r{i}\"\n[[steps]]\nop = \"release\"\nlease = \"r{i}\"\n"
        ));
    }
    text
}

/// Runs the day under `setup`: (seconds waited, swaps, each swap's ms).
fn run(setup: Setup, requests: &[&str]) -> Result<(f64, usize, Vec<f64>), String> {
    let text = format!(
        "description = \"{}\"\n{}{}",
        setup.name,
        settings(setup),
        steps(requests)
    );
    let scenario = Scenario::parse(setup.name, &text).map_err(|e| e.to_string())?;
    let mut waited = 0.0;
    let mut swaps = Vec::new();
    let mut failed = 0;
    let mut on_step = |step: &scenario::StepReport| {
        if step.op == "acquire" {
            waited += step.ms / 1000.0;
            if !step.evicted.is_empty() {
                swaps.push(step.ms);
            }
        }
        if step.result != "ok" {
            eprintln!(
                "{}: step {} {} {}: {}",
                setup.name,
                step.step,
                step.op,
                step.model.as_deref().unwrap_or("-"),
                step.result
            );
            failed += 1;
        }
    };
    if setup.instant {
        scenario::run(&scenario, &mut on_step).map_err(|e| e.to_string())?;
    } else {
        scenario::run_paused(&scenario, &mut on_step).map_err(|e| e.to_string())?;
    }
    if failed > 0 {
        return Err(format!("{}: {failed} requests failed", setup.name));
    }
    Ok((waited, swaps.len(), swaps))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let turns = if args.quick { 30 } else { args.turns.max(1) };
    let requests = day(turns, args.seed);
    println!(
        "a voice-assistant day: {turns} turns, {} requests (seed {})",
        requests.len(),
        args.seed
    );
    println!("| setup | seconds waiting for a model | swaps | vs stop-only |");
    println!("|---|---|---|---|");
    let setups = [
        ("stop-only, cold", false, false),
        ("warming", true, false),
        ("parking", false, true),
        ("warming + parking", true, true),
    ];
    let mut baseline = None;
    for (name, warm, park) in setups {
        let setup = Setup {
            name,
            warm,
            park,
            instant: false,
        };
        match run(setup, &requests) {
            Ok((waited, swaps, _)) => {
                let base = *baseline.get_or_insert(waited);
                println!(
                    "| {name} | {waited:.1} | {swaps} | {:.2}x |",
                    if base > 0.0 { waited / base } else { 1.0 }
                );
            }
            Err(e) => {
                eprintln!("swap_silence: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The manager's own cost on a swap: the same day with instant
    // backends, in real time.
    let overhead = Setup {
        name: "overhead",
        warm: false,
        park: true,
        instant: true,
    };
    match run(overhead, &requests) {
        Ok((_, swaps, mut times)) => {
            times.sort_by(f64::total_cmp);
            println!(
                "manager overhead per swap (instant backends, {swaps} swaps): p50 {:.3} ms, p99 {:.3} ms",
                percentile(&times, 50.0),
                percentile(&times, 99.0)
            );
        }
        Err(e) => {
            eprintln!("swap_silence: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
