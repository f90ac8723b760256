//! A summary of an etcd member directory (`member/wal` + `member/snap`) of
//! any release from 2.2.1 to 3.5: identity, newest snapshot, membership, log
//! position and the cluster version a restarting etcd sees first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use prost::Message;
use serde::Deserialize;

use crate::storage::raftpb::{
    conf_change_type, decode_entry_payload, entry_type, ConfChange, ConfChangeV2, Entry,
    EntryPayload, HardState, WalSnapshot, RECORD_SNAPSHOT,
};
use crate::storage::snap::{self, SnapError};
use crate::storage::v2store::{self, V2MemberInfo, V2StoreError};
use crate::storage::wal::{self, WalError, WalReader};

/// Errors of [`summarize`].
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// Reading the WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Reading the snapshot directory failed.
    #[error(transparent)]
    Snap(#[from] SnapError),
    /// The snapshot's v2 store could not be read.
    #[error("{}: {source}", path.display())]
    Store {
        /// The snapshot file.
        path: PathBuf,
        /// What failed.
        source: V2StoreError,
    },
    /// The WAL has no metadata record.
    #[error("{}: WAL has no metadata record", dir.display())]
    NoMetadata {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// A walpb.Snapshot record could not be decoded.
    #[error("{} at offset {offset}: bad walpb.Snapshot: {source}", path.display())]
    BadMarker {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// Decoder error.
        source: prost::DecodeError,
    },
}

/// The snapshot a restarting member loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The `.snap` file.
    pub path: PathBuf,
    /// Raft term.
    pub term: u64,
    /// Raft index.
    pub index: u64,
    /// ConfState voters (`nodes`).
    pub nodes: Vec<u64>,
    /// ConfState learners.
    pub learners: Vec<u64>,
    /// Whether the WAL has a matching snapshot marker (etcd needs one).
    pub in_wal: bool,
    /// `/0/version` in its v2 store.
    pub store_version: Option<String>,
}

/// What [`summarize`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSummary {
    /// This member's id (WAL metadata).
    pub node_id: u64,
    /// The cluster id (WAL metadata).
    pub cluster_id: u64,
    /// The newest usable snapshot.
    pub snapshot: Option<SnapshotInfo>,
    /// Members (voters and learners) after the snapshot and the WAL's
    /// configuration changes, ascending.
    pub members: Vec<u64>,
    /// The learners among them.
    pub learners: Vec<u64>,
    /// `members.len()`.
    pub member_count: usize,
    /// Names and URLs known for the members (snapshot store, conf-change
    /// contexts, attribute updates), ascending by id.
    pub member_info: Vec<V2MemberInfo>,
    /// Index of the last entry (or of the snapshot).
    pub last_index: u64,
    /// Term of the last entry (or of the snapshot).
    pub last_term: u64,
    /// The last HardState record.
    pub hard_state: Option<HardState>,
    /// The cluster version a restarting etcd first sees: `/0/version` of
    /// the snapshot's v2 store, else the first version update in the WAL.
    pub boot_cluster_version: Option<String>,
    /// Entries after the snapshot.
    pub entry_count: usize,
    /// Segments read.
    pub wal_segments: Vec<PathBuf>,
    /// Whether the last WAL record was cut short.
    pub torn_tail: bool,
    /// Index of the last entry after the snapshot whose v3 request can change keys (a put,
    /// delete, lease revoke or txn with writes). A v3 backend whose consistent index is below it
    /// lacks writes that etcd replays from the WAL on its next start.
    pub last_key_write: Option<u64>,
}

/// A member as JSON-encoded in a ConfChange context.
#[derive(Deserialize)]
struct MemberCtx {
    #[serde(default)]
    id: u64,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Option<Vec<String>>,
    #[serde(default)]
    name: String,
    #[serde(rename = "clientURLs", default)]
    client_urls: Option<Vec<String>>,
    #[serde(rename = "isLearner", default)]
    is_learner: bool,
}

#[derive(Deserialize)]
struct AttrsCtx {
    #[serde(default)]
    name: String,
    #[serde(rename = "clientURLs", default)]
    client_urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RaftAttrsCtx {
    #[serde(rename = "peerURLs", default)]
    peer_urls: Option<Vec<String>>,
}

/// Membership being replayed.
#[derive(Default)]
struct Membership {
    voters: BTreeSet<u64>,
    learners: BTreeSet<u64>,
    info: BTreeMap<u64, V2MemberInfo>,
}

impl Membership {
    fn info(&mut self, id: u64) -> &mut V2MemberInfo {
        self.info.entry(id).or_insert_with(|| V2MemberInfo {
            id,
            ..Default::default()
        })
    }

