//! etcd2 -> etcd3 at a 3.0-3.4 release, keeping every key's remaining TTL.
//!
//! 1. convert: copy the member dir to staging and run `etcdctl migrate` there (it also creates
//!    the v3 backend that etcd 3.1+ insists on for v2 data with snapshots, etcd-io/etcd#9480);
//! 2. capture: start the release once on the staging dir serving both APIs; read every key and
//!    its absolute expiry over v2 and save the capture durably in the work area. The v2 store
//!    is the truth: a key `migrate` copied that v2 has since expired is deleted from v3;
//! 3. reattach: grant one lease per TTL bucket and re-put each TTL key with its lease in
//!    batched transactions guarded by its mod revision (`migrate` keeps the v2 modified index),
//!    compare v3 with the capture, stop;
//! 4. swap the staging dir in, recording `<ver>/etcd3` in the same atomic exchange; the old dir
//!    becomes a backup.
//!
//! The live data is not touched before the swap, so a crash anywhere is redone from the start
//! on the next run with no TTL lost: v2 expiry times are absolute.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::config::TtlScope;
use crate::etcd::ctl;
use crate::etcd::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::etcd::release::Release;
use crate::etcd::server::{EtcdError, EtcdServer, Launch};
use crate::etcd::v2::{Tree, V2};
use crate::etcd::v3::{LeasedPut, V3};
use crate::fsutil;
use crate::version::{EtcdVersion, Storage, VersionFile};

use super::swap::Stage;
use super::upgrade::{CUT_SNAPSHOT_COUNT, CUT_SNAPSHOT_WRITES};
use super::{verify_against, Ctx, StepError, StepReport};

/// Transactions in flight while reattaching: etcd commits concurrent proposals in one fsync.
const IN_FLIGHT: usize = 16;
/// Bytes of keys and values per transaction, well under etcd's 1.5 MiB request limit.
const TXN_BYTES: usize = 1 << 20;
const CAPTURE_FILE: &str = "ttl-capture.json";

/// One key with a TTL, as captured over the v2 API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Captured {
    pub key: String,
    pub value: String,
    pub created_index: i64,
    pub modified_index: i64,
    /// Absolute expiry, unix nanoseconds.
    pub expires_unix_ns: i128,
}

/// The durable capture: TTL keys plus what the v2 store held, for the comparison after.
#[derive(Debug, Serialize, Deserialize)]
pub struct Capture {
    pub captured_unix_ns: i128,
    pub keys: Vec<Captured>,
    pub v2_keys: u64,
    pub empty_dirs: Vec<String>,
    /// Fingerprint of the v2 store with only the keys that will get leases counted as expiring.
    pub expected: Fingerprint,
    /// TTL keys left permanent (outside the TTL directory with --ttl-scope=directory).
    pub left_permanent: u64,
    /// TTL keys outside the TTL directory, whatever the scope.
    pub outside_ttl_dir: u64,
    /// TTL keys per prefix (first two path segments).
    pub ttl_by_prefix: BTreeMap<String, u64>,
}

fn prefix_of(key: &str) -> String {
    let mut parts = key.splitn(4, '/');
    let _ = parts.next();
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) if parts.next().is_some() => format!("/{a}/{b}"),
        (Some(a), _) => format!("/{a}"),
        _ => "/".into(),
    }
}

fn in_dir(key: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    key.len() > dir.len() && key.starts_with(dir) && key.as_bytes()[dir.len()] == b'/'
}

fn unix_ns(rfc3339: &str) -> Option<i128> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    Some(t.unix_timestamp_nanos())
}

fn now_ns() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
}

