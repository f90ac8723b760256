//! The only reader of the environment. Resolves every flag against its env fallback (an empty
//! variable counts as unset), applies the defaults of DESIGN section 2 and validates values.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::cli::Opts;
use crate::flags::{secrets_in, ChildOutput};
use crate::layout::Layout;
use crate::version::{EtcdVersion, Storage, VersionFile};

/// The process environment, captured once.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: Vec<(OsString, OsString)>,
}

impl Env {
    /// Captures the environment of this process.
    pub fn from_process() -> Env {
        Env {
            vars: std::env::vars_os().collect(),
        }
    }

    /// An environment given as pairs (tests).
    pub fn from_pairs<K: Into<OsString>, V: Into<OsString>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Env {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `name`; unset and empty are the same.
    pub fn get(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
    }
}

/// Variables that belong to etcd-migrate (or to the image contract), never passed to children.
/// ETCD_NAME is not here: it is also an etcd flag, dropped only where it duplicates `--name`.
pub const OWN_VARIABLES: &[&str] = &[
    "TARGET_STORAGE",
    "TARGET_VERSION",
    "DATA_DIRECTORY",
    "ETCD_HOSTNAME",
    "LISTEN_CLIENT_URLS",
    "LISTEN_PEER_URLS",
    "INITIAL_ADVERTISE_PEER_URLS",
    "INITIAL_CLUSTER",
    "ETCD_DATA_PREFIX",
    "TTL_KEYS_DIRECTORY",
    "TTL_SCOPE",
    "TTL_GRANULARITY",
    "ETCD_BIN_DIR",
    "BUNDLED_VERSIONS",
    "ETCD_CREDS",
    "HEALTH_TIMEOUT",
    "STOP_GRACE",
    "BACKUP_RETENTION",
    "LOG_FORMAT",
    "CHILD_OUTPUT",
    "REJOIN_IF_EMPTY",
    "ETCD_CLUSTER_ENDPOINTS",
    "ETCDCTL_API",
    "SNAPSHOT_ENDPOINT",
    "SNAPSHOT_DIR",
    "SNAPSHOT_KEEP",
    "SNAPSHOT_EVERY",
    "RESTORE_SNAPSHOT",
];

/// A flag or variable with a bad or missing value. Always exit code 2.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag} is required (or set {env})")]
    Missing {
        flag: &'static str,
        env: &'static str,
    },
    #[error("{flag}{} = {value:?}: {why}", env.map(|e| format!(" ({e})")).unwrap_or_default())]
    Invalid {
        flag: &'static str,
        env: Option<&'static str>,
        value: String,
        why: String,
    },
}

/// Which TTL keys get leases when etcd2 data becomes etcd3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlScope {
    /// Every key with a TTL.
    All,
    /// Only keys under the TTL keys directory (the Kubernetes behaviour).
    Directory,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Identity and addresses of the member whose data dir this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Loopback client URLs every private etcd listens on; the first is the one we talk to.
    pub client_urls: Vec<String>,
    pub listen_peer_urls: String,
    pub advertise_peer_urls: String,
    pub initial_cluster: String,
}

impl Member {
    /// The URL our clients use to reach a step's etcd.
    pub fn client_url(&self) -> &str {
        &self.client_urls[0]
    }
    /// This member's advertised peer URLs, one by one.
    pub fn advertised_peer_urls(&self) -> Vec<String> {
        url_list(&self.advertise_peer_urls)
    }

    /// name=url pairs of the initial cluster other than this member.
    pub fn peers(&self) -> Vec<(String, String)> {
        self.initial_cluster
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(n, _)| *n != self.name)
            .map(|(n, u)| (n.to_string(), u.to_string()))
            .collect()
    }
}

