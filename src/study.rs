//! The eviction-order study: how many bytes (and seconds) each order makes
//! a voice assistant reload, against the exact offline optimum under the
//! same hard rules. `cargo run --release --example policy_study` prints
//! the table of BENCHMARKS.md.
//!
//! Traces are sequences of requests (one model each, no concurrency, so no
//! leases). Each order is driven through the real planner and ledger
//! ([`plan_in_order`]); LRU-within-the-rules takes the same candidates by
//! recency alone. The optimum is a dynamic program over resident sets with
//! demand loading: at a miss it may evict any *minimal* set of candidates
//! (never protected-for-a-lower-tier models, nothing when the request
//! fits), exactly the choices the planner has; it knows the whole trace.
//! Every load counts, the first ones included (they are the same for every
//! order).

use std::collections::HashMap;

use vram_actors::{Catalog, Kind, Kinds, Ledger, ModelSpec, Order, Plan, plan_in_order};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The study's catalog: one protected ASR, three voices, four LLMs (id,
/// kind, MiB; an LLM's size is a share of the card in thousandths, as
/// people pick the LLMs their card can hold). The largest LLM beside the
/// ASR fits every card, so no request is ever refused and every order
/// serves the same trace.
pub const MODELS: &[(&str, &str, Size)] = &[
    ("asr", "asr", Size::Mib(1_536)),
    ("tts-a", "tts", Size::Mib(1_024)),
    ("tts-b", "tts", Size::Mib(1_229)),
    ("tts-c", "tts", Size::Mib(819)),
    ("llm-main", "llm", Size::OfCard(780)),
    ("llm-alt", "llm", Size::OfCard(520)),
    ("llm-tool", "llm", Size::OfCard(250)),
    ("llm-small", "llm", Size::OfCard(150)),
];

/// A model's size in the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A fixed size, in MiB.
    Mib(u64),
    /// A share of the card, in thousandths.
    OfCard(u64),
}

/// Every model's size in bytes on a card of `card_gib` GiB.
pub fn sizes(card_gib: u64) -> Vec<u64> {
    MODELS
        .iter()
        .map(|m| match m.2 {
            Size::Mib(mib) => mib * MIB,
            Size::OfCard(share) => card_gib * GIB / 1_000 * share,
        })
        .collect()
}

/// The card sizes studied, in GiB.
pub const CARDS_GIB: &[u64] = &[12, 16, 24];

/// Seconds a load of `bytes` costs: 0.15 s plus reading at 2 GiB/s.
pub fn load_seconds(bytes: u64) -> f64 {
    0.15 + bytes as f64 / (2.0 * GIB as f64)
}

/// The kinds of the study: the voice-assistant tiers.
pub fn kinds() -> Kinds {
    [
        Kind::new("llm", 0, false),
        Kind::new("tts", 1, false),
        Kind::new("asr", 2, true),
    ]
    .into_iter()
    .collect()
}

/// The study's catalog for a card of `card_gib` GiB.
pub fn catalog(card_gib: u64) -> Catalog {
    MODELS
        .iter()
        .zip(sizes(card_gib))
        .map(|(&(id, kind, _), bytes)| ModelSpec::new(id, kind, bytes))
        .collect()
}

fn index(id: &str) -> usize {
    MODELS
        .iter()
        .position(|m| m.0 == id)
        .unwrap_or_else(|| unreachable!("{id} is in the study's catalog"))
}

/// A family of voice-assistant traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// ASR -> one LLM -> a voice, the voice switching now and then; a
    /// small intent LLM before the main one in some turns.
    VoiceSwitches,
    /// Two LLMs taking turns in runs, two voices.
    TwoLlms,
    /// A tool-call LLM in a share of turns (main -> tool -> main).
    ToolCalls,
    /// Bursts of one conversation (an LLM and a voice) between idle gaps
    /// in which background work (the small LLM) runs.
    Bursts,
    /// One pattern, then another from mid-trace on.
    Shift,
    /// Any model, uniformly at random.
    Uniform,
}