/// Builds the capture from a v2 tree: which keys get leases under the scope, and the fingerprint
/// the v3 store must show afterwards.
pub fn capture_from(tree: &Tree, scope: TtlScope, ttl_dir: &str) -> Result<Capture, StepError> {
    let mut keys = Vec::new();
    let mut expected = FingerprintBuilder::default();
    let mut left_permanent = 0;
    let mut outside_ttl_dir = 0;
    let mut ttl_by_prefix = BTreeMap::new();
    for l in &tree.leaves {
        let mut leased = false;
        if let Some(exp) = &l.expiration {
            let expires_unix_ns = unix_ns(exp).ok_or_else(|| {
                StepError::Other(format!(
                    "v2 key {} has an unreadable expiration {exp:?}",
                    l.key
                ))
            })?;
            *ttl_by_prefix.entry(prefix_of(&l.key)).or_insert(0) += 1;
            let inside = in_dir(&l.key, ttl_dir);
            outside_ttl_dir += u64::from(!inside);
            if scope == TtlScope::All || inside {
                leased = true;
                keys.push(Captured {
                    key: l.key.clone(),
                    value: l.value.clone(),
                    created_index: l.created_index,
                    modified_index: l.modified_index,
                    expires_unix_ns,
                });
            } else {
                left_permanent += 1;
            }
        }
        // Leased keys are re-put, so only their content is comparable, not their revisions.
        expected.add(
            l.key.as_bytes(),
            l.value.as_bytes(),
            l.created_index,
            l.modified_index,
            leased,
        );
    }
    Ok(Capture {
        captured_unix_ns: now_ns(),
        v2_keys: tree.leaves.len() as u64,
        empty_dirs: tree.empty_dirs.clone(),
        keys,
        expected: expected.finish(),
        left_permanent,
        outside_ttl_dir,
        ttl_by_prefix,
    })
}

/// TTL to grant for a key expiring at `expires` when it is `now`: the remaining time rounded
/// up to `granularity`; keys already past expiry get `granularity` (etcd raises it to its minimum).
pub fn lease_ttl(expires_ns: i128, now_ns: i128, granularity: u64) -> i64 {
    let g = granularity.max(1) as i128 * 1_000_000_000;
    let remaining = expires_ns - now_ns;
    if remaining <= 0 {
        return granularity.max(1) as i64;
    }
    (((remaining + g - 1) / g) * g / 1_000_000_000) as i64
}

