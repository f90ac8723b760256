//! The v2 store JSON that etcd 2.2.1 puts in its snapshots (`store.Save()`),
//! written as a stream, and a small reader for it.
//!
//! Layout (from `store/store.go`, `node.go`, `watcher_hub.go`,
//! `event_history.go`, `event_queue.go`, `stats.go` at v2.2.1, checked field
//! by field against a real 2.2.1 snapshot):
//!
//! ```text
//! {"Root":{"Path":"/","CreatedIndex":0,"ModifiedIndex":0,
//!          "ExpireTime":"0001-01-01T00:00:00Z","Value":"","Children":{
//!     "0":{... "/0": cluster data: members/<hex id>/{raftAttributes,attributes}, version},
//!     "1":{... "/1": user keys: /1/registry/... }}},
//!  "WatcherHub":{"EventHistory":{"Queue":{"Events":[1000 entries],"Size":0,
//!       "Front":0,"Back":0,"Capacity":1000},"StartIndex":0,"LastIndex":0}},
//!  "CurrentIndex":N,"Stats":{"getsSuccess":0,...,"watchers":0},"CurrentVersion":2}
//! ```
//!
//! A node is a directory iff `Children` is not null (an empty directory has
//! `{}`); a leaf has `"Children":null`. `ExpireTime` is Go's `time.Time`
//! JSON (RFC 3339 with nanoseconds); the zero time means permanent, any
//! other time is an absolute expiry that etcd enforces after start.
//!
//! The event history must hold exactly `Capacity` slots: 2.2.1 indexes
//! `Events[Back]` on the next write, so a shorter array would crash it. We
//! write an empty history (`StartIndex` = `LastIndex` = 0, as a fresh store
//! has): a watch from an older index then waits for new events instead of
//! reading history that is not there.
//!
//! Values must be UTF-8: the v2 store keeps Go strings and Go's JSON encoder
//! replaces invalid UTF-8 with U+FFFD, so arbitrary bytes could not survive
//! even etcd's own snapshots. Non-UTF-8 keys or values are rejected with
//! [`V2StoreError::NonUtf8`] (e.g. Kubernetes protobuf-encoded objects cannot
//! be rolled back to etcd 2).

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Capacity of 2.2.1's event history (`newWatchHub(1000)`).
pub const EVENT_HISTORY_CAPACITY: usize = 1000;
/// `store.defaultVersion` in 2.2.1.
pub const STORE_VERSION: u32 = 2;
/// The cluster version etcd 2.2.x records in `/0/version`.
pub const CLUSTER_VERSION_2_2: &str = "2.2.0";
/// Go's zero `time.Time` in JSON: a permanent node.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Errors of the v2 store writer and reader.
#[derive(Debug, thiserror::Error)]
pub enum V2StoreError {
    /// Writing the output failed.
    #[error("writing v2 store: {0}")]
    Io(#[from] io::Error),
    /// The key cannot be a v2 path.
    #[error("key {key:?}: {reason}")]
    InvalidKey {
        /// The key (lossy UTF-8).
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The v2 store holds strings only.
    #[error("key {key:?}: {what} is not UTF-8; the v2 store can hold text only")]
    NonUtf8 {
        /// The key (lossy UTF-8).
        key: String,
        /// "key" or "value".
        what: &'static str,
    },
    /// Keys must come in strictly increasing byte order.
    #[error("key {key:?} does not sort after {prev:?}")]
    NotSorted {
        /// Previous key.
        prev: String,
        /// Offending key.
        key: String,
    },
    /// A key is used both as a value and as a directory.
    #[error("key {key:?} lies under {existing:?}, which is not a directory")]
    Conflict {
        /// Offending key.
        key: String,
        /// The leaf it would have to be under.
        existing: String,
    },
    /// Created/modified indexes are inconsistent.
    #[error("key {key:?}: bad indexes (created {created}, modified {modified}); need 1 <= created <= modified")]
    BadIndex {
        /// The key.
        key: String,
        /// Created index.
        created: u64,
        /// Modified index.
        modified: u64,
    },
    /// The expiry cannot be written as a Go time.
    #[error("key {key:?}: expiry {secs}s is outside years 1..9999")]
    BadExpireTime {
        /// The key.
        key: String,
        /// Unix seconds.
        secs: i64,
    },
    /// The input iterator failed.
    #[error("reading keys: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// A member attribute could not be encoded.
    #[error("encoding member attributes: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON read is not a v2 store.
    #[error("not a v2 store: {0}")]
    BadStore(String),
}

/// Result of v2 store operations.
pub type Result<T, E = V2StoreError> = std::result::Result<T, E>;

/// An absolute expiry time (Unix seconds and nanoseconds, UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpireTime {
    /// Seconds since the Unix epoch (may be negative).
    pub unix_secs: i64,
    /// Nanoseconds within the second (< 1e9).
    pub nanos: u32,
}

impl ExpireTime {
    /// The expiry of a key given a TTL in seconds, counted from `now`.
    pub fn after_ttl(now: SystemTime, ttl_secs: i64) -> Self {
        let (secs, nanos) = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let (s, n) = (-(d.as_secs() as i64), d.subsec_nanos());
                if n == 0 {
                    (s, 0)
                } else {
                    (s - 1, 1_000_000_000 - n)
                }
            }
        };
        ExpireTime {
            unix_secs: secs.saturating_add(ttl_secs),
            nanos,
        }
    }

    /// Go's `time.Time.MarshalJSON` text (RFC 3339, nanoseconds without
    /// trailing zeros, `Z`), without the quotes; `None` outside years 0..9999
    /// (Go refuses those) or for nanos >= 1e9.
    pub fn to_go_json(&self) -> Option<String> {
        if self.nanos >= 1_000_000_000 {
            return None;
        }
        let days = self.unix_secs.div_euclid(86_400);
        let sod = self.unix_secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            return None;
        }
        let mut s = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        );
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            s.push('.');
            s.push_str(frac.trim_end_matches('0'));
        }
        s.push('Z');
        Some(s)
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// One user key to put in the store, under `/1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2Key {
    /// Key path as the v2 API shows it (`/registry/pods/default/x`): starts
    /// with `/`, no empty, `.` or `..` components, no trailing `/`.
    pub key: Vec<u8>,
    /// Value (ignored for directories); must be UTF-8.
    pub value: Vec<u8>,
    /// An explicit directory (v2 only; v3 keys are never directories).
    pub dir: bool,
    /// Absolute expiry, `None` = permanent.
    pub expire: Option<ExpireTime>,
    /// v2 createdIndex (e.g. the v3 create_revision).
    pub created_index: u64,
    /// v2 modifiedIndex (e.g. the v3 mod_revision).
    pub modified_index: u64,
}

