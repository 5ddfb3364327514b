//! The policies that ship with portshift, embedded so `demo` and `sim` work
//! from any folder, and the one way to resolve a policy named on the
//! command line: a file path, a name in ./policies, or a shipped name.

use crate::core::policy::Policy;
use std::path::{Path, PathBuf};

pub const SHIPPED: [(&str, &str); 3] = [
    ("failover", include_str!("../../policies/failover.toml")),
    (
        "conservative",
        include_str!("../../policies/conservative.toml"),
    ),
    ("canary", include_str!("../../policies/canary.toml")),
];

/// A policy as resolved: its name, where it came from, its text and its
/// validated form.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub path: PathBuf,
    pub text: String,
    pub policy: Policy,
}

/// Why a policy named on the command line could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy `{name}` not found: not a file, not in ./policies, not shipped ({})", known.join(", "))]
    NotFound {
        name: String,
        known: Vec<&'static str>,
    },
    /// The file was read but is not a valid policy (file:line:col inside).
    #[error("{0}")]
    Invalid(#[from] super::ConfigError),
}

/// Resolves `arg`: a path (contains `/` or ends in `.toml`), a name in
/// ./policies, or a shipped policy name.
pub fn resolve(arg: &str) -> Result<Resolved, ResolveError> {
    let as_path = Path::new(arg);
    let local = Path::new("policies").join(format!("{arg}.toml"));
    let (path, text) = if arg.ends_with(".toml") || arg.contains('/') {
        let text = std::fs::read_to_string(as_path).map_err(|source| ResolveError::Read {
            path: as_path.to_path_buf(),
            source,
        })?;
        (as_path.to_path_buf(), text)
    } else if local.is_file() {
        let text = std::fs::read_to_string(&local).map_err(|source| ResolveError::Read {
            path: local.clone(),
            source,
        })?;
        (local, text)
    } else if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| *n == arg) {
        (
            PathBuf::from(format!("policies/{arg}.toml")),
            (*text).to_owned(),
        )
    } else {
        return Err(ResolveError::NotFound {
            name: arg.to_owned(),
            known: SHIPPED.iter().map(|(n, _)| *n).collect(),
        });
    };
    let name = as_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(arg)
        .to_owned();
    let policy = super::policy::parse_text(&name, &path, &text)?;
    Ok(Resolved {
        name,
        path,
        text,
        policy,
    })
}
