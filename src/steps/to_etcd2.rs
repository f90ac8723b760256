//! Rollback 3.0.x/etcd3 -> 2.2.1/etcd2, written natively and offline, in named stages:
//!
//! 1. read the source: identity and raft position from the old WAL/snapshot, the backend's
//!    live keys (newest revision per key, tombstones dropped) and lease TTLs, with our own
//!    bbolt reader; a backend behind its WAL is first brought up to date by its own release;
//! 2. write staged: a v2 store snapshot and a fresh WAL (metadata and a snapshot record), what
//!    etcd 2.2.1 restarts from, in staging ([`crate::storage::v2export`] streams the keys);
//! 3. read back what was written with our own readers;
//! 4. prove it with etcd 2.2.1 when the image has one;
//! 5. swap it in; the old dir becomes a backup.
//!
//! Memory: the key index (keys and revisions, no values) plus a few batches of values.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Instant, SystemTime};

use crate::etcd::server::{EtcdServer, Launch, Stopped};
use crate::fingerprint::{Fingerprint, FingerprintBuilder};
use crate::fsutil;
use crate::layout::{backend_of, Layout};
use crate::plan::ROLLBACK_ETCD2_VERSION;
use crate::release::Tool;
use crate::staging::Stage;
use crate::storage::bbolt::Db;
use crate::storage::mvcc::{self, LiveIndex};
use crate::storage::v2export::{self, Exported};
use crate::storage::v2member::{write_v2_member, V2MemberError, V2MemberParams, V2MemberWritten};
use crate::storage::v2store::V2StoreError;
use crate::storage::walinfo::MemberSummary;
use crate::version::{EtcdVersion, Storage, VersionFile};

use super::{verify_against, Baseline, Ctx, Refusal, StepError, StepReport};

/// Refuses before anything is touched when the data cannot become a v2 store.
pub fn refuse_unrepresentable(layout: &Layout, prefix: &str) -> Result<(), Refusal> {
    let found = Db::open(layout.backend())
        .map_err(mvcc::MvccError::from)
        .and_then(|db| v2export::check_representable(&db, prefix))
        .map_err(|source| Refusal::Unreadable {
            member: layout.member(),
            source,
        })?;
    if found.is_empty() {
        return Ok(());
    }
    Err(Refusal::Unrepresentable {
        prefix: prefix.to_string(),
        found,
    })
}

/// Runs the native rollback of `from` (3.0.x/etcd3) to 2.2.1/etcd2.
pub async fn run(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    baseline: Option<&Baseline>,
) -> Result<StepReport, StepError> {
    let t0 = Instant::now();
    let mut stops = Vec::new();
    let source = read_source(ctx, from, &mut stops).await?;
    let read_ms = t0.elapsed().as_millis() as u64;

    let t = Instant::now();
    let stage = Stage::begin(ctx.layout)?;
    // A minor rollback before this step leaves a digest of the backend, not of the live keys:
    // it proved its own output, and this step reads that same backend.
    let baseline = baseline.and_then(Baseline::keys);
    let staged = write_staged(ctx, from, &source, &stage, baseline).await?;
    let write_ms = t.elapsed().as_millis() as u64;

    let t = Instant::now();
    read_back(&stage, &staged.written, &source.summary)?;
    let readback_ms = t.elapsed().as_millis() as u64;
    let proved = prove_with_221(ctx, &stage.path, staged.fingerprint.as_ref()).await?;
    stops.extend(proved);
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
    let w = &staged.written;
    tracing::info!(keys = w.store.keys, leased = staged.leased, snapshot = %w.snap_path.display(), term = w.term,
        index = w.index, "wrote a 2.2.1 v2 store snapshot and WAL");

    let mut report = StepReport {
        baseline: staged.fingerprint.clone().map(Baseline::Keys),
        ..Default::default()
    };
    let d = &mut report.detail;
    stops.iter().for_each(|s| s.record(d));
    d.insert("keys".into(), w.store.keys.into());
    d.insert("keys_with_ttl".into(), staged.leased.into());
    d.insert("snapshot_term".into(), w.term.into());
    d.insert("snapshot_index".into(), w.index.into());
    d.insert("snapshot_json_in_place".into(), w.in_place.into());
    d.insert("proved_with_etcd_2_2_1".into(), proved.is_some().into());
    d.insert("read_ms".into(), read_ms.into());
    d.insert("write_ms".into(), write_ms.into());
    d.insert("fsync_ms".into(), staged.fsync_ms.into());
    d.insert("readback_ms".into(), readback_ms.into());
    d.insert("swap_ms".into(), swap_ms.into());
    d.insert("backup".into(), backup.display().to_string().into());
    Ok(report)
}

