//! RESTORE_SNAPSHOT: which runs restore, which do nothing, which refuse. The manifest keeps the
//! env after the restore, so every later start of the pod meets it again:
//!
//! - no etcd data in the data dir: the file is verified and restored (`steps::from_snapshot`);
//! - data restored from this very file (its SHA-256 is in the journal): nothing to do;
//! - any other data: refused, untouched; we never replace data.
//!
//! The release that restores and first serves the file is the bundled one of the file's own
//! release line (its `clusterVersion`), or the target itself when that is the same line; the
//! usual steps then take the data on to the target.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use thiserror::Error;

use crate::config::Config;
use crate::etcd::bundle::Bundle;
use crate::layout::Layout;
use crate::meter::{Meter, Unit};
use crate::progress::{self, JournalEntry};
use crate::storage::snapcheck::{self, SnapshotError, SnapshotFacts};
use crate::version::{EtcdVersion, Minor, VersionFile};

/// Why RESTORE_SNAPSHOT was not acted on. All but a failed restore are refusals: exit 2, the
/// data dir untouched.
#[derive(Debug, Error)]
pub enum RestoreSnapshotError {
    #[error("RESTORE_SNAPSHOT {path} cannot be restored: {source}; nothing was changed")]
    Unreadable {
        path: PathBuf,
        source: Box<SnapshotError>,
    },
    #[error("RESTORE_SNAPSHOT {path} holds data of etcd {line} (its clusterVersion {cluster_version}); TARGET_VERSION {target} cannot serve data newer than its own line: set TARGET_VERSION to a {line} release or newer, or name a snapshot taken from {target_line} or older; nothing was changed")]
    TooNew {
        path: PathBuf,
        line: String,
        cluster_version: String,
        target: EtcdVersion,
        target_line: String,
    },
    #[error("RESTORE_SNAPSHOT {path} holds data of etcd {line}, and the bundle has no {line} release to restore and serve it with (bundled: {bundled}); nothing was changed")]
    NoRelease {
        path: PathBuf,
        line: String,
        bundled: String,
    },
    #[error("data dir {data_dir} already holds etcd data {what}, so RESTORE_SNAPSHOT {path} is not restored: etcd-migrate never replaces data. To restore it on purpose, stop etcd, move the data dir away (mv {data_dir} {data_dir}.before-restore; we never delete it) and start the pod again; to keep the data, remove RESTORE_SNAPSHOT from the manifest. Nothing was changed")]
    HasData {
        data_dir: PathBuf,
        path: PathBuf,
        what: String,
    },
}

impl RestoreSnapshotError {
    /// Every variant is a refusal before anything is touched.
    pub fn exit_code(&self) -> i32 {
        2
    }
}

/// A restore to do: the verified file, and the release that restores and serves it.
#[derive(Debug, Clone)]
pub struct Pending {
    pub path: PathBuf,
    pub facts: SnapshotFacts,
    pub release: EtcdVersion,
    /// The file as it was when it was verified (see [`stamp`]).
    pub stamp: Option<String>,
}

/// What the env asks of this run, decided before anything is touched.
pub fn decide(
    config: &Config,
    has_data: bool,
    bundle: &Bundle,
    target: VersionFile,
) -> Result<Option<Pending>, RestoreSnapshotError> {
    let Some(path) = config.restore_snapshot.as_deref() else {
        return Ok(None);
    };
    let layout = config.layout();
    if has_data {
        return already_restored(&layout, path).map(|()| None);
    }
    let stamp = stamp(path);
    let facts = verify(path)?;
    let release = release_for(path, &facts, bundle, target)?;
    tracing::info!(snapshot = %path.display(), bytes = facts.size, revision = facts.revision, keys = facts.keys,
        sha256 = %facts.sha256, release = %release, "the data dir holds no etcd data: restoring RESTORE_SNAPSHOT, verified (every page read)");
    Ok(Some(Pending {
        path: path.to_path_buf(),
        facts,
        release,
        stamp,
    }))
}

/// Restores `pending` into the data dir (see `steps::from_snapshot`), as a one-member cluster.
pub async fn restore(
    config: &Config,
    bundle: &Bundle,
    layout: &Layout,
    pending: &Pending,
) -> Result<(), crate::steps::StepError> {
    let ctx = crate::steps::Ctx {
        config,
        bundle,
        layout,
        data_dir: &config.data_dir,
        members: 1,
    };
    let r = crate::steps::from_snapshot::run(&ctx, pending).await?;
    tracing::info!(version = %r.at, keys = r.keys, revisions_verified = r.revisions, restore_ms = r.restore_ms,
        prove_ms = r.prove_ms, sha256 = %pending.facts.sha256,
        "restored the snapshot: every revision read back as in the file, etcd {} serves it as a one-member cluster", r.at.version);
    Ok(())
}