impl Family {
    /// Every family, in table order.
    pub const ALL: [Family; 6] = [
        Family::VoiceSwitches,
        Family::TwoLlms,
        Family::ToolCalls,
        Family::Bursts,
        Family::Shift,
        Family::Uniform,
    ];

    /// The family's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Family::VoiceSwitches => "voice switches",
            Family::TwoLlms => "two LLMs",
            Family::ToolCalls => "tool calls",
            Family::Bursts => "bursts",
            Family::Shift => "pattern shift",
            Family::Uniform => "uniform noise",
        }
    }

    /// A trace of at least `len` requests (model indices into
    /// [`MODELS`]), drawn with `seed`.
    pub fn trace(self, len: usize, seed: u64) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = Vec::with_capacity(len + 8);
        let voices = ["tts-a", "tts-b", "tts-c"];
        let mut voice = 0;
        let mut llm = "llm-main";
        let mut run = 0;
        while out.len() < len {
            let turn = |out: &mut Vec<usize>, llm: &str, voice: &str| {
                out.extend([index("asr"), index(llm), index(voice)]);
            };
            match self {
                Family::VoiceSwitches => {
                    if rng.f64() < 0.3 {
                        voice = rng.usize(..voices.len());
                    }
                    if rng.f64() < 0.2 {
                        out.push(index("llm-small"));
                    }
                    turn(&mut out, "llm-main", voices[voice]);
                }
                Family::TwoLlms => {
                    if run == 0 {
                        llm = if llm == "llm-main" {
                            "llm-alt"
                        } else {
                            "llm-main"
                        };
                        run = rng.usize(1..=3);
                    }
                    run -= 1;
                    if rng.f64() < 0.2 {
                        voice = 1 - voice.min(1);
                    }
                    turn(&mut out, llm, voices[voice.min(1)]);
                }
                Family::ToolCalls => {
                    out.push(index("asr"));
                    out.push(index("llm-main"));
                    if rng.f64() < 0.35 {
                        out.extend([index("llm-tool"), index("llm-main")]);
                    }
                    out.push(index(if rng.f64() < 0.15 { "tts-b" } else { "tts-a" }));
                }
                Family::Bursts => {
                    let (llm, voice) = [
                        ("llm-main", "tts-a"),
                        ("llm-alt", "tts-b"),
                        ("llm-main", "tts-c"),
                    ][rng.usize(..3)];
                    for _ in 0..rng.usize(3..=8) {
                        turn(&mut out, llm, voice);
                    }
                    for _ in 0..rng.usize(1..=4) {
                        out.push(index("llm-small"));
                    }
                }
                Family::Shift => {
                    if out.len() < len / 2 {
                        if rng.f64() < 0.3 {
                            voice = rng.usize(..2);
                        }
                        turn(&mut out, "llm-main", voices[voice]);
                    } else {
                        out.push(index("asr"));
                        out.push(index("llm-alt"));
                        if rng.f64() < 0.4 {
                            out.extend([index("llm-tool"), index("llm-alt")]);
                        }
                        out.push(index("tts-c"));
                    }
                }
                Family::Uniform => out.push(rng.usize(..MODELS.len())),
            }
        }
        out
    }
}

/// An eviction order as the study runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The planner's strict order.
    Strict,
    /// Least recently used among the same candidates, tiers ignored.
    Lru,
    /// The planner's adaptive order.
    Adaptive,
}

impl Policy {
    /// Every policy, in table order.
    pub const ALL: [Policy; 3] = [Policy::Strict, Policy::Lru, Policy::Adaptive];

    /// The policy's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Lru => "lru",
            Policy::Adaptive => "adaptive",
        }
    }
}

/// What one policy cost on one trace.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cost {
    /// Bytes loaded.
    pub bytes: u64,
    /// Seconds loading ([`load_seconds`] per load).
    pub seconds: f64,
    /// Loads.
    pub loads: u64,
    /// Requests refused (none with the study's catalog).
    pub refused: u64,
}

