//! What the manager reports: the answers of loads and unloads, and the
//! events it publishes. Plain data, shared by the job machines and the
//! actors.

use actix::Message;
use arcstr::ArcStr;

/// What a successful [`Load`](crate::Load) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The model now resident.
    pub model: ArcStr,
    /// Models unloaded to make room for it, in unload order.
    pub evicted: Vec<ArcStr>,
    /// True if it was already resident (nothing was loaded).
    pub already_resident: bool,
}

/// What a successful [`Unload`](crate::Unload) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unloaded {
    /// The model asked for.
    pub model: ArcStr,
    /// False if it was not resident (nothing was done).
    pub was_resident: bool,
}

/// Something that happened to a model, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Message, serde::Serialize)]
#[rtype(result = "()")]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum VramEvent {
    /// A load was planned; its bytes are reserved.
    Loading {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
        /// Bytes reserved.
        bytes: u64,
        /// Models that will be evicted for it, in order.
        victims: Vec<ArcStr>,
    },
    /// A model is resident.
    Loaded {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
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
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
        /// Bytes freed.
        bytes: u64,
        /// The model it made room for.
        for_model: ArcStr,
        /// The eviction order that chose it (`strict` or `adaptive`).
        order: crate::order::Order,
    },
    /// A model left the card by parking: its server sleeps, holding
    /// `bytes` on the card and its weights in host RAM.
    Parked {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
        /// Bytes it still holds on the card.
        bytes: u64,
        /// Bytes it gave back.
        freed: u64,
        /// The model it made room for (none when it parked because it was
        /// idle for its TTL).
        for_model: Option<ArcStr>,
    },
    /// A parked model woke and is resident again.
    Woke {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
        /// Bytes charged now.
        bytes: u64,
    },
    /// A model was unloaded on request.
    Unloaded {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
        /// Bytes freed.
        bytes: u64,
    },
    /// A model was unloaded because it was idle for its TTL.
    Expired {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// The card it is on (position in the list of cards; 0 with one).
        gpu: usize,
        /// Bytes freed.
        bytes: u64,
    },
    /// A load failed; no reservation remains.
    LoadFailed {
        /// The model.
        model: ArcStr,
        /// The error code.
        code: String,
        /// The error's message.
        reason: String,
    },
    /// A resident model's server exited by itself; it left the ledger.
    ModelExited {
        /// The model.
        model: ArcStr,
        /// Its kind.
        kind: ArcStr,
        /// Why: exit status and the last lines of its stderr.
        reason: String,
    },
    /// A backend restarted after a crash; `lost` are the models it no
    /// longer holds, removed from the ledger.
    BackendRestarted {
        /// The backend's kind.
        kind: ArcStr,
        /// Models that left the ledger because of the crash.
        lost: Vec<ArcStr>,
    },
}
