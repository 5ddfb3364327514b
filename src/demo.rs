//! `portshift demo`: the proxy at work on an embedded default, all on
//! loopback inside this process. Three HTTP backends (two primary, one
//! backup), one listener, and three phases of traffic: healthy, one primary
//! backend dead, the whole primary group dead. It shows where each request
//! went and that no client saw an error while any backend could serve.

use crate::backend::{self, BackendHandle, BackendOpts, Mode};
use crate::config::Config;
use crate::proxy::Proxy;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The embedded config; `{a}`, `{b}` and `{c}` become the backends' ports.
const DEMO_CONFIG: &str = r#"
[[group]]
name = "primary"
backends = ["127.0.0.1:{a}", { addr = "127.0.0.1:{b}", weight = 2 }]

[[group]]
name = "backup"
backends = ["127.0.0.1:{c}"]

[[listener]]
name = "web"
listen = ["127.0.0.1:0"]
primary = "primary"
backups = ["backup"]
connect_timeout = "1s"
"#;

/// Runs the three phases with `requests` requests each and prints a report.
pub async fn run(requests: u32) -> io::Result<()> {
    let backends = [
        start("primary-a").await?,
        start("primary-b").await?,
        start("backup-a").await?,
    ];
    let text = DEMO_CONFIG
        .replace("{a}", &backends[0].addr().port().to_string())
        .replace("{b}", &backends[1].addr().port().to_string())
        .replace("{c}", &backends[2].addr().port().to_string());
    let config =
        Config::parse(Path::new("<demo>"), &text).map_err(|e| io::Error::other(e.to_string()))?;
    let proxy = Proxy::bind(&config).map_err(io::Error::other)?;
    let addr = proxy.local_addrs()[0].1;
    let state = proxy
        .listener("web")
        .expect("the demo config defines `web`");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy.serve(async {
        let _ = stop_rx.await;
    }));

    println!("portshift demo: listener `web` on {addr}");
    println!(
        "  primary group: primary-a {} (weight 1), primary-b {} (weight 2)",
        backends[0].addr(),
        backends[1].addr()
    );
    println!("  backup group:  backup-a {}", backends[2].addr());
    println!("{requests} HTTP requests per phase, one new connection each\n");

    let mut total_errors = 0;
    let phases: [(&str, Option<usize>); 3] = [
        ("1. all healthy", None),
        ("2. primary-a crashed", Some(0)),
        (
            "3. primary-b crashed too: whole primary group down",
            Some(1),
        ),
    ];
    for (title, kill) in phases {
        if let Some(i) = kill {
            backends[i].stop().await;
        }
        let r = phase(addr, requests).await;
        total_errors += r.errors;
        print_phase(title, &r);
    }

    let _ = stop_tx.send(());
    let _ = server.await;
    let c = state.outcomes.snapshot();
    println!(
        "proxy counted: {} accepted, {} connected, {} refused upstream connects retried, {} closed for lack of a backend",
        c.accepted, c.connected, c.connect_refused, c.no_backend
    );
    println!(
        "bytes: {} client->backend, {} backend->client",
        c.bytes_up, c.bytes_down
    );
    println!("client errors: {total_errors}");
    backends[2].stop().await;
    Ok(())
}

async fn start(name: &str) -> io::Result<BackendHandle> {
    let opts = BackendOpts {
        name: name.into(),
        mode: Mode::Http,
        delay: Duration::from_millis(1),
        greeting: None,
    };
    backend::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
}

struct Phase {
    served_by: BTreeMap<String, u32>,
    errors: u32,
    elapsed: Duration,
}

async fn phase(addr: SocketAddr, requests: u32) -> Phase {
    let start = Instant::now();
    let mut served_by = BTreeMap::new();
    let mut errors = 0;
    for _ in 0..requests {
        match backend::http_get(addr).await {
            Ok(body) => *served_by.entry(body.trim().to_owned()).or_insert(0) += 1,
            Err(_) => errors += 1,
        }
    }
    Phase {
        served_by,
        errors,
        elapsed: start.elapsed(),
    }
}

fn print_phase(title: &str, r: &Phase) {
    println!("{title}  ({:.2}s)", r.elapsed.as_secs_f64());
    let total: u32 = r.served_by.values().sum::<u32>() + r.errors;
    for (name, n) in &r.served_by {
        let pct = f64::from(*n) * 100.0 / f64::from(total.max(1));
        let bar = "#".repeat((pct / 2.5).round() as usize);
        println!("   {name:<10} {n:>5}  {pct:5.1}%  {bar}");
    }
    println!("   errors     {:>5}\n", r.errors);
}
