//! What a v3 snapshot file (etcd's Snapshot RPC, `etcdctl snapshot save`) holds, read with our own
//! readers, so that a file counts as a backup only once it has been read back whole:
//!
//! - the SHA-256 etcd appends to the stream (the last 32 bytes) matches the rest of the file
//!   ([`Trailer`]); a copied `member/snap/db` has none and is a whole number of pages;
//! - the bbolt file opens and every bucket walks, every page of every tree read;
//! - bucket `key` gives the snapshot's revision (its newest), the number of keys live at it, and
//!   the hash etcd's HashKV computes at that revision ([`KvHash`]), so that the member the
//!   snapshot came from can vouch for it.
//!
//! Memory: one page per tree level, plus 16 bytes per distinct key (its digest and newest
//! revision, for the live count and HashKV's compaction rule) and 24 bytes per entry at or below
//! the compaction; never the keys or values.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64;

use crate::storage::bbolt::{BboltError, Bucket, Db, Value};
use crate::storage::keydigest::KeyDigest;
use crate::storage::mvcc::{self, parse_revision_key, KeyValueRef, MvccError, KEY_BUCKET};
use crate::version::EtcdVersion;

/// Bytes of the SHA-256 etcd appends to a snapshot stream.
pub const TRAILER_LEN: usize = 32;
/// bbolt files grow in whole pages of at least this size; a file with 32 bytes more carries the
/// trailer (etcd's own test: `size % 512 == 32`).
const PAGE_MULTIPLE: u64 = 512;
/// Nested buckets deeper than this are not real etcd data (etcd nests none).
const MAX_NESTING: usize = 8;

/// Why a file is not a usable snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {size} bytes is neither whole pages nor whole pages and etcd's 32-byte checksum: the file is truncated or was not written by etcd")]
    Size { path: PathBuf, size: u64 },
    #[error("{path}: the SHA-256 etcd appended ({want}) does not match the file's contents ({got}): the file is truncated or corrupted")]
    Checksum {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("{path}: not a bbolt database (the format of etcd's backend): {source}")]
    NotBbolt { path: PathBuf, source: BboltError },
    #[error("{path}: a page does not read: {source}")]
    Walk { path: PathBuf, source: BboltError },
    #[error("{path}: {source}")]
    Mvcc { path: PathBuf, source: MvccError },
    #[error("{path}: no bucket `key`: a bbolt database, but not an etcd v3 backend")]
    NotEtcd { path: PathBuf },
}

/// The checksum etcd appends to a snapshot stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trailer {
    /// Present and matching the rest of the file.
    Valid,
    /// None: the file is whole pages (a backend copied from a data dir).
    Absent,
}

/// Which releases' HashKV rule applies to a tombstone at the compaction revision: etcd since
/// 3.5.16 and 3.4.34 skips it (older releases deleted it when compacting, newer keep it).
/// `version` is a release ("3.5.30") or a cluster version ("3.5.0"); unparsable is old.
pub fn skips_compacted_tombstone(version: &str) -> bool {
    let Ok(v) = version.trim().parse::<EtcdVersion>() else {
        return false;
    };
    match (v.major, v.minor) {
        (3, 4) => v.patch >= 34,
        (3, 5) => v.patch >= 16,
        (3, m) => m > 5,
        (m, _) => m > 3,
    }
}

/// etcd's HashKV of bucket `key` at a revision: CRC-32C (Castagnoli) over the bucket's name and
/// then each entry's revision key and value, in key order, for every entry at or below the
/// revision, where an entry at or below the compaction revision counts only when it is its key's
/// newest up to the revision and not a delete (etcd's `keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvHash {
    pub hash: u32,
    pub revision: i64,
    pub compact_revision: i64,
}

/// What a snapshot holds, as our readers found it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
///
/// - `size`, `trailer`, `sha256`: the file's bytes, etcd's checksum, and the SHA-256 of the whole
///   file (what a restore records);
/// - `revision`: the newest main revision in bucket `key`; `keys`: those live at it; `entries`:
///   every revision entry (history and deletes included); `other_elements`: the elements of every
///   other bucket (with `entries`, what `etcdctl snapshot status` calls the total keys);
/// - `scheduled_compact`, `finished_compact`: `scheduledCompactRev` and `finishedCompactRev`;
/// - `cluster_version`: bucket `cluster`'s `clusterVersion` ("3.5.0"), the line that wrote it;
/// - `hash`: HashKV at `revision` with the compaction the file records (scheduled, else finished);
/// - `digest`: our keydigest of every entry, which a restore of the file must leave as it was.
pub struct SnapshotFacts {
    pub size: u64,
    pub trailer: Trailer,
    pub sha256: String,
    pub revision: i64,
    pub keys: u64,
    pub entries: u64,
    pub other_elements: u64,
    pub scheduled_compact: Option<i64>,
    pub finished_compact: Option<i64>,
    pub cluster_version: Option<String>,
    pub hash: KvHash,
    pub digest: KeyDigest,
}

