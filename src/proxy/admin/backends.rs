//! The runtime backend API, per routing unit and group:
//!
//! - `POST /routes/{listener}/groups/{group}/backends` `{"addr": "ip:port"
//!   or "host:port", "weight": N}`: add a backend (every address a name
//!   resolves to, once, at the call).
//! - `DELETE .../backends/{addr}`: remove it; its established connections
//!   finish.
//! - `PUT .../backends/{addr}` `{"weight": N}`: set its weight.
//! - `POST .../backends/{addr}/drain` and `.../undrain`.
//!
//! A route's unit is addressed `/routes/{listener}/{route}/groups/...`.
//! Each change is an override over the group's source, audited and shown
//! in `/status`; a call that cannot be applied changes nothing and says
//! why.

use super::{MAX_BODY_BYTES, audit, error, find, reply, unit_name};
use crate::config::MAX_BACKEND_WEIGHT;
use crate::proxy::ProxyHandle;
use crate::proxy::members::{Membership, Refused, Reshaped};
use crate::proxy::state::ListenerState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{post, put};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a name given to `POST .../backends` may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend API's routes, for a listener's own groups and a route's.
pub(super) fn routes(r: axum::Router<ProxyHandle>) -> axum::Router<ProxyHandle> {
    r.route("/routes/{listener}/groups/{group}/backends", post(add))
        .route(
            "/routes/{listener}/groups/{group}/backends/{addr}",
            put(weight).delete(remove),
        )
        .route(
            "/routes/{listener}/groups/{group}/backends/{addr}/{verb}",
            post(drain),
        )
        .route(
            "/routes/{listener}/{route}/groups/{group}/backends",
            post(route_add),
        )
        .route(
            "/routes/{listener}/{route}/groups/{group}/backends/{addr}",
            put(route_weight).delete(route_remove),
        )
        .route(
            "/routes/{listener}/{route}/groups/{group}/backends/{addr}/{verb}",
            post(route_drain),
        )
}

/// A call's target: the unit's name, the group's, and the backend's
/// address as written in the path (if the call names one).
struct Target {
    unit: String,
    group: String,
    addr: Option<String>,
    /// `drain` or `undrain`.
    verb: Option<&'static str>,
}

impl Target {
    fn new(unit: String, group: String, addr: Option<String>) -> Self {
        Target {
            unit,
            group,
            addr,
            verb: None,
        }
    }

    fn path(&self) -> String {
        let mut p = format!("/routes/{}/groups/{}/backends", self.unit, self.group);
        for part in [self.addr.as_deref(), self.verb].into_iter().flatten() {
            p.push('/');
            p.push_str(part);
        }
        p
    }
}

type Refusal = (StatusCode, String);

/// The unit and the index of its group, or why not.
fn locate(h: &ProxyHandle, t: &Target) -> Result<(Arc<ListenerState>, usize), Refusal> {
    let state = find(h, &t.unit).map_err(|m| (StatusCode::NOT_FOUND, m))?;
    let names = state.group_names();
    match names.iter().position(|g| *g == t.group) {
        Some(i) => Ok((state, i)),
        None => Err((
            StatusCode::NOT_FOUND,
            format!(
                "no group `{}` in `{}`; its groups: {}",
                t.group,
                t.unit,
                names.join(", ")
            ),
        )),
    }
}

/// The address of a backend named in a path.
fn parse_addr(s: &str) -> Result<SocketAddr, Refusal> {
    s.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!(
                "`{s}` is not a backend address; write ip:port, e.g. 10.0.0.5:8080 or [::1]:8080"
            ),
        )
    })
}

/// A JSON object body, or why not.
fn json_body(body: Result<Bytes, BytesRejection>, example: &str) -> Result<Value, Refusal> {
    let bytes = body.map_err(|r| {
        (
            r.status(),
            format!(
                "{}; a body is at most {MAX_BODY_BYTES} bytes",
                r.body_text()
            ),
        )
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err((
            StatusCode::BAD_REQUEST,
            format!("the body must be a JSON object, e.g. {example}"),
        )),
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {e}; send e.g. {example}"),
        )),
    }
}

