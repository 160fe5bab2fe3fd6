//! Starting a manager from settings: one backend per kind, the
//! `VramActor` over them, on the current actix arbiter. Simulated backends
//! run on a simulated card sized by `gpu.total`, which is also the
//! manager's probe, so plans, waits and calibration behave as on a real
//! card.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use actix::prelude::*;
use vram_actors::{Backend, ManagerConfig, VramActor};

use crate::backends::SimBackend;
use crate::config::{BackendSpec, Settings, SettingsError};
use crate::gpu::SimCard;

/// A running manager and handles on its simulated backends and card.
#[derive(Debug, Clone)]
pub struct Manager {
    /// The manager's address: send it `Load`, `Acquire`, `Status`, ...
    pub addr: Addr<VramActor>,
    /// The simulated backend of each kind, for inspection.
    pub sims: BTreeMap<String, SimBackend>,
    /// The simulated card the backends allocate on.
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
        Ok(ManagerConfig {
            capacity,
            kinds: settings.kinds.clone(),
            catalog: settings.catalog(),
            lease_wait: settings.policy.lease_wait,
            load_timeout: settings.policy.load_timeout,
            unload_timeout: settings.policy.unload_timeout,
            max_queue: settings.policy.max_queue,
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
        })
    }

    /// Starts a manager on the current arbiter (call inside a running
    /// actix `System`).
    pub fn start(settings: &Settings) -> Result<Self, SettingsError> {
        let config = Self::config(settings)?;
        let total = config.capacity + settings.gpu.reserve;
        let card = SimCard::new(total, settings.gpu.external);
        let mut options: BTreeMap<String, HashMap<_, _>> = BTreeMap::new();
        for kind in settings.kinds.iter() {
            options.entry(kind.name.clone()).or_default();
        }
        for model in &settings.models {
            let BackendSpec::Sim(sim) = &model.backend;
            options
                .entry(model.spec.kind.clone())
                .or_default()
                .insert(model.spec.id.clone(), *sim);
        }
        let sims: BTreeMap<String, SimBackend> = options
            .into_iter()
            .map(|(kind, options)| (kind, SimBackend::new(options).on_card(card.clone())))
            .collect();
        let backends = sims
            .iter()
            .map(|(kind, sim)| (kind.clone(), Rc::new(sim.clone()) as Rc<dyn Backend>))
            .collect();
        let addr = VramActor::new(config, backends)
            .with_probe(Rc::new(card.clone()))
            .start();
        Ok(Self { addr, sims, card })
    }
}
