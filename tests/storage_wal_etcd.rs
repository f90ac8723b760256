//! Tests with the real etcd 3.4.23 / 3.5.1 binaries: WALs they write, and
//! the end-to-end rollback check through `etcdctl migrate`.
//!
//! Each etcd is a `common::Member` on free 127.0.0.1 ports, killed and reaped on drop.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use etcd_migrate::storage::v2member::{write_v2_member, V2MemberParams};
use etcd_migrate::storage::v2store::{V2Key, V2MemberInfo};
use etcd_migrate::storage::walinfo::summarize;

use common::{
    as_v2_keys, bundle, cluster_specs, fixture_keys, unpack, wait_until, wal_record_types, Lazy,
    Member, MemberSpec, WAL_221_RECORDS,
};

/// SIGKILL and reap (the harness's drop): the data dir as a crash leaves it.
fn kill(m: Member) {
    drop(m);
}

fn log_text(m: &Member) -> String {
    std::fs::read_to_string(&m.log).unwrap_or_default()
}

/// Runs `ETCDCTL_API=3 etcdctl-<version of m> --endpoints <m> args...`.
fn ctl(m: &Member, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bundle().join(format!("etcdctl-{}", m.version)))
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(&m.client_url)
        .arg("--command-timeout=3s")
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Waits until a linearizable v3 read through etcdctl succeeds.
fn wait_ready(m: &Member) {
    let last = std::cell::RefCell::new(String::new());
    wait_until(
        format_args!(
            "a linearizable read through etcdctl ({}); log:\n{}",
            Lazy(|| last.borrow().clone()),
            Lazy(|| log_text(m))
        ),
        Duration::from_secs(30),
        || {
            ctl(m, &["get", "/readiness-probe"])
                .map_err(|e| *last.borrow_mut() = e)
                .ok()
        },
    );
}

/// Starts a member from `spec`, waits for /health and a linearizable read.
fn start(spec: MemberSpec) -> Member {
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    wait_ready(&m);
    m
}

fn put(m: &Member, k: &str, v: &str) {
    ctl(m, &["put", k, v]).unwrap();
}

/// All v3 keys and values (`get "" --from-key` in JSON, base64 decoded).
fn get_all(m: &Member) -> BTreeMap<String, String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    let out = ctl(m, &["get", "", "--from-key", "-w", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut all = BTreeMap::new();
    for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
        let k = b64(kv["key"].as_str().unwrap());
        let val = b64(kv["value"].as_str().unwrap_or(""));
        all.insert(
            String::from_utf8(k).unwrap(),
            String::from_utf8(val).unwrap(),
        );
    }
    all
}

/// Runs `ETCDCTL_API=3 etcdctl-3.4.23 migrate --data-dir dir`.
fn migrate(data_dir: &Path) -> String {
    let out = Command::new(bundle().join("etcdctl-3.4.23"))
        .env("ETCDCTL_API", "3")
        .arg("migrate")
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "migrate failed: {text}");
    text
}

/// Creates a data dir with a fresh single-member etcd of `version` named `etcd-test`, runs
/// `f`, kills it.
fn with_fresh_etcd(version: &str, f: impl FnOnce(&Member)) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let m = start(MemberSpec::new(version, &data, "etcd-test"));
    f(&m);
    kill(m);
    (t, data)
}

/// The WAL summary of a fresh `etcd-test` member of `version` after five puts, checked for
/// what every fresh single member has.
fn fresh_member_summary(version: &str) -> etcd_migrate::storage::walinfo::MemberSummary {
    let (_t, data) = with_fresh_etcd(version, |e| {
        for i in 0..5 {
            put(e, &format!("/k{i}"), "v");
        }
    });
    let s = summarize(&data.join("member")).unwrap();
    assert_ne!(s.node_id, 0);
    assert_ne!(s.cluster_id, 0);
    assert_eq!(s.member_count, 1);
    assert!(s.entry_count >= 8, "{}", s.entry_count);
    assert_eq!(s.member_info[0].name, "etcd-test");
    assert_eq!(
        summarize(&data.join("member")).unwrap(),
        s,
        "summarize is repeatable"
    );
    s
}

