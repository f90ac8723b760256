//! Inspects a data dir: what version and storage it holds, whether it is in use, and the run lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::fsutil::{self, FsError};
use crate::layout::{member_of, snap_dir, wal_dir, Layout};
use crate::plan::DataFacts;
use crate::progress::{self, ProgressError};
use crate::storage::walinfo::MemberSummary;
use crate::version::{EtcdVersion, Storage, VersionFile};

/// The legacy default for a data dir with a v2 WAL and no version.txt.
pub const LEGACY_DEFAULT: VersionFile = VersionFile {
    version: EtcdVersion::new(2, 2, 1),
    storage: Storage::Etcd2,
};

/// What the data dir holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisk {
    /// No data dir, or an empty one.
    Fresh,
    /// version.txt names the data; `has_member` is false when only version.txt is there.
    Recorded {
        version: VersionFile,
        has_member: bool,
    },
    /// No version.txt, only a v2 WAL (and v2 snapshots): the 2.2.1/etcd2 legacy default.
    Legacy,
}

impl OnDisk {
    /// What the planner starts from (`None` for a fresh dir).
    pub fn current(&self) -> Option<VersionFile> {
        match self {
            OnDisk::Fresh => None,
            OnDisk::Recorded { version, .. } => Some(*version),
            OnDisk::Legacy => Some(LEGACY_DEFAULT),
        }
    }

    /// There is etcd data to migrate (a member dir).
    pub fn has_data(&self) -> bool {
        matches!(
            self,
            OnDisk::Legacy
                | OnDisk::Recorded {
                    has_member: true,
                    ..
                }
        )
    }
}

/// The data dir cannot be used as it is. Exit code 2 unless noted.
#[derive(Debug, Error)]
pub enum DataDirError {
    #[error("data dir {path} is not a directory; point DATA_DIRECTORY at the etcd data directory")]
    NotADirectory { path: PathBuf },
    #[error("data dir {path} is a symbolic link; give the real path (links are not followed, so nothing escapes its parent)")]
    Symlink { path: PathBuf },
    #[error("cannot read data dir {path}: {source}; check its owner and permissions")]
    Unreadable { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(
        "data dir {path} has no version.txt and is not a plain etcd 2.2.1 data dir (found: {found}); write \
         <version>/<etcd2|etcd3> of the etcd that wrote it into {path}/version.txt, e.g. echo 3.0.17/etcd3 > version.txt"
    )]
    Unknown { path: PathBuf, found: String },
    #[error("{path}/version.txt says {recorded} but {why}; fix version.txt to name what is really there")]
    Inconsistent {
        path: PathBuf,
        recorded: VersionFile,
        why: &'static str,
    },
    #[error("cannot read the member data in {path}: {why}")]
    Member { path: PathBuf, why: String },
}

/// What an inspection found.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub on_disk: OnDisk,
    pub facts: DataFacts,
}

