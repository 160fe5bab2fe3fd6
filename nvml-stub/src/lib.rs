//! A stand-in for the NVIDIA driver's `libnvidia-ml.so.1`, so the NVML code
//! path (device by index or UUID, memory, other processes' use, errors) runs
//! in tests on machines without a GPU, through `nvml-wrapper` exactly as on
//! a real machine.
//!
//! Build it (`cargo build -p nvml-stub`), copy or link
//! `target/<profile>/libnvml_stub.so` as `libnvidia-ml.so.1` into a folder
//! on `LD_LIBRARY_PATH`, and name a state file in `VRAM_NVML_STUB`:
//!
//! ```json
//! {"cards": [{"name": "Stub 16GB", "uuid": "GPU-0000", "total": 17179869184,
//!             "used": 1073741824, "processes": [{"pid": 4242, "used": 1073741824}],
//!             "fail": null}]}
//! ```
//!
//! The file is read again on every call, so a test changes the card's state
//! (memory coming back, another process appearing) by rewriting it; a card
//! whose `fail` names an NVML error (`"gpu_lost"`, `"unknown"`, ...) answers
//! every call about it with that error. Only the entry points the project
//! uses are here: a missing symbol is an error nvml-wrapper reports when
//! that call is made, as with an old driver.

use std::ffi::{CStr, c_char, c_uint, c_ulonglong};

use serde::Deserialize;

/// NVML's return codes (`nvmlReturn_t`) that the stub answers.
mod code {
    pub const SUCCESS: u32 = 0;
    pub const UNINITIALIZED: u32 = 1;
    pub const INVALID_ARGUMENT: u32 = 2;
    pub const NOT_FOUND: u32 = 6;
    pub const INSUFFICIENT_SIZE: u32 = 7;
    pub const GPU_IS_LOST: u32 = 15;
    pub const UNKNOWN: u32 = 999;
}

/// The scripted state: the cards.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    cards: Vec<Card>,
}

/// One scripted card.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Card {
    name: String,
    uuid: String,
    total: u64,
    used: u64,
    #[serde(default)]
    processes: Vec<Process>,
    /// An NVML error every call about this card answers.
    #[serde(default)]
    fail: Option<String>,
}

/// A process holding memory on a card.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Process {
    pid: u32,
    /// Bytes; absent means "not available" (as for processes in other
    /// containers).
    used: Option<u64>,
}

/// The state as the file says now (no file, or a bad one: no cards).
fn state() -> State {
    std::env::var_os("VRAM_NVML_STUB")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// A device handle is its index plus one (never null).
type Device = usize;

/// Card `device`'s state, or the code its call answers.
fn card(device: Device) -> Result<Card, u32> {
    let mut state = state();
    if device == 0 || device > state.cards.len() {
        return Err(code::INVALID_ARGUMENT);
    }
    let card = state.cards.swap_remove(device - 1);
    match card.fail.as_deref() {
        None => Ok(card),
        Some("gpu_lost") => Err(code::GPU_IS_LOST),
        Some("uninitialized") => Err(code::UNINITIALIZED),
        Some(_) => Err(code::UNKNOWN),
    }
}

/// Copies `text` into the caller's buffer of `length` bytes, NUL-ended.
///
/// # Safety
/// `buffer` must be valid for `length` bytes.
unsafe fn copy_out(text: &str, buffer: *mut c_char, length: c_uint) -> u32 {
    let bytes = text.as_bytes();
    if buffer.is_null() || bytes.len() + 1 > length as usize {
        return code::INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave `length` writable bytes; we write len + 1.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.cast::<u8>(), bytes.len());
        *buffer.add(bytes.len()) = 0;
    }
    code::SUCCESS
}

/// `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> u32 {
    code::SUCCESS
}

/// `nvmlInitWithFlags`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> u32 {
    code::SUCCESS
}

/// `nvmlShutdown`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> u32 {
    code::SUCCESS
}

