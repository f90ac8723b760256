//! A digest of etcd's bucket `key` read offline: every revision entry (revision key and stored
//! KeyValue bytes, history and tombstones included) up to a revision. Two digests of one
//! member taken before and after a step are equal exactly when the step left every revision up
//! to that point as it was, whatever the step added after it.
//!
//! The digest is the sum, modulo 2^128, of a 128-bit hash of each entry (XXH3-128 of the value,
//! seeded with the XXH3-64 of its revision key): independent of the order in which the entries
//! are visited, so the scan runs in parts on several threads and the parts may be cut
//! differently before and after (a write can split the tree's right edge). It guards against
//! accidental change (a release that rewrites or loses a revision, a bad disk), not against an
//! adversary, like etcd's own HashKV (a CRC-32C); XXH3 keeps the read at memory speed, where
//! SHA-256 took as long as reading the file. Memory is constant: one page per tree level and
//! thread.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64};

use crate::storage::bbolt::{Db, Iter};
use crate::storage::mvcc::{parse_revision_key, scan_parts, MvccError, Result, KEY_BUCKET};

/// What one scan of bucket `key` found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyDigest {
    /// Entries hashed.
    pub entries: u64,
    /// Their key and value bytes.
    pub bytes: u64,
    /// The highest main revision hashed (0 when none).
    pub newest: i64,
    /// The sum of the entries' hashes, as two words, least significant first.
    pub sum: [u64; 2],
}

impl KeyDigest {
    /// The sum in hex, most significant word first.
    pub fn hex(&self) -> String {
        self.sum.iter().rev().map(|w| format!("{w:016x}")).collect()
    }

    /// Adds one entry of main revision `main` (as a scan does).
    pub(crate) fn add(&mut self, key: &[u8], value: &[u8], main: i64) {
        self.add_entry(key, value);
        self.newest = self.newest.max(main);
    }

    fn add_entry(&mut self, key: &[u8], value: &[u8]) {
        self.add_sum(xxh3_128_with_seed(value, xxh3_64(key)));
        self.entries += 1;
        self.bytes += (key.len() + value.len()) as u64;
    }

    fn total(&self) -> u128 {
        (u128::from(self.sum[1]) << 64) | u128::from(self.sum[0])
    }

    fn add_sum(&mut self, h: u128) {
        let t = self.total().wrapping_add(h);
        self.sum = [t as u64, (t >> 64) as u64];
    }

    /// The digest of two disjoint sets of entries together.
    fn merge(mut self, other: KeyDigest) -> KeyDigest {
        self.add_sum(other.total());
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.newest = self.newest.max(other.newest);
        self
    }
}

/// A scan of bucket `key` whose tree roots are already read: once prepared, the walks read only
/// pages below the bucket's root as it was, which etcd's copy-on-write never overwrites while
/// they are reachable from it. So a scan prepared before an etcd starts on the file reads the
/// entries as they were then, or pages that etcd reused after a write to the bucket (which
/// makes the digest differ, never match by accident).
pub struct KeyScan<'db> {
    parts: Vec<Iter<'db>>,
}

impl<'db> KeyScan<'db> {
    /// Reads the roots and splits the walk in up to `threads` parts.
    pub fn prepare(db: &'db Db, threads: usize) -> Result<KeyScan<'db>> {
        let bucket = db
            .bucket(KEY_BUCKET)?
            .ok_or_else(|| MvccError::MissingBucket("key".into()))?;
        Ok(KeyScan {
            parts: bucket.iter_parts(threads.max(1))?,
        })
    }

    /// Hashes every entry whose main revision is in `range`, adding the bytes read to
    /// `progress` as it goes.
    pub fn run(self, range: RevRange, progress: &AtomicU64) -> Result<KeyDigest> {
        let results = scan_parts(self.parts, "digest", |_, it| {
            digest_part(it, range, progress)
        });
        results
            .into_iter()
            .try_fold(KeyDigest::default(), |acc, d| Ok(acc.merge(d?)))
    }
}

/// Progress is published every this many bytes, not per entry.
const PROGRESS_EVERY: u64 = 1 << 20;

/// Main revisions `after < main <= upto` (either end open when `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevRange {
    pub after: Option<i64>,
    pub upto: Option<i64>,
}

