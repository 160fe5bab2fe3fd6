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
//!
//! Step 4's order is a value the planner takes ([`Order`]): `strict` (the
//! default: tier, then least recently used) or `adaptive` (what a reload
//! would cost, weighed by how soon each candidate is likely to be asked for
//! again; see [`plan_in_order`]). Everything else is the same under both.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arcstr::ArcStr;

use crate::error::VramError;
use crate::kind::{Kind, Kinds};
use crate::ledger::{Entry, History, Ledger, ModelState};
use crate::model::{Catalog, ModelSpec};
use crate::order::Order;

/// What the planner decided for a request that can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The model is already resident: touch it, nothing else.
    Resident,
    /// Unload these models, in this order, then load the requested one.
    /// Empty when the model fits as things are.
    Load {
        /// Victims in unload order.
        victims: Vec<ArcStr>,
    },
}

impl Plan {
    /// The models this plan unloads, in order (none for `Resident`).
    pub fn victims(&self) -> &[ArcStr] {
        match self {
            Plan::Resident => &[],
            Plan::Load { victims } => victims,
        }
    }
}

/// How the adaptive order ranks one resident model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Score {
    /// The model.
    pub id: ArcStr,
    /// The predicted chance (0..1) it is asked for within the horizon.
    pub p_soon: f64,
    /// Its reload cost (bytes) times `p_soon`: what evicting it is
    /// expected to cost. Cheaper candidates leave first.
    pub value: f64,
}

/// Candidates whose recent gaps do not reach past "now" are assumed to come
/// back this many requests after one more.
const UNSEEN_GAP: f64 = 8.0;

/// The horizon (in requests) within which a return counts as "soon":
/// twice the moving gap between misses, at least 8.
fn horizon(history: &History) -> f64 {
    (2.0 * history.miss_gap().unwrap_or(0.0)).max(8.0)
}

/// The chance (0..1) `model` is asked for soon, from its gaps: each recent
/// gap longer than the time since its last request is one way it may come
/// back (after the difference); with none, one more mean gap.
fn p_soon(history: &History, model: &str, horizon: f64) -> f64 {
    let now = history.requests();
    let Some(own) = history.model(model) else {
        return (-(now as f64 + 1.0 + UNSEEN_GAP) / horizon).exp();
    };
    let ago = now.saturating_sub(own.last);
    if own.gaps.is_empty() {
        return (-(ago as f64 + 1.0 + UNSEEN_GAP) / horizon).exp();
    }
    let (mut sum, mut count) = (0.0, 0u32);
    for &gap in &own.gaps {
        if gap > ago {
            sum += (-((gap - ago) as f64) / horizon).exp();
            count += 1;
        }
    }
    if count > 0 {
        return sum / f64::from(count);
    }
    let mean = own.gaps.iter().sum::<u64>() as f64 / own.gaps.len() as f64;
    (-(ago as f64 + 1.0 + mean) / horizon).exp()
}

