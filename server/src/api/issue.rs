//! `BatchNewX509Svid`: validates a whole batch of workload CSRs, then signs
//! them. Both CSR verification and signing are spread over all cores.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use sigil::proto::sigil::agent::v1::{X509Svid, X509SvidParams};
use sigil::x509::{Authority, Csr};
use sigil::{Entry, SpiffeId};
use tonic::Status;

use super::agent::parse_csr;
use super::{Services, internal};
use crate::clock;

/// Most items of one batch.
pub(crate) const MAX_BATCH: usize = 500;

/// Validates every item, then signs them all with the signing authority of
/// the moment (lifetimes capped so that the authorities can rotate), or refuses the whole batch
/// with the first failing item's status.
pub(crate) async fn batch(
    services: &Services,
    agent: &SpiffeId,
    params: Vec<X509SvidParams>,
) -> Result<Vec<X509Svid>, Status> {
    if params.is_empty() {
        return Err(Status::invalid_argument("params: empty"));
    }
    if params.len() > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "params: at most {MAX_BATCH} items per batch"
        )));
    }

    // The record as it is now: its node selectors decide the agent's
    // aliases.
    let record = super::sync::current_record(services, agent).await?;
    let entitled: HashMap<String, Arc<Entry>> = services
        .registry
        .entitled(&record)
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect();
    let mut items = Vec::with_capacity(params.len());
    for (i, item) in params.into_iter().enumerate() {
        let entry = entitled_entry(services, &entitled, i, &item.entry_id)?;
        items.push((i, entry, item.csr));
    }

    let checked = parallel(items, |(i, entry, der)| {
        check_csr(i, &entry, &der).map(|csr| (entry, csr))
    })
    .await?
    .into_iter()
    .collect::<Result<Vec<_>, Status>>()?;

    // One authority for the whole batch, even if another becomes active
    // meanwhile.
    let published = services.ca.current();
    let authority = Arc::clone(&published.active);
    let default_ttl = services.default_x509_svid_ttl;
    let max_ttl = services.ca.max_svid_ttl();
    let signed = parallel(checked, move |(entry, csr)| {
        sign(&authority, &entry, &csr, default_ttl, max_ttl)
    })
    .await?
    .into_iter()
    .collect::<Result<Vec<_>, Status>>()?;

    for svid in &signed {
        tracing::debug!(
            entry.id = %svid.entry_id,
            spiffe.id = %svid.spiffe_id,
            expires_at = %clock::rfc3339(svid.expires_at),
            "X509-SVID issued"
        );
    }
    let svids = signed.iter().map(|s| (s.entry_id.clone(), s.expires_at));
    if let Err(e) = services
        .svids
        .record(agent.as_str(), &published.active_id, svids)
        .await
    {
        tracing::warn!(agent.id = %agent, error = %e, "cannot record the SVIDs signed");
    }
    tracing::info!(agent.id = %agent, count = signed.len(), "signed a batch of X509-SVIDs");
    Ok(signed)
}

/// The entry of item `i`, which must exist and be entitled to the agent.
fn entitled_entry(
    services: &Services,
    entitled: &HashMap<String, Arc<Entry>>,
    i: usize,
    entry_id: &str,
) -> Result<Arc<Entry>, Status> {
    if entry_id.is_empty() {
        return Err(Status::invalid_argument(format!(
            "params[{i}].entry_id: is required"
        )));
    }
    if let Some(entry) = entitled.get(entry_id) {
        return Ok(Arc::clone(entry));
    }
    if services.registry.get(entry_id).is_none() {
        return Err(Status::not_found(format!(
            "params[{i}].entry_id: no entry {entry_id:?}"
        )));
    }
    Err(Status::permission_denied(format!(
        "params[{i}].entry_id: entry {entry_id} is not entitled to this agent"
    )))
}

