//! `Fleet`: several cards behind one address. Each card is a `VramActor`
//! with its own ledger, probe and backends, so each serialises its own
//! loads and unloads and two cards load at once; the fleet only decides
//! where a request goes ([`place`]) and forwards it.
//!
//! A `Load` or `Acquire` of a model that is on a card (resident or being
//! loaded) goes to that card. Otherwise the fleet takes a snapshot of every
//! card's ledger (answered at once, even during a load), adds the loads it
//! has sent and not yet seen answered, and places the model by the pure
//! placement step; the snapshots, the decision and the record of the load
//! in flight happen under one lock, so two requests arriving together are
//! never both placed on room only one of them fits into. The chosen card
//! then plans against the card itself, as with one card (a card may still
//! refuse, e.g. when another process took its memory).
//!
//! `Status` merges every card's report (totals, and each card in `gpus`);
//! `Subscribe`, `SetPinned`, `CrashBackend` and `Shutdown` go to every
//! card; a lease is released straight to its card.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use actix::prelude::*;

use crate::error::VramError;
use crate::events::{Loaded, Unloaded};
use crate::kind::Kinds;
use crate::ledger::Ledger;
use crate::messages::{
    Acquire, CardSnapshot, CrashBackend, Lease, Load, SetPinned, Shutdown, Snapshot, Status,
    StatusReport, Subscribe, Unload,
};
use crate::model::Catalog;
use crate::order::Order;
use crate::placement::{CardView, place};
use crate::vram_actor::VramActor;

/// What the fleet's request futures share.
struct Shared {
    cards: Vec<Addr<VramActor>>,
    kinds: Kinds,
    catalog: Catalog,
    /// The cards each model may use (absent: any).
    allowed: HashMap<String, Vec<usize>>,
    order: Order,
    /// Held while snapshots are taken, a card chosen and the load recorded.
    placing: tokio::sync::Mutex<()>,
    /// Loads sent to a card and not yet answered: (model, card).
    in_flight: RefCell<Vec<(String, usize)>>,
}

/// Several cards behind one address; see the module docs.
pub struct Fleet {
    shared: Rc<Shared>,
}

impl Fleet {
    /// A fleet over `cards` (card `i` is position `i` in the list), with
    /// the kinds and catalog of the whole manager, the cards each model
    /// may use (`allowed`; a model absent from it may use any) and the
    /// eviction order placement plans with.
    pub fn new(
        cards: Vec<Addr<VramActor>>,
        kinds: Kinds,
        catalog: Catalog,
        allowed: HashMap<String, Vec<usize>>,
        order: Order,
    ) -> Self {
        Self {
            shared: Rc::new(Shared {
                cards,
                kinds,
                catalog,
                allowed,
                order,
                placing: tokio::sync::Mutex::new(()),
                in_flight: RefCell::new(Vec::new()),
            }),
        }
    }
}

impl Actor for Fleet {
    type Context = Context<Self>;
}

fn gone(error: MailboxError) -> VramError {
    VramError::Unavailable {
        reason: format!("a card's manager is gone ({error})"),
    }
}

/// Removes one record of `model` in flight to `card` when dropped (the
/// answer came, or the request was dropped).
struct InFlight {
    shared: Rc<Shared>,
    model: String,
    card: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut in_flight = self.shared.in_flight.borrow_mut();
        if let Some(i) = in_flight
            .iter()
            .position(|(m, c)| *m == self.model && *c == self.card)
        {
            in_flight.remove(i);
        }
    }
}

impl Shared {
    /// Every card's snapshot, asked at once, in list order.
    async fn snapshots(&self) -> Vec<Result<CardSnapshot, MailboxError>> {
        futures::future::join_all(self.cards.iter().map(|c| c.send(Snapshot))).await
    }

