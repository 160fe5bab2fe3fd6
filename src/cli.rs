//! What each subcommand of the `vram-manager` command does, as functions
//! that answer an [`Outcome`] instead of exiting, so they can be tested.

use std::fmt::Write as _;
use std::path::Path;

use bytesize::ByteSize;

use vram_manager::config::{BackendSpec, GpuTotal, ProbeChoice, Settings};
use vram_manager::gpu;
use vram_manager::scenario::{self, Scenario, StepReport};

/// `writeln!` into a `String` (which cannot fail), as a statement.
macro_rules! out {
    ($text:expr, $($arg:tt)*) => {{
        let _ = writeln!($text, $($arg)*);
    }};
}

/// How a subcommand ended; the binary maps it to an exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything held (exit 0).
    Ok,
    /// It ran, but an expectation did not hold (exit 1).
    Failed(String),
    /// The input was invalid; nothing ran (exit 2).
    BadInput(String),
    /// A signal (SIGINT 2, SIGTERM 15, SIGHUP 1) stopped the run after every model
    /// server was stopped (exit 128 + the signal: 130, 143, 129).
    Interrupted(i32),
}

/// `check-config [FILE]`: validates the layered settings, resolves the
/// card (NVML when asked for), and prints them. A scenario file is read as
/// `scenario` reads it (its settings and every step).
pub fn check_config(file: Option<&Path>) -> Outcome {
    let scenario_file = match file.map(is_scenario).transpose() {
        Ok(found) => found.unwrap_or(false),
        Err(e) => return Outcome::BadInput(e.to_string()),
    };
    let (settings, steps) = if let (true, Some(path)) = (scenario_file, file) {
        match Scenario::load(path) {
            Ok(scenario) => (scenario.settings, Some(scenario.steps.len())),
            Err(e) => return Outcome::BadInput(e.to_string()),
        }
    } else {
        match Settings::load(file) {
            Ok(settings) => (settings, None),
            Err(e) => return Outcome::BadInput(e.to_string()),
        }
    };
    // Each card as the manager will see it: asked (NVML, or its fallback)
    // only where the manager asks it.
    let mut choices = Vec::with_capacity(settings.gpus.len());
    for index in 0..settings.gpus.len() {
        if !gpu::asks_the_card(&settings, index) {
            choices.push(None);
            continue;
        }
        match gpu::resolve_card(&settings, index) {
            Ok(choice) => choices.push(Some(choice)),
            Err(e) => return Outcome::BadInput(e.to_string()),
        }
    }
    let mut text = describe_settings(&settings);
    for (index, choice) in choices.iter().enumerate() {
        let name = if choices.len() == 1 {
            "card".to_string()
        } else {
            format!("card {index}")
        };
        let Some(choice) = choice else {
            let capacity = settings.gpus[index].capacity().unwrap_or(0);
            out!(
                text,
                "{name}: simulated (every model on it is simulated: the real card is not asked); capacity {} ({} bytes)",
                ByteSize(capacity),
                capacity
            );
            continue;
        };
        match &choice.fallback {
            Some(reason) => out!(
                text,
                "{name}: not asked ({reason}); capacity {} ({} bytes)",
                ByteSize(choice.capacity),
                choice.capacity
            ),
            None => out!(
                text,
                "{name}: NVML device {}; capacity {} ({} bytes)",
                settings.gpus[index].device,
                ByteSize(choice.capacity),
                choice.capacity
            ),
        }
    }
    if let Some(steps) = steps {
        out!(text, "scenario: {steps} steps, all valid");
    }
    for warning in settings_warnings(&settings) {
        say!("warning: {warning}");
    }
    emit(&text)
}

/// Whether the file at `path` is a scenario (it has `steps` or a
/// `description`), so `check-config` reads it as one.
fn is_scenario(path: &Path) -> Result<bool, vram_manager::config::SettingsError> {
    let text = vram_manager::config::read_file(path)?;
    Ok(scenario::looks_like_scenario(&text))
}