/// Everything a run needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Present when the subcommand needs it (migrate, run, plan).
    pub target: Option<VersionFile>,
    pub member: Member,
    pub data_prefix: String,
    pub ttl_keys_directory: String,
    pub ttl_scope: TtlScope,
    pub ttl_granularity_secs: u64,
    pub bin_dir: PathBuf,
    /// An explicit list; `None` means every etcd-<ver> in the bin dir.
    pub bundled_versions: Option<Vec<EtcdVersion>>,
    pub extra_args: Vec<String>,
    pub health_timeout: Duration,
    pub stop_grace: Duration,
    pub backup_retention: Option<usize>,
    pub log_format: LogFormat,
    /// What becomes of the lines children print (logged or quiet; secrets redacted).
    pub child_output: ChildOutput,
    /// The environment children start from: ours removed; flag duplicates are removed per child.
    pub child_env: Vec<(OsString, OsString)>,
    /// Rejoin the cluster when this member's data was lost (see `rejoin`).
    pub rejoin_if_empty: bool,
    /// The other members' client URLs, when the peers' published ones are not reachable from here.
    pub cluster_endpoints: Option<Vec<String>>,
    /// A snapshot to restore when the data dir holds no etcd data (see `restore_snapshot`).
    pub restore_snapshot: Option<PathBuf>,
}

impl Config {
    /// The data dir's paths.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.data_dir)
    }
}

struct Resolver<'a> {
    env: &'a Env,
}

impl Resolver<'_> {
    /// The flag's value, else its env var's; empty counts as unset.
    fn pick(&self, flag_value: Option<String>, env: &str) -> Option<String> {
        flag_value
            .filter(|v| !v.is_empty())
            .or_else(|| self.env.get(env))
    }

    /// A path from the flag or its env var.
    fn path(&self, flag_value: Option<&PathBuf>, env: &str) -> Option<PathBuf> {
        self.pick(flag_value.map(|p| p.to_string_lossy().into_owned()), env)
            .map(PathBuf::from)
    }

    /// One of a few words, each naming a value; unset is `choices[0]`.
    fn choice<T: Copy>(
        &self,
        flag_value: Option<String>,
        flag: &'static str,
        env: &'static str,
        choices: &[(&str, T)],
        expected: &str,
    ) -> Result<T, ConfigError> {
        match self.pick(flag_value, env) {
            None => Ok(choices[0].1),
            Some(word) => choices
                .iter()
                .find(|(w, _)| *w == word)
                .map(|(_, v)| *v)
                .ok_or_else(|| invalid(flag, Some(env), &word, expected)),
        }
    }

    /// A non-zero duration like `90s`, `2m` or `500ms`.
    fn duration(
        &self,
        flag_value: Option<String>,
        flag: &'static str,
        env: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match self.pick(flag_value, env) {
            None => Ok(default),
            Some(s) => parse_duration(&s).filter(|d| !d.is_zero()).ok_or_else(|| {
                invalid(
                    flag,
                    Some(env),
                    &s,
                    "expected a duration like 90s, 2m or 500ms",
                )
            }),
        }
    }
}

fn invalid(
    flag: &'static str,
    env: Option<&'static str>,
    value: &str,
    why: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        flag,
        env,
        value: value.to_string(),
        why: why.into(),
    }
}

/// A comma-separated URL list, each trimmed.
fn url_list(raw: &str) -> Vec<String> {
    raw.split(',').map(|s| s.trim().to_string()).collect()
}

/// Parses `120`, `120s`, `2m`, `500ms`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "" | "s" => n.checked_mul(1000)?,
        "ms" => n,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Splits `scheme://host:port[/]` into its parts.
pub fn split_url(url: &str) -> Option<(&str, &str, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let hostport = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = hostport.rsplit_once(':')?;
    Some((scheme, host, port.parse().ok()?))
}

fn default_name(env: &Env) -> String {
    let host = env
        .get("ETCD_HOSTNAME")
        .or_else(|| env.get("HOSTNAME"))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "localhost".to_string());
    format!("etcd-{host}")
}

