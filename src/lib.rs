//! vram-manager: shares one GPU between the models of a voice assistant.
//!
//! This crate is the application around [`vram_actors`] (re-exported here):
//! layered settings, the backends, and the scenario runner behind the
//! `vram-manager` command.
#![warn(missing_docs)]

pub mod backends;
pub mod bench;
pub mod cli;
pub mod config;
pub mod gpu;
pub mod keeper;
pub mod manager;
pub mod plot;
pub mod scenario;
pub mod soak;

pub use manager::Manager;
pub use vram_actors::*;