    fn change(&mut self, kind: i32, id: u64, ctx: Option<&[u8]>) {
        let member = ctx.and_then(|c| serde_json::from_slice::<MemberCtx>(c).ok());
        match kind {
            conf_change_type::ADD_NODE => {
                self.learners.remove(&id);
                self.voters.insert(id);
            }
            conf_change_type::ADD_LEARNER_NODE if !self.voters.contains(&id) => {
                self.learners.insert(id);
            }
            conf_change_type::REMOVE_NODE => {
                self.voters.remove(&id);
                self.learners.remove(&id);
                self.info.remove(&id);
                return;
            }
            _ => {}
        }
        if let Some(m) = member {
            if m.is_learner && kind == conf_change_type::ADD_NODE {
                // 3.4+ encodes learners as AddLearnerNode, but be lenient.
                self.voters.remove(&id);
                self.learners.insert(id);
            }
            let id = if m.id != 0 { m.id } else { id };
            let i = self.info(id);
            if let Some(p) = m.peer_urls {
                i.peer_urls = p;
            }
            if !m.name.is_empty() {
                i.name = m.name;
            }
            if let Some(c) = m.client_urls {
                i.client_urls = c;
            }
        }
    }

    /// Whether an entry can change membership or set the cluster version.
    /// (`payload`: what a normal entry's data is, as the WAL scan decoded it.)
    fn relevant(e: &Entry, payload: &EntryPayload) -> bool {
        match e.r#type {
            entry_type::CONF_CHANGE | entry_type::CONF_CHANGE_V2 => true,
            _ => match payload {
                EntryPayload::V2(r) => r.method == "PUT" && r.path.starts_with("/0/"),
                EntryPayload::ClusterVersionSet(_) | EntryPayload::MemberAttrSet { .. } => true,
                _ => false,
            },
        }
    }

    fn apply(&mut self, e: &Entry, version: &mut Option<String>) {
        let data = e.data.as_deref().unwrap_or(&[]);
        match e.r#type {
            entry_type::CONF_CHANGE => {
                if let Ok(cc) = ConfChange::decode(data) {
                    self.change(cc.r#type, cc.node_id, cc.context.as_deref());
                }
            }
            entry_type::CONF_CHANGE_V2 => {
                if let Ok(cc) = ConfChangeV2::decode(data) {
                    for c in cc.changes {
                        self.change(c.r#type, c.node_id, None);
                    }
                }
            }
            _ => match decode_entry_payload(data) {
                EntryPayload::V2(r) if r.method == "PUT" => {
                    if r.path == "/0/version" {
                        if version.is_none() {
                            *version = Some(r.val);
                        }
                    } else if let Some(rest) = r.path.strip_prefix("/0/members/") {
                        self.member_put(rest, &r.val);
                    }
                }
                EntryPayload::ClusterVersionSet(v) if version.is_none() => {
                    *version = Some(v);
                }
                EntryPayload::MemberAttrSet {
                    member_id,
                    name,
                    client_urls,
                } => {
                    let i = self.info(member_id);
                    i.name = name;
                    i.client_urls = client_urls;
                }
                _ => {}
            },
        }
    }

    /// A v2 PUT to `/0/members/<hex>/{attributes,raftAttributes}`.
    fn member_put(&mut self, rest: &str, val: &str) {
        let Some((hex, attr)) = rest.split_once('/') else {
            return;
        };
        let Ok(id) = u64::from_str_radix(hex, 16) else {
            return;
        };
        match attr {
            "attributes" => {
                if let Ok(a) = serde_json::from_str::<AttrsCtx>(val) {
                    let i = self.info(id);
                    i.name = a.name;
                    i.client_urls = a.client_urls.unwrap_or_default();
                }
            }
            "raftAttributes" => {
                if let Ok(a) = serde_json::from_str::<RaftAttrsCtx>(val) {
                    self.info(id).peer_urls = a.peer_urls.unwrap_or_default();
                }
            }
            _ => {}
        }
    }
}

/// Summarizes the member directory `member_dir` (the one holding `wal/`
/// and `snap/`).
///
/// The snapshot chosen is the newest intact `.snap` that the WAL has a
/// marker for (as etcd 3.5 does; 2.2.1-3.4 take the newest intact one and
/// then require the marker), falling back to the newest intact one. The
/// WAL is then read from that snapshot as etcd's `ReadAll` does; all its
/// entries count, committed or not.
pub fn summarize(member_dir: &Path) -> Result<MemberSummary, SummaryError> {
    let wal_dir = member_dir.join("wal");
    let snap_dir = member_dir.join("snap");

    // Pass 1: the snapshot markers of every segment (not needed when there is no snapshot).
    let mut markers = BTreeSet::new();
    let has_snaps = snap_dir.exists() && !snap::list_snap_files(&snap_dir)?.is_empty();
    for rec in WalReader::open(&wal_dir)?.take_while(|_| has_snaps) {
        let rec = rec?;
        if rec.record.r#type == RECORD_SNAPSHOT {
            let s = WalSnapshot::decode(rec.record.data.as_deref().unwrap_or(&[])).map_err(
                |source| SummaryError::BadMarker {
                    path: rec.path.clone(),
                    offset: rec.offset,
                    source,
                },
            )?;
            markers.insert((s.term, s.index));
        }
    }
    // The newest intact snapshot the WAL has a marker for, else the newest intact one; read in
    // one streaming pass (a v2 snapshot can hold gigabytes of keys).
    let mut loaded = None;
    if snap_dir.exists() {
        for with_marker in [true, false] {
            for (term, index, path) in snap::list_snap_files(&snap_dir)? {
                if with_marker && !markers.contains(&(term, index)) {
                    continue;
                }
                let read =
                    snap::stream_snap_file(&path, |json| v2store::read_cluster_info_from(json));
                if let Ok((md, store)) = read {
                    let store = store.transpose().map_err(|source| SummaryError::Store {
                        path: path.clone(),
                        source,
                    })?;
                    loaded = Some((path, md, store));
                    break;
                }
            }
            if loaded.is_some() {
                break;
            }
        }
    }

