//! The simulated backend: loads and unloads take the configured time, may
//! be told to fail, and remember what they hold. On a [`SimCard`] it
//! allocates each model's real footprint, fails a load with an
//! out-of-memory error when the card lacks room, and gives memory back
//! `release_ms` after an unload. It stands in for real model servers in
//! scenarios, tests and examples.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use vram_actors::{ArcStr, Backend, BackendError, BackendFuture, ModelSpec};

use crate::config::SimOptions;
use crate::gpu::SimCard;

#[derive(Debug, Default)]
struct State {
    /// The models held (loaded or parked), each with what it allocated
    /// (for its wake): one map, so a load or an unload touches one entry;
    /// hashed (a load and its unload each touch it once), sorted only
    /// when listed.
    held: foldhash::HashMap<ArcStr, u64>,
    /// Of those, the ones asleep (parked).
    parked: BTreeSet<String>,
    loads: u64,
    unloads: u64,
    parks: u64,
    wakes: u64,
}

/// The host's page cache as the simulated backends see it: which models'
/// files are in memory (least recently read first), up to a size, and the
/// reads under way. Shared by every simulated backend of a manager.
#[derive(Debug, Clone, Default)]
pub struct SimPageCache {
    state: Rc<RefCell<PageCache>>,
}

#[derive(Debug, Default)]
struct PageCache {
    capacity: u64,
    /// (model, bytes), least recently read first.
    cached: Vec<(String, u64)>,
    /// When each model's files started being read ahead of its load.
    reading: HashMap<String, tokio::time::Instant>,
}

impl SimPageCache {
    /// A page cache that keeps up to `capacity` bytes of files.
    pub fn new(capacity: u64) -> Self {
        Self {
            state: Rc::new(RefCell::new(PageCache {
                capacity,
                ..PageCache::default()
            })),
        }
    }

    /// Starts reading `model`'s files ahead of its load.
    pub fn read_ahead(&self, model: &str) {
        self.state
            .borrow_mut()
            .reading
            .entry(model.to_string())
            .or_insert_with(tokio::time::Instant::now);
    }

    /// Whether `model`'s files are in memory now.
    pub fn contains(&self, model: &str) -> bool {
        self.state.borrow().cached.iter().any(|(m, _)| m == model)
    }

    /// How long a load of `model` takes: warm if its files are cached,
    /// cold less what a read ahead has already done, else cold.
    fn load_time(&self, model: &str, cold: Duration, warm: Duration) -> Duration {
        let mut state = self.state.borrow_mut();
        let started = state.reading.remove(model);
        if state.cached.iter().any(|(m, _)| m == model) {
            return warm;
        }
        match started {
            Some(at) => {
                let reading = cold.saturating_sub(warm);
                warm + reading.saturating_sub(at.elapsed())
            }
            None => cold,
        }
    }

    /// `model`'s files were read: most recently used; the least recently
    /// read go when the cache is over its size.
    fn read(&self, model: &str, bytes: u64) {
        let mut state = self.state.borrow_mut();
        state.cached.retain(|(m, _)| m != model);
        if bytes > state.capacity {
            return;
        }
        state.cached.push((model.to_string(), bytes));
        let mut total: u64 = state.cached.iter().map(|(_, b)| b).sum();
        while total > state.capacity {
            let (_, b) = state.cached.remove(0);
            total -= b;
        }
    }
}

/// A simulated backend for one kind. Clones share state, so a test can
/// keep one to inspect what the manager asked of it.
#[derive(Debug, Clone, Default)]
pub struct SimBackend {
    options: Rc<foldhash::HashMap<String, SimOptions>>,
    state: Rc<RefCell<State>>,
    card: Option<SimCard>,
    cache: Option<SimPageCache>,
}

impl SimBackend {
    /// A backend that knows each model's simulated options; models not in
    /// `options` load and unload at once.
    pub fn new(options: HashMap<String, SimOptions>) -> Self {
        Self {
            options: Rc::new(options.into_iter().collect()),
            state: Rc::default(),
            card: None,
            cache: None,
        }
    }

    /// The same backend, its loads warm or cold by `cache`.
    pub fn with_page_cache(mut self, cache: SimPageCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The same backend, allocating its models on `card`.
    pub fn on_card(mut self, card: SimCard) -> Self {
        self.card = Some(card);
        self
    }

    fn options(&self, id: &str) -> SimOptions {
        self.options.get(id).copied().unwrap_or_default()
    }

    /// How many loads have completed successfully.
    pub fn load_count(&self) -> u64 {
        self.state.borrow().loads
    }

    /// How many unloads have completed.
    pub fn unload_count(&self) -> u64 {
        self.state.borrow().unloads
    }

    /// How many parks and wakes have completed.
    pub fn park_counts(&self) -> (u64, u64) {
        let state = self.state.borrow();
        (state.parks, state.wakes)
    }

    /// The models asleep now.
    pub fn parked(&self) -> Vec<String> {
        self.state.borrow().parked.iter().cloned().collect()
    }

    /// The models this backend holds now (parked ones included).
    pub fn holding(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .state
            .borrow()
            .held
            .keys()
            .map(ToString::to_string)
            .collect();
        ids.sort_unstable();
        ids
    }
}

impl SimBackend {
    /// The end of a load: the files are read, the card allocates the
    /// model's footprint (or fails as a real card would), and it is held.
    fn finish_load(
        &self,
        id: &ArcStr,
        file_bytes: u64,
        options: SimOptions,
    ) -> Result<(), BackendError> {
        if let Some(cache) = &self.cache {
            cache.read(id, file_bytes);
        }
        if options.fail_load {
            return Err(BackendError::new(format!("simulated load failure of {id}")));
        }
        let bytes = options.actual_bytes.unwrap_or(file_bytes);
        if let Some(card) = &self.card {
            card.allocate(id.clone(), bytes)
                .map_err(BackendError::new)?;
        }
        let mut state = self.state.borrow_mut();
        if !state.parked.is_empty() {
            // A fresh server is awake.
            state.parked.remove(id.as_str());
        }
        state.held.insert(id.clone(), bytes);
        state.loads += 1;
        Ok(())
    }

