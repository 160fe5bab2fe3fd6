//! Workloads shared by the criterion benchmarks (`benches/`) and the quick
//! bench (`examples/bench.rs`), each measured against a baseline in the
//! same run.
//!
//! - acquire + drop of a lease through the manager, against a bare actix
//!   actor answering the same-shaped message on the same arbiter;
//! - a load that needs k evictions, with instant simulated backends;
//! - Status latency while a 10 s simulated load is in flight;
//! - planning alone over n resident models;
//! - throughput of many concurrent clients with instant backends.

use std::time::{Duration, Instant};

use actix::prelude::*;
use vram_actors::{
    Acquire, CardView, Catalog, Kinds, Ledger, Load, ModelSpec, Order, Status, Unload, VramActor,
    VramError, place, plan_in_order,
};

use crate::config::Settings;
use crate::manager::Manager;

const GIB: u64 = 1 << 30;

// ------------------------------------------------------- the bare baseline

/// The baseline actor: answers [`BareAcquire`] with a guard at once.
#[derive(Debug, Default)]
pub struct BareActor {
    /// Guards given out and not yet returned.
    pub out: u64,
}

impl Actor for BareActor {
    type Context = Context<Self>;
}

/// Shaped like `Acquire`: a model id in, a guard (or an error) out.
#[derive(Debug, Message)]
#[rtype(result = "Result<BareLease, VramError>")]
pub struct BareAcquire {
    /// The model's id.
    pub model: String,
}

/// Shaped like `Release`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct BareRelease;

/// Shaped like `Lease`: dropping it sends [`BareRelease`].
#[derive(Debug)]
pub struct BareLease {
    owner: Addr<BareActor>,
}

impl Drop for BareLease {
    fn drop(&mut self) {
        self.owner.do_send(BareRelease);
    }
}

impl Handler<BareAcquire> for BareActor {
    type Result = Result<BareLease, VramError>;
    fn handle(&mut self, _msg: BareAcquire, ctx: &mut Context<Self>) -> Self::Result {
        self.out += 1;
        Ok(BareLease {
            owner: ctx.address(),
        })
    }
}

/// Answered once every message sent before it is handled (so releases
/// still queued do not spill into the next measurement).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct BareSync;

impl Handler<BareSync> for BareActor {
    type Result = ();
    fn handle(&mut self, _msg: BareSync, _ctx: &mut Context<Self>) {}
}

impl Handler<BareRelease> for BareActor {
    type Result = ();
    fn handle(&mut self, _msg: BareRelease, _ctx: &mut Context<Self>) {
        self.out -= 1;
    }
}

// --------------------------------------------------------------- fixtures

/// Settings with `models` as TOML `[[models]]` entries on a card of
/// `total_gib`, instant backends.
fn settings(total_gib: u64, models: &str) -> Settings {
    Settings::parse(&format!("[gpu]\ntotal = \"{total_gib}GiB\"\n{models}"))
        .expect("bench settings are valid")
}

fn model(id: &str, kind: &str, gib: u64) -> String {
    format!("[[models]]\nid = \"{id}\"\nkind = \"{kind}\"\nvram = \"{gib}GiB\"\n")
}

/// A manager with one resident ASR model, `whisper`, to acquire.
pub async fn manager_with_resident_model() -> Manager {
    let manager =
        Manager::start(&settings(16, &model("whisper", "asr", 3))).expect("manager starts");
    let _ = manager.addr.send(Load::new("whisper")).await;
    manager
}

/// Time of `n` acquire + drop round trips through the manager.
pub async fn acquire_round_trips(manager: &Addr<VramActor>, n: u64) -> Duration {
    let started = Instant::now();
    for _ in 0..n {
        let lease = manager.send(Acquire::new("whisper")).await;
        drop(std::hint::black_box(lease));
    }
    started.elapsed()
}

/// Time of `n` acquire + drop round trips through the bare actor.
pub async fn bare_round_trips(bare: &Addr<BareActor>, n: u64) -> Duration {
    let started = Instant::now();
    for _ in 0..n {
        let lease = bare
            .send(BareAcquire {
                model: "whisper".into(),
            })
            .await;
        drop(std::hint::black_box(lease));
    }
    let took = started.elapsed();
    let _ = bare.send(BareSync).await;
    took
}

/// A manager on a card of `2k` GiB with `2k` small LLMs of 1 GiB and a big
/// LLM of `k` GiB, for loads that need exactly k evictions.
pub fn eviction_manager(k: u64) -> Manager {
    let mut models: String = (0..2 * k)
        .map(|i| model(&format!("small-{i}"), "llm", 1))
        .collect();
    models.push_str(&model("big", "llm", k));
    Manager::start(&settings(2 * k, &models)).expect("manager starts")
}

