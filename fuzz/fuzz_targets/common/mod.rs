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

/// FNV-1a 64, bbolt's meta checksum.
#[allow(dead_code)] // each target is its own crate: not every one uses every helper
fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The input with the checksums of meta page 0 (offset 0) and meta page 1 (one page in,
/// page size taken from meta 0) recomputed; `None` when nothing changes.
#[allow(dead_code)]
pub fn fix_meta_checksums(data: &[u8]) -> Option<Vec<u8>> {
    const HEADER: usize = 16;
    const SUMMED: usize = 56;
    let mut out = data.to_vec();
    let fix = |buf: &mut [u8], page_off: usize| {
        let start = page_off + HEADER;
        if buf.len() >= start + SUMMED + 8 {
            let sum = fnv1a64(&buf[start..start + SUMMED]);
            buf[start + SUMMED..start + SUMMED + 8].copy_from_slice(&sum.to_le_bytes());
        }
    };
    fix(&mut out, 0);
    let page_size = if out.len() >= HEADER + 12 {
        u32::from_le_bytes([
            out[HEADER + 8],
            out[HEADER + 9],
            out[HEADER + 10],
            out[HEADER + 11],
        ])
    } else {
        0
    };
    let page_size = if page_size.is_power_of_two() && (512..=65536).contains(&page_size) {
        page_size as usize
    } else {
        4096
    };
    fix(&mut out, page_size);
    (out != data).then_some(out)
}
