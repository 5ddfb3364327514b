//! Ephemeral port exhaustion, reproduced for real: the proxy runs in its own
//! network namespace whose `ip_local_port_range` holds only 8 ports, so the
//! 9th concurrent upstream connect fails with `EADDRNOTAVAIL`. Needs root
//! and `ip` (iproute2), which CI has; skipped, saying so, where a namespace
//! cannot be made.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Ports the namespace may use for outgoing connections.
const PORT_RANGE: (u16, u16) = (40000, 40007);
/// Fixed addresses: the namespace is private and empty, so nothing else
/// can hold them.
const PROXY: &str = "127.0.0.1:8000";
const ADMIN: &str = "127.0.0.1:8001";
const BACKEND: &str = "127.0.0.1:9000";

/// A network namespace, deleted (with whatever runs in it killed) on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("portshift-test-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        let range = format!("{} {}", PORT_RANGE.0, PORT_RANGE.1);
        ns.exec_ok(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.ip_local_port_range={range}"),
        ]);
        Some(ns)
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    fn exec_ok(&self, argv: &[&str]) {
        let st = self.command(argv).status().expect("ip netns exec runs");
        assert!(st.success(), "{argv:?} in netns {}", self.name);
    }

    fn spawn(&mut self, argv: &[&str]) {
        let child = self
            .command(argv)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("ip netns exec runs");
        self.children.push(child);
    }

    /// Runs `f` on a thread that has joined the namespace, so its sockets
    /// live there.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("netns file exists");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&fd),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the test namespace");
            f()
        })
        .join()
        .expect("netns thread finishes")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Connects to `to` from the next fixed local port above 50000, outside
/// the narrow range: the test's own connections (and their TIME_WAIT
/// leftovers) never take a port the proxy needs.
fn connect(to: &str) -> std::io::Result<TcpStream> {
    static NEXT: AtomicU16 = AtomicU16::new(50000);
    let port = NEXT.fetch_add(1, Ordering::Relaxed);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&addr(&format!("127.0.0.1:{port}")).into())?;
    s.connect_timeout(&addr(to).into(), PATIENCE)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(PATIENCE))?;
    Ok(s)
}

fn client() -> std::io::Result<TcpStream> {
    connect(PROXY)
}

/// Sends `msg` and reads it back from the echo backend; `Err` if the proxy
/// closed the connection instead.
fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    assert_eq!(got, msg, "echo came back intact");
    Ok(())
}

fn metric(name_and_labels: &str) -> f64 {
    let mut s = connect(ADMIN).expect("admin answers");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_listening(a: &'static str) {
    let deadline = Instant::now() + PATIENCE;
    while connect(a).is_err() {
        assert!(Instant::now() < deadline, "{a} listens in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ephemeral_port_exhaustion_is_counted_and_survived() {
    let Some(mut ns) = Netns::create() else {
        // .ci/run installs iproute2 and CI runs as root, so there it runs;
        // a container without CAP_SYS_ADMIN cannot make a namespace at all.
        eprintln!("SKIP: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[admin]\nlisten = \"{ADMIN}\"\n\n[[group]]\nname = \"g\"\nbackends = [\"{BACKEND}\"]\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"{PROXY}\"]\nprimary = \"g\"\nconnect_attempts = 1\n"
        ),
    );
    ns.spawn(&[bin(), "backend", "--mode", "echo", "--listen", BACKEND]);
    ns.spawn(&[bin(), "run", "-c", config.to_str().unwrap()]);

    ns.run(move || {
        wait_listening(BACKEND);
        wait_listening(PROXY);
        wait_listening(ADMIN);
        let errno =
            "portshift_upstream_connect_errors_total{listener=\"l\",errno=\"EADDRNOTAVAIL\"}";
        let before = metric(errno);
        let local = "portshift_errors_total{listener=\"l\",group=\"\",backend=\"\",kind=\"local_error\"}";
        let backend_errors = format!(
            "portshift_errors_total{{listener=\"l\",group=\"g\",backend=\"{BACKEND}\",kind=\"connect_"
        );
        let local_before = metric(local);

        // Hold connections until the proxy's connect finds no local port.
        // The range has 8; the kernel may keep one back, so the exact count
        // is not asserted, only that it ends within the range.
        let ports = usize::from(PORT_RANGE.1 - PORT_RANGE.0 + 1);
        let mut held = Vec::new();
        let refused = loop {
            assert!(
                held.len() <= ports,
                "more upstream connections than local ports"
            );
            let mut c = client().expect("the proxy keeps accepting");
            let started = Instant::now();
            match echo(&mut c, format!("held {}", held.len()).as_bytes()) {
                Ok(()) => held.push(c),
                Err(_) => break started.elapsed(),
            }
        };
        eprintln!(
            "{} upstream connections fit in {ports} local ports",
            held.len()
        );
        assert!(
            held.len() >= ports / 2,
            "only {} of {ports} ports were usable",
            held.len()
        );
        assert!(
            refused < PATIENCE,
            "the client is closed promptly, not left hanging"
        );
        assert_eq!(
            metric(errno) - before,
            1.0,
            "the failure is counted as EADDRNOTAVAIL"
        );
        // No local port is portshift's shortage, not the backend's fault.
        assert_eq!(metric(local) - local_before, 1.0, "counted as local_error");
        assert_eq!(
            metric(&backend_errors),
            0.0,
            "nothing charged to the backend"
        );

        // The held connections are untouched by the failure.
        for (i, c) in held.iter_mut().enumerate() {
            echo(c, format!("still {i}").as_bytes()).expect("held connections keep working");
        }

        // Freeing ports brings service back (TIME_WAIT ports are reused on
        // loopback: tcp_tw_reuse defaults to 2).
        held.truncate(held.len() - 2);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut c = client().expect("client connects");
            if echo(&mut c, b"back").is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "service recovers once ports free up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}
