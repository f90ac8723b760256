//! Walks a plan: a backup before each step that needs one, the step (through [`EtcdOps`]), then
//! version.txt and the journal, one step at a time; stops at the first failure or signal.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backup;
use crate::fsutil::FsError;
use crate::plan::{Plan, Step};
use crate::progress::{self, JournalEntry};
use crate::run::RunError;
use crate::steps::{self, Baseline, Ctx, StepError, StepReport};
use crate::version::VersionFile;

/// The boundary to real etcd: runs one step. The executor is generic over it so that recording,
/// backups and failure handling are tested without processes.
#[allow(async_fn_in_trait)]
pub trait EtcdOps {
    async fn run_step(
        &mut self,
        ctx: &Ctx<'_>,
        step: Step,
        before: VersionFile,
        baseline: Option<&Baseline>,
    ) -> Result<StepReport, StepError>;
}

/// Runs steps against real etcd processes.
pub struct RealEtcd;

impl EtcdOps for RealEtcd {
    async fn run_step(
        &mut self,
        ctx: &Ctx<'_>,
        step: Step,
        _before: VersionFile,
        baseline: Option<&Baseline>,
    ) -> Result<StepReport, StepError> {
        match step {
            Step::Upgrade {
                to, cut_snapshot, ..
            } => steps::upgrade::run(ctx, to, cut_snapshot, baseline).await,
            Step::MigrateStorage {
                from,
                at,
                cut_snapshot,
            } => steps::to_etcd3::run(ctx, from, at, cut_snapshot, baseline).await,
            Step::MinorRollback { from, to } => {
                steps::minor_rollback::run(ctx, from, to, baseline).await
            }
            Step::RollbackToEtcd2 { from } => steps::to_etcd2::run(ctx, from, baseline).await,
        }
    }
}

/// Runs the steps in order, recording after each.
pub async fn execute<O: EtcdOps>(ops: &mut O, ctx: &Ctx<'_>, plan: &Plan) -> Result<(), RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| FsError::Io {
        op: "signal",
        path: PathBuf::new(),
        source: e,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| FsError::Io {
        op: "signal",
        path: PathBuf::new(),
        source: e,
    })?;
    let mut at = plan.current;
    // Each step proves its own result; a step that read the data after it hands that on, so
    // the next need not read the same again.
    let mut baseline: Option<Baseline> = None;
    let n = plan.steps.len();
    for (i, step) in plan.steps.iter().enumerate() {
        let label = step.to_string();
        if matches!(step, Step::Upgrade { .. }) && step.needs_backup(at) {
            let b = backup::copy(ctx.layout, at, ctx.config.backup_retention)?;
            backup::journal(ctx.layout, at, &b)?;
        }
        tracing::info!(step = i + 1, of = n, kind = step.kind(), from = %at, to = %step.outcome(), "step {}/{n}: {label}", i + 1);
        let in_place = matches!(step, Step::Upgrade { .. }) && step.outcome() != at;
        if in_place {
            progress::begin_in_place(ctx.layout, at, step.outcome())?;
        }
        let t = Instant::now();
        let result = tokio::select! {
            r = ops.run_step(ctx, *step, at, baseline.as_ref()) => r,
            _ = term.recv() => return Err(RunError::Interrupted { signal: "SIGTERM", step: label, recorded: at }),
            _ = int.recv() => return Err(RunError::Interrupted { signal: "SIGINT", step: label, recorded: at }),
        };
        if let Err(StepError::Refused(why)) = result {
            return Err(RunError::Refused(why));
        }
        let report = result.map_err(|source| RunError::Step {
            n: i + 1,
            of: n,
            step: format!("{label}{}", low_space_hint(ctx.data_dir)),
            source: Box::new(source),
        })?;
        fail::fail_point!("executor-before-record");
        let outcome = step.outcome();
        progress::record(ctx.data_dir, outcome)?;
        if in_place {
            progress::end_in_place(ctx.layout)?;
        }
        let elapsed_ms = t.elapsed().as_millis() as u64;
        let mut report = report;
        // Our own peak so far (the step's etcd is not in it): the figure a memory limit must allow us.
        report
            .detail
            .insert("peak_rss_mb".into(), crate::meter::own_peak_rss_mb().into());
        let keys = report
            .keys
            .or_else(|| report.detail.get("keys").and_then(|k| k.as_u64()));
        let entry = JournalEntry::step(
            step.kind(),
            at,
            outcome,
            elapsed_ms,
            keys,
            report.detail.clone(),
        );
        progress::append_journal(ctx.data_dir, &entry)?;
        tracing::info!(step = i + 1, of = n, version = %outcome, elapsed_ms, keys, "step {}/{n} done; recorded {outcome}", i + 1);
        fail::fail_point!("executor-after-record");
        if report.baseline.is_some() {
            baseline = report.baseline;
        }
        at = outcome;
    }
    Ok(())
}

