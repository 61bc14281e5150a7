//! Other trust domains' bundles, kept for federation: set, list, delete.
//! The server's own trust domain is refused; its bundle is the CA's.

use sigil::TrustDomain;
use sigil::bundle::{X509Bundle, cert_to_pem};
use sigil::proto::sigil::types::v1 as pb;
use tonic::Status;

use super::{Services, internal};
use crate::store::FederatedBundleRecord;

/// Most authorities accepted in one bundle.
const MAX_AUTHORITIES: usize = 64;

/// Checks and stores `bundle`, replacing any bundle of its trust domain.
pub(crate) async fn set(
    services: &Services,
    bundle: Option<pb::Bundle>,
) -> Result<pb::Bundle, Status> {
    let bundle = bundle.ok_or_else(|| Status::invalid_argument("bundle: is required"))?;
    let td = foreign_trust_domain(services, "bundle.trust_domain", &bundle.trust_domain)?;
    let record = record_of(&td, &bundle)?;
    services
        .store
        .put_federated_bundle(&record)
        .await
        .map_err(|e| internal("storing a federated bundle", e))?;
    services
        .store
        .flush()
        .await
        .map_err(|e| internal("storing a federated bundle", e))?;
    tracing::info!(
        trust_domain = %td,
        authorities = bundle.x509_authorities.len(),
        "federated bundle set"
    );
    Ok(pb::Bundle {
        trust_domain: td.name().to_owned(),
        ..bundle
    })
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
    let record = services
        .store
        .delete_federated_bundle(td.name())
        .await
        .map_err(|e| internal("deleting a federated bundle", e))?
        .ok_or_else(|| Status::not_found(format!("no bundle for trust domain {td}")))?;
    services
        .store
        .flush()
        .await
        .map_err(|e| internal("deleting a federated bundle", e))?;
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