/// Runs `trace` under `policy` on a card of `card_gib` GiB through the
/// real planner and ledger.
pub fn simulate(policy: Policy, trace: &[usize], card_gib: u64) -> Cost {
    let capacity = card_gib * GIB;
    let kinds = kinds();
    let catalog = catalog(card_gib);
    let mut ledger = Ledger::new(capacity);
    let mut cost = Cost::default();
    for &m in trace {
        let id = MODELS[m].0;
        ledger.note_request(id);
        let planned = match policy {
            Policy::Strict => {
                plan_in_order(&ledger, &kinds, &catalog, id, ledger.free(), Order::Strict)
            }
            Policy::Adaptive => plan_in_order(
                &ledger,
                &kinds,
                &catalog,
                id,
                ledger.free(),
                Order::Adaptive,
            ),
            Policy::Lru => Ok(lru_plan(&ledger, &kinds, &catalog, id)),
        };
        match planned {
            Ok(Plan::Resident) => {
                ledger.touch(id);
            }
            Ok(Plan::Load { victims }) => {
                for victim in &victims {
                    ledger.remove(victim);
                }
                let spec = catalog.get(id).unwrap_or_else(|| unreachable!());
                ledger.reserve(spec);
                ledger.commit(id);
                cost.bytes += spec.bytes;
                cost.seconds += load_seconds(spec.bytes);
                cost.loads += 1;
            }
            Err(_) => cost.refused += 1,
        }
    }
    cost
}

/// LRU within the rules: the planner's candidates (not protected against
/// the requester, not the model itself) by recency alone, the shortest
/// sufficient prefix, then the planner's trim. Refusals cannot happen with
/// the study's catalog; a plan that cannot make room answers every
/// candidate (and the caller counts the load all the same).
fn lru_plan(ledger: &Ledger, kinds: &Kinds, catalog: &Catalog, id: &str) -> Plan {
    if ledger.is_resident(id) {
        return Plan::Resident;
    }
    let spec = catalog.get(id).unwrap_or_else(|| unreachable!());
    let shortfall = spec.bytes.saturating_sub(ledger.free());
    let requester = kinds.get(&spec.kind).unwrap_or_else(|| unreachable!());
    let mut candidates: Vec<_> = ledger
        .entries()
        .filter(|e| {
            kinds
                .get(&e.kind)
                .is_some_and(|k| k.evictable_by(requester))
        })
        .map(|e| (e.recency, e.bytes, e.id.clone()))
        .collect();
    candidates.sort();
    let mut freed = 0;
    let mut chosen = 0;
    while freed < shortfall && chosen < candidates.len() {
        freed += candidates[chosen].1;
        chosen += 1;
    }
    let mut victims: Vec<_> = candidates[..chosen].to_vec();
    for i in (0..victims.len()).rev() {
        if freed - victims[i].1 >= shortfall {
            freed -= victims[i].1;
            victims.remove(i);
        }
    }
    Plan::Load {
        victims: victims.into_iter().map(|v| v.2).collect(),
    }
}

