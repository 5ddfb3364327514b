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

/// Resolves `arg`: a path (contains `/` or ends in `.toml`), a name in
/// ./policies, or a shipped policy name.
pub fn resolve(arg: &str) -> Result<Resolved, String> {
    let as_path = Path::new(arg);
    let local = Path::new("policies").join(format!("{arg}.toml"));
    let (path, text) = if arg.ends_with(".toml") || arg.contains('/') {
        let text = std::fs::read_to_string(as_path)
            .map_err(|e| format!("cannot read policy {arg}: {e}"))?;
        (as_path.to_path_buf(), text)
    } else if local.is_file() {
        let text = std::fs::read_to_string(&local)
            .map_err(|e| format!("cannot read {}: {e}", local.display()))?;
        (local, text)
    } else if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| *n == arg) {
        (
            PathBuf::from(format!("policies/{arg}.toml")),
            (*text).to_owned(),
        )
    } else {
        let known: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "policy `{arg}` not found: not a file, not in ./policies, not shipped ({})",
            known.join(", ")
        ));
    };
    let name = as_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(arg)
        .to_owned();
    let policy = super::policy::parse_text(&name, &path, &text).map_err(|e| e.to_string())?;
    Ok(Resolved {
        name,
        path,
        text,
        policy,
    })
}
