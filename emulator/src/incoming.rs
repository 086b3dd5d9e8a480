//! A request as an upstream room receives it: method, URI and headers, and
//! the body read frame by frame, counted and hashed as it arrives so that a
//! test can prove which bytes crossed the proxy. Only what the room needs of
//! the body is kept: all of a JSON request, the first bytes of an upload.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::json_response;

/// The largest request body the data planes accept (64 MiB): larger than
/// any upload the filter's tests send (Azure OpenAI takes 25 MiB audio).
pub const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// How much of a body a room keeps once it is hashed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keep {
    /// All of it (JSON requests, which the room reads).
    All,
    /// At most the first this many bytes (multipart uploads: the form
    /// fields that precede the file).
    Head(usize),
}

/// One request, its body hashed.
pub(crate) struct Incoming {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    /// What was kept of the body (see [`Keep`]).
    pub(crate) body: Vec<u8>,
    pub(crate) body_len: usize,
    /// Lower-case hex SHA-256 of the whole body as received.
    pub(crate) body_sha256: String,
}

impl Incoming {
    /// Read `request` to its end, keeping what `keep` says; a body larger
    /// than [`BODY_LIMIT`] is answered with 413 and goes unrecorded.
    pub(crate) async fn read(request: Request, keep: Keep) -> Result<Incoming, Response> {
        let (parts, body) = request.into_parts();
        let (body, body_len, body_sha256) = hash_body(body, keep).await?;
        Ok(Incoming {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
            body_len,
            body_sha256,
        })
    }

    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub(crate) fn host(&self) -> &str {
        self.headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Whether the client asked to switch to the WebSocket protocol.
    pub(crate) fn asks_websocket(&self) -> bool {
        asks_websocket(&self.headers)
    }
}

/// `Upgrade: websocket` with `Connection: upgrade` (RFC 6455 §4.1), in any case.
pub(crate) fn asks_websocket(headers: &HeaderMap) -> bool {
    let has = |name: &str, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has("upgrade", "websocket") && has("connection", "upgrade")
}

async fn hash_body(body: Body, keep: Keep) -> Result<(Vec<u8>, usize, String), Response> {
    let mut frames = body.into_data_stream();
    let mut hasher = Sha256::new();
    let mut kept = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| {
            json_response(
                400,
                json!({"error": {"code": "BadRequest", "message": format!("The request body could not be read: {e}")}}),
            )
        })?;
        len = len.saturating_add(frame.len());
        if len > BODY_LIMIT {
            return Err(json_response(
                413,
                json!({"error": {"code": "RequestEntityTooLarge", "message": format!("The request body is larger than {BODY_LIMIT} bytes.")}}),
            ));
        }
        hasher.update(&frame);
        let room = match keep {
            Keep::All => frame.len(),
            Keep::Head(limit) => limit.saturating_sub(kept.len()).min(frame.len()),
        };
        kept.extend_from_slice(frame.get(..room).unwrap_or_default());
    }
    Ok((kept, len, hex(&hasher.finalize())))
}

/// Lower-case hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_body_hashes_to_the_sha256_of_nothing() {
        let (kept, len, sha) = hash_body(Body::empty(), Keep::All).await.unwrap();
        assert!(kept.is_empty());
        assert_eq!(len, 0);
        assert_eq!(
            sha,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn a_head_keeps_only_its_first_bytes_but_hashes_them_all() {
        let (kept, len, sha) = hash_body(Body::from("abcdef"), Keep::Head(2))
            .await
            .unwrap();
        assert_eq!(kept, b"ab");
        assert_eq!(len, 6);
        assert_eq!(sha, hex(&Sha256::digest(b"abcdef")));
    }

    #[test]
    fn an_upgrade_needs_both_the_upgrade_and_the_connection_token() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", "WebSocket".parse().unwrap());
        assert!(!asks_websocket(&headers));
        headers.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        assert!(asks_websocket(&headers));
    }
}
