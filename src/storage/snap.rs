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
    /// A field etcd writes once appears twice: readers disagree on such a file (protobuf keeps
    /// the last, a streaming reader meets the first), so it is not read at all.
    #[error("{}: {what} appears twice: not a snapshot etcd wrote", path.display())]
    Repeated {
        /// File.
        path: PathBuf,
        /// Which field.
        what: &'static str,
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
    super::hex_pair_name(term, index, "snap")
}

/// Parses a snapshot file name into (term, index).
pub fn parse_snap_name(name: &str) -> Option<(u64, u64)> {
    super::parse_hex_pair_name(name, "snap")
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
    let repeated = |what| SnapError::Repeated {
        path: path.to_path_buf(),
        what,
    };
    if field_count(bytes, 2) > 1 {
        return Err(repeated("snappb.Snapshot data"));
    }
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
    let snap = RaftSnapshot::decode(&data[..]).map_err(|source| SnapError::BadProtobuf {
        path: path.to_path_buf(),
        what: "raftpb.Snapshot",
        source,
    })?;
    if field_count(&data, 1) > 1 {
        return Err(repeated("raftpb.Snapshot data"));
    }
    if field_count(&data, 2) > 1 {
        return Err(repeated("raftpb.Snapshot metadata"));
    }
    Ok(snap)
}

/// How many times field `number` occurs at the top level of the protobuf message `bytes` (0
/// where the bytes do not scan as protobuf: the decoder has said so already).
fn field_count(bytes: &[u8], number: u64) -> usize {
    let mut r = bytes;
    let mut n = 0;
    while let Ok(Some(tag)) = read_varint(&mut r) {
        n += usize::from(tag >> 3 == number);
        if skip_field(&mut r, tag & 7, bytes.len() as u64).is_err() {
            return 0;
        }
    }
    n
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

/// Feeds what it reads into a running CRC-32C.
struct CrcRead<R> {
    r: R,
    crc: u32,
}

impl<R: Read> Read for CrcRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

fn read_varint(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut v = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        if r.read(&mut b)? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        v |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] < 0x80 {
            return Ok(Some(v));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "varint longer than 10 bytes",
    ))
}

fn skip_field(r: &mut impl Read, wire: u64, limit: u64) -> io::Result<()> {
    let n = match wire {
        0 => {
            return read_varint(r)
                .and_then(|v| v.map(|_| ()).ok_or(io::ErrorKind::UnexpectedEof.into()))
        }
        1 => 8,
        5 => 4,
        2 => read_varint(r)?.ok_or(io::ErrorKind::UnexpectedEof)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("wire type {wire}"),
            ))
        }
    };
    if n > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "field longer than the file",
        ));
    }
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads a `.snap` file in one pass without holding it: checks its CRC, decodes its metadata,
/// and hands a reader over the snapshot data (the v2 store JSON) to `on_data`. Memory stays
/// small whatever the snapshot's size.
pub fn stream_snap_file<T>(
    path: &Path,
    on_data: impl FnOnce(&mut dyn Read) -> T,
) -> Result<(SnapshotMetadata, Option<T>)> {
    let io_err = |source| SnapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(io_err)?;
    let file_len = f.metadata().map_err(io_err)?.len();
    let mut r = io::BufReader::with_capacity(1 << 16, f);
    let stream = SnapStream { path, file_len };
    let mut scan = SnapScan::new(on_data);
    while let Some(tag) = read_varint(&mut r).map_err(io_err)? {
        match (tag >> 3, tag & 7) {
            (1, 0) => scan.stored_crc = Some(stream.varint(&mut r, "truncated crc")? as u32),
            (2, 2) if scan.inner_crc.is_some() => {
                return Err(SnapError::Repeated {
                    path: path.to_path_buf(),
                    what: "snappb.Snapshot data",
                })
            }
            (2, 2) => stream.read_snapshot(&mut r, &mut scan)?,
            (_, wire) => skip_field(&mut r, wire, file_len).map_err(io_err)?,
        }
    }
    stream.check_crc(scan.stored_crc, scan.inner_crc, scan.inner_len)?;
    Ok((scan.metadata.unwrap_or_default(), scan.data_out))
}

