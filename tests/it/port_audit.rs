//! `portshift audit` on this host: sensitive ports without an ACL, idle
//! listeners of a running instance, and sockets no listener owns.

use crate::common::*;
use serde_json::Value;
use std::process::Command;

fn audit(config: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(bin())
        .args(["audit", "--json", "-c"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let doc = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), doc)
}

fn findings(doc: &Value) -> Vec<String> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

/// A listener on Redis's port that admits everyone is a finding (exit 1);
/// the same listener with an ACL is not.
#[test]
fn a_sensitive_port_without_an_acl_is_a_finding() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:16379\"]\n[[listener]]\nname = \"cache\"\nlisten = [\"0.0.0.0:6379\"]\nprimary = \"g\"\n";
    let (code, doc) = audit(&write_config(dir.path(), text), &[]);
    assert_eq!(code, 1, "{doc}");
    let f = findings(&doc);
    assert!(
        f.iter().any(|f| f.starts_with(
            "listener `cache` serves redis's port 6379 on 0.0.0.0:6379 and admits everyone"
        )),
        "{f:?}"
    );
    assert_eq!(doc["listeners"][0]["admits_everyone"], true);
    let guarded = text.replace(
        "primary = \"g\"\n",
        "primary = \"g\"\nallow = [\"10.0.0.0/8\"]\n",
    );
    let (_, doc) = audit(&write_config(dir.path(), &guarded), &[]);
    assert!(
        !findings(&doc)
            .iter()
            .any(|f| f.contains("listener `cache`")),
        "{doc}"
    );
    assert_eq!(doc["listeners"][0]["acl"], "admits 10.0.0.0/8");
}

/// Against a running instance: the listener that carried traffic is
/// counted, the idle one is a finding; a socket of another process shows
/// with its owner; the instance's own sockets do not.
#[test]
fn a_running_instance_shows_traffic_and_idle_listeners() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(named_backend("b"));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[group]]\nname = \"g\"\nbackends = [\"{backend}\"]\n[[listener]]\nname = \"busy\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n[[listener]]\nname = \"idle\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n"
    );
    let config = write_config(dir.path(), &text);
    let (mut child, mut lines) =
        spawn_logging(Command::new(bin()).args(["run", "-c"]).arg(&config));
    let (mut busy, mut admin) = (None, None);
    for line in lines.by_ref().map_while(Result::ok) {
        if line.contains("admin listening") {
            admin = logged_addr(&line);
        } else if line.contains("listener=busy") && line.contains("listening") {
            busy = logged_addr(&line);
        }
        if busy.is_some() && admin.is_some() {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    for _ in 0..3 {
        assert_eq!(rt.block_on(read_all(busy.unwrap())).unwrap(), b"b");
    }
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let foreign_addr = foreign.local_addr().unwrap().to_string();
    let url = format!("http://{}", admin.unwrap());
    let (code, doc) = audit(&config, &["--admin", &url]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(code, 1, "{doc}");
    assert_eq!(doc["running"], true, "{doc}");
    let by_name = |n: &str| {
        doc["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("busy")["accepted_since_start"], 3, "{doc}");
    assert_eq!(by_name("idle")["accepted_since_start"], 0, "{doc}");
    let f = findings(&doc);
    assert!(
        f.iter()
            .any(|f| f.starts_with("listener `idle` has carried no connection")),
        "{f:?}"
    );
    assert!(!f.iter().any(|f| f.contains("`busy`")), "{f:?}");
    let host = doc["host_sockets"].as_array().unwrap();
    let mine = host
        .iter()
        .find(|h| h["addr"] == foreign_addr.as_str())
        .unwrap_or_else(|| panic!("{foreign_addr} not in {host:?}"));
    assert_eq!(mine["pid"], std::process::id(), "{mine}");
    assert!(
        !host.iter().any(|h| h["command"] == "portshift"),
        "the instance's own sockets are its listeners, not strangers: {host:?}"
    );
    drop(foreign);
}
