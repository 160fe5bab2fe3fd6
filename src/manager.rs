//! Starting a manager from settings: per card, one backend per kind and
//! the `VramActor` over them, on the current actix arbiter; with several
//! cards (`[[gpus]]`), a `Fleet` in front that places each request.
//! Simulated backends run on a simulated card per card, sized by its
//! total, which is also that card's probe, so plans, waits and calibration
//! behave as on a real card.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use actix::prelude::*;
use vram_actors::{
    Backend, Fleet, GpuProbe, Lease, Loaded, ManagerConfig, Shutdown, VramActor, VramError,
    VramHandle,
};

use crate::backends::{ProcessBackend, Router, SimBackend, SimPageCache};
use crate::config::{BackendSpec, Settings, SettingsError};
use crate::gpu::{self, SimCard};

/// A running manager and handles on its simulated backends and cards.
#[derive(Debug, Clone)]
pub struct Manager {
    /// The first card's manager: send it `Load`, `Acquire`, `Status`, ...
    /// With several cards, send those to [`Manager::handle`] (or `fleet`)
    /// instead, which places each request on a card.
    pub addr: Addr<VramActor>,
    /// Every card's manager, in list order.
    pub cards: Vec<Addr<VramActor>>,
    /// With several cards, the fleet that places requests on them.
    pub fleet: Option<Addr<Fleet>>,
    /// The simulated backend of each kind on the first card, for
    /// inspection.
    pub sims: BTreeMap<String, SimBackend>,
    /// The process backend of each kind on the first card, for inspection
    /// (child pids).
    pub processes: BTreeMap<String, ProcessBackend>,
    /// The first simulated card.
    pub card: SimCard,
    /// Every simulated card, in list order.
    pub sim_cards: Vec<SimCard>,
    /// The simulated backends of each card, by kind.
    pub card_sims: Vec<BTreeMap<String, SimBackend>>,
    /// The process backends of each card, by kind.
    pub card_processes: Vec<BTreeMap<String, ProcessBackend>>,
}

