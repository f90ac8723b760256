//! The etcd v3 store (mvcc) as kept in its bbolt backend: live keys, leases and meta.
//!
//! Bucket `key` maps revision keys to `mvccpb.KeyValue` protobufs. A revision key is the
//! 8-byte big-endian main revision, `_`, the 8-byte big-endian sub revision, and a trailing
//! `t` when the entry is a tombstone (a delete, whose KeyValue holds only the key). Byte
//! order of revision keys is revision order. Compaction removes every revision at or below
//! the compacted one except the newest per key (and that one too when it is a tombstone),
//! deleting oldest first, so "newest revision per key, minus tombstones" stays exactly the
//! live set before, during and after a compaction.

use std::fmt;

use crate::storage::bbolt::{BboltError, Db, Location, Value};

/// Bucket of revision → KeyValue.
pub const KEY_BUCKET: &[u8] = b"key";
/// Bucket of store metadata (consistent index, compaction marks, ...).
pub const META_BUCKET: &[u8] = b"meta";
/// Bucket of lease id → Lease.
pub const LEASE_BUCKET: &[u8] = b"lease";

/// Length of a revision key without / with the tombstone mark.
const REV_LEN: usize = 17;
const TOMBSTONE_REV_LEN: usize = 18;
const TOMBSTONE_MARK: u8 = b't';

/// Why the etcd store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    /// The bbolt file itself is unreadable.
    #[error(transparent)]
    Bbolt(#[from] BboltError),
    /// A bucket etcd always creates is absent.
    #[error("bucket {0:?} not found")]
    MissingBucket(String),
    /// A thread scanning part of bucket `key` panicked. (The text is the one this error
    /// had when it was reported as a missing bucket.)
    #[error("bucket \"a {scan} thread panicked\" not found")]
    ScanPanicked {
        /// Which scan: `scan` (the live index) or `digest` (the key digest).
        scan: &'static str,
    },
    /// A key in bucket `key` is not a revision key.
    #[error("bucket key: bad revision key {key}: {reason}")]
    BadRevision {
        /// The key, hex.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A protobuf value does not decode.
    #[error("bucket {bucket}: entry {entry}: {source}")]
    Decode {
        /// Bucket name.
        bucket: &'static str,
        /// The entry (revision, lease key, ...).
        entry: String,
        /// Decoder error.
        source: prost::DecodeError,
    },
    /// Entries contradict each other or the index.
    #[error("bucket {bucket}: entry {entry}: {reason}")]
    Inconsistent {
        /// Bucket name.
        bucket: &'static str,
        /// The entry (revision, lease key, ...).
        entry: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, MvccError>;

/// An etcd revision: `main` counts transactions, `sub` the changes within one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// Transaction revision (what clients see as `mod_revision`).
    pub main: i64,
    /// Index of the change inside the transaction.
    pub sub: i64,
}

impl Revision {
    /// The 17-byte key of this revision (18 with the tombstone mark).
    pub fn to_key(self, tombstone: bool) -> Vec<u8> {
        let mut k = Vec::with_capacity(TOMBSTONE_REV_LEN);
        k.extend_from_slice(&self.main.to_be_bytes());
        k.push(b'_');
        k.extend_from_slice(&self.sub.to_be_bytes());
        if tombstone {
            k.push(TOMBSTONE_MARK);
        }
        k
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.main, self.sub)
    }
}

/// A parsed key of bucket `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevisionKey {
    /// The revision.
    pub rev: Revision,
    /// Whether the entry records a delete.
    pub tombstone: bool,
}

/// Parses a revision key: `main(8 BE) '_' sub(8 BE)` plus an optional `t`.
pub fn parse_revision_key(key: &[u8]) -> Result<RevisionKey> {
    let bad = |reason: &str| MvccError::BadRevision {
        key: hex(key),
        reason: reason.to_string(),
    };
    let tombstone = match key.len() {
        REV_LEN => false,
        TOMBSTONE_REV_LEN if key[REV_LEN] == TOMBSTONE_MARK => true,
        TOMBSTONE_REV_LEN => return Err(bad("18th byte is not the tombstone mark 't'")),
        n => return Err(bad(&format!("{n} bytes, expected 17 or 18"))),
    };
    if key[8] != b'_' {
        return Err(bad("9th byte is not '_'"));
    }
    let mut main = [0u8; 8];
    let mut sub = [0u8; 8];
    main.copy_from_slice(&key[..8]);
    sub.copy_from_slice(&key[9..REV_LEN]);
    let rev = Revision {
        main: i64::from_be_bytes(main),
        sub: i64::from_be_bytes(sub),
    };
    // etcd revisions start at 1 and sub revisions at 0.
    if rev.main < 1 || rev.sub < 0 {
        return Err(bad("negative or zero revision"));
    }
    Ok(RevisionKey { rev, tombstone })
}