/// Fills the card with the small models, then times the load of "big"
/// (which evicts k of them); unloads it again. Answers the load's time.
pub async fn timed_eviction_load(manager: &Manager, k: u64) -> Duration {
    for i in 0..2 * k {
        let _ = manager.addr.send(Load::new(format!("small-{i}"))).await;
    }
    let started = Instant::now();
    let loaded = manager.addr.send(Load::new("big")).await;
    let took = started.elapsed();
    debug_assert_eq!(
        loaded.ok().and_then(Result::ok).map(|l| l.evicted.len()),
        Some(k as usize)
    );
    let _ = manager.addr.send(Unload::new("big")).await;
    took
}

/// The baseline of [`timed_eviction_load`]: the load of "big" on an empty
/// card (no evictions), then its unload. Answers the load's time.
pub async fn timed_plain_load(manager: &Manager) -> Duration {
    let started = Instant::now();
    let loaded = manager.addr.send(Load::new("big")).await;
    let took = started.elapsed();
    debug_assert_eq!(
        loaded.ok().and_then(Result::ok).map(|l| l.evicted.len()),
        Some(0)
    );
    let _ = manager.addr.send(Unload::new("big")).await;
    took
}

/// Round trips in the bare batch beside each paired load: enough to
/// smooth one trip's noise, few enough that the machine cannot change
/// state between the batch and the load.
pub const PAIRED_BATCH: u64 = 20;

/// One bare round trip measured right before `load` runs: answers the
/// load's time and one bare round trip's (the mean of a batch of
/// [`PAIRED_BATCH`]), so their ratio is taken on the machine in one state.
pub async fn paired<F: std::future::Future<Output = Duration>>(
    bare: &Addr<BareActor>,
    load: F,
) -> (Duration, Duration) {
    let baseline = bare_round_trips(bare, PAIRED_BATCH).await / PAIRED_BATCH as u32;
    (load.await, baseline)
}

/// The median of the ratios `a / b` of each pair.
pub fn median_ratio(pairs: &[(Duration, Duration)]) -> f64 {
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE))
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Latencies of `n` Status round trips to an idle manager (the baseline
/// of [`status_latencies_during_load`]).
pub async fn status_latencies_idle(manager: &Manager, n: usize) -> Vec<Duration> {
    status_latencies(manager, n).await
}

/// Latencies of `n` Status round trips.
async fn status_latencies(manager: &Manager, n: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let report = manager.addr.send(Status).await;
        latencies.push(started.elapsed());
        std::hint::black_box(report.ok());
    }
    latencies
}

/// A manager whose model "slow" takes 10 s to load, and a second one to
/// start when the first is done.
pub fn slow_load_manager() -> Manager {
    let models = [
        format!("{}load_ms = 10000\n", model("slow-a", "llm", 4)),
        format!("{}load_ms = 10000\n", model("slow-b", "llm", 4)),
        model("whisper", "asr", 3),
    ]
    .concat();
    Manager::start(&settings(16, &models)).expect("manager starts")
}

/// Latencies of `n` Status round trips while a 10 s load is in flight
/// (starting one if none is).
pub async fn status_latencies_during_load(manager: &Manager, n: usize) -> Vec<Duration> {
    let status = manager.addr.send(Status).await.expect("manager answers");
    if !status.running {
        // Alternate two slow models so one is always loading.
        let next = if status.resident().contains(&"slow-a".to_string()) {
            "slow-b"
        } else {
            "slow-a"
        };
        let other = if next == "slow-a" { "slow-b" } else { "slow-a" };
        manager.addr.do_send(Unload::new(other));
        manager.addr.do_send(Load::new(next));
        while !manager.addr.send(Status).await.is_ok_and(|s| s.running) {}
    }
    status_latencies(manager, n).await
}

/// A ledger of `n` resident models (LLMs and TTSs of 1 to 4 GiB, in a
/// scrambled order of use) filling its card, and a catalog with a request
/// "request" (an LLM of about half the card) that must evict many of them.
pub fn plan_fixture(n: usize) -> (Ledger, Kinds, Catalog) {
    let mut catalog = Catalog::new();
    let mut specs = Vec::with_capacity(n);
    let mut total = 0;
    for i in 0..n {
        let kind = if i % 3 == 0 { "tts" } else { "llm" };
        let bytes = (1 + (i as u64 * 7919) % 4) * GIB;
        total += bytes;
        let spec = ModelSpec::new(format!("m{i:05}"), kind, bytes);
        catalog.insert(spec.clone());
        specs.push(spec);
    }
    catalog.insert(ModelSpec::new("request", "llm", total / 2));
    let mut ledger = Ledger::new(total);
    // Load in a scrambled order so recency is not id order.
    for j in 0..n {
        let spec = &specs[(j * 7919) % n];
        ledger.insert_resident(spec);
    }
    // A request history for the adaptive order (the strict one ignores
    // it): every model asked for several times, at uneven gaps.
    for j in 0..n * 4 {
        ledger.note_request(&specs[(j * j + 7 * j) % n].id);
    }
    let kinds = Settings::defaults()
        .map(|s| s.kinds)
        .expect("the compiled-in defaults are valid");
    (ledger, kinds, catalog)
}

