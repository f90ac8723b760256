//! Wiring: config -> inspect -> plan -> lock -> steps -> record, and `run`'s final exec.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::datadir::{self, Busy, DataDirError, Inspection};
use crate::etcd::bundle::{Bundle, BundleError};
use crate::executor::{self, EtcdOps};
use crate::fsutil::FsError;
use crate::layout::Layout;
use crate::plan::{self, Plan, PlanError, Step};
use crate::preflight;
use crate::progress::{self, JournalEntry, ProgressError};
use crate::rejoin::{self, RejoinError, Situation};
use crate::release::Tool;
use crate::restore_snapshot::{self, RestoreSnapshotError};
use crate::staging;
use crate::steps::{Ctx, Refusal, StepError};
use crate::version::{EtcdVersion, VersionFile};

/// Why a run ended without doing everything. Each maps to an exit code.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("private client port {port} is already in use on 127.0.0.1; pick a free one with --port (or LISTEN_CLIENT_URLS)")]
    PortTaken { port: u16 },
    #[error(transparent)]
    Refused(Refusal),
    #[error(
        "etcd {release} does not accept {} given in {whence}: it would exit at once (\"flag provided but not defined\"); \
         remove or rename {} (etcd 3.6 drops --enable-v2 and renames --experimental-* flags, 3.7 drops the old names)",
        flags.iter().map(|f| format!("--{f}")).collect::<Vec<_>>().join(", "),
        if flags.len() == 1 { "it" } else { "them" }
    )]
    UnknownFlags {
        release: EtcdVersion,
        flags: Vec<String>,
        whence: &'static str,
    },
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("data dir {data_dir} is in use: {what}; stop that etcd first (etcd-migrate must run before etcd starts)")]
    InUse { data_dir: PathBuf, what: String },
    #[error("step {n}/{of} ({step}) failed: {source}")]
    Step {
        n: usize,
        of: usize,
        step: String,
        source: Box<StepError>,
    },
    #[error("stopped by {signal} during step {step}; the step's etcd was stopped and nothing was recorded: the data dir is as of {recorded}")]
    Interrupted {
        signal: &'static str,
        step: String,
        recorded: VersionFile,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Restore(#[from] crate::backup::RestoreError),
    #[error(transparent)]
    Rejoin(Box<RejoinError>),
    #[error(transparent)]
    RestoreSnapshot(#[from] RestoreSnapshotError),
    #[error("cannot encode the report: {0}")]
    Report(serde_json::Error),
    #[error("cannot exec {path}: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<RejoinError> for RunError {
    fn from(e: RejoinError) -> RunError {
        RunError::Rejoin(Box::new(e))
    }
}

impl RunError {
    /// 1 a step failed; 2 bad input or unsupported path (nothing touched); 3 busy.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_)
            | RunError::DataDir(_)
            | RunError::Plan(_)
            | RunError::Bundle(_)
            | RunError::PortTaken { .. }
            | RunError::UnknownFlags { .. }
            | RunError::Refused(_) => 2,
            RunError::Busy(_) | RunError::InUse { .. } => 3,
            RunError::Step { .. }
            | RunError::Interrupted { .. }
            | RunError::Fs(_)
            | RunError::Progress(_)
            | RunError::Report(_)
            | RunError::Exec { .. } => 1,
            RunError::Restore(e) => e.exit_code(),
            RunError::Rejoin(e) => e.exit_code(),
            RunError::RestoreSnapshot(e) => e.exit_code(),
        }
    }
}

/// What `plan` and `migrate` start from.
pub struct Prepared {
    pub inspection: Inspection,
    pub bundle: Bundle,
    /// `None` for a fresh dir: the target is recorded without starting etcd.
    pub plan: Option<Plan>,
    pub target: VersionFile,
}

