//! Crash harness: real migrations crashed at every named failpoint and by kill -9 at random
//! times; after each crash version.txt names what is on disk, and a rerun converges to what an
//! uninterrupted run gives, with nothing left behind and no etcd running.
//! Needs the `failpoints` feature (`make test` builds with it).
#![cfg(feature = "failpoints")]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// key -> (value, has a TTL or lease).
type Content = BTreeMap<String, (String, bool)>;

/// What a data dir serves, read by the version it records, on a throwaway copy.
async fn content(dir: &Path, name: &str, scratch: &Path) -> Content {
    cp_dir(dir, scratch);
    let vf = recorded_version(scratch);
    let (version, storage) = vf.split_once('/').unwrap();
    let v3 = |m: BTreeMap<Vec<u8>, Kv>| -> Content {
        m.into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k).unwrap(),
                    (String::from_utf8(v.value).unwrap(), v.lease != 0),
                )
            })
            .collect()
    };
    match (version, storage) {
        ("2.2.1", "etcd2") => {
            // etcd's own v2 reader (TTLs become permanent in migrate: compare values only).
            let st = Command::new(bundle().join("etcdctl-3.4.23"))
                .args(["migrate", "--data-dir"])
                .arg(scratch)
                .env("ETCDCTL_API", "3")
                .output()
                .unwrap();
            assert!(st.status.success(), "{}", text(&st));
            let mut spec = MemberSpec::new("3.4.23", scratch, name);
            spec.extra.push("--heartbeat-interval=10".into());
            spec.extra.push("--election-timeout=100".into());
            let m = Member::spawn(spec);
            m.wait_healthy(Duration::from_secs(30));
            let c = v3(dump(&mut m.client().await).await);
            c.into_iter().map(|(k, (v, _))| (k, (v, false))).collect()
        }
        (v, "etcd2") => {
            let mut spec = MemberSpec::new(v, scratch, name);
            spec.extra.extend([
                "--enable-v2=true".into(),
                "--heartbeat-interval=10".into(),
                "--election-timeout=100".into(),
            ]);
            let m = Member::spawn(spec);
            m.wait_healthy(Duration::from_secs(30));
            v2_leaves(&m.client_url).await
        }
        (v, _) if !bundle().join(format!("etcd-{v}")).exists() => {
            // No binary of that release here (3.0.17): read its backend with our own reader.
            let db =
                etcd_migrate::storage::bbolt::Db::open(scratch.join("member/snap/db")).unwrap();
            let kvs = etcd_migrate::storage::mvcc::live_key_values(&db).unwrap();
            kvs.into_iter()
                .map(|kv| {
                    (
                        String::from_utf8(kv.key).unwrap(),
                        (String::from_utf8(kv.value).unwrap(), kv.lease != 0),
                    )
                })
                .collect()
        }
        (v, _) => {
            let mut spec = MemberSpec::new(v, scratch, name);
            spec.extra.push("--heartbeat-interval=10".into());
            spec.extra.push("--election-timeout=100".into());
            let m = Member::spawn(spec);
            m.wait_healthy(Duration::from_secs(30));
            v3(dump(&mut m.client().await).await)
        }
    }
}

/// Live etcd processes whose command line names `dir`.
fn etcds_on(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("/etcd-") && cmd.contains(&needle) && !exited(*pid)
        })
        .collect()
}

fn wait_no_etcd(dir: &Path) {
    wait_until(
        format_args!("no etcd on {}", dir.display()),
        Duration::from_secs(5),
        || etcds_on(dir).is_empty().then_some(()),
    );
}

/// etcd-migrate's work area beside `data` (`<data>.etcd-migrate`).
fn work_area(data: &Path) -> PathBuf {
    let mut name = data.file_name().unwrap().to_os_string();
    name.push(".etcd-migrate");
    data.with_file_name(name)
}

/// Nothing of ours is left in or beside the data dir but the lock file and backups.
fn nothing_left_behind(data: &Path) {
    let work = work_area(data);
    let left: Vec<String> = fs::read_dir(&work)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n == "lock"),
        "work area not clean: {left:?}"
    );
    for e in fs::read_dir(data).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with('.'), "left in the data dir: {n}");
    }
    for e in fs::read_dir(data.parent().unwrap()).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.ends_with(".partial"), "half-written backup left: {n}");
    }
}

struct Scenario {
    name: &'static str,
    member: &'static str,
    source: PathBuf,
    target: (&'static str, &'static str),
    /// (failpoint, fail-crate action) pairs.
    failpoints: Vec<(&'static str, &'static str)>,
    /// Keys/values/TTL flags an uninterrupted run ends with.
    reference: Content,
    /// What the source holds.
    original: Content,
    /// How long an uninterrupted run takes.
    duration: Duration,
}

fn env_for(s: &Scenario, data: &Path) -> MigrateEnv {
    MigrateEnv::new(data, s.member, s.target.0, s.target.1)
}

