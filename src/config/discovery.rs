//! Where a group's backends come from besides addresses in the file:
//! hostnames (`"db.internal:5432"`), SRV records (`{ srv = "..." }`) and
//! discovery files (`{ file = "backends.json" }`), validated; `[dns]`; and
//! the discovery file's format, which the proxy reads at start and
//! whenever the file changes.

use super::MAX_BACKEND_WEIGHT;
use super::raw::{RawDns, S};
use super::validate::Validator;
use crate::core::backend::Backend;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How often names and files are read again by default.
pub const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// The shortest `resolve_every`, and the floor under a DNS answer's TTL.
pub const MIN_RESOLVE_EVERY: Duration = Duration::from_secs(1);
/// How long one DNS query may take by default.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// A source of backends that is read at run time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// Every address of the name's A and AAAA answer, at `port`, each with
    /// `weight`.
    Host {
        host: String,
        port: u16,
        weight: u32,
    },
    /// The targets of the SRV record's lowest priority, at their ports,
    /// with their weights.
    Srv { name: String },
    /// A JSON list of `{ "addr": "ip:port", "weight": N }` an orchestrator
    /// writes (relative paths are resolved against the config's folder).
    File { path: PathBuf },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Host { host, port, .. } => write!(f, "{host}:{port}"),
            Source::Srv { name } => write!(f, "srv {name}"),
            Source::File { path } => write!(f, "file {}", path.display()),
        }
    }
}

/// `[dns]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Queried in order (UDP, then TCP for a truncated answer).
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

/// Whether `host` may be a DNS name: letters, digits, `-`, `_` and dots,
/// each label 1 to 63 bytes.
fn is_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `host:port` with a hostname (not an IP literal), or `None`.
pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (port != 0 && is_hostname(host) && host.parse::<std::net::IpAddr>().is_err())
        .then(|| (host.to_owned(), port))
}

impl Validator<'_, '_> {
    /// `addr` as written in a group's `backends`, with a hostname: the
    /// source it is, or an error reported.
    pub(super) fn host_source(
        &mut self,
        group: &str,
        entry: &S<String>,
        weight: u32,
    ) -> Option<Source> {
        let addr = entry.get_ref();
        match parse_host_port(addr) {
            Some((host, port)) => Some(Source::Host { host, port, weight }),
            None => {
                self.rep.error(
                    entry.span(),
                    format!(
                        "group `{group}`: backend `{addr}` is neither `ip:port` nor `host:port`"
                    ),
                    Some(
                        "write e.g. \"127.0.0.1:9001\", \"[::1]:9001\" or \"db.internal:5432\""
                            .into(),
                    ),
                );
                None
            }
        }
    }

    pub(super) fn srv_source(&mut self, group: &str, entry: &S<String>) -> Option<Source> {
        let name = entry.get_ref();
        if is_hostname(name) {
            return Some(Source::Srv { name: name.clone() });
        }
        self.rep.error(
            entry.span(),
            format!("group `{group}`: `{name}` is not an SRV name"),
            Some("write e.g. { srv = \"_postgres._tcp.example.internal\" }".into()),
        );
        None
    }

    pub(super) fn file_source(&mut self, path: &str) -> Source {
        let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
        Source::File {
            path: dir.join(path),
        }
    }

    pub(super) fn resolve_every(&mut self, group: &str, raw: Option<&S<String>>) -> Duration {
        let every = self.duration(raw, "resolve_every", DEFAULT_RESOLVE_EVERY);
        if every < MIN_RESOLVE_EVERY {
            if let Some(r) = raw {
                self.rep.error(
                    r.span(),
                    format!("group `{group}`: `resolve_every` is shorter than 1s"),
                    Some("names and files are read again at most once a second".into()),
                );
            }
            return MIN_RESOLVE_EVERY;
        }
        every
    }

