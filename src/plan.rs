//! The planner: a pure function from (what is on disk, what is wanted, what is bundled)
//! to the steps that get there. No I/O; imports only `version` and `release`.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

pub use crate::release::BundledVersions;
use crate::release::{
    has_etcdctl_migrate, storage_servable, Release, Tool, ADVISED_35_BEFORE_36, KNOWN_BAD,
    LAST_MINOR_OF_MAJOR, LEAVE_MINOR_FROM, NEWEST_KNOWN_MINOR,
};
use crate::version::{EtcdVersion, Minor, Storage, VersionFile};

/// The only etcd2 release a native rollback writes.
pub const ROLLBACK_ETCD2_VERSION: EtcdVersion = EtcdVersion::new(2, 2, 1);

/// Human summary of every path we support, quoted by refusals.
pub const SUPPORTED_PATHS: &str =
    "supported paths: upgrade one minor at a time (e.g. 2.2.1 -> 2.3.x -> 3.0.x -> ... -> 3.5.x), \
patch changes within a minor, etcd2 -> etcd3 storage at a 3.0-3.4 release, \
rollback 3.N/etcd3 -> 3.N-1/etcd3 one minor at a time, and rollback 3.0.x/etcd3 -> 2.2.1/etcd2";

/// What the planner knows about the data dir besides version.txt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFacts {
    /// Members in the cluster this data belongs to (1 for a fresh dir).
    pub members: usize,
    /// A restarting etcd would first see a 2.x cluster version (v2-era data, no snapshot since):
    /// etcd 3.5 then answers "not capable" to every request.
    pub boot_cluster_version_v2: bool,
}

impl Default for DataFacts {
    fn default() -> Self {
        DataFacts {
            members: 1,
            boot_cluster_version_v2: false,
        }
    }
}

/// One unit of work, after which version.txt is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Start `etcd-<to>` on the data, prove a write, stop. With `cut_snapshot`, run with a
    /// small `--snapshot-count` and enough writes to cut a v2 snapshot (the 3.5 fix-up).
    Upgrade {
        from: VersionFile,
        to: VersionFile,
        cut_snapshot: bool,
    },
    /// etcd2 -> etcd3 at release `at` (3.0-3.4): capture TTLs in v2 mode, `etcdctl migrate`,
    /// reattach TTLs as leases. `from` is the data before (may be an older minor).
    MigrateStorage {
        from: VersionFile,
        at: EtcdVersion,
        cut_snapshot: bool,
    },
    /// 3.N -> 3.N-1 by snapshot save (3.N) and restore (3.N-1 tools).
    MinorRollback { from: EtcdVersion, to: EtcdVersion },
    /// 3.0.x/etcd3 -> 2.2.1/etcd2, written natively.
    RollbackToEtcd2 { from: EtcdVersion },
}

impl Step {
    /// What version.txt says once the step is done.
    pub fn outcome(&self) -> VersionFile {
        match *self {
            Step::Upgrade { to, .. } => to,
            Step::MigrateStorage { at, .. } => VersionFile {
                version: at,
                storage: Storage::Etcd3,
            },
            Step::MinorRollback { to, .. } => VersionFile {
                version: to,
                storage: Storage::Etcd3,
            },
            Step::RollbackToEtcd2 { .. } => VersionFile {
                version: ROLLBACK_ETCD2_VERSION,
                storage: Storage::Etcd2,
            },
        }
    }

    /// The release whose etcd runs in this step.
    pub fn runs(&self) -> EtcdVersion {
        match *self {
            Step::Upgrade { to, .. } => to.version,
            Step::MigrateStorage { at, .. } => at,
            Step::MinorRollback { from, .. } => from,
            Step::RollbackToEtcd2 { from } => from,
        }
    }

    /// The step rewrites the data format irreversibly: a backup is taken first.
    pub fn needs_backup(&self, before: VersionFile) -> bool {
        match self {
            Step::Upgrade { .. } => before.version == ROLLBACK_ETCD2_VERSION,
            _ => true,
        }
    }

