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
use crate::etcd::server::{EtcdError, EtcdServer, Launch};
use crate::etcd::v2::{Entry, Tree, WalkError, V2};
use crate::etcd::v3::{LeasedPut, V3};
use crate::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::fsutil::{self, FsError};
use crate::release::Release;
use crate::version::{EtcdVersion, Storage, VersionFile};

use super::upgrade::{CUT_SNAPSHOT_COUNT, CUT_SNAPSHOT_WRITES};
use super::{verify_against, Baseline, Ctx, StepError, StepReport};
use crate::staging::Stage;

/// Transactions in flight while reattaching: etcd commits concurrent proposals in one fsync.
const IN_FLIGHT: usize = 16;
/// Bytes of keys and values per transaction, well under etcd's 1.5 MiB request limit.
const TXN_BYTES: usize = 1 << 20;

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

/// What the capture saw of the v2 store (the TTL keys themselves go to the capture file).
#[derive(Debug, Clone)]
pub struct Capture {
    pub captured_unix_ns: i128,
    /// TTL keys that get leases (written to the capture file, or kept by [`capture_from`]).
    pub ttl_keys: u64,
    pub v2_keys: u64,
    /// Empty directories: how many, and the first few by name.
    pub empty_dirs: u64,
    pub empty_dir_names: Vec<String>,
    /// Fingerprint of the v2 store as it is (keys with a TTL counted as expiring).
    pub v2: Fingerprint,
    /// Fingerprint of the v2 store with only the keys that will get leases counted as expiring.
    pub expected: Fingerprint,
    /// TTL keys left permanent (outside the TTL directory with --ttl-scope=directory).
    pub left_permanent: u64,
    /// TTL keys outside the TTL directory, whatever the scope.
    pub outside_ttl_dir: u64,
    /// TTL keys per prefix (first two path segments).
    pub ttl_by_prefix: BTreeMap<String, u64>,
    /// XXH3-64 of every v2 key, sorted: which v3 keys the v2 store no longer holds (8 bytes a
    /// key, where the keys themselves would be the store's size).
    pub key_hashes: Vec<u64>,
}

impl Capture {
    /// The capture's counts in a step's journal detail.
    fn record(&self, d: &mut crate::progress::Detail) {
        d.insert(
            "ttl_keys".into(),
            (self.ttl_keys + self.left_permanent).into(),
        );
        d.insert("ttl_keys_left_permanent".into(), self.left_permanent.into());
        d.insert(
            "ttl_keys_outside_ttl_dir".into(),
            self.outside_ttl_dir.into(),
        );
        let by_prefix: serde_json::Map<String, serde_json::Value> = self
            .ttl_by_prefix
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        d.insert("ttl_by_prefix".into(), by_prefix.into());
        d.insert("empty_dirs".into(), self.empty_dirs.into());
    }
}

/// Empty directories named in the log and journal, at most.
const EMPTY_DIRS_NAMED: usize = 20;