/// When the data dir's filesystem is nearly full, a failed step says so with the figures.
fn low_space_hint(data_dir: &Path) -> String {
    let Ok(free) = crate::fsutil::available_space(data_dir) else {
        return String::new();
    };
    let used = crate::fsutil::tree_size(data_dir).unwrap_or(0);
    if free < used / 10 + (8 << 20) {
        format!(
            "; the filesystem holding {} has only {free} bytes free (the data dir uses {used}): the step may have run out \
             of space; free some (old backups are listed by `status`) and run again",
            data_dir.display()
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Config, Env};
    use crate::etcd::bundle::Bundle;
    use crate::plan::{self, BundledVersions};
    use crate::run::plan_with_interrupted;

    /// Runs steps without processes; fails at one of them.
    struct FakeEtcd {
        fail_at: Option<usize>,
        ran: Vec<Step>,
    }

    impl EtcdOps for FakeEtcd {
        async fn run_step(
            &mut self,
            _ctx: &Ctx<'_>,
            step: Step,
            _before: VersionFile,
            _b: Option<&Baseline>,
        ) -> Result<StepReport, StepError> {
            self.ran.push(step);
            if self.fail_at == Some(self.ran.len()) {
                return Err(StepError::ThreadPanicked { what: "injected" });
            }
            Ok(StepReport::default())
        }
    }

    fn vf(s: &str) -> VersionFile {
        s.parse().unwrap()
    }

    fn setup(current: &str) -> (tempfile::TempDir, Config) {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("member")).unwrap();
        progress::record(&data, vf(current)).unwrap();
        let env = Env::from_pairs([
            ("DATA_DIRECTORY", data.to_str().unwrap()),
            ("TARGET_VERSION", "3.5.1"),
            ("TARGET_STORAGE", "etcd3"),
            ("HOSTNAME", "h"),
        ]);
        (d, resolve(&Default::default(), &env, true).unwrap())
    }

    fn k8s() -> BundledVersions {
        BundledVersions::new(
            [
                "2.2.1", "2.3.7", "3.0.17", "3.1.20", "3.2.32", "3.3.17", "3.4.18", "3.5.1",
            ]
            .iter()
            .map(|v| v.parse().unwrap()),
        )
    }

    async fn exec(
        config: &Config,
        plan: &Plan,
        fail_at: Option<usize>,
    ) -> (Result<(), RunError>, Vec<Step>) {
        let bundle = Bundle {
            dir: PathBuf::from("/nonexistent"),
            versions: k8s(),
        };
        let layout = config.layout();
        let ctx = Ctx {
            config,
            bundle: &bundle,
            layout: &layout,
            data_dir: &config.data_dir,
            members: 1,
        };
        let mut ops = FakeEtcd {
            fail_at,
            ran: Vec::new(),
        };
        let r = execute(&mut ops, &ctx, plan).await;
        (r, ops.ran)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_completed_step_is_recorded_and_a_failure_stops_at_the_last_one() {
        let (_d, config) = setup("2.2.1/etcd2");
        let p = plan::plan(
            vf("2.2.1/etcd2"),
            vf("3.5.1/etcd3"),
            &k8s(),
            Default::default(),
        )
        .unwrap();
        let (r, ran) = exec(&config, &p, Some(4)).await;
        assert!(matches!(r, Err(RunError::Step { n: 4, .. })), "{r:?}");
        assert_eq!(ran.len(), 4);
        assert_eq!(
            progress::read_version(&config.data_dir).unwrap().unwrap(),
            p.steps[2].outcome(),
            "as of the last completed step"
        );
        let journal = progress::read_journal(&config.data_dir, 100);
        let done: Vec<&str> = journal
            .iter()
            .filter(|e| e.event == "step")
            .map(|e| e.to.as_str())
            .collect();
        assert_eq!(done, ["2.3.7/etcd2", "3.0.17/etcd3", "3.1.20/etcd3"]);
        assert!(
            journal
                .iter()
                .any(|e| e.event == "backup" && e.from == "2.2.1/etcd2"),
            "a backup before the first step away from 2.2.1"
        );
        assert_eq!(backup::list(&config.layout()).len(), 1);
        // The failed step was an in-place upgrade: the next run finishes it first.
        let (from, to, _) = progress::interrupted_upgrade(&config.layout()).unwrap();
        assert_eq!((from, to), (vf("3.1.20/etcd3"), vf("3.2.32/etcd3")));
        assert!(
            !config.data_dir.join("etcd-migrate.journal").exists()
                || !std::fs::read_to_string(config.data_dir.join("etcd-migrate.journal"))
                    .unwrap()
                    .contains("3.2.32"),
            "the failed step left no trace in the data dir"
        );
        let again = plan_with_interrupted(
            &config.data_dir,
            vf("3.1.20/etcd3"),
            vf("3.1.20/etcd3"),
            &Bundle {
                dir: PathBuf::new(),
                versions: k8s(),
            },
            Default::default(),
        )
        .unwrap();
        assert_eq!(
            again.steps,
            [
                Step::Upgrade {
                    from: vf("3.1.20/etcd3"),
                    to: vf("3.2.32/etcd3"),
                    cut_snapshot: false
                },
                Step::MinorRollback {
                    from: "3.2.32".parse().unwrap(),
                    to: "3.1.20".parse().unwrap()
                }
            ]
        );
        let (r, _) = exec(&config, &p, None).await;
        assert!(r.is_ok());
        assert!(progress::interrupted_upgrade(&config.layout()).is_none());
    }
}
