//! Config: the TOML file (`raw`) is read, then `validate`d into the types
//! below, where bad states cannot be written. Every problem is reported at
//! once, each with file, line and column.

mod balance;
mod describe;
pub(crate) mod diagnostic;
pub mod discovery;
mod eject;
mod fleet;
mod knock;
mod listen;
pub mod policy;
mod proxy_protocol;
mod raw;
mod route;
pub mod shipped;
mod tls;
mod validate;

pub use crate::core::backend::{Backend, Balance};
pub use diagnostic::{ConfigError, Diagnostic};
pub use fleet::{DEFAULT_LEASE_TTL, DEFAULT_STALE_AFTER, Fleet, FleetSignal, MemberToken};
pub use knock::{DEFAULT_KNOCK_MAX_SOURCES, DEFAULT_KNOCK_OPEN_FOR, DEFAULT_KNOCK_WITHIN, Knock};
pub use listen::{addrs_collide, parse_listen};
pub use proxy_protocol::{
    DEFAULT_PROXY_PROTOCOL_TIMEOUT, ProxyProtocolAccept, ProxyVersion, ProxyVersions,
};
pub use route::{DEFAULT_CLIENT_HELLO_TIMEOUT, Route, RouteUnit};
pub use tls::{DEFAULT_TLS_HANDSHAKE_TIMEOUT, TlsOriginate, TlsTerminate};

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default time in-flight connections get to finish after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default upstream connect timeout: long enough for a loaded backend's
/// accept queue, short enough that a retry still helps the client.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default idle timeout: no byte either way for this long closes both sides.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default number of upstream connect attempts per client connection: the
/// chosen backend, another of its group, then the next group.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;

/// Default accept queue length: the kernel's default cap (somaxconn) on
/// current Linux, so bursts of new connections queue rather than drop.
pub const DEFAULT_BACKLOG: u32 = 4096;

/// Largest backend weight: weights are relative, and a small range keeps the
/// round-robin schedule short.
pub const MAX_BACKEND_WEIGHT: u32 = 1000;

/// Probe defaults, HAProxy's: every 2 s, down after 3 failures, up after 2
/// successes.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_PROBE_RISE: u32 = 2;
pub const DEFAULT_PROBE_FALL: u32 = 3;
/// Shortest sub-window: finer slices cost memory and merge time for no
/// decision that needs them.
pub const MIN_SUB_WINDOW: Duration = Duration::from_millis(10);

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub drain_timeout: Duration,
    /// Append-only JSON-lines log of policy decisions (relative paths are
    /// resolved against the config file's folder).
    pub audit_log: Option<PathBuf>,
    /// The binary upgrade's Unix socket (relative paths are resolved
    /// against the config file's folder); `None`: the default place.
    pub upgrade_socket: Option<PathBuf>,
    /// The admin listener (`/metrics`), if configured.
    pub admin: Option<Admin>,
    /// `[fleet]`: decide as one with the other members, on etcd.
    pub fleet: Option<Fleet>,
    /// The sliding window latency statistics are read over.
    pub stats: crate::core::stats::WindowConfig,
    /// Whether connections record latency signals (`[stats] record`).
    pub record_latency: bool,
    /// `[dns]`: the servers backend names are resolved with (`None`: the
    /// system's).
    pub dns: Option<discovery::Dns>,
    pub groups: Vec<Group>,
    pub listeners: Vec<Listener>,
}

/// A port group: backends that serve the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// The backends listed by address. With no `discover` sources, never
    /// empty and at least one weight is non-zero.
    pub backends: Vec<Backend>,
    /// Names, SRV records and discovery files, read at start and again
    /// every `resolve_every` (a file also when it changes).
    pub discover: Vec<discovery::Source>,
    pub resolve_every: Duration,
    pub balance: Balance,
    pub probe: Option<Probe>,
    /// A PROXY protocol header before the client's bytes on every
    /// connection to these backends (and a LOCAL one before a probe's).
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Speak TLS to the backends (after any PROXY protocol header).
    pub tls: Option<TlsOriginate>,
    /// Take backends that fail out of rotation for a while.
    pub eject: Option<crate::core::eject::EjectPolicy>,
    /// Ramp backends that join, return from ejection or probe up again.
    pub slow_start: Option<crate::core::backend::SlowStart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// The bearer token every admin call must carry, read when the config
    /// is loaded (so `check` and a reload see a missing or empty token).
    pub token: Option<AdminToken>,
    pub limits: AdminLimits,
}

/// The admin plane's own limits, so that no admin load can starve the data
/// path: every admin connection costs a descriptor and a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Admin connections open at once; past it, new ones are closed at
    /// accept.
    pub max_connections: u32,
    /// Time allowed to receive a request's headers, counted from the
    /// moment the connection opened or its previous response was sent (so
    /// it also bounds an idle keep-alive connection).
    pub header_timeout: Duration,
    /// An admin connection on which no byte moves either way for this long
    /// is closed (a stalled body, a client that stops reading).
    pub idle_timeout: Duration,
}

