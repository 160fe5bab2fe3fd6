//! The eviction planner: given the ledger, the kinds, the catalog, a request
//! and the free bytes to plan against, decide which models to unload (in
//! order) so the request fits, or refuse with the numbers.
//!
//! Pure: no actix, no I/O, no clock. It follows the seven steps of the
//! policy (see ARCHITECTURE.md):
//!
//! 1. unknown model -> `unknown_model`; larger than the card ->
//!    `exceeds_capacity`;
//! 2. already resident -> [`Plan::Resident`] (the caller touches it);
//! 3. fits in the free bytes -> load with no victims;
//! 4. candidates: resident models that are not leased, not pinned, and not of
//!    a protected kind above the requester's, ordered by priority, then least
//!    recently used;
//! 5. the shortest prefix that frees enough, or `insufficient_vram` with
//!    nothing evicted;
//! 6. trim: from the last chosen back to the first, spare every victim whose
//!    eviction is not needed for the request to fit;
//! 7. the caller unloads the victims in order, then loads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::VramError;
use crate::kind::{Kind, Kinds};
use crate::ledger::{Entry, Ledger, ModelState};
use crate::model::{Catalog, ModelSpec};

/// What the planner decided for a request that can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The model is already resident: touch it, nothing else.
    Resident,
    /// Unload these models, in this order, then load the requested one.
    /// Empty when the model fits as things are.
    Load {
        /// Victims in unload order.
        victims: Vec<String>,
    },
}

impl Plan {
    /// The models this plan unloads, in order (none for `Resident`).
    pub fn victims(&self) -> &[String] {
        match self {
            Plan::Resident => &[],
            Plan::Load { victims } => victims,
        }
    }
}

/// Plans a load of `model` with `free` bytes available (the ledger's free
/// bytes, or less when the card itself has less).
///
/// ```
/// use vram_actors::{plan, Catalog, Kind, Kinds, Ledger, ModelSpec, Plan};
/// const GIB: u64 = 1 << 30;
/// let catalog: Catalog = [
///     ModelSpec::new("llm-8b", "llm", 8 * GIB),
///     ModelSpec::new("llm-14b", "llm", 12 * GIB),
/// ]
/// .into_iter()
/// .collect();
/// let mut ledger = Ledger::new(16 * GIB);
/// ledger.insert_resident(catalog.get("llm-8b").unwrap());
/// let kinds: Kinds = [Kind::new("llm", 0, false), Kind::new("asr", 2, true)]
///     .into_iter()
///     .collect();
/// let plan = plan(&ledger, &kinds, &catalog, "llm-14b", ledger.free())?;
/// assert_eq!(plan, Plan::Load { victims: vec!["llm-8b".to_string()] });
/// # Ok::<(), vram_actors::VramError>(())
/// ```
pub fn plan(
    ledger: &Ledger,
    kinds: &Kinds,
    catalog: &Catalog,
    model: &str,
    free: u64,
) -> Result<Plan, VramError> {
    // Step 1: requests that no eviction can serve.
    let spec = servable(catalog, ledger.capacity(), model)?;
    let unknown = || VramError::UnknownModel {
        model: model.to_string(),
    };
    let requester = kinds.get(&spec.kind).ok_or_else(unknown)?;
    let needed = spec.bytes;
    // Step 2: already there.
    if ledger.is_resident(model) {
        return Ok(Plan::Resident);
    }
    // Step 3: fits as things are. A ledger over its capacity (a reconcile
    // found a model its backend would not unload) must first come back
    // under it: that excess is owed too.
    let over = ledger.used().saturating_sub(ledger.capacity());
    let shortfall = needed.saturating_sub(free).saturating_add(over);
    if shortfall == 0 {
        return Ok(Plan::Load { victims: vec![] });
    }
    // Step 4: who may go, lowest tier and least recently used first. Leased
    // models are set aside (counted, so a caller can wait for them). The
    // few kinds are resolved once, not once per model.
    let (candidates, leased) = candidates(ledger, kinds, requester, model);

    // Step 5: the shortest sufficient prefix, or refuse with nothing evicted.
    let mut freed = 0u64;
    let mut chosen = 0;
    while freed < shortfall && chosen < candidates.len() {
        freed = freed.saturating_add(candidates[chosen].1);
        chosen += 1;
    }
    if freed < shortfall {
        return Err(VramError::InsufficientVram {
            model: model.to_string(),
            needed,
            free,
            evictable: freed,
            leased,
        });
    }

    // Step 6: trim from the last chosen back to the first.
    let mut keep = vec![true; chosen];
    for i in (0..chosen).rev() {
        let bytes = candidates[i].1;
        if freed - bytes >= shortfall {
            freed -= bytes;
            keep[i] = false;
        }
    }
    let victims = candidates[..chosen]
        .iter()
        .zip(keep)
        .filter(|(_, keep)| *keep)
        .map(|((_, _, entry), _)| entry.id.clone())
        .collect();
    Ok(Plan::Load { victims })
}