/// `mvccpb.KeyValue`: one revision of one key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The user key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of the put that created this generation of the key.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of this change.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Number of puts since creation (1 for the creating put).
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Attached lease id, 0 for none.
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// A [`KeyValue`] read in place: key and value borrowed from the bytes it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyValueRef<'a> {
    /// The user key.
    pub key: &'a [u8],
    /// Revision of the put that created this generation of the key.
    pub create_revision: i64,
    /// Revision of this change.
    pub mod_revision: i64,
    /// Number of puts since creation.
    pub version: i64,
    /// The value.
    pub value: &'a [u8],
    /// Attached lease id, 0 for none.
    pub lease: i64,
}

impl<'a> KeyValueRef<'a> {
    /// Decodes `b` as prost decodes a [`KeyValue`] (fields in any order, the last of a repeated
    /// one wins, unknown fields skipped), without copying; `None` when it is not one.
    pub fn decode(mut b: &'a [u8]) -> Option<KeyValueRef<'a>> {
        fn varint(b: &mut &[u8]) -> Option<u64> {
            let mut v = 0u64;
            for shift in (0..70).step_by(7) {
                let (&byte, rest) = b.split_first()?;
                *b = rest;
                if shift == 63 && byte > 1 {
                    return None;
                }
                v |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return Some(v);
                }
            }
            None
        }
        let mut kv = KeyValueRef {
            key: &[],
            create_revision: 0,
            mod_revision: 0,
            version: 0,
            value: &[],
            lease: 0,
        };
        while !b.is_empty() {
            let tag = varint(&mut b)?;
            let (field, wire) = (tag >> 3, tag & 7);
            // As prost: a tag is a u32 and field 0 does not exist.
            if field == 0 || tag > u64::from(u32::MAX) {
                return None;
            }
            match wire {
                0 => {
                    let v = varint(&mut b)? as i64;
                    match field {
                        2 => kv.create_revision = v,
                        3 => kv.mod_revision = v,
                        4 => kv.version = v,
                        6 => kv.lease = v,
                        1 | 5 => return None,
                        _ => {}
                    }
                }
                2 => {
                    let n = usize::try_from(varint(&mut b)?).ok()?;
                    let body = b.get(..n)?;
                    b = &b[n..];
                    match field {
                        1 => kv.key = body,
                        5 => kv.value = body,
                        2..=4 | 6 => return None,
                        _ => {}
                    }
                }
                1 | 5 => {
                    if (1..=6).contains(&field) {
                        return None;
                    }
                    b = b.get(if wire == 1 { 8 } else { 4 }..)?;
                }
                _ => return None,
            }
        }
        Some(kv)
    }

    /// The owned [`KeyValue`].
    pub fn to_owned(&self) -> KeyValue {
        KeyValue {
            key: self.key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.to_vec(),
            lease: self.lease,
        }
    }
}

/// `leasepb.Lease`, as stored in bucket `lease`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct Lease {
    /// Lease id.
    #[prost(int64, tag = "1")]
    pub id: i64,
    /// Granted TTL in seconds.
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    /// Remaining TTL when checkpointed (etcd 3.4+, 0 if never).
    #[prost(int64, tag = "3")]
    pub remaining_ttl: i64,
}

/// The newest revision of every live key, built by one scan of bucket `key`.
///
/// Holds keys, revisions and where each newest revision sits in the file (no values): memory
/// is O(keys × key length), up to about twice that while the scan compacts. Fetching a value
/// by its location needs no tree descent.
#[derive(Clone, Debug, Default)]
pub struct LiveIndex {
    /// The scanned parts, in revision order, each compacted: keys in key order, one entry per
    /// key (the newest in that part; tombstones kept in all parts but the first).
    parts: Vec<Keyed>,
    /// The live keys in key order: (part, entry) of the newest entry of each, never a tombstone.
    order: Vec<(usize, usize)>,
    newest: Option<Revision>,
    revisions: u64,
}

/// Runs `scan` on each part (with its position): on this thread when there is one part, else
/// each on a thread of its own. Results come in part order; a thread that panicked gives
/// [`MvccError::ScanPanicked`] naming `what`.
pub(crate) fn scan_parts<P: Send, T: Send>(
    parts: Vec<P>,
    what: &'static str,
    scan: impl Fn(usize, P) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    if parts.len() == 1 {
        return parts.into_iter().map(|p| scan(0, p)).collect();
    }
    let scan = &scan;
    std::thread::scope(|scope| {
        let running: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| scope.spawn(move || scan(i, p)))
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or(Err(MvccError::ScanPanicked { scan: what }))
            })
            .collect()
    })
}

impl LiveIndex {
    /// Scans bucket `key` in revision order, keeping the newest revision per key and
    /// dropping keys whose newest revision is a tombstone. Large buckets are scanned in parts
    /// on threads of their own (one per core, up to 4) and the parts merged in order.
    pub fn build(db: &Db) -> Result<LiveIndex> {
        let bucket = db
            .bucket(KEY_BUCKET)?
            .ok_or_else(|| MvccError::MissingBucket("key".into()))?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parts = bucket.iter_parts(cores.clamp(1, 4))?;
        // The first part's tombstones delete nothing before it: no need to note them.
        let scanned = scan_parts(parts, "scan", |i, it| scan_part(it, i > 0));
        let mut index = LiveIndex::default();
        for part in scanned {
            let part = part?;
            index.newest = part.newest.or(index.newest);
            index.revisions += part.revisions;
            index.parts.push(part.keys);
        }
        index.order = merge_parts(&index.parts);
        Ok(index)
    }

