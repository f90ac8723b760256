//! Rollbacks: native 3.0.x/etcd3 -> 2.2.1/etcd2, and 3.N -> 3.N-1 by snapshot, with real etcd.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use etcd_migrate::storage::{raftpb, snap, v2store};
use serde_json::Value;

/// key -> (value, lease TTL) from a 3.0.17 fixture's keys.json.
fn fixture_values(name: &str) -> BTreeMap<String, (String, Option<i64>)> {
    fixture_keys(name)
        .into_iter()
        .map(|k| (k.key, (k.value.unwrap_or_default(), k.ttl)))
        .collect()
}

/// The JSON field names at every level (map keys of `Children` replaced by `*`).
fn shape(v: &Value, path: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let p = if path.ends_with("Children") {
                format!("{path}/*")
            } else {
                format!("{path}/{k}")
            };
            out.insert(p.clone());
            shape(child, &p, out);
        }
    } else if let Value::Array(a) = v {
        for x in a.iter().filter(|x| !x.is_null()).take(1) {
            shape(x, &format!("{path}[]"), out);
        }
    }
}

fn newest_snap_json(member: &Path) -> Value {
    let files = snap::list_snap_files(&member.join("snap")).unwrap();
    let f = snap::read_snap_file(&files[0].2).unwrap();
    serde_json::from_slice(&f.data.unwrap_or_default()).unwrap()
}

#[tokio::test]
async fn native_rollback_of_the_3017_fixtures_is_read_back_by_etcds_own_v2_reader() {
    for fixture in ["etcd-3.0.17-v3", "etcd-3.0.17-from-2.2.1"] {
        let t = tempfile::tempdir().unwrap();
        let data = untar_fixture(fixture, t.path());
        record_version(&data, "3.0.17/etcd3");
        let env = MigrateEnv::new(&data, "etcd-test", "2.2.1", "etcd2");
        env.run_ok(&["migrate"], fixture);
        assert_eq!(recorded_version(&data), "2.2.1/etcd2");
        assert!(
            !data.join("member/snap/db").exists(),
            "no v3 backend in a 2.2.1 dir"
        );
        let want = fixture_values(fixture);

        // The v2 snapshot: /0/version, TTLs on leased keys, the real 2.2.1 fields.
        let ours = newest_snap_json(&data.join("member"));
        let info = v2store::read_cluster_info(&serde_json::to_vec(&ours).unwrap()).unwrap();
        assert_eq!(info.version.as_deref(), Some("2.2.0"));
        assert_eq!(info.members.len(), 1);
        let nodes = v2store::read_all_nodes(&serde_json::to_vec(&ours).unwrap()).unwrap();
        let now = time::OffsetDateTime::now_utc();
        for (k, (v, ttl)) in &want {
            let n = nodes
                .iter()
                .find(|n| n.path == format!("/1{k}"))
                .unwrap_or_else(|| panic!("{k} not in the snapshot"));
            assert_eq!(&n.value, v, "{k}");
            match ttl {
                Some(ttl) => {
                    let exp = time::OffsetDateTime::parse(
                        &n.expire_time,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .unwrap();
                    let left = (exp - now).whole_seconds();
                    assert!(
                        left > ttl - 60 && left <= *ttl,
                        "{k}: expires in {left}s, lease TTL {ttl}"
                    );
                }
                None => assert!(n.expire_time.starts_with("0001-01-01"), "{k} is permanent"),
            }
        }
        let real_dir = t.path().join("real");
        fs::create_dir(&real_dir).unwrap();
        let real = newest_snap_json(&untar_fixture("etcd-2.2.1-v2-snap", &real_dir).join("member"));
        let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
        shape(&ours, "", &mut a);
        shape(&real, "", &mut b);
        // Everything but the watch history's entries: ours is empty, as a fresh 2.2.1 store's is.
        b.retain(|p| !p.contains("Events[]"));
        assert_eq!(
            a, b,
            "{fixture}: the snapshot JSON has the fields of a real 2.2.1 snapshot"
        );
        let events = ours["WatcherHub"]["EventHistory"]["Queue"]["Events"]
            .as_array()
            .unwrap();
        assert_eq!(
            events.len(),
            real["WatcherHub"]["EventHistory"]["Queue"]["Events"]
                .as_array()
                .unwrap()
                .len()
        );

        // The WAL: a 2.2.1 WAL's first records, then the snapshot marker and HardState 2.2.1 writes.
        let types = wal_record_types(&data.join("member/wal"));
        let real_types = wal_record_types(&real_dir.join("data/member/wal"));
        assert_eq!(types, WAL_221_RECORDS, "{fixture}");
        assert_eq!(
            real_types[..3],
            WAL_221_RECORDS[..3],
            "a real 2.2.1 WAL starts the same way"
        );
        assert!(
            real_types.contains(&raftpb::RECORD_SNAPSHOT)
                && real_types.contains(&raftpb::RECORD_STATE)
        );

        // etcd's own v2 reader: etcdctl-3.4.23 migrate, then etcd 3.4.23 serves every key.
        let check = t.path().join("check");
        cp_dir(&data, &check);
        fs::remove_file(check.join("version.txt")).unwrap();
        let st = std::process::Command::new(bundle().join("etcdctl-3.4.23"))
            .args(["migrate", "--data-dir"])
            .arg(&check)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", text(&st));
        let m = Member::start("3.4.23", &check, "etcd-test");
        let got = dump(&mut m.client().await).await;
        let got: BTreeMap<String, String> = got
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k).unwrap(),
                    String::from_utf8(v.value).unwrap(),
                )
            })
            .collect();
        let want_kv: BTreeMap<String, String> = want
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            got, want_kv,
            "{fixture}: every key and value, read back into v3 by etcd"
        );
        m.stop();
        // The old data is kept as a backup.
        assert_backup_kept(&env, "3.0.17/etcd3");
    }
}