pub const DEFAULT_ADMIN_MAX_CONNECTIONS: u32 = 64;
pub const DEFAULT_ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            header_timeout: DEFAULT_ADMIN_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_ADMIN_IDLE_TIMEOUT,
        }
    }
}

/// The admin token is read from a file or an environment variable, never
/// written in the config itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Env(String),
}

/// A configured admin token: where it came from and its SHA-256 digest.
/// The token itself is not kept; calls are checked by comparing digests,
/// which takes the same time whatever the guess.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub source: TokenSource,
    digest: [u8; 32],
}

impl AdminToken {
    /// Reads the token from its source: trimmed, and never empty.
    pub fn read(source: TokenSource) -> Result<AdminToken, String> {
        let token = match &source {
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read token file {}: {e}", p.display()))?,
            TokenSource::Env(var) => {
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(match &source {
                TokenSource::File(p) => format!("token file {} is empty", p.display()),
                TokenSource::Env(var) => format!("environment variable {var} is empty"),
            });
        }
        Ok(AdminToken {
            digest: digest(token.as_bytes()),
            source,
        })
    }

    /// Whether `given` is the token, in time independent of where a guess
    /// goes wrong or how long it is.
    pub fn matches(&self, given: &[u8]) -> bool {
        let d = digest(given);
        d.iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// An active health and latency probe for every backend of a group: TCP
/// connect, then optionally send bytes and expect a reply prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub interval: Duration,
    pub timeout: Duration,
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    /// Every address this listener binds (ranges expanded); never empty.
    pub addrs: Vec<SocketAddr>,
    /// The `listen` entries as written, for display.
    pub listen: Vec<String>,
    /// Indexes into `Config::groups`: the primary first, then backups in
    /// order. Empty only for a listener with routes and no default.
    pub groups: Vec<usize>,
    pub policy: Option<PolicyRef>,
    pub acl: Acl,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_attempts: u32,
    /// A backend that resets before sending a byte gets the client's first
    /// bytes (up to 16 KiB) replayed to the next backend. Safe only for
    /// idempotent protocols; off by default.
    pub retry_on_early_reset: bool,
    /// Move bulk flows with splice(2) (Linux): socket to pipe to socket,
    /// never through user space. On by default.
    pub splice: bool,
    pub limits: Limits,
    /// Close a client that sends nothing this long after connecting (a
    /// slow-loris guard; leave unset for server-speaks-first protocols).
    pub first_byte_timeout: Option<Duration>,
    pub socket: SocketOptions,
    /// Take a PROXY protocol header from trusted load balancers.
    pub proxy_protocol: Option<ProxyProtocolAccept>,
    /// Where its connections are logged as they end (its own
    /// `access_log`, else the top-level one), relative to the config's
    /// folder.
    pub access_log: Option<PathBuf>,
    /// Admit a source only after it knocked on these ports in order.
    pub knock: Option<Knock>,
    /// Routes by TLS server name; empty: every connection goes to `groups`.
    pub routes: Vec<Route>,
    /// The time a routed listener gives a client to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// Set on a route's unit (see `Listener::unit`): which listener and
    /// route it is.
    pub unit_of: Option<RouteUnit>,
    /// Terminate TLS: clients speak TLS to portshift, backends get the
    /// plaintext (or TLS of their group's own).
    pub tls: Option<TlsTerminate>,
}

/// Connection limits of a listener; past them new connections are closed
/// at accept (established ones are never touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_connections_per_source: Option<u32>,
}

/// Per-listener socket options, applied to the listening socket (backlog)
/// and to both sides of every proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    pub backlog: u32,
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    pub send_buffer: Option<u32>,
    pub recv_buffer: Option<u32>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            backlog: DEFAULT_BACKLOG,
            nodelay: true,
            keepalive: None,
            send_buffer: None,
            recv_buffer: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// A policy named by a listener, resolved to the file that defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRef {
    pub name: String,
    pub path: PathBuf,
    pub policy: crate::core::policy::Policy,
}

/// Source address control: deny wins; with no allow list, all are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub allow: Option<Vec<IpNet>>,
    pub deny: Vec<IpNet>,
}

impl Acl {
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        match &self.allow {
            None => true,
            Some(allow) => allow.iter().any(|n| n.contains(&ip)),
        }
    }
}

/// An IPv4 client seen on a dual-stack socket arrives as `::ffff:a.b.c.d`;
/// ACLs are written in IPv4, so compare in IPv4.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(path, &text),
            Err(e) => Err(ConfigError {
                diagnostics: vec![Diagnostic {
                    file: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read config: {e}"),
                    hint: Some("pass an existing file with -c FILE".into()),
                }],
            }),
        }
    }

    /// Parses and validates `text`, naming `path` in diagnostics; policies
    /// are looked up relative to `path`'s folder.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        validate::parse(path, text)
    }

    pub fn group(&self, index: usize) -> &Group {
        &self.groups[index]
    }

    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }
}
