//! The admin HTTP API on `[admin] listen`:
//!
//! - `GET /metrics`: Prometheus text.
//! - `GET /status`: every listener's groups, backends, weights, policy
//!   state, windowed quantiles and latest decisions, as JSON.
//! - `PUT /routes/{listener}/weights` `{"primary": 50, "backup": 50}`: pin
//!   weights (percent per group), suspending the policy; `DELETE` releases.
//! - `POST /routes/{listener}/policy/pause` and `/resume`.
//! - `POST /reload`: as SIGHUP.
//! - `GET /fleet/window/{listener}?signal=exchange`: the listener's windows
//!   as a fleet leader merges them (HdrHistogram V2, base64).
//!
//! In fleet mode a pin, release, pause or resume is written to etcd first
//! and holds on every member; if etcd cannot take it, nothing changes and
//! the answer (503) says why.
//!
//! Errors are JSON `{"error": "..."}` with a 4xx status. With a token
//! configured every call needs `Authorization: Bearer TOKEN`. Every
//! mutating call is written to the audit log.

mod backends;
mod server;

use super::{ListenerState, ProxyHandle};
use crate::core::routes::{TOTAL_BP, Weights};
use crate::core::stats::{Signal, Snapshot};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Largest request body: a weights map is a few dozen bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Decisions shown per listener in `/status`.
const STATUS_DECISIONS: usize = 10;

pub async fn serve(listener: TcpListener, handle: ProxyHandle, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/routes/{listener}/weights", put(pin).delete(release))
        .route("/routes/{listener}/policy/pause", post(pause))
        .route("/routes/{listener}/policy/resume", post(resume))
        // A listener's route: `{listener}/{route}` (or one segment with
        // the slash written %2F).
        .route(
            "/routes/{listener}/{route}/weights",
            put(route_pin).delete(route_release),
        )
        .route("/routes/{listener}/{route}/policy/pause", post(route_pause))
        .route(
            "/routes/{listener}/{route}/policy/resume",
            post(route_resume),
        )
        .merge(backends::routes(Router::new()))
        .route("/reload", post(reload))
        .route("/fleet/window/{listener}", get(fleet_window))
        .route("/fleet/window/{listener}/{route}", get(route_fleet_window))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(handle.clone(), auth))
        .with_state(handle.clone());
    crate::telemetry::register_admin_rejections();
    server::serve(listener, app, move || handle.admin_limits(), stop).await;
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    reply(status, json!({ "error": message.into() }))
}

