//! The `portshift` binary as a user runs it: `check` on good and bad
//! configs, `run` failing to bind, and SIGTERM draining.

use crate::common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn portshift(args: &[&str], config_text: &str) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::copy(
        repo_path("policies/failover.toml"),
        dir.path().join("policies/failover.toml"),
    )
    .unwrap();
    let path = write_config(dir.path(), config_text);
    let out = Command::new(bin())
        .args(args)
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const GOOD: &str = r#"
[[group]]
name = "social-primary"
backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 2 }]

[[group]]
name = "social-backup"
backends = ["127.0.0.1:9101"]

[[listener]]
name = "social"
listen = ["127.0.0.1:8080", "[::1]:8080", "127.0.0.1:8100-8102"]
primary = "social-primary"
backups = ["social-backup"]
policy = "failover"
allow = ["127.0.0.0/8", "::1"]
"#;

/// `check` prints listeners -> groups -> backends with weights and policy.
#[test]
fn check_prints_what_would_run() {
    let out = portshift(&["check"], GOOD);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for want in [
        "listener social",
        "listen   127.0.0.1:8080, [::1]:8080, 127.0.0.1:8100-8102  (5 sockets)",
        "primary  social-primary",
        "100.00%",
        "backup   social-backup",
        "127.0.0.1:9002           weight 2    (66.7% of the group)",
        "policy   failover",
        "allow    127.0.0.0/8, ::1/128",
        "copy     splice(2) for bulk flows",
    ] {
        assert!(
            out.stdout.contains(want),
            "missing {want:?} in:\n{}",
            out.stdout
        );
    }
}

