//! Staged rewrites: a new data dir is built in the work area, then one atomic exchange makes it
//! live (with its version.txt), and the old dir becomes a backup. A crash at any instant leaves
//! the old state or the new one; `recover` finishes or discards what a crash left.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backup;
use crate::fsutil::{self, FsError};
use crate::layout::{Layout, JOURNAL_FILE, VERSION_FILE};
use crate::progress::{self, ProgressError};
use crate::version::VersionFile;

#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    id: String,
    backup: PathBuf,
}

/// A data dir being built beside the live one.
pub struct Stage {
    layout: Layout,
    pub path: PathBuf,
    id: String,
}

impl Stage {
    /// An empty staging dir (0700), with the data dir's own files (version.txt, journal) copied in.
    pub fn begin(layout: &Layout) -> Result<Stage, FsError> {
        let path = layout.staging();
        fsutil::remove_tree(&path)?;
        fsutil::create_dir_mode(&path, 0o700)?;
        for name in [VERSION_FILE, JOURNAL_FILE] {
            let src = layout.data_dir().join(name);
            if src.is_file() {
                fsutil::copy_tree(&src, &path.join(name))?;
            }
        }
        let id = format!("{}-{}", std::process::id(), progress::now_rfc3339());
        Ok(Stage {
            layout: layout.clone(),
            path,
            id,
        })
    }

    /// The staged dir's paths.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.path)
    }

    /// Where the staged member dir goes.
    pub fn member(&self) -> PathBuf {
        self.layout().member()
    }

    /// Makes the staged dir live, recording `outcome` in it; the old data dir becomes a backup of
    /// `before`. Returns the backup's path.
    pub fn commit(
        self,
        outcome: VersionFile,
        before: VersionFile,
    ) -> Result<PathBuf, ProgressError> {
        progress::record(&self.path, outcome)?;
        fsutil::write_durable(&self.layout().stage_marker(), self.id.as_bytes(), 0o600)?;
        fsutil::fsync_dir(&self.path)?;
        let backup = backup::backup_path(&self.layout, before);
        let intent = Intent {
            id: self.id.clone(),
            backup: backup.clone(),
        };
        let intent_path = self.layout.swap_intent();
        fsutil::write_durable(
            &intent_path,
            &progress::encode(&intent, &intent_path)?,
            0o600,
        )?;
        fail::fail_point!("swap-before-exchange", |_| Err(fsutil::injected(
            &self.path
        )
        .into()));
        fsutil::exchange(self.layout.data_dir(), &self.path)?;
        fail::fail_point!("swap-after-exchange", |_| Err(
            fsutil::injected(&self.path).into()
        ));
        finish(&self.layout, &intent)?;
        Ok(backup)
    }
}

/// After the exchange: the staging path holds the old data; make it the backup and clean up.
fn finish(layout: &Layout, intent: &Intent) -> Result<(), FsError> {
    let staging = layout.staging();
    fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(FsError::io("chmod", &staging))?;
    fsutil::rename_durable(&staging, &intent.backup)?;
    fail::fail_point!("swap-after-backup-rename", |_| Err(fsutil::injected(
        layout.data_dir()
    )));
    fsutil::remove_tree(&layout.stage_marker())?;
    fsutil::fsync_dir(layout.data_dir())?;
    fsutil::remove_tree(&layout.swap_intent())?;
    tracing::info!(backup = %intent.backup.display(), "previous data kept as a backup");
    Ok(())
}

