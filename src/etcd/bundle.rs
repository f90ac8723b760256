//! The multi-version bin dir: `etcd-<ver>`, `etcdctl-<ver>`, `etcdutl-<ver>`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::release::BundledVersions;
pub use crate::release::Tool;
use crate::version::EtcdVersion;

/// A binary the plan needs is missing or unusable.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("cannot read the bin dir {dir}: {source}; set ETCD_BIN_DIR (--bin-dir) to the directory holding etcd-<version>")]
    Unreadable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is needed for '{why}' but {problem}; add it to the bin dir or pick a target the bundle supports")]
    Missing {
        path: PathBuf,
        why: String,
        problem: &'static str,
    },
}

/// The bin dir and which releases it offers.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub versions: BundledVersions,
}

impl Bundle {
    /// Every `etcd-<X.Y.Z>` in `dir`, unless `explicit` names the versions.
    pub fn discover(dir: &Path, explicit: Option<&[EtcdVersion]>) -> Result<Bundle, BundleError> {
        if let Some(list) = explicit {
            return Ok(Bundle {
                dir: dir.to_path_buf(),
                versions: BundledVersions::new(list.iter().copied()),
            });
        }
        let entries = fs::read_dir(dir).map_err(|source| BundleError::Unreadable {
            dir: dir.to_path_buf(),
            source,
        })?;
        let versions = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("etcd-"))
                    .and_then(|v| v.parse().ok())
            })
            .collect::<Vec<EtcdVersion>>();
        Ok(Bundle {
            dir: dir.to_path_buf(),
            versions: BundledVersions::new(versions),
        })
    }

    /// Path of a tool of a release.
    pub fn path(&self, tool: Tool, v: EtcdVersion) -> PathBuf {
        self.dir.join(format!("{}-{v}", tool.prefix()))
    }

    /// Checks that every binary in `needs` (tool, release, why) exists and is executable, before
    /// anything is touched.
    pub fn preflight(
        &self,
        needs: impl IntoIterator<Item = (Tool, EtcdVersion, String)>,
    ) -> Result<(), BundleError> {
        for (tool, v, why) in needs {
            self.check(tool, v, &why)?;
        }
        Ok(())
    }

    fn check(&self, tool: Tool, v: EtcdVersion, why: &str) -> Result<(), BundleError> {
        let path = self.path(tool, v);
        let problem = match fs::metadata(&path) {
            Err(_) => "it does not exist",
            Ok(m) if !m.is_file() => "it is not a file",
            Ok(m) if m.permissions().mode() & 0o111 == 0 => "it is not executable",
            Ok(_) => return Ok(()),
        };
        Err(BundleError::Missing {
            path,
            why: why.to_string(),
            problem,
        })
    }

    /// The optional etcd-2.2.1 that proves a native rollback, when it is bundled.
    pub fn optional(&self, tool: Tool, v: EtcdVersion) -> Option<PathBuf> {
        self.check(tool, v, "").ok().map(|_| self.path(tool, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_versions_from_file_names_only() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "etcd-3.4.23",
            "etcd-3.5.1",
            "etcdctl-3.5.1",
            "etcd-v3.6.0",
            "etcd-3.5",
            "etcd",
            "etcd-3.5.1.bak",
        ] {
            fs::write(d.path().join(f), "").unwrap();
        }
        let b = Bundle::discover(d.path(), None).unwrap();
        assert_eq!(b.versions.to_string(), "3.4.23 3.5.1");
        let b = Bundle::discover(d.path(), Some(&["3.5.1".parse().unwrap()])).unwrap();
        assert_eq!(b.versions.to_string(), "3.5.1");
    }

    #[test]
    fn preflight_names_the_missing_or_unexecutable_binary() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("etcd-3.5.1"), "").unwrap();
        let b = Bundle::discover(d.path(), None).unwrap();
        let v351 = "3.5.1".parse().unwrap();
        let upgrade = || [(Tool::Etcd, v351, "upgrade".to_string())];
        let e = b.preflight(upgrade()).unwrap_err().to_string();
        assert!(
            e.contains("etcd-3.5.1") && e.contains("not executable"),
            "{e}"
        );
        fs::set_permissions(
            d.path().join("etcd-3.5.1"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        b.preflight(upgrade()).unwrap();
        let save = [(Tool::Etcdctl, v351, "snapshot save".to_string())];
        let e = b.preflight(save).unwrap_err().to_string();
        assert!(
            e.contains("etcdctl-3.5.1") && e.contains("does not exist"),
            "{e}"
        );
    }
}
