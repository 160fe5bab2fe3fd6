//! [`VramHandle`]: what an embedding application keeps to talk to the
//! manager — cloneable, `Send + Sync` (it fits actix-web's `web::Data`),
//! with one `Result` per call: a manager that is gone answers
//! `unavailable`, never a mailbox error.

use actix::prelude::*;

use crate::error::VramError;
use crate::events::{Loaded, Unloaded, VramEvent};
use crate::messages::{
    Acquire, Lease, Load, SetPinned, Shutdown, Status, StatusReport, Subscribe, Unload,
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
    addr: Addr<VramActor>,
}

fn gone(error: MailboxError) -> VramError {
    VramError::Unavailable {
        reason: format!("the manager is gone ({error})"),
    }
}

impl VramHandle {
    /// A handle on the manager at `addr`.
    pub fn new(addr: Addr<VramActor>) -> Self {
        Self { addr }
    }

    /// The manager's address, for messages the handle has no method for.
    pub fn addr(&self) -> &Addr<VramActor> {
        &self.addr
    }

    /// Loads `model` (evicting by the policy if needed); see [`Load`].
    pub async fn load(&self, model: impl Into<String>) -> Result<Loaded, VramError> {
        self.addr.send(Load::new(model)).await.map_err(gone)?
    }

    /// Loads `model` if needed and holds it until the lease is dropped;
    /// see [`Acquire`].
    pub async fn acquire(&self, model: impl Into<String>) -> Result<Lease, VramError> {
        self.addr.send(Acquire::new(model)).await.map_err(gone)?
    }

    /// Unloads `model`; see [`Unload`].
    pub async fn unload(&self, model: impl Into<String>) -> Result<Unloaded, VramError> {
        self.addr.send(Unload::new(model)).await.map_err(gone)?
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
        self.addr.send(msg).await.map_err(gone)?
    }

    /// A snapshot of the ledger (answered at once, even during a load).
    pub async fn status(&self) -> Result<StatusReport, VramError> {
        self.addr.send(Status).await.map_err(gone)
    }

    /// Sends every [`VramEvent`] from now on to `to`.
    pub async fn subscribe(&self, to: Recipient<VramEvent>) -> Result<(), VramError> {
        self.addr.send(Subscribe(to)).await.map_err(gone)
    }

    /// Stops taking work and stops every model server; see [`Shutdown`].
    /// A manager that is already gone has nothing left to stop.
    pub async fn shutdown(&self) {
        let _ = self.addr.send(Shutdown).await;
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
