//! `GpuProbe`: what the card itself says about its memory. The ledger
//! holds declared sizes; the card knows about other processes, memory that
//! has not been returned yet, and models larger than they claimed.
//!
//! Futures are local: a probe whose calls block (NVML) must run them on a
//! blocking thread itself, never on the manager's arbiter.

use futures::future::LocalBoxFuture;

/// The card's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct GpuMemory {
    /// Installed memory.
    pub total: u64,
    /// Memory in use by anyone.
    pub used: u64,
    /// Memory nobody uses.
    pub free: u64,
}

/// One process using the card.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuProcess {
    /// Its process id.
    pub pid: u32,
    /// Bytes it uses, when the driver says.
    pub used: Option<u64>,
}

/// Why the card could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

/// What a probe answers.
pub type ProbeFuture<T> = LocalBoxFuture<'static, Result<T, ProbeError>>;

/// Reads the memory of one card.
pub trait GpuProbe {
    /// The card's total, used and free bytes now.
    fn memory(&self) -> ProbeFuture<GpuMemory>;

    /// The same, when the probe can answer at once without blocking (a
    /// simulated card): it spares the future. `None` (the default): ask
    /// [`memory`](Self::memory).
    fn memory_at_once(&self) -> Option<Result<GpuMemory, ProbeError>> {
        None
    }

    /// The processes using the card, if the probe can tell.
    fn processes(&self) -> ProbeFuture<Vec<GpuProcess>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