    /// The entry at `at` in `order` and its key.
    fn entry(&self, (part, i): (usize, usize)) -> (&[u8], &Entry) {
        let keyed = &self.parts[part];
        let e = &keyed.entries[i];
        (keyed.key(e), e)
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no key is live.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Highest revision found in bucket `key` (tombstones included): the store's current
    /// revision, unless compaction removed it.
    pub fn newest_revision(&self) -> Option<Revision> {
        self.newest
    }

    /// Number of revision entries scanned.
    pub fn revisions_scanned(&self) -> u64 {
        self.revisions
    }

    /// The newest revision of live `key`.
    pub fn revision(&self, key: &[u8]) -> Option<Revision> {
        let at = self
            .order
            .binary_search_by(|&at| self.entry(at).0.cmp(key))
            .ok()?;
        Some(self.entry(self.order[at]).1.rev)
    }

    /// Live keys and their newest revisions, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Revision)> + '_ {
        self.order.iter().map(|&at| {
            let (key, e) = self.entry(at);
            (key, e.rev)
        })
    }

    /// Every live key in key order with its full KeyValue, read lazily where the index scan
    /// found it (one value in memory at a time).
    pub fn values<'a>(&'a self, db: &'a Db) -> Result<impl Iterator<Item = Result<KeyValue>> + 'a> {
        let bucket = db
            .bucket(KEY_BUCKET)?
            .ok_or_else(|| MvccError::MissingBucket("key".into()))?;
        let mut buf = Vec::new();
        Ok(self.order.iter().map(move |&at| {
            let (key, e) = self.entry(at);
            fetch(&bucket, key, e.rev, e.loc, &mut buf)
        }))
    }

    /// Like [`LiveIndex::for_each`], lending each KeyValue from one buffer reused for all.
    pub fn for_each_ref<E, F>(&self, db: &Db, mut f: F) -> std::result::Result<(), E>
    where
        F: FnMut(KeyValueRef<'_>) -> std::result::Result<(), E>,
        E: From<MvccError>,
    {
        let bucket = db
            .bucket(KEY_BUCKET)
            .map_err(MvccError::from)?
            .ok_or_else(|| MvccError::MissingBucket("key".into()))?;
        let mut buf = Vec::new();
        for &at in &self.order {
            let (key, e) = self.entry(at);
            f(fetch_ref(&bucket, key, e.rev, e.loc, &mut buf)?)?;
        }
        Ok(())
    }

    /// Visits every live key in key order with its full KeyValue, read where the index scan
    /// found its revision, so only one value is in memory at a time.
    pub fn for_each<E, F>(&self, db: &Db, mut f: F) -> std::result::Result<(), E>
    where
        F: FnMut(KeyValue) -> std::result::Result<(), E>,
        E: From<MvccError>,
    {
        self.for_each_ref(db, |kv| f(kv.to_owned()))
    }
}

/// A key (its bytes in its [`Keyed`]) and one revision of it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    at: usize,
    len: usize,
    tombstone: bool,
    rev: Revision,
    loc: Location,
}

/// Keys back to back in one buffer, and entries pointing into it: no allocation per key.
#[derive(Clone, Debug, Default)]
struct Keyed {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl Keyed {
    fn key(&self, e: &Entry) -> &[u8] {
        &self.bytes[e.at..e.at + e.len]
    }

    fn push(&mut self, key: &[u8], rev: Revision, tombstone: bool, loc: Location) {
        self.entries.push(Entry {
            at: self.bytes.len(),
            len: key.len(),
            tombstone,
            rev,
            loc,
        });
        self.bytes.extend_from_slice(key);
    }

