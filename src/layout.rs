//! Where everything of one data dir lives: the only place a side path is spelled.
//!
//! ```text
//! <parent>/<name>/                                 the data dir (DATA_DIRECTORY)
//!          <name>/version.txt                      what the data is (progress writes it)
//!          <name>/etcd-migrate.journal             what each run did
//!          <name>/member/{wal,snap,snap/db}        etcd's own
//! <parent>/<name>.etcd-migrate/                    our work area, stable across swaps
//!          <name>.etcd-migrate/lock                the run lock
//!          <name>.etcd-migrate/staging/            a data dir being built
//!          <name>.etcd-migrate/swap.json           the intent of a swap in progress
//!          <name>.etcd-migrate/in-place.json       an in-place upgrade that began
//!          <name>.etcd-migrate/ttl-capture.json    TTL keys captured over v2
//!          <name>.etcd-migrate/snapshot-<v>.db     a snapshot saved for a minor rollback
//!          <name>.etcd-migrate/restored/           where a snapshot is restored
//! <parent>/<name>.backup-<version>-<storage>-<utc>[-n]   backups (0700)
//! ```

use std::path::{Path, PathBuf};

use crate::version::{EtcdVersion, VersionFile};

/// The data dir's own files besides `member`.
pub const VERSION_FILE: &str = "version.txt";
pub const JOURNAL_FILE: &str = "etcd-migrate.journal";
/// The member dir inside a data dir.
const MEMBER: &str = "member";
/// A staged dir's marker: tells after a crash whether the exchange happened.
pub const STAGE_MARKER: &str = ".etcd-migrate-stage";
const BACKUP_MARK: &str = ".backup-";
const PARTIAL: &str = ".partial";

/// The paths of one data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    data_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: impl Into<PathBuf>) -> Layout {
        Layout {
            data_dir: data_dir.into(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the data dir (its work area and backups beside it).
    pub fn parent(&self) -> &Path {
        parent_of(&self.data_dir)
    }

    fn name(&self) -> String {
        self.data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into())
    }

    /// `<parent>/<name>.<suffix>`.
    fn sibling(&self, suffix: &str) -> PathBuf {
        self.parent().join(format!("{}.{suffix}", self.name()))
    }

    pub fn version_file(&self) -> PathBuf {
        self.data_dir.join(VERSION_FILE)
    }

    pub fn journal(&self) -> PathBuf {
        self.data_dir.join(JOURNAL_FILE)
    }

    pub fn member(&self) -> PathBuf {
        member_of(&self.data_dir)
    }

    /// `member/snap/db`, the v3 backend.
    pub fn backend(&self) -> PathBuf {
        backend_of(&self.data_dir)
    }

    /// The marker a staged dir carries once it is live.
    pub fn stage_marker(&self) -> PathBuf {
        self.data_dir.join(STAGE_MARKER)
    }

    /// The work area beside the data dir.
    pub fn work_dir(&self) -> PathBuf {
        self.sibling("etcd-migrate")
    }

    pub fn lock(&self) -> PathBuf {
        self.work_dir().join("lock")
    }

    pub fn staging(&self) -> PathBuf {
        self.work_dir().join("staging")
    }

    pub fn swap_intent(&self) -> PathBuf {
        self.work_dir().join("swap.json")
    }

    pub fn in_place_marker(&self) -> PathBuf {
        self.work_dir().join("in-place.json")
    }

    pub fn ttl_capture(&self) -> PathBuf {
        self.work_dir().join("ttl-capture.json")
    }

    pub fn saved_snapshot(&self, from: EtcdVersion) -> PathBuf {
        self.work_dir().join(format!("snapshot-{from}.db"))
    }

    pub fn restored(&self) -> PathBuf {
        self.work_dir().join("restored")
    }

    /// A rejoin's record that it removed this member from its cluster (kept until it is added again).
    pub fn rejoin_intent(&self) -> PathBuf {
        self.work_dir().join("rejoin.json")
    }

    /// Whether `name`, an entry of the work area, outlives a run: the lock, and a rejoin's
    /// record of a remove (the cluster changed; the next run must know it).
    pub fn survives_recovery(name: &std::ffi::OsStr) -> bool {
        name == "lock" || name == "rejoin.json"
    }

    /// A backup of data recorded as `vf`, taken at `stamp` (`YYYYMMDDTHHMMSSZ`): the first name
    /// that `taken` does not report taken (two backups in one second: `-2`, `-3`, ...).
    pub fn backup(&self, vf: VersionFile, stamp: &str, taken: impl Fn(&Path) -> bool) -> PathBuf {
        let base = self.sibling(&format!("backup-{}-{}-{stamp}", vf.version, vf.storage));
        let mut p = base.clone();
        let mut n = 1;
        while taken(&p) {
            n += 1;
            p = PathBuf::from(format!("{}-{n}", base.display()));
        }
        p
    }

    /// Where a backup is copied to before it gets its name.
    pub fn partial(backup: &Path) -> PathBuf {
        PathBuf::from(format!("{}{PARTIAL}", backup.display()))
    }

    /// What a name in the parent dir says, if it is a backup (or its partial copy) of this data
    /// dir: (`<version>/<storage>`, stamp, partial).
    pub fn parse_backup(&self, name: &str) -> Option<BackupName> {
        let rest = name.strip_prefix(&format!("{}{BACKUP_MARK}", self.name()))?;
        let (rest, partial) = match rest.strip_suffix(PARTIAL) {
            Some(r) => (r, true),
            None => (rest, false),
        };
        // <version>-<storage>-<stamp>[-n]
        let mut parts = rest.splitn(3, '-');
        let (v, s, t) = (parts.next()?, parts.next()?, parts.next()?);
        Some(BackupName {
            recorded: format!("{v}/{s}"),
            stamp: t.to_string(),
            partial,
        })
    }
}

