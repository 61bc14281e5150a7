//! `MintX509Svid`: an X.509-SVID for an operator's CSR, without an entry.
//! The key stays with the caller; the server only certifies it.

use std::time::Duration;

use sigil::SpiffeId;
use sigil::proto::sigil::admin::v1::{MintX509SvidRequest, MintX509SvidResponse};
use sigil::x509::MAX_DNS_NAMES;
use tonic::Status;

use super::agent::parse_csr;
use super::{Services, internal};
use crate::clock;

/// The path prefix reserved for the server's and agents' own IDs.
const RESERVED_PREFIX: &str = "/sigil";

/// Checks the request, signs the CSR with the active authority, and returns
/// the chain with the bundle.
pub(crate) fn mint(
    services: &Services,
    req: &MintX509SvidRequest,
) -> Result<MintX509SvidResponse, Status> {
    let csr = parse_csr("csr", &req.csr)?;
    let td = services.ca.current().bundle.trust_domain().clone();
    let id = csr
        .spiffe_id()
        .ok_or_else(|| Status::invalid_argument("csr: has no URI SAN; it must be the SPIFFE ID"))?;
    check_id(id, &td)?;
    let dns_names = check_dns_names(&req.dns_names)?;
    let ttl = match req.ttl {
        0 => services.default_x509_svid_ttl,
        n if n < 0 => return Err(Status::invalid_argument("ttl: must not be negative")),
        n => Duration::from_secs(n.unsigned_abs().into()),
    }
    .min(services.ca.max_svid_ttl());

    let svid = services
        .ca
        .authority()
        .sign_leaf(csr.public_key(), id, &dns_names, ttl)
        .map_err(|e| internal("minting an X509-SVID", e))?;
    let expires_at = clock::to_unix(svid.not_after);
    tracing::info!(
        spiffe.id = %id,
        expires_at = %clock::rfc3339(expires_at),
        "X509-SVID minted"
    );
    Ok(MintX509SvidResponse {
        cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
        expires_at,
        bundle: Some(services.ca.bundle_proto()),
    })
}

/// The ID must be a workload ID of the trust domain outside `/sigil/`.
fn check_id(id: &SpiffeId, td: &sigil::TrustDomain) -> Result<(), Status> {
    if !id.is_member_of(td) {
        return Err(Status::invalid_argument(format!(
            "csr: URI SAN {id} is not in trust domain {td}"
        )));
    }
    if !id.is_workload_id() {
        return Err(Status::invalid_argument(format!(
            "csr: URI SAN {id} has no path; an SVID needs one"
        )));
    }
    let path = id.path();
    if path == RESERVED_PREFIX || path.starts_with("/sigil/") {
        return Err(Status::invalid_argument(format!(
            "csr: URI SAN {id} is under /sigil/, which is reserved for the server and agents"
        )));
    }
    Ok(())
}

fn check_dns_names(names: &[String]) -> Result<Vec<String>, Status> {
    if names.len() > MAX_DNS_NAMES {
        return Err(Status::invalid_argument(format!(
            "dns_names: at most {MAX_DNS_NAMES} names are allowed"
        )));
    }
    for (i, name) in names.iter().enumerate() {
        sigil::entry::validate_dns_name(name)
            .map_err(|e| Status::invalid_argument(format!("dns_names[{i}]: {name:?} {e}")))?;
    }
    Ok(names.to_vec())
}

#[cfg(test)]
mod tests {
    use sigil::TrustDomain;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn workload_ids_of_the_trust_domain_pass() {
        check_id(&"spiffe://example.org/ops/batch".parse().unwrap(), &td()).unwrap();
        check_id(&"spiffe://example.org/sigilx".parse().unwrap(), &td()).unwrap();
    }

    #[test]
    fn foreign_root_and_reserved_ids_are_refused() {
        let cases = [
            (
                "spiffe://other.org/web",
                "csr: URI SAN spiffe://other.org/web is not in trust domain example.org",
            ),
            (
                "spiffe://example.org",
                "csr: URI SAN spiffe://example.org has no path; an SVID needs one",
            ),
            (
                "spiffe://example.org/sigil/server",
                "csr: URI SAN spiffe://example.org/sigil/server is under /sigil/, which is reserved for the server and agents",
            ),
            (
                "spiffe://example.org/sigil",
                "csr: URI SAN spiffe://example.org/sigil is under /sigil/, which is reserved for the server and agents",
            ),
        ];
        for (id, message) in cases {
            let status = check_id(&id.parse().unwrap(), &td()).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn dns_names_are_checked_by_index() {
        assert_eq!(
            check_dns_names(&["a.example.org".into()]).unwrap(),
            ["a.example.org"]
        );
        let status = check_dns_names(&["ok.org".into(), "bad name".into()]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("dns_names[1]: \"bad name\" "),
            "{}",
            status.message()
        );
    }
}
