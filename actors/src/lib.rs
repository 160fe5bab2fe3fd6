//! The actor system of vram-manager and the pure state it owns.
//!
//! The pure core decides: [`Ledger`] records what holds VRAM, [`plan`]
//! chooses victims by the eviction policy, [`Kinds`] and [`Catalog`]
//! describe what can be loaded, and the job machines (load, unload,
//! expire, crash, reconcile) turn events into commands. The actors carry
//! those decisions out: [`VramActor`] owns the books and runs one job at a
//! time; [`BackendActor`]s, one per kind and supervised, talk to
//! [`Backend`]s.
//!
//! Modules import one way, from plain data up to the actor: `kind`,
//! `model`, `error`, `events`, `probe`, `order`, `meters` -> `ledger`,
//! `backend`, `config`, `reply` -> `policy`, `backend_actor` -> `job`,
//! `messages`, `placement` -> `queue` -> `vram_actor`, `commands`,
//! `handlers` -> `fleet` -> `handle`.
#![warn(missing_docs)]

mod backend;
mod backend_actor;
mod commands;
mod config;
mod error;
mod events;
mod fleet;
mod handle;
mod handlers;
mod job;
mod kind;
mod ledger;
mod messages;
mod meters;
mod model;
mod order;
mod placement;
mod policy;
mod probe;
mod queue;
mod reply;
mod vram_actor;

/// A shared, immutable string: model ids and kind names, cloned without
/// copying (the ledger, the jobs, their events and the simulated backend
/// hold the catalog's).
pub use arcstr::ArcStr;
pub use backend::{Backend, BackendError, BackendFuture, ExitNotifier, ModelExit, done};
pub use backend_actor::{
    BackendActor, BackendRestarted, Crash, ListLoaded, LoadModel, ModelExited, UnloadModel,
    UnloadModels,
};
pub use config::ManagerConfig;
pub use error::VramError;
pub use events::{Loaded, Unloaded, VramEvent};
pub use fleet::Fleet;
pub use handle::VramHandle;
pub use handlers::StopManager;
pub use kind::{Kind, Kinds};
pub use ledger::{Entry, HISTORY_GAPS, History, Ledger, ModelHistory, ModelState};
pub use messages::{
    Acquire, BackendOf, CardStatus, CrashBackend, Lease, Load, Release, SetPinned, Shutdown,
    Status, StatusReport, Subscribe, Unload,
};
pub use model::{Catalog, ModelSpec, Park};
pub use order::Order;
pub use placement::{CardView, Placement, place};
pub use policy::{Plan, Score, expired, is_expired, plan, plan_in_order, scores, servable};
pub use probe::{GpuMemory, GpuProbe, GpuProcess, ProbeError, ProbeFuture};
pub use reply::Deferred;
pub use vram_actor::{JobObserver, VramActor};
