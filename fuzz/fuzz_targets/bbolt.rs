//! The bbolt reader and the mvcc layer on arbitrary files: `Db::open`, a recursive walk of
//! every bucket, `LiveIndex::build`, `values()`, `for_each`, `leases`, `store_meta`.
//! Nothing may panic or loop. Oracles: a bucket whose walk succeeds agrees with point
//! lookups (`get`/`bucket`), and `values()` and `for_each` see the same live keys.
//!
//! bbolt meta pages carry an FNV-1a checksum that random mutation almost never keeps
//! valid, so every input whose meta checksums are wrong is run twice: as it is, and with
//! both checksums recomputed, so that mutated meta fields reach the rest of the reader.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

use etcd_migrate::storage::bbolt::{Bucket, Db, Value};
use etcd_migrate::storage::mvcc::{self, LiveIndex, MvccError};

/// Nested buckets deeper than this are not walked (a bucket can name its own parent's
/// root page; the reader does not forbid that, so a recursive walk must bound itself).
const MAX_NESTING: usize = 8;
/// Total keys visited by one walk, over all buckets.
const MAX_ITEMS: usize = 50_000;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_dir("bbolt").join("db");
    check(&path, data);
    if let Some(fixed) = common::fix_meta_checksums(data) {
        check(&path, &fixed);
    }
});

fn check(path: &std::path::Path, data: &[u8]) {
    std::fs::write(path, data).expect("write the scratch db");
    let db = match Db::open(path) {
        Ok(db) => db,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = (db.meta(), db.page_size(), db.meta_page(), db.path());
    let mut budget = MAX_ITEMS;
    walk(&db.root(), 0, &mut budget);
    let _ = mvcc::bucket_names(&db);
    match LiveIndex::build(&db) {
        Ok(index) => {
            let _ = (index.len(), index.is_empty(), index.newest_revision());
            let _ = index.revisions_scanned();
            for (key, rev) in index.iter() {
                assert_eq!(index.revision(key), Some(rev));
            }
            let mut by_values = Vec::new();
            let values_ok = match index.values(&db) {
                Ok(it) => it
                    .map(|kv| kv.map(|kv| by_values.push((kv.key, kv.mod_revision))))
                    .collect::<Result<Vec<()>, MvccError>>()
                    .is_ok(),
                Err(_) => false,
            };
            let mut by_for_each = Vec::new();
            let for_each_ok = index
                .for_each(&db, |kv| {
                    by_for_each.push((kv.key, kv.mod_revision));
                    Ok::<(), MvccError>(())
                })
                .is_ok();
            assert_eq!(values_ok, for_each_ok, "values() and for_each disagree");
            if values_ok {
                assert_eq!(by_values, by_for_each);
                assert_eq!(by_values.len(), index.len());
            }
            let _ = mvcc::live_key_values(&db);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Err(e) = mvcc::leases(&db) {
        let _ = e.to_string();
    }
    if let Err(e) = mvcc::store_meta(&db) {
        let _ = e.to_string();
    }
}

/// Walks `bucket` and its nested buckets; when a bucket's whole walk succeeds, checks
/// every key against point lookups, by descent and by location.
fn walk(bucket: &Bucket<'_>, depth: usize, budget: &mut usize) {
    let _ = format!("{bucket:?}");
    let mut items = Vec::new();
    let mut it = bucket.iter();
    while let Some(item) = it.next() {
        match item {
            Ok((key, value)) => items.push((key, value, it.location())),
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        }
        if *budget == 0 {
            return;
        }
        *budget -= 1;
    }
    let _ = bucket.buckets();
    // The whole walk succeeded: walks split at the root visit the same keys, in order.
    for parts in 2..=3 {
        let iters = bucket.iter_parts(parts).expect("splitting a bucket that walks");
        let mut joined = Vec::new();
        for mut part in iters {
            while let Some(item) = part.next_borrowed() {
                joined.push(item.expect("a part of a walk that succeeded").0.to_vec());
            }
        }
        let whole: Vec<&[u8]> = items.iter().map(|(k, _, _)| k.as_slice()).collect();
        assert_eq!(joined, whole, "split walks disagree with the walk");
    }
    for (key, value, loc) in items {
        match value {
            Value::Data(v) => {
                let got = bucket.get(&key).expect("get of a key the walk returned");
                assert_eq!(got.as_ref(), Some(&v), "get disagrees with the walk");
                let at = bucket.get_at(loc, &key).expect("get_at where the walk found it");
                assert_eq!(at.as_ref(), Some(&v), "get_at disagrees with the walk");
                assert!(bucket.bucket(&key).expect("bucket() of a value").is_none());
            }
            Value::Bucket(child) => {
                assert_eq!(bucket.get(&key).expect("get of a nested bucket"), None);
                let again = bucket.bucket(&key).expect("bucket() of a nested bucket");
                assert!(again.is_some(), "bucket() misses a nested bucket");
                if depth < MAX_NESTING && *budget > 0 {
                    walk(&child, depth + 1, budget);
                }
            }
        }
    }
}
