//! A summary of an etcd member directory (`member/wal` + `member/snap`) of
//! any release from 2.2.1 to 3.5: identity, newest snapshot, membership, log
//! position and the cluster version a restarting etcd sees first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use prost::Message;
use serde::Deserialize;

use crate::storage::raftpb::{
    conf_change_type, decode_entry_payload, entry_type, ConfChange, ConfChangeV2, Entry,
    EntryPayload, HardState, SnapshotMetadata, WalSnapshot, RECORD_SNAPSHOT,
};
use crate::storage::snap::{self, SnapError};
use crate::storage::v2store::{self, V2ClusterInfo, V2MemberInfo, V2StoreError};
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

    /// Voters and learners, ascending, with what is known of each.
    fn roster(&self) -> (Vec<u64>, Vec<V2MemberInfo>) {
        let mut members: BTreeSet<u64> = self.voters.clone();
        members.extend(self.learners.iter().copied());
        let info = members
            .iter()
            .map(|id| {
                self.info.get(id).cloned().unwrap_or(V2MemberInfo {
                    id: *id,
                    ..Default::default()
                })
            })
            .collect();
        (members.into_iter().collect(), info)
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
    let markers = snapshot_markers(&wal_dir, &snap_dir)?;
    let loaded = load_snapshot(&snap_dir, &markers)?;
    let mut replay = Replay::default();
    let (start, snapshot) = match &loaded {
        Some(loaded) => {
            let start = replay.seed(loaded);
            (start, Some(loaded.info(&markers)))
        }
        None => (WalSnapshot::default(), None),
    };

    // Pass 2: what etcd replays on restart.
    // Only membership and cluster-version entries matter here: keep just those.
    let contents = wal::scan_wal(&wal_dir, &start, Membership::relevant)?;
    let md = contents.metadata.ok_or_else(|| SummaryError::NoMetadata {
        dir: wal_dir.clone(),
    })?;
    for e in &contents.entries {
        replay.ms.apply(e, &mut replay.version);
    }
    let (last_index, last_term) = contents.last_index_term();
    let last_key_write = contents.last_key_write();
    let (members, member_info) = replay.ms.roster();
    Ok(MemberSummary {
        node_id: md.node_id,
        cluster_id: md.cluster_id,
        snapshot,
        member_count: members.len(),
        members,
        learners: replay.ms.learners.into_iter().collect(),
        member_info,
        last_index,
        last_term,
        hard_state: contents.hard_state,
        boot_cluster_version: replay.version,
        entry_count: contents.entry_count as usize,
        wal_segments: contents.segments,
        torn_tail: contents.torn_tail.is_some(),
        last_key_write,
    })
}

