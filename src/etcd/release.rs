//! What differs between etcd releases, as learned from each release's `--help`
//! (../shared/fixtures/etcd-help) and from running them. One table; tests check it against
//! the help texts.

use crate::version::EtcdVersion;

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
    /// (3.2 and 3.3 have `--enable-v2` defaulting to true; 2.x to 3.1 always serve v2.)
    pub fn v2_flag(&self, serve_v2: bool) -> Option<&'static str> {
        (serve_v2 && self.at_least(3, 4)).then_some("--enable-v2=true")
    }

    /// etcdctl needs `ETCDCTL_API=3` for v3 commands (3.0 to 3.3); from 3.4 v3 is the default.
    /// Setting it on 3.4+ is harmless, so we always set it for v3 calls.
    pub fn etcdctl_api_v3_env(&self) -> (&'static str, &'static str) {
        ("ETCDCTL_API", "3")
    }

    /// `etcdctl migrate` exists (3.0 to 3.4).
    pub fn has_etcdctl_migrate(&self) -> bool {
        crate::plan::has_etcdctl_migrate(self.version)
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
    /// Serve the v2 API (etcd2 storage, or reading TTLs right after `migrate`).
    pub serve_v2: bool,
    /// Short heartbeat and election timeouts: single-member data only.
    pub fast_election: bool,
    /// Larger transactions for bulk rewrites (TTL reattachment) on a private etcd.
    pub bulk_txns: bool,
    pub snapshot_count: Option<u32>,
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

    #[test]
    fn every_flag_we_pass_is_in_that_releases_help() {
        let urls = vec!["http://127.0.0.1:1".to_string()];
        for v in RELEASES {
            let r = Release::new(v.parse().unwrap());
            let text = help("etcd", v);
            for storage in [Storage::Etcd2, Storage::Etcd3] {
                if crate::plan::storage_servable(r.version, storage).is_err() {
                    continue;
                }
                let spec = ServerSpec {
                    name: "n",
                    data_dir: "/d",
                    client_urls: &urls,
                    listen_peer_urls: "http://127.0.0.1:2",
                    advertise_peer_urls: "http://127.0.0.1:2",
                    initial_cluster: "n=http://127.0.0.1:2",
                    serve_v2: storage == Storage::Etcd2,
                    fast_election: true,
                    bulk_txns: true,
                    snapshot_count: Some(5),
                    extra_args: &[],
                };
                for arg in r.server_args(&spec).iter().filter(|a| a.starts_with("--")) {
                    let flag = arg.split('=').next().unwrap();
                    // Help texts list flags as "--flag" (2.x: "--flag 'default'", one tab in).
                    let listed = text
                        .lines()
                        .any(|l| l.trim_start().split([' ', '\t']).next() == Some(flag));
                    assert!(listed, "etcd {v} help does not list {flag}");
                }
            }
        }
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
