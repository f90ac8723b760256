//! The upgrade engine against real etcd: version.txt, planner, steps on a private port.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A 3.4.23 data dir holding `n` keys (every 10th on a lease), stopped cleanly, recorded.
async fn seeded_34(dir: &Path, n: usize) -> (std::collections::BTreeMap<Vec<u8>, Kv>, Vec<i64>) {
    seeded_member("3.4.23", dir, "m1", n, 10).await
}

#[tokio::test]
async fn upgrade_34_to_351_keeps_every_key_revision_and_lease() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (before, leases) = seeded_34(&data, 1000).await;
    assert_eq!(before.len(), 1000);

    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let log = text(&env.run_ok(&["migrate"], "migrate"));
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");
    assert!(
        log.contains("step 1/1: 3.4.23 -> 3.5.1/etcd3"),
        "the log shows the step:\n{log}"
    );
    assert!(
        log.contains("skipping 3.5.0 as older patches"),
        "3.5.0 skipped as an older patch:\n{log}"
    );
    assert!(log.contains("starting etcd-3.5.1") && !log.contains("starting etcd-3.5.0"));

    let m = Member::start("3.5.1", &data, "m1");
    let mut c = m.client().await;
    let after = dump(&mut c).await;
    assert_eq!(
        after, before,
        "every key, value, create/mod revision, version and lease"
    );
    for l in leases {
        let ttl = c.lease_time_to_live(l, None).await.unwrap().ttl();
        assert!(ttl > 0, "lease {l:x} survived");
    }
    let journal = fs::read_to_string(data.join("etcd-migrate.journal")).unwrap();
    assert!(
        journal.contains("\"to\":\"3.5.1/etcd3\"") && journal.contains("\"revisions_verified\":"),
        "{journal}"
    );
}

#[tokio::test]
async fn patch_step_then_rerun_at_target_starts_no_etcd() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (before, _) = seeded_member("3.5.0", &data, "m1", 50, 0).await;

    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let out = env.run_ok(&[], "migrate by default");
    assert!(text(&out).contains("step 1/1: 3.5.0 -> 3.5.1/etcd3"));
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");

    let hash = tree_hash(&data);
    let t0 = Instant::now();
    let out = env.run(&["migrate"]);
    let took = t0.elapsed();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("nothing to do") && !log.contains("starting etcd"),
        "{log}"
    );
    assert_eq!(tree_hash(&data), hash, "a no-op run changes nothing");
    assert!(took < Duration::from_secs(2), "no-op took {took:?}");

    let m = Member::start("3.5.1", &data, "m1");
    assert_eq!(dump(&mut m.client().await).await, before);
}

#[test]
fn fresh_dir_records_the_target_without_starting_etcd() {
    let t = tempfile::tempdir().unwrap();
    for data in [t.path().join("missing/data"), t.path().join("empty")] {
        if data.ends_with("empty") {
            fs::create_dir(&data).unwrap();
        }
        let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
        let out = env.run(&["migrate"]);
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(!log.contains("starting etcd"), "{log}");
        assert_eq!(recorded_version(&data), "3.5.1/etcd3");
        assert!(!data.join("member").exists());
    }
}

#[tokio::test]
async fn run_execs_the_target_etcd_in_the_same_process() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (before, _) = seeded_34(&data, 100).await;
    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let spec = {
        let mut s = MemberSpec::new("3.5.1", &data, "m1");
        s.peer_port = env.peer_port;
        s
    };
    let log = t.path().join("run.log");
    let err = t.path().join("run.err");
    let mut child = env
        .run_command(&spec.flags())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _kill = Kill(pid);
    let served = wait_until(
        "etcd serving on the manifest's client URL",
        Duration::from_secs(60),
        || {
            assert_running(&mut child, &err);
            http_get(&spec.client_url(), "/version")
        },
    );
    assert!(served.contains("\"etcdserver\":\"3.5.1\""), "{served}");
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.ends_with("etcd-3.5.1"),
        "PID {pid} runs {}",
        exe.display()
    );
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");
    let mut c = etcd_client::Client::connect([spec.client_url()], None)
        .await
        .unwrap();
    assert_eq!(dump(&mut c).await, before);
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    child.wait().unwrap();
}

