//! Rollback 3.N -> 3.N-1: restore the member's backend with 3.N-1's tool (etcdutl for 3.5+) into
//! staging under the same name, peer URLs and initial cluster, prove that every revision came
//! through and that 3.N-1 serves it, then swap it in; the old dir becomes a backup.
//!
//! A backend etcd stopped cleanly holds every write, and it is what `snapshot save` would
//! stream: it is restored from the data dir itself (`--skip-hash-check`, read only), with no
//! start of 3.N. After an unclean stop (the WAL holds writes the backend lacks) 3.N is started
//! to apply them and a snapshot is saved from it, as etcd documents.
//!
//! The restored member gets new member and cluster ids (etcd's restore always does), which is
//! why a multi-member cluster cannot be rolled back member by member.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::etcd::ctl;
use crate::etcd::server::{EtcdServer, Stopped};
use crate::fsutil;
use crate::layout::{backend_of, member_of};
use crate::storage::keydigest::{KeyDigest, RevRange};
use crate::version::{EtcdVersion, Storage, VersionFile};

use super::backend::{self, Digested, PendingScan};
use super::{Baseline, Ctx, StepError, StepReport};
use crate::staging::Stage;

/// Where the snapshot to restore comes from.
pub(super) struct Source {
    pub(super) file: PathBuf,
    pub(super) copied_from_data_dir: bool,
    /// We have read the file's SHA-256 trailer and found it right: the tool need not read the
    /// whole file once more to check it (`--skip-hash-check` only skips that check; the tool
    /// still strips the trailer).
    pub(super) trailer_checked: bool,
    /// The stop of 3.N when it had to run to save one.
    pub(super) saved: Option<Stopped>,
    /// Restore as a cluster of this member alone (a restore from a backup after losing a
    /// majority), not with the initial cluster of the manifest.
    pub(super) alone: bool,
}

/// How long each stage took, for the journal.
struct Timings {
    save_ms: u64,
    restore_ms: u64,
    prove_ms: u64,
}

/// Rolls the data at `from` back to `to`.
pub async fn run(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    to: EtcdVersion,
    _baseline: Option<&Baseline>,
) -> Result<StepReport, StepError> {
    let db_size = clear_work(ctx, from)?;

    // 1. The snapshot: the backend itself, or one saved from 3.N.
    let t = Instant::now();
    let source = snapshot_source(
        ctx,
        from,
        &ctx.layout.member(),
        &ctx.layout.saved_snapshot(from),
    )
    .await?;
    let before = PendingScan::start(
        &source.file,
        RevRange::ALL,
        "reading the backend to roll back",
    )?;
    let save_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("minor-rollback-after-save");

    // 2. Restore with the older release's tool into staging, while the source is read.
    let t = Instant::now();
    let stage = Stage::begin(ctx.layout)?;
    restore_staged(ctx, to, &source, &stage, db_size).await?;
    let before = before.finish().await?;
    let restore_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("minor-rollback-after-restore");

    // 3. Every revision came through, and the older release serves it.
    let t = Instant::now();
    let (keys, proved) = prove(ctx, to, &stage.path, &before).await?;
    let prove_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("minor-rollback-before-swap");

    // 4. Swap in.
    let etcd3 = |version| VersionFile {
        version,
        storage: Storage::Etcd3,
    };
    let backup = stage.commit(etcd3(to), etcd3(from))?;
    fsutil::remove_tree(&ctx.layout.saved_snapshot(from))?;

    let timings = Timings {
        save_ms,
        restore_ms,
        prove_ms,
    };
    Ok(report(source, proved, before, keys, timings, &backup))
}

/// Clears what an earlier try left in the work dir and checks there is room for a saved
/// snapshot and a restored one. Returns the backend's size.
fn clear_work(ctx: &Ctx<'_>, from: EtcdVersion) -> Result<u64, StepError> {
    let work = ctx.work_dir();
    fsutil::create_dir_mode(&work, 0o700)?;
    fsutil::remove_tree(&ctx.layout.saved_snapshot(from))?;
    fsutil::remove_tree(&ctx.layout.restored())?;
    let db_size = std::fs::metadata(ctx.layout.backend())
        .map(|m| m.len())
        .unwrap_or(0);
    fsutil::ensure_space(&work, 2 * db_size)?;
    Ok(db_size)
}

