//! One private etcd on a data dir: start, wait until a write succeeds, stop.

use std::ffi::OsString;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{split_url, Config};
use crate::version::{EtcdVersion, Storage};

use super::bundle::{Bundle, Tool};
use super::fingerprint::{Fingerprint, PROBE_PREFIX};
use super::process::{describe_status, scrub_env, ChildGuard, SpawnError};
use super::release::{Release, ServerSpec};
use super::v2::{V2Error, V2};
use super::v3::{V3Error, V3};

/// A step's etcd that has not served for this long gets its backend's lock checked (a healthy
/// start takes about 100 ms alone, a few hundred with peers).
const BACKEND_CHECK_AFTER: Duration = Duration::from_secs(1);

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
            initial_cluster: &member.initial_cluster,
            serve_v2: l.serve_v2 || l.storage == Storage::Etcd2,
            fast_election: l.single_member,
            bulk_txns: l.bulk_txns,
            snapshot_count: l.snapshot_count,
            extra_args: &l.config.extra_args,
        };
        let args = release.server_args(&spec);
        let env = child_env(l.config, &args, "ETCD_", &[]);
        let path = l.bundle.path(Tool::Etcd, l.version);
        let label = format!("etcd-{}", l.version);
        tracing::info!(version = %l.version, storage = %l.storage, client_url = %member.client_url(), data_dir = %data_dir, "starting {label}");
        let guard = ChildGuard::spawn(&path, &args, &env, label, l.config.stop_grace)?;
        Ok(EtcdServer {
            guard,
            version: l.version,
            storage: l.storage,
            client_url: member.client_url().to_string(),
            probe_key: format!("{PROBE_PREFIX}-{}", member.name),
            health_timeout: l.config.health_timeout,
            peers: member.peers(),
            backend: l.data_dir.join("member/snap/db"),
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
                        Some(c) => match c.put(self.probe_key.as_bytes(), b"1").await {
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
        let other = crate::datadir::lock_holders(&self.backend)
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

    /// SIGTERM, grace, SIGKILL; reaped.
    pub fn stop(self) {
        let label = self.label();
        let t = Instant::now();
        let status = self.guard.stop();
        tracing::info!(elapsed_ms = t.elapsed().as_millis() as u64, status = %status.map(describe_status).unwrap_or_default(), "{label} stopped");
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }
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
