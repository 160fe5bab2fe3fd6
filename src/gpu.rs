//! The card: [`NvmlProbe`] asks a real NVIDIA card through NVML;
//! [`SimCard`] is a simulated card that the simulated backend allocates on,
//! for scenarios and tests; [`resolve`] picks what the settings ask for.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use tokio::time::Instant;
use vram_actors::{ArcStr, GpuMemory, GpuProbe, GpuProcess, ProbeError, ProbeFuture};

use crate::config::{GpuTotal, ProbeChoice, Settings, SettingsError};

// ------------------------------------------------------------------- NVML

/// One card as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// NVML index.
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA GeForce RTX 4080".
    pub name: String,
    /// The card's UUID ("GPU-...").
    pub uuid: String,
    /// Installed memory, bytes.
    pub total: u64,
    /// Used memory, bytes.
    pub used: u64,
    /// Free memory, bytes.
    pub free: u64,
    /// Processes using the card.
    pub processes: Vec<GpuProcess>,
}

/// A card read through NVML. Every NVML call blocks, so each runs on the
/// blocking thread pool, never on the manager's arbiter.
#[derive(Clone)]
pub struct NvmlProbe {
    nvml: Arc<Nvml>,
    device: String,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlProbe")
            .field("device", &self.device)
            .finish()
    }
}

fn nvml_error(e: impl std::fmt::Display) -> ProbeError {
    ProbeError(format!("NVML: {e}"))
}

impl NvmlProbe {
    /// Loads the NVIDIA management library and checks that `device` (an
    /// index such as "0", or a UUID) exists.
    pub fn open(device: &str) -> Result<Self, ProbeError> {
        let nvml = Nvml::init().map_err(nvml_error)?;
        let probe = Self {
            nvml: Arc::new(nvml),
            device: device.to_string(),
        };
        probe.read_device()?;
        Ok(probe)
    }

    fn read_device(&self) -> Result<DeviceInfo, ProbeError> {
        let device = match self.device.parse::<u32>() {
            Ok(index) => self.nvml.device_by_index(index),
            Err(_) => self.nvml.device_by_uuid(self.device.as_str()),
        }
        .map_err(|e| ProbeError(format!("NVML: no device {:?}: {e}", self.device)))?;
        device_info(&device)
    }

    /// Every card NVML sees.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ProbeError> {
        let count = self.nvml.device_count().map_err(nvml_error)?;
        (0..count)
            .map(|i| {
                self.nvml
                    .device_by_index(i)
                    .map_err(nvml_error)
                    .and_then(|d| device_info(&d))
            })
            .collect()
    }

    /// The card's total memory, bytes (blocking).
    pub fn total_now(&self) -> Result<u64, ProbeError> {
        self.read_device().map(|d| d.total)
    }

    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&NvmlProbe) -> Result<T, ProbeError> + Send + 'static,
    ) -> ProbeFuture<T> {
        let probe = self.clone();
        Box::pin(async move {
            actix_rt::task::spawn_blocking(move || f(&probe))
                .await
                .map_err(|e| ProbeError(format!("NVML call did not finish: {e}")))?
        })
    }
}

fn device_info(device: &nvml_wrapper::Device<'_>) -> Result<DeviceInfo, ProbeError> {
    let memory = device.memory_info().map_err(nvml_error)?;
    let mut processes: Vec<GpuProcess> = Vec::new();
    for list in [
        device.running_compute_processes(),
        device.running_graphics_processes(),
    ] {
        // Not every card or driver lists processes; that is not an error.
        for p in list.unwrap_or_default() {
            if processes.iter().any(|q| q.pid == p.pid) {
                continue;
            }
            let used = match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Some(bytes),
                UsedGpuMemory::Unavailable => None,
            };
            processes.push(GpuProcess { pid: p.pid, used });
        }
    }
    Ok(DeviceInfo {
        index: device.index().map_err(nvml_error)?,
        name: device.name().map_err(nvml_error)?,
        uuid: device.uuid().map_err(nvml_error)?,
        total: memory.total,
        used: memory.used,
        free: memory.free,
        processes,
    })
}

impl GpuProbe for NvmlProbe {
    fn memory(&self) -> ProbeFuture<GpuMemory> {
        self.blocking(|p| {
            p.read_device().map(|d| GpuMemory {
                total: d.total,
                used: d.used,
                free: d.free,
            })
        })
    }

    fn processes(&self) -> ProbeFuture<Vec<GpuProcess>> {
        self.blocking(|p| p.read_device().map(|d| d.processes))
    }
}

