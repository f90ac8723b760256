//! A member that lost its data dir rejoins its cluster: Kubernetes' "Replacing a failed etcd
//! member" done by the pod itself, opt-in (`REJOIN_IF_EMPTY=true`).
//!
//! On a data dir with no etcd data whose `INITIAL_CLUSTER` names other members, the peers are
//! asked (on their peer URLs, as etcd itself does) whether this member is known and had started.
//! If so, and the cluster has quorum and runs a version the target can join: the old member is
//! removed by id, added again with its peer URL (etcd 3.4 refuses that for a few seconds after a
//! remove, "unhealthy cluster": retried), the target release is started privately in staging as
//! the new member with `existing` state until it has applied what the leader had committed and a
//! quorum write through it succeeds, then stopped; its member dir is moved into the data dir and
//! version.txt and the journal record the rejoin.
//!
//! Crash-safe: a member added but never started (a run killed after the add) is found by its
//! peer URL and reused; an intent file beside the data dir says a remove was ours (a run killed
//! between remove and add), so the next run adds it again instead of refusing an unknown name.
//! Staging is discarded by the next run as any other interrupted work.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::etcd::bundle::Bundle;
use crate::etcd::peers::{self, PeerAnswer, PeerMember};
use crate::etcd::server::{EtcdError, EtcdServer, Launch};
use crate::etcd::v3::{ListedMember, V3Error, V3};
use crate::fsutil::{self, FsError};
use crate::layout::Layout;
use crate::progress::{self, JournalEntry, ProgressError};
use crate::staging::Stage;
use crate::version::{EtcdVersion, Storage, VersionFile};

/// How long one peer may take to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a v3 request to the cluster may take.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `member add` and `member remove` are retried while etcd calls the cluster unhealthy.
const RECONFIG_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long a cluster may take to answer a linearizable read before it counts as without quorum.
const QUORUM_WAIT: Duration = Duration::from_secs(10);

/// Why a rejoin must not go ahead; nothing was changed on the cluster or the disk (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum RejoinRefusal {
    #[error(
        "REJOIN_IF_EMPTY is set but {name} is the only member of INITIAL_CLUSTER: there is no cluster to \
         rejoin; restore the data from a backup (etcd-migrate restore) or unset REJOIN_IF_EMPTY"
    )]
    OnlyMember { name: String },
    #[error(
        "REJOIN_IF_EMPTY is set but no peer of {name} answered ({}); a rejoin needs the other members \
         running with quorum. Start them first; if this is the first start of a new cluster, unset \
         REJOIN_IF_EMPTY",
        errors.join("; ")
    )]
    Unreachable { name: String, errors: Vec<String> },
    #[error(
        "the cluster of {name} has no quorum ({why}); a member cannot be replaced now. Bring back a \
         majority of members first (or restore the cluster from a snapshot)"
    )]
    NoQuorum { name: String, why: String },
    #[error(
        "REJOIN_IF_EMPTY is set but the cluster does not know a member named {name} (members: {}); \
         add it by hand (etcdctl member add {name} --peer-urls=...) or fix ETCD_NAME",
        known.join(", ")
    )]
    UnknownName { name: String, known: Vec<String> },
    #[error(
        "the cluster runs at version {cluster}; etcd {target} cannot join it (a member may be at most \
         one minor newer than the cluster, never older). Set TARGET_VERSION to the cluster's release \
         line, rejoin, then upgrade"
    )]
    ClusterVersion {
        cluster: String,
        target: EtcdVersion,
    },
    #[error(
        "data dir {data_dir} holds no etcd data, but the cluster (asked at {asked}) knows {name} as a \
         started member: its data was lost. Starting it as a new member would crash-loop \
         (\"member has already been bootstrapped\"). Set REJOIN_IF_EMPTY=true (or --rejoin-if-empty) \
         to have it removed, added again and synced from the leader, or follow the runbook \
         \"A member lost its data\" by hand"
    )]
    LostWithoutOptIn {
        data_dir: PathBuf,
        name: String,
        asked: String,
    },
}