/// One cluster member as recorded under `/0/members/<hex id>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct V2MemberInfo {
    /// Member id.
    pub id: u64,
    /// Name (`--name`).
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs.
    pub client_urls: Vec<String>,
}

/// What goes into the store besides the user keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreParams {
    /// `/0/version`; 2.2.1 refuses to start with a version above 2.2.
    pub cluster_version: String,
    /// Members under `/0/members`.
    pub members: Vec<V2MemberInfo>,
    /// Created/modified index given to the `/0` nodes (>= 1).
    pub internal_index: u64,
    /// Lower bound of `CurrentIndex` (e.g. the v3 store's current revision,
    /// which can exceed every live key's mod_revision after deletions).
    pub min_current_index: u64,
}

/// What [`write_store`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreWritten {
    /// `CurrentIndex`: the highest index in the store or the given minimum.
    pub current_index: u64,
    /// User values written.
    pub keys: u64,
    /// User directories written (explicit and implied).
    pub dirs: u64,
    /// Largest user modified index (0 if none).
    pub max_modified_index: u64,
}

#[derive(Serialize)]
struct RaftAttrsJson<'a> {
    #[serde(rename = "peerURLs")]
    peer_urls: &'a [String],
}

#[derive(Serialize)]
struct AttrsJson<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(rename = "clientURLs", skip_serializing_if = "<[String]>::is_empty")]
    client_urls: &'a [String],
}

/// Low-level JSON emitter for store nodes.
struct Emitter<W: Write> {
    w: W,
}

/// Whether any of the 8 bytes of `x` must be escaped in a JSON string: a control character
/// (below 0x20), `"` or `\`. Word-at-a-time: Kubernetes values are long runs of plain text.
fn needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    (below_space | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\')))) != 0
}

/// Writes `s` as a JSON string, escaped exactly as serde_json escapes it.
fn write_json_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    w.write_all(b"\"")?;
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        if let Some(word) = b.get(i..i + 8) {
            let x = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
            if !needs_escape(x) {
                i += 8;
                continue;
            }
        }
        let c = b[i];
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            c if c < 0x20 => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(c >> 4)],
                HEX[usize::from(c & 0xf)],
            ],
            _ => {
                i += 1;
                continue;
            }
        };
        w.write_all(&b[start..i])?;
        w.write_all(esc)?;
        i += 1;
        start = i;
    }
    w.write_all(&b[start..])?;
    w.write_all(b"\"")
}

impl<W: Write> Emitter<W> {
    fn str(&mut self, s: &str) -> io::Result<()> {
        write_json_str(&mut self.w, s)
    }

    fn raw(&mut self, s: &str) -> io::Result<()> {
        self.w.write_all(s.as_bytes())
    }

    /// Writes `"Path":..,"CreatedIndex":..,"ModifiedIndex":..,"ExpireTime":..,"Value":..,"Children":`
    /// after an opening brace.
    fn node_head(
        &mut self,
        path: &str,
        created: u64,
        modified: u64,
        expire: &str,
        value: &str,
    ) -> io::Result<()> {
        self.raw("{\"Path\":")?;
        self.str(path)?;
        write!(
            self.w,
            ",\"CreatedIndex\":{created},\"ModifiedIndex\":{modified},\"ExpireTime\":\""
        )?;
        self.raw(expire)?;
        self.raw("\",\"Value\":")?;
        self.str(value)?;
        self.raw(",\"Children\":")
    }

