//! The config file as written: serde types that mirror the TOML one to one,
//! keep the span of every value for diagnostics, and refuse unknown keys.
//! Nothing here is checked beyond TOML types; `validate` does the rest.

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use std::fmt;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// How long in-flight connections may take to finish after SIGTERM.
    pub drain_timeout: Option<S<String>>,
    /// Where policy decisions are appended as JSON lines.
    pub audit_log: Option<String>,
    /// Where every listener appends one JSON line per connection.
    pub access_log: Option<String>,
    /// The Unix socket a new binary takes the listening sockets from.
    pub upgrade_socket: Option<String>,
    pub admin: Option<S<RawAdmin>>,
    pub fleet: Option<S<RawFleet>>,
    pub stats: Option<RawStats>,
    /// The DNS servers backend names are resolved with.
    pub dns: Option<S<RawDns>>,
    #[serde(default, rename = "group")]
    pub groups: Vec<RawGroup>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<RawListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub name: S<String>,
    pub backends: S<Vec<S<RawBackend>>>,
    pub balance: Option<S<String>>,
    pub probe: Option<S<RawProbe>>,
    pub send_proxy_protocol: Option<S<String>>,
    /// Speak TLS to the backends.
    pub tls: Option<S<RawTlsClient>>,
    /// `balance = "peak_ewma"`'s settings.
    pub peak_ewma: Option<S<RawPeakEwma>>,
    /// Passive ejection of backends that fail.
    pub eject: Option<S<RawEject>>,
    /// Ramping up backends that join or return.
    pub slow_start: Option<S<RawSlowStart>>,
    /// How often names and discovery files are read again.
    pub resolve_every: Option<S<String>>,
}

/// `[dns]`: where backend names are resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub servers: Option<S<Vec<S<String>>>>,
    pub timeout: Option<S<String>>,
}

/// How a group ramps a backend that joins or returns up to its weight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlowStart {
    pub window: S<String>,
    pub min_percent: Option<S<u32>>,
}

/// When a group takes a failing backend out of rotation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEject {
    pub consecutive_failures: Option<S<u32>>,
    pub error_rate_above: Option<S<f64>>,
    pub latency_factor: Option<S<f64>>,
    pub min_requests: Option<S<u32>>,
    pub base_time: Option<S<String>>,
    pub max_time: Option<S<String>>,
    pub max_percent: Option<S<u32>>,
}

/// What `peak_ewma` measures backends by.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeakEwma {
    pub signal: Option<S<String>>,
    pub decay: Option<S<String>>,
    pub default_rtt: Option<S<String>>,
}

/// A group's TLS to its backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsClient {
    pub ca: Option<S<String>>,
    pub server_name: Option<S<String>>,
}

/// A listener's TLS termination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsServer {
    pub cert: S<String>,
    pub key: S<String>,
    pub handshake_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: S<String>,
    /// File holding the bearer token (never the token itself in config).
    pub token_file: Option<S<String>>,
    /// Environment variable holding the bearer token.
    pub token_env: Option<S<String>>,
    pub max_connections: Option<S<u32>>,
    pub header_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub name: S<String>,
    pub member: Option<S<String>>,
    pub etcd: S<Vec<S<String>>>,
    pub lease_ttl: Option<S<String>>,
    pub signal: Option<S<String>>,
    pub prometheus: Option<S<String>>,
    pub prometheus_selector: Option<S<String>>,
    pub stale_after: Option<S<String>>,
    pub advertise: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStats {
    pub window: Option<S<String>>,
    pub sub_windows: Option<S<u32>>,
    /// Record latency signals at all (default true); off only to measure
    /// what recording costs.
    pub record: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub send: Option<String>,
    pub expect: Option<String>,
    pub rise: Option<S<u32>>,
    pub fall: Option<S<u32>>,
}

/// A backend entry: `"ip:port"` or `"host:port"`, `{ addr = ..., weight =
/// 2 }`, `{ srv = "_pg._tcp.example.internal" }` or `{ file =
/// "backends.json" }`.
#[derive(Debug)]
pub enum RawBackend {
    Addr { addr: String, weight: u32 },
    Srv(String),
    File(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTable {
    addr: Option<String>,
    weight: Option<u32>,
    srv: Option<String>,
    file: Option<String>,
}

fn default_backend_weight() -> u32 {
    1
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a backend: "ip:port", "host:port", { addr = "ip:port", weight = N }, { srv = "_service._tcp.name" } or { file = "backends.json" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Addr {
                    addr: v.to_owned(),
                    weight: default_backend_weight(),
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<RawBackend, M::Error> {
                let t = BackendTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (t.addr, t.srv, t.file, t.weight) {
                    (Some(addr), None, None, w) => Ok(RawBackend::Addr {
                        addr,
                        weight: w.unwrap_or_else(default_backend_weight),
                    }),
                    (None, Some(srv), None, None) => Ok(RawBackend::Srv(srv)),
                    (None, None, Some(file), None) => Ok(RawBackend::File(file)),
                    (None, _, _, Some(_)) => Err(de::Error::custom(
                        "`weight` goes with `addr`; an SRV record or a discovery file gives each backend's own",
                    )),
                    _ => Err(de::Error::custom(
                        "a backend entry has exactly one of `addr`, `srv` or `file`",
                    )),
                }
            }
        }
        d.deserialize_any(BackendVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: S<String>,
    pub listen: S<Vec<S<String>>>,
    /// Optional when routes are defined: then it takes what no route does.
    pub primary: Option<S<String>>,
    #[serde(default)]
    pub backups: Vec<S<String>>,
    pub policy: Option<S<String>>,
    pub allow: Option<Vec<S<String>>>,
    #[serde(default)]
    pub deny: Vec<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub connect_attempts: Option<S<u32>>,
    pub retry_on_early_reset: Option<bool>,
    pub splice: Option<bool>,
    pub max_connections: Option<S<u32>>,
    pub max_connections_per_source: Option<S<u32>>,
    pub first_byte_timeout: Option<S<String>>,
    pub backlog: Option<S<u32>>,
    pub nodelay: Option<bool>,
    pub keepalive: Option<S<RawKeepalive>>,
    pub send_buffer: Option<S<u32>>,
    pub recv_buffer: Option<S<u32>>,
    pub proxy_protocol: Option<S<String>>,
    pub proxy_protocol_from: Option<Vec<S<String>>>,
    pub proxy_protocol_timeout: Option<S<String>>,
    /// This listener's own access log, instead of the top-level one.
    pub access_log: Option<String>,
    pub knock: Option<S<RawKnock>>,
    /// `[[listener.route]]`: routing units picked by TLS server name.
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
    /// How long a routed listener waits for a client's whole ClientHello.
    pub client_hello_timeout: Option<S<String>>,
    /// Terminate TLS.
    pub tls: Option<S<RawTlsServer>>,
}

/// A route inside a listener: the server names it takes and its groups.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: S<String>,
    pub sni: S<Vec<S<String>>>,
    pub primary: S<String>,
    #[serde(default)]
    pub backups: Vec<S<String>>,
    pub policy: Option<S<String>>,
}

/// Port knocking: the ports, in order, that open the listener to a source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKnock {
    pub sequence: S<Vec<S<u32>>>,
    pub within: Option<S<String>>,
    pub open_for: Option<S<String>>,
    pub max_sources: Option<S<u32>>,
}

/// TCP keepalive probes on both sides of a proxied connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    pub time: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub count: Option<S<u32>>,
}
