//! The ledger: which models hold VRAM, how many bytes, and in which state.
//!
//! Pure data, no actix and no clock. A model's bytes count from the moment
//! its load is planned (`Loading`) until its backend confirms the unload
//! (`Unloading` still counts), so the ledger never promises memory that a
//! backend may still be using.

use std::collections::{BTreeMap, VecDeque};

use arcstr::ArcStr;

use crate::model::ModelSpec;

/// How many gaps between its requests a model's history keeps.
pub const HISTORY_GAPS: usize = 16;

/// Weight of the newest gap between two misses in their moving average.
const MISS_GAP_BETA: f64 = 0.2;

/// Where a model is in its life on the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Planned and reserved; the backend is loading it.
    Loading,
    /// Loaded and usable.
    Resident,
    /// The backend is unloading or parking it; its bytes still count.
    Unloading,
    /// Asleep: its server runs, its weights are in host RAM, and it holds
    /// only its parked residual on the card. A load wakes it.
    Parked,
}

/// One model that holds (or is about to hold) VRAM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// The model's id.
    pub id: ArcStr,
    /// The model's kind name.
    pub kind: ArcStr,
    /// The card it is on (position in the list of cards; 0 with one).
    pub gpu: usize,
    /// Bytes charged to this model: the larger of declared and measured.
    pub bytes: u64,
    /// Bytes the model's settings declare.
    pub declared: u64,
    /// Bytes the card showed it taking when it loaded, if measured.
    pub measured: Option<u64>,
    /// Where the model is in its life on the card.
    pub state: ModelState,
    /// How many leases hold it; a leased model is never evicted.
    pub leases: u32,
    /// A pinned model is never evicted.
    pub pinned: bool,
    /// Sequence number of its last load, acquire, release or touch: larger
    /// means more recently used. Unique across the ledger, so no two models
    /// ever tie in least-recently-used order.
    pub recency: u64,
}

/// When one model was asked for, counted in requests (no clock).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelHistory {
    /// The request number of its last request.
    pub last: u64,
    /// The last [`HISTORY_GAPS`] gaps between two of its requests, oldest
    /// first, in requests.
    pub gaps: VecDeque<u64>,
}

/// The request history the adaptive eviction order predicts from: a
/// request counter, each model's last request and recent gaps, and a moving
/// average of the gap between two misses (requests that needed a load).
/// Kept for every model ever asked for, resident or not; O(1) per request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    requests: u64,
    models: foldhash::HashMap<String, ModelHistory>,
    last_miss: Option<u64>,
    miss_gap: Option<f64>,
}

impl History {
    /// Records one request for `model`; `miss` when it needs a load.
    pub fn note(&mut self, model: &str, miss: bool) {
        self.requests += 1;
        let now = self.requests;
        match self.models.get_mut(model) {
            Some(history) => {
                if history.gaps.len() == HISTORY_GAPS {
                    history.gaps.pop_front();
                }
                history.gaps.push_back(now - history.last);
                history.last = now;
            }
            None => {
                self.models.insert(
                    model.to_string(),
                    ModelHistory {
                        last: now,
                        gaps: VecDeque::new(),
                    },
                );
            }
        }
        if miss {
            if let Some(last) = self.last_miss {
                let gap = (now - last) as f64;
                self.miss_gap = Some(match self.miss_gap {
                    Some(average) => average + MISS_GAP_BETA * (gap - average),
                    None => gap,
                });
            }
            self.last_miss = Some(now);
        }
    }

    /// How many requests were recorded.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The history of `model`, if it was ever asked for.
    pub fn model(&self, model: &str) -> Option<&ModelHistory> {
        self.models.get(model)
    }

    /// The moving average of the gap between two misses, once two misses
    /// were seen.
    pub fn miss_gap(&self) -> Option<f64> {
        self.miss_gap
    }
}