/// The least total cost of serving `trace` on a card of `card_gib` GiB,
/// knowing the whole trace, under the planner's hard rules; a load of
/// model `m` costs `cost(m)`. Exact: a dynamic program over resident sets
/// (bit masks of [`MODELS`]).
pub fn optimum(trace: &[usize], card_gib: u64, cost: impl Fn(usize) -> f64) -> f64 {
    let capacity = card_gib * GIB;
    let kinds = kinds();
    let sizes = sizes(card_gib);
    let tier: Vec<&Kind> = MODELS
        .iter()
        .map(|m| kinds.get(m.1).unwrap_or_else(|| unreachable!()))
        .collect();
    let used = |set: u32| -> u64 {
        (0..MODELS.len())
            .filter(|i| set >> i & 1 == 1)
            .map(|i| sizes[i])
            .sum()
    };
    let mut states: HashMap<u32, f64> = HashMap::from([(0, 0.0)]);
    for &m in trace {
        let mut next: HashMap<u32, f64> = HashMap::with_capacity(states.len() * 2);
        let mut relax = |set: u32, total: f64| {
            let slot = next.entry(set).or_insert(f64::INFINITY);
            if total < *slot {
                *slot = total;
            }
        };
        for (&set, &total) in &states {
            if set >> m & 1 == 1 {
                relax(set, total);
                continue;
            }
            let held = used(set);
            if held + sizes[m] <= capacity {
                relax(set | 1 << m, total + cost(m));
                continue;
            }
            let shortfall = held + sizes[m] - capacity;
            let candidates: Vec<usize> = (0..MODELS.len())
                .filter(|&j| set >> j & 1 == 1 && tier[j].evictable_by(tier[m]))
                .collect();
            let mut any = false;
            for pick in 1u32..1 << candidates.len() {
                let chosen = || {
                    candidates
                        .iter()
                        .enumerate()
                        .filter(move |(i, _)| pick >> i & 1 == 1)
                        .map(|(_, &j)| j)
                };
                let freed: u64 = chosen().map(|j| sizes[j]).sum();
                // Enough, and minimal: no victim could be spared.
                if freed < shortfall || chosen().any(|j| freed - sizes[j] >= shortfall) {
                    continue;
                }
                let victims = chosen().fold(0u32, |mask, j| mask | 1 << j);
                relax((set & !victims) | 1 << m, total + cost(m));
                any = true;
            }
            if !any {
                relax(set, total); // refused (not with the study's catalog)
            }
        }
        states = next;
    }
    states.values().copied().fold(f64::INFINITY, f64::min)
}

/// One row of the table: a family on a card, each policy's cost as a
/// ratio to the optimum over several traces.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The trace family.
    pub family: Family,
    /// The card, in GiB.
    pub card_gib: u64,
    /// Per policy (in [`Policy::ALL`] order): (mean, worst) ratio of bytes
    /// loaded to the optimum's.
    pub bytes: Vec<(f64, f64)>,
    /// Per policy: (mean, worst) ratio of load seconds to the optimum's.
    pub seconds: Vec<(f64, f64)>,
    /// Requests refused under any policy (none expected).
    pub refused: u64,
}

