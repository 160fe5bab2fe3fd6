//! Settings in two stages: raw serde structs exactly as the files say, then
//! one validated [`Settings`] with integer bytes, durations and kinds.
//!
//! Layers, later over earlier: `config/default.toml` (compiled in, so the
//! binary needs no file), an optional user file, then `VRAM__*` environment
//! variables with a double underscore between levels
//! (`VRAM__POLICY__LEASE_WAIT=2s`). [`Settings::parse`] takes TOML text so
//! tests need no files; [`Settings::load`] reads a path and the environment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use vram_actors::{Catalog, Kind, Kinds, ModelSpec, Order};

use crate::backends::{ProcessSpec, ReadyCheck};

/// The defaults, compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Why settings could not be built. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path that was asked for.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file is not TOML; the message carries line and column.
    #[error("{origin} is not valid TOML: {message}")]
    Toml {
        /// Which file (or "settings").
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong shape, or is not a known key.
    #[error("{0}")]
    Shape(String),
    /// A value is well-formed but not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `models[2].vram`.
        key: String,
        /// What was wrong with it.
        message: String,
    },
}

impl From<crate::shape::ShapeError> for SettingsError {
    fn from(e: crate::shape::ShapeError) -> Self {
        match e {
            crate::shape::ShapeError::Toml { origin, message } => Self::Toml { origin, message },
            crate::shape::ShapeError::Shape(message) => Self::Shape(message),
        }
    }
}

impl SettingsError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------- raw stage

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    gpu: RawGpu,
    host: RawHost,
    #[serde(default)]
    gpus: Vec<RawCard>,
    policy: RawPolicy,
    process: RawProcess,
    server: RawServer,
    kinds: BTreeMap<String, RawKind>,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    probe: String,
    device: String,
    total: String,
    reserve: String,
    release_fraction: f64,
    #[serde(with = "humantime_serde")]
    release_poll: Duration,
    #[serde(with = "humantime_serde")]
    release_timeout: Duration,
    external: String,
}

/// `[host]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    budget: String,
    keep_warm: String,
}

/// A model's `[models.park]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPark {
    sleep: Option<String>,
    wake: Option<String>,
    vram: String,
    host: String,
    sleep_ms: Option<u64>,
    wake_ms: Option<u64>,
}

/// One `[[gpus]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCard {
    device: Option<String>,
    total: String,
    reserve: Option<String>,
    external: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    order: String,
    #[serde(with = "humantime_serde")]
    lease_wait: Duration,
    #[serde(with = "humantime_serde")]
    load_timeout: Duration,
    #[serde(with = "humantime_serde")]
    unload_timeout: Duration,
    max_queue: usize,
    #[serde(with = "humantime_serde")]
    restart_backoff: Duration,
    #[serde(with = "humantime_serde")]
    restart_backoff_max: Duration,
}

/// The HTTP server of `vram-manager serve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    token: String,
    max_body: String,
    #[serde(with = "humantime_serde")]
    shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    upstream_timeout: Duration,
    #[serde(with = "humantime_serde")]
    max_lease_ttl: Duration,
}

/// Defaults of the process-backed models (each may set its own).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    #[serde(with = "humantime_serde")]
    ready_timeout: Duration,
    #[serde(with = "humantime_serde")]
    stop_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    priority: u32,
    #[serde(default)]
    protected: bool,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    kind: String,
    vram: String,
    #[serde(default)]
    pinned: bool,
    #[serde(default = "default_backend")]
    backend: String,
    // The simulated backend's fields (`None`: not written, so a process
    // model that names one can be told it does nothing there).
    load_ms: Option<u64>,
    warm_load_ms: Option<u64>,
    unload_ms: Option<u64>,
    fail_load: Option<bool>,
    actual_vram: Option<String>,
    release_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<String>,
    ready: Option<String>,
    #[serde(default, with = "humantime_serde")]
    ready_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stop_timeout: Option<Duration>,
    stop: Option<Vec<String>>,
    proxy: Option<String>,
    #[serde(default)]
    files: Vec<String>,
    gpus: Option<Vec<usize>>,
    park: Option<RawPark>,
}

fn default_backend() -> String {
    "sim".to_string()
}