    /// The step rewrites one member's data alone, which a multi-member cluster cannot take.
    pub fn rewrites_member_alone(&self) -> bool {
        !matches!(self, Step::Upgrade { .. })
    }

    /// The binaries the step runs, and why: what must be bundled before it may start.
    pub fn tools(&self) -> Vec<(Tool, EtcdVersion, String)> {
        let why = self.to_string();
        let list = match *self {
            Step::Upgrade { to, .. } => vec![(Tool::Etcd, to.version)],
            Step::MigrateStorage { at, .. } => vec![(Tool::Etcd, at), (Tool::Etcdctl, at)],
            Step::MinorRollback { from, to } => vec![
                (Tool::Etcd, from),
                (Tool::Etcdctl, from),
                (Release::new(to).restore_binary(), to),
                (Tool::Etcd, to),
            ],
            Step::RollbackToEtcd2 { .. } => vec![],
        };
        list.into_iter().map(|(t, v)| (t, v, why.clone())).collect()
    }

    /// Short kind name for logs and the journal.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Upgrade {
                cut_snapshot: true,
                from,
                to,
            } if from.version.minor_line() == to.version.minor_line() => "snapshot-pass",
            Step::Upgrade { .. } => "upgrade",
            Step::MigrateStorage { .. } => "migrate-storage",
            Step::MinorRollback { .. } => "minor-rollback",
            Step::RollbackToEtcd2 { .. } => "rollback-etcd2",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Upgrade {
                from,
                to,
                cut_snapshot,
            } => {
                if from.version == to.version {
                    write!(f, "run {to} once more")?;
                } else {
                    write!(f, "{} -> {to}", from.version)?;
                }
                if *cut_snapshot {
                    write!(f, " (cut a snapshot so 3.5+ sees a 3.x cluster)")?;
                }
                Ok(())
            }
            Step::MigrateStorage {
                from,
                at,
                cut_snapshot,
            } => {
                if from.version != *at {
                    write!(f, "{} -> {at}/etcd2, then ", from.version)?;
                }
                write!(
                    f,
                    "storage etcd2 -> etcd3 at {at} (etcdctl migrate, TTLs reattached as leases)"
                )?;
                if *cut_snapshot {
                    write!(f, " (cut a snapshot so 3.5+ sees a 3.x cluster)")?;
                }
                Ok(())
            }
            Step::MinorRollback { from, to } => write!(
                f,
                "rollback {from}/etcd3 -> {to}/etcd3 (snapshot save/restore)"
            ),
            Step::RollbackToEtcd2 { from } => {
                write!(f, "rollback {from}/etcd3 -> {ROLLBACK_ETCD2_VERSION}/etcd2 (native v2 WAL + snapshot)")
            }
        }
    }
}

/// A note the planner attaches to a plan: skipped patches and known-bad releases.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// Older (or other) bundled patches of a minor that the plan does not use.
    SkippedPatches {
        minor: String,
        used: EtcdVersion,
        skipped: Vec<EtcdVersion>,
    },
    /// A release in the plan is known to be bad.
    KnownBad {
        version: EtcdVersion,
        advice: &'static str,
    },
    /// The plan leaves 3.5 for 3.6 from a patch older than etcd's guide asks for today.
    Below35Advice { version: EtcdVersion },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::SkippedPatches {
                minor,
                used,
                skipped,
            } => {
                let s: Vec<String> = skipped.iter().map(|v| v.to_string()).collect();
                write!(
                    f,
                    "minor {minor}: using {used}, skipping {} as older patches",
                    s.join(", ")
                )
            }
            Note::KnownBad { version, advice } => {
                write!(f, "etcd {version} is a known-bad release: {advice}")
            }
            Note::Below35Advice { version } => write!(
                f,
                "this plan leaves 3.5 for 3.6 from {version}; etcd's 3.6 upgrade guide asks for {ADVISED_35_BEFORE_36} or \
                 later (3.5.24, 3.5.26 and 3.5.32 each fixed a way the 3.6 upgrade can fail): bundle a newer 3.5 if you can"
            ),
        }
    }
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub current: VersionFile,
    pub target: VersionFile,
    pub steps: Vec<Step>,
    pub notes: Vec<Note>,
}

