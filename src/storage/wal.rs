//! etcd's write-ahead log: reading segments of any release from 2.2.1 to
//! 3.5, and writing the fresh single-segment WAL that etcd 2.2.1 accepts.
//!
//! Format (learned from `wal/encoder.go`, `decoder.go`, `wal.go` at v2.2.1,
//! v3.0.17 and v3.4.23):
//! * segments are named `%016x-%016x.wal` (sequence, raft index of the first
//!   entry the segment may hold) and are read in sequence order;
//! * a frame is an 8-byte little-endian length word followed by a
//!   `walpb.Record`. Since 3.0 records are padded to 8 bytes: the low 56 bits
//!   are the record length and, when the top bit is set, bits 56..58 hold the
//!   pad length. 2.2.1 writes neither padding nor the flag;
//! * a zero length word marks the end of a segment's data (3.x preallocates
//!   segments to 64 MB with zeros; 2.2.1 only reserves space with
//!   `FALLOC_FL_KEEP_SIZE`, so its files end right after the last record);
//! * every non-CRC record carries `crc32c_append(previous crc, data)`, one
//!   chain over all segments. A CRC record (type 4, no data) carries the chain
//!   value at the point where it was written: a reader checks it against its
//!   own chain (unless that is still 0, i.e. at the first segment read) and
//!   continues the chain from it. Each segment starts with one.
//!
//! The reader is as tolerant as etcd 3.x in read mode (a cut-short or
//! zero-filled final record of the last segment ends the log, reported as a
//! [`TornTail`]) and stricter where no release ever writes something: a
//! length word whose top byte is neither 0 nor `0x80|pad` (pad 1..=7) is a
//! [`WalError::BadFrame`]. The CRC covers a record's data only, not its
//! type, so a flipped type bit can only be caught by the decoded view.

use std::fs;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::storage::raftpb::{
    decode_entry_payload, entry_type, Entry, EntryPayload, HardState, Metadata, Record,
    WalSnapshot, RECORD_CRC, RECORD_ENTRY, RECORD_METADATA, RECORD_SNAPSHOT, RECORD_STATE,
};

/// Size of the frame's length word.
const FRAME_LEN_BYTES: usize = 8;
/// Sector size used by etcd's torn-write detection.
const SECTOR_BYTES: u64 = 512;

/// Errors of WAL reading and writing; each names the file and, for data
/// errors, the byte offset of the frame that failed.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A record's CRC does not continue the chain.
    #[error("{} at offset {offset}: CRC mismatch (record says {found:#010x}, chain gives {expected:#010x})", path.display())]
    CrcMismatch {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// CRC computed by the chain.
        expected: u32,
        /// CRC stored in the record.
        found: u32,
    },
    /// The frame cannot be a record (bad length, truncated before the last segment).
    #[error("{} at offset {offset}: bad frame: {reason}", path.display())]
    BadFrame {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record or its payload is not valid protobuf.
    #[error("{} at offset {offset}: bad {what} protobuf: {source}", path.display())]
    BadProtobuf {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// Which message failed.
        what: &'static str,
        /// Decoder error.
        source: prost::DecodeError,
    },
    /// A record type etcd does not know.
    #[error("{} at offset {offset}: unexpected record type {rtype}", path.display())]
    UnknownRecordType {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// The type found.
        rtype: i64,
    },
    /// Two metadata records differ (etcd: `ErrMetadataConflict`).
    #[error("{} at offset {offset}: metadata differs from the earlier metadata record", path.display())]
    MetadataConflict {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
    },
    /// An entry's index leaves a hole in the log (etcd: `ErrSliceOutOfRange`).
    #[error("{} at offset {offset}: entry index {index} does not follow the log (expected at most {max})", path.display())]
    EntryGap {
        /// Segment.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// Index found.
        index: u64,
        /// Highest acceptable index.
        max: u64,
    },
    /// No `*.wal` file in the directory.
    #[error("{}: no WAL segment", dir.display())]
    NoSegments {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// Sequence numbers of consecutive segments are not consecutive.
    #[error("{}: WAL segment sequence jumps from {prev} to {next}", dir.display())]
    SequenceGap {
        /// The WAL directory.
        dir: PathBuf,
        /// Sequence before the gap.
        prev: u64,
        /// Sequence after the gap.
        next: u64,
    },
    /// No segment starts at or before the requested snapshot index.
    #[error("{}: no WAL segment covers snapshot index {index}", dir.display())]
    NoSegmentForIndex {
        /// The WAL directory.
        dir: PathBuf,
        /// The index asked for.
        index: u64,
    },
    /// The WAL file to be written exists already.
    #[error("{}: refusing to overwrite an existing WAL file", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// Result of WAL operations.
pub type Result<T, E = WalError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// File name of a WAL segment: `%016x-%016x.wal`.
pub fn wal_file_name(seq: u64, index: u64) -> String {
    super::hex_pair_name(seq, index, "wal")
}

/// Parses a segment name into (sequence, index), as etcd's `parseWalName`
/// (which accepts exactly 16 hex digits on each side).
pub fn parse_wal_name(name: &str) -> Option<(u64, u64)> {
    super::parse_hex_pair_name(name, "wal")
}

/// One WAL segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Sequence number.
    pub seq: u64,
    /// Raft index of the first entry it may hold.
    pub index: u64,
    /// Full path.
    pub path: PathBuf,
}

/// Lists the segments of a WAL directory in name order, ignoring other
/// files (as etcd does), and checks that sequence numbers are consecutive.
pub fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let rd = fs::read_dir(dir).map_err(io_err(dir))?;
    let mut segs = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((seq, index)) = parse_wal_name(name) {
            segs.push(Segment {
                seq,
                index,
                path: ent.path(),
            });
        }
    }
    if segs.is_empty() {
        return Err(WalError::NoSegments {
            dir: dir.to_path_buf(),
        });
    }
    segs.sort_by_key(|s| (s.seq, s.index));
    for w in segs.windows(2) {
        if w[0].seq.checked_add(1) != Some(w[1].seq) {
            return Err(WalError::SequenceGap {
                dir: dir.to_path_buf(),
                prev: w[0].seq,
                next: w[1].seq,
            });
        }
    }
    Ok(segs)
}

