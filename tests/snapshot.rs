//! Disaster recovery with real etcd: `etcd-migrate snapshot` of running members (plain and with
//! client TLS, under writes, after deletes and a compaction), retention, the sidecar loop, crashes
//! mid-snapshot; RESTORE_SNAPSHOT restoring a data dir once, refusing to restore over data, and
//! converging after crashes; and the drill: a three-member cluster lost whole, brought back from
//! the newest snapshot.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use etcd_client::{Client, GetOptions};

/// `etcd-migrate snapshot` with only the snapshot env (and `extra`), as a sidecar runs it.
fn snapshot_cmd(endpoint: &str, out: &Path, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-migrate"));
    cmd.arg("snapshot")
        .env_clear()
        .env("SNAPSHOT_ENDPOINT", endpoint)
        .env("SNAPSHOT_DIR", out)
        .envs(extra.iter().copied())
        .stdin(Stdio::null());
    cmd
}

fn snapshot(endpoint: &str, out: &Path, extra: &[(&str, &str)]) -> Output {
    snapshot_cmd(endpoint, out, extra).output().unwrap()
}

/// Takes a snapshot that must succeed; its path (printed on stdout).
fn snapshot_ok(endpoint: &str, out: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let o = snapshot(endpoint, out, extra);
    assert!(o.status.success(), "snapshot: {}", text(&o));
    let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(path.is_file(), "{}: {}", path.display(), text(&o));
    path
}

/// The `.db` files in `dir`, sorted.
fn dbs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every key live at `rev`, as the member serves it.
async fn dump_at(c: &mut Client, rev: i64) -> BTreeMap<Vec<u8>, Kv> {
    let opts = GetOptions::new().with_range(vec![0u8]).with_revision(rev);
    let r = c.get(vec![0u8], Some(opts)).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), Kv::of(kv)))
        .collect()
}

/// A temp dir with a 3.4.23 member m1 in it holding `n` keys (`seed`), and a client of it.
async fn seeded_34(n: usize, lease_every: usize) -> (tempfile::TempDir, Member, Client) {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    let mut c = m.client().await;
    seed(&mut c, n, lease_every).await;
    (t, m, c)
}

/// Puts, overwrites, deletes, leases and a compaction: every kind of entry HashKV covers.
async fn history(c: &mut Client) {
    seed(c, 300, 7).await;
    for i in (0..300).step_by(3) {
        c.put(format!("/registry/pods/default/p{i:05}"), "v2", None)
            .await
            .unwrap();
    }
    for i in (0..300).step_by(5) {
        c.delete(format!("/registry/pods/default/p{i:05}"), None)
            .await
            .unwrap();
    }
    let rev = c
        .put("/registry/marker", "m", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev - 50, None).await.unwrap();
    for i in 0..20 {
        c.put(format!("/registry/events/e{i}"), "after compaction", None)
            .await
            .unwrap();
    }
}

/// `etcdctl snapshot status` of a file: (revision, total keys) as etcd's own tool reads it.
fn etcdctl_status(file: &Path) -> (i64, u64) {
    let o = Command::new(bundle().join("etcdctl-3.4.23"))
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(file)
        .output()
        .unwrap();
    assert!(o.status.success(), "etcdctl snapshot status: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        v["revision"].as_i64().unwrap(),
        v["totalKey"].as_u64().unwrap(),
    )
}

/// A field of the "snapshot verified" log line.
fn logged(o: &Output, field: &str) -> Option<String> {
    let log = text(o);
    let line = log.lines().find(|l| l.contains("snapshot verified"))?;
    let at = line.find(&format!(" {field}="))? + field.len() + 2;
    Some(line[at..].split(' ').next()?.trim_matches('"').to_string())
}