impl RevRange {
    /// Every revision.
    pub const ALL: RevRange = RevRange {
        after: None,
        upto: None,
    };
}

impl std::fmt::Display for RevRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.after, self.upto) {
            (None, None) => f.write_str("every revision"),
            (None, Some(u)) => write!(f, "revisions up to {u}"),
            (Some(a), None) => write!(f, "revisions after {a}"),
            (Some(a), Some(u)) => write!(f, "revisions {} to {u}", a + 1),
        }
    }
}

fn digest_part(mut items: Iter<'_>, range: RevRange, progress: &AtomicU64) -> Result<KeyDigest> {
    let mut d = KeyDigest::default();
    let mut unpublished = 0u64;
    while let Some(item) = items.next_borrowed() {
        let (key, value, _) = item?;
        let rk = parse_revision_key(key)?;
        if range.upto.is_some_and(|u| rk.rev.main > u) {
            // Revision keys sort by revision: nothing after this one is in range either.
            break;
        }
        if range.after.is_some_and(|a| rk.rev.main <= a) {
            continue;
        }
        let Some(value) = value else {
            return Err(MvccError::Inconsistent {
                bucket: "key",
                entry: format!("{}_{}", rk.rev.main, rk.rev.sub),
                reason: "is a bucket, not a value".into(),
            });
        };
        d.add_entry(key, value);
        d.newest = d.newest.max(rk.rev.main);
        unpublished += (key.len() + value.len()) as u64;
        if unpublished >= PROGRESS_EVERY {
            progress.fetch_add(unpublished, Ordering::Relaxed);
            unpublished = 0;
        }
    }
    progress.fetch_add(unpublished, Ordering::Relaxed);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_does_not_depend_on_order_or_grouping() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..50u8)
            .map(|i| (vec![i; 17], vec![i.wrapping_mul(7); i as usize * 3]))
            .collect();
        let mut a = KeyDigest::default();
        for (k, v) in &entries {
            a.add_entry(k, v);
        }
        let (mut b1, mut b2) = (KeyDigest::default(), KeyDigest::default());
        for (i, (k, v)) in entries.iter().enumerate().rev() {
            if i % 3 == 0 {
                b1.add_entry(k, v)
            } else {
                b2.add_entry(k, v)
            }
        }
        assert_eq!(a, b1.merge(b2));
        let mut c = KeyDigest::default();
        for (k, v) in &entries[1..] {
            c.add_entry(k, v);
        }
        assert_ne!(a.sum, c.sum, "one entry fewer");
        let mut d = KeyDigest::default();
        for (i, (k, v)) in entries.iter().enumerate() {
            let mut v = v.clone();
            if i == 7 {
                v.push(0);
            }
            d.add_entry(k, &v);
        }
        assert_ne!(a.sum, d.sum, "one value changed");
    }

    #[test]
    fn carries_propagate_across_words() {
        let mut d = KeyDigest::default();
        d.add_sum(u128::from(u64::MAX));
        d.add_sum(1);
        assert_eq!(d.sum, [0, 1]);
        d.add_sum(u128::MAX);
        assert_eq!(d.sum, [u64::MAX, 0], "wraps modulo 2^128");
    }

    #[test]
    fn a_value_moved_to_another_revision_changes_the_digest() {
        let (mut a, mut b) = (KeyDigest::default(), KeyDigest::default());
        a.add_entry(b"r1", b"x");
        a.add_entry(b"r2", b"y");
        b.add_entry(b"r1", b"y");
        b.add_entry(b"r2", b"x");
        assert_ne!(a.sum, b.sum);
    }
}
