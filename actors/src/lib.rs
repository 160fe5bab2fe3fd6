//! The actor system of vram-manager and the pure state it owns.
//!
//! The pure core decides: [`Ledger`] records what holds VRAM, [`plan`]
//! chooses victims by the policy of DESIGN.md, [`Kinds`] and [`Catalog`]
//! describe what can be loaded. The actors carry those decisions out:
//! [`VramActor`] owns the ledger and serialises loads and unloads;
//! [`BackendActor`]s, one per kind and supervised, talk to [`Backend`]s.
#![warn(missing_docs)]

mod backend;
mod backend_actor;
mod error;
mod handlers;
mod job;
mod job_steps;
mod kind;
mod ledger;
mod messages;
mod model;
mod policy;
mod probe;
mod vram_actor;

pub use backend::{Backend, BackendError, BackendFuture, ExitNotifier, ModelExit};
pub use backend_actor::{
    BackendActor, BackendRestarted, Crash, ListLoaded, LoadModel, ModelExited, UnloadModel,
};
pub use error::VramError;
pub use handlers::Restart;
pub use kind::{Kind, Kinds};
pub use ledger::{Entry, Ledger, ModelState};
pub use messages::{
    Acquire, BackendOf, CrashBackend, Lease, Load, Loaded, Release, Shutdown, Status, StatusReport,
    Subscribe, Unload, Unloaded, VramEvent,
};
pub use model::{Catalog, ModelSpec};
pub use policy::{Plan, expired, is_expired, plan};
pub use probe::{GpuMemory, GpuProbe, GpuProcess, ProbeError, ProbeFuture};
pub use vram_actor::{JobObserver, ManagerConfig, VramActor};