/// After a crash: version.txt names data its version serves, with every key of the source.
async fn check_after_crash(s: &Scenario, data: &Path, scratch: &Path, what: &str) {
    wait_no_etcd(data);
    let rec = recorded_version(data);
    // An in-place upgrade under way: its release may have written the data, which is what the
    // intent in the work area says; the next run finishes that step first.
    let work = work_area(data);
    let interrupted_in_place = work.join("in-place.json").exists();
    if !interrupted_in_place {
        let got = content(data, s.member, scratch).await;
        // TTLs may not be reattached yet: values are compared, not TTL flags.
        assert!(
            same_but_expired(&got, &s.original, false),
            "{}/{what}: after the crash, {rec} does not serve the data (TTL flags not compared): {}",
            s.name,
            differences(&got, &s.original)
        );
    }
}

/// `got` holds every key of `want` with its value (and, with `ttl_flags`, its TTL flag), and
/// nothing else; only a key with a TTL may be missing: it expired (the shortest masterlease has
/// 30 s) between the run that made `want` and this one. A different value never passes.
fn same_but_expired(got: &Content, want: &Content, ttl_flags: bool) -> bool {
    got.keys().all(|k| want.contains_key(k))
        && want.iter().all(|(k, (v, ttl))| match got.get(k) {
            None => *ttl,
            Some((gv, gttl)) => gv == v && (!ttl_flags || gttl == ttl),
        })
}

async fn crash_at_failpoints(s: &Scenario, root: &Path) -> (usize, usize) {
    let mut converged = 0;
    for (i, (fp, action)) in s.failpoints.iter().enumerate() {
        let data = root.join(format!("{}-fp{i}", s.name)).join("data");
        fs::create_dir_all(data.parent().unwrap()).unwrap();
        cp_dir(&s.source, &data);
        let env = env_for(s, &data);
        let out = env
            .command(&["migrate"])
            .env("FAILPOINTS", format!("{fp}={action}"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{}: failpoint {fp} ({action}) never fired: {}",
            s.name,
            text(&out)
        );
        rerun_converges(s, &env, &data, root, fp).await;
        assert_eq!(
            recorded_version(&data),
            format!("{}/{}", s.target.0, s.target.1)
        );
        converged += 1;
        let _ = fs::remove_dir_all(data.parent().unwrap());
    }
    (converged, s.failpoints.len())
}

/// After a crash (`what`): the data dir is consistent; a rerun completes, leaves nothing behind
/// and no etcd running, and the data is what an uninterrupted run gives.
async fn rerun_converges(s: &Scenario, env: &MigrateEnv, data: &Path, root: &Path, what: &str) {
    check_after_crash(s, data, &root.join("scratch"), what).await;
    env.run_ok(&["migrate"], &format!("{}: rerun after {what}", s.name));
    wait_no_etcd(data);
    nothing_left_behind(data);
    let got = content(data, s.member, &root.join("scratch")).await;
    assert!(
        same_but_expired(&got, &s.reference, true),
        "{}: after {what} and a rerun: {}",
        s.name,
        differences(&got, &s.reference)
    );
}

/// The keys two contents disagree on (at most 10 named).
fn differences(got: &Content, want: &Content) -> String {
    let mut d: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v:?}, got {:?}", got.get(k)))
        .chain(
            got.keys()
                .filter(|k| !want.contains_key(*k))
                .map(|k| format!("{k}: not wanted, got {:?}", got[k])),
        )
        .collect();
    let n = d.len();
    d.truncate(10);
    format!("{n} keys differ: {d:?}")
}

