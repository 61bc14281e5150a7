//! Other trust domains' bundles, kept for federation: set, list, delete.
//! The server's own trust domain is refused; its bundle is the CA's.
//!
//! The stored bundles are also held in memory ([`FederatedBundles`]); a set
//! or delete replaces them there once the store has flushed and notifies the
//! entry sync streams, which send each agent the bundles its entries
//! federate with.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sigil::bundle::{X509Bundle, cert_to_pem};
use sigil::proto::sigil::types::v1 as pb;
use sigil::{Entry, TrustDomain};
use tokio::sync::{Mutex, watch};
use tonic::Status;

use super::{Services, internal};
use crate::store::{FederatedBundleRecord, Store, StoreError};

/// Most authorities accepted in one bundle.
const MAX_AUTHORITIES: usize = 64;

/// The stored bundles by trust domain.
pub(crate) type BundleMap = BTreeMap<TrustDomain, pb::Bundle>;

/// The stored bundles, in memory; each set or delete publishes a new map.
#[derive(Debug)]
pub(crate) struct FederatedBundles {
    current: watch::Sender<Arc<BundleMap>>,
    /// Serializes writes, so that the map ends as the store does.
    writes: Mutex<()>,
}

impl Default for FederatedBundles {
    fn default() -> Self {
        Self::new(BundleMap::new())
    }
}

impl FederatedBundles {
    fn new(bundles: BundleMap) -> Self {
        Self {
            current: watch::Sender::new(Arc::new(bundles)),
            writes: Mutex::new(()),
        }
    }

    /// The bundles in `store`. A stored bundle that cannot be read is left
    /// out, with a warning (`bundle list` reports it, `bundle delete`
    /// removes it).
    pub(crate) async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut bundles = BundleMap::new();
        for record in store.list_federated_bundles().await? {
            match TrustDomain::new(&record.trust_domain)
                .map_err(|e| e.to_string())
                .and_then(|td| Ok((td, proto_of(&record)?)))
            {
                Ok((td, bundle)) => {
                    bundles.insert(td, bundle);
                }
                Err(error) => tracing::warn!(
                    trust_domain = %record.trust_domain,
                    error = %error,
                    "ignoring an unreadable stored federated bundle"
                ),
            }
        }
        Ok(Self::new(bundles))
    }

    /// A receiver that sees every new map.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<BundleMap>> {
        self.current.subscribe()
    }

    fn publish(&self, change: impl FnOnce(&mut BundleMap)) {
        self.current
            .send_modify(|current| change(Arc::make_mut(current)));
    }
}

/// The bundles of the trust domains that `entries` federate with, ordered
/// by trust domain; a trust domain without a stored bundle is left out.
pub(crate) fn relevant<'a>(bundles: &'a BundleMap, entries: &[Arc<Entry>]) -> Vec<&'a pb::Bundle> {
    let wanted: BTreeSet<&TrustDomain> = entries
        .iter()
        .flat_map(|e| e.federates_with.iter())
        .collect();
    wanted
        .into_iter()
        .filter_map(|td| bundles.get(td))
        .collect()
}

/// Checks and stores `bundle`, replacing any bundle of its trust domain.
pub(crate) async fn set(
    services: &Services,
    bundle: Option<pb::Bundle>,
) -> Result<pb::Bundle, Status> {
    let bundle = bundle.ok_or_else(|| Status::invalid_argument("bundle: is required"))?;
    let td = foreign_trust_domain(services, "bundle.trust_domain", &bundle.trust_domain)?;
    let record = record_of(&td, &bundle)?;
    let bundle = pb::Bundle {
        trust_domain: td.name().to_owned(),
        ..bundle
    };
    let federated = &services.federated;
    let _writing = federated.writes.lock().await;
    services
        .store
        .put_federated_bundle(&record)
        .await
        .map_err(|e| internal("storing a federated bundle", e))?;
    let flushed = services.store.flush().await;
    federated.publish(|bundles| {
        bundles.insert(td.clone(), bundle.clone());
    });
    flushed.map_err(|e| internal("storing a federated bundle", e))?;
    tracing::info!(
        trust_domain = %td,
        authorities = bundle.x509_authorities.len(),
        "federated bundle set"
    );
    Ok(bundle)
}

/// Every stored bundle, ordered by trust domain name.
pub(crate) async fn list(services: &Services) -> Result<Vec<pb::Bundle>, Status> {
    services
        .store
        .list_federated_bundles()
        .await
        .map_err(|e| internal("listing federated bundles", e))?
        .iter()
        .map(|record| {
            proto_of(record).map_err(|e| internal("reading a stored federated bundle", e))
        })
        .collect()
}

