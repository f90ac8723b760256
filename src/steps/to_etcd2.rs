//! Rollback 3.0.x/etcd3 -> 2.2.1/etcd2, written natively and offline.
//!
//! Reads the v3 backend with our own bbolt reader (newest revision per key, tombstones dropped,
//! lease TTLs), the member and cluster identity from the old WAL/snapshot, and writes what etcd
//! 2.2.1 restarts from: a v2 store snapshot and a fresh WAL holding metadata and a snapshot
//! record. The output is built in staging and swapped in; the old dir becomes a backup.
//! Memory: the key index (keys and revisions, no values) plus one value at a time.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Instant, SystemTime};

use crate::etcd::bundle::Tool;
use crate::etcd::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::etcd::server::{EtcdServer, Launch};
use crate::fsutil;
use crate::plan::ROLLBACK_ETCD2_VERSION;
use crate::storage::bbolt::Db;
use crate::storage::mvcc::{self, KeyValueRef, LiveIndex};
use crate::storage::v2member::{write_v2_member, V2MemberError, V2MemberParams};
use crate::storage::v2store::{validate_key_path, ExpireTime, V2Key, V2StoreError};
use crate::version::{EtcdVersion, Storage, VersionFile};

use super::swap::Stage;
use super::{verify_against, Ctx, StepError, StepReport};

/// The Kubernetes protobuf envelope.
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// Why the data cannot be written as a v2 store: found before anything is touched.
#[derive(Debug, Default)]
pub struct Unrepresentable {
    pub protobuf: Vec<String>,
    pub protobuf_count: u64,
    pub non_utf8: Vec<String>,
    pub bad_keys: Vec<String>,
}