#[test]
fn fresh_3_4_23_member() {
    let s = fresh_member_summary("3.4.23");
    assert!(s.snapshot.is_none());
    assert_eq!(s.boot_cluster_version.as_deref(), Some("3.4.0"));
}

#[test]
fn fresh_3_5_1_member() {
    let s = fresh_member_summary("3.5.1");
    assert_eq!(s.boot_cluster_version.as_deref(), Some("3.5.0"));
    assert_eq!(s.member_info[0].client_urls.len(), 1);
}

/// The 2.2.1 fixture after `etcdctl-3.4.23 migrate` and a 3.4.23 run.
fn migrated_2_2_1(extra: &[&str], writes: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let (t, data) = unpack("etcd-2.2.1-v2");
    migrate(&data);
    let mut spec = MemberSpec::new("3.4.23", &data, "etcd-test");
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    let e = start(spec);
    for i in 0..writes {
        put(&e, &format!("/extra/{i}"), "x");
    }
    let all = get_all(&e);
    assert!(all.contains_key("/registry/pods/default/pod-0"), "{all:?}");
    kill(e);
    (t, data)
}

#[test]
fn migrated_2_2_1_still_boots_at_2_2() {
    let (_t, data) = migrated_2_2_1(&[], 3);
    let s = summarize(&data.join("member")).unwrap();
    assert!(s.snapshot.is_none());
    assert_eq!(s.member_count, 1);
    assert_eq!(s.boot_cluster_version.as_deref(), Some("2.2.0"));
}

#[test]
fn migrated_2_2_1_with_new_snapshot_boots_at_3_4() {
    let (_t, data) = migrated_2_2_1(&["--snapshot-count=5"], 9);
    let s = summarize(&data.join("member")).unwrap();
    let snap = s.snapshot.clone().expect("3.4 took a snapshot");
    assert!(snap.index > 70);
    assert!(snap.in_wal);
    assert_eq!(snap.store_version.as_deref(), Some("3.4.0"));
    assert_eq!(s.boot_cluster_version.as_deref(), Some("3.4.0"));
    assert_eq!(s.member_count, 1);
}

#[test]
fn three_member_3_4_23_cluster() {
    let t = tempfile::tempdir().unwrap();
    let specs = cluster_specs(t.path(), "3.4.23", &["m1", "m2", "m3"], "http");
    let dirs: Vec<_> = specs.iter().map(|s| s.data_dir.clone()).collect();
    // All three are spawned before any waits: the cluster needs a quorum to serve.
    let members: Vec<Member> = specs.into_iter().map(Member::spawn).collect();
    for m in &members {
        m.wait_healthy(Duration::from_secs(30));
        wait_ready(m);
    }
    put(&members[0], "/three", "yes");
    for m in members {
        kill(m);
    }
    let mut ids = Vec::new();
    for d in &dirs {
        let s = summarize(&d.join("member")).unwrap();
        assert_eq!(s.member_count, 3, "{}", d.display());
        assert_eq!(
            s.member_info.iter().filter(|m| !m.name.is_empty()).count(),
            3
        );
        assert_eq!(s.boot_cluster_version.as_deref(), Some("3.4.0"));
        ids.push((s.node_id, s.cluster_id, s.members.clone()));
    }
    assert_eq!(ids[0].2, ids[1].2);
    assert_eq!(ids[0].1, ids[2].1);
    let mut own: Vec<u64> = ids.iter().map(|x| x.0).collect();
    own.sort_unstable();
    assert_eq!(own, ids[0].2);
}