/// The record of what is on the card.
#[derive(Debug, Clone, PartialEq)]
pub struct Ledger {
    capacity: u64,
    /// Which card (position in the list; 0 with one).
    gpu: usize,
    /// Wide, so sizes near 2^64 add up without losing bytes.
    used: u128,
    next_recency: u64,
    entries: BTreeMap<ArcStr, Entry>,
    history: History,
}

impl Ledger {
    /// An empty ledger for a card with `capacity` usable bytes.
    pub fn new(capacity: u64) -> Self {
        Self::on_card(capacity, 0)
    }

    /// An empty ledger for card `gpu` (its position in the list of cards)
    /// with `capacity` usable bytes.
    pub fn on_card(capacity: u64, gpu: usize) -> Self {
        Self {
            gpu,
            capacity,
            used: 0,
            next_recency: 0,
            entries: BTreeMap::new(),
            history: History::default(),
        }
    }

    /// Records a request for `model` in the history (a miss when it has no
    /// entry, is leaving or is parked: the request needs a load or a wake). Plans under the
    /// strict order never read it.
    pub fn note_request(&mut self, model: &str) {
        let miss = self
            .entries
            .get(model)
            .is_none_or(|e| matches!(e.state, ModelState::Unloading | ModelState::Parked));
        self.history.note(model, miss);
    }

    /// Records a request for `model`, the caller saying whether it needs a
    /// load of its own (a request that joins a load already queued does
    /// not).
    pub fn note_request_as(&mut self, model: &str, miss: bool) {
        self.history.note(model, miss);
    }

    /// Forgets every model (the card was emptied or is being rebuilt) but
    /// keeps the request history and the recency counter: what users ask
    /// for does not change when the manager restarts.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// The request history the adaptive order predicts from.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The card's position in the list of cards (0 with one).
    pub fn gpu(&self) -> usize {
        self.gpu
    }

    /// Usable bytes of the card (its total less the reserve).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes charged to models in any state.
    pub fn used(&self) -> u64 {
        u64::try_from(self.used).unwrap_or(u64::MAX)
    }

    /// Bytes charged, exactly (beyond 2^64 - 1 when sizes near it add up).
    pub(crate) fn used_exact(&self) -> u128 {
        self.used
    }

    /// Capacity less used bytes (never negative).
    pub fn free(&self) -> u64 {
        u64::try_from(u128::from(self.capacity).saturating_sub(self.used)).unwrap_or(0)
    }

    /// The entry of model `id`, if it holds VRAM.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Whether `id` is loaded and usable.
    pub fn is_resident(&self, id: &str) -> bool {
        self.get(id)
            .is_some_and(|e| e.state == ModelState::Resident)
    }

