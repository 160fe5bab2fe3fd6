//! The jobs of the `VramActor`'s queue, each with everyone waiting for it,
//! typed by kind: a load answers its `Load` and `Acquire` waiters, an
//! unload its `Unload` waiters, a restart its `CrashBackend` waiter — so a
//! job's outcome can only reach a waiter of the same type.

use std::time::Instant;

use crate::error::VramError;
use crate::events::{Loaded, Unloaded};
use crate::job::{Books, Command, Event, Job as _, LoadJob, RestartJob, UnloadJob};
use crate::messages::Lease;
use crate::reply::Reply;

/// Someone waiting for a load: a `Load` or an `Acquire` that needs one.
pub(crate) enum LoadWaiter {
    Load(Reply<Loaded>),
    Acquire(Reply<Lease>),
}

/// Everyone waiting for one load: usually one, kept without an allocation.
pub(crate) type LoadWaiters = smallvec::SmallVec<[LoadWaiter; 1]>;

/// A queued or running job with everyone waiting for it, typed by kind.
// Few jobs wait at once; boxing the load would cost an allocation per load.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Queued {
    Load(LoadJob, LoadWaiters),
    Unload(UnloadJob, Vec<Reply<Unloaded>>),
    Restart(RestartJob, Vec<Reply<()>>),
}

impl Queued {
    /// The model this job is about, if any.
    pub(crate) fn model(&self) -> Option<&str> {
        match self {
            Queued::Load(job, _) => Some(job.model()),
            Queued::Unload(job, _) => Some(job.model()),
            Queued::Restart(..) => None,
        }
    }

    /// Whether this job could change whether `model` (of `kind`) is
    /// resident: a load or unload of it, or a restart of its backend.
    pub(crate) fn may_change(&self, model: &str, kind: Option<&str>) -> bool {
        match self {
            Queued::Load(job, _) => job.model() == model,
            Queued::Unload(job, _) => !job.is_expiry() && job.model() == model,
            Queued::Restart(job, _) => Some(job.kind()) == kind,
        }
    }

    pub(crate) fn handle(
        &mut self,
        event: Event,
        books: &mut Books,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        match self {
            Queued::Load(job, _) => job.handle(event, books, now, out),
            Queued::Unload(job, _) => job.handle(event, books, now, out),
            Queued::Restart(job, _) => job.handle(event, books, now, out),
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        match self {
            Queued::Load(job, _) => job.is_done(),
            Queued::Unload(job, _) => job.is_done(),
            Queued::Restart(job, _) => job.is_done(),
        }
    }

    /// Answers everyone waiting `error`.
    pub(crate) fn refuse(self, error: VramError) {
        match self {
            Queued::Load(_, waiters) => refuse_load(waiters, error),
            Queued::Unload(_, waiters) => waiters
                .into_iter()
                .for_each(|reply| reply.send(Err(error.clone()))),
            Queued::Restart(_, waiters) => waiters
                .into_iter()
                .for_each(|reply| reply.send(Err(error.clone()))),
        }
    }

    pub(crate) fn span(&self) -> tracing::Span {
        // With nothing that records spans at this level, no span at all:
        // building a disabled one still asks the dispatcher, once per job.
        if !tracing::level_enabled!(tracing::Level::INFO) {
            return tracing::Span::none();
        }
        match self {
            Queued::Load(job, _) => tracing::info_span!("load", model = %job.model()),
            Queued::Unload(job, _) if job.is_expiry() => {
                tracing::info_span!("expire", model = %job.model())
            }
            Queued::Unload(job, _) => tracing::info_span!("unload", model = %job.model()),
            Queued::Restart(job, _) if job.crashes() => {
                tracing::info_span!("crash", kind = %job.kind())
            }
            Queued::Restart(job, _) => tracing::info_span!("reconcile", kind = %job.kind()),
        }
    }
}

/// Answers everyone waiting for a load `error`.
pub(crate) fn refuse_load(waiters: LoadWaiters, error: VramError) {
    for waiter in waiters {
        match waiter {
            LoadWaiter::Load(reply) => reply.send(Err(error.clone())),
            LoadWaiter::Acquire(reply) => reply.send(Err(error.clone())),
        }
    }
}
