//! Release facts, pure: what each etcd release and minor line can serve and do, the flags it
//! takes, its tools, and its pitfalls (3.5's "not capable" on v2-era data, the 3.5.0-3.5.2
//! consistency bug, 3.5.20 before 3.6, 3.6.11 before 3.7). Learned from each release's `--help`
//! (../shared/fixtures/etcd-help), from running them, and for 3.6/3.7 from etcd's source at
//! their tags. Used by the planner and by `etcd/`; imports nothing but `version`.

use std::collections::BTreeSet;
use std::fmt;

use crate::version::{EtcdVersion, Minor, Storage};

/// A binary a release ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Etcd,
    Etcdctl,
    Etcdutl,
}

impl Tool {
    /// The file name's prefix in the bin dir: `etcd-<ver>`, `etcdctl-<ver>`, `etcdutl-<ver>`.
    pub fn prefix(self) -> &'static str {
        match self {
            Tool::Etcd => "etcd",
            Tool::Etcdctl => "etcdctl",
            Tool::Etcdutl => "etcdutl",
        }
    }
}

/// The oldest 3.5 patch a member may leave for 3.6: 3.5.1-3.5.19 can fail the 3.6 upgrade with
/// "membership: too many learner member in cluster" (etcd-io/etcd#19557, fixed in 3.5.20).
pub const MIN_35_BEFORE_36: EtcdVersion = EtcdVersion::new(3, 5, 20);

/// The oldest patch of a minor that may be left for the next minor, and why: the planner steps
/// through the newest bundled patch first when the data is older.
pub const LEAVE_MINOR_FROM: &[(EtcdVersion, &str)] = &[
    (
        MIN_35_BEFORE_36,
        "3.5.1-3.5.19 can fail the 3.6 upgrade with \"membership: too many learner member in cluster\" (etcd-io/etcd#19557)",
    ),
    (
        EtcdVersion::new(3, 6, 11),
        "etcd's 3.7 upgrade guide requires 3.6.11 or later before 3.7",
    ),
];

/// The 3.5 patch etcd's 3.6 upgrade guide asks for today: 3.5.24 (learner membership received by
/// snapshot, etcd-io/etcd#20793), 3.5.26 (zombie members) and 3.5.32 (`etcdutl check v2store`
/// reads the WAL too) each fixed a way the 3.6 upgrade fails. Below it the plan warns.
pub const ADVISED_35_BEFORE_36: EtcdVersion = EtcdVersion::new(3, 5, 32);

/// The newest minor whose flags and data rules etcd-migrate knows (from etcd's source at its
/// tags: no binary newer than 3.5 can be had here).
pub const NEWEST_KNOWN_MINOR: Minor = Minor::new(3, 7);

/// Last minor of each past major line: the way from major N to N+1 passes through it.
pub const LAST_MINOR_OF_MAJOR: &[(u32, u32)] = &[(2, 3)];

/// Releases known to be unsafe, with the advice given when a plan runs one.
pub const KNOWN_BAD: &[(EtcdVersion, EtcdVersion, &str)] = &[(
    EtcdVersion::new(3, 5, 0),
    EtcdVersion::new(3, 5, 2),
    "etcd 3.5.0-3.5.2 can lose data consistency when a member crashes under load (etcd-io/etcd#13766); use 3.5.3 or later",
)];

/// The etcd releases whose `etcd-<ver>` binary is in the bin dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundledVersions(BTreeSet<EtcdVersion>);

