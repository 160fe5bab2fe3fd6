//! `ManagerConfig`: what a manager is built from (capacity, kinds,
//! catalog, timeouts, the release wait, TTLs). The application builds it
//! from its validated settings (whose defaults are the only ones: this
//! crate has none of its own).

use std::collections::HashMap;
use std::time::Duration;

use crate::kind::Kinds;
use crate::model::Catalog;
use crate::order::Order;

/// What a `VramActor` is built from.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Usable bytes of the card (total less reserve).
    pub capacity: u64,
    /// Which card this manager keeps the books of (its position in the
    /// list of cards; 0 with one): events and ledger entries carry it.
    pub gpu: usize,
    /// Eviction tiers.
    pub kinds: Kinds,
    /// Every model that may be loaded.
    pub catalog: Catalog,
    /// How long a load waits for leases to be released.
    pub lease_wait: Duration,
    /// How long a backend may take to load.
    pub load_timeout: Duration,
    /// How long a backend may take to unload.
    pub unload_timeout: Duration,
    /// The order in which eviction candidates are taken.
    pub order: Order,
    /// Host RAM all parked models together may hold; a model that would
    /// go over it is stopped instead of parked.
    pub host_budget: u64,
    /// Waiting jobs beyond this are refused with `busy`.
    pub max_queue: usize,
    /// Delay before a restarted backend takes its next message.
    pub restart_backoff: Duration,
    /// Cap of that delay, which doubles with each restart in a row.
    pub restart_backoff_max: Duration,
    /// Bytes of the card never planned for (with a probe, the card's free
    /// memory counts only above this).
    pub reserve: u64,
    /// After unloading victims, wait until the card shows this fraction of
    /// the memory they really held (measured, else declared) back before
    /// loading (with a probe); never more than the card can show.
    pub release_fraction: f64,
    /// The longest pause between two readings of the card while waiting
    /// (the first pause is 10 ms, doubling up to this).
    pub release_poll: Duration,
    /// Give up waiting after this long (and load anyway, with a warning).
    pub release_timeout: Duration,
    /// Idle time after which a model is unloaded, by model id (models
    /// without an entry never expire).
    pub ttl: HashMap<String, Duration>,
}
