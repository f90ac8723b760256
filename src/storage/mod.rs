//! On-disk formats of etcd, read and written by hand (no I/O policy here). No published Rust
//! crate reads etcd's bbolt backend or writes a 2.2.1-compatible WAL, so these are ours.
pub mod bbolt;
pub mod keydigest;
pub mod mvcc;
pub mod raftpb;
pub mod snap;
pub mod snapcheck;
pub mod v2export;
pub mod v2member;
pub mod v2store;
pub mod wal;
pub mod walinfo;

/// `%016x-%016x.<ext>`: how etcd names WAL segments (sequence, index) and snapshots (term, index).
fn hex_pair_name(a: u64, b: u64, ext: &str) -> String {
    format!("{a:016x}-{b:016x}.{ext}")
}

/// Parses a [`hex_pair_name`], as etcd's `parseWalName` does: exactly 16 hex digits on each side.
fn parse_hex_pair_name(name: &str, ext: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    let (a, b) = stem.split_once('-')?;
    let hex16 = |s: &str| {
        (s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some((hex16(a)?, hex16(b)?))
}

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