/// How the adaptive order ranks each resident model of `ledger` now, by
/// id: what `Status` shows so a user can see why a model was chosen.
pub fn scores(ledger: &Ledger) -> Vec<Score> {
    let horizon = horizon(ledger.history());
    ledger
        .entries()
        .filter(|e| e.state == ModelState::Resident)
        .map(|e| {
            let p = p_soon(ledger.history(), &e.id, horizon);
            Score {
                id: e.id.clone(),
                p_soon: p,
                value: e.bytes as f64 * (p + 1e-9),
            }
        })
        .collect()
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
/// assert_eq!(plan.victims(), ["llm-8b"]);
/// # Ok::<(), vram_actors::VramError>(())
/// ```
pub fn plan(
    ledger: &Ledger,
    kinds: &Kinds,
    catalog: &Catalog,
    model: &str,
    free: u64,
) -> Result<Plan, VramError> {
    plan_in_order(ledger, kinds, catalog, model, free, Order::Strict)
}

/// [`plan`] with the candidates taken in `order`. Steps 1-3, the
/// candidates themselves, the refusal and the trim are the same under
/// every order; only which sufficient set of candidates leaves differs.
///
/// Under [`Order::Adaptive`]: protected candidates first (one can only
/// leave at a request of its own tier or above, so an idle one locks its
/// bytes against every lower tier) —
/// if they alone cover the need, the shortest prefix of them by (p_soon,
/// recency, id); otherwise all of them plus the set of the others with the
/// least total value that covers the rest (a 0/1 cover over a Pareto
/// front of (bytes freed, value): exact while the front holds at most 256
/// entries, thinned evenly beyond that), sorted by
/// (value, recency, id). Then the usual trim.
pub fn plan_in_order(
    ledger: &Ledger,
    kinds: &Kinds,
    catalog: &Catalog,
    model: &str,
    free: u64,
    order: Order,
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
    // Step 3: fits as things are. A ledger over its capacity must first
    // come back under it: that excess is owed too.
    let over = owed(ledger);
    let shortfall = needed.saturating_sub(free).saturating_add(over);
    if shortfall == 0 {
        return Ok(Plan::Load { victims: vec![] });
    }
    // Step 4: who may go, lowest tier and least recently used first. Leased
    // models are set aside (counted, so a caller can wait for them). The
    // few kinds are resolved once, not once per model.
    let (mut candidates, leased) = candidates_for(ledger, kinds, catalog, requester, model, true);
    // Counting victims that can park for what parking frees may fall short
    // where stopping them would not: then they are counted (and stopped)
    // whole, so parking never makes a request refused.
    let enough =
        |c: &[Candidate<'_>]| c.iter().fold(0u64, |s, c| s.saturating_add(c.1)) >= shortfall;
    if !enough(&candidates) {
        let (whole, _) = candidates_for(ledger, kinds, catalog, requester, model, false);
        if enough(&whole) {
            candidates = whole;
        }
    }
    if order == Order::Adaptive {
        let total = candidates
            .iter()
            .fold(0u64, |sum, c| sum.saturating_add(c.1));
        if total >= shortfall {
            candidates = adaptive_order(ledger, kinds, candidates, shortfall);
        }
    }

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

    // Step 6: trim from the last chosen back to the first. A trimmed
    // candidate's bytes are zeroed in place (they free nothing now).
    let mut kept = chosen;
    for candidate in candidates[..chosen].iter_mut().rev() {
        let bytes = candidate.1;
        if freed - bytes >= shortfall {
            freed -= bytes;
            candidate.1 = 0;
            kept -= 1;
        }
    }
    let mut victims = Vec::with_capacity(kept);
    victims.extend(
        candidates[..chosen]
            .iter()
            .filter(|(_, bytes, _)| *bytes > 0)
            .map(|(_, _, entry)| entry.id.clone()),
    );
    Ok(Plan::Load { victims })
}

/// What `ledger` owes beyond its capacity: it is over only when a
/// reconcile found a model its backend would not unload. A plan frees it
/// on top of the requested model's bytes.
pub(crate) fn owed(ledger: &Ledger) -> u64 {
    ledger.used().saturating_sub(ledger.capacity())
}

/// A candidate as policy step 4 lists it: (sort key, bytes, entry).
type Candidate<'a> = (u128, u64, &'a Entry);

/// The candidates of one plan: a card holds a handful of models, so they
/// usually fit without a heap allocation.
pub(crate) type Candidates<'a> = smallvec::SmallVec<[Candidate<'a>; 8]>;

