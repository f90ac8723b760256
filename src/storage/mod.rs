//! On-disk formats of etcd, read and written by hand (no I/O policy here). No published Rust
//! crate reads etcd's bbolt backend or writes a 2.2.1-compatible WAL, so these are ours.
pub mod bbolt;
pub mod keydigest;
pub mod mvcc;
pub mod raftpb;
pub mod snap;
pub mod v2export;
pub mod v2member;
pub mod v2store;
pub mod wal;
pub mod walinfo;

/// Shared by the format modules' unit tests: the real data in ../shared/fixtures.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;

    pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");

    /// Unpacks fixture `name` (a tarball holding `data/`) and returns the path of its bbolt db.
    pub fn fixture_db(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("tar")
            .arg("-xzf")
            .arg(format!("{FIXTURES}/{name}.tar.gz"))
            .arg("-C")
            .arg(dir.path())
            .status()
            .expect("run tar");
        assert!(status.success(), "tar failed for {name}");
        let db = dir.path().join("data/member/snap/db");
        (dir, db)
    }
}