/// `gpu [--json]`: what NVML sees, or plainly that there is no NVIDIA
/// driver and what the manager will use instead. Exit 0 either way.
pub fn gpu_report(json: bool) -> Outcome {
    let settings = match Settings::load(None) {
        Ok(settings) => settings,
        Err(e) => return Outcome::BadInput(e.to_string()),
    };
    let mut text = String::new();
    match gpu::NvmlProbe::open(&settings.gpu.device).and_then(|p| p.devices()) {
        Ok(devices) => {
            if json {
                let value = serde_json::json!({"nvml": true, "devices": devices});
                out!(text, "{value}");
            } else {
                for d in &devices {
                    out!(text, "GPU {}: {} ({})", d.index, d.name, d.uuid);
                    out!(
                        text,
                        "  total {} ({} bytes), used {} ({} bytes), free {} ({} bytes)",
                        ByteSize(d.total),
                        d.total,
                        ByteSize(d.used),
                        d.used,
                        ByteSize(d.free),
                        d.free
                    );
                    for p in &d.processes {
                        match p.used {
                            Some(b) => {
                                out!(text, "  process {}: {} ({b} bytes)", p.pid, ByteSize(b))
                            }
                            None => out!(text, "  process {}: memory not reported", p.pid),
                        }
                    }
                }
            }
        }
        Err(e) => {
            let total = match settings.gpu.total {
                GpuTotal::Bytes(b) => Some(b),
                GpuTotal::Auto => None,
            };
            let capacity = settings.capacity();
            if json {
                let value = serde_json::json!({
                    "nvml": false,
                    "reason": e.to_string(),
                    "fallback": {"total": total, "reserve": settings.gpu.reserve, "capacity": capacity},
                });
                out!(text, "{value}");
            } else {
                out!(text, "No NVIDIA driver found ({e}).");
                match (total, capacity) {
                    (Some(total), Some(capacity)) => out!(
                        text,
                        "vram-manager will use the configured gpu.total instead: {} ({total} bytes), less a reserve of {}: capacity {} ({capacity} bytes).",
                        ByteSize(total),
                        ByteSize(settings.gpu.reserve),
                        ByteSize(capacity)
                    ),
                    _ => out!(
                        text,
                        "gpu.total is \"auto\", which needs NVML: set a size such as \"16GiB\"."
                    ),
                }
            }
        }
    }
    emit(&text)
}

/// Writes a command's whole output: a reader that has gone (`| head`) is
/// not an error; any other failure to write is (exit 1, saying why).
fn emit(text: &str) -> Outcome {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Outcome::Failed(format!("cannot write the output: {e}"))
        }
        _ => Outcome::Ok,
    }
}

/// `serve [FILE] [--listen ADDR]`: validates the settings, serves until a
/// signal, stops every model server.
pub fn serve(file: Option<&Path>, listen: Option<std::net::SocketAddr>) -> Outcome {
    let settings = match Settings::load(file) {
        Ok(settings) => settings,
        Err(e) => return Outcome::BadInput(e.to_string()),
    };
    match vram_manager::serve::run(&settings, listen) {
        Ok(signal) => Outcome::Interrupted(signal),
        Err(vram_manager::serve::ServeError::Invalid { key, message }) => {
            Outcome::BadInput(format!("{key}: {message}"))
        }
        Err(e) => Outcome::Failed(e.to_string()),
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
    if settings.gpus.len() > 1 {
        let _ = writeln!(out, "gpu: probe {probe}");
        let _ = writeln!(out, "gpus: {} cards ([[gpus]])", settings.gpus.len());
        for (i, card) in settings.gpus.iter().enumerate() {
            let total = match card.total {
                GpuTotal::Bytes(b) => format!("{} ({b} bytes)", ByteSize(b)),
                GpuTotal::Auto => "auto".to_string(),
            };
            let _ = writeln!(
                out,
                "  gpu {i}: device {}, total {total}, reserve {}",
                card.device,
                ByteSize(card.reserve)
            );
        }
    } else {
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
    }
    let p = &settings.policy;
    let _ = writeln!(
        out,
        "policy: order {}, lease_wait {}, load_timeout {}, unload_timeout {}, max_queue {}",
        p.order.as_str(),
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
            BackendSpec::Process(_) => "process",
        };
        let pinned = if m.spec.pinned { "  pinned" } else { "" };
        let cards = m.gpus.as_ref().map_or(String::new(), |g| {
            let list: Vec<String> = g.iter().map(ToString::to_string).collect();
            format!("  gpus {}", list.join(", "))
        });
        let _ = writeln!(
            out,
            "  {:<24} {:<5} {:>10}  {backend}{pinned}{cards}",
            m.spec.id,
            m.spec.kind,
            ByteSize(m.spec.bytes).to_string()
        );
    }
    out
}

