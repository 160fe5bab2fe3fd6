//! Property test of placement over several cards: random loads, unloads,
//! acquires and releases on 1-4 cards of random sizes, with models
//! restricted to random sets of cards, under both eviction orders. After
//! every step: no card over its capacity, no model on a card outside its
//! list, a refusal changes nothing, no request refused while some allowed
//! card could take it by the policy, a fit without eviction is the best
//! fit, and an eviction is the cheapest of all allowed cards.

use proptest::prelude::*;
use vram_actors::{
    CardView, Catalog, Kind, Kinds, Ledger, ModelSpec, Order, Plan, VramError, place, plan_in_order,
};

/// One model: kind, size, the cards it may use (`None`: any).
#[derive(Debug, Clone)]
struct Model {
    kind: &'static str,
    bytes: u64,
    allowed: Option<Vec<usize>>,
}

#[derive(Debug, Clone)]
enum Op {
    Load(usize),
    Unload(usize),
    Acquire(usize),
    Release(usize),
}

fn model() -> impl Strategy<Value = Model> {
    (
        prop_oneof![Just("llm"), Just("tts"), Just("asr")],
        1u64..12,
        prop::option::of(prop::collection::vec(0usize..4, 0..3)),
    )
        .prop_map(|(kind, bytes, allowed)| Model {
            kind,
            bytes,
            allowed,
        })
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..n).prop_map(Op::Load),
        1 => (0..n).prop_map(Op::Unload),
        2 => (0..n).prop_map(Op::Acquire),
        2 => (0..n).prop_map(Op::Release),
    ]
}

fn case() -> impl Strategy<Value = (Vec<u64>, Vec<Model>, Vec<Op>, bool)> {
    (
        prop::collection::vec(4u64..17, 1..5),
        prop::collection::vec(model(), 2..10),
    )
        .prop_flat_map(|(cards, models)| {
            let n = models.len();
            (
                Just(cards),
                Just(models),
                prop::collection::vec(op(n), 1..50),
                any::<bool>(),
            )
        })
}

struct World {
    kinds: Kinds,
    catalog: Catalog,
    models: Vec<Model>,
    cards: Vec<Ledger>,
    order: Order,
}

impl World {
    fn id(i: usize) -> String {
        format!("m{i}")
    }

