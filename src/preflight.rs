//! Everything checked before the lock is taken and the data dir touched: the plan's notes, its
//! binaries and flags, free ports, that a staged step can swap, and data a v2 store cannot hold.
//! Each refusal leaves the data dir exactly as it was.

use std::net::TcpListener;

use crate::config::{split_url, Config};
use crate::layout::Layout;
use crate::plan::{Plan, PlanError, Step};
use crate::release::Tool;
use crate::run::{Mode, Prepared, RunError};
use crate::steps::{self, Refusal};
use crate::version::EtcdVersion;

/// Everything checked before the lock is taken and anything touched: the plan's notes, its
/// binaries and flags, that a staged step can swap, and for `run` the binary it execs.
pub fn preflight(config: &Config, prepared: &Prepared, mode: Mode) -> Result<(), RunError> {
    let target = prepared.target;
    match &prepared.plan {
        Some(p) => {
            for note in &p.notes {
                tracing::warn!("{note}");
            }
            prepared
                .bundle
                .preflight(p.steps.iter().flat_map(Step::tools))?;
            for step in &p.steps {
                check_flags_known(step.runs(), &config.extra_args, "ETCD_CREDS")?;
            }
            check_swappable(&config.layout(), &p.steps)?;
        }
        None if !prepared.bundle.versions.contains(target.version) => {
            return Err(PlanError::TargetNotBundled {
                target: target.version,
                bundled: prepared.bundle.versions.clone(),
            }
            .into());
        }
        None => {}
    }
    if mode == Mode::Run {
        // `run` ends in exec etcd-<target>: make sure it is there before touching anything.
        prepared
            .bundle
            .preflight([(Tool::Etcd, target.version, format!("exec etcd {target}"))])?;
    }
    Ok(())
}

/// Refuses, before anything is touched, flags that `release` is known not to accept.
pub fn check_flags_known(
    release: EtcdVersion,
    args: &[String],
    whence: &'static str,
) -> Result<(), RunError> {
    match crate::release::Release::new(release).unknown_flags(args) {
        Some(flags) if !flags.is_empty() => Err(RunError::UnknownFlags {
            release,
            flags,
            whence,
        }),
        _ => Ok(()),
    }
}

pub fn check_ports_free(config: &Config) -> Result<(), RunError> {
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
fn check_swappable(layout: &Layout, steps: &[Step]) -> Result<(), RunError> {
    use std::os::unix::fs::MetadataExt;
    if !steps.iter().any(|s| s.rewrites_member_alone()) {
        return Ok(());
    }
    let data_dir = layout.data_dir();
    let (Ok(d), Ok(p)) = (
        std::fs::metadata(data_dir),
        std::fs::metadata(layout.parent()),
    ) else {
        return Ok(());
    };
    if d.dev() != p.dev() {
        return Err(RunError::Refused(Refusal::NotSwappable {
            data_dir: data_dir.to_path_buf(),
        }));
    }
    Ok(())
}

/// The native rollback refuses data a v2 store cannot hold (Kubernetes protobuf values first of
/// all) before touching anything. Minor rollbacks before it keep every value, so the current
/// data is what is checked.
pub fn refuse_unrepresentable(config: &Config, plan: &Plan) -> Result<(), RunError> {
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
    steps::to_etcd2::refuse_unrepresentable(&config.layout(), &config.data_prefix)
        .map_err(RunError::Refused)
}
