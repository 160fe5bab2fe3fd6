//! Placement: which card a request goes to when there is more than one.
//!
//! Pure, like the planner it builds on: each card is a ledger and the
//! bytes free on it now (the tighter of its ledger and what the card
//! shows), and the answer is a card and that card's plan. For a request of
//! model M:
//!
//! 1. unknown M -> `unknown_model`; M larger than every card it may use ->
//!    `exceeds_capacity`;
//! 2. M resident on a card -> that card (the caller touches it);
//! 3. among the allowed cards (in list order) where M fits without
//!    eviction: the best fit, the one left with the fewest free bytes
//!    (ties to the lower position);
//! 4. else among the allowed cards where the policy finds a plan: the plan
//!    with the smallest (highest victim priority, total victim bytes,
//!    number of victims, card position) — the cheapest eviction anywhere;
//! 5. else `insufficient_vram`, and nothing is evicted on any card.
//!
//! The caller reserves M's bytes on the chosen card's ledger at once, so a
//! second request placed after it sees that room taken: two requests can
//! never both be placed on room only one of them fits into.

use arcstr::ArcStr;

use crate::error::VramError;
use crate::kind::Kinds;
use crate::ledger::Ledger;
use crate::model::Catalog;
use crate::order::Order;
use crate::policy::{Plan, plan_in_order};

/// One card as placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct CardView<'a> {
    /// Who holds VRAM on this card.
    pub ledger: &'a Ledger,
    /// Bytes free to plan against now: the ledger's free bytes, or less
    /// when the card itself shows less (other processes).
    pub free: u64,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The card's position in the list.
    pub card: usize,
    /// What to do there: `Resident` (touch), or load after unloading the
    /// victims (none when it fits).
    pub plan: Plan,
}

