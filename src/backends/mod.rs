//! Backends that put models on the card: [`sim`] simulates them (for
//! scenarios, tests and examples); [`fault`] injects failures, panics and
//! hangs (for supervision tests and soaks).

pub mod fault;
pub mod sim;

pub use fault::{Fault, FaultBackend, FaultCounts, FaultRates};
pub use sim::SimBackend;