impl Unrepresentable {
    fn is_empty(&self) -> bool {
        self.protobuf_count == 0 && self.non_utf8.is_empty() && self.bad_keys.is_empty()
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

fn note(list: &mut Vec<String>, key: &[u8]) {
    if list.len() < 5 {
        list.push(String::from_utf8_lossy(key).into_owned());
    }
}

/// Scans the live keys for what a v2 store cannot hold. Offline, read-only.
pub fn check_representable(member: &Path, prefix: &str) -> Result<Unrepresentable, String> {
    let db = Db::open(member.join("snap/db")).map_err(|e| e.to_string())?;
    let index = LiveIndex::build(&db).map_err(|e| e.to_string())?;
    let mut u = Unrepresentable::default();
    for kv in index.values(&db).map_err(|e| e.to_string())? {
        let kv = kv.map_err(|e| e.to_string())?;
        if kv.key.starts_with(prefix.as_bytes()) && kv.value.starts_with(PROTOBUF_MAGIC) {
            u.protobuf_count += 1;
            note(&mut u.protobuf, &kv.key);
        } else if std::str::from_utf8(&kv.value).is_err() {
            note(&mut u.non_utf8, &kv.key);
        }
        if let Err(why) = validate_key_path(&kv.key) {
            if u.bad_keys.len() < 5 {
                u.bad_keys
                    .push(format!("{} ({why})", String::from_utf8_lossy(&kv.key)));
            }
        }
        // A key that is also a directory of other keys: "/a" and "/a/b".
        let mut p = kv.key.as_slice();
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            if !p.is_empty() && index.revision(p).is_some() {
                if u.bad_keys.len() < 5 {
                    u.bad_keys.push(format!(
                        "{} (its parent {} is a key too)",
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(p)
                    ));
                }
                break;
            }
        }
    }
    Ok(u)
}

/// Refuses before anything is touched when the data cannot become a v2 store.
pub fn refuse_unrepresentable(member: &Path, prefix: &str) -> Result<(), String> {
    let u = check_representable(member, prefix)
        .map_err(|e| format!("cannot read {}: {e}", member.display()))?;
    if u.is_empty() {
        Ok(())
    } else {
        Err(u.message(prefix))
    }
}

/// Runs the native rollback of `from` (3.0.x/etcd3) to 2.2.1/etcd2.
pub async fn run(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    baseline: Option<&Fingerprint>,
) -> Result<StepReport, StepError> {
    let t0 = Instant::now();
    let member = ctx.data_dir.join("member");
    let work = ctx.work_dir();
    let err = |what: &str, e: String| StepError::Other(format!("{what} {}: {e}", member.display()));

    // Identity and raft position from the old WAL/snapshot.
    let mut summary = crate::datadir::member_summary(&member)
        .map_err(|e| err("reading the WAL of", e.to_string()))?;
    if summary.member_count > 1 {
        return Err(StepError::Other(format!(
            "{} holds a cluster of {} members",
            member.display(),
            summary.member_count
        )));
    }
    // The backend must hold every write of the WAL: after an unclean stop etcd applies the WAL's
    // tail on its next start, and an offline read would lose those keys.
    let unapplied = |summary: &crate::storage::walinfo::MemberSummary| {
        let db = Db::open(member.join("snap/db"))
            .map_err(|e| err("opening the backend of", e.to_string()))?;
        crate::datadir::unapplied_writes(summary, &db).map_err(|e| err("reading the backend of", e))
    };
    if let Some(lag) = unapplied(&summary)? {
        apply_wal_tail(ctx, from, lag).await?;
        summary = crate::datadir::member_summary(&member)
            .map_err(|e| err("reading the WAL of", e.to_string()))?;
        if let Some(still) = unapplied(&summary)? {
            return Err(StepError::Other(format!(
                "etcd {from} ran on {} but did not commit its backend: {still}",
                ctx.data_dir.display()
            )));
        }
    }
    let term = summary
        .hard_state
        .as_ref()
        .map(|h| h.term)
        .unwrap_or(summary.last_term)
        .max(summary.last_term)
        .max(1);
    let mut members = summary.member_info.clone();
    for m in &mut members {
        if m.id == summary.node_id && m.name.is_empty() {
            m.name = ctx.config.member.name.clone();
        }
        if m.id == summary.node_id && m.peer_urls.is_empty() {
            m.peer_urls = ctx
                .config
                .member
                .advertise_peer_urls
                .split(',')
                .map(str::to_string)
                .collect();
        }
    }

    // The v3 store.
    let db = Db::open(member.join("snap/db"))
        .map_err(|e| err("opening the backend of", e.to_string()))?;
    let ttl_of: HashMap<i64, i64> = mvcc::leases(&db)
        .map_err(|e| err("reading leases of", e.to_string()))?
        .into_iter()
        .map(|l| (l.id, l.ttl))
        .collect();
    let index = LiveIndex::build(&db).map_err(|e| err("indexing keys of", e.to_string()))?;
    let current_rev = index
        .newest_revision()
        .map(|r| r.main.max(0) as u64)
        .unwrap_or(0);
    let read_ms = t0.elapsed().as_millis() as u64;

    // Write the v2 member in staging.
    let t = Instant::now();
    let db_size = std::fs::metadata(member.join("snap/db"))
        .map(|m| m.len())
        .unwrap_or(0);
    fsutil::ensure_space(&work, 2 * db_size)?;
    let stage = Stage::begin(ctx.data_dir)?;
    let mut params = V2MemberParams::new(
        summary.node_id,
        summary.cluster_id,
        members,
        term,
        summary.last_index,
    );
    params.min_store_index = current_rev;
    // The JSON is about as large as the backend: right for the snapshot header's length as a
    // rule, so the JSON is written once.
    params.store_size_hint = db_size;
    let now = SystemTime::now();
    // The digests hash every value: build them only when something compares them (the step
    // before this one, or etcd 2.2.1 serving the output).
    let etcd_221 = ctx
        .bundle
        .optional(Tool::Etcd, ROLLBACK_ETCD2_VERSION)
        .is_some();
    let compare_with_before = baseline.is_some() && ctx.members == 1;
    let want_digests = compare_with_before || etcd_221;
    let prefix = ctx.config.data_prefix.as_bytes();
    // One thread reads and checks the values, in key order (a read is mostly a system call),
    // while this one turns them into JSON and a third writes it. Keys cross in batches whose
    // buffers go back for reuse: nothing allocated on one thread is freed on the other.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Batch>(4);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Batch>();
    let (index, db, ttl_of) = (&index, &db, &ttl_of);
    let produce = move || {
        let mut seen = Produced {
            fp: want_digests.then(FingerprintBuilder::default),
            ..Default::default()
        };
        let mut batch = Batch::default();
        // Each KeyValue is lent from the read buffer and copied once, into the batch.
        let read = index.for_each_ref(db, |kv| -> Result<(), Stop> {
            add_v2_key(kv, prefix, ttl_of, now, &mut seen, &mut batch)?;
            if batch.items.len() >= 512 || batch.bytes.len() >= 1 << 20 {
                let mut next = free_rx.try_recv().unwrap_or_default();
                next.bytes.clear();
                next.items.clear();
                let full = std::mem::replace(&mut batch, next);
                full_tx.send(full).map_err(|_| Stop::Gone)?;
            }
            Ok(())
        });
        match read {
            Ok(()) => {}
            Err(Stop::Bad(e)) => batch.error = Some(e),
            Err(Stop::Gone) => return seen,
        }
        let _ = full_tx.send(batch);
        seen
    };
    fail::fail_point!("to-etcd2-before-write");
    let (result, seen) = std::thread::scope(|scope| {
        let producer = scope.spawn(produce);
        let keys = Batches {
            full: full_rx,
            free: free_tx,
            cur: Batch::default(),
            pos: 0,
            at: 0,
        };
        let result = write_v2_member(&stage.member(), &params, keys);
        (result, producer.join())
    });
    let Produced {
        fp,
        leased,
        orphan_leases,
        unrepresentable,
    } = seen.map_err(|_| StepError::Other("the thread reading the v3 store panicked".into()))?;
    let written = match result {
        Ok(w) => w,
        Err(e)
            if unrepresentable
                || matches!(
                    e,
                    V2MemberError::Store(
                        V2StoreError::InvalidKey { .. } | V2StoreError::Conflict { .. }
                    )
                ) =>
        {
            // Name everything that is wrong (a second scan, on the refusal path only).
            fsutil::remove_tree(&stage.path)?;
            let u = check_representable(&member, &ctx.config.data_prefix)
                .map_err(|e| err("reading", e))?;
            return Err(StepError::Refused(if u.is_empty() {
                format!("rollback to etcd2 refused, nothing was changed: {e}")
            } else {
                u.message(&ctx.config.data_prefix)
            }));
        }
        Err(e) => return Err(err("writing the v2 member for", e.to_string())),
    };
    let t_sync = Instant::now();
    fsutil::fsync_tree(&stage.path)?;
    let fsync_ms = t_sync.elapsed().as_millis() as u64;
    let source = fp.map(FingerprintBuilder::finish);
    if let (Some(source), true) = (&source, compare_with_before) {
        verify_against(&format!("{from}/etcd3 read offline"), baseline, source)?;
    }
    if orphan_leases > 0 {
        tracing::warn!(
            keys = orphan_leases,
            "keys name a lease that is gone; they are written without a TTL"
        );
    }
    let write_ms = t.elapsed().as_millis() as u64;
    let t_back = Instant::now();

    // Check what we wrote with our readers; prove it with etcd 2.2.1 when the image has one.
    // Read back what we wrote: the snapshot file's CRC and metadata from disk (streamed), and
    // the WAL's ids and snapshot marker. The store's /0 part came from our own parameters.
    let (md, _) = crate::storage::snap::stream_snap_file(&written.snap_path, |_| ())
        .map_err(|e| err("reading back the snapshot written for", e.to_string()))?;
    let wal = crate::storage::wal::read_wal(
        &stage.member().join("wal"),
        &crate::storage::raftpb::WalSnapshot {
            index: md.index,
            term: md.term,
            conf_state: None,
        },
    )
    .map_err(|e| err("reading back the WAL written for", e.to_string()))?;
    let ids = wal.metadata.as_ref().map(|m| (m.node_id, m.cluster_id));
    if (md.index, md.term) != (written.index, written.term)
        || !wal.start_matched
        || ids != Some((summary.node_id, summary.cluster_id))
    {
        return Err(StepError::Other(format!(
            "the v2 member written does not read back as written (snapshot {}/{}, marker found: {}, ids {ids:?})",
            md.term, md.index, wal.start_matched
        )));
    }
    let readback_ms = t_back.elapsed().as_millis() as u64;
    let proved = prove_with_221(ctx, &stage.path, source.as_ref()).await?;
    fail::fail_point!("to-etcd2-before-swap");

    let t = Instant::now();
    let backup = stage.commit(
        VersionFile {
            version: ROLLBACK_ETCD2_VERSION,
            storage: Storage::Etcd2,
        },
        VersionFile {
            version: from,
            storage: Storage::Etcd3,
        },
    )?;
    let swap_ms = t.elapsed().as_millis() as u64;
    tracing::info!(keys = written.store.keys, leased, snapshot = %written.snap_path.display(), term = written.term,
        index = written.index, "wrote a 2.2.1 v2 store snapshot and WAL");

    let mut report = StepReport {
        fingerprint: source,
        ..Default::default()
    };
    let d = &mut report.detail;
    d.insert("keys".into(), written.store.keys.into());
    d.insert("keys_with_ttl".into(), leased.into());
    d.insert("snapshot_term".into(), written.term.into());
    d.insert("snapshot_index".into(), written.index.into());
    d.insert("snapshot_json_in_place".into(), written.in_place.into());
    d.insert("proved_with_etcd_2_2_1".into(), proved.into());
    d.insert("read_ms".into(), read_ms.into());
    d.insert("write_ms".into(), write_ms.into());
    d.insert("fsync_ms".into(), fsync_ms.into());
    d.insert("readback_ms".into(), readback_ms.into());
    d.insert("swap_ms".into(), swap_ms.into());
    d.insert("backup".into(), backup.display().to_string().into());
    Ok(report)
}

/// What the reading thread saw besides the keys.
#[derive(Default)]
struct Produced {
    fp: Option<FingerprintBuilder>,
    leased: u64,
    orphan_leases: u64,
    unrepresentable: bool,
}

/// Keys passed from the reading thread: keys and values back to back in `bytes`, an error
/// (which ends the keys) last.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    items: Vec<BatchItem>,
    error: Option<mvcc::MvccError>,
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
struct Batches {
    full: std::sync::mpsc::Receiver<Batch>,
    free: std::sync::mpsc::Sender<Batch>,
    cur: Batch,
    /// Next item of `cur`, and where its bytes start.
    pos: usize,
    at: usize,
}

impl Iterator for Batches {
    type Item = Result<V2Key, mvcc::MvccError>;

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
    Bad(mvcc::MvccError),
    Gone,
}

impl From<mvcc::MvccError> for Stop {
    fn from(e: mvcc::MvccError) -> Stop {
        Stop::Bad(e)
    }
}

/// Adds one live v3 key to `batch` as a v2 key, or refuses it when a v2 store cannot hold it;
/// a leased key gets its lease's TTL from `now`.
fn add_v2_key(
    kv: KeyValueRef<'_>,
    prefix: &[u8],
    ttl_of: &HashMap<i64, i64>,
    now: SystemTime,
    seen: &mut Produced,
    batch: &mut Batch,
) -> Result<(), mvcc::MvccError> {
    let protobuf = kv.key.starts_with(prefix) && kv.value.starts_with(PROTOBUF_MAGIC);
    if protobuf || std::str::from_utf8(kv.value).is_err() || validate_key_path(kv.key).is_err() {
        seen.unrepresentable = true;
        return Err(mvcc::MvccError::MissingBucket(
            "a key a v2 store cannot hold".into(),
        ));
    }
    fail::fail_point!("to-etcd2-mid-write", |_| Err(
        mvcc::MvccError::MissingBucket("failpoint".into())
    ));
    let lease_ttl = (kv.lease != 0)
        .then(|| ttl_of.get(&kv.lease).copied())
        .flatten();
    if kv.lease != 0 && lease_ttl.is_none() {
        seen.orphan_leases += 1;
    }
    seen.leased += u64::from(lease_ttl.is_some());
    if let Some(fp) = seen.fp.as_mut() {
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
        expire: lease_ttl.map(|ttl| ExpireTime::after_ttl(now, ttl)),
        created_index: kv.create_revision.max(1) as u64,
        modified_index: kv.mod_revision.max(1) as u64,
    });
    Ok(())
}