/// The Kubernetes image's bundle, as empty files: enough for `plan`.
fn k8s_bin_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for v in [
        "2.2.1", "2.3.7", "3.0.17", "3.1.20", "3.2.32", "3.3.17", "3.4.18", "3.5.1",
    ] {
        for tool in ["etcd", "etcdctl"] {
            fs::write(dir.join(format!("{tool}-{v}")), "").unwrap();
        }
    }
}

#[test]
fn legacy_221_dirs_are_detected_and_planned_through_every_minor() {
    let t = tempfile::tempdir().unwrap();
    let bin = t.path().join("bin");
    k8s_bin_dir(&bin);
    for fixture in ["etcd-2.2.1-v2", "etcd-2.2.1-v2-snap"] {
        let dir = t.path().join(fixture);
        fs::create_dir(&dir).unwrap();
        let data = untar_fixture(fixture, &dir);
        let hash = tree_hash(&data);
        let mut env = MigrateEnv::new(&data, "etcd-test", "3.5.1", "etcd3");
        env.set("ETCD_BIN_DIR", bin.to_str().unwrap());
        let out = env.run_ok(&["plan", "--output", "json"], fixture);
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(p["current"], "2.2.1/etcd2");
        assert_eq!(p["legacy_default"], true);
        let path: Vec<String> = field_of_each(&p["steps"], "kind")
            .into_iter()
            .zip(field_of_each(&p["steps"], "outcome"))
            .map(|(kind, outcome)| format!("{kind}:{outcome}"))
            .collect();
        assert_eq!(
            path,
            [
                "upgrade:2.3.7/etcd2",
                "migrate_storage:3.0.17/etcd3",
                "upgrade:3.1.20/etcd3",
                "upgrade:3.2.32/etcd3",
                "upgrade:3.3.17/etcd3",
                "upgrade:3.4.18/etcd3",
                "upgrade:3.5.1/etcd3"
            ],
            "{fixture}"
        );
        let steps = p["steps"].as_array().unwrap();
        assert_eq!(
            steps[1]["from"], "2.3.7/etcd2",
            "storage migration starts 3.0.17 on the etcd2 data"
        );
        assert_eq!(
            steps[5]["cut_snapshot"], true,
            "the 3.4 step cuts a snapshot before 3.5"
        );
        let s = text(&env.run(&["plan"]));
        assert!(
            s.contains("2.3.7 -> 3.0.17/etcd2, then storage etcd2 -> etcd3 at 3.0.17"),
            "{s}"
        );
        assert_eq!(tree_hash(&data), hash, "plan touches nothing");
    }
}

#[tokio::test]
async fn kill_9_mid_step_leaves_no_orphan_and_the_rerun_completes() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (before, _) = seeded_34(&data, 300).await;
    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    // Catch the step's etcd while it runs, check it listens on loopback only, then kill -9 us.
    let (mut child, etcd) = migrate_until_step_etcd(&env, Stdio::null);
    let pid = child.id();
    let addrs = wait_until(
        format_args!("the step's etcd {etcd} to listen on port {}", env.port),
        Duration::from_secs(30),
        || {
            let addrs = listening_addrs(etcd);
            let port = format!(":{}", env.port);
            addrs.iter().any(|a| a.ends_with(&port)).then_some(addrs)
        },
    );
    assert!(
        addrs
            .iter()
            .any(|a| a == &format!("127.0.0.1:{}", env.port)),
        "client port on loopback: {addrs:?}"
    );
    assert!(
        addrs.iter().all(|a| a.starts_with("127.0.0.1:")),
        "private etcd listens on 127.0.0.1 only: {addrs:?}"
    );
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    child.wait().unwrap();
    wait_until(
        format_args!("etcd {etcd} to exit after a kill -9 of etcd-migrate"),
        Duration::from_secs(5),
        || exited(etcd).then_some(()),
    );
    assert_eq!(
        recorded_version(&data),
        "3.4.23/etcd3",
        "nothing recorded by the killed run"
    );

    env.run_ok(&["migrate"], "rerun");
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");
    let m = Member::start("3.5.1", &data, "m1");
    assert_eq!(dump(&mut m.client().await).await, before, "nothing lost");
}