/// One record read from a segment, with where it was found.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordAt {
    /// Segment file.
    pub path: PathBuf,
    /// Offset of the frame's length word.
    pub offset: u64,
    /// Pad bytes after the record (0 in 2.2.1 files).
    pub padding: u8,
    /// The record.
    pub record: Record,
}

/// Where reading stopped on a partially written final record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment.
    pub path: PathBuf,
    /// Offset of the frame that was cut short.
    pub offset: u64,
}

/// Streams the records of a sequence of segments, checking frames and the
/// CRC chain. Segments are read frame by frame: memory is bounded by the
/// largest record, never by the segment (etcd preallocates 64 MB ones).
/// After the first error the iterator ends.
pub struct WalReader {
    segments: Vec<Segment>,
    next_seg: usize,
    cur: Option<OpenSegment>,
    off: usize,
    crc: u32,
    finished: bool,
    torn: Option<TornTail>,
}

struct OpenSegment {
    idx: usize,
    file: io::BufReader<fs::File>,
    len: u64,
    buf: bytes::BytesMut,
}

impl WalReader {
    /// Opens every segment of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self::from_segments(list_segments(dir)?))
    }

    /// Opens the segments etcd reads for a start snapshot at `index`: from
    /// the last one whose start index is <= `index` (etcd's `searchIndex`).
    pub fn open_at(dir: &Path, index: u64) -> Result<Self> {
        let segs = list_segments(dir)?;
        let first = segs.iter().rposition(|s| s.index <= index).ok_or_else(|| {
            WalError::NoSegmentForIndex {
                dir: dir.to_path_buf(),
                index,
            }
        })?;
        Ok(Self::from_segments(segs[first..].to_vec()))
    }

    /// Reads the given segments in the order given.
    pub fn from_segments(segments: Vec<Segment>) -> Self {
        WalReader {
            segments,
            next_seg: 0,
            cur: None,
            off: 0,
            crc: 0,
            finished: false,
            torn: None,
        }
    }

    /// The segments being read.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Set once the reader stopped at a partially written final record.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }

    fn next_record(&mut self) -> Result<Option<RecordAt>> {
        loop {
            if self.cur.is_none() {
                let Some(seg) = self.segments.get(self.next_seg) else {
                    return Ok(None);
                };
                let file = fs::File::open(&seg.path).map_err(io_err(&seg.path))?;
                let len = file.metadata().map_err(io_err(&seg.path))?.len();
                self.cur = Some(OpenSegment {
                    idx: self.next_seg,
                    file: io::BufReader::with_capacity(64 * 1024, file),
                    len,
                    buf: bytes::BytesMut::new(),
                });
                self.next_seg += 1;
                self.off = 0;
            }
            let Some(cur) = self.cur.as_mut() else {
                continue;
            };
            let seg_idx = cur.idx;
            let is_last = seg_idx + 1 == self.segments.len();
            let path = &self.segments[seg_idx].path;
            match read_frame(cur, self.off, self.crc, is_last, path)? {
                Frame::End => {
                    self.cur = None;
                }
                Frame::Torn => {
                    self.torn = Some(TornTail {
                        path: path.clone(),
                        offset: self.off as u64,
                    });
                    return Ok(None);
                }
                Frame::Record {
                    record,
                    padding,
                    next_off,
                    crc,
                } => {
                    let at = RecordAt {
                        path: path.clone(),
                        offset: self.off as u64,
                        padding,
                        record,
                    };
                    self.off = next_off;
                    self.crc = crc;
                    return Ok(Some(at));
                }
            }
        }
    }
}