async fn auth(
    State(h): State<ProxyHandle>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = h.admin_token() {
        let given = bearer(&headers).unwrap_or("");
        if !token.matches(given.as_bytes()) {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string())
                .unwrap_or_default();
            unauthorized(&h, &peer, req.method(), req.uri().path());
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer TOKEN` header. The scheme is
/// matched without regard to case (RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A call without the right token: counted every time; logged and audited
/// at most once a second, so guessing is visible without letting a flood
/// fill the disk.
fn unauthorized(h: &ProxyHandle, peer: &str, method: &Method, path: &str) {
    crate::telemetry::admin_rejected("unauthorized");
    let Some(held) = h.log_unauthorized() else {
        return;
    };
    warn!(%peer, %method, path, not_logged = held, "admin call refused: missing or wrong bearer token (logged at most once a second)");
    h.audit(&json!({
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "actor": "admin-api",
        "peer": peer,
        "call": format!("{method} {path}"),
        "result": "unauthorized",
        "status": 401,
        "unauthorized_not_logged": held,
    }));
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render(),
    )
}

fn find(h: &ProxyHandle, name: &str) -> Result<Arc<ListenerState>, String> {
    h.listener(name).ok_or_else(|| {
        let known: Vec<String> = h.listeners().iter().map(|(s, _)| s.name.clone()).collect();
        format!("no listener `{name}`; known: {}", known.join(", "))
    })
}

/// Writes a mutating call to the audit log and the log.
fn audit(h: &ProxyHandle, peer: SocketAddr, call: &str, body: Value, result: &Response) {
    let ok = result.status().is_success();
    h.audit(&json!({
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "actor": "admin-api",
        "peer": peer.to_string(),
        "call": call,
        "body": body,
        "result": if ok { "ok" } else { "refused" },
        "status": result.status().as_u16(),
    }));
    info!(%peer, call, status = result.status().as_u16(), "admin call");
}

async fn pin(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Too large, or unreadable: the JSON error every other refusal gets.
        Err(rejection) => {
            let result = error(
                rejection.status(),
                format!(
                    "{}; a weights body is at most {MAX_BODY_BYTES} bytes",
                    rejection.body_text()
                ),
            );
            let call = format!("PUT /routes/{name}/weights");
            audit(&h, peer, &call, Value::Null, &result);
            return result;
        }
    };
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let result = match (&parsed, find(&h, &name)) {
        (_, Err(msg)) => error(StatusCode::NOT_FOUND, msg),
        (Err(e), _) => error(
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {e}; send e.g. {{\"primary\": 90, \"backup\": 10}}"),
        ),
        (Ok(_), Ok(_)) if let Some(key) = duplicate_key(&body) => error(
            StatusCode::BAD_REQUEST,
            format!("`{key}` appears more than once; give each group one percentage"),
        ),
        (Ok(v), Ok(state)) => match weights_from_percent(&state.group_names(), v) {
            Err(why) => error(StatusCode::BAD_REQUEST, why),
            Ok(w) => pin_weights(&h, &state, w).await,
        },
    };
    audit(
        &h,
        peer,
        &format!("PUT /routes/{name}/weights"),
        parsed.unwrap_or(Value::Null),
        &result,
    );
    result
}

/// A route's unit is named `{listener}/{route}`.
fn unit_name((listener, route): (String, String)) -> String {
    format!("{listener}/{route}")
}

async fn route_pin(
    h: State<ProxyHandle>,
    peer: ConnectInfo<SocketAddr>,
    Path(unit): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    pin(h, peer, Path(unit_name(unit)), body).await
}

async fn route_release(
    h: State<ProxyHandle>,
    peer: ConnectInfo<SocketAddr>,
    Path(unit): Path<(String, String)>,
) -> Response {
    release(h, peer, Path(unit_name(unit))).await
}

async fn route_pause(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(unit): Path<(String, String)>,
) -> Response {
    set_paused(h, peer, unit_name(unit), true).await
}

async fn route_resume(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(unit): Path<(String, String)>,
) -> Response {
    set_paused(h, peer, unit_name(unit), false).await
}

async fn route_fleet_window(
    h: State<ProxyHandle>,
    Path(unit): Path<(String, String)>,
    q: axum::extract::Query<HashMap<String, String>>,
) -> Response {
    fleet_window(h, Path(unit_name(unit)), q).await
}

/// Pins `w` on this instance, or through etcd on the whole fleet.
async fn pin_weights(h: &ProxyHandle, state: &Arc<ListenerState>, w: Weights) -> Response {
    let groups = state.group_names();
    let pinned = match h.fleet() {
        None => state
            .pin(w.clone())
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string())),
        Some(f) => f
            .steer(state, |c| c.pin_bp = Some(w.as_slice().to_vec()))
            .await
            .map(drop)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e)),
    };
    match pinned {
        Ok(()) => reply(
            StatusCode::OK,
            json!({ "listener": state.name, "pinned": percent_map(&groups, w.as_slice()), "policy": "suspended", "fleet": h.fleet().is_some() }),
        ),
        Err((status, e)) => error(status, e),
    }
}

async fn release(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
) -> Response {
    let result = match find(&h, &name) {
        Err(msg) => error(StatusCode::NOT_FOUND, msg),
        Ok(state) => {
            let was = state.pinned().is_some();
            let released = match h.fleet() {
                None => {
                    state.release();
                    Ok(())
                }
                Some(f) => f.steer(&state, |c| c.pin_bp = None).await.map(drop),
            };
            match released {
                Ok(()) => reply(
                    StatusCode::OK,
                    json!({ "listener": name, "released": was, "weights": percent_map(&state.group_names(), state.router.weights().as_slice()), "fleet": h.fleet().is_some() }),
                ),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
    };
    audit(
        &h,
        peer,
        &format!("DELETE /routes/{name}/weights"),
        Value::Null,
        &result,
    );
    result
}

async fn pause(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
) -> Response {
    set_paused(h, peer, name, true).await
}

async fn resume(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
) -> Response {
    set_paused(h, peer, name, false).await
}

async fn set_paused(h: ProxyHandle, peer: SocketAddr, name: String, paused: bool) -> Response {
    let result = match find(&h, &name) {
        Err(msg) => error(StatusCode::NOT_FOUND, msg),
        Ok(state) if state.policy().is_none() => error(
            StatusCode::CONFLICT,
            format!("listener `{name}` has no policy to pause or resume"),
        ),
        Ok(state) => {
            let done = match h.fleet() {
                None => {
                    state.set_paused(paused);
                    Ok(())
                }
                Some(f) => f.steer(&state, |c| c.paused = paused).await.map(drop),
            };
            match done {
                Ok(()) => reply(
                    StatusCode::OK,
                    json!({ "listener": name, "paused": paused, "fleet": h.fleet().is_some() }),
                ),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
    };
    let verb = if paused { "pause" } else { "resume" };
    audit(
        &h,
        peer,
        &format!("POST /routes/{name}/policy/{verb}"),
        Value::Null,
        &result,
    );
    result
}

async fn reload(
    State(h): State<ProxyHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let result = match h.reload().await {
        Ok(report) => reply(
            StatusCode::OK,
            json!({ "reloaded": true, "changes": report }),
        ),
        Err(e) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused, the running config is unchanged: {e}"),
        ),
    };
    audit(&h, peer, "POST /reload", Value::Null, &result);
    result
}

/// The first key that a JSON object body repeats, if any. `serde_json`
/// keeps the last of duplicate keys, which would let `{"primary": 100,
/// "primary": 0}` mean something other than what its author read.
fn duplicate_key(body: &[u8]) -> Option<String> {
    struct Keys(Option<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    let mut twice = None;
                    while let Some((k, serde::de::IgnoredAny)) = m.next_entry::<String, _>()? {
                        if !seen.insert(k.clone()) && twice.is_none() {
                            twice = Some(k);
                        }
                    }
                    Ok(Keys(twice))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_slice::<Keys>(body).ok()?.0
}

/// `{"group": percent, ...}` -> basis points per group in listener order.
/// Every key must be a group; the percentages must add up to 100; groups
/// left out get 0.
pub fn weights_from_percent(groups: &[String], v: &Value) -> Result<Weights, String> {
    let Some(map) = v.as_object() else {
        return Err(
            "send an object mapping group name to percent, e.g. {\"primary\": 90, \"backup\": 10}"
                .into(),
        );
    };
    let mut pct = vec![0.0f64; groups.len()];
    for (k, v) in map {
        let i = groups.iter().position(|g| g == k).ok_or_else(|| {
            format!(
                "`{k}` is not a group of this listener; groups: {}",
                groups.join(", ")
            )
        })?;
        let p = v
            .as_f64()
            .filter(|p| (0.0..=100.0).contains(p))
            .ok_or_else(|| format!("`{k}`: {v} is not a percentage from 0 to 100"))?;
        pct[i] = p;
    }
    let sum: f64 = pct.iter().sum();
    if (sum - 100.0).abs() > 0.01 {
        return Err(format!(
            "percentages add up to {sum}; they must add up to 100"
        ));
    }
    let mut bp: Vec<u16> = pct.iter().map(|p| (p * 100.0).round() as u16).collect();
    // Rounding may leave a basis point or two over or under: settle it on
    // the largest share.
    let total: i32 = bp.iter().map(|&b| i32::from(b)).sum();
    let largest = (0..bp.len())
        .max_by_key(|&i| bp[i])
        .expect("a listener has groups");
    bp[largest] = (i32::from(bp[largest]) + TOTAL_BP as i32 - total) as u16;
    Weights::new(bp).map_err(|e| e.to_string())
}

fn percent_map(groups: &[String], bp: &[u16]) -> Value {
    Value::Object(
        groups
            .iter()
            .zip(bp)
            .map(|(g, &b)| (g.clone(), json!(f64::from(b) / 100.0)))
            .collect::<Map<_, _>>(),
    )
}

fn snapshot_json(s: &Snapshot) -> Value {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    json!({
        "count": s.count, "errors": s.errors, "error_rate": s.error_rate(),
        "min_ms": ms(s.min), "p50_ms": ms(s.p50), "p90_ms": ms(s.p90), "p99_ms": ms(s.p99), "p999_ms": ms(s.p999), "max_ms": ms(s.max),
    })
}

/// `GET /fleet/window/{listener}?signal=NAME`: the listener's windows for
/// a fleet leader (the policy's signal when none is named).
async fn fleet_window(
    State(h): State<ProxyHandle>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let state = match find(&h, &name) {
        Ok(s) => s,
        Err(msg) => return error(StatusCode::NOT_FOUND, msg),
    };
    let signal = match q.get("signal") {
        None => state.policy().map_or(Signal::Exchange, |p| p.signal),
        Some(s) => match crate::proxy::fleet::signal_named(s) {
            Some(sig) => sig,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown signal `{s}`; one of connect, first_byte, exchange, probe"),
                );
            }
        },
    };
    let member = h.fleet().map(|f| f.member.clone()).unwrap_or_default();
    let wire = crate::proxy::fleet::window_of(&member, &state, signal);
    reply(
        StatusCode::OK,
        serde_json::to_value(wire).expect("a window serializes"),
    )
}

async fn status(State(h): State<ProxyHandle>) -> Response {
    let listeners: Vec<Value> = h
        .listeners()
        .iter()
        .map(|(s, addrs)| listener_status(s, addrs))
        .collect();
    let last_reload = h.last_reload().map(|r| {
        let at = humantime::format_rfc3339_millis(r.at).to_string();
        match r.result {
            Ok(report) => json!({ "at": at, "ok": true, "changes": report }),
            Err(e) => json!({ "at": at, "ok": false, "error": e }),
        }
    });
    reply(
        StatusCode::OK,
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "commit": env!("PORTSHIFT_COMMIT"),
            // Which process answers: it changes with a binary upgrade.
            "pid": std::process::id(),
            "uptime_s": h.uptime().as_secs_f64(),
            "last_reload": last_reload,
            "fleet": h.fleet().map(|f| f.status()),
            "listeners": listeners,
        }),
    )
}

