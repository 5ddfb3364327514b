//! Raw config -> validated `Config`. Every check reports into one `Reporter`
//! so the user sees all problems in one run.

use super::diagnostic::{Reporter, did_you_mean};
use super::listen::{addrs_collide, parse_listen};
use super::raw::{RawAdmin, RawBackend, RawConfig, RawGroup, RawListener, RawProbe, RawStats, S};
use super::*;
use crate::core::stats::WindowConfig;
use std::collections::HashMap;

pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut rep = Reporter::new(path, text);
    let Some(raw) = rep.parse_toml::<RawConfig>(text) else {
        return Err(rep.finish().expect_err("an error was just reported"));
    };
    let config = Validator {
        rep: &mut rep,
        path,
    }
    .config(raw);
    rep.finish().map(|()| config)
}

pub(super) struct Validator<'r, 'a> {
    pub(super) rep: &'r mut Reporter<'a>,
    pub(super) path: &'a Path,
}

impl Validator<'_, '_> {
    fn config(&mut self, raw: RawConfig) -> Config {
        let drain_timeout = self.duration(
            raw.drain_timeout.as_ref(),
            "drain_timeout",
            DEFAULT_DRAIN_TIMEOUT,
        );
        let groups: Vec<Group> = raw.groups.iter().map(|g| self.group(g)).collect();
        self.unique_names(raw.groups.iter().map(|g| &g.name), "group");
        self.unique_names(raw.listeners.iter().map(|l| &l.name), "listener");
        if raw.listeners.is_empty() {
            self.rep.error_file(
                "no listener is defined, so nothing would run",
                Some("add a [[listener]] table with name, listen and primary".into()),
            );
        }
        let group_names: Vec<&str> = raw
            .groups
            .iter()
            .map(|g| g.name.get_ref().as_str())
            .collect();
        let here = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let access_log = raw.access_log.as_ref().map(|p| here.join(p));
        let listeners: Vec<Listener> = raw
            .listeners
            .iter()
            .map(|l| {
                let listener = Listener {
                    access_log: l
                        .access_log
                        .as_ref()
                        .map(|p| here.join(p))
                        .or_else(|| access_log.clone()),
                    ..self.listener(l, &group_names, &groups)
                };
                self.tls_without_replay(l, &listener, &groups);
                listener
            })
            .collect();
        self.conflicts(&raw.listeners, &listeners);
        let admin = raw.admin.as_ref().and_then(|a| self.admin(a, &listeners));
        let fleet = raw
            .fleet
            .as_ref()
            .and_then(|f| self.fleet(f, admin.as_ref()));
        let stats = self.stats(raw.stats.as_ref());
        let record_latency = raw.stats.as_ref().and_then(|s| s.record).unwrap_or(true);
        Config {
            path: self.path.to_path_buf(),
            drain_timeout,
            audit_log: raw
                .audit_log
                .as_ref()
                .map(|p| self.path.parent().unwrap_or(Path::new(".")).join(p)),
            upgrade_socket: raw
                .upgrade_socket
                .as_ref()
                .map(|p| self.path.parent().unwrap_or(Path::new(".")).join(p)),
            admin,
            fleet,
            stats,
            record_latency,
            dns: self.dns(raw.dns.as_ref()),
            groups,
            listeners,
        }
    }

