//! `etcd-migrate snapshot`: a snapshot of a running member over the v3 API, streamed to a temp
//! file beside its final name, made durable, and counted as a backup only once our own readers
//! have read it back whole and the member has vouched for what they found (its HashKV and key
//! count at the snapshot's revision). Then the oldest beyond `--keep` go. With `--every` it runs
//! in a loop, as a sidecar in the etcd pod.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::etcd::v3::{ClientTls, V3Error, V3};
use crate::fsutil::{self, FsError};
use crate::meter::{Meter, Unit};
use crate::storage::snapcheck::{self, SnapshotError, SnapshotFacts, Trailer, TRAILER_LEN};

/// A member that sends nothing for this long while streaming has stalled.
const STALL: Duration = Duration::from_secs(60);
/// Unary requests (status, HashKV, count) give up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Writeback of the temp file is started every this many bytes, so the final fsync is short.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Chunks written by one vectored write at most (etcd sends 32 KiB chunks; IOV_MAX is 1024).
const WRITE_BATCH: usize = 64;
/// With `--every`, how soon a failed snapshot is tried again (at most one period).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// What a verified snapshot's name ends with.
const SUFFIX: &str = ".db";
/// What a snapshot that failed verification is renamed to end with: kept, never counted.
const UNVERIFIED: &str = ".db.unverified";

/// How `snapshot` runs, resolved from flags and env.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    pub endpoint: String,
    pub out: PathBuf,
    pub keep: usize,
    pub every: Option<Duration>,
    pub tls: Option<ClientTls>,
}

