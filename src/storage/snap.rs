//! etcd's `member/snap/%016x-%016x.snap` files (term-index): a
//! `snappb.Snapshot{crc, data}` whose `data` is an encoded
//! `raftpb.Snapshot{data: v2 store JSON, metadata}` and whose `crc` is the
//! CRC-32C (Castagnoli, initial 0) of that `data` (`snap/snapshotter.go`).
//!
//! etcd 2.2.1's loader takes the `*.snap` names in reverse string order and
//! uses the first that decodes with a good CRC; empty data or a zero CRC is
//! an "empty snapshot" error. We do the same (without renaming broken files).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::storage::raftpb::{RaftSnapshot, SnapFile, SnapshotMetadata};

/// Errors of snapshot files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The file or one of its messages is not valid protobuf.
    #[error("{}: bad {what} protobuf: {source}", path.display())]
    BadProtobuf {
        /// File.
        path: PathBuf,
        /// Which message.
        what: &'static str,
        /// Decoder error.
        source: prost::DecodeError,
    },
    /// Empty file, empty data or zero CRC (etcd's `ErrEmptySnapshot`).
    #[error("{}: empty snapshot", path.display())]
    Empty {
        /// File.
        path: PathBuf,
    },
    /// The stored CRC does not match the data.
    #[error("{}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})", path.display())]
    CrcMismatch {
        /// File.
        path: PathBuf,
        /// CRC in the file.
        stored: u32,
        /// CRC of the data.
        computed: u32,
    },
    /// The file name's term/index differ from the metadata inside.
    #[error("{}: name says term {name_term} index {name_index}, metadata says term {term} index {index}", path.display())]
    NameMismatch {
        /// File.
        path: PathBuf,
        /// Term in the name.
        name_term: u64,
        /// Index in the name.
        name_index: u64,
        /// Term inside.
        term: u64,
        /// Index inside.
        index: u64,
    },
    /// The snapshot to be written exists already.
    #[error("{}: refusing to overwrite an existing snapshot", path.display())]
    Exists {
        /// File.
        path: PathBuf,
    },
}

/// Result of snapshot operations.
pub type Result<T, E = SnapError> = std::result::Result<T, E>;

/// File name of a snapshot: `%016x-%016x.snap` (term, index).
pub fn snap_file_name(term: u64, index: u64) -> String {
    format!("{term:016x}-{index:016x}.snap")
}