/// Runs `traces` traces of `len` requests of `family` on a card of
/// `card_gib` GiB.
pub fn row(family: Family, card_gib: u64, traces: usize, len: usize) -> Row {
    let sizes = sizes(card_gib);
    let mut bytes = vec![Vec::new(); Policy::ALL.len()];
    let mut seconds = vec![Vec::new(); Policy::ALL.len()];
    let mut refused = 0;
    for t in 0..traces {
        let trace = family.trace(len, 1_000 * card_gib + t as u64);
        let best_bytes = optimum(&trace, card_gib, |m| sizes[m] as f64);
        let best_seconds = optimum(&trace, card_gib, |m| load_seconds(sizes[m]));
        for (p, policy) in Policy::ALL.into_iter().enumerate() {
            let cost = simulate(policy, &trace, card_gib);
            refused += cost.refused;
            bytes[p].push(cost.bytes as f64 / best_bytes);
            seconds[p].push(cost.seconds / best_seconds);
        }
    }
    let summary = |ratios: &Vec<f64>| {
        let mean = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
        (mean, ratios.iter().copied().fold(0.0, f64::max))
    };
    Row {
        family,
        card_gib,
        bytes: bytes.iter().map(summary).collect(),
        seconds: seconds.iter().map(summary).collect(),
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_policy_beats_the_optimum_and_it_is_reached() {
        for family in Family::ALL {
            for &card in CARDS_GIB {
                let sizes = sizes(card);
                let trace = family.trace(60, card);
                let best = optimum(&trace, card, |m| sizes[m] as f64);
                let mut costs = Vec::new();
                for policy in Policy::ALL {
                    let cost = simulate(policy, &trace, card);
                    assert_eq!(cost.refused, 0, "{policy:?} refused on {family:?}");
                    assert!(
                        cost.bytes as f64 >= best,
                        "{policy:?} on {family:?}/{card}: {} < optimum {best}",
                        cost.bytes
                    );
                    costs.push(cost.bytes);
                }
                // Every distinct model is loaded at least once.
                let mut seen = trace.clone();
                seen.sort();
                seen.dedup();
                let floor: u64 = seen.iter().map(|&m| sizes[m]).sum();
                assert!(best >= floor as f64, "{family:?}/{card}");
            }
        }
    }

    /// Every way of serving `trace` from `set` (a bit mask): at each miss,
    /// every minimal set of candidates, exactly as the planner may choose.
    fn brute_force(trace: &[usize], set: u32, card_gib: u64) -> u64 {
        let Some((&m, rest)) = trace.split_first() else {
            return 0;
        };
        let sizes = sizes(card_gib);
        let kinds = kinds();
        let tier = |i: usize| kinds.get(MODELS[i].1).unwrap();
        if set >> m & 1 == 1 {
            return brute_force(rest, set, card_gib);
        }
        let held: u64 = (0..MODELS.len())
            .filter(|i| set >> i & 1 == 1)
            .map(|i| sizes[i])
            .sum();
        let capacity = card_gib * GIB;
        if held + sizes[m] <= capacity {
            return 1 + brute_force(rest, set | 1 << m, card_gib);
        }
        let shortfall = held + sizes[m] - capacity;
        let mut best = u64::MAX;
        for victims in 1u32..1 << MODELS.len() {
            let chosen: Vec<usize> = (0..MODELS.len())
                .filter(|i| victims >> i & 1 == 1)
                .collect();
            let legal = chosen
                .iter()
                .all(|&j| set >> j & 1 == 1 && tier(j).evictable_by(tier(m)));
            let freed: u64 = chosen.iter().map(|&j| sizes[j]).sum();
            let minimal = chosen.iter().all(|&j| freed - sizes[j] < shortfall);
            if legal && freed >= shortfall && minimal {
                best = best.min(1 + brute_force(rest, (set & !victims) | 1 << m, card_gib));
            }
        }
        best
    }

    #[test]
    fn the_optimum_equals_a_brute_force_search_on_short_traces() {
        for family in Family::ALL {
            for &card in CARDS_GIB {
                for seed in 0..3 {
                    let mut trace = family.trace(9, seed);
                    trace.truncate(9);
                    let exact = brute_force(&trace, 0, card);
                    assert_eq!(
                        optimum(&trace, card, |_| 1.0),
                        exact as f64,
                        "{family:?}/{card}: {trace:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_optimum_of_a_small_trace_is_the_hand_count() {
        // 12 GiB: asr (1.5) + llm-main (9.36) leave 1.14 GiB, too little for
        // tts-b (1.2), and a voice may not evict the protected ASR: the
        // LLM must go for the voice, and the voice for the LLM.
        let trace: Vec<usize> = ["asr", "llm-main", "tts-b", "asr", "llm-main", "tts-b"]
            .into_iter()
            .map(index)
            .collect();
        let count = optimum(&trace, 12, |_| 1.0);
        // Loads: asr, main, tts-b (main out), main (tts-b out), tts-b
        // (main out) = 5.
        assert_eq!(count, 5.0);
        let sizes = sizes(12);
        let room = 12 * GIB - sizes[index("asr")] - sizes[index("llm-main")];
        assert!(
            room < sizes[index("tts-b")],
            "the premise: tts-b does not fit"
        );
        // On 24 GiB the LLM doubles but the voice does not: it fits
        // beside, one load each.
        assert_eq!(optimum(&trace, 24, |_| 1.0), 3.0);
    }

    #[test]
    fn traces_are_reproducible_and_long_enough() {
        for family in Family::ALL {
            let a = family.trace(100, 7);
            assert!(a.len() >= 100);
            assert_eq!(a, family.trace(100, 7));
            assert!(a.iter().all(|&m| m < MODELS.len()));
        }
    }
}