/// Each bad config: exit 2, and the message names line:column, the problem
/// and the fix.
#[test]
fn bad_configs_name_line_problem_and_fix() {
    check_case(
        "port conflict",
        &format!(
            "{GOOD}\n[[listener]]\nname = \"tax\"\nlisten = [\"0.0.0.0:8101\"]\nprimary = \"social-backup\"\n"
        ),
        &[
            "portshift.toml:20:10: error: listeners `social` and `tax` both claim port 8101",
            "give each listener its own address:port",
        ],
    );
    check_case(
        "range overlap within a listener",
        &GOOD.replace("\"127.0.0.1:8100-8102\"", "\"127.0.0.1:8079-8081\""),
        &["listener `social` claims port 8080 twice"],
    );
    check_case(
        "loop",
        &GOOD.replace("127.0.0.1:9101", "127.0.0.1:8080"),
        &[
            "portshift.toml:12:11: error: listener `social` listens on 127.0.0.1:8080 and group `social-backup` sends to backend 127.0.0.1:8080: a loop",
        ],
    );
    check_case(
        "unknown group",
        &GOOD.replace(
            "backups = [\"social-backup\"]",
            "backups = [\"social-bakup\"]",
        ),
        &[
            "portshift.toml:14:12: error: listener `social`: backup group `social-bakup` is not defined",
            "did you mean `social-backup`?",
        ],
    );
    check_case(
        "unknown policy",
        &GOOD.replace("\"failover\"", "\"failvoer\""),
        &["policy `failvoer` not found", "did you mean `failover`?"],
    );
    check_case(
        "policy path outside the policy folder",
        &GOOD.replace("\"failover\"", "\"/etc/shadow\""),
        &[
            "portshift.toml:15:10: error: listener `social`: policy `/etc/shadow` is neither a policy name nor a .toml file",
            "a file ending in .toml",
        ],
    );
    check_case(
        "policy name with a relative path",
        &GOOD.replace("\"failover\"", "\"../../etc/passwd\""),
        &["policy `../../etc/passwd` is neither a policy name nor a .toml file"],
    );
    check_case(
        "backup equal to primary",
        &GOOD.replace(
            "backups = [\"social-backup\"]",
            "backups = [\"social-primary\"]",
        ),
        &[
            "group `social-primary` is used twice (as backup)",
            "a backup must be a different group than the primary",
        ],
    );
    check_case(
        "group without backends",
        &GOOD.replace("backends = [\"127.0.0.1:9101\"]", "backends = []"),
        &["portshift.toml:8:12: error: group `social-backup` has no backends"],
    );
    check_case(
        "all weights zero",
        &GOOD.replace(
            "backends = [\"127.0.0.1:9101\"]",
            "backends = [{ addr = \"127.0.0.1:9101\", weight = 0 }]",
        ),
        &["group `social-backup`: every backend has weight 0"],
    );
    check_case(
        "bad duration",
        &format!("{GOOD}connect_timeout = \"3 parsecs\"\n"),
        &[
            "portshift.toml:17:19: error: `connect_timeout`: `3 parsecs` is not a duration",
            "\"250ms\"",
        ],
    );
    check_case(
        "bad backend address",
        &GOOD.replace("127.0.0.1:9101", "backup local:9101"),
        &[
            "group `social-backup`: backend `backup local:9101` is neither `ip:port` nor `host:port`",
        ],
    );
    check_case(
        "bad listen address",
        &GOOD.replace("\"[::1]:8080\"", "\"[::1]:80800\""),
        &["listener `social`: `80800` is not a port"],
    );
    check_case(
        "bad cidr",
        &GOOD.replace("\"::1\"", "\"127.0.0.0/33\""),
        &["`127.0.0.0/33` in `allow` is not a CIDR or IP address"],
    );
    check_case(
        "unknown key",
        &GOOD.replace(
            "{ addr = \"127.0.0.1:9002\", weight = 2 }",
            "{ addr = \"127.0.0.1:9002\", weigth = 2 }",
        ),
        &[
            "portshift.toml:4:",
            "unknown field `weigth`",
            "did you mean `weight`?",
        ],
    );
    check_case(
        "zero connection limit",
        &format!("{GOOD}max_connections = 0\n"),
        &["portshift.toml:17:19: error: `max_connections` is 0; it must be 1 to 10000000"],
    );
    check_case(
        "backlog out of range",
        &format!("{GOOD}backlog = 100000\n"),
        &["`backlog` is 100000; it must be 1 to 65535"],
    );
    check_case(
        "sub-second keepalive",
        &format!("{GOOD}keepalive = {{ time = \"500ms\" }}\n"),
        &["`keepalive.time` must be whole seconds, at least 1s"],
    );
    check_case(
        "tiny socket buffer",
        &format!("{GOOD}send_buffer = 100\n"),
        &["`send_buffer` is 100; it must be 4096 to 67108864"],
    );
    check_case(
        "non-loopback admin without token",
        &format!("[admin]\nlisten = \"0.0.0.0:9900\"\n{GOOD}"),
        &["admin: 0.0.0.0:9900 is not a loopback address and no token is configured"],
    );
    let fleet = |body: &str| {
        format!("[admin]\nlisten = \"127.0.0.1:9900\"\n[fleet]\nname = \"edge\"\n{body}\n{GOOD}")
    };
    check_case(
        "fleet with a TLS etcd URL",
        &fleet("etcd = [\"https://10.0.0.1:2379\"]"),
        &[
            "portshift.toml:5:9: error: fleet: etcd endpoint `https://10.0.0.1:2379` uses TLS",
            "reach etcd over http",
        ],
    );
    check_case(
        "fleet with a malformed etcd URL and a short stale_after",
        &fleet("etcd = [\"127.0.0.1:2379\"]\nlease_ttl = \"10s\"\nstale_after = \"5s\""),
        &[
            "fleet: etcd endpoint `127.0.0.1:2379` is not an http:// URL",
            "`fleet.stale_after` (5s) is shorter than `fleet.lease_ttl` (10s)",
        ],
    );
    check_case(
        "fleet with a sub-second lease and an unknown key",
        &fleet("etcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"500ms\"\nleader = \"me\""),
        &["unknown field `leader`"],
    );
    check_case(
        "fleet lease below two seconds",
        &fleet("etcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"1s\""),
        &["`fleet.lease_ttl` must be whole seconds from 2s to 600s"],
    );
    check_case(
        "fleet without an admin API",
        &format!("[fleet]\nname = \"edge\"\netcd = [\"http://127.0.0.1:2379\"]\n{GOOD}"),
        &[
            "fleet: members read each other's windows through the admin API, and there is no [admin] section",
        ],
    );
    check_case(
        "fleet with the prometheus signal and no prometheus",
        &fleet(
            "etcd = [\"http://127.0.0.1:2379\"]\nsignal = \"prometheus\"\nprometheus_selector = \"{job}\"",
        ),
        &[
            "fleet: signal = \"prometheus\" needs `prometheus`",
            "`prometheus_selector` is `{job}`; it must be label matchers without braces",
        ],
    );
    check_case(
        "unknown top-level key",
        &format!("listners = []\n{GOOD}"),
        &[
            "portshift.toml:1:1: error: unknown field `listners`",
            "did you mean `listener`?",
        ],
    );
}

