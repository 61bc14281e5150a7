//! The operator's side of the schedule: the changes an operator asks for
//! (prepare, activate, taint, revoke) and the shared [`Authorities`] they go
//! through.

use std::collections::HashMap;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tokio::sync::Notify;

use super::Schedule;
use crate::ca::journal::{AuthorityRecord, Journal, Refusal};
use crate::ca::live::LiveSvids;
use crate::ca::{Ca, CaError};

/// The lowercase hex `id` as bytes, if it is hex.
pub(crate) fn unhex(id: &str) -> Option<Vec<u8>> {
    if !id.len().is_multiple_of(2) {
        return None;
    }
    (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(id.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An operator's change of the authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Operation {
    /// Prepare the next authority now.
    Prepare,
    /// Make the prepared authority with this ID the signing one.
    Activate(String),
    /// Taint the (non-active) authority with this ID.
    Taint(String),
    /// Revoke the tainted authority with this ID.
    Revoke {
        /// Its ID.
        id: String,
        /// Revoke even with live SVIDs.
        force: bool,
    },
}

/// Why an operator's change was not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OperationError {
    /// The journal does not allow it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Creating or persisting failed.
    #[error(transparent)]
    Failed(#[from] CaError),
}

/// The schedule shared by its run loop and the operator's changes, with the
/// index of live SVIDs that revocation consults.
#[derive(Debug)]
pub(crate) struct Authorities {
    pub(super) schedule: tokio::sync::Mutex<Schedule>,
    pub(super) ca: Arc<Ca>,
    live: Arc<LiveSvids>,
    pub(super) wake: Notify,
}

impl Authorities {
    /// Shares `schedule`, whose state `ca` publishes.
    pub(crate) fn new(schedule: Schedule, ca: Arc<Ca>, live: Arc<LiveSvids>) -> Arc<Self> {
        Arc::new(Self {
            schedule: tokio::sync::Mutex::new(schedule),
            ca,
            live,
            wake: Notify::new(),
        })
    }

    /// The index of live SVIDs.
    pub(crate) fn live(&self) -> &LiveSvids {
        &self.live
    }

    /// The journal, with the certificate of every authority not revoked.
    pub(crate) async fn journal(&self) -> (Journal, HashMap<String, CertificateDer<'static>>) {
        let schedule = self.schedule.lock().await;
        let journal = schedule.journal().clone();
        let certs = journal
            .authorities
            .iter()
            .filter_map(|r| Some((r.id.clone(), schedule.certificate(&r.id)?.clone())))
            .collect();
        (journal, certs)
    }

    /// Applies an operator's change, publishes the result, and has the
    /// schedule look again at what comes next.
    pub(crate) async fn operate(
        &self,
        operation: &Operation,
    ) -> Result<AuthorityRecord, OperationError> {
        let mut schedule = self.schedule.lock().await;
        let now = schedule.clock.now();
        let record = schedule.operate(operation, now, &self.live).await?;
        self.ca.publish(schedule.published()?);
        self.wake.notify_one();
        Ok(record)
    }
}