impl RawModel {
    /// The first field written that only the other backend reads: the
    /// simulated backend's timings and faults on a process model, a
    /// server's command, readiness and stop settings on a simulated one.
    /// Such a field would do nothing, silently.
    fn foreign_field(&self) -> Option<(&'static str, &'static str)> {
        let park = self.park.as_ref();
        let sim_only = [
            ("load_ms", self.load_ms.is_some()),
            ("warm_load_ms", self.warm_load_ms.is_some()),
            ("unload_ms", self.unload_ms.is_some()),
            ("fail_load", self.fail_load.is_some()),
            ("actual_vram", self.actual_vram.is_some()),
            ("release_ms", self.release_ms.is_some()),
            ("park.sleep_ms", park.is_some_and(|p| p.sleep_ms.is_some())),
            ("park.wake_ms", park.is_some_and(|p| p.wake_ms.is_some())),
        ];
        let process_only = [
            ("command", self.command.is_some()),
            ("env", self.env.is_some()),
            ("cwd", self.cwd.is_some()),
            ("ready", self.ready.is_some()),
            ("ready_timeout", self.ready_timeout.is_some()),
            ("stop_timeout", self.stop_timeout.is_some()),
            ("stop", self.stop.is_some()),
            ("park.sleep", park.is_some_and(|p| p.sleep.is_some())),
            ("park.wake", park.is_some_and(|p| p.wake.is_some())),
        ];
        let (foreign, owner) = match self.backend.as_str() {
            "sim" => (&process_only[..], "process"),
            "process" => (&sim_only[..], "sim"),
            _ => return None,
        };
        foreign
            .iter()
            .find(|(_, written)| *written)
            .map(|(field, _)| (*field, owner))
    }
}

// ---------------------------------------------------------- validated stage

/// Validated settings: everything a manager needs, sizes in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The host: how much RAM parked models may hold.
    pub host: HostSettings,
    /// The card and how to ask it. With `[[gpus]]`, its `device`, `total`,
    /// `reserve` and `external` are the first card's; the rest (probe,
    /// release wait) applies to every card.
    pub gpu: GpuSettings,
    /// Every card, in list order: the `[[gpus]]` entries, or the one card
    /// `[gpu]` describes.
    pub gpus: Vec<CardSettings>,
    /// The HTTP server of `vram-manager serve`.
    pub server: ServerSettings,
    /// Waiting, timeouts and backpressure.
    pub policy: PolicySettings,
    /// Eviction tiers.
    pub kinds: Kinds,
    /// The models that may be loaded, in file order.
    pub models: Vec<ModelSettings>,
}

/// How to learn about the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeChoice {
    /// Use NVML when the NVIDIA library loads, else the configured total.
    Auto,
    /// Require NVML; its absence is an error.
    Nvml,
    /// Never ask the card; trust the configured total.
    None,
}

/// The card's size as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuTotal {
    /// A fixed size in bytes.
    Bytes(u64),
    /// Whatever NVML reports as the card's total.
    Auto,
}

/// `[gpu]`: which card, how big, how much to keep free.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSettings {
    /// How to learn about the card.
    pub probe: ProbeChoice,
    /// The card: an index ("0") or a UUID.
    pub device: String,
    /// The card's total memory.
    pub total: GpuTotal,
    /// Bytes never handed to models.
    pub reserve: u64,
    /// After evicting, wait for this fraction of the memory the victims
    /// really held to show up free on the card before loading.
    pub release_fraction: f64,
    /// The longest pause between two readings of the card while waiting
    /// (the first pause is 10 ms, doubling up to this).
    pub release_poll: Duration,
    /// The longest wait; then load anyway, with a warning.
    pub release_timeout: Duration,
    /// Simulated card only: bytes used by other processes.
    pub external: u64,
}

/// `[host]`: the machine the cards are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSettings {
    /// Host RAM all parked models together may hold, bytes ("auto": half
    /// of the machine's memory).
    pub budget: u64,
    /// Page cache to keep for the files of recently evicted models, bytes
    /// (best effort: the kernel decides; the simulated backend models a
    /// page cache of this size).
    pub keep_warm: u64,
}

/// One card: a `[[gpus]]` entry (or `[gpu]` when there is none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardSettings {
    /// Which card: an index ("0") or a UUID ("GPU-...").
    pub device: String,
    /// Its total memory.
    pub total: GpuTotal,
    /// Bytes never handed to models.
    pub reserve: u64,
    /// Simulated card only: bytes used by other processes.
    pub external: u64,
}

impl CardSettings {
    /// Usable bytes (total less reserve), when the total is known without
    /// asking the card.
    pub fn capacity(&self) -> Option<u64> {
        match self.total {
            GpuTotal::Bytes(total) => Some(total.saturating_sub(self.reserve)),
            GpuTotal::Auto => None,
        }
    }
}

