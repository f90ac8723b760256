//! The WAL reader on arbitrary segment files, laid out as a member dir
//! (`member/wal/<seq>-<index>.wal`, no `snap/`): `WalReader`, `read_wal` (from the empty
//! snapshot and from the last marker seen) and `walinfo::summarize`. Nothing may panic or
//! loop, and `read_wal` must agree with the raw `WalReader` on the records it read.
//!
//! The input is one segment, or up to four split at the marker `@@WAL-SEGMENT@@` (so the
//! CRC chain across segments and "not the last segment" rules are reached), optionally
//! followed by `@@SNAP-FILE@@` and the bytes of a `.snap` file, written to `member/snap/`
//! under the name its metadata gives (so `summarize` also loads a snapshot and its store). Every record
//! carries a CRC-32C chain that random mutation breaks, so each input that frames as
//! records and that the raw reader refuses is also run re-encoded with a valid chain
//! (`WalEncoder`, etcd 2.2.1 framing).
#![no_main]

mod common;

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use prost::Message;

use etcd_migrate::storage::raftpb::{Record, WalSnapshot, RECORD_SNAPSHOT};
use etcd_migrate::storage::wal::{self, WalEncoder, WalReader};
use etcd_migrate::storage::{snap, walinfo};

const SEPARATOR: &[u8] = b"@@WAL-SEGMENT@@";
const SNAP_SEPARATOR: &[u8] = b"@@SNAP-FILE@@";
const MAX_SEGMENTS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let member = common::scratch_dir("wal").join("member");
    let (wal_bytes, snap_file) = match find(data, SNAP_SEPARATOR) {
        Some(at) => (&data[..at], Some(&data[at + SNAP_SEPARATOR.len()..])),
        None => (data, None),
    };
    let segments = split(wal_bytes);
    write_snap(&member, snap_file);
    // A log that reads cleanly gains nothing from a re-encoded copy (only its framing differs).
    let refused = check(&member, &segments);
    if !refused {
        return;
    }
    if let Some(fixed) = reencode(&segments) {
        let refs: Vec<&[u8]> = fixed.iter().map(Vec::as_slice).collect();
        check(&member, &refs);
    }
});

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < MAX_SEGMENTS {
        match find(rest, SEPARATOR) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// Where `sep` first occurs in `data`.
fn find(data: &[u8], sep: &[u8]) -> Option<usize> {
    // Test the first byte before comparing: a memcmp per position would be traced by
    // libFuzzer and dominate the run time.
    data.windows(sep.len())
        .position(|w| w[0] == sep[0] && w == sep)
}

/// Lays out `member/snap/` afresh: empty, or holding `snap_file` under the name etcd would
/// give it (from its metadata when it decodes).
fn write_snap(member: &Path, snap_file: Option<&[u8]>) {
    let snap_dir = member.join("snap");
    let _ = fs::remove_dir_all(&snap_dir);
    fs::create_dir_all(&snap_dir).expect("create the scratch snap dir");
    if let Some(bytes) = snap_file {
        let (term, index) = match snap::decode_snap_file(bytes, &snap_dir) {
            Ok(s) => (s.metadata.term, s.metadata.index),
            Err(_) => (1, 1),
        };
        fs::write(snap_dir.join(snap::snap_file_name(term, index)), bytes)
            .expect("write the scratch snap file");
    }
}

/// Runs every reader on the segments; returns whether the raw `WalReader` refused them.
fn check(member: &Path, segments: &[&[u8]]) -> bool {
    let wal_dir = member.join("wal");
    let _ = fs::remove_dir_all(&wal_dir);
    fs::create_dir_all(&wal_dir).expect("create the scratch wal dir");
    for (i, seg) in segments.iter().enumerate() {
        // Segment i starts at raft index i: segment 0 covers the empty snapshot.
        let name = wal::wal_file_name(i as u64, i as u64);
        fs::write(wal_dir.join(name), seg).expect("write a scratch segment");
    }

    let mut raw_records = 0usize;
    let mut raw_failed = false;
    let mut last_marker = None;
    match WalReader::open(&wal_dir) {
        Ok(mut reader) => {
            for rec in reader.by_ref() {
                match rec {
                    Ok(r) => {
                        raw_records += 1;
                        if r.record.r#type == RECORD_SNAPSHOT {
                            if let Ok(s) =
                                WalSnapshot::decode(r.record.data.as_deref().unwrap_or(&[]))
                            {
                                last_marker = Some(s);
                            }
                        }
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        raw_failed = true;
                    }
                }
            }
            let _ = reader.torn_tail();
        }
        Err(e) => {
            let _ = e.to_string();
            return true;
        }
    }

    match wal::read_wal(&wal_dir, &WalSnapshot::default()) {
        Ok(contents) => {
            // From the empty snapshot read_wal reads every segment, so it succeeds only
            // where the raw reader did, and it saw the same records.
            assert!(!raw_failed, "read_wal accepted what WalReader refused");
            assert_eq!(contents.record_count, raw_records, "record counts differ");
            let _ = contents.last_index_term();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Some(start) = last_marker.filter(|s| *s != WalSnapshot::default()) {
        if let Err(e) = wal::read_wal(&wal_dir, &start) {
            let _ = e.to_string();
        }
    }
    match walinfo::summarize(member) {
        Ok(summary) => {
            assert_eq!(summary.member_count, summary.members.len());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    raw_failed
}

/// Frames each segment leniently (length word, padding bits, `walpb.Record`) and writes the
/// records again with a valid CRC chain; `None` when no record frames or nothing changes.
fn reencode(segments: &[&[u8]]) -> Option<Vec<Vec<u8>>> {
    let mut crc = 0u32;
    let mut out = Vec::new();
    let mut any = false;
    for seg in segments {
        let mut enc = WalEncoder::new(Vec::new(), crc);
        let mut off = 0usize;
        while seg.len() >= off + 8 {
            let mut word = [0u8; 8];
            word.copy_from_slice(&seg[off..off + 8]);
            let len_field = u64::from_le_bytes(word);
            if len_field == 0 {
                break;
            }
            let rec_len = (len_field & !(0xffu64 << 56)) as usize;
            let top = (len_field >> 56) as u8;
            let pad = if top & 0x80 != 0 {
                usize::from(top & 0x7)
            } else {
                0
            };
            let body_start = off + 8;
            let Some(end) = body_start.checked_add(rec_len) else {
                break;
            };
            if end.saturating_add(pad) > seg.len() {
                break;
            }
            let Ok(rec) = Record::decode(&seg[body_start..end]) else {
                break;
            };
            enc.encode(rec.r#type, rec.data.as_deref())
                .expect("encode into a Vec");
            any = true;
            off = end + pad;
        }
        crc = enc.crc();
        out.push(enc.into_inner());
    }
    let same = out.len() == segments.len() && out.iter().zip(segments).all(|(a, b)| a == b);
    (any && !same).then_some(out)
}
