//! The offline proof of etcd3 steps: bucket `key` of the member's backend read with our own
//! bbolt reader before the step and after it (its etcd stopped cleanly), every revision up to
//! the step's starting one compared by digest. Constant memory and one read of the file each
//! way, at any store size; the read before runs while the step's etcd starts.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use crate::meter::{Meter, Unit};
use crate::storage::bbolt::Db;
use crate::storage::keydigest::{KeyDigest, KeyScan, RevRange};
use crate::storage::mvcc::{self, MvccError};

use super::StepError;

/// Threads a scan uses: one per core, up to 4.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// A failed offline read of a backend.
fn read_error(db: &Path, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StepError {
    StepError::read("reading offline", db, e)
}

/// What a step compares: the digest of `range`'s revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digested {
    pub range: RevRange,
    pub digest: KeyDigest,
}

/// The revisions a step must leave as they were: all of them, or, when a compaction was begun
/// and not finished (etcd finishes it when it starts, deleting revisions at or below it), only
/// those after the compaction.
pub fn range_to_keep(db_path: &Path) -> Result<RevRange, StepError> {
    let db = Db::open(db_path).map_err(|e| read_error(db_path, e))?;
    let meta = mvcc::store_meta(&db).map_err(|e| read_error(db_path, e))?;
    Ok(
        match (meta.scheduled_compact_rev, meta.finished_compact_rev) {
            (Some(s), f) if f.is_none_or(|f| f.main < s.main) => {
                tracing::info!(
                compaction = s.main,
                "a compaction was begun and not finished: the step's etcd finishes it, so revisions after it are compared"
            );
                RevRange {
                    after: Some(s.main),
                    upto: None,
                }
            }
            _ => RevRange::ALL,
        },
    )
}

/// Scans `db_path` now, on this thread (and helpers), with progress shown.
pub fn scan(db_path: &Path, range: RevRange, what: &str) -> Result<KeyDigest, StepError> {
    let t = Instant::now();
    let size = std::fs::metadata(db_path).map(|m| m.len()).ok();
    let db = Db::open(db_path).map_err(|e| read_error(db_path, e))?;
    let meter = Meter::count(what, Unit::Bytes, size);
    let d = KeyScan::prepare(&db, threads())
        .and_then(|s| s.run(range, meter.counter()))
        .map_err(|e| read_error(db_path, e))?;
    meter.finish();
    log_scan(what, range, &d, t);
    Ok(d)
}

fn log_scan(what: &str, range: RevRange, d: &KeyDigest, t: Instant) {
    tracing::info!(revisions = d.entries, mb = d.bytes >> 20, newest = d.newest, elapsed_ms = t.elapsed().as_millis() as u64,
        digest = %&d.hex()[..16], "{what}: {range} read offline");
}

/// Puts the calling thread at the lowest CPU priority (nice 19): the etcd starting beside it is
/// what the step waits for, and the scan takes the cycles it leaves.
fn lowest_priority() {
    // SAFETY: plain syscalls on this thread's own id; failure only leaves the priority as it was.
    #[allow(unsafe_code)]
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// A scan of bucket `key` whose walk was prepared (the tree's roots read) before `start`
/// returns, running on a thread of its own: an etcd started on the file after that cannot
/// change what it reads (see [`KeyScan`]).
pub struct PendingScan {
    /// `None` when the scan never began (its error went to `start`).
    thread: std::thread::JoinHandle<Option<Result<KeyDigest, MvccError>>>,
    db: PathBuf,
    range: RevRange,
    what: String,
    started: Instant,
}

impl PendingScan {
    pub fn start(db_path: &Path, range: RevRange, what: &str) -> Result<PendingScan, StepError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), MvccError>>(1);
        let (path, label) = (db_path.to_path_buf(), what.to_string());
        let size = std::fs::metadata(db_path).map(|m| m.len()).ok();
        let thread = std::thread::Builder::new()
            .name("backend-scan".into())
            .spawn(move || {
                lowest_priority();
                let db = match Db::open(&path) {
                    Ok(db) => db,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return None;
                    }
                };
                // One thread: it runs beside an etcd starting on a backend, which reads the
                // whole file too (to build its index) on the other cores.
                let scan = match KeyScan::prepare(&db, 1) {
                    Ok(scan) => scan,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return None;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let meter = Meter::count(&label, Unit::Bytes, size);
                let progress: &AtomicU64 = meter.counter();
                Some(scan.run(range, progress))
            })
            .map_err(|e| read_error(db_path, e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(PendingScan {
                thread,
                db: db_path.to_path_buf(),
                range,
                what: what.to_string(),
                started: Instant::now(),
            }),
            Ok(Err(e)) => Err(read_error(db_path, e)),
            Err(_) => Err(read_error(db_path, "the scan thread ended before it began")),
        }
    }

    /// Waits for the scan without blocking the runtime.
    pub async fn finish(self) -> Result<KeyDigest, StepError> {
        while !self.thread.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let d = match self.thread.join() {
            Ok(Some(scanned)) => scanned.map_err(|e| read_error(&self.db, e))?,
            Ok(None) => {
                return Err(read_error(
                    &self.db,
                    "the scan thread ended before it began",
                ))
            }
            Err(_) => {
                return Err(StepError::ThreadPanicked {
                    what: "backend-scan",
                })
            }
        };
        log_scan(&self.what, self.range, &d, self.started);
        Ok(d)
    }
}

/// The backend after a step must hold exactly what it held before in `before.range` (up to the
/// newest revision seen before: a step's etcd adds its probe writes after it).
pub fn compare(step: &str, before: &Digested, after: &KeyDigest) -> Result<(), StepError> {
    if before.digest.entries == after.entries && before.digest.sum == after.sum {
        tracing::info!(
            step,
            revisions = after.entries,
            "every revision and value read back as before ({})",
            before.range
        );
        return Ok(());
    }
    Err(StepError::Verify {
        step: step.to_string(),
        what: format!(
            "{}: {} entries ({} bytes, digest {}) before, {} ({} bytes, digest {}) after",
            before.range,
            before.digest.entries,
            before.digest.bytes,
            &before.digest.hex()[..16],
            after.entries,
            after.bytes,
            &after.hex()[..16]
        ),
    })
}

/// The range that was compared, closed at the newest revision seen before the step.
pub fn closed(range: RevRange, before: &KeyDigest) -> RevRange {
    RevRange {
        after: range.after,
        upto: Some(before.newest),
    }
}
