//! Hand-written protobuf messages of etcd's on-disk formats (WAL records,
//! raft entries and snapshots, snapshot files, v2 requests).
//!
//! etcd declares these messages in proto2 with gogoproto `nullable=false`,
//! which makes its marshaller write such fields even when they hold the zero
//! value (e.g. the WAL's first record is `crc` record `08 04 10 00`: type 4,
//! crc 0). prost's `required` label has exactly that behaviour, so every
//! `nullable=false` field is `required` here and every nullable one is an
//! `Option`. Fields are declared in field-number order, which is the order in
//! which gogoproto writes them, so our bytes equal etcd 2.2.1's bytes.
//!
//! Repeated integers are written unpacked (`packed = "false"`): etcd 2.2.1's
//! generated decoder accepts only the unpacked form, while prost's decoder
//! (and etcd 3.x) accept both.

use prost::Message;

/// WAL record type of a [`Record`] holding [`Metadata`].
pub const RECORD_METADATA: i64 = 1;
/// WAL record type of a [`Record`] holding an [`Entry`].
pub const RECORD_ENTRY: i64 = 2;
/// WAL record type of a [`Record`] holding a [`HardState`].
pub const RECORD_STATE: i64 = 3;
/// WAL record type of a [`Record`] that resets the CRC chain (no data).
pub const RECORD_CRC: i64 = 4;
/// WAL record type of a [`Record`] holding a [`WalSnapshot`] marker.
pub const RECORD_SNAPSHOT: i64 = 5;

/// `walpb.Record`: one framed WAL record.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    /// One of the `RECORD_*` constants.
    #[prost(int64, required, tag = "1")]
    pub r#type: i64,
    /// CRC-32C of all record data so far in the chain (see `wal.rs`).
    #[prost(uint32, required, tag = "2")]
    pub crc: u32,
    /// Payload; absent for CRC records. A slice of the frame read (no copy).
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub data: Option<bytes::Bytes>,
}

/// `walpb.Snapshot`: the snapshot marker written into the WAL.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct WalSnapshot {
    /// Raft index of the snapshot.
    #[prost(uint64, required, tag = "1")]
    pub index: u64,
    /// Raft term of the snapshot.
    #[prost(uint64, required, tag = "2")]
    pub term: u64,
    /// Only written by etcd >= 3.5; never written by us.
    #[prost(message, optional, tag = "3")]
    pub conf_state: Option<ConfState>,
}

/// `raftpb.EntryType` values.
pub mod entry_type {
    /// An application command (a v2 `Request` or a v3 `InternalRaftRequest`).
    pub const NORMAL: i32 = 0;
    /// A [`super::ConfChange`].
    pub const CONF_CHANGE: i32 = 1;
    /// A [`super::ConfChangeV2`] (etcd >= 3.4 raft; etcd itself does not propose them).
    pub const CONF_CHANGE_V2: i32 = 2;
}

/// `raftpb.Entry`.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    /// One of [`entry_type`].
    #[prost(int32, required, tag = "1")]
    pub r#type: i32,
    /// Raft term.
    #[prost(uint64, required, tag = "2")]
    pub term: u64,
    /// Raft index.
    #[prost(uint64, required, tag = "3")]
    pub index: u64,
    /// Payload. A slice of the record read (no copy).
    #[prost(bytes = "bytes", optional, tag = "4")]
    pub data: Option<bytes::Bytes>,
}

/// `raftpb.HardState`.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct HardState {
    /// Current term.
    #[prost(uint64, required, tag = "1")]
    pub term: u64,
    /// Node voted for in `term` (0 = none).
    #[prost(uint64, required, tag = "2")]
    pub vote: u64,
    /// Highest index known committed.
    #[prost(uint64, required, tag = "3")]
    pub commit: u64,
}

/// `raftpb.ConfState` (field 1 was `nodes` up to 3.3, `voters` since 3.4).
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct ConfState {
    /// Voting members.
    #[prost(uint64, repeated, packed = "false", tag = "1")]
    pub nodes: Vec<u64>,
    /// Learners (3.4+).
    #[prost(uint64, repeated, packed = "false", tag = "2")]
    pub learners: Vec<u64>,
    /// Voters of the outgoing joint config (3.4+).
    #[prost(uint64, repeated, packed = "false", tag = "3")]
    pub voters_outgoing: Vec<u64>,
    /// Learners once the joint config is left (3.4+).
    #[prost(uint64, repeated, packed = "false", tag = "4")]
    pub learners_next: Vec<u64>,
    /// 3.4+ writes it always; optional here so that we never write it.
    #[prost(bool, optional, tag = "5")]
    pub auto_leave: Option<bool>,
}

