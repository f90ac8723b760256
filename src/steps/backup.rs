//! Backups: `<data-dir>.backup-<version>-<storage>-<utc>` siblings, mode 0700, kept until the
//! operator removes them or the retention setting does.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fsutil::{self, FsError};
use crate::progress;
use crate::version::VersionFile;

const MARK: &str = ".backup-";

/// A backup on disk.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Backup {
    pub path: PathBuf,
    /// What version.txt said in it (from its name).
    pub version: String,
    /// UTC stamp from its name, `YYYYMMDDTHHMMSSZ`.
    pub taken: String,
    pub bytes: u64,
}

/// UTC now as `YYYYMMDDTHHMMSSZ` (sortable, no characters a path dislikes).
pub fn stamp() -> String {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_default()
}

/// The name a backup of `data_dir` holding `vf` gets now.
pub fn backup_path(data_dir: &Path, vf: VersionFile) -> PathBuf {
    let base = crate::datadir::sibling(
        data_dir,
        &format!("backup-{}-{}-{}", vf.version, vf.storage, stamp()),
    );
    // Two backups in the same second (a chain of fast steps): keep both.
    let mut p = base.clone();
    let mut n = 1;
    while p.exists() {
        n += 1;
        p = PathBuf::from(format!("{}-{n}", base.display()));
    }
    p
}

/// Copies the data dir to a new backup (through a `.partial` name, so a crash never leaves a
/// half backup under a real name). Checks free space first.
pub fn copy(
    data_dir: &Path,
    vf: VersionFile,
    retention: Option<usize>,
) -> Result<PathBuf, FsError> {
    let size = fsutil::tree_size(data_dir)?;
    let parent = data_dir.parent().unwrap_or(Path::new("."));
    fsutil::ensure_space(parent, size)?;
    let dst = backup_path(data_dir, vf);
    let partial = PathBuf::from(format!("{}.partial", dst.display()));
    fsutil::remove_tree(&partial)?;
    fsutil::copy_tree(data_dir, &partial)?;
    fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(FsError::io("chmod", &partial))?;
    fail::fail_point!("backup-before-rename", |_| Err(fsutil::injected(&partial)));
    fsutil::rename_durable(&partial, &dst)?;
    tracing::info!(backup = %dst.display(), bytes = size, "backed up the data dir");
    prune(data_dir, retention)?;
    Ok(dst)
}

/// Backups of `data_dir`, oldest first.
pub fn list(data_dir: &Path) -> Vec<Backup> {
    let Some(parent) = data_dir.parent() else {
        return Vec::new();
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(
        "{}{MARK}",
        data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let Ok(rd) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<Backup> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            if rest.ends_with(".partial") || !e.path().is_dir() {
                return None;
            }
            // <version>-<storage>-<stamp>[-n]
            let mut parts = rest.splitn(3, '-');
            let (v, s, t) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Backup {
                path: e.path(),
                version: format!("{v}/{s}"),
                taken: t.to_string(),
                bytes: fsutil::tree_size(&e.path()).unwrap_or(0),
            })
        })
        .collect();
    out.sort_by(|a, b| a.taken.cmp(&b.taken).then(a.path.cmp(&b.path)));
    out
}

/// Removes the oldest backups beyond `keep`.
pub fn prune(data_dir: &Path, keep: Option<usize>) -> Result<(), FsError> {
    let Some(keep) = keep else { return Ok(()) };
    let all = list(data_dir);
    for b in all.iter().take(all.len().saturating_sub(keep)) {
        tracing::info!(backup = %b.path.display(), keep, "removing old backup (retention)");
        fsutil::remove_tree(&b.path)?;
    }
    Ok(())
}

/// Removes half-written backups left by a crash.
pub fn remove_partials(data_dir: &Path) -> Result<(), FsError> {
    let Some(parent) = data_dir.parent() else {
        return Ok(());
    };
    let prefix = format!(
        "{}{MARK}",
        data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let Ok(rd) = fs::read_dir(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }) else {
        return Ok(());
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".partial") {
            tracing::info!(path = %e.path().display(), "removing a half-written backup from an interrupted run");
            fsutil::remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// Journal line for a backup.
pub fn journal(
    data_dir: &Path,
    vf: VersionFile,
    path: &Path,
) -> Result<(), progress::ProgressError> {
    let mut detail = serde_json::Map::new();
    detail.insert("path".into(), path.display().to_string().into());
    progress::append_journal(
        data_dir,
        &progress::JournalEntry {
            at: progress::now_rfc3339(),
            event: "backup".into(),
            kind: None,
            from: vf.to_string(),
            to: vf.to_string(),
            elapsed_ms: 0,
            keys: None,
            detail,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn backups_are_private_listed_and_pruned() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        fs::create_dir_all(data.join("member/wal")).unwrap();
        fs::write(data.join("member/wal/0.wal"), b"wal").unwrap();
        let vf: VersionFile = "2.2.1/etcd2".parse().unwrap();
        let a = copy(&data, vf, None).unwrap();
        let b = copy(&data, vf, None).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(fs::read(a.join("member/wal/0.wal")).unwrap(), b"wal");
        let l = list(&data);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].version, "2.2.1/etcd2");
        copy(&data, vf, Some(2)).unwrap();
        assert_eq!(list(&data).len(), 2, "retention keeps two");
        assert!(!a.exists(), "the oldest went first");
    }
}