/// What the rollback reads before it writes anything.
struct SourceData {
    summary: MemberSummary,
    params: V2MemberParams,
    db: Db,
    index: LiveIndex,
    ttl_of: HashMap<i64, i64>,
    db_size: u64,
}

/// Stage 1: the member's identity, raft position and members from the WAL, and the backend's
/// live keys and leases. A backend behind its WAL (etcd killed) is first brought up to date by
/// its own release, or the rollback is refused.
async fn read_source(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    stops: &mut Vec<Stopped>,
) -> Result<SourceData, StepError> {
    let member = ctx.layout.member();
    let wal = |e| StepError::read("reading the WAL of", &member, e);
    let mut summary = crate::datadir::member_summary(&member).map_err(wal)?;
    if summary.member_count > 1 {
        return Err(StepError::ClusterOfMany {
            member,
            members: summary.member_count,
        });
    }
    if let Some(lag) = unapplied(&member, &summary)? {
        stops.push(apply_wal_tail(ctx, from, lag).await?);
        summary = crate::datadir::member_summary(&member).map_err(wal)?;
        if let Some(lag) = unapplied(&member, &summary)? {
            return Err(StepError::BackendNotCommitted {
                release: from,
                data_dir: ctx.data_dir.to_path_buf(),
                lag,
            });
        }
    }
    let db_path = backend_of(ctx.data_dir);
    let db =
        Db::open(&db_path).map_err(|e| StepError::read("opening the backend of", &member, e))?;
    let ttl_of = mvcc::leases(&db)
        .map_err(|e| StepError::read("reading leases of", &member, e))?
        .into_iter()
        .map(|l| (l.id, l.ttl))
        .collect();
    let index =
        LiveIndex::build(&db).map_err(|e| StepError::read("indexing keys of", &member, e))?;
    let db_size = std::fs::metadata(&db_path).map(|m| m.len()).unwrap_or(0);
    let params = member_params(ctx, &summary, &index, db_size);
    Ok(SourceData {
        summary,
        params,
        db,
        index,
        ttl_of,
        db_size,
    })
}

/// Whether the backend lacks writes its WAL holds.
fn unapplied(
    member: &Path,
    summary: &MemberSummary,
) -> Result<Option<crate::datadir::UnappliedWrites>, StepError> {
    let db = Db::open(member.join("snap/db"))
        .map_err(|e| StepError::read("opening the backend of", member, e))?;
    crate::datadir::unapplied_writes(summary, &db)
        .map_err(|e| StepError::read("reading the backend of", member, e))
}

/// The v2 member's identity and raft position: the source's, this member's name and peer URLs
/// filled in where the WAL lacks them.
fn member_params(
    ctx: &Ctx<'_>,
    summary: &MemberSummary,
    index: &LiveIndex,
    db_size: u64,
) -> V2MemberParams {
    let term = summary
        .hard_state
        .as_ref()
        .map(|h| h.term)
        .unwrap_or(summary.last_term)
        .max(summary.last_term)
        .max(1);
    let mut members = summary.member_info.clone();
    for m in members.iter_mut().filter(|m| m.id == summary.node_id) {
        if m.name.is_empty() {
            m.name = ctx.config.member.name.clone();
        }
        if m.peer_urls.is_empty() {
            m.peer_urls = ctx
                .config
                .member
                .advertise_peer_urls
                .split(',')
                .map(str::to_string)
                .collect();
        }
    }
    let mut params = V2MemberParams::new(
        summary.node_id,
        summary.cluster_id,
        members,
        term,
        summary.last_index,
    );
    params.min_store_index = index
        .newest_revision()
        .map(|r| r.main.max(0) as u64)
        .unwrap_or(0);
    // The JSON is about as large as the backend: right for the snapshot header's length as a
    // rule, so the JSON is written once.
    params.store_size_hint = db_size;
    params
}

/// What stage 2 wrote.
struct Staged {
    written: V2MemberWritten,
    /// What was read, when something compares it (the step before, or etcd 2.2.1).
    fingerprint: Option<Fingerprint>,
    leased: u64,
    fsync_ms: u64,
}