/// The (term, index) of every snapshot marker in the WAL; none read when `snap_dir` holds no
/// snapshot.
fn snapshot_markers(wal_dir: &Path, snap_dir: &Path) -> Result<BTreeSet<(u64, u64)>, SummaryError> {
    let mut markers = BTreeSet::new();
    let has_snaps = snap_dir.exists() && !snap::list_snap_files(snap_dir)?.is_empty();
    for rec in WalReader::open(wal_dir)?.take_while(|_| has_snaps) {
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
    Ok(markers)
}

/// A snapshot read for the summary: its file, metadata and the cluster part of its store.
struct LoadedSnapshot {
    path: PathBuf,
    md: SnapshotMetadata,
    store: Option<V2ClusterInfo>,
}

impl LoadedSnapshot {
    fn info(&self, markers: &BTreeSet<(u64, u64)>) -> SnapshotInfo {
        let md = &self.md;
        SnapshotInfo {
            path: self.path.clone(),
            term: md.term,
            index: md.index,
            nodes: md.conf_state.nodes.clone(),
            learners: md.conf_state.learners.clone(),
            in_wal: markers.contains(&(md.term, md.index)),
            store_version: self.store.as_ref().and_then(|s| s.version.clone()),
        }
    }
}

/// The newest intact snapshot the WAL has a marker for, else the newest intact one; each read
/// in one streaming pass (a v2 snapshot can hold gigabytes of keys).
fn load_snapshot(
    snap_dir: &Path,
    markers: &BTreeSet<(u64, u64)>,
) -> Result<Option<LoadedSnapshot>, SummaryError> {
    if !snap_dir.exists() {
        return Ok(None);
    }
    for with_marker in [true, false] {
        for (term, index, path) in snap::list_snap_files(snap_dir)? {
            if with_marker && !markers.contains(&(term, index)) {
                continue;
            }
            let read = snap::stream_snap_file(&path, |json| v2store::read_cluster_info_from(json));
            if let Ok((md, store)) = read {
                let store = store.transpose().map_err(|source| SummaryError::Store {
                    path: path.clone(),
                    source,
                })?;
                return Ok(Some(LoadedSnapshot { path, md, store }));
            }
        }
    }
    Ok(None)
}

/// What replaying the snapshot and the WAL builds up.
#[derive(Default)]
struct Replay {
    ms: Membership,
    /// The first cluster version seen.
    version: Option<String>,
}

impl Replay {
    /// Starts from the snapshot's ConfState and store; returns where the WAL is read from.
    fn seed(&mut self, loaded: &LoadedSnapshot) -> WalSnapshot {
        let md = &loaded.md;
        self.ms.voters.extend(md.conf_state.nodes.iter().copied());
        self.ms
            .learners
            .extend(md.conf_state.learners.iter().copied());
        if let Some(store) = &loaded.store {
            for m in store.members.iter().cloned() {
                self.ms.info.insert(m.id, m);
            }
            self.version.clone_from(&store.version);
        }
        WalSnapshot {
            index: md.index,
            term: md.term,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::raftpb::{
        ClusterVersionSetRequest, ConfState, InternalRaftRequest, Metadata, RaftSnapshot, Request,
        RECORD_CRC, RECORD_ENTRY, RECORD_METADATA, RECORD_STATE,
    };
    use crate::storage::wal::{wal_file_name, WalEncoder};

    const NODE: u64 = 0xa;
    const CLUSTER: u64 = 0xc;

    /// One WAL record to write.
    enum Rec {
        Snap(u64, u64),
        State(u64, u64),
        Entry(Entry),
    }

    fn entry(index: u64, term: u64, r#type: i32, data: Vec<u8>) -> Rec {
        Rec::Entry(Entry {
            r#type,
            term,
            index,
            data: Some(data.into()),
        })
    }

    fn add(index: u64, r#type: i32, id: u64, ctx: &str) -> Rec {
        let cc = ConfChange {
            id: 1,
            r#type,
            node_id: id,
            context: (!ctx.is_empty()).then(|| ctx.as_bytes().to_vec()),
        };
        entry(index, 2, entry_type::CONF_CHANGE, cc.encode_to_vec())
    }

    fn v2_put(index: u64, path: &str, val: &str) -> Rec {
        let r = Request {
            method: "PUT".into(),
            path: path.into(),
            val: val.into(),
            ..Default::default()
        };
        entry(index, 2, entry_type::NORMAL, r.encode_to_vec())
    }

    fn version_set(index: u64, ver: &str) -> Rec {
        let r = InternalRaftRequest {
            cluster_version_set: Some(ClusterVersionSetRequest { ver: ver.into() }),
            ..Default::default()
        };
        entry(index, 2, entry_type::NORMAL, r.encode_to_vec())
    }

    /// Writes `member/wal/` as one segment: CRC, metadata (unless `metadata` is false), then
    /// `recs`.
    fn write_wal(member: &Path, metadata: bool, recs: &[Rec]) {
        let dir = member.join("wal");
        std::fs::create_dir_all(&dir).unwrap();
        let mut e = WalEncoder::new(Vec::new(), 0);
        e.encode(RECORD_CRC, None).unwrap();
        if metadata {
            let md = Metadata {
                node_id: NODE,
                cluster_id: CLUSTER,
            };
            e.encode(RECORD_METADATA, Some(&md.encode_to_vec()))
                .unwrap();
        }
        for r in recs {
            match r {
                Rec::Snap(term, index) => {
                    let s = WalSnapshot {
                        index: *index,
                        term: *term,
                        conf_state: None,
                    };
                    e.encode(RECORD_SNAPSHOT, Some(&s.encode_to_vec())).unwrap()
                }
                Rec::State(term, commit) => {
                    let hs = HardState {
                        term: *term,
                        vote: 0,
                        commit: *commit,
                    };
                    e.encode(RECORD_STATE, Some(&hs.encode_to_vec())).unwrap()
                }
                Rec::Entry(ent) => e.encode(RECORD_ENTRY, Some(&ent.encode_to_vec())).unwrap(),
            }
        }
        std::fs::write(dir.join(wal_file_name(0, 0)), e.into_inner()).unwrap();
    }

    /// Writes `member/snap/<term>-<index>.snap` with voters `nodes` and a v2 store holding
    /// `/0/version` = `version` and member 0xa.
    fn write_snap(member: &Path, term: u64, index: u64, nodes: &[u64], version: &str) {
        let dir = member.join("snap");
        std::fs::create_dir_all(&dir).unwrap();
        let sp = v2store::StoreParams {
            cluster_version: version.into(),
            members: vec![V2MemberInfo {
                id: NODE,
                name: "a".into(),
                peer_urls: vec!["http://a:2380".into()],
                client_urls: vec![],
            }],
            internal_index: 1,
            min_current_index: 0,
        };
        let mut json = Vec::new();
        let keys: Vec<Result<v2store::V2Key, std::convert::Infallible>> = vec![];
        v2store::write_store(&mut json, &sp, keys).unwrap();
        let snap = RaftSnapshot {
            data: Some(json),
            metadata: SnapshotMetadata {
                conf_state: ConfState {
                    nodes: nodes.to_vec(),
                    ..Default::default()
                },
                index,
                term,
            },
        };
        snap::write_snap_file(&dir, &snap).unwrap();
    }

    const CTX_B: &str = r#"{"id":11,"peerURLs":["http://b:2380"],"name":"b"}"#;
    const CTX_C: &str = r#"{"id":12,"peerURLs":["http://c:2380"],"isLearner":true}"#;
    const ATTRS_A: &str = r#"{"name":"a","clientURLs":["http://a:2379"]}"#;

    /// A summary in one line: members, learners, names, last (index, term), entries, boot
    /// version, snapshot (index, in WAL).
    fn render(s: &MemberSummary) -> String {
        let names: Vec<String> = s
            .member_info
            .iter()
            .map(|m| format!("{:x}={}", m.id, m.name))
            .collect();
        let snap = s.snapshot.as_ref().map(|i| (i.index, i.in_wal));
        format!(
            "members {:?} learners {:?} names {} last {:?} entries {} version {:?} snap {:?}",
            s.members,
            s.learners,
            names.join(","),
            (s.last_index, s.last_term),
            s.entry_count,
            s.boot_cluster_version.as_deref(),
            snap
        )
    }

    fn wal_only(m: &Path) {
        let attrs = "/0/members/a/attributes";
        let recs = [
            Rec::Snap(0, 0),
            add(1, conf_change_type::ADD_NODE, 10, ""),
            add(2, conf_change_type::ADD_NODE, 11, CTX_B),
            v2_put(3, "/0/version", "2.2.0"),
            v2_put(4, attrs, ATTRS_A),
            v2_put(5, "/0/version", "2.3.0"),
            Rec::State(2, 5),
        ];
        write_wal(m, true, &recs)
    }

    fn learners_and_removals(m: &Path) {
        let recs = [
            add(1, conf_change_type::ADD_NODE, 10, ""),
            add(2, conf_change_type::ADD_NODE, 12, CTX_C),
            add(3, conf_change_type::ADD_LEARNER_NODE, 13, ""),
            add(4, conf_change_type::ADD_NODE, 13, ""),
            add(5, conf_change_type::ADD_NODE, 14, ""),
            add(6, conf_change_type::REMOVE_NODE, 14, ""),
            version_set(7, "3.5.0"),
        ];
        write_wal(m, true, &recs)
    }

    fn marked_snapshot(m: &Path) {
        write_snap(m, 2, 5, &[10], "2.2.0");
        let recs = [
            Rec::Snap(2, 5),
            add(6, conf_change_type::ADD_NODE, 11, ""),
            version_set(7, "3.0.0"),
        ];
        write_wal(m, true, &recs)
    }

    fn newest_snapshot_unmarked(m: &Path) {
        write_snap(m, 2, 5, &[10], "2.2.0");
        write_snap(m, 2, 9, &[10, 11], "2.3.0");
        let recs = [Rec::Snap(2, 5), add(6, conf_change_type::ADD_NODE, 12, "")];
        write_wal(m, true, &recs)
    }

    fn no_snapshot_marked(m: &Path) {
        write_snap(m, 2, 5, &[10], "2.2.0");
        write_snap(m, 2, 9, &[10, 11], "2.3.0");
        let junk = m.join("snap").join(snap::snap_file_name(3, 1));
        std::fs::write(junk, b"junk").unwrap();
        write_wal(m, true, &[Rec::Snap(0, 0), Rec::State(2, 9)])
    }

    #[test]
    fn summary_replays_membership_and_version_after_the_snapshot() {
        type Setup = fn(&Path);
        let cases: &[(Setup, &str)] = &[
            (
                wal_only,
                r#"members [10, 11] learners [] names a=a,b=b last (5, 2) entries 5 version Some("2.2.0") snap None"#,
            ),
            (
                learners_and_removals,
                r#"members [10, 12, 13] learners [12] names a=,c=,d= last (7, 2) entries 7 version Some("3.5.0") snap None"#,
            ),
            (
                marked_snapshot,
                r#"members [10, 11] learners [] names a=a,b= last (7, 2) entries 2 version Some("2.2.0") snap Some((5, true))"#,
            ),
            (
                newest_snapshot_unmarked,
                r#"members [10, 12] learners [] names a=a,c= last (6, 2) entries 1 version Some("2.2.0") snap Some((5, true))"#,
            ),
            (
                no_snapshot_marked,
                r#"members [10, 11] learners [] names a=a,b= last (9, 2) entries 0 version Some("2.3.0") snap Some((9, false))"#,
            ),
        ];
        for (i, (setup, want)) in cases.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            setup(dir.path());
            let s = summarize(dir.path()).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!((s.node_id, s.cluster_id), (NODE, CLUSTER), "case {i}");
            assert_eq!(render(&s), *want, "case {i}");
            assert_eq!(s.member_count, s.members.len(), "case {i}");
            assert_eq!(s.wal_segments.len(), 1, "case {i}");
            assert!(!s.torn_tail, "case {i}");
        }
    }

    #[test]
    fn summary_refuses_a_wal_without_metadata_or_with_a_bad_marker() {
        let dir = tempfile::tempdir().unwrap();
        write_wal(dir.path(), false, &[Rec::State(1, 0)]);
        let err = summarize(dir.path()).unwrap_err();
        assert!(matches!(err, SummaryError::NoMetadata { .. }), "{err}");
        assert!(
            err.to_string().ends_with("WAL has no metadata record"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        write_snap(dir.path(), 2, 5, &[10], "2.2.0");
        let wal = dir.path().join("wal");
        std::fs::create_dir_all(&wal).unwrap();
        let mut e = WalEncoder::new(Vec::new(), 0);
        e.encode(RECORD_CRC, None).unwrap();
        e.encode(RECORD_SNAPSHOT, Some(&[0xff, 0xff])).unwrap();
        std::fs::write(wal.join(wal_file_name(0, 0)), e.into_inner()).unwrap();
        let err = summarize(dir.path()).unwrap_err();
        assert!(
            matches!(err, SummaryError::BadMarker { offset: 12, .. }),
            "{err}"
        );
    }

    #[test]
    fn markers_are_read_only_when_there_is_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        write_wal(dir.path(), true, &[Rec::Snap(0, 0), Rec::Snap(2, 5)]);
        let (wal, snap_dir) = (dir.path().join("wal"), dir.path().join("snap"));
        assert!(snapshot_markers(&wal, &snap_dir).unwrap().is_empty());
        write_snap(dir.path(), 2, 5, &[10], "2.2.0");
        let markers = snapshot_markers(&wal, &snap_dir).unwrap();
        assert_eq!(markers.into_iter().collect::<Vec<_>>(), [(0, 0), (2, 5)]);
    }

    #[test]
    fn load_snapshot_prefers_a_marked_one_and_skips_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        let snap_dir = dir.path().join("snap");
        assert!(load_snapshot(&snap_dir, &BTreeSet::new())
            .unwrap()
            .is_none());
        write_snap(dir.path(), 2, 5, &[10], "2.2.0");
        write_snap(dir.path(), 2, 9, &[10], "2.3.0");
        std::fs::write(snap_dir.join(snap::snap_file_name(2, 12)), b"junk").unwrap();
        let cases: &[(&[(u64, u64)], u64)] = &[
            (&[], 9),
            (&[(2, 5)], 5),
            (&[(2, 12)], 9),
            (&[(2, 5), (2, 9)], 9),
        ];
        for (markers, index) in cases {
            let markers: BTreeSet<_> = markers.iter().copied().collect();
            let loaded = load_snapshot(&snap_dir, &markers).unwrap().unwrap();
            assert_eq!(loaded.md.index, *index, "{markers:?}");
            let info = loaded.info(&markers);
            assert_eq!(info.in_wal, markers.contains(&(2, *index)), "{markers:?}");
            let version = if *index == 5 { "2.2.0" } else { "2.3.0" };
            assert_eq!(info.store_version.as_deref(), Some(version));
        }
    }

    #[test]
    fn replay_seeds_from_the_snapshot_and_roster_lists_everyone() {
        let loaded = LoadedSnapshot {
            path: PathBuf::from("s.snap"),
            md: SnapshotMetadata {
                conf_state: ConfState {
                    nodes: vec![3, 1],
                    learners: vec![7],
                    ..Default::default()
                },
                index: 40,
                term: 4,
            },
            store: Some(V2ClusterInfo {
                version: Some("2.2.0".into()),
                members: vec![V2MemberInfo {
                    id: 3,
                    name: "three".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        };
        let mut replay = Replay::default();
        let start = replay.seed(&loaded);
        assert_eq!((start.index, start.term, start.conf_state), (40, 4, None));
        assert_eq!(replay.version.as_deref(), Some("2.2.0"));
        let (ids, info) = replay.ms.roster();
        assert_eq!(ids, [1, 3, 7]);
        let names: Vec<_> = info.iter().map(|m| (m.id, m.name.as_str())).collect();
        assert_eq!(names, [(1, ""), (3, "three"), (7, "")]);
    }
}
