//! Today's etcd: every bundled release, including the newest 3.5 Debian ships, is stepped to and
//! from without its stop stalling on a client connection of ours.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// Every stop a step recorded in the journal: (release, stop_ms, close_ms).
fn recorded_stops(data: &Path) -> Vec<(String, u64, u64)> {
    journal(data)
        .iter()
        .filter(|e| e["event"] == "step")
        .flat_map(|e| e["detail"]["stops"].as_array().cloned().unwrap_or_default())
        .map(|s| {
            (
                s["etcd"].as_str().unwrap().to_string(),
                s["stop_ms"].as_u64().unwrap(),
                s["close_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// etcd 3.2.32 and 3.5.30 take 5-9 s to stop while a client connection is open; a clean one
/// takes milliseconds. Every bundled release is stopped at least once here: 3.5.x after an
/// upgrade step and after the save of a minor rollback, 3.4.23 after the rollback's proof.
#[tokio::test]
async fn every_bundled_release_stops_without_the_client_stall() {
    let t = tempfile::tempdir().unwrap();
    let seed_dir = t.path().join("seed");
    let (before, _) = seeded_member("3.4.23", &seed_dir, "m1", 50, 10).await;

    let mut stops: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in bundled_versions().iter().filter(|v| v.starts_with("3.5.")) {
        let data = t.path().join(format!("data-{v}"));
        cp_dir(&seed_dir, &data);
        for target in [v.as_str(), "3.4.23"] {
            MigrateEnv::new(&data, "m1", target, "etcd3").run_ok(&["migrate"], target);
        }
        let recorded = recorded_stops(&data);
        for (etcd, stop_ms, close_ms) in &recorded {
            assert!(
                *close_ms < 1000,
                "our clients of etcd-{etcd} took {close_ms} ms to close"
            );
            stops.entry(etcd.clone()).or_default().push(*stop_ms);
        }
        // The rollback restores the cleanly stopped backend itself: no start of the newer release.
        assert_eq!(
            recorded.len(),
            2,
            "upgrade and the rollback's proof: {recorded:?}"
        );
        let m = Member::start("3.4.23", &data, "m1");
        assert_eq!(dump(&mut m.client().await).await, before, "{v} and back");
        m.stop();
    }
    for v in bundled_versions() {
        let ms = stops
            .get(&v)
            .unwrap_or_else(|| panic!("etcd-{v} was never stopped: {stops:?}"));
        assert!(
            ms.iter().all(|&m| m < 1000),
            "etcd-{v} took {ms:?} ms to stop: the stall of an open client connection"
        );
    }
}

/// A bin dir holding the real releases `real` (linked from the bundle) and stand-ins for the
/// releases `fake`, which only print their version: no binary newer than 3.5 can be had here,
/// and `plan` only reads the bundle's names.
fn bin_dir_with(dir: &Path, real: &[&str], fake: &[&str]) {
    fs::create_dir_all(dir).unwrap();
    for v in real {
        for tool in ["etcd", "etcdctl", "etcdutl"] {
            let src = bundle().join(format!("{tool}-{v}"));
            if src.exists() {
                std::os::unix::fs::symlink(&src, dir.join(format!("{tool}-{v}"))).unwrap();
            }
        }
    }
    for v in fake {
        for tool in ["etcd", "etcdctl", "etcdutl"] {
            let p = dir.join(format!("{tool}-{v}"));
            fs::write(&p, format!("#!/bin/sh\necho \"{tool} Version: {v}\"\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

/// A cleanly stopped single member `m1` at `version` with a few keys, recorded as such, in
/// `<tempdir>/data`.
async fn member_at(version: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    seeded_member(version, &data, "m1", 20, 0).await;
    (t, data)
}

fn plan_steps(env: &MigrateEnv) -> Result<Vec<String>, String> {
    let out = env.run(&["plan", "--output", "json"]);
    if !out.status.success() {
        return Err(format!("exit {:?}: {}", out.status.code(), text(&out)));
    }
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(field_of_each(&plan["steps"], "outcome"))
}

#[tokio::test]
async fn plan_to_36_passes_the_newest_35_and_is_refused_without_one() {
    let new = newest_35();
    let (t, data) = member_at("3.5.1").await;
    let with = t.path().join("with");
    bin_dir_with(
        &with,
        &["3.4.23", "3.5.1", &new],
        &["3.6.0", "3.6.14", "3.7.0"],
    );
    let mut env = MigrateEnv::new(&data, "m1", "3.6.0", "etcd3");
    env.set("ETCD_BIN_DIR", with.to_str().unwrap());
    assert_eq!(
        plan_steps(&env).unwrap(),
        [format!("{new}/etcd3"), "3.6.0/etcd3".to_string()]
    );
    // To 3.7: 3.6 at its newest bundled patch, past the 3.6.11 that 3.7 needs.
    env.set("TARGET_VERSION", "3.7.0");
    assert_eq!(
        plan_steps(&env).unwrap(),
        [
            format!("{new}/etcd3"),
            "3.6.14/etcd3".into(),
            "3.7.0/etcd3".into()
        ]
    );

    let without = t.path().join("without");
    bin_dir_with(&without, &["3.4.23", "3.5.1"], &["3.6.0"]);
    let mut env = MigrateEnv::new(&data, "m1", "3.6.0", "etcd3");
    env.set("ETCD_BIN_DIR", without.to_str().unwrap());
    let plan_then_migrate = || {
        let err = plan_steps(&env).unwrap_err();
        assert!(
            err.starts_with("exit Some(2)") && err.contains("3.5.20"),
            "{err}"
        );
        env.run(&["migrate"])
    };
    assert_refused_untouched("to 3.6 without 3.5.20", &data, plan_then_migrate, 2, &[]);
}

#[tokio::test]
async fn flags_a_release_lacks_and_unknown_releases_are_refused_untouched() {
    let new = newest_35();
    let (t, data) = member_at(&new).await;
    let bin = t.path().join("bin");
    bin_dir_with(&bin, &[&new], &["3.6.0", "3.8.0"]);
    let env = |target: &str| {
        let mut e = MigrateEnv::new(&data, "m1", target, "etcd3");
        e.set("ETCD_BIN_DIR", bin.to_str().unwrap());
        e
    };

    // ETCD_CREDS with a flag 3.6 removed: refused before the 3.6 step starts.
    let mut e = env("3.6.0");
    e.set("ETCD_CREDS", "--enable-v2=true --peer-client-cert-auth");
    assert_refused_untouched(
        "a removed flag in ETCD_CREDS",
        &data,
        || e.run(&["migrate"]),
        2,
        &["etcd 3.6.0 does not accept --enable-v2", "ETCD_CREDS"],
    );
    // The same flag among the pod's own flags of `run`.
    assert_refused_untouched(
        "a removed flag after `run --`",
        &data,
        || env("3.6.0").run(&["run", "--", "--name", "m1", "--enable-v2=true"]),
        2,
        &["the etcd flags after `run --`"],
    );
    // A release past the known table.
    assert_refused_untouched(
        "a release past the known table",
        &data,
        || env("3.8.0").run(&["migrate"]),
        2,
        &["newer than any release etcd-migrate knows"],
    );
}

#[tokio::test]
async fn rollback_from_36_is_refused_with_etcds_downgrade_path() {
    let new = newest_35();
    let (t, data) = member_at(&new).await;
    // What a 3.6 member's data dir would record (no 3.6 binary can write one here).
    record_version(&data, "3.6.0/etcd3");
    let bin = t.path().join("bin");
    bin_dir_with(&bin, &[&new], &["3.6.0"]);
    let mut e = MigrateEnv::new(&data, "m1", &new, "etcd3");
    e.set("ETCD_BIN_DIR", bin.to_str().unwrap());
    assert_refused_untouched(
        "rollback from 3.6",
        &data,
        || e.run(&["migrate"]),
        2,
        &["etcdctl downgrade validate 3.5", "Rolling back from 3.6"],
    );
}

/// After a kill the backend lacks the writes only the WAL holds: the minor rollback starts the
/// newer release to apply them and saves a snapshot from it (and its stop does not stall).
#[tokio::test]
async fn minor_rollback_after_a_kill_saves_from_the_release_that_applies_the_wal() {
    let new = newest_35();
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (acked, in_backend) = killed_at(&new, &data).await;
    assert!(
        in_backend < acked.len(),
        "the kill left every write in the backend"
    );
    MigrateEnv::new(&data, "m1", "3.4.23", "etcd3").run_ok(&["migrate"], "rollback");
    let step = journal(&data)
        .into_iter()
        .rfind(|e| e["event"] == "step")
        .unwrap();
    assert_eq!(
        step["detail"]["restored_from"],
        "a snapshot saved by the newer release"
    );
    let stops = recorded_stops(&data);
    assert!(
        stops.iter().any(|(v, ms, _)| *v == new && *ms < 1000),
        "{stops:?}"
    );
    let m = Member::start("3.4.23", &data, "m1");
    let got = dump(&mut m.client().await).await;
    m.stop();
    assert_eq!(got.len(), acked.len());
    for (k, kv) in &acked {
        assert_eq!(got.get(k).map(|g| &g.value), Some(&kv.value));
    }
}

/// `make bundle` with Debian suites that carry no etcd 3.5: a clear error naming the suites and
/// a non-zero exit, and the bundle left as it was.
#[test]
fn bundle_refuses_suites_without_etcd_35_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("bundle");
    fs::create_dir_all(&out).unwrap();
    for e in fs::read_dir(bundle()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy().starts_with("etcd") {
            std::os::unix::fs::symlink(e.path(), out.join(&name)).unwrap();
        }
    }
    fs::copy(
        bundle().join(".debian-etcd-3.5"),
        out.join(".debian-etcd-3.5"),
    )
    .unwrap();
    let before = tree_listing(&out);
    let run = std::process::Command::new(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bundle.sh"),
    )
    .arg(&out)
    .env("BUNDLE_REFRESH", "1")
    .env("DEBIAN_ETCD_SUITES", "bookworm")
    .output()
    .unwrap();
    let log = text(&run);
    assert!(!run.status.success(), "{log}");
    assert!(
        log.contains("no etcd-server 3.5.x in Debian bookworm")
            && log.contains("DEBIAN_ETCD_SUITES"),
        "{log}"
    );
    assert_eq!(tree_listing(&out), before, "the bundle changed");
}

/// Names and link targets of a directory's entries, sorted.
fn tree_listing(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let target = fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| fs::read_to_string(e.path()).unwrap_or_default());
            (e.file_name().to_string_lossy().into_owned(), target)
        })
        .collect();
    v.sort();
    v
}
