//! Durable file operations: the one recipe for writes (temp, fsync, rename, fsync dir),
//! tree copies, atomic exchange of two directories, and free-space checks.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::layout::parent_of;

use thiserror::Error;

/// A filesystem operation that failed, with the path it failed on.
#[derive(Debug, Error)]
pub enum FsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "not enough free space in {path}: {needed} bytes needed, {available} available; free space there (old backups are \
         listed by `etcd-migrate status`) and run again"
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{path} is a symbolic link or special file; refusing to follow it")]
    NotRegular { path: PathBuf },
}

impl FsError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> FsError + 'a {
        move |source| FsError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The error came from a full disk.
    pub fn is_no_space(&self) -> bool {
        match self {
            FsError::NoSpace { .. } => true,
            FsError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            FsError::NotRegular { .. } => false,
        }
    }
}

/// fsync a directory so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    let f = File::open(dir).map_err(FsError::io("open dir", dir))?;
    f.sync_all().map_err(FsError::io("fsync dir", dir))
}

/// The temp file a durable write of `path` goes through: beside it, named after it and us.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

fn create_temp(tmp: &Path, mode: u32) -> Result<File, FsError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(FsError::io("create", tmp))
}

/// Writes `bytes` to `path` atomically and durably: a crash leaves the old content or the new,
/// never an empty or partial file.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = parent_of(path);
    let tmp = temp_beside(path);
    let result = (|| {
        let mut f = create_temp(&tmp, mode)?;
        f.write_all(bytes).map_err(FsError::io("write", &tmp))?;
        fail::fail_point!("write-durable-before-fsync", |_| Err(injected(&tmp)));
        f.sync_all().map_err(FsError::io("fsync", &tmp))?;
        drop(f);
        fail::fail_point!("write-durable-before-rename", |_| Err(injected(&tmp)));
        fs::rename(&tmp, path).map_err(FsError::io("rename", path))?;
        fail::fail_point!("write-durable-after-rename", |_| Err(injected(path)));
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A file written in pieces and made durable at the end by the recipe of [`write_durable`]:
/// a temp file in the same dir, fsync, rename over, fsync the dir. Dropped uncommitted, the
/// temp file goes away and `path` is as it was.
pub struct DurableWriter {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl DurableWriter {
    pub fn create(path: &Path, mode: u32) -> Result<DurableWriter, FsError> {
        let tmp = temp_beside(path);
        let f = create_temp(&tmp, mode)?;
        Ok(DurableWriter {
            tmp,
            path: path.to_path_buf(),
            file: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
        })
    }

    /// Where the file goes when committed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FsError> {
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes).map_err(FsError::io("write", &self.tmp)),
            None => Err(FsError::io("write", &self.tmp)(std::io::Error::other(
                "already committed",
            ))),
        }
    }

    /// Flushes, fsyncs and renames the file into place, then fsyncs its dir.
    pub fn commit(mut self) -> Result<(), FsError> {
        let Some(f) = self.file.take() else {
            return Ok(());
        };
        let f = f
            .into_inner()
            .map_err(|e| FsError::io("write", &self.tmp)(e.into_error()))?;
        f.sync_all().map_err(FsError::io("fsync", &self.tmp))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(FsError::io("rename", &self.path))?;
        fsync_dir(parent_of(&self.path))
    }
}