/// Runs the whole storage migration at `at`.
pub async fn run(
    ctx: &Ctx<'_>,
    from: VersionFile,
    at: EtcdVersion,
    cut_snapshot: bool,
    baseline: Option<&Fingerprint>,
) -> Result<StepReport, StepError> {
    let cfg = ctx.config;
    let mut report = StepReport::default();
    let work = ctx.work_dir();
    fsutil::create_dir_mode(&work, 0o700)?;
    let label = format!("etcd-{at}");

    // 1. Convert in staging.
    let t = Instant::now();
    fsutil::ensure_space(&work, fsutil::tree_size(&ctx.data_dir.join("member"))?)?;
    let stage = Stage::begin(ctx.data_dir)?;
    fsutil::copy_tree(&ctx.data_dir.join("member"), &stage.member())?;
    fail::fail_point!("to-etcd3-before-migrate");
    let migrate = ctl::migrate(ctx.bundle, cfg, at, &stage.path).await?;
    let migrate_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("to-etcd3-after-migrate");

    // 2. Capture over v2, on the staging dir, with v3 served too.
    let t = Instant::now();
    let mut srv = EtcdServer::start(Launch {
        bundle: ctx.bundle,
        config: cfg,
        data_dir: &stage.path,
        version: at,
        storage: Storage::Etcd3,
        serve_v2: true,
        snapshot_count: cut_snapshot.then_some(CUT_SNAPSHOT_COUNT),
        single_member: ctx.members == 1,
        bulk_txns: true,
    })?;
    let mut api = srv.ready().await?;
    let mut v3 = api
        .v3()
        .ok_or_else(|| StepError::Other("expected the v3 API".into()))?
        .clone();
    let v2 = V2::new(&srv.client_url, Duration::from_secs(60));
    let tree = v2.tree().await.map_err(|source| EtcdError::V2 {
        label: label.clone(),
        source,
    })?;
    let v2_fp = crate::etcd::v2::fingerprint_of(&tree);
    if ctx.members == 1 && from.storage == Storage::Etcd2 {
        verify_against(&format!("{from} as read by {at}"), baseline, &v2_fp)?;
    }
    let capture = capture_from(&tree, cfg.ttl_scope, &cfg.ttl_keys_directory)?;
    let capture_path = work.join(CAPTURE_FILE);
    fsutil::write_durable(
        &capture_path,
        &serde_json::to_vec(&capture).unwrap_or_default(),
        0o600,
    )?;
    let expired = delete_expired_since_migrate(&mut v3, &tree)
        .await
        .map_err(|source| EtcdError::V3 {
            label: label.clone(),
            source,
        })?;
    drop(tree);
    let capture_ms = t.elapsed().as_millis() as u64;
    tracing::info!(
        keys = capture.v2_keys,
        ttl_keys = capture.keys.len(),
        left_permanent = capture.left_permanent,
        empty_dirs = capture.empty_dirs.len(),
        expired_since_migrate = expired,
        elapsed_ms = capture_ms,
        "captured v2 keys and TTLs"
    );
    for (p, n) in &capture.ttl_by_prefix {
        tracing::info!(prefix = %p, ttl_keys = n, "keys with a TTL under prefix");
    }
    if !capture.empty_dirs.is_empty() {
        tracing::warn!(count = capture.empty_dirs.len(), first = %capture.empty_dirs[0],
            "empty v2 directories are not migrated: etcd3 has no directories");
    }
    fail::fail_point!("to-etcd3-after-capture");

    // 3. Reattach.
    let t = Instant::now();
    let attach = reattach(
        v3,
        &capture.keys,
        cfg.ttl_granularity_secs,
        Release::new(at).max_txn_ops(true),
    )
    .await
    .map_err(|e| StepError::Other(format!("{label}: reattaching TTLs: {e}")))?;
    let reattach_ms = t.elapsed().as_millis() as u64;
    if cut_snapshot {
        srv.probe_writes(&mut api, CUT_SNAPSHOT_WRITES).await?;
    }
    let after = srv.fingerprint(&mut api).await?;
    srv.stop();
    if after != capture.expected {
        return Err(StepError::Verify {
            step: format!("storage migration at {at}"),
            what: format!(
                "v3 holds {} keys ({} permanent), v2 held {} ({} to stay permanent)",
                after.keys, after.permanent, capture.expected.keys, capture.expected.permanent
            ),
        });
    }
    tracing::info!(
        keys = after.keys,
        leased = attach.attached,
        leases = attach.leases,
        elapsed_ms = reattach_ms,
        "every key and value came through; TTL keys carry leases"
    );
    if cut_snapshot {
        let facts = crate::datadir::member_facts(&stage.member())?;
        if facts.boot_cluster_version_v2 {
            return Err(StepError::Other(format!(
                "the pass at {at} did not cut a snapshot"
            )));
        }
    }
    fail::fail_point!("to-etcd3-before-swap");

    // 4. Swap in.
    let t = Instant::now();
    let backup = stage.commit(
        VersionFile {
            version: at,
            storage: Storage::Etcd3,
        },
        from,
    )?;
    fsutil::remove_tree(&capture_path)?;
    let swap_ms = t.elapsed().as_millis() as u64;

    let d = &mut report.detail;
    d.insert("keys_migrated".into(), after.keys.into());
    d.insert(
        "ttl_keys".into(),
        (capture.keys.len() as u64 + capture.left_permanent).into(),
    );
    d.insert("ttl_keys_leased".into(), attach.attached.into());
    d.insert(
        "ttl_keys_left_permanent".into(),
        capture.left_permanent.into(),
    );
    d.insert(
        "ttl_keys_outside_ttl_dir".into(),
        capture.outside_ttl_dir.into(),
    );
    d.insert("ttl_keys_past_expiry".into(), attach.past_expiry.into());
    d.insert("expired_since_migrate".into(), expired.into());
    d.insert("leases_granted".into(), attach.leases.into());
    d.insert(
        "ttl_by_prefix".into(),
        serde_json::to_value(&capture.ttl_by_prefix).unwrap_or_default(),
    );
    d.insert("empty_dirs".into(), capture.empty_dirs.len().into());
    d.insert("etcdctl_migrate_ms".into(), migrate_ms.into());
    d.insert(
        "etcdctl_migrate_tool_ms".into(),
        (migrate.elapsed.as_millis() as u64).into(),
    );
    d.insert("capture_ms".into(), capture_ms.into());
    d.insert("reattach_ms".into(), reattach_ms.into());
    d.insert("swap_ms".into(), swap_ms.into());
    d.insert("backup".into(), backup.display().to_string().into());
    report.fingerprint = Some(after);
    Ok(report)
}