/// The body's `weight` (`default` when absent), checked.
fn weight_of(v: &Value, default: Option<u32>) -> Result<u32, Refusal> {
    let bad = || {
        (
            StatusCode::BAD_REQUEST,
            format!("`weight` must be a whole number from 0 to {MAX_BACKEND_WEIGHT}"),
        )
    };
    match v.get("weight") {
        None => default.ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                "the body needs a `weight`, e.g. {\"weight\": 3}".to_owned(),
            )
        }),
        Some(w) => match w.as_u64() {
            Some(n) if n <= u64::from(MAX_BACKEND_WEIGHT) => Ok(n as u32),
            _ => Err(bad()),
        },
    }
}

/// The addresses of `addr` (an ip:port, or a host:port resolved now).
async fn resolve(addr: &str) -> Result<Vec<SocketAddr>, Refusal> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    if addr
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(bad(format!(
            "`{addr}` is not ip:port nor host:port, e.g. 10.0.0.5:8080 or db.internal:5432"
        )));
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(addr)).await {
        Ok(Ok(found)) => {
            let mut all: Vec<SocketAddr> = found.collect();
            all.dedup();
            if all.is_empty() {
                return Err(bad(format!("`{addr}` resolves to no address")));
            }
            Ok(all)
        }
        Ok(Err(e)) => Err(bad(format!("cannot resolve `{addr}`: {e}"))),
        Err(_) => Err(bad(format!(
            "resolving `{addr}` took longer than {}s",
            RESOLVE_TIMEOUT.as_secs()
        ))),
    }
}

/// Applies `change` to the target's group (through the fleet's store in
/// fleet mode, so it holds on every member) and answers with the group's
/// backends after it; audits the call either way.
async fn apply(
    h: &ProxyHandle,
    (peer, method): (SocketAddr, &str),
    (t, body): (&Target, Value),
    change: impl FnOnce(&mut Membership) -> Result<(), Refused>,
) -> Response {
    let result = match locate(h, t) {
        Err((status, m)) => error(status, m),
        Ok((state, group)) => match commit(h, &state, group, change).await {
            Err((status, m)) => error(status, m),
            Ok(done) => {
                let mut v = json!({
                    "listener": state.name,
                    "group": t.group,
                    "changed": done.changed,
                    "backends": super::group_backends(&state, group),
                    "overrides": state.membership(group).overrides_json(),
                    "fleet": h.fleet().is_some(),
                });
                if done.none_takes_new {
                    v["warning"] = json!(
                        "no backend of this group takes new connections now; its share of traffic goes to the other groups or is refused"
                    );
                }
                reply(StatusCode::OK, v)
            }
        },
    };
    audit(h, peer, &format!("{method} {}", t.path()), body, &result);
    result
}

/// Checks the change, then applies it here, or writes it to the fleet's
/// store (every member, this one included, applies it from there).
async fn commit(
    h: &ProxyHandle,
    state: &Arc<ListenerState>,
    group: usize,
    change: impl FnOnce(&mut Membership) -> Result<(), Refused>,
) -> Result<Reshaped, Refusal> {
    let refused = |why: Refused| (refusal_status(&why), why.to_string());
    let next = state.plan_change(group, change).map_err(refused)?;
    let Some(f) = h.fleet() else {
        // The overrides only: the source may have moved since (discovery).
        let apply = |m: &mut Membership| {
            m.overrides = next.overrides;
            Ok(())
        };
        return state.reshape(group, "admin API", apply).map_err(refused);
    };
    let before = state.router.table().groups[group].backends().to_vec();
    let name = state.group_names().swap_remove(group);
    f.steer(state, |c| {
        if next.overrides.is_empty() {
            c.backends.remove(&name);
        } else {
            c.backends.insert(name, next.overrides.clone());
        }
    })
    .await
    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(state.since(group, &before))
}

fn refusal_status(r: &Refused) -> StatusCode {
    match r {
        Refused::NotMember(_) => StatusCode::NOT_FOUND,
        Refused::AlreadyMember(_) | Refused::Membership(_) => StatusCode::CONFLICT,
    }
}

/// A refusal before any change was tried, audited.
fn refuse(h: &ProxyHandle, peer: SocketAddr, call: String, body: Value, r: Refusal) -> Response {
    let result = error(r.0, r.1);
    audit(h, peer, &call, body, &result);
    result
}