/// `check` prints the fleet a member would join.
#[test]
fn check_describes_the_fleet() {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:9900\"\n[fleet]\nname = \"edge\"\nmember = \"edge-a\"\netcd = [\"http://127.0.0.1:2379\", \"http://10.0.0.2:2379/\"]\n{GOOD}"
    );
    let out = portshift(&["check"], &text);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("fleet `edge` as member `edge-a` on etcd 127.0.0.1:2379, 10.0.0.2:2379: lease 5s, decides alone after 15s without fresh fleet weights; inputs from every member's windows, merged"),
        "{}",
        out.stdout
    );
}

/// Every problem is reported in one run, not just the first.
#[test]
fn all_problems_reported_at_once() {
    let text = GOOD
        .replace("\"failover\"", "\"nope\"")
        .replace("127.0.0.1:9101", "nonsense")
        .replace("\"::1\"", "\"::1/200\"");
    let out = portshift(&["check"], &text);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("3 problems found; nothing was started"),
        "{}",
        out.stderr
    );
}

fn check_case(name: &str, text: &str, wants: &[&str]) {
    let out = portshift(&["check"], text);
    assert_eq!(
        out.code, 2,
        "{name}: want exit 2, got {}\n{}",
        out.code, out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "{name}: nothing printed as if it ran"
    );
    for want in wants {
        assert!(
            out.stderr.contains(want),
            "{name}: missing {want:?} in:\n{}",
            out.stderr
        );
    }
}

/// `run` with a bad config exits 2 and binds nothing.
#[test]
fn run_with_bad_config_starts_nothing() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    drop(held);
    let text = format!(
        "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:1\"]\n[[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:{port}\"]\nprimary = \"gg\"\n"
    );
    let out = portshift(&["run"], &text);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("primary group `gg` is not defined"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening"));
}

/// `run` with a group none of whose sources gives a backend exits 2,
/// naming the group, and binds nothing.
#[test]
fn run_without_any_backend_for_a_group_exits_2() {
    let text = "[[group]]\nname = \"payments\"\nbackends = [{ file = \"absent.json\" }]\n\
                [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"payments\"\n";
    let out = portshift(&["run"], text);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("group `payments` has no backend"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening"));
}

/// A port held by another process: exit non-zero, naming listener and port.
#[test]
fn bind_failure_names_listener_and_port() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let text = format!(
        "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:1\"]\n\
         [[listener]]\nname = \"first\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n\
         [[listener]]\nname = \"taken\"\nlisten = [\"127.0.0.1:{port}\"]\nprimary = \"g\"\n"
    );
    let out = portshift(&["run"], &text);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "listener `taken`: cannot bind 127.0.0.1:{port} (port {port})"
        )),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("another process holds this port"));
    assert!(
        !out.stderr.contains("listening"),
        "nothing started accepting: {}",
        out.stderr
    );
}

/// SIGTERM: new connections are refused, the in-flight one finishes, exit 0.
#[test]
fn sigterm_stops_accepting_and_drains() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_backend());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &echo_config(echo.addr(), ""));
    let (mut child, mut lines) = spawn_logging(Command::new(bin()).args(["run", "-c"]).arg(&path));
    let addr: SocketAddr = loop {
        let line = lines.next().expect("proxy logs before exiting").unwrap();
        if let Some(addr) = logged_addr(&line) {
            break addr;
        }
    };
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    conn.read_exact(&mut buf).unwrap();

    send_signal(child.id(), "-TERM");
    // Wait (bounded) until the proxy says it is draining.
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("draining") {
            break;
        }
    }
    assert!(
        TcpStream::connect(addr).is_err(),
        "no new connections while draining"
    );
    conn.write_all(b"during").unwrap();
    if let Err(e) = conn.read_exact(&mut buf) {
        // Say what the proxy did, not just that the echo failed.
        let _ = child.kill();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        panic!(
            "the in-flight connection broke while draining ({e}); the proxy logged after the signal:\n{}",
            rest.join("\n")
        );
    }
    assert_eq!(&buf, b"during", "the in-flight connection still works");
    drop(conn);

    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "proxy exits once drained");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit 0 after drain: {status}");
}