/// Why no plan exists. Each message names what to do about it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("target etcd {target} is not bundled (bundled: {bundled}); set TARGET_VERSION to a bundled release")]
    TargetNotBundled {
        target: EtcdVersion,
        bundled: BundledVersions,
    },
    #[error(
        "going from {from} to {to} passes through minor {minor}, but no etcd-{minor}.x is bundled (bundled: {bundled}); \
         add an etcd-{minor}.x binary to the bin dir"
    )]
    MinorNotBundled {
        minor: Minor,
        from: EtcdVersion,
        to: EtcdVersion,
        bundled: BundledVersions,
    },
    #[error("this step has to run the data at its own minor {minor}, but no etcd-{minor}.x is bundled (bundled: {bundled})")]
    CurrentMinorNotBundled {
        minor: Minor,
        bundled: BundledVersions,
    },
    #[error("storage {storage} cannot be served by etcd {version}: {why}")]
    StorageUnservable {
        version: EtcdVersion,
        storage: Storage,
        why: &'static str,
    },
    #[error(
        "{from} -> {to}: etcd2 -> etcd3 needs a 3.0-3.4 release on the way (`etcdctl migrate` was removed in 3.5), and none \
         is available; bundle one, or target a version at most 3.4 first"
    )]
    NoStorageMigrationRelease { from: VersionFile, to: VersionFile },
    #[error(
        "{from} -> {to}: a member must run etcd {min} or later before {} ({why}), and no such {} is bundled \
         (bundled: {bundled}); add an etcd-{} of at least {min} (with its etcdctl and etcdutl) to the bin dir",
        to.minor_line(), min.minor_line(), min.minor_line()
    )]
    PatchTooOld {
        from: EtcdVersion,
        to: EtcdVersion,
        min: EtcdVersion,
        why: &'static str,
        bundled: BundledVersions,
    },
    #[error(
        "{from} -> {to}: etcd-migrate does not roll back from etcd 3.6 or later. etcd documents one way down from 3.6, \
         online, with every member running: `etcdctl downgrade validate {to_minor}`, `etcdctl downgrade enable {to_minor}`, \
         then replace each member's etcd with {to_minor} one at a time (README: \"Rolling back from 3.6\")"
    )]
    RollbackFrom36 {
        from: VersionFile,
        to: VersionFile,
        to_minor: Minor,
    },
    #[error(
        "etcd {version} is newer than any release etcd-migrate knows (up to {NEWEST_KNOWN_MINOR}): its flags and data \
         rules are not in its release table; use a release of {NEWEST_KNOWN_MINOR} or older, or a newer etcd-migrate"
    )]
    UnknownRelease { version: EtcdVersion },
    #[error("{from} -> {to} is not supported; {SUPPORTED_PATHS}")]
    Unsupported { from: VersionFile, to: VersionFile },
    #[error(
        "the data belongs to a cluster of {members} members, and step '{step}' rewrites this member's data alone; \
         shrink the cluster to one member (etcdctl member remove), migrate it, then add the others back as new members"
    )]
    MultiMember { members: usize, step: String },
}