    fn views(&self) -> Vec<CardView<'_>> {
        self.cards
            .iter()
            .map(|l| CardView {
                ledger: l,
                free: l.free(),
            })
            .collect()
    }

    fn allowed(&self, i: usize, card: usize) -> bool {
        self.models[i]
            .allowed
            .as_ref()
            .is_none_or(|list| list.contains(&card))
    }

    fn card_of(&self, id: &str) -> Option<usize> {
        self.cards.iter().position(|l| l.get(id).is_some())
    }

    /// Places and carries out a load of model `i`; answers whether it is
    /// resident afterwards.
    fn load(&mut self, i: usize) -> Result<bool, TestCaseError> {
        let id = Self::id(i);
        let bytes = self.models[i].bytes;
        let allowed = self.models[i].allowed.clone();
        let before = self.cards.clone();
        let placed = place(
            &self.views(),
            &self.kinds,
            &self.catalog,
            &id,
            allowed.as_deref(),
            self.order,
        );
        let allowed_cards: Vec<usize> = (0..self.cards.len())
            .filter(|&c| self.allowed(i, c))
            .collect();
        match placed {
            Err(VramError::ExceedsCapacity { .. }) => {
                prop_assert_eq!(&self.cards, &before);
                prop_assert!(
                    allowed_cards
                        .iter()
                        .all(|&c| self.cards[c].capacity() < bytes)
                );
                Ok(false)
            }
            Err(VramError::InsufficientVram { .. }) => {
                prop_assert_eq!(&self.cards, &before, "a refusal changed a card");
                for &c in &allowed_cards {
                    let ledger = &self.cards[c];
                    let by_policy = plan_in_order(
                        ledger,
                        &self.kinds,
                        &self.catalog,
                        &id,
                        ledger.free(),
                        self.order,
                    );
                    prop_assert!(
                        by_policy.is_err(),
                        "refused although card {} could take it: {:?}",
                        c,
                        by_policy
                    );
                }
                Ok(false)
            }
            Err(other) => Err(TestCaseError::fail(format!("unexpected {other:?}"))),
            Ok(placement) => {
                let c = placement.card;
                match placement.plan {
                    Plan::Resident => {
                        prop_assert!(self.cards[c].is_resident(&id));
                        self.cards[c].touch(&id);
                    }
                    Plan::Load { victims } => {
                        prop_assert!(allowed_cards.contains(&c), "card {} not allowed", c);
                        let fit = |d: usize| self.cards[d].free() >= bytes;
                        if victims.is_empty() {
                            prop_assert!(fit(c));
                            for &d in &allowed_cards {
                                if fit(d) {
                                    let key = |x: usize| (self.cards[x].free() - bytes, x);
                                    prop_assert!(key(c) <= key(d), "card {} fits tighter", d);
                                }
                            }
                        } else {
                            prop_assert!(
                                allowed_cards.iter().all(|&d| !fit(d)),
                                "evicted although a card fits"
                            );
                            // The cheapest eviction of all allowed cards.
                            let key = |d: usize, victims: &[vram_actors::ArcStr]| {
                                let card = &self.cards[d];
                                let entries = victims.iter().map(|v| card.get(v).unwrap());
                                let top = entries
                                    .clone()
                                    .map(|e| self.kinds.get(&e.kind).unwrap().priority)
                                    .max();
                                (top, entries.map(|e| e.bytes).sum::<u64>(), victims.len(), d)
                            };
                            let chosen = key(c, &victims);
                            for &d in &allowed_cards {
                                let ledger = &self.cards[d];
                                if let Ok(Plan::Load { victims: other }) = plan_in_order(
                                    ledger,
                                    &self.kinds,
                                    &self.catalog,
                                    &id,
                                    ledger.free(),
                                    self.order,
                                ) {
                                    prop_assert!(
                                        chosen <= key(d, &other),
                                        "card {} evicts less",
                                        d
                                    );
                                }
                            }
                        }
                        let requester = self.kinds.get(self.models[i].kind).unwrap().clone();
                        for v in &victims {
                            let entry = self.cards[c].get(v).cloned();
                            prop_assert!(entry.is_some(), "victim {} not on card {}", v, c);
                            let entry = entry.unwrap();
                            let kind = self.kinds.get(&entry.kind).unwrap();
                            prop_assert!(entry.leases == 0 && !entry.pinned);
                            prop_assert!(kind.evictable_by(&requester), "{} is protected", v);
                            self.cards[c].remove(v);
                        }
                        let spec = self.catalog.get(&id).unwrap().clone();
                        self.cards[c].reserve(&spec);
                        self.cards[c].commit(&id);
                    }
                }
                Ok(true)
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Load(i) => {
                self.load(i)?;
            }
            Op::Acquire(i) => {
                if self.load(i)? {
                    let c = self.card_of(&Self::id(i)).unwrap();
                    prop_assert!(self.cards[c].lease(&Self::id(i)));
                }
            }
            Op::Release(i) => {
                if let Some(c) = self.card_of(&Self::id(i)) {
                    self.cards[c].release(&Self::id(i));
                }
            }
            Op::Unload(i) => {
                let id = Self::id(i);
                if let Some(c) = self.card_of(&id)
                    && self.cards[c].get(&id).is_some_and(|e| e.leases == 0)
                {
                    self.cards[c].remove(&id);
                }
            }
        }
        for (c, ledger) in self.cards.iter().enumerate() {
            prop_assert!(ledger.used() <= ledger.capacity(), "card {} over", c);
            for entry in ledger.entries() {
                let i: usize = entry.id[1..].parse().unwrap();
                prop_assert!(
                    self.allowed(i, c),
                    "{} on card {} outside its list",
                    entry.id,
                    c
                );
            }
        }
        let placed: usize = self.cards.iter().map(|l| l.len()).sum();
        let distinct: std::collections::BTreeSet<_> = self
            .cards
            .iter()
            .flat_map(|l| l.entries().map(|e| e.id.clone()))
            .collect();
        prop_assert_eq!(placed, distinct.len(), "a model on two cards");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn placement_keeps_its_invariants((cards, models, ops, adaptive) in case()) {
        let kinds: Kinds = [
            Kind::new("llm", 0, false),
            Kind::new("tts", 1, false),
            Kind::new("asr", 2, true),
        ]
        .into_iter()
        .collect();
        let catalog: Catalog = models
            .iter()
            .enumerate()
            .map(|(i, m)| ModelSpec::new(World::id(i), m.kind, m.bytes).pinned(i == 0))
            .collect();
        let mut world = World {
            kinds,
            catalog,
            models,
            cards: cards.into_iter().map(Ledger::new).collect(),
            order: if adaptive { Order::Adaptive } else { Order::Strict },
        };
        for op in &ops {
            world.apply(op)?;
        }
    }
}
