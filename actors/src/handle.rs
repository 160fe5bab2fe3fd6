//! [`VramHandle`]: what an embedding application keeps to talk to the
//! manager — cloneable, `Send + Sync` (it fits actix-web's `web::Data`),
//! with one `Result` per call: a manager that is gone answers
//! `unavailable`, never a mailbox error.

use actix::prelude::*;

use crate::error::VramError;
use crate::events::{Loaded, Unloaded, VramEvent};
use crate::fleet::Fleet;
use crate::messages::{
    Acquire, CrashBackend, Lease, Load, SetPinned, Shutdown, Status, StatusReport, Subscribe,
    Unload,
};
use crate::vram_actor::VramActor;

/// A handle on a running manager.
///
/// ```no_run
/// # async fn turn(vram: vram_actors::VramHandle) -> Result<(), vram_actors::VramError> {
/// let lease = vram.acquire("whisper-large-v3").await?;
/// // ... transcribe: the model cannot be evicted while `lease` lives ...
/// drop(lease);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct VramHandle {
    target: Target,
}

/// One card's manager, or several cards behind a [`Fleet`].
#[derive(Debug, Clone)]
enum Target {
    Card(Addr<VramActor>),
    Fleet(Addr<Fleet>),
}

/// Sends `$msg` to whichever actor the handle holds.
macro_rules! send {
    ($self:expr, $msg:expr) => {
        match &$self.target {
            Target::Card(addr) => addr.send($msg).await,
            Target::Fleet(addr) => addr.send($msg).await,
        }
    };
}

fn gone(error: MailboxError) -> VramError {
    VramError::Unavailable {
        reason: format!("the manager is gone ({error})"),
    }
}

impl VramHandle {
    /// A handle on the manager of one card at `addr`.
    pub fn new(addr: Addr<VramActor>) -> Self {
        Self {
            target: Target::Card(addr),
        }
    }

    /// A handle on several cards behind the fleet at `addr`.
    pub fn fleet(addr: Addr<Fleet>) -> Self {
        Self {
            target: Target::Fleet(addr),
        }
    }

    /// The manager's address when it manages one card, for messages the
    /// handle has no method for (`None` behind a fleet).
    pub fn addr(&self) -> Option<&Addr<VramActor>> {
        match &self.target {
            Target::Card(addr) => Some(addr),
            Target::Fleet(_) => None,
        }
    }

    /// Loads `model` (evicting by the policy if needed); see [`Load`].
    pub async fn load(&self, model: impl Into<String>) -> Result<Loaded, VramError> {
        send!(self, Load::new(model)).map_err(gone)?
    }

    /// Loads `model` if needed and holds it until the lease is dropped;
    /// see [`Acquire`].
    pub async fn acquire(&self, model: impl Into<String>) -> Result<Lease, VramError> {
        send!(self, Acquire::new(model)).map_err(gone)?
    }

    /// Unloads `model`; see [`Unload`].
    pub async fn unload(&self, model: impl Into<String>) -> Result<Unloaded, VramError> {
        send!(self, Unload::new(model)).map_err(gone)?
    }

    /// Pins or unpins `model`; see [`SetPinned`].
    pub async fn set_pinned(
        &self,
        model: impl Into<String>,
        pinned: bool,
    ) -> Result<(), VramError> {
        let msg = SetPinned {
            model: model.into(),
            pinned,
        };
        send!(self, msg).map_err(gone)?
    }

    /// A snapshot of the ledger (answered at once, even during a load).
    pub async fn status(&self) -> Result<StatusReport, VramError> {
        send!(self, Status).map_err(gone)
    }

    /// Sends every [`VramEvent`] from now on to `to`.
    pub async fn subscribe(&self, to: Recipient<VramEvent>) -> Result<(), VramError> {
        send!(self, Subscribe(to)).map_err(gone)
    }

    /// Makes the backend of `kind` crash and restart (on every card), then
    /// waits until the ledger agrees with it again; see [`CrashBackend`].
    pub async fn crash_backend(&self, kind: impl Into<String>) -> Result<(), VramError> {
        send!(self, CrashBackend { kind: kind.into() }).map_err(gone)?
    }

    /// Stops taking work and stops every model server; see [`Shutdown`].
    /// A manager that is already gone has nothing left to stop.
    pub async fn shutdown(&self) {
        let _ = send!(self, Shutdown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn the_handle_is_send_sync_and_cloneable() {
        send_sync_clone::<VramHandle>();
    }
}