/// Reads up to `buf.len()` bytes; fewer only at end of file.
fn read_full(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads the frame at `off` of an open segment (the reader is positioned there).
fn read_frame(
    seg: &mut OpenSegment,
    off: usize,
    chain: u32,
    is_last: bool,
    path: &Path,
) -> Result<Frame> {
    let mut word = [0u8; FRAME_LEN_BYTES];
    let got = read_full(&mut seg.file, &mut word).map_err(io_err(path))?;
    if got < FRAME_LEN_BYTES {
        let none = bytes::Bytes::new();
        return decode_frame(off as u64, &word[..got], &none, 0, chain, is_last, path);
    }
    let len_field = u64::from_le_bytes(word);
    let rec_len = len_field & !(0xffu64 << 56);
    let pad = u64::from((len_field >> 56) as u8 & 0x7);
    let avail = seg.len.saturating_sub(off as u64 + FRAME_LEN_BYTES as u64);
    let need = rec_len.saturating_add(pad);
    // Read the body only when the frame is plausible: its size is bounded by the file. The
    // buffer is reused once the records decoded from the last one (slices of it) are dropped.
    seg.buf.clear();
    if len_field != 0 && need <= avail {
        seg.buf.resize(need as usize, 0);
        let n = read_full(&mut seg.file, &mut seg.buf).map_err(io_err(path))?;
        seg.buf.truncate(n);
    }
    let body = seg.buf.split().freeze();
    decode_frame(off as u64, &word, &body, avail, chain, is_last, path).map(|f| match f {
        Frame::Record {
            record,
            padding,
            crc,
            ..
        } => Frame::Record {
            record,
            padding,
            next_off: off + FRAME_LEN_BYTES + need as usize,
            crc,
        },
        other => other,
    })
}

impl Iterator for WalReader {
    type Item = Result<RecordAt>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let r = self.next_record();
        match r {
            Ok(Some(rec)) => Some(Ok(rec)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(e) => {
                self.finished = true;
                Some(Err(e))
            }
        }
    }
}

enum Frame {
    /// No more data in this segment (EOF or a zero length word).
    End,
    /// The final record of the last segment was cut short.
    Torn,
    Record {
        record: Record,
        padding: u8,
        next_off: usize,
        crc: u32,
    },
}

/// etcd 3.x's torn-write test: a record whose bytes include a whole
/// sector-aligned chunk of zeros was not completely written.
fn is_torn(data: &[u8], file_off: u64) -> bool {
    let mut pos = 0usize;
    let mut off = file_off;
    while pos < data.len() {
        let room = (SECTOR_BYTES - off % SECTOR_BYTES) as usize;
        let n = room.min(data.len() - pos);
        if data[pos..pos + n].iter().all(|&b| b == 0) {
            return true;
        }
        pos += n;
        off += n as u64;
    }
    false
}

/// Decodes the frame at file offset `off` from its length word (`word`,
/// shorter at end of file), its body (`body`, empty when not read) and the
/// bytes left in the file after the word (`avail`). The record's data is a slice of `body`.
fn decode_frame(
    off: u64,
    word: &[u8],
    body: &bytes::Bytes,
    avail: u64,
    chain: u32,
    is_last: bool,
    path: &Path,
) -> Result<Frame> {
    let at = FrameAt { off, is_last, path };
    let (rec_len, pad) = match at.length_word(word)? {
        ControlFlow::Continue(len) => len,
        ControlFlow::Break(frame) => return Ok(frame),
    };
    let need = rec_len + u64::from(pad);
    if need > avail || (body.len() as u64) < need {
        return at.cut_short(|| {
            format!("record of {rec_len}+{pad} bytes overruns the segment ({avail} bytes left)")
        });
    }
    // need <= body.len(), so these casts are lossless.
    let rec_bytes = body.slice(..rec_len as usize);
    let body = &body[..need as usize];
    let record = match Record::decode(rec_bytes) {
        Ok(r) => r,
        Err(source) => {
            let err = WalError::BadProtobuf {
                path: path.to_path_buf(),
                offset: off,
                what: "walpb.Record",
                source,
            };
            return at.torn_or(body, err);
        }
    };
    let crc = if record.r#type == RECORD_CRC {
        at.restart_chain(&record, chain)?
    } else {
        match at.extend_chain(&record, chain) {
            Ok(crc) => crc,
            Err(err) => return at.torn_or(body, err),
        }
    };
    Ok(Frame::Record {
        record,
        padding: pad,
        next_off: 0,
        crc,
    })
}

/// Where a frame is, and whether a damaged one may be a torn tail (only in the last segment).
struct FrameAt<'a> {
    off: u64,
    is_last: bool,
    path: &'a Path,
}