/// Reads the file once for its checksums: the whole-file SHA-256 and, when the size says a
/// trailer is there, that the trailer matches. Adds bytes read to `progress`.
pub fn checksums(
    path: &Path,
    progress: &AtomicU64,
) -> Result<(u64, Trailer, String), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let trailer = match size % PAGE_MULTIPLE {
        0 => Trailer::Absent,
        n if n == TRAILER_LEN as u64 => Trailer::Valid,
        _ => {
            return Err(SnapshotError::Size {
                path: path.to_path_buf(),
                size,
            })
        }
    };
    let body_len = match trailer {
        Trailer::Valid => size - TRAILER_LEN as u64,
        Trailer::Absent => size,
    };
    let (mut body, mut whole) = (Sha256::new(), Sha256::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut tail = Vec::with_capacity(TRAILER_LEN);
    let mut read = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        whole.update(chunk);
        let in_body = body_len.saturating_sub(read).min(n as u64) as usize;
        body.update(&chunk[..in_body]);
        tail.extend_from_slice(&chunk[in_body..]);
        read += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    if read != size {
        return Err(SnapshotError::Size {
            path: path.to_path_buf(),
            size: read,
        });
    }
    if trailer == Trailer::Valid {
        let got = body.finalize();
        if got.as_slice() != tail.as_slice() {
            return Err(SnapshotError::Checksum {
                path: path.to_path_buf(),
                want: hex(&tail),
                got: hex(&got),
            });
        }
    }
    Ok((size, trailer, hex(&whole.finalize())))
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks and reads the snapshot at `path`: checksums, then every bucket, then bucket `key`.
/// The checksums are read on a thread of their own, beside the walk; a file whose checksum is
/// wrong is named as such, whatever the walk found.
pub fn check(path: &Path, progress: &AtomicU64) -> Result<SnapshotFacts, SnapshotError> {
    let placeholder = (0, Trailer::Absent, String::new());
    let (sums, read) = std::thread::scope(|s| {
        let sums = s.spawn(|| checksums(path, &AtomicU64::new(0)));
        let read = check_read(path, placeholder, None, progress);
        (sums.join(), read)
    });
    let (size, trailer, sha256) = sums.unwrap_or_else(|_| {
        Err(SnapshotError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("the checksum thread panicked"),
        })
    })?;
    Ok(SnapshotFacts {
        size,
        trailer,
        sha256,
        ..read?
    })
}

