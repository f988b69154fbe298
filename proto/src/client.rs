//! The worker's side of the connection: [`connect`] returns a generated client
//! with the job token and the message size limits in place.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::auth::BearerToken;
use crate::v1::coordinator_client::CoordinatorClient;
use crate::MAX_MESSAGE_BYTES;

/// A coordinator client that sends the job token with every request.
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not a valid URI.
    #[error("bad coordinator address {addr:?}: {source}")]
    Address {
        /// The address as given.
        addr: String,
        /// The parse error.
        source: tonic::transport::Error,
    },
    /// The token cannot be sent.
    #[error("bad job token: {0}")]
    Token(String),
    /// No connection could be made.
    #[error("cannot connect to the coordinator at {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
}

/// TLS settings of a worker's connection.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM of the CA (or the coordinator's self-signed certificate) to trust.
    pub ca_pem: Vec<u8>,
    /// Name to check the certificate against (default: the address's host).
    pub domain: Option<String>,
}

/// Connects to the coordinator at `addr` (`host:port` or `http://host:port`),
/// authenticating with `token`. Requests and replies larger than
/// [`MAX_MESSAGE_BYTES`] are refused (`OutOfRange`).
pub async fn connect(addr: &str, token: &str) -> Result<Client, ConnectError> {
    connect_with(addr, token, None).await
}

/// [`connect`], over TLS when `tls` is given (then `host:port` means `https://`).
pub async fn connect_with(
    addr: &str,
    token: &str,
    tls: Option<&ClientTls>,
) -> Result<Client, ConnectError> {
    let interceptor =
        BearerToken::new(token).map_err(|s| ConnectError::Token(s.message().into()))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|source| ConnectError::Address {
            addr: addr.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let endpoint = match tls {
        Some(t) => {
            let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca_pem));
            if let Some(d) = &t.domain {
                cfg = cfg.domain_name(d.clone());
            }
            endpoint
                .tls_config(cfg)
                .map_err(|source| ConnectError::Connect {
                    addr: addr.into(),
                    source,
                })?
        }
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ConnectError::Connect {
            addr: addr.into(),
            source,
        })?;
    Ok(with_limits(CoordinatorClient::with_interceptor(
        channel,
        interceptor,
    )))
}

/// Applies the [`MAX_MESSAGE_BYTES`] limits to a client.
pub fn with_limits<T>(client: CoordinatorClient<T>) -> CoordinatorClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    client
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