/// Capturing TTL keys, or reattaching them, failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("v2 key {key} has an unreadable expiration {expiration:?}")]
    BadExpiration { key: String, expiration: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {source}")]
    Encode {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    V3(#[from] crate::etcd::v3::V3Error),
    #[error("a transaction's task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Where captured TTL keys go.
pub trait CapturedSink {
    fn push(&mut self, key: Captured) -> Result<(), CaptureError>;
}

impl CapturedSink for Vec<Captured> {
    fn push(&mut self, key: Captured) -> Result<(), CaptureError> {
        Vec::push(self, key);
        Ok(())
    }
}

/// The capture file: one JSON line per TTL key, made durable when the capture ends.
pub struct CaptureFile(fsutil::DurableWriter);

impl CapturedSink for CaptureFile {
    fn push(&mut self, key: Captured) -> Result<(), CaptureError> {
        let mut line = serde_json::to_vec(&key).map_err(|source| CaptureError::Encode {
            path: self.0.path().to_path_buf(),
            source,
        })?;
        line.push(b'\n');
        Ok(self.0.write(&line)?)
    }
}

/// The capture as it is built, one v2 key at a time.
pub struct Capturing<K> {
    scope: TtlScope,
    ttl_dir: String,
    keys: K,
    v2: FingerprintBuilder,
    expected: FingerprintBuilder,
    summary: Capture,
}

impl<K: CapturedSink> Capturing<K> {
    pub fn new(scope: TtlScope, ttl_dir: &str, keys: K) -> Self {
        Capturing {
            scope,
            ttl_dir: ttl_dir.to_string(),
            keys,
            v2: FingerprintBuilder::default(),
            expected: FingerprintBuilder::default(),
            summary: Capture {
                captured_unix_ns: now_ns(),
                ttl_keys: 0,
                v2_keys: 0,
                empty_dirs: 0,
                empty_dir_names: Vec::new(),
                v2: FingerprintBuilder::default().finish(),
                expected: FingerprintBuilder::default().finish(),
                left_permanent: 0,
                outside_ttl_dir: 0,
                ttl_by_prefix: BTreeMap::new(),
                key_hashes: Vec::new(),
            },
        }
    }

    /// Takes one entry of the v2 store.
    pub fn add(&mut self, entry: Entry) -> Result<(), CaptureError> {
        let l = match entry {
            Entry::Leaf(l) => l,
            Entry::EmptyDir(d) => {
                self.summary.empty_dirs += 1;
                if self.summary.empty_dir_names.len() < EMPTY_DIRS_NAMED {
                    self.summary.empty_dir_names.push(d);
                }
                return Ok(());
            }
        };
        let s = &mut self.summary;
        s.v2_keys += 1;
        s.key_hashes
            .push(xxhash_rust::xxh3::xxh3_64(l.key.as_bytes()));
        crate::etcd::v2::add_leaf(&mut self.v2, &l);
        let mut leased = false;
        if let Some(exp) = &l.expiration {
            let expires_unix_ns = unix_ns(exp).ok_or_else(|| CaptureError::BadExpiration {
                key: l.key.clone(),
                expiration: exp.clone(),
            })?;
            *s.ttl_by_prefix.entry(prefix_of(&l.key)).or_insert(0) += 1;
            let inside = in_dir(&l.key, &self.ttl_dir);
            s.outside_ttl_dir += u64::from(!inside);
            if self.scope == TtlScope::All || inside {
                leased = true;
                s.ttl_keys += 1;
                self.keys.push(Captured {
                    key: l.key.clone(),
                    value: l.value.clone(),
                    created_index: l.created_index,
                    modified_index: l.modified_index,
                    expires_unix_ns,
                })?;
            } else {
                s.left_permanent += 1;
            }
        }
        // Leased keys are re-put, so only their content is comparable, not their revisions.
        self.expected.add(
            l.key.as_bytes(),
            l.value.as_bytes(),
            l.created_index,
            l.modified_index,
            leased,
        );
        Ok(())
    }

    /// The summary, and the sink of the captured keys.
    pub fn finish(self) -> (Capture, K) {
        let mut summary = self.summary;
        summary.v2 = self.v2.finish();
        summary.expected = self.expected.finish();
        summary.key_hashes.sort_unstable();
        (summary, self.keys)
    }
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

/// Builds the capture from a v2 tree in memory: which keys get leases under the scope, and the
/// fingerprint the v3 store must show afterwards.
pub fn capture_from(
    tree: &Tree,
    scope: TtlScope,
    ttl_dir: &str,
) -> Result<(Capture, Vec<Captured>), StepError> {
    let mut c = Capturing::new(scope, ttl_dir, Vec::new());
    let entries = tree
        .leaves
        .iter()
        .cloned()
        .map(Entry::Leaf)
        .chain(tree.empty_dirs.iter().cloned().map(Entry::EmptyDir));
    for e in entries {
        c.add(e)?;
    }
    Ok(c.finish())
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

/// Runs the whole storage migration at `at`, in named stages.
pub async fn run(
    ctx: &Ctx<'_>,
    from: VersionFile,
    at: EtcdVersion,
    cut_snapshot: bool,
    baseline: Option<&Baseline>,
) -> Result<StepReport, StepError> {
    let mut report = StepReport::default();
    fsutil::create_dir_mode(&ctx.work_dir(), 0o700)?;
    let label = format!("etcd-{at}");

    // 1. Read the source and write it staged: `etcdctl migrate` on a copy.
    let t = Instant::now();
    let (stage, migrate) = convert(ctx, at, &mut report.detail).await?;
    let (migrate_ms, tool_ms) = (ms(t), migrate.elapsed.as_millis() as u64);

    // 2. Capture over v2, on the staging dir, with v3 served too.
    let t = Instant::now();
    let mut srv = EtcdServer::start(Launch {
        serve_v2: true,
        snapshot_count: cut_snapshot.then_some(CUT_SNAPSHOT_COUNT),
        bulk_txns: true,
        ..ctx.launch_v3(ctx.config, &stage.path, at)
    })?;
    let mut api = srv.ready().await?;
    let Some(mut v3) = api.v3().cloned() else {
        return Err(StepError::NoV3Api { label });
    };
    let capture_path = ctx.layout.ttl_capture();
    let (capture, expired) =
        capture_checked(ctx, &srv.client_url, &mut v3, from, at, baseline).await?;
    let capture_ms = ms(t);
    log_capture(&capture, expired, capture_ms);
    fail::fail_point!("to-etcd3-after-capture");

    // 3. Reattach TTLs as leases, from the capture file.
    let t = Instant::now();
    let ops = Release::new(at).max_txn_ops(true);
    let keys = CaptureFileKeys(capture_path.clone());
    let attach = reattach(v3, &keys, ctx.config.ttl_granularity_secs, ops)
        .await
        .map_err(|source| StepError::Reattach {
            label: label.clone(),
            source,
        })?;
    let reattach_ms = ms(t);

    // 4. Prove: every key and value as the v2 store held it, TTL keys on leases.
    if cut_snapshot {
        srv.probe_writes(&mut api, CUT_SNAPSHOT_WRITES).await?;
    }
    let after = srv.fingerprint(&mut api).await?;
    srv.stop(Some(api)).await.record(&mut report.detail);
    prove(at, &capture, &after, &attach, reattach_ms)?;
    let outcome = VersionFile {
        version: at,
        storage: Storage::Etcd3,
    };
    if cut_snapshot && crate::datadir::member_facts(&stage.member())?.boot_cluster_version_v2 {
        return Err(StepError::NoSnapshotCut { at: outcome });
    }
    fail::fail_point!("to-etcd3-before-swap");

    // 5. Swap in.
    let t = Instant::now();
    let backup = stage.commit(outcome, from)?;
    fsutil::remove_tree(&capture_path)?;
    let d = &mut report.detail;
    capture.record(d);
    attach.record(d, expired);
    let timings = [
        ("etcdctl_migrate_ms", migrate_ms),
        ("etcdctl_migrate_tool_ms", tool_ms),
        ("capture_ms", capture_ms),
        ("reattach_ms", reattach_ms),
        ("swap_ms", ms(t)),
    ];
    Ok(finish_report(report, after, &timings, &backup))
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

/// The step's report: keys migrated, what each stage took, where the old dir went.
fn finish_report(
    mut report: StepReport,
    after: Fingerprint,
    timings: &[(&str, u64)],
    backup: &std::path::Path,
) -> StepReport {
    let d = &mut report.detail;
    d.insert("keys_migrated".into(), after.keys.into());
    for (name, ms) in timings {
        d.insert((*name).into(), (*ms).into());
    }
    d.insert("backup".into(), backup.display().to_string().into());
    report.keys = Some(after.keys);
    report.baseline = Some(Baseline::Keys(after));
    report
}

/// Stage 2: the capture, checked against the keys before the step (a single member's etcd2
/// data), and the keys that expired in v2 since `etcdctl migrate` copied them deleted in v3.
async fn capture_checked(
    ctx: &Ctx<'_>,
    client_url: &str,
    v3: &mut V3,
    from: VersionFile,
    at: EtcdVersion,
    baseline: Option<&Baseline>,
) -> Result<(Capture, u64), StepError> {
    let label = format!("etcd-{at}");
    let capture = capture(ctx, client_url, &ctx.layout.ttl_capture(), &label).await?;
    if ctx.members == 1 && from.storage == Storage::Etcd2 {
        let label = format!("{from} as read by {at}");
        verify_against(&label, baseline.and_then(Baseline::keys), &capture.v2)?;
    }
    let expired = delete_expired_since_migrate(v3, &capture.key_hashes)
        .await
        .map_err(|source| EtcdError::V3 { label, source })?;
    Ok((capture, expired))
}

/// Stage 1: the member dir copied into staging and converted there by `etcdctl migrate` (it
/// also creates the v3 backend that etcd 3.1+ insists on, etcd-io/etcd#9480). Records in
/// `detail` the largest child reaped by then (`etcdctl migrate`, or an earlier step's): the
/// journal tells which child a pod's memory limit would have to fit.
async fn convert(
    ctx: &Ctx<'_>,
    at: EtcdVersion,
    detail: &mut crate::progress::Detail,
) -> Result<(Stage, crate::etcd::process::ToolOutput), StepError> {
    let member = ctx.layout.member();
    fsutil::ensure_space(&ctx.work_dir(), fsutil::tree_size(&member)?)?;
    let stage = Stage::begin(ctx.layout)?;
    fsutil::copy_tree(&member, &stage.member())?;
    fail::fail_point!("to-etcd3-before-migrate");
    let migrate = ctl::migrate(ctx.bundle, ctx.config, at, &stage.path).await?;
    fail::fail_point!("to-etcd3-after-migrate");
    detail.insert(
        "children_peak_rss_mb_after_etcdctl_migrate".into(),
        crate::meter::children_peak_rss_mb().into(),
    );
    Ok((stage, migrate))
}

fn log_capture(capture: &Capture, expired: u64, elapsed_ms: u64) {
    tracing::info!(
        keys = capture.v2_keys,
        ttl_keys = capture.ttl_keys,
        left_permanent = capture.left_permanent,
        empty_dirs = capture.empty_dirs,
        expired_since_migrate = expired,
        elapsed_ms,
        "captured v2 keys and TTLs"
    );
    for (p, n) in &capture.ttl_by_prefix {
        tracing::info!(prefix = %p, ttl_keys = n, "keys with a TTL under prefix");
    }
    if let Some(first) = capture.empty_dir_names.first() {
        tracing::warn!(count = capture.empty_dirs, first = %first,
            "empty v2 directories are not migrated: etcd3 has no directories");
    }
}

/// Stage 4: the v3 store must hold every key and value the v2 store held, those with a TTL on
/// leases.
fn prove(
    at: EtcdVersion,
    capture: &Capture,
    after: &Fingerprint,
    attach: &Attached,
    reattach_ms: u64,
) -> Result<(), StepError> {
    if *after != capture.expected {
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
    Ok(())
}

/// Reads every v2 key in one streamed walk: the TTL keys that get leases into the capture file
/// (made durable), the rest into fingerprints and key hashes.
async fn capture(
    ctx: &Ctx<'_>,
    client_url: &str,
    path: &std::path::Path,
    label: &str,
) -> Result<Capture, StepError> {
    let cfg = ctx.config;
    let file = CaptureFile(fsutil::DurableWriter::create(path, 0o600)?);
    let capturing = Capturing::new(cfg.ttl_scope, &cfg.ttl_keys_directory, file);
    let v2 = V2::new(client_url, Duration::from_secs(60));
    let capturing = v2
        .walk(capturing, |c, e| c.add(e))
        .await
        .map_err(|e| match e {
            WalkError::V2(source) => StepError::Etcd(EtcdError::V2 {
                label: label.to_string(),
                source,
            }),
            WalkError::Visit(e) => StepError::Capture(e),
        })?;
    let (summary, file) = capturing.finish();
    file.0.commit()?;
    Ok(summary)
}

/// Deletes v3 keys that the v2 store no longer has: TTL keys that expired between `migrate`
/// (which made them permanent) and the capture. `v2_key_hashes` are the XXH3-64 of the v2
/// keys, sorted. Returns how many.
async fn delete_expired_since_migrate(
    v3: &mut V3,
    v2_key_hashes: &[u64],
) -> Result<u64, crate::etcd::v3::V3Error> {
    let mut gone = Vec::new();
    v3.for_each_key(|kv| {
        let in_v2 = v2_key_hashes
            .binary_search(&xxhash_rust::xxh3::xxh3_64(&kv.key))
            .is_ok();
        if !in_v2
            && !kv
                .key
                .starts_with(crate::fingerprint::PROBE_PREFIX.as_bytes())
        {
            gone.push(kv.key);
        }
    })
    .await?;
    if !gone.is_empty() {
        let named: Vec<String> = gone
            .iter()
            .take(5)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        tracing::info!(keys = gone.len(), first = ?named, "expired in v2 after migrate; removing them from v3 as well");
        v3.delete_many(&gone).await?;
    }
    Ok(gone.len() as u64)
}

/// Where reattaching reads the captured keys from. They are read twice: once for the TTL
/// buckets, once to put them.
pub trait CapturedKeys {
    fn read(
        &self,
    ) -> Result<Box<dyn Iterator<Item = Result<Captured, CaptureError>> + '_>, CaptureError>;
}

impl CapturedKeys for [Captured] {
    fn read(
        &self,
    ) -> Result<Box<dyn Iterator<Item = Result<Captured, CaptureError>> + '_>, CaptureError> {
        Ok(Box::new(self.iter().cloned().map(Ok)))
    }
}

impl CapturedKeys for Vec<Captured> {
    fn read(
        &self,
    ) -> Result<Box<dyn Iterator<Item = Result<Captured, CaptureError>> + '_>, CaptureError> {
        self.as_slice().read()
    }
}

/// The capture file written by the capture, read a line at a time.
pub struct CaptureFileKeys(pub std::path::PathBuf);

impl CapturedKeys for CaptureFileKeys {
    fn read(
        &self,
    ) -> Result<Box<dyn Iterator<Item = Result<Captured, CaptureError>> + '_>, CaptureError> {
        use std::io::BufRead;
        let path = &self.0;
        let f = std::fs::File::open(path).map_err(FsError::io("open", path))?;
        Ok(Box::new(
            std::io::BufReader::with_capacity(1 << 20, f)
                .lines()
                .map(move |l| {
                    let l = l.map_err(FsError::io("read", path))?;
                    serde_json::from_str(&l).map_err(|source| CaptureError::Encode {
                        path: path.clone(),
                        source,
                    })
                }),
        ))
    }
}

/// What reattaching did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attached {
    pub attached: u64,
    pub leases: u64,
    pub past_expiry: u64,
    pub changed_since_capture: u64,
}

impl Attached {
    /// The counts in a step's journal detail, with the keys that expired since `migrate`.
    fn record(&self, d: &mut crate::progress::Detail, expired: u64) {
        d.insert("ttl_keys_leased".into(), self.attached.into());
        d.insert("ttl_keys_past_expiry".into(), self.past_expiry.into());
        d.insert("expired_since_migrate".into(), expired.into());
        d.insert("leases_granted".into(), self.leases.into());
    }
}

/// Grants one lease per TTL bucket and re-puts each key with its lease, in transactions of at
/// most `max_ops` puts guarded by each key's mod revision (the v2 modified index, which
/// `etcdctl migrate` keeps), several in flight. Keys are streamed from `keys`: memory holds the
/// transactions in flight, not the keys.
pub async fn reattach(
    v3: V3,
    keys: &(impl CapturedKeys + ?Sized),
    granularity: u64,
    max_ops: usize,
) -> Result<Attached, CaptureError> {
    let now = now_ns();
    let mut out = Attached::default();
    let mut wanted = std::collections::BTreeSet::new();
    for k in keys.read()? {
        let k = k?;
        if k.expires_unix_ns <= now {
            out.past_expiry += 1;
        }
        wanted.insert(lease_ttl(k.expires_unix_ns, now, granularity));
    }
    let buckets = grant_leases(&v3, wanted).await?;
    out.leases = buckets.len() as u64;

    let mut set = JoinSet::new();
    let mut failed = Vec::new();
    let mut cur: Vec<LeasedPut> = Vec::new();
    let mut bytes = 0;
    let mut items = keys.read()?;
    loop {
        let next = items.next().transpose()?;
        let size = next.as_ref().map_or(0, |k| k.key.len() + k.value.len());
        let full = !cur.is_empty() && (cur.len() == max_ops || bytes + size > TXN_BYTES);
        if full || (next.is_none() && !cur.is_empty()) {
            while set.len() >= IN_FLIGHT {
                if let Some(joined) = set.join_next().await {
                    settle(joined, &mut out, &mut failed)?;
                }
            }
            let batch = std::mem::take(&mut cur);
            bytes = 0;
            let mut c = v3.clone();
            set.spawn(async move {
                fail::fail_point!("to-etcd3-mid-reattach");
                let r = c.put_with_leases_guarded(&batch).await;
                (batch, r)
            });
        }
        let Some(k) = next else { break };
        bytes += size;
        let ttl = lease_ttl(k.expires_unix_ns, now, granularity);
        cur.push((
            k.key.into_bytes(),
            k.value.into_bytes(),
            k.modified_index,
            buckets[&ttl],
        ));
    }
    while let Some(joined) = set.join_next().await {
        settle(joined, &mut out, &mut failed)?;
    }
    // A guard failed: someone changed a key since the capture. Redo those one by one.
    let mut v3 = v3;
    for batch in failed {
        for item in batch {
            if v3
                .put_with_leases_guarded(std::slice::from_ref(&item))
                .await?
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

/// A guarded transaction in flight came back: counts its keys, or keeps it to redo key by key.
type Joined =
    Result<(Vec<LeasedPut>, Result<bool, crate::etcd::v3::V3Error>), tokio::task::JoinError>;

fn settle(
    joined: Joined,
    out: &mut Attached,
    failed: &mut Vec<Vec<LeasedPut>>,
) -> Result<(), CaptureError> {
    let (batch, r) = joined?;
    match r? {
        true => out.attached += batch.len() as u64,
        false => failed.push(batch),
    }
    Ok(())
}

/// One lease per TTL, granted concurrently (each grant is a raft round trip): TTL -> lease id.
async fn grant_leases(
    v3: &V3,
    ttls: std::collections::BTreeSet<i64>,
) -> Result<BTreeMap<i64, i64>, CaptureError> {
    let mut buckets = BTreeMap::new();
    let mut grants = JoinSet::new();
    let mut pending = ttls.into_iter();
    loop {
        while grants.len() < IN_FLIGHT {
            let Some(ttl) = pending.next() else {
                break;
            };
            let mut c = v3.clone();
            grants.spawn(async move { (ttl, c.lease_grant(ttl).await) });
        }
        let Some(joined) = grants.join_next().await else {
            break;
        };
        let (ttl, id) = joined?;
        buckets.insert(ttl, id?);
    }
    Ok(buckets)
}

/// Time a single-step naive reattach (one put per key), for the benchmark's comparison.
pub async fn reattach_naive(
    mut v3: V3,
    keys: &[Captured],
    granularity: u64,
) -> Result<Duration, CaptureError> {
    let t = Instant::now();
    let now = now_ns();
    let mut leases: BTreeMap<i64, i64> = BTreeMap::new();
    for k in keys {
        let ttl = lease_ttl(k.expires_unix_ns, now, granularity);
        let lease = match leases.get(&ttl) {
            Some(l) => *l,
            None => {
                let l = v3.lease_grant(ttl).await?;
                leases.insert(ttl, l);
                l
            }
        };
        v3.put_with_lease(k.key.as_bytes(), k.value.as_bytes(), lease)
            .await?;
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
        let (all, all_keys) = capture_from(&tree, TtlScope::All, "/registry/events").unwrap();
        assert_eq!((all_keys.len(), all.ttl_keys), (3, 3));
        assert_eq!((all.empty_dirs, all.empty_dir_names.len()), (1, 1));
        assert_eq!(all.v2_keys, 4);
        assert_eq!(all.key_hashes.len(), 4);
        assert!(all.key_hashes.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(all.left_permanent, 0);
        assert_eq!((all.expected.keys, all.expected.permanent), (4, 1));
        let (dir, dir_keys) = capture_from(&tree, TtlScope::Directory, "/registry/events").unwrap();
        assert_eq!(
            dir_keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
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

    #[test]
    fn prove_accepts_exactly_the_store_the_capture_expects() {
        let tree = Tree {
            leaves: vec![
                leaf("/registry/events/e1", Some("2036-01-01T00:00:00Z")),
                leaf("/registry/pods/p1", None),
            ],
            empty_dirs: vec![],
        };
        let (capture, _) = capture_from(&tree, TtlScope::All, "/registry/events").unwrap();
        let attach = Attached {
            attached: 1,
            leases: 1,
            past_expiry: 0,
            changed_since_capture: 0,
        };
        let at: EtcdVersion = "3.4.23".parse().unwrap();
        prove(at, &capture, &capture.expected, &attach, 1).unwrap();
        // A key lost, or a TTL key left without its lease: the step fails, naming the counts.
        for after in [
            Fingerprint {
                keys: 1,
                ..capture.expected.clone()
            },
            Fingerprint {
                permanent: 2,
                ..capture.expected.clone()
            },
        ] {
            let e = prove(at, &capture, &after, &attach, 1).unwrap_err();
            assert!(matches!(e, StepError::Verify { .. }), "{e}");
            assert!(e.to_string().contains("v2 held 2"), "{e}");
        }
    }

    #[test]
    fn the_report_carries_keys_stage_timings_and_the_backup() {
        let fp = Fingerprint {
            keys: 7,
            permanent: 5,
            content: "c".into(),
            permanent_digest: "p".into(),
        };
        let timings = [("capture_ms", 3), ("swap_ms", 4)];
        let r = finish_report(
            StepReport::default(),
            fp.clone(),
            &timings,
            std::path::Path::new("/b/backup-x"),
        );
        assert_eq!(r.keys, Some(7));
        assert!(matches!(r.baseline, Some(Baseline::Keys(ref b)) if *b == fp));
        assert_eq!(r.detail["keys_migrated"], 7);
        assert_eq!(r.detail["capture_ms"], 3);
        assert_eq!(r.detail["swap_ms"], 4);
        assert_eq!(r.detail["backup"], "/b/backup-x");
    }

    #[test]
    fn the_capture_file_reads_back_what_was_captured() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ttl-capture.json");
        let keys = vec![
            Captured {
                key: "/registry/events/a".into(),
                value: "{\"x\":\"line\\nbreak\"}".into(),
                created_index: 3,
                modified_index: 4,
                expires_unix_ns: 1_000_000_000_123,
            },
            Captured {
                key: "/registry/events/b".into(),
                value: String::new(),
                created_index: 5,
                modified_index: 5,
                expires_unix_ns: -1,
            },
        ];
        let mut file = CaptureFile(fsutil::DurableWriter::create(&path, 0o600).unwrap());
        for k in &keys {
            CapturedSink::push(&mut file, k.clone()).unwrap();
        }
        assert!(!path.exists(), "visible before the capture is complete");
        file.0.commit().unwrap();
        let back: Vec<Captured> = CaptureFileKeys(path.clone())
            .read()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, keys);
        // Read twice, as reattaching does.
        assert_eq!(CaptureFileKeys(path).read().unwrap().count(), 2);
    }

    #[test]
    fn an_abandoned_capture_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ttl-capture.json");
        let mut file = CaptureFile(fsutil::DurableWriter::create(&path, 0o600).unwrap());
        CapturedSink::push(
            &mut file,
            Captured {
                key: "/k".into(),
                value: "v".into(),
                created_index: 1,
                modified_index: 1,
                expires_unix_ns: 0,
            },
        )
        .unwrap();
        drop(file);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
