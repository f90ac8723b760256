//! Restore by env (RESTORE_SNAPSHOT): a verified snapshot file becomes this member's data, on a
//! data dir that holds no etcd data. Restored with the bundled tool of the snapshot's release
//! line as this member (name, peer URLs, initial cluster, token) into staging, then that
//! release serves it privately while our reader compares every revision with the file's; then
//! version.txt, the journal (with the file's SHA-256) and the move of the member dir.

use std::time::Instant;

use crate::fsutil;
use crate::progress::{self, JournalEntry};
use crate::restore_snapshot::Pending;
use crate::staging::Stage;
use crate::storage::snapcheck::Trailer;
use crate::version::{Storage, VersionFile};

use super::minor_rollback::{prove, restore_staged, Source};
use super::{Ctx, StepError};

/// What a restore did, for the log and the journal.
#[derive(Debug)]
pub struct Restored {
    pub at: VersionFile,
    pub keys: u64,
    pub revisions: u64,
    pub restore_ms: u64,
    pub prove_ms: u64,
}

/// Restores the snapshot (already verified) with its release into the data dir.
pub async fn run(ctx: &Ctx<'_>, pending: &Pending) -> Result<Restored, StepError> {
    let (snapshot, facts, release) = (&*pending.path, &pending.facts, pending.release);
    let t0 = Instant::now();
    let work = ctx.work_dir();
    fsutil::create_dir_mode(&work, 0o700)?;
    fsutil::remove_tree(&ctx.layout.restored())?;
    fsutil::ensure_space(&work, 2 * facts.size)?;
    // Every revision of the file, as our reader digested it when it verified the file.
    let before = facts.digest;
    let stage = Stage::begin(ctx.layout)?;
    let source = Source {
        file: snapshot.to_path_buf(),
        copied_from_data_dir: facts.trailer == Trailer::Absent,
        // `decide` checked the trailer against the whole file before anything was touched.
        trailer_checked: facts.trailer == Trailer::Valid,
        saved: None,
        alone: true,
    };
    restore_staged(ctx, release, &source, &stage, facts.size).await?;
    let restore_ms = t0.elapsed().as_millis() as u64;
    fail::fail_point!("restore-snapshot-after-restore");
    let t = Instant::now();
    let (keys, proved) = prove(ctx, release, &stage.path, &before).await?;
    let prove_ms = t.elapsed().as_millis() as u64;
    let at = VersionFile {
        version: release,
        storage: Storage::Etcd3,
    };
    let done = Restored {
        at,
        keys,
        revisions: before.entries,
        restore_ms,
        prove_ms,
    };
    let mut detail = progress::Detail::new();
    detail.insert("snapshot".into(), snapshot.display().to_string().into());
    detail.insert("sha256".into(), facts.sha256.clone().into());
    if let Some(stamp) = &pending.stamp {
        detail.insert("snapshot_stamp".into(), stamp.clone().into());
    }
    detail.insert("snapshot_revision".into(), facts.revision.into());
    detail.insert("revisions_verified".into(), before.entries.into());
    detail.insert("restore_ms".into(), restore_ms.into());
    detail.insert("prove_ms".into(), prove_ms.into());
    proved.record(&mut detail);
    let entry = JournalEntry::restore_snapshot(at, t0.elapsed().as_millis() as u64, keys, detail);
    install(ctx, &stage, at, &entry)?;
    Ok(done)
}

/// Records the target and the restore, then moves the member dir in. A crash before the move
/// leaves a data dir without data, which the next run restores again; the journal then holds
/// two restore lines for one restore, never a restored member without its line.
fn install(
    ctx: &Ctx<'_>,
    stage: &Stage,
    at: VersionFile,
    entry: &JournalEntry,
) -> Result<(), StepError> {
    let data_dir = ctx.layout.data_dir();
    fsutil::create_dir_mode(data_dir, 0o700)?;
    progress::record(data_dir, at)?;
    progress::append_journal(data_dir, entry)?;
    fail::fail_point!("restore-snapshot-before-move");
    fsutil::rename_durable(&stage.member(), &ctx.layout.member())?;
    fsutil::remove_tree(&stage.path)?;
    Ok(())
}
