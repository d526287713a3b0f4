//! One HTTP connection's request handle, one exchange, and what came back.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};

/// An answer not complete by then is a transport error (kind `timeout`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Statuses that carry an admission decision: admitted (200) or denied (403).
pub const SERVED: [u16; 2] = [200, 403];

/// One HTTP connection's request handle.
#[derive(Debug)]
pub enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// An answer: its status and, for a decision, its `verdict`.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub verdict: Option<String>,
    pub body: Bytes,
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends and reads the whole answer (reading it frees the connection for the next).
    pub async fn exchange(&mut self, req: Request<Full<Bytes>>) -> Result<Answer, Failure> {
        let exchange = async {
            let resp = match self {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
            };
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => Err(Failure::new(
                "timeout",
                format!("no answer within {REQUEST_TIMEOUT:?}"),
            )),
            Ok(Err(e)) => Err(Failure::new("request", e.to_string())),
            Ok(Ok((status, body))) => Ok(Answer {
                status,
                verdict: SERVED.contains(&status).then(|| verdict(&body)).flatten(),
                body,
            }),
        }
    }
}

/// The decision's `verdict` field, if the body is a JSON object with one.
pub(crate) fn verdict(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Decision {
        verdict: Option<String>,
    }
    serde_json::from_slice::<Decision>(body).ok()?.verdict
}

/// A transport-level failure: its kind (`connect`, `request`, `timeout`, `task`) and
/// what happened.
#[derive(Debug)]
pub struct Failure {
    pub kind: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(kind: &'static str, message: String) -> Failure {
        Failure { kind, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_verdict_is_read_from_the_body() {
        assert_eq!(
            verdict(br#"{"capsule":"x","verdict":"admit","reason":null}"#).as_deref(),
            Some("admit")
        );
        assert_eq!(verdict(br#"{"error":"x"}"#), None);
        assert_eq!(verdict(b"not json"), None);
    }
}
