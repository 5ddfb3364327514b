//! `[[listener.route]]`: routing units inside a listener, each picked by
//! the TLS server name (SNI) a client asks for, with its own groups,
//! weights and policy; validated.

use super::raw::{RawListener, RawRoute, S};
use super::validate::Validator;
use super::{Acl, Group, Limits, Listener, PolicyRef};
use crate::core::sni::NamePattern;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// How long a routed listener waits for a client's whole ClientHello by
/// default: a real client sends it at once, with its first packet.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Route names the admin API could not tell from its own path segments
/// (`/routes/{listener}/policy/pause`, `/routes/{listener}/groups/...`).
const RESERVED: &[&str] = &["policy", "groups"];

/// A route of a listener, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    /// The server names it takes; never empty, none shared with another
    /// route of the listener.
    pub sni: Vec<NamePattern>,
    /// Indexes into `Config::groups`: the primary first, then backups.
    pub groups: Vec<usize>,
    pub policy: Option<PolicyRef>,
}

/// Which listener and route a routing unit is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUnit {
    pub listener: String,
    pub route: String,
}

impl Listener {
    /// The routing unit of route `r`, as a listener of its own named
    /// `{listener}/{route}`: the listener's connection settings (timeouts,
    /// attempts, socket options, access log) with the route's groups and
    /// policy. It binds nothing and admits nothing: the listener did both
    /// before the route was picked.
    pub fn unit(&self, r: &Route) -> Listener {
        Listener {
            name: format!("{}/{}", self.name, r.name),
            addrs: Vec::new(),
            listen: Vec::new(),
            groups: r.groups.clone(),
            policy: r.policy.clone(),
            acl: Acl::default(),
            limits: Limits::default(),
            // The ClientHello was the first byte, and the listener
            // terminated TLS (if it does) before the route was picked.
            first_byte_timeout: None,
            tls: None,
            proxy_protocol: None,
            knock: None,
            routes: Vec::new(),
            unit_of: Some(RouteUnit {
                listener: self.name.clone(),
                route: r.name.clone(),
            }),
            ..self.clone()
        }
    }

    /// Every group the listener or one of its routes sends to, each once.
    pub fn all_groups(&self) -> Vec<usize> {
        let mut out = self.groups.clone();
        for g in self.routes.iter().flat_map(|r| &r.groups) {
            if !out.contains(g) {
                out.push(*g);
            }
        }
        out
    }
}

impl Validator<'_, '_> {
    /// The listener's routes; a bad one is reported and left out.
    pub(super) fn routes(
        &mut self,
        raw: &RawListener,
        addrs: &[(SocketAddr, usize)],
        group_names: &[&str],
        groups: &[Group],
    ) -> Vec<Route> {
        let name = raw.name.get_ref();
        let mut taken: HashMap<NamePattern, String> = HashMap::new();
        let mut out: Vec<Route> = Vec::new();
        for r in &raw.routes {
            let Some(route) = self.route(raw, r, group_names) else {
                continue;
            };
            if out.iter().any(|o| o.name == route.name) {
                self.rep.error(
                    r.name.span(),
                    format!("listener `{name}`: route `{}` is defined twice", route.name),
                    Some("give each route of a listener its own name".into()),
                );
                continue;
            }
            self.loops(name, addrs, &route.groups, groups, raw);
            for (p, text) in route.sni.iter().zip(r.sni.get_ref()) {
                if let Some(other) = taken.insert(p.clone(), route.name.clone()) {
                    self.rep.error(
                        text.span(),
                        format!(
                            "listener `{name}`: server name `{p}` is in routes `{other}` and `{}`",
                            route.name
                        ),
                        Some("a server name picks one route: list it in one of them".into()),
                    );
                }
            }
            out.push(route);
        }
        out
    }

    fn route(&mut self, raw: &RawListener, r: &RawRoute, group_names: &[&str]) -> Option<Route> {
        let listener = raw.name.get_ref();
        let name = r.name.get_ref();
        if name.is_empty() || name.contains('/') || RESERVED.contains(&name.as_str()) {
            self.rep.error(
                r.name.span(),
                format!("listener `{listener}`: `{name}` cannot name a route"),
                Some(format!(
                    "a route's name is not empty, has no `/` and is not {}: the admin API addresses it as /routes/{listener}/NAME/...",
                    RESERVED.join(", ")
                )),
            );
            return None;
        }
        let unit = format!("{listener}/{name}");
        let sni = self.server_names(&unit, &r.sni);
        let groups = self.members(&unit, Some(&r.primary), &r.backups, group_names);
        let policy = self.unit_policy(("route", &unit), r.policy.as_ref(), &groups);
        Some(Route {
            name: name.clone(),
            sni,
            groups,
            policy,
        })
    }