    fn unique_names<'s>(&mut self, names: impl Iterator<Item = &'s S<String>>, what: &str) {
        let mut seen: HashMap<&str, ()> = HashMap::new();
        for name in names {
            if name.get_ref().is_empty() {
                self.rep
                    .error(name.span(), format!("{what} name is empty"), None);
            } else if seen.insert(name.get_ref(), ()).is_some() {
                self.rep.error(
                    name.span(),
                    format!("{what} `{}` is defined twice", name.get_ref()),
                    Some(format!("give each {what} its own name")),
                );
            }
        }
    }

    fn group(&mut self, raw: &RawGroup) -> Group {
        /// A backend listed by address (an IP literal or a name).
        struct Listed<'a> {
            addr: &'a String,
            weight: u32,
        }
        let name = raw.name.get_ref();
        let mut backends = Vec::new();
        let mut discover = Vec::new();
        for entry in raw.backends.get_ref() {
            let b = match entry.get_ref() {
                RawBackend::Addr { addr, weight } => Listed {
                    addr,
                    weight: *weight,
                },
                RawBackend::Srv(srv) => {
                    let named = S::new(entry.span(), srv.clone());
                    discover.extend(self.srv_source(name, &named));
                    continue;
                }
                RawBackend::File(path) => {
                    discover.push(self.file_source(path));
                    continue;
                }
            };
            if b.addr.parse::<SocketAddr>().is_err() && b.weight <= MAX_BACKEND_WEIGHT {
                let named = S::new(entry.span(), b.addr.clone());
                discover.extend(self.host_source(name, &named, b.weight));
                continue;
            }
            match b.addr.parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 => self.rep.error(
                    entry.span(),
                    format!("group `{name}`: backend `{}` has port 0", b.addr),
                    Some("name the port the backend listens on".into()),
                ),
                Ok(_) if b.weight > MAX_BACKEND_WEIGHT => self.rep.error(
                    entry.span(),
                    format!("group `{name}`: backend `{}` has weight {}; the most is {MAX_BACKEND_WEIGHT}", b.addr, b.weight),
                    Some("weights are relative: 1 and 3 split like 100 and 300".into()),
                ),
                Ok(addr) => {
                    if backends.iter().any(|x: &Backend| x.addr == addr) {
                        self.rep.error(
                            entry.span(),
                            format!("group `{name}`: backend `{addr}` is listed twice"),
                            Some("list it once and raise its `weight` instead".into()),
                        );
                    }
                    backends.push(Backend { addr, weight: b.weight });
                }
                Err(_) => self.rep.error(
                    entry.span(),
                    format!("group `{name}`: backend `{}` has weight {}; the most is {MAX_BACKEND_WEIGHT}", b.addr, b.weight),
                    Some("weights are relative: 1 and 3 split like 100 and 300".into()),
                ),
            }
        }
        if raw.backends.get_ref().is_empty() {
            self.rep.error(
                raw.backends.span(),
                format!("group `{name}` has no backends"),
                Some(r#"list at least one, e.g. backends = ["127.0.0.1:9001"]"#.into()),
            );
        } else if discover.is_empty()
            && !backends.is_empty()
            && backends.iter().all(|b| b.weight == 0)
        {
            self.rep.error(
                raw.backends.span(),
                format!("group `{name}`: every backend has weight 0, so it could serve nothing"),
                Some("give at least one backend a weight of 1 or more".into()),
            );
        }
        let balance = self.balance(name, raw);
        Group {
            name: name.clone(),
            backends,
            balance,
            probe: raw.probe.as_ref().map(|p| self.probe(name, p)),
            send_proxy_protocol: self.send_proxy_protocol(name, raw.send_proxy_protocol.as_ref()),
            tls: self.tls_originate(name, raw.tls.as_ref()),
            eject: self.eject(name, raw.eject.as_ref()),
            slow_start: self.slow_start(name, raw.slow_start.as_ref()),
            resolve_every: self.resolve_every(name, raw.resolve_every.as_ref()),
            discover,
        }
    }

    fn probe(&mut self, group: &str, raw: &S<RawProbe>) -> Probe {
        let p = raw.get_ref();
        let interval = self.duration(
            p.interval.as_ref(),
            "probe.interval",
            DEFAULT_PROBE_INTERVAL,
        );
        let timeout = self.duration(p.timeout.as_ref(), "probe.timeout", DEFAULT_PROBE_TIMEOUT);
        if timeout > interval {
            self.rep.error(
                raw.span(),
                format!("group `{group}`: probe timeout is longer than its interval"),
                Some("make `timeout` at most `interval`, so probes never overlap".into()),
            );
        }
        let mut count = |v: Option<&S<u32>>, key: &str, default: u32| match v {
            None => default,
            Some(n) if (1..=100).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                self.rep.error(
                    n.span(),
                    format!(
                        "group `{group}`: probe `{key}` is {}; it must be 1 to 100",
                        n.get_ref()
                    ),
                    None,
                );
                default
            }
        };
        Probe {
            interval,
            timeout,
            rise: count(p.rise.as_ref(), "rise", DEFAULT_PROBE_RISE),
            fall: count(p.fall.as_ref(), "fall", DEFAULT_PROBE_FALL),
            send: p.send.as_ref().map(|s| s.clone().into_bytes()),
            expect: p.expect.as_ref().map(|s| s.clone().into_bytes()),
        }
    }

    fn admin(&mut self, raw: &S<RawAdmin>, listeners: &[Listener]) -> Option<Admin> {
        let a = raw.get_ref();
        let listen = &a.listen;
        let Ok(addr) = listen.get_ref().parse::<SocketAddr>() else {
            self.rep.error(
                listen.span(),
                format!("admin: `{}` is not an `ip:port` address", listen.get_ref()),
                Some("write e.g. \"127.0.0.1:9900\"".into()),
            );
            return None;
        };
        let token = self.admin_token(a);
        let configured = a.token_file.is_some() || a.token_env.is_some();
        if !addr.ip().is_loopback() && !configured {
            self.rep.error(
                listen.span(),
                format!("admin: {addr} is not a loopback address and no token is configured; the admin plane would be open to the network"),
                Some("bind 127.0.0.1 or [::1], or set `token_file` or `token_env` so every call needs a bearer token".into()),
            );
        }
        if let Some(l) = listeners
            .iter()
            .find(|l| l.addrs.iter().any(|a| addrs_collide(*a, addr)))
        {
            self.rep.error(
                listen.span(),
                format!("admin: {addr} is also claimed by listener `{}`", l.name),
                Some("give the admin plane its own port".into()),
            );
        }
        Some(Admin {
            listen: addr,
            token,
            limits: self.admin_limits(a),
        })
    }

    /// The admin token from `token_file` or `token_env` (never both).
    fn admin_token(&mut self, a: &RawAdmin) -> Option<AdminToken> {
        match (&a.token_file, &a.token_env) {
            (Some(f), Some(_)) => {
                self.rep.error(
                    f.span(),
                    "admin: both `token_file` and `token_env` are set",
                    Some("choose one source for the token".into()),
                );
                None
            }
            (Some(f), None) => self.token(
                f.span(),
                TokenSource::File(
                    self.path
                        .parent()
                        .unwrap_or(Path::new("."))
                        .join(f.get_ref()),
                ),
            ),
            (None, Some(e)) if e.get_ref().is_empty() => {
                self.rep.error(
                    e.span(),
                    "admin: `token_env` is empty",
                    Some("name the environment variable, e.g. \"PORTSHIFT_ADMIN_TOKEN\"".into()),
                );
                None
            }
            (None, Some(e)) => self.token(e.span(), TokenSource::Env(e.get_ref().clone())),
            (None, None) => None,
        }
    }

    fn admin_limits(&mut self, a: &RawAdmin) -> AdminLimits {
        AdminLimits {
            max_connections: self
                .count(
                    a.max_connections.as_ref(),
                    "admin.max_connections",
                    1,
                    10_000,
                )
                .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS),
            header_timeout: self.duration(
                a.header_timeout.as_ref(),
                "admin.header_timeout",
                DEFAULT_ADMIN_HEADER_TIMEOUT,
            ),
            idle_timeout: self.duration(
                a.idle_timeout.as_ref(),
                "admin.idle_timeout",
                DEFAULT_ADMIN_IDLE_TIMEOUT,
            ),
        }
    }

    /// Reads the admin token now, so a missing or empty one is a config
    /// error at `check`, at start and at reload, pointing at its key.
    fn token(&mut self, span: std::ops::Range<usize>, source: TokenSource) -> Option<AdminToken> {
        let hint = match &source {
            TokenSource::File(_) => {
                "write the token into that file (one line), readable by portshift"
            }
            TokenSource::Env(_) => {
                "export the variable, with the token as its value, before starting portshift"
            }
        };
        match AdminToken::read(source) {
            Ok(t) => Some(t),
            Err(e) => {
                self.rep
                    .error(span, format!("admin: {e}"), Some(hint.into()));
                None
            }
        }
    }

    fn stats(&mut self, raw: Option<&RawStats>) -> WindowConfig {
        let default = WindowConfig::default();
        let Some(raw) = raw else { return default };
        let window = self.duration(raw.window.as_ref(), "stats.window", default.span());
        let slots = match raw.sub_windows.as_ref() {
            None => default.slots as u32,
            Some(n) if (1..=120).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                self.rep.error(
                    n.span(),
                    format!("`sub_windows` is {}; it must be 1 to 120", n.get_ref()),
                    None,
                );
                default.slots as u32
            }
        };
        let slot = window / slots;
        if slot < MIN_SUB_WINDOW {
            let span = raw
                .window
                .as_ref()
                .map(|w| w.span())
                .or(raw.sub_windows.as_ref().map(|n| n.span()));
            self.rep.error(
                span.unwrap_or(0..0),
                format!(
                    "stats: sub-windows of {} are too short",
                    humantime::format_duration(slot)
                ),
                Some(format!(
                    "each sub-window (window / sub_windows) must be at least {}",
                    humantime::format_duration(MIN_SUB_WINDOW)
                )),
            );
            return default;
        }
        WindowConfig {
            slots: slots as usize,
            slot,
        }
    }

    fn listener(&mut self, raw: &RawListener, group_names: &[&str], groups: &[Group]) -> Listener {
        let name = raw.name.get_ref().clone();
        let addrs = self.listen_addrs(raw, &name);
        if raw.primary.is_none() && raw.routes.is_empty() {
            self.rep.error(
                raw.name.span(),
                format!(
                    "listener `{name}` has no primary group, so it could send nothing anywhere"
                ),
                Some("add primary = \"GROUP\" (a [[group]]'s name)".into()),
            );
        }
        let members = self.members(&name, raw.primary.as_ref(), &raw.backups, group_names);
        if raw.primary.is_none()
            && let Some(b) = raw.backups.first()
        {
            self.rep.error(
                b.span(),
                format!("listener `{name}` has backups but no primary group"),
                Some("add primary = \"GROUP\", or move the groups into a route".into()),
            );
        }
        self.loops(&name, &addrs, &members, groups, raw);
        let routes = self.routes(raw, &addrs, group_names, groups);
        let policy = self.unit_policy(("listener", &name), raw.policy.as_ref(), &members);
        Listener {
            policy,
            acl: Acl {
                allow: raw.allow.as_ref().map(|a| self.cidrs(&name, a, "allow")),
                deny: self.cidrs(&name, &raw.deny, "deny"),
            },
            connect_timeout: self.duration(
                raw.connect_timeout.as_ref(),
                "connect_timeout",
                DEFAULT_CONNECT_TIMEOUT,
            ),
            idle_timeout: self.duration(
                raw.idle_timeout.as_ref(),
                "idle_timeout",
                DEFAULT_IDLE_TIMEOUT,
            ),
            connect_attempts: self.attempts(raw.connect_attempts.as_ref()),
            retry_on_early_reset: raw.retry_on_early_reset.unwrap_or(false),
            splice: raw.splice.unwrap_or(true),
            limits: self.limits(raw),
            first_byte_timeout: raw
                .first_byte_timeout
                .as_ref()
                .map(|d| self.duration(Some(d), "first_byte_timeout", DEFAULT_CONNECT_TIMEOUT)),
            socket: self.socket_options(raw),
            proxy_protocol: self.proxy_protocol(raw),
            access_log: None,
            knock: self.knock(raw),
            client_hello_timeout: self.client_hello_timeout(raw),
            tls: self.tls_terminate(&name, raw.tls.as_ref()),
            routes,
            unit_of: None,
            name,
            addrs: addrs.into_iter().map(|(a, _)| a).collect(),
            listen: raw
                .listen
                .get_ref()
                .iter()
                .map(|s| s.get_ref().clone())
                .collect(),
            groups: members,
        }
    }

    /// The groups of listener (or route) `name`: the primary first, then
    /// the backups, as indices into the groups; an unknown or repeated
    /// group is reported and left out.
    pub(super) fn members(
        &mut self,
        name: &str,
        primary: Option<&S<String>>,
        backups: &[S<String>],
        group_names: &[&str],
    ) -> Vec<usize> {
        let mut members = Vec::new();
        for (i, g) in primary.into_iter().chain(backups).enumerate() {
            let role = if i == 0 && primary.is_some() {
                "primary"
            } else {
                "backup"
            };
            let Some(idx) = group_names.iter().position(|n| n == g.get_ref()) else {
                self.rep.error(
                    g.span(),
                    format!(
                        "listener `{name}`: {role} group `{}` is not defined",
                        g.get_ref()
                    ),
                    did_you_mean(g.get_ref(), group_names.iter().copied())
                        .or_else(|| Some("define it with a [[group]] table".into())),
                );
                continue;
            };
            if members.contains(&idx) {
                let hint = if i > 0 && idx == members[0] {
                    "a backup must be a different group than the primary"
                } else {
                    "list each group once"
                };
                self.rep.error(
                    g.span(),
                    format!(
                        "listener `{name}`: group `{}` is used twice (as {role})",
                        g.get_ref()
                    ),
                    Some(hint.into()),
                );
                continue;
            }
            members.push(idx);
        }
        members
    }

    fn limits(&mut self, raw: &RawListener) -> Limits {
        Limits {
            max_connections: self.count(
                raw.max_connections.as_ref(),
                "max_connections",
                1,
                10_000_000,
            ),
            max_connections_per_source: self.count(
                raw.max_connections_per_source.as_ref(),
                "max_connections_per_source",
                1,
                10_000_000,
            ),
        }
    }

    /// Every bound address with the index of the `listen` entry it came from.
    fn listen_addrs(&mut self, raw: &RawListener, name: &str) -> Vec<(SocketAddr, usize)> {
        if raw.listen.get_ref().is_empty() {
            self.rep.error(
                raw.listen.span(),
                format!("listener `{name}` listens on nothing"),
                Some(r#"add an address, e.g. listen = ["127.0.0.1:8080"]"#.into()),
            );
        }
        let mut out = Vec::new();
        for (i, entry) in raw.listen.get_ref().iter().enumerate() {
            match parse_listen(entry.get_ref()) {
                Ok(addrs) => out.extend(addrs.into_iter().map(|a| (a, i))),
                Err(why) => self
                    .rep
                    .error(entry.span(), format!("listener `{name}`: {why}"), None),
            }
        }
        out
    }

    /// A backend that is the listener's own address would proxy to itself
    /// forever.
    pub(super) fn loops(
        &mut self,
        name: &str,
        addrs: &[(SocketAddr, usize)],
        members: &[usize],
        groups: &[Group],
        raw: &RawListener,
    ) {
        for &g in members {
            for b in &groups[g].backends {
                if let Some((a, i)) = addrs.iter().find(|(a, _)| addrs_collide(*a, b.addr)) {
                    self.rep.error(
                        raw.listen.get_ref()[*i].span(),
                        format!(
                            "listener `{name}` listens on {a} and group `{}` sends to backend {}: a loop",
                            groups[g].name, b.addr
                        ),
                        Some("point the backend at the real service, not at this listener".into()),
                    );
                }
            }
        }
    }

    /// Two listeners (or two entries of one) claiming the same address:port:
    /// the outage where a new service took 8080 and traffic went elsewhere.
    fn conflicts(&mut self, raw: &[RawListener], listeners: &[Listener]) {
        let mut claimed: Vec<(SocketAddr, usize)> = Vec::new();
        for (li, l) in listeners.iter().enumerate() {
            let mut reported = Vec::new();
            for addr in l.all_addrs() {
                let Some(&(other, oi)) = claimed.iter().find(|(a, _)| addrs_collide(*a, addr))
                else {
                    claimed.push((addr, li));
                    continue;
                };
                if reported.contains(&oi) {
                    continue;
                }
                reported.push(oi);
                let knock = [(li, addr), (oi, other)]
                    .into_iter()
                    .find(|&(i, a)| listeners[i].knock_addrs().contains(&a))
                    .map_or(String::new(), |(i, a)| {
                        format!("; {a} is a knock port of `{}`", listeners[i].name)
                    });
                let message = if oi == li {
                    format!(
                        "listener `{}` claims port {} twice ({other} and {addr}){knock}",
                        l.name,
                        addr.port()
                    )
                } else {
                    format!(
                        "listeners `{}` and `{}` both claim port {} ({other} and {addr}){knock}",
                        listeners[oi].name,
                        l.name,
                        addr.port()
                    )
                };
                self.rep.error(
                    raw[li].listen.span(),
                    message,
                    Some("give each listener its own address:port; two services on one port send traffic to the wrong one".into()),
                );
            }
        }
    }

    /// The policy of a listener or route (`owner`: what it is, its name),
    /// which needs a backup group among `members` to move traffic to.
    pub(super) fn unit_policy(
        &mut self,
        (kind, name): (&str, &str),
        raw: Option<&S<String>>,
        members: &[usize],
    ) -> Option<PolicyRef> {
        let raw = raw?;
        let policy = self.policy(name, raw)?;
        if members.len() < 2 {
            self.rep.error(
                raw.span(),
                format!(
                    "{kind} `{name}`: policy `{}` needs a backup group to move traffic to",
                    policy.name
                ),
                Some(format!("add backups = [\"...\"] to the {kind}")),
            );
        }
        Some(policy)
    }

    fn policy(&mut self, listener: &str, raw: &S<String>) -> Option<PolicyRef> {
        let name = raw.get_ref();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // Only a `.toml` file is read as a path, and a relative one only
        // from the config's folder: a value like `/etc/shadow` must not
        // make portshift read (and quote in its error) an arbitrary file.
        let is_path = name.ends_with(".toml");
        if !is_path && (name.contains('/') || name.contains('\\')) {
            self.rep.error(
                raw.span(),
                format!("listener `{listener}`: policy `{name}` is neither a policy name nor a .toml file"),
                Some("name a policy in the policies/ folder next to the config (e.g. \"failover\"), or a file ending in .toml (relative paths are read from the config's folder)".into()),
            );
            return None;
        }
        let path = if is_path {
            dir.join(name)
        } else {
            dir.join("policies").join(format!("{name}.toml"))
        };
        if path.is_file() {
            let policy = policy::load(name, &path, &mut self.rep.diagnostics)?;
            return Some(PolicyRef {
                name: name.clone(),
                path,
                policy,
            });
        }
        let known = known_policies(&dir.join("policies"));
        let hint = if is_path {
            Some("name a policy file that exists (paths are relative to the config file)".into())
        } else {
            did_you_mean(name, known.iter().map(String::as_str)).or_else(|| {
                Some(format!(
                    "put the policy in {}",
                    dir.join("policies").display()
                ))
            })
        };
        self.rep.error(
            raw.span(),
            format!(
                "listener `{listener}`: policy `{name}` not found (looked for {})",
                path.display()
            ),
            hint,
        );
        None
    }

    pub(super) fn cidrs(&mut self, listener: &str, raw: &[S<String>], key: &str) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for entry in raw {
            let text = entry.get_ref();
            match text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(net) => nets.push(net),
                Err(_) => self.rep.error(
                    entry.span(),
                    format!(
                        "listener `{listener}`: `{text}` in `{key}` is not a CIDR or IP address"
                    ),
                    Some("write e.g. \"127.0.0.0/8\", \"::1/128\" or \"10.1.2.3\"".into()),
                ),
            }
        }
        if key == "allow" && raw.is_empty() {
            self.rep.error_file(
                format!("listener `{listener}`: `allow` is empty, so no client could connect"),
                Some("list the sources to admit, or remove `allow` to admit all".into()),
            );
        }
        nets
    }

    pub(super) fn duration(
        &mut self,
        raw: Option<&S<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        raw.and_then(|r| self.rep.duration(r, key, true))
            .unwrap_or(default)
    }

    /// An optional count within `min..=max`.
    fn count(&mut self, raw: Option<&S<u32>>, key: &str, min: u32, max: u32) -> Option<u32> {
        let n = raw?;
        if !(min..=max).contains(n.get_ref()) {
            self.rep.error(
                n.span(),
                format!("`{key}` is {}; it must be {min} to {max}", n.get_ref()),
                None,
            );
            return None;
        }
        Some(*n.get_ref())
    }

    fn socket_options(&mut self, raw: &RawListener) -> SocketOptions {
        let d = SocketOptions::default();
        let keepalive = raw.keepalive.as_ref().map(|k| {
            let k = k.get_ref();
            let time = self.duration(k.time.as_ref(), "keepalive.time", Duration::from_secs(60));
            let interval = self.duration(k.interval.as_ref(), "keepalive.interval", Duration::from_secs(10));
            for (v, key) in [(time, "keepalive.time"), (interval, "keepalive.interval")] {
                if v < Duration::from_secs(1) || v.subsec_nanos() != 0 {
                    let span = if key.ends_with("time") { k.time.as_ref() } else { k.interval.as_ref() }.map_or(0..0, |s| s.span());
                    self.rep.error(span, format!("`{key}` must be whole seconds, at least 1s (the kernel counts in seconds)"), None);
                }
            }
            Keepalive { time, interval, count: self.count(k.count.as_ref(), "keepalive.count", 1, 127).unwrap_or(6) }
        });
        SocketOptions {
            backlog: self
                .count(raw.backlog.as_ref(), "backlog", 1, 65_535)
                .unwrap_or(d.backlog),
            nodelay: raw.nodelay.unwrap_or(d.nodelay),
            keepalive,
            send_buffer: self.count(raw.send_buffer.as_ref(), "send_buffer", 4096, 64 << 20),
            recv_buffer: self.count(raw.recv_buffer.as_ref(), "recv_buffer", 4096, 64 << 20),
        }
    }

    fn attempts(&mut self, raw: Option<&S<u32>>) -> u32 {
        match raw {
            None => DEFAULT_CONNECT_ATTEMPTS,
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 32 => {
                self.rep.error(
                    n.span(),
                    format!("`connect_attempts` is {}; it must be 1 to 32", n.get_ref()),
                    None,
                );
                DEFAULT_CONNECT_ATTEMPTS
            }
            Some(n) => *n.get_ref(),
        }
    }
}

fn known_policies(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}