impl FrameAt<'_> {
    fn bad(&self, reason: String) -> WalError {
        WalError::BadFrame {
            path: self.path.to_path_buf(),
            offset: self.off,
            reason,
        }
    }

    fn crc_mismatch(&self, expected: u32, found: u32) -> WalError {
        WalError::CrcMismatch {
            path: self.path.to_path_buf(),
            offset: self.off,
            expected,
            found,
        }
    }

    /// A frame cut short: a torn tail in the last segment, corruption elsewhere.
    fn cut_short(&self, reason: impl FnOnce() -> String) -> Result<Frame> {
        if self.is_last {
            Ok(Frame::Torn)
        } else {
            Err(self.bad(reason()))
        }
    }

    /// A frame whose bytes (`body`) do not check: a torn write when the last segment's bytes
    /// hold a zeroed sector, else `err`.
    fn torn_or(&self, body: &[u8], err: WalError) -> Result<Frame> {
        if self.is_last && is_torn(body, self.off + FRAME_LEN_BYTES as u64) {
            Ok(Frame::Torn)
        } else {
            Err(err)
        }
    }

    /// Reads the length word: the record size and padding, or the frame the segment ends on.
    fn length_word(&self, word: &[u8]) -> Result<ControlFlow<Frame, (u64, u8)>> {
        if word.is_empty() {
            return Ok(ControlFlow::Break(Frame::End));
        }
        if word.len() < FRAME_LEN_BYTES {
            // Preallocated zeros past the data are not a record.
            if word.iter().all(|&b| b == 0) {
                return Ok(ControlFlow::Break(Frame::End));
            }
            return self
                .cut_short(|| format!("{} stray bytes at segment end", word.len()))
                .map(ControlFlow::Break);
        }
        let mut w = [0u8; FRAME_LEN_BYTES];
        w.copy_from_slice(word);
        let len_field = u64::from_le_bytes(w);
        if len_field == 0 {
            return Ok(ControlFlow::Break(Frame::End));
        }
        // Low 56 bits: record size; a set top bit flags padding in bits 56..58.
        let rec_len = len_field & !(0xffu64 << 56);
        let top = (len_field >> 56) as u8;
        // etcd writes the top byte as 0 or 0x80|pad with pad in 1..=7; etcd 3.x
        // would ignore other bits, but no release writes them: corruption.
        if !matches!(top, 0x00 | 0x81..=0x87) {
            return Err(self.bad(format!(
                "length word {len_field:#018x} has undefined high bits"
            )));
        }
        Ok(ControlFlow::Continue((rec_len, top & 0x7)))
    }

    /// A CRC record restarts the chain from its stored value; it must agree with ours
    /// unless we have not seen any data yet (first segment read).
    fn restart_chain(&self, record: &Record, chain: u32) -> Result<u32> {
        if chain != 0 && record.crc != chain {
            return Err(self.crc_mismatch(chain, record.crc));
        }
        Ok(record.crc)
    }

    /// Any other record extends the chain by its data and must store the result.
    fn extend_chain(&self, record: &Record, chain: u32) -> Result<u32> {
        let c = crc32c::crc32c_append(chain, record.data.as_deref().unwrap_or(&[]));
        if c != record.crc {
            return Err(self.crc_mismatch(c, record.crc));
        }
        Ok(c)
    }
}

/// What etcd's `WAL.ReadAll` returns, plus what we saw on the way.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WalContents {
    /// Raw bytes of the metadata record (identical in every segment).
    pub metadata_raw: Option<Vec<u8>>,
    /// Decoded metadata.
    pub metadata: Option<Metadata>,
    /// The last HardState record.
    pub hard_state: Option<HardState>,
    /// Entries after the start snapshot, contiguous; an entry rewrites the
    /// log from its index on, as in etcd's `ReadAll`.
    pub entries: Vec<Entry>,
    /// Every snapshot marker, in WAL order.
    pub snapshots: Vec<WalSnapshot>,
    /// The start snapshot asked for.
    pub start: WalSnapshot,
    /// Whether a marker with the start index and term was seen (etcd refuses
    /// to start without it: `ErrSnapshotNotFound`).
    pub start_matched: bool,
    /// Records read.
    pub record_count: usize,
    /// Segments read.
    pub segments: Vec<PathBuf>,
    /// Set when the last record was cut short (etcd tolerates it in read mode).
    pub torn_tail: Option<TornTail>,
    /// Index and term of the last entry (the start snapshot's when there is none).
    pub last: (u64, u64),
    /// Entries after the start snapshot (all of them, whether kept in `entries` or not).
    pub entry_count: u64,
    /// Indexes of the entries after the start snapshot whose v3 requests can change keys, as
    /// ascending inclusive runs (a busy WAL is mostly such runs).
    pub key_writes: Vec<(u64, u64)>,
}

impl WalContents {
    /// Index and term of the last entry, or of the start snapshot.
    pub fn last_index_term(&self) -> (u64, u64) {
        self.last
    }

    /// The index of the last entry whose v3 request can change keys.
    pub fn last_key_write(&self) -> Option<u64> {
        self.key_writes.last().map(|r| r.1)
    }