/// Restores `source` with `to`'s tool as this member and moves the member into `stage`, durably.
pub(super) async fn restore_staged(
    ctx: &Ctx<'_>,
    to: EtcdVersion,
    source: &Source,
    stage: &Stage,
    db_size: u64,
) -> Result<(), StepError> {
    let restored = ctx.layout.restored();
    let restoring = ctl::snapshot_restore(
        ctx.bundle,
        ctx.config,
        to,
        &source.file,
        &restored,
        source.copied_from_data_dir || source.trailer_checked,
        source.alone,
    );
    let meter = crate::meter::Meter::file(
        "restoring the snapshot",
        backend_of(&restored),
        Some(db_size),
    );
    let restore_result = restoring.await;
    meter.finish();
    restore_result?;
    fsutil::rename_durable(&member_of(&restored), &stage.member())?;
    fsutil::remove_tree(&restored)?;
    fsutil::fsync_tree(&stage.path)?;
    Ok(())
}

/// The step's report: the backend's digest for the next step, what each stage took.
fn report(
    source: Source,
    proved: Stopped,
    before: KeyDigest,
    keys: u64,
    t: Timings,
    backup: &Path,
) -> StepReport {
    let mut report = StepReport {
        baseline: Some(Baseline::Backend(Digested {
            range: backend::closed(RevRange::ALL, &before),
            digest: before,
        })),
        keys: Some(keys),
        ..Default::default()
    };
    let d = &mut report.detail;
    if let Some(s) = source.saved {
        s.record(d);
    }
    proved.record(d);
    d.insert(
        "restored_from".into(),
        if source.copied_from_data_dir {
            "the backend (clean stop)"
        } else {
            "a snapshot saved by the newer release"
        }
        .into(),
    );
    d.insert("snapshot_save_ms".into(), t.save_ms.into());
    d.insert("snapshot_restore_ms".into(), t.restore_ms.into());
    d.insert("prove_ms".into(), t.prove_ms.into());
    d.insert("backup".into(), backup.display().to_string().into());
    report
}

/// The backend itself when it holds every write; else a snapshot saved from `from`, which
/// applies the WAL's tail when it starts.
async fn snapshot_source(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    member: &Path,
    saved_file: &Path,
) -> Result<Source, StepError> {
    let summary = crate::datadir::member_summary(member)?;
    let db = crate::storage::bbolt::Db::open(backend_of(ctx.data_dir))
        .map_err(|e| StepError::read("opening", member, e))?;
    let lag = crate::datadir::unapplied_writes(&summary, &db)
        .map_err(|e| StepError::read("reading the backend of", member, e))?;
    drop(db);
    let Some(lag) = lag else {
        tracing::info!("the backend holds every write (clean stop): restoring it directly");
        return Ok(Source {
            file: backend_of(ctx.data_dir),
            copied_from_data_dir: true,
            trailer_checked: false,
            saved: None,
            alone: false,
        });
    };
    tracing::warn!("{lag}; starting etcd-{from} to apply them and saving a snapshot from it");
    let mut srv = EtcdServer::start(ctx.launch_v3(ctx.config, ctx.data_dir, from))?;
    let api = srv.ready().await?;
    drop(api);
    let meter = crate::meter::Meter::file("saving a snapshot", saved_file.to_path_buf(), None);
    let saved = ctl::snapshot_save(ctx.bundle, ctx.config, from, &srv.client_url, saved_file).await;
    meter.finish();
    let stopped = srv.stop(None).await;
    saved?;
    Ok(Source {
        file: saved_file.to_path_buf(),
        copied_from_data_dir: false,
        trailer_checked: false,
        saved: Some(stopped),
        alone: false,
    })
}

/// Reads the restored backend (prepared before `to` starts on it) and compares it with the
/// source, then proves a write and a read with `to`. Returns the keys served.
pub(super) async fn prove(
    ctx: &Ctx<'_>,
    to: EtcdVersion,
    staged: &Path,
    before: &crate::storage::keydigest::KeyDigest,
) -> Result<(u64, Stopped), StepError> {
    let db = backend_of(staged);
    let after = PendingScan::start(&db, RevRange::ALL, "reading the restored backend")?;
    let mut srv = EtcdServer::start(ctx.launch_v3(ctx.config, staged, to))?;
    let after = after.finish().await?;
    let label = format!("{to}/etcd3 restored");
    backend::compare(
        &label,
        &Digested {
            range: backend::closed(RevRange::ALL, before),
            digest: *before,
        },
        &after,
    )?;
    let mut api = srv.ready().await?;
    let keys = srv.count_keys(&mut api).await?;
    let stopped = srv.stop(Some(api)).await;
    tracing::info!(keys, "etcd {to} serves the restored data");
    Ok((keys, stopped))
}