/// Finishes or discards a staged rewrite a crash interrupted. Returns what it did.
pub fn recover(layout: &Layout) -> Result<Option<String>, FsError> {
    let work = layout.work_dir();
    let intent_path = layout.swap_intent();
    let staging = layout.staging();
    let intent: Option<Intent> = fs::read(&intent_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let live_marker = fs::read_to_string(layout.stage_marker()).ok();
    let done = match intent {
        Some(i) if live_marker.as_deref() == Some(i.id.as_str()) => {
            // The exchange happened: the new data is live and recorded; finish the cleanup.
            if staging.exists() {
                finish(layout, &i)?;
            } else {
                fsutil::remove_tree(&layout.stage_marker())?;
                fsutil::remove_tree(&intent_path)?;
            }
            Some(format!(
                "completed an interrupted swap; previous data at {}",
                i.backup.display()
            ))
        }
        _ => {
            let had = staging.exists();
            fsutil::remove_tree(&staging)?;
            fsutil::remove_tree(&intent_path)?;
            if live_marker.is_some() {
                fsutil::remove_tree(&layout.stage_marker())?;
            }
            had.then(|| {
                "discarded a staged rewrite that an interrupted run left unfinished".to_string()
            })
        }
    };
    backup::remove_partials(layout)?;
    // Everything else in the work area belongs to one run (captures, snapshots, restores).
    let mut leftovers = fsutil::remove_stale_temps(layout.data_dir())?;
    if let Ok(rd) = fs::read_dir(&work) {
        for e in rd
            .filter_map(|e| e.ok())
            .filter(|e| !Layout::survives_recovery(&e.file_name()))
        {
            fsutil::remove_tree(&e.path())?;
            leftovers += 1;
        }
    }
    if leftovers > 0 {
        tracing::info!(count = leftovers, "removed files an interrupted run left");
    }
    if let Some(what) = &done {
        tracing::warn!(data_dir = %layout.data_dir().display(), "{what}");
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn data(d: &Path) -> PathBuf {
        let data = d.join("data");
        fs::create_dir_all(data.join("member/snap")).unwrap();
        fs::write(data.join("member/snap/db"), "old").unwrap();
        progress::record(&data, "3.0.17/etcd3".parse().unwrap()).unwrap();
        data
    }

    #[test]
    fn commit_makes_the_stage_live_and_keeps_the_old_as_backup() {
        let d = tempfile::tempdir().unwrap();
        let data = data(d.path());
        let layout = Layout::new(&data);
        let stage = Stage::begin(&layout).unwrap();
        fs::create_dir_all(stage.member().join("wal")).unwrap();
        fs::write(stage.member().join("wal/0.wal"), "new").unwrap();
        let backup = stage
            .commit(
                "2.2.1/etcd2".parse().unwrap(),
                "3.0.17/etcd3".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(
            progress::read_version(&data).unwrap().unwrap().to_string(),
            "2.2.1/etcd2"
        );
        assert_eq!(
            fs::read_to_string(data.join("member/wal/0.wal")).unwrap(),
            "new"
        );
        assert!(!layout.stage_marker().exists());
        assert_eq!(
            fs::read_to_string(backup.join("member/snap/db")).unwrap(),
            "old"
        );
        assert_eq!(
            progress::read_version(&backup)
                .unwrap()
                .unwrap()
                .to_string(),
            "3.0.17/etcd3"
        );
        assert_eq!(recover(&layout).unwrap(), None, "nothing left to recover");
    }

    #[test]
    fn recover_discards_a_stage_that_was_never_swapped() {
        let d = tempfile::tempdir().unwrap();
        let data = data(d.path());
        let layout = Layout::new(&data);
        let stage = Stage::begin(&layout).unwrap();
        fs::create_dir_all(stage.member()).unwrap();
        drop(stage);
        assert!(recover(&layout).unwrap().is_some());
        assert!(!layout.staging().exists());
        assert_eq!(
            progress::read_version(&data).unwrap().unwrap().to_string(),
            "3.0.17/etcd3"
        );
    }

    #[test]
    fn recover_finishes_a_swap_interrupted_after_the_exchange() {
        let d = tempfile::tempdir().unwrap();
        let data = data(d.path());
        let layout = Layout::new(&data);
        let stage = Stage::begin(&layout).unwrap();
        fs::create_dir_all(stage.member()).unwrap();
        // Do what commit does, up to and including the exchange.
        progress::record(&stage.path, "2.2.1/etcd2".parse().unwrap()).unwrap();
        fs::write(stage.layout().stage_marker(), &stage.id).unwrap();
        let backup = d.path().join("data.backup-x");
        let intent = Intent {
            id: stage.id.clone(),
            backup: backup.clone(),
        };
        fs::write(layout.swap_intent(), serde_json::to_vec(&intent).unwrap()).unwrap();
        fsutil::exchange(&data, &stage.path).unwrap();
        assert!(recover(&layout).unwrap().unwrap().contains("completed"));
        assert_eq!(
            progress::read_version(&data).unwrap().unwrap().to_string(),
            "2.2.1/etcd2"
        );
        assert_eq!(
            fs::read_to_string(backup.join("member/snap/db")).unwrap(),
            "old"
        );
        assert!(!layout.stage_marker().exists() && !layout.staging().exists());
    }
}