impl BundledVersions {
    pub fn new(versions: impl IntoIterator<Item = EtcdVersion>) -> Self {
        BundledVersions(versions.into_iter().collect())
    }
    pub fn contains(&self, v: EtcdVersion) -> bool {
        self.0.contains(&v)
    }
    /// The newest bundled patch release of a minor line.
    pub fn newest_of(&self, m: Minor) -> Option<EtcdVersion> {
        self.0.iter().rev().find(|v| v.minor_line() == m).copied()
    }
    /// Bundled patches of a minor line other than `chosen`, oldest first.
    pub fn others_of(&self, m: Minor, chosen: EtcdVersion) -> Vec<EtcdVersion> {
        self.0
            .iter()
            .filter(|v| v.minor_line() == m && **v != chosen)
            .copied()
            .collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = EtcdVersion> + '_ {
        self.0.iter().copied()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for BundledVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let list: Vec<String> = self.0.iter().map(|v| v.to_string()).collect();
        f.write_str(&list.join(" "))
    }
}

/// Whether a release can serve data kept in this storage.
pub fn storage_servable(v: EtcdVersion, s: Storage) -> Result<(), &'static str> {
    match (s, v.major) {
        (Storage::Etcd3, 0..=2) => Err("etcd3 storage needs etcd 3.0 or later"),
        (Storage::Etcd2, 3) if v.minor >= 6 => Err("the v2 store was removed in etcd 3.6"),
        (Storage::Etcd2, 0..=3) => Ok(()),
        (Storage::Etcd2, _) => Err("the v2 store was removed in etcd 3.6"),
        (Storage::Etcd3, _) => Ok(()),
    }
}

/// Releases whose etcdctl has `migrate` (etcd2 -> etcd3, offline).
pub fn has_etcdctl_migrate(v: EtcdVersion) -> bool {
    v.major == 3 && v.minor <= 4
}

/// Where a minor's flag list was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagSource {
    /// Its `etcd --help` (../shared/fixtures/etcd-help), which may leave out undocumented flags.
    Help,
    /// Every flag registration in etcd's source at the minor's newest tag
    /// (server/etcdmain/config.go and server/embed/config.go): complete.
    Source,
}

/// How one minor line's `etcd` flags (without the leading dashes) differ from the minor before.
#[derive(Debug, Clone, Copy)]
pub struct FlagTable {
    pub major: u32,
    pub minor: u32,
    pub source: FlagSource,
    added: &'static str,
    removed: &'static str,
}

/// The flags one minor accepts.
#[derive(Debug, Clone)]
pub struct Flags {
    pub source: FlagSource,
    set: std::collections::BTreeSet<&'static str>,
}

impl Flags {
    pub fn has(&self, flag: &str) -> bool {
        self.set.contains(flag)
    }
    pub fn iter(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.set.iter().copied()
    }
}

