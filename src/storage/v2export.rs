//! The v3 store as v2 keys: which keys a v2 store can hold (one predicate, for the check before
//! a rollback and for the writer), and the pipeline that reads every live key on a thread of its
//! own and hands them over in batches, as [`V2Key`]s, to whoever writes the v2 store.
//!
//! Keys cross in batches whose buffers go back for reuse: nothing allocated on one thread is
//! freed on the other. Memory is the key index plus a few batches of values.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::fingerprint::FingerprintBuilder;
use crate::storage::bbolt::Db;
use crate::storage::mvcc::{KeyValueRef, LiveIndex, MvccError};
use crate::storage::v2store::{validate_key_path, ExpireTime, V2Key};

/// The Kubernetes protobuf envelope.
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// Keys named in a refusal, at most, per kind.
const NAMED: usize = 5;

/// Why a v3 key cannot be a v2 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obstacle {
    /// A Kubernetes protobuf value under the data prefix.
    Protobuf,
    /// A value that is not UTF-8 text.
    NotUtf8,
    /// A key that is not a v2 path.
    BadPath(String),
}

/// Whether the v2 store can hold `key` with `value` (`prefix`: the Kubernetes data prefix).
pub fn v2_obstacle(key: &[u8], value: &[u8], prefix: &[u8]) -> Option<Obstacle> {
    if key.starts_with(prefix) && value.starts_with(PROTOBUF_MAGIC) {
        return Some(Obstacle::Protobuf);
    }
    if std::str::from_utf8(value).is_err() {
        return Some(Obstacle::NotUtf8);
    }
    validate_key_path(key)
        .err()
        .map(|why| Obstacle::BadPath(why.to_string()))
}

/// What a v2 store cannot hold, found before anything is touched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unrepresentable {
    pub protobuf: Vec<String>,
    pub protobuf_count: u64,
    pub non_utf8: Vec<String>,
    pub bad_keys: Vec<String>,
}

impl Unrepresentable {
    pub fn is_empty(&self) -> bool {
        self.protobuf_count == 0 && self.non_utf8.is_empty() && self.bad_keys.is_empty()
    }

    fn add(&mut self, key: &[u8], obstacle: Obstacle) {
        let name = String::from_utf8_lossy(key).into_owned();
        match obstacle {
            Obstacle::Protobuf => {
                self.protobuf_count += 1;
                note(&mut self.protobuf, name);
            }
            Obstacle::NotUtf8 => note(&mut self.non_utf8, name),
            Obstacle::BadPath(why) => note(&mut self.bad_keys, format!("{name} ({why})")),
        }
    }

    /// The operator-facing refusal.
    pub fn message(&self, prefix: &str) -> String {
        let mut parts = Vec::new();
        if self.protobuf_count > 0 {
            parts.push(format!(
                "{} values under {prefix} are Kubernetes protobuf (they start with \"k8s\\0\"; e.g. {}), which etcd2 cannot \
                 store: set STORAGE_MEDIA_TYPE=application/json (--storage-media-type=application/json) on the API servers, \
                 rewrite every object (e.g. kubectl get <kind> --all-namespaces -o json | kubectl replace -f -), then roll back",
                self.protobuf_count,
                self.protobuf.join(", ")
            ));
        }
        if !self.non_utf8.is_empty() {
            parts.push(format!(
                "values that are not UTF-8 text, which the v2 store cannot hold: {}",
                self.non_utf8.join(", ")
            ));
        }
        if !self.bad_keys.is_empty() {
            parts.push(format!(
                "keys that are not v2 paths: {}",
                self.bad_keys.join(", ")
            ));
        }
        format!(
            "rollback to etcd2 refused, nothing was changed: {}",
            parts.join("; ")
        )
    }
}

fn note(list: &mut Vec<String>, what: String) {
    if list.len() < NAMED {
        list.push(what);
    }
}

/// Scans the live keys for what a v2 store cannot hold. Offline, read-only.
pub fn check_representable(db: &Db, prefix: &str) -> Result<Unrepresentable, MvccError> {
    let index = LiveIndex::build(db)?;
    let mut u = Unrepresentable::default();
    for kv in index.values(db)? {
        let kv = kv?;
        if let Some(o) = v2_obstacle(&kv.key, &kv.value, prefix.as_bytes()) {
            u.add(&kv.key, o);
        }
        // A key that is also a directory of other keys: "/a" and "/a/b".
        let mut p = kv.key.as_slice();
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            if !p.is_empty() && index.revision(p).is_some() {
                let why = format!("its parent {} is a key too", String::from_utf8_lossy(p));
                u.add(&kv.key, Obstacle::BadPath(why));
                break;
            }
        }
    }
    Ok(u)
}

