//! The documentation stays true to the code: every metric the code can
//! register is in docs/metrics.md, every config key in docs/config.md,
//! every policy key in docs/policies.md, and every relative link in the
//! README, ARCHITECTURE.md and docs/ points at a file that exists. Nothing
//! points outside the repository.

use crate::common::repo_path;
use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The serde field names of every `struct Raw…` in a source file: each
/// field's name, or its `#[serde(rename = "…")]`.
fn raw_keys(source: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut in_raw = false;
    let mut rename: Option<String> = None;
    for line in source.lines().map(str::trim) {
        if line.starts_with("pub struct Raw") || line.starts_with("struct Raw") {
            in_raw = line.ends_with('{');
            continue;
        }
        if !in_raw {
            continue;
        }
        if line == "}" {
            in_raw = false;
        } else if let Some(r) = line.split("rename = \"").nth(1) {
            rename = r.split('"').next().map(str::to_owned);
        } else if let Some(field) = line.strip_prefix("pub ").or(Some(line))
            && let Some((name, _)) = field.split_once(':')
            && !name.contains(' ')
            && !name.starts_with("//")
        {
            keys.push(rename.take().unwrap_or_else(|| name.to_owned()));
        }
    }
    keys
}

/// Every `"portshift_…"` string literal in a source file.
fn metric_names(source: &str) -> Vec<String> {
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("portshift_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

fn missing_from(page: &str, names: &[String]) -> Vec<String> {
    let text = read(page);
    names
        .iter()
        .filter(|n| {
            // A key in backticks, a metric with labels, or a table heading.
            let forms = [
                format!("`{n}`"),
                format!("`{n}{{"),
                format!("[{n}]"),
                format!(".{n}]"),
            ];
            !forms.iter().any(|f| text.contains(f.as_str()))
        })
        .cloned()
        .collect()
}

#[test]
fn every_metric_is_documented() {
    let mut names = metric_names(&read("src/telemetry/mod.rs"));
    names.extend(metric_names(&read("src/telemetry/histogram.rs")));
    assert!(names.len() >= 15, "found the metric names: {names:?}");
    let missing = missing_from("docs/metrics.md", &names);
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
}

#[test]
fn every_config_key_is_documented() {
    let keys = raw_keys(&read("src/config/raw.rs"));
    assert!(keys.len() >= 30, "found the config keys: {keys:?}");
    let missing = missing_from("docs/config.md", &keys);
    assert!(missing.is_empty(), "not in docs/config.md: {missing:?}");
}

#[test]
fn every_policy_key_is_documented() {
    let keys = raw_keys(&read("src/config/policy.rs"));
    assert!(
        keys.contains(&"for".to_owned()),
        "found the policy keys: {keys:?}"
    );
    let missing = missing_from("docs/policies.md", &keys);
    assert!(missing.is_empty(), "not in docs/policies.md: {missing:?}");
}

/// The relative targets of Markdown links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = &after[..end];
        if !target.contains("://") && !target.starts_with('#') && !target.starts_with("mailto:") {
            out.push(target.split('#').next().unwrap_or("").to_owned());
        }
        rest = &after[end..];
    }
    out
}

#[test]
fn links_point_at_files_in_the_repository() {
    let root = repo_path("");
    let mut pages = vec!["README.md".to_owned(), "ARCHITECTURE.md".to_owned()];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    for page in pages {
        let text = read(&page);
        assert!(
            !text.contains("../shared"),
            "{page} points outside the repository"
        );
        let dir = Path::new(&page).parent().unwrap_or(Path::new(""));
        for target in link_targets(&text) {
            let path = root.join(dir).join(&target);
            assert!(
                path.exists(),
                "{page}: link to `{target}`, which does not exist"
            );
            let inside = path
                .canonicalize()
                .unwrap()
                .starts_with(root.canonicalize().unwrap());
            assert!(inside, "{page}: `{target}` is outside the repository");
        }
    }
}