/// What a streaming pass over a `.snap` file has found so far.
struct SnapScan<T, F> {
    /// The `snappb.Snapshot` CRC field.
    stored_crc: Option<u32>,
    /// The CRC-32C of the `raftpb.Snapshot` bytes, once read.
    inner_crc: Option<u32>,
    /// The length of the `raftpb.Snapshot` bytes.
    inner_len: u64,
    metadata: Option<SnapshotMetadata>,
    /// The caller's reader of the store data, until it has run.
    on_data: Option<F>,
    data_out: Option<T>,
}

impl<T, F: FnOnce(&mut dyn Read) -> T> SnapScan<T, F> {
    fn new(on_data: F) -> Self {
        SnapScan {
            stored_crc: None,
            inner_crc: None,
            inner_len: 0,
            metadata: None,
            on_data: Some(on_data),
            data_out: None,
        }
    }
}

/// One streaming pass over a `.snap` file: its path (labels errors) and length (bounds fields).
struct SnapStream<'a> {
    path: &'a Path,
    file_len: u64,
}

impl SnapStream<'_> {
    fn io_err(&self, source: io::Error) -> SnapError {
        SnapError::Io {
            path: self.path.to_path_buf(),
            source,
        }
    }

    fn repeated(&self, what: &'static str) -> SnapError {
        SnapError::Repeated {
            path: self.path.to_path_buf(),
            what,
        }
    }

    /// A malformed file, said as etcd's reader would fail on it.
    fn bad(&self, what: &str) -> SnapError {
        self.io_err(io::Error::new(io::ErrorKind::InvalidData, what.to_string()))
    }

    /// Reads a varint that must be there (`truncated` names its absence).
    fn varint(&self, r: &mut impl Read, truncated: &str) -> Result<u64> {
        read_varint(r)
            .map_err(|e| self.io_err(e))?
            .ok_or_else(|| self.bad(truncated))
    }

    /// Reads a length-delimited field's length, refusing one longer than `limit`.
    fn field_len(&self, r: &mut impl Read, limit: u64, field: &str, within: &str) -> Result<u64> {
        let n = self.varint(r, &format!("truncated {field}"))?;
        if n > limit {
            return Err(self.bad(&format!("{field} longer than {within}")));
        }
        Ok(n)
    }

    /// Reads the `data` field (an encoded `raftpb.Snapshot`) of a `snappb.Snapshot`, taking its
    /// CRC on the way: the store data goes to the caller's reader, the metadata is decoded.
    fn read_snapshot<T, F: FnOnce(&mut dyn Read) -> T>(
        &self,
        r: &mut impl Read,
        scan: &mut SnapScan<T, F>,
    ) -> Result<()> {
        let n = self.field_len(r, self.file_len, "data", "the file")?;
        scan.inner_len = n;
        let mut inner = CrcRead {
            r: r.take(n),
            crc: 0,
        };
        let mut store_seen = false;
        while let Some(tag) = read_varint(&mut inner).map_err(|e| self.io_err(e))? {
            match (tag >> 3, tag & 7) {
                (1, 2) if store_seen => return Err(self.repeated("raftpb.Snapshot data")),
                (2, 2) if scan.metadata.is_some() => {
                    return Err(self.repeated("raftpb.Snapshot metadata"))
                }
                (1, 2) => {
                    store_seen = true;
                    let m = self.field_len(&mut inner, n, "store", "the snapshot")?;
                    let mut data = (&mut inner).take(m);
                    if let Some(f) = scan.on_data.take() {
                        scan.data_out = Some(f(&mut data));
                    }
                    io::copy(&mut data, &mut io::sink()).map_err(|e| self.io_err(e))?;
                }
                (2, 2) => {
                    let m = self.field_len(&mut inner, n, "metadata", "the snapshot")?;
                    scan.metadata = Some(self.read_metadata(&mut inner, m)?);
                }
                (_, wire) => skip_field(&mut inner, wire, n).map_err(|e| self.io_err(e))?,
            }
        }
        if inner.r.limit() != 0 {
            return Err(self.bad("snapshot cut short"));
        }
        scan.inner_crc = Some(inner.crc);
        Ok(())
    }

    /// Reads and decodes `len` bytes of `raftpb.SnapshotMetadata`.
    fn read_metadata(&self, r: &mut impl Read, len: u64) -> Result<SnapshotMetadata> {
        let mut buf = Vec::new();
        r.take(len)
            .read_to_end(&mut buf)
            .map_err(|e| self.io_err(e))?;
        SnapshotMetadata::decode(&buf[..]).map_err(|source| SnapError::BadProtobuf {
            path: self.path.to_path_buf(),
            what: "raftpb.SnapshotMetadata",
            source,
        })
    }

    /// etcd's checks once the file is read: both CRCs present, neither the CRC nor the data
    /// empty, and the stored CRC that of the data.
    fn check_crc(&self, stored: Option<u32>, computed: Option<u32>, data_len: u64) -> Result<()> {
        let empty = || SnapError::Empty {
            path: self.path.to_path_buf(),
        };
        let (Some(stored), Some(computed)) = (stored, computed) else {
            return Err(empty());
        };
        // etcd's rule: an empty data field or a zero CRC is an empty snapshot.
        if stored == 0 || data_len == 0 {
            return Err(empty());
        }
        if stored != computed {
            return Err(SnapError::CrcMismatch {
                path: self.path.to_path_buf(),
                stored,
                computed,
            });
        }
        Ok(())
    }
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