#[tokio::test]
async fn sigterm_stops_the_step_and_records_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    seeded_34(&data, 20).await;
    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let (child, etcd) = migrate_until_step_etcd(&env, Stdio::piped);
    let pid = child.id();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_step_failed(&out, &["stopped by SIGTERM"], &data);
    assert!(
        !Path::new(&format!("/proc/{etcd}")).exists(),
        "the child etcd was stopped and reaped"
    );
}

/// `migrate` started with its output to `out()`, and its step's etcd once it appears.
fn migrate_until_step_etcd(env: &MigrateEnv, out: fn() -> Stdio) -> (Child, u32) {
    let child = env
        .command(&["migrate"])
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap();
    let etcd = wait_until("the step's etcd", Duration::from_secs(30), || {
        etcd_children(Some(child.id())).first().copied()
    });
    (child, etcd)
}

/// The run failed (exit 1) saying each of `says`, and version.txt still names 3.4.23.
fn assert_step_failed(out: &std::process::Output, says: &[&str], data: &Path) {
    let log = text(out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    for s in says {
        assert!(log.contains(s), "no {s:?} in:\n{log}");
    }
    assert_eq!(recorded_version(data), "3.4.23/etcd3");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    seeded_34(&data, 10).await;
    let mut env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    env.set("LOG_FORMAT", "json");
    let out = env.run_ok(&["migrate"], "migrate");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let mut steps = 0;
    for line in stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        if v["message"].as_str().unwrap().starts_with("step 1/1 done") {
            assert_eq!(
                v["version"], "3.5.1/etcd3",
                "fields are JSON fields: {line}"
            );
            steps += 1;
        }
    }
    assert_eq!(steps, 1, "{stderr}");
}

/// The offline proof catches a step whose etcd changed history: here a compaction issued on the
/// step's private port while its etcd runs (held by a failpoint) deletes old revisions. The step
/// fails (exit 1) naming the revisions that differ, and nothing is recorded.
#[tokio::test]
async fn a_step_whose_etcd_changes_old_revisions_fails_and_records_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let m = Member::start("3.4.23", &data, "m1");
    let mut c = m.client().await;
    seed(&mut c, 100, 0).await;
    // Overwrites: a compaction at the head deletes the superseded revisions.
    seed(&mut c, 100, 0).await;
    drop(c);
    m.stop();
    record_version(&data, "3.4.23/etcd3");
    let mut env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    env.set("FAILPOINTS", "upgrade-etcd-running=sleep(4000)");
    let url = format!("http://127.0.0.1:{}", env.port);
    let child = env
        .command(&["migrate"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_async(
        "a compaction through the step's etcd",
        Duration::from_secs(30),
        async || {
            let mut c = etcd_client::Client::connect([url.as_str()], None)
                .await
                .ok()?;
            let rev = c.get("/", None).await.ok()?.header().unwrap().revision();
            let physical = etcd_client::CompactionOptions::new().with_physical();
            c.compact(rev, Some(physical)).await.ok()
        },
    )
    .await;
    let out = child.wait_with_output().unwrap();
    assert_step_failed(
        &out,
        &["does not match what was there before", "revisions up to"],
        &data,
    );
}

/// A member stopped with its NOSPACE alarm raised refuses every write: the step says so at once
/// (with the remedy) instead of waiting out the health timeout, and records nothing.
#[tokio::test]
async fn a_member_past_its_quota_fails_fast_naming_the_remedy() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let mut spec = MemberSpec::new("3.4.23", &data, "m1");
    spec.extra = vec!["--quota-backend-bytes=16777216".into()];
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    let mut c = m.client().await;
    let big = "x".repeat(512 * 1024);
    let mut full = false;
    for i in 0..200 {
        if let Err(e) = c.put(format!("/registry/big/{i}"), big.clone(), None).await {
            full = e.to_string().contains("database space exceeded");
            break;
        }
    }
    assert!(full, "the member never ran out of quota");
    drop(c);
    m.stop();
    record_version(&data, "3.4.23/etcd3");
    let mut env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    env.set("HEALTH_TIMEOUT", "10m");
    let t0 = Instant::now();
    let out = env.run(&["migrate"]);
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "waited {:?} for a member that refuses every write",
        t0.elapsed()
    );
    assert_step_failed(
        &out,
        &["database space exceeded", "etcdctl alarm disarm"],
        &data,
    );
}
