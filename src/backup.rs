//! Backups: `<data-dir>.backup-<version>-<storage>-<utc>` siblings, mode 0700, kept until the
//! operator removes them or the retention setting does.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fsutil::{self, FsError};
use crate::layout::Layout;
use crate::progress;
use crate::version::VersionFile;

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

/// The name a backup of the data dir holding `vf` gets now (two in the same second, a chain of
/// fast steps, keep both).
pub fn backup_path(layout: &Layout, vf: VersionFile) -> PathBuf {
    layout.backup(vf, &stamp(), |p| p.exists())
}

/// Copies the data dir to a new backup (through a `.partial` name, so a crash never leaves a
/// half backup under a real name). Checks free space first.
pub fn copy(
    layout: &Layout,
    vf: VersionFile,
    retention: Option<usize>,
) -> Result<PathBuf, FsError> {
    let size = fsutil::tree_size(layout.data_dir())?;
    fsutil::ensure_space(layout.parent(), size)?;
    let dst = backup_path(layout, vf);
    let partial = Layout::partial(&dst);
    fsutil::remove_tree(&partial)?;
    fsutil::copy_tree(layout.data_dir(), &partial)?;
    fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(FsError::io("chmod", &partial))?;
    fail::fail_point!("backup-before-rename", |_| Err(fsutil::injected(&partial)));
    fsutil::rename_durable(&partial, &dst)?;
    tracing::info!(backup = %dst.display(), bytes = size, "backed up the data dir");
    prune(layout, retention)?;
    Ok(dst)
}

/// Backups of the data dir, oldest first.
pub fn list(layout: &Layout) -> Vec<Backup> {
    let Ok(rd) = fs::read_dir(layout.parent()) else {
        return Vec::new();
    };
    let mut out: Vec<Backup> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = layout.parse_backup(&e.file_name().to_string_lossy())?;
            if name.partial || !e.path().is_dir() {
                return None;
            }
            Some(Backup {
                path: e.path(),
                version: name.recorded,
                taken: name.stamp,
                bytes: fsutil::tree_size(&e.path()).unwrap_or(0),
            })
        })
        .collect();
    out.sort_by(|a, b| a.taken.cmp(&b.taken).then(a.path.cmp(&b.path)));
    out
}

/// Removes the oldest backups beyond `keep`.
pub fn prune(layout: &Layout, keep: Option<usize>) -> Result<(), FsError> {
    let Some(keep) = keep else { return Ok(()) };
    let all = list(layout);
    for b in all.iter().take(all.len().saturating_sub(keep)) {
        tracing::info!(backup = %b.path.display(), keep, "removing old backup (retention)");
        fsutil::remove_tree(&b.path)?;
    }
    Ok(())
}

/// Removes half-written backups left by a crash.
pub fn remove_partials(layout: &Layout) -> Result<(), FsError> {
    let Ok(rd) = fs::read_dir(layout.parent()) else {
        return Ok(());
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if layout.parse_backup(&name).is_some_and(|b| b.partial) {
            tracing::info!(path = %e.path().display(), "removing a half-written backup from an interrupted run");
            fsutil::remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// Journal line for a backup.
pub fn journal(
    layout: &Layout,
    vf: VersionFile,
    path: &Path,
) -> Result<(), progress::ProgressError> {
    progress::append_journal(layout.data_dir(), &progress::JournalEntry::backup(vf, path))
}

/// Why `restore` did not put a backup back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path} is not a backup of {data_dir}; backups: {known}")]
    NotABackup {
        path: PathBuf,
        data_dir: PathBuf,
        known: String,
    },
    #[error("backup {path} has no version.txt; it cannot be restored as recorded data")]
    Unrecorded { path: PathBuf },
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error(transparent)]
    Busy(#[from] crate::datadir::Busy),
    #[error("data dir {data_dir} is in use: {what}; stop that etcd first (etcd-migrate must run before etcd starts)")]
    InUse { data_dir: PathBuf, what: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Progress(#[from] progress::ProgressError),
}

impl RestoreError {
    /// 2 not a restorable backup (nothing touched); 3 the data dir is busy; 1 the restore failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            RestoreError::NotABackup { .. }
            | RestoreError::Unrecorded { .. }
            | RestoreError::DataDir(_) => 2,
            RestoreError::Busy(_) | RestoreError::InUse { .. } => 3,
            RestoreError::Fs(_) | RestoreError::Progress(_) => 1,
        }
    }
}

/// The backup `arg` names: a path, or a name beside the data dir.
fn chosen(layout: &Layout, arg: &Path) -> Result<Backup, RestoreError> {
    let path = if arg.is_absolute() || arg.components().count() > 1 {
        arg.to_path_buf()
    } else {
        layout.parent().join(arg)
    };
    let known = list(layout);
    known
        .iter()
        .find(|b| b.path == path)
        .cloned()
        .ok_or_else(|| RestoreError::NotABackup {
            path,
            data_dir: layout.data_dir().to_path_buf(),
            known: if known.is_empty() {
                "none".to_string()
            } else {
                let names: Vec<String> =
                    known.iter().map(|b| b.path.display().to_string()).collect();
                names.join(", ")
            },
        })
}

/// `restore`: puts a backup back as the data dir; the current data becomes a backup itself.
pub async fn restore(layout: &Layout, arg: &Path) -> Result<(), RestoreError> {
    let chosen = chosen(layout, arg)?;
    let restored =
        progress::read_version(&chosen.path)?.ok_or_else(|| RestoreError::Unrecorded {
            path: chosen.path.clone(),
        })?;
    let current = crate::datadir::inspect(layout.data_dir())?
        .on_disk
        .current();
    let _lock = crate::datadir::lock(layout, "restore")??;
    if let Some(what) = crate::datadir::in_use_by(layout.data_dir()) {
        return Err(RestoreError::InUse {
            data_dir: layout.data_dir().to_path_buf(),
            what,
        });
    }
    crate::staging::recover(layout)?;
    fsutil::ensure_space(&layout.work_dir(), fsutil::tree_size(&chosen.path)?)?;
    // The backup's data with today's journal, so the history stays whole.
    let stage = crate::staging::Stage::begin(layout)?;
    let member = crate::layout::member_of(&chosen.path);
    if member.is_dir() {
        fsutil::copy_tree(&member, &stage.member())?;
    }
    let t = std::time::Instant::now();
    let old = stage.commit(restored, current.unwrap_or(restored))?;
    let entry = progress::JournalEntry::restore(
        current,
        restored,
        t.elapsed().as_millis() as u64,
        &chosen.path,
        &old,
    );
    progress::append_journal(layout.data_dir(), &entry)?;
    tracing::info!(restored = %restored, from = %chosen.path.display(), previous = %old.display(), "restored the backup; the data dir now holds {restored}");
    Ok(())
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
        let layout = Layout::new(&data);
        let a = copy(&layout, vf, None).unwrap();
        let b = copy(&layout, vf, None).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(fs::read(a.join("member/wal/0.wal")).unwrap(), b"wal");
        let l = list(&layout);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].version, "2.2.1/etcd2");
        copy(&layout, vf, Some(2)).unwrap();
        assert_eq!(list(&layout).len(), 2, "retention keeps two");
        assert!(!a.exists(), "the oldest went first");
    }
}
