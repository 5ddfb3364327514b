//! Architecture invariant: `src/core` is pure. It never reads a clock,
//! touches a socket or depends on tokio, so the simulator and unit tests can
//! drive it deterministically.

use std::path::{Path, PathBuf};

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

#[test]
fn core_never_touches_clock_sockets_or_tokio() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"),
        &mut files,
    );
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
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests may spawn threads; the rule is about the core's code.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for word in forbidden {
            assert!(
                !code.contains(word),
                "{} mentions `{word}`: core must stay pure",
                path.display()
            );
        }
    }
}
