//! The access log: one JSON line per connection when it ends (who, when,
//! to what, how long, how many bytes, how it ended and whose side ended
//! it). The proxy writes it (`access_log` in the config, or `run --record`
//! for every listener); the simulator replays its arrivals. It is the
//! contract between the two, so it belongs to neither.
//!
//! Lines are formatted on the connection's task and handed to a writer
//! thread through a bounded queue: a slow disk never blocks accept or copy.
//! A line that finds the queue full is dropped and counted, never waited
//! for.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

/// Lines queued for the writer at most; past it lines are dropped.
pub const QUEUE_LINES: usize = 65_536;
/// How often the writer drains the queue and flushes: how long a line may
/// wait before it is in the file.
const TICK: Duration = Duration::from_millis(100);

/// One finished connection.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord<'a> {
    /// When the connection arrived (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// Seconds from the proxy's start to the arrival, on its monotonic
    /// clock: what a replay spaces arrivals by.
    #[serde(serialize_with = "seconds")]
    pub t_s: Duration,
    pub listener: &'a str,
    /// The listener's route that took it; none on a listener without routes.
    pub route: Option<&'a str>,
    /// The client: the TCP peer, or the one a trusted PROXY protocol
    /// header named.
    pub client: std::net::SocketAddr,
    /// Empty when no backend was reached.
    pub group: &'a str,
    pub backend: &'a str,
    #[serde(serialize_with = "millis")]
    pub connect_ms: Option<Duration>,
    #[serde(serialize_with = "millis")]
    pub first_byte_ms: Option<Duration>,
    #[serde(serialize_with = "millis")]
    pub total_ms: Option<Duration>,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub outcome: &'a str,
    /// `client`, `upstream` or `local` (portshift: an idle timeout, or its
    /// own resources).
    pub ended_by: &'a str,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    // Microseconds are all a replay can use; fewer digits, shorter lines.
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e6)
}

fn millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3),
        None => s.serialize_none(),
    }
}

enum Msg {
    Line(String),
    /// Everything queued before it is written and flushed; then the ack.
    Flush(SyncSender<()>),
}

/// A log file and its writer thread. Dropping it writes what is queued.
#[derive(Debug)]
pub struct AccessLog {
    path: PathBuf,
    tx: Option<SyncSender<Msg>>,
    dropped: AtomicU64,
    reopen: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Line(_) => "Line",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl AccessLog {
    /// Opens `path` for appending (created if needed): an access log that
    /// logrotate can rotate.
    pub fn append(path: &Path) -> io::Result<AccessLog> {
        Self::start(path, false)
    }

    /// Creates `path` afresh: a recording of this run only.
    pub fn create(path: &Path) -> io::Result<AccessLog> {
        Self::start(path, true)
    }

    fn start(path: &Path, truncate: bool) -> io::Result<AccessLog> {
        Self::with_queue(path, truncate, QUEUE_LINES)
    }

    fn with_queue(path: &Path, truncate: bool, lines: usize) -> io::Result<AccessLog> {
        let file = open(path, truncate)?;
        let (tx, rx) = sync_channel(lines);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 * 1024, file),
            reopen: Arc::clone(&reopen),
        };
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(&rx))?;
        Ok(AccessLog {
            path: path.to_path_buf(),
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            reopen,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record; false when the queue was full and it was dropped.
    pub fn write(&self, r: &AccessRecord<'_>) -> bool {
        let Ok(mut line) = serde_json::to_string(r) else {
            return false;
        };
        line.push('\n');
        self.write_line(line)
    }

    /// Queues one formatted line (ending in `\n`).
    pub fn write_line(&self, line: String) -> bool {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Msg::Line(line)).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Relaxed);
        }
        sent
    }

    /// Lines dropped so far because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// From the next line on, writes to a file opened anew at the path
    /// (after logrotate moved the old one away).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }

    /// Waits (up to five seconds) until every line queued so far is in the
    /// file. For tests and shutdown, never the data path.
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (ack, done) = sync_channel(1);
        if tx.send(Msg::Flush(ack)).is_ok() {
            self.wake();
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }

    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.tx.take();
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open(path: &Path, truncate: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true);
    if truncate {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    o.open(path)
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    /// Wakes every `TICK` (or when unparked) and drains the queue. It
    /// never blocks on the queue itself: a sender finds no sleeping
    /// receiver to wake, so queueing a line costs no system call.
    fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            std::thread::park_timeout(TICK);
            self.reopen_if_asked();
            loop {
                match rx.try_recv() {
                    Ok(Msg::Line(l)) => {
                        // Asked again per line: a line queued after
                        // `reopen()` must not land in the old file, however
                        // the tick falls.
                        self.reopen_if_asked();
                        self.write(l.as_bytes());
                    }
                    Ok(Msg::Flush(ack)) => {
                        self.flush();
                        let _ = ack.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                }
            }
            self.flush();
        }
    }

    /// The load comes before the swap so a line costs no atomic write.
    /// The queue orders it: a line received was sent after any `reopen()`
    /// that came before it on the sender's side.
    fn reopen_if_asked(&mut self) {
        if self.reopen.load(Relaxed) && self.reopen.swap(false, Relaxed) {
            self.reopen_file();
        }
    }

    fn reopen_file(&mut self) {
        self.flush();
        match open(&self.path, false) {
            Ok(f) => self.out = BufWriter::with_capacity(64 * 1024, f),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen the access log; writing on to the old file")
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Err(e) = self.out.write_all(bytes) {
            self.failed(&e);
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            self.failed(&e);
        }
    }

    /// A failed write loses lines, never a connection; said at most once
    /// a minute.
    fn failed(&self, e: &io::Error) {
        static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(path = %self.path.display(), error = %e, "access log write failed (said at most once a minute)");
        }
    }
}