    /// Drops key writes at `index` and after (the log is rewritten from there), then notes
    /// whether the entry at `index` is one.
    fn note_key_write(&mut self, index: u64, writes: bool) {
        while self.key_writes.last().is_some_and(|r| r.0 >= index) {
            self.key_writes.pop();
        }
        if let Some(r) = self.key_writes.last_mut() {
            r.1 = r.1.min(index - 1);
        }
        if writes {
            match self.key_writes.last_mut() {
                Some(r) if r.1 + 1 == index => r.1 = index,
                _ => self.key_writes.push((index, index)),
            }
        }
    }
}

/// Reads a WAL directory the way etcd does when it opens the WAL at `start`:
/// segments from the one covering `start.index`, entries after it.
pub fn read_wal(dir: &Path, start: &WalSnapshot) -> Result<WalContents> {
    scan_wal(dir, start, |_, _| true)
}

/// Like [`read_wal`], but keeps in `entries` only those `keep` wants, given each entry and what
/// its data is (decoded once, for a normal entry; `Unknown` for the others): memory is bounded
/// by them, not by the WAL (a busy member's WAL holds gigabytes of entries). Counts, the last
/// index and term, and the overwrite rule still cover every entry.
pub fn scan_wal(
    dir: &Path,
    start: &WalSnapshot,
    mut keep: impl FnMut(&Entry, &EntryPayload) -> bool,
) -> Result<WalContents> {
    let mut reader = WalReader::open_at(dir, start.index)?;
    let mut out = WalContents {
        start: start.clone(),
        segments: reader.segments().iter().map(|s| s.path.clone()).collect(),
        last: (start.index, start.term),
        ..Default::default()
    };
    for rec in reader.by_ref() {
        let rec = rec?;
        out.record_count += 1;
        apply_record(&mut out, &rec, &mut keep)?;
    }
    out.torn_tail = reader.torn_tail().cloned();
    Ok(out)
}

fn decode_payload<M: Message + Default>(rec: &RecordAt, what: &'static str) -> Result<M> {
    // Decoding from the record's `Bytes` makes `bytes` fields slices of it, not copies.
    M::decode(rec.record.data.clone().unwrap_or_default()).map_err(|source| WalError::BadProtobuf {
        path: rec.path.clone(),
        offset: rec.offset,
        what,
        source,
    })
}

fn apply_record(
    out: &mut WalContents,
    rec: &RecordAt,
    keep: &mut impl FnMut(&Entry, &EntryPayload) -> bool,
) -> Result<()> {
    match rec.record.r#type {
        RECORD_ENTRY => {
            let e: Entry = decode_payload(rec, "raftpb.Entry")?;
            if e.index > out.start.index {
                // An entry rewrites the log from its index on (a new leader's entries).
                if e.index > out.last.0 + 1 {
                    return Err(WalError::EntryGap {
                        path: rec.path.clone(),
                        offset: rec.offset,
                        index: e.index,
                        max: out.last.0 + 1,
                    });
                }
                let cut = out.entries.partition_point(|k| k.index < e.index);
                out.entries.truncate(cut);
                let payload = if e.r#type == entry_type::NORMAL {
                    decode_entry_payload(e.data.as_deref().unwrap_or(&[]))
                } else {
                    EntryPayload::Unknown
                };
                let writes = matches!(payload, EntryPayload::OtherV3 { writes_keys: true });
                out.note_key_write(e.index, writes);
                out.entry_count = e.index - out.start.index;
                out.last = (e.index, e.term);
                if keep(&e, &payload) {
                    out.entries.push(e);
                }
            }
        }
        RECORD_STATE => out.hard_state = Some(decode_payload(rec, "raftpb.HardState")?),
        RECORD_METADATA => {
            let raw = rec.record.data.as_deref().unwrap_or_default().to_vec();
            if let Some(prev) = &out.metadata_raw {
                if *prev != raw {
                    return Err(WalError::MetadataConflict {
                        path: rec.path.clone(),
                        offset: rec.offset,
                    });
                }
            } else {
                out.metadata = Some(decode_payload(rec, "etcdserverpb.Metadata")?);
                out.metadata_raw = Some(raw);
            }
        }
        RECORD_CRC => {}
        RECORD_SNAPSHOT => {
            let s: WalSnapshot = decode_payload(rec, "walpb.Snapshot")?;
            if s.index == out.start.index && s.term == out.start.term {
                out.start_matched = true;
            }
            out.snapshots.push(s);
        }
        rtype => {
            return Err(WalError::UnknownRecordType {
                path: rec.path.clone(),
                offset: rec.offset,
                rtype,
            })
        }
    }
    Ok(())
}

/// Writes records in etcd 2.2.1's framing (no padding) with a running CRC.
pub struct WalEncoder<W: Write> {
    w: W,
    crc: u32,
}

