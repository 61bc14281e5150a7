//! A Workload API client over the agent's Unix socket.

use std::io;
use std::path::Path;

use hyper_util::rt::TokioIo;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
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

/// Opens an HTTP/2 channel to the socket at `path`. The authority is a
/// placeholder: the server accepts any.
pub(crate) async fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// Connects to the Workload API at `path`.
pub(crate) async fn connect(path: &Path) -> Result<Client, tonic::transport::Error> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel(path).await?,
        AddSecurityHeader,
    ))
}