    pub(super) fn dns(&mut self, raw: Option<&S<RawDns>>) -> Option<Dns> {
        let r = raw?.get_ref();
        let mut servers = Vec::new();
        for s in r.servers.iter().flat_map(|l| l.get_ref()) {
            let text = s.get_ref();
            let parsed = text.parse::<SocketAddr>().or_else(|_| {
                text.parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Ok(a) => servers.push(a),
                Err(_) => self.rep.error(
                    s.span(),
                    format!("`dns.servers`: `{text}` is not an address"),
                    Some("write e.g. \"10.0.0.2\" or \"127.0.0.1:5353\"".into()),
                ),
            }
        }
        if servers.is_empty() {
            self.rep.error(
                raw?.span(),
                "`[dns]` names no server",
                Some("list at least one, e.g. servers = [\"10.0.0.2\"]; without [dns], the system's resolver configuration is used".into()),
            );
        }
        let timeout = self.duration(r.timeout.as_ref(), "dns.timeout", DEFAULT_DNS_TIMEOUT);
        Some(Dns { servers, timeout })
    }
}

/// Why a discovery file was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("cannot read it: {0}")]
    Read(String),
    #[error("line {line}, column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("entry {index}: {message}")]
    Entry { index: usize, message: String },
    #[error("it lists no backend with a weight above 0")]
    Empty,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FileEntry {
    Addr(String),
    Full {
        addr: String,
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

/// A discovery file's backends: a JSON list whose entries are `"ip:port"`
/// or `{"addr": "ip:port", "weight": N}`.
pub fn parse_backends_file(text: &str) -> Result<Vec<Backend>, FileError> {
    let malformed = |line, column, message: String| FileError::Malformed {
        line,
        column,
        message,
    };
    let entries: Vec<FileEntry> =
        serde_json::from_str(text).map_err(|e| malformed(e.line(), e.column(), e.to_string()))?;
    let mut out: Vec<Backend> = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let (addr, weight) = match e {
            FileEntry::Addr(a) => (a, 1),
            FileEntry::Full { addr, weight } => (addr, weight),
        };
        let entry = |message: String| FileError::Entry {
            index: i + 1,
            message,
        };
        let parsed: SocketAddr = addr
            .parse()
            .map_err(|_| entry(format!("`{addr}` is not an ip:port address")))?;
        if parsed.port() == 0 {
            return Err(entry(format!("`{addr}` has port 0")));
        }
        if weight > MAX_BACKEND_WEIGHT {
            return Err(entry(format!(
                "weight {weight} is above {MAX_BACKEND_WEIGHT}"
            )));
        }
        if out.iter().any(|b| b.addr == parsed) {
            return Err(entry(format!("`{addr}` is listed twice")));
        }
        out.push(Backend {
            addr: parsed,
            weight,
        });
    }
    if out.iter().all(|b| b.weight == 0) {
        return Err(FileError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_takes_names_only() {
        assert_eq!(
            parse_host_port("db.internal:5432"),
            Some(("db.internal".into(), 5432))
        );
        assert_eq!(
            parse_host_port("localhost:80"),
            Some(("localhost".into(), 80))
        );
        for bad in ["10.0.0.1:80", "db:0", "db", ":80", "a b:80", "db:x", "-"] {
            assert_eq!(parse_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn discovery_files_parse_or_say_why() {
        let ok = parse_backends_file(r#"["10.0.0.1:80", {"addr": "10.0.0.2:80", "weight": 3}]"#)
            .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].weight, 3);
        assert_eq!(parse_backends_file("[]"), Err(FileError::Empty));
        assert_eq!(
            parse_backends_file(r#"[{"addr": "10.0.0.1:80", "weight": 0}]"#),
            Err(FileError::Empty)
        );
        let cases = [
            ("[\n  \"10.0.0.1:80\",\n  oops\n]", "line 3"),
            (r#"["db:80"]"#, "entry 1: `db:80` is not an ip:port"),
            (
                r#"["10.0.0.1:80", "10.0.0.1:80"]"#,
                "entry 2: `10.0.0.1:80` is listed twice",
            ),
            (r#"[{"addr": "10.0.0.1:80", "weight": 5000}]"#, "above 1000"),
            (r#"{"addr": "10.0.0.1:80"}"#, "line 1"),
        ];
        for (text, says) in cases {
            let e = parse_backends_file(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
