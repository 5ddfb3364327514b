//! The append-only audit log: one JSON object per line for every decision
//! that moved (or in dry-run would have moved) traffic, and every mutating
//! admin call. One shared sink; a reload may point it at another file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tracing::warn;

#[derive(Debug, Default)]
pub struct AuditLog {
    file: Mutex<Option<(PathBuf, File)>>,
}

impl AuditLog {
    /// A sink writing to `path` (created if needed), or none.
    pub fn open(path: Option<&Path>) -> io::Result<Self> {
        let log = AuditLog::default();
        log.reopen(path)?;
        Ok(log)
    }

    /// Points the sink at `path` (or nowhere), opening it anew even when
    /// the path is unchanged: after logrotate renamed the file, records go
    /// to a new file at the path, not to the rotated one. On error the old
    /// file stays.
    pub fn reopen(&self, path: Option<&Path>) -> io::Result<()> {
        let mut cur = self.file.lock().unwrap_or_else(|p| p.into_inner());
        *cur = match path {
            None => None,
            Some(p) => Some((
                p.to_path_buf(),
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
        };
        Ok(())
    }

    /// Appends one record as a line. A failed write is logged, never fatal:
    /// traffic decisions must not wait on a full disk.
    pub fn append(&self, record: &serde_json::Value) {
        let mut cur = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some((path, file)) = cur.as_mut() else {
            return;
        };
        let mut line = record.to_string();
        line.push('\n');
        if let Err(e) = file.write_all(line.as_bytes()) {
            warn!(path = %path.display(), error = %e, "audit log write failed");
        }
    }
}