impl Drop for DurableWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Removes temp files that `write_durable` of another (crashed) process left in `dir`:
/// `.<name>.tmp-<pid>` with a pid that is not ours. Returns how many.
pub fn remove_stale_temps(dir: &Path) -> Result<usize, FsError> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let ours = format!(".tmp-{}", std::process::id());
    let mut n = 0;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.')
            && name
                .rsplit_once(".tmp-")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            && !name.ends_with(&ours);
        if stale && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            fs::remove_file(e.path()).map_err(FsError::io("remove", &e.path()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The error a failpoint returns when it is configured to fail rather than crash.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) fn injected(path: &Path) -> FsError {
    FsError::Io {
        op: "failpoint",
        path: path.to_path_buf(),
        source: io::Error::other("injected failure"),
    }
}

/// Creates a directory (and parents) with the given mode for the leaf.
pub fn create_dir_mode(path: &Path, mode: u32) -> Result<(), FsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(FsError::io("create dir", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(FsError::io("chmod", path))
}

/// Bytes used by the regular files of a tree (symlinks are not followed).
pub fn tree_size(root: &Path) -> Result<u64, FsError> {
    let meta = fs::symlink_metadata(root).map_err(FsError::io("stat", root))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.is_dir() {
        return Ok(0);
    }
    let mut total = 0;
    for entry in fs::read_dir(root).map_err(FsError::io("read dir", root))? {
        let entry = entry.map_err(FsError::io("read dir", root))?;
        total += tree_size(&entry.path())?;
    }
    Ok(total)
}

/// Free bytes available to us on the filesystem holding `path`.
pub fn available_space(path: &Path) -> Result<u64, FsError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| FsError::Io {
        op: "statvfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Refuses early when `dir`'s filesystem cannot take `needed` more bytes (plus 5% and 1 MiB slack).
pub fn ensure_space(dir: &Path, needed: u64) -> Result<(), FsError> {
    let want = needed + needed / 20 + (1 << 20);
    let available = available_space(dir)?;
    if available < want {
        return Err(FsError::NoSpace {
            path: dir.to_path_buf(),
            needed: want,
            available,
        });
    }
    Ok(())
}

/// Copies a tree of directories and regular files durably (each file and directory fsynced),
/// keeping permission bits. Symlinks and special files are refused: a data dir has none.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<u64, FsError> {
    let meta = fs::symlink_metadata(src).map_err(FsError::io("stat", src))?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        create_dir_mode(dst, mode)?;
        let mut copied = 0;
        let mut entries: Vec<_> = fs::read_dir(src)
            .map_err(FsError::io("read dir", src))?
            .collect::<Result<_, _>>()
            .map_err(FsError::io("read dir", src))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            copied += copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
            fail::fail_point!("copy-tree-mid-copy", |_| Err(injected(dst)));
        }
        fsync_dir(dst)?;
        Ok(copied)
    } else if meta.is_file() {
        let mut from = File::open(src).map_err(FsError::io("open", src))?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dst)
            .map_err(FsError::io("create", dst))?;
        let n = io::copy(&mut from, &mut to).map_err(FsError::io("copy to", dst))?;
        to.sync_all().map_err(FsError::io("fsync", dst))?;
        Ok(n)
    } else {
        Err(FsError::NotRegular {
            path: src.to_path_buf(),
        })
    }
}

/// fsyncs every file and directory of a tree (for output written without fsync).
pub fn fsync_tree(root: &Path) -> Result<(), FsError> {
    let meta = fs::symlink_metadata(root).map_err(FsError::io("stat", root))?;
    if meta.is_dir() {
        for entry in fs::read_dir(root).map_err(FsError::io("read dir", root))? {
            let entry = entry.map_err(FsError::io("read dir", root))?;
            fsync_tree(&entry.path())?;
        }
        fsync_dir(root)
    } else if meta.is_file() {
        File::open(root)
            .and_then(|f| f.sync_all())
            .map_err(FsError::io("fsync", root))
    } else {
        Ok(())
    }
}