/// Reads the whole file with our readers: checksums, every bucket, keys and revision.
pub fn verify(path: &Path) -> Result<SnapshotFacts, RestoreSnapshotError> {
    let size = std::fs::metadata(path).map(|m| m.len()).ok();
    let meter = Meter::count("verifying RESTORE_SNAPSHOT", Unit::Bytes, size);
    let progress: &AtomicU64 = meter.counter();
    let facts = snapcheck::check(path, progress).map_err(|e| RestoreSnapshotError::Unreadable {
        path: path.to_path_buf(),
        source: Box::new(e),
    });
    meter.finish();
    facts
}

/// The data dir holds data: fine only if the journal says it was restored from this file.
fn already_restored(layout: &Layout, path: &Path) -> Result<(), RestoreSnapshotError> {
    let journal = progress::read_journal(layout.data_dir(), usize::MAX);
    let restores: Vec<_> = journal
        .iter()
        .filter_map(|e| e.restored_sha256().map(|sha| (e, sha)))
        .collect();
    let refuse = |what: String| RestoreSnapshotError::HasData {
        data_dir: layout.data_dir().to_path_buf(),
        path: path.to_path_buf(),
        what,
    };
    let Some((last, last_sha)) = restores.last() else {
        return Err(refuse("that was never restored from a snapshot".into()));
    };
    let at_path = |e: &&JournalEntry| {
        e.detail.get("snapshot").and_then(|v| v.as_str()) == Some(&*path.to_string_lossy())
    };
    if !path.exists() {
        if at_path(last) {
            tracing::warn!(snapshot = %path.display(), restored_at = %last.at, "RESTORE_SNAPSHOT names a file that is gone; the data dir was restored from that path: nothing to do");
            return Ok(());
        }
        return Err(refuse(format!("restored from another file ({last_sha})")));
    }
    // The very file we restored, untouched since (same size, mtime and inode): its SHA-256 is
    // the one in the journal, so the gigabyte is not read again on every start of the pod. A
    // file that only looks the same can at worst leave this data alone, never replace it.
    let now = stamp(path);
    if let Some((e, sha)) = restores.iter().find(|(e, _)| {
        at_path(e)
            && now.is_some()
            && e.detail.get("snapshot_stamp").and_then(|v| v.as_str()) == now.as_deref()
    }) {
        tracing::info!(snapshot = %path.display(), sha256 = %sha, restored_at = %e.at,
            "the data dir was restored from this snapshot already (the file is unchanged since: same size, mtime and inode): not restoring again");
        return Ok(());
    }
    let (_, _, sha) = snapcheck::checksums(path, &AtomicU64::new(0)).map_err(|e| {
        RestoreSnapshotError::Unreadable {
            path: path.to_path_buf(),
            source: Box::new(e),
        }
    })?;
    if restores.iter().any(|(_, s)| *s == sha) {
        tracing::info!(snapshot = %path.display(), sha256 = %sha, restored_at = %last.at,
            "the data dir was restored from this snapshot already: not restoring again");
        return Ok(());
    }
    Err(refuse(format!(
        "restored from another snapshot (sha256 {last_sha} at {}; this file's is {sha})",
        last.at
    )))
}

/// What identifies a file without reading it: size, mtime (ns), device and inode.
pub fn stamp(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "size={} mtime_ns={} dev={} ino={}",
        m.size(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.dev(),
        m.ino()
    ))
}

/// The release of the file's line that restores it: the target's own when the lines agree,
/// else the bundle's newest of the file's line (the steps then upgrade it).
fn release_for(
    path: &Path,
    facts: &SnapshotFacts,
    bundle: &Bundle,
    target: VersionFile,
) -> Result<EtcdVersion, RestoreSnapshotError> {
    let target_line = target.version.minor_line();
    let line = facts
        .cluster_version
        .as_deref()
        .and_then(parse_line)
        .unwrap_or_else(|| {
            tracing::warn!(snapshot = %path.display(), "the snapshot records no cluster version: restoring it with the target's release line");
            target_line
        });
    let show = |m: Minor| format!("{}.{}", m.major, m.minor);
    if line > target_line {
        return Err(RestoreSnapshotError::TooNew {
            path: path.to_path_buf(),
            line: show(line),
            cluster_version: facts.cluster_version.clone().unwrap_or_default(),
            target: target.version,
            target_line: show(target_line),
        });
    }
    if line == target_line {
        return Ok(target.version);
    }
    bundle
        .versions
        .newest_of(line)
        .ok_or_else(|| RestoreSnapshotError::NoRelease {
            path: path.to_path_buf(),
            line: show(line),
            bundled: bundle
                .versions
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        })
}

/// "3.5.0" -> 3.5.
fn parse_line(s: &str) -> Option<Minor> {
    s.trim()
        .parse::<EtcdVersion>()
        .ok()
        .map(EtcdVersion::minor_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_version_names_its_line() {
        assert_eq!(parse_line("3.5.0"), Some(Minor::new(3, 5)));
        assert_eq!(parse_line("3.4.0\n"), Some(Minor::new(3, 4)));
        assert_eq!(parse_line("x"), None);
        assert!(Minor::new(3, 5) > Minor::new(3, 4));
    }
}
