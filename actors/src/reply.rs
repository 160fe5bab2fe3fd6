//! Answers the `VramActor` gives after its handler has returned (a Load
//! or Acquire that waits for a job), sent straight into the caller's
//! reply channel.
//!
//! A handler that returns a future answers through that future, polled by
//! the actor's context: a boxed future, a second channel and one more pass
//! through the context per request. Instead the handler returns a
//! [`Deferred`], which hands actix's reply channel to a slot shared with
//! the job's [`Reply`]; the job's end sends the answer through it
//! directly. Either side may come first: a job that ends inside the
//! handler leaves its answer in the slot for the channel to take.

use std::cell::RefCell;
use std::rc::Rc;

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use arcstr::ArcStr;

use crate::error::VramError;

/// Where the answer and the caller's channel meet.
enum Slot<T> {
    /// Neither has arrived.
    Empty,
    /// The caller's channel is here; the answer is still to come.
    Channel(OneshotSender<T>),
    /// The answer came first.
    Answer(T),
    /// The caller asked for no answer (`do_send`), or it was given.
    Closed,
}

/// The job's end of a deferred answer: send once with [`Reply::send`].
/// Dropped unanswered (the manager stopped, or restarted, first), it
/// answers `unavailable`.
pub(crate) struct Reply<T> {
    slot: Rc<RefCell<Slot<Result<T, VramError>>>>,
    /// The model asked for, named in the `unavailable` answer.
    model: ArcStr,
}

/// What the `VramActor`'s Load, Acquire, Unload and CrashBackend handlers
/// return: the answer given at once, or one a job gives later, which actix
/// sends the caller either way. Only actix uses it.
pub struct Deferred<T>(Answer<T>);

enum Answer<T> {
    /// Answered at once.
    Now(Result<T, VramError>),
    /// Answered by the job's [`Reply`].
    Later(Rc<RefCell<Slot<Result<T, VramError>>>>),
}

impl<T> Deferred<T> {
    /// The answer, given at once.
    pub(crate) fn now(answer: Result<T, VramError>) -> Self {
        Self(Answer::Now(answer))
    }
}

/// A deferred answer about `model`: the job's end and the handler's.
pub(crate) fn deferred<T>(model: impl Into<ArcStr>) -> (Reply<T>, Deferred<T>) {
    let slot = Rc::new(RefCell::new(Slot::Empty));
    (
        Reply {
            slot: slot.clone(),
            model: model.into(),
        },
        Deferred(Answer::Later(slot)),
    )
}

impl<T> Reply<T> {
    /// Answers the caller (or leaves the answer for its channel).
    pub(crate) fn send(mut self, answer: Result<T, VramError>) {
        self.put(answer);
    }

    fn put(&mut self, answer: Result<T, VramError>) {
        let mut slot = self.slot.borrow_mut();
        match std::mem::replace(&mut *slot, Slot::Closed) {
            Slot::Empty => *slot = Slot::Answer(answer),
            // The caller may have gone: nothing to do then.
            Slot::Channel(tx) => drop(tx.send(answer)),
            // Answered already, or no answer wanted.
            closed @ (Slot::Answer(_) | Slot::Closed) => *slot = closed,
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        let waiting = matches!(*self.slot.borrow(), Slot::Empty | Slot::Channel(_));
        if waiting {
            let reason = format!("the manager stopped before answering for {}", self.model);
            self.put(Err(VramError::Unavailable { reason }));
        }
    }
}

impl<A, M, T> MessageResponse<A, M> for Deferred<T>
where
    A: Actor,
    M: Message<Result = Result<T, VramError>>,
{
    fn handle(self, _ctx: &mut A::Context, tx: Option<OneshotSender<M::Result>>) {
        let slot = match self.0 {
            Answer::Now(answer) => {
                if let Some(tx) = tx {
                    drop(tx.send(answer));
                }
                return;
            }
            Answer::Later(slot) => slot,
        };
        let mut slot = slot.borrow_mut();
        match (std::mem::replace(&mut *slot, Slot::Closed), tx) {
            (Slot::Answer(answer), Some(tx)) => drop(tx.send(answer)),
            (Slot::Empty, Some(tx)) => *slot = Slot::Channel(tx),
            // `do_send`: no one to answer.
            (_, None) => {}
            (Slot::Channel(_) | Slot::Closed, Some(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `Ask` later, through a deferred reply kept in the actor.
    #[derive(Default)]
    struct Later {
        waiting: Vec<Reply<u32>>,
    }

    impl Actor for Later {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "Result<u32, VramError>")]
    struct Ask {
        /// Answer inside the handler, before actix hands over the channel.
        at_once: bool,
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct AnswerAll(u32);

    #[derive(Message)]
    #[rtype(result = "()")]
    struct DropAll;

    impl Handler<Ask> for Later {
        type Result = Deferred<u32>;
        fn handle(&mut self, msg: Ask, _ctx: &mut Context<Self>) -> Deferred<u32> {
            let (reply, deferred) = deferred("m".to_string());
            if msg.at_once {
                reply.send(Ok(7));
            } else {
                self.waiting.push(reply);
            }
            deferred
        }
    }

    impl Handler<AnswerAll> for Later {
        type Result = ();
        fn handle(&mut self, msg: AnswerAll, _ctx: &mut Context<Self>) {
            for reply in self.waiting.drain(..) {
                reply.send(Ok(msg.0));
            }
        }
    }

    impl Handler<DropAll> for Later {
        type Result = ();
        fn handle(&mut self, _msg: DropAll, _ctx: &mut Context<Self>) {
            self.waiting.clear();
        }
    }

    #[actix_rt::test]
    async fn an_answer_reaches_the_caller_whichever_comes_first() {
        let addr = Later::default().start();
        assert_eq!(addr.send(Ask { at_once: true }).await.unwrap().unwrap(), 7);
        let later = addr.send(Ask { at_once: false });
        let answer = async {
            addr.send(AnswerAll(9)).await.unwrap();
        };
        let (got, ()) = futures::join!(later, answer);
        assert_eq!(got.unwrap().unwrap(), 9);
    }

    #[actix_rt::test]
    async fn a_reply_dropped_unanswered_says_unavailable() {
        let addr = Later::default().start();
        let asked = addr.send(Ask { at_once: false });
        let dropped = async {
            addr.send(DropAll).await.unwrap();
        };
        let (got, ()) = futures::join!(asked, dropped);
        match got.unwrap() {
            Err(VramError::Unavailable { reason }) => {
                assert_eq!(reason, "the manager stopped before answering for m")
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
        // Sent without waiting for an answer: answering later is harmless.
        addr.do_send(Ask { at_once: false });
        addr.send(AnswerAll(1)).await.unwrap();
        assert!(addr.connected());
    }
}
