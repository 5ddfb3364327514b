//! TLS server names (SNI) and the patterns routes match them with: exact
//! names and `*.suffix` wildcards, as nginx's `server_name` reads them.
//! Pure: the proxy reads the name off the wire, this decides who takes it.

use std::fmt;

/// A route's server-name pattern, normalised (lower case, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// `pay.example.com`: that name only.
    Exact(String),
    /// `*.pay.example.com`: any name ending in `.pay.example.com`, one
    /// label or more before it (`a.pay.example.com`, `a.b.pay.example.com`),
    /// never `pay.example.com` itself. Kept as the suffix with its dot.
    Wildcard(String),
}

/// Why a pattern was refused, for the config's error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPattern(pub &'static str);

impl fmt::Display for BadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A server name as compared: ASCII lower case, one trailing dot dropped.
pub fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl NamePattern {
    pub fn parse(text: &str) -> Result<NamePattern, BadPattern> {
        let t = normalise(text);
        let (wild, host) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, t.as_str()),
        };
        if host.is_empty() {
            return Err(BadPattern("a server name is empty"));
        }
        if host.contains('*') {
            return Err(BadPattern(
                "`*` may only stand alone as the first label (`*.example.com`)",
            ));
        }
        if host.len() > 253 {
            return Err(BadPattern("a server name is at most 253 characters"));
        }
        for label in host.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(BadPattern("every label between dots is 1 to 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(BadPattern(
                    "a server name has letters, digits, `-` and `_` only (write an internationalised name in its xn-- form)",
                ));
            }
        }
        Ok(if wild {
            NamePattern::Wildcard(format!(".{host}"))
        } else {
            NamePattern::Exact(host.to_owned())
        })
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// Server-name patterns, each naming what takes it (a route's index).
/// An exact name wins over any wildcard; among wildcards the longest
/// suffix wins, whatever the order they were written in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable<T> {
    exact: Vec<(String, T)>,
    /// Longest suffix first.
    wildcards: Vec<(String, T)>,
}

impl<T: Copy> NameTable<T> {
    /// The table of `patterns`; the first of two equal patterns is
    /// returned as the error (the config refuses it before this).
    pub fn new(patterns: impl IntoIterator<Item = (NamePattern, T)>) -> Result<Self, NamePattern> {
        let mut t = NameTable {
            exact: Vec::new(),
            wildcards: Vec::new(),
        };
        for (p, v) in patterns {
            let (list, key) = match &p {
                NamePattern::Exact(n) => (&mut t.exact, n.clone()),
                NamePattern::Wildcard(s) => (&mut t.wildcards, s.clone()),
            };
            if list.iter().any(|(k, _)| *k == key) {
                return Err(p);
            }
            list.push((key, v));
        }
        t.wildcards.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(t)
    }

    /// Who takes the server name `name` (as the client sent it).
    pub fn lookup(&self, name: &str) -> Option<T> {
        let name = normalise(name);
        if let Some((_, v)) = self.exact.iter().find(|(n, _)| *n == name) {
            return Some(*v);
        }
        self.wildcards
            .iter()
            .find(|(s, _)| name.len() > s.len() && name.ends_with(s.as_str()))
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> NamePattern {
        NamePattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_are_normalised_and_checked() {
        assert_eq!(
            p("Pay.Example.COM."),
            NamePattern::Exact("pay.example.com".into())
        );
        assert_eq!(p("*.pay.example.com").to_string(), "*.pay.example.com");
        for bad in [
            "",
            "*.",
            "a.*.b",
            "*foo.com",
            "a..b",
            "exa mple.com",
            "ünï.com",
        ] {
            assert!(NamePattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(NamePattern::parse(&format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn exact_beats_wildcard_and_the_longest_wildcard_wins() {
        let t = NameTable::new([
            (p("*.example.com"), 0),
            (p("*.pay.example.com"), 1),
            (p("pay.example.com"), 2),
            (p("risk.example.com"), 3),
        ])
        .unwrap();
        assert_eq!(t.lookup("pay.example.com"), Some(2));
        assert_eq!(t.lookup("PAY.example.com."), Some(2));
        assert_eq!(t.lookup("eu.pay.example.com"), Some(1));
        assert_eq!(t.lookup("a.b.pay.example.com"), Some(1));
        assert_eq!(t.lookup("risk.example.com"), Some(3));
        assert_eq!(t.lookup("www.example.com"), Some(0));
        assert_eq!(
            t.lookup("example.com"),
            None,
            "a wildcard needs a label before it"
        );
        assert_eq!(t.lookup("notexample.com"), None);
        assert_eq!(t.lookup(""), None);
    }

    #[test]
    fn a_pattern_given_twice_is_refused() {
        let e = NameTable::new([(p("a.com"), 0), (p("A.com."), 1)]).unwrap_err();
        assert_eq!(e, p("a.com"));
        assert!(NameTable::new([(p("*.a.com"), 0), (p("a.com"), 1)]).is_ok());
    }
}
