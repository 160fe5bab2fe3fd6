//! What each subcommand of the `vram-manager` command does, as functions
//! that answer an [`Outcome`] instead of exiting, so they can be tested.

use std::fmt::Write as _;
use std::path::Path;

use bytesize::ByteSize;

use crate::config::{BackendSpec, GpuTotal, ProbeChoice, Settings};

/// How a subcommand ended; the binary maps it to an exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything held (exit 0).
    Ok,
    /// It ran, but an expectation did not hold (exit 1).
    Failed(String),
    /// The input was invalid; nothing ran (exit 2).
    BadInput(String),
}

/// `check-config [FILE]`: validates the layered settings and prints them.
pub fn check_config(file: Option<&Path>) -> Outcome {
    match Settings::load(file) {
        Ok(settings) => {
            print!("{}", describe_settings(&settings));
            for warning in settings_warnings(&settings) {
                eprintln!("warning: {warning}");
            }
            Outcome::Ok
        }
        Err(e) => Outcome::BadInput(e.to_string()),
    }
}

/// A human summary of effective settings: capacity, kinds, models.
pub fn describe_settings(settings: &Settings) -> String {
    let mut out = String::new();
    let gpu = &settings.gpu;
    let probe = match gpu.probe {
        ProbeChoice::Auto => "auto",
        ProbeChoice::Nvml => "nvml",
        ProbeChoice::None => "none",
    };
    let total = match gpu.total {
        GpuTotal::Bytes(b) => format!("{} ({b} bytes)", ByteSize(b)),
        GpuTotal::Auto => "auto (the card's own total)".to_string(),
    };
    let _ = writeln!(out, "gpu: probe {probe}, device {}", gpu.device);
    let _ = writeln!(out, "  total    {total}");
    let _ = writeln!(
        out,
        "  reserve  {} ({} bytes)",
        ByteSize(gpu.reserve),
        gpu.reserve
    );
    match settings.capacity() {
        Some(c) => {
            let _ = writeln!(out, "  capacity {} ({c} bytes)", ByteSize(c));
        }
        None => {
            let _ = writeln!(out, "  capacity the card's total less the reserve");
        }
    }
    let p = &settings.policy;
    let _ = writeln!(
        out,
        "policy: lease_wait {}, load_timeout {}, unload_timeout {}, max_queue {}",
        humantime::format_duration(p.lease_wait),
        humantime::format_duration(p.load_timeout),
        humantime::format_duration(p.unload_timeout),
        p.max_queue
    );
    let mut kinds: Vec<_> = settings.kinds.iter().collect();
    kinds.sort_by_key(|k| (k.priority, k.name.clone()));
    let _ = writeln!(out, "kinds (evicted first to last):");
    for kind in kinds {
        let protected = if kind.protected { "  protected" } else { "" };
        let _ = writeln!(
            out,
            "  {:<8} priority {}{protected}",
            kind.name, kind.priority
        );
    }
    let _ = writeln!(out, "models: {}", settings.models.len());
    for m in &settings.models {
        let backend = match &m.backend {
            BackendSpec::Sim(_) => "sim",
        };
        let pinned = if m.spec.pinned { "  pinned" } else { "" };
        let _ = writeln!(
            out,
            "  {:<24} {:<5} {:>10}  {backend}{pinned}",
            m.spec.id,
            m.spec.kind,
            ByteSize(m.spec.bytes).to_string()
        );
    }
    out
}

/// Legal settings that are probably a mistake.
pub fn settings_warnings(settings: &Settings) -> Vec<String> {
    let Some(capacity) = settings.capacity() else {
        return vec![];
    };
    settings
        .models
        .iter()
        .filter(|m| m.spec.bytes > capacity)
        .map(|m| {
            format!(
                "model {:?} ({}) is larger than the card's capacity ({}); loading it will fail with exceeds_capacity",
                m.spec.id,
                ByteSize(m.spec.bytes),
                ByteSize(capacity)
            )
        })
        .collect()
}