/// The adaptive order: the candidates that should leave, in the order they
/// leave, for `shortfall` bytes (which all of them together cover). Step
/// 5's prefix then takes exactly these, and step 6 trims them.
fn adaptive_order<'a>(
    ledger: &Ledger,
    kinds: &Kinds,
    candidates: Candidates<'a>,
    shortfall: u64,
) -> Candidates<'a> {
    let history = ledger.history();
    let horizon = horizon(history);
    // (p_soon, value, candidate)
    let (mut protected, mut others): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .map(|c| {
            let p = p_soon(history, &c.2.id, horizon);
            (p, c.1 as f64 * (p + 1e-9), c)
        })
        .partition(|(_, _, c)| kinds.get(&c.2.kind).is_some_and(|k| k.protected));
    let by = |a: f64, b: f64, x: &Entry, y: &Entry| {
        a.total_cmp(&b)
            .then(x.recency.cmp(&y.recency))
            .then_with(|| x.id.cmp(&y.id))
    };
    protected.sort_by(|a, b| by(a.0, b.0, a.2.2, b.2.2));
    let protected_bytes = protected
        .iter()
        .fold(0u64, |sum, c| sum.saturating_add(c.2.1));
    if protected_bytes >= shortfall {
        return protected.into_iter().map(|(_, _, c)| c).collect();
    }
    let items: Vec<(u64, f64)> = others.iter().map(|(_, v, c)| (c.1, *v)).collect();
    let chosen = cheapest_cover(&items, shortfall - protected_bytes);
    let mut taken: Vec<_> = protected;
    let mut index = 0;
    others.retain(|_| {
        let keep = chosen[index];
        index += 1;
        keep
    });
    taken.extend(others);
    taken.sort_by(|a, b| by(a.1, b.1, a.2.2, b.2.2));
    taken.into_iter().map(|(_, _, c)| c).collect()
}

/// The most entries the cover's Pareto front keeps.
const FRONT_CAP: usize = 256;

/// Which `items` (bytes, value) to take so their bytes reach `need` at the
/// least total value: a 0/1 minimum-cost cover over a Pareto front of
/// partial sets (more bytes for less value), pruned against the best cover
/// found so far; exact while the front holds at most [`FRONT_CAP`]
/// entries, thinned evenly (both ends kept) beyond. The items together
/// must reach `need`; the entry freeing the most always survives, so a
/// cover is found (were none, all would be taken).
fn cheapest_cover(items: &[(u64, f64)], need: u64) -> Vec<bool> {
    // Partial sets as linked lists in one arena: (item, previous node).
    let mut arena: Vec<(usize, Option<usize>)> = Vec::new();
    // (bytes freed, value, last node)
    let mut front: Vec<(u64, f64, Option<usize>)> = vec![(0, 0.0, None)];
    let mut best: Option<(f64, Option<usize>)> = None;
    // The front stays sorted by bytes freed, most first; on a Pareto front
    // the value then falls too. Adding an item shifts every entry alike, so
    // the grown entries come out sorted and a merge keeps the order: no
    // sort per item.
    let mut merged = Vec::new();
    for (i, &(bytes, value)) in items.iter().enumerate() {
        let mut grown = Vec::with_capacity(front.len());
        for &(freed, total, node) in &front {
            let total = total + value;
            if best.is_some_and(|(b, _)| total >= b) {
                continue;
            }
            arena.push((i, node));
            let node = Some(arena.len() - 1);
            let freed = freed.saturating_add(bytes);
            if freed >= need {
                best = Some((total, node));
            } else {
                grown.push((freed, total, node));
            }
        }
        merged.clear();
        let (mut a, mut b) = (front.iter().peekable(), grown.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => {
                    if (y.0, -y.1) > (x.0, -x.1) {
                        b.next()
                    } else {
                        a.next()
                    }
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            if let Some(&entry) = next {
                merged.push(entry);
            }
        }
        // Keep the Pareto front: each kept entry costs less than every one
        // freeing more, and less than the best cover found.
        let mut cheapest = best.map_or(f64::INFINITY, |(b, _)| b);
        front.clear();
        for &(freed, total, node) in &merged {
            if total < cheapest {
                cheapest = total;
                front.push((freed, total, node));
            }
        }
        if front.len() > FRONT_CAP {
            // Thin it evenly, keeping both ends.
            let len = front.len();
            let keep: Vec<_> = (0..FRONT_CAP)
                .map(|k| front[k * (len - 1) / (FRONT_CAP - 1)])
                .collect();
            front = keep;
        }
    }
    let mut taken = vec![best.is_none(); items.len()];
    if let Some((_, mut node)) = best {
        while let Some(n) = node {
            taken[arena[n].0] = true;
            node = arena[n].1;
        }
    }
    taken
}

/// Policy step 4: the resident models a request for `model` (of kind
/// `requester`) may evict, lowest tier and least recently used first, as
/// (sort key, bytes, entry); and the bytes of those set aside only because
/// they are leased (a caller may wait for them).
///
/// A parked model is a candidate too: stopping it frees its residual bytes,
/// and it goes before a resident model of its tier. A resident model that
/// can park is counted for the bytes parking frees (it may be stopped
/// instead when the host budget is spent, which frees more).
pub(crate) fn candidates<'a>(
    ledger: &'a Ledger,
    kinds: &Kinds,
    catalog: &Catalog,
    requester: &Kind,
    model: &str,
) -> (Candidates<'a>, u64) {
    candidates_for(ledger, kinds, catalog, requester, model, true)
}