/// The bytes of a `.snap` file around its store data: what comes before the `json_len` bytes
/// of data whose CRC-32C is `json_crc`, and what comes after. With the data between them they
/// equal [`encode_snap_file`]'s bytes; the CRC of the `raftpb.Snapshot` is obtained by
/// combining the CRCs of its parts, so the data need not be in memory.
pub fn snap_framing(
    metadata: &SnapshotMetadata,
    json_len: u64,
    json_crc: u32,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
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
    let mut prefix = vec![0x08];
    varint(u64::from(crc), &mut prefix);
    prefix.push(0x12);
    varint(inner_len, &mut prefix);
    prefix.extend_from_slice(&head);
    Ok((prefix, tail))
}

/// How long [`snap_framing`]'s prefix most likely is for about `json_len` bytes of data: it
/// assumes a CRC of 2^28 or more (a 5-byte varint), as 15 in 16 CRCs are.
pub fn likely_prefix_len(json_len: u64) -> u64 {
    let vlen = |v: u64| {
        let mut out = Vec::new();
        varint(v, &mut out);
        out.len() as u64
    };
    // 0x08 crc 0x12 len(inner) 0x0a len(json); inner is json plus a few dozen bytes.
    1 + 5 + 1 + vlen(json_len + 64) + 1 + vlen(json_len)
}

