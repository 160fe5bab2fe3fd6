//! The messages a `VramActor` answers and what they answer (the answers
//! and events themselves are plain data in `events.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;
use arcstr::ArcStr;

use crate::backend_actor::BackendActor;
use crate::error::VramError;
use crate::events::{Loaded, Unloaded, VramEvent};
use crate::ledger::{Entry, ModelState};

/// Load a model, evicting lower-priority models if needed. Queued behind
/// earlier loads and unloads. Answers what was evicted for it.
///
/// Victims on different backends are unloaded at once. If one of them
/// cannot be unloaded the load fails, and the victims not yet unloaded stay;
/// those another backend unloaded meanwhile are gone all the same (each is
/// published as an `evicted` event).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Loaded, VramError>")]
pub struct Load {
    /// The model's id.
    pub model: String,
}

impl Load {
    /// A load of `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
        }
    }
}

/// Unload a model. Queued like a load. Waits up to `lease_wait` for its
/// leases to be released, then fails with `in_use`. Unloading a model that
/// is not resident succeeds and does nothing.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Unloaded, VramError>")]
pub struct Unload {
    /// The model's id.
    pub model: String,
}

/// Pin or unpin a model at run time: a pinned model is never evicted nor
/// expired (an explicit unload still removes it). Applies to the model
/// now if it is on the card, and to every later load of it. Answered at
/// once; fails with `unknown_model` for a model the settings lack.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), VramError>")]
pub struct SetPinned {
    /// The model's id.
    pub model: String,
    /// Pinned or not.
    pub pinned: bool,
}

impl Unload {
    /// An unload of `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
        }
    }
}

/// Pin a model for the length of a request: loads it if needed, then
/// answers a [`Lease`]. A leased model is never evicted. Answered at once
/// when the model is resident and no queued operation touches it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Lease, VramError>")]
pub struct Acquire {
    /// The model's id.
    pub model: String,
}

impl Acquire {
    /// An acquire of `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
        }
    }
}

/// Give a lease back. Sent by [`Lease`] when it is dropped; answered at
/// once. Releasing an unknown or already released lease does nothing.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Release {
    /// The lease's id.
    pub lease: u64,
}

/// A model held for a request. Dropping it (or calling
/// [`Lease::release`]) releases the model.
#[derive(Debug)]
#[must_use = "dropping a lease releases the model at once"]
pub struct Lease {
    pub(crate) id: u64,
    pub(crate) model: ArcStr,
    pub(crate) evicted: Vec<ArcStr>,
    pub(crate) owner: Option<Recipient<Release>>,
    /// Cleared by the manager when the model is lost in a backend crash.
    pub(crate) valid: Arc<AtomicBool>,
}

impl Lease {
    /// The leased model's id.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The lease's id (what [`Release`] names).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Models evicted to load the model for this lease, in unload order.
    pub fn evicted(&self) -> &[ArcStr] {
        &self.evicted
    }

    /// False once the leased model was lost in a backend crash: the lease
    /// no longer holds anything, and the request should load it again.
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Relaxed)
    }

    /// Releases the model now (the same as dropping the lease).
    pub fn release(self) {}
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            owner.do_send(Release { lease: self.id });
        }
    }
}

/// Ask for a snapshot of the ledger. Answered at once, even during a load.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "StatusReport")]
pub struct Status;

/// A snapshot of the ledger.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatusReport {
    /// Usable bytes of the card.
    pub capacity: u64,
    /// Bytes charged to models in any state.
    pub used: u64,
    /// Capacity less used.
    pub free: u64,
    /// Operations waiting in the queue (not counting the one running).
    pub queued: usize,
    /// Whether an operation is running now.
    pub running: bool,
    /// Every model that holds VRAM, by id: its ledger entry.
    pub models: Vec<Entry>,
    /// Milliseconds since each resident model was last used (load,
    /// acquire, release or touch), by id.
    pub idle_ms: std::collections::BTreeMap<String, u64>,
    /// The card as last read (by a load), when a probe is present.
    pub card: Option<crate::probe::GpuMemory>,
    /// The order in which eviction candidates are taken.
    pub order: crate::order::Order,
    /// Under the adaptive order, how it ranks each resident model now (by
    /// id): cheaper `value` leaves first. Empty under the strict order.
    pub scores: Vec<crate::policy::Score>,
    /// Each card (one entry with one card); the fields above are totals
    /// over them.
    pub gpus: Vec<CardStatus>,
}

/// One card in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CardStatus {
    /// Its position in the list of cards.
    pub gpu: usize,
    /// Its usable bytes.
    pub capacity: u64,
    /// Bytes charged to models on it.
    pub used: u64,
    /// Capacity less used.
    pub free: u64,
    /// The card as last read, when a probe is present.
    pub card: Option<crate::probe::GpuMemory>,
}

/// What a card's books hold now, for placement across cards: its ledger,
/// the loads queued or running on it (which hold no bytes until they
/// start) and what the card itself shows free. Answered without waiting
/// for any job, even during a load.
#[derive(Debug, Clone, Message)]
#[rtype(result = "CardSnapshot")]
pub(crate) struct Snapshot;

/// The answer to [`Snapshot`].
#[derive(Debug, Clone, MessageResponse)]
pub(crate) struct CardSnapshot {
    pub(crate) ledger: crate::ledger::Ledger,
    pub(crate) pending: Vec<String>,
    /// The card's free bytes less the reserve, when a probe could tell.
    pub(crate) card_free: Option<u64>,
}

impl StatusReport {
    /// Ids of resident models, sorted.
    pub fn resident(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| m.state == ModelState::Resident)
            .map(|m| m.id.to_string())
            .collect()
    }
}

/// Receive every [`VramEvent`] from now on.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Subscribe(pub Recipient<VramEvent>);

/// Make the backend of `kind` crash while handling a message, then wait
/// until it has restarted and the ledger agrees with it again (fault
/// testing). Queued like a load.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), VramError>")]
pub struct CrashBackend {
    /// The kind whose backend should crash.
    pub kind: String,
}

/// Stop taking work and stop every model server, for good. From the
/// moment it is handled, every new [`Load`], [`Acquire`], [`Unload`] and
/// [`CrashBackend`] is answered `unavailable` at once, and so is everyone
/// waiting for a queued operation (the queue is emptied). Then every
/// backend's [`shutdown`](crate::Backend::shutdown) runs, all at once and
/// directly (a long load in a backend actor does not delay it); when they
/// are all done the ledger is emptied, every lease becomes void, and this
/// is answered. An operation already running is not waited for: its
/// backend call fails once its server is stopped, and its waiters get
/// that error (or `unavailable`).
#[derive(Debug, Clone, Copy, Default, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Ask for the backend actor that serves a kind (for monitoring and fault
/// testing). Answered at once; `None` for a kind without a backend.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<Addr<BackendActor>>")]
pub struct BackendOf(pub String);
