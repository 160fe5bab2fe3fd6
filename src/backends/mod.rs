//! Backends that put models on the card: [`process`] runs model-server
//! processes; [`sim`] simulates them (for scenarios, tests and examples);
//! [`fault`] injects failures, panics and hangs (for supervision tests and
//! soaks); [`router`] combines a kind's simulated and process-backed
//! models.

pub mod fault;
pub mod process;
pub mod router;
mod server;
pub mod sim;
mod spec;

pub use fault::{Fault, FaultBackend, FaultCounts, FaultRates};
pub use process::{ProcessBackend, ProcessSpec, ReadyCheck};
pub use router::Router;
pub(crate) use server::KEEPER_MARGIN;
pub use sim::{SimBackend, SimPageCache};