/// The flags of every minor etcd-migrate knows, oldest first, each as what it added to and
/// removed from the minor before. 2.2 to 3.4 from their `--help`; 3.5 from its help texts and
/// the v3.5.33 source (the union: 3.5.0 has 10 fewer than 3.5.33); 3.6 from v3.6.14 and 3.7
/// from v3.7.1 (no 3.6 or 3.7 binary can be had here); from 3.5 on, every flag registration in
/// server/etcdmain/config.go and server/embed/config.go. So the entries read as each minor's
/// changes: 3.6 drops `--enable-v2`, `--experimental-enable-v2v3` and the v2 proxy flags and
/// gives each `--experimental-X` a plain `--X` (both accepted in 3.6; only the new one in
/// 3.7, which also drops `--discovery` and `--discovery-proxy`). The `--snapshot-count`
/// default falls from 100000 to 10000 at 3.6.
#[rustfmt::skip]
pub const FLAG_TABLES: &[FlagTable] = &[
    FlagTable {
        major: 2,
        minor: 2,
        source: FlagSource::Help,
        added: "advertise-client-urls ca-file cert-file client-cert-auth cors data-dir debug discovery \
            discovery-fallback discovery-proxy discovery-srv election-timeout experimental-v3demo \
            force-new-cluster heartbeat-interval initial-advertise-peer-urls initial-cluster \
            initial-cluster-state initial-cluster-token key-file listen-client-urls \
            listen-peer-urls log-package-levels name peer-ca-file peer-cert-file \
            peer-client-cert-auth peer-key-file peer-trusted-ca-file proxy proxy-dial-timeout \
            proxy-failure-wait proxy-read-timeout proxy-refresh-interval proxy-write-timeout \
            snapshot-count trusted-ca-file wal-dir",
        removed: "",
    },
    FlagTable {
        major: 2,
        minor: 3,
        source: FlagSource::Help,
        added: "enable-pprof experimental-auto-compaction-retention max-snapshots max-wals \
            strict-reconfig-check",
        removed: "",
    },
    FlagTable {
        major: 3,
        minor: 0,
        source: FlagSource::Help,
        added: "auto-compaction-retention auto-tls peer-auto-tls quota-backend-bytes",
        removed: "experimental-auto-compaction-retention experimental-v3demo",
    },
    FlagTable {
        major: 3,
        minor: 1,
        source: FlagSource::Help,
        added: "initial-election-tick-advance log-output metrics",
        removed: "",
    },
    FlagTable {
        major: 3,
        minor: 2,
        source: FlagSource::Help,
        added: "auth-token cipher-suites enable-v2 experimental-peer-skip-client-san-verification \
            grpc-keepalive-interval grpc-keepalive-min-time grpc-keepalive-timeout \
            max-request-bytes",
        removed: "",
    },
    FlagTable {
        major: 3,
        minor: 3,
        source: FlagSource::Help,
        added: "auth-token-ttl auto-compaction-mode client-crl-file experimental-corrupt-check-time \
            experimental-enable-v2v3 experimental-initial-corrupt-check listen-metrics-urls \
            max-txn-ops peer-cert-allowed-cn peer-crl-file",
        removed: "",
    },
    FlagTable {
        major: 3,
        minor: 4,
        source: FlagSource::Help,
        added: "backend-batch-interval backend-batch-limit bcrypt-cost client-cert-allowed-hostname \
            discovery-srv-name experimental-backend-bbolt-freelist-type \
            experimental-compaction-batch-limit experimental-enable-lease-checkpoint \
            experimental-warning-apply-duration experimental-watch-progress-notify-interval \
            host-whitelist log-level log-outputs logger max-concurrent-streams \
            peer-cert-allowed-hostname pre-vote",
        removed: "ca-file log-output peer-ca-file",
    },
    FlagTable {
        major: 3,
        minor: 5,
        source: FlagSource::Source,
        added: "backend-bbolt-freelist-type client-cert-file client-key-file config-file \
            enable-grpc-gateway enable-log-rotation \
            experimental-bootstrap-defrag-threshold-megabytes \
            experimental-compact-hash-check-enabled experimental-compact-hash-check-time \
            experimental-compaction-sleep-interval experimental-distributed-tracing-address \
            experimental-distributed-tracing-instance-id \
            experimental-distributed-tracing-sampling-rate \
            experimental-distributed-tracing-service-name experimental-downgrade-check-time \
            experimental-enable-distributed-tracing experimental-enable-lease-checkpoint-persist \
            experimental-memory-mlock experimental-snapshot-catchup-entries \
            experimental-stop-grpc-service-on-defrag \
            experimental-txn-mode-write-with-shared-buffer listen-client-http-urls \
            log-rotation-config-json peer-client-cert-file peer-client-key-file raft-read-timeout \
            raft-write-timeout self-signed-cert-validity socket-reuse-address socket-reuse-port \
            tls-max-version tls-min-version unsafe-no-fsync v2-deprecation version",
        removed: "debug experimental-backend-bbolt-freelist-type log-package-levels",
    },
    FlagTable {
        major: 3,
        minor: 6,
        source: FlagSource::Source,
        added: "bootstrap-defrag-threshold-megabytes compact-hash-check-time compaction-batch-limit \
            compaction-sleep-interval corrupt-check-time discovery-cacert discovery-cert \
            discovery-dial-timeout discovery-endpoints discovery-insecure-skip-tls-verify \
            discovery-insecure-transport discovery-keepalive-time discovery-keepalive-timeout \
            discovery-key discovery-password discovery-request-timeout discovery-token \
            discovery-user distributed-tracing-address distributed-tracing-instance-id \
            distributed-tracing-sampling-rate distributed-tracing-service-name \
            downgrade-check-time enable-distributed-tracing \
            experimental-warning-unary-request-duration feature-gates log-format max-learners \
            memory-mlock peer-skip-client-san-verification snapshot-catchup-entries \
            warning-apply-duration warning-unary-request-duration watch-progress-notify-interval",
        removed: "enable-v2 experimental-enable-v2v3 proxy proxy-dial-timeout proxy-failure-wait \
            proxy-read-timeout proxy-refresh-interval proxy-write-timeout",
    },
    FlagTable {
        major: 3,
        minor: 7,
        source: FlagSource::Source,
        added: "",
        removed: "discovery discovery-proxy experimental-bootstrap-defrag-threshold-megabytes \
            experimental-compact-hash-check-enabled experimental-compact-hash-check-time \
            experimental-compaction-batch-limit experimental-compaction-sleep-interval \
            experimental-corrupt-check-time experimental-distributed-tracing-address \
            experimental-distributed-tracing-instance-id \
            experimental-distributed-tracing-sampling-rate \
            experimental-distributed-tracing-service-name experimental-downgrade-check-time \
            experimental-enable-distributed-tracing experimental-enable-lease-checkpoint \
            experimental-enable-lease-checkpoint-persist experimental-initial-corrupt-check \
            experimental-memory-mlock experimental-peer-skip-client-san-verification \
            experimental-snapshot-catchup-entries experimental-stop-grpc-service-on-defrag \
            experimental-txn-mode-write-with-shared-buffer experimental-warning-apply-duration \
            experimental-warning-unary-request-duration \
            experimental-watch-progress-notify-interval",
    },

];

