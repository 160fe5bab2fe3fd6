//! Model-based property test of the planner: random sequences of load,
//! unload, acquire and release run against the real `Ledger` + `plan` and
//! against a small reference kept here, checking the policy's invariants
//! after every step. It runs once with each eviction order: the order
//! changes which sufficient set leaves, never the rules.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vram_actors::{Catalog, Kind, Kinds, Ledger, ModelSpec, Order, Plan, VramError, plan_in_order};

const CAPACITY: u64 = 16;

/// The models of the test: (id, kind, size, pinned). Sizes are small
/// integers so sequences hit both fits and refusals often.
fn models() -> Vec<(String, &'static str, u64, bool)> {
    let mut out = Vec::new();
    for (i, kind) in ["llm", "tts", "asr"].into_iter().enumerate() {
        for j in 0..3 {
            let size = [2, 5, 8, 3, 1, 6, 4, 7, 9][i * 3 + j];
            out.push((format!("{kind}{j}"), kind, size, i == 1 && j == 2));
        }
    }
    out.push(("huge".into(), "llm", CAPACITY + 1, false));
    out
}

#[derive(Debug, Clone)]
enum Op {
    Load(usize),
    Unload(usize),
    Acquire(usize),
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = models().len();
    prop_oneof![
        4 => (0..n).prop_map(Op::Load),
        1 => (0..n).prop_map(Op::Unload),
        2 => (0..n).prop_map(Op::Acquire),
        2 => (0..n).prop_map(Op::Release),
    ]
}

/// The reference: what is resident, its leases and its last use.
#[derive(Debug, Clone, Default, PartialEq)]
struct Reference {
    resident: BTreeMap<String, (u32, u64)>, // id -> (leases, last use)
    clock: u64,
}

struct World {
    kinds: Kinds,
    catalog: Catalog,
    ledger: Ledger,
    reference: Reference,
    order: Order,
}

impl World {
    fn new(order: Order) -> Self {
        Self {
            order,
            kinds: [
                Kind::new("llm", 0, false),
                Kind::new("tts", 1, false),
                Kind::new("asr", 2, true),
            ]
            .into_iter()
            .collect(),
            catalog: models()
                .into_iter()
                .map(|(id, kind, size, pinned)| ModelSpec::new(id, kind, size).pinned(pinned))
                .collect(),
            ledger: Ledger::new(CAPACITY),
            reference: Reference::default(),
        }
    }

    fn spec(&self, id: &str) -> &ModelSpec {
        self.catalog.get(id).unwrap()
    }

    fn priority(&self, id: &str) -> u32 {
        self.kinds.get(&self.spec(id).kind).unwrap().priority
    }

    /// The reference's idea of who a request for `id` may evict, in order.
    fn reference_candidates(&self, id: &str) -> Vec<String> {
        let requester = self.kinds.get(&self.spec(id).kind).unwrap();
        let mut c: Vec<_> = self
            .reference
            .resident
            .iter()
            .filter(|(other, (leases, _))| {
                let spec = self.spec(other);
                let kind = self.kinds.get(&spec.kind).unwrap();
                *leases == 0
                    && !spec.pinned
                    && !(kind.protected && kind.priority > requester.priority)
            })
            .map(|(other, (_, last))| (self.priority(other), *last, other.clone()))
            .collect();
        c.sort();
        c.into_iter().map(|(_, _, id)| id).collect()
    }

    fn used(&self) -> u64 {
        self.reference
            .resident
            .keys()
            .map(|id| self.spec(id).bytes)
            .sum()
    }