/// A backup's name, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupName {
    /// What version.txt said in it.
    pub recorded: String,
    /// `YYYYMMDDTHHMMSSZ[-n]`.
    pub stamp: String,
    /// A copy that never got its name (a crash during the backup).
    pub partial: bool,
}

/// The member dir of any data dir (live, staged or restored).
pub fn member_of(data_dir: &Path) -> PathBuf {
    data_dir.join(MEMBER)
}

/// The v3 backend of any data dir.
pub fn backend_of(data_dir: &Path) -> PathBuf {
    snap_dir(&member_of(data_dir)).join("db")
}

/// A member dir's WAL directory.
pub fn wal_dir(member: &Path) -> PathBuf {
    member.join("wal")
}

/// A member dir's snapshot directory (v2 `.snap` files and the v3 backend).
pub fn snap_dir(member: &Path) -> PathBuf {
    member.join("snap")
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_side_path_sits_where_the_layout_says() {
        let l = Layout::new("/var/etcd/data");
        assert_eq!(l.parent(), Path::new("/var/etcd"));
        assert_eq!(l.version_file(), Path::new("/var/etcd/data/version.txt"));
        assert_eq!(l.backend(), Path::new("/var/etcd/data/member/snap/db"));
        assert_eq!(l.work_dir(), Path::new("/var/etcd/data.etcd-migrate"));
        assert_eq!(l.lock(), Path::new("/var/etcd/data.etcd-migrate/lock"));
        assert_eq!(
            l.staging(),
            Path::new("/var/etcd/data.etcd-migrate/staging")
        );
        assert_eq!(
            l.swap_intent(),
            Path::new("/var/etcd/data.etcd-migrate/swap.json")
        );
        assert_eq!(
            l.saved_snapshot("3.5.1".parse().unwrap()),
            Path::new("/var/etcd/data.etcd-migrate/snapshot-3.5.1.db")
        );
        assert_eq!(Layout::new("data").parent(), Path::new("."));
        assert_eq!(
            Layout::new("data").work_dir(),
            Path::new("./data.etcd-migrate")
        );
    }

    #[test]
    fn backup_names_are_made_and_read_back() {
        let l = Layout::new("/v/data");
        let vf = "3.5.1/etcd3".parse().unwrap();
        let b = l.backup(vf, "20261202T010203Z", |_| false);
        assert_eq!(b, Path::new("/v/data.backup-3.5.1-etcd3-20261202T010203Z"));
        let second = l.backup(vf, "20261202T010203Z", |p| p == b);
        assert_eq!(
            second,
            Path::new("/v/data.backup-3.5.1-etcd3-20261202T010203Z-2")
        );
        let name = second.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            l.parse_backup(name),
            Some(BackupName {
                recorded: "3.5.1/etcd3".into(),
                stamp: "20261202T010203Z-2".into(),
                partial: false
            })
        );
        let partial = Layout::partial(&b);
        let pname = partial.file_name().unwrap().to_str().unwrap();
        assert!(l.parse_backup(pname).unwrap().partial);
        assert_eq!(l.parse_backup("other.backup-3.5.1-etcd3-x"), None);
        assert_eq!(l.parse_backup("data.etcd-migrate"), None);
    }
}