/// The minor lines strictly after `from` up to and including `to`, in upgrade order. A major
/// line ends at its known last minor (2.3), or else at its newest bundled minor.
fn minors_between(from: Minor, to: Minor, bundled: &BundledVersions) -> Vec<Minor> {
    let last_of = |major: u32| {
        let known = LAST_MINOR_OF_MAJOR
            .iter()
            .find(|(maj, _)| *maj == major)
            .map(|(_, l)| *l);
        let newest = bundled
            .iter()
            .filter(|v| v.major == major)
            .map(|v| v.minor)
            .max();
        known.into_iter().chain(newest).max().unwrap_or(0)
    };
    let mut out = Vec::new();
    let mut m = from;
    while m < to {
        m = if m.major < to.major && m.minor >= last_of(m.major) {
            Minor::new(m.major + 1, 0)
        } else {
            Minor::new(m.major, m.minor + 1)
        };
        out.push(m);
    }
    out
}

/// Plans the way from `current` to `target`. Pure: every fact comes in through the arguments.
pub fn plan(
    current: VersionFile,
    target: VersionFile,
    bundled: &BundledVersions,
    facts: DataFacts,
) -> Result<Plan, PlanError> {
    storage_servable(target.version, target.storage).map_err(|why| {
        PlanError::StorageUnservable {
            version: target.version,
            storage: target.storage,
            why,
        }
    })?;
    if target.version.minor_line() > NEWEST_KNOWN_MINOR {
        return Err(PlanError::UnknownRelease {
            version: target.version,
        });
    }
    let steps = if current == target {
        Vec::new()
    } else if target.version.minor_line() < current.version.minor_line() {
        plan_rollback(current, target, bundled)?
    } else {
        plan_forward(current, target, bundled, facts)?
    };
    if facts.members > 1 {
        if let Some(s) = steps.iter().find(|s| s.rewrites_member_alone()) {
            return Err(PlanError::MultiMember {
                members: facts.members,
                step: s.to_string(),
            });
        }
    }
    let notes = notes_for(current, &steps, bundled);
    Ok(Plan {
        current,
        target,
        steps,
        notes,
    })
}

/// The release that runs the data at its own minor: itself if bundled, else the newest bundled
/// patch of that minor (patch releases read each other's data).
fn runner_for(v: EtcdVersion, bundled: &BundledVersions) -> Result<EtcdVersion, PlanError> {
    if bundled.contains(v) {
        return Ok(v);
    }
    bundled
        .newest_of(v.minor_line())
        .ok_or(PlanError::CurrentMinorNotBundled {
            minor: v.minor_line(),
            bundled: bundled.clone(),
        })
}

/// The releases an upgrade (or patch change) runs, in order, ending at the target.
fn forward_versions(
    current: EtcdVersion,
    target: EtcdVersion,
    bundled: &BundledVersions,
) -> Result<Vec<EtcdVersion>, PlanError> {
    if !bundled.contains(target) {
        return Err(PlanError::TargetNotBundled {
            target,
            bundled: bundled.clone(),
        });
    }
    let mut versions = Vec::new();
    for m in minors_between(current.minor_line(), target.minor_line(), bundled) {
        if m == target.minor_line() {
            break;
        }
        let v = bundled
            .newest_of(m)
            .ok_or_else(|| PlanError::MinorNotBundled {
                minor: m,
                from: current,
                to: target,
                bundled: bundled.clone(),
            })?;
        versions.push(v);
    }
    if target != current {
        versions.push(target);
    }
    for &(min, why) in LEAVE_MINOR_FROM {
        leave_minor_from(current, &mut versions, bundled, min, why)?;
    }
    Ok(versions)
}

/// Makes the release run just before the first one past `min`'s minor a patch of at least
/// `min`: the newest bundled one, added as a patch step when the data is at an older patch.
fn leave_minor_from(
    current: EtcdVersion,
    versions: &mut Vec<EtcdVersion>,
    bundled: &BundledVersions,
    min: EtcdVersion,
    why: &'static str,
) -> Result<(), PlanError> {
    let minor = min.minor_line();
    let Some(i) = versions.iter().position(|v| v.minor_line() > minor) else {
        return Ok(());
    };
    let before = if i == 0 { current } else { versions[i - 1] };
    if before.minor_line() != minor || before >= min {
        return Ok(());
    }
    let to = versions[i];
    let newest = bundled
        .newest_of(minor)
        .filter(|v| *v >= min)
        .ok_or_else(|| PlanError::PatchTooOld {
            from: before,
            to,
            min,
            why,
            bundled: bundled.clone(),
        })?;
    if i == 0 {
        versions.insert(0, newest);
    } else {
        versions[i - 1] = newest;
    }
    Ok(())
}

