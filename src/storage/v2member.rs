//! Writes a complete etcd 2.2.1 member directory (`snap/` + `wal/`) from a
//! stream of keys: the native rollback target.
//!
//! What etcd 2.2.1 does on restart (`etcdserver/server.go` `NewServer`,
//! `raft.go` `restartNode`, `storage.go` `readWAL`, `wal.ReadAll`):
//! 1. `snap.Load()` takes the newest `*.snap` that decodes with a good CRC and
//!    recovers the v2 store from its JSON (`store.Recovery`);
//! 2. the WAL is opened at that snapshot's (index, term): segments from the
//!    last one whose name index is <= the snapshot index; `ReadAll` must see a
//!    snapshot marker with exactly that index and term, must read to EOF
//!    without error (no zero padding: 2.2.1 knows no end-of-data marker), and
//!    entries after the snapshot must be contiguous;
//! 3. raft restarts from the snapshot plus the last HardState, whose commit
//!    must lie between the snapshot index and the last entry index;
//! 4. membership comes from `/0/members` of the store, raft peers from the
//!    snapshot's ConfState: both must list the same ids; `/0/version` must
//!    not be above 2.2.
//!
//! We write what a 2.2.1 member that received a leader snapshot writes:
//! `snap/<term>-<index>.snap` and `wal/0000000000000000-<index>.wal` with
//! records crc, metadata, snapshot{0,0}, snapshot{index,term},
//! HardState{term, vote 0, commit index}, and no entries.
//!
//! Index scheme: keys keep the created/modified indexes given (the v3
//! create/mod revisions, i.e. Kubernetes resourceVersions, which therefore
//! survive the rollback and a later `etcdctl migrate`); the store's
//! `CurrentIndex` is the highest of them (or the given minimum, e.g. the v3
//! current revision), so new writes get higher indexes. The raft snapshot
//! index is `max(params.index, CurrentIndex)`, keeping etcd's usual
//! invariant raft index >= store index (every store change is one raft
//! entry); `etcdctl migrate` turns it into the v3 consistent index. The term
//! is `params.term` (>= 1). All members of a cluster must get the same term
//! and index so that their logs match at the snapshot.
//!
//! `etcdctl migrate` writes each key with revision = its modified index, so
//! two keys with the same modified index would collide there: callers should
//! pass unique modified indexes (v3 revisions of distinct live keys are
//! unique unless one transaction wrote several keys).

use std::fs;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::storage::raftpb::{ConfState, HardState, Metadata, SnapshotMetadata, WalSnapshot};
use crate::storage::snap::{self, snap_file_name};
use crate::storage::v2store::{
    self, StoreParams, StoreWritten, V2Key, V2MemberInfo, V2StoreError, CLUSTER_VERSION_2_2,
};
use crate::storage::wal::{self, WalError};

/// What makes member parameters invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadParams {
    #[error("node id and cluster id must be non-zero")]
    ZeroId,
    #[error("term must be >= 1")]
    ZeroTerm,
    #[error("member ids must be unique and non-zero")]
    MemberIds,
    #[error("node id {node_id:x} is not among the members")]
    NotAMember { node_id: u64 },
    #[error("every member needs a peer URL")]
    NoPeerUrl,
}

/// Errors of [`write_v2_member`].
#[derive(Debug, thiserror::Error)]
pub enum V2MemberError {
    /// The parameters cannot make a valid member.
    #[error("invalid parameters: {0}")]
    Params(BadParams),
    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The target already holds WAL or snapshot files.
    #[error("{}: not empty", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The keys could not be written as a v2 store.
    #[error(transparent)]
    Store(#[from] V2StoreError),
    /// Writing the WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
}

/// What the member is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2MemberParams {
    /// This member's id (non-zero, one of `members`).
    pub node_id: u64,
    /// Cluster id (non-zero).
    pub cluster_id: u64,
    /// All members of the cluster.
    pub members: Vec<V2MemberInfo>,
    /// Raft term of the snapshot (>= 1), e.g. the source's HardState term.
    pub term: u64,
    /// Lower bound of the raft snapshot index, e.g. the source's last index.
    pub index: u64,
    /// Lower bound of the store's CurrentIndex (e.g. the v3 current revision).
    pub min_store_index: u64,
    /// `/0/version`; [`CLUSTER_VERSION_2_2`] for etcd 2.2.1.
    pub cluster_version: String,
    /// About how many bytes the store JSON will take (e.g. the v3 backend's size), 0 if
    /// unknown. When it gives the snapshot header's length right, the JSON is written once,
    /// in place; otherwise it is copied once more behind the header.
    pub store_size_hint: u64,
}