/// Resolves the options against the environment. `needs_target` is false for `status` and
/// `restore`, which ignore the target. Checked in the order the options are listed in `--help`,
/// so the first bad one is the one named.
pub fn resolve(opts: &Opts, env: &Env, needs_target: bool) -> Result<Config, ConfigError> {
    let r = Resolver { env };
    let data_dir =
        r.path(opts.data_dir.as_ref(), "DATA_DIRECTORY")
            .ok_or(ConfigError::Missing {
                flag: "--data-dir",
                env: "DATA_DIRECTORY",
            })?;
    let target = if needs_target {
        Some(resolve_target(opts, &r)?)
    } else {
        None
    };
    let member = resolve_member(opts, &r, data_dir.to_string_lossy().contains("event"))?;
    let ttl = resolve_ttl(opts, &r)?;
    let bin_dir = r
        .path(opts.bin_dir.as_ref(), "ETCD_BIN_DIR")
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin"));
    let bundled_versions = resolve_bundled_versions(opts, &r)?;
    let extra_args = resolve_extra_args(opts, &r)?;
    let health_timeout = r.duration(
        opts.health_timeout.clone(),
        "--health-timeout",
        "HEALTH_TIMEOUT",
        Duration::from_secs(120),
    )?;
    let stop_grace = r.duration(
        opts.stop_grace.clone(),
        "--stop-grace",
        "STOP_GRACE",
        Duration::from_secs(30),
    )?;
    let backup_retention = resolve_backup_retention(opts, &r)?;
    let log_format = resolve_log_format(opts, &r)?;
    let child_output = ChildOutput {
        logged: r.choice(
            opts.child_output.clone(),
            "--child-output",
            "CHILD_OUTPUT",
            &[("all", true), ("quiet", false)],
            "expected all or quiet",
        )?,
        secrets: secrets_in(&extra_args).into(),
    };
    let (rejoin_if_empty, cluster_endpoints) = resolve_rejoin(opts, &r)?;
    let restore_snapshot = r.path(opts.restore_snapshot.as_ref(), "RESTORE_SNAPSHOT");
    let child_env = env
        .vars
        .iter()
        .filter(|(k, _)| !OWN_VARIABLES.iter().any(|o| k == o))
        .cloned()
        .collect();
    Ok(Config {
        data_dir,
        target,
        member,
        data_prefix: ttl.data_prefix,
        ttl_keys_directory: ttl.keys_directory,
        ttl_scope: ttl.scope,
        ttl_granularity_secs: ttl.granularity_secs,
        bin_dir,
        bundled_versions,
        extra_args,
        health_timeout,
        stop_grace,
        backup_retention,
        log_format,
        child_output,
        child_env,
        rejoin_if_empty,
        cluster_endpoints,
        restore_snapshot,
    })
}

/// REJOIN_IF_EMPTY, and ETCD_CLUSTER_ENDPOINTS: the other members' client URLs.
fn resolve_rejoin(opts: &Opts, r: &Resolver) -> Result<(bool, Option<Vec<String>>), ConfigError> {
    let rejoin = r.choice(
        opts.rejoin_if_empty.clone(),
        "--rejoin-if-empty",
        "REJOIN_IF_EMPTY",
        &[("false", false), ("true", true)],
        "expected true or false",
    )?;
    let Some(raw) = r.pick(opts.cluster_endpoints.clone(), "ETCD_CLUSTER_ENDPOINTS") else {
        return Ok((rejoin, None));
    };
    let urls = url_list(&raw);
    if urls.iter().any(|u| split_url(u).is_none()) {
        return Err(invalid(
            "--cluster-endpoints",
            Some("ETCD_CLUSTER_ENDPOINTS"),
            &raw,
            "expected client URLs like http://10.0.0.1:2379, comma separated",
        ));
    }
    Ok((rejoin, Some(urls)))
}