/// A group's backends as `/status` shows them.
fn backends_json(routes: &crate::proxy::state::Routes, now: Duration) -> Vec<Value> {
    let list = routes.backends().iter().enumerate();
    list.map(|(bi, b)| backend_status(routes, (bi, b), now))
        .collect()
}

/// Group `group`'s backends now, as `/status` shows them.
fn group_backends(s: &ListenerState, group: usize) -> Vec<Value> {
    backends_json(&s.router.table().groups[group], s.clock.now())
}

/// One backend in `/status`: its weight, load and health, its drain,
/// ejection and slow start where they apply.
fn backend_status(
    routes: &crate::proxy::state::Routes,
    (bi, b): (usize, &crate::core::backend::Backend),
    now: Duration,
) -> Value {
    let m = routes.member(bi);
    let mut v = json!({ "addr": b.addr.to_string(), "weight": b.weight, "active": m.active(), "probe_up": m.is_up() });
    if m.is_draining() {
        v["draining"] = json!(true);
        v["drained"] = json!(m.active() == 0);
    }
    if routes.ejections().is_some() {
        let left = m.eject.ejected_until().map(|u| u.saturating_sub(now));
        v["ejected"] = json!(m.eject.is_ejected(now));
        v["ejected_for_s"] = json!(left.filter(|l| !l.is_zero()).map(|l| l.as_secs_f64()));
        v["ejections"] = json!(m.eject.times());
    }
    if let Some(s) = routes.slow_start() {
        v["ramp_percent"] = json!((m.ramp(s, now) * 1000.0).round() / 10.0);
    }
    v
}