/// Why the export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error("key {key} cannot be a v2 key: {obstacle:?}")]
    Unrepresentable { key: String, obstacle: Obstacle },
    #[error("failpoint to-etcd2-mid-write")]
    Injected,
}

/// What the reading thread saw besides the keys.
#[derive(Default)]
pub struct Exported {
    /// The fingerprint of what was read, when asked for.
    pub fingerprint: Option<FingerprintBuilder>,
    /// Keys given a TTL (their lease exists).
    pub leased: u64,
    /// Keys naming a lease that is gone: written without a TTL.
    pub orphan_leases: u64,
    /// A key no v2 store can hold ended the export.
    pub unrepresentable: bool,
}

/// What the export reads: the live keys of a backend, its leases' TTLs, and the time TTLs count
/// from.
pub struct Source<'a> {
    pub db: &'a Db,
    pub index: &'a LiveIndex,
    pub ttl_of: &'a HashMap<i64, i64>,
    pub prefix: &'a [u8],
    pub now: SystemTime,
    /// Build a fingerprint of the keys read (it hashes every value).
    pub fingerprint: bool,
}

/// Runs `write` on this thread over the keys `source` reads on another, in key order. Returns
/// what `write` returned and what the reading side saw (`None`: its thread panicked).
pub fn export<R>(source: Source<'_>, write: impl FnOnce(Batches) -> R) -> (R, Option<Exported>) {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Batch>(4);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Batch>();
    let produce = move || read_keys(&source, &full_tx, &free_rx);
    std::thread::scope(|scope| {
        let producer = scope.spawn(produce);
        let keys = Batches {
            full: full_rx,
            free: free_tx,
            cur: Batch::default(),
            pos: 0,
            at: 0,
        };
        let result = write(keys);
        (result, producer.join().ok())
    })
}

/// The reading side: every live key, lent from the read buffer and copied once, into a batch.
fn read_keys(
    source: &Source<'_>,
    full: &std::sync::mpsc::SyncSender<Batch>,
    free: &std::sync::mpsc::Receiver<Batch>,
) -> Exported {
    let mut seen = Exported {
        fingerprint: source.fingerprint.then(FingerprintBuilder::default),
        ..Default::default()
    };
    let mut batch = Batch::default();
    let read = source
        .index
        .for_each_ref(source.db, |kv| -> Result<(), Stop> {
            add_v2_key(kv, source, &mut seen, &mut batch)?;
            if batch.items.len() >= 512 || batch.bytes.len() >= 1 << 20 {
                let mut next = free.try_recv().unwrap_or_default();
                next.bytes.clear();
                next.items.clear();
                let done = std::mem::replace(&mut batch, next);
                full.send(done).map_err(|_| Stop::Gone)?;
            }
            Ok(())
        });
    match read {
        Ok(()) => {}
        Err(Stop::Bad(e)) => batch.error = Some(e),
        Err(Stop::Gone) => return seen,
    }
    let _ = full.send(batch);
    seen
}

/// Keys passed from the reading thread: keys and values back to back in `bytes`, an error
/// (which ends the keys) last.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    items: Vec<BatchItem>,
    error: Option<ExportError>,
}

/// A [`V2Key`] whose key and value sit in its batch's bytes.
struct BatchItem {
    key_len: usize,
    value_len: usize,
    expire: Option<ExpireTime>,
    created_index: u64,
    modified_index: u64,
}

/// The keys of the batches received, as owned [`V2Key`]s; each batch read goes back.
pub struct Batches {
    full: std::sync::mpsc::Receiver<Batch>,
    free: std::sync::mpsc::Sender<Batch>,
    cur: Batch,
    /// Next item of `cur`, and where its bytes start.
    pos: usize,
    at: usize,
}