/// `raftpb.SnapshotMetadata`.
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotMetadata {
    /// Membership at the snapshot.
    #[prost(message, required, tag = "1")]
    pub conf_state: ConfState,
    /// Raft index of the snapshot.
    #[prost(uint64, required, tag = "2")]
    pub index: u64,
    /// Raft term of the snapshot.
    #[prost(uint64, required, tag = "3")]
    pub term: u64,
}

/// `raftpb.Snapshot`: what a `.snap` file protects with its CRC.
#[derive(Clone, PartialEq, Message)]
pub struct RaftSnapshot {
    /// The v2 store JSON for etcd's own snapshots.
    #[prost(bytes = "vec", optional, tag = "1")]
    pub data: Option<Vec<u8>>,
    /// Where the snapshot sits in the raft log.
    #[prost(message, required, tag = "2")]
    pub metadata: SnapshotMetadata,
}

/// `raftpb.ConfChangeType` values.
pub mod conf_change_type {
    /// Add a voter.
    pub const ADD_NODE: i32 = 0;
    /// Remove a member.
    pub const REMOVE_NODE: i32 = 1;
    /// Update a member's attributes (no membership change).
    pub const UPDATE_NODE: i32 = 2;
    /// Add a learner (3.4+).
    pub const ADD_LEARNER_NODE: i32 = 3;
}

/// `raftpb.ConfChange`.
#[derive(Clone, PartialEq, Message)]
pub struct ConfChange {
    /// etcd's request id.
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    /// One of [`conf_change_type`].
    #[prost(int32, required, tag = "2")]
    pub r#type: i32,
    /// The member concerned.
    #[prost(uint64, required, tag = "3")]
    pub node_id: u64,
    /// JSON of the member (`{"id":..,"peerURLs":[..],"name":..}`) for add/update.
    #[prost(bytes = "vec", optional, tag = "4")]
    pub context: Option<Vec<u8>>,
}

/// `raftpb.ConfChangeSingle` (3.4+).
#[derive(Clone, PartialEq, Message)]
pub struct ConfChangeSingle {
    /// One of [`conf_change_type`].
    #[prost(int32, required, tag = "1")]
    pub r#type: i32,
    /// The member concerned.
    #[prost(uint64, required, tag = "2")]
    pub node_id: u64,
}

/// `raftpb.ConfChangeV2` (3.4+).
#[derive(Clone, PartialEq, Message)]
pub struct ConfChangeV2 {
    /// Joint-consensus transition kind (ignored here).
    #[prost(int32, required, tag = "1")]
    pub transition: i32,
    /// The individual changes.
    #[prost(message, repeated, tag = "2")]
    pub changes: Vec<ConfChangeSingle>,
    /// Opaque context.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub context: Option<Vec<u8>>,
}

/// `snappb.Snapshot`: the content of a `.snap` file.
#[derive(Clone, PartialEq, Message)]
pub struct SnapFile {
    /// CRC-32C (Castagnoli, initial 0) of `data`.
    #[prost(uint32, required, tag = "1")]
    pub crc: u32,
    /// Encoded [`RaftSnapshot`].
    #[prost(bytes = "vec", optional, tag = "2")]
    pub data: Option<Vec<u8>>,
}

/// `etcdserverpb.Metadata`: data of the WAL's metadata records.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct Metadata {
    /// This member's id.
    #[prost(uint64, required, tag = "1")]
    pub node_id: u64,
    /// The cluster's id.
    #[prost(uint64, required, tag = "2")]
    pub cluster_id: u64,
}

