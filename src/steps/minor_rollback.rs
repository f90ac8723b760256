//! Rollback 3.N -> 3.N-1: snapshot save with 3.N, snapshot restore with 3.N-1's tool (etcdutl
//! for 3.5+) into staging under the same name, peer URLs and initial cluster, start 3.N-1 on it
//! to prove it serves the same keys, then swap it in; the old dir becomes a backup.
//! The restored member gets new member and cluster ids (etcd's restore always does), which is
//! why a multi-member cluster cannot be rolled back member by member.

use std::time::Instant;

use crate::etcd::ctl;
use crate::etcd::fingerprint::Fingerprint;
use crate::etcd::server::EtcdServer;
use crate::fsutil;
use crate::version::{EtcdVersion, Storage, VersionFile};

use super::swap::Stage;
use super::{verify_against, Ctx, StepError, StepReport};

/// Runs `from` on the data, saves a snapshot, restores it with `to`'s tools, proves it with `to`.
pub async fn run(
    ctx: &Ctx<'_>,
    from: EtcdVersion,
    to: EtcdVersion,
    baseline: Option<&Fingerprint>,
) -> Result<StepReport, StepError> {
    let cfg = ctx.config;
    let work = ctx.work_dir();
    fsutil::create_dir_mode(&work, 0o700)?;
    let snapshot = work.join(format!("snapshot-{from}.db"));
    let restored = work.join("restored");
    fsutil::remove_tree(&snapshot)?;
    fsutil::remove_tree(&restored)?;

    // 1. Save a snapshot with the current release.
    let t = Instant::now();
    let db_size = std::fs::metadata(ctx.data_dir.join("member/snap/db"))
        .map(|m| m.len())
        .unwrap_or(0);
    fsutil::ensure_space(&work, 3 * db_size)?;
    let mut srv = EtcdServer::start(ctx.launch_v3(cfg, ctx.data_dir, from))?;
    let mut api = srv.ready().await?;
    // What the restored member must serve: the baseline read offline before the step, else
    // what this etcd serves now.
    let before = match baseline {
        Some(b) => b.clone(),
        None => srv.fingerprint(&mut api).await?,
    };
    ctl::snapshot_save(ctx.bundle, cfg, from, &srv.client_url, &snapshot).await?;
    srv.stop();
    let save_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("minor-rollback-after-save");

    // 2. Restore with the older release's tool into staging.
    let t = Instant::now();
    let stage = Stage::begin(ctx.data_dir)?;
    ctl::snapshot_restore(ctx.bundle, cfg, to, &snapshot, &restored).await?;
    fsutil::rename_durable(&restored.join("member"), &stage.member())?;
    fsutil::remove_tree(&restored)?;
    fsutil::fsync_tree(&stage.path)?;
    let restore_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("minor-rollback-after-restore");

    // 3. Prove it with the older release.
    let t = Instant::now();
    let mut srv = EtcdServer::start(ctx.launch_v3(cfg, &stage.path, to))?;
    let mut api = srv.ready().await?;
    let after = srv.fingerprint(&mut api).await?;
    srv.stop();
    verify_against(
        &format!("{to}/etcd3 restored from {from}'s snapshot"),
        Some(&before),
        &after,
    )?;
    let prove_ms = t.elapsed().as_millis() as u64;
    fail::fail_point!("minor-rollback-before-swap");

    // 4. Swap in.
    let backup = stage.commit(
        VersionFile {
            version: to,
            storage: Storage::Etcd3,
        },
        VersionFile {
            version: from,
            storage: Storage::Etcd3,
        },
    )?;
    fsutil::remove_tree(&snapshot)?;

    let mut report = StepReport {
        fingerprint: Some(after),
        ..Default::default()
    };
    let d = &mut report.detail;
    d.insert("snapshot_save_ms".into(), save_ms.into());
    d.insert("snapshot_restore_ms".into(), restore_ms.into());
    d.insert("prove_ms".into(), prove_ms.into());
    d.insert("backup".into(), backup.display().to_string().into());
    Ok(report)
}
