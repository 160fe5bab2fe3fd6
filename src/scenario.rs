//! Scenario files: a configuration plus steps with expectations, parsed,
//! run against a live manager, and reported as a timeline or JSON lines.
//!
//! The format (see the README, "Scenario files"): every key of the
//! settings, plus `description` and `[[steps]]` with `op` (load, unload,
//! acquire, release, crash, sleep, external), the op's arguments, and
//! optional expectations `expect`, `resident`, `free`, `evicted`, `gpu`
//! and `parked`.
//! Scenarios run on a simulated card (`gpu.total`, with `gpu.external`
//! used by other processes) and do not read `VRAM__*` variables, so a
//! scenario means the same everywhere.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use vram_actors::{Lease, ModelState, VramError, VramEvent};

use crate::config::{MAX_DURATION, Settings, SettingsError, parse_size, read_file};
use crate::gpu::SimCard;
use crate::manager::Manager;

/// The scenario `cargo run` runs when given no arguments.
pub const VOICE_ASSISTANT: &str = include_str!("../config/scenarios/voice-assistant.toml");

/// A parsed, validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// What the scenario shows.
    pub description: String,
    /// The settings it runs with (defaults plus the file's keys).
    pub settings: Settings,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// One step: an operation and what must hold after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What to do.
    pub op: Op,
    /// The expected result: "ok" or an error code.
    pub expect: &'static str,
    /// If given, exactly these models must be resident afterwards.
    pub resident: Option<BTreeSet<String>>,
    /// If given, exactly these free bytes afterwards.
    pub free: Option<u64>,
    /// If given, exactly these models evicted for this step, in order.
    pub evicted: Option<Vec<String>>,
    /// If given, the step's model must be on this card (its position in
    /// the list of cards) afterwards.
    pub gpu: Option<usize>,
    /// If given, exactly these models must be parked afterwards.
    pub parked: Option<BTreeSet<String>>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Load a model.
    Load(String),
    /// Unload a model.
    Unload(String),
    /// Acquire a lease on a model, kept under a name.
    Acquire {
        /// The model.
        model: String,
        /// The lease's name (default: the model id).
        lease: String,
    },
    /// Release a named lease.
    Release(String),
    /// Crash a kind's backend and wait for its restart.
    Crash(String),
    /// Wait.
    Sleep(Duration),
    /// Set other processes' use of the simulated card, in bytes.
    External(u64),
}

impl Op {
    /// The op's name as written in files.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Load(_) => "load",
            Op::Unload(_) => "unload",
            Op::Acquire { .. } => "acquire",
            Op::Release(_) => "release",
            Op::Crash(_) => "crash",
            Op::Sleep(_) => "sleep",
            Op::External(_) => "external",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    op: String,
    model: Option<String>,
    lease: Option<String>,
    kind: Option<String>,
    ms: Option<u64>,
    vram: Option<String>,
    expect: Option<String>,
    resident: Option<Vec<String>>,
    free: Option<String>,
    evicted: Option<Vec<String>>,
    gpu: Option<usize>,
    parked: Option<Vec<String>>,
}