/// Reads the data dir and the bundle and plans; touches nothing. The WAL is read for member facts
/// only when there is something to plan, or when `always_facts` asks for them (`plan`).
pub fn prepare(config: &Config, always_facts: bool) -> Result<Prepared, RunError> {
    let target = config.target.ok_or(ConfigError::Missing {
        flag: "--target-version",
        env: "TARGET_VERSION",
    })?;
    let mut inspection = datadir::inspect(&config.data_dir)?;
    let bundle = Bundle::discover(&config.bin_dir, config.bundled_versions.as_deref())?;
    let plan = match inspection
        .on_disk
        .current()
        .filter(|_| inspection.on_disk.has_data())
    {
        None => {
            crate::release::storage_servable(target.version, target.storage).map_err(|why| {
                PlanError::StorageUnservable {
                    version: target.version,
                    storage: target.storage,
                    why,
                }
            })?;
            None
        }
        Some(current) => {
            if current != target || always_facts {
                inspection.facts = datadir::member_facts(&config.layout().member())?;
            }
            Some(plan_with_interrupted(
                &config.data_dir,
                current,
                target,
                &bundle,
                inspection.facts,
            )?)
        }
    };
    Ok(Prepared {
        inspection,
        bundle,
        plan,
        target,
    })
}

/// Plans from version.txt, unless a crashed run began an in-place upgrade it did not finish:
/// then that upgrade is finished first and the plan continues from there.
pub(crate) fn plan_with_interrupted(
    data_dir: &Path,
    current: VersionFile,
    target: VersionFile,
    bundle: &Bundle,
    facts: plan::DataFacts,
) -> Result<Plan, RunError> {
    match progress::interrupted_upgrade(&Layout::new(data_dir)) {
        Some((from, to, when)) if from == current && to != current => {
            tracing::warn!(from = %from, to = %to, began = %when, "a previous run began the upgrade to {to} and did not finish \
                it: etcd {to} may already have written the data, so that step is finished first");
            let mut rest = plan::plan(to, target, &bundle.versions, facts)?;
            let mut steps = vec![Step::Upgrade {
                from,
                to,
                cut_snapshot: false,
            }];
            steps.append(&mut rest.steps);
            Ok(Plan {
                current,
                target,
                steps,
                notes: rest.notes,
            })
        }
        _ => Ok(plan::plan(current, target, &bundle.versions, facts)?),
    }
}

/// What a run does once the data is at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stop there (`migrate`).
    Migrate,
    /// Exec etcd-<target> with the pod's flags (`run`).
    Run,
}

impl Mode {
    /// The subcommand's name, for the lock file.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Migrate => "migrate",
            Mode::Run => "run",
        }
    }
}

/// What a migration reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub target: VersionFile,
    /// The data dir was empty and this member rejoined its cluster: etcd must start as an
    /// existing member.
    pub rejoined: bool,
}

impl Migrated {
    fn at(target: VersionFile) -> Migrated {
        Migrated {
            target,
            rejoined: false,
        }
    }
}

/// Migrates the data dir to the target.
pub async fn migrate<O: EtcdOps>(
    config: &Config,
    ops: &mut O,
    mode: Mode,
) -> Result<Migrated, RunError> {
    let t0 = Instant::now();
    let layout = config.layout();
    let prepared = prepare(config, false)?;
    let target = prepared.target;
    let has_data = prepared.inspection.on_disk.has_data();
    let restore = restore_snapshot::decide(config, has_data, &prepared.bundle, target)?;
    let leftovers = layout.staging().exists() || layout.swap_intent().exists();
    if prepared.plan.as_ref().is_some_and(|p| p.steps.is_empty()) && !leftovers {
        tracing::info!(version = %target, elapsed_ms = t0.elapsed().as_millis() as u64, "data is already at the target; nothing to do");
        return Ok(Migrated::at(target));
    }
    preflight::preflight(config, &prepared, mode)?;
    let _lock = datadir::lock(&layout, mode.name())??;
    if let Some(what) = datadir::in_use_by(layout.data_dir()) {
        return Err(RunError::InUse {
            data_dir: config.data_dir.clone(),
            what,
        });
    }
    staging::recover(&layout)?;
    // Under the lock, look again: another run may have moved things, a recovery may have finished a step.
    let mut prepared = prepare(config, false)?;
    if let (Some(pending), None) = (&restore, &prepared.plan) {
        // The verified file becomes the data; the plan then continues from there.
        preflight::check_ports_free(config)?;
        restore_snapshot::restore(config, &prepared.bundle, &layout, pending)
            .await
            .map_err(|e| RunError::Step {
                n: 1,
                of: 1,
                step: format!("restore {} at {}", pending.path.display(), pending.release),
                source: Box::new(e),
            })?;
        prepared = prepare(config, false)?;
    }
    let Some(plan) = prepared.plan else {
        return fresh_or_rejoin(config, &prepared, &layout).await;
    };
    if plan.steps.is_empty() {
        return Ok(Migrated::at(target));
    }
    preflight::refuse_unrepresentable(config, &plan)?;
    if plan
        .steps
        .iter()
        .any(|s| !matches!(s, Step::RollbackToEtcd2 { .. }))
    {
        preflight::check_ports_free(config)?;
    }
    let ctx = Ctx {
        config,
        bundle: &prepared.bundle,
        layout: &layout,
        data_dir: &config.data_dir,
        members: prepared.inspection.facts.members,
    };
    executor::execute(ops, &ctx, &plan).await?;
    tracing::info!(version = %target, steps = plan.steps.len(), elapsed_ms = t0.elapsed().as_millis() as u64,
        peak_rss_mb = crate::meter::own_peak_rss_mb(), etcd_peak_rss_mb = crate::meter::children_peak_rss_mb(), "migration complete");
    Ok(Migrated::at(target))
}

