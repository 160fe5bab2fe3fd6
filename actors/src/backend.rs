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

/// A call that finished before its backend answered: `Ok(())` at once,
/// without the allocation a boxed `async { Ok(()) }` or `ready(Ok(()))`
/// costs (this future has no size, and boxing it allocates nothing).
///
/// ```
/// use futures::FutureExt;
/// assert_eq!(vram_actors::done().now_or_never(), Some(Ok(())));
/// ```
pub fn done() -> BackendFuture<()> {
    Box::pin(Done)
}

/// The future of [`done`].
struct Done;

impl std::future::Future for Done {
    type Output = Result<(), BackendError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

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

    /// Parks `id`: its server leaves the card but keeps running (e.g.
    /// vLLM's sleep mode), holding what its settings call its parked
    /// residual. The default cannot: the manager then stops it instead.
    fn park(&self, id: &str) -> BackendFuture<()> {
        let id = id.to_string();
        Box::pin(async move { Err(BackendError::new(format!("{id} cannot be parked"))) })
    }

    /// Wakes the parked `id`: it is usable again. The default cannot.
    fn wake(&self, id: &str) -> BackendFuture<()> {
        let id = id.to_string();
        Box::pin(async move { Err(BackendError::new(format!("{id} cannot be woken"))) })
    }

    /// The ids of the models this backend holds right now (parked ones
    /// included: their servers run).
    fn loaded(&self) -> BackendFuture<Vec<String>>;

    /// The ids of the models of [`Backend::loaded`] that are surely asleep
    /// right now: parked by [`Backend::park`] (once it succeeded), and no
    /// [`Backend::wake`] started since. The manager asks with `loaded()`
    /// when it rebuilds its ledger after its own restart: a sleeping model
    /// is then recorded asleep, charged only its residual and woken before
    /// a request reaches it, not taken for an awake one. Anything in doubt
    /// (a sleep or a wake under way, a wake that failed) must be left out:
    /// it is then charged its whole size, never less than it may hold. An
    /// error counts as none asleep. The default: none (right for a backend
    /// that never parks).
    fn parked(&self) -> BackendFuture<Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Called when the backend's actor restarts after a crash: forget (and
    /// free) whatever half-done state the crash left. The default does
    /// nothing.
    fn reset(&self) {}

    /// Registers who to tell when a loaded model leaves by itself (a model
    /// server that exits while resident). Called each time the backend's
    /// actor starts. The default never reports anything.
    fn watch(&self, _notify: ExitNotifier) {}

    /// Stops serving for good: takes every model off the card. Called once,
    /// when the manager shuts down, directly rather than through the
    /// backend's actor, so it may run while another call (a long load) is
    /// still in flight; that call may then fail.
    ///
    /// Takes the `Rc` the manager holds the backend in, so the future can
    /// keep using the backend. The default unloads every model
    /// [`loaded`](Backend::loaded) reports, one after another, tries them
    /// all even when one fails, and answers the first error.
    fn shutdown(self: Rc<Self>) -> BackendFuture<()>
    where
        Self: 'static,
    {
        Box::pin(async move {
            let mut first_error = None;
            for id in self.loaded().await? {
                if let Err(e) = self.unload(&id).await {
                    tracing::warn!(model = %id, error = %e, "could not unload at shutdown");
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}

/// What a backend holds, as its actor answers a listing (the ledger
/// rebuilt after a restart starts from it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Held {
    /// Every model it holds, parked ones included (their servers run).
    pub(crate) loaded: Vec<String>,
    /// Those of them that are parked (asleep).
    pub(crate) parked: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Holds `a`, `b` and `c`; unloading `b` fails.
    #[derive(Default)]
    struct Three {
        held: RefCell<Vec<String>>,
    }

    impl Backend for Three {
        fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
            self.held.borrow_mut().push(model.id.to_string());
            Box::pin(async { Ok(()) })
        }
        fn unload(&self, id: &str) -> BackendFuture<()> {
            if id == "b" {
                return Box::pin(async { Err(BackendError::new("b is stuck")) });
            }
            self.held.borrow_mut().retain(|m| m != id);
            Box::pin(async { Ok(()) })
        }
        fn loaded(&self) -> BackendFuture<Vec<String>> {
            let held = self.held.borrow().clone();
            Box::pin(async move { Ok(held) })
        }
    }

    #[test]
    fn the_default_shutdown_unloads_everything_and_answers_the_first_error() {
        let backend = Rc::new(Three::default());
        for id in ["a", "b", "c"] {
            drop(backend.load(&ModelSpec::new(id, "llm", 1)));
        }
        let result = futures::executor::block_on(backend.clone().shutdown());
        assert_eq!(result, Err(BackendError::new("b is stuck")));
        assert_eq!(
            *backend.held.borrow(),
            ["b"],
            "c was unloaded after b failed"
        );
    }
}