/// A rejoin failed part way; the next run with the same env converges.
#[derive(Debug, thiserror::Error)]
pub enum RejoinError {
    #[error(transparent)]
    Refused(#[from] RejoinRefusal),
    #[error("rejoining {name}: {source}")]
    Cluster { name: String, source: V3Error },
    #[error("rejoining {name}: {source}")]
    Etcd {
        name: String,
        source: Box<EtcdError>,
    },
    #[error(
        "rejoining {name}: the new member applied index {applied} of the leader's {committed} within \
         {timeout:?}"
    )]
    CatchUp {
        name: String,
        applied: u64,
        committed: u64,
        timeout: Duration,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
}

impl RejoinError {
    /// 2 refused (nothing changed); 1 failed part way.
    pub fn exit_code(&self) -> i32 {
        match self {
            RejoinError::Refused(_) => 2,
            RejoinError::Cluster { .. }
            | RejoinError::Etcd { .. }
            | RejoinError::CatchUp { .. }
            | RejoinError::Fs(_)
            | RejoinError::Progress(_) => 1,
        }
    }
}

/// What the peers say about an empty data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Situation {
    /// Nothing to rejoin: a new cluster forming, a member added by hand, or a lone member.
    Fresh,
    /// This member's data is lost and it is to rejoin through these client URLs.
    Lost {
        client_urls: Vec<String>,
        cluster_version: Option<String>,
    },
}

/// What this member is and what it asked.
pub struct Asking<'a> {
    pub name: &'a str,
    pub peer_urls: &'a [String],
    /// Other members named in INITIAL_CLUSTER.
    pub others: usize,
    pub opt_in: bool,
    /// A run of ours removed this member and did not add it again.
    pub removed_by_us: bool,
    pub data_dir: &'a std::path::Path,
}

/// Decides, from the peers' answers, whether an empty data dir is a lost member. Pure.
pub fn assess(
    me: &Asking<'_>,
    answers: &[Result<PeerAnswer, peers::PeerError>],
    endpoints: Option<&[String]>,
) -> Result<Situation, RejoinRefusal> {
    if me.others == 0 {
        return match me.opt_in {
            true => Err(RejoinRefusal::OnlyMember {
                name: me.name.to_string(),
            }),
            false => Ok(Situation::Fresh),
        };
    }
    let Some(answer) = answers.iter().find_map(|a| a.as_ref().ok()) else {
        return match me.opt_in {
            true => Err(RejoinRefusal::Unreachable {
                name: me.name.to_string(),
                errors: answers
                    .iter()
                    .filter_map(|a| a.as_ref().err().map(|e| e.to_string()))
                    .collect(),
            }),
            false => Ok(Situation::Fresh),
        };
    };
    let members = &answer.members;
    let started_me = members.iter().any(|m| m.name == me.name && m.started());
    let added_me = members
        .iter()
        .any(|m| !m.started() && m.name.is_empty() && same_urls(&m.peer_urls, me.peer_urls));
    let lost = Situation::Lost {
        client_urls: endpoints
            .map(<[String]>::to_vec)
            .unwrap_or_else(|| client_urls_of_others(members, me.name)),
        cluster_version: answer.cluster_version.clone(),
    };
    match (me.opt_in, started_me) {
        (false, true) => Err(RejoinRefusal::LostWithoutOptIn {
            data_dir: me.data_dir.to_path_buf(),
            name: me.name.to_string(),
            asked: answer.peer_url.clone(),
        }),
        (false, false) => Ok(Situation::Fresh),
        (true, true) => Ok(lost),
        (true, false) if added_me || me.removed_by_us => Ok(lost),
        // Named but never started, by no one's add: a new cluster is still forming.
        (true, false) if members.iter().any(|m| m.name == me.name) => Ok(Situation::Fresh),
        (true, false) => Err(RejoinRefusal::UnknownName {
            name: me.name.to_string(),
            known: members
                .iter()
                .map(|m| m.name.clone())
                .filter(|n| !n.is_empty())
                .collect(),
        }),
    }
}

fn same_urls(a: &[String], b: &[String]) -> bool {
    let norm = |v: &[String]| {
        let mut v: Vec<String> = v
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        v.sort();
        v
    };
    norm(a) == norm(b)
}

fn client_urls_of_others(members: &[PeerMember], name: &str) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.name != name)
        .flat_map(|m| m.client_urls.iter().cloned())
        .collect()
}