async fn add_to(
    h: ProxyHandle,
    peer: SocketAddr,
    t: Target,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let call = format!("POST {}", t.path());
    let example = r#"{"addr": "10.0.0.5:8080", "weight": 1}"#;
    let v = match json_body(body, example) {
        Ok(v) => v,
        Err(r) => return refuse(&h, peer, call, Value::Null, r),
    };
    let Some(addr) = v.get("addr").and_then(Value::as_str) else {
        let r = (
            StatusCode::BAD_REQUEST,
            format!("the body needs an `addr`, e.g. {example}"),
        );
        return refuse(&h, peer, call, v, r);
    };
    let weight = match weight_of(&v, Some(1)) {
        Ok(w) => w,
        Err(r) => return refuse(&h, peer, call, v, r),
    };
    let addrs = match resolve(addr).await {
        Ok(a) => a,
        Err(r) => return refuse(&h, peer, call, v, r),
    };
    apply(&h, (peer, "POST"), (&t, v), |m| {
        addrs.iter().try_for_each(|&a| m.add(a, weight))
    })
    .await
}

/// A change to one named backend: `change` gets its address.
async fn change_one(
    h: ProxyHandle,
    (peer, method): (SocketAddr, &str),
    t: Target,
    body: Value,
    change: impl FnOnce(&mut Membership, SocketAddr) -> Result<(), Refused>,
) -> Response {
    let call = format!("{method} {}", t.path());
    let addr = match parse_addr(t.addr.as_deref().unwrap_or_default()) {
        Ok(a) => a,
        Err(r) => return refuse(&h, peer, call, body, r),
    };
    apply(&h, (peer, method), (&t, body), |m| change(m, addr)).await
}

async fn remove_one(h: ProxyHandle, peer: SocketAddr, t: Target) -> Response {
    change_one(h, (peer, "DELETE"), t, Value::Null, Membership::remove).await
}

async fn weigh_one(
    h: ProxyHandle,
    peer: SocketAddr,
    t: Target,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let call = format!("PUT {}", t.path());
    let v = match json_body(body, r#"{"weight": 3}"#) {
        Ok(v) => v,
        Err(r) => return refuse(&h, peer, call, Value::Null, r),
    };
    let w = match weight_of(&v, None) {
        Ok(w) => w,
        Err(r) => return refuse(&h, peer, call, v, r),
    };
    change_one(h, (peer, "PUT"), t, v, move |m, a| m.set_weight(a, w)).await
}

async fn drain_one(h: ProxyHandle, peer: SocketAddr, mut t: Target, verb: String) -> Response {
    let draining = match verb.as_str() {
        "drain" => true,
        "undrain" => false,
        other => {
            let call = format!("POST {}/{other}", t.path());
            let r = (
                StatusCode::NOT_FOUND,
                format!("no such endpoint: POST .../{other}; use drain or undrain"),
            );
            return refuse(&h, peer, call, Value::Null, r);
        }
    };
    t.verb = Some(if draining { "drain" } else { "undrain" });
    change_one(h, (peer, "POST"), t, Value::Null, move |m, a| {
        m.set_draining(a, draining)
    })
    .await
}

// The handlers, for a listener's groups and a route's.

async fn add(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((unit, group)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    add_to(h, peer, Target::new(unit, group, None), body).await
}

async fn route_add(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((l, r, group)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let unit = unit_name((l, r));
    add_to(h, peer, Target::new(unit, group, None), body).await
}

async fn remove(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((unit, group, addr)): Path<(String, String, String)>,
) -> Response {
    remove_one(h, peer, Target::new(unit, group, Some(addr))).await
}

async fn route_remove(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((l, r, group, addr)): Path<(String, String, String, String)>,
) -> Response {
    let unit = unit_name((l, r));
    remove_one(h, peer, Target::new(unit, group, Some(addr))).await
}

async fn weight(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((unit, group, addr)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    weigh_one(h, peer, Target::new(unit, group, Some(addr)), body).await
}

async fn route_weight(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((l, r, group, addr)): Path<(String, String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let unit = unit_name((l, r));
    weigh_one(h, peer, Target::new(unit, group, Some(addr)), body).await
}

async fn drain(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((unit, group, addr, verb)): Path<(String, String, String, String)>,
) -> Response {
    drain_one(h, peer, Target::new(unit, group, Some(addr)), verb).await
}

async fn route_drain(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((l, r, group, addr, verb)): Path<(String, String, String, String, String)>,
) -> Response {
    let unit = unit_name((l, r));
    drain_one(h, peer, Target::new(unit, group, Some(addr)), verb).await
}
