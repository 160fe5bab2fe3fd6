//! The models a manager may load: their ids, kinds and declared sizes.

use std::collections::BTreeMap;
use std::sync::Arc;

use arcstr::ArcStr;

use crate::error::VramError;

/// One model the manager knows how to load.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelSpec {
    /// Unique id, e.g. `"whisper-large-v3"`. Shared: the ledger, the jobs
    /// and the simulated backend hold it without copying it.
    pub id: ArcStr,
    /// Name of the model's kind (see [`crate::Kinds`]), shared like the id.
    pub kind: ArcStr,
    /// Declared VRAM footprint in bytes.
    pub bytes: u64,
    /// A pinned model is never evicted nor expired; only an explicit
    /// `Unload` removes it.
    pub pinned: bool,
    /// How the model sleeps instead of stopping, if it can.
    pub park: Option<Park>,
}

/// What a model holds while parked: its server keeps running (weights in
/// host RAM) and comes back faster than a cold load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Park {
    /// Bytes it still holds on the card while parked.
    pub vram: u64,
    /// Host RAM it holds while parked (counted against the host budget).
    pub host: u64,
}

impl ModelSpec {
    /// A model that is not pinned.
    pub fn new(id: impl Into<ArcStr>, kind: impl Into<ArcStr>, bytes: u64) -> Self {
        Self {
            id: id.into(),
            kind: kind.into(),
            bytes,
            pinned: false,
            park: None,
        }
    }

    /// The same model, parked instead of stopped when it must leave (and
    /// the host budget allows).
    pub fn parks(mut self, park: Park) -> Self {
        self.park = Some(park);
        self
    }

    /// The bytes it frees when it leaves the card by parking.
    pub fn freed_by_parking(&self, charged: u64) -> u64 {
        self.park
            .map_or(charged, |p| charged.saturating_sub(p.vram))
    }

    /// The same model, pinned or not.
    pub fn pinned(mut self, pinned: bool) -> Self {
        self.pinned = pinned;
        self
    }
}

/// Model ids handed over in one message (the victims a backend unloads):
/// a few, so they stay inline.
pub(crate) type Ids = smallvec::SmallVec<[ArcStr; 4]>;

/// What a backend answers a batch of unloads: each model it tried, in
/// order, with its result (it stops at the first failure). Usually one.
pub(crate) type Unloads = smallvec::SmallVec<[(ArcStr, Result<(), VramError>); 1]>;

/// Every model a manager may load, by id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalog {
    /// Shared, so a load hands its backend the spec without a copy.
    by_id: BTreeMap<ArcStr, Arc<ModelSpec>>,
    /// How many of the models can park: plans look parking up only when
    /// some can.
    parking: usize,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a model, replacing any model with the same id.
    pub fn insert(&mut self, model: ModelSpec) {
        let parks = model.park.is_some();
        if let Some(old) = self.by_id.insert(model.id.clone(), Arc::new(model)) {
            self.parking -= usize::from(old.park.is_some());
        }
        self.parking += usize::from(parks);
    }

    /// Whether any model can park.
    pub fn any_parks(&self) -> bool {
        self.parking > 0
    }

    /// The model with this id, if known.
    pub fn get(&self, id: &str) -> Option<&ModelSpec> {
        self.by_id.get(id).map(|spec| &**spec)
    }

    /// The spec of `id`, shared (a load's command and message carry it
    /// without copying its strings).
    pub(crate) fn shared(&self, id: &str) -> Option<Arc<ModelSpec>> {
        self.by_id.get(id).cloned()
    }

    /// All models, by id.
    pub fn iter(&self) -> impl Iterator<Item = &ModelSpec> {
        self.by_id.values().map(|spec| &**spec)
    }

    /// How many models there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the catalog is empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

impl FromIterator<ModelSpec> for Catalog {
    fn from_iter<I: IntoIterator<Item = ModelSpec>>(iter: I) -> Self {
        let mut catalog = Self::new();
        for model in iter {
            catalog.insert(model);
        }
        catalog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_knows_whether_any_model_parks() {
        let mut catalog: Catalog = [ModelSpec::new("a", "llm", 4)].into_iter().collect();
        assert!(!catalog.any_parks());
        let park = Park { vram: 1, host: 4 };
        catalog.insert(ModelSpec::new("b", "llm", 4).parks(park));
        assert!(catalog.any_parks());
        // Replacing it with one that does not park forgets it.
        catalog.insert(ModelSpec::new("b", "llm", 4));
        assert!(!catalog.any_parks());
        catalog.insert(ModelSpec::new("a", "llm", 4).parks(park));
        catalog.insert(ModelSpec::new("a", "llm", 4).parks(park));
        assert!(catalog.any_parks());
    }
}