/// Legal settings that are probably a mistake.
pub fn settings_warnings(settings: &Settings) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(capacity) = settings.capacity() {
        warnings.extend(settings.models.iter().filter(|m| m.spec.bytes > capacity).map(|m| {
            format!(
                "model {:?} ({}) is larger than the card's capacity ({}); loading it will fail with exceeds_capacity",
                m.spec.id,
                ByteSize(m.spec.bytes),
                ByteSize(capacity)
            )
        }));
    }
    // A working directory may exist only where the config is deployed, so
    // its absence here is a warning; a load names it if it is still absent.
    for (i, model) in settings.models.iter().enumerate() {
        if let BackendSpec::Process(spec) = &model.backend
            && let Some(cwd) = &spec.cwd
            && !cwd.is_dir()
        {
            warnings.push(format!(
                "models[{i}].cwd: {:?} is not a directory here; loading {:?} will fail until it is",
                cwd.display().to_string(),
                model.spec.id
            ));
        }
    }
    warnings
}

/// `scenario [FILE] [--json] [--plot OUT.svg]`: runs a scenario file (the
/// built-in voice-assistant day when no file is given), reports every step
/// and optionally draws the run.
pub fn scenario(file: Option<&Path>, json: bool, plot: Option<&Path>) -> Outcome {
    let parsed = match file {
        Some(path) => Scenario::load(path),
        None => Scenario::parse("voice-assistant.toml (built in)", scenario::VOICE_ASSISTANT),
    };
    let scenario = match parsed {
        Ok(s) => s,
        Err(e) => return Outcome::BadInput(e.to_string()),
    };
    let capacities = scenario.capacities();
    let capacity = capacities
        .iter()
        .fold(0u64, |sum, c| sum.saturating_add(*c));
    let cards = scenario.settings.gpus.len();
    let simulated_card = scenario
        .settings
        .models
        .iter()
        .all(|m| matches!(m.backend, BackendSpec::Sim(_)));
    let name = file.map_or("voice-assistant.toml (built in)".to_string(), |p| {
        p.display().to_string()
    });
    let mut out = Output::stdout();
    if !json {
        out.line(format_args!("{name}: {}", scenario.description));
        if cards > 1 {
            let each: Vec<String> = capacities
                .iter()
                .enumerate()
                .map(|(i, c)| format!("gpu {i} {}", ByteSize(*c)))
                .collect();
            out.line(format_args!(
                "capacity {} ({capacity} bytes) on {cards} cards: {}",
                ByteSize(capacity),
                each.join(", ")
            ));
        } else {
            out.line(format_args!(
                "capacity {} ({capacity} bytes)",
                ByteSize(capacity)
            ));
        }
    }
    let mut text = Vec::new();
    let report = scenario::run_streaming(&scenario, plot.is_some(), |step| {
        text.clear();
        if json {
            // A StepReport always serialises (strings and numbers only).
            let _ = serde_json::to_writer(&mut text, step);
            text.push(b'\n');
        } else {
            text.extend_from_slice(timeline_line(step, capacity, simulated_card).as_bytes());
        }
        out.step(&text)
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => return Outcome::BadInput(e.to_string()),
    };
    if let Some(signal) = report.interrupted {
        out.finish();
        return Outcome::Interrupted(signal);
    }
    let failed = report.failed();
    if json {
        let summary = Summary {
            summary: SummaryCounts {
                steps: report.count,
                failed,
                peak: report.peak,
                overcommitted: report.overcommitted,
                external_peak: report.external_peak,
            },
        };
        out.line(format_args!(
            "{}",
            serde_json::to_string(&summary).unwrap_or_default()
        ));
    } else {
        out.line(format_args!(
            "{} steps, {failed} failed; card peak {}, {}",
            report.count,
            ByteSize(report.peak),
            if report.overcommitted {
                "OVERCOMMITTED"
            } else {
                "never over-committed"
            }
        ));
    }
    out.finish();
    if let Some(e) = out.failure() {
        return Outcome::Failed(format!("cannot write the output: {e}"));
    }
    if plot.is_some() && report.stopped {
        say!("warning: the output was closed before the last step; no plot was drawn");
    }
    if let Some(path) = plot
        && !report.stopped
    {
        let title = format!("{name}: {}", scenario.description);
        if let Err(e) = crate::plot::draw(&report, &scenario.settings, &title, path) {
            return Outcome::BadInput(e.to_string());
        }
    }
    if failed == 0 {
        return Outcome::Ok;
    }
    let messages: Vec<String> = report
        .failures
        .iter()
        .map(|s| {
            format!(
                "step {} ({} {}): {}",
                s.step,
                s.op,
                s.model.as_deref().unwrap_or(""),
                s.failures.join("; ")
            )
        })
        .collect();
    Outcome::Failed(messages.join("\n"))
}

/// Standard output as a Unix tool writes it: buffered, flushed after each
/// step only when a person watches (a terminal), and a closed pipe (`|
/// head`) ends the output quietly instead of failing. (Dropping it flushes
/// what is left and ignores a failure, as `BufWriter` does.)
pub struct Output {
    inner: std::io::BufWriter<std::io::Stdout>,
    terminal: bool,
    closed: bool,
    /// A failure to write other than a closed pipe (a full disk, an I/O
    /// error): the run reports it.
    failed: Option<std::io::Error>,
}

impl Output {
    /// Standard output.
    pub fn stdout() -> Self {
        use std::io::IsTerminal as _;
        let stdout = std::io::stdout();
        Self {
            terminal: stdout.is_terminal(),
            inner: std::io::BufWriter::with_capacity(64 * 1024, stdout),
            closed: false,
            failed: None,
        }
    }

    /// Writes one step's text; `Break` once the reader has gone.
    pub fn step(&mut self, text: &[u8]) -> std::ops::ControlFlow<()> {
        use std::io::Write as _;
        if self.closed {
            return std::ops::ControlFlow::Break(());
        }
        let written = self.inner.write_all(text).and_then(|()| {
            if self.terminal {
                self.inner.flush()
            } else {
                Ok(())
            }
        });
        self.note(written);
        if self.closed {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    }

    /// Writes one line.
    pub fn line(&mut self, line: std::fmt::Arguments<'_>) {
        use std::io::Write as _;
        if !self.closed {
            let written = writeln!(self.inner, "{line}");
            self.note(written);
        }
    }

    /// Flushes what is left.
    pub fn finish(&mut self) {
        use std::io::Write as _;
        if !self.closed {
            let flushed = self.inner.flush();
            self.note(flushed);
        }
    }

    /// The failure to write, other than a closed pipe, if there was one.
    pub fn failure(&mut self) -> Option<std::io::Error> {
        self.failed.take()
    }

    /// A write error stops the writing: a closed pipe quietly (the reader
    /// has what it wanted), anything else is kept for the run to report.
    fn note(&mut self, result: std::io::Result<()>) {
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                self.failed = Some(e);
            }
            self.closed = true;
        }
    }
}

