//! The messages a `VramActor` answers, what they answer, and the events it
//! publishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;

use crate::backend_actor::BackendActor;
use crate::error::VramError;
use crate::ledger::{Entry, ModelState};
use crate::vram_actor::VramActor;

/// Load a model, evicting lower-priority models if needed. Queued behind
/// earlier loads and unloads. Answers what was evicted for it.
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

/// What a successful [`Load`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The model now resident.
    pub model: String,
    /// Models unloaded to make room for it, in unload order.
    pub evicted: Vec<String>,
    /// True if it was already resident (nothing was loaded).
    pub already_resident: bool,
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

impl Unload {
    /// An unload of `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
        }
    }
}

/// What a successful [`Unload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unloaded {
    /// The model asked for.
    pub model: String,
    /// False if it was not resident (nothing was done).
    pub was_resident: bool,
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
    pub(crate) model: String,
    pub(crate) evicted: Vec<String>,
    pub(crate) owner: Option<Addr<VramActor>>,
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
    pub fn evicted(&self) -> &[String] {
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
}

impl StatusReport {
    /// Ids of resident models, sorted.
    pub fn resident(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| m.state == ModelState::Resident)
            .map(|m| m.id.clone())
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

/// Something that happened to a model, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Message, serde::Serialize)]
#[rtype(result = "()")]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum VramEvent {
    /// A load was planned; its bytes are reserved.
    Loading {
        /// The model.
        model: String,
        /// Its kind.
        kind: String,
        /// Bytes reserved.
        bytes: u64,
        /// Models that will be evicted for it, in order.
        victims: Vec<String>,
    },
    /// A model is resident.
    Loaded {
        /// The model.
        model: String,
        /// Its kind.
        kind: String,
        /// Bytes charged: the larger of declared and measured.
        bytes: u64,
        /// Bytes its settings declare.
        declared: u64,
        /// Bytes the card showed it taking, when a probe is present.
        measured: Option<u64>,
    },
    /// A model was unloaded to make room for another.
    Evicted {
        /// The model unloaded.
        model: String,
        /// Its kind.
        kind: String,
        /// Bytes freed.
        bytes: u64,
        /// The model it made room for.
        for_model: String,
    },
    /// A model was unloaded on request.
    Unloaded {
        /// The model.
        model: String,
        /// Its kind.
        kind: String,
        /// Bytes freed.
        bytes: u64,
    },
    /// A model was unloaded because it was idle for its TTL.
    Expired {
        /// The model.
        model: String,
        /// Its kind.
        kind: String,
        /// Bytes freed.
        bytes: u64,
    },
    /// A load failed; no reservation remains.
    LoadFailed {
        /// The model.
        model: String,
        /// The error code.
        code: String,
        /// The error's message.
        reason: String,
    },
    /// A resident model's server exited by itself; it left the ledger.
    ModelExited {
        /// The model.
        model: String,
        /// Its kind.
        kind: String,
        /// Why: exit status and the last lines of its stderr.
        reason: String,
    },
    /// A backend restarted after a crash; `lost` are the models it no
    /// longer holds, removed from the ledger.
    BackendRestarted {
        /// The backend's kind.
        kind: String,
        /// Models that left the ledger because of the crash.
        lost: Vec<String>,
    },
}
