//! The snapshot verifier (`storage::snapcheck`) on arbitrary files: checksums, the walk of every
//! bucket, the one pass over bucket `key` (newest revision, live keys, HashKV). Nothing may
//! panic or loop. Each input runs three ways: as it is (mostly refused by its size or
//! trailer), padded to whole pages with etcd's SHA-256 trailer appended (so the bytes reach
//! the bbolt reader), and that again with the bbolt meta checksums recomputed. Oracles: a file
//! that verifies gives the same HashKV when asked again with the same compaction, at most as
//! many live keys as entries, and a trailer state its size implies.
#![no_main]

mod common;

use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

use etcd_migrate::storage::snapcheck::{self, Trailer};

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_dir("snapshot").join("snap.db");
    check(&path, data);
    let padded = with_trailer(data);
    check(&path, &padded);
    if let Some(fixed) = common::fix_meta_checksums(&padded[..padded.len() - 32]) {
        check(&path, &with_trailer(&fixed));
    }
});

/// `data` zero-padded to a multiple of 512 bytes, then its SHA-256.
fn with_trailer(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(data.len().div_ceil(512).max(1) * 512, 0);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn check(path: &std::path::Path, data: &[u8]) {
    std::fs::write(path, data).expect("write the scratch snapshot");
    match snapcheck::check(path, &AtomicU64::new(0)) {
        Ok(facts) => {
            assert_eq!(facts.size, data.len() as u64);
            let want = if data.len() % 512 == 0 { Trailer::Absent } else { Trailer::Valid };
            assert_eq!(facts.trailer, want);
            assert!(facts.keys <= facts.entries, "{facts:?}");
            assert_eq!(facts.hash.revision, facts.revision);
            assert_eq!(
                snapcheck::newest_revision(path).expect("the last key of a file that verified"),
                facts.revision,
                "the last key names the newest revision"
            );
            let again = snapcheck::hash_kv(path, facts.hash.compact_revision, false)
                .expect("the hash of a file that verified");
            let rule_free = snapcheck::hash_kv(path, facts.hash.compact_revision, true)
                .expect("the hash of a file that verified");
            assert!(again == facts.hash || rule_free == facts.hash, "hash not reproducible");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