impl GpuSettings {
    /// Usable bytes (total less reserve), when the total is known without
    /// asking the card.
    pub fn capacity(&self) -> Option<u64> {
        match self.total {
            GpuTotal::Bytes(total) => Some(total.saturating_sub(self.reserve)),
            GpuTotal::Auto => None,
        }
    }
}

/// `[policy]`: waiting, timeouts and backpressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySettings {
    /// The order in which eviction candidates are taken: `strict` (tier,
    /// then least recently used) or `adaptive` (cheapest expected reload).
    pub order: Order,
    /// How long a load or unload waits for leases to be released.
    pub lease_wait: Duration,
    /// How long a backend may take to load a model.
    pub load_timeout: Duration,
    /// How long a backend may take to unload a model.
    pub unload_timeout: Duration,
    /// Waiting requests beyond this are refused with `busy`.
    pub max_queue: usize,
    /// Delay before a restarted backend takes its next request.
    pub restart_backoff: Duration,
    /// Cap of that delay, which doubles with each crash in a row.
    pub restart_backoff_max: Duration,
}

/// Options of the simulated backend, per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimOptions {
    /// Time a load takes, in milliseconds, with its files read from disk
    /// (cold).
    pub load_ms: u64,
    /// Time a load takes when its files are in the page cache (warm); the
    /// rest of `load_ms` is reading them. `None`: always `load_ms`.
    pub warm_load_ms: Option<u64>,
    /// Time an unload takes, in milliseconds.
    pub unload_ms: u64,
    /// Refuse every load (to exercise `backend_failed`).
    pub fail_load: bool,
    /// Bytes the model really takes on the simulated card (its declared
    /// size when not given), to exercise calibration.
    pub actual_bytes: Option<u64>,
    /// How long after an unload the simulated card gets the memory back.
    pub release_ms: u64,
    /// Parking: bytes kept on the card while asleep, and how long a sleep
    /// and a wake take, in milliseconds (`None`: the model cannot park).
    pub park: Option<SimPark>,
}

/// How a simulated model parks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimPark {
    /// Bytes it keeps on the simulated card while asleep.
    pub vram: u64,
    /// Time a sleep takes, in milliseconds.
    pub sleep_ms: u64,
    /// Time a wake takes, in milliseconds.
    pub wake_ms: u64,
}

/// Which backend serves a model, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// The simulated backend.
    Sim(SimOptions),
    /// A model-server process.
    Process(ProcessSpec),
}

/// One `[[models]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    /// Id, kind, declared bytes and pin.
    pub spec: ModelSpec,
    /// How it is loaded.
    pub backend: BackendSpec,
    /// Idle time after which it is unloaded: its own `ttl`, else its
    /// kind's; `None` never expires.
    pub ttl: Option<Duration>,
    /// The base URL `serve` forwards this model's requests to: its own
    /// `proxy`, else (a process model ready on `http://HOST:PORT/...`)
    /// `http://HOST:PORT`; `None`: not served over HTTP.
    pub proxy: Option<String>,
    /// Its weight files, read into the page cache as soon as a load of it
    /// is planned (see [`crate::warm`]).
    pub files: Vec<std::path::PathBuf>,
    /// The cards it may go to, as positions in [`Settings::gpus`]
    /// (`None`: any).
    pub gpus: Option<Vec<usize>>,
}

impl ModelSettings {
    /// Whether it may go to card `index` of [`Settings::gpus`].
    pub fn may_go_on(&self, index: usize) -> bool {
        self.gpus.as_ref().is_none_or(|list| list.contains(&index))
    }
}

/// The HTTP server of `vram-manager serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Where it listens.
    pub listen: std::net::SocketAddr,
    /// The bearer token every endpoint but `/health` requires (empty: none;
    /// required off loopback).
    pub token: String,
    /// The largest request body accepted, bytes.
    pub max_body: u64,
    /// How long in-flight requests may finish after SIGINT/SIGTERM.
    pub shutdown_timeout: Duration,
    /// The longest a request to a model server may take, all of it.
    pub upstream_timeout: Duration,
    /// The longest `ttl` a lease of the HTTP API may have.
    pub max_lease_ttl: Duration,
}

impl Settings {
    /// The defaults alone (`config/default.toml`, compiled in): the one
    /// place default values live.
    pub fn defaults() -> Result<Self, SettingsError> {
        Self::parse("")
    }

    /// The defaults, then `text` (TOML) on top. No environment: for tests
    /// and embedded configurations.
    pub fn parse(text: &str) -> Result<Self, SettingsError> {
        Self::from_layers(Some(("settings", text)), Some(HashMap::new()))
    }