/// Writes a 2.2.1 member from a fixture's keys, migrates it with
/// etcdctl-3.4.23 and checks every key in a running etcd 3.4.23.
fn rollback_round_trip(keys_fixture: &str, identity_fixture: &str) {
    let (_ft, fdata) = unpack(identity_fixture);
    let src = summarize(&fdata.join("member")).unwrap();
    assert_eq!(src.member_count, 1);
    let name = src.member_info[0].name.clone();
    assert_eq!(name, "etcd-test");

    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let fkeys = fixture_keys(keys_fixture);
    let keys = as_v2_keys(&fkeys, SystemTime::now());
    // The member's ports are fixed now: its peer and client URLs go into the membership.
    let spec = MemberSpec::new("3.4.23", &data, &name);
    let (cport, pport) = (spec.client_port, spec.peer_port);
    let members = vec![V2MemberInfo {
        id: src.node_id,
        name: name.clone(),
        peer_urls: vec![format!("http://127.0.0.1:{pport}")],
        client_urls: vec![format!("http://127.0.0.1:{cport}")],
    }];
    let term = src
        .hard_state
        .map(|h| h.term)
        .unwrap_or(src.last_term)
        .max(1);
    let params = V2MemberParams::new(src.node_id, src.cluster_id, members, term, src.last_index);
    let w = write_v2_member(
        &data.join("member"),
        &params,
        keys.iter().cloned().map(Ok::<V2Key, Infallible>),
    )
    .unwrap();
    assert_eq!(
        w.store.keys as usize,
        fkeys.iter().filter(|k| !k.dir).count()
    );

    // The WAL we wrote has the record sequence of a 2.2.1 member restored
    // from a snapshot.
    assert_eq!(wal_record_types(&data.join("member/wal")), WAL_221_RECORDS);

    let out = migrate(&data);
    assert!(out.contains("finished transforming keys"), "{out}");

    let e = start(spec);
    let got = get_all(&e);
    let want: BTreeMap<String, String> = fkeys
        .iter()
        .filter(|k| !k.dir)
        .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(got, want);
    // The restored member accepts writes, and its identity is the source's.
    put(&e, "/after-rollback", "ok");
    let status = ctl(&e, &["endpoint", "status", "-w", "json"]).unwrap();
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        st[0]["Status"]["header"]["member_id"].as_u64(),
        Some(src.node_id)
    );
    assert_eq!(
        st[0]["Status"]["header"]["cluster_id"].as_u64(),
        Some(src.cluster_id)
    );
    let rev = st[0]["Status"]["header"]["revision"].as_u64().unwrap();
    assert!(rev > w.store.max_modified_index, "{rev}");
    let log = log_text(&e);
    assert!(!log.contains("panic"), "{log}");
    // etcd 3.4 itself recovered its v2 store from our snapshot JSON.
    assert!(
        log.contains(&format!(
            "recovered store from snapshot at index {}",
            w.index
        )) || log.contains("recovered v2 store from snapshot"),
        "{log}"
    );
    if std::env::var_os("SHOW_ETCD_LOG").is_some() {
        eprintln!("{log}");
    }
    check_no_leftovers(&data);
}

fn check_no_leftovers(data: &Path) {
    let snaps: Vec<_> = std::fs::read_dir(data.join("member/snap"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!snaps.iter().any(|n| n.ends_with(".tmp")), "{snaps:?}");
}

#[test]
fn rollback_of_3_0_17_keys_migrates_and_runs() {
    rollback_round_trip("etcd-3.0.17-v3", "etcd-3.0.17-v3");
}

#[test]
fn rollback_of_3_0_17_from_2_2_1_keys_migrates_and_runs() {
    rollback_round_trip("etcd-3.0.17-from-2.2.1", "etcd-3.0.17-from-2.2.1");
}

#[test]
fn rollback_of_2_2_1_keys_with_dir_and_ttls_migrates_and_runs() {
    rollback_round_trip("etcd-2.2.1-v2-snap", "etcd-3.0.17-v3");
}
