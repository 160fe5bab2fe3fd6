//! The `Backend` trait: what the manager asks of whatever actually puts a
//! model on the card (a simulated backend, a model-server process, ...).
//!
//! Futures are local (`!Send`): every backend runs inside its own
//! `BackendActor` on the manager's arbiter, so it may hold `Rc` state.
//! A backend that blocks a thread (process spawning, NVML) must move that
//! work off the arbiter itself.

use futures::future::LocalBoxFuture;

use crate::model::ModelSpec;

/// Why a backend could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl BackendError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// What a backend answers: a local future.
pub type BackendFuture<T> = LocalBoxFuture<'static, Result<T, BackendError>>;

/// Loads and unloads models of one kind.
///
/// The manager never asks a backend to do two things at once, and never
/// asks it to load a model it already reported loaded.
pub trait Backend {
    /// Puts `model` on the card; resolves when it is usable.
    fn load(&self, model: &ModelSpec) -> BackendFuture<()>;

    /// Takes model `id` off the card; resolves when its memory is released.
    /// Unloading a model that is not loaded succeeds.
    fn unload(&self, id: &str) -> BackendFuture<()>;

    /// The ids of the models this backend holds right now.
    fn loaded(&self) -> BackendFuture<Vec<String>>;

    /// Called when the backend's actor restarts after a crash: forget (and
    /// free) whatever half-done state the crash left. The default does
    /// nothing.
    fn reset(&self) {}
}