    /// The defaults, then the file at `path` (if given), then the process
    /// environment's `VRAM__*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        let text = path.map(read_file).transpose()?;
        let origin = path.map(|p| p.display().to_string());
        let file = origin.as_deref().zip(text.as_deref());
        Self::from_layers(file, None)
    }

    /// The defaults, then `file` as `(origin, text)`, then the `VRAM__*`
    /// variables of `env` (the process environment when `None`).
    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some((origin, text)) = file {
            crate::shape::read::<crate::shape::SettingsShape>(origin, text)?;
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        let variables: Vec<(String, String)> = match &env {
            Some(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            None => std::env::vars().collect(),
        };
        crate::shape::check_environment(&variables)?;
        let env_source = config::Environment::with_prefix("VRAM")
            .separator("__")
            .try_parsing(true)
            .source(env);
        let raw: RawSettings = builder
            .add_source(env_source)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError::Shape(e.to_string()))?;
        raw.validate()
    }

    /// Usable bytes of the first card when its total is configured (not
    /// "auto").
    pub fn capacity(&self) -> Option<u64> {
        self.gpus
            .first()
            .map_or_else(|| self.gpu.capacity(), CardSettings::capacity)
    }

    /// Usable bytes of every card whose total is configured, summed; `None`
    /// when one is "auto".
    pub fn total_capacity(&self) -> Option<u64> {
        self.gpus
            .iter()
            .map(CardSettings::capacity)
            .try_fold(0u64, |sum, c| c.map(|c| sum.saturating_add(c)))
    }

    /// The models as a planner catalog.
    pub fn catalog(&self) -> Catalog {
        self.models.iter().map(|m| m.spec.clone()).collect()
    }

    /// The settings of model `id`.
    pub fn model(&self, id: &str) -> Option<&ModelSettings> {
        self.models.iter().find(|m| m.spec.id == id)
    }
}