/// `nvmlErrorString`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: u32) -> *const c_char {
    let text: &'static CStr = match result {
        code::SUCCESS => c"Success",
        code::INVALID_ARGUMENT => c"Invalid Argument",
        code::NOT_FOUND => c"Not Found",
        code::INSUFFICIENT_SIZE => c"Insufficient Size",
        code::GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `count` must be valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> u32 {
    if count.is_null() {
        return code::INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; the caller owns it.
    unsafe { *count = state().cards.len() as c_uint };
    code::SUCCESS
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
/// `device` must be valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Device) -> u32 {
    if device.is_null() || index as usize >= state().cards.len() {
        return code::INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe { *device = index as usize + 1 };
    code::SUCCESS
}

/// `nvmlDeviceGetHandleByUUID`.
///
/// # Safety
/// `uuid` must be a NUL-ended string; `device` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut Device,
) -> u32 {
    if uuid.is_null() || device.is_null() {
        return code::INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a NUL-ended string.
    let wanted = unsafe { CStr::from_ptr(uuid) }.to_string_lossy();
    match state().cards.iter().position(|c| c.uuid == wanted) {
        Some(i) => {
            // SAFETY: checked non-null.
            unsafe { *device = i + 1 };
            code::SUCCESS
        }
        None => code::NOT_FOUND,
    }
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` must be valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: Device, index: *mut c_uint) -> u32 {
    if index.is_null() {
        return code::INVALID_ARGUMENT;
    }
    match card(device) {
        Ok(_) => {
            // SAFETY: checked non-null.
            unsafe { *index = (device - 1) as c_uint };
            code::SUCCESS
        }
        Err(e) => e,
    }
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` must be valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: Device,
    name: *mut c_char,
    length: c_uint,
) -> u32 {
    match card(device) {
        // SAFETY: passed on from the caller.
        Ok(card) => unsafe { copy_out(&card.name, name, length) },
        Err(e) => e,
    }
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` must be valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Device,
    uuid: *mut c_char,
    length: c_uint,
) -> u32 {
    match card(device) {
        // SAFETY: passed on from the caller.
        Ok(card) => unsafe { copy_out(&card.uuid, uuid, length) },
        Err(e) => e,
    }
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlDeviceGetMemoryInfo_v2`.
///
/// # Safety
/// `memory` must be valid for a write of an `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: Device, memory: *mut MemoryV2) -> u32 {
    if memory.is_null() {
        return code::INVALID_ARGUMENT;
    }
    match card(device) {
        Ok(card) => {
            let used = card.used.min(card.total);
            // SAFETY: checked non-null; the caller set `version` and owns the rest.
            unsafe {
                (*memory).total = card.total;
                (*memory).reserved = 0;
                (*memory).used = used;
                (*memory).free = card.total - used;
            }
            code::SUCCESS
        }
        Err(e) => e,
    }
}

/// `nvmlProcessInfo_t` (v2 layout, used by the `_v3` calls).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// NVML's "value not available".
const NOT_AVAILABLE: u64 = u64::MAX;

/// The processes of `device` into the caller's array of `*count`.
///
/// # Safety
/// `count` must be valid; `infos` valid for `*count` entries (or null).
unsafe fn processes(device: Device, count: *mut c_uint, infos: *mut ProcessInfo) -> u32 {
    if count.is_null() {
        return code::INVALID_ARGUMENT;
    }
    let card = match card(device) {
        Ok(card) => card,
        Err(e) => return e,
    };
    // SAFETY: checked non-null.
    let room = unsafe { *count } as usize;
    let found = card.processes.len();
    // SAFETY: checked non-null.
    unsafe { *count = found as c_uint };
    if found == 0 {
        return code::SUCCESS;
    }
    if infos.is_null() || room < found {
        return code::INSUFFICIENT_SIZE;
    }
    for (i, p) in card.processes.iter().enumerate() {
        // SAFETY: `room >= found` entries are writable.
        unsafe {
            *infos.add(i) = ProcessInfo {
                pid: p.pid,
                used_gpu_memory: p.used.unwrap_or(NOT_AVAILABLE),
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            };
        }
    }
    code::SUCCESS
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`.
///
/// # Safety
/// `count` must be valid; `infos` valid for `*count` entries (or null).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> u32 {
    // SAFETY: passed on from the caller.
    unsafe { processes(device, count, infos) }
}

/// `nvmlDeviceGetGraphicsRunningProcesses_v3`: none (a headless card).
///
/// # Safety
/// `count` must be valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    _infos: *mut ProcessInfo,
) -> u32 {
    if count.is_null() {
        return code::INVALID_ARGUMENT;
    }
    match card(device) {
        Ok(_) => {
            // SAFETY: checked non-null.
            unsafe { *count = 0 };
            code::SUCCESS
        }
        Err(e) => e,
    }
}
