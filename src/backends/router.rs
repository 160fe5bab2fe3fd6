//! The backend of one kind when its models use different backends: each
//! call goes to the backend that serves that model.

use std::rc::Rc;

use vram_actors::{Backend, BackendFuture, ExitNotifier, ModelSpec};

use super::{ProcessBackend, SimBackend};

/// Sends process-backed models to a [`ProcessBackend`] and the rest to a
/// [`SimBackend`].
#[derive(Debug, Clone)]
pub struct Router {
    /// The simulated models of the kind.
    pub sim: SimBackend,
    /// The process-backed models of the kind.
    pub process: ProcessBackend,
}

impl Backend for Router {
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        if self.process.serves(&model.id) {
            self.process.load(model)
        } else {
            self.sim.load(model)
        }
    }

    fn unload(&self, id: &str) -> BackendFuture<()> {
        if self.process.serves(id) {
            self.process.unload(id)
        } else {
            self.sim.unload(id)
        }
    }

    fn park(&self, id: &str) -> BackendFuture<()> {
        if self.process.serves(id) {
            self.process.park(id)
        } else {
            self.sim.park(id)
        }
    }

    fn wake(&self, id: &str) -> BackendFuture<()> {
        if self.process.serves(id) {
            self.process.wake(id)
        } else {
            self.sim.wake(id)
        }
    }

    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let (sim, process) = (self.sim.loaded(), self.process.loaded());
        Box::pin(async move {
            let mut ids = sim.await?;
            ids.extend(process.await?);
            Ok(ids)
        })
    }

    fn parked(&self) -> BackendFuture<Vec<String>> {
        let (sim, process) = (Backend::parked(&self.sim), self.process.parked());
        Box::pin(async move {
            let mut ids = sim.await?;
            ids.extend(process.await?);
            Ok(ids)
        })
    }

    fn reset(&self) {
        self.sim.reset();
        self.process.reset();
    }

    fn watch(&self, notify: ExitNotifier) {
        self.process.watch(notify);
    }

    /// Shuts both backends down at once (each by its own `shutdown`);
    /// answers the first error.
    fn shutdown(self: Rc<Self>) -> BackendFuture<()> {
        let sim = Rc::new(self.sim.clone()).shutdown();
        let process = Rc::new(self.process.clone()).shutdown();
        Box::pin(async move {
            let (sim, process) = futures::join!(sim, process);
            sim.and(process)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SimOptions, SimPark};
    use futures::executor::block_on;

    #[test]
    fn the_parked_models_of_both_backends_are_listed() {
        let options = SimOptions {
            park: Some(SimPark::default()),
            ..SimOptions::default()
        };
        let sim = SimBackend::new([("a".to_string(), options)].into_iter().collect());
        let router = Router {
            sim,
            process: ProcessBackend::default(),
        };
        block_on(router.load(&ModelSpec::new("a", "llm", 1))).unwrap();
        assert!(block_on(Backend::parked(&router)).unwrap().is_empty());
        block_on(router.park("a")).unwrap();
        assert_eq!(block_on(Backend::parked(&router)).unwrap(), ["a"]);
        block_on(router.wake("a")).unwrap();
        assert!(block_on(Backend::parked(&router)).unwrap().is_empty());
    }

    #[actix_rt::test]
    async fn a_model_being_woken_is_not_listed_asleep() {
        tokio::time::pause();
        let options = SimOptions {
            park: Some(SimPark {
                wake_ms: 1_000,
                ..SimPark::default()
            }),
            ..SimOptions::default()
        };
        let sim = SimBackend::new([("a".to_string(), options)].into_iter().collect());
        sim.load(&ModelSpec::new("a", "llm", 1)).await.unwrap();
        sim.park("a").await.unwrap();
        assert_eq!(Backend::parked(&sim).await.unwrap(), ["a"]);
        // Mid-wake it may hold its whole size at any moment: not asleep.
        let mut waking = sim.wake("a");
        assert!(futures::poll!(&mut waking).is_pending());
        assert!(Backend::parked(&sim).await.unwrap().is_empty());
        waking.await.unwrap();
        assert!(Backend::parked(&sim).await.unwrap().is_empty());
    }
}