    /// Loads `id` through the planner, checking the plan against the
    /// reference. Answers whether the model is resident afterwards.
    fn load(&mut self, id: &str) -> Result<bool, TestCaseError> {
        let needed = self.spec(id).bytes;
        let free = CAPACITY - self.used();
        self.ledger.note_request(id);
        let before = self.ledger.clone();
        let result = plan_in_order(
            &self.ledger,
            &self.kinds,
            &self.catalog,
            id,
            self.ledger.free(),
            self.order,
        );
        let candidates = self.reference_candidates(id);
        let evictable: u64 = candidates.iter().map(|c| self.spec(c).bytes).sum();
        match result {
            Err(e) => {
                prop_assert_eq!(&self.ledger, &before, "a refusal changed the ledger");
                match e {
                    VramError::ExceedsCapacity { .. } => prop_assert!(needed > CAPACITY),
                    VramError::InsufficientVram { .. } => {
                        prop_assert!(!self.reference.resident.contains_key(id));
                        prop_assert!(free + evictable < needed, "refused although it could fit");
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
                Ok(false)
            }
            Ok(Plan::Resident) => {
                prop_assert!(self.reference.resident.contains_key(id));
                self.ledger.touch(id);
                self.reference.clock += 1;
                self.reference.resident.get_mut(id).unwrap().1 = self.reference.clock;
                Ok(true)
            }
            Ok(Plan::Load { victims }) => {
                let victims: Vec<String> = victims.iter().map(ToString::to_string).collect();
                prop_assert!(!self.reference.resident.contains_key(id));
                prop_assert!(needed <= CAPACITY);
                let freed: u64 = victims.iter().map(|v| self.spec(v).bytes).sum();
                prop_assert!(free + freed >= needed, "plan does not make room");
                for v in &victims {
                    prop_assert!(
                        candidates.contains(v),
                        "{} evicted but it is leased, pinned or protected",
                        v
                    );
                    // Minimal: dropping any one victim would not fit.
                    prop_assert!(
                        free + freed - self.spec(v).bytes < needed,
                        "{} not needed",
                        v
                    );
                }
                if !victims.is_empty() && self.order == Order::Strict {
                    // Victims come from the shortest sufficient prefix, in order.
                    let mut acc = free;
                    let prefix: Vec<_> = candidates
                        .iter()
                        .take_while(|c| {
                            let go = acc < needed;
                            acc += self.spec(c).bytes;
                            go
                        })
                        .cloned()
                        .collect();
                    let in_prefix: Vec<_> = prefix
                        .iter()
                        .filter(|p| victims.contains(p))
                        .cloned()
                        .collect();
                    prop_assert_eq!(&in_prefix, &victims);
                }
                for v in &victims {
                    self.ledger.begin_unload(v);
                    self.ledger.remove(v);
                    self.reference.resident.remove(v);
                }
                let spec = self.spec(id).clone();
                self.ledger.reserve(&spec);
                prop_assert!(self.ledger.used() <= CAPACITY, "over-committed");
                self.ledger.commit(id);
                self.reference.clock += 1;
                self.reference
                    .resident
                    .insert(id.to_string(), (0, self.reference.clock));
                Ok(true)
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let all = models();
        match op {
            Op::Load(i) => {
                self.load(&all[*i].0)?;
            }
            Op::Acquire(i) => {
                let id = &all[*i].0;
                if self.load(id)? {
                    prop_assert!(self.ledger.lease(id));
                    self.reference.clock += 1;
                    let slot = self.reference.resident.get_mut(id).unwrap();
                    *slot = (slot.0 + 1, self.reference.clock);
                }
            }
            Op::Release(i) => {
                let id = &all[*i].0;
                let held = self.reference.resident.get(id).is_some_and(|s| s.0 > 0);
                prop_assert_eq!(self.ledger.release(id), held);
                if held {
                    self.reference.clock += 1;
                    let slot = self.reference.resident.get_mut(id).unwrap();
                    *slot = (slot.0 - 1, self.reference.clock);
                }
            }
            Op::Unload(i) => {
                let id = &all[*i].0;
                // A leased model is refused with `in_use`; otherwise it goes.
                let leased = self.reference.resident.get(id).is_some_and(|s| s.0 > 0);
                if !leased {
                    self.ledger.remove(id);
                    self.reference.resident.remove(id);
                }
            }
        }
        // After every step: the ledger and the reference agree.
        prop_assert!(self.ledger.used() <= CAPACITY);
        prop_assert_eq!(self.ledger.used(), self.used());
        let ledger: Vec<_> = self
            .ledger
            .entries()
            .map(|e| (e.id.to_string(), e.leases))
            .collect();
        let reference: Vec<_> = self
            .reference
            .resident
            .iter()
            .map(|(id, s)| (id.clone(), s.0))
            .collect();
        prop_assert_eq!(ledger, reference);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn planner_keeps_the_policy_invariants(ops in prop::collection::vec(op(), 1..60)) {
        let mut world = World::new(Order::Strict);
        for op in &ops {
            world.apply(op)?;
        }
    }

    #[test]
    fn the_adaptive_order_keeps_the_same_invariants(ops in prop::collection::vec(op(), 1..60)) {
        let mut world = World::new(Order::Adaptive);
        for op in &ops {
            world.apply(op)?;
        }
    }
}