#[tokio::test]
async fn a_snapshot_under_writes_matches_the_member_and_restores_by_env_once() {
    for version in ["3.4.23".to_string(), newest_35()] {
        let t = tempfile::tempdir().unwrap();
        let m = Member::start(&version, &t.path().join("m"), "m1");
        let mut c = m.client().await;
        history(&mut c).await;
        // A writer runs through the snapshot: the file holds one revision, whatever came after.
        let writer = {
            let mut c = c.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    if c.put(format!("/registry/leases/w{i}"), "x", None)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };
        let out = t.path().join("snaps");
        let o = snapshot(&m.client_url, &out, &[]);
        writer.abort();
        assert!(o.status.success(), "{version}: {}", text(&o));
        let file = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let rev = snapshot_revision(&file);
        assert!(file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("m1-"));
        // etcd's own tool reads the same revision and key count (every bucket's) from the file.
        let (srev, total) = etcdctl_status(&file);
        assert_eq!(srev, rev, "{version}");
        let entries: u64 = logged(&o, "entries").unwrap().parse().unwrap();
        let others: u64 = logged(&o, "other_keys").unwrap().parse().unwrap();
        assert_eq!(entries + others, total, "{version}: {}", text(&o));
        let want = dump_at(&mut c, rev).await;
        assert_eq!(
            logged(&o, "keys"),
            Some(want.len().to_string()),
            "{version}"
        );
        drop(c);
        m.stop();

        // Restore by env onto an empty data dir, as the pod would after losing its disk.
        let data = t.path().join("restored");
        let mut env = MigrateEnv::new(&data, "m1", &version, "etcd3");
        env.set("RESTORE_SNAPSHOT", &file.to_string_lossy());
        let o = env.run_ok(&["migrate"], "restore");
        assert!(text(&o).contains("restored the snapshot"), "{}", text(&o));
        assert_eq!(recorded_version(&data), format!("{version}/etcd3"));
        let j = journal(&data);
        let last = j.last().unwrap();
        assert_eq!(last["event"], "restore-snapshot");
        let sha = last["detail"]["sha256"].as_str().unwrap().to_string();
        let r = Member::start(&version, &data, "m1");
        let mut rc = r.client().await;
        assert_eq!(
            dump(&mut rc).await,
            want,
            "{version}: every key the snapshot holds, as it was"
        );
        rc.put("/registry/after-restore", "kept", None)
            .await
            .unwrap();
        let members = rc.member_list().await.unwrap();
        assert_eq!(
            members.members().len(),
            1,
            "restored as a one-member cluster"
        );
        drop(rc);
        r.stop();

        // The manifest keeps the env: the next starts restore nothing. The file untouched since
        // the restore is known by its size, mtime and inode, without reading it; once its mtime
        // moves, it is known by its SHA-256 again.
        for touched in [false, true] {
            if touched {
                let f = std::fs::File::options().write(true).open(&file).unwrap();
                f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                    .unwrap();
            }
            let o = env.run_ok(&["migrate"], "rerun with the same RESTORE_SNAPSHOT");
            assert!(
                text(&o).contains("restored from this snapshot already"),
                "{}",
                text(&o)
            );
            assert_eq!(
                text(&o).contains("the file is unchanged since"),
                !touched,
                "touched {touched}: {}",
                text(&o)
            );
        }
        let r = Member::start(&version, &data, "m1");
        let got = r
            .client()
            .await
            .get("/registry/after-restore", None)
            .await
            .unwrap();
        assert_eq!(
            got.kvs()[0].value(),
            b"kept",
            "a write after the restore survives reruns"
        );
        r.stop();
        assert_eq!(restores(&data), 1);
        assert!(sha.len() == 64);
    }
}

#[tokio::test]
async fn a_different_snapshot_or_data_never_restored_is_refused_untouched() {
    let (t, m, mut c) = seeded_34(50, 0).await;
    let out = t.path().join("snaps");
    let first = snapshot_ok(&m.client_url, &out, &[]);
    c.put("/registry/more", "x", None).await.unwrap();
    let second = snapshot_ok(&m.client_url, &out, &[]);
    drop(c);
    m.stop();
    let data = t.path().join("data");
    let mut env = MigrateEnv::new(&data, "m1", "3.4.23", "etcd3");
    env.set("RESTORE_SNAPSHOT", &first.to_string_lossy());
    env.run_ok(&["migrate"], "restore the first");
    env.set("RESTORE_SNAPSHOT", &second.to_string_lossy());
    assert_refused_untouched(
        "another snapshot over restored data",
        &data,
        || env.run(&["migrate"]),
        2,
        &[
            "restored from another snapshot",
            "move the data dir away",
            "never replaces data",
        ],
    );
    // A member whose data was never restored, given RESTORE_SNAPSHOT.
    let other = t.path().join("other");
    seeded_member("3.4.23", &other, "m1", 5, 0).await;
    let mut env = MigrateEnv::new(&other, "m1", "3.4.23", "etcd3");
    env.set("RESTORE_SNAPSHOT", &first.to_string_lossy());
    assert_refused_untouched(
        "data never restored",
        &other,
        || env.run(&["migrate"]),
        2,
        &["never restored from a snapshot", "remove RESTORE_SNAPSHOT"],
    );
}

