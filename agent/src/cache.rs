//! The agent's current identities: what the SVID manager publishes and the
//! Workload API serves.
//!
//! The manager replaces the whole [`Snapshot`] on every change (an SVID
//! rotated, an entry added or removed, a new bundle or set of federated
//! bundles) through a
//! `tokio::sync::watch` channel; each Workload API stream waits on that
//! channel and sends its caller the part it is entitled to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use sigil::bundle::X509Bundle;
use sigil::keys::PrivateKey;
use sigil::{Entry, TrustDomain};
use tokio::sync::watch;

/// Everything the Workload API serves, at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// The trust domain's bundle.
    pub bundle: Arc<X509Bundle>,
    /// The bundle as concatenated DER, computed once per bundle change.
    pub bundle_der: Arc<Vec<u8>>,
    /// The bundles of other trust domains that the agent's entries
    /// federate with.
    pub federated: Arc<FederatedBundles>,
    /// Every entry the agent holds, with its current SVID once one has been
    /// issued, in a stable order (by creation time, then ID) so that a
    /// workload's default identity does not change between updates.
    pub identities: Vec<Arc<Identity>>,
    /// Increases on every change.
    pub version: u64,
}

/// Other trust domains' bundles as concatenated DER (never empty, never the
/// agent's own trust domain).
pub(crate) type FederatedBundles = BTreeMap<TrustDomain, Arc<Vec<u8>>>;

/// One entry and its current X.509-SVID.
#[derive(Debug)]
pub(crate) struct Identity {
    /// The entry, with its selectors.
    pub entry: Entry,
    /// The SVID, absent until the first one has been signed.
    pub svid: Option<Arc<Svid>>,
}

/// An X.509-SVID and its key.
#[derive(Debug)]
pub(crate) struct Svid {
    /// DER certificates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The chain as concatenated DER, the Workload API's form.
    pub chain_der: Vec<u8>,
    /// The private key (PKCS#8 DER); never logged.
    pub key: PrivateKey,
    /// The leaf's notBefore.
    pub not_before: SystemTime,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

/// The receiving end the Workload API holds.
pub(crate) type SnapshotReceiver = watch::Receiver<Arc<Snapshot>>;

/// The sending end the SVID manager holds.
pub(crate) type SnapshotSender = watch::Sender<Arc<Snapshot>>;