impl RawStep {
    /// The step, when its text is only the simplest TOML: blank lines,
    /// comments, and `key = "text"` (no escapes) or `ms = digits` for the
    /// known keys, each once; there TOML means exactly what it looks like.
    /// Anything else (arrays, escapes, an unknown or repeated key) answers
    /// `None` and goes to the TOML parser. Most generated traces are all
    /// simple steps, read this way several times faster.
    fn simple(text: &str) -> Option<Self> {
        let mut step = RawStep {
            op: String::new(),
            model: None,
            lease: None,
            kind: None,
            ms: None,
            vram: None,
            expect: None,
            resident: None,
            free: None,
            evicted: None,
            gpu: None,
            parked: None,
        };
        let mut has_op = false;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, rest) = line.split_once('=')?;
            let (key, rest) = (key.trim(), rest.trim());
            if key == "ms" {
                let digits = rest.split('#').next()?.trim();
                // TOML integers have no leading zero ("0123" is an error).
                if digits.is_empty()
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                    || (digits.len() > 1 && digits.starts_with('0'))
                {
                    return None;
                }
                if step.ms.replace(digits.parse().ok()?).is_some() {
                    return None;
                }
                continue;
            }
            let value = rest.strip_prefix('"')?;
            let end = value.find('"')?;
            let (value, after) = (&value[..end], value[end + 1..].trim());
            if value.contains('\\') || !(after.is_empty() || after.starts_with('#')) {
                return None;
            }
            let slot = match key {
                "op" => {
                    if std::mem::replace(&mut has_op, true) {
                        return None;
                    }
                    step.op = value.to_string();
                    continue;
                }
                "model" => &mut step.model,
                "lease" => &mut step.lease,
                "kind" => &mut step.kind,
                "vram" => &mut step.vram,
                "expect" => &mut step.expect,
                "free" => &mut step.free,
                _ => return None,
            };
            if slot.replace(value.to_string()).is_some() {
                return None;
            }
        }
        has_op.then_some(step)
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        Self::parse(&path.display().to_string(), &read_file(path)?)
    }

    /// Each simulated card's usable bytes, in list order (every card of a
    /// scenario has a size: [`Scenario::parse`] refuses "auto").
    pub fn capacities(&self) -> Vec<u64> {
        self.settings
            .gpus
            .iter()
            .map(|g| g.capacity().unwrap_or(0))
            .collect()
    }

    /// Validates scenario text; `origin` names it in messages.
    ///
    /// Steps are read one `[[steps]]` table at a time, straight into their
    /// typed form, so a file of 300,000 steps never exists as one parsed
    /// document (a TOML document tree costs about 2 KiB a step). A file laid
    /// out otherwise (steps as an inline array, a multi-line string in a
    /// step) is read whole; so is a file with an error, so the message names
    /// the key and the line exactly as in the file.
    pub fn parse(origin: &str, text: &str) -> Result<Self, SettingsError> {
        let scenario = match split_steps(text) {
            Some(split) => match Self::parse_split(origin, &split) {
                Ok(Some(scenario)) => scenario,
                Ok(None) | Err(_) => Self::parse_whole(origin, text)?,
            },
            None => Self::parse_whole(origin, text)?,
        };
        // Each card is simulated, sized by its total: one to be read from a
        // real card has no size here.
        let listed = scenario.settings.gpus.len() > 1;
        for (i, card) in scenario.settings.gpus.iter().enumerate() {
            if card.capacity().is_none() {
                let key = if listed {
                    format!("gpus[{i}].total")
                } else {
                    "gpu.total".to_string()
                };
                return Err(SettingsError::Invalid {
                    key,
                    message: "\"auto\" reads a real card's total, but a scenario runs on a simulated card: give a size such as \"16GiB\"".to_string(),
                });
            }
        }
        Ok(scenario)
    }

    /// The whole file as one document, strictly: a step's type error names
    /// `steps[N].field` and its line.
    fn parse_whole(origin: &str, text: &str) -> Result<Self, SettingsError> {
        let mut file: crate::shape::ScenarioShape<RawStep> = crate::shape::read(origin, text)?;
        let rest = file.settings_text()?;
        let settings = Settings::from_layers(Some((origin, &rest)), Some(HashMap::new()))?;
        let mut leases = BTreeSet::new();
        let steps = file
            .steps
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, raw)| raw.validate(i, &settings, &mut leases))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            description: file.description,
            settings,
            steps,
        })
    }

    /// The settings part as one document, then each step by itself.
    /// `None` when the layout is not the simple one after all (the
    /// settings part holds steps too).
    fn parse_split(origin: &str, split: &Split<'_>) -> Result<Option<Self>, SettingsError> {
        let mut file: crate::shape::ScenarioShape<RawStep> =
            crate::shape::read(origin, &split.settings)?;
        // Steps in the settings part too (`steps = [...]`, or a header
        // spelt otherwise): the whole file says what that means.
        if file.steps.is_some() && !split.steps.is_empty() {
            return Ok(None);
        }
        let rest = file.settings_text()?;
        let settings = Settings::from_layers(Some((origin, &rest)), Some(HashMap::new()))?;
        let mut leases = BTreeSet::new();
        let mut steps = Vec::with_capacity(split.steps.len());
        for (i, raw) in file
            .steps
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            steps.push(raw.validate(i, &settings, &mut leases)?);
        }
        for (i, chunk) in split.steps.iter().enumerate() {
            // No error paths kept here: on an error the whole file is read
            // again to name the key and the line as in the file.
            let raw = match RawStep::simple(chunk) {
                Some(raw) => raw,
                None => toml::from_str(chunk).map_err(|e| SettingsError::Shape(e.to_string()))?,
            };
            steps.push(raw.validate(i, &settings, &mut leases)?);
        }
        Ok(Some(Self {
            description: file.description,
            settings,
            steps,
        }))
    }
}

