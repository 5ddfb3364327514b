//! A real etcd (Debian's etcd-server) started by the test on free loopback
//! ports with its own data directory, and the fencing that keeps a stalled
//! leader from writing over its successor, checked against it directly.

use crate::common::have_tool;
use portshift::etcd::Etcd;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An etcd server of the test's own; killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    pub client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("loopback binds")
}

impl EtcdServer {
    pub async fn start() -> EtcdServer {
        let mut s = EtcdServer {
            child: None,
            client: free_port(),
            peer: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        s.resume().await;
        s
    }

    /// The endpoint as a `[fleet] etcd` entry.
    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Starts (again) on the same ports and data, and waits until it
    /// answers.
    pub async fn resume(&mut self) {
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", "test", "--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("etcd.log")).expect("log file"))
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let etcd = Etcd::new(&[self.client.to_string()]);
        let start = Instant::now();
        while etcd.range_prefix("/").await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd did not answer within 30 s; its log: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it (SIGKILL: as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A leader whose lease expired (it stalled) holds a stale election key:
/// its conditioned write is refused once a successor leads, and the
/// successor's goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leader_cannot_write_over_its_successor() {
    if !have_tool("etcd", "etcd-server") {
        return;
    }
    let server = EtcdServer::start().await;
    let etcd = Etcd::new(&[server.client.to_string()]);
    let first = etcd.grant(Duration::from_secs(2)).await.unwrap();
    let old = etcd.campaign("/t/election", first, b"old").await.unwrap();
    let wrote = etcd.put_if_leader(&old, "/t/weights", b"1").await.unwrap();
    assert!(wrote.is_some(), "the leader writes");
    let second = etcd.grant(Duration::from_secs(10)).await.unwrap();
    // The new candidate waits behind the old leader until its lease ends.
    let start = Instant::now();
    let new = etcd.campaign("/t/election", second, b"new").await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took over in {:?}",
        start.elapsed()
    );
    assert_eq!(
        etcd.keepalive(first).await.unwrap(),
        0,
        "the old lease is gone"
    );
    assert_eq!(
        etcd.put_if_leader(&old, "/t/weights", b"stale")
            .await
            .unwrap(),
        None
    );
    assert!(
        etcd.put_if_leader(&new, "/t/weights", b"2")
            .await
            .unwrap()
            .is_some()
    );
    let (_, kvs) = etcd.range_prefix("/t/weights").await.unwrap();
    assert_eq!(kvs[0].value, b"2");
    let leader = etcd.leader("/t/election").await.unwrap().expect("a leader");
    assert_eq!(leader.value, b"new");
}
