//! A watch: the events of one open `/v3/watch` call, as they come.

use super::{EtcdError, Kv, int, kv};
use crate::http_client::{HttpError, JsonStream};
use hyper::body::Incoming;

/// A change to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    /// The key was deleted (or its lease expired).
    Delete(Kv),
}

pub struct Watch {
    stream: JsonStream,
}

impl Watch {
    pub(super) fn new(body: Incoming) -> Self {
        Watch {
            stream: JsonStream::new(body),
        }
    }

    /// The next batch of events with the revision it brings the reader to;
    /// an error when the watch ended (etcd went away, or the revision was
    /// compacted): the caller reads the keys again and watches anew.
    pub async fn next(&mut self) -> Result<(i64, Vec<Event>), EtcdError> {
        loop {
            let v = match self.stream.next().await {
                Some(Ok(v)) => v,
                Some(Err(source)) => return Err(ended(source)),
                None => return Err(ended(HttpError::Transport("the watch closed".into()))),
            };
            if !v["error"].is_null() {
                return Err(ended(HttpError::Body(v["error"].to_string())));
            }
            let r = &v["result"];
            if r["canceled"].as_bool() == Some(true) || int(&r["compact_revision"]) > 0 {
                let why = r["cancel_reason"]
                    .as_str()
                    .unwrap_or("compacted")
                    .to_owned();
                return Err(ended(HttpError::Body(format!("watch canceled: {why}"))));
            }
            let Some(events) = r["events"].as_array() else {
                // The creation answer, or progress without events.
                continue;
            };
            let batch = events
                .iter()
                .map(|e| match e["type"].as_str() {
                    Some("DELETE") => Event::Delete(kv(&e["kv"])),
                    _ => Event::Put(kv(&e["kv"])),
                })
                .collect();
            return Ok((int(&r["header"]["revision"]), batch));
        }
    }
}

fn ended(source: HttpError) -> EtcdError {
    EtcdError::Http {
        endpoint: "watch".into(),
        source,
    }
}