#[tokio::test]
async fn a_34_snapshot_restored_for_a_35_target_is_restored_by_34_then_upgraded() {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    let mut c = m.client().await;
    seed(&mut c, 40, 4).await;
    let want = dump(&mut c).await;
    let file = snapshot_with_cluster_version(&m.client_url, &t.path().join("snaps"));
    drop(c);
    m.stop();
    let data = t.path().join("data");
    let new = newest_35();
    let mut env = MigrateEnv::new(&data, "m1", &new, "etcd3");
    env.set("RESTORE_SNAPSHOT", &file.to_string_lossy());
    env.run_ok(&["migrate"], "restore then upgrade");
    assert_eq!(recorded_version(&data), format!("{new}/etcd3"));
    let events: Vec<String> = journal(&data)
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["event"].as_str().unwrap(),
                e["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            "restore-snapshot 3.4.23/etcd3".to_string(),
            format!("step {new}/etcd3")
        ],
    );
    let r = Member::start(&new, &data, "m1");
    assert_eq!(dump(&mut r.client().await).await, want);
    r.stop();
}

/// A member serving client URLs over TLS that asks for client certificates.
fn tls_member(t: &Path) -> (Member, Tls, String) {
    let tls = Tls::make(t, &["m1"]);
    let mut spec = MemberSpec::new(&newest_35(), &t.join("m"), "m1");
    let url = format!("https://127.0.0.1:{}", spec.client_port);
    let p = |f: &str| tls.dir.join(f).to_string_lossy().into_owned();
    spec.extra = vec![
        format!("--listen-client-urls={url}"),
        format!("--advertise-client-urls={url}"),
        format!("--cert-file={}", p("m1.crt")),
        format!("--key-file={}", p("m1.key")),
        format!("--trusted-ca-file={}", p("ca.crt")),
        "--client-cert-auth".into(),
    ];
    let m = Member::spawn(spec);
    let creds = format!(
        "--cert-file={} --key-file={} --trusted-ca-file={} --client-cert-auth",
        p("m1.crt"),
        p("m1.key"),
        p("ca.crt")
    );
    (m, tls, creds)
}

