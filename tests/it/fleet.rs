//! Fleet mode end to end: three `portshift run` processes of one fleet on
//! a real etcd, real backends and real load over loopback. They shift as
//! one, survive the leader's death and stall, carry an operator's pin to
//! every member, and decide alone when etcd is gone, then rejoin.

use crate::common::*;
use crate::etcd::EtcdServer;
use portshift::load::LoadStats;
use serde_json::Value;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_millis(200);
const WINDOW: Duration = Duration::from_secs(2);
const LEASE_TTL: Duration = Duration::from_secs(2);
const STALE_AFTER: Duration = Duration::from_secs(6);
/// Scheduling slack for three proxies, etcd and the load on two cores.
const GRACE: Duration = Duration::from_secs(3);

const POLICY: &str = r#"
interval = "200ms"
window = "2s"
sub_windows = 10
signal = "exchange"
min_samples = 10

[trip]
p99_above = "150ms"
for = 3

[shift]
step = 10
max = 50
cooldown = "200ms"

[recover]
p99_below = "50ms"
for = "1s"
step = 10
cooldown = "100ms"
"#;

/// One `portshift run` member, its stderr drained into `log`.
struct Member {
    name: String,
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Member {
    fn start(
        dir: &std::path::Path,
        name: &str,
        etcd: &str,
        primary: SocketAddr,
        backup: SocketAddr,
    ) -> Member {
        Member::start_with(dir, name, etcd, (primary, backup), "", POLICY)
    }

    /// With `fleet_extra` lines in `[fleet]`, and `policy` as the policy.
    fn start_with(
        dir: &std::path::Path,
        name: &str,
        etcd: &str,
        (primary, backup): (SocketAddr, SocketAddr),
        fleet_extra: &str,
        policy: &str,
    ) -> Member {
        let sub = dir.join(name);
        std::fs::create_dir_all(sub.join("policies")).unwrap();
        std::fs::write(sub.join("policies/fast.toml"), policy).unwrap();
        let config = format!(
            r#"
[admin]
listen = "127.0.0.1:0"
[fleet]
name = "edge"
member = "{name}"
etcd = ["{etcd}"]
lease_ttl = "{}s"
stale_after = "{}s"
{fleet_extra}
[[group]]
name = "primary"
backends = ["{primary}"]
[[group]]
name = "backup"
backends = ["{backup}"]
[[listener]]
name = "l"
listen = ["127.0.0.1:0"]
primary = "primary"
backups = ["backup"]
policy = "fast"
"#,
            LEASE_TTL.as_secs(),
            STALE_AFTER.as_secs()
        );
        let path = write_config(&sub, &config);
        let mut child = Command::new(bin())
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the portshift binary starts");
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (mut listen, mut admin) = (None, None);
        while listen.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("{name} did not start listening"));
            if line.contains("admin listening") {
                admin = logged_addr(&line);
            } else {
                listen = logged_addr(&line);
            }
        }
        Member {
            name: name.to_owned(),
            child,
            listen: listen.unwrap(),
            admin: admin.unwrap(),
            log,
        }
    }

    async fn status(&self) -> Value {
        let body = admin_get(self.admin, "/status").await;
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// The weights in force on listener `l`, percent (primary, backup).
    async fn weights(&self) -> (f64, f64) {
        let s = self.status().await;
        let w = &s["listeners"][0]["weights_percent"];
        (
            w["primary"].as_f64().unwrap(),
            w["backup"].as_f64().unwrap(),
        )
    }

    /// Pins listener `l` through this member's admin API.
    async fn pin(&self, primary: u32, backup: u32) -> (u16, String) {
        let body = format!(r#"{{"primary": {primary}, "backup": {backup}}}"#);
        admin_request(self.admin, "PUT", "/routes/l/weights", &body, None)
            .await
            .expect("the admin API answers")
    }

    async fn role(&self) -> String {
        self.status().await["fleet"]["role"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = admin_get(self.admin, "/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn logged(&self, what: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(what))
    }

    fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    etcd: EtcdServer,
    primary: portshift::backend::BackendHandle,
    backup: portshift::backend::BackendHandle,
    members: Vec<Member>,
    load: Arc<LoadStats>,
    stop_load: CancellationToken,
}

impl Fleet {
    async fn start(n: usize) -> Fleet {
        Fleet::start_with(n, "", POLICY).await
    }

    async fn start_with(n: usize, fleet_extra: &str, policy: &str) -> Fleet {
        let etcd = EtcdServer::start().await;
        let primary = http_backend("primary", 5).await;
        let backup = http_backend("backup", 5).await;
        let dir = tempfile::tempdir().unwrap();
        let backends = (primary.addr(), backup.addr());
        let members = (1..=n)
            .map(|i| {
                let name = format!("m{i}");
                Member::start_with(
                    dir.path(),
                    &name,
                    &etcd.url(),
                    backends,
                    fleet_extra,
                    policy,
                )
            })
            .collect();
        let f = Fleet {
            dir,
            etcd,
            primary,
            backup,
            members,
            load: Arc::new(LoadStats::default()),
            stop_load: CancellationToken::new(),
        };
        f.until("one leader among the members", PATIENCE, async |f| {
            f.leaders(&[]).await.len() == 1
        })
        .await;
        f
    }

    /// New connections at a steady rate, spread over every member.
    fn start_load(&self, per_member: f64) {
        for m in &self.members {
            tokio::spawn(portshift::load::run(
                m.listen,
                per_member,
                Arc::clone(&self.load),
                self.stop_load.clone(),
            ));
        }
    }

    /// The leaders among `which` (all members when empty).
    async fn leaders(&self, which: &[usize]) -> Vec<usize> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        let which = if which.is_empty() { &all[..] } else { which };
        let mut out = Vec::new();
        for &i in which {
            if self.members[i].role().await == "leader" {
                out.push(i);
            }
        }
        out
    }

    async fn all_weights(&self, which: &[usize]) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        for &i in which {
            out.push(self.members[i].weights().await);
        }
        out
    }

    /// Whether every member in `which` routes by `w` (percent).
    async fn all_at(&self, which: &[usize], w: (f64, f64)) -> bool {
        self.all_weights(which).await.iter().all(|x| *x == w)
    }

    /// Three members under load, their primary slowed until all of them
    /// have shifted to the policy's maximum, 50/50.
    async fn shifted() -> Fleet {
        let f = Fleet::start(3).await;
        f.start_load(15.0);
        f.primary.set_delay(Duration::from_millis(300));
        f.until("shifted to 50/50 everywhere", PATIENCE, async |f| {
            f.all_at(&[0, 1, 2], (50.0, 50.0)).await
        })
        .await;
        f
    }

    /// Polls `cond` every 50 ms until it holds; how long that took.
    async fn until(
        &self,
        what: &str,
        limit: Duration,
        cond: impl AsyncFn(&Fleet) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !cond(self).await {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    }
}

/// The primary slows from 5 ms to 300 ms under load spread over three
/// members: every member shows the fleet's weights within window + 3
/// intervals of the first shift, and all return once it heals. An
/// operator's pin through member 2 holds on members 1 and 3, and its
/// release gives the policy back everywhere. No client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_shift_as_one_and_carry_a_pin() {
    if !have_tool("etcd", "etcd-server") {
        return;
    }
    let f = Fleet::start(3).await;
    // `diagnose` sees etcd, the members and this member among them.
    let out = Command::new(bin())
        .args(["diagnose", "-c"])
        .arg(f.dir.path().join("m1/portshift.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("fleet `edge`") && text.contains("3 member(s) [m1, m2, m3]"),
        "{text}"
    );
    assert!(
        text.contains("[ok]   member member `m1` is registered in the fleet"),
        "{text}"
    );
    f.start_load(15.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.primary.set_delay(Duration::from_millis(300));
    let fault = Instant::now();
    // When each member first shows a shift (each read timed on its own).
    let mut first = [None; 3];
    while first.iter().any(Option::is_none) {
        assert!(
            fault.elapsed() < PATIENCE,
            "not every member shifted: {first:?}"
        );
        for (i, m) in f.members.iter().enumerate() {
            if first[i].is_none() && m.weights().await.1 > 0.0 {
                first[i] = Some(fault.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let times: Vec<Duration> = first.iter().map(|t| t.unwrap()).collect();
    let spread = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    eprintln!(
        "FIGURE first shift seen by each member after the fault: {times:?}; spread {spread:?}"
    );
    assert!(
        spread <= WINDOW + 3 * INTERVAL,
        "members shifted {spread:?} apart"
    );
    let settled = f
        .until(
            "all members at the shift's maximum, identical",
            PATIENCE,
            async |f| f.all_at(&[0, 1, 2], (50.0, 50.0)).await,
        )
        .await;
    eprintln!("FIGURE all three at 50/50 {settled:?} after the last first shift");
    // Heal: traffic returns on every member.
    f.primary.set_delay(Duration::from_millis(5));
    f.until(
        "traffic back on the primary everywhere",
        PATIENCE * 2,
        async |f| f.all_at(&[0, 1, 2], (100.0, 0.0)).await,
    )
    .await;

    // A pin through member 2 holds on 1 and 3.
    let (status, body) = f.members[1].pin(30, 70).await;
    assert_eq!(status, 200, "{body}");
    f.until("the pin on every member", PATIENCE, async |f| {
        f.all_at(&[0, 1, 2], (30.0, 70.0)).await
    })
    .await;
    tokio::time::sleep(5 * INTERVAL).await;
    assert!(f.all_at(&[0, 1, 2], (30.0, 70.0)).await, "the pin holds");
    for m in &f.members {
        let s = m.status().await;
        assert_eq!(
            s["listeners"][0]["pinned"]["primary"], 30.0,
            "{}: {s}",
            m.name
        );
        assert_eq!(
            s["fleet"]["members"].as_array().unwrap().len(),
            3,
            "{}",
            m.name
        );
    }
    let (status, body) = admin_request(f.members[1].admin, "DELETE", "/routes/l/weights", "", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // Released: the healthy primary's policy takes traffic back everywhere.
    f.until(
        "the policy back on every member after release",
        PATIENCE,
        async |f| {
            let mut ok = true;
            for m in &f.members {
                let s = m.status().await;
                ok &= s["listeners"][0]["pinned"].is_null()
                    && s["listeners"][0]["weights_percent"]["primary"] == 100.0;
            }
            ok
        },
    )
    .await;
    f.stop_load.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed = f.load.failed_by();
    assert!(failed.is_empty(), "clients saw errors: {failed:?}");
    assert!(
        f.backup.replies() > 0,
        "the backup served the shifted share"
    );
    backends_change_on_every_member(&f).await;
    let _ = &f.dir;
}

/// A backend added through one member's admin API is a backend of the
/// group on every member; removed, it is gone from every member.
async fn backends_change_on_every_member(f: &Fleet) {
    let extra = f.backup.addr().to_string();
    let on_all = async |f: &Fleet, present: bool| {
        let mut ok = true;
        for m in &f.members {
            let s = m.status().await;
            let list = s["listeners"][0]["groups"][0]["backends"]
                .as_array()
                .unwrap()
                .clone();
            ok &= list.iter().any(|b| b["addr"] == extra.as_str()) == present;
        }
        ok
    };
    let body = format!(r#"{{"addr": "{extra}", "weight": 2}}"#);
    let (status, reply) = admin_request(
        f.members[1].admin,
        "POST",
        "/routes/l/groups/primary/backends",
        &body,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"fleet\":true"), "{reply}");
    f.until("the added backend on every member", PATIENCE, async |f| {
        on_all(f, true).await
    })
    .await;
    let path = format!("/routes/l/groups/primary/backends/{extra}");
    let (status, reply) = admin_request(f.members[2].admin, "DELETE", &path, "", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    f.until("the backend gone from every member", PATIENCE, async |f| {
        on_all(f, false).await
    })
    .await;
}

/// The leader dies (SIGKILL): a new one within the lease TTL and an
/// interval, weights unchanged meanwhile. Then the new leader stalls
/// (SIGSTOP) past its lease; a third takes over, and when the stalled one
/// continues its write is refused and it follows. A member joining late
/// has the fleet's weights before its first connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_survives_death_and_stall() {
    if !have_tool("etcd", "etcd-server") {
        return;
    }
    let mut f = Fleet::shifted().await;

    let dead = f.leaders(&[]).await[0];
    f.members[dead].signal("-KILL");
    let alive: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
    let killed = Instant::now();
    let mut new_leader = None;
    while new_leader.is_none() {
        assert!(killed.elapsed() < PATIENCE, "no new leader");
        for &i in &alive {
            assert_eq!(
                f.members[i].weights().await,
                (50.0, 50.0),
                "weights held during the failover"
            );
            if f.members[i].role().await == "leader" {
                new_leader = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = killed.elapsed();
    eprintln!("FIGURE leader failover after SIGKILL: {failover:?} (lease TTL {LEASE_TTL:?})");
    assert!(
        failover <= LEASE_TTL + INTERVAL + GRACE,
        "failover took {failover:?}"
    );

    // The new leader stalls until its lease expires and the third leads.
    let stalled = new_leader.unwrap();
    let third = *alive.iter().find(|&&i| i != stalled).unwrap();
    f.members[stalled].signal("-STOP");
    let stopped = Instant::now();
    f.until("the third member leads", PATIENCE, async |f| {
        f.members[third].role().await == "leader"
    })
    .await;
    eprintln!(
        "FIGURE leader takeover after SIGSTOP: {:?}",
        stopped.elapsed()
    );
    assert_eq!(f.members[third].weights().await, (50.0, 50.0));
    f.members[stalled].signal("-CONT");
    f.until("the stalled member follows again", PATIENCE, async |f| {
        f.members[stalled].role().await == "follower"
    })
    .await;
    let refused = f.members[stalled]
        .metric("portshift_fleet_rejected_writes_total")
        .await;
    assert!(
        refused >= 1.0 || f.members[stalled].logged("the lease had expired"),
        "the stalled leader neither had a write refused nor found its lease expired"
    );
    tokio::time::sleep(5 * INTERVAL).await;
    assert_eq!(
        f.all_weights(&[stalled, third]).await,
        vec![(50.0, 50.0); 2],
        "the new leader's weights stand"
    );
    assert_eq!(f.leaders(&alive).await, vec![third], "one leader");

    // A late joiner: its first answer already has the fleet's weights.
    let late = Member::start(
        f.dir.path(),
        "m4",
        &f.etcd.url(),
        f.primary.addr(),
        f.backup.addr(),
    );
    assert_eq!(
        late.weights().await,
        (50.0, 50.0),
        "a new member starts on the fleet's weights"
    );
    f.members.push(late);
    f.stop_load.cancel();
}

/// etcd stops: members keep their weights and export a growing age, then
/// decide alone after `stale_after`; etcd returns: they rejoin and take
/// the fleet's weights again. No client connection fails on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_decide_alone_without_etcd_and_rejoin() {
    if !have_tool("etcd", "etcd-server") {
        return;
    }
    let mut f = Fleet::shifted().await;
    f.etcd.stop();
    let stopped = Instant::now();
    // A pin cannot reach the fleet: refused in JSON, nothing changed.
    let (status, body) = f.members[0].pin(100, 0).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("nothing changed on any member"), "{body}");
    assert_eq!(f.members[0].weights().await, (50.0, 50.0));
    // Before stale_after: the weights hold and their age grows.
    tokio::time::sleep(STALE_AFTER / 2).await;
    for m in &f.members {
        assert_eq!(
            m.weights().await,
            (50.0, 50.0),
            "{} kept the fleet's weights",
            m.name
        );
        let age = m.metric("portshift_fleet_weights_age_seconds").await;
        assert!(age >= 1.0, "{}: age {age}", m.name);
    }
    // The primary heals while etcd is away: each member, alone, brings its
    // own traffic back once the weights are stale.
    f.primary.set_delay(Duration::from_millis(5));
    let alone = f
        .until("every member decided alone", PATIENCE * 2, async |f| {
            let mut all = true;
            for m in &f.members {
                all &= m.metric("portshift_fleet_local_decisions_total").await > 0.0;
            }
            all
        })
        .await;
    let fallback = stopped.elapsed();
    eprintln!(
        "FIGURE local decisions began {fallback:?} after etcd stopped (stale_after {STALE_AFTER:?})"
    );
    assert!(
        fallback >= STALE_AFTER,
        "fell back after {fallback:?}, before stale_after"
    );
    let _ = alone;
    f.until(
        "traffic back on the primary everywhere, decided alone",
        PATIENCE * 2,
        async |f| f.all_at(&[0, 1, 2], (100.0, 0.0)).await,
    )
    .await;
    for m in &f.members {
        assert_eq!(m.role().await, "detached", "{} lost its lease", m.name);
    }
    // etcd returns: one leader again, everyone following it.
    f.etcd.resume().await;
    let back = Instant::now();
    f.until("members rejoin with one leader", PATIENCE, async |f| {
        let roles: Vec<String> = {
            let mut r = Vec::new();
            for m in &f.members {
                r.push(m.role().await);
            }
            r
        };
        roles.iter().filter(|r| *r == "leader").count() == 1
            && roles.iter().all(|r| r != "detached")
    })
    .await;
    eprintln!(
        "FIGURE members rejoined {:?} after etcd returned",
        back.elapsed()
    );
    f.until("fresh fleet weights everywhere", PATIENCE, async |f| {
        let mut fresh = true;
        for m in &f.members {
            fresh &=
                m.metric("portshift_fleet_weights_age_seconds").await < STALE_AFTER.as_secs_f64();
        }
        fresh
    })
    .await;
    f.stop_load.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed = f.load.failed_by();
    assert!(failed.is_empty(), "clients saw errors: {failed:?}");
}

/// `signal = "prometheus"`: the leader reads the fleet's latency and errors
/// from a real Prometheus scraping the three members. The slowed primary
/// loses traffic on every member, the records name Prometheus as their
/// source, and traffic returns after healing, with no client errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_signal_moves_the_fleet() {
    if !have_tool("etcd", "etcd-server") || !have_tool("prometheus", "prometheus") {
        return;
    }
    let port = crate::prometheus::free_port();
    // A window of several scrapes: increase() needs two points in range.
    let policy = POLICY.replace("window = \"2s\"", "window = \"5s\"");
    let extra = format!(
        "signal = \"prometheus\"\nprometheus = \"http://127.0.0.1:{port}\"\nprometheus_selector = 'job=\"portshift\"'"
    );
    let f = Fleet::start_with(3, &extra, &policy).await;
    let admins: Vec<SocketAddr> = f.members.iter().map(|m| m.admin).collect();
    let _prom = crate::prometheus::PromServer::start(f.dir.path(), port, &admins).await;
    f.start_load(15.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.primary.set_delay(Duration::from_millis(300));
    let fault = Instant::now();
    f.until(
        "every member shifted on Prometheus's numbers",
        PATIENCE * 2,
        async |f| {
            let mut all = true;
            for m in &f.members {
                all &= m.weights().await.1 > 0.0;
            }
            all
        },
    )
    .await;
    eprintln!(
        "FIGURE prometheus signal: all members shifted {:?} after the fault",
        fault.elapsed()
    );
    let s = f.members[0].status().await;
    let record = &s["fleet"]["listeners"]["l"];
    assert_eq!(
        record["merged"],
        serde_json::json!(["prometheus"]),
        "{record}"
    );
    let reasons = &s["listeners"][0]["decisions"][0]["reasons"];
    assert!(
        reasons
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["fired"] == true && r["rule"] == "p99_above"),
        "the shift names the p99 rule: {reasons}"
    );
    f.primary.set_delay(Duration::from_millis(5));
    f.until(
        "traffic back on the primary everywhere",
        PATIENCE * 3,
        async |f| f.all_at(&[0, 1, 2], (100.0, 0.0)).await,
    )
    .await;
    f.stop_load.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed = f.load.failed_by();
    assert!(failed.is_empty(), "clients saw errors: {failed:?}");
}