    fn leaf(&mut self, path: &str, c: u64, m: u64, expire: &str, value: &str) -> io::Result<()> {
        self.node_head(path, c, m, expire, value)?;
        self.raw("null}")
    }

    fn open_dir(&mut self, path: &str, c: u64, m: u64, expire: &str) -> io::Result<()> {
        self.node_head(path, c, m, expire, "")?;
        self.raw("{")
    }

    fn close_dir(&mut self) -> io::Result<()> {
        self.raw("}}")
    }

    /// Writes `,"name":` or `"name":` inside a Children map.
    fn child_key(&mut self, first: &mut bool, name: &str) -> io::Result<()> {
        if !*first {
            self.raw(",")?;
        }
        *first = false;
        self.str(name)?;
        self.raw(":")
    }
}

/// A directory currently open in the output.
struct OpenDir {
    /// Byte length of the user key prefix naming it (e.g. `/a/b` = 4).
    key_len: usize,
    /// Whether its Children map is still empty.
    empty: bool,
}

/// A key that later keys may still extend (they start with it as a string).
struct Pending {
    key: String,
    /// `Some` for an explicit directory not yet written: it is written when
    /// its first child arrives, or as an empty directory when no later key
    /// can be inside it.
    dir: Option<DirMeta>,
}

#[derive(Clone)]
struct DirMeta {
    created: u64,
    modified: u64,
    expire: String,
}

/// Whether a key can be a v2 path: UTF-8, starts with `/`, no empty, `.` or `..`
/// components. Returns why not.
pub fn validate_key_path(key: &[u8]) -> std::result::Result<(), &'static str> {
    let Ok(key) = std::str::from_utf8(key) else {
        return Err("not UTF-8");
    };
    let Some(rest) = key.strip_prefix('/') else {
        return Err("does not start with '/'");
    };
    if rest.is_empty() {
        return Err("is the root");
    }
    for c in rest.split('/') {
        match c {
            "" => return Err("has an empty path component"),
            "." | ".." => return Err("has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// Components of a validated user key.
fn validate_key(k: &V2Key) -> Result<&str> {
    let lossy = || String::from_utf8_lossy(&k.key).into_owned();
    let key = std::str::from_utf8(&k.key).map_err(|_| V2StoreError::NonUtf8 {
        key: lossy(),
        what: "key",
    })?;
    validate_key_path(&k.key).map_err(|reason| V2StoreError::InvalidKey {
        key: key.to_string(),
        reason,
    })?;
    if k.created_index == 0 || k.created_index > k.modified_index {
        return Err(V2StoreError::BadIndex {
            key: key.to_string(),
            created: k.created_index,
            modified: k.modified_index,
        });
    }
    Ok(key)
}

fn expire_text(key: &str, e: &Option<ExpireTime>) -> Result<String> {
    match e {
        None => Ok(ZERO_TIME.to_string()),
        Some(t) => t.to_go_json().ok_or(V2StoreError::BadExpireTime {
            key: key.to_string(),
            secs: t.unix_secs,
        }),
    }
}

/// The value of `k` (empty for a directory), which must be UTF-8.
fn key_value<'k>(k: &'k V2Key, key: &str) -> Result<&'k str> {
    if k.dir {
        return Ok("");
    }
    std::str::from_utf8(&k.value).map_err(|_| V2StoreError::NonUtf8 {
        key: key.to_string(),
        what: "value",
    })
}

/// Byte lengths of the directory prefixes of `key`: "/a", "/a/b", ... of "/a/b/c".
fn dir_prefix_lens(key: &str) -> Vec<usize> {
    key.char_indices()
        .skip(1)
        .filter(|&(_, c)| c == '/')
        .map(|(i, _)| i)
        .collect()
}

/// Streams user keys into the `/1` subtree.
struct KeyTree<'e, W: Write> {
    em: &'e mut Emitter<W>,
    /// `stack[0]` is `/1`; `stack[i]` is the directory of depth i.
    stack: Vec<OpenDir>,
    pending: Vec<Pending>,
    prev: Option<String>,
    out: StoreWritten,
}