    /// Every entry, by id.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// How many models hold VRAM.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no model holds VRAM.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn next_recency(&mut self) -> u64 {
        self.next_recency += 1;
        self.next_recency
    }

    /// Reserves the bytes of `model` in state `Loading`. Does nothing if
    /// the model already has an entry.
    pub fn reserve(&mut self, model: &ModelSpec) {
        self.insert(model, ModelState::Loading);
    }

    /// Records `model` as resident at once (used when a backend reports a
    /// model the ledger did not know of). Does nothing if it has an entry.
    pub fn insert_resident(&mut self, model: &ModelSpec) {
        self.insert(model, ModelState::Resident);
    }

    fn insert(&mut self, model: &ModelSpec, state: ModelState) {
        // One search of the tree: a model with an entry already is rare.
        let std::collections::btree_map::Entry::Vacant(slot) = self.entries.entry(model.id.clone())
        else {
            return;
        };
        self.next_recency += 1;
        let recency = self.next_recency;
        self.used += u128::from(model.bytes);
        slot.insert(Entry {
            id: model.id.clone(),
            kind: model.kind.clone(),
            gpu: self.gpu,
            bytes: model.bytes,
            declared: model.bytes,
            measured: None,
            state,
            leases: 0,
            pinned: model.pinned,
            recency,
        });
    }

    /// Marks a reserved model resident and most recently used. Returns
    /// false if it has no entry.
    pub fn commit(&mut self, id: &str) -> bool {
        self.set_state(id, ModelState::Resident)
    }

    /// Marks a model as being unloaded; its bytes keep counting until
    /// [`Ledger::remove`]. Returns false if it has no entry.
    pub fn begin_unload(&mut self, id: &str) -> bool {
        self.set_state(id, ModelState::Unloading)
    }

    fn set_state(&mut self, id: &str, state: ModelState) -> bool {
        let recency = self.next_recency();
        match self.entries.get_mut(id) {
            Some(entry) => {
                entry.state = state;
                if state == ModelState::Resident {
                    entry.recency = recency;
                }
                true
            }
            None => false,
        }
    }

    /// Takes back a [`Ledger::begin_unload`] whose unload failed: the model
    /// is resident again, its recency unchanged. Returns false if unknown.
    pub fn cancel_unload(&mut self, id: &str) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) => {
                entry.state = ModelState::Resident;
                true
            }
            None => false,
        }
    }

    /// Removes a model and frees its bytes, answering its last entry.
    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.used = self.used.saturating_sub(u128::from(entry.bytes));
        Some(entry)
    }

    /// Records `id` as parked: it now holds only `residual` bytes (its
    /// measured and declared sizes are kept for its wake). Returns false if
    /// unknown.
    pub fn park(&mut self, id: &str, residual: u64) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) => {
                let residual = residual.min(entry.bytes);
                self.used = self.used.saturating_sub(u128::from(entry.bytes - residual));
                entry.bytes = residual;
                entry.state = ModelState::Parked;
                entry.leases = 0;
                true
            }
            None => false,
        }
    }

    /// Starts waking the parked `id`: it is loading again and charged
    /// `bytes`. Returns false unless it was parked.
    pub fn wake(&mut self, id: &str, bytes: u64) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) if entry.state == ModelState::Parked => {
                self.used = self.used.saturating_sub(u128::from(entry.bytes)) + u128::from(bytes);
                entry.bytes = bytes;
                entry.state = ModelState::Loading;
                true
            }
            _ => false,
        }
    }

    /// Pins or unpins `id`. Returns false if it is not in the ledger.
    pub fn set_pinned(&mut self, id: &str, pinned: bool) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) => {
                entry.pinned = pinned;
                true
            }
            None => false,
        }
    }

    /// Makes `id` the most recently used model. Returns false if unknown.
    pub fn touch(&mut self, id: &str) -> bool {
        let recency = self.next_recency();
        match self.entries.get_mut(id) {
            Some(entry) => {
                entry.recency = recency;
                true
            }
            None => false,
        }
    }

    /// Adds a lease to a resident model (and touches it). Returns false if
    /// the model is not resident.
    pub fn lease(&mut self, id: &str) -> bool {
        let recency = self.next_recency();
        match self.entries.get_mut(id) {
            Some(entry) if entry.state == ModelState::Resident => {
                entry.leases += 1;
                entry.recency = recency;
                true
            }
            _ => false,
        }
    }

    /// Drops one lease of `id` (and touches it). Returns false if it held
    /// none.
    pub fn release(&mut self, id: &str) -> bool {
        let recency = self.next_recency();
        match self.entries.get_mut(id) {
            Some(entry) if entry.leases > 0 => {
                entry.leases -= 1;
                entry.recency = recency;
                true
            }
            _ => false,
        }
    }

    /// Records the footprint the card showed for `id`; from now on it is
    /// charged the larger of declared and measured bytes. Returns false if
    /// unknown.
    pub fn calibrate(&mut self, id: &str, measured: u64) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) => {
                let bytes = entry.declared.max(measured);
                self.used = self.used.saturating_sub(u128::from(entry.bytes)) + u128::from(bytes);
                entry.bytes = bytes;
                entry.measured = Some(measured);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn bytes_count_from_reservation_until_removal() {
        let mut ledger = Ledger::new(16 * GIB);
        let m = ModelSpec::new("m", "llm", 4 * GIB);
        ledger.reserve(&m);
        assert_eq!(ledger.get("m").unwrap().state, ModelState::Loading);
        assert_eq!(ledger.free(), 12 * GIB);
        assert!(!ledger.is_resident("m"));
        assert!(ledger.commit("m"));
        assert!(ledger.is_resident("m"));
        assert!(ledger.begin_unload("m"));
        assert_eq!(ledger.used(), 4 * GIB, "an unloading model still counts");
        assert_eq!(ledger.remove("m").unwrap().bytes, 4 * GIB);
        assert_eq!((ledger.used(), ledger.free()), (0, 16 * GIB));
    }

    #[test]
    fn reserving_twice_charges_once() {
        let mut ledger = Ledger::new(16 * GIB);
        let m = ModelSpec::new("m", "llm", 4 * GIB);
        ledger.reserve(&m);
        ledger.reserve(&m);
        assert_eq!(ledger.used(), 4 * GIB);
        assert_eq!(ledger.len(), 1);
    }

    #[test]
    fn recency_is_unique_and_follows_use() {
        let mut ledger = Ledger::new(16 * GIB);
        for id in ["a", "b"] {
            ledger.reserve(&ModelSpec::new(id, "llm", GIB));
            ledger.commit(id);
        }
        let r = |l: &Ledger, id| l.get(id).unwrap().recency;
        assert!(r(&ledger, "a") < r(&ledger, "b"));
        ledger.touch("a");
        assert!(r(&ledger, "a") > r(&ledger, "b"));
        assert!(ledger.lease("b"));
        assert!(r(&ledger, "b") > r(&ledger, "a"));
    }

    #[test]
    fn leases_only_on_resident_models_and_never_below_zero() {
        let mut ledger = Ledger::new(16 * GIB);
        ledger.reserve(&ModelSpec::new("m", "llm", GIB));
        assert!(!ledger.lease("m"), "a loading model cannot be leased");
        ledger.commit("m");
        assert!(ledger.lease("m"));
        assert!(ledger.release("m"));
        assert!(!ledger.release("m"));
        assert_eq!(ledger.get("m").unwrap().leases, 0);
    }

    #[test]
    fn history_keeps_the_last_gaps_and_averages_the_miss_gap() {
        let mut ledger = Ledger::new(16 * GIB);
        ledger.note_request("a"); // 1, miss
        ledger.insert_resident(&ModelSpec::new("a", "llm", GIB));
        ledger.note_request("b"); // 2, miss: gap 1
        ledger.note_request("a"); // 3, hit
        let a = ledger.history().model("a").unwrap();
        assert_eq!(
            (a.last, a.gaps.iter().copied().collect::<Vec<_>>()),
            (3, vec![2])
        );
        assert_eq!(ledger.history().miss_gap(), Some(1.0));
        ledger.note_request("c"); // 4, miss: gap 2 -> 1 + 0.2 * (2 - 1)
        assert!((ledger.history().miss_gap().unwrap() - 1.2).abs() < 1e-12);
        for _ in 0..40 {
            ledger.note_request("a");
        }
        let a = ledger.history().model("a").unwrap();
        assert_eq!(a.gaps.len(), HISTORY_GAPS, "only the last gaps are kept");
        assert!(a.gaps.iter().all(|&g| g == 1));
        assert_eq!(ledger.history().requests(), 44);
    }

    #[test]
    fn calibration_charges_the_larger_footprint() {
        let mut ledger = Ledger::new(16 * GIB);
        ledger.insert_resident(&ModelSpec::new("m", "llm", 2 * GIB));
        assert!(ledger.calibrate("m", 3 * GIB));
        assert_eq!(ledger.used(), 3 * GIB);
        let entry = ledger.get("m").unwrap();
        assert_eq!((entry.declared, entry.measured), (2 * GIB, Some(3 * GIB)));
        // Smaller than declared: the declared size still counts.
        assert!(ledger.calibrate("m", GIB));
        assert_eq!(ledger.used(), 2 * GIB);
        assert!(!ledger.calibrate("x", GIB));
    }
}