    /// Keeps the newest entry of each key (entries of one key come in revision order), in
    /// key order, with the key bytes rewritten in that order; tombstones go unless
    /// `keep_tombstones`.
    fn compact(&mut self, keep_tombstones: bool) {
        let bytes = &self.bytes;
        let key = |e: &Entry| &bytes[e.at..e.at + e.len];
        // Revisions are unique, so (key, revision) orders the entries totally.
        self.entries
            .sort_unstable_by(|a, b| key(a).cmp(key(b)).then(a.rev.cmp(&b.rev)));
        let mut in_key_order = Vec::with_capacity(self.bytes.len());
        let mut kept = 0;
        for i in 0..self.entries.len() {
            let e = self.entries[i];
            let newest = self
                .entries
                .get(i + 1)
                .is_none_or(|next| key(next) != key(&e));
            if newest && (keep_tombstones || !e.tombstone) {
                self.entries[kept] = Entry {
                    at: in_key_order.len(),
                    ..e
                };
                in_key_order.extend_from_slice(key(&e));
                kept += 1;
            }
        }
        self.entries.truncate(kept);
        in_key_order.shrink_to_fit();
        self.bytes = in_key_order;
    }
}

/// The live keys of parts scanned in revision order, each compacted, in key order: for each
/// key the entry of the latest part holding it, left out when that one is a tombstone.
fn merge_parts(parts: &[Keyed]) -> Vec<(usize, usize)> {
    let mut pos = vec![0usize; parts.len()];
    let mut order = Vec::with_capacity(parts.iter().map(|p| p.entries.len()).max().unwrap_or(0));
    loop {
        // The smallest key at the parts' heads; among equal ones the latest part's.
        let mut newest: Option<(usize, &[u8])> = None;
        for (p, keyed) in parts.iter().enumerate() {
            if let Some(e) = keyed.entries.get(pos[p]) {
                let k = keyed.key(e);
                if newest.is_none_or(|(_, least)| k <= least) {
                    newest = Some((p, k));
                }
            }
        }
        let Some((winner, key)) = newest else {
            return order;
        };
        if !parts[winner].entries[pos[winner]].tombstone {
            order.push((winner, pos[winner]));
        }
        for (p, keyed) in parts.iter().enumerate() {
            if keyed
                .entries
                .get(pos[p])
                .is_some_and(|e| keyed.key(e) == key)
            {
                pos[p] += 1;
            }
        }
    }
}

/// What one part of the `key` bucket holds: its keys (compacted; the first part's without
/// tombstones), its newest revision and how many it has.
#[derive(Default)]
struct Part {
    keys: Keyed,
    newest: Option<Revision>,
    revisions: u64,
}

/// Entries a part collects before its first compaction; later ones wait for twice what the
/// last kept.
const COMPACT_AT_LEAST: usize = 1 << 16;

/// Collects a part's entries in revision order, compacting as it goes so that memory stays
/// within about twice the keys kept, however many revisions there are.
struct PartBuilder {
    keys: Keyed,
    keep_tombstones: bool,
    compact_at_least: usize,
    compact_at: usize,
}

impl PartBuilder {
    fn new(keep_tombstones: bool, compact_at_least: usize) -> PartBuilder {
        PartBuilder {
            keys: Keyed::default(),
            keep_tombstones,
            compact_at_least,
            compact_at: compact_at_least,
        }
    }

    fn add(&mut self, key: &[u8], rev: Revision, tombstone: bool, loc: Location) {
        self.keys.push(key, rev, tombstone, loc);
        if self.keys.entries.len() >= self.compact_at {
            self.keys.compact(self.keep_tombstones);
            self.compact_at = (2 * self.keys.entries.len()).max(self.compact_at_least);
        }
    }

    fn finish(mut self) -> Keyed {
        self.keys.compact(self.keep_tombstones);
        self.keys
    }
}

/// Scans one part of bucket `key` in revision order, borrowing each element from its page:
/// values are not copied, only keys kept. Tombstones are kept when `keep_tombstones` (a
/// later part's tombstone deletes an earlier part's key).
fn scan_part(mut items: crate::storage::bbolt::Iter<'_>, keep_tombstones: bool) -> Result<Part> {
    let mut keys = PartBuilder::new(keep_tombstones, COMPACT_AT_LEAST);
    let (mut newest, mut revisions) = (None, 0);
    while let Some(item) = items.next_borrowed() {
        let (rev_key, value, location) = item?;
        let rk = parse_revision_key(rev_key)?;
        let Some(value) = value else {
            return Err(key_inconsistent(rk.rev, "is a bucket, not a value"));
        };
        let kv = KeyValueRef::decode(value)
            .ok_or_else(|| key_inconsistent(rk.rev, "is not a KeyValue message"))?;
        if kv.key.is_empty() {
            return Err(key_inconsistent(rk.rev, "KeyValue without a key"));
        }
        keys.add(kv.key, rk.rev, rk.tombstone, location);
        newest = Some(rk.rev);
        revisions += 1;
    }
    Ok(Part {
        keys: keys.finish(),
        newest,
        revisions,
    })
}

/// The KeyValue of live `key` at revision `rev` (read at `loc`), checked against the index.
fn fetch(
    bucket: &crate::storage::bbolt::Bucket<'_>,
    key: &[u8],
    rev: Revision,
    loc: Location,
    buf: &mut Vec<u8>,
) -> Result<KeyValue> {
    fetch_ref(bucket, key, rev, loc, buf).map(|kv| kv.to_owned())
}

/// [`fetch`], lending the KeyValue from `buf`.
fn fetch_ref<'b>(
    bucket: &crate::storage::bbolt::Bucket<'_>,
    key: &[u8],
    rev: Revision,
    loc: Location,
    buf: &'b mut Vec<u8>,
) -> Result<KeyValueRef<'b>> {
    let value = bucket
        .get_at_into(loc, &rev.to_key(false), buf)?
        .ok_or_else(|| key_inconsistent(rev, "indexed revision is gone"))?;
    let kv = KeyValueRef::decode(value)
        .ok_or_else(|| key_inconsistent(rev, "is not a KeyValue message"))?;
    if kv.key != key || kv.mod_revision != rev.main {
        return Err(key_inconsistent(
            rev,
            format!(
                "holds key {} at mod_revision {}, index says {} at {}",
                hex(kv.key),
                kv.mod_revision,
                hex(key),
                rev.main
            ),
        ));
    }
    Ok(kv)
}