/// What the settings resolve to.
#[derive(Debug, Clone)]
pub struct GpuChoice {
    /// The real card, when NVML is used.
    pub nvml: Option<NvmlProbe>,
    /// Usable bytes: total (configured or the card's) less the reserve.
    pub capacity: u64,
    /// Why NVML is not used, when it is not.
    pub fallback: Option<String>,
}

/// Resolves `[gpu]`: `probe = "auto"` uses NVML when the NVIDIA library
/// loads and otherwise the configured total (saying so in one info line);
/// `probe = "nvml"` and `total = "auto"` need NVML and fail without it.
pub fn resolve(settings: &Settings) -> Result<GpuChoice, SettingsError> {
    resolve_card(settings, 0)
}

/// Whether the manager of card `index` asks the real card at all: for its
/// process-backed models (a real server uses real memory), or for its
/// total when that is "auto". A card whose every model is simulated is
/// its simulated card, whatever `gpu.probe` says.
pub fn asks_the_card(settings: &Settings, index: usize) -> bool {
    let any_process = settings
        .models
        .iter()
        .any(|m| m.may_go_on(index) && matches!(m.backend, crate::config::BackendSpec::Process(_)));
    any_process
        || settings
            .gpus
            .get(index)
            .is_none_or(|c| c.capacity().is_none())
}

/// [`resolve`] for card `index` of [`Settings::gpus`]: its device, total
/// and reserve, with `gpu.probe`'s choice. Errors name `gpus[i].total`
/// when the cards come from `[[gpus]]`.
pub fn resolve_card(settings: &Settings, index: usize) -> Result<GpuChoice, SettingsError> {
    let probe_choice = settings.gpu.probe;
    let card = settings
        .gpus
        .get(index)
        .cloned()
        .unwrap_or_else(|| crate::config::CardSettings {
            device: settings.gpu.device.clone(),
            total: settings.gpu.total,
            reserve: settings.gpu.reserve,
            external: settings.gpu.external,
        });
    let listed = settings.gpus.len() > 1;
    let total_key = if listed {
        format!("gpus[{index}].total")
    } else {
        "gpu.total".to_string()
    };
    let opened = match probe_choice {
        ProbeChoice::None => Err(ProbeError("gpu.probe is \"none\"".to_string())),
        ProbeChoice::Auto | ProbeChoice::Nvml => NvmlProbe::open(&card.device),
    };
    let invalid = |key: &str, message: String| SettingsError::Invalid {
        key: key.to_string(),
        message,
    };
    match opened {
        Ok(probe) => {
            let total = match card.total {
                GpuTotal::Bytes(b) => b,
                GpuTotal::Auto => probe.total_now().map_err(|e| invalid(&total_key, e.0))?,
            };
            Ok(GpuChoice {
                nvml: Some(probe),
                capacity: total.saturating_sub(card.reserve),
                fallback: None,
            })
        }
        Err(e) if probe_choice == ProbeChoice::Nvml => Err(invalid(
            "gpu.probe",
            format!(
                "\"nvml\" needs the NVIDIA driver's NVML library, which could not be used: {e}"
            ),
        )),
        Err(e) => {
            let GpuTotal::Bytes(total) = card.total else {
                return Err(invalid(
                    &total_key,
                    format!(
                        "\"auto\" needs NVML to read the card's total, which could not be used: {e}"
                    ),
                ));
            };
            let reason = if probe_choice == ProbeChoice::None {
                e.0
            } else {
                format!("no NVIDIA driver found ({e})")
            };
            tracing::info!(reason = %reason, total, "not asking the card; using the configured total");
            Ok(GpuChoice {
                nvml: None,
                capacity: total.saturating_sub(card.reserve),
                fallback: Some(reason),
            })
        }
    }
}

// ---------------------------------------------------------- simulated card

#[derive(Debug)]
struct CardState {
    total: u64,
    external: u64,
    allocations: foldhash::HashMap<ArcStr, u64>,
    /// The sum of `allocations`, kept as they change (wide: sizes near
    /// 2^64 add up without wrapping).
    allocated: u128,
    /// Memory of unloaded models that the "driver" has not returned yet.
    releasing: Vec<(Instant, u64)>,
    peak: u64,
    /// A load asked for more than the card had at that moment.
    overcommitted: bool,
    /// The most other processes held.
    external_peak: u64,
}

impl CardState {
    /// Bytes in use now (saturating: settings may name sizes near 2^64).
    fn used(&mut self) -> u64 {
        if !self.releasing.is_empty() {
            let now = Instant::now();
            self.releasing.retain(|(at, _)| *at > now);
        }
        let allocated = u64::try_from(self.allocated).unwrap_or(u64::MAX);
        let releasing = self
            .releasing
            .iter()
            .fold(0u64, |sum, (_, b)| sum.saturating_add(*b));
        self.external
            .saturating_add(allocated)
            .saturating_add(releasing)
    }
}