/// Whether etcd `target` may join a cluster running at `cluster` (`3.4.0`): the same minor, or
/// one newer (a rolling upgrade's first member); never older.
pub fn can_join(target: EtcdVersion, cluster: &str) -> bool {
    match cluster.parse::<EtcdVersion>() {
        Ok(c) => target.major == c.major && target.minor >= c.minor && target.minor <= c.minor + 1,
        Err(_) => true,
    }
}

/// `--initial-cluster` for a member joining: every member by name and peer URL, the new one
/// (`new_id`) under `name`; a member added and never started keeps its empty name, as etcdctl
/// prints it.
pub fn initial_cluster(members: &[ListedMember], new_id: u64, name: &str) -> String {
    members
        .iter()
        .flat_map(|m| {
            let n = if m.id == new_id {
                name
            } else {
                m.name.as_str()
            };
            m.peer_urls.iter().map(move |u| format!("{n}={u}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Written before a remove: the next run knows the member is gone because of us.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    name: String,
    removed: u64,
}

fn removed_by_us(layout: &Layout, name: &str) -> bool {
    std::fs::read(layout.rejoin_intent())
        .ok()
        .and_then(|b| serde_json::from_slice::<Intent>(&b).ok())
        .is_some_and(|i| i.name == name)
}

/// Asks the peers what an empty data dir is. `Fresh` when there is nothing to rejoin.
pub async fn look(config: &Config, layout: &Layout) -> Result<Situation, RejoinRefusal> {
    let member = &config.member;
    let others = member.peers();
    let peer_urls: Vec<String> = others.iter().map(|(_, u)| u.clone()).collect();
    let answers = match &config.cluster_endpoints {
        Some(eps) => vec![peers::ask_clients(eps, PEER_TIMEOUT).await],
        None => peers::ask_all(&peer_urls, PEER_TIMEOUT).await,
    };
    let own = member.advertised_peer_urls();
    let me = Asking {
        name: &member.name,
        peer_urls: &own,
        others: others.len(),
        opt_in: config.rejoin_if_empty,
        removed_by_us: removed_by_us(layout, &member.name),
        data_dir: layout.data_dir(),
    };
    assess(&me, &answers, config.cluster_endpoints.as_deref())
}

/// What a rejoin did, for the journal.
#[derive(Debug)]
pub struct Rejoined {
    pub member_id: u64,
    pub removed: Option<u64>,
    pub reused_added: bool,
    pub applied: u64,
    pub catch_up_ms: u64,
}

/// Replaces this member in its cluster and syncs a new data dir from the leader (see the module
/// doc). `situation` must be `Lost`.
pub async fn rejoin(
    config: &Config,
    bundle: &Bundle,
    layout: &Layout,
    target: VersionFile,
    client_urls: &[String],
    cluster_version: Option<&str>,
) -> Result<Rejoined, RejoinError> {
    let t0 = Instant::now();
    let name = config.member.name.clone();
    if let Some(c) = cluster_version.filter(|c| !can_join(target.version, c)) {
        return Err(RejoinRefusal::ClusterVersion {
            cluster: c.to_string(),
            target: target.version,
        }
        .into());
    }
    let cluster_err = |source| RejoinError::Cluster {
        name: name.clone(),
        source,
    };
    let mut v3 = connect_with_quorum(&name, client_urls).await?;
    let (id, removed, reused) = replace_member(config, layout, &mut v3).await?;
    let members = v3.member_list().await.map_err(cluster_err)?;
    let committed = leader_committed(&mut v3, &members)
        .await
        .map_err(cluster_err)?;
    let join = initial_cluster(&members, id, &name);
    tracing::info!(member_id = %format!("{id:x}"), initial_cluster = %join, committed, "starting etcd-{} as the new member", target.version);
    let stage = Stage::begin(layout)?;
    let applied = sync_staged(config, bundle, &stage, target, &join, committed).await?;
    let catch_up_ms = t0.elapsed().as_millis() as u64;
    install(layout, &stage, target)?;
    let done = Rejoined {
        member_id: id,
        removed,
        reused_added: reused,
        applied,
        catch_up_ms,
    };
    progress::append_journal(layout.data_dir(), &journal_entry(target, &done, t0))?;
    fsutil::remove_tree(&layout.rejoin_intent())?;
    Ok(done)
}

/// Records, durably and before the remove, that this run removes member `id`.
fn record_remove(layout: &Layout, name: &str, id: u64) -> Result<(), RejoinError> {
    let intent = Intent {
        name: name.to_string(),
        removed: id,
    };
    let path = layout.rejoin_intent();
    fsutil::create_dir_mode(&layout.work_dir(), 0o700)?;
    fsutil::write_durable(&path, &progress::encode(&intent, &path)?, 0o600)?;
    Ok(())
}

/// Removes the old member (recording that first) and adds it again, or finds it added by a run
/// that was killed. Returns (new id, removed id, reused).
async fn replace_member(
    config: &Config,
    layout: &Layout,
    v3: &mut V3,
) -> Result<(u64, Option<u64>, bool), RejoinError> {
    let name = &config.member.name;
    let cluster_err = |source| RejoinError::Cluster {
        name: name.clone(),
        source,
    };
    let own = config.member.advertised_peer_urls();
    let members = v3.member_list().await.map_err(cluster_err)?;
    if let Some(m) = members
        .iter()
        .find(|m| m.name.is_empty() && same_urls(&m.peer_urls, &own))
    {
        tracing::info!(member_id = %format!("{:x}", m.id), "found {name} added and never started: reusing it");
        return Ok((m.id, None, true));
    }
    let mut removed = None;
    if let Some(old) = members.iter().find(|m| &m.name == name) {
        record_remove(layout, name, old.id)?;
        tracing::info!(member_id = %format!("{:x}", old.id), "removing the member {name} whose data was lost");
        let id = old.id;
        until_done(
            v3,
            "member remove",
            async |v3: &mut V3| v3.member_remove(id).await,
            |list| (!list.iter().any(|m| m.id == id)).then_some(()),
        )
        .await
        .map_err(cluster_err)?;
        fail::fail_point!("rejoin-after-remove");
        removed = Some(old.id);
    }
    let id = until_done(
        v3,
        "member add",
        async |v3: &mut V3| v3.member_add(own.clone()).await.map(|(id, _)| id),
        |list| {
            list.iter()
                .find(|m| same_urls(&m.peer_urls, &own))
                .map(|m| m.id)
        },
    )
    .await
    .map_err(cluster_err)?;
    fail::fail_point!("rejoin-after-add");
    Ok((id, removed, false))
}

/// A membership change, retried until it is done: etcd 3.4 refuses an add or a remove for a few
/// seconds after the membership changed ("unhealthy cluster", its strict reconfiguration check),
/// and a leader change fails a request. After any error the list is read again: a change that
/// went through although its answer was lost counts as done (`done`), never made twice.
async fn until_done<T>(
    v3: &mut V3,
    what: &str,
    mut attempt: impl AsyncFnMut(&mut V3) -> Result<T, V3Error>,
    done: impl Fn(&[ListedMember]) -> Option<T>,
) -> Result<T, V3Error> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let e = match attempt(v3).await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if let Some(t) = v3.member_list().await.ok().and_then(|l| done(&l)) {
            return Ok(t);
        }
        if start.elapsed() > RECONFIG_RETRY_FOR {
            return Err(e);
        }
        tracing::info!("{what} refused for now ({e}); retrying in {backoff:?}");
        tokio::time::sleep(backoff).await;
        // Short: etcd lifts the refusal within seconds, and every poll past it is downtime.
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// A client of the cluster, once it has shown quorum; else the refusal (nothing changed yet).
async fn connect_with_quorum(name: &str, client_urls: &[String]) -> Result<V3, RejoinRefusal> {
    let no_quorum = |e: V3Error| RejoinRefusal::NoQuorum {
        name: name.to_string(),
        why: e.to_string(),
    };
    let mut v3 = V3::connect_any(client_urls, CLUSTER_TIMEOUT)
        .await
        .map_err(no_quorum)?;
    wait_quorum(&mut v3).await.map_err(no_quorum)?;
    Ok(v3)
}

/// A linearizable read, retried for a while: right after an election etcd answers "leader
/// changed"; only a cluster that stays without an answer has no quorum.
async fn wait_quorum(v3: &mut V3) -> Result<(), V3Error> {
    let start = Instant::now();
    loop {
        match v3.quorum_read(b"/").await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > QUORUM_WAIT => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The leader's committed index: what the new member must have applied before it counts as
/// caught up.
async fn leader_committed(v3: &mut V3, members: &[ListedMember]) -> Result<u64, V3Error> {
    let s = v3.status().await?;
    if s.member == s.leader {
        return Ok(s.committed);
    }
    let leader_urls = members
        .iter()
        .find(|m| m.id == s.leader)
        .map(|m| m.client_urls.clone())
        .unwrap_or_default();
    if leader_urls.is_empty() {
        return Ok(s.committed);
    }
    let mut l = V3::connect_any(&leader_urls, CLUSTER_TIMEOUT).await?;
    Ok(l.status().await?.committed.max(s.committed))
}

/// Starts `target` in staging as the new member until it has applied `committed` and a quorum
/// write through it succeeded; stops it. Returns the applied index reached.
async fn sync_staged(
    config: &Config,
    bundle: &Bundle,
    stage: &Stage,
    target: VersionFile,
    join: &str,
    committed: u64,
) -> Result<u64, RejoinError> {
    let name = config.member.name.clone();
    let etcd_err = |source| RejoinError::Etcd {
        name: name.clone(),
        source: Box::new(source),
    };
    let mut srv = EtcdServer::start(Launch {
        bundle,
        config,
        data_dir: &stage.path,
        version: target.version,
        storage: Storage::Etcd3,
        serve_v2: false,
        snapshot_count: None,
        single_member: false,
        bulk_txns: false,
        join: Some(join),
    })
    .map_err(etcd_err)?;
    // `ready` is a quorum write and read-back through the new member.
    let mut api = srv.ready().await.map_err(etcd_err)?;
    let deadline = Instant::now() + config.health_timeout;
    let mut applied = 0;
    if let Some(v3) = api.v3() {
        fail::fail_point!("rejoin-catching-up");
        loop {
            let s = v3.status().await.map_err(|source| RejoinError::Cluster {
                name: name.clone(),
                source,
            })?;
            // Before 3.4 status has no applied index: the committed one stands for it.
            applied = if s.applied > 0 {
                s.applied
            } else {
                s.committed
            };
            if applied >= committed {
                break;
            }
            if Instant::now() > deadline {
                srv.stop(Some(api)).await;
                return Err(RejoinError::CatchUp {
                    name,
                    applied,
                    committed,
                    timeout: config.health_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!(
        applied,
        committed,
        "the new member caught up with the leader"
    );
    srv.stop(Some(api)).await;
    fail::fail_point!("rejoin-after-sync");
    Ok(applied)
}

/// Records the target, then moves the synced member dir into the data dir. A crash between the
/// two leaves a recorded data dir without data: the next run rejoins again.
fn install(layout: &Layout, stage: &Stage, target: VersionFile) -> Result<(), RejoinError> {
    fsutil::create_dir_mode(layout.data_dir(), 0o700)?;
    progress::record(layout.data_dir(), target)?;
    fsutil::rename_durable(&stage.member(), &layout.member())?;
    fsutil::remove_tree(&stage.path)?;
    Ok(())
}

fn journal_entry(target: VersionFile, r: &Rejoined, t0: Instant) -> JournalEntry {
    let mut detail = progress::Detail::new();
    detail.insert("member_id".into(), format!("{:x}", r.member_id).into());
    if let Some(old) = r.removed {
        detail.insert("removed_member_id".into(), format!("{old:x}").into());
    }
    detail.insert("reused_added_member".into(), r.reused_added.into());
    detail.insert("applied_index".into(), r.applied.into());
    detail.insert("catch_up_ms".into(), r.catch_up_ms.into());
    JournalEntry::rejoin(target, t0.elapsed().as_millis() as u64, detail)
}

/// The etcd flags for the exec after a rejoin: `existing` in place of `new`.
pub fn existing_state(args: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut next_is_state = false;
    for a in args {
        let s = a.to_string_lossy();
        if next_is_state {
            out.push("existing".into());
            next_is_state = false;
        } else if s == "--initial-cluster-state" || s == "-initial-cluster-state" {
            out.push(a.clone());
            next_is_state = true;
        } else if s.starts_with("--initial-cluster-state=")
            || s.starts_with("-initial-cluster-state=")
        {
            out.push("--initial-cluster-state=existing".into());
        } else {
            out.push(a.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests;
