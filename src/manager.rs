//! Starting a manager from settings: one backend per kind, the
//! `VramActor` over them, on the current actix arbiter. Simulated backends
//! run on a simulated card sized by `gpu.total`, which is also the
//! manager's probe, so plans, waits and calibration behave as on a real
//! card.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use actix::prelude::*;
use vram_actors::{
    Backend, GpuProbe, Lease, Loaded, ManagerConfig, Shutdown, VramActor, VramError, VramHandle,
};

use crate::backends::{ProcessBackend, Router, SimBackend};
use crate::config::{BackendSpec, Settings, SettingsError};
use crate::gpu::{self, SimCard};

/// A running manager and handles on its simulated backends and card.
#[derive(Debug, Clone)]
pub struct Manager {
    /// The manager's address: send it `Load`, `Acquire`, `Status`, ...
    pub addr: Addr<VramActor>,
    /// The simulated backend of each kind, for inspection.
    pub sims: BTreeMap<String, SimBackend>,
    /// The process backend of each kind, for inspection (child pids).
    pub processes: BTreeMap<String, ProcessBackend>,
    /// The simulated card the simulated backends allocate on.
    pub card: SimCard,
}

impl Manager {
    /// The actor configuration these settings describe.
    pub fn config(settings: &Settings) -> Result<ManagerConfig, SettingsError> {
        let capacity = settings.capacity().ok_or_else(|| SettingsError::Invalid {
            key: "gpu.total".to_string(),
            message: "\"auto\" needs NVML to read the card's total; give a size such as \"16GiB\""
                .to_string(),
        })?;
        Ok(Self::config_with(settings, capacity))
    }

    /// The manager's configuration for a card of `capacity` usable bytes.
    fn config_with(settings: &Settings, capacity: u64) -> ManagerConfig {
        ManagerConfig {
            capacity,
            kinds: settings.kinds.clone(),
            catalog: settings.catalog(),
            lease_wait: settings.policy.lease_wait,
            load_timeout: settings.policy.load_timeout,
            unload_timeout: settings.policy.unload_timeout,
            max_queue: settings.policy.max_queue,
            order: settings.policy.order,
            restart_backoff: settings.policy.restart_backoff,
            restart_backoff_max: settings.policy.restart_backoff_max,
            reserve: settings.gpu.reserve,
            release_fraction: settings.gpu.release_fraction,
            release_poll: settings.gpu.release_poll,
            release_timeout: settings.gpu.release_timeout,
            ttl: settings
                .models
                .iter()
                .filter_map(|m| m.ttl.map(|t| (m.spec.id.clone(), t)))
                .collect(),
        }
    }

    /// Starts a manager on the current arbiter (call inside a running
    /// actix `System`).
    ///
    /// With only simulated models, the manager's probe is the simulated
    /// card. With process-backed models it is the real card through NVML
    /// when `gpu.probe` finds one (see [`crate::gpu::resolve`]), else none.
    pub fn start(settings: &Settings) -> Result<Self, SettingsError> {
        Self::start_with(settings, BTreeMap::new())
    }