    /// Which card a request for `model` goes to, recorded as in flight
    /// until the returned guard is dropped.
    async fn route(self: &Rc<Self>, model: &str) -> Result<InFlight, VramError> {
        let _placing = self.placing.lock().await;
        let snapshots = self.snapshots().await;
        let mut ledgers: Vec<Ledger> = Vec::with_capacity(snapshots.len());
        let mut shown: Vec<Option<u64>> = Vec::with_capacity(snapshots.len());
        let mut lost = None;
        for (card, snapshot) in snapshots.into_iter().enumerate() {
            // A card whose manager is gone takes nothing (an empty card of
            // no bytes); the others go on serving.
            let snapshot = match snapshot {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    lost.get_or_insert(e);
                    ledgers.push(Ledger::on_card(0, card));
                    shown.push(Some(0));
                    continue;
                }
            };
            let mut ledger = snapshot.ledger;
            // Loads queued on that card hold no bytes yet; they will.
            for pending in &snapshot.pending {
                if let Some(spec) = self.catalog.get(pending) {
                    ledger.reserve(spec);
                }
            }
            ledgers.push(ledger);
            shown.push(snapshot.card_free);
        }
        let in_flight = self.in_flight.borrow().clone();
        // On a card already (or on its way there): that card.
        // A model on its way off a card is asked for there too: that card's
        // queue puts the request after the unload (one server, one port).
        let there = ledgers
            .iter()
            .position(|l| l.get(model).is_some())
            .or_else(|| in_flight.iter().find(|(m, _)| m == model).map(|(_, c)| *c));
        let card = match there {
            Some(card) => card,
            None => {
                for (m, c) in &in_flight {
                    if let (Some(spec), Some(ledger)) = (self.catalog.get(m), ledgers.get_mut(*c)) {
                        ledger.reserve(spec);
                    }
                }
                // The tighter of the ledger and the card: memory another
                // process holds is not free.
                let views: Vec<CardView<'_>> = ledgers
                    .iter()
                    .zip(&shown)
                    .map(|(ledger, shown)| CardView {
                        ledger,
                        free: shown.map_or(ledger.free(), |s| s.min(ledger.free())),
                    })
                    .collect();
                let allowed = self.allowed.get(model).map(Vec::as_slice);
                if let Some(e) = lost {
                    let reachable = |c: usize| ledgers[c].capacity() > 0;
                    let any = match allowed {
                        Some(list) => list.iter().any(|&c| c < ledgers.len() && reachable(c)),
                        None => (0..ledgers.len()).any(reachable),
                    };
                    if !any {
                        return Err(gone(e));
                    }
                }
                place(
                    &views,
                    &self.kinds,
                    &self.catalog,
                    model,
                    allowed,
                    self.order,
                )?
                .card
            }
        };
        self.in_flight.borrow_mut().push((model.to_string(), card));
        Ok(InFlight {
            shared: self.clone(),
            model: model.to_string(),
            card,
        })
    }

    /// The card `model` is on (in any state), if any: for an unload.
    async fn holder(&self, model: &str) -> Result<Option<usize>, VramError> {
        let snapshots = self.snapshots().await;
        let mut lost = None;
        for (card, snapshot) in snapshots.into_iter().enumerate() {
            let snapshot = match snapshot {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    lost.get_or_insert(e);
                    continue;
                }
            };
            if snapshot.ledger.get(model).is_some() || snapshot.pending.iter().any(|m| m == model) {
                return Ok(Some(card));
            }
        }
        // Not on a card that answered; if one did not, it may be there.
        match lost {
            Some(e) => Err(gone(e)),
            None => Ok(None),
        }
    }

    /// The first card `model` may use (where an unknown or unplaced model's
    /// requests are answered).
    fn home(&self, model: &str) -> usize {
        self.allowed
            .get(model)
            .and_then(|cards| cards.first().copied())
            .unwrap_or(0)
    }
}

/// Places `model` and sends `msg` (its Load or Acquire) to the card
/// chosen; the load stays recorded in flight until the card answers.
async fn placed<M, T>(shared: Rc<Shared>, model: String, msg: M) -> Result<T, VramError>
where
    M: Message<Result = Result<T, VramError>> + Send + 'static,
    T: Send + 'static,
    VramActor: Handler<M>,
{
    let routed = shared.route(&model).await?;
    let card = shared.cards[routed.card].clone();
    let answer = card.send(msg).await.map_err(gone)?;
    drop(routed);
    answer
}