/// Deletes the bundle of `trust_domain`; NOT_FOUND when there is none.
pub(crate) async fn delete(services: &Services, trust_domain: &str) -> Result<pb::Bundle, Status> {
    let td = foreign_trust_domain(services, "trust_domain", trust_domain)?;
    let federated = &services.federated;
    let _writing = federated.writes.lock().await;
    let record = services
        .store
        .delete_federated_bundle(td.name())
        .await
        .map_err(|e| internal("deleting a federated bundle", e))?
        .ok_or_else(|| Status::not_found(format!("no bundle for trust domain {td}")))?;
    let flushed = services.store.flush().await;
    federated.publish(|bundles| {
        bundles.remove(&td);
    });
    flushed.map_err(|e| internal("deleting a federated bundle", e))?;
    tracing::info!(trust_domain = %td, "federated bundle deleted");
    proto_of(&record).map_err(|e| internal("reading a stored federated bundle", e))
}

/// A valid trust domain name other than the server's own.
fn foreign_trust_domain(
    services: &Services,
    field: &str,
    name: &str,
) -> Result<TrustDomain, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: is required")));
    }
    let td = TrustDomain::new(name)
        .map_err(|e| Status::invalid_argument(format!("{field}: {name:?} {e}")))?;
    let own = services.ca.current().bundle.trust_domain().clone();
    if td == own {
        return Err(Status::invalid_argument(format!(
            "{field}: {td} is the server's own trust domain; its bundle is managed by the server"
        )));
    }
    Ok(td)
}

/// The record of a checked bundle: every authority must be one DER
/// certificate.
fn record_of(td: &TrustDomain, bundle: &pb::Bundle) -> Result<FederatedBundleRecord, Status> {
    if bundle.x509_authorities.is_empty() {
        return Err(Status::invalid_argument(
            "bundle.x509_authorities: at least one certificate is required",
        ));
    }
    if bundle.x509_authorities.len() > MAX_AUTHORITIES {
        return Err(Status::invalid_argument(format!(
            "bundle.x509_authorities: at most {MAX_AUTHORITIES} certificates are allowed"
        )));
    }
    let pem: String = bundle
        .x509_authorities
        .iter()
        .map(|der| cert_to_pem(der))
        .collect();
    // Each block is parsed as a certificate; a failure names the first bad one.
    for (i, der) in bundle.x509_authorities.iter().enumerate() {
        X509Bundle::from_pem(td.clone(), cert_to_pem(der).as_bytes())
            .map_err(|e| Status::invalid_argument(format!("bundle.x509_authorities[{i}]: {e}")))?;
    }
    Ok(FederatedBundleRecord {
        trust_domain: td.name().to_owned(),
        x509_authorities_pem: pem,
        sequence: bundle.sequence,
    })
}

fn proto_of(record: &FederatedBundleRecord) -> Result<pb::Bundle, String> {
    let td = TrustDomain::new(&record.trust_domain).map_err(|e| e.to_string())?;
    let bundle = X509Bundle::from_pem(td, record.x509_authorities_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", record.trust_domain))?;
    Ok(pb::Bundle {
        trust_domain: record.trust_domain.clone(),
        x509_authorities: bundle.authorities().iter().map(|c| c.to_vec()).collect(),
        sequence: record.sequence,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil::x509::Authority;

    use super::*;

    fn other() -> TrustDomain {
        TrustDomain::new("other.org").unwrap()
    }

    #[test]
    fn a_bundle_is_stored_as_pem_and_read_back() {
        let ca = Authority::self_signed(&other(), Duration::from_secs(3600)).unwrap();
        let bundle = pb::Bundle {
            trust_domain: "other.org".into(),
            x509_authorities: vec![ca.cert().to_vec()],
            sequence: 4,
        };
        let record = record_of(&other(), &bundle).unwrap();
        assert_eq!(record.trust_domain, "other.org");
        assert_eq!(proto_of(&record).unwrap(), bundle);
    }

    #[test]
    fn empty_and_malformed_authorities_are_refused() {
        let empty = pb::Bundle {
            trust_domain: "other.org".into(),
            ..Default::default()
        };
        let status = record_of(&other(), &empty).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "bundle.x509_authorities: at least one certificate is required"
        );

        let ca = Authority::self_signed(&other(), Duration::from_secs(3600)).unwrap();
        let bad = pb::Bundle {
            trust_domain: "other.org".into(),
            x509_authorities: vec![ca.cert().to_vec(), b"junk".to_vec()],
            sequence: 0,
        };
        let status = record_of(&other(), &bad).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("bundle.x509_authorities[1]: malformed certificate: "),
            "{}",
            status.message()
        );
    }
}