/// Why a snapshot was not taken. 2: bad input, nothing written; 1: the member, the disk or
/// the verification failed (no file under a final name unless it verified).
#[derive(Debug, Error)]
pub enum TakeError {
    #[error("snapshot dir {0}: {1}")]
    OutDir(PathBuf, String),
    #[error("member at {0} is not serving: {1}; check that etcd runs there (and the client TLS flags in ETCD_CREDS)")]
    NotServing(String, #[source] V3Error),
    #[error("snapshot stream from {0}: {1}; nothing was kept")]
    Stream(String, String),
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Streamed, but not counted as a backup: (the file, why, what became of it).
    #[error("snapshot {0} {1}; {2}")]
    Rejected(PathBuf, String, String),
}

impl TakeError {
    pub fn exit_code(&self) -> i32 {
        match self {
            TakeError::OutDir(..) => 2,
            TakeError::NotServing(..)
            | TakeError::Stream(..)
            | TakeError::Fs(_)
            | TakeError::Rejected(..) => 1,
        }
    }
}

/// A verified snapshot.
#[derive(Debug, Clone)]
pub struct Taken {
    pub path: PathBuf,
    pub facts: SnapshotFacts,
    pub member_hash: u32,
    pub elapsed: Duration,
    pub stream: Duration,
    pub verify: Duration,
    pub pruned: Vec<PathBuf>,
}

/// Takes snapshots: once, or every `config.every` until stopped (a failed one is logged and
/// the next is tried on time).
pub async fn run(config: &SnapshotConfig) -> Result<(), TakeError> {
    let Some(every) = config.every else {
        return take(config).await.map(|_| ());
    };
    tracing::info!(every_s = every.as_secs(), dir = %config.out.display(), keep = config.keep, "taking a snapshot now and then every {}", human(every));
    loop {
        let started = Instant::now();
        let wait = match take(config).await {
            Ok(_) => every,
            // Soon again, not a whole period later: the member may only have been starting.
            Err(e) => {
                let wait = every.min(RETRY_AFTER_FAILURE);
                tracing::error!(
                    exit_code = e.exit_code(),
                    "{e}; next try in {}",
                    human(wait)
                );
                wait
            }
        };
        tokio::time::sleep(wait.saturating_sub(started.elapsed())).await;
    }
}

/// Takes one verified snapshot and prunes the old ones.
pub async fn take(config: &SnapshotConfig) -> Result<Taken, TakeError> {
    let t0 = Instant::now();
    prepare_dir(&config.out)?;
    let not_serving = |source| TakeError::NotServing(config.endpoint.clone(), source);
    let mut api = V3::connect_tls(&config.endpoint, Some(REQUEST_TIMEOUT), config.tls.as_ref())
        .await
        .map_err(not_serving)?;
    let status = api.member_status().await.map_err(not_serving)?;
    let name = member_name(&mut api, status.id).await;
    let stamp = crate::backup::stamp();
    let tmp = config
        .out
        .join(format!(".{name}-{stamp}.db.tmp-{}", std::process::id()));
    let streamed = stream_to(config, &tmp, status.db_size).await;
    let streamed = match streamed {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let t_stream = t0.elapsed();
    let t1 = Instant::now();
    let checked = verify(&mut api, &tmp, &streamed, &status.version).await;
    let (facts, member_hash) = match checked {
        Ok(v) => v,
        Err(e) => return Err(set_aside(&config.out, &tmp, &name, &stamp, e)),
    };
    let path = config
        .out
        .join(format!("{name}-{stamp}-rev{}{SUFFIX}", facts.revision));
    fail::fail_point!("snapshot-before-rename");
    fsutil::rename_durable(&tmp, &path)?;
    let verify_time = t1.elapsed();
    let pruned = prune(&config.out, &name, config.keep, &path)?;
    let taken = Taken {
        path,
        facts,
        member_hash,
        elapsed: t0.elapsed(),
        stream: t_stream,
        verify: verify_time,
        pruned,
    };
    log_taken(&taken, &status.version);
    Ok(taken)
}

fn log_taken(t: &Taken, version: &str) {
    let mb = t.facts.size as f64 / 1e6;
    tracing::info!(path = %t.path.display(), bytes = t.facts.size, revision = t.facts.revision, keys = t.facts.keys,
        entries = t.facts.entries, other_keys = t.facts.other_elements, hash_kv = t.member_hash, compact_revision = t.facts.hash.compact_revision,
        sha256 = %t.facts.sha256, member_release = version, elapsed_ms = t.elapsed.as_millis() as u64,
        stream_ms = t.stream.as_millis() as u64, verify_ms = t.verify.as_millis() as u64,
        mb_per_s = (mb / t.elapsed.as_secs_f64().max(1e-3)).round(), pruned = t.pruned.len(),
        peak_rss_mb = crate::meter::own_peak_rss_mb(),
        "snapshot verified: every page read, {} keys at revision {}, HashKV {} as the member computes it", t.facts.keys, t.facts.revision, t.member_hash);
    println!("{}", t.path.display());
}

/// The dir exists (created if missing) and is a dir we can write; temp files a killed run left
/// are removed.
fn prepare_dir(dir: &Path) -> Result<(), TakeError> {
    let bad = |why: String| TakeError::OutDir(dir.to_path_buf(), why);
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(bad("exists and is not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fsutil::create_dir_mode(dir, 0o700).map_err(|e| bad(e.to_string()))?
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    let probe = dir.join(format!(".probe.tmp-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| bad(format!("cannot write there: {e}")))?;
    let stale = fsutil::remove_stale_temps(dir)?;
    if stale > 0 {
        tracing::warn!(dir = %dir.display(), files = stale, "removed partial snapshots an interrupted run left");
    }
    Ok(())
}

/// The member's name (for the file name); its id in hex when it has none.
async fn member_name(api: &mut V3, id: u64) -> String {
    let listed = api.member_list().await.unwrap_or_default();
    let name = listed
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{id:x}"));
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What the stream brought: its size and checksums, computed as it went.
struct Streamed {
    size: u64,
    trailer: Trailer,
    sha256: String,
}

/// Streams the member's snapshot into `tmp` (created, written, fsynced), hashing as it goes.
async fn stream_to(
    config: &SnapshotConfig,
    tmp: &Path,
    db_size: i64,
) -> Result<Streamed, TakeError> {
    let stream_err = |why: String| TakeError::Stream(config.endpoint.clone(), why);
    let mut api = V3::connect_tls(&config.endpoint, None, config.tls.as_ref())
        .await
        .map_err(|source| TakeError::NotServing(config.endpoint.clone(), source))?;
    let mut stream = api
        .snapshot()
        .await
        .map_err(|e| stream_err(e.to_string()))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(tmp)
        .map_err(FsError::io("create", tmp))?;
    let meter = Meter::count(
        "snapshot",
        Unit::Bytes,
        (db_size > 0).then_some(db_size as u64),
    );
    // The file is written and hashed on a thread of its own: this one only receives.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(64);
    let path = tmp.to_path_buf();
    let writer = std::thread::Builder::new()
        .name("snapshot-writer".into())
        .spawn(move || write_and_hash(file, &path, rx))
        .map_err(FsError::io("spawn a writer for", tmp))?;
    let mut size = 0u64;
    let received = loop {
        let msg = match tokio::time::timeout(STALL, stream.message()).await {
            Err(_) => break Err(stream_err(format!("nothing received for {}", human(STALL)))),
            Ok(Err(e)) => break Err(stream_err(e.to_string())),
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(msg))) => msg,
        };
        size += msg.blob().len() as u64;
        if tx.send(msg.blob().to_vec()).is_err() {
            break Ok(()); // the writer failed: its error is reported below
        }
        fail::fail_point!("snapshot-streaming");
        meter.counter().store(size, Ordering::Relaxed);
    };
    drop(tx);
    let written = writer.join().unwrap_or_else(|_| {
        Err(FsError::io("write", tmp)(std::io::Error::other(
            "the writer panicked",
        )))
    });
    meter.finish();
    received?;
    let w = written?;
    if w.size < TRAILER_LEN as u64 {
        return Err(stream_err(format!(
            "ended after {} bytes, before etcd's checksum",
            w.size
        )));
    }
    if !w.trailer_matches {
        return Err(stream_err(
            "etcd's SHA-256 of the stream does not match the bytes received".into(),
        ));
    }
    Ok(Streamed {
        size: w.size,
        trailer: Trailer::Valid,
        sha256: w.sha256,
    })
}

/// Feeds `chunk` to the body's hash, holding back the last 32 bytes seen (the trailer, if the
/// stream ends there) in `held`.
fn hash_body(body: &mut Sha256, held: &mut Vec<u8>, chunk: &[u8]) {
    if chunk.len() >= TRAILER_LEN {
        body.update(&*held);
        let cut = chunk.len() - TRAILER_LEN;
        body.update(&chunk[..cut]);
        held.clear();
        held.extend_from_slice(&chunk[cut..]);
    } else {
        held.extend_from_slice(chunk);
        if held.len() > TRAILER_LEN {
            let cut = held.len() - TRAILER_LEN;
            body.update(&held[..cut]);
            held.drain(..cut);
        }
    }
}

/// Writes every chunk, in order, by vectored writes.
fn write_all_chunks(file: &mut std::fs::File, chunks: &[Vec<u8>]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        chunks.iter().map(|c| std::io::IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the writer thread made of the stream.
struct Written {
    size: u64,
    /// The last 32 bytes are the SHA-256 of all before them.
    trailer_matches: bool,
    /// SHA-256 of the whole file, hex.
    sha256: String,
}

/// Writes the chunks to `file` (as many as have arrived, in one vectored write: no copy into a
/// buffer of our own; writeback started as it goes, fsynced at the end) and hashes them:
/// everything but the last 32 bytes is the body etcd's checksum covers.
fn write_and_hash(
    mut file: std::fs::File,
    path: &Path,
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<Written, FsError> {
    let mut body = Sha256::new();
    let mut held: Vec<u8> = Vec::with_capacity(2 * TRAILER_LEN);
    let (mut size, mut synced) = (0u64, 0u64);
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(WRITE_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(chunk) => batch.push(chunk),
                Err(_) => break,
            }
        }
        write_all_chunks(&mut file, &batch).map_err(FsError::io("write", path))?;
        for chunk in batch.drain(..) {
            size += chunk.len() as u64;
            hash_body(&mut body, &mut held, &chunk);
        }
        if size - synced >= WRITEBACK_EVERY {
            fsutil::start_writeback(&file, synced, size - synced);
            synced = size;
        }
    }
    file.sync_all().map_err(FsError::io("fsync", path))?;
    let mut whole = body.clone();
    whole.update(&held);
    Ok(Written {
        size,
        trailer_matches: held.len() == TRAILER_LEN && body.finalize().as_slice() == held.as_slice(),
        sha256: snapcheck::hex(&whole.finalize()),
    })
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Why a streamed file is not counted: unreadable by our readers, or not what the member holds.
enum Rejected {
    Unreadable(SnapshotError),
    Mismatch { revision: i64, what: String },
}

/// Reads the file back whole with our readers while the member computes its HashKV and counts
/// its keys at the revision the file holds (found first, from the tree's last key), then
/// compares.
async fn verify(
    api: &mut V3,
    tmp: &Path,
    streamed: &Streamed,
    member_version: &str,
) -> Result<(SnapshotFacts, u32), Rejected> {
    let revision = snapcheck::newest_revision(tmp).map_err(Rejected::Unreadable)?;
    let mut member_api = api.clone();
    let member = tokio::spawn(async move {
        let t = Instant::now();
        let hash = member_api.hash_kv(revision).await;
        let count = member_api.count_at(revision).await;
        (hash, count, t.elapsed())
    });
    let rule = snapcheck::skips_compacted_tombstone(member_version);
    let t = Instant::now();
    let read = read_back(tmp, streamed, rule).await;
    let read_ms = t.elapsed().as_millis() as u64;
    let mismatch = |what: String| Rejected::Mismatch { revision, what };
    let facts = match read {
        Ok(facts) if facts.revision == revision => facts,
        // The file is rejected: our HashKV and count requests to the member are cancelled.
        other => {
            member.abort();
            return Err(match other {
                Err(e) => e,
                Ok(facts) => mismatch(format!(
                    "the file's newest revision read {} on a full read",
                    facts.revision
                )),
            });
        }
    };
    let (hash, count, member_took) = member
        .await
        .map_err(|e| mismatch(format!("asking the member failed: {e}")))?;
    let member =
        hash.map_err(|e| mismatch(format!("the member cannot give its HashKV there ({e})")))?;
    tracing::info!(
        read_ms,
        member_ms = member_took.as_millis() as u64,
        "read the snapshot back; the member's HashKV and key count alongside"
    );
    let ours = if member.compact_revision == facts.hash.compact_revision {
        facts.hash
    } else {
        snapcheck::hash_kv(tmp, member.compact_revision, rule).map_err(Rejected::Unreadable)?
    };
    if ours.hash != member.hash {
        return Err(mismatch(format!(
            "HashKV {} from the member (compaction {}), {} from the file",
            member.hash, member.compact_revision, ours.hash
        )));
    }
    let count =
        count.map_err(|e| mismatch(format!("the member cannot count its keys there ({e})")))?;
    if count != facts.keys {
        return Err(mismatch(format!(
            "{count} keys on the member, {} in the file",
            facts.keys
        )));
    }
    Ok((facts, member.hash))
}

/// Our readers over the whole file, on a blocking thread, with progress shown.
async fn read_back(tmp: &Path, streamed: &Streamed, rule: bool) -> Result<SnapshotFacts, Rejected> {
    let meter = Meter::count("verifying the snapshot", Unit::Bytes, Some(streamed.size));
    let path = tmp.to_path_buf();
    let pre = (streamed.size, streamed.trailer, streamed.sha256.clone());
    let progress = std::sync::Arc::new(AtomicU64::new(0));
    let counted = progress.clone();
    let read = tokio::task::spawn_blocking(move || {
        snapcheck::check_read(&path, pre, Some(rule), &counted)
    });
    let facts = loop {
        if read.is_finished() {
            break read.await.map_err(|e| {
                Rejected::Unreadable(SnapshotError::Io {
                    path: tmp.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })
            })?;
        }
        meter
            .counter()
            .store(progress.load(Ordering::Relaxed), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    meter.finish();
    facts.map_err(Rejected::Unreadable)
}

/// "30m", "90s".
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// A streamed file that failed verification is kept beside the backups under a name that is
/// never counted as one (the newest `--keep` of those are kept too), and the error says where.
fn set_aside(dir: &Path, tmp: &Path, name: &str, stamp: &str, why: Rejected) -> TakeError {
    let aside = dir.join(format!("{name}-{stamp}{UNVERIFIED}"));
    let kept = match fsutil::rename_durable(tmp, &aside) {
        Ok(()) => format!(
            "the file is kept as {} for inspection, not counted as a backup",
            aside.display()
        ),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            format!("it could not be set aside ({e}) and was removed")
        }
    };
    let why = match why {
        Rejected::Unreadable(source) => format!("does not read back: {source}"),
        Rejected::Mismatch { revision, what } => {
            format!("does not match what the member holds at revision {revision}: {what}")
        }
    };
    TakeError::Rejected(aside, why, kept)
}

/// This member's verified snapshots in `dir`, oldest first (names sort by time).
pub fn list(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    files_named(dir, |n| is_snapshot_name(n, &prefix))
}

/// The files in `dir` whose names `pick` accepts, sorted.
fn files_named(dir: &Path, pick: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pick))
        .collect();
    found.sort();
    found
}

/// `<name>-<YYYYMMDDTHHMMSSZ>-rev<N>.db`.
fn is_snapshot_name(file: &str, prefix: &str) -> bool {
    let Some(rest) = file
        .strip_prefix(prefix)
        .and_then(|r| r.strip_suffix(SUFFIX))
    else {
        return false;
    };
    let Some((stamp, rev)) = rest.split_once("-rev") else {
        return false;
    };
    stamp.len() == 16
        && stamp.as_bytes()[8] == b'T'
        && stamp.ends_with('Z')
        && !rev.is_empty()
        && rev.bytes().all(|b| b.is_ascii_digit())
}

/// This member's snapshots that failed verification, oldest first.
fn unverified(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    files_named(dir, |n| {
        n.strip_suffix(UNVERIFIED)
            .and_then(|r| r.strip_prefix(&prefix))
            .is_some_and(|stamp| stamp.len() == 16 && stamp.ends_with('Z'))
    })
}

/// Removes this member's oldest verified snapshots beyond `keep`, never `just_taken`, and the
/// oldest of those that failed verification beyond `keep` likewise.
fn prune(
    dir: &Path,
    name: &str,
    keep: usize,
    just_taken: &Path,
) -> Result<Vec<PathBuf>, TakeError> {
    let mut removed = prune_list(list(dir, name), keep, just_taken, "an old snapshot")?;
    removed.extend(prune_list(
        unverified(dir, name),
        keep,
        just_taken,
        "an old snapshot that failed verification",
    )?);
    if !removed.is_empty() {
        fsutil::fsync_dir(dir)?;
    }
    Ok(removed)
}

fn prune_list(
    all: Vec<PathBuf>,
    keep: usize,
    just_taken: &Path,
    what: &str,
) -> Result<Vec<PathBuf>, TakeError> {
    let excess = all.len().saturating_sub(keep.max(1));
    let mut removed = Vec::new();
    for old in all.into_iter().take(excess).filter(|p| p != just_taken) {
        std::fs::remove_file(&old).map_err(FsError::io("remove", &old))?;
        tracing::info!(path = %old.display(), keep, "removed {what} (keeping the newest {keep})");
        removed.push(old);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_hash_holds_back_the_last_32_bytes_however_the_stream_is_cut() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let want_body = Sha256::digest(&data[..data.len() - TRAILER_LEN]);
        // Cuts into chunks of these sizes, cycled: bigger and smaller than the trailer.
        for sizes in [
            &[1000][..],
            &[1],
            &[31, 1],
            &[32],
            &[33, 5],
            &[100, 3, 64, 0, 29],
        ] {
            let (mut body, mut held) = (Sha256::new(), Vec::new());
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                hash_body(&mut body, &mut held, &data[at..at + n]);
                at += n;
                i += 1;
            }
            assert_eq!(held, &data[data.len() - TRAILER_LEN..], "{sizes:?}");
            assert_eq!(body.finalize(), want_body, "{sizes:?}");
        }
    }

    #[test]
    fn chunks_are_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunks: Vec<Vec<u8>> = (0..200u32)
            .map(|i| vec![i as u8; 1 + (i as usize * 97) % 40_000])
            .collect();
        write_all_chunks(&mut f, &chunks).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), chunks.concat());
    }

    #[test]
    fn snapshot_names_are_recognised_exactly() {
        let p = "m1-";
        assert!(is_snapshot_name("m1-20261203T101500Z-rev42.db", p));
        for bad in [
            "m1-20261203T101500Z-rev42.db.unverified",
            "m10-20261203T101500Z-rev42.db",
            ".m1-20261203T101500Z.db.tmp-7",
            "m1-20261203T101500Z-rev.db",
            "m1-2026120T101500Z-rev42.db",
            "m1-20261203T101500Z-rev4x.db",
        ] {
            assert!(!is_snapshot_name(bad, p), "{bad}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_never_the_one_just_taken() {
        let d = tempfile::tempdir().unwrap();
        let names: Vec<String> = (1..=5)
            .map(|i| format!("m1-2026120{i}T000000Z-rev{i}.db"))
            .collect();
        for n in &names {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        std::fs::write(d.path().join("m2-20261201T000000Z-rev1.db"), b"x").unwrap();
        std::fs::write(d.path().join("m1-20261201T000000Z.db.unverified"), b"x").unwrap();
        let newest = d.path().join(&names[4]);
        let removed = prune(d.path(), "m1", 2, &newest).unwrap();
        assert_eq!(removed.len(), 3);
        assert_eq!(
            list(d.path(), "m1"),
            vec![d.path().join(&names[3]), newest.clone()]
        );
        assert!(
            d.path().join("m2-20261201T000000Z-rev1.db").exists(),
            "another member's"
        );
        assert!(
            d.path().join("m1-20261201T000000Z.db.unverified").exists(),
            "set aside"
        );
        for i in 2..=4 {
            let n = format!("m1-2026120{i}T000000Z.db.unverified");
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        prune(d.path(), "m1", 2, &newest).unwrap();
        let left = unverified(d.path(), "m1");
        assert_eq!(left.len(), 2, "the newest two that failed stay: {left:?}");
        assert!(left[1].ends_with("m1-20261204T000000Z.db.unverified"));
        // keep 0 is taken as 1: the snapshot just taken stays.
        prune(d.path(), "m1", 0, &newest).unwrap();
        assert_eq!(list(d.path(), "m1"), vec![newest]);
    }
}