/// Parses a snapshot file name into (term, index).
pub fn parse_snap_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (a, b) = stem.split_once('-')?;
    let hex16 = |s: &str| {
        (s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some((hex16(a)?, hex16(b)?))
}

/// Encodes a snapshot into the bytes of a `.snap` file.
pub fn encode_snap_file(snap: &RaftSnapshot) -> Vec<u8> {
    let data = snap.encode_to_vec();
    SnapFile {
        crc: crc32c::crc32c(&data),
        data: Some(data),
    }
    .encode_to_vec()
}

/// Decodes the bytes of a `.snap` file, checking the CRC. `path` only
/// labels errors.
pub fn decode_snap_file(bytes: &[u8], path: &Path) -> Result<RaftSnapshot> {
    let empty = || SnapError::Empty {
        path: path.to_path_buf(),
    };
    if bytes.is_empty() {
        return Err(empty());
    }
    let f = SnapFile::decode(bytes).map_err(|source| SnapError::BadProtobuf {
        path: path.to_path_buf(),
        what: "snappb.Snapshot",
        source,
    })?;
    let data = f.data.unwrap_or_default();
    if data.is_empty() || f.crc == 0 {
        return Err(empty());
    }
    let computed = crc32c::crc32c(&data);
    if computed != f.crc {
        return Err(SnapError::CrcMismatch {
            path: path.to_path_buf(),
            stored: f.crc,
            computed,
        });
    }
    RaftSnapshot::decode(&data[..]).map_err(|source| SnapError::BadProtobuf {
        path: path.to_path_buf(),
        what: "raftpb.Snapshot",
        source,
    })
}

/// Reads and checks one `.snap` file.
pub fn read_snap_file(path: &Path) -> Result<RaftSnapshot> {
    let bytes = fs::read(path).map_err(|source| SnapError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_snap_file(&bytes, path)
}

/// A snapshot loaded from a snap directory.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedSnap {
    /// The file it came from.
    pub path: PathBuf,
    /// Its content.
    pub snapshot: RaftSnapshot,
}

/// Lists `*.snap` files with well-formed names, newest (highest term, then
/// index) first, i.e. etcd's reverse name order.
pub fn list_snap_files(snap_dir: &Path) -> Result<Vec<(u64, u64, PathBuf)>> {
    let rd = fs::read_dir(snap_dir).map_err(|source| SnapError::Io {
        path: snap_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|source| SnapError::Io {
            path: snap_dir.to_path_buf(),
            source,
        })?;
        let name = ent.file_name();
        if let Some((t, i)) = name.to_str().and_then(parse_snap_name) {
            out.push((t, i, ent.path()));
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse((s.0, s.1)));
    Ok(out)
}

/// Loads the newest snapshot that reads back intact, skipping broken ones
/// as etcd does; `Ok(None)` when there is none (or no snap directory).
/// `accept` can restrict the choice (e.g. to snapshots the WAL knows of).
pub fn load_newest(
    snap_dir: &Path,
    accept: impl Fn(u64, u64) -> bool,
) -> Result<Option<LoadedSnap>> {
    if !snap_dir.exists() {
        return Ok(None);
    }
    for (term, index, path) in list_snap_files(snap_dir)? {
        if !accept(term, index) {
            continue;
        }
        if let Ok(snapshot) = read_snap_file(&path) {
            return Ok(Some(LoadedSnap { path, snapshot }));
        }
    }
    Ok(None)
}

/// Writes `snap_dir/<term>-<index>.snap` (refusing to overwrite), named
/// from the metadata. No fsync: the caller decides about durability.
pub fn write_snap_file(snap_dir: &Path, snap: &RaftSnapshot) -> Result<PathBuf> {
    let md = &snap.metadata;
    let path = snap_dir.join(snap_file_name(md.term, md.index));
    let mut f = create_new(&path)?;
    f.write_all(&encode_snap_file(snap))
        .map_err(|source| SnapError::Io {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

fn create_new(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                SnapError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                SnapError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Writes a `.snap` file whose store data (`json_len` bytes with CRC-32C
/// `json_crc`, as computed while it was produced) is copied from `json`,
/// without holding the data in memory. The bytes equal
/// [`encode_snap_file`]'s for the same snapshot: the CRC of the
/// `raftpb.Snapshot` is obtained by combining the CRCs of its parts.
pub fn write_snap_streamed(
    out: &mut impl Write,
    metadata: &SnapshotMetadata,
    json_len: u64,
    json_crc: u32,
    json: &mut impl Read,
) -> io::Result<()> {
    // raftpb.Snapshot = [0x0a len(json) json] [0x12 len(md) md]
    let mut head = vec![0x0a];
    varint(json_len, &mut head);
    let md = metadata.encode_to_vec();
    let mut tail = vec![0x12];
    varint(md.len() as u64, &mut tail);
    tail.extend_from_slice(&md);
    let len_u = usize::try_from(json_len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "snapshot data too large"))?;
    let crc = crc32c::crc32c_combine(crc32c::crc32c(&head), json_crc, len_u);
    let crc = crc32c::crc32c_append(crc, &tail);
    let inner_len = head.len() as u64 + json_len + tail.len() as u64;
    // snappb.Snapshot = [0x08 crc] [0x12 len(inner) inner]
    let mut outer = vec![0x08];
    varint(u64::from(crc), &mut outer);
    outer.push(0x12);
    varint(inner_len, &mut outer);
    out.write_all(&outer)?;
    out.write_all(&head)?;
    let copied = io::copy(&mut json.take(json_len), out)?;
    if copied != json_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("snapshot data: expected {json_len} bytes, got {copied}"),
        ));
    }
    out.write_all(&tail)
}

/// Checks that a loaded snapshot's name agrees with its metadata.
pub fn check_name(loaded: &LoadedSnap) -> Result<()> {
    let md = &loaded.snapshot.metadata;
    let name = loaded
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    match parse_snap_name(name) {
        Some((t, i)) if t == md.term && i == md.index => Ok(()),
        Some((t, i)) => Err(SnapError::NameMismatch {
            path: loaded.path.clone(),
            name_term: t,
            name_index: i,
            term: md.term,
            index: md.index,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::raftpb::ConfState;

    fn sample(data: &[u8]) -> RaftSnapshot {
        RaftSnapshot {
            data: Some(data.to_vec()),
            metadata: SnapshotMetadata {
                conf_state: ConfState {
                    nodes: vec![0x84f0_03a4_ac2b_73ad],
                    ..Default::default()
                },
                index: 11,
                term: 2,
            },
        }
    }

    #[test]
    fn round_trip_and_crc_checked() {
        let s = sample(b"{\"Root\":{}}");
        let mut b = encode_snap_file(&s);
        assert_eq!(decode_snap_file(&b, Path::new("x")).unwrap(), s);
        let n = b.len();
        b[n - 20] ^= 0x01;
        assert!(matches!(
            decode_snap_file(&b, Path::new("x")),
            Err(SnapError::CrcMismatch { .. })
        ));
        assert!(matches!(
            decode_snap_file(&[], Path::new("x")),
            Err(SnapError::Empty { .. })
        ));
    }

    #[test]
    fn streamed_equals_in_memory() {
        for len in [0usize, 1, 127, 128, 300, 20000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let s = sample(&data);
            let mut out = Vec::new();
            write_snap_streamed(
                &mut out,
                &s.metadata,
                data.len() as u64,
                crc32c::crc32c(&data),
                &mut &data[..],
            )
            .unwrap();
            assert_eq!(out, encode_snap_file(&s), "len {len}");
        }
    }

    #[test]
    fn newest_intact_snapshot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = sample(b"old");
        a.metadata.index = 5;
        let mut b = sample(b"new");
        b.metadata.index = 9;
        write_snap_file(dir.path(), &a).unwrap();
        let pb = write_snap_file(dir.path(), &b).unwrap();
        assert!(matches!(
            write_snap_file(dir.path(), &b),
            Err(SnapError::Exists { .. })
        ));
        let got = load_newest(dir.path(), |_, _| true).unwrap().unwrap();
        assert_eq!(got.snapshot, b);
        check_name(&got).unwrap();
        fs::write(&pb, b"garbage").unwrap();
        let got = load_newest(dir.path(), |_, _| true).unwrap().unwrap();
        assert_eq!(got.snapshot, a);
        assert!(load_newest(dir.path(), |_, i| i > 100).unwrap().is_none());
    }
}
