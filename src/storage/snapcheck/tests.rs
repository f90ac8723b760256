use super::*;
use crate::storage::testutil::fixture_db;

fn with_trailer(db: &Path, out: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(db).unwrap();
    let sum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&sum);
    std::fs::write(out, &bytes).unwrap();
    bytes
}

fn check_file(path: &Path) -> Result<SnapshotFacts, SnapshotError> {
    check(path, &AtomicU64::new(0))
}

#[test]
fn a_backend_with_and_without_etcds_trailer_reads_the_same() {
    let (dir, db) = fixture_db("etcd-3.0.17-v3");
    let plain = check_file(&db).unwrap();
    assert_eq!(plain.trailer, Trailer::Absent);
    let snap = dir.path().join("s.db");
    let bytes = with_trailer(&db, &snap);
    let t = check_file(&snap).unwrap();
    assert_eq!(t.trailer, Trailer::Valid);
    assert_eq!(t.size, bytes.len() as u64);
    assert_eq!(t.sha256, hex(&Sha256::digest(&bytes)));
    assert_eq!(
        (t.revision, t.keys, t.entries, t.hash),
        (plain.revision, plain.keys, plain.entries, plain.hash)
    );
    // The live count agrees with the reader the steps use.
    let index = mvcc::LiveIndex::build(&Db::open(&db).unwrap()).unwrap();
    assert_eq!(t.keys, index.len() as u64);
    assert_eq!(Some(t.revision), index.newest_revision().map(|r| r.main));
    assert!(t.keys > 0 && t.entries >= t.keys);
}

#[test]
fn a_changed_byte_or_a_cut_is_named() {
    let (dir, db) = fixture_db("etcd-3.0.17-v3");
    let snap = dir.path().join("s.db");
    let mut bytes = with_trailer(&db, &snap);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&snap, &bytes).unwrap();
    assert!(
        matches!(check_file(&snap), Err(SnapshotError::Checksum { .. })),
        "flipped bit"
    );
    bytes[mid] ^= 1;
    std::fs::write(&snap, &bytes[..bytes.len() - 4096]).unwrap();
    assert!(
        matches!(check_file(&snap), Err(SnapshotError::Checksum { .. })),
        "cut by a page"
    );
    std::fs::write(&snap, &bytes[..bytes.len() - 100]).unwrap();
    assert!(
        matches!(check_file(&snap), Err(SnapshotError::Size { .. })),
        "cut mid-page"
    );
    // Without the trailer only the walk can tell: cut off pages the trees use.
    let half = 4096 * 10; // the fixture's trees use pages up to 12
    std::fs::write(&snap, &bytes[..half]).unwrap();
    assert!(
        check_file(&snap).is_err(),
        "cut to whole pages without the trailer"
    );
    std::fs::write(&snap, b"").unwrap();
    assert!(check_file(&snap).is_err(), "empty");
    let mut text = b"not a database".repeat(2000);
    text.truncate(8192);
    std::fs::write(&snap, &text).unwrap();
    assert!(
        matches!(check_file(&snap), Err(SnapshotError::NotBbolt { .. })),
        "text"
    );
}

#[test]
fn combining_crcs_equals_one_crc_over_the_concatenation() {
    let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let parts: [&[u8]; 6] = [b"key", b"", b"abc", &[7u8; 5000], &big, b"z"];
    let whole: Vec<u8> = parts.concat();
    let mut crc = crc32c::crc32c(parts[0]);
    for p in &parts[1..] {
        let next = crc_combine(crc, crc32c::crc32c(p), p.len() as u64);
        assert_eq!(
            next,
            crc32c::crc32c_combine(crc, crc32c::crc32c(p), p.len())
        );
        crc = next;
    }
    assert_eq!(crc, crc32c::crc32c(&whole));
    for len in [
        0u64,
        1,
        2,
        3,
        31,
        32,
        33,
        4095,
        4096,
        1 << 20,
        (1 << 33) + 5,
    ] {
        assert_eq!(
            crc_combine(0x1234_5678, 0x9abc_def0, len),
            crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, len as usize),
            "len {len}"
        );
    }
}

#[test]
fn releases_that_skip_a_tombstone_at_the_compaction() {
    let cases = [
        ("3.4.23", false),
        ("3.4.34", true),
        ("3.5.1", false),
        ("3.5.15", false),
        ("3.5.16", true),
        ("3.5.30", true),
        ("3.6.0", true),
        ("3.0.17", false),
        ("3.5.0\n", false),
        ("x", false),
    ];
    for (v, want) in cases {
        assert_eq!(skips_compacted_tombstone(v), want, "{v:?}");
    }
}

/// Snapshots saved by real etcd after puts, an overwrite, deletes, a lease and a compaction at
/// revision 15 (the seeds of the fuzz target), with the HashKV each member answered at the
/// snapshot's revision 18 (`etcdctl endpoint hashkv`).
#[test]
fn our_hash_is_the_members_hashkv() {
    let seeds = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/fuzz/snapshot");
    for (file, want) in [
        ("etcd-3.4.23-compacted.db", 2_979_184_254u32),
        ("etcd-3.5.30-compacted.db", 1_557_159_262),
    ] {
        let f = check_file(&Path::new(seeds).join(file)).unwrap();
        assert_eq!(f.trailer, Trailer::Valid, "{file}");
        assert_eq!((f.revision, f.hash.compact_revision), (18, 15), "{file}");
        let path = Path::new(seeds).join(file);
        assert_eq!(
            newest_revision(&path).unwrap(),
            18,
            "{file}: from the last key"
        );
        assert_eq!(f.hash.hash, want, "{file}: {f:?}");
        // 12 puts, k2 and k4 deleted, one event.
        assert_eq!(f.keys, 11, "{file}");
    }
}