impl Manager {
    /// The actor configuration these settings describe (the first card's).
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
            gpu: 0,
            kinds: settings.kinds.clone(),
            catalog: settings.catalog(),
            lease_wait: settings.policy.lease_wait,
            load_timeout: settings.policy.load_timeout,
            unload_timeout: settings.policy.unload_timeout,
            max_queue: settings.policy.max_queue,
            order: settings.policy.order,
            host_budget: settings.host.budget,
            restart_backoff: settings.policy.restart_backoff,
            restart_backoff_max: settings.policy.restart_backoff_max,
            reserve: settings.gpu.reserve,
            release_fraction: settings.gpu.release_fraction,
            release_poll: settings.gpu.release_poll,
            release_timeout: settings.gpu.release_timeout,
            ttl: settings
                .models
                .iter()
                .filter_map(|m| m.ttl.map(|t| (m.spec.id.to_string(), t)))
                .collect(),
        }
    }

    /// Starts a manager on the current arbiter (call inside a running
    /// actix `System`).
    ///
    /// With only simulated models, each card's probe is its simulated
    /// card. With process-backed models it is the real card through NVML
    /// when `gpu.probe` finds one (see [`crate::gpu::resolve`]), else none.
    pub fn start(settings: &Settings) -> Result<Self, SettingsError> {
        Self::start_with(settings, BTreeMap::new())
    }

    /// Starts a manager whose kinds named in `custom` use those backends
    /// (an application's own `Backend`, shared by every card) instead of
    /// the simulated and process backends the settings describe;
    /// everything else is as [`Manager::start`].
    pub fn start_with(
        settings: &Settings,
        custom: BTreeMap<String, Rc<dyn Backend>>,
    ) -> Result<Self, SettingsError> {
        if !custom.is_empty() && settings.gpus.len() > 1 {
            // A backend holds one card's models: shared by several cards,
            // each card's reconcile would adopt the others' models.
            return Err(SettingsError::Invalid {
                key: "gpus".to_string(),
                message: "an application's own backends serve one card; with [[gpus]] use the simulated or process backends".to_string(),
            });
        }
        if let Some(kind) = custom.keys().find(|k| settings.kinds.get(k).is_none()) {
            return Err(SettingsError::Invalid {
                key: format!("kinds.{kind}"),
                message: "a custom backend names a kind the settings do not have".to_string(),
            });
        }
        let files: Rc<HashMap<String, Vec<std::path::PathBuf>>> = Rc::new(
            settings
                .models
                .iter()
                .filter(|m| !m.files.is_empty())
                .map(|m| (m.spec.id.to_string(), m.files.clone()))
                .collect(),
        );
        let mut cards = Vec::new();
        let mut sim_cards = Vec::new();
        let mut card_sims = Vec::new();
        let mut card_processes = Vec::new();
        // One host: one page cache for every card's simulated backends.
        let page_cache = SimPageCache::new(settings.host.keep_warm);
        for index in 0..settings.gpus.len().max(1) {
            let built = Self::start_card(settings, index, &custom, &files, &page_cache)?;
            cards.push(built.addr);
            sim_cards.push(built.card);
            card_sims.push(built.sims);
            card_processes.push(built.processes);
        }
        // Keep the files of evicted models in the page cache (best effort).
        if settings.host.keep_warm > 0 && !files.is_empty() {
            let keeper = KeepWarm {
                files: files.clone(),
                keep_warm: settings.host.keep_warm,
                sizes: settings
                    .models
                    .iter()
                    .map(|m| (m.spec.id.to_string(), m.spec.bytes))
                    .collect(),
            }
            .start();
            for card in &cards {
                card.do_send(vram_actors::Subscribe(keeper.clone().recipient()));
            }
        }
        let fleet = (cards.len() > 1).then(|| {
            let allowed = settings
                .models
                .iter()
                .filter_map(|m| m.gpus.clone().map(|g| (m.spec.id.to_string(), g)))
                .collect();
            Fleet::new(
                cards.clone(),
                settings.kinds.clone(),
                settings.catalog(),
                allowed,
                settings.policy.order,
            )
            .start()
        });
        Ok(Self {
            addr: cards[0].clone(),
            cards,
            fleet,
            sims: card_sims[0].clone(),
            processes: card_processes[0].clone(),
            card: sim_cards[0].clone(),
            sim_cards,
            card_sims,
            card_processes,
        })
    }

    /// Starts the manager of card `index` of `settings.gpus`: its models
    /// (those allowed on it), its simulated card, its backends (process
    /// servers started on its device) and its probe.
    fn start_card(
        settings: &Settings,
        index: usize,
        custom: &BTreeMap<String, Rc<dyn Backend>>,
        files: &Rc<HashMap<String, Vec<std::path::PathBuf>>>,
        page_cache: &SimPageCache,
    ) -> Result<Card, SettingsError> {
        let card_settings = &settings.gpus[index];
        let models: Vec<&crate::config::ModelSettings> = settings
            .models
            .iter()
            .filter(|m| m.may_go_on(index))
            .collect();
        let any_process = models
            .iter()
            .any(|m| matches!(m.backend, BackendSpec::Process(_)));
        // The real card is asked for process-backed models, and for its
        // total when the settings say "auto".
        let known = card_settings.capacity();
        let choice = if gpu::asks_the_card(settings, index) {
            Some(gpu::resolve_card(settings, index)?)
        } else {
            None
        };
        let capacity = match (known, &choice) {
            (Some(capacity), _) => capacity,
            (None, Some(choice)) => choice.capacity,
            (None, None) => unreachable!("an unknown total was resolved above"),
        };
        let mut config = Self::config_with(settings, capacity);
        config.gpu = index;
        // One host: each card may park its share of the host budget, so
        // the cards together never hold more than the budget.
        config.host_budget = settings.host.budget / settings.gpus.len().max(1) as u64;
        config.reserve = card_settings.reserve;
        config.catalog = models.iter().map(|m| m.spec.clone()).collect();
        config
            .ttl
            .retain(|id, _| models.iter().any(|m| m.spec.id == *id));
        let total = config.capacity.saturating_add(card_settings.reserve);
        let card = SimCard::new(total, card_settings.external);
        let mut sim_options: BTreeMap<String, HashMap<_, _>> = BTreeMap::new();
        let mut process_specs: BTreeMap<String, HashMap<_, _>> = BTreeMap::new();
        for kind in settings.kinds.iter() {
            sim_options.entry(kind.name.clone()).or_default();
            process_specs.entry(kind.name.clone()).or_default();
        }
        for model in &models {
            let (id, kind) = (model.spec.id.to_string(), model.spec.kind.to_string());
            match &model.backend {
                BackendSpec::Sim(sim) => {
                    sim_options.entry(kind).or_default().insert(id, *sim);
                }
                BackendSpec::Process(spec) => {
                    process_specs
                        .entry(kind)
                        .or_default()
                        .insert(id, spec.on_device(&card_settings.device));
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
            let sim = SimBackend::new(options)
                .on_card(card.clone())
                .with_page_cache(page_cache.clone());
            let process = ProcessBackend::new(process_specs.remove(&kind).unwrap_or_default());
            let router = Router {
                sim: sim.clone(),
                process: process.clone(),
            };
            let backend: Rc<dyn Backend> = match custom.get(&kind) {
                Some(backend) => backend.clone(),
                None => Rc::new(router),
            };
            backends.insert(kind.clone(), backend);
            sims.insert(kind.clone(), sim);
            processes.insert(kind, process);
        }
        let mut actor = VramActor::new(config, backends);
        // Simulated models with a warm load time read ahead in the
        // simulated page cache.
        let read_ahead: Vec<String> = models
            .iter()
            .filter(|m| matches!(&m.backend, BackendSpec::Sim(s) if s.warm_load_ms.is_some()))
            .map(|m| m.spec.id.to_string())
            .collect();
        if !files.is_empty() || !read_ahead.is_empty() {
            let files = files.clone();
            let page_cache = page_cache.clone();
            actor = actor.warm_with(move |model| {
                if let Some(files) = files.get(model) {
                    crate::warm::warm(model, files);
                }
                if read_ahead.iter().any(|m| m == model) {
                    page_cache.read_ahead(model);
                }
            });
        }
        if let Some(probe) = probe {
            actor = actor.with_probe(probe);
        }
        Ok(Card {
            addr: actor.start(),
            card,
            sims,
            processes,
        })
    }

    /// A cloneable, `Send + Sync` handle with one `Result` per call
    /// (`handle.load("x").await?`), for actix-web's `web::Data` and the
    /// like.
    pub fn handle(&self) -> VramHandle {
        match &self.fleet {
            Some(fleet) => VramHandle::fleet(fleet.clone()),
            None => VramHandle::new(self.addr.clone()),
        }
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
        for card in &self.cards {
            let _ = card.send(Shutdown).await;
        }
        // A backstop when a card's manager itself is gone: its model
        // servers must still stop (a no-op for those already stopped).
        for process in self.card_processes.iter().flat_map(BTreeMap::values) {
            if let Err(e) = process.shutdown_all().await {
                tracing::error!(error = %e, "model server did not stop");
            }
        }
    }
}

/// One card's manager as started, with its simulated card and backends.
struct Card {
    addr: Addr<VramActor>,
    card: SimCard,
    sims: BTreeMap<String, SimBackend>,
    processes: BTreeMap<String, ProcessBackend>,
}

/// Re-reads the weight files of a model that left the card into the page
/// cache (`[host] keep_warm`): its next load reads from memory if the
/// kernel kept them. Best effort, on the warm module's own thread.
struct KeepWarm {
    files: Rc<HashMap<String, Vec<std::path::PathBuf>>>,
    keep_warm: u64,
    sizes: HashMap<String, u64>,
}

impl Actor for KeepWarm {
    type Context = Context<Self>;
}

impl Handler<vram_actors::VramEvent> for KeepWarm {
    type Result = ();

    fn handle(&mut self, event: vram_actors::VramEvent, _ctx: &mut Context<Self>) {
        use vram_actors::VramEvent;
        let model = match &event {
            VramEvent::Evicted { model, .. }
            | VramEvent::Expired { model, .. }
            | VramEvent::Unloaded { model, .. } => model,
            _ => return,
        };
        let fits = self
            .sizes
            .get(model.as_str())
            .is_some_and(|b| *b <= self.keep_warm);
        if let (true, Some(files)) = (fits, self.files.get(model.as_str())) {
            crate::warm::warm(model, files);
        }
    }
}