impl V2MemberParams {
    /// Parameters for a 2.2.1 member with cluster version "2.2.0".
    pub fn new(
        node_id: u64,
        cluster_id: u64,
        members: Vec<V2MemberInfo>,
        term: u64,
        index: u64,
    ) -> Self {
        V2MemberParams {
            node_id,
            cluster_id,
            members,
            term,
            index,
            min_store_index: 0,
            cluster_version: CLUSTER_VERSION_2_2.to_string(),
            store_size_hint: 0,
        }
    }

    fn validate(&self) -> Result<(), V2MemberError> {
        let bad = |why| Err(V2MemberError::Params(why));
        if self.node_id == 0 || self.cluster_id == 0 {
            return bad(BadParams::ZeroId);
        }
        if self.term == 0 {
            return bad(BadParams::ZeroTerm);
        }
        let mut ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.members.len() || ids.contains(&0) {
            return bad(BadParams::MemberIds);
        }
        if !ids.contains(&self.node_id) {
            return bad(BadParams::NotAMember {
                node_id: self.node_id,
            });
        }
        if self.members.iter().any(|m| m.peer_urls.is_empty()) {
            return bad(BadParams::NoPeerUrl);
        }
        Ok(())
    }
}

/// What [`write_v2_member`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2MemberWritten {
    /// The snapshot file.
    pub snap_path: PathBuf,
    /// The WAL file.
    pub wal_path: PathBuf,
    /// Raft term used.
    pub term: u64,
    /// Raft index used.
    pub index: u64,
    /// What went into the store.
    pub store: StoreWritten,
    /// Whether the store JSON was written in place (else copied behind the header).
    pub in_place: bool,
}

/// Bytes handed to the writer thread at a time.
const CHUNK: usize = 1 << 20;
/// Chunks in flight: memory stays at a few megabytes however large the store.
const CHUNKS_IN_FLIGHT: usize = 4;
/// How much the writer thread writes between asking the kernel to start writing back.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// What the writer thread ends with: the file, and the length and CRC-32C of what it wrote.
type Written = io::Result<(fs::File, u64, u32)>;

/// Writes to a file on a thread of its own, counting and checksumming what passes through, so
/// that the store JSON is produced while the previous chunk is written.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<Written>>,
}

impl ChunkWriter {
    /// Writes from `file`'s current position on.
    fn new(file: fs::File) -> ChunkWriter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let thread = std::thread::spawn(move || {
            let mut file = file;
            let start = file.stream_position()?;
            let (mut len, mut crc, mut flushed) = (0u64, 0u32, 0u64);
            for chunk in rx {
                file.write_all(&chunk)?;
                crc = crc32c::crc32c_append(crc, &chunk);
                len += chunk.len() as u64;
                // Let the disk take what is written while the rest is produced: the fsync
                // after the last chunk then waits for little.
                if len - flushed >= WRITEBACK_EVERY {
                    crate::fsutil::start_writeback(&file, start + flushed, len - flushed);
                    flushed = len;
                }
            }
            Ok((file, len, crc))
        });
        ChunkWriter {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread stopped: its error says why.
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other("the writer thread stopped")),
        }
    }

    fn join(&mut self) -> Written {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(written)) => written,
            Some(Err(_)) => Err(io::Error::other("the writer thread panicked")),
            None => Err(io::Error::other("the writer thread already ended")),
        }
    }

    /// Writes what is buffered and waits for the thread: the file, bytes written, their CRC.
    fn finish(mut self) -> Written {
        if !self.buf.is_empty() {
            self.send()?;
        }
        self.join()
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go out when full, and the rest at `finish`, which also waits for the file.
        Ok(())
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        // On an error path: let the thread finish (and close the file) before the caller
        // removes it.
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> V2MemberError + '_ {
    move |source| V2MemberError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn make_dir(path: &Path) -> Result<(), V2MemberError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path).map_err(io_at(path))
}

