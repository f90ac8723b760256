//! Upgrade (and patch change) step: start the new release on the data, prove a write and a
//! read, stop, and prove the data unchanged. With `cut_snapshot`, also cut a v2 snapshot so that
//! etcd 3.5+ sees a 3.x cluster version when it boots.
//!
//! The proof for a single member's etcd3 data reads the backend offline with our own reader,
//! before the release starts (on a thread of its own, while etcd starts) and after it stopped
//! cleanly, and compares every revision up to the one the step began at: constant memory, one
//! read of the file each way. Data in the v2 store is compared as served, key by key.

use std::time::Instant;

use crate::etcd::server::{EtcdServer, Launch};
use crate::version::{Storage, VersionFile};

use super::backend::{self, Digested, PendingScan};
use super::{verify_against, Baseline, Ctx, StepError, StepReport};

/// `--snapshot-count` and writes that reliably cut a snapshot (checked on 3.4.23).
pub const CUT_SNAPSHOT_COUNT: u32 = 5;
pub const CUT_SNAPSHOT_WRITES: usize = 9;

/// How the data before the step is known.
enum Before {
    /// From the step before, which left the backend as it is now.
    Known(Digested),
    /// Being read offline while the release starts.
    Reading(PendingScan, crate::storage::keydigest::RevRange),
    /// Not compared: other members take writes meanwhile (or the live keys are compared).
    NotCompared,
}

impl Before {
    /// How this step knows the data before it: from the step before, or read offline now
    /// (single member, etcd3: nothing else writes it).
    fn find(
        ctx: &Ctx<'_>,
        to: VersionFile,
        baseline: Option<&Baseline>,
    ) -> Result<Before, StepError> {
        let offline = ctx.members == 1 && to.storage == Storage::Etcd3;
        Ok(match baseline.and_then(Baseline::backend) {
            Some(d) if offline => Before::Known(*d),
            _ if offline => {
                let db = ctx.layout.backend();
                let range = backend::range_to_keep(&db)?;
                Before::Reading(
                    PendingScan::start(&db, range, "reading the backend before the step")?,
                    range,
                )
            }
            _ => Before::NotCompared,
        })
    }

    /// Waits for a read begun in [`Before::find`].
    async fn known(self) -> Result<Before, StepError> {
        Ok(match self {
            Before::Reading(scan, range) => {
                let d = scan.finish().await?;
                Before::Known(Digested {
                    range: backend::closed(range, &d),
                    digest: d,
                })
            }
            other => other,
        })
    }
}

/// Runs the data at `to` once.
pub async fn run(
    ctx: &Ctx<'_>,
    to: VersionFile,
    cut_snapshot: bool,
    baseline: Option<&Baseline>,
) -> Result<StepReport, StepError> {
    let label = format!("{} on {}", to, ctx.data_dir.display());
    let before = Before::find(ctx, to, baseline)?;
    let t0 = Instant::now();
    let mut srv = EtcdServer::start(Launch {
        storage: to.storage,
        snapshot_count: cut_snapshot.then_some(CUT_SNAPSHOT_COUNT),
        ..ctx.launch_v3(ctx.config, ctx.data_dir, to.version)
    })?;
    // The first write (the health probe) waits for the read of the backend as it was.
    let before = before.known().await?;
    let mut api = srv.ready().await?;
    fail::fail_point!("upgrade-etcd-running");
    let healthy_ms = t0.elapsed().as_millis() as u64;
    if cut_snapshot {
        srv.probe_writes(&mut api, CUT_SNAPSHOT_WRITES).await?;
    }
    let mut report = StepReport::default();
    match &before {
        // Proven offline below; counting the keys over the API would cost a walk of etcd's
        // whole index (60 ms at 230,000 keys).
        Before::Known(_) => {}
        _ if ctx.members == 1 => {
            let fp = srv.fingerprint(&mut api).await?;
            verify_against(&label, baseline.and_then(Baseline::keys), &fp)?;
            report.keys = Some(fp.keys);
            report.baseline = Some(Baseline::Keys(fp));
        }
        _ => {}
    }
    srv.stop(Some(api)).await.record(&mut report.detail);
    if let Before::Known(d) = before {
        verify_offline(ctx, &label, d, &mut report)?;
    }
    if cut_snapshot {
        let facts = crate::datadir::member_facts(&ctx.layout.member())?;
        if facts.boot_cluster_version_v2 {
            return Err(StepError::NoSnapshotCut { at: to });
        }
    }
    report.detail.insert("healthy_ms".into(), healthy_ms.into());
    Ok(report)
}

/// Reads the backend the stopped etcd left and compares it with `before`.
fn verify_offline(
    ctx: &Ctx<'_>,
    label: &str,
    before: Digested,
    report: &mut StepReport,
) -> Result<(), StepError> {
    let t = Instant::now();
    let after = backend::scan(
        &ctx.layout.backend(),
        before.range,
        "reading the backend after the step",
    )?;
    backend::compare(label, &before, &after)?;
    report
        .detail
        .insert("verify_ms".into(), (t.elapsed().as_millis() as u64).into());
    report
        .detail
        .insert("revisions_verified".into(), after.entries.into());
    report.baseline = Some(Baseline::Backend(before));
    Ok(())
}