/// Policy step 4: the resident models a request for `model` (of kind
/// `requester`) may evict, lowest tier and least recently used first, as
/// (sort key, bytes, entry); and the bytes of those set aside only because
/// they are leased (a caller may wait for them).
pub(crate) fn candidates<'a>(
    ledger: &'a Ledger,
    kinds: &Kinds,
    requester: &Kind,
    model: &str,
) -> (Vec<(u128, u64, &'a Entry)>, u64) {
    // The few kinds are resolved once, not once per model.
    let kind_table: Vec<(&str, u32, bool)> = kinds
        .iter()
        .map(|k| (k.name.as_str(), k.priority, k.evictable_by(requester)))
        .collect();
    let mut leased = 0u64;
    // (priority and recency packed into one sort key, bytes, entry)
    let mut candidates: Vec<(u128, u64, &Entry)> = Vec::new();
    for entry in ledger.entries() {
        if entry.state != ModelState::Resident || entry.pinned || entry.id == model {
            continue;
        }
        let Some(&(_, priority, evictable)) =
            kind_table.iter().find(|(name, _, _)| *name == entry.kind)
        else {
            continue; // a kind we cannot rank is never evicted
        };
        if !evictable {
            continue;
        }
        if entry.leases > 0 {
            leased = leased.saturating_add(entry.bytes);
            continue;
        }
        // Priority first, then recency: both whole, so any two priorities
        // (and any two recencies) compare exactly.
        let key = (u128::from(priority) << 64) | u128::from(entry.recency);
        candidates.push((key, entry.bytes, entry));
    }
    // Recency is unique, so keys never tie and an unstable sort is exact.
    candidates.sort_unstable_by_key(|&(key, _, _)| key);
    (candidates, leased)
}

/// Policy step 1: the model's entry, unless it is unknown
/// (`unknown_model`) or larger than the whole `capacity`
/// (`exceeds_capacity`) — requests no eviction can serve.
pub fn servable<'a>(
    catalog: &'a Catalog,
    capacity: u64,
    model: &str,
) -> Result<&'a ModelSpec, VramError> {
    let spec = catalog.get(model).ok_or_else(|| VramError::UnknownModel {
        model: model.to_string(),
    })?;
    if spec.bytes > capacity {
        return Err(VramError::ExceedsCapacity {
            model: model.to_string(),
            needed: spec.bytes,
            capacity,
        });
    }
    Ok(spec)
}

/// The resident models whose idle time has reached their TTL: not leased,
/// not pinned, with a TTL in `ttl`, last used (per `last_used`) at least
/// that long before `now`. Sorted by id.
pub fn expired(
    ledger: &Ledger,
    ttl: &HashMap<String, Duration>,
    last_used: &HashMap<String, Instant>,
    now: Instant,
) -> Vec<String> {
    ledger
        .entries()
        .filter(|e| is_expired(e, ttl, last_used, now))
        .map(|e| e.id.clone())
        .collect()
}