#[test]
fn native_rollback_refuses_protobuf_values_untouched() {
    let t = tempfile::tempdir().unwrap();
    let data = untar_fixture("etcd-3.0.17-v3-protobuf", t.path());
    record_version(&data, "3.0.17/etcd3");
    let env = MigrateEnv::new(&data, "etcd-test", "2.2.1", "etcd2");
    assert_refused_untouched(
        "protobuf values",
        &data,
        || env.run(&["migrate"]),
        2,
        &["STORAGE_MEDIA_TYPE=application/json", "protobuf"],
    );
    assert!(!t.path().join("data.etcd-migrate/staging").exists());
}

/// A 3.5.1 data dir with `n` keys (every 10th on a lease), some updated and deleted.
async fn seeded_351(dir: &Path, n: usize) -> BTreeMap<Vec<u8>, Kv> {
    let m = Member::start("3.5.1", dir, "m1");
    let mut c = m.client().await;
    seed(&mut c, n, 10).await;
    for i in (0..n).step_by(97) {
        c.put(format!("/registry/pods/default/p{i:05}"), "updated", None)
            .await
            .unwrap();
    }
    for i in (1..n).step_by(101) {
        c.delete(format!("/registry/pods/default/p{i:05}"), None)
            .await
            .unwrap();
    }
    let before = dump(&mut c).await;
    m.stop();
    record_version(dir, "3.5.1/etcd3");
    before
}

#[tokio::test]
async fn minor_rollback_351_to_3423_keeps_keys_revisions_and_leases_and_goes_back() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let before = seeded_351(&data, 10_000).await;
    let env = MigrateEnv::new(&data, "m1", "3.4.23", "etcd3");
    let out = env.run_ok(&["migrate"], "rollback");
    assert!(text(&out).contains("rollback 3.5.1/etcd3 -> 3.4.23/etcd3"));
    assert_eq!(recorded_version(&data), "3.4.23/etcd3");
    let m = Member::start("3.4.23", &data, "m1");
    let mut c = m.client().await;
    assert_eq!(
        dump(&mut c).await,
        before,
        "keys, values, revisions and leases"
    );
    let leases: BTreeSet<i64> = before
        .values()
        .map(|kv| kv.lease)
        .filter(|l| *l != 0)
        .collect();
    for l in &leases {
        assert!(
            c.lease_time_to_live(*l, None).await.unwrap().ttl() > 0,
            "lease {l:x} survived the rollback"
        );
    }
    m.stop();

    let mut env = env;
    env.set("TARGET_VERSION", "3.5.1");
    env.run_ok(&["migrate"], "round trip");
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");
    let m = Member::start("3.5.1", &data, "m1");
    assert_eq!(
        dump(&mut m.client().await).await,
        before,
        "and back to 3.5.1"
    );
}

