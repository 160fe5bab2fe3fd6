//! `GpuProbe`: what the card itself says about its memory. The ledger
//! holds declared sizes; the card knows about other processes, memory that
//! has not been returned yet, and models larger than they claimed.
//!
//! Futures are local: a probe whose calls block (NVML) must run them on a
//! blocking thread itself, never on the manager's arbiter.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::LocalBoxFuture;

use crate::error::panic_text;

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
///
/// A read that panics (while it is made, or while its future runs) is a
/// failed read, as a [`ProbeError`] is: the manager catches the panic; a
/// plan then counts on the ledger alone, a load's measurement leaves the
/// model unmeasured, and a card snapshot leaves the card's free memory
/// out.
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

/// [`GpuProbe::memory_at_once`], with a panic inside the probe answered as
/// a [`ProbeError`]: a probe is the embedding app's code, and its panic
/// must not take the manager or a backend actor down with it (a failed
/// read is handled as any other; see [`GpuProbe`]).
pub(crate) fn guarded_read_at_once(probe: &dyn GpuProbe) -> Option<Result<GpuMemory, ProbeError>> {
    std::panic::catch_unwind(AssertUnwindSafe(|| probe.memory_at_once()))
        .unwrap_or_else(|panic| Some(Err(panicked(&panic))))
}

/// [`GpuProbe::memory`], with a panic while the probe builds or runs its
/// future answered as a [`ProbeError`] (see [`guarded_read_at_once`]).
pub(crate) fn guarded_read(probe: &dyn GpuProbe) -> ProbeFuture<GpuMemory> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| probe.memory())) {
        Ok(read) => Box::pin(
            AssertUnwindSafe(read)
                .catch_unwind()
                .map(|outcome| outcome.unwrap_or_else(|panic| Err(panicked(&panic)))),
        ),
        Err(panic) => Box::pin(std::future::ready(Err(panicked(&panic)))),
    }
}

fn panicked(panic: &Box<dyn std::any::Any + Send>) -> ProbeError {
    ProbeError(format!("the probe panicked: {}", panic_text(panic)))
}
