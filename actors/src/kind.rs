//! Model kinds: what a model is (ASR, TTS, LLM, ...), how much it matters
//! when room is needed, and whether lower kinds may evict it.
//!
//! Kinds are data, not an enum, so a deployment can add its own (an
//! embedding model, a VAD) in settings without touching the planner.

use std::collections::BTreeMap;
use std::fmt;

/// One kind of model and its place in the eviction order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Kind {
    /// The kind's name as written in settings, e.g. `"asr"`.
    pub name: String,
    /// Eviction tier: lower priorities are evicted first.
    pub priority: u32,
    /// A protected kind is never evicted for a request of a lower priority;
    /// requests of the same or a higher priority may still replace it.
    pub protected: bool,
}

impl Kind {
    /// A kind with the given name, priority and protection.
    pub fn new(name: impl Into<String>, priority: u32, protected: bool) -> Self {
        Self {
            name: name.into(),
            priority,
            protected,
        }
    }

    /// Whether a model of this kind may be evicted to make room for a
    /// request of kind `requester`.
    pub fn evictable_by(&self, requester: &Kind) -> bool {
        !(self.protected && self.priority > requester.priority)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The set of kinds a manager knows, looked up by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kinds {
    by_name: BTreeMap<String, Kind>,
}

impl Kinds {
    /// An empty set; add kinds with [`Kinds::insert`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind, replacing any kind of the same name.
    pub fn insert(&mut self, kind: Kind) {
        self.by_name.insert(kind.name.clone(), kind);
    }

    /// The kind called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&Kind> {
        self.by_name.get(name)
    }

    /// All kinds, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Kind> {
        self.by_name.values()
    }

    /// How many kinds there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no kinds at all.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl FromIterator<Kind> for Kinds {
    fn from_iter<I: IntoIterator<Item = Kind>>(kinds: I) -> Self {
        let mut all = Self::new();
        for kind in kinds {
            all.insert(kind);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kinds the tests use: llm 0, tts 1, asr 2 protected.
    fn voice_assistant() -> Kinds {
        [
            Kind::new("llm", 0, false),
            Kind::new("tts", 1, false),
            Kind::new("asr", 2, true),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn kinds_collect_by_name() {
        let kinds = voice_assistant();
        let (llm, tts, asr) = (
            kinds.get("llm").unwrap(),
            kinds.get("tts").unwrap(),
            kinds.get("asr").unwrap(),
        );
        assert!(llm.priority < tts.priority && tts.priority < asr.priority);
        assert!(asr.protected && !tts.protected && !llm.protected);
    }

    #[test]
    fn protection_holds_only_against_lower_kinds() {
        let kinds = voice_assistant();
        let asr = kinds.get("asr").unwrap();
        assert!(!asr.evictable_by(kinds.get("tts").unwrap()));
        assert!(!asr.evictable_by(kinds.get("llm").unwrap()));
        assert!(asr.evictable_by(asr));
        // Unprotected kinds fall to anyone, even a lower kind.
        assert!(
            kinds
                .get("tts")
                .unwrap()
                .evictable_by(kinds.get("llm").unwrap())
        );
    }
}