    /// Starts a manager whose kinds named in `custom` use those backends
    /// (an application's own `Backend`) instead of the simulated and
    /// process backends the settings describe; everything else is as
    /// [`Manager::start`].
    pub fn start_with(
        settings: &Settings,
        mut custom: BTreeMap<String, Rc<dyn Backend>>,
    ) -> Result<Self, SettingsError> {
        if let Some(kind) = custom.keys().find(|k| settings.kinds.get(k).is_none()) {
            return Err(SettingsError::Invalid {
                key: format!("kinds.{kind}"),
                message: "a custom backend names a kind the settings do not have".to_string(),
            });
        }
        let any_process = settings
            .models
            .iter()
            .any(|m| matches!(m.backend, BackendSpec::Process(_)));
        // The real card is asked for process-backed models, and for its
        // total when the settings say "auto".
        let choice = if any_process || settings.capacity().is_none() {
            Some(gpu::resolve(settings)?)
        } else {
            None
        };
        let config = match (settings.capacity(), &choice) {
            (Some(capacity), _) => Self::config_with(settings, capacity),
            (None, Some(choice)) => Self::config_with(settings, choice.capacity),
            (None, None) => Self::config(settings)?,
        };
        let total = config.capacity.saturating_add(settings.gpu.reserve);
        let card = SimCard::new(total, settings.gpu.external);
        let mut sim_options: BTreeMap<String, HashMap<_, _>> = BTreeMap::new();
        let mut process_specs: BTreeMap<String, HashMap<_, _>> = BTreeMap::new();
        for kind in settings.kinds.iter() {
            sim_options.entry(kind.name.clone()).or_default();
            process_specs.entry(kind.name.clone()).or_default();
        }
        for model in &settings.models {
            let (id, kind) = (model.spec.id.clone(), model.spec.kind.clone());
            match &model.backend {
                BackendSpec::Sim(sim) => {
                    sim_options.entry(kind).or_default().insert(id, *sim);
                }
                BackendSpec::Process(spec) => {
                    process_specs
                        .entry(kind)
                        .or_default()
                        .insert(id, spec.clone());
                }
            }
        }
        let probe: Option<Rc<dyn GpuProbe>> = if any_process {
            choice
                .and_then(|c| c.nvml)
                .map(|p| Rc::new(p) as Rc<dyn GpuProbe>)
        } else {
            Some(Rc::new(card.clone()))
        };
        let mut sims = BTreeMap::new();
        let mut processes = BTreeMap::new();
        let mut backends: BTreeMap<String, Rc<dyn Backend>> = BTreeMap::new();
        for (kind, options) in sim_options {
            let sim = SimBackend::new(options).on_card(card.clone());
            let process = ProcessBackend::new(process_specs.remove(&kind).unwrap_or_default());
            let router = Router {
                sim: sim.clone(),
                process: process.clone(),
            };
            let backend: Rc<dyn Backend> = match custom.remove(&kind) {
                Some(backend) => backend,
                None => Rc::new(router),
            };
            backends.insert(kind.clone(), backend);
            sims.insert(kind.clone(), sim);
            processes.insert(kind, process);
        }
        let mut actor = VramActor::new(config, backends);
        let files: HashMap<String, Vec<std::path::PathBuf>> = settings
            .models
            .iter()
            .filter(|m| !m.files.is_empty())
            .map(|m| (m.spec.id.clone(), m.files.clone()))
            .collect();
        if !files.is_empty() {
            actor = actor.warm_with(move |model| {
                if let Some(files) = files.get(model) {
                    crate::warm::warm(model, files);
                }
            });
        }
        if let Some(probe) = probe {
            actor = actor.with_probe(probe);
        }
        Ok(Self {
            addr: actor.start(),
            sims,
            processes,
            card,
        })
    }

    /// A cloneable, `Send + Sync` handle with one `Result` per call
    /// (`handle.load("x").await?`), for actix-web's `web::Data` and the
    /// like.
    pub fn handle(&self) -> VramHandle {
        VramHandle::new(self.addr.clone())
    }

    /// Loads `model`; see [`VramHandle::load`].
    pub async fn load(&self, model: impl Into<String>) -> Result<Loaded, VramError> {
        self.handle().load(model).await
    }

    /// Acquires `model`; see [`VramHandle::acquire`].
    pub async fn acquire(&self, model: impl Into<String>) -> Result<Lease, VramError> {
        self.handle().acquire(model).await
    }

    /// Stops taking work and stops every model server; call before the
    /// System ends. New requests (and queued ones) are answered
    /// `unavailable`; answers once every backend has unloaded what it
    /// held. A manager that is already gone has nothing left to stop.
    pub async fn shutdown(&self) {
        let _ = self.addr.send(Shutdown).await;
        // A backstop when the manager itself is gone: its model servers
        // must still stop (a no-op for those already stopped).
        for process in self.processes.values() {
            if let Err(e) = process.shutdown_all().await {
                tracing::error!(error = %e, "model server did not stop");
            }
        }
    }
}