impl Handler<Load> for Fleet {
    type Result = ResponseFuture<Result<Loaded, VramError>>;

    fn handle(&mut self, msg: Load, _ctx: &mut Context<Self>) -> Self::Result {
        Box::pin(placed(self.shared.clone(), msg.model.clone(), msg))
    }
}

impl Handler<Acquire> for Fleet {
    type Result = ResponseFuture<Result<Lease, VramError>>;

    fn handle(&mut self, msg: Acquire, _ctx: &mut Context<Self>) -> Self::Result {
        Box::pin(placed(self.shared.clone(), msg.model.clone(), msg))
    }
}

impl Handler<Unload> for Fleet {
    type Result = ResponseFuture<Result<Unloaded, VramError>>;

    fn handle(&mut self, msg: Unload, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            let card = match shared.holder(&msg.model).await? {
                Some(card) => card,
                None => shared.home(&msg.model),
            };
            shared.cards[card].send(msg).await.map_err(gone)?
        })
    }
}

impl Handler<Status> for Fleet {
    type Result = ResponseFuture<StatusReport>;

    fn handle(&mut self, _msg: Status, _ctx: &mut Context<Self>) -> Self::Result {
        let cards = self.shared.cards.clone();
        let order = self.shared.order;
        Box::pin(async move {
            let reports = futures::future::join_all(cards.iter().map(|c| c.send(Status))).await;
            merge(reports.into_iter().filter_map(Result::ok).collect(), order)
        })
    }
}

/// One report for several cards: totals, every model, every card in
/// `gpus`.
fn merge(reports: Vec<StatusReport>, order: Order) -> StatusReport {
    let mut merged = StatusReport {
        capacity: 0,
        used: 0,
        free: 0,
        queued: 0,
        running: false,
        models: Vec::new(),
        idle_ms: Default::default(),
        card: None,
        order,
        scores: Vec::new(),
        gpus: Vec::new(),
    };
    for report in reports {
        merged.capacity = merged.capacity.saturating_add(report.capacity);
        merged.used = merged.used.saturating_add(report.used);
        merged.free = merged.free.saturating_add(report.free);
        merged.queued += report.queued;
        merged.running |= report.running;
        merged.models.extend(report.models);
        merged.idle_ms.extend(report.idle_ms);
        merged.scores.extend(report.scores);
        merged.gpus.extend(report.gpus);
    }
    merged.models.sort_by(|a, b| a.id.cmp(&b.id));
    merged
}

impl Handler<Subscribe> for Fleet {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) -> Self::Result {
        let cards = self.shared.cards.clone();
        Box::pin(async move {
            for card in cards {
                let _ = card.send(Subscribe(msg.0.clone())).await;
            }
        })
    }
}

impl Handler<SetPinned> for Fleet {
    type Result = ResponseFuture<Result<(), VramError>>;

    fn handle(&mut self, msg: SetPinned, _ctx: &mut Context<Self>) -> Self::Result {
        let cards = self.shared.cards.clone();
        Box::pin(async move {
            // Every card that has the model in its catalog pins it.
            let mut answer = Err(VramError::UnknownModel {
                model: msg.model.clone(),
            });
            for card in cards {
                if card.send(msg.clone()).await.map_err(gone)?.is_ok() {
                    answer = Ok(());
                }
            }
            answer
        })
    }
}

impl Handler<CrashBackend> for Fleet {
    type Result = ResponseFuture<Result<(), VramError>>;

    fn handle(&mut self, msg: CrashBackend, _ctx: &mut Context<Self>) -> Self::Result {
        let cards = self.shared.cards.clone();
        Box::pin(async move {
            let answers =
                futures::future::join_all(cards.iter().map(|c| c.send(msg.clone()))).await;
            for answer in answers {
                answer.map_err(gone)??;
            }
            Ok(())
        })
    }
}

impl Handler<Shutdown> for Fleet {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        let cards = self.shared.cards.clone();
        Box::pin(async move {
            futures::future::join_all(cards.iter().map(|c| c.send(Shutdown))).await;
        })
    }
}