/// Reads a settings or scenario file.
pub fn read_file(path: &Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Checks a model's `proxy` base URL (`http://HOST:PORT`, no path).
fn parse_proxy(key: &str, text: &str) -> Result<String, SettingsError> {
    let uri: awc::http::Uri = text
        .parse()
        .map_err(|e| SettingsError::invalid(key, format!("{text:?} is not a URL: {e}")))?;
    let ok = uri.scheme_str() == Some("http")
        && uri.host().is_some_and(|h| !h.is_empty())
        && uri.path().trim_matches('/').is_empty();
    if !ok {
        return Err(SettingsError::invalid(
            key,
            format!("{text:?} is not a base URL such as \"http://127.0.0.1:8081\""),
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// Parses a human size ("3GiB", "512 MiB", "6.5GiB"); a bare number is
/// refused because "3" is far more often a mistake than three bytes, and a
/// size of 2^64 bytes or more is refused rather than rounded.
pub fn parse_size(key: &str, text: &str) -> Result<u64, SettingsError> {
    let trimmed = text.trim();
    let not_a_size = || {
        SettingsError::invalid(
            key,
            format!("{text:?} is not a size; write e.g. \"3GiB\" or \"512MiB\""),
        )
    };
    let split = trimmed
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| {
            SettingsError::invalid(
                key,
                format!("size {text:?} has no unit; write e.g. \"3GiB\" or \"512MiB\""),
            )
        })?;
    let (number, unit) = (trimmed[..split].trim(), trimmed[split..].trim());
    // The unit's bytes, from bytesize (which knows every spelling).
    let unit_bytes = ByteSize::from_str(&format!("1 {unit}"))
        .map_err(|_| not_a_size())?
        .as_u64();
    let too_large = || {
        SettingsError::invalid(
            key,
            format!("{text:?} is more than 2^64 - 1 bytes (16 EiB), the largest size there is"),
        )
    };
    // Exact decimal arithmetic: "6.5GiB" and "9007199254740993.0B" are
    // what they say, to the byte (rounded to the nearest byte).
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || fraction.len() > 18 {
        return Err(not_a_size());
    }
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let unit = u128::from(unit_bytes);
    let mut bytes = whole.checked_mul(unit).ok_or_else(too_large)?;
    let scale = 10u128.pow(fraction.len() as u32);
    let part: u128 = fraction.parse().map_err(|_| not_a_size())?;
    // part < scale <= 10^18 < 2^60 and unit <= 2^60: the product fits.
    bytes = bytes
        .checked_add((part * unit + scale / 2) / scale)
        .ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// The longest duration a setting may name: beyond it a value is a typo,
/// and adding it to the clock could overflow.
/// (A year of 365.25 days, as humantime counts it, so "100y" is the bound.)
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// `duration`, named `key`, if it is at most [`MAX_DURATION`].
fn bounded(key: &str, duration: Duration) -> Result<Duration, SettingsError> {
    if duration > MAX_DURATION {
        return Err(SettingsError::invalid(
            key,
            format!(
                "{} is more than 100 years",
                humantime::format_duration(duration)
            ),
        ));
    }
    Ok(duration)
}

/// The machine's memory, from /proc/meminfo (`None` where it cannot be
/// read).
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A card's total: a size, or "auto" (ask NVML).
fn parse_total(key: &str, text: &str) -> Result<GpuTotal, SettingsError> {
    match text.trim() {
        "auto" => Ok(GpuTotal::Auto),
        text => match parse_size(key, text)? {
            0 => Err(SettingsError::invalid(key, "must be more than 0 bytes")),
            bytes => Ok(GpuTotal::Bytes(bytes)),
        },
    }
}

/// A card's reserve, which must leave something of a known total.
fn parse_reserve(key: &str, text: &str, total: GpuTotal) -> Result<u64, SettingsError> {
    let reserve = parse_size(key, text)?;
    if let GpuTotal::Bytes(total) = total
        && reserve >= total
    {
        return Err(SettingsError::invalid(
            key,
            format!("reserve {reserve} bytes leaves nothing of a {total}-byte card"),
        ));
    }
    Ok(reserve)
}

impl RawSettings {
    fn validate(self) -> Result<Settings, SettingsError> {
        let probe = match self.gpu.probe.as_str() {
            "auto" => ProbeChoice::Auto,
            "nvml" => ProbeChoice::Nvml,
            "none" => ProbeChoice::None,
            other => {
                return Err(SettingsError::invalid(
                    "gpu.probe",
                    format!("unknown probe {other:?} (expected auto, nvml or none)"),
                ));
            }
        };
        let total = parse_total("gpu.total", &self.gpu.total)?;
        for (key, duration) in [
            ("gpu.release_poll", self.gpu.release_poll),
            ("gpu.release_timeout", self.gpu.release_timeout),
            ("policy.lease_wait", self.policy.lease_wait),
            ("policy.load_timeout", self.policy.load_timeout),
            ("policy.unload_timeout", self.policy.unload_timeout),
            ("policy.restart_backoff", self.policy.restart_backoff),
            (
                "policy.restart_backoff_max",
                self.policy.restart_backoff_max,
            ),
            ("server.shutdown_timeout", self.server.shutdown_timeout),
            ("server.upstream_timeout", self.server.upstream_timeout),
            ("server.max_lease_ttl", self.server.max_lease_ttl),
            ("process.ready_timeout", self.process.ready_timeout),
            ("process.stop_timeout", self.process.stop_timeout),
        ] {
            bounded(key, duration)?;
        }
        if self.gpu.release_poll < Duration::from_millis(1) {
            return Err(SettingsError::invalid(
                "gpu.release_poll",
                "must be at least 1ms (a shorter pause would keep a core busy asking the card)",
            ));
        }
        let reserve = parse_reserve("gpu.reserve", &self.gpu.reserve, total)?;
        if !(0.0..=1.0).contains(&self.gpu.release_fraction) {
            return Err(SettingsError::invalid(
                "gpu.release_fraction",
                format!("{} is not between 0 and 1", self.gpu.release_fraction),
            ));
        }
        let external = parse_size("gpu.external", &self.gpu.external)?;
        let gpus = if self.gpus.is_empty() {
            vec![CardSettings {
                device: self.gpu.device.clone(),
                total,
                reserve,
                external,
            }]
        } else {
            let mut gpus = Vec::with_capacity(self.gpus.len());
            let mut devices = HashSet::new();
            for (i, raw) in self.gpus.iter().enumerate() {
                let key = |field: &str| format!("gpus[{i}].{field}");
                let device = raw.device.clone().unwrap_or_else(|| i.to_string());
                if device.trim().is_empty() {
                    return Err(SettingsError::invalid(key("device"), "must name a card"));
                }
                if !devices.insert(device.trim().to_string()) {
                    return Err(SettingsError::invalid(
                        key("device"),
                        format!("card {device:?} is listed twice"),
                    ));
                }
                let total = parse_total(&key("total"), &raw.total)?;
                let reserve = parse_reserve(
                    &key("reserve"),
                    raw.reserve.as_deref().unwrap_or("0B"),
                    total,
                )?;
                let external =
                    parse_size(&key("external"), raw.external.as_deref().unwrap_or("0B"))?;
                gpus.push(CardSettings {
                    device,
                    total,
                    reserve,
                    external,
                });
            }
            gpus
        };
        let host = HostSettings {
            budget: match self.host.budget.trim() {
                "auto" => host_memory().map_or_else(
                    || {
                        tracing::warn!("host.budget \"auto\": cannot read /proc/meminfo; nothing will be parked");
                        0
                    },
                    |total| total / 2,
                ),
                text => parse_size("host.budget", text)?,
            },
            keep_warm: parse_size("host.keep_warm", &self.host.keep_warm)?,
        };
        let order = match self.policy.order.trim() {
            "strict" => Order::Strict,
            "adaptive" => Order::Adaptive,
            other => {
                return Err(SettingsError::invalid(
                    "policy.order",
                    format!("{other:?} is not an order; use \"strict\" or \"adaptive\""),
                ));
            }
        };
        if self.policy.max_queue == 0 {
            return Err(SettingsError::invalid(
                "policy.max_queue",
                "must be at least 1",
            ));
        }
        if self.kinds.is_empty() {
            return Err(SettingsError::invalid(
                "kinds",
                "at least one kind is needed",
            ));
        }
        let mut kinds = Kinds::new();
        for (name, raw) in &self.kinds {
            let key = |field: &str| format!("kinds.{name}.{field}");
            if raw.priority > u32::from(u16::MAX) {
                return Err(SettingsError::invalid(
                    key("priority"),
                    format!("{} is not a whole number from 0 to 65535", raw.priority),
                ));
            }
            if let Some(ttl) = raw.ttl {
                bounded(&key("ttl"), ttl)?;
                if ttl.is_zero() {
                    return Err(SettingsError::invalid(key("ttl"), "must be longer than 0s"));
                }
            }
            kinds.insert(Kind::new(name.clone(), raw.priority, raw.protected));
        }
        let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
        let mut seen = HashSet::new();
        let mut models = Vec::with_capacity(self.models.len());
        for (i, raw) in self.models.into_iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            if raw.id.trim().is_empty() {
                return Err(SettingsError::invalid(key("id"), "must not be empty"));
            }
            // An id is printed in timelines, logs, JSON, metrics labels and
            // plots: a control character would break a line or an SVG.
            if raw.id.chars().any(char::is_control) {
                return Err(SettingsError::invalid(
                    key("id"),
                    format!("{:?} holds a control character", raw.id),
                ));
            }
            if !seen.insert(raw.id.clone()) {
                return Err(SettingsError::invalid(
                    key("id"),
                    format!("duplicate model id {:?}", raw.id),
                ));
            }
            if kinds.get(&raw.kind).is_none() {
                return Err(SettingsError::invalid(
                    key("kind"),
                    format!(
                        "unknown kind {:?} for model {:?} (known kinds: {})",
                        raw.kind,
                        raw.id,
                        known.join(", ")
                    ),
                ));
            }
            let bytes = parse_size(&key("vram"), &raw.vram)?;
            if bytes == 0 {
                return Err(SettingsError::invalid(
                    key("vram"),
                    "must be more than 0 bytes",
                ));
            }
            if let Some((field, owner)) = raw.foreign_field() {
                let message = match owner {
                    // The likeliest slip: a server's keys without `backend`.
                    "process" => {
                        "only a model-server process (backend = \"process\") uses it; this model is simulated (backend \"sim\", the default when none is set)"
                    }
                    _ => {
                        "only a simulated model (backend = \"sim\") uses it; this model's backend is \"process\""
                    }
                };
                return Err(SettingsError::invalid(key(field), message));
            }
            let (load_ms, unload_ms, release_ms) = (
                raw.load_ms.unwrap_or(0),
                raw.unload_ms.unwrap_or(0),
                raw.release_ms.unwrap_or(0),
            );
            for (field, ms) in [
                ("load_ms", load_ms),
                ("unload_ms", unload_ms),
                ("release_ms", release_ms),
            ] {
                bounded(&key(field), Duration::from_millis(ms))?;
            }
            for (field, duration) in [
                ("ready_timeout", raw.ready_timeout),
                ("stop_timeout", raw.stop_timeout),
            ] {
                if let Some(duration) = duration {
                    bounded(&key(field), duration)?;
                }
            }
            let backend = match raw.backend.as_str() {
                "sim" => BackendSpec::Sim(SimOptions {
                    load_ms,
                    warm_load_ms: raw.warm_load_ms.map(|w| w.min(load_ms)),
                    unload_ms,
                    fail_load: raw.fail_load.unwrap_or(false),
                    actual_bytes: raw
                        .actual_vram
                        .as_deref()
                        .map(|v| parse_size(&key("actual_vram"), v))
                        .transpose()?,
                    release_ms,
                    park: None,
                }),
                "process" => {
                    let command = raw.command.clone().unwrap_or_default();
                    if command.is_empty() || command[0].is_empty() {
                        return Err(SettingsError::invalid(
                            key("command"),
                            "a process-backed model needs `command`, an array such as [\"llama-server\", \"-m\", \"model.gguf\"]",
                        ));
                    }
                    let ready = raw.ready.as_deref().ok_or_else(|| {
                        SettingsError::invalid(
                            key("ready"),
                            "a process-backed model needs `ready`: \"http://127.0.0.1:PORT/PATH\" or \"tcp://HOST:PORT\"",
                        )
                    })?;
                    let ready_timeout = raw.ready_timeout.unwrap_or(self.process.ready_timeout);
                    let stop_timeout = raw.stop_timeout.unwrap_or(self.process.stop_timeout);
                    if ready_timeout >= self.policy.load_timeout {
                        return Err(SettingsError::invalid(
                            key("ready_timeout"),
                            format!(
                                "{} must be shorter than policy.load_timeout ({}): the load would time out first and lose the server's last answer and stderr",
                                humantime::format_duration(ready_timeout),
                                humantime::format_duration(self.policy.load_timeout)
                            ),
                        ));
                    }
                    // An unload runs `stop`, waits stop_timeout after
                    // SIGTERM, then kills: all of it within unload_timeout,
                    // or the manager would give up on a server it then kills.
                    let stopping = stop_timeout * if raw.stop.is_some() { 2 } else { 1 }
                        + crate::backends::KEEPER_MARGIN;
                    if self.policy.unload_timeout <= stopping {
                        return Err(SettingsError::invalid(
                            "policy.unload_timeout",
                            format!(
                                "{} must be longer than {} for model {:?} ({}its stop_timeout {} and 5s to kill)",
                                humantime::format_duration(self.policy.unload_timeout),
                                humantime::format_duration(stopping),
                                raw.id,
                                if raw.stop.is_some() {
                                    "its stop command, "
                                } else {
                                    ""
                                },
                                humantime::format_duration(stop_timeout)
                            ),
                        ));
                    }
                    let stop = raw.stop.clone().unwrap_or_default();
                    if raw.stop.is_some() && stop.first().is_none_or(String::is_empty) {
                        return Err(SettingsError::invalid(
                            key("stop"),
                            "`stop` must be a non-empty array such as [\"docker\", \"stop\", \"whisper\"]",
                        ));
                    }
                    // As written: `{gpu}` is replaced by the card's device
                    // when the manager starts the model on a card
                    // (`ProcessSpec::on_device`).
                    BackendSpec::Process(ProcessSpec {
                        command,
                        stop,
                        env: raw.env.clone().unwrap_or_default(),
                        cwd: raw.cwd.as_ref().map(Into::into),
                        ready: ReadyCheck::parse(ready)
                            .map_err(|m| SettingsError::invalid(key("ready"), m))?,
                        ready_timeout,
                        stop_timeout,
                        sleep: None,
                        wake: None,
                    })
                }
                other => {
                    return Err(SettingsError::invalid(
                        key("backend"),
                        format!("unknown backend {other:?} (expected \"sim\" or \"process\")"),
                    ));
                }
            };
            // A kind's ttl was checked with the kind (and is named there).
            if let Some(ttl) = raw.ttl {
                bounded(&key("ttl"), ttl)?;
                if ttl.is_zero() {
                    return Err(SettingsError::invalid(key("ttl"), "must be longer than 0s"));
                }
            }
            let ttl = raw.ttl.or(self.kinds[&raw.kind].ttl);
            let proxy = match (&raw.proxy, &backend) {
                (Some(url), _) => Some(parse_proxy(&key("proxy"), url)?),
                (None, BackendSpec::Process(spec)) => match &spec.ready {
                    crate::backends::ReadyCheck::Http(_) => {
                        Some(format!("http://{}", spec.ready.address()))
                    }
                    crate::backends::ReadyCheck::Tcp(_) => None,
                },
                (None, BackendSpec::Sim(_)) => None,
            };
            if let Some(i) = raw.files.iter().position(|f| f.trim().is_empty()) {
                return Err(SettingsError::invalid(
                    format!("{}[{i}]", key("files")),
                    "must be a path",
                ));
            }
            if let Some(list) = &raw.gpus {
                if list.is_empty() {
                    return Err(SettingsError::invalid(
                        key("gpus"),
                        "must name at least one card (leave it out for any card)",
                    ));
                }
                if let Some(&bad) = list.iter().find(|&&g| g >= gpus.len()) {
                    return Err(SettingsError::invalid(
                        key("gpus"),
                        format!(
                            "{bad} is not a card: there {} (positions from 0)",
                            match gpus.len() {
                                1 => "is 1 card".to_string(),
                                n => format!("are {n} cards"),
                            }
                        ),
                    ));
                }
            }
            // Parking: what it keeps on the card and in host RAM, and how
            // it sleeps and wakes (URLs for a server, times for the
            // simulated backend).
            let mut backend = backend;
            let park = match &raw.park {
                None => None,
                Some(park) => {
                    let key = |field: &str| format!("models[{i}].park.{field}");
                    let vram = parse_size(&key("vram"), &park.vram)?;
                    if vram >= bytes {
                        return Err(SettingsError::invalid(
                            key("vram"),
                            format!(
                                "{vram} bytes parked is not less than the model's {bytes}: parking would free nothing"
                            ),
                        ));
                    }
                    let host = parse_size(&key("host"), &park.host)?;
                    let (sleep_ms, wake_ms) =
                        (park.sleep_ms.unwrap_or(0), park.wake_ms.unwrap_or(0));
                    for (field, ms) in [("sleep_ms", sleep_ms), ("wake_ms", wake_ms)] {
                        bounded(&key(field), Duration::from_millis(ms))?;
                    }
                    match &mut backend {
                        BackendSpec::Sim(sim) => {
                            sim.park = Some(SimPark {
                                vram,
                                sleep_ms,
                                wake_ms,
                            });
                        }
                        BackendSpec::Process(spec) => {
                            let url = |field: &str, value: &Option<String>| {
                                let url = value.as_deref().ok_or_else(|| {
                                    SettingsError::invalid(
                                        key(field),
                                        format!("a process-backed model that parks needs `{field}`, the URL its server takes a POST on"),
                                    )
                                })?;
                                let uri: Result<awc::http::Uri, _> = url.parse();
                                match uri {
                                    Ok(uri)
                                        if uri.scheme_str() == Some("http")
                                            && uri.host().is_some_and(|h| !h.is_empty())
                                            && uri.port_u16().is_some() =>
                                    {
                                        Ok::<_, SettingsError>(url.to_string())
                                    }
                                    _ => Err(SettingsError::invalid(
                                        key(field),
                                        format!(
                                            "{url:?} is not a URL such as \"http://127.0.0.1:8000/sleep?level=1\""
                                        ),
                                    )),
                                }
                            };
                            spec.sleep = Some(url("sleep", &park.sleep)?);
                            spec.wake = Some(url("wake", &park.wake)?);
                        }
                    }
                    Some(vram_actors::Park { vram, host })
                }
            };
            let mut spec = ModelSpec::new(raw.id, raw.kind, bytes).pinned(raw.pinned);
            spec.park = park;
            models.push(ModelSettings {
                gpus: raw.gpus.clone(),
                spec,
                backend,
                ttl,
                proxy,
                files: raw.files.iter().map(Into::into).collect(),
            });
        }
        let server = ServerSettings {
            listen: self.server.listen.trim().parse().map_err(|e| {
                SettingsError::invalid(
                    "server.listen",
                    format!(
                        "{:?} is not HOST:PORT with an IP address ({e})",
                        self.server.listen
                    ),
                )
            })?,
            token: self.server.token,
            max_body: parse_size("server.max_body", &self.server.max_body)?,
            shutdown_timeout: self.server.shutdown_timeout,
            upstream_timeout: self.server.upstream_timeout,
            max_lease_ttl: self.server.max_lease_ttl,
        };
        Ok(Settings {
            host,
            gpus,
            server,
            gpu: GpuSettings {
                probe,
                device: self.gpu.device,
                total,
                reserve,
                release_fraction: self.gpu.release_fraction,
                release_poll: self.gpu.release_poll,
                release_timeout: self.gpu.release_timeout,
                external,
            },
            policy: PolicySettings {
                order,
                lease_wait: self.policy.lease_wait,
                load_timeout: self.policy.load_timeout,
                unload_timeout: self.policy.unload_timeout,
                max_queue: self.policy.max_queue,
                restart_backoff: self.policy.restart_backoff,
                restart_backoff_max: self.policy.restart_backoff_max,
            },
            kinds,
            models,
        })
    }
}
