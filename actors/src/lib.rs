//! The actor system of vram-manager and the pure state it owns.
//!
//! The pure core decides: [`Ledger`] records what holds VRAM, [`plan`]
//! chooses victims by the policy of DESIGN.md, [`Kinds`] and [`Catalog`]
//! describe what can be loaded. The actors carry those decisions out.
#![warn(missing_docs)]

mod error;
mod kind;
mod ledger;
mod model;
mod policy;

pub use error::VramError;
pub use kind::{Kind, Kinds};
pub use ledger::{Entry, Ledger, ModelState};
pub use model::{Catalog, ModelSpec};
pub use policy::{Plan, plan};