/// Verifies item `i`'s CSR and checks that its only URI SAN is the entry's
/// SPIFFE ID.
pub(crate) fn check_csr(i: usize, entry: &Entry, der: &[u8]) -> Result<Csr, Status> {
    let field = format!("params[{i}].csr");
    let csr = parse_csr(&field, der)?;
    match csr.spiffe_id() {
        Some(id) if *id == entry.spiffe_id => Ok(csr),
        Some(id) => Err(Status::invalid_argument(format!(
            "{field}: URI SAN {id} does not match entry {}",
            entry.spiffe_id
        ))),
        None => Err(Status::invalid_argument(format!(
            "{field}: has no URI SAN; it must be the entry's SPIFFE ID {}",
            entry.spiffe_id
        ))),
    }
}

fn sign(
    authority: &Authority,
    entry: &Entry,
    csr: &Csr,
    default_ttl: std::time::Duration,
    max_ttl: std::time::Duration,
) -> Result<X509Svid, Status> {
    let ttl = entry.x509_svid_ttl.unwrap_or(default_ttl).min(max_ttl);
    let svid = authority
        .sign_leaf(csr.public_key(), &entry.spiffe_id, &entry.dns_names, ttl)
        .map_err(|e| internal("signing an X509-SVID", e))?;
    Ok(X509Svid {
        entry_id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
        expires_at: clock::to_unix(svid.not_after),
    })
}

/// Applies `f` to every item on the blocking pool, in as many chunks as
/// there are cores, and returns the results in order.
async fn parallel<T, R, F>(items: Vec<T>, f: F) -> Result<Vec<R>, Status>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
{
    let workers = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let chunk_len = items.len().div_ceil(workers).max(1);
    let total = items.len();
    let f = Arc::new(f);
    let mut items = items.into_iter();
    let mut tasks = Vec::with_capacity(workers);
    loop {
        let chunk: Vec<T> = items.by_ref().take(chunk_len).collect();
        if chunk.is_empty() {
            break;
        }
        let f = Arc::clone(&f);
        tasks.push(tokio::task::spawn_blocking(move || {
            chunk.into_iter().map(|item| f(item)).collect::<Vec<R>>()
        }));
    }
    let mut out = Vec::with_capacity(total);
    for task in tasks {
        out.extend(
            task.await
                .map_err(|e| internal("a signing worker failed", e))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use sigil::TrustDomain;
    use sigil::proto::sigil::types::v1 as pb;

    use super::*;

    fn entry() -> Entry {
        let td = TrustDomain::new("example.org").unwrap();
        Entry::from_proto(
            &pb::Entry {
                id: "e1".into(),
                spiffe_id: "spiffe://example.org/web".into(),
                parent_id: "spiffe://example.org/agent".into(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1".into(),
                }],
                ..Default::default()
            },
            &td,
        )
        .unwrap()
    }

    fn csr(id: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let id: Option<SpiffeId> = id.map(|s| s.parse().unwrap());
        sigil::x509::build_csr(&key, id.as_ref()).unwrap()
    }

    #[test]
    fn a_csr_for_the_entry_passes() {
        let csr = check_csr(0, &entry(), &csr(Some("spiffe://example.org/web"))).unwrap();
        assert_eq!(
            csr.spiffe_id().unwrap().as_str(),
            "spiffe://example.org/web"
        );
    }

    #[test]
    fn csr_problems_name_the_item() {
        let cases = [
            (
                csr(Some("spiffe://example.org/x")),
                "params[2].csr: URI SAN spiffe://example.org/x does not match entry spiffe://example.org/web",
            ),
            (
                csr(None),
                "params[2].csr: has no URI SAN; it must be the entry's SPIFFE ID spiffe://example.org/web",
            ),
            (
                b"garbage".to_vec(),
                "params[2].csr: is malformed or its signature does not verify",
            ),
            (Vec::new(), "params[2].csr: is required"),
        ];
        for (der, message) in cases {
            let status = check_csr(2, &entry(), &der).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn a_csr_with_a_broken_signature_is_refused() {
        let mut der = csr(Some("spiffe://example.org/web"));
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let status = check_csr(0, &entry(), &der).unwrap_err();
        assert_eq!(
            status.message(),
            "params[0].csr: is malformed or its signature does not verify"
        );
    }

    #[tokio::test]
    async fn parallel_keeps_the_order() {
        let items: Vec<usize> = (0..101).collect();
        let out = parallel(items.clone(), |x| x * 2).await.unwrap();
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
    }
}
