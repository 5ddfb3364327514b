//! The layers point one way, checked on the source: every `crate::X`
//! path a module names is an edge of the import graph, and only the edges
//! listed in `ALLOWED` may exist. The pure core names nothing of the crate
//! but itself, and no crate outside std, hdrhistogram and arc-swap; it
//! never reads a clock or touches a socket. `cargo test --test
//! architecture -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may name.
/// core ← config ← proxy/sim ← CLI, with telemetry and access_log beside.
const ALLOWED: &[(&str, &[&str])] = &[
    ("core", &[]),
    ("config", &["core"]),
    ("telemetry", &["core"]),
    ("access_log", &[]),
    ("signals", &[]),
    ("systemd", &[]),
    ("http_client", &[]),
    ("etcd", &["http_client"]),
    ("decision_record", &["core"]),
    (
        "proxy",
        &[
            "core",
            "config",
            "telemetry",
            "access_log",
            "signals",
            "decision_record",
            "etcd",
            "http_client",
            "systemd",
        ],
    ),
    ("sim", &["core", "config", "access_log", "decision_record"]),
    ("backend", &[]),
    ("load", &["backend"]),
    ("diagnose", &["config", "core", "telemetry", "etcd"]),
    ("port_audit", &["config", "diagnose", "http_client"]),
    (
        "demo",
        &[
            "backend",
            "config",
            "core",
            "load",
            "proxy",
            "telemetry",
            "decision_record",
        ],
    ),
];

/// Crates the core may use besides itself and std.
const CORE_CRATES: &[&str] = &["std", "hdrhistogram", "arc_swap"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's code without its unit tests (which may use anything; a
/// `tests.rs` file is all unit tests).
fn code_of(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    text.split("#[cfg(test)]").next().unwrap_or("").to_owned()
}

/// The top-level module a file belongs to (`src/proxy/admin/mod.rs` →
/// `proxy`); `None` for the crate roots.
fn module_of(src: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Every `crate::NAME` a piece of code names.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
        rest = after;
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let Some(module) = module_of(&src, &path) else {
            continue;
        };
        let deps = crate_paths(&code_of(&path));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    graph
}

#[test]
fn modules_import_only_the_layers_below() {
    let graph = graph();
    for (module, deps) in &graph {
        let list: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("{module} -> {}", list.join(" "));
    }
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    for (module, deps) in &graph {
        let Some(may) = allowed.get(module.as_str()) else {
            panic!("module `{module}` is not placed in a layer: add it to ALLOWED");
        };
        for dep in deps {
            assert!(
                may.contains(&dep.as_str()),
                "`{module}` names `crate::{dep}`, which its layer may not use (allowed: {may:?})"
            );
        }
    }
}

#[test]
fn core_uses_no_other_crate_and_no_clock_or_socket() {
    let core = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&core, &mut files);
    assert!(files.len() >= 4, "found the core modules: {files:?}");
    let forbidden = [
        "tokio::",
        "Instant::now",
        "SystemTime::now",
        "TcpStream",
        "TcpListener",
        "UdpSocket",
        "thread::sleep",
    ];
    for path in files {
        let code = code_of(&path);
        for word in forbidden {
            assert!(
                !code.contains(word),
                "{} mentions `{word}`: core must stay pure",
                path.display()
            );
        }
        for line in code.lines().map(str::trim) {
            let Some(used) = line.strip_prefix("use ") else {
                continue;
            };
            let root: String = used
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                matches!(root.as_str(), "crate" | "super" | "self")
                    || CORE_CRATES.contains(&root.as_str()),
                "{}: `use {used}`: core may use only {CORE_CRATES:?}",
                path.display()
            );
        }
    }
}
