//! The `Backend` trait: what the manager asks of whatever actually puts a
//! model on the card (a simulated backend, a model-server process, ...).
//!
//! Futures are local (`!Send`): every backend runs inside its own
//! `BackendActor` on the manager's arbiter, so it may hold `Rc` state.
//! A backend that blocks a thread (process spawning, NVML) must move that
//! work off the arbiter itself.

use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;

use crate::model::ModelSpec;

/// Why a backend could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What went wrong, for people.
    pub message: String,
    /// Set when the backend gave up waiting (the model server never became
    /// ready): the manager answers `timeout` rather than `backend_failed`.
    pub timed_out_after: Option<Duration>,
}

impl BackendError {
    /// A failure with this message (`backend_failed`).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            timed_out_after: None,
        }
    }

    /// A wait that ran out after `after` (`timeout`).
    pub fn timeout(message: impl Into<String>, after: Duration) -> Self {
        Self {
            message: message.into(),
            timed_out_after: Some(after),
        }
    }
}

/// A model that left the card by itself (its server process exited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelExit {
    /// The model.
    pub model: String,
    /// Why, e.g. the exit status and the last lines of stderr.
    pub reason: String,
}

/// How a backend reports models that leave on their own.
pub type ExitNotifier = Rc<dyn Fn(ModelExit)>;

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

    /// Registers who to tell when a loaded model leaves by itself (a model
    /// server that exits while resident). Called each time the backend's
    /// actor starts. The default never reports anything.
    fn watch(&self, _notify: ExitNotifier) {}
}