impl<W: Write> WalEncoder<W> {
    /// Starts a chain at `prev_crc` (0 for a new WAL).
    pub fn new(w: W, prev_crc: u32) -> Self {
        WalEncoder { w, crc: prev_crc }
    }

    /// Appends one record; CRC records get the current chain value.
    pub fn encode(&mut self, rtype: i64, data: Option<&[u8]>) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, data.unwrap_or(&[]));
        let rec = Record {
            r#type: rtype,
            crc: self.crc,
            data: data.map(bytes::Bytes::copy_from_slice),
        };
        let bytes = rec.encode_to_vec();
        self.w.write_all(&(bytes.len() as u64).to_le_bytes())?;
        self.w.write_all(&bytes)
    }

    /// The chain value after the last record.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// Returns the inner writer.
    pub fn into_inner(self) -> W {
        self.w
    }
}

/// The bytes etcd 2.2.1 writes into a new WAL that then receives a snapshot
/// (a member restored from a leader's snapshot): `crc(0)`, `metadata`,
/// snapshot marker `{0,0}` (from `wal.Create`), marker `{index, term}`
/// (`storage.SaveSnap`), then the HardState (`storage.Save`).
pub fn encode_v2_wal(metadata: &Metadata, snap: &WalSnapshot, hard_state: &HardState) -> Vec<u8> {
    let mut enc = WalEncoder::new(Vec::new(), 0);
    let steps: [(i64, Option<Vec<u8>>); 5] = [
        (RECORD_CRC, None),
        (RECORD_METADATA, Some(metadata.encode_to_vec())),
        (
            RECORD_SNAPSHOT,
            Some(WalSnapshot::default().encode_to_vec()),
        ),
        (
            RECORD_SNAPSHOT,
            Some(
                WalSnapshot {
                    index: snap.index,
                    term: snap.term,
                    conf_state: None,
                }
                .encode_to_vec(),
            ),
        ),
        (RECORD_STATE, Some(hard_state.encode_to_vec())),
    ];
    for (t, d) in steps {
        // Writing into a Vec cannot fail.
        let _ = enc.encode(t, d.as_deref());
    }
    enc.into_inner()
}