/// Whether `text` is a scenario rather than a settings file: it has a
/// `[[steps]]` table, or a top-level `steps` or `description` key. (A
/// scan of the lines, so telling costs nothing next to reading it.)
pub fn looks_like_scenario(text: &str) -> bool {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut top_level = true;
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("").trim();
        if code.starts_with('[') {
            let header: String = code.chars().filter(|c| !c.is_whitespace()).collect();
            if header == "[[steps]]" || header.starts_with("[steps") {
                return true;
            }
            top_level = false;
        } else if top_level {
            let key = code.split('=').next().unwrap_or("").trim();
            let key = key.trim_matches(|c| c == '"' || c == '\'');
            if key == "steps" || key == "description" || key.starts_with("steps.") {
                return true;
            }
        }
    }
    false
}

/// A scenario file cut in two: everything but the steps (with each step's
/// lines left blank, so line numbers still match the file), and the text
/// of each `[[steps]]` table.
struct Split<'a> {
    settings: String,
    steps: Vec<&'a str>,
}

/// Cuts `text` at its `[[steps]]` headers: a step is the lines after its
/// header up to the next table header. `None` (read the whole file instead)
/// unless the text is plain: printable ASCII, tabs and line ends only, no
/// multi-line string anywhere (one could hold a line that looks like a
/// header). Within plain text a line is what it looks like, so the cut is
/// exact.
fn split_steps(text: &str) -> Option<Split<'_>> {
    let plain = text.bytes().enumerate().all(|(i, b)| match b {
        b'\t' | b'\n' | 0x20..=0x7e => true,
        b'\r' => text.as_bytes().get(i + 1) == Some(&b'\n'),
        _ => false,
    });
    if !plain || text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut settings = String::new();
    let mut steps = Vec::new();
    let mut step_start: Option<usize> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let code = line.split('#').next().unwrap_or("").trim();
        if code.starts_with('[') {
            if let Some(start) = step_start.take() {
                steps.push(&text[start..offset]);
            }
            if code == "[[steps]]" {
                step_start = Some(offset + line.len());
                settings.push('\n');
            } else {
                settings.push_str(line);
            }
        } else if step_start.is_some() {
            settings.push('\n');
        } else {
            settings.push_str(line);
        }
        offset += line.len();
    }
    if let Some(start) = step_start {
        steps.push(&text[start..]);
    }
    Some(Split { settings, steps })
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl RawStep {
    fn validate(
        self,
        i: usize,
        settings: &Settings,
        leases: &mut BTreeSet<String>,
    ) -> Result<Step, SettingsError> {
        let key = |field: &str| format!("steps[{i}].{field}");
        let need = |value: Option<String>, field: &str| {
            value.ok_or_else(|| invalid(key(field), format!("op {:?} needs `{field}`", self.op)))
        };
        let allowed: &[&str] = match self.op.as_str() {
            "load" | "unload" => &["model"],
            "acquire" => &["model", "lease"],
            "release" => &["lease"],
            "crash" => &["kind"],
            "sleep" => &["ms"],
            "external" => &["vram"],
            other => {
                return Err(invalid(
                    key("op"),
                    format!(
                        "unknown op {other:?} (expected load, unload, acquire, release, crash, sleep or external)"
                    ),
                ));
            }
        };
        let given = [
            ("model", self.model.is_some()),
            ("lease", self.lease.is_some()),
            ("kind", self.kind.is_some()),
            ("ms", self.ms.is_some()),
            ("vram", self.vram.is_some()),
        ];
        if let Some((field, _)) = given.iter().find(|(f, set)| *set && !allowed.contains(f)) {
            return Err(invalid(
                key(field),
                format!("does not apply to op {:?}", self.op),
            ));
        }
        let op = match self.op.as_str() {
            "load" => Op::Load(need(self.model.clone(), "model")?),
            "unload" => Op::Unload(need(self.model.clone(), "model")?),
            "acquire" => {
                let model = need(self.model.clone(), "model")?;
                let lease = self.lease.clone().unwrap_or_else(|| model.clone());
                leases.insert(lease.clone());
                Op::Acquire { model, lease }
            }
            "release" => {
                let lease = need(self.lease.clone(), "lease")?;
                if !leases.contains(&lease) {
                    return Err(invalid(
                        key("lease"),
                        format!("no earlier step acquires a lease named {lease:?}"),
                    ));
                }
                Op::Release(lease)
            }
            "crash" => {
                let kind = need(self.kind.clone(), "kind")?;
                if settings.kinds.get(&kind).is_none() {
                    return Err(invalid(key("kind"), format!("unknown kind {kind:?}")));
                }
                Op::Crash(kind)
            }
            "external" => {
                Op::External(parse_size(&key("vram"), &need(self.vram.clone(), "vram")?)?)
            }
            _ => {
                let ms = self
                    .ms
                    .ok_or_else(|| invalid(key("ms"), "op \"sleep\" needs `ms`"))?;
                let sleep = Duration::from_millis(ms);
                if sleep > MAX_DURATION {
                    return Err(invalid(key("ms"), "is more than 100 years"));
                }
                Op::Sleep(sleep)
            }
        };
        let expect = match self.expect.as_deref() {
            None | Some("ok") => "ok",
            Some(code) => VramError::CODES
                .iter()
                .copied()
                .find(|c| *c == code)
                .ok_or_else(|| {
                    invalid(
                        key("expect"),
                        format!(
                            "unknown result {code:?} (expected \"ok\" or one of {})",
                            VramError::CODES.join(", ")
                        ),
                    )
                })?,
        };
        let free = self
            .free
            .map(|f| parse_size(&key("free"), &f))
            .transpose()?;
        Ok(Step {
            op,
            expect,
            resident: self.resident.map(|r| r.into_iter().collect()),
            free,
            evicted: self.evicted,
            gpu: self.gpu,
            parked: self.parked.map(|p| p.into_iter().collect()),
        })
    }
}

