//! A Workload API client over the agent's Unix socket.

use std::path::Path;

use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::api::SECURITY_HEADER;

/// A client that adds the security header to every call.
pub(crate) type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, AddSecurityHeader>>;

/// Adds `workload.spiffe.io: true` to every call, as SPIFFE clients do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddSecurityHeader;

impl Interceptor for AddSecurityHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// Connects to the Workload API at `path`.
pub(crate) async fn connect(path: &Path) -> Result<Client, tonic::transport::Error> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        sigil::transport::unix_channel(path).await?,
        AddSecurityHeader,
    ))
}
