//! Shared by the fuzz targets: one scratch directory per fuzzing process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory private to this process for the files a target writes on every input:
/// `$ETCD_MIGRATE_FUZZ_TMP` (scripts/fuzz.sh sets it and removes it afterwards), else
/// `/dev/shm` (tmpfs: no disk I/O per input), else the system temp dir.
pub fn scratch_dir(target: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = match std::env::var_os("ETCD_MIGRATE_FUZZ_TMP") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            _ => std::env::temp_dir(),
        };
        let dir = base.join(format!("etcd-migrate-fuzz-{target}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch dir");
        dir
    })
}