/// The forward walk's state: the steps so far and where they leave the data.
struct Forward<'a> {
    bundled: &'a BundledVersions,
    steps: Vec<Step>,
    at: VersionFile,
    /// The storage is etcd3 by now (or was never to be migrated).
    migrated: bool,
    /// The data would boot as a 2.x cluster on 3.5+: a snapshot must be cut before 3.5.
    need_snapshot_fix: bool,
}

impl Forward<'_> {
    /// etcd2 -> etcd3 at release `v`.
    fn migrate_storage(&mut self, v: EtcdVersion) {
        self.steps.push(Step::MigrateStorage {
            from: self.at,
            at: v,
            cut_snapshot: false,
        });
        self.at = VersionFile {
            version: v,
            storage: Storage::Etcd3,
        };
        self.migrated = true;
        self.need_snapshot_fix = true;
    }

    /// One release up, in the storage the data is in.
    fn upgrade(&mut self, v: EtcdVersion) -> Result<(), PlanError> {
        let storage = self.at.storage;
        storage_servable(v, storage).map_err(|why| PlanError::StorageUnservable {
            version: v,
            storage,
            why,
        })?;
        let crossing_into_35 =
            self.at.version < EtcdVersion::new(3, 5, 0) && v >= EtcdVersion::new(3, 5, 0);
        if crossing_into_35 && self.need_snapshot_fix {
            mark_snapshot_cut(&mut self.steps, self.at, self.bundled)?;
            self.need_snapshot_fix = false;
        }
        let to = VersionFile {
            version: v,
            storage,
        };
        self.steps.push(Step::Upgrade {
            from: self.at,
            to,
            cut_snapshot: false,
        });
        self.at = to;
        Ok(())
    }
}

fn plan_forward(
    current: VersionFile,
    target: VersionFile,
    bundled: &BundledVersions,
    facts: DataFacts,
) -> Result<Vec<Step>, PlanError> {
    if current.storage == Storage::Etcd3 && target.storage == Storage::Etcd2 {
        return Err(PlanError::Unsupported {
            from: current,
            to: target,
        });
    }
    let versions = forward_versions(current.version, target.version, bundled)?;
    let migrate_storage = current.storage == Storage::Etcd2 && target.storage == Storage::Etcd3;
    let mut walk = Forward {
        bundled,
        steps: Vec::new(),
        at: current,
        // etcd2 -> etcd3 happens at the first 3.0-3.4 release: the current one if it qualifies.
        migrated: !migrate_storage,
        need_snapshot_fix: facts.boot_cluster_version_v2,
    };
    // When the current minor is not bundled, the first step's release migrates instead.
    let current_runner = runner_for(current.version, bundled)
        .ok()
        .filter(|_| has_etcdctl_migrate(current.version));
    if let (true, Some(runner)) = (migrate_storage, current_runner) {
        walk.migrate_storage(runner);
    }
    let no_release = PlanError::NoStorageMigrationRelease {
        from: current,
        to: target,
    };
    for v in versions {
        if !walk.migrated && has_etcdctl_migrate(v) {
            walk.migrate_storage(v);
        } else if !walk.migrated && v.major >= 3 {
            return Err(no_release);
        } else {
            walk.upgrade(v)?;
        }
    }
    if !walk.migrated {
        return Err(no_release);
    }
    Ok(walk.steps)
}

