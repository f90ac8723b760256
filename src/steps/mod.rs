//! One module per kind of step. Each runs against real etcd processes through `etcd/` and
//! leaves recording version.txt to the executor (or, for staged steps, to the swap).

pub mod backup;
pub mod minor_rollback;
pub mod swap;
pub mod to_etcd2;
pub mod to_etcd3;
pub mod upgrade;

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::Config;
use crate::datadir::DataDirError;
use crate::etcd::bundle::Bundle;
use crate::etcd::ctl::CtlError;
use crate::etcd::fingerprint::Fingerprint;
use crate::etcd::server::{EtcdError, Launch};
use crate::fsutil::FsError;
use crate::progress::ProgressError;

/// What every step gets.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub bundle: &'a Bundle,
    pub data_dir: &'a Path,
    /// Members in the cluster: with more than one, other members take writes during our step,
    /// so key counts are not compared.
    pub members: usize,
}

impl Ctx<'_> {
    pub fn work_dir(&self) -> PathBuf {
        crate::datadir::work_dir(self.data_dir)
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
    #[error("{0}")]
    Other(String),
    /// The step found, before touching the data dir, that it must not run (exit 2).
    #[error("{0}")]
    Refused(String),
}

/// What a step did, for the log and the journal.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// The store after the step, when it was read.
    pub fingerprint: Option<Fingerprint>,
    /// Extra facts (TTL counts, backup path, sub-step timings).
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Checks a step's result against the previous step's (single-member clusters only).
pub fn verify_against(
    step: &str,
    before: Option<&Fingerprint>,
    after: &Fingerprint,
) -> Result<(), StepError> {
    use crate::etcd::fingerprint::{compare, Comparison};
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