/// What one step did, as printed (JSON keys in this order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// The op's name.
    pub op: &'static str,
    /// The model the step was about, if any.
    pub model: Option<String>,
    /// "ok" or an error code.
    pub result: String,
    /// Models unloaded to make room for this step's request, in order.
    pub evicted: Vec<String>,
    /// Models resident after the step, sorted.
    pub resident: Vec<String>,
    /// Bytes used after the step.
    pub used: u64,
    /// Capacity less used after the step.
    pub free: u64,
    /// The step's wall time in milliseconds.
    pub ms: f64,
    /// The simulated cards' free bytes after the step (all cards).
    pub card_free: u64,
    /// The card the step's model is on after the step (its position in
    /// the list of cards), if it is on one.
    pub gpu: Option<usize>,
    /// Each card's used and free bytes after the step, in list order.
    pub gpus: Vec<GpuUse>,
    /// Models parked (asleep, holding their residual) after the step,
    /// sorted.
    pub parked: Vec<String>,
    /// Expectations that did not hold.
    #[serde(skip)]
    pub failures: Vec<String>,
    /// Each resident model, the bytes charged to it and its card (for
    /// plots).
    #[serde(skip)]
    pub charged: Vec<(String, u64, usize)>,
}

/// One card's use after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GpuUse {
    /// Bytes charged to models on it.
    pub used: u64,
    /// Its capacity less used.
    pub free: u64,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Usable bytes of the cards, all together.
    pub capacity: u64,
    /// Usable bytes of each card, in list order.
    pub capacities: Vec<u64>,
    /// One report per step, when the run keeps them (see [`run_streaming`]).
    pub steps: Vec<StepReport>,
    /// Steps run.
    pub count: usize,
    /// The steps whose expectations did not all hold, with what failed.
    pub failures: Vec<StepFailure>,
    /// The simulated card's highest use, bytes; with process-backed models
    /// (no simulated card), the ledger's highest use after a step.
    pub peak: u64,
    /// Whether a load ever asked the simulated card for more than it had
    /// at that moment (other processes' use counted as it was then).
    pub overcommitted: bool,
    /// The most other processes held on the simulated card (`external`
    /// steps), bytes.
    pub external_peak: u64,
    /// The signal (SIGINT 2, SIGTERM 15, SIGHUP 1) that ended the run early, if one
    /// did; `steps` then holds the steps done before it.
    pub interrupted: Option<i32>,
    /// Whether the step callback asked to stop (its output was closed):
    /// the steps after it were not run.
    pub stopped: bool,
}