/// This member's name and URLs. The events data dir (a second etcd on the same host) gets its
/// own default ports.
fn resolve_member(opts: &Opts, r: &Resolver, events: bool) -> Result<Member, ConfigError> {
    let name = r
        .pick(opts.name.clone(), "ETCD_NAME")
        .unwrap_or_else(|| default_name(r.env));
    if name.contains([',', '=']) || name.chars().any(char::is_whitespace) {
        return Err(invalid(
            "--name",
            Some("ETCD_NAME"),
            &name,
            "a member name cannot hold ',', '=' or spaces",
        ));
    }
    let port = opts.port.unwrap_or(if events { 18631 } else { 18629 });
    let peer_port = opts.peer_port.unwrap_or(if events { 2381 } else { 2380 });
    let client_urls = resolve_client_urls(opts, r, port)?;
    let listen_peer_urls = r
        .pick(opts.listen_peer_urls.clone(), "LISTEN_PEER_URLS")
        .unwrap_or_else(|| format!("http://localhost:{peer_port}"));
    check_urls("--listen-peer-urls", "LISTEN_PEER_URLS", &listen_peer_urls)?;
    let advertise_peer_urls = r
        .pick(
            opts.initial_advertise_peer_urls.clone(),
            "INITIAL_ADVERTISE_PEER_URLS",
        )
        .unwrap_or(listen_peer_urls.clone());
    check_urls(
        "--initial-advertise-peer-urls",
        "INITIAL_ADVERTISE_PEER_URLS",
        &advertise_peer_urls,
    )?;
    let initial_cluster = r
        .pick(opts.initial_cluster.clone(), "INITIAL_CLUSTER")
        .unwrap_or_else(|| format!("{name}=http://localhost:{peer_port}"));
    check_initial_cluster(&initial_cluster, &name)?;
    Ok(Member {
        name,
        client_urls,
        listen_peer_urls,
        advertise_peer_urls,
        initial_cluster,
    })
}

/// The private client URLs each step's etcd listens on: loopback only.
fn resolve_client_urls(opts: &Opts, r: &Resolver, port: u16) -> Result<Vec<String>, ConfigError> {
    let raw = r
        .pick(opts.listen_client_urls.clone(), "LISTEN_CLIENT_URLS")
        .unwrap_or_else(|| format!("http://127.0.0.1:{port}"));
    let urls = url_list(&raw);
    for u in &urls {
        match split_url(u) {
            Some(("http", "127.0.0.1", p)) if p != 0 => {}
            _ => {
                return Err(invalid(
                    "--listen-client-urls",
                    Some("LISTEN_CLIENT_URLS"),
                    &raw,
                    "each step's etcd must listen for clients on http://127.0.0.1:<port> only, so no client reaches \
                     half-migrated data",
                ))
            }
        }
    }
    Ok(urls)
}

/// Where Kubernetes keeps its keys, and which v2 TTLs the storage migration carries over.
struct TtlOptions {
    data_prefix: String,
    keys_directory: String,
    scope: TtlScope,
    granularity_secs: u64,
}

fn resolve_ttl(opts: &Opts, r: &Resolver) -> Result<TtlOptions, ConfigError> {
    let data_prefix = r
        .pick(opts.etcd_data_prefix.clone(), "ETCD_DATA_PREFIX")
        .unwrap_or_else(|| "/registry".into());
    if !data_prefix.starts_with('/') {
        return Err(invalid(
            "--etcd-data-prefix",
            Some("ETCD_DATA_PREFIX"),
            &data_prefix,
            "must start with '/'",
        ));
    }
    let keys_directory = r
        .pick(opts.ttl_keys_directory.clone(), "TTL_KEYS_DIRECTORY")
        .unwrap_or_else(|| format!("{}/events", data_prefix.trim_end_matches('/')));
    let scope = r.choice(
        opts.ttl_scope.clone(),
        "--ttl-scope",
        "TTL_SCOPE",
        &[("all", TtlScope::All), ("directory", TtlScope::Directory)],
        "expected all or directory",
    )?;
    let granularity_secs = match r.pick(opts.ttl_granularity.clone(), "TTL_GRANULARITY") {
        None => 1,
        Some(s) => match parse_duration(&s).map(|d| d.as_secs()) {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(invalid(
                    "--ttl-granularity",
                    Some("TTL_GRANULARITY"),
                    &s,
                    "expected whole seconds >= 1",
                ))
            }
        },
    };
    Ok(TtlOptions {
        data_prefix,
        keys_directory,
        scope,
        granularity_secs,
    })
}

fn resolve_bundled_versions(
    opts: &Opts,
    r: &Resolver,
) -> Result<Option<Vec<EtcdVersion>>, ConfigError> {
    let Some(list) = r.pick(opts.bundled_versions.clone(), "BUNDLED_VERSIONS") else {
        return Ok(None);
    };
    list.split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|e: crate::version::ParseError| {
                invalid(
                    "--bundled-versions",
                    Some("BUNDLED_VERSIONS"),
                    &list,
                    e.to_string(),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// How many backups to keep; unset keeps every one.
fn resolve_backup_retention(opts: &Opts, r: &Resolver) -> Result<Option<usize>, ConfigError> {
    match r.pick(opts.backup_retention.clone(), "BACKUP_RETENTION") {
        None => Ok(None),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    "--backup-retention",
                    Some("BACKUP_RETENTION"),
                    &s,
                    "expected a whole number >= 1",
                )
            }),
    }
}

