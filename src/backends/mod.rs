//! Backends that put models on the card: [`sim`] simulates them (for
//! scenarios, tests and examples).

pub mod sim;

pub use sim::SimBackend;