fn listener_status(s: &ListenerState, addrs: &[SocketAddr]) -> Value {
    let names = s.group_names();
    let now = s.clock.now();
    let table = s.router.table();
    let groups: Vec<Value> = s
        .view()
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let backends = backends_json(&table.groups[gi], now);
            let latency: Map<String, Value> = Signal::ALL
                .iter()
                .map(|sig| {
                    (
                        sig.name().to_owned(),
                        snapshot_json(&g.signals[sig.index()]),
                    )
                })
                .collect();
            json!({
                "name": g.name,
                "role": if gi == 0 { "primary" } else { "backup" },
                "weight_percent": f64::from(g.weight_bp) / 100.0,
                "backends": backends,
                "overrides": s.membership(gi).overrides_json(),
                "latency": latency,
            })
        })
        .collect();
    let policy = s.policy().map(|p| {
        json!({
            "name": p.name,
            "mode": match p.mode { crate::core::policy::Mode::Failover { .. } => "failover", crate::core::policy::Mode::Canary(_) => "canary" },
            "dry_run": p.dry_run,
            "state": s.decisions.phase().unwrap_or("starting"),
            "paused": s.is_paused(),
        })
    });
    let recent = s.decisions.since(0);
    let decisions: Vec<Value> = recent
        .iter()
        .rev()
        .take(STATUS_DECISIONS)
        .rev()
        .map(|(_, d)| serde_json::to_value(d).expect("a decision record serializes"))
        .collect();
    let c = s.outcomes.snapshot();
    json!({
        "name": s.name,
        "listener": s.unit.listener,
        "route": s.route(),
        "listen": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "weights_percent": percent_map(&names, s.router.weights().as_slice()),
        "pinned": s.pinned().map(|w| percent_map(&names, w.as_slice())),
        "policy": policy,
        "groups": groups,
        "connections": {
            "accepted": c.accepted, "denied": c.denied, "connected": c.connected, "active": c.active,
            "no_backend": c.no_backend, "connect_refused": c.connect_refused, "connect_timeout": c.connect_timeout,
            "connect_local": c.connect_local, "local_error": c.local_error,
            "reset": c.reset, "client_reset": c.client_reset, "idle_timeout": c.idle_timeout, "bytes_to_backend": c.bytes_up, "bytes_to_client": c.bytes_down,
        },
        "decisions": decisions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_maps_to_basis_points() {
        let g = vec!["primary".to_string(), "backup".to_string()];
        assert_eq!(
            weights_from_percent(&g, &json!({"primary": 90, "backup": 10}))
                .unwrap()
                .as_slice(),
            &[9000, 1000]
        );
        assert_eq!(
            weights_from_percent(&g, &json!({"backup": 100}))
                .unwrap()
                .as_slice(),
            &[0, 10_000]
        );
        assert_eq!(
            weights_from_percent(&g, &json!({"primary": 33.333, "backup": 66.667}))
                .unwrap()
                .as_slice(),
            &[3333, 6667]
        );
        assert!(
            weights_from_percent(&g, &json!({"primary": 50}))
                .unwrap_err()
                .contains("add up to 50")
        );
        assert!(
            weights_from_percent(&g, &json!({"tax": 100}))
                .unwrap_err()
                .contains("not a group")
        );
        assert!(
            weights_from_percent(&g, &json!([1, 2]))
                .unwrap_err()
                .contains("object")
        );
        assert!(
            weights_from_percent(&g, &json!({"primary": 120, "backup": -20}))
                .unwrap_err()
                .contains("percentage")
        );
    }

    #[test]
    fn duplicate_keys_are_found() {
        assert_eq!(
            duplicate_key(br#"{"primary": 100, "backup": 0, "primary": 0}"#),
            Some("primary".into())
        );
        assert_eq!(duplicate_key(br#"{"primary": 90, "backup": 10}"#), None);
        assert_eq!(duplicate_key(b"[1, 2]"), None);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        for v in ["Bearer abc", "bearer abc", "BEARER  abc ", "BeArEr abc"] {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            assert_eq!(bearer(&h), Some("abc"), "{v}");
        }
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