fn list(dir: &Path) -> Result<Vec<String>, DataDirError> {
    let rd = fs::read_dir(dir).map_err(|source| DataDirError::Unreadable {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// A data dir written by etcd 2.x with no version.txt: member/wal/*.wal, optional member/snap/*.snap,
/// no v3 backend, nothing else.
fn is_legacy_v2(dir: &Path, top: &[String]) -> Result<bool, DataDirError> {
    if top.iter().any(|n| n != "member" && n != "lost+found") || !top.iter().any(|n| n == "member")
    {
        return Ok(false);
    }
    let member = member_of(dir);
    let wal = wal_dir(&member);
    if !wal.is_dir() || crate::layout::backend_of(dir).exists() {
        return Ok(false);
    }
    let wals = list(&wal)?;
    let snaps = if snap_dir(&member).is_dir() {
        list(&snap_dir(&member))?
    } else {
        Vec::new()
    };
    let member_entries = list(&member)?;
    Ok(!wals.is_empty()
        && wals.iter().all(|n| n.ends_with(".wal"))
        && snaps.iter().all(|n| n.ends_with(".snap"))
        && member_entries.iter().all(|n| n == "wal" || n == "snap"))
}

/// Looks at the data dir without changing anything.
pub fn inspect(path: &Path) -> Result<Inspection, DataDirError> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Inspection {
                on_disk: OnDisk::Fresh,
                facts: DataFacts::default(),
            })
        }
        Err(source) => {
            return Err(DataDirError::Unreadable {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() {
        return Err(DataDirError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(DataDirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let top = list(path)?;
    let recorded = progress::read_version(path)?;
    let has_member = member_of(path).is_dir();
    let on_disk = match recorded {
        Some(version) => {
            check_consistent(path, version, has_member)?;
            OnDisk::Recorded {
                version,
                has_member,
            }
        }
        None if top.iter().all(|n| n == "lost+found") => OnDisk::Fresh,
        None if is_legacy_v2(path, &top)? => OnDisk::Legacy,
        None => {
            return Err(DataDirError::Unknown {
                path: path.to_path_buf(),
                found: top.join(", "),
            })
        }
    };
    // Facts from the WAL cost a read of it: callers that need them ask member_facts.
    Ok(Inspection {
        on_disk,
        facts: DataFacts::default(),
    })
}

fn check_consistent(path: &Path, v: VersionFile, has_member: bool) -> Result<(), DataDirError> {
    if !has_member {
        return Ok(());
    }
    let inconsistent = |why| {
        Err(DataDirError::Inconsistent {
            path: path.to_path_buf(),
            recorded: v,
            why,
        })
    };
    if !wal_dir(&member_of(path)).is_dir() {
        return inconsistent("member/wal is missing");
    }
    let has_db = crate::layout::backend_of(path).is_file();
    match (v.storage, v.version.major) {
        (Storage::Etcd3, _) if !has_db => inconsistent("there is no v3 backend (member/snap/db)"),
        (Storage::Etcd2, 0..=2) if has_db => {
            inconsistent("etcd 2.x never writes a v3 backend (member/snap/db)")
        }
        _ => Ok(()),
    }
}

/// What identifies the state of a member dir's WAL and snapshots: every file's name, length
/// and modification time. etcd cannot change them without changing this.
fn member_signature(member: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut sig = Vec::new();
    for sub in ["wal", "snap"] {
        if let Ok(rd) = fs::read_dir(member.join(sub)) {
            for e in rd.filter_map(|e| e.ok()) {
                let m = e.metadata().ok();
                sig.push((
                    e.path(),
                    m.as_ref().map(|m| m.len()).unwrap_or(0),
                    m.and_then(|m| m.modified().ok()),
                ));
            }
        }
    }
    sig.sort();
    sig
}

type SummaryMemo = Option<(
    PathBuf,
    Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    MemberSummary,
)>;

/// The last summary read, with the state it was read from: reading a WAL of gigabytes once per
/// run is enough.
static SUMMARY_MEMO: std::sync::Mutex<SummaryMemo> = std::sync::Mutex::new(None);

/// The member dir's WAL and snapshot summary (read once while the files stay unchanged).
pub fn member_summary(member: &Path) -> Result<MemberSummary, DataDirError> {
    let sig = member_signature(member);
    if let Ok(memo) = SUMMARY_MEMO.lock() {
        if let Some((p, s, summary)) = memo.as_ref() {
            if p == member && *s == sig {
                return Ok(summary.clone());
            }
        }
    }
    let summary = crate::storage::walinfo::summarize(member).map_err(|e| DataDirError::Member {
        path: member.to_path_buf(),
        why: e.to_string(),
    })?;
    if let Ok(mut memo) = SUMMARY_MEMO.lock() {
        *memo = Some((member.to_path_buf(), sig, summary.clone()));
    }
    Ok(summary)
}

/// Member count and cluster-version history from the WAL and snapshots.
pub fn member_facts(member: &Path) -> Result<DataFacts, DataDirError> {
    let summary = member_summary(member)?;
    let boot_v2 = summary
        .boot_cluster_version
        .as_deref()
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major < 3);
    Ok(DataFacts {
        members: summary.members.len().max(1),
        boot_cluster_version_v2: boot_v2,
    })
}

/// Writes the WAL holds that an etcd3 member's backend has not applied yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnappliedWrites {
    /// The backend's consistent index: the last entry applied to it.
    pub applied: u64,
    /// The last WAL entry that can change keys.
    pub last_write: u64,
}

impl std::fmt::Display for UnappliedWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the v3 backend (member/snap/db) has applied the log up to index {}, but the WAL holds writes up to index {}: \
             etcd was stopped without committing its backend (killed, or the machine lost power) and applies them on its next start",
            self.applied, self.last_write
        )
    }
}

/// Whether the backend lacks WAL entries that can change keys. etcd commits its backend in
/// batches (every 100 ms) and on a clean stop; after a kill it replays the WAL tail on its next
/// start, so an offline read of the backend alone would miss those writes.
pub fn unapplied_writes(
    summary: &MemberSummary,
    db: &crate::storage::bbolt::Db,
) -> Result<Option<UnappliedWrites>, crate::storage::mvcc::MvccError> {
    let applied = crate::storage::mvcc::store_meta(db)?
        .consistent_index
        .unwrap_or(0);
    Ok(summary
        .last_key_write
        .filter(|&w| w > applied)
        .map(|last_write| UnappliedWrites {
            applied,
            last_write,
        }))
}

/// An etcd (or anything) holds a lock on the member's files: the dir is in use.
pub fn in_use_by(path: &Path) -> Option<String> {
    let member = member_of(path);
    let db = crate::layout::backend_of(path);
    if locked_flock(&db) {
        return Some(format!(
            "{} is locked (an etcd 3.x is running on it)",
            db.display()
        ));
    }
    let wals = fs::read_dir(wal_dir(&member)).ok()?;
    for e in wals.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "wal") && (locked_ofd(&p) || locked_flock(&p)) {
            return Some(format!(
                "{} is locked (an etcd is running on it)",
                p.display()
            ));
        }
    }
    None
}

