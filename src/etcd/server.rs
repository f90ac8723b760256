//! One private etcd on a data dir: start, wait until a write succeeds, stop.

use std::ffi::OsString;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{split_url, Config};
use crate::version::{EtcdVersion, Storage};

use super::bundle::{Bundle, Tool};
use super::process::{describe_status, ChildGuard, SpawnError};
use super::v2::{V2Error, V2};
use super::v3::{V3Error, V3};
use crate::fingerprint::{Fingerprint, PROBE_PREFIX};
use crate::flags::scrub_env;
use crate::release::{Release, ServerSpec};

/// A step's etcd that has not served for this long gets its backend's lock checked (a healthy
/// start takes about 100 ms alone, a few hundred with peers).
const BACKEND_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Members whose backend is past this get a quota this much above their size (etcd's default
/// quota is 2 GiB).
const QUOTA_ABOVE: u64 = 1 << 30;

/// Per-request timeout of our clients; a quorum write in a healthy cluster takes milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A private etcd failed.
#[derive(Debug, Error)]
pub enum EtcdError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{label} exited ({status}) before it accepted a write; its last lines:\n{tail}")]
    ExitedEarly {
        label: String,
        status: String,
        tail: String,
    },
    #[error(
        "{label} did not accept a write within {timeout_s}s (last error: {last_error}){peers}; raise --health-timeout \
         (HEALTH_TIMEOUT) if it is only slow; its last lines:\n{tail}"
    )]
    HealthTimeout {
        label: String,
        timeout_s: u64,
        last_error: String,
        peers: String,
        tail: String,
    },
    #[error(
        "{label} cannot open {backend}: it is locked by {holder}, not by the step's etcd. Another etcd \
         runs on this data dir; stop it and run again (nothing was recorded)"
    )]
    BackendTaken {
        label: String,
        backend: String,
        holder: String,
    },
    #[error(
        "{label} refuses writes: \"database space exceeded\" (its NOSPACE alarm is raised; the backend is {db_mb} MB). \
         The member was past its quota before this step: compact and defragment it with the release that wrote it \
         (etcdctl compact, etcdctl defrag, etcdctl alarm disarm), or pass a larger --quota-backend-bytes in ETCD_CREDS; \
         nothing was recorded"
    )]
    NoSpace { label: String, db_mb: u64 },
    #[error("{label}: {source}")]
    V3 { label: String, source: V3Error },
    #[error("{label}: {source}")]
    V2 { label: String, source: V2Error },
}

/// The data API a step's etcd serves for its storage.
#[derive(Clone)]
pub enum Api {
    V2(V2),
    V3(Box<V3>),
}

impl Api {
    pub fn v3(&mut self) -> Option<&mut V3> {
        match self {
            Api::V3(c) => Some(c),
            Api::V2(_) => None,
        }
    }
}

/// How long a stop waits for our own client connections to close (it takes about a millisecond).
const CLIENTS_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a step's etcd stopped, for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub version: EtcdVersion,
    /// SIGTERM to reaped.
    pub stop_ms: u64,
    /// Waiting for our client connections to close, before SIGTERM.
    pub close_ms: u64,
    /// Our connections still open at SIGTERM (0 unless they failed to close in time).
    pub connections_left: usize,
}

impl Stopped {
    /// Adds this stop to the `stops` list of a step's journal detail.
    pub fn record(&self, detail: &mut serde_json::Map<String, serde_json::Value>) {
        let entry = serde_json::json!({
            "etcd": self.version.to_string(),
            "stop_ms": self.stop_ms,
            "close_ms": self.close_ms,
        });
        match detail
            .entry("stops")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()))
        {
            serde_json::Value::Array(a) => a.push(entry),
            other => *other = serde_json::Value::Array(vec![entry]),
        }
    }
}

/// A running private etcd.
pub struct EtcdServer {
    guard: ChildGuard,
    pub version: EtcdVersion,
    pub storage: Storage,
    pub client_url: String,
    probe_key: String,
    health_timeout: Duration,
    peers: Vec<(String, String)>,
    /// The v3 backend the child opens: someone else holding its lock means it never will.
    backend: std::path::PathBuf,
}

/// How to start one.
pub struct Launch<'a> {
    pub bundle: &'a Bundle,
    pub config: &'a Config,
    pub data_dir: &'a Path,
    pub version: EtcdVersion,
    pub storage: Storage,
    /// Serve the v2 API although the storage is etcd3 (reading TTLs right after `migrate`).
    pub serve_v2: bool,
    /// A small `--snapshot-count` for the pass that cuts a snapshot.
    pub snapshot_count: Option<u32>,
    /// The data belongs to a single-member cluster: elect quickly.
    pub single_member: bool,
    /// Allow large transactions (a private bulk rewrite).
    pub bulk_txns: bool,
    /// Join the running cluster whose members this `--initial-cluster` lists, as a new member
    /// on an empty data dir.
    pub join: Option<&'a str>,
}