/// A step whose expectations did not all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// 1-based step number.
    pub step: usize,
    /// The op's name.
    pub op: &'static str,
    /// The model the step was about, if any.
    pub model: Option<String>,
    /// Each expectation that did not hold.
    pub failures: Vec<String>,
}

impl Report {
    /// Steps whose expectations did not all hold.
    pub fn failed(&self) -> usize {
        self.failures.len()
    }
}

/// Collects the manager's evictions so a step that failed can tell what it
/// evicted all the same (a step that succeeded learns it from its answer).
struct Collector(Vec<VramEvent>);

impl Actor for Collector {
    type Context = Context<Self>;
}

impl Handler<VramEvent> for Collector {
    type Result = ();
    fn handle(&mut self, event: VramEvent, _ctx: &mut Context<Self>) {
        if matches!(event, VramEvent::Evicted { .. }) {
            self.0.push(event);
        }
    }
}

/// Forgets what was collected: sent before each step, so (one mailbox,
/// first in first out) what is collected after it is that step's.
#[derive(Message)]
#[rtype(result = "()")]
struct Clear;

impl Handler<Clear> for Collector {
    type Result = ();
    fn handle(&mut self, _: Clear, _ctx: &mut Context<Self>) {
        self.0.clear();
    }
}

/// Answers once every event sent before it has been collected.
#[derive(Message)]
#[rtype(result = "Vec<VramEvent>")]
struct Drain;

impl Handler<Drain> for Collector {
    type Result = MessageResult<Drain>;
    fn handle(&mut self, _: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(std::mem::take(&mut self.0))
    }
}

/// Runs `scenario` on a fresh actix system, calling `on_step` as each step
/// completes, and reports every step. SIGINT or SIGTERM ends the run
/// early (`Report::interrupted`); either way every model server is stopped
/// before this returns.
pub fn run(scenario: &Scenario, on_step: impl FnMut(&StepReport)) -> Result<Report, SettingsError> {
    run_on(scenario, every_step(on_step), true, false)
}

/// `on_step` as a step callback that never stops the run.
fn every_step(mut on_step: impl FnMut(&StepReport)) -> impl FnMut(&StepReport) -> ControlFlow<()> {
    move |step| {
        on_step(step);
        ControlFlow::Continue(())
    }
}

/// [`run`] for long scenarios: keeps each step's report only when
/// `keep_steps` (a plot needs them; a summary does not, so memory stays
/// flat however many steps there are), and stops after a step for which
/// `on_step` answers `Break` (its output was closed): `Report::stopped`.
pub fn run_streaming(
    scenario: &Scenario,
    keep_steps: bool,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<Report, SettingsError> {
    run_on(scenario, on_step, keep_steps, false)
}

/// [`run`] on tokio's paused clock: every wait (load times, TTLs, release
/// waits, timeouts) passes in virtual time, at once and exactly, and each
/// step's `ms` is virtual time. For simulated models only (a real server
/// takes real time).
#[cfg(feature = "testing")]
pub fn run_paused(
    scenario: &Scenario,
    on_step: impl FnMut(&StepReport),
) -> Result<Report, SettingsError> {
    run_on(scenario, every_step(on_step), true, true)
}

/// What the steps gathered, besides their reports.
#[derive(Default)]
struct Tally {
    count: usize,
    failures: Vec<StepFailure>,
    used_peak: u64,
    stopped: bool,
}

fn run_on(
    scenario: &Scenario,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
    keep_steps: bool,
    paused: bool,
) -> Result<Report, SettingsError> {
    Manager::config(&scenario.settings)?;
    let capacities = scenario.capacities();
    let capacity = capacities.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let simulated = scenario
        .settings
        .models
        .iter()
        .all(|m| matches!(m.backend, crate::config::BackendSpec::Sim(_)));
    let (steps, tally, card, interrupted) = actix::System::new().block_on(async {
        if paused {
            pause_clock();
        }
        let manager = Manager::start(&scenario.settings)?;
        let mut steps = Vec::with_capacity(if keep_steps { scenario.steps.len() } else { 0 });
        let mut tally = Tally::default();
        let interrupted = tokio::select! {
            done = run_steps(&manager, scenario, on_step, keep_steps.then_some(&mut steps), &mut tally) => {
                done?;
                None
            }
            signal = shutdown_signal() => Some(signal),
        };
        manager.shutdown().await;
        Ok::<_, SettingsError>((steps, tally, manager.sim_cards.clone(), interrupted))
    })?;
    // Without the simulated card (process-backed models) the ledger is
    // the record of what the card held. With several cards: the highest
    // of any one card.
    let peak = if simulated {
        card.iter().map(SimCard::peak).max().unwrap_or(0)
    } else {
        tally.used_peak
    };
    Ok(Report {
        capacity,
        capacities,
        steps,
        count: tally.count,
        failures: tally.failures,
        peak,
        overcommitted: card.iter().any(SimCard::overcommitted),
        external_peak: card.iter().map(SimCard::external_peak).max().unwrap_or(0),
        interrupted,
        stopped: tally.stopped,
    })
}

#[cfg(feature = "testing")]
fn pause_clock() {
    tokio::time::pause();
}

#[cfg(not(feature = "testing"))]
fn pause_clock() {}

/// Resolves with the signal number when SIGINT, SIGTERM or SIGHUP
/// arrives.
pub(crate) async fn shutdown_signal() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut int), Ok(mut term), Ok(mut hup)) => tokio::select! {
            _ = int.recv() => nix::sys::signal::Signal::SIGINT as i32,
            _ = term.recv() => nix::sys::signal::Signal::SIGTERM as i32,
            // The terminal closed: stop as for SIGTERM (stop commands run).
            _ = hup.recv() => nix::sys::signal::Signal::SIGHUP as i32,
        },
        // Without handlers the default action (exit) stands.
        _ => std::future::pending().await,
    }
}