/// `etcdserverpb.Request`: a v2 store request, the data of a normal entry in
/// etcd 2.x and (for the v2 API and cluster bookkeeping) in 3.0 to 3.4.
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    /// Request id.
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    /// "PUT", "POST", "DELETE", "QGET", "SYNC", "GET", "HEAD".
    #[prost(string, required, tag = "2")]
    pub method: String,
    /// v2 store path, e.g. `/0/version` or `/1/registry/...`.
    #[prost(string, required, tag = "3")]
    pub path: String,
    /// Value.
    #[prost(string, required, tag = "4")]
    pub val: String,
    /// Directory flag.
    #[prost(bool, required, tag = "5")]
    pub dir: bool,
    /// Compare-and-swap value.
    #[prost(string, required, tag = "6")]
    pub prev_value: String,
    /// Compare-and-swap index.
    #[prost(uint64, required, tag = "7")]
    pub prev_index: u64,
    /// Compare-and-swap existence (nullable).
    #[prost(bool, optional, tag = "8")]
    pub prev_exist: Option<bool>,
    /// Absolute expiration, Unix nanoseconds (0 = none).
    #[prost(int64, required, tag = "9")]
    pub expiration: i64,
    /// Watch flag.
    #[prost(bool, required, tag = "10")]
    pub wait: bool,
    /// Watch start index.
    #[prost(uint64, required, tag = "11")]
    pub since: u64,
    /// Recursive flag.
    #[prost(bool, required, tag = "12")]
    pub recursive: bool,
    /// Sorted flag.
    #[prost(bool, required, tag = "13")]
    pub sorted: bool,
    /// Quorum read flag.
    #[prost(bool, required, tag = "14")]
    pub quorum: bool,
    /// Request time, Unix nanoseconds (SYNC uses it).
    #[prost(int64, required, tag = "15")]
    pub time: i64,
    /// Stream flag.
    #[prost(bool, required, tag = "16")]
    pub stream: bool,
    /// TTL refresh (2.3+, nullable).
    #[prost(bool, optional, tag = "17")]
    pub refresh: Option<bool>,
}

/// `membershippb.ClusterVersionSetRequest` (3.5+).
#[derive(Clone, PartialEq, Message)]
pub struct ClusterVersionSetRequest {
    /// The cluster version, e.g. "3.5.0".
    #[prost(string, tag = "1")]
    pub ver: String,
}

/// `membershippb.Attributes` (3.5+).
#[derive(Clone, PartialEq, Message)]
pub struct MemberAttributes {
    /// Member name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Client URLs.
    #[prost(string, repeated, tag = "2")]
    pub client_urls: Vec<String>,
}

/// `membershippb.ClusterMemberAttrSetRequest` (3.5+).
#[derive(Clone, PartialEq, Message)]
pub struct ClusterMemberAttrSetRequest {
    /// The member.
    #[prost(uint64, tag = "1")]
    pub member_id: u64,
    /// Its attributes.
    #[prost(message, optional, tag = "2")]
    pub member_attributes: Option<MemberAttributes>,
}

/// `etcdserverpb.RequestHeader` (3.x), kept only to recognise the wrapper.
#[derive(Clone, PartialEq, Message)]
pub struct RequestHeader {
    /// Request id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// `etcdserverpb.InternalRaftRequest` (3.x), reduced to the fields needed to
/// recognise v2 requests and cluster bookkeeping; every other field is
/// skipped by the decoder.
#[derive(Clone, PartialEq, Message)]
pub struct InternalRaftRequest {
    /// Request id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// A wrapped v2 request.
    #[prost(message, optional, tag = "2")]
    pub v2: Option<Request>,
    /// Request header.
    #[prost(message, optional, tag = "100")]
    pub header: Option<RequestHeader>,
    /// 3.5 cluster version update.
    #[prost(message, optional, tag = "1300")]
    pub cluster_version_set: Option<ClusterVersionSetRequest>,
    /// 3.5 member attribute update.
    #[prost(message, optional, tag = "1301")]
    pub cluster_member_attr_set: Option<ClusterMemberAttrSetRequest>,
}

/// What the data of a normal raft entry turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum EntryPayload {
    /// Empty data (raft's no-op entry after an election).
    Empty,
    /// A v2 request, bare (2.x, 3.0-3.4) or wrapped in an `InternalRaftRequest`.
    V2(Request),
    /// 3.5 `ClusterVersionSet`.
    ClusterVersionSet(String),
    /// 3.5 `ClusterMemberAttrSet`.
    MemberAttrSet {
        /// The member.
        member_id: u64,
        /// Its name.
        name: String,
        /// Its client URLs.
        client_urls: Vec<String>,
    },
    /// Any other v3 request: `writes_keys` when applying it can change keys (see
    /// [`v3_request_may_write_keys`]).
    OtherV3 {
        /// A put, delete, lease revoke or txn with writes.
        writes_keys: bool,
    },
    /// Data that parses as neither message.
    Unknown,
}