fn locked_flock(p: &Path) -> bool {
    let Ok(f) = File::open(p) else { return false };
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(l) => {
            drop(l);
            false
        }
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

fn locked_ofd(p: &Path) -> bool {
    let Ok(f) = File::open(p) else { return false };
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match nix::fcntl::fcntl(f.as_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl)) {
        Ok(_) => fl.l_type != libc::F_UNLCK as i16,
        Err(_) => false,
    }
}

/// Exclusive lock on a data dir for a whole run.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

/// Another run holds the lock.
#[derive(Debug, Error)]
#[error("data dir {data_dir} is busy: another etcd-migrate holds {lock} ({holder}); wait for it to finish")]
pub struct Busy {
    pub data_dir: PathBuf,
    pub lock: PathBuf,
    pub holder: String,
}

/// Takes the run lock or says who holds it.
pub fn lock(layout: &Layout, what: &str) -> Result<Result<RunLock, Busy>, FsError> {
    fsutil::create_dir_mode(&layout.work_dir(), 0o700)?;
    let path = layout.lock();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(FsError::io("open", &path))?;
    match file.try_lock() {
        Ok(()) => {
            let info = format!(
                "pid={} started={} command={what}\n",
                std::process::id(),
                progress::now_rfc3339()
            );
            file.set_len(0).map_err(FsError::io("truncate", &path))?;
            file.write_all(info.as_bytes())
                .map_err(FsError::io("write", &path))?;
            Ok(Ok(RunLock { _file: file, path }))
        }
        Err(_) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Ok(Err(Busy {
                data_dir: layout.data_dir().to_path_buf(),
                lock: path,
                holder: holder.trim().to_string(),
            }))
        }
    }
}

/// Who holds the lock now, if anyone (for `status`).
pub fn lock_holder(layout: &Layout) -> Option<String> {
    let path = layout.lock();
    let mut file = File::open(&path).ok()?;
    if file.try_lock_shared().is_ok() {
        return None;
    }
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    Some(s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_dirs_are_fresh() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            inspect(&d.path().join("nope")).unwrap().on_disk,
            OnDisk::Fresh
        );
        assert_eq!(inspect(d.path()).unwrap().on_disk, OnDisk::Fresh);
    }

    #[test]
    fn a_file_a_symlink_and_foreign_content_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        fs::write(&f, "x").unwrap();
        assert!(matches!(
            inspect(&f),
            Err(DataDirError::NotADirectory { .. })
        ));
        let l = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &l).unwrap();
        assert!(matches!(inspect(&l), Err(DataDirError::Symlink { .. })));
        let g = d.path().join("foreign");
        fs::create_dir_all(g.join("stuff")).unwrap();
        let e = inspect(&g).unwrap_err().to_string();
        assert!(
            e.contains("found: stuff") && e.contains("version.txt"),
            "{e}"
        );
    }

    #[test]
    fn version_txt_without_member_is_a_recorded_fresh_dir() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(crate::layout::VERSION_FILE), "3.5.1/etcd3\n").unwrap();
        assert_eq!(
            inspect(d.path()).unwrap().on_disk,
            OnDisk::Recorded {
                version: "3.5.1/etcd3".parse().unwrap(),
                has_member: false
            }
        );
    }

    #[test]
    fn version_txt_that_contradicts_the_files_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("member/wal")).unwrap();
        fs::write(d.path().join(crate::layout::VERSION_FILE), "3.4.23/etcd3\n").unwrap();
        let e = inspect(d.path()).unwrap_err().to_string();
        assert!(e.contains("no v3 backend"), "{e}");
    }

    #[test]
    fn lock_is_exclusive_and_names_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let data = Layout::new(d.path().join("data"));
        let first = lock(&data, "migrate").unwrap().unwrap();
        let second = lock(&data, "migrate").unwrap().unwrap_err();
        assert!(
            second
                .holder
                .contains(&format!("pid={}", std::process::id())),
            "{second}"
        );
        assert!(lock_holder(&data).is_some());
        drop(first);
        assert!(lock_holder(&data).is_none());
        assert!(lock(&data, "migrate").unwrap().is_ok());
    }
}
