//! One HTTP/1.1 `GET` over an already open connection, for the APIs
//! attestors ask (the Docker engine on its Unix socket, the kubelet over
//! TLS).

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request could not be built (a path with invalid characters).
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The HTTP exchange failed.
    #[error("{0}")]
    Exchange(#[from] hyper::Error),
    /// The body could not be read, or is larger than allowed.
    #[error("cannot read the response body: {0}")]
    Body(String),
}

/// A response: its status and its whole body.
#[derive(Debug)]
pub(crate) struct Response {
    /// The status.
    pub(crate) status: StatusCode,
    /// The body.
    pub(crate) body: Bytes,
}

/// Sends `GET <path>` with the `Host` header `host` (and, when given, the
/// `Authorization` header `authorization`, marked sensitive) on `io` and
/// reads the response, refusing bodies over `max_body` bytes.
pub(crate) async fn get<S>(
    io: S,
    host: &str,
    path: &str,
    authorization: Option<&str>,
    max_body: usize,
) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The connection ends when the sender and the response are dropped.
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    });
    let mut builder = Request::get(path).header(hyper::header::HOST, host);
    if let Some(authorization) = authorization {
        let mut value = hyper::header::HeaderValue::from_str(authorization)
            .map_err(hyper::http::Error::from)?;
        value.set_sensitive(true);
        builder = builder.header(hyper::header::AUTHORIZATION, value);
    }
    let request = builder.body(Empty::<Bytes>::new())?;
    let result = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| HttpError::Body(e.to_string()))?
            .to_bytes();
        Ok(Response { status, body })
    }
    .await;
    drop(sender);
    if result.is_err() {
        driver.abort();
    }
    result
}
