//! One module per kind of step. Each runs against real etcd processes through `etcd/` and
//! leaves recording version.txt to the executor (or, for staged steps, to the swap).

pub mod backend;
pub mod from_snapshot;
pub mod minor_rollback;
pub mod to_etcd2;
pub mod to_etcd3;
pub mod upgrade;

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::Config;
use crate::datadir::DataDirError;
use crate::etcd::bundle::Bundle;
use crate::etcd::ctl::CtlError;
use crate::etcd::server::{EtcdError, Launch};
use crate::fingerprint::Fingerprint;
use crate::fsutil::FsError;
use crate::layout::Layout;
use crate::progress::ProgressError;
use crate::version::EtcdVersion;

/// What every step gets.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub bundle: &'a Bundle,
    /// The data dir and its side paths.
    pub layout: &'a Layout,
    pub data_dir: &'a Path,
    /// Members in the cluster: with more than one, other members take writes during our step,
    /// so key counts are not compared.
    pub members: usize,
}

impl Ctx<'_> {
    pub fn work_dir(&self) -> PathBuf {
        self.layout.work_dir()
    }

    /// Starting etcd `version` as this member on `data_dir`, v3 store, nothing extra (callers
    /// change what differs).
    pub fn launch_v3<'a>(
        &'a self,
        config: &'a Config,
        data_dir: &'a Path,
        version: crate::version::EtcdVersion,
    ) -> Launch<'a> {
        Launch {
            bundle: self.bundle,
            config,
            data_dir,
            version,
            storage: crate::version::Storage::Etcd3,
            serve_v2: false,
            snapshot_count: None,
            single_member: self.members == 1,
            bulk_txns: false,
            join: None,
        }
    }
}

/// A step failed; the data is as of the last recorded step.
#[derive(Debug, Error)]
pub enum StepError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Ctl(#[from] CtlError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("after {step} the data does not match what was there before: {what}; nothing was recorded, the data dir \
             is as of the last recorded version")]
    Verify { step: String, what: String },
    /// Reading a member's files (WAL, backend, what the step wrote) failed.
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A thread of the step ended in a panic.
    #[error("the thread {what} panicked")]
    ThreadPanicked { what: &'static str },
    #[error("{member} holds a cluster of {members} members")]
    ClusterOfMany { member: PathBuf, members: usize },
    #[error("etcd {release} ran on {data_dir} but did not commit its backend: {lag}")]
    BackendNotCommitted {
        release: EtcdVersion,
        data_dir: PathBuf,
        lag: crate::datadir::UnappliedWrites,
    },
    #[error("writing the v2 member for {member}: {source}")]
    V2Write {
        member: PathBuf,
        source: crate::storage::v2member::V2MemberError,
    },
    #[error(
        "the v2 member written does not read back as written (snapshot {term}/{index}, marker found: {marker}, ids {ids:?})"
    )]
    ReadBack {
        term: u64,
        index: u64,
        marker: bool,
        ids: Option<(u64, u64)>,
    },
    #[error("the pass at {at} did not cut a snapshot: etcd 3.5+ would still boot this data as a 2.x cluster")]
    NoSnapshotCut { at: crate::version::VersionFile },
    #[error(transparent)]
    Capture(#[from] to_etcd3::CaptureError),
    #[error("{label} serves no v3 API")]
    NoV3Api { label: String },
    #[error("{label}: reattaching TTLs: {source}")]
    Reattach {
        label: String,
        source: to_etcd3::CaptureError,
    },
    /// The step found, before touching the data dir, that it must not run (exit 2).
    #[error(transparent)]
    Refused(Refusal),
}

/// Why a step (or a run) must not go ahead: found before anything was touched (exit 2).
#[derive(Debug, Error)]
pub enum Refusal {
    #[error("{}", found.message(prefix))]
    Unrepresentable {
        prefix: String,
        found: crate::storage::v2export::Unrepresentable,
    },
    #[error("rollback to etcd2 refused, nothing was changed: {source}")]
    V2Store {
        source: crate::storage::v2member::V2MemberError,
    },
    #[error(
        "rollback to etcd2 refused, nothing was changed: {lag}. Put etcd-{release} in {bin_dir} so that etcd-migrate lets \
         it apply them first, or start etcd {release} on {data_dir} once and stop it with SIGTERM; then roll back again"
    )]
    WalTail {
        lag: crate::datadir::UnappliedWrites,
        release: EtcdVersion,
        bin_dir: PathBuf,
        data_dir: PathBuf,
    },
    #[error("cannot read {member}: {source}")]
    Unreadable {
        member: PathBuf,
        source: crate::storage::mvcc::MvccError,
    },
    #[error(
        "data dir {data_dir} is the root of a mounted volume; this step builds the new data beside it and swaps it in by \
         rename, which needs the data dir to be a directory inside the volume (mount its parent instead)"
    )]
    NotSwappable { data_dir: PathBuf },
}