    /// The end of an unload: the card gets the memory back (after
    /// `release_ms`), and the model is no longer held.
    fn finish_unload(&self, id: &str, options: SimOptions) {
        if let Some(card) = &self.card {
            card.release(id, Duration::from_millis(options.release_ms));
        }
        let mut state = self.state.borrow_mut();
        if !state.parked.is_empty() {
            state.parked.remove(id);
        }
        if state.held.remove(id).is_some() {
            state.unloads += 1;
        }
    }
}

impl Backend for SimBackend {
    /// Takes `load_ms` (less what the page cache saves), then finishes;
    /// an instant load finishes before it answers (no copy of the id for
    /// a future to keep).
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        let options = self.options(&model.id);
        let cold = Duration::from_millis(options.load_ms);
        let time = match (&self.cache, options.warm_load_ms) {
            (Some(cache), Some(warm)) => {
                cache.load_time(&model.id, cold, Duration::from_millis(warm))
            }
            _ => cold,
        };
        if time.is_zero() {
            return match self.finish_load(&model.id, model.bytes, options) {
                Ok(()) => vram_actors::done(),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            };
        }
        let (this, id, file_bytes) = (self.clone(), model.id.clone(), model.bytes);
        Box::pin(async move {
            actix::clock::sleep(time).await;
            this.finish_load(&id, file_bytes, options)
        })
    }

    /// Takes `unload_ms`, then finishes (an instant unload before it
    /// answers).
    fn unload(&self, id: &str) -> BackendFuture<()> {
        let options = self.options(id);
        if options.unload_ms == 0 {
            self.finish_unload(id, options);
            return vram_actors::done();
        }
        let (this, id) = (self.clone(), id.to_string());
        Box::pin(async move {
            actix::clock::sleep(Duration::from_millis(options.unload_ms)).await;
            this.finish_unload(&id, options);
            Ok(())
        })
    }

    /// Sleeps `sleep_ms`, then keeps only the parked residual on the card
    /// (the rest comes back `release_ms` later).
    fn park(&self, id: &str) -> BackendFuture<()> {
        let options = self.options(id);
        let state = self.state.clone();
        let id = id.to_string();
        let card = self.card.clone();
        Box::pin(async move {
            let Some(park) = options.park else {
                return Err(BackendError::new(format!("{id} cannot be parked")));
            };
            if !state.borrow().held.contains_key(id.as_str()) {
                return Err(BackendError::new(format!("{id} is not loaded")));
            }
            if park.sleep_ms > 0 {
                actix::clock::sleep(Duration::from_millis(park.sleep_ms)).await;
            }
            if let Some(card) = &card {
                card.shrink(&id, park.vram, Duration::from_millis(options.release_ms));
            }
            let mut state = state.borrow_mut();
            state.parked.insert(id);
            state.parks += 1;
            Ok(())
        })
    }

    /// Takes `wake_ms`, then holds its whole footprint on the card again.
    fn wake(&self, id: &str) -> BackendFuture<()> {
        let options = self.options(id);
        let state = self.state.clone();
        let id = id.to_string();
        let card = self.card.clone();
        Box::pin(async move {
            let Some(park) = options.park else {
                return Err(BackendError::new(format!("{id} cannot be woken")));
            };
            // Awake from the moment the wake starts (see `Backend::parked`).
            if !state.borrow_mut().parked.remove(&id) {
                return Err(BackendError::new(format!("{id} is not asleep")));
            }
            if park.wake_ms > 0 {
                actix::clock::sleep(Duration::from_millis(park.wake_ms)).await;
            }
            let full = state.borrow().held.get(id.as_str()).copied().unwrap_or(0);
            if let Some(card) = &card {
                card.allocate(id.as_str(), full.saturating_sub(park.vram))
                    .map_err(BackendError::new)?;
            }
            state.borrow_mut().wakes += 1;
            Ok(())
        })
    }

    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let holding = self.holding();
        Box::pin(async move { Ok(holding) })
    }

    fn parked(&self) -> BackendFuture<Vec<String>> {
        Box::pin(std::future::ready(Ok(SimBackend::parked(self))))
    }

    /// A crash takes the simulated server down with everything it held.
    fn reset(&self) {
        let mut state = self.state.borrow_mut();
        if let Some(card) = &self.card {
            card.release_all(state.held.keys());
        }
        state.held.clear();
        state.parked.clear();
    }
}