async fn run_steps(
    manager: &Manager,
    scenario: &Scenario,
    mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
    mut kept: Option<&mut Vec<StepReport>>,
    tally: &mut Tally,
) -> Result<(), SettingsError> {
    let collector = Collector(Vec::new()).start();
    let mailbox = |e: MailboxError| SettingsError::Shape(format!("the manager stopped: {e}"));
    let stopped = |e: VramError| SettingsError::Shape(format!("the manager stopped: {e}"));
    let vram = manager.handle();
    vram.subscribe(collector.clone().recipient())
        .await
        .map_err(stopped)?;
    // The leases held under each name: a name acquired again while held
    // holds one more (each acquire holds until a release names it; the
    // release lets go of the latest).
    let mut leases: HashMap<String, Vec<Lease>> = HashMap::new();
    let mut lease_models: HashMap<String, String> = HashMap::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        // What is collected from here on is this step's.
        collector.do_send(Clear);
        let started = Instant::now();
        // The op's result, and what it evicted when it says so.
        let (model, result): (Option<String>, Result<Vec<String>, VramError>) = match &step.op {
            Op::Load(m) => (
                Some(m.clone()),
                vram.load(m).await.map(|loaded| names(&loaded.evicted)),
            ),
            Op::Unload(m) => (Some(m.clone()), vram.unload(m).await.map(|_| vec![])),
            Op::Acquire { model, lease } => {
                let acquired = vram.acquire(model).await;
                lease_models.insert(lease.clone(), model.clone());
                (
                    Some(model.clone()),
                    acquired.map(|l| {
                        let evicted = names(l.evicted());
                        leases.entry(lease.clone()).or_default().push(l);
                        evicted
                    }),
                )
            }
            Op::Release(lease) => {
                // Dropping the lease sends Release; the Status below is
                // queued behind it in the same mailbox.
                let released = leases.get_mut(lease).and_then(Vec::pop);
                let model = match &released {
                    Some(held) => Some(held.model().to_string()),
                    None => lease_models.get(lease).cloned(),
                };
                drop(released);
                (model, Ok(vec![]))
            }
            Op::Crash(kind) => (None, vram.crash_backend(kind).await.map(|()| vec![])),
            Op::Sleep(d) => {
                actix::clock::sleep(*d).await;
                (None, Ok(vec![]))
            }
            Op::External(bytes) => {
                manager.card.set_external(*bytes);
                (None, Ok(vec![]))
            }
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let status = vram.status().await.map_err(stopped)?;
        let (evicted, result) = match result {
            Ok(evicted) => (evicted, Ok(())),
            // A failed load may have evicted before it failed: its events
            // say what.
            Err(e) => {
                let events = collector.send(Drain).await.map_err(mailbox)?;
                let evicted = match &model {
                    Some(m) => events
                        .into_iter()
                        .filter_map(|e| match e {
                            VramEvent::Evicted {
                                model, for_model, ..
                            } if for_model == *m => Some(model.to_string()),
                            _ => None,
                        })
                        .collect(),
                    None => vec![],
                };
                (evicted, Err(e))
            }
        };
        let gpu = status
            .models
            .iter()
            .find(|m| model.as_deref() == Some(m.id.as_str()))
            .map(|m| m.gpu);
        let mut report = StepReport {
            step: i + 1,
            op: step.op.name(),
            model,
            result: match &result {
                Ok(()) => "ok".to_string(),
                Err(e) => e.code().to_string(),
            },
            evicted,
            resident: status.resident(),
            used: status.used,
            free: status.free,
            ms: (ms * 1000.0).round() / 1000.0,
            card_free: manager
                .sim_cards
                .iter()
                .fold(0u64, |sum, c| sum.saturating_add(c.memory_now().free)),
            gpu,
            parked: status
                .models
                .iter()
                .filter(|m| m.state == ModelState::Parked)
                .map(|m| m.id.to_string())
                .collect(),
            gpus: status
                .gpus
                .iter()
                .map(|g| GpuUse {
                    used: g.used,
                    free: g.free,
                })
                .collect(),
            failures: vec![],
            charged: status
                .models
                .iter()
                .filter(|m| m.state == ModelState::Resident)
                .map(|m| (m.id.to_string(), m.bytes, m.gpu))
                .collect(),
        };
        report.failures = check(step, &report, result.err());
        tally.count += 1;
        tally.used_peak = tally.used_peak.max(report.used);
        if !report.failures.is_empty() {
            tally.failures.push(StepFailure {
                step: report.step,
                op: report.op,
                model: report.model.clone(),
                failures: report.failures.clone(),
            });
        }
        let flow = on_step(&report);
        if let Some(kept) = kept.as_deref_mut() {
            kept.push(report);
        }
        if flow.is_break() {
            tally.stopped = true;
            break;
        }
    }
    Ok(())
}

