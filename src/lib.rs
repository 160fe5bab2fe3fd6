//! vram-manager: shares one GPU between the models of a voice assistant.
//!
//! This crate is the application around [`vram_actors`] (re-exported here):
//! layered settings ([`config`]), the backends ([`backends`]), the card
//! ([`gpu`]), the process keeper ([`keeper`]), [`Manager`] to start it all
//! from settings (and its [`VramHandle`] for callers), and the scenario
//! runner behind the `vram-manager` command ([`scenario`]).
//!
//! The command line and its plots live in the binary; the benchmark and
//! soak harnesses are behind the `testing` feature (the project's own
//! tests, benches and examples turn it on).
#![warn(missing_docs)]

pub mod backends;
pub mod config;
pub mod gpu;
pub mod keeper;
pub mod manager;
pub mod scenario;
pub mod serve;
mod shape;
pub mod warm;

#[cfg(feature = "testing")]
pub mod bench;
#[cfg(feature = "testing")]
pub mod soak;
#[cfg(feature = "testing")]
pub mod study;

pub use manager::Manager;
pub use vram_actors::*;
