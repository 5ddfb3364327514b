//! An etcd v3 client over etcd's JSON gateway (`/v3/...`, part of every
//! etcd server since 3.4): leases, keys, transactions, watches and the
//! election service. Over HTTP/1 with hyper, so building portshift needs
//! no protobuf compiler and no gRPC stack; see ARCHITECTURE.md.
//!
//! Keys and values travel base64-encoded and 64-bit numbers as strings,
//! as the gateway's protobuf JSON mapping has them. Every call but a
//! campaign and a watch (which wait by design) has a deadline; a call that
//! fails on one endpoint is tried on the next.

mod watch;

pub use watch::{Event, Watch};

use crate::http_client::{HttpClient, HttpError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// Deadline of a unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoint}: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: HttpError,
    },
    #[error("etcd answered without the field `{0}`")]
    Missing(&'static str),
}

/// A key, its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What a won campaign gives: the key that holds the leadership (it lives
/// as long as the lease) and its creation revision, which every fenced
/// write compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: String,
    pub key: String,
    pub rev: i64,
    pub lease: i64,
}

#[derive(Clone, Debug)]
pub struct Etcd {
    endpoints: Arc<[String]>,
    /// The endpoint that answered last: tried first.
    current: Arc<AtomicUsize>,
    http: HttpClient,
}

pub fn b64(s: impl AsRef<[u8]>) -> String {
    B64.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

/// A 64-bit number as the gateway writes it (a string), or a plain one;
/// absent (protobuf's default) is 0.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv(v: &Value) -> Kv {
    Kv {
        key: String::from_utf8_lossy(&unb64(&v["key"])).into_owned(),
        value: unb64(&v["value"]),
        create_revision: int(&v["create_revision"]),
        mod_revision: int(&v["mod_revision"]),
        lease: int(&v["lease"]),
    }
}