/// [`check`] of a file whose checksums were computed as it was written (size, trailer state,
/// whole-file SHA-256): every bucket, then bucket `key`, adding bytes of `key` read to
/// `progress`. `rule`: HashKV's tombstone rule of the member that will vouch for the file
/// ([`skips_compacted_tombstone`]); `None` takes it from the file's cluster version.
pub fn check_read(
    path: &Path,
    (size, trailer, sha256): (u64, Trailer, String),
    rule: Option<bool>,
    progress: &AtomicU64,
) -> Result<SnapshotFacts, SnapshotError> {
    let db = open(path)?;
    let mvcc_err = |source| SnapshotError::Mvcc {
        path: path.to_path_buf(),
        source,
    };
    let other_elements = walk_other_buckets(&db).map_err(|source| SnapshotError::Walk {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = mvcc::store_meta(&db).map_err(mvcc_err)?;
    let scheduled_compact = meta.scheduled_compact_rev.map(|r| r.main);
    let finished_compact = meta.finished_compact_rev.map(|r| r.main);
    let compact = scheduled_compact.or(finished_compact).unwrap_or(0);
    let cluster_version = cluster_version(&db).map_err(|source| SnapshotError::Walk {
        path: path.to_path_buf(),
        source,
    })?;
    let rule = rule.unwrap_or_else(|| {
        cluster_version
            .as_deref()
            .is_some_and(skips_compacted_tombstone)
    });
    let scan = KeyFacts::read(&db, compact, Some(progress)).map_err(|e| match e {
        MvccError::MissingBucket(_) => SnapshotError::NotEtcd {
            path: path.to_path_buf(),
        },
        e => mvcc_err(e),
    })?;
    let hash = scan.hash(rule);
    let digest = scan.digest;
    Ok(SnapshotFacts {
        size,
        trailer,
        sha256,
        revision: scan.newest,
        keys: scan.live,
        entries: scan.entries,
        other_elements,
        scheduled_compact,
        finished_compact,
        cluster_version,
        hash,
        digest,
    })
}

/// The snapshot's revision (the newest main revision in bucket `key`, its last key), read
/// without walking the bucket; 0 when it is empty.
pub fn newest_revision(path: &Path) -> Result<i64, SnapshotError> {
    let db = open(path)?;
    let mvcc_err = |source| SnapshotError::Mvcc {
        path: path.to_path_buf(),
        source,
    };
    let bucket = db
        .bucket(KEY_BUCKET)
        .map_err(|e| mvcc_err(e.into()))?
        .ok_or_else(|| SnapshotError::NotEtcd {
            path: path.to_path_buf(),
        })?;
    match bucket.last_key().map_err(|e| mvcc_err(e.into()))? {
        None => Ok(0),
        Some(k) => Ok(parse_revision_key(&k).map_err(mvcc_err)?.rev.main),
    }
}

/// HashKV of the file at `path`'s newest revision with another compaction revision (the
/// member's, when it differs from what the file records), under `rule` (see
/// [`skips_compacted_tombstone`]).
pub fn hash_kv(path: &Path, compact: i64, rule: bool) -> Result<KvHash, SnapshotError> {
    let db = open(path)?;
    KeyFacts::read(&db, compact, None)
        .map(|s| s.hash(rule))
        .map_err(|source| SnapshotError::Mvcc {
            path: path.to_path_buf(),
            source,
        })
}

/// Opens the file with our bbolt reader.
fn open(path: &Path) -> Result<Db, SnapshotError> {
    Db::open(path).map_err(|source| SnapshotError::NotBbolt {
        path: path.to_path_buf(),
        source,
    })
}

/// `clusterVersion` from bucket `cluster`, if any.
fn cluster_version(db: &Db) -> Result<Option<String>, BboltError> {
    let Some(b) = db.bucket(b"cluster")? else {
        return Ok(None);
    };
    Ok(b.get(b"clusterVersion")?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Walks every bucket but `key` (read by [`KeyFacts`]), nested ones too: every page of those
/// trees is read. Returns the elements seen in them (as `etcdctl snapshot status` counts keys).
fn walk_other_buckets(db: &Db) -> Result<u64, BboltError> {
    let mut n = 0;
    for item in db.root().iter() {
        let (name, value) = item?;
        if let Value::Bucket(b) = value {
            if name != KEY_BUCKET {
                walk(&b, 1, &mut n)?;
            }
        }
    }
    Ok(n)
}

fn walk(bucket: &Bucket<'_>, depth: usize, n: &mut u64) -> Result<(), BboltError> {
    for item in bucket.iter() {
        let (_, value) = item?;
        *n += 1;
        if let Value::Bucket(b) = value {
            if depth < MAX_NESTING {
                walk(&b, depth + 1, n)?;
            }
        }
    }
    Ok(())
}

/// One entry at or below the compaction revision: HashKV counts it only if it is still its
/// key's newest and not a delete, which is known only once the whole bucket has been read.
#[derive(Debug, Clone, Copy)]
struct Early {
    key: u64,
    crc: u32,
    len: u32,
    tombstone: bool,
    main: i64,
}

/// One pass over bucket `key`: the newest revision, the live keys, and the pieces of HashKV.
#[derive(Debug, Default)]
pub struct KeyFacts {
    pub newest: i64,
    pub entries: u64,
    pub live: u64,
    compact: i64,
    /// Entries at or below the compaction, in bucket order.
    early: Vec<Early>,
    /// Per key digest: its newest revision and whether that is a delete.
    newest_of: HashMap<u64, (i64, bool)>,
    /// CRC-32C of the entries after the compaction, and their length.
    late_crc: u32,
    late_len: usize,
    /// Our digest of every entry.
    pub digest: KeyDigest,
}

impl KeyFacts {
    /// Reads bucket `key` once, adding the bytes read to `progress`.
    pub fn read(
        db: &Db,
        compact: i64,
        progress: Option<&AtomicU64>,
    ) -> Result<KeyFacts, MvccError> {
        let bucket = db
            .bucket(KEY_BUCKET)?
            .ok_or_else(|| MvccError::MissingBucket("key".into()))?;
        let mut f = KeyFacts {
            compact,
            ..KeyFacts::default()
        };
        let mut it = bucket.iter();
        let mut unpublished = 0u64;
        while let Some(item) = it.next_borrowed() {
            let (k, v, _) = item?;
            let rk = parse_revision_key(k)?;
            let bad = |reason: &str| MvccError::Inconsistent {
                bucket: "key",
                entry: format!("{}_{}", rk.rev.main, rk.rev.sub),
                reason: reason.to_string(),
            };
            let v = v.ok_or_else(|| bad("is a bucket, not a value"))?;
            let kv =
                KeyValueRef::decode(v).ok_or_else(|| bad("value is not an mvccpb.KeyValue"))?;
            if rk.rev.main < f.newest {
                return Err(bad("revisions out of order"));
            }
            f.newest = rk.rev.main;
            f.entries += 1;
            f.digest.add(k, v, rk.rev.main);
            let key = xxh3_64(kv.key);
            f.newest_of.insert(key, (rk.rev.main, rk.tombstone));
            let len = k.len() + v.len();
            unpublished += len as u64;
            if unpublished >= 1 << 20 {
                if let Some(p) = progress {
                    p.fetch_add(unpublished, Ordering::Relaxed);
                }
                unpublished = 0;
            }
            if rk.rev.main <= compact {
                let crc = crc32c::crc32c_append(crc32c::crc32c(k), v);
                f.early.push(Early {
                    key,
                    crc,
                    len: len as u32,
                    tombstone: rk.tombstone,
                    main: rk.rev.main,
                });
            } else {
                f.late_crc = crc32c::crc32c_append(crc32c::crc32c_append(f.late_crc, k), v);
                f.late_len += len;
            }
        }
        f.live = f.newest_of.values().filter(|(_, tomb)| !tomb).count() as u64;
        Ok(f)
    }

    /// HashKV at the newest revision read. `skip_compacted_tombstone`: see
    /// [`skips_compacted_tombstone`].
    pub fn hash(&self, skip_compacted_tombstone: bool) -> KvHash {
        // etcd's `keep` is empty when no key is live: then no early entry is left out.
        let keep_all = self.live == 0;
        let mut crc = crc32c::crc32c(KEY_BUCKET);
        for e in &self.early {
            let kept = keep_all
                || (!e.tombstone
                    && self
                        .newest_of
                        .get(&e.key)
                        .is_some_and(|&(main, _)| main == e.main));
            if !kept || (skip_compacted_tombstone && e.tombstone && e.main == self.compact) {
                continue;
            }
            crc = crc_combine(crc, e.crc, e.len as u64);
        }
        crc = crc_combine(crc, self.late_crc, self.late_len as u64);
        KvHash {
            hash: crc,
            revision: self.newest,
            compact_revision: self.compact,
        }
    }
}

/// CRC-32C (reflected polynomial) of `a || b` from the CRCs of `a` and `b` and the length of
/// `b`: `crc(a)` times x^(8 len) modulo the polynomial, plus `crc(b)`. zlib's method (powers
/// x^(2^k) from a table, a multiply per set bit of the length): a fraction of a microsecond,
/// where the crc32c crate's matrix method took microseconds, per entry of a large bucket.
pub fn crc_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    if len_b == 0 {
        return crc_a; // b is empty (its CRC is 0), as zlib has it
    }
    mult_mod_p(x_pow_8n(len_b), crc_a) ^ crc_b
}

const CASTAGNOLI_REFLECTED: u32 = 0x82F6_3B78;

/// a * b modulo the polynomial, bit-reflected (x^0 is the top bit).
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CASTAGNOLI_REFLECTED
        } else {
            b >> 1
        };
        if m == 0 {
            return p;
        }
    }
}

/// x^(2^k) modulo the polynomial, for k in 0..67 (8 n for any u64 n).
const X2N: [u32; 67] = {
    let mut t = [0u32; 67];
    let mut p: u32 = 1 << 30; // x^1
    let mut k = 0;
    while k < 67 {
        t[k] = p;
        p = mult_mod_p(p, p);
        k += 1;
    }
    t
};

/// x^(8 n) modulo the polynomial: n zero bytes appended.
fn x_pow_8n(mut n: u64) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    let mut k = 3; // 8 n = n * 2^3
    while n != 0 {
        if n & 1 != 0 {
            p = mult_mod_p(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

#[cfg(test)]
mod tests;