/// `portshift demo` (the README's first command), short and plain: the
/// summary shows a shift during the fault, a return after it, and zero
/// client errors.
#[test]
fn demo_shifts_during_the_fault_and_returns_after_it() {
    let out = Command::new(bin())
        .args(["demo", "--duration", "16s", "--no-tui"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |label: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in:\n{stdout}"));
        let at = line
            .split(" at ")
            .nth(1)
            .unwrap_or_else(|| panic!("{label} never happened:\n{stdout}"));
        at.trim_end_matches(|c: char| c != 's')
            .split('s')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (fault, shift, heal, back) = (
        value("fault began:"),
        value("first shift:"),
        value("fault healed:"),
        value("traffic back on primary:"),
    );
    assert!(
        fault < shift && shift < heal,
        "shift during the fault: {fault} < {shift} < {heal}"
    );
    assert!(back > heal, "return after healing: {back} > {heal}");
    assert!(stdout.contains("client errors:           0"), "{stdout}");
    assert!(stdout.contains("admin: http://127.0.0.1:"), "{stdout}");
}

/// The shipped example config is valid.
#[test]
fn shipped_example_config_checks_clean() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/portshift.toml");
    stdout_of(&["check", "-c", path]);
}

/// Every shipped policy parses and validates, and `check` shows it.
#[test]
fn shipped_policies_are_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo_path("policies")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let text = GOOD.replace(
            "policy = \"failover\"",
            &format!("policy = \"{}\"", path.display()),
        );
        let out = portshift(&["check"], &text);
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        assert!(
            out.stdout.contains(&format!("policy   {}", path.display())),
            "{}",
            out.stdout
        );
        seen += 1;
    }
    assert!(seen >= 3, "failover, canary, conservative are shipped");
}

/// A broken policy file is reported with its own path, line and column.
#[test]
fn policy_errors_name_the_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/failover.toml"),
        "[trip]\np99_above = \"250ms\"\n[recover]\np99_below = \"400ms\"\n",
    )
    .unwrap();
    let path = write_config(dir.path(), GOOD);
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("policies/failover.toml:4:13: error: recovery bar 400ms is not below the trip threshold 250ms"), "{stderr}");
}

/// SIGHUP reloads the file: a broken file is refused and logged, a good one
/// adds its listener.
#[test]
fn sighup_reloads_the_config_file() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_backend());
    let dir = tempfile::tempdir().unwrap();
    let first = echo_config(echo.addr(), "");
    let path = write_config(dir.path(), &first);
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut wait_for = |want: &str| -> String {
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains(want) {
                return line;
            }
        }
        panic!("proxy exited before logging {want:?}");
    };
    wait_for("listening");
    let hup = || send_signal(child.id(), "-HUP");

    std::fs::write(&path, "this is not toml").unwrap();
    hup();
    let refused = wait_for("config reload failed");
    assert!(refused.contains("portshift.toml:1:"), "{refused}");

    std::fs::write(
        &path,
        format!(
            "{first}\n{}",
            echo_config(echo.addr(), "")
                .split("[[listener]]")
                .nth(1)
                .map(|l| format!(
                    "[[listener]]{}",
                    l.replace("name = \"l\"", "name = \"added\"")
                ))
                .unwrap()
        ),
    )
    .unwrap();
    hup();
    let line = wait_for("listener=added");
    let addr: SocketAddr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello", "the listener added by SIGHUP serves");
    let _ = child.kill();
    let _ = child.wait();
}

/// `check` reads the admin token as `run` would: a missing or empty token
/// file, or an unset variable, is an error at its key.
#[test]
fn check_reads_the_admin_token() {
    let admin = |key: &str| format!("[admin]\nlisten = \"127.0.0.1:9900\"\n{key}\n{GOOD}");
    check_case(
        "missing token file",
        &admin("token_file = \"no-such-token\""),
        &[
            "portshift.toml:3:14: error: admin: cannot read token file",
            "no-such-token",
            "write the token into that file",
        ],
    );
    check_case(
        "unset token variable",
        &admin("token_env = \"PORTSHIFT_TEST_TOKEN_SURELY_UNSET\""),
        &["admin: environment variable PORTSHIFT_TEST_TOKEN_SURELY_UNSET is not set"],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty"), "  \n").unwrap();
    let path = write_config(
        dir.path(),
        &admin("token_file = \"empty\"").replace("policy = \"failover\"\n", ""),
    );
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin: token file") && stderr.contains("is empty"),
        "{stderr}"
    );
    std::fs::write(dir.path().join("empty"), "s3cret\n").unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("s3cret"),
        "the token is never printed"
    );
}

