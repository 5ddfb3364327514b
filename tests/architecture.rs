//! Architecture invariant: `src/core` is pure. It never reads a clock,
//! touches a socket or depends on tokio, so the simulator and unit tests can
//! drive it deterministically.

use std::path::Path;

#[test]
fn core_never_touches_clock_sockets_or_tokio() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let forbidden = [
        "tokio::",
        "Instant::now",
        "SystemTime::now",
        "TcpStream",
        "TcpListener",
        "UdpSocket",
        "thread::sleep",
    ];
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for word in forbidden {
            assert!(
                !text.contains(word),
                "{} mentions `{word}`: core must stay pure",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "found the core modules");
}