impl StepError {
    /// A failed read of `path`, saying what was being read.
    pub fn read(
        what: &'static str,
        path: &Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StepError {
        StepError::Read {
            what,
            path: path.to_path_buf(),
            source: source.into(),
        }
    }
}

/// What the step after is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baseline {
    /// Live keys and values as served (v2 stores, and etcd3 data no step read offline).
    Keys(Fingerprint),
    /// Revisions of the etcd3 backend, read offline.
    Backend(backend::Digested),
}

impl Baseline {
    /// The live-key fingerprint, when that is what this baseline holds.
    pub fn keys(&self) -> Option<&Fingerprint> {
        match self {
            Baseline::Keys(f) => Some(f),
            Baseline::Backend(_) => None,
        }
    }
    /// The backend digest, when that is what this baseline holds.
    pub fn backend(&self) -> Option<&backend::Digested> {
        match self {
            Baseline::Backend(d) => Some(d),
            Baseline::Keys(_) => None,
        }
    }
}

/// What a step did, for the log and the journal.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// What the step after compares with, when this one established it.
    pub baseline: Option<Baseline>,
    /// Keys the data holds after the step, when counted.
    pub keys: Option<u64>,
    /// Extra facts (TTL counts, backup path, sub-step timings).
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Checks a step's result against the previous step's (single-member clusters only).
pub fn verify_against(
    step: &str,
    before: Option<&Fingerprint>,
    after: &Fingerprint,
) -> Result<(), StepError> {
    use crate::fingerprint::{compare, Comparison};
    let Some(before) = before else {
        tracing::info!(
            step,
            keys = after.keys,
            "key count recorded as the baseline for the next step"
        );
        return Ok(());
    };
    match compare(before, after) {
        Comparison::Same => {
            tracing::info!(
                step,
                keys = after.keys,
                "keys and values match the previous step"
            );
            Ok(())
        }
        Comparison::Expired { gone } => {
            tracing::warn!(
                step,
                keys = after.keys,
                expired = gone,
                "keys with a TTL expired during the step, as etcd does"
            );
            Ok(())
        }
        Comparison::Differs(what) => Err(StepError::Verify {
            step: step.to_string(),
            what,
        }),
    }
}

/// A real member for stage tests: a fixture written by an old etcd release, unpacked into a
/// temp dir, with a config naming it and an empty bundle (no etcd can start).
#[cfg(test)]
pub(crate) mod fixture {
    use std::path::PathBuf;

    use crate::config::{resolve, Config, Env};
    use crate::etcd::bundle::Bundle;

    pub struct Member {
        pub _dir: tempfile::TempDir,
        pub config: Config,
        pub bundle: Bundle,
        pub layout: crate::layout::Layout,
    }

    impl Member {
        /// `name` is a `../shared/fixtures/<name>.tar.gz`, unpacked to `data/`.
        pub fn unpack(name: &str) -> Member {
            let dir = tempfile::tempdir().unwrap();
            let tarball = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures")
                .join(format!("{name}.tar.gz"));
            let st = std::process::Command::new("tar")
                .arg("xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "unpacking {}", tarball.display());
            let data = dir.path().join("data");
            let env = Env::from_pairs([
                ("DATA_DIRECTORY", data.to_str().unwrap()),
                ("ETCD_NAME", "etcd-test"),
            ]);
            let config = resolve(&Default::default(), &env, false).unwrap();
            let bundle = Bundle {
                dir: dir.path().join("no-bundle"),
                versions: Default::default(),
            };
            let layout = config.layout();
            Member {
                _dir: dir,
                config,
                bundle,
                layout,
            }
        }

        pub fn ctx(&self) -> super::Ctx<'_> {
            super::Ctx {
                config: &self.config,
                bundle: &self.bundle,
                layout: &self.layout,
                data_dir: &self.config.data_dir,
                members: 1,
            }
        }
    }
}