/// Stage 2: the v2 member in staging, the keys streamed from the backend; refused (staging
/// removed, nothing else touched) when a key cannot be a v2 key.
async fn write_staged(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    source: &SourceData,
    stage: &Stage,
    baseline: Option<&Fingerprint>,
) -> Result<Staged, StepError> {
    fsutil::ensure_space(&ctx.work_dir(), 2 * source.db_size)?;
    // The fingerprint hashes every value: built only when something compares it.
    let etcd_221 = ctx
        .bundle
        .optional(Tool::Etcd, ROLLBACK_ETCD2_VERSION)
        .is_some();
    let compare_with_before = baseline.is_some() && ctx.members == 1;
    let export = v2export::Source {
        db: &source.db,
        index: &source.index,
        ttl_of: &source.ttl_of,
        prefix: ctx.config.data_prefix.as_bytes(),
        now: SystemTime::now(),
        fingerprint: compare_with_before || etcd_221,
    };
    fail::fail_point!("to-etcd2-before-write");
    let (result, seen) = v2export::export(export, |keys| {
        write_v2_member(&stage.member(), &source.params, keys)
    });
    let seen = seen.ok_or(StepError::ThreadPanicked {
        what: "reading the v3 store",
    })?;
    let written = match result {
        Ok(w) => w,
        Err(e) => return Err(refuse_or_fail(ctx, stage, &seen, e)?),
    };
    let t = Instant::now();
    fsutil::fsync_tree(&stage.path)?;
    let fsync_ms = t.elapsed().as_millis() as u64;
    let fingerprint = seen.fingerprint.map(FingerprintBuilder::finish);
    if let (Some(fp), true) = (&fingerprint, compare_with_before) {
        verify_against(&format!("{from}/etcd3 read offline"), baseline, fp)?;
    }
    if seen.orphan_leases > 0 {
        tracing::warn!(
            keys = seen.orphan_leases,
            "keys name a lease that is gone; they are written without a TTL"
        );
    }
    Ok(Staged {
        written,
        fingerprint,
        leased: seen.leased,
        fsync_ms,
    })
}

/// A write that stopped on a key no v2 store can hold is a refusal naming everything that is
/// wrong (a second scan, on this path only); any other failure fails the step.
fn refuse_or_fail(
    ctx: &Ctx<'_>,
    stage: &Stage,
    seen: &Exported,
    e: V2MemberError,
) -> Result<StepError, StepError> {
    let member = ctx.layout.member();
    let unrepresentable = seen.unrepresentable
        || matches!(
            e,
            V2MemberError::Store(V2StoreError::InvalidKey { .. } | V2StoreError::Conflict { .. })
        );
    if !unrepresentable {
        return Ok(StepError::V2Write { member, source: e });
    }
    fsutil::remove_tree(&stage.path)?;
    let prefix = ctx.config.data_prefix.clone();
    let found = Db::open(ctx.layout.backend())
        .map_err(mvcc::MvccError::from)
        .and_then(|db| v2export::check_representable(&db, &prefix))
        .map_err(|e| StepError::read("reading", &member, e))?;
    Ok(StepError::Refused(if found.is_empty() {
        Refusal::V2Store { source: e }
    } else {
        Refusal::Unrepresentable { prefix, found }
    }))
}

/// Stage 3: what was written, read back with our own readers: the snapshot file's CRC and
/// metadata (streamed), and the WAL's ids and snapshot marker.
fn read_back(
    stage: &Stage,
    written: &V2MemberWritten,
    summary: &MemberSummary,
) -> Result<(), StepError> {
    let member = stage.member();
    let (md, _) = crate::storage::snap::stream_snap_file(&written.snap_path, |_| ())
        .map_err(|e| StepError::read("reading back the snapshot written for", &member, e))?;
    let wal = crate::storage::wal::read_wal(
        &member.join("wal"),
        &crate::storage::raftpb::WalSnapshot {
            index: md.index,
            term: md.term,
            conf_state: None,
        },
    )
    .map_err(|e| StepError::read("reading back the WAL written for", &member, e))?;
    let ids = wal.metadata.as_ref().map(|m| (m.node_id, m.cluster_id));
    if (md.index, md.term) != (written.index, written.term)
        || !wal.start_matched
        || ids != Some((summary.node_id, summary.cluster_id))
    {
        return Err(StepError::ReadBack {
            term: md.term,
            index: md.index,
            marker: wal.start_matched,
            ids,
        });
    }
    Ok(())
}

/// Lets etcd `from` apply the WAL writes its backend lacks: one start on the private port and a
/// clean stop, as its own next start would do. Without `etcd-<from>` in the bundle the rollback
/// is refused, nothing changed.
async fn apply_wal_tail(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    lag: crate::datadir::UnappliedWrites,
) -> Result<Stopped, StepError> {
    if ctx.bundle.optional(Tool::Etcd, from).is_none() {
        return Err(StepError::Refused(Refusal::WalTail {
            lag,
            release: from,
            bin_dir: ctx.bundle.dir.clone(),
            data_dir: ctx.data_dir.to_path_buf(),
        }));
    }
    tracing::warn!(
        applied = lag.applied,
        last_write = lag.last_write,
        "{lag}; starting etcd-{from} once to apply them"
    );
    let mut srv = EtcdServer::start(ctx.launch_v3(ctx.config, ctx.data_dir, from))?;
    let api = srv.ready().await?;
    Ok(srv.stop(Some(api)).await)
}