/// Classifies the data of a normal entry the way etcd 3.x's applier does:
/// first as an `InternalRaftRequest`, and only if that fails as a bare v2
/// `Request` (the 2.x format, still used for v2 requests up to 3.4).
pub fn decode_entry_payload(data: &[u8]) -> EntryPayload {
    if data.is_empty() {
        return EntryPayload::Empty;
    }
    if let Ok(irr) = InternalRaftRequest::decode(data) {
        if let Some(v2) = irr.v2 {
            return EntryPayload::V2(v2);
        }
        if let Some(cv) = irr.cluster_version_set {
            return EntryPayload::ClusterVersionSet(cv.ver);
        }
        if let Some(ma) = irr.cluster_member_attr_set {
            let attrs = ma.member_attributes.unwrap_or_default();
            return EntryPayload::MemberAttrSet {
                member_id: ma.member_id,
                name: attrs.name,
                client_urls: attrs.client_urls,
            };
        }
        // A bare Request always has a non-empty Method in field 2, which never
        // parses as a message, so reaching here means a genuine v3 request.
        return EntryPayload::OtherV3 {
            writes_keys: v3_request_may_write_keys(data),
        };
    }
    match Request::decode(data) {
        Ok(r) => EntryPayload::V2(r),
        Err(_) => EntryPayload::Unknown,
    }
}

/// `InternalRaftRequest` fields whose requests change keys when applied: `put`, `delete_range`,
/// `lease_revoke` (the lease's keys go). `txn` (6) changes keys when a branch does.
const IRR_PUT: u64 = 4;
const IRR_DELETE_RANGE: u64 = 5;
const IRR_TXN: u64 = 6;
const IRR_LEASE_REVOKE: u64 = 9;

/// Whether applying a v3 `InternalRaftRequest` (not a v2 one) can change keys: a put, a delete
/// range, a lease revoke, or a txn with a put, a delete or a nested txn in either branch (which
/// branch runs is not known offline). Read straight off the wire, without copying values; bytes
/// that are not a well-formed message count as a write.
pub fn v3_request_may_write_keys(data: &[u8]) -> bool {
    any_len_field(data, &mut |field, body| match field {
        IRR_PUT | IRR_DELETE_RANGE | IRR_LEASE_REVOKE => true,
        IRR_TXN => txn_may_write_keys(body),
        _ => false,
    })
    .unwrap_or(true)
}

/// `TxnRequest { compare = 1; success = 2; failure = 3 }` of `RequestOp { request_range = 1;
/// request_put = 2; request_delete_range = 3; request_txn = 4 }`.
fn txn_may_write_keys(txn: &[u8]) -> bool {
    any_len_field(txn, &mut |field, op| {
        (field == 2 || field == 3)
            && any_len_field(op, &mut |f, _| (2..=4).contains(&f)).unwrap_or(true)
    })
    .unwrap_or(true)
}

