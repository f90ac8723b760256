//! Wiring: config -> inspect -> plan -> lock -> steps -> record, and `run`'s final exec.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::cli::Output;
use crate::config::{split_url, Config, ConfigError};
use crate::datadir::{self, Busy, DataDirError, Inspection, OnDisk};
use crate::etcd::bundle::{Bundle, BundleError, Tool};
use crate::etcd::fingerprint::Fingerprint;
use crate::fsutil::FsError;
use crate::plan::{self, Plan, PlanError, Step};
use crate::progress::{self, JournalEntry, ProgressError};
use crate::steps::{self, backup, swap, Ctx, StepError, StepReport};
use crate::version::VersionFile;

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
    #[error("{0}")]
    Refused(String),
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
    #[error("cannot exec {path}: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
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
            | RunError::Refused(_) => 2,
            RunError::Busy(_) | RunError::InUse { .. } => 3,
            _ => 1,
        }
    }
}

/// The boundary to real etcd: runs one step. The executor is generic over it so that recording,
/// backups and failure handling are tested without processes.
#[allow(async_fn_in_trait)]
pub trait EtcdOps {
    async fn run_step(
        &mut self,
        ctx: &Ctx<'_>,
        step: Step,
        before: VersionFile,
        baseline: Option<&Fingerprint>,
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
        baseline: Option<&Fingerprint>,
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
            plan::storage_servable(target.version, target.storage).map_err(|why| {
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
                inspection.facts = datadir::member_facts(&config.data_dir.join("member"))?;
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
fn plan_with_interrupted(
    data_dir: &Path,
    current: VersionFile,
    target: VersionFile,
    bundle: &Bundle,
    facts: plan::DataFacts,
) -> Result<Plan, RunError> {
    match progress::interrupted_upgrade(&datadir::work_dir(data_dir)) {
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

fn check_ports_free(config: &Config) -> Result<(), RunError> {
    for url in &config.member.client_urls {
        if let Some((_, host, port)) = split_url(url) {
            if TcpListener::bind((host, port)).is_err() {
                return Err(RunError::PortTaken { port });
            }
        }
    }
    Ok(())
}

/// A data dir that is the root of a mount cannot be swapped by rename; staged steps need its parent.
fn check_swappable(data_dir: &Path, steps: &[Step]) -> Result<(), RunError> {
    use std::os::unix::fs::MetadataExt;
    if !steps.iter().any(|s| s.rewrites_member_alone()) {
        return Ok(());
    }
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(d), Ok(p)) = (std::fs::metadata(data_dir), std::fs::metadata(parent)) else {
        return Ok(());
    };
    if d.dev() != p.dev() {
        return Err(RunError::Refused(format!(
            "data dir {} is the root of a mounted volume; this step builds the new data beside it and swaps it in by \
             rename, which needs the data dir to be a directory inside the volume (mount its parent instead)",
            data_dir.display()
        )));
    }
    Ok(())
}

/// Migrates the data dir to the target. Returns the target reached.
pub async fn migrate<O: EtcdOps>(
    config: &Config,
    ops: &mut O,
    command: &str,
) -> Result<VersionFile, RunError> {
    let t0 = Instant::now();
    let prepared = prepare(config, false)?;
    let target = prepared.target;
    let work_leftovers = datadir::work_dir(&config.data_dir).join("staging").exists()
        || datadir::work_dir(&config.data_dir)
            .join("swap.json")
            .exists();
    if let Some(p) = &prepared.plan {
        if p.steps.is_empty() && !work_leftovers {
            tracing::info!(version = %target, elapsed_ms = t0.elapsed().as_millis() as u64, "data is already at the target; nothing to do");
            return Ok(target);
        }
        for note in &p.notes {
            tracing::warn!("{note}");
        }
        prepared.bundle.preflight(&p.steps)?;
        check_swappable(&config.data_dir, &p.steps)?;
    } else if !prepared.bundle.versions.contains(target.version) {
        return Err(PlanError::TargetNotBundled {
            target: target.version,
            bundled: prepared.bundle.versions.clone(),
        }
        .into());
    }

    if command == "run" {
        // `run` ends in exec etcd-<target>: make sure it is there before touching anything.
        let exec = Step::Upgrade {
            from: target,
            to: target,
            cut_snapshot: false,
        };
        prepared.bundle.preflight(&[exec])?;
    }
    let _lock = datadir::lock(&config.data_dir, command)??;
    if let Some(what) = datadir::in_use_by(&config.data_dir) {
        return Err(RunError::InUse {
            data_dir: config.data_dir.clone(),
            what,
        });
    }
    swap::recover(&config.data_dir)?;
    // Under the lock, look again: another run may have moved things, a recovery may have finished a step.
    let prepared = prepare(config, false)?;
    let Some(plan) = prepared.plan else {
        return record_fresh(config, &prepared.inspection, target);
    };
    if plan.steps.is_empty() {
        return Ok(target);
    }
    refuse_unrepresentable(config, &plan)?;
    if plan
        .steps
        .iter()
        .any(|s| !matches!(s, Step::RollbackToEtcd2 { .. }))
    {
        check_ports_free(config)?;
    }
    let ctx = Ctx {
        config,
        bundle: &prepared.bundle,
        data_dir: &config.data_dir,
        members: prepared.inspection.facts.members,
    };
    execute(ops, &ctx, &plan).await?;
    tracing::info!(version = %target, steps = plan.steps.len(), elapsed_ms = t0.elapsed().as_millis() as u64, "migration complete");
    Ok(target)
}

fn record_fresh(
    config: &Config,
    inspection: &Inspection,
    target: VersionFile,
) -> Result<VersionFile, RunError> {
    crate::fsutil::create_dir_mode(&config.data_dir, 0o700)?;
    let was = inspection.on_disk.current();
    progress::record(&config.data_dir, target)?;
    progress::append_journal(
        &config.data_dir,
        &JournalEntry {
            at: progress::now_rfc3339(),
            event: "fresh".into(),
            kind: None,
            from: was.map(|v| v.to_string()).unwrap_or_else(|| "none".into()),
            to: target.to_string(),
            elapsed_ms: 0,
            keys: Some(0),
            detail: Default::default(),
        },
    )?;
    tracing::info!(version = %target, "no etcd data yet: recorded the target; etcd creates the data on first start");
    Ok(target)
}

/// The native rollback refuses data a v2 store cannot hold (Kubernetes protobuf values first of
/// all) before touching anything. Minor rollbacks before it keep every value, so the current
/// data is what is checked.
fn refuse_unrepresentable(config: &Config, plan: &Plan) -> Result<(), RunError> {
    // As the first step the native rollback checks while it writes, into staging, and refuses
    // (exit 2, data dir untouched) on the first problem; only after other steps must it be
    // checked before anything runs.
    let later = plan
        .steps
        .iter()
        .skip(1)
        .any(|s| matches!(s, Step::RollbackToEtcd2 { .. }));
    if !later {
        return Ok(());
    }
    steps::to_etcd2::refuse_unrepresentable(&config.data_dir.join("member"), &config.data_prefix)
        .map_err(RunError::Refused)
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
    let mut baseline = match plan.steps.first() {
        // It reads the backend offline itself: the same read twice would prove nothing.
        Some(Step::RollbackToEtcd2 { .. }) => None,
        _ => initial_baseline(ctx, at),
    };
    let n = plan.steps.len();
    for (i, step) in plan.steps.iter().enumerate() {
        let label = step.to_string();
        if matches!(step, Step::Upgrade { .. }) && step.needs_backup(at) {
            let b = backup::copy(ctx.data_dir, at, ctx.config.backup_retention)?;
            backup::journal(ctx.data_dir, at, &b)?;
        }
        tracing::info!(step = i + 1, of = n, kind = step.kind(), from = %at, to = %step.outcome(), "step {}/{n}: {label}", i + 1);
        let in_place = matches!(step, Step::Upgrade { .. }) && step.outcome() != at;
        if in_place {
            progress::begin_in_place(&ctx.work_dir(), at, step.outcome())?;
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
            progress::end_in_place(&ctx.work_dir())?;
        }
        let elapsed_ms = t.elapsed().as_millis() as u64;
        let keys = report
            .fingerprint
            .as_ref()
            .map(|f| f.keys)
            .or_else(|| report.detail.get("keys").and_then(|k| k.as_u64()));
        progress::append_journal(
            ctx.data_dir,
            &JournalEntry {
                at: progress::now_rfc3339(),
                event: "step".into(),
                kind: Some(step.kind().into()),
                from: at.to_string(),
                to: outcome.to_string(),
                elapsed_ms,
                keys,
                detail: report.detail.clone(),
            },
        )?;
        tracing::info!(step = i + 1, of = n, version = %outcome, elapsed_ms, keys, "step {}/{n} done; recorded {outcome}", i + 1);
        fail::fail_point!("executor-after-record");
        if report.fingerprint.is_some() {
            baseline = report.fingerprint;
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

/// What the first step is compared with: the keys read offline from a cleanly stopped etcd3
/// backend. Later steps compare with the step before.
fn initial_baseline(ctx: &Ctx<'_>, at: VersionFile) -> Option<Fingerprint> {
    if ctx.members != 1 || at.storage != crate::version::Storage::Etcd3 {
        return None;
    }
    let t = Instant::now();
    match datadir::offline_fingerprint(&ctx.data_dir.join("member")) {
        Ok(fp) => {
            tracing::info!(
                keys = fp.keys,
                elapsed_ms = t.elapsed().as_millis() as u64,
                "read the keys offline as the baseline for the first step"
            );
            Some(fp)
        }
        Err(why) => {
            tracing::warn!(
                "no offline baseline ({why}); the first step's keys become the baseline"
            );
            None
        }
    }
}

/// Which kinds of step the data's cluster allows: one member's data may be rewritten alone only
/// when it is the whole cluster.
#[derive(Serialize)]
struct Allowed {
    upgrade: bool,
    storage_migration: bool,
    rollback: bool,
}

impl Allowed {
    fn for_members(members: usize) -> Allowed {
        Allowed {
            upgrade: true,
            storage_migration: members <= 1,
            rollback: members <= 1,
        }
    }
}

/// `plan`: what migrate would do.
pub fn print_plan(config: &Config, output: Output) -> Result<(), RunError> {
    let p = prepare(config, true)?;
    #[derive(Serialize)]
    struct Out<'a> {
        data_dir: &'a Path,
        current: Option<VersionFile>,
        legacy_default: bool,
        target: VersionFile,
        bundled: Vec<String>,
        members: usize,
        steps: Vec<StepOut>,
        notes: Vec<String>,
        allowed: Allowed,
    }
    #[derive(Serialize)]
    struct StepOut {
        #[serde(flatten)]
        step: Step,
        outcome: VersionFile,
        describe: String,
    }
    let members = p.inspection.facts.members;
    let out = Out {
        data_dir: &config.data_dir,
        current: p.inspection.on_disk.current(),
        legacy_default: p.inspection.on_disk == OnDisk::Legacy,
        target: p.target,
        bundled: p.bundle.versions.iter().map(|v| v.to_string()).collect(),
        members,
        steps: p
            .plan
            .as_ref()
            .map(|pl| {
                pl.steps
                    .iter()
                    .map(|s| StepOut {
                        step: *s,
                        outcome: s.outcome(),
                        describe: s.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        notes: p
            .plan
            .as_ref()
            .map(|pl| pl.notes.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default(),
        allowed: Allowed {
            upgrade: true,
            storage_migration: members <= 1,
            rollback: members <= 1,
        },
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Output::Text => {
            let cur = match (out.current, out.legacy_default) {
                (None, _) => "none (fresh data dir)".to_string(),
                (Some(v), true) => format!("{v} (no version.txt: the legacy default for a v2 WAL)"),
                (Some(v), false) => v.to_string(),
            };
            println!("data dir: {}", config.data_dir.display());
            println!("current:  {cur}");
            println!("target:   {}", out.target);
            println!("bundled:  {}", out.bundled.join(" "));
            println!(
                "members:  {members}{}",
                if members > 1 {
                    " (upgrades only: storage migration and rollbacks need one member)"
                } else {
                    ""
                }
            );
            match &p.plan {
                None => println!(
                    "steps:    none; record {} (etcd creates the data on first start)",
                    out.target
                ),
                Some(pl) if pl.steps.is_empty() => {
                    println!("steps:    none; already at the target")
                }
                Some(_) => {
                    println!("steps:");
                    for (i, s) in out.steps.iter().enumerate() {
                        println!("  {}. {}", i + 1, s.describe);
                    }
                }
            }
            for n in &out.notes {
                println!("note: {n}");
            }
        }
    }
    Ok(())
}

/// `status`: recorded version, recent steps, backups, lock holder.
pub fn print_status(config: &Config, output: Output) -> Result<(), RunError> {
    let inspection = datadir::inspect(&config.data_dir)?;
    let members = if inspection.on_disk.has_data() {
        datadir::member_facts(&config.data_dir.join("member"))
            .map(|f| f.members)
            .ok()
    } else {
        None
    };
    let journal = progress::read_journal(&config.data_dir, 10);
    let backups = backup::list(&config.data_dir);
    let lock = datadir::lock_holder(&config.data_dir);
    let staging = datadir::work_dir(&config.data_dir).join("staging").exists();
    #[derive(Serialize)]
    struct Out<'a> {
        data_dir: &'a Path,
        recorded: Option<VersionFile>,
        legacy_default: bool,
        members: Option<usize>,
        allowed: Option<Allowed>,
        lock_holder: Option<String>,
        interrupted_work: bool,
        last_steps: Vec<JournalEntry>,
        backups: Vec<backup::Backup>,
    }
    let out = Out {
        data_dir: &config.data_dir,
        recorded: inspection.on_disk.current(),
        legacy_default: inspection.on_disk == OnDisk::Legacy,
        members,
        allowed: members.map(Allowed::for_members),
        lock_holder: lock,
        interrupted_work: staging,
        last_steps: journal,
        backups,
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Output::Text => {
            println!("data dir: {}", config.data_dir.display());
            match (out.recorded, out.legacy_default) {
                (None, _) => println!("recorded: none (fresh)"),
                (Some(v), true) => {
                    println!("recorded: none; the data is {v} by the legacy default")
                }
                (Some(v), false) => println!("recorded: {v}"),
            }
            if let Some(m) = out.members {
                let allowed = if m > 1 {
                    " (upgrades only: storage migration and rollbacks need one member)"
                } else {
                    ""
                };
                println!("members:  {m}{allowed}");
            }
            println!("lock:     {}", out.lock_holder.as_deref().unwrap_or("free"));
            if out.interrupted_work {
                println!("interrupted work: a staged rewrite is present; the next run finishes or discards it");
            }
            println!("last steps:");
            if out.last_steps.is_empty() {
                println!("  none");
            }
            for e in &out.last_steps {
                let kind = e.kind.clone().unwrap_or_else(|| e.event.clone());
                let keys = e.keys.map(|k| format!(", {k} keys")).unwrap_or_default();
                println!(
                    "  {} {kind:<15} {} -> {} ({} ms{keys})",
                    e.at, e.from, e.to, e.elapsed_ms
                );
                // What the step counted and how long its parts took (TTLs, leases, sub-steps).
                let detail: Vec<String> = e
                    .detail
                    .iter()
                    .filter(|(k, _)| k.as_str() != "backup")
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect();
                if !detail.is_empty() {
                    println!("      {}", detail.join(" "));
                }
            }
            println!("backups:");
            if out.backups.is_empty() {
                println!("  none");
            }
            for b in &out.backups {
                println!(
                    "  {} ({}, taken {}, {} bytes)",
                    b.path.display(),
                    b.version,
                    b.taken,
                    b.bytes
                );
            }
        }
    }
    Ok(())
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
    if let Some(f) = crate::etcd::release::Release::new(target.version)
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

/// `restore`: puts a backup back as the data dir; the current data becomes a backup itself.
pub async fn restore(config: &Config, backup_arg: &Path) -> Result<(), RunError> {
    let backup_path = if backup_arg.is_absolute() || backup_arg.components().count() > 1 {
        backup_arg.to_path_buf()
    } else {
        config
            .data_dir
            .parent()
            .unwrap_or(Path::new("."))
            .join(backup_arg)
    };
    let known = backup::list(&config.data_dir);
    let Some(chosen) = known.iter().find(|b| b.path == backup_path) else {
        let names: Vec<String> = known.iter().map(|b| b.path.display().to_string()).collect();
        return Err(RunError::Refused(format!(
            "{} is not a backup of {}; backups: {}",
            backup_path.display(),
            config.data_dir.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    let restored = progress::read_version(&chosen.path)?.ok_or_else(|| {
        RunError::Refused(format!(
            "backup {} has no version.txt; it cannot be restored as recorded data",
            chosen.path.display()
        ))
    })?;
    let inspection = datadir::inspect(&config.data_dir)?;
    let current = inspection.on_disk.current();
    let _lock = datadir::lock(&config.data_dir, "restore")??;
    if let Some(what) = datadir::in_use_by(&config.data_dir) {
        return Err(RunError::InUse {
            data_dir: config.data_dir.clone(),
            what,
        });
    }
    swap::recover(&config.data_dir)?;
    let size = crate::fsutil::tree_size(&chosen.path)?;
    crate::fsutil::ensure_space(&datadir::work_dir(&config.data_dir), size)?;
    // The backup's data with today's journal, so the history stays whole.
    let stage = swap::Stage::begin(&config.data_dir)?;
    if chosen.path.join("member").is_dir() {
        crate::fsutil::copy_tree(&chosen.path.join("member"), &stage.member())?;
    }
    let t = Instant::now();
    let old = stage.commit(restored, current.unwrap_or(restored))?;
    progress::append_journal(
        &config.data_dir,
        &JournalEntry {
            at: progress::now_rfc3339(),
            event: "restore".into(),
            kind: None,
            from: current
                .map(|v| v.to_string())
                .unwrap_or_else(|| "none".into()),
            to: restored.to_string(),
            elapsed_ms: t.elapsed().as_millis() as u64,
            keys: None,
            detail: [
                (
                    "backup".to_string(),
                    serde_json::Value::from(chosen.path.display().to_string()),
                ),
                (
                    "previous_data".to_string(),
                    serde_json::Value::from(old.display().to_string()),
                ),
            ]
            .into_iter()
            .collect(),
        },
    )?;
    tracing::info!(restored = %restored, from = %chosen.path.display(), previous = %old.display(), "restored the backup; the data dir now holds {restored}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Env};
    use crate::plan::BundledVersions;

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
            _b: Option<&Fingerprint>,
        ) -> Result<StepReport, StepError> {
            self.ran.push(step);
            if self.fail_at == Some(self.ran.len()) {
                return Err(StepError::Other("injected".into()));
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
        let ctx = Ctx {
            config,
            bundle: &bundle,
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
        assert_eq!(backup::list(&config.data_dir).len(), 1);
        // The failed step was an in-place upgrade: the next run finishes it first.
        let work = datadir::work_dir(&config.data_dir);
        let (from, to, _) = progress::interrupted_upgrade(&work).unwrap();
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
        assert!(progress::interrupted_upgrade(&work).is_none());
    }
}