/// The last JSON line of a scenario run:
/// `{"summary":{"steps":N,"failed":N,"peak":N,"overcommitted":B,"external_peak":N}}`.
#[derive(serde::Serialize)]
struct Summary {
    summary: SummaryCounts,
}

#[derive(serde::Serialize)]
struct SummaryCounts {
    steps: usize,
    failed: usize,
    peak: u64,
    overcommitted: bool,
    external_peak: u64,
}

/// Width of the used/free bar in the timeline, in cells.
const BAR_CELLS: u64 = 24;

/// One readable line per step: result, evictions, a bar of used and free
/// VRAM (and the simulated card's free memory where it differs, when the
/// scenario runs on it); and a line per expectation that did not hold.
pub fn timeline_line(step: &StepReport, capacity: u64, simulated_card: bool) -> String {
    let filled = if capacity == 0 {
        0
    } else {
        ((step.used as u128 * BAR_CELLS as u128 + capacity as u128 / 2) / capacity as u128)
            .min(BAR_CELLS as u128) as usize
    };
    let bar = format!(
        "{}{}",
        "█".repeat(filled),
        "░".repeat(BAR_CELLS as usize - filled)
    );
    let mark = if step.failures.is_empty() { " " } else { "✗" };
    let mut line = format!(
        "{mark}{:>3}  {:<8} {:<26} {:<18} {bar} {:>9} used {:>9} free  {:>8.1} ms",
        step.step,
        step.op,
        step.model.as_deref().unwrap_or("-"),
        step.result,
        ByteSize(step.used).to_string(),
        ByteSize(step.free).to_string(),
        step.ms
    );
    if simulated_card && step.card_free != step.free {
        line.push_str(&format!("  card {} free", ByteSize(step.card_free)));
    }
    // With several cards: the card the step's model is on.
    if step.gpus.len() > 1
        && let Some(gpu) = step.gpu
    {
        line.push_str(&format!("  gpu {gpu}"));
    }
    if !step.evicted.is_empty() {
        line.push_str(&format!("  evicted {}", step.evicted.join(", ")));
    }
    if !step.parked.is_empty() {
        line.push_str(&format!("  parked {}", step.parked.join(", ")));
    }
    line.push('\n');
    for failure in &step.failures {
        line.push_str(&format!("      expectation failed: {failure}\n"));
    }
    line
}