/// Eight full 16 GiB cards holding 64 models between them (8 each, of
/// every kind, 1-3 GiB) and a 6 GiB "request" that fits none of them:
/// placement has to plan an eviction on every card and compare the plans.
pub fn place_fixture() -> (Vec<Ledger>, Kinds, Catalog) {
    let mut catalog = Catalog::new();
    let mut cards = Vec::new();
    for c in 0..8 {
        let mut ledger = Ledger::new(16 * GIB);
        for j in 0..8 {
            let i = c * 8 + j;
            let kind = ["llm", "tts", "asr", "llm"][i % 4];
            let bytes = (1 + (i as u64 * 7919) % 3) * GIB;
            let spec = ModelSpec::new(format!("m{i:03}"), kind, bytes);
            catalog.insert(spec.clone());
            ledger.insert_resident(&spec);
        }
        // Fill the rest so nothing fits without eviction.
        let filler = ModelSpec::new(format!("fill{c}"), "llm", ledger.free());
        catalog.insert(filler.clone());
        ledger.insert_resident(&filler);
        cards.push(ledger);
    }
    catalog.insert(ModelSpec::new("request", "tts", 6 * GIB));
    let kinds = Settings::defaults()
        .map(|s| s.kinds)
        .expect("the compiled-in defaults are valid");
    (cards, kinds, catalog)
}

/// Places "request" on the cards of `fixture`; answers the card.
pub fn place_once(fixture: &(Vec<Ledger>, Kinds, Catalog), order: Order) -> usize {
    let (cards, kinds, catalog) = fixture;
    let views: Vec<CardView<'_>> = cards
        .iter()
        .map(|ledger| CardView {
            ledger,
            free: ledger.free(),
        })
        .collect();
    place(&views, kinds, catalog, "request", None, order).map_or(usize::MAX, |p| p.card)
}

/// Plans "request" against `fixture`, answering the number of victims.
pub fn plan_once(fixture: &(Ledger, Kinds, Catalog)) -> usize {
    plan_once_in(fixture, Order::Strict)
}

/// [`plan_once`] with the candidates taken in `order`.
pub fn plan_once_in(fixture: &(Ledger, Kinds, Catalog), order: Order) -> usize {
    let (ledger, kinds, catalog) = fixture;
    match plan_in_order(ledger, kinds, catalog, "request", ledger.free(), order) {
        Ok(plan) => plan.victims().len(),
        Err(_) => 0,
    }
}

/// Operations per second from `clients` concurrent clients, each issuing
/// `ops_each` acquire + release pairs and loads of models that are mostly
/// resident, with instant backends.
pub async fn throughput(clients: usize, ops_each: usize) -> f64 {
    let models: String = (0..8)
        .map(|i| model(&format!("m{i}"), ["asr", "tts", "llm", "llm"][i % 4], 2))
        .collect();
    let manager = Manager::start(&settings(12, &models)).expect("manager starts");
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let addr = manager.addr.clone();
            actix::spawn(async move {
                for i in 0..ops_each {
                    let id = format!("m{}", (c * 31 + i * 7) % 8);
                    if i % 4 == 0 {
                        let _ = addr.send(Load::new(id)).await;
                    } else {
                        let lease = addr.send(Acquire::new(id)).await;
                        drop(lease);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    (clients * ops_each) as f64 / started.elapsed().as_secs_f64()
}

/// The median of `samples` (which it sorts).
pub fn median(samples: &mut [Duration]) -> Duration {
    percentile(samples, 50.0)
}

/// The `p`th percentile (nearest rank) of `samples` (which it sorts).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placement_fixture_needs_an_eviction_and_gets_one() {
        let fixture = place_fixture();
        assert_eq!(fixture.0.len(), 8);
        assert_eq!(fixture.0.iter().map(Ledger::len).sum::<usize>(), 64 + 8);
        assert!(fixture.0.iter().all(|card| card.free() == 0));
        let card = place_once(&fixture, Order::Strict);
        assert!(card < 8, "placed, not refused");
    }
}
