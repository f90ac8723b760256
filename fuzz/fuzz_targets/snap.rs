//! `.snap` files: `decode_snap_file` on arbitrary bytes, and the v2 store readers
//! (`read_cluster_info`, `read_all_nodes`) on the store JSON a decoded snapshot holds.
//! Nothing may panic, and a decoded snapshot must survive `encode_snap_file` unchanged.
//!
//! The file's CRC-32C over its data is what random mutation breaks first, so an input that
//! decodes as `snappb.Snapshot` with a wrong CRC is also run with the CRC recomputed. An
//! input that starts with `{` also goes straight to the JSON readers.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

mod common;
use prost::Message;

use etcd_migrate::storage::raftpb::SnapFile;
use etcd_migrate::storage::{snap, v2store};

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = fix_crc(data) {
        check(&fixed);
    }
    if data.first() == Some(&b'{') {
        read_store(data);
    }
});

fn check(bytes: &[u8]) {
    let path = Path::new("member/snap/0000000000000002-0000000000000042.snap");
    // The streaming reader (used on big snapshots) reads the same file from disk.
    let file = common::scratch_dir("snap").join("s.snap");
    std::fs::write(&file, bytes).expect("write the scratch snapshot");
    let streamed = snap::stream_snap_file(&file, |r| {
        let mut v = Vec::new();
        std::io::Read::read_to_end(r, &mut v).map(|_| v).ok()
    });
    match snap::decode_snap_file(bytes, path) {
        Ok(s) => {
            let (md, data) = streamed.expect("a snapshot that decodes also streams");
            assert_eq!(md, s.metadata, "streamed metadata differs");
            assert_eq!(data.flatten(), s.data, "streamed data differs");
            let again = snap::encode_snap_file(&s);
            if SnapFile::decode(again.as_slice()).is_ok_and(|f| f.crc != 0) {
                let back =
                    snap::decode_snap_file(&again, path).expect("re-encoded snapshot decodes");
                assert_eq!(back, s, "snapshot changed in an encode/decode round trip");
            }
            read_store(s.data.as_deref().unwrap_or(&[]));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn read_store(json: &[u8]) {
    match v2store::read_cluster_info(json) {
        Ok(info) => {
            let _ = (info.version, info.members.len(), info.removed.len());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match v2store::read_all_nodes(json) {
        Ok(nodes) => {
            assert!(
                nodes.windows(2).all(|w| w[0].path <= w[1].path),
                "read_all_nodes is not in path order"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The input with its CRC recomputed, if it decodes as `snappb.Snapshot` with non-empty
/// data and a CRC that does not match.
fn fix_crc(bytes: &[u8]) -> Option<Vec<u8>> {
    let f = SnapFile::decode(bytes).ok()?;
    let data = f.data?;
    let crc = crc32c::crc32c(&data);
    if data.is_empty() || crc == f.crc || crc == 0 {
        return None;
    }
    Some(
        SnapFile {
            crc,
            data: Some(data),
        }
        .encode_to_vec(),
    )
}