fn ensure_no(dir: &Path, suffix: &str) -> Result<(), V2MemberError> {
    for ent in fs::read_dir(dir).map_err(io_at(dir))? {
        let ent = ent.map_err(io_at(dir))?;
        if ent.file_name().to_string_lossy().ends_with(suffix) {
            return Err(V2MemberError::NotEmpty {
                path: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Writes `member_dir/snap/<term>-<index>.snap` and
/// `member_dir/wal/0000000000000000-<index>.wal` for etcd 2.2.1 (see the
/// module documentation for the format and the index scheme). `keys` must
/// be in strictly increasing byte order. The store JSON streams into
/// `member_dir/snap/.v2store.snap.tmp` after room for the snapshot header, whose
/// length depends on the JSON's length and CRC, so that memory stays bounded; the
/// header is then written in front (or, when it came out another length, the JSON is
/// copied behind it into a new file) and the file renamed into place. Nothing is
/// fsynced: the caller owns durability.
pub fn write_v2_member<I, E>(
    member_dir: &Path,
    params: &V2MemberParams,
    keys: I,
) -> Result<V2MemberWritten, V2MemberError>
where
    I: IntoIterator<Item = Result<V2Key, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    params.validate()?;
    let (snap_dir, wal_dir) = prepare_member_dirs(member_dir)?;

    // 1. The store JSON, where it will sit in the snapshot file, with its length and CRC.
    let staged = StagedStore {
        tmp: snap_dir.join(".v2store.snap.tmp"),
        room: snap::likely_prefix_len(params.store_size_hint),
    };
    let sp = store_params(params);
    let store = staged.write_json(|out| v2store::write_store(out, &sp, keys));
    let store = store.inspect_err(|_| {
        let _ = fs::remove_file(&staged.tmp);
    })?;
    let index = params.index.max(store.written.current_index);
    let term = params.term;

    // 2. The header in front of the JSON and the metadata after it.
    let md = snapshot_metadata(&params.members, term, index);
    let snap_path = snap_dir.join(snap_file_name(term, index));
    let framed = staged.frame(store.file, &md, store.json_len, store.json_crc, &snap_path);
    let _ = fs::remove_file(&staged.tmp);
    let in_place = framed?;

    // 3. The WAL.
    let wal_path = write_member_wal(&wal_dir, params, term, index)?;
    Ok(V2MemberWritten {
        snap_path,
        wal_path,
        term,
        index,
        store: store.written,
        in_place,
    })
}

/// Creates `snap/` and `wal/` under `member_dir`, refusing them if they hold snapshots or
/// segments already.
fn prepare_member_dirs(member_dir: &Path) -> Result<(PathBuf, PathBuf), V2MemberError> {
    let snap_dir = member_dir.join("snap");
    let wal_dir = member_dir.join("wal");
    make_dir(&snap_dir)?;
    make_dir(&wal_dir)?;
    ensure_no(&snap_dir, ".snap")?;
    ensure_no(&wal_dir, ".wal")?;
    Ok((snap_dir, wal_dir))
}

/// The temporary snapshot file the store JSON streams into, `room` bytes in.
struct StagedStore {
    tmp: PathBuf,
    room: u64,
}

/// The store JSON written into a [`StagedStore`].
struct StagedJson {
    written: StoreWritten,
    json_len: u64,
    json_crc: u32,
    file: fs::File,
}

impl StagedStore {
    /// Streams the v2 store (what `write_store` writes) into the file after the room left for
    /// the header.
    fn write_json(
        &self,
        write_store: impl FnOnce(&mut ChunkWriter) -> Result<StoreWritten, V2StoreError>,
    ) -> Result<StagedJson, V2MemberError> {
        let tmp = &self.tmp;
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(io_at(tmp))?;
        f.seek(SeekFrom::Start(self.room)).map_err(io_at(tmp))?;
        let mut out = ChunkWriter::new(f);
        let written = write_store(&mut out)?;
        let (file, json_len, json_crc) = out.finish().map_err(io_at(tmp))?;
        Ok(StagedJson {
            written,
            json_len,
            json_crc,
            file,
        })
    }

    /// Puts the snapshot header and metadata around the staged JSON and moves it to
    /// `snap_path`: in place when the header fits the room left (`Ok(true)`), else by copying
    /// the JSON behind the header into a new file (`Ok(false)`).
    fn frame(
        &self,
        staged: fs::File,
        md: &SnapshotMetadata,
        json_len: u64,
        json_crc: u32,
        snap_path: &Path,
    ) -> Result<bool, V2MemberError> {
        let (tmp, room) = (&self.tmp, self.room);
        let (prefix, tail) = snap::snap_framing(md, json_len, json_crc).map_err(io_at(tmp))?;
        if prefix.len() as u64 == room {
            staged.write_all_at(&prefix, 0).map_err(io_at(tmp))?;
            staged
                .write_all_at(&tail, room + json_len)
                .map_err(io_at(tmp))?;
            drop(staged);
            fs::rename(tmp, snap_path).map_err(io_at(snap_path))?;
            return Ok(true);
        }
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(snap_path)
            .map_err(io_at(snap_path))?;
        let mut out = BufWriter::new(out);
        let mut src = staged;
        src.seek(SeekFrom::Start(room)).map_err(io_at(tmp))?;
        snap::write_snap_streamed(&mut out, md, json_len, json_crc, &mut src)
            .map_err(io_at(snap_path))?;
        out.flush().map_err(io_at(snap_path))?;
        Ok(false)
    }
}

/// What goes into the member's v2 store besides the keys.
fn store_params(params: &V2MemberParams) -> StoreParams {
    StoreParams {
        cluster_version: params.cluster_version.clone(),
        members: params.members.clone(),
        internal_index: 1,
        min_current_index: params.min_store_index,
    }
}

/// The snapshot's metadata: every member a voter, ids ascending.
fn snapshot_metadata(members: &[V2MemberInfo], term: u64, index: u64) -> SnapshotMetadata {
    let mut nodes: Vec<u64> = members.iter().map(|m| m.id).collect();
    nodes.sort_unstable();
    SnapshotMetadata {
        conf_state: ConfState {
            nodes,
            ..Default::default()
        },
        index,
        term,
    }
}

/// The member's WAL: a snapshot marker at (`index`, `term`) and a HardState committing it.
fn write_member_wal(
    wal_dir: &Path,
    params: &V2MemberParams,
    term: u64,
    index: u64,
) -> Result<PathBuf, V2MemberError> {
    let path = wal::write_v2_wal(
        wal_dir,
        &Metadata {
            node_id: params.node_id,
            cluster_id: params.cluster_id,
        },
        &WalSnapshot {
            index,
            term,
            conf_state: None,
        },
        &HardState {
            term,
            vote: 0,
            commit: index,
        },
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::walinfo::summarize;
    use std::convert::Infallible;

    fn member(id: u64) -> V2MemberInfo {
        V2MemberInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://127.0.0.1:{}", 2380 + id)],
            client_urls: vec![],
        }
    }

    #[test]
    fn written_member_summarizes_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = V2MemberParams::new(2, 77, vec![member(1), member(2), member(3)], 4, 10);
        let keys = (0..50u64).map(|i| {
            Ok::<_, Infallible>(V2Key {
                key: format!("/registry/things/t{i:03}").into_bytes(),
                value: format!("v{i}").into_bytes(),
                dir: false,
                expire: None,
                created_index: 5 + i,
                modified_index: 5 + i,
            })
        });
        let w = write_v2_member(dir.path(), &p, keys).unwrap();
        assert_eq!(w.index, 54);
        assert_eq!(w.store.keys, 50);
        assert!(!dir.path().join("snap/.v2store.snap.tmp").exists());
        let s = summarize(dir.path()).unwrap();
        assert_eq!((s.node_id, s.cluster_id), (2, 77));
        assert_eq!(s.members, vec![1, 2, 3]);
        assert_eq!(s.member_info, p.members);
        assert_eq!(s.boot_cluster_version.as_deref(), Some("2.2.0"));
        let snap = s.snapshot.unwrap();
        assert!(snap.in_wal);
        assert_eq!((snap.term, snap.index), (4, 54));
        assert_eq!((s.last_index, s.last_term), (54, 4));
        assert_eq!(
            s.hard_state,
            Some(HardState {
                term: 4,
                vote: 0,
                commit: 54
            })
        );
        // A second write into the same directory is refused.
        let again = write_v2_member(
            dir.path(),
            &p,
            std::iter::empty::<Result<V2Key, Infallible>>(),
        );
        assert!(matches!(again, Err(V2MemberError::NotEmpty { .. })));
    }

    /// The snapshot file as etcd's encoder lays it out, from what the file itself holds.
    fn reencoded(path: &Path) -> Vec<u8> {
        let bytes = fs::read(path).unwrap();
        let decoded = snap::decode_snap_file(&bytes, path).unwrap();
        snap::encode_snap_file(&decoded)
    }

    #[test]
    fn snapshot_bytes_are_the_same_written_in_place_or_copied_behind_the_header() {
        let keys = |n: u64| {
            (0..n).map(|i| {
                Ok::<_, Infallible>(V2Key {
                    key: format!("/registry/pods/p{i:05}").into_bytes(),
                    value: format!("{{\"n\":{i},\"s\":\"{}\"}}", "x".repeat(i as usize % 300))
                        .into_bytes(),
                    dir: false,
                    expire: None,
                    created_index: 2 + i,
                    modified_index: 2 + i,
                })
            })
        };
        let mut seen = (false, false);
        // Hints from far off to about right: the header's length is guessed wrong, then right.
        for (n, hint) in [(40, 0), (400, 0), (40, 1 << 20), (400, 70_000), (40, 3_000)] {
            let dir = tempfile::tempdir().unwrap();
            let mut p = V2MemberParams::new(1, 77, vec![member(1)], 3, 10);
            p.store_size_hint = hint;
            let w = write_v2_member(dir.path(), &p, keys(n)).unwrap();
            assert_eq!(
                fs::read(&w.snap_path).unwrap(),
                reencoded(&w.snap_path),
                "{n} keys, hint {hint}"
            );
            assert!(!dir.path().join("snap/.v2store.snap.tmp").exists());
            assert_eq!(fs::read_dir(dir.path().join("snap")).unwrap().count(), 1);
            let s = summarize(dir.path()).unwrap();
            assert_eq!(s.snapshot.map(|x| x.index), Some(w.index));
            if w.in_place {
                seen.0 = true;
            } else {
                seen.1 = true;
            }
        }
        assert_eq!(seen, (true, true), "both ways were taken");
    }

    #[test]
    fn bad_params_and_bad_keys_leave_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = V2MemberParams::new(9, 77, vec![member(1)], 4, 10);
        assert!(matches!(
            write_v2_member(
                dir.path(),
                &p,
                std::iter::empty::<Result<V2Key, Infallible>>()
            ),
            Err(V2MemberError::Params(_))
        ));
        let p = V2MemberParams::new(1, 77, vec![member(1)], 4, 10);
        let keys = vec![Ok::<_, io::Error>(V2Key {
            key: b"/a".to_vec(),
            value: b"x".to_vec(),
            dir: false,
            expire: None,
            created_index: 1,
            modified_index: 1,
        })]
        .into_iter()
        .chain(std::iter::once(Err(io::Error::other("source broke"))));
        let err = write_v2_member(dir.path(), &p, keys).unwrap_err();
        assert!(err.to_string().contains("source broke"), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("snap")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("wal")).unwrap().count(), 0);
    }

    #[test]
    fn snapshot_metadata_makes_every_member_a_voter_in_id_order() {
        let md = snapshot_metadata(&[member(3), member(1), member(2)], 4, 90);
        assert_eq!(md.conf_state.nodes, vec![1, 2, 3]);
        assert!(md.conf_state.learners.is_empty());
        assert_eq!((md.term, md.index), (4, 90));
    }

    #[test]
    fn member_dirs_are_made_but_not_over_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let (snap_dir, wal_dir) = prepare_member_dirs(dir.path()).unwrap();
        assert!(snap_dir.is_dir() && wal_dir.is_dir());
        assert!(prepare_member_dirs(dir.path()).is_ok());
        fs::write(wal_dir.join("x.wal"), b"").unwrap();
        let err = prepare_member_dirs(dir.path()).unwrap_err();
        assert!(matches!(err, V2MemberError::NotEmpty { path } if path == wal_dir));
    }
}
