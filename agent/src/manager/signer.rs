//! Signing a batch of workload CSRs: the one thing the SVID manager needs
//! from the server, behind a trait so the scheduling can be tested alone.

use std::future::Future;

use rustls_pki_types::CertificateDer;
use std::sync::Arc;

use sigil::proto::sigil::agent::v1::{BatchNewX509SvidRequest, X509SvidParams};

use crate::client::{self, AgentChannel};

/// One CSR to sign, for one entry.
#[derive(Debug, Clone)]
pub(crate) struct CsrItem {
    /// The entry's ID.
    pub(crate) entry_id: String,
    /// A DER PKCS#10 CSR whose only URI SAN is the entry's SPIFFE ID.
    pub(crate) csr: Vec<u8>,
}

/// One signed SVID, as the server returned it (unchecked).
#[derive(Debug, Clone)]
pub(crate) struct IssuedItem {
    /// The entry's ID.
    pub(crate) entry_id: String,
    /// DER certificates, leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
}

/// A batch that was not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SignError(pub(crate) String);

/// Signs a batch of CSRs: all of them, in order, or none.
pub(crate) trait BatchSigner: Send + Sync + 'static {
    /// Signs `items`; the answer has one SVID per item, in the same order.
    fn sign(
        &self,
        items: Vec<CsrItem>,
    ) -> impl Future<Output = Result<Vec<IssuedItem>, SignError>> + Send;
}

/// Signs through `AgentApi/BatchNewX509Svid`.
#[derive(Debug, Clone)]
pub(crate) struct GrpcSigner {
    channel: Arc<AgentChannel>,
}

impl GrpcSigner {
    /// A signer calling the server through `channel`.
    pub(crate) fn new(channel: Arc<AgentChannel>) -> Self {
        Self { channel }
    }
}

impl BatchSigner for GrpcSigner {
    async fn sign(&self, items: Vec<CsrItem>) -> Result<Vec<IssuedItem>, SignError> {
        let mut api = self.channel.api();
        let params = items
            .into_iter()
            .map(|i| X509SvidParams {
                entry_id: i.entry_id,
                csr: i.csr,
            })
            .collect();
        let mut request = tonic::Request::new(BatchNewX509SvidRequest { params });
        request.set_timeout(client::CALL_TIMEOUT);
        let answer = api
            .batch_new_x509_svid(request)
            .await
            .map_err(|status| SignError(client::describe_status(&status)))?;
        Ok(answer
            .into_inner()
            .svids
            .into_iter()
            .map(|s| IssuedItem {
                entry_id: s.entry_id,
                chain: s.cert_chain.into_iter().map(CertificateDer::from).collect(),
            })
            .collect())
    }
}