/// Lets etcd `from` apply the WAL writes its backend lacks: one start on the private port and a
/// clean stop, as its own next start would do. Without `etcd-<from>` in the bundle the rollback
/// is refused, nothing changed.
async fn apply_wal_tail(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    lag: crate::datadir::UnappliedWrites,
) -> Result<(), StepError> {
    if ctx.bundle.optional(Tool::Etcd, from).is_none() {
        return Err(StepError::Refused(format!(
            "rollback to etcd2 refused, nothing was changed: {lag}. Put etcd-{from} in {} so that etcd-migrate lets it \
             apply them first, or start etcd {from} on {} once and stop it with SIGTERM; then roll back again",
            ctx.bundle.dir.display(),
            ctx.data_dir.display()
        )));
    }
    tracing::warn!(
        applied = lag.applied,
        last_write = lag.last_write,
        "{lag}; starting etcd-{from} once to apply them"
    );
    let mut srv = EtcdServer::start(ctx.launch_v3(ctx.config, ctx.data_dir, from))?;
    srv.ready().await?;
    srv.stop();
    Ok(())
}

/// Starts etcd-2.2.1 on the staged dir when it is bundled, and compares its keys with the source.
async fn prove_with_221(
    ctx: &Ctx<'_>,
    staged: &Path,
    source: Option<&Fingerprint>,
) -> Result<bool, StepError> {
    let bundled = ctx.bundle.optional(Tool::Etcd, ROLLBACK_ETCD2_VERSION);
    let (Some(_), Some(source)) = (bundled, source) else {
        tracing::info!(
            "etcd-2.2.1 is not bundled: the output was checked with our own readers only"
        );
        return Ok(false);
    };
    let mut srv = EtcdServer::start(Launch {
        bundle: ctx.bundle,
        config: ctx.config,
        data_dir: staged,
        version: ROLLBACK_ETCD2_VERSION,
        storage: Storage::Etcd2,
        serve_v2: true,
        snapshot_count: None,
        single_member: ctx.members == 1,
        bulk_txns: false,
    })?;
    let mut api = srv.ready().await?;
    let got = srv.fingerprint(&mut api).await?;
    srv.stop();
    // Key contents must agree; 2.2.1 may already have expired keys whose TTL ran out.
    if got.permanent_digest != source.permanent_digest || got.keys > source.keys {
        return Err(StepError::Verify {
            step: "rollback to 2.2.1".into(),
            what: format!(
                "etcd 2.2.1 serves {} keys ({} permanent), the v3 store had {} ({})",
                got.keys, got.permanent, source.keys, source.permanent
            ),
        });
    }
    tracing::info!(keys = got.keys, "etcd 2.2.1 serves the rolled-back data");
    Ok(true)
}