/// Deletes v3 keys that the v2 store no longer has: TTL keys that expired between `migrate`
/// (which made them permanent) and the capture. Returns how many.
async fn delete_expired_since_migrate(
    v3: &mut V3,
    tree: &Tree,
) -> Result<u64, crate::etcd::v3::V3Error> {
    let mut v2_keys = tree.leaves.iter().map(|l| l.key.as_bytes()).peekable();
    let mut gone = Vec::new();
    v3.for_each_key(|kv| {
        while v2_keys.peek().is_some_and(|k| *k < kv.key.as_slice()) {
            v2_keys.next();
        }
        let in_v2 = v2_keys.peek().is_some_and(|k| *k == kv.key.as_slice());
        if !in_v2
            && !kv
                .key
                .starts_with(crate::etcd::fingerprint::PROBE_PREFIX.as_bytes())
        {
            gone.push(kv.key);
        }
    })
    .await?;
    for k in &gone {
        tracing::info!(key = %String::from_utf8_lossy(k), "expired in v2 after migrate; removed from v3 as well");
        v3.delete(k).await?;
    }
    Ok(gone.len() as u64)
}

/// What reattaching did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attached {
    pub attached: u64,
    pub leases: u64,
    pub past_expiry: u64,
    pub changed_since_capture: u64,
}