/// The environment for a child started with `args`: ours removed, `prefix` duplicates removed
/// (logged: our flag wins), plus `set`.
pub fn child_env(
    config: &Config,
    args: &[String],
    prefix: &str,
    set: &[(&str, &str)],
) -> Vec<(OsString, OsString)> {
    let (mut env, dropped) = scrub_env(&config.child_env, args, prefix);
    for name in dropped {
        tracing::info!(variable = %name, "environment variable duplicates a flag we pass; our flag wins");
    }
    for (k, v) in set {
        env.retain(|(name, _)| name != k);
        env.push((OsString::from(k), OsString::from(v)));
    }
    env
}

impl EtcdServer {
    /// Starts `etcd-<version>` on the data dir with the member's identity and private client URL.
    pub fn start(l: Launch<'_>) -> Result<EtcdServer, EtcdError> {
        let release = Release::new(l.version);
        let member = &l.config.member;
        let data_dir = l.data_dir.to_string_lossy();
        let spec = ServerSpec {
            name: &member.name,
            data_dir: &data_dir,
            client_urls: &member.client_urls,
            listen_peer_urls: &member.listen_peer_urls,
            advertise_peer_urls: &member.advertise_peer_urls,
            initial_cluster: l.join.unwrap_or(&member.initial_cluster),
            join_existing: l.join.is_some(),
            serve_v2: l.serve_v2 || l.storage == Storage::Etcd2,
            fast_election: l.single_member,
            bulk_txns: l.bulk_txns,
            snapshot_count: l.snapshot_count,
            quota_bytes: None,
            extra_args: &l.config.extra_args,
        };
        // etcd's default quota is 2 GiB: a larger member would raise its NOSPACE alarm at once
        // and refuse the health write. A private etcd writes only its probe.
        let db_size = std::fs::metadata(crate::layout::backend_of(l.data_dir))
            .map(|m| m.len())
            .unwrap_or(0);
        let spec = ServerSpec {
            quota_bytes: quota_for(db_size),
            ..spec
        };
        let args = release.server_args(&spec);
        let env = child_env(l.config, &args, "ETCD_", &[]);
        let path = l.bundle.path(Tool::Etcd, l.version);
        let label = format!("etcd-{}", l.version);
        tracing::info!(version = %l.version, storage = %l.storage, client_url = %member.client_url(), data_dir = %data_dir, "starting {label}");
        let guard = ChildGuard::spawn(
            &path,
            &args,
            &env,
            label,
            l.config.stop_grace,
            &l.config.child_output,
        )?;
        Ok(EtcdServer {
            guard,
            version: l.version,
            storage: l.storage,
            client_url: member.client_url().to_string(),
            probe_key: format!("{PROBE_PREFIX}-{}", member.name),
            health_timeout: l.config.health_timeout,
            peers: member.peers(),
            backend: crate::layout::backend_of(l.data_dir),
        })
    }

    fn label(&self) -> String {
        self.guard.label().to_string()
    }