/// The process's caught signals, from /proc: bit n-1 for signal n.
fn caught_signals(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// A SIGHUP that arrives while portshift is still starting (reading the
/// config, binding 500 sockets) neither kills it nor is lost: it serves,
/// and the early signal becomes a reload.
#[test]
fn sighup_during_start_up_is_not_fatal() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_backend());
    let dir = tempfile::tempdir().unwrap();
    let many = vec!["\"127.0.0.1:0\""; 500].join(", ");
    let text = echo_config(echo.addr(), "")
        .replace("listen = [\"127.0.0.1:0\"]", &format!("listen = [{many}]"));
    let path = write_config(dir.path(), &text);
    let (mut child, mut lines) = spawn_logging(Command::new(bin()).args(["run", "-c"]).arg(&path));
    let pid = child.id();
    // Signal as soon as the handler is in place or binding has begun,
    // whichever is seen first.
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "the proxy starts");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        if caught_signals(pid) & 1 != 0 || fds > 30 {
            break;
        }
        std::thread::yield_now();
    }
    let pid_t = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid_t, rustix::process::Signal::HUP).unwrap();
    let mut listening = 0;
    let mut reloaded = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        listening += usize::from(line.contains(" listening"));
        if line.contains("config reloaded") {
            reloaded = true;
            break;
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP did not kill it"
    );
    assert_eq!(listening, 500, "it started serving");
    assert!(reloaded, "the early SIGHUP became a reload");
    let _ = child.kill();
    let _ = child.wait();
}

/// Logs written to a pipe carry no colour codes.
#[test]
fn piped_logs_are_plain_text() {
    let out = Command::new(bin())
        .args(["run", "-c", "/nonexistent/portshift.toml"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text:?}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_backend());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &echo_config(echo.addr(), ""));
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.contains("listening")))
        .expect("a log line");
    let _ = child.kill();
    let _ = child.wait();
    assert!(!line.contains('\u{1b}'), "no ANSI escapes: {line:?}");
}

/// `--log-format json`: one JSON object per line, for log shippers.
#[test]
fn json_logs_are_one_object_per_line() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_backend());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &echo_config(echo.addr(), ""));
    let mut child = Command::new(bin())
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.contains("listening")))
        .expect("a log line");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line).expect("the line is JSON");
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "listening", "{v}");
    assert!(v["fields"]["addr"].as_str().is_some(), "{v}");
}

/// Runs the binary with `args`, which must succeed; its stdout.
fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every subcommand the CLI has, from `--help`.
fn subcommands() -> Vec<String> {
    let help = stdout_of(&["--help"]);
    let list = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap();
    let names: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 9, "{names:?}");
    names
}

/// `portshift completions SHELL` prints a script that knows every
/// subcommand, for bash, zsh and fish.
#[test]
fn completions_name_every_subcommand() {
    let subs = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout_of(&["completions", shell]);
        assert!(script.len() > 1000, "{shell}: {} bytes", script.len());
        for s in &subs {
            assert!(
                script.contains(s.as_str()),
                "{shell} completion lacks `{s}`"
            );
        }
    }
    let out = Command::new(bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// `portshift man --dir` writes portshift.1 and a page per subcommand,
/// each a roff page naming its command; the top page lists them all.
#[test]
fn man_pages_cover_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = std::fs::read_to_string(dir.path().join("portshift.1")).unwrap();
    assert!(
        top.contains(".TH portshift 1"),
        "{}",
        &top[..200.min(top.len())]
    );
    for s in subcommands() {
        assert!(
            top.contains(&format!("portshift\\-{s}(1)")),
            "portshift.1 lists `{s}`"
        );
        let page = std::fs::read_to_string(dir.path().join(format!("portshift-{s}.1")))
            .unwrap_or_else(|e| panic!("portshift-{s}.1: {e}"));
        assert!(
            page.contains(&format!(".TH portshift-{s} 1")),
            "portshift-{s}.1: {}",
            &page[..200.min(page.len())]
        );
    }
    // Without --dir: every page on stdout.
    assert!(stdout_of(&["man"]).matches(".TH ").count() >= 10);
}

/// `--version` names the version and the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let text = stdout_of(&["--version"]);
    let commit = text
        .trim()
        .strip_prefix(&format!("portshift {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
}
