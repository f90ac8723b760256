//! etcdctl and etcdutl runs: offline `migrate`, `snapshot save`, `snapshot restore`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::config::Config;
use crate::version::EtcdVersion;

use super::bundle::{Bundle, Tool};
use super::process::{run_tool, SpawnError, ToolOutput};
use super::server::child_env;
use crate::release::{Release, RestoreTool};

/// How long an offline tool may run before we give up on it.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A tool run failed.
#[derive(Debug, Error)]
pub enum CtlError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{path} {what} failed ({status}); its last lines:\n{tail}")]
    Failed {
        path: PathBuf,
        what: &'static str,
        status: String,
        tail: String,
    },
}

async fn run(
    bundle: &Bundle,
    config: &Config,
    tool: Tool,
    v: EtcdVersion,
    what: &'static str,
    args: Vec<String>,
) -> Result<ToolOutput, CtlError> {
    let path = bundle.path(tool, v);
    let (k, val) = Release::new(v).etcdctl_api_v3_env();
    let env = child_env(config, &args, "ETCDCTL_", &[(k, val)]);
    let label = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = run_tool(
        &path,
        &args,
        &env,
        label,
        TOOL_TIMEOUT,
        &config.child_output,
    )
    .await?;
    tracing::info!(tool = %path.display(), what, elapsed_ms = out.elapsed.as_millis() as u64, status = %out.describe(), "tool finished");
    if !out.success() {
        return Err(CtlError::Failed {
            path,
            what,
            status: out.describe(),
            tail: out.tail.last(12),
        });
    }
    Ok(out)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `etcdctl migrate`: converts the v2 store of a stopped data dir into the v3 backend, in place.
pub async fn migrate(
    bundle: &Bundle,
    config: &Config,
    v: EtcdVersion,
    data_dir: &Path,
) -> Result<ToolOutput, CtlError> {
    run(
        bundle,
        config,
        Tool::Etcdctl,
        v,
        "migrate",
        vec!["migrate".into(), "--data-dir".into(), s(data_dir)],
    )
    .await
}

/// `etcdctl snapshot save` from a running member.
pub async fn snapshot_save(
    bundle: &Bundle,
    config: &Config,
    v: EtcdVersion,
    endpoint: &str,
    file: &Path,
) -> Result<ToolOutput, CtlError> {
    let args = vec![
        "--endpoints".into(),
        endpoint.into(),
        "snapshot".into(),
        "save".into(),
        s(file),
    ];
    run(bundle, config, Tool::Etcdctl, v, "snapshot save", args).await
}

/// `snapshot restore` with release `v`'s tool into a new data dir, keeping the member's identity
/// (name, peer URLs, initial cluster). `file` is a saved snapshot, or (`copied_from_data_dir`)
/// the backend of a cleanly stopped member, which carries no integrity hash: every release's
/// restore reads the file only (O_RDONLY) and copies it. `alone`: as a cluster of this member
/// only (recovery from a backup), not the manifest's initial cluster.
pub async fn snapshot_restore(
    bundle: &Bundle,
    config: &Config,
    v: EtcdVersion,
    file: &Path,
    data_dir: &Path,
    skip_hash_check: bool,
    alone: bool,
) -> Result<ToolOutput, CtlError> {
    let m = &config.member;
    let tool = match Release::new(v).restore_tool() {
        RestoreTool::Etcdctl => Tool::Etcdctl,
        RestoreTool::Etcdutl => Tool::Etcdutl,
    };
    let args = vec![
        "snapshot".into(),
        "restore".into(),
        s(file),
        "--data-dir".into(),
        s(data_dir),
        "--name".into(),
        m.name.clone(),
        "--initial-cluster".into(),
        if alone {
            m.advertised_peer_urls()
                .iter()
                .map(|u| format!("{}={u}", m.name))
                .collect::<Vec<_>>()
                .join(",")
        } else {
            m.initial_cluster.clone()
        },
        "--initial-advertise-peer-urls".into(),
        m.advertise_peer_urls.clone(),
    ];
    let mut args = args;
    // A new cluster's id comes from its token: the one the pod's etcd would use (etcd reads
    // ETCD_INITIAL_CLUSTER_TOKEN for --initial-cluster-token), else etcd's default.
    if let Some((_, token)) = config
        .child_env
        .iter()
        .find(|(k, v)| k == "ETCD_INITIAL_CLUSTER_TOKEN" && !v.is_empty())
    {
        args.push("--initial-cluster-token".into());
        args.push(token.to_string_lossy().into_owned());
    }
    if skip_hash_check {
        args.push("--skip-hash-check".into());
    }
    run(bundle, config, tool, v, "snapshot restore", args).await
}