/// Makes the step before the first 3.5+ step cut a snapshot, or adds a pass at the current
/// release when the data is already there.
fn mark_snapshot_cut(
    steps: &mut Vec<Step>,
    at: VersionFile,
    bundled: &BundledVersions,
) -> Result<(), PlanError> {
    match steps.last_mut() {
        Some(Step::Upgrade { cut_snapshot, .. })
        | Some(Step::MigrateStorage { cut_snapshot, .. }) => {
            *cut_snapshot = true;
        }
        _ => {
            let runner = runner_for(at.version, bundled)?;
            let to = VersionFile {
                version: runner,
                storage: at.storage,
            };
            steps.push(Step::Upgrade {
                from: at,
                to,
                cut_snapshot: true,
            });
        }
    }
    Ok(())
}

fn plan_rollback(
    current: VersionFile,
    target: VersionFile,
    bundled: &BundledVersions,
) -> Result<Vec<Step>, PlanError> {
    let unsupported = || PlanError::Unsupported {
        from: current,
        to: target,
    };
    if current.storage != Storage::Etcd3 || current.version.major != 3 {
        return Err(unsupported());
    }
    if current.version.minor_line() >= Minor::new(3, 6) {
        // etcd downgrades one minor at a time.
        return Err(PlanError::RollbackFrom36 {
            from: current,
            to: target,
            to_minor: Minor::new(3, current.version.minor - 1),
        });
    }
    let to_etcd2 = match (target.storage, target.version) {
        (Storage::Etcd2, v) if v == ROLLBACK_ETCD2_VERSION => true,
        (Storage::Etcd3, v) if v.major == 3 => false,
        _ => return Err(unsupported()),
    };
    // Minor lines from the current one down to the last etcd3 line: 3.0 for a rollback to etcd2.
    let floor = if to_etcd2 {
        Minor::new(3, 0)
    } else {
        target.version.minor_line()
    };
    let mut steps = Vec::new();
    let mut from = current.version;
    for minor in (floor.minor..current.version.minor).rev() {
        let m = Minor::new(3, minor);
        let to = if !to_etcd2 && m == target.version.minor_line() {
            if !bundled.contains(target.version) {
                return Err(PlanError::TargetNotBundled {
                    target: target.version,
                    bundled: bundled.clone(),
                });
            }
            target.version
        } else {
            bundled
                .newest_of(m)
                .ok_or_else(|| PlanError::MinorNotBundled {
                    minor: m,
                    from: current.version,
                    to: target.version,
                    bundled: bundled.clone(),
                })?
        };
        let runner = if steps.is_empty() {
            runner_for(from, bundled)?
        } else {
            from
        };
        steps.push(Step::MinorRollback { from: runner, to });
        from = to;
    }
    if to_etcd2 {
        steps.push(Step::RollbackToEtcd2 { from });
    }
    Ok(steps)
}

fn notes_for(current: VersionFile, steps: &[Step], bundled: &BundledVersions) -> Vec<Note> {
    let mut notes = Vec::new();
    let mut seen = BTreeSet::new();
    for s in steps {
        let v = s.runs();
        if v == current.version || !seen.insert(v) {
            continue;
        }
        let m = v.minor_line();
        let skipped: Vec<EtcdVersion> = bundled
            .others_of(m, v)
            .into_iter()
            .filter(|o| *o < v)
            .collect();
        if !skipped.is_empty() {
            notes.push(Note::SkippedPatches {
                minor: m.to_string(),
                used: v,
                skipped,
            });
        }
    }
    let mut at = current.version;
    for s in steps {
        let v = s.runs();
        if at.minor_line() == Minor::new(3, 5)
            && v.minor_line() > at.minor_line()
            && at < ADVISED_35_BEFORE_36
        {
            notes.push(Note::Below35Advice { version: at });
        }
        at = s.outcome().version;
    }
    let mut bad_seen = BTreeSet::new();
    for s in steps {
        let v = s.outcome().version;
        for (lo, hi, advice) in KNOWN_BAD {
            if v >= *lo && v <= *hi && bad_seen.insert(v) {
                notes.push(Note::KnownBad { version: v, advice });
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests;
