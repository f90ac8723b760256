//! The command line, declared with clap. No defaults and no environment here: `config`
//! resolves both, so that an empty env var counts as unset and every default lives in one place.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Brings an etcd data directory from the version that wrote it (version.txt) to
/// TARGET_VERSION/TARGET_STORAGE, one minor release at a time, each step on a private
/// loopback port, recording progress after every step.
#[derive(Debug, Parser)]
#[command(
    name = "etcd-migrate",
    version,
    propagate_version = true,
    max_term_width = 110
)]
#[command(
    after_help = "Every flag falls back to the environment variable named in its help; an empty variable counts \
as unset.\nExit codes: 0 done or nothing to do; 1 a step failed (data is as of the last recorded step); \
2 bad input or unsupported path (nothing touched); 3 data dir busy (locked, or an etcd runs on it)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: Opts,
}

/// What to do; `migrate` when none is given.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate the data dir to the target version and storage (the default).
    Migrate,
    /// Migrate, then exec etcd-<target> with the given etcd flags in this same process.
    Run {
        /// Flags for the final etcd, after `--`.
        #[arg(last = true, allow_hyphen_values = true, value_name = "ETCD_FLAGS")]
        etcd_args: Vec<OsString>,
    },
    /// Show what migrate would do; touches nothing.
    Plan {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show the recorded version, recent steps, backups and any lock holder.
    Status {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Take a snapshot of a running member, verify it with our own readers against the member's
    /// HashKV, keep the newest --keep; with --every, again and again (a sidecar).
    Snapshot(SnapshotArgs),
    /// Put a backup (a name listed by `status`) back as the data dir; the current data is kept as a backup.
    Restore {
        /// Backup directory name or path, e.g. data.backup-3.0.17-etcd3-20261125T031200Z.
        backup: PathBuf,
    },
}

/// Options of `snapshot`; each names its environment fallback.
#[derive(Debug, Args, Default, Clone)]
pub struct SnapshotArgs {
    /// Client URL of the member to snapshot [env: SNAPSHOT_ENDPOINT; default http://127.0.0.1:2379]
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Directory the snapshots go to, created if missing [env: SNAPSHOT_DIR]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Keep this member's newest N verified snapshots there, removing older ones [env: SNAPSHOT_KEEP; default 10]
    #[arg(long, value_name = "N")]
    pub keep: Option<String>,
    /// Take one every DURATION (e.g. 30m) until stopped, instead of once [env: SNAPSHOT_EVERY]
    #[arg(long, value_name = "DURATION")]
    pub every: Option<String>,
}

/// Output format of `plan` and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Options shared by every subcommand; each names its environment fallback.
#[derive(Debug, Args, Default)]
pub struct Opts {
    /// Version to bring the data to, X.Y.Z [env: TARGET_VERSION]
    #[arg(long, global = true, value_name = "X.Y.Z")]
    pub target_version: Option<String>,
    /// Storage to bring the data to: etcd2 or etcd3 [env: TARGET_STORAGE]
    #[arg(long, global = true, value_name = "etcd2|etcd3")]
    pub target_storage: Option<String>,
    /// The etcd data directory [env: DATA_DIRECTORY]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Member name [env: ETCD_NAME; default etcd-$ETCD_HOSTNAME, else etcd-$HOSTNAME]
    #[arg(long, global = true)]
    pub name: Option<String>,
    /// Private client port of each step's etcd [default 18629; 18631 if the data dir path contains "event"]
    #[arg(long, global = true)]
    pub port: Option<u16>,
    /// Peer port [default 2380; 2381 if the data dir path contains "event"]
    #[arg(long, global = true)]
    pub peer_port: Option<u16>,
    /// Client URLs of each step's etcd, loopback only [env: LISTEN_CLIENT_URLS; default http://127.0.0.1:<port>]
    #[arg(long, global = true, value_name = "URLS")]
    pub listen_client_urls: Option<String>,
    /// Peer URLs to listen on [env: LISTEN_PEER_URLS; default http://localhost:<peer-port>]
    #[arg(long, global = true, value_name = "URLS")]
    pub listen_peer_urls: Option<String>,
    /// Peer URLs to advertise [env: INITIAL_ADVERTISE_PEER_URLS; default the listen peer URLs]
    #[arg(long, global = true, value_name = "URLS")]
    pub initial_advertise_peer_urls: Option<String>,
    /// Cluster members, name=peerURL,... [env: INITIAL_CLUSTER; default <name>=http://localhost:<peer-port>]
    #[arg(long, global = true, value_name = "NAME=URL,...")]
    pub initial_cluster: Option<String>,
    /// Key prefix of the Kubernetes data [env: ETCD_DATA_PREFIX; default /registry]
    #[arg(long, global = true, value_name = "PREFIX")]
    pub etcd_data_prefix: Option<String>,
    /// Directory whose keys carry TTLs in Kubernetes [env: TTL_KEYS_DIRECTORY; default <prefix>/events]
    #[arg(long, global = true, value_name = "PREFIX")]
    pub ttl_keys_directory: Option<String>,
    /// Which TTL keys get leases on etcd2 -> etcd3: all, or only those under --ttl-keys-directory [env: TTL_SCOPE; default all]
    #[arg(long, global = true, value_name = "all|directory")]
    pub ttl_scope: Option<String>,
    /// Remaining TTLs are rounded up to this many seconds before leases are granted [env: TTL_GRANULARITY; default 1]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub ttl_granularity: Option<String>,
    /// Directory holding etcd-<ver>, etcdctl-<ver> and etcdutl-<ver> [env: ETCD_BIN_DIR; default /usr/local/bin]
    #[arg(long, global = true, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Versions to use, space or comma separated [env: BUNDLED_VERSIONS; default every etcd-<X.Y.Z> in the bin dir]
    #[arg(long, global = true, value_name = "LIST")]
    pub bundled_versions: Option<String>,
    /// Extra flags for each private etcd, shell-split, e.g. peer TLS flags [env: ETCD_CREDS]
    #[arg(long, global = true, value_name = "FLAGS", allow_hyphen_values = true)]
    pub etcd_server_extra_args: Option<String>,
    /// How long a step's etcd may take to accept a write, e.g. 120s or 2m [env: HEALTH_TIMEOUT; default 2m]
    #[arg(long, global = true, value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// How long etcd gets to stop after SIGTERM before SIGKILL [env: STOP_GRACE; default 30s]
    #[arg(long, global = true, value_name = "DURATION")]
    pub stop_grace: Option<String>,
    /// Keep at most this many backups of this data dir, removing the oldest [env: BACKUP_RETENTION; default keep all]
    #[arg(long, global = true, value_name = "N")]
    pub backup_retention: Option<String>,
    /// Child (etcd, etcdctl) output in our log: all of it, or quiet (only quoted when something fails) [env: CHILD_OUTPUT; default all]
    #[arg(long, global = true, value_name = "all|quiet")]
    pub child_output: Option<String>,
    /// On a data dir with no etcd data whose cluster knows this member as started (its data was
    /// lost): remove it, add it again and sync it from the leader [env: REJOIN_IF_EMPTY; default false]
    #[arg(long, global = true, value_name = "true|false", num_args = 0..=1, default_missing_value = "true")]
    pub rejoin_if_empty: Option<String>,
    /// Client URLs of the other members, comma separated, for a rejoin [env: ETCD_CLUSTER_ENDPOINTS; default: what the peers publish]
    #[arg(long, global = true, value_name = "URLS")]
    pub cluster_endpoints: Option<String>,
    /// On a data dir with no etcd data: restore this snapshot file (from `etcd-migrate snapshot`
    /// or `etcdctl snapshot save`) as this member, alone in a new cluster; a data dir restored
    /// from the same file (by SHA-256) is left as it is [env: RESTORE_SNAPSHOT]
    #[arg(long, global = true, value_name = "FILE")]
    pub restore_snapshot: Option<PathBuf>,
    /// Log format: text or json [env: LOG_FORMAT; default text]
    #[arg(long, global = true, value_name = "text|json")]
    pub log_format: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_declaration_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_with_an_env_fallback_names_it_in_help() {
        let want = [
            ("target-version", "TARGET_VERSION"),
            ("target-storage", "TARGET_STORAGE"),
            ("data-dir", "DATA_DIRECTORY"),
            ("name", "ETCD_NAME"),
            ("listen-client-urls", "LISTEN_CLIENT_URLS"),
            ("listen-peer-urls", "LISTEN_PEER_URLS"),
            ("initial-advertise-peer-urls", "INITIAL_ADVERTISE_PEER_URLS"),
            ("initial-cluster", "INITIAL_CLUSTER"),
            ("etcd-data-prefix", "ETCD_DATA_PREFIX"),
            ("ttl-keys-directory", "TTL_KEYS_DIRECTORY"),
            ("bin-dir", "ETCD_BIN_DIR"),
            ("bundled-versions", "BUNDLED_VERSIONS"),
            ("etcd-server-extra-args", "ETCD_CREDS"),
        ];
        let cmd = Cli::command();
        for (flag, env) in want {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("--{flag}"));
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.contains(&format!("env: {env}")),
                "--{flag} help lacks {env}: {help}"
            );
        }
    }

    #[test]
    fn run_takes_etcd_flags_after_double_dash() {
        let cli = Cli::try_parse_from([
            "etcd-migrate",
            "run",
            "--port",
            "1",
            "--",
            "--name",
            "x",
            "--data-dir=/d",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Run { etcd_args }) => {
                assert_eq!(etcd_args, ["--name", "x", "--data-dir=/d"])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cli.opts.port, Some(1));
    }
}