    fn server_names(&mut self, unit: &str, raw: &S<Vec<S<String>>>) -> Vec<NamePattern> {
        if raw.get_ref().is_empty() {
            self.rep.error(
                raw.span(),
                format!("route `{unit}` takes no server name"),
                Some(r#"list the names it takes, e.g. sni = ["pay.example.com", "*.pay.example.com"]"#.into()),
            );
        }
        let mut out = Vec::new();
        for text in raw.get_ref() {
            match NamePattern::parse(text.get_ref()) {
                Ok(p) if out.contains(&p) => self.rep.error(
                    text.span(),
                    format!("route `{unit}`: server name `{p}` is listed twice"),
                    None,
                ),
                Ok(p) => out.push(p),
                Err(why) => self.rep.error(
                    text.span(),
                    format!(
                        "route `{unit}`: `{}` is not a server name pattern: {why}",
                        text.get_ref()
                    ),
                    Some(
                        "write a name (`pay.example.com`) or a wildcard (`*.pay.example.com`)"
                            .into(),
                    ),
                ),
            }
        }
        out
    }

    /// `client_hello_timeout`, which only a listener with routes reads.
    pub(super) fn client_hello_timeout(&mut self, raw: &RawListener) -> Duration {
        if raw.routes.is_empty()
            && let Some(t) = &raw.client_hello_timeout
        {
            self.rep.error(
                t.span(),
                format!(
                    "listener `{}`: `client_hello_timeout` is set but the listener has no routes",
                    raw.name.get_ref()
                ),
                Some("add [[listener.route]] tables, or remove it".into()),
            );
        }
        self.duration(
            raw.client_hello_timeout.as_ref(),
            "client_hello_timeout",
            DEFAULT_CLIENT_HELLO_TIMEOUT,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::core::sni::NamePattern;
    use std::path::Path;

    const GROUPS: &str = "[[group]]\nname = \"gw\"\nbackends = [\"127.0.0.1:9\"]\n\n\
        [[group]]\nname = \"pay\"\nbackends = [\"127.0.0.1:10\"]\n\n\
        [[group]]\nname = \"dr\"\nbackends = [\"127.0.0.1:11\"]\n\n";

    /// A listener on 8443 with `head` (its own keys) and then `routes`.
    fn with(head: &str, routes: &str) -> Result<Config, String> {
        let text = format!(
            "{GROUPS}[[listener]]\nname = \"edge\"\nlisten = [\"127.0.0.1:8443\"]\n{head}\n{routes}"
        );
        Config::parse(Path::new("r.toml"), &text).map_err(|e| e.to_string())
    }

    const PAY: &str = "[[listener.route]]\nname = \"payments\"\nsni = [\"pay.example.com\", \"*.Pay.Example.com.\"]\nprimary = \"pay\"\nbackups = [\"dr\"]\n";

    #[test]
    fn a_route_is_a_unit_with_its_own_groups_and_the_listeners_settings() {
        let c = with(
            "primary = \"gw\"\nconnect_timeout = \"700ms\"\nclient_hello_timeout = \"2s\"",
            PAY,
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.client_hello_timeout, std::time::Duration::from_secs(2));
        let r = &l.routes[0];
        assert_eq!(
            r.sni,
            [
                NamePattern::Exact("pay.example.com".into()),
                NamePattern::Wildcard(".pay.example.com".into())
            ]
        );
        let unit = l.unit(r);
        assert_eq!(unit.name, "edge/payments");
        assert_eq!(unit.groups, [1, 2]);
        assert_eq!(unit.connect_timeout, l.connect_timeout);
        assert!(unit.addrs.is_empty() && unit.routes.is_empty());
        assert_eq!(l.all_groups(), [0, 1, 2]);
    }

    #[test]
    fn a_listener_with_routes_needs_no_primary() {
        let c = with("", PAY).unwrap();
        assert!(c.listeners[0].groups.is_empty());
        assert!(c.describe().contains("no match: closed (no primary)"));
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        let route = |name: &str, sni: &str, rest: &str| {
            format!(
                "[[listener.route]]\nname = \"{name}\"\nsni = [{sni}]\nprimary = \"pay\"\n{rest}\n"
            )
        };
        for (head, routes, want) in [
            (
                "",
                String::new(),
                "r.toml:14:8: error: listener `edge` has no primary group",
            ),
            (
                "backups = [\"dr\"]",
                route("a", "\"a.com\"", ""),
                "listener `edge` has backups but no primary group",
            ),
            (
                "",
                route("a", "", ""),
                "route `edge/a` takes no server name",
            ),
            (
                "",
                route("a", "\"*.*.a.com\"", ""),
                "`*` may only stand alone",
            ),
            (
                "",
                route("a", "\"a.com\", \"A.com.\"", ""),
                "server name `a.com` is listed twice",
            ),
            (
                "",
                route("a", "\"a.com\"", "") + &route("b", "\"A.COM\"", ""),
                "server name `a.com` is in routes `a` and `b`",
            ),
            (
                "",
                route("a", "\"a.com\"", "") + &route("a", "\"b.com\"", ""),
                "route `a` is defined twice",
            ),
            (
                "",
                route("policy", "\"a.com\"", ""),
                "`policy` cannot name a route",
            ),
            (
                "",
                route("a/b", "\"a.com\"", ""),
                "`a/b` cannot name a route",
            ),
            (
                "",
                route("a", "\"a.com\"", "backups = [\"nope\"]"),
                "backup group `nope` is not defined",
            ),
            (
                "",
                route("a", "\"a.com\"", "policy = \"nopolicy\""),
                "listener `edge/a`: policy `nopolicy` not found",
            ),
            (
                "",
                route("a", "\"a.com\"", "policy = \"failover\""),
                "route `edge/a`: policy `failover` needs a backup group",
            ),
            (
                "primary = \"gw\"\nclient_hello_timeout = \"1s\"",
                String::new(),
                "`client_hello_timeout` is set but the listener has no routes",
            ),
            (
                "",
                route("a", "\"a.com\"", "unknown = 1"),
                "unknown field `unknown`",
            ),
        ] {
            let err = with(head, &routes).expect_err(want);
            assert!(err.contains(want), "want {want:?} in:\n{err}");
        }
    }

    #[test]
    fn a_route_that_sends_to_its_own_listener_is_a_loop() {
        let text = format!(
            "{GROUPS}[[group]]\nname = \"self\"\nbackends = [\"127.0.0.1:8443\"]\n\n\
             [[listener]]\nname = \"edge\"\nlisten = [\"127.0.0.1:8443\"]\n\
             [[listener.route]]\nname = \"a\"\nsni = [\"a.com\"]\nprimary = \"self\"\n"
        );
        let err = Config::parse(Path::new("r.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a loop"), "{err}");
    }
}