/// Places a request for `model` on one of `cards`. `allowed` lists the
/// positions it may use (`None`: any); positions beyond the list are
/// ignored.
///
/// ```
/// use vram_actors::{place, CardView, Catalog, Kind, Kinds, Ledger, ModelSpec, Order, Plan};
/// const GIB: u64 = 1 << 30;
/// let catalog: Catalog = [ModelSpec::new("llm", "llm", 6 * GIB)].into_iter().collect();
/// let kinds: Kinds = [Kind::new("llm", 0, false)].into_iter().collect();
/// let (big, small) = (Ledger::new(16 * GIB), Ledger::new(8 * GIB));
/// let cards = [
///     CardView { ledger: &big, free: big.free() },
///     CardView { ledger: &small, free: small.free() },
/// ];
/// // Both fit it; the 8 GiB card is the tighter fit.
/// let placed = place(&cards, &kinds, &catalog, "llm", None, Order::Strict)?;
/// assert_eq!((placed.card, placed.plan), (1, Plan::Load { victims: vec![] }));
/// # Ok::<(), vram_actors::VramError>(())
/// ```
pub fn place(
    cards: &[CardView<'_>],
    kinds: &Kinds,
    catalog: &Catalog,
    model: &str,
    allowed: Option<&[usize]>,
    order: Order,
) -> Result<Placement, VramError> {
    let spec = catalog.get(model).ok_or_else(|| VramError::UnknownModel {
        model: model.to_string(),
    })?;
    let may_use = |card: usize| allowed.is_none_or(|list| list.contains(&card));
    // Step 2: resident anywhere (even on a card no longer allowed: it is
    // there, and moving it would only cost a reload).
    if let Some(card) = cards.iter().position(|c| c.ledger.is_resident(model)) {
        return Ok(Placement {
            card,
            plan: Plan::Resident,
        });
    }
    let usable: Vec<usize> = (0..cards.len()).filter(|&c| may_use(c)).collect();
    // Step 1: larger than every card it may use.
    let largest = usable
        .iter()
        .map(|&c| cards[c].ledger.capacity())
        .max()
        .unwrap_or(0);
    if spec.bytes > largest {
        return Err(VramError::ExceedsCapacity {
            model: model.to_string(),
            needed: spec.bytes,
            capacity: largest,
        });
    }
    // Step 3: the best fit without eviction. A ledger over its capacity
    // (a reconcile found more than planned) owes that first.
    let fits = |c: usize| {
        let card = &cards[c];
        let over = card.ledger.used().saturating_sub(card.ledger.capacity());
        spec.bytes <= card.ledger.capacity()
            && over == 0
            && card.free >= spec.bytes
            && card.ledger.get(model).is_none()
    };
    if let Some(card) = usable
        .iter()
        .copied()
        .filter(|&c| fits(c))
        .min_by_key(|&c| (cards[c].free - spec.bytes, c))
    {
        return Ok(Placement {
            card,
            plan: Plan::Load { victims: vec![] },
        });
    }
    // Step 4: the cheapest plan with evictions; keep the refusal closest
    // to being served to answer with (step 5).
    let priority_of = |card: &CardView<'_>, victim: &str| {
        card.ledger
            .get(victim)
            .and_then(|e| kinds.get(&e.kind))
            .map_or(0, |k| k.priority)
    };
    // (highest victim priority, victim bytes, victims, card) and the plan.
    type Ranked = ((u32, u64, usize, usize), Vec<ArcStr>);
    let mut best: Option<Ranked> = None;
    let mut refusal: Option<(u64, VramError)> = None;
    for &c in &usable {
        let card = &cards[c];
        match plan_in_order(card.ledger, kinds, catalog, model, card.free, order) {
            Ok(Plan::Load { victims }) => {
                let top = victims
                    .iter()
                    .map(|v| priority_of(card, v))
                    .max()
                    .unwrap_or(0);
                let bytes = victims
                    .iter()
                    .filter_map(|v| card.ledger.get(v))
                    .fold(0u64, |sum, e| sum.saturating_add(e.bytes));
                let key = (top, bytes, victims.len(), c);
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    best = Some((key, victims));
                }
            }
            Ok(Plan::Resident) => {
                return Ok(Placement {
                    card: c,
                    plan: Plan::Resident,
                });
            }
            Err(error @ VramError::InsufficientVram { .. }) => {
                let reach = match &error {
                    VramError::InsufficientVram {
                        free,
                        evictable,
                        leased,
                        ..
                    } => free.saturating_add(*evictable).saturating_add(*leased),
                    _ => 0,
                };
                if refusal.as_ref().is_none_or(|(r, _)| reach > *r) {
                    refusal = Some((reach, error));
                }
            }
            // Too large for this card (another is larger): not a choice.
            Err(_) => {}
        }
    }
    if let Some(((.., card), victims)) = best {
        return Ok(Placement {
            card,
            plan: Plan::Load { victims },
        });
    }
    Err(refusal.map_or_else(
        || VramError::InsufficientVram {
            model: model.to_string(),
            needed: spec.bytes,
            free: 0,
            evictable: 0,
            leased: 0,
        },
        |(_, error)| error,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::Kind;
    use crate::model::ModelSpec;

    const GIB: u64 = 1 << 30;

    fn kinds() -> Kinds {
        [
            Kind::new("llm", 0, false),
            Kind::new("tts", 1, false),
            Kind::new("asr", 2, true),
        ]
        .into_iter()
        .collect()
    }

    fn catalog(models: &[(&str, &str, u64)]) -> Catalog {
        models
            .iter()
            .map(|&(id, kind, gib)| ModelSpec::new(id, kind, gib * GIB))
            .collect()
    }

    fn views(ledgers: &[Ledger]) -> Vec<CardView<'_>> {
        ledgers
            .iter()
            .map(|l| CardView {
                ledger: l,
                free: l.free(),
            })
            .collect()
    }

    fn with(capacity: u64, resident: &[(&str, &str, u64)]) -> Ledger {
        let mut ledger = Ledger::new(capacity * GIB);
        for &(id, kind, gib) in resident {
            ledger.insert_resident(&ModelSpec::new(id, kind, gib * GIB));
        }
        ledger
    }

    #[test]
    fn a_resident_model_stays_where_it_is() {
        let catalog = catalog(&[("a", "llm", 2)]);
        let ledgers = [with(16, &[]), with(8, &[("a", "llm", 2)])];
        let placed = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "a",
            Some(&[0]),
            Order::Strict,
        );
        assert_eq!(placed.unwrap().card, 1);
    }

    #[test]
    fn the_best_fit_wins_and_ties_go_to_the_lower_position() {
        let catalog = catalog(&[("m", "llm", 4)]);
        let ledgers = [with(16, &[]), with(8, &[]), with(8, &[])];
        let placed = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "m",
            None,
            Order::Strict,
        );
        assert_eq!(placed.unwrap().card, 1);
        // Restricted to the big card: it goes there.
        let placed = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "m",
            Some(&[0]),
            Order::Strict,
        );
        assert_eq!(placed.unwrap().card, 0);
    }

    #[test]
    fn the_card_shows_less_than_the_ledger_thinks() {
        // Card 1 is the tighter fit on paper, but another process holds
        // most of it.
        let catalog = catalog(&[("m", "llm", 4)]);
        let ledgers = [with(16, &[]), with(8, &[])];
        let mut cards = views(&ledgers);
        cards[1].free = 2 * GIB;
        let placed = place(&cards, &kinds(), &catalog, "m", None, Order::Strict).unwrap();
        assert_eq!(placed.card, 0);
    }

    #[test]
    fn the_cheapest_eviction_anywhere() {
        // Card 0 would evict a TTS (tier 1), card 1 an LLM (tier 0): the
        // lower tier wins although it frees more bytes.
        let catalog = catalog(&[("t", "tts", 6), ("l", "llm", 7), ("x", "llm", 6)]);
        let ledgers = [with(8, &[("t", "tts", 6)]), with(8, &[("l", "llm", 7)])];
        let placed = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "x",
            None,
            Order::Strict,
        );
        assert_eq!(
            placed.unwrap(),
            Placement {
                card: 1,
                plan: Plan::Load {
                    victims: vec!["l".into()]
                }
            }
        );
        // Same tier: fewer bytes evicted wins.
        let catalog = super::tests::catalog(&[("a", "llm", 7), ("b", "llm", 6), ("x", "llm", 6)]);
        let ledgers = [with(8, &[("a", "llm", 7)]), with(8, &[("b", "llm", 6)])];
        let placed = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "x",
            None,
            Order::Strict,
        );
        assert_eq!(placed.unwrap().card, 1);
    }

    #[test]
    fn refusals_and_capacity_follow_the_allowed_cards() {
        let catalog = catalog(&[("asr", "asr", 6), ("big", "llm", 12), ("x", "llm", 4)]);
        let ledgers = [with(16, &[]), with(8, &[("asr", "asr", 6)])];
        // 12 GiB fits only card 0; allowed only card 1, it exceeds.
        let e = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "big",
            Some(&[1]),
            Order::Strict,
        );
        assert_eq!(e.unwrap_err().code(), "exceeds_capacity");
        // x may only use card 1, where the protected ASR leaves 2 GiB.
        let e = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "x",
            Some(&[1]),
            Order::Strict,
        );
        assert_eq!(e.unwrap_err().code(), "insufficient_vram");
        let e = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "x",
            Some(&[]),
            Order::Strict,
        );
        assert_eq!(e.unwrap_err().code(), "exceeds_capacity", "no card at all");
        let e = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "ghost",
            None,
            Order::Strict,
        );
        assert_eq!(e.unwrap_err().code(), "unknown_model");
    }

    #[test]
    fn a_reservation_takes_the_room_from_the_next_request() {
        // Card 1 is the best fit for a 6 GiB model (2 GiB left, against 3
        // on card 0); once it is reserved there, the next goes to card 0.
        let catalog = catalog(&[("a", "llm", 6), ("b", "llm", 6)]);
        let mut ledgers = [with(16, &[("z", "asr", 7)]), with(8, &[])];
        let first = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "a",
            None,
            Order::Strict,
        )
        .unwrap();
        assert_eq!(first.card, 1);
        ledgers[1].reserve(catalog.get("a").unwrap());
        let second = place(
            &views(&ledgers),
            &kinds(),
            &catalog,
            "b",
            None,
            Order::Strict,
        )
        .unwrap();
        assert_eq!(second.card, 0, "the room on card 1 is taken");
    }
}