/// `run -- <flags>` until the member serves, then SIGTERM (the kubelet stopping the pod).
fn run_pod(env: &MigrateEnv, spec: &MemberSpec, log: &Path) {
    let err = log.with_extension("err");
    let mut child = env
        .run_command(&spec.flags())
        .stdout(fs::File::create(log).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    wait_until(
        format_args!("the pod to serve; log:\n{}", LogTail(&err, 20)),
        Duration::from_secs(90),
        || {
            assert_running(&mut child, &err);
            http_get(&spec.client_url(), "/health").filter(|b| b.contains("true"))
        },
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
}

#[tokio::test]
async fn manual_rollback_by_env_serves_every_key_on_3423() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let before = seeded_351(&data, 500).await;
    let mut env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let mut spec = MemberSpec::new("3.5.1", &data, "m1");
    spec.peer_port = env.peer_port;
    run_pod(&env, &spec, &t.path().join("pod1.log"));
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");
    // The operator edits TARGET_VERSION in the manifest; the kubelet restarts the pod.
    env.set("TARGET_VERSION", "3.4.23");
    let log = t.path().join("pod2.err");
    let mut child = env
        .run_command(&spec.flags())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let served = wait_until(
        format_args!("the pod to serve; log:\n{}", LogTail(&log, 20)),
        Duration::from_secs(90),
        || {
            assert_running(&mut child, &log);
            http_get(&spec.client_url(), "/version")
        },
    );
    assert!(served.contains("\"etcdserver\":\"3.4.23\""), "{served}");
    assert!(fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .ends_with("etcd-3.4.23"));
    let mut c = etcd_client::Client::connect([spec.client_url()], None)
        .await
        .unwrap();
    assert_eq!(dump(&mut c).await, before, "etcd-3.4.23 serves every key");
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    child.wait().unwrap();
    assert_eq!(recorded_version(&data), "3.4.23/etcd3");
}

/// The v2 store of a rolled-back dir: key -> value.
fn v2_keys(data: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let json = serde_json::to_vec(&newest_snap_json(&data.join("member"))).unwrap();
    v2store::read_all_nodes(&json)
        .unwrap()
        .into_iter()
        .filter(|n| !n.dir)
        .filter_map(|n| {
            n.path
                .strip_prefix("/1")
                .map(|k| (k.as_bytes().to_vec(), n.value.into_bytes()))
        })
        .collect()
}

#[tokio::test]
async fn native_rollback_of_a_backend_behind_its_wal_applies_the_wal_first_or_refuses() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (acked, in_backend) = killed_before_backend_commit(&data).await;
    assert!(
        in_backend < acked.len(),
        "the test needs a backend that lacks acknowledged writes: it holds {in_backend} of {} keys",
        acked.len()
    );

    // Without etcd-3.0.17 to replay the WAL: refused, exit 2, nothing changed.
    let env = MigrateEnv::new(&data, "m1", "2.2.1", "etcd2");
    assert_refused_untouched(
        "without etcd-3.0.17",
        &data,
        || env.run(&["migrate"]),
        2,
        &[
            "has applied the log up to index",
            "Put etcd-3.0.17 in",
            "nothing was changed",
        ],
    );
    assert_eq!(recorded_version(&data), "3.0.17/etcd3");

    // With it (here 3.4.23's binary, which wrote the data, under the 3.0.17 name): it applies
    // the WAL's writes, stops cleanly, and the rollback keeps every acknowledged key.
    let bin = t.path().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(bundle().join("etcd-3.4.23"), bin.join("etcd-3.0.17")).unwrap();
    let mut env = env;
    env.set("ETCD_BIN_DIR", bin.to_str().unwrap());
    let log = text(&env.run_ok(&["migrate"], "with etcd-3.0.17"));
    assert!(
        log.contains("starting etcd-3.0.17 once to apply them"),
        "{log}"
    );
    assert_eq!(recorded_version(&data), "2.2.1/etcd2");
    let want: BTreeMap<Vec<u8>, Vec<u8>> = acked.into_iter().map(|(k, v)| (k, v.value)).collect();
    assert_eq!(v2_keys(&data), want, "every acknowledged key and value");
}