/// Grants one lease per TTL bucket and re-puts each key with its lease, in transactions of at
/// most `max_ops` puts guarded by each key's mod revision (the v2 modified index, which
/// `etcdctl migrate` keeps), several in flight.
pub async fn reattach(
    mut v3: V3,
    keys: &[Captured],
    granularity: u64,
    max_ops: usize,
) -> Result<Attached, String> {
    let now = now_ns();
    let mut out = Attached::default();
    let mut ttls = Vec::with_capacity(keys.len());
    let mut wanted = std::collections::BTreeSet::new();
    for k in keys {
        let ttl = lease_ttl(k.expires_unix_ns, now, granularity);
        if k.expires_unix_ns <= now {
            out.past_expiry += 1;
        }
        ttls.push(ttl);
        wanted.insert(ttl);
    }
    // One lease per TTL bucket, granted concurrently (each grant is a raft round trip).
    let mut buckets: BTreeMap<i64, i64> = BTreeMap::new();
    let mut grants = JoinSet::new();
    let mut pending_ttls = wanted.into_iter();
    loop {
        while grants.len() < IN_FLIGHT {
            let Some(ttl) = pending_ttls.next() else {
                break;
            };
            let mut c = v3.clone();
            grants.spawn(async move { (ttl, c.lease_grant(ttl).await) });
        }
        let Some(joined) = grants.join_next().await else {
            break;
        };
        let (ttl, id) = joined.map_err(|e| e.to_string())?;
        buckets.insert(ttl, id.map_err(|e| e.to_string())?);
    }
    out.leases = buckets.len() as u64;

    let mut batches: Vec<Vec<LeasedPut>> = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for (k, ttl) in keys.iter().zip(&ttls) {
        let size = k.key.len() + k.value.len();
        if !cur.is_empty() && (cur.len() == max_ops || bytes + size > TXN_BYTES) {
            batches.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push((
            k.key.clone().into_bytes(),
            k.value.clone().into_bytes(),
            k.modified_index,
            buckets[ttl],
        ));
    }
    if !cur.is_empty() {
        batches.push(cur);
    }

    let mut set = JoinSet::new();
    let mut pending = batches.into_iter();
    let mut failed = Vec::new();
    loop {
        while set.len() < IN_FLIGHT {
            let Some(batch) = pending.next() else { break };
            let mut c = v3.clone();
            set.spawn(async move {
                fail::fail_point!("to-etcd3-mid-reattach");
                let r = c.put_with_leases_guarded(&batch).await;
                (batch, r)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (batch, r) = joined.map_err(|e| e.to_string())?;
        match r.map_err(|e| e.to_string())? {
            true => out.attached += batch.len() as u64,
            false => failed.push(batch),
        }
    }
    // A guard failed: someone changed a key since the capture. Redo those one by one.
    for batch in failed {
        for item in batch {
            if v3
                .put_with_leases_guarded(std::slice::from_ref(&item))
                .await
                .map_err(|e| e.to_string())?
            {
                out.attached += 1;
            } else {
                out.changed_since_capture += 1;
                tracing::warn!(key = %String::from_utf8_lossy(&item.0), "key changed since the capture; left as it is");
            }
        }
    }
    Ok(out)
}

/// Time a single-step naive reattach (one put per key), for the benchmark's comparison.
pub async fn reattach_naive(
    mut v3: V3,
    keys: &[Captured],
    granularity: u64,
) -> Result<Duration, String> {
    let t = Instant::now();
    let now = now_ns();
    let mut leases: BTreeMap<i64, i64> = BTreeMap::new();
    for k in keys {
        let ttl = lease_ttl(k.expires_unix_ns, now, granularity);
        let lease = match leases.get(&ttl) {
            Some(l) => *l,
            None => {
                let l = v3.lease_grant(ttl).await.map_err(|e| e.to_string())?;
                leases.insert(ttl, l);
                l
            }
        };
        v3.put_with_lease(k.key.as_bytes(), k.value.as_bytes(), lease)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(t.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::v2::Leaf;

    #[test]
    fn lease_ttl_rounds_up_to_the_granularity_and_floors_at_it() {
        let s = 1_000_000_000i128;
        assert_eq!(lease_ttl(100 * s, 0, 1), 100);
        assert_eq!(lease_ttl(100 * s + 1, 0, 1), 101);
        assert_eq!(lease_ttl(99 * s + s / 2, 0, 1), 100);
        assert_eq!(lease_ttl(61 * s, 0, 60), 120);
        assert_eq!(lease_ttl(60 * s, 0, 60), 60);
        assert_eq!(lease_ttl(-5 * s, 0, 1), 1, "past expiry gets the minimum");
        assert_eq!(lease_ttl(0, 0, 10), 10);
    }

    fn leaf(key: &str, exp: Option<&str>) -> Leaf {
        Leaf {
            key: key.into(),
            value: "v".into(),
            created_index: 1,
            modified_index: 2,
            expiration: exp.map(Into::into),
            ttl: None,
        }
    }

    #[test]
    fn scope_decides_which_ttl_keys_get_leases() {
        let tree = Tree {
            leaves: vec![
                leaf("/other/x", Some("2036-01-01T00:00:00Z")),
                leaf(
                    "/registry/events/default/e1",
                    Some("2036-01-01T00:00:00.5Z"),
                ),
                leaf("/registry/eventsx/e", Some("2036-01-01T00:00:00Z")),
                leaf("/registry/pods/p1", None),
            ],
            empty_dirs: vec!["/registry/emptydir".into()],
        };
        let all = capture_from(&tree, TtlScope::All, "/registry/events").unwrap();
        assert_eq!(all.keys.len(), 3);
        assert_eq!(all.left_permanent, 0);
        assert_eq!((all.expected.keys, all.expected.permanent), (4, 1));
        let dir = capture_from(&tree, TtlScope::Directory, "/registry/events").unwrap();
        assert_eq!(
            dir.keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["/registry/events/default/e1"]
        );
        assert_eq!(
            dir.left_permanent, 2,
            "/registry/eventsx is not inside /registry/events"
        );
        assert_eq!((all.outside_ttl_dir, dir.outside_ttl_dir), (2, 2));
        assert_eq!((dir.expected.keys, dir.expected.permanent), (4, 3));
        assert_eq!(dir.ttl_by_prefix.get("/registry/events"), Some(&1));
        assert_eq!(dir.ttl_by_prefix.get("/other"), Some(&1));
        assert_eq!(
            all.expected.content, dir.expected.content,
            "the content digest ignores leases"
        );
        assert_ne!(all.expected.permanent_digest, dir.expected.permanent_digest);
    }
}