/// Connections refused before any backend was tried (an ACL, a knock, a
/// limit, a bad PROXY header, a ClientHello no route takes, a TLS
/// handshake that did not complete): logged, but
/// never traffic a policy routes.
fn refused(outcome: &str) -> bool {
    ["denied_", "proxy_header_", "sni_", "tls_"]
        .iter()
        .any(|p| outcome.starts_with(p))
}

/// The arrival times of a recording, sorted: an access log (JSON lines, by
/// `t_s`), or the CSV trace older versions wrote (`t_s` first). Refused
/// connections are left out: they never reached the routing.
pub fn read_arrivals(path: &Path) -> io::Result<Vec<Duration>> {
    let bad = |line: usize, why: &str| {
        io::Error::new(io::ErrorKind::InvalidData, format!("line {line}: {why}"))
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(File::open(path)?).lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || i == 0 && line.starts_with("t_s") {
            continue;
        }
        let t = if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad(i + 1, &format!("not a JSON access-log record ({e})")))?;
            if v["outcome"].as_str().is_some_and(refused) {
                continue;
            }
            v["t_s"].as_f64()
        } else {
            line.split(',').next().and_then(|f| f.trim().parse().ok())
        };
        let t = t
            .filter(|t: &f64| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| bad(i + 1, "`t_s` is not a time in seconds"))?;
        out.push(Duration::from_secs_f64(t));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(t: f64) -> AccessRecord<'static> {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            t_s: Duration::from_secs_f64(t),
            listener: "l",
            route: None,
            client: "[2001:db8::7]:5000".parse().unwrap(),
            group: "primary",
            backend: "127.0.0.1:9001",
            connect_ms: Some(Duration::from_micros(1234)),
            first_byte_ms: None,
            total_ms: Some(Duration::from_millis(20)),
            bytes_to_backend: 10,
            bytes_to_client: 20,
            outcome: "closed",
            ended_by: "upstream",
        }
    }

    #[test]
    fn a_record_is_one_json_line_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::create(&path).unwrap();
        assert!(log.write(&record(1.5)));
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"time\":\"2027-01-15T08:00:00.000000Z\",\"t_s\":1.5,\"listener\":\"l\",\"route\":null,\
             \"client\":\"[2001:db8::7]:5000\",\"group\":\"primary\",\"backend\":\"127.0.0.1:9001\",\
             \"connect_ms\":1.234,\"first_byte_ms\":null,\"total_ms\":20.0,\"bytes_to_backend\":10,\
             \"bytes_to_client\":20,\"outcome\":\"closed\",\"ended_by\":\"upstream\"}\n"
        );
    }

    #[test]
    fn arrivals_are_read_from_access_logs_and_old_csv_traces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        {
            let log = AccessLog::create(&path).unwrap();
            for t in [3.0, 1.0, 2.0] {
                log.write(&record(t));
            }
        }
        let got = read_arrivals(&path).unwrap();
        assert_eq!(got, [1.0, 2.0, 3.0].map(Duration::from_secs_f64));
        let csv = dir.path().join("trace.csv");
        std::fs::write(&csv, "t_s,listener\n0.5,l\n0.25,l\n").unwrap();
        assert_eq!(
            read_arrivals(&csv).unwrap(),
            [0.25, 0.5].map(Duration::from_secs_f64)
        );
        std::fs::write(
            &csv,
            "{\"t_s\":4,\"outcome\":\"denied_acl\"}\n{\"t_s\":1}\n",
        )
        .unwrap();
        assert_eq!(read_arrivals(&csv).unwrap(), [Duration::from_secs(1)]);
        std::fs::write(&csv, "{\"t_s\":1}\n{\"t_s\":-1}\n").unwrap();
        let e = read_arrivals(&csv).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    /// A writer stuck on a disk that takes nothing (here a pipe nobody
    /// reads) costs the caller nothing: lines past the queue are dropped
    /// and counted at once.
    #[test]
    fn a_stuck_writer_drops_and_counts_instead_of_blocking() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stuck");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&fifo)
            .unwrap();
        let log = AccessLog::with_queue(&fifo, false, 4).unwrap();
        let started = Instant::now();
        let sent = (0..5000)
            .filter(|&i| log.write(&record(f64::from(i))))
            .count();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "never waited on the disk"
        );
        assert!(
            sent < 5000,
            "the pipe and the queue are full after a few hundred lines"
        );
        assert_eq!(log.dropped(), 5000 - sent as u64);
        // The reader goes: the writer's next write fails, and it drains.
        drop(reader);
        drop(log);
    }

    #[test]
    fn a_reopened_log_writes_to_a_new_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::append(&path).unwrap();
        log.write(&record(1.0));
        log.flush();
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.reopen();
        log.write(&record(2.0));
        log.flush();
        assert_eq!(read_arrivals(&path).unwrap(), [Duration::from_secs(2)]);
        assert_eq!(
            read_arrivals(&dir.path().join("access.log.1")).unwrap(),
            [Duration::from_secs(1)]
        );
    }
}