/// Atomically exchanges two paths on the same filesystem (renameat2 RENAME_EXCHANGE), then
/// fsyncs their parent: either both have moved or neither.
pub fn exchange(a: &Path, b: &Path) -> Result<(), FsError> {
    let ca = cpath(a)?;
    let cb = cpath(b)?;
    // SAFETY-free: a plain syscall through libc with valid NUL-terminated paths.
    let rc = unsafe_renameat2(&ca, &cb, libc::RENAME_EXCHANGE);
    if rc != 0 {
        return Err(FsError::Io {
            op: "exchange",
            path: a.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    fsync_dir(parent_of(a))?;
    if parent_of(a) != parent_of(b) {
        fsync_dir(parent_of(b))?;
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString, FsError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| FsError::Io {
        op: "path",
        path: p.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"),
    })
}

#[allow(unsafe_code)]
fn unsafe_renameat2(a: &CString, b: &CString, flags: libc::c_uint) -> libc::c_int {
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    }
}

/// Starts writing `len` bytes of `file` from `offset` back to disk without waiting for them
/// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later fsync of a large file has
/// little left to do. Only a hint: it makes nothing durable, and errors are ignored.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    unsafe_sync_file_range(file.as_raw_fd(), off, n);
}

#[allow(unsafe_code)]
fn unsafe_sync_file_range(fd: libc::c_int, offset: libc::off64_t, len: libc::off64_t) {
    // SAFETY: a plain syscall on a descriptor the caller's File keeps open; no memory is passed.
    unsafe {
        libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Renames durably (fsync of the destination's parent, and the source's when different).
pub fn rename_durable(from: &Path, to: &Path) -> Result<(), FsError> {
    fs::rename(from, to).map_err(FsError::io("rename", from))?;
    fsync_dir(parent_of(to))?;
    if parent_of(from) != parent_of(to) {
        fsync_dir(parent_of(from))?;
    }
    Ok(())
}

/// Removes a tree if it exists.
pub fn remove_tree(path: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::Io {
            op: "stat",
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(FsError::io("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(FsError::io("remove", path)),
    }
}

/// The processes that hold a lock (flock, POSIX or OFD) on `path`, from `/proc/locks`; empty
/// when none does or the file is absent. Waiters (`->` lines) are not holders.
pub fn lock_holders(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let id = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    parse_lock_holders(&locks, &id)
}

/// Holders of the file `dev_ino` (`maj:min:inode`, hex device numbers as `/proc/locks` prints
/// them) in the text of `/proc/locks`.
fn parse_lock_holders(locks: &str, dev_ino: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = locks
        .lines()
        .filter_map(|line| {
            // "1: FLOCK  ADVISORY  WRITE 4242 fd:01:123 0 EOF"; a waiter has "->" after "1:".
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, kind, _, _, pid, file, ..] if !kind.starts_with("->") && *file == dev_ino => {
                    pid.parse().ok()
                }
                _ => None,
            }
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_durable_replaces_content_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("version.txt");
        write_durable(&p, b"3.4.23/etcd3\n", 0o644).unwrap();
        write_durable(&p, b"3.5.1/etcd3\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "3.5.1/etcd3\n");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn stale_temps_of_other_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(".version.txt.tmp-1"), "x").unwrap();
        fs::write(
            d.path()
                .join(format!(".version.txt.tmp-{}", std::process::id())),
            "ours",
        )
        .unwrap();
        fs::write(d.path().join(".hidden"), "keep").unwrap();
        fs::write(d.path().join("version.txt"), "keep").unwrap();
        assert_eq!(remove_stale_temps(d.path()).unwrap(), 1);
        assert!(!d.path().join(".version.txt.tmp-1").exists());
        assert!(d.path().join(".hidden").exists());
    }

    #[test]
    fn copy_tree_copies_modes_and_bytes_and_refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("member/wal")).unwrap();
        fs::write(src.join("member/wal/0.wal"), vec![7u8; 70_000]).unwrap();
        fs::set_permissions(src.join("member"), fs::Permissions::from_mode(0o700)).unwrap();
        let n = copy_tree(&src, &d.path().join("dst")).unwrap();
        assert_eq!(n, 70_000);
        assert_eq!(
            fs::read(d.path().join("dst/member/wal/0.wal")).unwrap(),
            vec![7u8; 70_000]
        );
        let mode = fs::metadata(d.path().join("dst/member"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        std::os::unix::fs::symlink("/etc", src.join("escape")).unwrap();
        let e = copy_tree(&src, &d.path().join("dst2")).unwrap_err();
        assert!(matches!(e, FsError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn exchange_swaps_two_dirs() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("x"), "old").unwrap();
        fs::write(b.join("x"), "new").unwrap();
        exchange(&a, &b).unwrap();
        assert_eq!(fs::read_to_string(a.join("x")).unwrap(), "new");
        assert_eq!(fs::read_to_string(b.join("x")).unwrap(), "old");
    }

    #[test]
    fn ensure_space_refuses_with_the_figures() {
        let d = tempfile::tempdir().unwrap();
        let e = ensure_space(d.path(), u64::MAX / 4).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("bytes needed") && msg.contains(&d.path().display().to_string()),
            "{msg}"
        );
        assert!(e.is_no_space());
        ensure_space(d.path(), 1).unwrap();
    }

    #[test]
    fn lock_holders_are_read_from_proc_locks_without_waiters() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 5151 fd:01:1234 0 EOF\n\
                     2: OFDLCK ADVISORY  WRITE -1 fd:01:99 0 EOF\n\
                     3: POSIX  ADVISORY  WRITE 77 fd:01:1234 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 88 fd:02:1234 0 EOF\n";
        assert_eq!(parse_lock_holders(locks, "fd:01:1234"), vec![77, 4242]);
        assert_eq!(parse_lock_holders(locks, "fd:01:5"), Vec::<u32>::new());
        assert_eq!(parse_lock_holders("", "fd:01:1234"), Vec::<u32>::new());
    }

    #[test]
    fn lock_holders_of_a_file_we_flock_name_us() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db");
        std::fs::write(&p, b"x").unwrap();
        assert!(lock_holders(&p).is_empty());
        let f = std::fs::File::open(&p).unwrap();
        let held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
        assert_eq!(lock_holders(&p), vec![std::process::id()]);
        drop(held);
        assert!(lock_holders(&p).is_empty());
        assert!(lock_holders(&d.path().join("absent")).is_empty());
    }
}
