//! A small HTTP/1 client for JSON calls: etcd's gateway and fleet members'
//! admin APIs. hyper's pooled client under a per-call deadline; bodies are
//! read whole up to a cap, or as a stream of JSON values (etcd's watch).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

/// Largest whole body read: a window of a listener with a few groups is a
/// few KiB, a range over a fleet's keys some more.
const MAX_BODY: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("the answer is not the JSON expected: {0}")]
    Body(String),
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        HttpClient {
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }
}

impl HttpClient {
    /// Sends a request and waits for the response head within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        bearer: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<hyper::Response<Incoming>, HttpError> {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(t) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| HttpError::Transport(e.to_string()))?;
        let call = self.inner.request(req);
        let resp = match timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .map_err(|_| HttpError::Timeout(t))?,
            None => call.await,
        };
        resp.map_err(|e| HttpError::Transport(transport_message(&e)))
    }

    /// One JSON call, answer read whole, all within `timeout`; a status
    /// other than 2xx is an error carrying the body.
    pub async fn json(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, HttpError> {
        let call = async {
            let resp = self.send(method, url, body, bearer, None).await?;
            let status = resp.status();
            let bytes = read_body(resp.into_body()).await?;
            if !status.is_success() {
                let body = String::from_utf8_lossy(&bytes).chars().take(500).collect();
                return Err(HttpError::Status { status, body });
            }
            serde_json::from_slice(&bytes).map_err(|e| HttpError::Body(e.to_string()))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }
}

async fn read_body(mut body: Incoming) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| HttpError::Transport(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > MAX_BODY {
                return Err(HttpError::Body(format!("larger than {MAX_BODY} bytes")));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

/// hyper-util's error says "client error (Connect)"; the cause says what.
fn transport_message(e: &hyper_util::client::legacy::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// A stream of JSON values in one response body (etcd's watch answers with
/// one JSON object per event batch, for as long as the call stays open).
pub struct JsonStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl JsonStream {
    pub fn new(body: Incoming) -> Self {
        JsonStream {
            body,
            buf: Vec::new(),
        }
    }

    /// The next value; `None` when the body ended.
    pub async fn next(&mut self) -> Option<Result<Value, HttpError>> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    return Some(Ok(v));
                }
                Some(Err(e)) if !e.is_eof() => return Some(Err(HttpError::Body(e.to_string()))),
                _ => {}
            }
            if self.buf.len() > MAX_BODY {
                return Some(Err(HttpError::Body("a value larger than the cap".into())));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                Err(e) => return Some(Err(HttpError::Transport(e.to_string()))),
            }
        }
    }
}