/// Calls `f(field number, body)` for each length-delimited field of a protobuf message until `f`
/// says true. `Some(found)`, or `None` when the bytes are not a well-formed message (groups,
/// which etcd never writes, count as malformed).
fn any_len_field(mut b: &[u8], f: &mut impl FnMut(u64, &[u8]) -> bool) -> Option<bool> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                let body = b.get(..n)?;
                if f(key >> 3, body) {
                    return Some(true);
                }
                n
            }
            _ => return None,
        };
        b = b.get(skip..)?;
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_record_matches_etcd_bytes() {
        let r = Record {
            r#type: RECORD_CRC,
            crc: 0,
            data: None,
        };
        assert_eq!(r.encode_to_vec(), vec![0x08, 0x04, 0x10, 0x00]);
    }

    #[test]
    fn zero_snapshot_marker_is_written_in_full() {
        let s = WalSnapshot::default();
        assert_eq!(s.encode_to_vec(), vec![0x08, 0x00, 0x10, 0x00]);
    }

    #[test]
    fn hard_state_matches_2_2_1_bytes() {
        // From the 2.2.1 fixture WAL: term 1, vote 0, commit 1.
        let h = HardState {
            term: 1,
            vote: 0,
            commit: 1,
        };
        assert_eq!(h.encode_to_vec(), vec![0x08, 0x01, 0x10, 0x00, 0x18, 0x01]);
    }

    #[test]
    fn conf_state_is_unpacked_and_reader_accepts_packed() {
        let cs = ConfState {
            nodes: vec![1, 2],
            ..Default::default()
        };
        let b = cs.encode_to_vec();
        assert_eq!(b, vec![0x08, 0x01, 0x08, 0x02]);
        // Packed form: tag 1 wire type 2, length 2, values 1 and 2.
        let packed = [0x0a, 0x02, 0x01, 0x02];
        assert_eq!(ConfState::decode(&packed[..]).unwrap().nodes, vec![1, 2]);
    }

    #[test]
    fn bare_request_is_not_taken_for_internal_request() {
        for method in ["PUT", "POST", "DELETE", "QGET", "SYNC", "GET", "HEAD"] {
            let r = Request {
                id: 7,
                method: method.into(),
                path: "/0/version".into(),
                val: "2.2.0".into(),
                ..Default::default()
            };
            match decode_entry_payload(&r.encode_to_vec()) {
                EntryPayload::V2(got) => assert_eq!(got, r),
                other => panic!("{method}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrapped_request_and_version_set_are_recognised() {
        let r = Request {
            method: "PUT".into(),
            path: "/0/version".into(),
            val: "3.4.0".into(),
            ..Default::default()
        };
        let irr = InternalRaftRequest {
            id: 9,
            v2: Some(r.clone()),
            header: Some(RequestHeader { id: 9 }),
            ..Default::default()
        };
        assert_eq!(
            decode_entry_payload(&irr.encode_to_vec()),
            EntryPayload::V2(r)
        );
        let irr = InternalRaftRequest {
            header: Some(RequestHeader { id: 3 }),
            cluster_version_set: Some(ClusterVersionSetRequest {
                ver: "3.5.0".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            decode_entry_payload(&irr.encode_to_vec()),
            EntryPayload::ClusterVersionSet("3.5.0".into())
        );
    }

    /// Length-delimited field `field` holding `body`.
    fn ld(field: u64, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        prost::encoding::encode_key(
            field as u32,
            prost::encoding::WireType::LengthDelimited,
            &mut b,
        );
        prost::encoding::encode_varint(body.len() as u64, &mut b);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn v3_requests_that_change_keys_are_told_apart() {
        let header = ld(100, &[0x08, 0x07]);
        let kv = [ld(1, b"/registry/pods/a"), ld(2, b"{}")].concat();
        let range = ld(1, &ld(1, b"/registry/pods/a"));
        let put = ld(2, &kv);
        let del = ld(3, &ld(1, b"/k"));
        let cmp = ld(1, &[0x08, 0x01]);
        let txn = |ops: &[Vec<u8>]| [cmp.clone(), ops.concat()].concat();
        let irr = |field: u64, body: &[u8]| [header.clone(), ld(field, body)].concat();
        let cases: &[(&str, Vec<u8>, bool)] = &[
            ("put", irr(IRR_PUT, &kv), true),
            ("range", irr(3, &ld(1, b"/k")), false),
            ("delete range", irr(IRR_DELETE_RANGE, &ld(1, b"/k")), true),
            ("compaction", irr(7, &[0x08, 0x05]), false),
            ("lease grant", irr(8, &[0x08, 0x0a]), false),
            ("lease revoke", irr(IRR_LEASE_REVOKE, &[0x08, 0x0a]), true),
            ("alarm", irr(10, &[0x08, 0x01]), false),
            ("auth enable", irr(1000, &[]), false),
            ("txn of compares only", irr(IRR_TXN, &cmp), false),
            (
                "txn reading both ways",
                irr(IRR_TXN, &txn(&[ld(2, &range), ld(3, &range)])),
                false,
            ),
            (
                "txn putting on success",
                irr(IRR_TXN, &txn(&[ld(2, &put), ld(3, &range)])),
                true,
            ),
            (
                "txn deleting on failure",
                irr(IRR_TXN, &txn(&[ld(2, &range), ld(3, &del)])),
                true,
            ),
            (
                "nested txn",
                irr(IRR_TXN, &txn(&[ld(2, &ld(4, &cmp))])),
                true,
            ),
            ("cut short", irr(IRR_PUT, &kv)[..9].to_vec(), true),
        ];
        for (name, data, want) in cases {
            assert_eq!(v3_request_may_write_keys(data), *want, "{name}");
            if name != &"cut short" {
                assert_eq!(
                    decode_entry_payload(data),
                    EntryPayload::OtherV3 { writes_keys: *want },
                    "{name}"
                );
            }
        }
        // A bare v2 request has a string in field 4 (Val): still a v2 request, not a put.
        let v2 = Request {
            method: "PUT".into(),
            path: "/registry/pods/a".into(),
            val: "{}".into(),
            ..Default::default()
        };
        assert!(matches!(
            decode_entry_payload(&v2.encode_to_vec()),
            EntryPayload::V2(_)
        ));
    }
}