/// All live KeyValues in key order (holds every value in memory: for small stores).
pub fn live_key_values(db: &Db) -> Result<Vec<KeyValue>> {
    let index = LiveIndex::build(db)?;
    let mut out = Vec::with_capacity(index.len());
    index.for_each(db, |kv| {
        out.push(kv);
        Ok::<(), MvccError>(())
    })?;
    Ok(out)
}

/// The leases in bucket `lease`, by id (no bucket: no leases).
pub fn leases(db: &Db) -> Result<Vec<Lease>> {
    let Some(bucket) = db.bucket(LEASE_BUCKET)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in bucket.iter() {
        let (key, value) = item?;
        let entry = hex(&key);
        let bad = |reason: &str| MvccError::Inconsistent {
            bucket: "lease",
            entry: entry.clone(),
            reason: reason.to_string(),
        };
        let id: [u8; 8] = key
            .as_slice()
            .try_into()
            .map_err(|_| bad("lease key is not 8 bytes"))?;
        let Value::Data(value) = value else {
            return Err(bad("is a bucket, not a value"));
        };
        let lease: Lease =
            prost::Message::decode(value.as_slice()).map_err(|source| MvccError::Decode {
                bucket: "lease",
                entry: entry.clone(),
                source,
            })?;
        if lease.id != i64::from_be_bytes(id) {
            return Err(bad(&format!("value holds lease id {:x}", lease.id)));
        }
        out.push(lease);
    }
    Ok(out)
}

/// What bucket `meta` holds; absent keys are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreMeta {
    /// Raft index of the last applied entry (`consistent_index`, 8 bytes BE).
    pub consistent_index: Option<u64>,
    /// Raft term of that entry (`term`, etcd 3.5+).
    pub term: Option<u64>,
    /// Compaction asked for (`scheduledCompactRev`).
    pub scheduled_compact_rev: Option<Revision>,
    /// Compaction completed (`finishedCompactRev`).
    pub finished_compact_rev: Option<Revision>,
    /// Raft ConfState as JSON (`confState`, etcd 3.5+).
    pub conf_state: Option<Vec<u8>>,
    /// Storage version string (`storageVersion`, etcd 3.6+).
    pub storage_version: Option<Vec<u8>>,
    /// Every key present, in key order (including those above).
    pub keys: Vec<Vec<u8>>,
}

/// Reads bucket `meta` (no bucket: everything `None`).
pub fn store_meta(db: &Db) -> Result<StoreMeta> {
    let mut meta = StoreMeta::default();
    let Some(bucket) = db.bucket(META_BUCKET)? else {
        return Ok(meta);
    };
    for item in bucket.iter() {
        let (key, value) = item?;
        let Value::Data(value) = value else {
            meta.keys.push(key);
            continue;
        };
        let bad = |reason: &str| MvccError::Inconsistent {
            bucket: "meta",
            entry: String::from_utf8_lossy(&key).into_owned(),
            reason: reason.to_string(),
        };
        let be_u64 = |v: &[u8]| -> Result<u64> {
            let a: [u8; 8] = v.try_into().map_err(|_| bad("not 8 bytes"))?;
            Ok(u64::from_be_bytes(a))
        };
        match key.as_slice() {
            b"consistent_index" => meta.consistent_index = Some(be_u64(&value)?),
            b"term" => meta.term = Some(be_u64(&value)?),
            b"scheduledCompactRev" => {
                meta.scheduled_compact_rev = Some(parse_revision_key(&value)?.rev)
            }
            b"finishedCompactRev" => {
                meta.finished_compact_rev = Some(parse_revision_key(&value)?.rev)
            }
            b"confState" => meta.conf_state = Some(value),
            b"storageVersion" => meta.storage_version = Some(value),
            _ => {}
        }
        meta.keys.push(key);
    }
    Ok(meta)
}

