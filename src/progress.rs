//! The only writer of version.txt and of the journal of completed steps.
//!
//! version.txt always names what the data on disk really is: it is rewritten atomically and
//! durably after every completed step (or written into a staged data dir before the swap that
//! makes it live).

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil::{self, FsError};
use crate::layout::{Layout, JOURNAL_FILE, VERSION_FILE};
use crate::version::{ParseError, VersionFile};

/// Reading or writing progress failed.
#[derive(Debug, Error)]
pub enum ProgressError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "{path} holds {content:?}, which is not <X.Y.Z>/<etcd2|etcd3>; it must name the version and storage that wrote the \
         data (e.g. 3.0.17/etcd3); fix it by hand, nothing was changed"
    )]
    Garbage { path: PathBuf, content: String },
    /// A record could not be encoded: nothing was written (never an empty file).
    #[error("cannot encode the record for {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// `value` as JSON, or the error that names where it was going.
pub fn encode(value: &impl Serialize, path: &Path) -> Result<Vec<u8>, ProgressError> {
    serde_json::to_vec(value).map_err(|source| ProgressError::Encode {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `<dir>/version.txt`: `Ok(None)` when there is none.
pub fn read_version(dir: &Path) -> Result<Option<VersionFile>, ProgressError> {
    let path = dir.join(VERSION_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(FsError::Io {
                op: "read",
                path,
                source: e,
            }
            .into())
        }
    };
    let content = String::from_utf8_lossy(&bytes).into_owned();
    content
        .parse()
        .map(Some)
        .map_err(|_: ParseError| ProgressError::Garbage { path, content })
}

/// Records that the data in `dir` now is `vf`: atomic, durable.
pub fn record(dir: &Path, vf: VersionFile) -> Result<(), ProgressError> {
    fail::fail_point!("record-before-write", |_| Err(fsutil::injected(dir).into()));
    fsutil::write_durable(&dir.join(VERSION_FILE), format!("{vf}\n").as_bytes(), 0o644)?;
    Ok(())
}

/// One line of the journal (built by the constructors below, one per kind of event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// UTC time, RFC 3339.
    pub at: String,
    /// `step`, `backup`, `restore`, `fresh`.
    pub event: String,
    /// Step kind (`upgrade`, `migrate-storage`, ...), when the event is a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Keys seen after the step, when counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
    /// Free-form details: TTL counts, backup path.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Free-form journal details.
pub type Detail = serde_json::Map<String, serde_json::Value>;

impl JournalEntry {
    fn new(event: &str, from: String, to: String, elapsed_ms: u64, detail: Detail) -> Self {
        JournalEntry {
            at: now_rfc3339(),
            event: event.into(),
            kind: None,
            from,
            to,
            elapsed_ms,
            keys: None,
            detail,
        }
    }

    /// A completed step of kind `kind`.
    pub fn step(
        kind: &str,
        from: VersionFile,
        to: VersionFile,
        elapsed_ms: u64,
        keys: Option<u64>,
        detail: Detail,
    ) -> Self {
        JournalEntry {
            kind: Some(kind.into()),
            keys,
            ..Self::new("step", from.to_string(), to.to_string(), elapsed_ms, detail)
        }
    }

    /// A fresh data dir recorded at `to` (`from`: what version.txt said, if anything).
    pub fn fresh(from: Option<VersionFile>, to: VersionFile) -> Self {
        JournalEntry {
            keys: Some(0),
            ..Self::new("fresh", or_none(from), to.to_string(), 0, Detail::new())
        }
    }

    /// This member, whose data was lost, rejoined its cluster and was synced at `to`.
    pub fn rejoin(to: VersionFile, elapsed_ms: u64, detail: Detail) -> Self {
        Self::new("rejoin", "none".into(), to.to_string(), elapsed_ms, detail)
    }

    /// A snapshot file restored as this member's data (the data dir held none), served at `to`.
    /// `detail` names the file and its SHA-256, which a later run with the same env checks.
    pub fn restore_snapshot(to: VersionFile, elapsed_ms: u64, keys: u64, detail: Detail) -> Self {
        JournalEntry {
            keys: Some(keys),
            ..Self::new(
                "restore-snapshot",
                "none".into(),
                to.to_string(),
                elapsed_ms,
                detail,
            )
        }
    }

    /// The SHA-256 of the snapshot a `restore-snapshot` entry restored.
    pub fn restored_sha256(&self) -> Option<&str> {
        (self.event == "restore-snapshot")
            .then(|| self.detail.get("sha256").and_then(|v| v.as_str()))
            .flatten()
    }

    /// A backup of data at `recorded`, taken to `path`.
    pub fn backup(recorded: VersionFile, path: &Path) -> Self {
        let mut detail = Detail::new();
        detail.insert("path".into(), path.display().to_string().into());
        Self::new(
            "backup",
            recorded.to_string(),
            recorded.to_string(),
            0,
            detail,
        )
    }

    /// Backup `backup` put back as the data (at `to`); the data that was there (at `from`) is
    /// kept as `previous`.
    pub fn restore(
        from: Option<VersionFile>,
        to: VersionFile,
        elapsed_ms: u64,
        backup: &Path,
        previous: &Path,
    ) -> Self {
        let mut detail = Detail::new();
        detail.insert("backup".into(), backup.display().to_string().into());
        detail.insert(
            "previous_data".into(),
            previous.display().to_string().into(),
        );
        Self::new("restore", or_none(from), to.to_string(), elapsed_ms, detail)
    }
}

fn or_none(v: Option<VersionFile>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
}

/// Appends an entry to `<dir>/etcd-migrate.journal` and fsyncs it.
pub fn append_journal(dir: &Path, entry: &JournalEntry) -> Result<(), ProgressError> {
    let path = dir.join(JOURNAL_FILE);
    let mut line = encode(entry, &path)?;
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(FsError::io("open", &path))?;
    f.write_all(&line).map_err(FsError::io("append", &path))?;
    f.sync_all().map_err(FsError::io("fsync", &path))?;
    Ok(())
}

/// The last `n` readable journal entries (a torn last line is skipped).
pub fn read_journal(dir: &Path, n: usize) -> Vec<JournalEntry> {
    let Ok(f) = fs::File::open(dir.join(JOURNAL_FILE)) else {
        return Vec::new();
    };
    let all: Vec<JournalEntry> = BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    all[all.len().saturating_sub(n)..].to_vec()
}

#[derive(Serialize, Deserialize)]
struct InPlace {
    from: String,
    to: String,
    at: String,
}

/// Records, before an in-place upgrade starts the new release on the data, that it may write
/// it: a crash or failure from here must not be taken for "still at the old version". Kept in
/// the work area so that a failed step leaves the data dir untouched.
pub fn begin_in_place(
    layout: &Layout,
    from: VersionFile,
    to: VersionFile,
) -> Result<(), ProgressError> {
    let rec = InPlace {
        from: from.to_string(),
        to: to.to_string(),
        at: now_rfc3339(),
    };
    let path = layout.in_place_marker();
    fsutil::create_dir_mode(&layout.work_dir(), 0o700)?;
    fsutil::write_durable(&path, &encode(&rec, &path)?, 0o600)?;
    Ok(())
}

/// The in-place upgrade is recorded in version.txt: the intent is done.
pub fn end_in_place(layout: &Layout) -> Result<(), ProgressError> {
    fsutil::remove_tree(&layout.in_place_marker())?;
    Ok(())
}

/// An in-place upgrade that began and did not finish, as (from, to, when): the release `to`
/// may already have written the data (e.g. raised the cluster version), so it is finished before
/// anything else.
pub fn interrupted_upgrade(layout: &Layout) -> Option<(VersionFile, VersionFile, String)> {
    let rec: InPlace = serde_json::from_slice(&fs::read(layout.in_place_marker()).ok()?).ok()?;
    Some((rec.from.parse().ok()?, rec.to.parse().ok()?, rec.at))
}

/// Current UTC time as RFC 3339 with seconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_then_read_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_version(d.path()).unwrap().is_none());
        record(d.path(), "3.4.23/etcd3".parse().unwrap()).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join(VERSION_FILE)).unwrap(),
            "3.4.23/etcd3\n"
        );
        assert_eq!(
            read_version(d.path()).unwrap().unwrap().to_string(),
            "3.4.23/etcd3"
        );
    }

    #[test]
    fn garbage_version_file_is_quoted_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(VERSION_FILE), "3.4.23/etcd5\n").unwrap();
        let e = read_version(d.path()).unwrap_err().to_string();
        assert!(e.contains("\"3.4.23/etcd5\\n\""), "{e}");
        fs::write(d.path().join(VERSION_FILE), "").unwrap();
        assert!(
            read_version(d.path()).is_err(),
            "an empty version.txt is garbage, not absent"
        );
    }

    #[test]
    fn journal_keeps_the_last_entries_and_skips_torn_lines() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5u32 {
            let v = |m: u32| crate::version::VersionFile {
                version: crate::version::EtcdVersion::new(3, m, 0),
                storage: crate::version::Storage::Etcd3,
            };
            let e =
                JournalEntry::step("upgrade", v(i), v(i + 1), i.into(), Some(10), Detail::new());
            append_journal(d.path(), &e).unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"at\":\"torn").unwrap();
        let last = read_journal(d.path(), 2);
        assert_eq!(last.len(), 2);
        assert_eq!(last[1].to, "3.5.0/etcd3");
    }
}