/// No etcd data: a lost member rejoins its cluster (opt-in), else the target is recorded and
/// etcd creates the data on its first start.
async fn fresh_or_rejoin(
    config: &Config,
    prepared: &Prepared,
    layout: &Layout,
) -> Result<Migrated, RunError> {
    let target = prepared.target;
    match rejoin::look(config, layout)
        .await
        .map_err(RejoinError::from)?
    {
        Situation::Fresh => record_fresh(config, &prepared.inspection, target).map(Migrated::at),
        Situation::Lost {
            client_urls,
            cluster_version,
        } => {
            let r = rejoin::rejoin(
                config,
                &prepared.bundle,
                layout,
                target,
                &client_urls,
                cluster_version.as_deref(),
            )
            .await?;
            tracing::info!(version = %target, member_id = %format!("{:x}", r.member_id), catch_up_ms = r.catch_up_ms,
                "rejoined the cluster as a new member, synced from the leader");
            Ok(Migrated {
                target,
                rejoined: true,
            })
        }
    }
}

fn record_fresh(
    config: &Config,
    inspection: &Inspection,
    target: VersionFile,
) -> Result<VersionFile, RunError> {
    crate::fsutil::create_dir_mode(&config.data_dir, 0o700)?;
    progress::record(&config.data_dir, target)?;
    progress::append_journal(
        &config.data_dir,
        &JournalEntry::fresh(inspection.on_disk.current(), target),
    )?;
    tracing::info!(version = %target, "no etcd data yet: recorded the target; etcd creates the data on first start");
    Ok(target)
}

/// Replaces this process with `etcd-<target>` and the pod's flags, in a scrubbed environment.
pub fn exec_etcd(
    config: &Config,
    bundle_dir: &Path,
    target: VersionFile,
    etcd_args: &[OsString],
) -> RunError {
    use std::os::unix::process::CommandExt;
    let path = Bundle {
        dir: bundle_dir.to_path_buf(),
        versions: Default::default(),
    }
    .path(Tool::Etcd, target.version);
    let args: Vec<String> = etcd_args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut set = Vec::new();
    if let Some(f) = crate::release::Release::new(target.version)
        .v2_flag(target.storage == crate::version::Storage::Etcd2)
    {
        if !args.iter().any(|a| a.starts_with("--enable-v2")) {
            tracing::info!("etcd2 storage on {}: adding {f}", target.version);
            set.push(f.to_string());
        }
    }
    let env = crate::etcd::server::child_env(config, &args, "ETCD_", &[]);
    tracing::info!(path = %path.display(), "exec etcd-{} (same PID {})", target.version, std::process::id());
    let err = std::process::Command::new(&path)
        .args(&args)
        .args(&set)
        .env_clear()
        .envs(env)
        .exec();
    RunError::Exec { path, source: err }
}