/// Writes a `.snap` file whose store data (`json_len` bytes with CRC-32C `json_crc`, as
/// computed while it was produced) is copied from `json`, without holding the data in memory.
pub fn write_snap_streamed(
    out: &mut impl Write,
    metadata: &SnapshotMetadata,
    json_len: u64,
    json_crc: u32,
    json: &mut impl Read,
) -> io::Result<()> {
    let (prefix, tail) = snap_framing(metadata, json_len, json_crc)?;
    out.write_all(&prefix)?;
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

    /// A `.snap` file around `inner` (an encoded `raftpb.Snapshot`) with a valid CRC.
    fn file_around(inner: &[u8]) -> Vec<u8> {
        let mut out = vec![0x08];
        let mut crc = u64::from(crc32c::crc32c(inner));
        while crc >= 0x80 {
            out.push((crc as u8) | 0x80);
            crc >>= 7;
        }
        out.push(crc as u8);
        out.push(0x12);
        out.push(inner.len() as u8);
        out.extend_from_slice(inner);
        out
    }

    /// Found by the fuzz target `snap`: the store data field twice. prost keeps the last, the
    /// streaming reader met the first; both now refuse the file.
    #[test]
    fn a_field_etcd_writes_once_given_twice_is_refused_by_both_readers() {
        let dir = tempfile::tempdir().unwrap();
        for (inner, what) in [
            (
                &[0x0a, 0x01, 0x08, 0x0a, 0x01, 0x25, 0x40, 0x30][..],
                "raftpb.Snapshot data",
            ),
            (
                &[0x12, 0x00, 0x12, 0x02, 0x10, 0x01][..],
                "raftpb.Snapshot metadata",
            ),
        ] {
            let bytes = file_around(inner);
            let path = dir.path().join("0000000000000001-0000000000000001.snap");
            fs::write(&path, &bytes).unwrap();
            let whole = decode_snap_file(&bytes, &path);
            assert!(
                matches!(whole, Err(SnapError::Repeated { what: w, .. }) if w == what),
                "{whole:?}"
            );
            let streamed = stream_snap_file(&path, |_| ());
            assert!(
                matches!(streamed, Err(SnapError::Repeated { what: w, .. }) if w == what),
                "{streamed:?}"
            );
        }
        let mut twice = file_around(&[0x0a, 0x01, 0x08]);
        twice.extend_from_slice(&[0x12, 0x03, 0x0a, 0x01, 0x08]);
        let path = dir.path().join("0000000000000001-0000000000000002.snap");
        fs::write(&path, &twice).unwrap();
        assert!(matches!(
            decode_snap_file(&twice, &path),
            Err(SnapError::Repeated { .. })
        ));
        assert!(matches!(
            stream_snap_file(&path, |_| ()),
            Err(SnapError::Repeated { .. })
        ));
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

    #[test]
    fn streaming_read_agrees_with_the_whole_file_decoder_and_checks_the_crc() {
        let snap = RaftSnapshot {
            data: Some(br#"{"Root":{"Children":{"0":{},"1":{"x":{}}}},"CurrentIndex":7}"#.to_vec()),
            metadata: SnapshotMetadata {
                index: 42,
                term: 3,
                ..Default::default()
            },
        };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.snap");
        fs::write(&path, encode_snap_file(&snap)).unwrap();
        let whole = read_snap_file(&path).unwrap();
        let (md, data) = stream_snap_file(&path, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
        .unwrap();
        assert_eq!(md, whole.metadata);
        assert_eq!(data, whole.data);
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        fs::write(&path, &bytes).unwrap();
        assert!(
            stream_snap_file(&path, |_| ()).is_err(),
            "a flipped byte is caught"
        );
        fs::write(&path, &bytes[..mid]).unwrap();
        assert!(
            stream_snap_file(&path, |_| ()).is_err(),
            "a cut file is caught"
        );
    }

    #[test]
    fn streaming_accepts_what_etcd_accepts_a_snapshot_of_unknown_fields_only() {
        // Found by fuzzing: data holding only unknown fields is not "empty" to etcd.
        let data = [0x30u8, 0xff, 0x51, 0xb0, 0x44, 0xa4, 0xff, 0x3b];
        let f = SnapFile {
            crc: crc32c::crc32c(&data),
            data: Some(data.to_vec()),
        }
        .encode_to_vec();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.snap");
        fs::write(&p, &f).unwrap();
        let whole = decode_snap_file(&f, &p).unwrap();
        let (md, data) = stream_snap_file(&p, |_| ()).unwrap();
        assert_eq!((md, data), (whole.metadata, None));
    }

    fn stream() -> SnapStream<'static> {
        SnapStream {
            path: Path::new("s.snap"),
            file_len: 100,
        }
    }

    #[test]
    fn crc_check_follows_etcd_s_empty_and_mismatch_rules() {
        // (stored, computed, data length) -> error text, if any.
        type Case = (Option<u32>, Option<u32>, u64, Option<&'static str>);
        let cases: &[Case] = &[
            (Some(5), Some(5), 10, None),
            (None, Some(5), 10, Some("s.snap: empty snapshot")),
            (Some(5), None, 10, Some("s.snap: empty snapshot")),
            (Some(0), Some(0), 10, Some("s.snap: empty snapshot")),
            (Some(5), Some(5), 0, Some("s.snap: empty snapshot")),
            (
                Some(5),
                Some(6),
                10,
                Some("s.snap: CRC mismatch (stored 0x00000005, computed 0x00000006)"),
            ),
        ];
        for &(stored, computed, len, want) in cases {
            let got = stream().check_crc(stored, computed, len).err();
            assert_eq!(
                got.map(|e| e.to_string()).as_deref(),
                want,
                "{stored:?} {computed:?}"
            );
        }
    }

    #[test]
    fn field_lengths_are_bounded_and_must_be_there() {
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(
            stream()
                .field_len(&mut &v[..], 300, "store", "the snapshot")
                .unwrap(),
            300
        );
        let err = stream()
            .field_len(&mut &v[..], 299, "store", "the snapshot")
            .unwrap_err();
        assert_eq!(err.to_string(), "s.snap: store longer than the snapshot");
        let err = stream()
            .field_len(&mut &[][..], 10, "metadata", "the snapshot")
            .unwrap_err();
        assert_eq!(err.to_string(), "s.snap: truncated metadata");
    }
}