impl<W: Write> KeyTree<'_, W> {
    /// Closes directories until `depth` is the deepest open one.
    fn close_to(&mut self, depth: usize) -> io::Result<()> {
        while self.stack.len() > depth + 1 {
            self.stack.pop();
            self.em.close_dir()?;
        }
        Ok(())
    }

    fn child_key(&mut self, name: &str) -> io::Result<()> {
        let mut first = self.stack.last().is_none_or(|d| d.empty);
        self.em.child_key(&mut first, name)?;
        if let Some(d) = self.stack.last_mut() {
            d.empty = first;
        }
        Ok(())
    }

    fn open_dir(&mut self, key: &str, key_len: usize, meta: &DirMeta) -> io::Result<()> {
        let name = key[..key_len].rsplit('/').next().unwrap_or("");
        self.child_key(name)?;
        self.em.open_dir(
            &format!("/1{}", &key[..key_len]),
            meta.created,
            meta.modified,
            &meta.expire,
        )?;
        self.stack.push(OpenDir {
            key_len,
            empty: true,
        });
        self.out.dirs += 1;
        self.out.max_modified_index = self.out.max_modified_index.max(meta.modified);
        Ok(())
    }

    /// Writes a deferred explicit directory that turned out empty.
    fn flush_pending_dir(&mut self, p: &Pending, meta: &DirMeta) -> io::Result<()> {
        let depth = p.key.matches('/').count();
        self.close_to(depth - 1)?;
        self.open_dir(&p.key, p.key.len(), meta)?;
        self.close_to(depth - 1)
    }

    fn add(&mut self, k: &V2Key) -> Result<()> {
        let key = validate_key(k)?;
        self.check_order(key)?;
        let value = key_value(k, key)?;
        let expire = expire_text(key, &k.expire)?;
        let open_explicit = self.settle_pending(key)?;
        self.open_parents(k, key, open_explicit)?;
        if k.dir {
            self.pending.push(Pending {
                key: key.to_string(),
                dir: Some(DirMeta {
                    created: k.created_index,
                    modified: k.modified_index,
                    expire,
                }),
            });
        } else {
            self.put_leaf(k, key, &expire, value)?;
        }
        self.prev = Some(key.to_string());
        Ok(())
    }

    /// Refuses a key not strictly after the previous one.
    fn check_order(&self, key: &str) -> Result<()> {
        if let Some(prev) = &self.prev {
            if key.as_bytes() <= prev.as_bytes() {
                return Err(V2StoreError::NotSorted {
                    prev: prev.clone(),
                    key: key.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Settles the pending keys against the new key: those that no longer prefix it are
    /// written (if directories) or dropped; those it lies inside must be explicit directories,
    /// and the deepest of them, returned with its byte length, is opened with its own metadata.
    fn settle_pending(&mut self, key: &str) -> Result<Option<(usize, DirMeta)>> {
        // Keys that no longer prefix the new key can never get children.
        while let Some(p) = self.pending.last() {
            if key.starts_with(p.key.as_str()) {
                break;
            }
            if let Some(p) = self.pending.pop() {
                if let Some(meta) = &p.dir {
                    self.flush_pending_dir(&p, meta)?;
                }
            }
        }
        // A remaining one that is a path prefix must be a directory.
        let mut open_explicit: Option<(usize, DirMeta)> = None;
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let inside = key.len() > p.key.len() && key.as_bytes()[p.key.len()] == b'/';
            if !inside {
                i += 1;
                continue;
            }
            let Some(meta) = p.dir.clone() else {
                return Err(V2StoreError::Conflict {
                    key: key.to_string(),
                    existing: p.key.clone(),
                });
            };
            open_explicit = Some((p.key.len(), meta));
            self.pending.remove(i);
        }
        Ok(open_explicit)
    }

    /// Closes the open directories that are not parents of `key` and opens its missing
    /// parents: the explicit one (if any) with its metadata, the others implied by `k`.
    fn open_parents(
        &mut self,
        k: &V2Key,
        key: &str,
        open_explicit: Option<(usize, DirMeta)>,
    ) -> Result<()> {
        let dir_lens = dir_prefix_lens(key);
        // Keep the open directories that are prefixes of this key.
        let mut keep = 0;
        while keep + 1 < self.stack.len()
            && keep < dir_lens.len()
            && self.stack[keep + 1].key_len == dir_lens[keep]
            && self.prev_dir_matches(key, dir_lens[keep])
        {
            keep += 1;
        }
        self.close_to(keep)?;
        let implied = DirMeta {
            created: k.created_index,
            modified: k.created_index,
            expire: ZERO_TIME.to_string(),
        };
        for &len in &dir_lens[keep..] {
            let meta = match &open_explicit {
                Some((l, m)) if *l == len => m.clone(),
                _ => implied.clone(),
            };
            self.open_dir(key, len, &meta)?;
        }
        Ok(())
    }

    /// Writes a key with a value into the deepest open directory.
    fn put_leaf(&mut self, k: &V2Key, key: &str, expire: &str, value: &str) -> Result<()> {
        let name = key.rsplit('/').next().unwrap_or("");
        self.child_key(name)?;
        self.em.leaf(
            &format!("/1{key}"),
            k.created_index,
            k.modified_index,
            expire,
            value,
        )?;
        self.out.keys += 1;
        self.out.max_modified_index = self.out.max_modified_index.max(k.modified_index);
        self.pending.push(Pending {
            key: key.to_string(),
            dir: None,
        });
        Ok(())
    }

    /// Whether the open directory of byte length `len` names the same path
    /// in the previous key as in `key` (same length alone is not enough).
    fn prev_dir_matches(&self, key: &str, len: usize) -> bool {
        match &self.prev {
            Some(p) => p.len() > len && p.as_bytes()[..len] == key.as_bytes()[..len],
            None => false,
        }
    }

    fn finish(&mut self) -> Result<()> {
        while let Some(p) = self.pending.pop() {
            if let Some(meta) = &p.dir {
                self.flush_pending_dir(&p, meta)?;
            }
        }
        self.close_to(0)?;
        Ok(())
    }
}

/// Writes the v2 store JSON of a 2.2.1 snapshot to `out`.
///
/// `keys` must yield user keys in strictly increasing byte order (the order
/// of a v3 range read); directories implied by the paths are created with
/// the created index of the first key that implies them. Memory use is
/// bounded by the tree depth, the longest key and the largest value; `out`
/// is buffered internally.
pub fn write_store<W, I, E>(out: &mut W, params: &StoreParams, keys: I) -> Result<StoreWritten>
where
    W: Write,
    I: IntoIterator<Item = std::result::Result<V2Key, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut em = Emitter {
        w: BufWriter::with_capacity(64 * 1024, out),
    };
    em.raw("{\"Root\":")?;
    em.open_dir("/", 0, 0, ZERO_TIME)?;
    let ii = params.internal_index.max(1);
    write_cluster_dir(&mut em, params, ii)?;
    let mut written = write_user_keys(&mut em, keys)?;
    em.close_dir()?; // root
    written.current_index = params
        .min_current_index
        .max(ii)
        .max(written.max_modified_index);
    write_store_tail(&mut em, written.current_index)?;
    em.w.flush()?;
    Ok(written)
}

/// `/0`: the members and the cluster version, all with index `ii`.
fn write_cluster_dir<W: Write>(em: &mut Emitter<W>, params: &StoreParams, ii: u64) -> Result<()> {
    let zero = ZERO_TIME;
    em.raw("\"0\":")?;
    em.open_dir("/0", 0, 0, zero)?;
    let mut first = true;
    if !params.members.is_empty() {
        em.child_key(&mut first, "members")?;
        em.open_dir("/0/members", ii, ii, zero)?;
        let mut members: Vec<&V2MemberInfo> = params.members.iter().collect();
        members.sort_by_key(|m| m.id);
        let mut mfirst = true;
        for m in members {
            write_member(em, m, ii, &mut mfirst)?;
        }
        em.close_dir()?;
    }
    em.child_key(&mut first, "version")?;
    em.leaf("/0/version", ii, ii, zero, &params.cluster_version)?;
    em.close_dir()?;
    Ok(())
}

/// `/0/members/<hex id>` with its `attributes` and `raftAttributes`.
fn write_member<W: Write>(
    em: &mut Emitter<W>,
    m: &V2MemberInfo,
    ii: u64,
    first: &mut bool,
) -> Result<()> {
    let zero = ZERO_TIME;
    // types.ID.String(): lower-case hex without padding.
    let hex = format!("{:x}", m.id);
    let base = format!("/0/members/{hex}");
    em.child_key(first, &hex)?;
    em.open_dir(&base, ii, ii, zero)?;
    let attrs = serde_json::to_string(&AttrsJson {
        name: &m.name,
        client_urls: &m.client_urls,
    })?;
    let raft = serde_json::to_string(&RaftAttrsJson {
        peer_urls: &m.peer_urls,
    })?;
    let mut afirst = true;
    em.child_key(&mut afirst, "attributes")?;
    em.leaf(&format!("{base}/attributes"), ii, ii, zero, &attrs)?;
    em.child_key(&mut afirst, "raftAttributes")?;
    em.leaf(&format!("{base}/raftAttributes"), ii, ii, zero, &raft)?;
    em.close_dir()?;
    Ok(())
}

/// `/1`: the user keys.
fn write_user_keys<W, I, E>(em: &mut Emitter<W>, keys: I) -> Result<StoreWritten>
where
    W: Write,
    I: IntoIterator<Item = std::result::Result<V2Key, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    em.raw(",\"1\":")?;
    em.open_dir("/1", 0, 0, ZERO_TIME)?;
    let mut tree = KeyTree {
        em,
        stack: vec![OpenDir {
            key_len: 0,
            empty: true,
        }],
        pending: Vec::new(),
        prev: None,
        out: StoreWritten::default(),
    };
    for k in keys {
        let k = k.map_err(|e| V2StoreError::Source(e.into()))?;
        tree.add(&k)?;
    }
    tree.finish()?;
    let written = tree.out;
    em.close_dir()?; // /1
    Ok(written)
}

/// What follows the tree: an empty watcher hub, `CurrentIndex`, zeroed stats, the version.
fn write_store_tail<W: Write>(em: &mut Emitter<W>, current_index: u64) -> Result<()> {
    em.raw(",\"WatcherHub\":{\"EventHistory\":{\"Queue\":{\"Events\":[")?;
    for i in 0..EVENT_HISTORY_CAPACITY {
        em.raw(if i == 0 { "null" } else { ",null" })?;
    }
    write!(
        em.w,
        "],\"Size\":0,\"Front\":0,\"Back\":0,\"Capacity\":{EVENT_HISTORY_CAPACITY}}},\"StartIndex\":0,\"LastIndex\":0}}}},\"CurrentIndex\":{current_index},\"Stats\":{{",
    )?;
    const STATS: [&str; 16] = [
        "getsSuccess",
        "getsFail",
        "setsSuccess",
        "setsFail",
        "deleteSuccess",
        "deleteFail",
        "updateSuccess",
        "updateFail",
        "createSuccess",
        "createFail",
        "compareAndSwapSuccess",
        "compareAndSwapFail",
        "compareAndDeleteSuccess",
        "compareAndDeleteFail",
        "expireCount",
        "watchers",
    ];
    for (i, s) in STATS.iter().enumerate() {
        write!(em.w, "{}\"{s}\":0", if i == 0 { "" } else { "," })?;
    }
    write!(em.w, "}},\"CurrentVersion\":{STORE_VERSION}}}")?;
    Ok(())
}

/// A node as stored in the JSON (only what the reader needs).
#[derive(Deserialize)]
struct NodeJson {
    #[serde(rename = "Path", default)]
    path: String,
    #[serde(rename = "CreatedIndex", default)]
    created: u64,
    #[serde(rename = "ModifiedIndex", default)]
    modified: u64,
    #[serde(rename = "ExpireTime", default)]
    expire: String,
    #[serde(rename = "Value", default)]
    value: String,
    #[serde(rename = "Children", default)]
    children: Option<BTreeMap<String, NodeJson>>,
}

#[derive(Deserialize)]
struct RootChildren {
    #[serde(rename = "0")]
    cluster: Option<NodeJson>,
}

#[derive(Deserialize)]
struct RootJson {
    #[serde(rename = "Children")]
    children: Option<RootChildren>,
}

#[derive(Deserialize)]
struct StoreHeadJson {
    #[serde(rename = "Root")]
    root: RootJson,
    #[serde(rename = "CurrentIndex", default)]
    current_index: u64,
}

#[derive(Deserialize)]
struct MemberRaftJson {
    #[serde(rename = "peerURLs", default)]
    peer_urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct MemberAttrJson {
    #[serde(default)]
    name: String,
    #[serde(rename = "clientURLs", default)]
    client_urls: Option<Vec<String>>,
}

/// Cluster data found under `/0` of a v2 store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct V2ClusterInfo {
    /// `/0/version`, if set.
    pub version: Option<String>,
    /// Members under `/0/members`, by id.
    pub members: Vec<V2MemberInfo>,
    /// Ids under `/0/removed_members`.
    pub removed: Vec<u64>,
    /// The store's `CurrentIndex`.
    pub current_index: u64,
}

/// Reads `/0/version` and the members from a v2 store JSON (the `/1` tree
/// is skipped without being kept in memory).
pub fn read_cluster_info(json: &[u8]) -> Result<V2ClusterInfo> {
    read_cluster_info_from(json)
}

/// [`read_cluster_info`] from a reader: streams past the user keys (`/1`) without holding them,
/// so memory is bounded by the cluster part (`/0`), not by the store.
pub fn read_cluster_info_from(json: impl io::Read) -> Result<V2ClusterInfo> {
    let head: StoreHeadJson = serde_json::from_reader(io::BufReader::with_capacity(1 << 16, json))
        .map_err(|e| V2StoreError::BadStore(e.to_string()))?;
    let mut info = V2ClusterInfo {
        current_index: head.current_index,
        ..Default::default()
    };
    let Some(cluster) = head.root.children.and_then(|c| c.cluster) else {
        return Ok(info);
    };
    let children = cluster.children.unwrap_or_default();
    if let Some(v) = children.get("version") {
        info.version = Some(v.value.clone());
    }
    if let Some(members) = children.get("members").and_then(|m| m.children.as_ref()) {
        for (hex, node) in members {
            let id = u64::from_str_radix(hex, 16)
                .map_err(|_| V2StoreError::BadStore(format!("member id {hex:?}")))?;
            let mut m = V2MemberInfo {
                id,
                ..Default::default()
            };
            let kids = node.children.as_ref();
            if let Some(r) = kids.and_then(|k| k.get("raftAttributes")) {
                let ra: MemberRaftJson = serde_json::from_str(&r.value)
                    .map_err(|e| V2StoreError::BadStore(format!("{}: {e}", r.path)))?;
                m.peer_urls = ra.peer_urls.unwrap_or_default();
            }
            if let Some(a) = kids.and_then(|k| k.get("attributes")) {
                let at: MemberAttrJson = serde_json::from_str(&a.value)
                    .map_err(|e| V2StoreError::BadStore(format!("{}: {e}", a.path)))?;
                m.name = at.name;
                m.client_urls = at.client_urls.unwrap_or_default();
            }
            info.members.push(m);
        }
    }
    if let Some(removed) = children
        .get("removed_members")
        .and_then(|m| m.children.as_ref())
    {
        for hex in removed.keys() {
            if let Ok(id) = u64::from_str_radix(hex, 16) {
                info.removed.push(id);
            }
        }
    }
    Ok(info)
}

/// One node of a v2 store, flattened (for tests and inspection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2NodeOut {
    /// Full store path (`/1/registry/...`).
    pub path: String,
    /// Value (empty for directories).
    pub value: String,
    /// Whether it is a directory.
    pub dir: bool,
    /// Created index.
    pub created_index: u64,
    /// Modified index.
    pub modified_index: u64,
    /// ExpireTime text (`0001-01-01T00:00:00Z` = permanent).
    pub expire_time: String,
}

