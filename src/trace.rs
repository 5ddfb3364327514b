//! Traces: `portshift run --record FILE` writes one CSV line per proxied
//! connection; `portshift sim` replays their arrival times. The format is a
//! contract between the proxy and the simulator, so it belongs to neither.
//!
//! Format (header included):
//! `t_s,listener,group,backend,connect_ms,first_byte_ms,outcome,bytes_to_backend,bytes_to_client,ended_by`
//! `t_s` is seconds since the proxy started; missing measurements are empty.
//! `ended_by` is the side that ended the connection: `client`, `upstream`
//! or `local` (portshift: an idle timeout, or its own resources).

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

pub const HEADER: &str = "t_s,listener,group,backend,connect_ms,first_byte_ms,outcome,bytes_to_backend,bytes_to_client,ended_by";

/// One recorded connection.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord<'a> {
    pub t: Duration,
    pub listener: &'a str,
    pub group: &'a str,
    pub backend: &'a str,
    pub connect: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub outcome: &'a str,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub ended_by: &'a str,
}

/// A buffered trace file, shared by every connection task. One short line
/// per connection, written when it ends; flushed on drop.
#[derive(Debug)]
pub struct TraceWriter {
    out: Mutex<BufWriter<File>>,
}

impl TraceWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        writeln!(out, "{HEADER}")?;
        Ok(TraceWriter {
            out: Mutex::new(out),
        })
    }

    pub fn write(&self, r: &TraceRecord<'_>) {
        let ms = |d: Option<Duration>| {
            d.map_or(String::new(), |d| {
                format!("{:.3}", d.as_secs_f64() * 1000.0)
            })
        };
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A failed write loses a trace line, never a connection.
        let _ = writeln!(
            out,
            "{:.6},{},{},{},{},{},{},{},{},{}",
            r.t.as_secs_f64(),
            r.listener,
            r.group,
            r.backend,
            ms(r.connect),
            ms(r.first_byte),
            r.outcome,
            r.bytes_to_backend,
            r.bytes_to_client,
            r.ended_by
        );
    }

    pub fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The arrival times of a trace, sorted.
pub fn read_arrivals(path: &Path) -> io::Result<Vec<Duration>> {
    let mut out = Vec::new();
    for (i, line) in BufReader::new(File::open(path)?).lines().enumerate() {
        let line = line?;
        if i == 0 && line.starts_with("t_s") || line.trim().is_empty() {
            continue;
        }
        let t: f64 = line
            .split(',')
            .next()
            .and_then(|f| f.trim().parse().ok())
            .filter(|t: &f64| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line {}: `t_s` is not a time in seconds", i + 1),
                )
            })?;
        out.push(Duration::from_secs_f64(t));
    }
    out.sort();
    Ok(out)
}