    let mut ms = Membership::default();
    let mut version = None;
    let mut snapshot = None;
    let mut start = WalSnapshot::default();
    if let Some((path, md, store)) = &loaded {
        start.index = md.index;
        start.term = md.term;
        ms.voters.extend(md.conf_state.nodes.iter().copied());
        ms.learners.extend(md.conf_state.learners.iter().copied());
        let store_version = store.as_ref().and_then(|s| s.version.clone());
        for m in store
            .as_ref()
            .map(|s| s.members.clone())
            .unwrap_or_default()
        {
            ms.info.insert(m.id, m);
        }
        version.clone_from(&store_version);
        snapshot = Some(SnapshotInfo {
            path: path.clone(),
            term: md.term,
            index: md.index,
            nodes: md.conf_state.nodes.clone(),
            learners: md.conf_state.learners.clone(),
            in_wal: markers.contains(&(md.term, md.index)),
            store_version,
        });
    }

    // Pass 2: what etcd replays on restart.
    // Only membership and cluster-version entries matter here: keep just those.
    let contents = wal::scan_wal(&wal_dir, &start, Membership::relevant)?;
    let md = contents.metadata.ok_or_else(|| SummaryError::NoMetadata {
        dir: wal_dir.clone(),
    })?;
    for e in &contents.entries {
        ms.apply(e, &mut version);
    }
    let (last_index, last_term) = contents.last_index_term();
    let last_key_write = contents.last_key_write();
    let mut members: BTreeSet<u64> = ms.voters.clone();
    members.extend(ms.learners.iter().copied());
    let member_info = members
        .iter()
        .map(|id| {
            ms.info.get(id).cloned().unwrap_or(V2MemberInfo {
                id: *id,
                ..Default::default()
            })
        })
        .collect();
    Ok(MemberSummary {
        node_id: md.node_id,
        cluster_id: md.cluster_id,
        snapshot,
        member_count: members.len(),
        members: members.into_iter().collect(),
        learners: ms.learners.into_iter().collect(),
        member_info,
        last_index,
        last_term,
        hard_state: contents.hard_state,
        boot_cluster_version: version,
        entry_count: contents.entry_count as usize,
        wal_segments: contents.segments,
        torn_tail: contents.torn_tail.is_some(),
        last_key_write,
    })
}