#[test]
fn a_member_behind_client_tls_is_snapshotted_with_the_credentials_of_etcd_creds() {
    let t = tempfile::tempdir().unwrap();
    let (m, _tls, creds) = tls_member(t.path());
    let url = m.client_url.replace("http://", "https://");
    let out = t.path().join("snaps");
    let file = wait_until(
        "the TLS member to give a snapshot",
        Duration::from_secs(30),
        || {
            let o = snapshot(&url, &out, &[("ETCD_CREDS", &creds)]);
            o.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        },
    );
    assert!(file.is_file());
    // Without the CA the https endpoint is refused before anything is tried.
    let o = snapshot(&url, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--trusted-ca-file"), "{}", text(&o));
    // With the CA but no client certificate the member refuses us: not serving, exit 1.
    let ca_only = creds
        .split(' ')
        .filter(|f| f.starts_with("--trusted-ca"))
        .collect::<Vec<_>>()
        .join(" ");
    let o = snapshot(&url, &out, &[("ETCD_CREDS", &ca_only)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        dbs(&out).len(),
        1,
        "nothing left by the refused tries: {:?}",
        dbs(&out)
    );
}

#[test]
fn retention_keeps_the_newest_and_the_sidecar_loop_takes_them_on_time() {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    let out = t.path().join("snaps");
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(snapshot_ok(&m.client_url, &out, &[("SNAPSHOT_KEEP", "2")]));
        // Names carry the second: make the next one's differ.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let names: Vec<String> = taken[1..]
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dbs(&out), names, "the oldest went, the newest two stayed");

    let loop_dir = t.path().join("loop");
    let sidecar = snapshot_cmd(
        &m.client_url,
        &loop_dir,
        &[("SNAPSHOT_EVERY", "1s"), ("SNAPSHOT_KEEP", "2")],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut procs = Procs(vec![sidecar]);
    let seen = wait_until(
        "the sidecar to take snapshots",
        Duration::from_secs(20),
        || {
            let n = dbs(&loop_dir).len();
            (n == 2).then_some(n)
        },
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        procs.0[0].try_wait().unwrap().is_none(),
        "the sidecar keeps running"
    );
    assert_eq!(dbs(&loop_dir).len(), seen, "still the newest two");
    drop(procs);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_snapshot_crashed_midway_leaves_no_backup_and_the_next_run_cleans_up() {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    let out = t.path().join("snaps");
    for fp in ["snapshot-streaming", "snapshot-before-rename"] {
        let o = snapshot(
            &m.client_url,
            &out,
            &[("FAILPOINTS", &format!("{fp}=panic"))],
        );
        assert!(!o.status.success(), "{fp}: {}", text(&o));
        let left = dbs(&out);
        assert!(
            left.iter()
                .all(|n| n.starts_with('.') && n.contains(".tmp-")),
            "{fp}: only a temp file may be left: {left:?}"
        );
        let o = snapshot(&m.client_url, &out, &[]);
        assert!(o.status.success(), "{fp}: rerun: {}", text(&o));
        let after = dbs(&out);
        assert!(
            after.iter().all(|n| !n.contains(".tmp-")),
            "{fp}: {after:?}"
        );
        assert!(
            text(&o).contains("removed partial snapshots"),
            "{fp}: {}",
            text(&o)
        );
        for n in after {
            std::fs::remove_file(out.join(n)).unwrap();
        }
    }
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_restore_crashed_midway_converges_on_the_next_run() {
    let (t, m, mut c) = seeded_34(60, 6).await;
    let want = dump(&mut c).await;
    let file = snapshot_ok(&m.client_url, &t.path().join("snaps"), &[]);
    drop(c);
    m.stop();
    for fp in [
        "restore-snapshot-after-restore",
        "restore-snapshot-before-move",
    ] {
        let data = t.path().join(fp);
        let mut env = MigrateEnv::new(&data, "m1", "3.4.23", "etcd3");
        env.set("RESTORE_SNAPSHOT", &file.to_string_lossy());
        env.set("FAILPOINTS", &format!("{fp}=panic"));
        let o = env.run(&["migrate"]);
        assert!(!o.status.success(), "{fp} fired: {}", text(&o));
        env.set("FAILPOINTS", "");
        env.run_ok(&["migrate"], "rerun after the crash");
        env.run_ok(&["migrate"], "and once more: nothing to do");
        let n = restores(&data);
        assert!((1..=2).contains(&n), "{fp}: {n}");
        let r = Member::start("3.4.23", &data, "m1");
        assert_eq!(dump(&mut r.client().await).await, want, "{fp}");
        r.stop();
    }
}

#[tokio::test]
async fn a_restore_takes_the_cluster_token_the_pods_etcd_would_use() {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    seed(&mut m.client().await, 10, 0).await;
    let file = snapshot_ok(&m.client_url, &t.path().join("snaps"), &[]);
    m.stop();
    let mut ids = Vec::new();
    for (i, token) in ["", "prod-east", "prod-east"].iter().enumerate() {
        let data = t.path().join(format!("d{i}"));
        let mut env = MigrateEnv::new(&data, "m1", "3.4.23", "etcd3");
        let listen = format!("http://127.0.0.1:{}", env.peer_port);
        // The same peer URL each time: the cluster id hashes the token and the peer URLs.
        env.set("INITIAL_CLUSTER", "m1=http://127.0.0.1:2380")
            .set("INITIAL_ADVERTISE_PEER_URLS", "http://127.0.0.1:2380")
            .set("LISTEN_PEER_URLS", &listen)
            .set("RESTORE_SNAPSHOT", &file.to_string_lossy())
            .set("ETCD_INITIAL_CLUSTER_TOKEN", token);
        env.run_ok(&["migrate"], "restore");
        let mut spec = MemberSpec::new("3.4.23", &data, "m1");
        spec.extra = vec!["--initial-advertise-peer-urls=http://127.0.0.1:2380".into()];
        let r = Member::spawn(spec);
        r.wait_healthy(Duration::from_secs(30));
        let list = r.client().await.member_list().await.unwrap();
        ids.push(list.header().unwrap().cluster_id());
        r.stop();
    }
    assert_ne!(ids[0], ids[1], "a token makes another cluster id");
    assert_eq!(ids[1], ids[2], "the same token, the same cluster id");
}