/// Facts about one etcd release that change how we drive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub version: EtcdVersion,
}

/// Operations per transaction our private etcd allows for bulk rewrites, where the flag exists.
pub const BULK_TXN_OPS: usize = 1024;

/// The tool that restores a v3 snapshot into a data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTool {
    /// `ETCDCTL_API=3 etcdctl snapshot restore` (3.0 to 3.4).
    Etcdctl,
    /// `etcdutl snapshot restore` (3.5 and later).
    Etcdutl,
}

impl Release {
    pub fn new(version: EtcdVersion) -> Self {
        Release { version }
    }

    fn at_least(&self, major: u32, minor: u32) -> bool {
        self.version.major > major || (self.version.major == major && self.version.minor >= minor)
    }

    /// Serves the v3 gRPC API (3.0 and later).
    pub fn has_v3_api(&self) -> bool {
        self.at_least(3, 0)
    }

    /// The flag that turns the v2 API on when we need it: 3.4 and 3.5 default to off.
    /// (3.2 and 3.3 have `--enable-v2` defaulting to true; 2.x to 3.1 always serve v2; 3.6 has
    /// no v2 API and no such flag.)
    pub fn v2_flag(&self, serve_v2: bool) -> Option<&'static str> {
        (serve_v2 && self.at_least(3, 4) && !self.at_least(3, 6)).then_some("--enable-v2=true")
    }

    /// The flags this release's minor line accepts, when etcd-migrate knows them.
    pub fn flag_table(&self) -> Option<Flags> {
        let mut set = std::collections::BTreeSet::new();
        for t in FLAG_TABLES {
            set.retain(|f| !t.removed.split_whitespace().any(|r| r == *f));
            set.extend(t.added.split_whitespace());
            if (t.major, t.minor) == (self.version.major, self.version.minor) {
                return Some(Flags {
                    source: t.source,
                    set,
                });
            }
        }
        None
    }

    /// The flags named in `args` that this release does not accept. `None` when its flag list is
    /// unknown or only known from `--help` (which may leave flags out): nothing can be said.
    pub fn unknown_flags(&self, args: &[String]) -> Option<Vec<String>> {
        let table = self
            .flag_table()
            .filter(|t| t.source == FlagSource::Source)?;
        Some(
            crate::flags::flags_in(args)
                .into_iter()
                .filter(|f| !table.has(f))
                .collect(),
        )
    }

    /// etcdctl needs `ETCDCTL_API=3` for v3 commands (3.0 to 3.3); from 3.4 v3 is the default.
    /// Setting it on 3.4+ is harmless, so we always set it for v3 calls.
    pub fn etcdctl_api_v3_env(&self) -> (&'static str, &'static str) {
        ("ETCDCTL_API", "3")
    }

    /// `etcdctl migrate` exists (3.0 to 3.4).
    pub fn has_etcdctl_migrate(&self) -> bool {
        has_etcdctl_migrate(self.version)
    }

    /// The tool its restore runs as.
    pub fn restore_binary(&self) -> Tool {
        match self.restore_tool() {
            RestoreTool::Etcdctl => Tool::Etcdctl,
            RestoreTool::Etcdutl => Tool::Etcdutl,
        }
    }

    /// Which tool restores snapshots.
    pub fn restore_tool(&self) -> RestoreTool {
        if self.at_least(3, 5) {
            RestoreTool::Etcdutl
        } else {
            RestoreTool::Etcdctl
        }
    }

    /// Most operations one transaction may hold: 128 by default in every 3.x; from 3.3 our
    /// private etcd can be started with a larger `--max-txn-ops` (see [`Release::txn_ops_flag`]).
    pub fn max_txn_ops(&self, raised: bool) -> usize {
        if raised && self.txn_ops_flag(BULK_TXN_OPS).is_some() {
            BULK_TXN_OPS
        } else {
            128
        }
    }

    /// `--max-txn-ops=<n>` where the release has the flag (3.3 and later).
    pub fn txn_ops_flag(&self, n: usize) -> Option<String> {
        self.at_least(3, 3).then(|| format!("--max-txn-ops={n}"))
    }

    /// The server flags we pass, in order, for a member on a data dir. `extra` (ETCD_CREDS) last.
    pub fn server_args(&self, spec: &ServerSpec<'_>) -> Vec<String> {
        let mut a = vec![
            "--name".to_string(),
            spec.name.to_string(),
            "--data-dir".to_string(),
            spec.data_dir.to_string(),
            "--listen-client-urls".to_string(),
            spec.client_urls.join(","),
            "--advertise-client-urls".to_string(),
            spec.client_urls[0].to_string(),
            "--listen-peer-urls".to_string(),
            spec.listen_peer_urls.to_string(),
            "--initial-advertise-peer-urls".to_string(),
            spec.advertise_peer_urls.to_string(),
            "--initial-cluster".to_string(),
            spec.initial_cluster.to_string(),
        ];
        if spec.join_existing {
            a.push("--initial-cluster-state=existing".to_string());
        }
        if spec.fast_election {
            // A lone member has no peers to disrupt: elect itself in ~100 ms, not 1-2 s.
            a.push("--heartbeat-interval=10".to_string());
            a.push("--election-timeout=100".to_string());
        }
        if spec.bulk_txns {
            a.extend(self.txn_ops_flag(BULK_TXN_OPS));
        }
        if let Some(n) = spec.snapshot_count {
            a.push(format!("--snapshot-count={n}"));
        }
        if let Some(q) = spec.quota_bytes.filter(|_| self.at_least(3, 0)) {
            a.push(format!("--quota-backend-bytes={q}"));
        }
        if let Some(f) = self.v2_flag(spec.serve_v2) {
            a.push(f.to_string());
        }
        a.extend(spec.extra_args.iter().cloned());
        a
    }
}

