//! Upgrade (and patch change) step: start the new release on the data, prove a write, compare
//! the keys with the previous step, stop. With `cut_snapshot`, also cut a v2 snapshot so that
//! etcd 3.5+ sees a 3.x cluster version when it boots.

use std::time::Instant;

use crate::etcd::fingerprint::Fingerprint;
use crate::etcd::server::{EtcdServer, Launch};
use crate::version::VersionFile;

use super::{verify_against, Ctx, StepError, StepReport};

/// `--snapshot-count` and writes that reliably cut a snapshot (checked on 3.4.23).
pub const CUT_SNAPSHOT_COUNT: u32 = 5;
pub const CUT_SNAPSHOT_WRITES: usize = 9;

/// Runs the data at `to` once.
pub async fn run(
    ctx: &Ctx<'_>,
    to: VersionFile,
    cut_snapshot: bool,
    baseline: Option<&Fingerprint>,
) -> Result<StepReport, StepError> {
    let label = format!("{} on {}", to, ctx.data_dir.display());
    let t0 = Instant::now();
    let mut srv = EtcdServer::start(Launch {
        bundle: ctx.bundle,
        config: ctx.config,
        data_dir: ctx.data_dir,
        version: to.version,
        storage: to.storage,
        serve_v2: false,
        snapshot_count: cut_snapshot.then_some(CUT_SNAPSHOT_COUNT),
        single_member: ctx.members == 1,
        bulk_txns: false,
    })?;
    let mut api = srv.ready().await?;
    fail::fail_point!("upgrade-etcd-running");
    let healthy_ms = t0.elapsed().as_millis() as u64;
    if cut_snapshot {
        srv.probe_writes(&mut api, CUT_SNAPSHOT_WRITES).await?;
    }
    let mut report = StepReport::default();
    if ctx.members == 1 {
        let fp = srv.fingerprint(&mut api).await?;
        verify_against(&label, baseline, &fp)?;
        report.fingerprint = Some(fp);
    }
    srv.stop();
    if cut_snapshot {
        let facts = crate::datadir::member_facts(&ctx.data_dir.join("member"))?;
        if facts.boot_cluster_version_v2 {
            return Err(StepError::Other(format!(
                "the pass at {to} did not cut a snapshot: etcd 3.5+ would still boot this data as a 2.x cluster"
            )));
        }
    }
    report.detail.insert("healthy_ms".into(), healthy_ms.into());
    Ok(report)
}