/// The end of a prefix range: the prefix with its last byte incremented.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// `endpoints` as `host:port`.
    pub fn new(endpoints: &[String]) -> Self {
        Etcd {
            endpoints: endpoints.iter().cloned().collect(),
            current: Arc::new(AtomicUsize::new(0)),
            http: HttpClient::default(),
        }
    }

    /// One gateway call with a deadline (`None`: wait as long as etcd
    /// does), on each endpoint in turn from the last that answered.
    async fn call(
        &self,
        path: &str,
        body: Value,
        timeout: Option<Duration>,
    ) -> Result<Value, EtcdError> {
        let t = timeout.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let body = &body;
        self.failover(|endpoint| {
            let url = format!("http://{endpoint}{path}");
            async move {
                match self
                    .http
                    .json(Method::POST, &url, Some(body), None, t)
                    .await
                {
                    Ok(v) => Ok(v),
                    // etcd answered: another endpoint would answer the same.
                    Err(source @ HttpError::Status { .. }) => Err(Failover::Final(source)),
                    Err(source) => Err(Failover::Next(source)),
                }
            }
        })
        .await
    }

    /// Tries the endpoints in turn, from the one that answered last, until
    /// one gives a result or a final answer; remembers the one that did.
    async fn failover<T, F: Future<Output = Result<T, Failover>>>(
        &self,
        mut attempt: impl FnMut(&str) -> F,
    ) -> Result<T, EtcdError> {
        let n = self.endpoints.len();
        let start = self.current.load(Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            let endpoint = &self.endpoints[at];
            let failed = |source| EtcdError::Http {
                endpoint: endpoint.clone(),
                source,
            };
            match attempt(endpoint).await {
                Ok(v) => {
                    self.current.store(at, Relaxed);
                    return Ok(v);
                }
                Err(Failover::Final(source)) => return Err(failed(source)),
                Err(Failover::Next(source)) => last = Some(failed(source)),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/lease/grant",
                json!({ "TTL": ttl.as_secs() }),
                Some(CALL_TIMEOUT),
            )
            .await?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Missing("ID")),
            id => Ok(id),
        }
    }

    /// Renews the lease; the TTL left, 0 when it had expired.
    pub async fn keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/lease/keepalive",
                json!({ "ID": lease.to_string() }),
                Some(CALL_TIMEOUT),
            )
            .await?;
        Ok(int(&v["result"]["TTL"]))
    }

    /// Ends the lease now: every key on it goes at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/lease/revoke",
            json!({ "ID": lease.to_string() }),
            Some(CALL_TIMEOUT),
        )
        .await
        .map(drop)
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64, EtcdError> {
        let mut body = json!({ "key": b64(key), "value": b64(value) });
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        let v = self.call("/v3/kv/put", body, Some(CALL_TIMEOUT)).await?;
        Ok(int(&v["header"]["revision"]))
    }

    /// Every key under `prefix`, with the store's revision at the read.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>), EtcdError> {
        let body = json!({ "key": b64(prefix), "range_end": b64(prefix_end(prefix)) });
        let v = self.call("/v3/kv/range", body, Some(CALL_TIMEOUT)).await?;
        let kvs = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(kv).collect())
            .unwrap_or_default();
        Ok((int(&v["header"]["revision"]), kvs))
    }

    /// Campaigns for the election `name` with `value`; waits until this
    /// lease's candidate leads (or the call fails).
    pub async fn campaign(
        &self,
        name: &str,
        lease: i64,
        value: &[u8],
    ) -> Result<LeaderKey, EtcdError> {
        let body = json!({ "name": b64(name), "lease": lease.to_string(), "value": b64(value) });
        let v = self.call("/v3/election/campaign", body, None).await?;
        let l = &v["leader"];
        if l.is_null() {
            return Err(EtcdError::Missing("leader"));
        }
        Ok(LeaderKey {
            name: name.to_owned(),
            key: String::from_utf8_lossy(&unb64(&l["key"])).into_owned(),
            rev: int(&l["rev"]),
            lease: int(&l["lease"]),
        })
    }

    /// The election's current leader key and value, if any.
    pub async fn leader(&self, name: &str) -> Result<Option<Kv>, EtcdError> {
        match self
            .call(
                "/v3/election/leader",
                json!({ "name": b64(name) }),
                Some(CALL_TIMEOUT),
            )
            .await
        {
            Ok(v) => Ok((!v["kv"].is_null()).then(|| kv(&v["kv"]))),
            // No leader: the gateway answers with an error status.
            Err(EtcdError::Http {
                source: HttpError::Status { body, .. },
                ..
            }) if body.contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `key` only while `leader` still holds the leadership: the
    /// transaction compares the leader key's creation revision, so a leader
    /// that stalled past its lease and came back finds the compare false
    /// and writes nothing. `Ok(Some(revision))` of the write, `Ok(None)`:
    /// not the leader any more.
    pub async fn put_if_leader(
        &self,
        leader: &LeaderKey,
        key: &str,
        value: &[u8],
    ) -> Result<Option<i64>, EtcdError> {
        let body = json!({
            "compare": [{
                "key": b64(&leader.key),
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": leader.rev.to_string(),
            }],
            "success": [{ "request_put": { "key": b64(key), "value": b64(value) } }],
        });
        let v = self.call("/v3/kv/txn", body, Some(CALL_TIMEOUT)).await?;
        Ok(v["succeeded"]
            .as_bool()
            .unwrap_or(false)
            .then(|| int(&v["header"]["revision"])))
    }

    /// Watches every key under `prefix` from revision `from`.
    pub async fn watch_prefix(&self, prefix: &str, from: i64) -> Result<Watch, EtcdError> {
        let body = json!({ "create_request": {
            "key": b64(prefix),
            "range_end": b64(prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let body = &body;
        self.failover(|endpoint| {
            let url = format!("http://{endpoint}/v3/watch");
            async move {
                match self
                    .http
                    .send(Method::POST, &url, Some(body), None, Some(CALL_TIMEOUT))
                    .await
                {
                    Ok(resp) if resp.status().is_success() => Ok(Watch::new(resp.into_body())),
                    Ok(resp) => Err(Failover::Next(HttpError::Status {
                        status: resp.status(),
                        body: String::new(),
                    })),
                    Err(source) => Err(Failover::Next(source)),
                }
            }
        })
        .await
    }
}

/// How one endpoint's attempt failed: `Final` when etcd itself answered
/// (another endpoint would say the same), `Next` when this endpoint could
/// not be reached or used.
enum Failover {
    Final(HttpError),
    Next(HttpError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
    }
}