/// Creates `wal_dir/0000000000000000-<snap.index>.wal` holding
/// [`encode_v2_wal`]'s bytes (mode 0600, refusing to overwrite). No fsync:
/// durability is the caller's business.
pub fn write_v2_wal(
    wal_dir: &Path,
    metadata: &Metadata,
    snap: &WalSnapshot,
    hard_state: &HardState,
) -> Result<PathBuf> {
    let path = wal_dir.join(wal_file_name(0, snap.index));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            WalError::Exists { path: path.clone() }
        } else {
            WalError::Io {
                path: path.clone(),
                source,
            }
        }
    })?;
    f.write_all(&encode_v2_wal(metadata, snap, hard_state))
        .map_err(io_err(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(node_id: u64, cluster_id: u64) -> Metadata {
        Metadata {
            node_id,
            cluster_id,
        }
    }

    fn write_seg(dir: &Path, seq: u64, index: u64, bytes: &[u8]) {
        fs::write(dir.join(wal_file_name(seq, index)), bytes).unwrap();
    }

    #[test]
    fn names_round_trip_and_reject_junk() {
        assert_eq!(parse_wal_name(&wal_file_name(3, 0x2c)), Some((3, 0x2c)));
        assert_eq!(
            parse_wal_name("0000000000000000-0000000000000000.wal.tmp"),
            None
        );
        assert_eq!(parse_wal_name("00-00.wal"), None);
        assert_eq!(
            parse_wal_name("000000000000000g-0000000000000000.wal"),
            None
        );
    }

    #[test]
    fn written_wal_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let md = metadata(5, 6);
        let snap = WalSnapshot {
            index: 40,
            term: 3,
            conf_state: None,
        };
        let hs = HardState {
            term: 3,
            vote: 0,
            commit: 40,
        };
        let p = write_v2_wal(dir.path(), &md, &snap, &hs).unwrap();
        assert!(p.ends_with("0000000000000000-0000000000000028.wal"));
        assert!(matches!(
            write_v2_wal(dir.path(), &md, &snap, &hs),
            Err(WalError::Exists { .. })
        ));
        let c = read_wal(dir.path(), &snap).unwrap();
        assert_eq!(c.metadata, Some(md));
        assert_eq!(c.hard_state, Some(hs));
        assert!(c.start_matched);
        assert_eq!(c.record_count, 5);
        assert!(c.entries.is_empty());
        assert_eq!(c.last_index_term(), (40, 3));
    }

    #[test]
    fn padded_frames_and_zero_tail_are_read() {
        // A 3.x style frame: record padded to 8 bytes, then preallocated zeros.
        let rec = Record {
            r#type: RECORD_CRC,
            crc: 0,
            data: None,
        }
        .encode_to_vec();
        let pad = (8 - rec.len() % 8) % 8;
        let mut b = ((rec.len() as u64) | ((0x80 | pad as u64) << 56))
            .to_le_bytes()
            .to_vec();
        b.extend_from_slice(&rec);
        b.extend(std::iter::repeat_n(0u8, pad + 4096));
        let dir = tempfile::tempdir().unwrap();
        write_seg(dir.path(), 0, 0, &b);
        let recs: Vec<_> = WalReader::open(dir.path()).unwrap().collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].as_ref().unwrap().padding, pad as u8);
    }

    #[test]
    fn undefined_length_bits_are_rejected() {
        let md = metadata(1, 2);
        let mut b = encode_v2_wal(&md, &WalSnapshot::default(), &HardState::default());
        b[7] = 0x01;
        let dir = tempfile::tempdir().unwrap();
        write_seg(dir.path(), 0, 0, &b);
        let err = WalReader::open(dir.path())
            .unwrap()
            .collect::<Result<Vec<_>>>()
            .unwrap_err();
        assert!(matches!(err, WalError::BadFrame { offset: 0, .. }), "{err}");
    }

    #[test]
    fn crc_chain_spans_segments_and_detects_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = WalEncoder::new(Vec::new(), 0);
        e.encode(RECORD_CRC, None).unwrap();
        e.encode(RECORD_METADATA, Some(b"m")).unwrap();
        e.encode(
            RECORD_SNAPSHOT,
            Some(&WalSnapshot::default().encode_to_vec()),
        )
        .unwrap();
        let chain = e.crc();
        write_seg(dir.path(), 0, 0, &e.into_inner());
        let mut e2 = WalEncoder::new(Vec::new(), chain);
        e2.encode(RECORD_CRC, None).unwrap();
        e2.encode(RECORD_METADATA, Some(b"m")).unwrap();
        write_seg(dir.path(), 1, 1, &e2.into_inner());
        let n = WalReader::open(dir.path())
            .unwrap()
            .collect::<Result<Vec<_>>>()
            .unwrap()
            .len();
        assert_eq!(n, 5);
        // A second segment whose CRC record does not continue the chain.
        let mut e3 = WalEncoder::new(Vec::new(), chain ^ 1);
        e3.encode(RECORD_CRC, None).unwrap();
        write_seg(dir.path(), 1, 1, &e3.into_inner());
        let err = WalReader::open(dir.path())
            .unwrap()
            .collect::<Result<Vec<_>>>()
            .unwrap_err();
        assert!(matches!(err, WalError::CrcMismatch { .. }), "{err}");
    }

    #[test]
    fn truncated_last_record_is_a_torn_tail_but_not_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let md = metadata(1, 2);
        let full = encode_v2_wal(&md, &WalSnapshot::default(), &HardState::default());
        let cut = &full[..full.len() - 3];
        write_seg(dir.path(), 0, 0, cut);
        let c = read_wal(dir.path(), &WalSnapshot::default()).unwrap();
        assert!(c.torn_tail.is_some());
        assert_eq!(c.record_count, 4);
        write_seg(dir.path(), 1, 5, &full);
        let err = read_wal(dir.path(), &WalSnapshot::default()).unwrap_err();
        assert!(matches!(err, WalError::BadFrame { .. }), "{err}");
    }

    #[test]
    fn entries_overwrite_from_their_index_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = WalEncoder::new(Vec::new(), 0);
        e.encode(RECORD_CRC, None).unwrap();
        let ent = |i: u64, t: u64| {
            Entry {
                r#type: 0,
                term: t,
                index: i,
                data: None,
            }
            .encode_to_vec()
        };
        for (i, t) in [(1, 1), (2, 1), (3, 1), (2, 2)] {
            e.encode(RECORD_ENTRY, Some(&ent(i, t))).unwrap();
        }
        write_seg(dir.path(), 0, 0, &e.into_inner());
        let c = read_wal(dir.path(), &WalSnapshot::default()).unwrap();
        let got: Vec<_> = c.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(1, 1), (2, 2)]);
        // A hole is an error, not a panic.
        let mut e = WalEncoder::new(Vec::new(), 0);
        e.encode(RECORD_ENTRY, Some(&ent(5, 1))).unwrap();
        write_seg(dir.path(), 0, 0, &e.into_inner());
        assert!(matches!(
            read_wal(dir.path(), &WalSnapshot::default()),
            Err(WalError::EntryGap { .. })
        ));
    }

    #[test]
    fn key_writes_follow_log_rewrites() {
        // (index, writes keys) in WAL order -> runs, last key write.
        type Case = (&'static [(u64, bool)], &'static [(u64, u64)], Option<u64>);
        let cases: &[Case] = &[
            (&[], &[], None),
            (&[(1, false), (2, false)], &[], None),
            (&[(1, true), (2, true), (3, true)], &[(1, 3)], Some(3)),
            (
                &[(1, true), (2, false), (3, true)],
                &[(1, 1), (3, 3)],
                Some(3),
            ),
            // A new leader rewrites 3.. with a no-op: the writes at 3 and 4 are gone.
            (
                &[(1, true), (2, true), (3, true), (4, true), (3, false)],
                &[(1, 2)],
                Some(2),
            ),
            (
                &[(1, true), (3, true), (4, true), (2, false)],
                &[(1, 1)],
                Some(1),
            ),
            (&[(5, true), (6, true), (5, true)], &[(5, 5)], Some(5)),
            (&[(5, true), (6, false), (6, true)], &[(5, 6)], Some(6)),
            (&[(5, true), (6, true), (7, false), (5, false)], &[], None),
        ];
        for (entries, runs, last) in cases {
            let mut c = WalContents::default();
            for &(i, w) in *entries {
                c.note_key_write(i, w);
            }
            assert_eq!(c.key_writes, *runs, "{entries:?}");
            assert_eq!(c.last_key_write(), *last, "{entries:?}");
        }
    }

    #[test]
    fn length_word_gives_the_record_size_or_where_the_segment_ends() {
        use ControlFlow::{Break, Continue};
        let word = |v: u64| v.to_le_bytes().to_vec();
        // (word, is_last) -> Ok(Break(End/Torn)) / Ok(Continue(len, pad)) / Err(reason).
        let cases: Vec<(Vec<u8>, bool, std::result::Result<&str, &str>)> = vec![
            (vec![], false, Ok("end")),
            (vec![0, 0, 0], false, Ok("end")),
            (vec![1, 0, 0], true, Ok("torn")),
            (vec![1, 0, 0], false, Err("3 stray bytes at segment end")),
            (word(0), false, Ok("end")),
            (word(13), false, Ok("13+0")),
            (word(13 | (0x83 << 56)), false, Ok("13+3")),
            (
                word(13 | (0x80 << 56)),
                true,
                Err("length word 0x800000000000000d has undefined high bits"),
            ),
            (
                word(13 | (0x01 << 56)),
                true,
                Err("length word 0x010000000000000d has undefined high bits"),
            ),
        ];
        for (w, is_last, want) in cases {
            let at = FrameAt {
                off: 8,
                is_last,
                path: Path::new("s.wal"),
            };
            let got = match at.length_word(&w) {
                Ok(Break(Frame::End)) => Ok("end".to_string()),
                Ok(Break(Frame::Torn)) => Ok("torn".to_string()),
                Ok(Break(Frame::Record { .. })) => panic!("{w:?}: a record"),
                Ok(Continue((len, pad))) => Ok(format!("{len}+{pad}")),
                Err(WalError::BadFrame { offset, reason, .. }) => {
                    assert_eq!(offset, 8);
                    Err(reason)
                }
                Err(e) => panic!("{w:?}: {e}"),
            };
            assert_eq!(
                got.as_deref().map_err(String::as_str),
                want,
                "{w:?} last={is_last}"
            );
        }
    }

    #[test]
    fn crc_chain_restarts_at_crc_records_and_extends_over_data() {
        let at = FrameAt {
            off: 0,
            is_last: false,
            path: Path::new("s.wal"),
        };
        let crc_rec = |crc| Record {
            r#type: RECORD_CRC,
            crc,
            data: None,
        };
        assert_eq!(at.restart_chain(&crc_rec(7), 0).unwrap(), 7);
        assert_eq!(at.restart_chain(&crc_rec(7), 7).unwrap(), 7);
        assert!(matches!(
            at.restart_chain(&crc_rec(7), 8),
            Err(WalError::CrcMismatch {
                expected: 8,
                found: 7,
                ..
            })
        ));
        let good = crc32c::crc32c_append(5, b"data");
        let data_rec = |crc| Record {
            r#type: RECORD_ENTRY,
            crc,
            data: Some(bytes::Bytes::from_static(b"data")),
        };
        assert_eq!(at.extend_chain(&data_rec(good), 5).unwrap(), good);
        assert!(matches!(
            at.extend_chain(&data_rec(good ^ 1), 5),
            Err(WalError::CrcMismatch { expected, .. }) if expected == good
        ));
    }

    #[test]
    fn damaged_frames_are_torn_only_in_the_last_segment() {
        let zeros = [0u8; 600];
        for (is_last, body, torn) in [
            (true, &zeros[..], true),
            (false, &zeros[..], false),
            (true, &b"not zero"[..], false),
        ] {
            let at = FrameAt {
                off: 0,
                is_last,
                path: Path::new("s.wal"),
            };
            let err = WalError::Exists {
                path: PathBuf::from("x"),
            };
            let got = at.torn_or(body, err);
            assert_eq!(matches!(got, Ok(Frame::Torn)), torn, "last={is_last}");
            let short = at.cut_short(|| "short".into());
            assert_eq!(matches!(short, Ok(Frame::Torn)), is_last);
        }
    }
}