/// A simulated card: other processes' use, allocations by the simulated
/// backend, and memory that comes back only `release_ms` after an unload.
/// Clones share the card.
#[derive(Debug, Clone)]
pub struct SimCard {
    state: Rc<RefCell<CardState>>,
}

impl SimCard {
    /// A card of `total` bytes, `external` of them used by other processes.
    pub fn new(total: u64, external: u64) -> Self {
        Self {
            state: Rc::new(RefCell::new(CardState {
                total,
                external,
                allocations: Default::default(),
                allocated: 0,
                releasing: Vec::new(),
                peak: external,
                overcommitted: false,
                external_peak: external,
            })),
        }
    }

    /// Sets other processes' use. Their use is theirs: it is recorded
    /// (`external_peak`), and a load that then asks for more than is left
    /// over-commits, but the use itself does not.
    pub fn set_external(&self, bytes: u64) {
        let mut state = self.state.borrow_mut();
        state.external = bytes;
        state.external_peak = state.external_peak.max(bytes);
        let used = state.used();
        state.peak = state.peak.max(used);
    }

    /// Allocates `bytes` for model `id`, or fails (out of memory) when the
    /// card lacks room at this moment, noting that a load asked for more
    /// than the card had.
    pub fn allocate(&self, id: impl Into<ArcStr>, bytes: u64) -> Result<(), String> {
        let id = id.into();
        let mut state = self.state.borrow_mut();
        let used = state.used();
        let free = state.total.saturating_sub(used);
        if bytes > free {
            state.overcommitted = true;
            return Err(format!(
                "CUDA out of memory: {id} needs {bytes} bytes, the card has {free} free"
            ));
        }
        // One hash of the id: a model's first allocation is the usual case.
        let added = match state.allocations.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut held) => {
                let before = *held.get();
                *held.get_mut() = before.saturating_add(bytes);
                *held.get() - before
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(bytes);
                bytes
            }
        };
        state.allocated += u128::from(added);
        state.peak = state.peak.max(used.saturating_add(bytes));
        Ok(())
    }

    /// Frees model `id`'s memory `after` from now.
    pub fn release(&self, id: &str, after: Duration) {
        let mut state = self.state.borrow_mut();
        if let Some(bytes) = state.allocations.remove(id) {
            state.allocated -= u128::from(bytes);
            if !after.is_zero() {
                // An absurd delay is "not in this run", not an overflow.
                let at = Instant::now()
                    .checked_add(after)
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
                state.releasing.push((at, bytes));
            }
        }
    }

    /// Shrinks model `id`'s memory to `to` bytes, the rest freed `after`
    /// from now (a model parking: it keeps its residual).
    pub fn shrink(&self, id: &str, to: u64, after: Duration) {
        let mut state = self.state.borrow_mut();
        let Some(held) = state.allocations.get_mut(id) else {
            return;
        };
        let freed = held.saturating_sub(to);
        *held = (*held).min(to);
        state.allocated -= u128::from(freed);
        if freed > 0 && !after.is_zero() {
            let at = Instant::now()
                .checked_add(after)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
            state.releasing.push((at, freed));
        }
    }

    /// Frees everything of these models at once (their server died).
    pub fn release_all<'a>(&self, ids: impl IntoIterator<Item = &'a ArcStr>) {
        for id in ids {
            self.release(id, Duration::ZERO);
        }
    }

    /// Memory now.
    pub fn memory_now(&self) -> GpuMemory {
        let mut state = self.state.borrow_mut();
        let used = state.used();
        GpuMemory {
            total: state.total,
            used,
            free: state.total.saturating_sub(used),
        }
    }

    /// The highest use seen, bytes.
    pub fn peak(&self) -> u64 {
        self.state.borrow().peak
    }

    /// Whether a load ever asked for more than the card had at that
    /// moment.
    pub fn overcommitted(&self) -> bool {
        self.state.borrow().overcommitted
    }

    /// The most other processes held, bytes.
    pub fn external_peak(&self) -> u64 {
        self.state.borrow().external_peak
    }
}

impl GpuProbe for SimCard {
    fn memory(&self) -> ProbeFuture<GpuMemory> {
        let memory = self.memory_now();
        Box::pin(async move { Ok(memory) })
    }

    fn memory_at_once(&self) -> Option<Result<GpuMemory, ProbeError>> {
        Some(Ok(self.memory_now()))
    }
}