/// The options of `snapshot`, and the log format; needs no data dir and no target.
pub fn resolve_snapshot(
    opts: &Opts,
    args: &crate::cli::SnapshotArgs,
    env: &Env,
) -> Result<(crate::snapshot::SnapshotConfig, LogFormat), ConfigError> {
    let r = Resolver { env };
    let endpoint = r
        .pick(args.endpoint.clone(), "SNAPSHOT_ENDPOINT")
        .unwrap_or_else(|| "http://127.0.0.1:2379".to_string());
    let scheme = match split_url(&endpoint) {
        Some((scheme @ ("http" | "https"), host, _)) if !host.is_empty() => scheme.to_string(),
        _ => {
            return Err(invalid(
                "--endpoint",
                Some("SNAPSHOT_ENDPOINT"),
                &endpoint,
                "expected a client URL like http://127.0.0.1:2379 or https://10.0.0.1:2379",
            ))
        }
    };
    let out = r
        .path(args.out.as_ref(), "SNAPSHOT_DIR")
        .ok_or(ConfigError::Missing {
            flag: "--out",
            env: "SNAPSHOT_DIR",
        })?;
    let keep = match r.pick(args.keep.clone(), "SNAPSHOT_KEEP") {
        None => 10,
        Some(k) => k.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            invalid(
                "--keep",
                Some("SNAPSHOT_KEEP"),
                &k,
                "expected a whole number >= 1",
            )
        })?,
    };
    let every = match r.pick(args.every.clone(), "SNAPSHOT_EVERY") {
        None => None,
        Some(_) => Some(r.duration(
            args.every.clone(),
            "--every",
            "SNAPSHOT_EVERY",
            Duration::ZERO,
        )?),
    };
    let tls = crate::etcd::v3::ClientTls::from_flags(&resolve_extra_args(opts, &r)?);
    if scheme == "https" && tls.as_ref().is_none_or(|t| t.ca.is_none()) {
        return Err(invalid(
            "--endpoint",
            Some("SNAPSHOT_ENDPOINT"),
            &endpoint,
            "an https endpoint needs the CA that signed the member's certificate: set ETCD_CREDS with --trusted-ca-file (and --cert-file/--key-file if it asks for a client certificate)",
        ));
    }
    let log_format = resolve_log_format(opts, &r)?;
    let config = crate::snapshot::SnapshotConfig {
        endpoint,
        out,
        keep,
        every,
        tls: if scheme == "https" { tls } else { None },
    };
    Ok((config, log_format))
}

/// LOG_FORMAT: text or json.
fn resolve_log_format(opts: &Opts, r: &Resolver) -> Result<LogFormat, ConfigError> {
    r.choice(
        opts.log_format.clone(),
        "--log-format",
        "LOG_FORMAT",
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        "expected text or json",
    )
}

/// ETCD_CREDS, shell-split into etcd flags.
fn resolve_extra_args(opts: &Opts, r: &Resolver) -> Result<Vec<String>, ConfigError> {
    match r.pick(opts.etcd_server_extra_args.clone(), "ETCD_CREDS") {
        None => Ok(Vec::new()),
        Some(s) => shell_words::split(&s).map_err(|e| {
            // The value may hold secrets: name the problem, not the content.
            invalid(
                "--etcd-server-extra-args",
                Some("ETCD_CREDS"),
                "<not shown>",
                format!("cannot be shell-split: {e}"),
            )
        }),
    }
}