/// Whether one ledger entry has expired, by the rule of [`expired`].
pub fn is_expired(
    entry: &Entry,
    ttl: &HashMap<String, Duration>,
    last_used: &HashMap<String, Instant>,
    now: Instant,
) -> bool {
    let idle_enough = match (ttl.get(&entry.id), last_used.get(&entry.id)) {
        (Some(ttl), Some(used)) => now.saturating_duration_since(*used) >= *ttl,
        _ => false,
    };
    idle_enough && entry.state == ModelState::Resident && entry.leases == 0 && !entry.pinned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;

    const GIB: u64 = 1 << 30;

    /// A 16 GiB card with the voice-assistant kinds, driven the way the
    /// actors drive it: plan, unload victims, load.
    struct Card {
        ledger: Ledger,
        kinds: Kinds,
        catalog: Catalog,
    }

    impl Card {
        fn new(models: &[(&str, &str, u64)]) -> Self {
            Self {
                ledger: Ledger::new(16 * GIB),
                kinds: [
                    Kind::new("llm", 0, false),
                    Kind::new("tts", 1, false),
                    Kind::new("asr", 2, true),
                ]
                .into_iter()
                .collect(),
                catalog: models
                    .iter()
                    .map(|&(id, kind, gib)| ModelSpec::new(id, kind, gib * GIB))
                    .collect(),
            }
        }

        fn plan(&self, id: &str) -> Result<Plan, VramError> {
            plan(
                &self.ledger,
                &self.kinds,
                &self.catalog,
                id,
                self.ledger.free(),
            )
        }

        /// Plans and carries out a load; answers the victims.
        fn load(&mut self, id: &str) -> Result<Vec<String>, VramError> {
            let plan = self.plan(id)?;
            if plan == Plan::Resident {
                self.ledger.touch(id);
                return Ok(vec![]);
            }
            for victim in plan.victims() {
                self.ledger.remove(victim);
            }
            self.ledger.reserve(self.catalog.get(id).unwrap());
            self.ledger.commit(id);
            Ok(plan.victims().to_vec())
        }

        fn resident(&self) -> Vec<&str> {
            self.ledger.entries().map(|e| e.id.as_str()).collect()
        }
    }

    fn loaded(card: &mut Card, ids: &[&str]) {
        for id in ids {
            assert_eq!(
                card.load(id),
                Ok(vec![]),
                "{id} should fit without eviction"
            );
        }
    }

    // ---- The rows of the seed table (the original Python class this project started from) ----

    fn seed_day() -> Card {
        let mut card = Card::new(&[
            ("asr1", "asr", 3),
            ("tts1", "tts", 2),
            ("tts2", "tts", 2),
            ("llm1", "llm", 8),
            ("llm2", "llm", 8),
            ("llm3", "llm", 12),
        ]);
        loaded(&mut card, &["asr1", "tts1", "llm1"]);
        card
    }

    #[test]
    fn seed_row1_same_tier_replacement_evicts_the_other_llm() {
        // Same as the original.
        let mut card = seed_day();
        assert_eq!(card.load("llm2").unwrap(), ["llm1"]);
    }

    #[test]
    fn seed_row2_an_llm_request_may_evict_tts() {
        // Same as the original: llm2 alone frees 11 of the 12 needed.
        let mut card = seed_day();
        card.load("llm2").unwrap();
        assert_eq!(card.load("llm3").unwrap(), ["llm2", "tts1"]);
        assert_eq!(card.resident(), ["asr1", "llm3"]);
    }

    #[test]
    fn seed_row3_tts_request_evicts_the_llm() {
        // Same as the original.
        let mut card = seed_day();
        card.load("llm2").unwrap();
        card.load("llm3").unwrap();
        assert_eq!(card.load("tts2").unwrap(), ["llm3"]);
        assert_eq!(card.resident(), ["asr1", "tts2"]);
    }

    #[test]
    fn seed_row4_no_collateral_eviction() {
        // Departs from the original, which evicted llm1 and then failed:
        // here a request that cannot fit evicts nothing.
        let mut card = Card::new(&[("asr1", "asr", 10), ("llm1", "llm", 4), ("llm2", "llm", 7)]);
        loaded(&mut card, &["asr1", "llm1"]);
        let before = card.ledger.clone();
        let err = card.load("llm2").unwrap_err();
        assert_eq!(err.code(), "insufficient_vram");
        assert_eq!(
            err,
            VramError::InsufficientVram {
                model: "llm2".into(),
                needed: 7 * GIB,
                free: 2 * GIB,
                evictable: 4 * GIB,
                leased: 0
            }
        );
        assert_eq!(card.ledger, before, "llm1 must survive the refusal");
    }

    #[test]
    fn seed_row5_asr_is_protected_from_tts() {
        // Same as the original: it fails.
        let mut card = Card::new(&[("asr1", "asr", 10), ("asr2", "asr", 4), ("tts1", "tts", 4)]);
        loaded(&mut card, &["asr1", "asr2"]);
        assert_eq!(card.load("tts1").unwrap_err().code(), "insufficient_vram");
        assert_eq!(card.resident(), ["asr1", "asr2"]);
    }

    #[test]
    fn seed_row6_asr_replaces_asr() {
        // Same as the original: asr1 is the least recently used ASR.
        let mut card = Card::new(&[("asr1", "asr", 10), ("asr2", "asr", 4), ("asr3", "asr", 4)]);
        loaded(&mut card, &["asr1", "asr2"]);
        assert_eq!(card.load("asr3").unwrap(), ["asr1"]);
    }

    #[test]
    fn seed_row7_larger_than_the_card_evicts_nothing() {
        // Departs from the original, which evicted llm1 and then failed.
        let mut card = Card::new(&[("llm1", "llm", 4), ("big", "llm", 20)]);
        loaded(&mut card, &["llm1"]);
        assert_eq!(
            card.load("big").unwrap_err(),
            VramError::ExceedsCapacity {
                model: "big".into(),
                needed: 20 * GIB,
                capacity: 16 * GIB
            }
        );
        assert_eq!(card.resident(), ["llm1"]);
    }

    // ---- Each step of the policy ----

    #[test]
    fn step1_unknown_model() {
        let card = Card::new(&[]);
        assert_eq!(card.plan("ghost").unwrap_err().code(), "unknown_model");
    }

    #[test]
    fn step1_model_of_unknown_kind_is_unknown() {
        let mut card = Card::new(&[]);
        card.catalog.insert(ModelSpec::new("vad", "vad", GIB));
        assert_eq!(card.plan("vad").unwrap_err().code(), "unknown_model");
    }

    #[test]
    fn step2_resident_model_is_only_touched() {
        let mut card = Card::new(&[("a", "llm", 8), ("b", "llm", 8)]);
        loaded(&mut card, &["a", "b"]);
        assert_eq!(card.plan("a").unwrap(), Plan::Resident);
        card.load("a").unwrap();
        assert!(card.ledger.get("a").unwrap().recency > card.ledger.get("b").unwrap().recency);
    }

    #[test]
    fn step3_fits_without_victims() {
        let mut card = Card::new(&[("a", "llm", 8), ("b", "llm", 8)]);
        loaded(&mut card, &["a"]);
        assert_eq!(card.plan("b").unwrap(), Plan::Load { victims: vec![] });
    }

    #[test]
    fn step3_plans_against_the_free_bytes_given() {
        // The card may have less free than the ledger thinks (other
        // processes): then eviction happens although the ledger has room.
        let mut card = Card::new(&[("a", "llm", 8), ("b", "llm", 4)]);
        loaded(&mut card, &["a"]);
        let plan = plan(&card.ledger, &card.kinds, &card.catalog, "b", 2 * GIB).unwrap();
        assert_eq!(plan.victims(), ["a"]);
    }

    #[test]
    fn step4_lowest_priority_goes_first() {
        let mut card = Card::new(&[
            ("t", "tts", 4),
            ("l", "llm", 4),
            ("a", "asr", 4),
            ("x", "asr", 8),
        ]);
        loaded(&mut card, &["t", "l", "a"]);
        // The tts was loaded first, yet the llm goes first.
        assert_eq!(card.load("x").unwrap(), ["l"]);
    }

    #[test]
    fn step4_least_recently_used_within_a_tier() {
        let mut card = Card::new(&[("a", "llm", 6), ("b", "llm", 6), ("c", "llm", 6)]);
        loaded(&mut card, &["a", "b"]);
        card.load("a").unwrap(); // touch: b is now the least recently used
        assert_eq!(card.load("c").unwrap(), ["b"]);
    }

    #[test]
    fn step4_leased_models_are_not_candidates() {
        let mut card = Card::new(&[("a", "llm", 6), ("b", "llm", 6), ("c", "llm", 6)]);
        loaded(&mut card, &["a", "b"]);
        card.ledger.lease("a");
        card.load("b").unwrap(); // b most recent; a would go first but is leased
        assert_eq!(card.load("c").unwrap(), ["b"]);
    }

    #[test]
    fn step4_refusal_reports_leased_bytes() {
        let mut card = Card::new(&[("a", "llm", 10), ("c", "llm", 10)]);
        loaded(&mut card, &["a"]);
        card.ledger.lease("a");
        match card.plan("c").unwrap_err() {
            VramError::InsufficientVram {
                evictable, leased, ..
            } => {
                assert_eq!((evictable, leased), (0, 10 * GIB));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn step4_pinned_models_are_not_candidates() {
        let mut card = Card::new(&[("b", "llm", 6), ("c", "llm", 6)]);
        card.catalog
            .insert(ModelSpec::new("a", "llm", 6 * GIB).pinned(true));
        loaded(&mut card, &["a", "b"]);
        assert_eq!(card.load("c").unwrap(), ["b"]);
        assert!(card.ledger.get("a").is_some());
    }

    #[test]
    fn step4_protected_kind_is_skipped_for_lower_kinds_only() {
        let mut card = Card::new(&[("asr", "asr", 10), ("llm", "llm", 8), ("asr2", "asr", 8)]);
        loaded(&mut card, &["asr"]);
        assert_eq!(card.plan("llm").unwrap_err().code(), "insufficient_vram");
        assert_eq!(card.load("asr2").unwrap(), ["asr"]);
    }

    #[test]
    fn step5_shortest_prefix_stops_as_soon_as_it_fits() {
        let mut card = Card::new(&[
            ("a", "llm", 4),
            ("b", "llm", 4),
            ("c", "llm", 4),
            ("d", "llm", 8),
        ]);
        loaded(&mut card, &["a", "b", "c"]);
        // free 4, needs 8: a alone is enough, b and c stay.
        assert_eq!(card.load("d").unwrap(), ["a"]);
        assert_eq!(card.resident(), ["b", "c", "d"]);
    }

    #[test]
    fn step6_trim_spares_victims_that_are_not_needed() {
        let mut card = Card::new(&[
            ("small", "llm", 2),
            ("big", "llm", 8),
            ("tts", "tts", 2),
            ("huge", "llm", 12),
        ]);
        loaded(&mut card, &["small", "big", "tts"]);
        // free 4, needs 12: the prefix is [small, big] (14 free); without
        // small, big alone still frees 12, so small is spared.
        assert_eq!(card.load("huge").unwrap(), ["big"]);
        assert_eq!(card.resident(), ["huge", "small", "tts"]);
    }

    #[test]
    fn idle_models_expire_unless_leased_pinned_or_without_ttl() {
        let mut card = Card::new(&[
            ("a", "llm", 1),
            ("b", "llm", 1),
            ("c", "llm", 1),
            ("d", "tts", 1),
        ]);
        card.catalog
            .insert(ModelSpec::new("p", "llm", GIB).pinned(true));
        loaded(&mut card, &["a", "b", "c", "d", "p"]);
        card.ledger.lease("b");
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let ttl: HashMap<String, Duration> = ["a", "b", "c", "p"]
            .iter()
            .map(|id| (id.to_string(), minute))
            .collect();
        let mut last_used: HashMap<String, Instant> = ["a", "b", "c", "d", "p"]
            .iter()
            .map(|id| (id.to_string(), t0))
            .collect();
        last_used.insert("c".into(), t0 + Duration::from_secs(30));
        assert!(expired(&card.ledger, &ttl, &last_used, t0 + Duration::from_secs(59)).is_empty());
        // a: idle a minute. b: leased. c: used later. d: no TTL. p: pinned.
        assert_eq!(expired(&card.ledger, &ttl, &last_used, t0 + minute), ["a"]);
        assert_eq!(
            expired(&card.ledger, &ttl, &last_used, t0 + 2 * minute),
            ["a", "c"]
        );
    }

    #[test]
    fn step7_victims_come_in_unload_order() {
        let mut card = Card::new(&[
            ("l", "llm", 5),
            ("t", "tts", 5),
            ("a", "asr", 5),
            ("x", "asr", 10),
        ]);
        loaded(&mut card, &["t", "l", "a"]);
        assert_eq!(card.plan("x").unwrap().victims(), ["l", "t"]);
    }

    #[test]
    fn step4_priorities_compare_exactly_however_large() {
        let mut card = Card::new(&[
            ("high", "big-high", 8),
            ("low", "big-low", 8),
            ("x", "asr", 8),
        ]);
        card.kinds = [
            Kind::new("big-high", 100_000, false),
            Kind::new("big-low", 65_536, false),
            Kind::new("asr", u32::MAX, false),
        ]
        .into_iter()
        .collect();
        // "high" is the least recently used, but its tier is higher.
        loaded(&mut card, &["high", "low"]);
        assert_eq!(card.plan("x").unwrap().victims(), ["low"]);
    }
}