/// Stage 4: starts etcd-2.2.1 on the staged dir when it is bundled, and compares its keys with
/// the source.
async fn prove_with_221(
    ctx: &Ctx<'_>,
    staged: &Path,
    source: Option<&Fingerprint>,
) -> Result<Option<Stopped>, StepError> {
    let bundled = ctx.bundle.optional(Tool::Etcd, ROLLBACK_ETCD2_VERSION);
    let (Some(_), Some(source)) = (bundled, source) else {
        tracing::info!(
            "etcd-2.2.1 is not bundled: the output was checked with our own readers only"
        );
        return Ok(None);
    };
    let mut srv = EtcdServer::start(Launch {
        storage: Storage::Etcd2,
        serve_v2: true,
        ..ctx.launch_v3(ctx.config, staged, ROLLBACK_ETCD2_VERSION)
    })?;
    let mut api = srv.ready().await?;
    let got = srv.fingerprint(&mut api).await?;
    let stopped = srv.stop(Some(api)).await;
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
    Ok(Some(stopped))
}

#[cfg(test)]
mod tests {
    use super::super::fixture::Member;
    use super::*;

    fn v3017() -> EtcdVersion {
        "3.0.17".parse().unwrap()
    }

    /// Live keys in a fixture's keys.json.
    fn listed_keys(name: &str) -> u64 {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../shared/fixtures/{name}.keys.json"));
        let listed: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        listed.len() as u64
    }

    #[tokio::test]
    async fn read_source_write_staged_and_read_back_a_real_3_0_17_member() {
        let m = Member::unpack("etcd-3.0.17-v3");
        let ctx = m.ctx();
        let mut stops = Vec::new();
        let source = read_source(&ctx, v3017(), &mut stops).await.unwrap();
        assert!(stops.is_empty(), "a cleanly stopped member needs no etcd");
        assert_eq!(source.summary.member_count, 1);
        assert_eq!(source.params.node_id, source.summary.node_id);

        let stage = Stage::begin(&m.layout).unwrap();
        let staged = write_staged(&ctx, v3017(), &source, &stage, None)
            .await
            .unwrap();
        let want = listed_keys("etcd-3.0.17-v3");
        assert_eq!(staged.written.store.keys, want);
        assert!(staged.leased > 0, "events and masterleases keep their TTLs");
        assert!(staged.fingerprint.is_none(), "nothing compares it here");
        read_back(&stage, &staged.written, &source.summary).unwrap();

        // A WAL whose ids are not the source's is caught by the read-back.
        let mut other = source.summary.clone();
        other.cluster_id ^= 1;
        let e = read_back(&stage, &staged.written, &other).unwrap_err();
        assert!(matches!(e, StepError::ReadBack { marker: true, .. }), "{e}");
    }

    #[tokio::test]
    async fn write_staged_checks_the_keys_against_the_step_before() {
        let m = Member::unpack("etcd-3.0.17-v3");
        let ctx = m.ctx();
        let source = read_source(&ctx, v3017(), &mut Vec::new()).await.unwrap();
        let stage = Stage::begin(&m.layout).unwrap();
        let wrong = Fingerprint {
            keys: 1,
            permanent: 1,
            content: "0".repeat(32),
            permanent_digest: "0".repeat(32),
        };
        let e = write_staged(&ctx, v3017(), &source, &stage, Some(&wrong))
            .await
            .err()
            .expect("a baseline that differs fails the step");
        assert!(matches!(e, StepError::Verify { .. }), "{e}");
    }

    #[tokio::test]
    async fn write_staged_refuses_protobuf_values_and_removes_staging() {
        let m = Member::unpack("etcd-3.0.17-v3-protobuf");
        let ctx = m.ctx();
        let source = read_source(&ctx, v3017(), &mut Vec::new()).await.unwrap();
        let stage = Stage::begin(&m.layout).unwrap();
        let e = write_staged(&ctx, v3017(), &source, &stage, None)
            .await
            .err()
            .expect("protobuf values cannot be v2 values");
        assert!(
            matches!(e, StepError::Refused(Refusal::Unrepresentable { .. })),
            "{e}"
        );
        assert!(!stage.path.exists(), "staging is removed on a refusal");
        assert!(refuse_unrepresentable(&m.layout, "/registry").is_err());
    }
}