impl Iterator for Batches {
    type Item = Result<V2Key, ExportError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.cur.items.get(self.pos) {
                let key_end = self.at + item.key_len;
                let value_end = key_end + item.value_len;
                let key = V2Key {
                    key: self.cur.bytes[self.at..key_end].to_vec(),
                    value: self.cur.bytes[key_end..value_end].to_vec(),
                    dir: false,
                    expire: item.expire,
                    created_index: item.created_index,
                    modified_index: item.modified_index,
                };
                self.pos += 1;
                self.at = value_end;
                return Some(Ok(key));
            }
            if let Some(e) = self.cur.error.take() {
                return Some(Err(e));
            }
            let next = self.full.recv().ok()?;
            let done = std::mem::replace(&mut self.cur, next);
            let _ = self.free.send(done);
            (self.pos, self.at) = (0, 0);
        }
    }
}

/// Why the reading thread stopped early: a key that cannot be written, or the writing side
/// gone.
enum Stop {
    Bad(ExportError),
    Gone,
}

impl From<MvccError> for Stop {
    fn from(e: MvccError) -> Stop {
        Stop::Bad(e.into())
    }
}

impl From<ExportError> for Stop {
    fn from(e: ExportError) -> Stop {
        Stop::Bad(e)
    }
}

/// Adds one live v3 key to `batch` as a v2 key, or refuses it when a v2 store cannot hold it;
/// a leased key gets its lease's TTL from `now`.
fn add_v2_key(
    kv: KeyValueRef<'_>,
    source: &Source<'_>,
    seen: &mut Exported,
    batch: &mut Batch,
) -> Result<(), ExportError> {
    if let Some(obstacle) = v2_obstacle(kv.key, kv.value, source.prefix) {
        seen.unrepresentable = true;
        return Err(ExportError::Unrepresentable {
            key: String::from_utf8_lossy(kv.key).into_owned(),
            obstacle,
        });
    }
    fail::fail_point!("to-etcd2-mid-write", |_| Err(ExportError::Injected));
    let lease_ttl = (kv.lease != 0)
        .then(|| source.ttl_of.get(&kv.lease).copied())
        .flatten();
    if kv.lease != 0 && lease_ttl.is_none() {
        seen.orphan_leases += 1;
    }
    seen.leased += u64::from(lease_ttl.is_some());
    if let Some(fp) = seen.fingerprint.as_mut() {
        fp.add(
            kv.key,
            kv.value,
            kv.create_revision,
            kv.mod_revision,
            kv.lease != 0,
        );
    }
    batch.bytes.extend_from_slice(kv.key);
    batch.bytes.extend_from_slice(kv.value);
    batch.items.push(BatchItem {
        key_len: kv.key.len(),
        value_len: kv.value.len(),
        expire: lease_ttl.map(|ttl| ExpireTime::after_ttl(source.now, ttl)),
        created_index: kv.create_revision.max(1) as u64,
        modified_index: kv.mod_revision.max(1) as u64,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_predicate_names_every_obstacle() {
        let p = b"/registry";
        assert_eq!(v2_obstacle(b"/registry/a", b"{}", p), None);
        assert_eq!(
            v2_obstacle(b"/registry/a", b"k8s\0\x01", p),
            Some(Obstacle::Protobuf)
        );
        assert_eq!(
            v2_obstacle(b"/other/a", b"k8s\0\x01", p),
            None,
            "protobuf outside the prefix is text enough for v2"
        );
        assert_eq!(
            v2_obstacle(b"/a", &[0xff, 0xfe], p),
            Some(Obstacle::NotUtf8)
        );
        assert!(matches!(
            v2_obstacle(b"no-slash", b"x", p),
            Some(Obstacle::BadPath(_))
        ));
    }

    #[test]
    fn the_refusal_names_a_few_keys_of_each_kind() {
        let mut u = Unrepresentable::default();
        for i in 0..7 {
            u.add(format!("/registry/p{i}").as_bytes(), Obstacle::Protobuf);
        }
        u.add(b"/x", Obstacle::NotUtf8);
        assert!(!u.is_empty());
        assert_eq!((u.protobuf_count, u.protobuf.len()), (7, NAMED));
        let m = u.message("/registry");
        assert!(
            m.starts_with(
                "rollback to etcd2 refused, nothing was changed: 7 values under /registry"
            ),
            "{m}"
        );
        assert!(
            m.contains("STORAGE_MEDIA_TYPE=application/json") && m.contains("/x"),
            "{m}"
        );
    }
}