/// What a private etcd is started with.
#[derive(Debug, Clone)]
pub struct ServerSpec<'a> {
    pub name: &'a str,
    pub data_dir: &'a str,
    pub client_urls: &'a [String],
    pub listen_peer_urls: &'a str,
    pub advertise_peer_urls: &'a str,
    pub initial_cluster: &'a str,
    /// Join a running cluster (`--initial-cluster-state existing`) on an empty data dir.
    pub join_existing: bool,
    /// Serve the v2 API (etcd2 storage, or reading TTLs right after `migrate`).
    pub serve_v2: bool,
    /// Short heartbeat and election timeouts: single-member data only.
    pub fast_election: bool,
    /// Larger transactions for bulk rewrites (TTL reattachment) on a private etcd.
    pub bulk_txns: bool,
    pub snapshot_count: Option<u32>,
    /// A backend quota above the data's size, for members past etcd's default (2 GiB).
    pub quota_bytes: Option<u64>,
    pub extra_args: &'a [String],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Storage;
    use std::path::PathBuf;

    fn help_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/etcd-help")
    }

    fn help(tool: &str, v: &str) -> String {
        std::fs::read_to_string(help_dir().join(format!("{tool}-{v}.txt"))).unwrap()
    }

    const RELEASES: &[&str] = &[
        "2.2.1", "2.3.7", "3.0.17", "3.1.20", "3.2.32", "3.3.27", "3.4.23", "3.5.0", "3.5.1",
    ];

    /// The minors from the oldest to the newest etcd-migrate knows, one release each.
    fn every_known_minor() -> Vec<Release> {
        FLAG_TABLES
            .iter()
            .map(|t| Release::new(EtcdVersion::new(t.major, t.minor, 0)))
            .collect()
    }

    /// Every argument list a private etcd of release `r` can be started with.
    fn every_launch(r: Release) -> Vec<Vec<String>> {
        let urls = vec!["http://127.0.0.1:1".to_string()];
        let mut out = Vec::new();
        for storage in [Storage::Etcd2, Storage::Etcd3] {
            if storage_servable(r.version, storage).is_err() {
                continue;
            }
            for (serve_v2, fast, bulk, snap) in [
                (false, false, false, None),
                (true, true, true, Some(5)),
                (storage == Storage::Etcd2, true, false, None),
            ] {
                let spec = ServerSpec {
                    name: "n",
                    data_dir: "/d",
                    client_urls: &urls,
                    listen_peer_urls: "http://127.0.0.1:2",
                    advertise_peer_urls: "http://127.0.0.1:2",
                    initial_cluster: "n=http://127.0.0.1:2",
                    join_existing: fast,
                    serve_v2: serve_v2 || storage == Storage::Etcd2,
                    fast_election: fast,
                    bulk_txns: bulk,
                    snapshot_count: snap,
                    quota_bytes: Some(8 << 30),
                    extra_args: &[],
                };
                out.push(r.server_args(&spec));
            }
        }
        out
    }

    #[test]
    fn every_flag_we_pass_is_in_that_minors_table_up_to_37() {
        let known = every_known_minor();
        assert_eq!(
            known.last().unwrap().version.minor_line(),
            NEWEST_KNOWN_MINOR
        );
        for r in known {
            let table = r.flag_table().unwrap();
            for args in every_launch(r) {
                for flag in crate::flags::flags_in(&args) {
                    assert!(
                        table.has(&flag),
                        "etcd {} has no --{flag}",
                        r.version.minor_line()
                    );
                }
            }
        }
    }

    #[test]
    fn flag_tables_from_help_list_exactly_what_the_help_lists() {
        let in_help = |v: &str| -> std::collections::BTreeSet<String> {
            help("etcd", v)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|t| t.starts_with('-') && t.len() > 1)
                .map(|t| {
                    t.trim_start_matches('-')
                        .split('=')
                        .next()
                        .unwrap()
                        .to_string()
                })
                .filter(|f| {
                    f.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
                .collect()
        };
        for v in RELEASES {
            let r = Release::new(v.parse().unwrap());
            let table = r.flag_table().unwrap();
            let help = in_help(v);
            match table.source {
                FlagSource::Help => assert_eq!(
                    table
                        .iter()
                        .map(String::from)
                        .collect::<std::collections::BTreeSet<_>>(),
                    help,
                    "{v}"
                ),
                // The source's list holds every flag the help of its older patches shows.
                FlagSource::Source => {
                    for f in help {
                        assert!(table.has(&f), "{v} help lists --{f}, the table lacks it");
                    }
                }
            }
        }
    }

    #[test]
    fn what_changed_at_36_and_37_is_in_the_tables() {
        let t = |m: u32| {
            Release::new(EtcdVersion::new(3, m, 0))
                .flag_table()
                .unwrap()
        };
        assert!(t(5).has("enable-v2") && !t(6).has("enable-v2") && !t(7).has("enable-v2"));
        assert!(t(5).has("experimental-initial-corrupt-check"));
        assert!(
            t(6).has("experimental-snapshot-catchup-entries")
                && t(6).has("snapshot-catchup-entries")
        );
        assert!(!t(7).iter().any(|f| f.starts_with("experimental-")));
        assert!(t(6).has("discovery") && !t(7).has("discovery"));
        assert!(t(6).has("feature-gates") && !t(5).has("feature-gates"));
        assert_eq!(
            Release::new("3.6.0".parse().unwrap()).v2_flag(true),
            None,
            "3.6 has no v2 API to turn on"
        );
    }

    #[test]
    fn unknown_flags_are_named_only_where_the_list_is_complete() {
        let args: Vec<String> = ["--enable-v2=true", "--peer-cert-file", "/p", "-name", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r36 = Release::new("3.6.4".parse().unwrap());
        assert_eq!(
            r36.unknown_flags(&args),
            Some(vec!["enable-v2".to_string()])
        );
        let r35 = Release::new("3.5.30".parse().unwrap());
        assert_eq!(r35.unknown_flags(&args), Some(vec![]));
        let r34 = Release::new("3.4.23".parse().unwrap());
        assert_eq!(
            r34.unknown_flags(&args),
            None,
            "3.4's list is only from --help"
        );
        let r38 = Release::new("3.8.0".parse().unwrap());
        assert_eq!(r38.unknown_flags(&args), None);
    }

    #[test]
    fn v2_switch_matches_each_releases_default() {
        for v in RELEASES {
            let r = Release::new(v.parse().unwrap());
            let text = help("etcd", v);
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with("--enable-v2 ") || l.trim() == "--enable-v2");
            match line {
                // 3.4+: off by default, so etcd2 storage needs the flag.
                Some(l) if l.contains("'false'") => {
                    assert_eq!(r.v2_flag(true), Some("--enable-v2=true"), "{v}")
                }
                // Absent, or on by default (3.2 prints no default, 3.3 'true'): v2 is served without it.
                _ => assert_eq!(r.v2_flag(true), None, "{v}"),
            }
            assert_eq!(r.v2_flag(false), None);
        }
    }

    #[test]
    fn migrate_and_restore_tools_match_the_help() {
        for v in RELEASES {
            let r = Release::new(v.parse().unwrap());
            let ctl = help("etcdctl", v);
            let lists_migrate = ctl.lines().any(|l| l.trim_start().starts_with("migrate"));
            assert_eq!(
                r.has_etcdctl_migrate(),
                lists_migrate,
                "etcdctl {v} migrate"
            );
            if r.has_v3_api() {
                let utl = help_dir().join(format!("etcdutl-{v}.txt")).exists();
                assert_eq!(
                    r.restore_tool() == RestoreTool::Etcdutl,
                    utl,
                    "{v} restore tool"
                );
            }
        }
    }
}
