//! The long soak: `cargo run --release --example soak -- --ops 1000000`.
//! Many clients issue random operations against backends that fault at a
//! chosen rate; every invariant is checked after every job. Exits 1 if any
//! invariant was violated.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vram_manager::Order;
use vram_manager::soak::{self, SoakOptions};

/// Soak the manager with faulty backends.
#[derive(Debug, Parser)]
struct Args {
    /// Operations in all.
    #[arg(long, default_value_t = 1_000_000)]
    ops: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Share of backend calls that fault.
    #[arg(long, default_value_t = 0.05)]
    fault_rate: f64,
    /// Seed of choices and faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Backend timeout in milliseconds (injected hangs run into it).
    #[arg(long, default_value_t = 5)]
    timeout_ms: u64,
    /// The eviction order: strict or adaptive.
    #[arg(long, default_value = "strict", value_parser = parse_order)]
    order: Order,
}

fn parse_order(text: &str) -> Result<Order, String> {
    match text {
        "strict" => Ok(Order::Strict),
        "adaptive" => Ok(Order::Adaptive),
        other => Err(format!("{other:?} is not an order; use strict or adaptive")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Injected panics are expected and counted; keep the output readable.
    std::panic::set_hook(Box::new(|_| {}));
    let report = match soak::run(SoakOptions {
        clients: args.clients,
        operations: args.ops,
        fault_rate: args.fault_rate,
        seed: args.seed,
        timeout: Duration::from_millis(args.timeout_ms),
        order: args.order,
        ..SoakOptions::default()
    }) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("operations     {}", report.operations);
    println!("results        {:?}", report.results);
    println!("backend calls  {}", report.backend_calls);
    println!("faults         {}", report.faults);
    println!("restarts       {}", report.restarts);
    println!("checks         {}", report.checks);
    println!("violations     {}", report.violations.len());
    println!("wall time      {:.1} s", report.wall.as_secs_f64());
    match report.peak_rss_kib {
        Some(kib) => println!("peak memory    {:.1} MiB", kib as f64 / 1024.0),
        None => println!("peak memory    unknown"),
    }
    for v in report.violations.iter().take(20) {
        println!("violation: {v}");
    }
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
