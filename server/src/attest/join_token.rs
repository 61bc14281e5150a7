//! The `join_token` node attestor: a one-time secret an operator made with
//! `sigil-server token generate`, which grants the agent ID chosen then.

use sigil::Selectors;
use tonic::Status;

use super::Attested;
use crate::api::internal;
use crate::tokens::{JoinTokens, MAX_TOKEN_LEN, TokenError};

/// The attestor's name.
pub(crate) const NAME: &str = "join_token";

/// Checks the payload: a UTF-8 token of 1 to [`MAX_TOKEN_LEN`] bytes.
pub(crate) fn parse(payload: &[u8]) -> Result<&str, Status> {
    if payload.is_empty() {
        return Err(Status::invalid_argument(
            "params.data.payload: the join token is required",
        ));
    }
    if payload.len() > MAX_TOKEN_LEN {
        return Err(Status::invalid_argument(format!(
            "params.data.payload: a join token has at most {MAX_TOKEN_LEN} bytes"
        )));
    }
    std::str::from_utf8(payload)
        .map_err(|_| Status::invalid_argument("params.data.payload: the join token is not UTF-8"))
}

/// Consumes the token and returns the agent ID it grants.
pub(crate) async fn attest(tokens: &JoinTokens, payload: &[u8]) -> Result<Attested, Status> {
    let token = parse(payload)?;
    let record = tokens.consume(token).await.map_err(token_status)?;
    Ok(Attested {
        agent_id: record.agent_id,
        selectors: Selectors::new(),
        attestor: NAME,
        evidence: format!("token.id={}", record.token_id),
        used_token: None,
    })
}

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Invalid | TokenError::Expired => Status::permission_denied(e.to_string()),
        other => internal("consuming the join token", other),
    }
}