fn resolve_target(opts: &Opts, r: &Resolver) -> Result<VersionFile, ConfigError> {
    let tv = r
        .pick(opts.target_version.clone(), "TARGET_VERSION")
        .ok_or(ConfigError::Missing {
            flag: "--target-version",
            env: "TARGET_VERSION",
        })?;
    let ts = r
        .pick(opts.target_storage.clone(), "TARGET_STORAGE")
        .ok_or(ConfigError::Missing {
            flag: "--target-storage",
            env: "TARGET_STORAGE",
        })?;
    let version: EtcdVersion = tv.parse().map_err(|e: crate::version::ParseError| {
        invalid(
            "--target-version",
            Some("TARGET_VERSION"),
            &tv,
            e.to_string(),
        )
    })?;
    let storage: Storage = ts.parse().map_err(|e: crate::version::ParseError| {
        invalid(
            "--target-storage",
            Some("TARGET_STORAGE"),
            &ts,
            e.to_string(),
        )
    })?;
    Ok(VersionFile { version, storage })
}

fn check_urls(flag: &'static str, env: &'static str, urls: &str) -> Result<(), ConfigError> {
    for u in urls.split(',') {
        match split_url(u.trim()) {
            Some(("http" | "https", host, _)) if !host.is_empty() => {}
            _ => {
                return Err(invalid(
                    flag,
                    Some(env),
                    urls,
                    "expected comma-separated http(s)://host:port URLs",
                ))
            }
        }
    }
    Ok(())
}

