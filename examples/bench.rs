//! The quick bench: every figure of `benches/` in one fast run, each beside
//! its baseline, printed as one JSON object.
//!
//! `cargo run --release --example bench -- --quick --json`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use clap::Parser;
use serde_json::json;
use vram_manager::bench::{self, BareActor};

/// Measure the manager against its baselines.
#[derive(Debug, Parser)]
struct Args {
    /// Fewer samples: the whole run takes well under a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6 * 1000.0).round() / 1000.0
}

async fn measure(quick: bool) -> serde_json::Value {
    let scale = if quick { 1 } else { 5 };

    // Acquire + drop through the manager vs the bare actor: short batches
    // in pairs, the ratio taken within each pair (both batches see the
    // machine in one state; a batch cut by another process's time slice
    // spoils one pair, not the median).
    let manager = bench::manager_with_resident_model().await;
    let bare = BareActor::default().start();
    let per_batch = 200u64;
    let mut pairs = Vec::new();
    for _ in 0..(201 * scale) {
        let ours = bench::acquire_round_trips(&manager.addr, per_batch).await / per_batch as u32;
        let theirs = bench::bare_round_trips(&bare, per_batch).await / per_batch as u32;
        pairs.push((ours, theirs));
    }
    let acquire_ratio = bench::median_ratio(&pairs);
    let acquire = bench::median(&mut pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let baseline = bench::median(&mut pairs.iter().map(|p| p.1).collect::<Vec<_>>());

    // Status while a 10 s load is in flight.
    let slow = bench::slow_load_manager();
    let mut latencies = bench::status_latencies_during_load(&slow, 20_000 * scale).await;
    let status_p50 = bench::percentile(&mut latencies, 50.0);
    let status_p99 = bench::percentile(&mut latencies, 99.0);
    let mut idle = bench::status_latencies_idle(&manager, 20_000 * scale).await;
    let idle_p50 = bench::percentile(&mut idle, 50.0);
    let idle_p99 = bench::percentile(&mut idle, 99.0);

    // Loads that need k evictions, and the same load with none. Each load
    // is paired with bare round trips measured just before it: this VM
    // switches between a fast and a slow mode every few seconds, and a
    // ratio of two figures taken in different modes says nothing.
    let samples = if quick { 300 } else { 1_500 };
    let mut loads = BTreeMap::new();
    let mut ratios = BTreeMap::new();
    let plain = bench::eviction_manager(1);
    let mut pairs = Vec::with_capacity(samples);
    for _ in 0..samples {
        pairs.push(bench::paired(&bare, bench::timed_plain_load(&plain)).await);
    }
    let mut times: Vec<Duration> = pairs.iter().map(|p| p.0).collect();
    loads.insert(0u64, us(bench::median(&mut times)));
    ratios.insert(0u64, bench::median_ratio(&pairs));
    for k in [1u64, 4, 16] {
        let m = bench::eviction_manager(k);
        let mut pairs = Vec::with_capacity(samples);
        for _ in 0..samples {
            pairs.push(bench::paired(&bare, bench::timed_eviction_load(&m, k)).await);
        }
        let mut times: Vec<Duration> = pairs.iter().map(|p| p.0).collect();
        loads.insert(k, us(bench::median(&mut times)));
        ratios.insert(k, bench::median_ratio(&pairs));
    }

    let mut plans = BTreeMap::new();
    for n in [10usize, 100, 1_000, 10_000] {
        let fixture = bench::plan_fixture(n);
        let runs = if n >= 10_000 { 30 * scale } else { 200 * scale };
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            std::hint::black_box(bench::plan_once(&fixture));
            samples.push(started.elapsed());
        }
        plans.insert(n, us(bench::median(&mut samples)));
    }

    let ops_per_sec = bench::throughput(64, 500 * scale).await;

    json!({
        // Acquire + drop against the bare actor's, the median over pairs
        // of batches: the target is at most 2.
        "acquire_ratio": round3(acquire_ratio),
        "acquire_us": us(acquire),
        "bare_acquire_us": us(baseline),
        "status_p50_us": us(status_p50),
        "status_p99_us": us(status_p99),
        "status_idle_p50_us": us(idle_p50),
        "status_idle_p99_us": us(idle_p99),
        "plan_10_us": plans[&10],
        "plan_100_us": plans[&100],
        "plan_1k_us": plans[&1_000],
        "plan_10k_us": plans[&10_000],
        "load_k0_us": loads[&0],
        "load_k1_us": loads[&1],
        "load_k4_us": loads[&4],
        "load_k16_us": loads[&16],
        // A load with k evictions against one bare actix round trip taken
        // just before it, the median over the pairs: the target is at most
        // 1.5 x (k + 2).
        "load_k0_ratio": round3(ratios[&0]),
        "load_k1_ratio": round3(ratios[&1]),
        "load_k4_ratio": round3(ratios[&4]),
        "load_k16_ratio": round3(ratios[&16]),
        "ops_per_sec": ops_per_sec.round(),
    })
}

fn main() {
    let args = Args::parse();
    let figures = actix::System::new().block_on(measure(args.quick));
    if args.json {
        println!("{figures}");
    } else {
        for (key, value) in figures.as_object().into_iter().flatten() {
            println!("{key:<18} {value}");
        }
    }
}
