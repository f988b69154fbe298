//! The job token, sent by workers as `authorization: Bearer <token>` and
//! checked by the coordinator, both through tonic interceptors.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key carrying the token.
pub const AUTHORIZATION: &str = "authorization";

/// Client side: adds the bearer token to every request.
#[derive(Clone)]
pub struct BearerToken {
    header: MetadataValue<Ascii>,
}

impl BearerToken {
    /// Fails when the token is empty or not a valid header value (printable ASCII).
    pub fn new(token: &str) -> Result<Self, Status> {
        if token.is_empty() {
            return Err(Status::invalid_argument("the job token is empty"));
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::invalid_argument("the job token must be printable ASCII"))?;
        Ok(Self { header })
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

/// Server side: rejects requests without the expected bearer token with
/// `Unauthenticated`. The comparison does not stop at the first differing byte.
#[derive(Clone)]
pub struct RequireToken {
    expected: Vec<u8>,
}

impl RequireToken {
    /// Accepts requests carrying `Bearer <token>`.
    pub fn new(token: &str) -> Self {
        Self {
            expected: format!("Bearer {token}").into_bytes(),
        }
    }
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireToken(<redacted>)")
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get(AUTHORIZATION) {
            None => Err(Status::unauthenticated(
                "missing job token (authorization header)",
            )),
            Some(got) if constant_time_eq(got.as_bytes(), &self.expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong job token")),
        }
    }
}

/// Equality whose running time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let mut client = BearerToken::new("s3cret").unwrap();
        let mut server = RequireToken::new("s3cret");
        let request = client.call(Request::new(())).unwrap();
        assert!(server.call(request).is_ok());

        let request = BearerToken::new("other")
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        let err = server.call(request).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        let err = server.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("missing"), "{}", err.message());
    }

    #[test]
    fn bad_tokens_and_redaction() {
        assert!(BearerToken::new("").is_err());
        assert!(BearerToken::new("a\nb").is_err());
        let t = BearerToken::new("s3cret").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(!format!("{:?}", RequireToken::new("s3cret")).contains("s3cret"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