/// Names of the top-level buckets, lossy UTF-8, in key order.
pub fn bucket_names(db: &Db) -> Result<Vec<String>> {
    Ok(db
        .bucket_names()?
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

fn key_inconsistent(rev: Revision, reason: impl Into<String>) -> MvccError {
    MvccError::Inconsistent {
        bucket: "key",
        entry: rev.to_string(),
        reason: reason.into(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::bbolt::{BboltError, Bucket};
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use crate::storage::testutil::{fixture_db, FIXTURES};

    /// Expected live set of a fixture: key -> (value, lease TTL).
    fn expected(name: &str) -> BTreeMap<Vec<u8>, (Vec<u8>, Option<i64>)> {
        use base64::Engine as _;
        let text = std::fs::read_to_string(format!("{FIXTURES}/{name}.keys.json")).unwrap();
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        entries
            .iter()
            .map(|e| {
                let value = match (
                    e.get("value").and_then(|v| v.as_str()),
                    e.get("value_b64").and_then(|v| v.as_str()),
                ) {
                    (Some(v), _) => v.as_bytes().to_vec(),
                    (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
                    (None, None) => panic!("no value in {e:?}"),
                };
                let ttl = e.get("lease_ttl").and_then(|v| v.as_i64());
                (e["key"].as_str().unwrap().as_bytes().to_vec(), (value, ttl))
            })
            .collect()
    }

    /// Checks a fixture's live set, lease attachments and leases against its keys.json.
    fn check_fixture(name: &str, lease_ttls: &[i64]) -> (LiveIndex, StoreMeta) {
        let (_dir, path) = fixture_db(name);
        let db = Db::open(&path).unwrap();
        let want = expected(name);
        let index = LiveIndex::build(&db).unwrap();
        assert_eq!(index.len(), want.len(), "{name}");
        let leases = leases(&db).unwrap();
        let ttl_of: BTreeMap<i64, i64> = leases.iter().map(|l| (l.id, l.ttl)).collect();
        let mut ttls: Vec<i64> = leases.iter().map(|l| l.ttl).collect();
        ttls.sort();
        assert_eq!(ttls, lease_ttls, "{name}: lease TTLs");
        assert!(ttl_of.keys().all(|&id| id != 0));

        let kvs = live_key_values(&db).unwrap();
        let got: BTreeMap<Vec<u8>, (Vec<u8>, Option<i64>)> = kvs
            .iter()
            .map(|kv| {
                let ttl = (kv.lease != 0).then(|| ttl_of[&kv.lease]);
                (kv.key.clone(), (kv.value.clone(), ttl))
            })
            .collect();
        assert_eq!(got, want, "{name}: live set");
        let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "key order");
        for kv in &kvs {
            assert_eq!(
                index.revision(&kv.key).map(|r| r.main),
                Some(kv.mod_revision)
            );
            assert!(kv.create_revision <= kv.mod_revision && kv.version >= 1);
        }
        let meta = store_meta(&db).unwrap();
        assert!(meta.consistent_index.is_some_and(|ci| ci > 0), "{meta:?}");
        (index, meta)
    }

    #[test]
    fn fixture_3_0_17_v3_live_set_leases_and_meta() {
        let (index, meta) = check_fixture("etcd-3.0.17-v3", &[600, 3600]);
        // 63 live keys + ns-0's overwrite + deleted-pod's put and tombstone.
        assert_eq!(index.revisions_scanned(), 66);
        assert_eq!(
            index.newest_revision().map(|r| r.main),
            Some(67),
            "revision 1 is the empty store"
        );
        assert_eq!(meta.keys, vec![b"consistent_index".to_vec()]);
        assert_eq!(meta.scheduled_compact_rev, None);
        assert_eq!(meta.term, None);
        assert!(index
            .revision(b"/registry/pods/default/deleted-pod")
            .is_none());

        let (_dir, path) = fixture_db("etcd-3.0.17-v3");
        let db = Db::open(&path).unwrap();
        let mut versions = BTreeMap::new();
        index
            .for_each(&db, |kv| {
                versions.insert(
                    String::from_utf8(kv.key).unwrap(),
                    (kv.version, kv.create_revision < kv.mod_revision),
                );
                Ok::<(), MvccError>(())
            })
            .unwrap();
        assert_eq!(
            versions["/registry/namespaces/ns-0"],
            (2, true),
            "overwritten once"
        );
        assert_eq!(versions.values().filter(|v| **v == (1, false)).count(), 62);
        let names = bucket_names(&db).unwrap().join(" ");
        assert_eq!(
            names,
            "alarm auth authRoles authUsers cluster key lease members members_removed meta"
        );
    }

    #[test]
    fn fixture_3_0_17_protobuf_values_are_binary_exact() {
        let (index, _) = check_fixture("etcd-3.0.17-v3-protobuf", &[600, 3600]);
        assert_eq!(index.len(), 63);
        let (_dir, path) = fixture_db("etcd-3.0.17-v3-protobuf");
        let db = Db::open(&path).unwrap();
        let pods = live_key_values(&db)
            .unwrap()
            .into_iter()
            .filter(|kv| kv.key.starts_with(b"/registry/pods/"))
            .inspect(|kv| assert!(kv.value.starts_with(b"k8s\0"), "{kv:?}"))
            .count();
        assert!(pods >= 10, "{pods} pods");
    }

    #[test]
    fn fixture_3_0_17_migrated_from_2_2_1() {
        check_fixture("etcd-3.0.17-from-2.2.1", &[3600]);
    }

    #[test]
    fn revision_keys_parse_and_round_trip() {
        let rev = Revision {
            main: 0x0102_0304_0506_0708,
            sub: 3,
        };
        let key = rev.to_key(false);
        assert_eq!(key.len(), 17);
        assert_eq!(&key[..9], b"\x01\x02\x03\x04\x05\x06\x07\x08_");
        assert_eq!(
            parse_revision_key(&key).unwrap(),
            RevisionKey {
                rev,
                tombstone: false
            }
        );
        let key = rev.to_key(true);
        assert_eq!(
            parse_revision_key(&key).unwrap(),
            RevisionKey {
                rev,
                tombstone: true
            }
        );
        assert!(
            Revision { main: 2, sub: 0 }.to_key(false) > Revision { main: 1, sub: 9 }.to_key(true)
        );
        assert_eq!(rev.to_string(), "72623859790382856_3");

        let mut bad = rev.to_key(true);
        bad[17] = b'x';
        let mut no_sep = rev.to_key(false);
        no_sep[8] = b'-';
        let negative = Revision { main: -1, sub: 0 }.to_key(false);
        for key in [
            &b""[..],
            &[0u8; 16],
            &[0u8; 19],
            &bad,
            &no_sep,
            &negative,
            &[0u8; 17],
        ] {
            let err = parse_revision_key(key).unwrap_err();
            assert!(matches!(err, MvccError::BadRevision { .. }), "{err}");
        }
    }

    #[test]
    fn missing_key_bucket_is_an_error_and_bad_magic_names_meta() {
        let (_dir, path) = fixture_db("etcd-3.0.17-v3");
        let mut bytes = std::fs::read(&path).unwrap();
        for meta in [0, 4096] {
            bytes[meta + 16] ^= 0x55;
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = Db::open(&path).unwrap_err();
        assert!(matches!(err, BboltError::NoValidMeta { .. }));
        assert!(err.to_string().contains("meta 0: bad magic"), "{err}");
    }

    // ---- corruption: every outcome must be Ok or Err, promptly, never a panic ----

    /// Opens `bytes` as a db and reads everything the crate can read; returns whether all of it succeeded.
    fn exercise(dir: &Path, bytes: &[u8]) -> bool {
        let path = dir.join("db");
        std::fs::write(&path, bytes).unwrap();
        let started = Instant::now();
        let ok = (|| -> Result<()> {
            let db = Db::open(&path)?;
            // Nested buckets in a corrupt file may point back at their parents: bound nesting.
            let mut todo: Vec<(Bucket<'_>, usize)> = vec![(db.root(), 0)];
            while let Some((bucket, depth)) = todo.pop() {
                let mut values = Vec::new();
                for item in bucket.iter() {
                    match item? {
                        (key, Value::Data(v)) => values.push((key, v.len())),
                        (_, Value::Bucket(b)) if depth < 3 => todo.push((b, depth + 1)),
                        (_, Value::Bucket(_)) => {}
                    }
                }
                // A walk that completed guarantees point reads find the same values.
                for (key, len) in values {
                    assert_eq!(bucket.get(&key)?.map(|v| v.len()), Some(len));
                }
            }
            let index = LiveIndex::build(&db)?;
            index.for_each(&db, |_| Ok::<(), MvccError>(()))?;
            leases(&db)?;
            store_meta(&db)?;
            Ok(())
        })()
        .is_ok();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        ok
    }

    /// The fixture db cut to its high-water mark (the rest of the file is unused).
    fn small_real_db() -> (Vec<u8>, usize) {
        let (_dir, path) = fixture_db("etcd-3.0.17-v3");
        let db = Db::open(&path).unwrap();
        let used = (db.meta().high_water as usize) * db.page_size();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(used);
        (bytes, db.page_size())
    }

    #[test]
    fn corrupted_real_db_never_panics() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

        let (base, ps) = small_real_db();
        let dir = tempfile::tempdir().unwrap();
        assert!(exercise(dir.path(), &base), "the uncorrupted db reads fine");
        let len = base.len();
        let pages = len / ps;
        let runner = |cases| {
            let config = Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            };
            TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
        };
        let mut report = Vec::new();
        let mut run = |what: &str, cases: u32, strategy: BoxedStrategy<Vec<u8>>| {
            let (ok, err) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
            let result = runner(cases).run(&strategy, |bytes| {
                let counter = if exercise(dir.path(), &bytes) {
                    &ok
                } else {
                    &err
                };
                counter.set(counter.get() + 1);
                Ok(())
            });
            result.unwrap_or_else(|e| panic!("{what}: {e}"));
            let (ok, err) = (ok.get(), err.get());
            assert!(err > 0, "{what}: no case was detected as corrupt");
            report.push(format!(
                "{what}: {} cases, {ok} read fine, {err} errors",
                ok + err
            ));
            ok + err
        };

        let b = base.clone();
        let mut total = run(
            "truncate",
            300,
            (0..len).prop_map(move |n| b[..n].to_vec()).boxed(),
        );
        let b = base.clone();
        total += run(
            "flip bytes",
            1500,
            prop::collection::vec((0..len, 1..=255u8), 1..16)
                .prop_map(move |flips| {
                    let mut f = b.clone();
                    for (at, x) in flips {
                        f[at] ^= x;
                    }
                    f
                })
                .boxed(),
        );
        let b = base.clone();
        total += run(
            "page size",
            400,
            (
                0..3usize,
                prop_oneof![any::<u32>(), (0..20u32).prop_map(|s| 1 << s)],
                any::<bool>(),
            )
                .prop_map(move |(which, size, fix_sum)| {
                    let mut f = b.clone();
                    for m in [0, 1] {
                        if which == 2 || which == m {
                            let at = m * ps + 16;
                            f[at + 8..at + 12].copy_from_slice(&size.to_le_bytes());
                            if fix_sum {
                                let sum = fnv1a(&f[at..at + 56]);
                                f[at + 56..at + 64].copy_from_slice(&sum.to_le_bytes());
                            }
                        }
                    }
                    f
                })
                .boxed(),
        );
        let b = base.clone();
        // Overwrite a page-header field or an element word of a tree page with a random value.
        total += run(
            "scribble headers and elements",
            1500,
            (2..pages, 0..64usize, any::<u64>(), 0..4u32)
                .prop_map(move |(page, word, value, width)| {
                    let mut f = b.clone();
                    let at = page * ps + 8 + word * 4;
                    let n = 1 << width; // 1, 2, 4 or 8 bytes
                    f[at..at + n].copy_from_slice(&value.to_le_bytes()[..n]);
                    f
                })
                .boxed(),
        );
        for line in &report {
            eprintln!("{line}");
        }
        assert_eq!(total, 300 + 1500 + 400 + 1500);
    }

    fn fnv1a(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    proptest::proptest! {
        #[test]
        fn key_values_read_in_place_are_what_prost_decodes(
            key in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            revs in proptest::array::uniform4(proptest::num::i64::ANY),
            extra in proptest::collection::vec(proptest::num::u8::ANY, 0..12),
        ) {
            let kv = KeyValue {
                key,
                create_revision: revs[0],
                mod_revision: revs[1],
                version: revs[2],
                value,
                lease: revs[3],
            };
            let bytes = prost::Message::encode_to_vec(&kv);
            proptest::prop_assert_eq!(KeyValueRef::decode(&bytes).map(|r| r.to_owned()), Some(kv.clone()));
            // Any bytes: what is read in place, prost reads the same way.
            let mut mangled = bytes.clone();
            mangled.extend_from_slice(&extra);
            if let Some(r) = KeyValueRef::decode(&mangled) {
                let p: KeyValue = prost::Message::decode(mangled.as_slice()).unwrap();
                proptest::prop_assert_eq!(r.to_owned(), p);
            }
            if let Some(r) = KeyValueRef::decode(&extra) {
                let p: KeyValue = prost::Message::decode(extra.as_slice()).unwrap();
                proptest::prop_assert_eq!(r.to_owned(), p);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn parts_compacted_and_merged_keep_the_newest_revision_of_each_live_key(
            ops in proptest::collection::vec((0u8..12, proptest::bool::weighted(0.3)), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..3),
            compact_at_least in 1usize..8,
        ) {
            // Revision i + 1 writes (or with a tombstone deletes) key ops[i].0.
            let rev = |i: usize| Revision { main: i as i64 + 1, sub: 0 };
            let mut model = BTreeMap::new();
            for (i, &(k, tombstone)) in ops.iter().enumerate() {
                if tombstone {
                    model.remove(&vec![k]);
                } else {
                    model.insert(vec![k], rev(i));
                }
            }
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(ops.len())).collect();
            bounds.push(0);
            bounds.push(ops.len());
            bounds.sort_unstable();
            let parts: Vec<Keyed> = bounds
                .windows(2)
                .enumerate()
                .map(|(p, w)| {
                    let mut b = PartBuilder::new(p > 0, compact_at_least);
                    for (i, &(k, tombstone)) in ops.iter().enumerate().take(w[1]).skip(w[0]) {
                        b.add(&[k], rev(i), tombstone, Location::default());
                    }
                    b.finish()
                })
                .collect();
            let index = LiveIndex { order: merge_parts(&parts), parts, ..Default::default() };
            let got: Vec<(Vec<u8>, Revision)> = index.iter().map(|(k, r)| (k.to_vec(), r)).collect();
            let want: Vec<(Vec<u8>, Revision)> = model.clone().into_iter().collect();
            proptest::prop_assert_eq!(&got, &want);
            for k in 0u8..12 {
                proptest::prop_assert_eq!(index.revision(&[k]), model.get(&vec![k]).copied());
            }
        }
    }

    #[test]
    fn parts_are_scanned_in_order_and_a_panic_is_an_error() {
        for n in [1usize, 3] {
            let got = scan_parts((0..n).collect(), "scan", |i, p: usize| Ok(i * 10 + p));
            let got: Vec<usize> = got.into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(got, (0..n).map(|i| i * 11).collect::<Vec<_>>());
        }
        let got = scan_parts(vec![0, 1], "digest", |_, p: u8| {
            assert!(p == 0, "part {p} fails");
            Ok(p)
        });
        assert_eq!(got[0].as_ref().ok(), Some(&0));
        let err = got[1].as_ref().unwrap_err();
        assert!(matches!(err, MvccError::ScanPanicked { scan: "digest" }));
        assert_eq!(
            err.to_string(),
            "bucket \"a digest thread panicked\" not found"
        );
    }
}
