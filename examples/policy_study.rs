//! How much each eviction order makes a voice assistant reload, against the
//! exact offline optimum under the same rules:
//! `cargo run --release --example policy_study` (add `--quick` for a short
//! run). Prints a Markdown table per family and card: the mean and worst
//! ratio of bytes loaded (and of load seconds, 0.15 s + size / 2 GiB/s) to
//! the optimum's, for the strict order, LRU within the rules and the
//! adaptive order.

use std::process::ExitCode;

use clap::Parser;
use vram_manager::study::{CARDS_GIB, Family, Policy, row};

/// Compare the eviction orders with the offline optimum.
#[derive(Debug, Parser)]
struct Args {
    /// Fewer and shorter traces (for CI).
    #[arg(long)]
    quick: bool,
    /// Traces per family and card.
    #[arg(long, default_value_t = 12)]
    traces: usize,
    /// Requests per trace.
    #[arg(long, default_value_t = 300)]
    len: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (traces, len) = if args.quick {
        (2, 90)
    } else {
        (args.traces.max(1), args.len.max(1))
    };
    println!(
        "{traces} traces of {len} requests per family and card; ratio to the optimum, mean / worst\n"
    );
    println!(
        "| family | card | strict bytes | lru bytes | adaptive bytes | strict s | lru s | adaptive s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut all = vec![Vec::new(); Policy::ALL.len()];
    let mut refused = 0;
    let mut worst_adaptive: (f64, &str, u64) = (0.0, "", 0);
    for family in Family::ALL {
        for &card in CARDS_GIB {
            let r = row(family, card, traces, len);
            refused += r.refused;
            let cell = |(mean, worst): (f64, f64)| format!("{mean:.2} / {worst:.2}");
            println!(
                "| {} | {} GiB | {} | {} | {} | {} | {} | {} |",
                family.name(),
                card,
                cell(r.bytes[0]),
                cell(r.bytes[1]),
                cell(r.bytes[2]),
                cell(r.seconds[0]),
                cell(r.seconds[1]),
                cell(r.seconds[2]),
            );
            for (p, ratios) in all.iter_mut().enumerate() {
                ratios.push(r.bytes[p].0);
            }
            let adaptive = r.bytes[2].0;
            if family != Family::Uniform && adaptive > worst_adaptive.0 {
                worst_adaptive = (adaptive, family.name(), card);
            }
        }
    }
    println!();
    for (p, policy) in Policy::ALL.into_iter().enumerate() {
        let mean = all[p].iter().sum::<f64>() / all[p].len() as f64;
        println!(
            "{:<9} mean over all families and cards: {mean:.3}x the optimum's bytes",
            policy.name()
        );
    }
    println!(
        "adaptive's worst family x card mean (uniform noise aside): {:.3}x ({}, {} GiB)",
        worst_adaptive.0, worst_adaptive.1, worst_adaptive.2
    );
    println!("refused requests: {refused}");
    if refused > 0 {
        eprintln!(
            "policy_study: a request was refused; the catalog must fit every model beside the ASR"
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
