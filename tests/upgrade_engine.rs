//! The upgrade engine against real etcd: version.txt, planner, steps on a private port.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn read_version(dir: &Path) -> String {
    fs::read_to_string(dir.join("version.txt"))
        .unwrap()
        .trim_end()
        .to_string()
}

/// A 3.4.23 data dir holding `n` keys (every 10th on a lease), stopped cleanly, recorded.
async fn seeded_34(dir: &Path, n: usize) -> (std::collections::BTreeMap<Vec<u8>, Kv>, Vec<i64>) {
    let m = Member::start("3.4.23", dir, "m1");
    let mut c = m.client().await;
    let leases = seed(&mut c, n, 10).await;
    let before = dump(&mut c).await;
    m.stop();
    fs::write(dir.join("version.txt"), "3.4.23/etcd3\n").unwrap();
    (before, leases)
}

#[tokio::test]
async fn upgrade_34_to_351_keeps_every_key_revision_and_lease() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (before, leases) = seeded_34(&data, 1000).await;
    assert_eq!(before.len(), 1000);

    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let out = env.run(&["migrate"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(read_version(&data), "3.5.1/etcd3");
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
    let m = Member::start("3.5.0", &data, "m1");
    let mut c = m.client().await;
    seed(&mut c, 50, 0).await;
    let before = dump(&mut c).await;
    m.stop();
    fs::write(data.join("version.txt"), "3.5.0/etcd3\n").unwrap();

    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let out = env.run(&[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("step 1/1: 3.5.0 -> 3.5.1/etcd3"));
    assert_eq!(read_version(&data), "3.5.1/etcd3");

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
        assert_eq!(read_version(&data), "3.5.1/etcd3");
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
    let mut args = vec!["run", "--"];
    let flags = spec.flags();
    args.extend(flags.iter().map(|s| s.as_str()));
    let log = t.path().join("run.log");
    let mut child = env
        .command(&args)
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(t.path().join("run.err")).unwrap())
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut served = None;
    while Instant::now() < deadline {
        if let Some(v) = http_get(&spec.client_url(), "/version") {
            served = Some(v);
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run exited: {}",
            tail(&t.path().join("run.err"), 20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let served = served.expect("etcd serving on the manifest's client URL");
    assert!(served.contains("\"etcdserver\":\"3.5.1\""), "{served}");
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.ends_with("etcd-3.5.1"),
        "PID {pid} runs {}",
        exe.display()
    );
    assert_eq!(read_version(&data), "3.5.1/etcd3");
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
        let out = env.run(&["plan", "--output", "json"]);
        assert!(out.status.success(), "{}", text(&out));
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(p["current"], "2.2.1/etcd2");
        assert_eq!(p["legacy_default"], true);
        let path: Vec<String> = p["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                format!(
                    "{}:{}",
                    s["kind"].as_str().unwrap(),
                    s["outcome"].as_str().unwrap()
                )
            })
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
        let text_out = env.run(&["plan"]);
        let s = text(&text_out);
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
    let mut child = env
        .command(&["migrate"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Catch the step's etcd while it runs, check it listens on loopback only, then kill -9 us.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut etcd = None;
    while Instant::now() < deadline && etcd.is_none() {
        etcd = etcd_children(Some(pid)).first().copied();
        std::thread::sleep(Duration::from_millis(5));
    }
    let etcd = etcd.expect("the step's etcd appeared");
    let mut addrs = Vec::new();
    while Instant::now() < deadline
        && !addrs
            .iter()
            .any(|a: &String| a.ends_with(&format!(":{}", env.port)))
    {
        addrs = listening_addrs(etcd);
        std::thread::sleep(Duration::from_millis(5));
    }
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
    let gone = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{etcd}")).exists() && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !Path::new(&format!("/proc/{etcd}")).exists()
            || fs::read_to_string(format!("/proc/{etcd}/stat"))
                .unwrap_or_default()
                .contains(") Z"),
        "etcd {etcd} outlived a kill -9 of etcd-migrate"
    );
    assert_eq!(
        read_version(&data),
        "3.4.23/etcd3",
        "nothing recorded by the killed run"
    );

    let out = env.run(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(read_version(&data), "3.5.1/etcd3");
    let m = Member::start("3.5.1", &data, "m1");
    assert_eq!(dump(&mut m.client().await).await, before, "nothing lost");
}

#[tokio::test]
async fn sigterm_stops_the_step_and_records_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    seeded_34(&data, 20).await;
    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let child = env
        .command(&["migrate"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut etcd = None;
    while Instant::now() < deadline && etcd.is_none() {
        etcd = etcd_children(Some(pid)).first().copied();
        std::thread::sleep(Duration::from_millis(5));
    }
    let etcd = etcd.expect("the step's etcd appeared");
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_step_failed(&out, &["stopped by SIGTERM"], &data);
    assert!(
        !Path::new(&format!("/proc/{etcd}")).exists(),
        "the child etcd was stopped and reaped"
    );
}

/// The run failed (exit 1) saying each of `says`, and version.txt still names 3.4.23.
fn assert_step_failed(out: &std::process::Output, says: &[&str], data: &Path) {
    let log = text(out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    for s in says {
        assert!(log.contains(s), "no {s:?} in:\n{log}");
    }
    assert_eq!(read_version(data), "3.4.23/etcd3");
}

#[tokio::test]
async fn bad_input_exits_with_its_code_and_leaves_the_dir_untouched() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    seeded_34(&data, 5).await;
    let h0 = tree_hash(&data);
    let base = || MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let mut checked = 0;
    let mut check = |name: &str, env: &MigrateEnv, want_code: i32, want_msg: &str| {
        let before = tree_hash(&data);
        let out = env.run(&["migrate"]);
        let log = text(&out);
        assert_eq!(out.status.code(), Some(want_code), "{name}: {log}");
        assert!(
            log.contains(want_msg),
            "{name}: message should name {want_msg:?}:\n{log}"
        );
        assert_eq!(tree_hash(&data), before, "{name}: data dir changed");
        checked += 1;
    };
    for tv in ["3.5", "v3.5.1", "abc"] {
        let mut e = base();
        e.set("TARGET_VERSION", tv);
        check(&format!("TARGET_VERSION={tv}"), &e, 2, "TARGET_VERSION");
    }
    let mut e = base();
    e.set("TARGET_VERSION", "");
    check("TARGET_VERSION empty", &e, 2, "TARGET_VERSION");
    let mut e = base();
    e.set("TARGET_STORAGE", "etcd4");
    check("TARGET_STORAGE=etcd4", &e, 2, "etcd2 or etcd3");
    for (content, label) in [
        ("garbage\n", "garbage"),
        ("", "empty"),
        ("3.4.23/etcd5\n", "etcd5"),
    ] {
        fs::write(data.join("version.txt"), content).unwrap();
        check(&format!("version.txt {label}"), &base(), 2, "version.txt");
        fs::write(data.join("version.txt"), "3.4.23/etcd3\n").unwrap();
    }
    let file = t.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let mut e = base();
    e.set("DATA_DIRECTORY", file.to_str().unwrap());
    let out = e.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not a directory"));
    assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    let bin = t.path().join("bin-without-351");
    fs::create_dir(&bin).unwrap();
    fs::copy(bundle().join("etcd-3.4.23"), bin.join("etcd-3.4.23")).unwrap();
    fs::write(bin.join("etcd-3.5.1"), "").unwrap();
    let mut e = base();
    e.set("ETCD_BIN_DIR", bin.to_str().unwrap());
    check("etcd-3.5.1 not executable", &e, 2, "etcd-3.5.1");
    fs::remove_file(bin.join("etcd-3.5.1")).unwrap();
    e.set("BUNDLED_VERSIONS", "3.4.23 3.5.1");
    check("etcd-3.5.1 missing", &e, 2, "does not exist");
    // The private port already taken.
    let e = base();
    let _hold = std::net::TcpListener::bind(("127.0.0.1", e.port)).unwrap();
    check("private port taken", &e, 2, &format!("port {}", e.port));
    // An etcd running on the dir.
    let m = Member::start("3.4.23", &data, "m1");
    let before = tree_hash(&data);
    let out = base().run(&["migrate"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("in use"), "{}", text(&out));
    m.stop();
    let _ = before;
    assert!(checked >= 10);
    let _ = h0;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    seeded_34(&data, 10).await;
    let mut env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    env.set("LOG_FORMAT", "json");
    let out = env.run(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
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
    fs::write(data.join("version.txt"), "3.4.23/etcd3\n").unwrap();
    let mut env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    env.set("FAILPOINTS", "upgrade-etcd-running=sleep(4000)");
    let url = format!("http://127.0.0.1:{}", env.port);
    let child = env
        .command(&["migrate"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut compacted = false;
    while Instant::now() < deadline && !compacted {
        if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await {
            if let Ok(r) = c.get("/", None).await {
                let rev = r.header().unwrap().revision();
                compacted = c
                    .compact(
                        rev,
                        Some(etcd_client::CompactionOptions::new().with_physical()),
                    )
                    .await
                    .is_ok();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(compacted, "could not reach the step's etcd");
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
    fs::write(data.join("version.txt"), "3.4.23/etcd3\n").unwrap();
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
