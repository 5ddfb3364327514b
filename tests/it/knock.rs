//! Port knocking: a listener admits a source only after it connected to
//! the knock ports in order within `within`, and for `open_for`; a wrong
//! order starts over; IPv4 and IPv6; a flood of sources stays bounded.
//! Real TCP on loopback, from several 127.0.0.x source addresses.

use crate::common::*;
use crate::prometheus::free_port;
use portshift::config::Config;
use portshift::proxy::Proxy;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

struct Knocking {
    name: &'static str,
    addrs: Vec<(String, SocketAddr)>,
    admin: SocketAddr,
    ports: [u16; 3],
    _echo: portshift::backend::BackendHandle,
}

/// Listener `name` (metrics are per process: one name per test).
async fn start(name: &'static str, within: &str, open_for: &str, max_sources: u32) -> Knocking {
    let echo = echo_backend().await;
    let ports = [free_port(), free_port(), free_port()];
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[group]]\nname = \"echo\"\nbackends = [\"{}\"]\n\n\
         [[listener]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\nprimary = \"echo\"\n\
         knock = {{ sequence = [{}, {}, {}], within = \"{within}\", open_for = \"{open_for}\", max_sources = {max_sources} }}\n",
        echo.addr(),
        ports[0],
        ports[1],
        ports[2]
    );
    let config = Config::parse(Path::new("knock.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::bind(&config).unwrap();
    let addrs = proxy.local_addrs();
    let admin = proxy.admin_addr().unwrap();
    tokio::spawn(proxy.serve(std::future::pending()));
    Knocking {
        name,
        addrs,
        admin,
        ports,
        _echo: echo,
    }
}

impl Knocking {
    fn listener(&self, v6: bool) -> SocketAddr {
        self.addrs
            .iter()
            .map(|(_, a)| *a)
            .find(|a| a.is_ipv6() == v6)
            .unwrap()
    }

    /// Connects from `from` to `port` on the listener's IP of the same
    /// family; what the knock port said.
    async fn knock(&self, from: IpAddr, port: u16) {
        let to = SocketAddr::new(self.listener(from.is_ipv6()).ip(), port);
        let s = connect_from(from, to).await.expect("a knock port accepts");
        let mut s = s;
        let mut buf = [0u8; 1];
        let got = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(got, Ok(0) | Err(_)),
            "a knock port says nothing: {got:?}"
        );
    }

    async fn knock_all(&self, from: IpAddr, ports: &[u16]) {
        for &p in ports {
            self.knock(from, p).await;
        }
    }

    /// Whether the listener admits `from`: an echo comes back.
    async fn admitted(&self, from: IpAddr) -> bool {
        let Ok(mut s) = connect_from(from, self.listener(from.is_ipv6())).await else {
            return false;
        };
        echoes(&mut s).await
    }

    /// `family{listener="<name>",label}`'s value.
    async fn metric(&self, family: &str, label: &str) -> u64 {
        let series = format!("{family}{{listener=\"{}\",{label}}}", self.name);
        let body = admin_get(self.admin, "/metrics").await;
        body.lines()
            .find(|l| l.starts_with(&series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = if from.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    s.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(PATIENCE, s.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

async fn echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(PATIENCE, s.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"ping"
    )
}

fn v4(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The sequence in order opens the listener to that source only, for
/// `open_for`; a connection made while open outlives the opening.
#[tokio::test]
async fn the_sequence_opens_the_listener_to_that_source_for_a_while() {
    let k = start("knock-open", "5s", "1s", 100).await;
    let [a, b, c] = k.ports;
    assert!(!k.admitted(v4(1)).await, "closed before knocking");
    k.knock_all(v4(1), &[a, b, c]).await;
    let started = std::time::Instant::now();
    assert!(k.admitted(v4(1)).await, "open after the sequence");
    assert!(!k.admitted(v4(2)).await, "only to the source that knocked");
    let mut held = connect_from(v4(1), k.listener(false)).await.unwrap();
    assert!(echoes(&mut held).await);
    // Bounded wait past open_for.
    while k.admitted(v4(1)).await {
        assert!(started.elapsed() < PATIENCE, "the opening ends");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before open_for"
    );
    assert!(
        echoes(&mut held).await,
        "an established connection is never cut"
    );
    assert_eq!(
        k.metric("portshift_knocks_total", "result=\"opened\"")
            .await,
        1
    );
    assert!(
        k.metric("portshift_denied_connections_total", "reason=\"knock\"")
            .await
            >= 3
    );
}

/// A knock out of order starts over; the right order afterwards opens.
#[tokio::test]
async fn a_wrong_order_starts_the_sequence_over() {
    let k = start("knock-order", "5s", "30s", 100).await;
    let [a, b, c] = k.ports;
    k.knock_all(v4(3), &[a, c, b]).await;
    assert!(!k.admitted(v4(3)).await, "a wrong order opens nothing");
    k.knock_all(v4(3), &[b, c]).await;
    assert!(
        !k.admitted(v4(3)).await,
        "the rest of the sequence alone opens nothing"
    );
    assert!(k.metric("portshift_knocks_total", "result=\"reset\"").await >= 2);
    k.knock_all(v4(3), &[a, b, c]).await;
    assert!(k.admitted(v4(3)).await);
}

/// IPv6 sources knock on the IPv6 address and are admitted there.
#[tokio::test]
async fn ipv6_sources_knock_too() {
    let k = start("knock-v6", "5s", "30s", 100).await;
    let six: IpAddr = "::1".parse().unwrap();
    assert!(!k.admitted(six).await);
    k.knock_all(six, &k.ports).await;
    assert!(k.admitted(six).await);
    assert!(!k.admitted(v4(1)).await, "the IPv4 loopback did not knock");
}

/// More knocking sources than `max_sources`: the state stays bounded by
/// forgetting the oldest, so a flood cannot grow it, and a source whose
/// opening was forgotten knocks again.
#[tokio::test]
async fn a_knock_flood_from_many_sources_stays_bounded() {
    let k = start("knock-flood", "5s", "30s", 20).await;
    let [a, b, c] = k.ports;
    k.knock_all(v4(10), &[a, b, c]).await;
    assert!(k.admitted(v4(10)).await);
    for n in 11..=60 {
        k.knock(v4(n), a).await;
    }
    assert!(!k.admitted(v4(10)).await, "the oldest source was forgotten");
    k.knock_all(v4(10), &[a, b, c]).await;
    assert!(k.admitted(v4(10)).await, "and can knock again");
}