/// Model ids as the report lists them.
fn names(ids: &[vram_actors::ArcStr]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

/// The expectations of `step` that `report` does not meet.
fn check(step: &Step, report: &StepReport, error: Option<VramError>) -> Vec<String> {
    let mut failures = Vec::new();
    if report.result != step.expect {
        let detail = error.map(|e| format!(" ({e})")).unwrap_or_default();
        failures.push(format!(
            "expected result {}, got {}{detail}",
            step.expect, report.result
        ));
    }
    if let Some(expected) = &step.resident {
        let actual: BTreeSet<String> = report.resident.iter().cloned().collect();
        if &actual != expected {
            failures.push(format!("expected resident {expected:?}, got {actual:?}"));
        }
    }
    if let Some(expected) = step.free
        && expected != report.free
    {
        failures.push(format!(
            "expected free {expected} bytes, got {} bytes",
            report.free
        ));
    }
    if let Some(expected) = &step.evicted
        && expected != &report.evicted
    {
        failures.push(format!(
            "expected evicted {expected:?}, got {:?}",
            report.evicted
        ));
    }
    if let Some(expected) = &step.parked {
        let actual: BTreeSet<String> = report.parked.iter().cloned().collect();
        if &actual != expected {
            failures.push(format!("expected parked {expected:?}, got {actual:?}"));
        }
    }
    if let Some(expected) = step.gpu
        && Some(expected) != report.gpu
    {
        let actual = report
            .gpu
            .map_or_else(|| "on no card".to_string(), |g| format!("on gpu {g}"));
        failures.push(format!("expected on gpu {expected}, got {actual}"));
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped scenario, read step by step, is what it is read whole.
    #[test]
    fn reading_step_by_step_equals_reading_whole() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scenarios");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let split = split_steps(&text).expect("the simple layout");
            assert!(!split.steps.is_empty(), "{}", path.display());
            let by_step = Scenario::parse_split("f", &split).unwrap().unwrap();
            let whole = Scenario::parse_whole("f", &text).unwrap();
            assert_eq!(by_step.steps, whole.steps, "{}", path.display());
            assert_eq!(by_step.description, whole.description);
            assert_eq!(by_step.settings, whole.settings);
            read += 1;
        }
        assert!(read >= 10);
    }

    #[test]
    fn other_layouts_are_read_whole() {
        let inline = "[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n\
                      steps = [{op = \"load\", model = \"a\"}]\n";
        // `steps = [...]` after a header belongs to that table: refused,
        // naming it, rather than misread.
        assert!(Scenario::parse("f", inline).is_err());
        let top = "steps = [{op = \"load\", model = \"a\"}]\n\
                   [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n";
        let scenario = Scenario::parse("f", top).unwrap();
        assert_eq!(scenario.steps.len(), 1);
        // A step with a multi-line string is read whole.
        let text = "[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n\
                    [[steps]]\nop = \"load\"\nmodel = \"\"\"a\"\"\"\n";
        assert!(split_steps(text).is_none());
        assert_eq!(Scenario::parse("f", text).unwrap().steps.len(), 1);
        assert!(looks_like_scenario(top) && looks_like_scenario(text));
        assert!(!looks_like_scenario("[gpu]\ntotal = \"8GiB\"\n"));
    }

    #[test]
    fn the_simple_reader_takes_only_what_it_reads_exactly() {
        let simple = "op = \"acquire\"  # a comment\nmodel = \"m#1\"\n\nlease = \"x\"\n";
        let raw = RawStep::simple(simple).unwrap();
        let parsed: RawStep = toml::from_str(simple).unwrap();
        assert_eq!(
            (&raw.op, &raw.model, &raw.lease),
            (&parsed.op, &parsed.model, &parsed.lease)
        );
        assert_eq!(raw.model.as_deref(), Some("m#1"));
        assert_eq!(
            RawStep::simple("op = \"sleep\"\nms = 250\n").unwrap().ms,
            Some(250)
        );
        for other in [
            "op = \"load\"\nmodel = \"a\\u0041\"\n",         // an escape
            "op = \"load\"\nresident = [\"a\"]\n",           // an array
            "op = \"load\"\nmodel = \"a\"\nmodel = \"b\"\n", // a repeated key
            "op = \"load\"\nop = \"unload\"\n",
            "op = \"sleep\"\nms = \"5s\"\n",
            "op = \"sleep\"\nms = 1_000\n",
            "op = 'load'\n",                  // a literal string
            "op = \"load\"\nmodle = \"a\"\n", // an unknown key
            "model = \"a\"\n",                // no op
        ] {
            assert!(RawStep::simple(other).is_none(), "{other}");
        }
    }

    /// What the step-by-step reader must refuse or hand to the whole-file
    /// parse, so both readings always agree.
    #[test]
    fn the_step_by_step_reader_never_reads_what_toml_would_not() {
        let base = "[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n";
        for bad_step in [
            "op = \"sleep\"\nms = 0123\n",           // a leading zero
            "op = \"load\"\nmodel = \"a\"\u{a0}\n",  // a no-break space
            "op = \"load\"\nmodel = \"a\"\x0c\n",    // a form feed
            "op = \"load\"\nmodel = \"a\"\r\r\n",    // a lone carriage return
            "op = \"load\"\nmodel = \"a\x01\"\n",    // a control character
            "op = \"load\"\nmodel = \"a\" # \x7f\n", // one in a comment
        ] {
            let text = format!("{base}[[steps]]\n{bad_step}");
            assert!(Scenario::parse("f", &text).is_err(), "{bad_step:?}");
        }
        // `[[steps]]` inside a multi-line string of the settings is text.
        let text = format!(
            "description = \"\"\"\n[[steps]]\nop = \"load\"\nmodel = \"a\"\n\"\"\"\n{base}"
        );
        let scenario = Scenario::parse("f", &text).unwrap();
        assert!(scenario.steps.is_empty());
        assert!(scenario.description.contains("[[steps]]"));
        // Steps given twice are the TOML error they are.
        let twice = format!("steps = []\n{base}[[steps]]\nop = \"load\"\nmodel = \"a\"\n");
        assert!(Scenario::parse("f", &twice).is_err());
        // A header spelt with spaces is still a step, for every reader.
        let spaced = format!("{base}[[ steps ]]\nop = \"load\"\nmodel = \"a\"\n");
        assert_eq!(Scenario::parse("f", &spaced).unwrap().steps.len(), 1);
        assert!(looks_like_scenario(&spaced));
        assert!(looks_like_scenario(&format!(
            "\u{feff}\"description\" = \"x\"\n{base}"
        )));
    }
}