async fn random_kills(s: &Scenario, root: &Path, n: usize, seed: u64) -> (usize, usize) {
    let mut rng = seed;
    let mut converged = 0;
    for i in 0..n {
        // xorshift: reproducible kill times from the seed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let at = Duration::from_millis(rng % (s.duration.as_millis() as u64).max(1));
        let data = root.join(format!("{}-kill{i}", s.name)).join("data");
        fs::create_dir_all(data.parent().unwrap()).unwrap();
        cp_dir(&s.source, &data);
        let env = env_for(s, &data);
        let mut child = env
            .command(&["migrate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The kill lands at a chosen moment of the run: time must pass, there is nothing to await.
        std::thread::sleep(at);
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        rerun_converges(s, &env, &data, root, &format!("kill -9 at {at:?}")).await;
        converged += 1;
        let _ = fs::remove_dir_all(data.parent().unwrap());
    }
    (converged, n)
}

/// Runs an uninterrupted migration of the source to learn the reference result and duration.
async fn reference(
    name: &'static str,
    member: &'static str,
    source: PathBuf,
    target: (&'static str, &'static str),
    failpoints: Vec<(&'static str, &'static str)>,
    root: &Path,
) -> Scenario {
    let data = root.join(format!("{name}-ref")).join("data");
    fs::create_dir_all(data.parent().unwrap()).unwrap();
    cp_dir(&source, &data);
    let original = content(&source, member, &root.join("scratch")).await;
    let mut s = Scenario {
        name,
        member,
        source,
        target,
        failpoints,
        reference: Content::new(),
        original,
        duration: Duration::ZERO,
    };
    let t = Instant::now();
    env_for(&s, &data).run_ok(&["migrate"], name);
    s.duration = t.elapsed();
    s.reference = content(&data, member, &root.join("scratch")).await;
    s
}

/// A 3.4.23/etcd2 dir (real etcd in v2 mode: permanent keys, TTL keys in several transactions'
/// worth, an empty directory) going to 3.5.1/etcd3: storage migration with a snapshot cut, then
/// an upgrade.
async fn storage_scenario(root: &Path) -> Scenario {
    let data = root.join("src-storage/data");
    let mut spec = MemberSpec::new("3.4.23", &data, "etcd-test");
    spec.extra.push("--enable-v2=true".into());
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    seed_v2(&m.client_url, 200, 2600, 20, 5).await;
    m.stop();
    record_version(&data, "3.4.23/etcd2");
    let fps = vec![
        ("copy-tree-mid-copy", "1*off->panic"),
        ("to-etcd3-before-migrate", "panic"),
        ("to-etcd3-after-migrate", "panic"),
        ("to-etcd3-after-capture", "panic"),
        ("to-etcd3-mid-reattach", "2*off->panic"),
        ("to-etcd3-before-swap", "panic"),
        ("write-durable-before-fsync", "panic"),
        ("write-durable-before-rename", "1*off->panic"),
        ("write-durable-after-rename", "2*off->panic"),
        SWAP[0],
        SWAP[1],
        SWAP[2],
        ("executor-after-record", "panic"),
        ("record-before-write", "1*off->panic"),
        ("upgrade-etcd-running", "panic"),
        ("executor-before-record", "1*off->panic"),
    ];
    reference("storage", "etcd-test", data, ("3.5.1", "etcd3"), fps, root).await
}

/// The crash points of the staged swap, which every rewriting step goes through.
const SWAP: [(&str, &str); 3] = [
    ("swap-before-exchange", "panic"),
    ("swap-after-exchange", "panic"),
    ("swap-after-backup-rename", "panic"),
];

async fn native_rollback_scenario(root: &Path) -> Scenario {
    let dir = root.join("src-rollback");
    fs::create_dir_all(&dir).unwrap();
    let data = untar_fixture("etcd-3.0.17-v3", &dir);
    record_version(&data, "3.0.17/etcd3");
    let fps = vec![
        ("to-etcd2-before-write", "panic"),
        ("to-etcd2-mid-write", "30*off->panic"),
        ("to-etcd2-before-swap", "panic"),
        SWAP[0],
        SWAP[1],
        SWAP[2],
        ("executor-before-record", "panic"),
    ];
    reference(
        "native-rollback",
        "etcd-test",
        data,
        ("2.2.1", "etcd2"),
        fps,
        root,
    )
    .await
}

async fn minor_rollback_scenario(root: &Path) -> Scenario {
    let dir = root.join("src-minor");
    let data = dir.join("data");
    seeded_member("3.5.1", &data, "m1", 300, 7).await;
    let fps = vec![
        ("minor-rollback-after-save", "panic"),
        ("minor-rollback-after-restore", "panic"),
        ("minor-rollback-before-swap", "panic"),
        SWAP[0],
        SWAP[1],
        SWAP[2],
        ("executor-after-record", "panic"),
    ];
    reference("minor-rollback", "m1", data, ("3.4.23", "etcd3"), fps, root).await
}

fn kills() -> usize {
    std::env::var("CRASH_RANDOM_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test]
async fn crashes_at_every_failpoint_converge() {
    let t = tempfile::tempdir().unwrap();
    let mut total = (0, 0);
    for s in [
        storage_scenario(t.path()).await,
        native_rollback_scenario(t.path()).await,
        minor_rollback_scenario(t.path()).await,
    ] {
        let (ok, n) = crash_at_failpoints(&s, t.path()).await;
        println!(
            "crash harness: {}: failpoints crashed {ok}/{n} converged",
            s.name
        );
        total = (total.0 + ok, total.1 + n);
    }
    println!(
        "RESULT failpoints crashed {}/{} converged",
        total.0, total.1
    );
    assert_eq!(total.0, total.1);
    assert!(total.1 >= 30);
}

#[tokio::test]
async fn random_kill_9s_during_a_multi_step_run_converge() {
    let t = tempfile::tempdir().unwrap();
    let s = storage_scenario(t.path()).await;
    let n = kills();
    let (ok, n) = random_kills(&s, t.path(), n, 0x5eed_1234_abcd_0001).await;
    println!(
        "RESULT random kills {ok}/{n} converged (multi-step run of {:?}, seed 0x5eed1234abcd0001)",
        s.duration
    );
    assert_eq!(ok, n);
}