/// [`candidates`], counting a resident model that can park for what
/// parking frees (`parking`) or for its whole bytes.
fn candidates_for<'a>(
    ledger: &'a Ledger,
    kinds: &Kinds,
    catalog: &Catalog,
    requester: &Kind,
    model: &str,
    parking: bool,
) -> (Candidates<'a>, u64) {
    // The few kinds are resolved once, not once per model.
    let kind_table: smallvec::SmallVec<[(&str, u32, bool); 8]> = kinds
        .iter()
        .map(|k| (k.name.as_str(), k.priority, k.evictable_by(requester)))
        .collect();
    let mut leased = 0u64;
    // (priority and recency packed into one sort key, bytes, entry)
    let mut candidates = Candidates::new();
    for entry in ledger.entries() {
        let parked = entry.state == ModelState::Parked;
        if !(entry.state == ModelState::Resident || parked) || entry.pinned || entry.id == model {
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
        // Priority first, then parked before resident, then recency: all
        // whole, so any two priorities (and any two recencies) compare
        // exactly. Without parked models this is (priority, recency).
        let resident_bit = u128::from(!parked);
        let key = (u128::from(priority) << 65) | (resident_bit << 64) | u128::from(entry.recency);
        // The catalog is asked only when some model can park (a lookup per
        // candidate would cost planning 10,000 models several times over).
        let freed = match parking && !parked && catalog.any_parks() {
            true => catalog
                .get(&entry.id)
                .map_or(entry.bytes, |spec| spec.freed_by_parking(entry.bytes)),
            false => entry.bytes,
        };
        candidates.push((key, freed, entry));
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
pub fn expired<K, S>(
    ledger: &Ledger,
    ttl: &HashMap<String, Duration>,
    last_used: &HashMap<K, Instant, S>,
    now: Instant,
) -> Vec<ArcStr>
where
    K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
    S: std::hash::BuildHasher,
{
    ledger
        .entries()
        .filter(|e| is_expired(e, ttl, last_used, now))
        .map(|e| e.id.clone())
        .collect()
}

/// Whether one ledger entry has expired, by the rule of [`expired`].
pub fn is_expired<K, S>(
    entry: &Entry,
    ttl: &HashMap<String, Duration>,
    last_used: &HashMap<K, Instant, S>,
    now: Instant,
) -> bool
where
    K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
    S: std::hash::BuildHasher,
{
    let idle_enough = match (ttl.get(&*entry.id), last_used.get(&*entry.id)) {
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
        order: Order,
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
                order: Order::Strict,
            }
        }

        fn plan(&self, id: &str) -> Result<Plan, VramError> {
            plan_in_order(
                &self.ledger,
                &self.kinds,
                &self.catalog,
                id,
                self.ledger.free(),
                self.order,
            )
        }

        /// Plans and carries out a load; answers the victims.
        fn load(&mut self, id: &str) -> Result<Vec<String>, VramError> {
            self.ledger.note_request(id);
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
            Ok(plan.victims().iter().map(ToString::to_string).collect())
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
        let mut before = card.ledger.clone();
        before.note_request("llm2"); // the request itself is history
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

    // ---- The adaptive order ----

    /// The voice-assistant turn of the README's example: ASR, the big LLM,
    /// then one of two voices; only one voice fits beside the LLM.
    fn voice_turns(order: Order, turns: usize) -> (Card, Vec<Vec<String>>) {
        let mut card = Card::new(&[
            ("asr", "asr", 1),
            ("llm", "llm", 12),
            ("tts-a", "tts", 2),
            ("tts-b", "tts", 2),
        ]);
        card.order = order;
        let mut evictions = Vec::new();
        for turn in 0..turns {
            let voice = if turn % 2 == 0 { "tts-a" } else { "tts-b" };
            for id in ["asr", "llm", voice] {
                evictions.push(card.load(id).unwrap());
            }
        }
        (card, evictions)
    }

    #[test]
    fn strict_evicts_the_big_llm_for_every_voice_switch() {
        let (_, evictions) = voice_turns(Order::Strict, 6);
        let llm_reloads = evictions.iter().filter(|v| v.contains(&"llm".to_string()));
        assert_eq!(llm_reloads.count(), 5, "{evictions:?}");
    }

    #[test]
    fn adaptive_keeps_the_big_llm_and_swaps_the_small_voice() {
        let (card, evictions) = voice_turns(Order::Adaptive, 6);
        let victims: Vec<_> = evictions.into_iter().flatten().collect();
        assert!(!victims.contains(&"llm".to_string()), "{victims:?}");
        assert_eq!(victims.len(), 5, "one voice leaves per switch: {victims:?}");
        assert!(card.ledger.is_resident("llm"));
    }

    #[test]
    fn adaptive_takes_idle_protected_models_first() {
        // Two ASR models (protected); an ASR request may replace the idle
        // one, which frees enough: it goes although the LLM is cheaper.
        let mut card = Card::new(&[("asr-a", "asr", 4), ("asr-b", "asr", 6), ("llm", "llm", 8)]);
        card.order = Order::Adaptive;
        loaded(&mut card, &["asr-a", "llm"]);
        assert_eq!(card.load("asr-b").unwrap(), ["asr-a"]);
        // The strict order takes the lowest tier instead.
        let mut strict = Card::new(&[("asr-a", "asr", 4), ("asr-b", "asr", 6), ("llm", "llm", 8)]);
        loaded(&mut strict, &["asr-a", "llm"]);
        assert_eq!(strict.load("asr-b").unwrap(), ["llm"]);
    }

    #[test]
    fn adaptive_refuses_and_spares_exactly_as_strict() {
        let mut card = Card::new(&[("asr1", "asr", 10), ("llm1", "llm", 4), ("llm2", "llm", 7)]);
        card.order = Order::Adaptive;
        loaded(&mut card, &["asr1", "llm1"]);
        let mut before = card.ledger.clone();
        before.note_request("llm2");
        assert_eq!(card.load("llm2").unwrap_err().code(), "insufficient_vram");
        assert_eq!(card.ledger, before, "a refusal evicts nothing");
        // Fits: nothing leaves, whatever the order.
        card.catalog.insert(ModelSpec::new("small", "llm", GIB));
        assert_eq!(card.load("small").unwrap(), Vec::<String>::new());
        assert!(card.ledger.is_resident("llm1"));
    }

    #[test]
    fn the_cover_is_the_cheapest_of_all_sets() {
        // Against every subset, on small random instances.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let n = 1 + next(9) as usize;
            let items: Vec<(u64, f64)> = (0..n)
                .map(|_| (1 + next(10), (1 + next(1000)) as f64 / 7.0))
                .collect();
            let total: u64 = items.iter().map(|i| i.0).sum();
            let need = 1 + next(total);
            let taken = cheapest_cover(&items, need);
            let cost = |mask: &dyn Fn(usize) -> bool| -> (u64, f64) {
                (0..n)
                    .filter(|&i| mask(i))
                    .fold((0, 0.0), |(b, v), i| (b + items[i].0, v + items[i].1))
            };
            let (bytes, value) = cost(&|i| taken[i]);
            assert!(bytes >= need, "the cover must reach the need");
            let best = (0u32..1 << n)
                .map(|m| cost(&|i| m >> i & 1 == 1))
                .filter(|&(b, _)| b >= need)
                .map(|(_, v)| v)
                .fold(f64::INFINITY, f64::min);
            assert!(
                (value - best).abs() < 1e-9,
                "{items:?} need {need}: {value} vs {best}"
            );
        }
    }

    #[test]
    fn a_capped_cover_still_covers_and_stays_near_the_best() {
        // GiB-sized items, up to 16 of them: the front reaches its cap.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..40 {
            let n = 12 + next(5) as usize;
            let items: Vec<(u64, f64)> = (0..n)
                .map(|_| {
                    let bytes = (1 + next(16 * 1024)) << 20;
                    (bytes, bytes as f64 * (next(1000) as f64 / 1000.0 + 1e-9))
                })
                .collect();
            let total: u64 = items.iter().map(|i| i.0).sum();
            let need = 1 + next(total);
            let taken = cheapest_cover(&items, need);
            let pick = |mask: &dyn Fn(usize) -> bool| -> (u64, f64) {
                (0..n)
                    .filter(|&i| mask(i))
                    .fold((0, 0.0), |(b, v), i| (b + items[i].0, v + items[i].1))
            };
            let (bytes, value) = pick(&|i| taken[i]);
            assert!(bytes >= need, "the cover must reach the need");
            let best = (0u32..1 << n)
                .map(|m| pick(&|i| m >> i & 1 == 1))
                .filter(|&(b, _)| b >= need)
                .map(|(_, v)| v)
                .fold(f64::INFINITY, f64::min);
            assert!(value <= best * 1.01 + 1e-6, "{value} vs the best {best}");
        }
    }

    #[test]
    fn scores_follow_the_request_history() {
        let (card, _) = voice_turns(Order::Adaptive, 4);
        let scores = scores(&card.ledger);
        let p = |id: &str| scores.iter().find(|s| s.id == id).unwrap().p_soon;
        // The last turn used tts-b; tts-a is next, the LLM comes every turn.
        assert!(p("llm") > 0.5 && p("asr") > 0.5, "{scores:?}");
        for s in &scores {
            assert!((0.0..=1.0).contains(&s.p_soon));
            let bytes = card.ledger.get(&s.id).unwrap().bytes as f64;
            assert!((s.value - bytes * (s.p_soon + 1e-9)).abs() <= bytes * 1e-12);
        }
    }

    // ---- Parked models ----

    fn parking_card() -> Card {
        let mut card = Card::new(&[
            ("asr", "asr", 3),
            ("a", "llm", 6),
            ("b", "llm", 4),
            ("c", "llm", 9),
        ]);
        for id in ["a", "b"] {
            let spec = card
                .catalog
                .get(id)
                .unwrap()
                .clone()
                .parks(crate::model::Park {
                    vram: GIB,
                    host: 8 * GIB,
                });
            card.catalog.insert(spec);
        }
        card
    }

    #[test]
    fn a_parked_model_leaves_before_a_resident_one_of_its_tier() {
        let mut card = parking_card();
        loaded(&mut card, &["asr", "a", "b"]);
        // a parks (holding 1 GiB), b is resident and older than nothing.
        card.ledger.park("a", GIB);
        assert_eq!(card.ledger.used(), 8 * GIB);
        // c needs 9 with 8 free: stopping the parked a frees its 1 GiB,
        // enough; it goes before the resident b of the same tier.
        assert_eq!(card.plan("c").unwrap().victims(), ["a"]);
    }

    #[test]
    fn victims_that_can_park_count_for_what_parking_frees_unless_that_refuses() {
        let mut card = parking_card();
        loaded(&mut card, &["asr", "a", "b"]);
        // 3 free; c needs 9: parking a and b frees 5 + 3 = 8 of the 6
        // missing, and neither can be spared.
        assert_eq!(card.plan("c").unwrap().victims(), ["a", "b"]);
        // e needs 13 with 3 free: parking both frees 8 of the 10 missing,
        // stopping both frees 10: counted whole, it is not refused.
        let mut tight = parking_card();
        tight.catalog.insert(ModelSpec::new("e", "llm", 13 * GIB));
        loaded(&mut tight, &["asr", "a", "b"]);
        assert_eq!(tight.plan("e").unwrap().victims(), ["a", "b"]);
    }
}
