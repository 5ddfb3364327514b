//! An open-loop load generator: HTTP GETs at a fixed rate, each on a new
//! connection, whatever the server's speed (a closed loop would slow down
//! with the server and hide the very latency we want to see). Used by the
//! demo, the tests and `portshift load`.

use crate::backend::http_get;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Most requests in flight at once: bounds memory and sockets when the
/// target stalls (a black hole must not make the generator grow forever).
pub const MAX_IN_FLIGHT: usize = 2048;
/// A request that has not finished by then counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Live counters of a running load.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    /// Requests not sent because `MAX_IN_FLIGHT` were already pending.
    pub skipped: AtomicU64,
    /// Replies by body (the backend's name).
    served_by: Mutex<BTreeMap<String, u64>>,
    /// Failed requests by what the client saw (the error, or `timeout`).
    failed_by: Mutex<BTreeMap<String, u64>>,
    latency_us_total: AtomicU64,
}

impl LoadStats {
    pub fn served_by(&self) -> BTreeMap<String, u64> {
        self.served_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Mean latency of successful requests so far.
    pub fn mean_latency(&self) -> Duration {
        let ok = self.ok.load(Relaxed).max(1);
        Duration::from_micros(self.latency_us_total.load(Relaxed) / ok)
    }

    /// Failed requests by what the client saw.
    pub fn failed_by(&self) -> BTreeMap<String, u64> {
        self.failed_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, r: Result<String, String>, took: Duration) {
        match r {
            Ok(body) => {
                self.ok.fetch_add(1, Relaxed);
                self.latency_us_total
                    .fetch_add(took.as_micros() as u64, Relaxed);
                let mut m = self.served_by.lock().unwrap_or_else(|p| p.into_inner());
                *m.entry(body.trim().to_owned()).or_default() += 1;
            }
            Err(why) => {
                self.errors.fetch_add(1, Relaxed);
                let mut m = self.failed_by.lock().unwrap_or_else(|p| p.into_inner());
                *m.entry(why).or_default() += 1;
            }
        }
    }
}

/// Sends `rate` requests per second to `target` until `stop`, then waits for
/// those in flight. Returns when all have finished.
pub async fn run(target: SocketAddr, rate: f64, stats: Arc<LoadStats>, stop: CancellationToken) {
    assert!(rate > 0.0, "rate is positive");
    let sender = Sender::new(target, stats);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        sender.fire();
    }
    sender.finish().await;
}

/// Sends one request at each of `times` (offsets from now), as a
/// simulator's arrivals, until done or `stop`; waits for those in flight.
pub async fn run_schedule(
    target: SocketAddr,
    times: Vec<Duration>,
    stats: Arc<LoadStats>,
    stop: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    let sender = Sender::new(target, stats);
    for at in times {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(start + at) => {}
        }
        sender.fire();
    }
    sender.finish().await;
}

/// Starts requests without waiting for them, at most `MAX_IN_FLIGHT` at
/// once (more are counted as skipped), and waits for all at the end.
struct Sender {
    target: SocketAddr,
    stats: Arc<LoadStats>,
    slots: Arc<Semaphore>,
    tasks: tokio_util::task::TaskTracker,
}

impl Sender {
    fn new(target: SocketAddr, stats: Arc<LoadStats>) -> Self {
        Sender {
            target,
            stats,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    fn fire(&self) {
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.stats.skipped.fetch_add(1, Relaxed);
            return;
        };
        self.tasks
            .spawn(one_request(self.target, Arc::clone(&self.stats), permit));
    }

    async fn finish(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// One request on a new connection, counted; releases its in-flight slot
/// when done.
async fn one_request(
    target: SocketAddr,
    stats: Arc<LoadStats>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    stats.sent.fetch_add(1, Relaxed);
    let begun = tokio::time::Instant::now();
    let r = match tokio::time::timeout(REQUEST_TIMEOUT, http_get(target)).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".to_owned()),
    };
    stats.record(r, begun.elapsed());
    drop(permit);
}

/// `portshift load`: runs the load for `duration`, printing a line of
/// counts every second and a total at the end.
pub async fn report_each_second(
    target: SocketAddr,
    rate: f64,
    duration: Duration,
) -> std::io::Result<()> {
    let stats = Arc::new(LoadStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(target, rate, stats.clone(), stop.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for second in 1..=duration.as_secs().max(1) {
        tick.tick().await;
        println!(
            "{second:>4}s sent {:>8} ok {:>8} errors {:>6} mean {:?} served by {:?}",
            stats.sent.load(Relaxed),
            stats.ok.load(Relaxed),
            stats.errors.load(Relaxed),
            stats.mean_latency(),
            stats.served_by()
        );
    }
    stop.cancel();
    task.await.map_err(std::io::Error::other)?;
    println!(
        "done: {} sent, {} ok, {} errors",
        stats.sent.load(Relaxed),
        stats.ok.load(Relaxed),
        stats.errors.load(Relaxed)
    );
    Ok(())
}