    /// Waits until a write succeeds (through raft, so with quorum in a cluster), with fast
    /// backoff, then removes the probe key. Returns the connected API.
    pub async fn ready(&mut self) -> Result<Api, EtcdError> {
        let start = Instant::now();
        let deadline = start + self.health_timeout;
        let mut backoff = Duration::from_millis(2);
        let mut last_error;
        let mut v3: Option<V3> = None;
        let v2 = V2::new(&self.client_url, REQUEST_TIMEOUT);
        loop {
            if let Some(status) = self.guard.try_wait() {
                return Err(EtcdError::ExitedEarly {
                    label: self.label(),
                    status: describe_status(status),
                    tail: self.guard.tail.last(12),
                });
            }
            let attempt = match self.storage {
                Storage::Etcd2 => v2
                    .put(&self.probe_key, "1")
                    .await
                    .map(|_| Api::V2(v2.clone()))
                    .map_err(|e| e.to_string()),
                Storage::Etcd3 => {
                    if v3.is_none() {
                        v3 = V3::connect(&self.client_url, REQUEST_TIMEOUT).await.ok();
                    }
                    match v3.as_mut() {
                        None => Err("not listening yet".to_string()),
                        Some(c) => match c.put_and_read_back(self.probe_key.as_bytes(), b"1").await
                        {
                            Ok(_) => Ok(Api::V3(Box::new(c.clone()))),
                            Err(e) => {
                                v3 = None;
                                Err(e.to_string())
                            }
                        },
                    }
                }
            };
            match attempt {
                Ok(mut api) => {
                    self.delete_probe(&mut api).await?;
                    tracing::info!(version = %self.version, elapsed_ms = start.elapsed().as_millis() as u64, "{} accepted a write", self.label());
                    return Ok(api);
                }
                Err(e) if e.contains("database space exceeded") => {
                    return Err(EtcdError::NoSpace {
                        label: self.label(),
                        db_mb: std::fs::metadata(&self.backend)
                            .map(|m| m.len() >> 20)
                            .unwrap_or(0),
                    })
                }
                Err(e) => last_error = e,
            }
            if start.elapsed() >= BACKEND_CHECK_AFTER {
                self.check_backend_lock()?;
            }
            if Instant::now() >= deadline {
                return Err(EtcdError::HealthTimeout {
                    label: self.label(),
                    timeout_s: self.health_timeout.as_secs(),
                    last_error,
                    peers: self.unreachable_peers(),
                    tail: self.guard.tail.last(8),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    /// Fails at once when a process other than the step's etcd holds the backend's lock: one
    /// started on the data dir in the instant before ours opened it. Ours would wait for it
    /// until the health timeout.
    fn check_backend_lock(&self) -> Result<(), EtcdError> {
        let ours = self.guard.pid();
        let other = crate::fsutil::lock_holders(&self.backend)
            .into_iter()
            .find(|pid| Some(*pid) != ours);
        match other {
            None => Ok(()),
            Some(pid) => {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_default();
                Err(EtcdError::BackendTaken {
                    label: self.label(),
                    backend: self.backend.display().to_string(),
                    holder: format!("pid {pid} ({cmd})"),
                })
            }
        }
    }

    async fn delete_probe(&self, api: &mut Api) -> Result<(), EtcdError> {
        match api {
            Api::V2(c) => c
                .delete(&self.probe_key)
                .await
                .map_err(|source| EtcdError::V2 {
                    label: self.label(),
                    source,
                }),
            Api::V3(c) => {
                c.delete(self.probe_key.as_bytes())
                    .await
                    .map_err(|source| EtcdError::V3 {
                        label: self.label(),
                        source,
                    })
            }
        }
    }

    /// Writes the probe key `n` times, then removes it (to cut a snapshot with a small snapshot count).
    pub async fn probe_writes(&self, api: &mut Api, n: usize) -> Result<(), EtcdError> {
        for i in 0..n {
            let value = i.to_string();
            match api {
                Api::V2(c) => {
                    c.put(&self.probe_key, &value)
                        .await
                        .map_err(|source| EtcdError::V2 {
                            label: self.label(),
                            source,
                        })?
                }
                Api::V3(c) => c
                    .put(self.probe_key.as_bytes(), value.as_bytes())
                    .await
                    .map(|_| ())
                    .map_err(|source| EtcdError::V3 {
                        label: self.label(),
                        source,
                    })?,
            }
        }
        self.delete_probe(api).await
    }

    /// The number of keys served: proves reads work without reading every value.
    pub async fn count_keys(&self, api: &mut Api) -> Result<u64, EtcdError> {
        let label = self.label();
        match api {
            Api::V3(c) => c
                .count_keys()
                .await
                .map_err(|source| EtcdError::V3 { label, source }),
            Api::V2(c) => c
                .fingerprint()
                .await
                .map(|f| f.keys)
                .map_err(|source| EtcdError::V2 { label, source }),
        }
    }

    /// Fingerprint of the keyspace.
    pub async fn fingerprint(&self, api: &mut Api) -> Result<Fingerprint, EtcdError> {
        let t = Instant::now();
        let fp = match api {
            Api::V2(c) => c.fingerprint().await.map_err(|source| EtcdError::V2 {
                label: self.label(),
                source,
            }),
            Api::V3(c) => c.fingerprint().await.map_err(|source| EtcdError::V3 {
                label: self.label(),
                source,
            }),
        }?;
        tracing::debug!(
            keys = fp.keys,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "read every key of {}",
            self.label()
        );
        Ok(fp)
    }

    /// Peers of the initial cluster that do not accept a TCP connection, for the timeout message.
    fn unreachable_peers(&self) -> String {
        let down: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, url)| !reachable(url))
            .map(|(name, url)| format!("{name} ({url})"))
            .collect();
        if down.is_empty() {
            String::new()
        } else {
            format!("; peers not reachable: {}", down.join(", "))
        }
    }

    /// Closes our clients, then SIGTERM, grace, SIGKILL; reaped. `api` (and every clone of it
    /// the caller held) is dropped first, and the stop waits, without blocking the runtime, until
    /// this process holds no connection to the etcd's client port: etcd 3.2.32 and 3.5.30 hold
    /// SIGTERM for 5-9 s while a client connection is open.
    pub async fn stop(self, api: Option<Api>) -> Stopped {
        drop(api);
        let label = self.label();
        let port = split_url(&self.client_url).map(|(_, _, p)| p);
        let t = Instant::now();
        let mut open = port.map(super::conns::open_to).unwrap_or(0);
        while open > 0 && t.elapsed() < CLIENTS_CLOSE_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(1)).await;
            open = port.map(super::conns::open_to).unwrap_or(0);
        }
        let close_ms = t.elapsed().as_millis() as u64;
        if open > 0 {
            tracing::warn!(
                connections = open,
                "{label}: our client connections did not close within {}ms; stopping it anyway",
                CLIENTS_CLOSE_TIMEOUT.as_millis()
            );
        }
        let t = Instant::now();
        let status = self.guard.terminate().await;
        let stopped = Stopped {
            version: self.version,
            stop_ms: t.elapsed().as_millis() as u64,
            close_ms,
            connections_left: open,
        };
        tracing::info!(elapsed_ms = stopped.stop_ms, close_ms, status = %status.map(describe_status).unwrap_or_default(), "{label} stopped");
        stopped
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }
}

/// `--quota-backend-bytes` for a backend of `db_size`: none up to etcd's default quota margin,
/// else room above the file so the start does not raise NOSPACE.
fn quota_for(db_size: u64) -> Option<u64> {
    (db_size > QUOTA_ABOVE).then_some(db_size + QUOTA_ABOVE)
}

fn reachable(url: &str) -> bool {
    let Some((_, host, port)) = split_url(url) else {
        return false;
    };
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(ms: u64) -> Stopped {
        Stopped {
            version: "3.5.1".parse().unwrap(),
            stop_ms: ms,
            close_ms: 1,
            connections_left: 0,
        }
    }

    #[test]
    fn stops_are_appended_to_the_journal_detail() {
        let mut d = serde_json::Map::new();
        stopped(7).record(&mut d);
        stopped(9).record(&mut d);
        assert_eq!(
            d["stops"],
            serde_json::json!([
                {"etcd": "3.5.1", "stop_ms": 7, "close_ms": 1},
                {"etcd": "3.5.1", "stop_ms": 9, "close_ms": 1},
            ])
        );
        d.insert("stops".into(), "junk".into());
        stopped(3).record(&mut d);
        assert_eq!(d["stops"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn child_env_drops_what_our_flags_set_and_adds_what_is_asked() {
        let env = crate::config::Env::from_pairs([
            ("DATA_DIRECTORY", "/d"),
            ("TARGET_VERSION", "3.5.1"),
            ("TARGET_STORAGE", "etcd3"),
            ("ETCD_DATA_DIR", "/elsewhere"),
            ("ETCD_CIPHER_SUITES", "x"),
            ("PATH", "/bin"),
            ("ETCDCTL_API", "2"),
        ]);
        let config = crate::config::resolve(&Default::default(), &env, true).unwrap();
        let args = vec!["--data-dir=/d".to_string()];
        let got = child_env(&config, &args, "ETCD_", &[("ETCDCTL_API", "3")]);
        let names: Vec<String> = got
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n == "ETCD_DATA_DIR"), "{names:?}");
        assert!(
            !names.iter().any(|n| n == "DATA_DIRECTORY"),
            "ours: {names:?}"
        );
        assert!(names.iter().any(|n| n == "ETCD_CIPHER_SUITES"), "{names:?}");
        assert!(names.iter().any(|n| n == "PATH"), "{names:?}");
        let api: Vec<_> = got.iter().filter(|(k, _)| k == "ETCDCTL_API").collect();
        assert_eq!(api.len(), 1);
        assert_eq!(api[0].1, "3");
    }

    #[test]
    fn quota_is_raised_only_for_members_past_the_margin() {
        assert_eq!(quota_for(0), None);
        assert_eq!(quota_for(QUOTA_ABOVE), None);
        assert_eq!(quota_for(QUOTA_ABOVE + 1), Some(2 * QUOTA_ABOVE + 1));
    }

    #[test]
    fn a_peer_is_reachable_only_while_something_listens() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        assert!(reachable(&url));
        drop(l);
        assert!(!reachable(&url));
        assert!(!reachable("not a url"));
    }
}