/// Reads every node of a v2 store JSON in path order (not streaming).
pub fn read_all_nodes(json: &[u8]) -> Result<Vec<V2NodeOut>> {
    #[derive(Deserialize)]
    struct Whole {
        #[serde(rename = "Root")]
        root: NodeJson,
    }
    let w: Whole =
        serde_json::from_slice(json).map_err(|e| V2StoreError::BadStore(e.to_string()))?;
    let mut out = Vec::new();
    let mut stack = vec![w.root];
    while let Some(n) = stack.pop() {
        let dir = n.children.is_some();
        if let Some(ch) = n.children {
            stack.extend(ch.into_values().rev());
        }
        out.push(V2NodeOut {
            path: n.path,
            value: n.value,
            dir,
            created_index: n.created,
            modified_index: n.modified,
            expire_time: n.expire,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn k(key: &str, v: &str, i: u64) -> std::result::Result<V2Key, Infallible> {
        Ok(V2Key {
            key: key.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            dir: false,
            expire: None,
            created_index: i,
            modified_index: i,
        })
    }

    /// An explicit directory.
    fn dir(key: &str, i: u64) -> std::result::Result<V2Key, Infallible> {
        k(key, "", i).map(|k| V2Key { dir: true, ..k })
    }

    fn params() -> StoreParams {
        StoreParams {
            cluster_version: CLUSTER_VERSION_2_2.into(),
            members: vec![V2MemberInfo {
                id: 0x84f0_03a4_ac2b_73ad,
                name: "etcd-test".into(),
                peer_urls: vec!["http://127.0.0.1:2380".into()],
                client_urls: vec!["http://127.0.0.1:2379".into()],
            }],
            internal_index: 1,
            min_current_index: 0,
        }
    }

    fn write(keys: Vec<std::result::Result<V2Key, Infallible>>) -> Result<(Vec<u8>, StoreWritten)> {
        let mut out = Vec::new();
        let w = write_store(&mut out, &params(), keys)?;
        Ok((out, w))
    }

    #[test]
    fn go_time_format() {
        let t = |s, n| ExpireTime {
            unix_secs: s,
            nanos: n,
        };
        assert_eq!(t(0, 0).to_go_json().unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(
            t(2_110_603_643, 160_109_594).to_go_json().unwrap(),
            "2036-11-18T06:47:23.160109594Z"
        );
        assert_eq!(
            t(951_782_400, 500_000_000).to_go_json().unwrap(),
            "2000-02-29T00:00:00.5Z"
        );
        assert_eq!(t(-62_135_596_800, 0).to_go_json().unwrap(), ZERO_TIME);
        assert!(t(253_402_300_800, 0).to_go_json().is_none());
    }

    #[test]
    fn tricky_orders_make_a_valid_tree() {
        // "/a-b" sorts between "/a" (dir) and "/a/c": the dir must not be split.
        let mut keys = vec![dir("/a", 1), k("/a-b", "x", 2), k("/a-b/c", "y", 3)];
        keys.push(k("/a/c", "z", 4));
        keys.push(dir("/e", 5));
        let err = write(keys).unwrap_err();
        // "/a-b" is a value, so "/a-b/c" cannot exist.
        assert!(matches!(err, V2StoreError::Conflict { .. }), "{err}");

        let keys = vec![
            dir("/a", 1),
            k("/a-b/c", "y", 3),
            k("/a.x", "w", 4),
            k("/a/c", "z", 5),
            dir("/e", 6),
            k("/f/g/h", "deep", 7),
            k("/f/gg", "v", 8),
        ];
        let (json, w) = write(keys).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let nodes = read_all_nodes(&json).unwrap();
        let user: Vec<_> = nodes
            .iter()
            .filter(|n| n.path.starts_with("/1/"))
            .map(|n| (n.path.as_str(), n.dir, n.value.as_str(), n.created_index))
            .collect();
        assert_eq!(
            user,
            vec![
                ("/1/a", true, "", 1),
                ("/1/a-b", true, "", 3),
                ("/1/a-b/c", false, "y", 3),
                ("/1/a.x", false, "w", 4),
                ("/1/a/c", false, "z", 5),
                ("/1/e", true, "", 6),
                ("/1/f", true, "", 7),
                ("/1/f/g", true, "", 7),
                ("/1/f/g/h", false, "deep", 7),
                ("/1/f/gg", false, "v", 8),
            ]
        );
        assert_eq!(
            v["Root"]["Children"]["1"]["Children"]["e"]["Children"],
            serde_json::json!({})
        );
        assert_eq!(w.keys, 5);
        assert_eq!(w.dirs, 5);
        assert_eq!(w.current_index, 8);
        let info = read_cluster_info(&json).unwrap();
        assert_eq!(info.version.as_deref(), Some("2.2.0"));
        assert_eq!(info.members, params().members);
        assert_eq!(info.current_index, 8);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            write(vec![k("/b", "", 1), k("/a", "", 2)]),
            Err(V2StoreError::NotSorted { .. })
        ));
        assert!(matches!(
            write(vec![k("/a", "", 1), k("/a", "", 2)]),
            Err(V2StoreError::NotSorted { .. })
        ));
        assert!(matches!(
            write(vec![k("/a", "", 1), k("/a/b", "", 2)]),
            Err(V2StoreError::Conflict { .. })
        ));
        for bad in ["a", "/", "/a//b", "/a/", "/a/../b", "/./a"] {
            assert!(
                matches!(
                    write(vec![k(bad, "", 1)]),
                    Err(V2StoreError::InvalidKey { .. })
                ),
                "{bad}"
            );
        }
        let mut nu = k("/x", "", 1).unwrap();
        nu.value = vec![0x6b, 0x38, 0x73, 0x00, 0xff];
        assert!(matches!(
            write(vec![Ok(nu)]),
            Err(V2StoreError::NonUtf8 { what: "value", .. })
        ));
        let mut bi = k("/x", "", 5).unwrap();
        bi.modified_index = 4;
        assert!(matches!(
            write(vec![Ok(bi)]),
            Err(V2StoreError::BadIndex { .. })
        ));
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = vec![
            String::new(),
            "plain".into(),
            "exactly8".into(),
            "{\"kind\":\"Pod\",\"spec\":{\"a\":\"b\\\\c\"}}".into(),
            "tail escape after a long run of plain text\u{7}".into(),
            "é\u{2028}\u{7f}<&>\u{1f}\u{0}".into(),
        ];
        cases.push((0u8..128).map(char::from).collect());
        cases.push(
            (0u8..128)
                .rev()
                .map(char::from)
                .collect::<String>()
                .repeat(3),
        );
        for s in cases {
            let mut ours = Vec::new();
            write_json_str(&mut ours, &s).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&s).unwrap(),
                "{s:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_escaped_as_serde_json_escapes_it(s in "(?s).{0,64}", pad in 0usize..9) {
            let s = format!("{}{s}", "x".repeat(pad));
            let mut ours = Vec::new();
            write_json_str(&mut ours, &s).unwrap();
            proptest::prop_assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn escapes_survive() {
        let v = "quote\" backslash\\ nl\n tab\t ctl\u{1} uni é \u{2028} <&>";
        let (json, _) = write(vec![k("/we ird/ké y", v, 3)]).unwrap();
        let nodes = read_all_nodes(&json).unwrap();
        let n = nodes.iter().find(|n| n.path == "/1/we ird/ké y").unwrap();
        assert_eq!(n.value, v);
    }

    #[test]
    fn directory_prefixes_and_values_of_a_key() {
        assert_eq!(dir_prefix_lens("/a"), Vec::<usize>::new());
        assert_eq!(dir_prefix_lens("/a/bc/d"), vec![2, 5]);
        assert_eq!(dir_prefix_lens("/é/x"), vec![3]);
        let key = |dir: bool, value: &[u8]| V2Key {
            key: b"/k".to_vec(),
            value: value.to_vec(),
            dir,
            expire: None,
            created_index: 1,
            modified_index: 1,
        };
        assert_eq!(key_value(&key(false, b"v"), "/k").unwrap(), "v");
        assert_eq!(key_value(&key(true, &[0xff]), "/k").unwrap(), "");
        assert!(matches!(
            key_value(&key(false, &[0xff]), "/k"),
            Err(V2StoreError::NonUtf8 { what: "value", .. })
        ));
    }

    #[test]
    fn cluster_dir_lists_members_by_id_then_the_version() {
        let mut p = params();
        p.members = vec![
            V2MemberInfo {
                id: 0x20,
                name: "b".into(),
                peer_urls: vec!["http://b".into()],
                client_urls: vec![],
            },
            V2MemberInfo {
                id: 0x10,
                name: "a".into(),
                peer_urls: vec!["http://a".into()],
                client_urls: vec!["http://a:2379".into()],
            },
        ];
        let mut em = Emitter { w: Vec::new() };
        write_cluster_dir(&mut em, &p, 3).unwrap();
        let text = String::from_utf8(em.w).unwrap();
        let at = |s: &str| {
            text.find(s)
                .unwrap_or_else(|| panic!("{s} missing in {text}"))
        };
        assert!(text.starts_with("\"0\":"));
        assert!(at("/0/members/10\"") < at("/0/members/20\""));
        assert!(at("/0/members/20/raftAttributes") < at("/0/version"));
        assert!(text.contains(r#"{\"name\":\"a\",\"clientURLs\":[\"http://a:2379\"]}"#));
    }

    #[test]
    fn store_tail_holds_the_current_index_and_the_empty_history() {
        let mut em = Emitter { w: Vec::new() };
        write_store_tail(&mut em, 77).unwrap();
        let text = String::from_utf8(em.w).unwrap();
        assert!(text.contains(",\"CurrentIndex\":77,\"Stats\":{\"getsSuccess\":0,"));
        assert_eq!(text.matches("null").count(), EVENT_HISTORY_CAPACITY);
        assert!(text.ends_with(&format!(
            "\"watchers\":0}},\"CurrentVersion\":{STORE_VERSION}}}"
        )));
    }
}