fn check_initial_cluster(ic: &str, name: &str) -> Result<(), ConfigError> {
    let bad = |why: String| invalid("--initial-cluster", Some("INITIAL_CLUSTER"), ic, why);
    let mut has_self = false;
    for pair in ic.split(',') {
        let (n, u) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("'{pair}' is not name=URL")))?;
        check_urls("--initial-cluster", "INITIAL_CLUSTER", u)
            .map_err(|_| bad(format!("'{u}' is not a peer URL")))?;
        has_self |= n == name;
    }
    if !has_self {
        return Err(bad(format!(
            "it does not name this member '{name}' (set ETCD_NAME or --name to match)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Opts {
        Opts::default()
    }
    fn base_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("TARGET_VERSION", "3.5.1"),
            ("TARGET_STORAGE", "etcd3"),
            ("DATA_DIRECTORY", "/var/etcd/data"),
            ("HOSTNAME", "m1"),
        ]
    }

    #[test]
    fn defaults_follow_the_kubernetes_image() {
        let c = resolve(&opts(), &Env::from_pairs(base_env()), true).unwrap();
        assert_eq!(c.target.unwrap().to_string(), "3.5.1/etcd3");
        assert_eq!(c.member.name, "etcd-m1");
        assert_eq!(c.member.client_urls, ["http://127.0.0.1:18629"]);
        assert_eq!(c.member.listen_peer_urls, "http://localhost:2380");
        assert_eq!(c.member.advertise_peer_urls, "http://localhost:2380");
        assert_eq!(c.member.initial_cluster, "etcd-m1=http://localhost:2380");
        assert_eq!(c.data_prefix, "/registry");
        assert_eq!(c.ttl_keys_directory, "/registry/events");
        assert_eq!(c.bin_dir, PathBuf::from("/usr/local/bin"));
        assert_eq!(c.health_timeout, Duration::from_secs(120));
        assert_eq!(c.ttl_scope, TtlScope::All);
    }

    #[test]
    fn events_data_dir_uses_the_events_ports() {
        let mut env = base_env();
        env[2] = ("DATA_DIRECTORY", "/var/etcd/data-events");
        let c = resolve(&opts(), &Env::from_pairs(env), true).unwrap();
        assert_eq!(c.member.client_urls, ["http://127.0.0.1:18631"]);
        assert_eq!(c.member.initial_cluster, "etcd-m1=http://localhost:2381");
    }

    #[test]
    fn empty_env_counts_as_unset_and_flags_win() {
        let mut env = base_env();
        env.extend([
            ("ETCD_NAME", ""),
            ("ETCD_HOSTNAME", "host-a"),
            ("ETCD_DATA_PREFIX", ""),
        ]);
        let mut o = opts();
        o.target_version = Some("3.4.23".into());
        let c = resolve(&o, &Env::from_pairs(env), true).unwrap();
        assert_eq!(c.member.name, "etcd-host-a");
        assert_eq!(c.data_prefix, "/registry");
        assert_eq!(c.target.unwrap().version.to_string(), "3.4.23");
    }

    #[test]
    fn bad_values_are_refused_with_the_variable_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("TARGET_VERSION", "3.5", "TARGET_VERSION"),
            ("TARGET_VERSION", "v3.5.1", "TARGET_VERSION"),
            ("TARGET_VERSION", "abc", "TARGET_VERSION"),
            ("TARGET_STORAGE", "etcd4", "TARGET_STORAGE"),
            ("LISTEN_CLIENT_URLS", "http://0.0.0.0:2379", "127.0.0.1"),
            ("LISTEN_CLIENT_URLS", "https://127.0.0.1:2379", "127.0.0.1"),
            (
                "INITIAL_CLUSTER",
                "other=http://10.0.0.1:2380",
                "does not name this member",
            ),
            ("INITIAL_CLUSTER", "garbage", "name=URL"),
            ("LISTEN_PEER_URLS", "localhost:2380", "URLs"),
            ("TTL_SCOPE", "some", "all or directory"),
            ("TTL_GRANULARITY", "0", "seconds"),
            ("HEALTH_TIMEOUT", "soon", "duration"),
            ("BACKUP_RETENTION", "-1", "whole number"),
            ("LOG_FORMAT", "xml", "text or json"),
            ("REJOIN_IF_EMPTY", "yes", "true or false"),
            ("ETCD_CLUSTER_ENDPOINTS", "10.0.0.1:2379", "client URLs"),
            ("BUNDLED_VERSIONS", "3.4.23 3.5", "3.5"),
            (
                "ETCD_CREDS",
                "--peer-cert-file='unterminated",
                "shell-split",
            ),
            ("ETCD_DATA_PREFIX", "registry", "start with"),
        ];
        for (var, value, want) in cases {
            let mut env = base_env();
            env.push((var, value));
            let e = resolve(&opts(), &Env::from_pairs(env), true)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{var}={value}: {e}");
        }
        let e = resolve(&opts(), &Env::from_pairs([("DATA_DIRECTORY", "/d")]), true).unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                flag: "--target-version",
                env: "TARGET_VERSION"
            }
        );
        let e = resolve(
            &opts(),
            &Env::from_pairs([("TARGET_VERSION", "3.5.1")]),
            true,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                flag: "--data-dir",
                env: "DATA_DIRECTORY"
            }
        );
        assert!(
            resolve(&opts(), &Env::from_pairs([("DATA_DIRECTORY", "/d")]), false).is_ok(),
            "status needs no target"
        );
    }

    #[test]
    fn etcd_creds_are_shell_split_and_never_echoed() {
        let mut env = base_env();
        env.push((
            "ETCD_CREDS",
            "--peer-cert-file=/c/peer.crt --peer-key-file '/c/my key.pem'",
        ));
        let c = resolve(&opts(), &Env::from_pairs(env), true).unwrap();
        assert_eq!(
            c.extra_args,
            [
                "--peer-cert-file=/c/peer.crt",
                "--peer-key-file",
                "/c/my key.pem"
            ]
        );
        let mut env = base_env();
        env.push(("ETCD_CREDS", "--secret='s3cr3t"));
        let e = resolve(&opts(), &Env::from_pairs(env), true)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn child_env_drops_our_variables_and_keeps_the_rest() {
        let mut env = base_env();
        env.extend([
            ("ETCD_SNAPSHOT_COUNT", "10000"),
            ("ETCD_CREDS", "--x=1"),
            ("ETCD_NAME", "n"),
            ("PATH", "/bin"),
        ]);
        env.push(("INITIAL_CLUSTER", "n=http://localhost:2380"));
        let c = resolve(&opts(), &Env::from_pairs(env), true).unwrap();
        let keys: Vec<String> = c
            .child_env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(keys.contains(&"ETCD_SNAPSHOT_COUNT".to_string()));
        assert!(
            keys.contains(&"ETCD_NAME".to_string()),
            "ETCD_NAME is dropped per child, where it duplicates --name"
        );
        for own in [
            "TARGET_VERSION",
            "ETCD_CREDS",
            "DATA_DIRECTORY",
            "INITIAL_CLUSTER",
        ] {
            assert!(!keys.contains(&own.to_string()), "{own} leaked");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
