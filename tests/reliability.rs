//! Reliability: bad input of every kind is refused with its exit code, a message naming the
//! problem and the remedy, and the data dir byte-for-byte unchanged; a full disk fails a step
//! cleanly and a rerun after freeing space completes; concurrent runs are refused.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// A 3.4.23/etcd3 data dir with `n` keys.
async fn seeded_34(dir: &Path, name: &str, n: usize) -> BTreeMap<Vec<u8>, Kv> {
    seeded_member("3.4.23", dir, name, n, 10).await.0
}

/// A bin dir with the real 3.4.23 and a fake `etcd-3.5.1` script.
fn fake_bin(dir: &Path, script: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for f in ["etcd-3.4.23", "etcdctl-3.4.23"] {
        let _ = fs::remove_file(dir.join(f));
        std::os::unix::fs::symlink(bundle().join(f), dir.join(f)).unwrap();
    }
    fs::write(dir.join("etcd-3.5.1"), format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(dir.join("etcd-3.5.1"), fs::Permissions::from_mode(0o755)).unwrap();
    dir.to_path_buf()
}

/// The bad-input tests below, each a group of the table.
const GROUPS: usize = 9;

/// Groups of the table that passed and the cases they checked: the last one to pass reports the
/// whole table (scripts/reliability.sh reads that one RESULT line).
static PASSED: Mutex<(usize, usize)> = Mutex::new((0, 0));

/// Bad inputs refused on one data dir.
struct Table {
    data: PathBuf,
    checked: Vec<String>,
}

impl Table {
    fn on(data: &Path) -> Table {
        Table {
            data: data.to_path_buf(),
            checked: Vec::new(),
        }
    }

    /// Runs, then checks the exit code, that the message names the problem and the remedy, and
    /// that the data dir is byte-for-byte as it was.
    fn expect(
        &mut self,
        name: &str,
        out: impl FnOnce() -> Output,
        code: i32,
        problem: &str,
        remedy: &str,
    ) {
        self.expect_saying(name, out, code, &[problem, remedy]);
    }

    /// `expect`, with every string the message must hold.
    fn expect_saying(
        &mut self,
        name: &str,
        out: impl FnOnce() -> Output,
        code: i32,
        says: &[&str],
    ) {
        let t0 = Instant::now();
        assert_refused_untouched(name, &self.data, out, code, says);
        println!("case {name}: {:?}", t0.elapsed());
        self.checked.push(name.to_string());
    }

    /// `expect` of `migrate` with `env`.
    fn migrate(&mut self, name: &str, env: &MigrateEnv, code: i32, problem: &str, remedy: &str) {
        self.expect(name, || env.run(&["migrate"]), code, problem, remedy);
    }

    /// Checks that the group held its `n` cases, and reports the table once every group passed.
    fn done(self, n: usize) {
        assert_eq!(self.checked.len(), n, "{:?}", self.checked);
        let mut passed = PASSED.lock().unwrap();
        *passed = (passed.0 + 1, passed.1 + n);
        if passed.0 == GROUPS {
            println!("RESULT bad inputs {}/{} untouched", passed.1, passed.1);
        }
    }
}

/// A 3.4.23/etcd3 data dir of 20 keys in a temp dir anyone may enter (the unreadable-dir case
/// runs as nobody), the env of a migration of it to 3.5.1, and its table.
async fn bad_input_dir() -> (tempfile::TempDir, impl Fn() -> MigrateEnv, Table) {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let data = t.path().join("data");
    seeded_34(&data, "m1", 20).await;
    let tb = Table::on(&data);
    (
        t,
        move || MigrateEnv::new(&data, "m1", "3.5.1", "etcd3"),
        tb,
    )
}

#[tokio::test]
async fn bad_env_and_flags_are_refused_untouched() {
    let (_t, base, mut tb) = bad_input_dir().await;
    // (variable, value, remedy): the message names the variable and the remedy.
    let env_cases: &[(&str, &str, &str)] = &[
        ("TARGET_VERSION", "3.5", "X.Y.Z"),
        ("TARGET_VERSION", "v3.5.1", "X.Y.Z"),
        ("TARGET_VERSION", "abc", "X.Y.Z"),
        ("TARGET_VERSION", "", "is required"),
        ("TARGET_STORAGE", "", "is required"),
        ("LISTEN_CLIENT_URLS", "http://0.0.0.0:2379", "127.0.0.1"),
        ("LISTEN_CLIENT_URLS", "garbage", "127.0.0.1"),
        ("INITIAL_CLUSTER", "garbage", "name=URL"),
        ("LISTEN_PEER_URLS", "localhost:2380", "http(s)://host:port"),
        (
            "INITIAL_ADVERTISE_PEER_URLS",
            "ftp://x:1",
            "http(s)://host:port",
        ),
        (
            "ETCD_CREDS",
            "--peer-key-file='/unterminated",
            "shell-split",
        ),
        ("HEALTH_TIMEOUT", "soon", "90s"),
        ("STOP_GRACE", "0", "duration like"),
        ("TTL_SCOPE", "some", "all or directory"),
        ("TTL_GRANULARITY", "0", ">= 1"),
        ("BACKUP_RETENTION", "0", ">= 1"),
        ("LOG_FORMAT", "xml", "text or json"),
        ("CHILD_OUTPUT", "loud", "all or quiet"),
        ("REJOIN_IF_EMPTY", "yes", "true or false"),
        ("ETCD_CLUSTER_ENDPOINTS", "10.0.0.1", "client URLs like"),
        ("BUNDLED_VERSIONS", "3.4.23 3.5", "X.Y.Z"),
        ("ETCD_DATA_PREFIX", "registry", "start with '/'"),
        ("ETCD_NAME", "a,b", "cannot hold"),
    ];
    for (var, value, remedy) in env_cases {
        let mut e = base();
        e.set(var, value);
        tb.migrate(&format!("{var}={value:?}"), &e, 2, var, remedy);
    }
    // (variable, value, problem, remedy): the message names the value's problem.
    for (var, value, problem, remedy) in [
        ("TARGET_STORAGE", "etcd4", "etcd4", "etcd2 or etcd3"),
        (
            "INITIAL_CLUSTER",
            "other=http://127.0.0.1:1",
            "does not name this member",
            "ETCD_NAME",
        ),
    ] {
        let mut e = base();
        e.set(var, value);
        tb.migrate(&format!("{var}={value:?}"), &e, 2, problem, remedy);
    }
    for var in ["TARGET_VERSION", "DATA_DIRECTORY"] {
        let mut e = base();
        e.vars.retain(|(k, _)| k != var);
        tb.migrate(&format!("{var} unset"), &e, 2, var, "is required");
    }
    tb.expect(
        "unknown flag",
        || base().run(&["migrate", "--frobnicate"]),
        2,
        "--frobnicate",
        "--help",
    );
    tb.expect(
        "non-numeric port",
        || base().run(&["migrate", "--peer-port", "abc"]),
        2,
        "abc",
        "--help",
    );
    tb.done(env_cases.len() + 2 + 4);
}

#[tokio::test]
async fn a_bad_version_txt_or_member_dir_is_refused_untouched() {
    let (t, base, mut tb) = bad_input_dir().await;
    let data = tb.data.clone();
    let version_txts = [
        ("garbage\n", "garbage"),
        ("", "empty"),
        ("3.4.23/etcd5\n", "etcd5"),
        ("3.4.23/etcd3\n\n", "two newlines"),
        ("3.4.23/etcd3 \n", "trailing space"),
    ];
    for (content, label) in version_txts {
        fs::write(data.join("version.txt"), content).unwrap();
        let name = format!("version.txt {label}");
        tb.migrate(&name, &base(), 2, "version.txt", "fix it by hand");
    }
    record_version(&data, "3.4.23/etcd3");
    fs::rename(data.join("member/snap/db"), t.path().join("db.aside")).unwrap();
    tb.migrate(
        "etcd3 recorded but no backend",
        &base(),
        2,
        "no v3 backend",
        "fix version.txt",
    );
    fs::rename(t.path().join("db.aside"), data.join("member/snap/db")).unwrap();
    record_version(&data, "2.2.1/etcd2");
    tb.migrate(
        "2.2.1 recorded but a v3 backend",
        &base(),
        2,
        "never writes a v3 backend",
        "fix version.txt",
    );
    fs::rename(data.join("member/wal"), t.path().join("wal.aside")).unwrap();
    record_version(&data, "3.4.23/etcd3");
    tb.migrate(
        "member without a WAL",
        &base(),
        2,
        "member/wal is missing",
        "fix version.txt",
    );
    fs::rename(t.path().join("wal.aside"), data.join("member/wal")).unwrap();
    fs::remove_file(data.join("version.txt")).unwrap();
    tb.migrate(
        "no version.txt, a v3 backend",
        &base(),
        2,
        "no version.txt",
        "echo 3.0.17/etcd3",
    );
    tb.done(version_txts.len() + 4);
}

#[tokio::test]
async fn a_data_dir_of_the_wrong_shape_is_refused_untouched() {
    let (t, base, mut tb) = bad_input_dir().await;
    let data = tb.data.clone();
    let file = t.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let mut e = base();
    e.set("DATA_DIRECTORY", file.to_str().unwrap());
    tb.migrate(
        "data dir is a file",
        &e,
        2,
        "not a directory",
        "DATA_DIRECTORY",
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "x", "the file changed");
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let mut e = base();
    e.set("DATA_DIRECTORY", link.to_str().unwrap());
    tb.migrate("data dir is a symlink", &e, 2, "symbolic link", "real path");
    let foreign = t.path().join("foreign");
    fs::create_dir_all(foreign.join("stuff")).unwrap();
    let mut e = base();
    e.set("DATA_DIRECTORY", foreign.to_str().unwrap());
    tb.migrate("foreign files", &e, 2, "found: stuff", "version.txt");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o000)).unwrap();
    let e = base();
    let o = {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_etcd-migrate"),
            "--port",
            &e.port.to_string(),
            "migrate",
        ]);
        c.env_clear()
            .envs(e.vars.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    };
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    tb.expect(
        "unreadable data dir",
        || o,
        2,
        "cannot read data dir",
        "permissions",
    );
    tb.done(4);
}

#[tokio::test]
async fn a_bad_bundle_is_refused_untouched() {
    let (t, base, mut tb) = bad_input_dir().await;
    let data = tb.data.clone();
    let mut e = base();
    e.set(
        "ETCD_BIN_DIR",
        t.path().join("no-such-bin").to_str().unwrap(),
    );
    tb.migrate(
        "bin dir missing",
        &e,
        2,
        "cannot read the bin dir",
        "ETCD_BIN_DIR",
    );
    let bin = t.path().join("bin");
    fake_bin(&bin, "exit 1");
    fs::remove_file(bin.join("etcd-3.5.1")).unwrap();
    let mut e = base();
    e.set("ETCD_BIN_DIR", bin.to_str().unwrap())
        .set("BUNDLED_VERSIONS", "3.4.23 3.5.1");
    let missing = [
        "etcd-3.5.1 is needed",
        "does not exist",
        "add it to the bin dir",
    ];
    tb.expect_saying("target binary missing", || e.run(&["migrate"]), 2, &missing);
    tb.expect_saying(
        "run's exec target missing",
        || e.run(&["run", "--", "--name", "m1"]),
        2,
        &missing,
    );
    fake_bin(&bin, "exit 1");
    fs::set_permissions(bin.join("etcd-3.5.1"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut e = base();
    e.set("ETCD_BIN_DIR", bin.to_str().unwrap());
    tb.expect_saying(
        "target binary not executable",
        || e.run(&["migrate"]),
        2,
        &["etcd-3.5.1", "not executable", "add it to the bin dir"],
    );
    fake_bin(&bin, "echo 'fake etcd: cannot start' >&2; exit 1");
    tb.migrate(
        "binary that exits at once",
        &e,
        1,
        "cannot start",
        "last lines",
    );
    fake_bin(&bin, "exec sleep 60");
    e.set("HEALTH_TIMEOUT", "2s");
    tb.migrate(
        "binary that never becomes healthy",
        &e,
        1,
        "did not accept a write within 2s",
        "HEALTH_TIMEOUT",
    );
    // An etcd that takes the backend in the instant before the step's etcd opens it (here a
    // process holding its flock, started by the fake etcd): the step fails at once, naming the
    // holder, instead of waiting out the health timeout.
    let holder_pid = data.with_extension("holder.pid");
    fake_bin(
        &bin,
        &format!(
            "d=; while [ $# -gt 0 ]; do [ \"$1\" = --data-dir ] && d=$2; shift; done\n\
             python3 -c 'import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)' \
             \"$d/member/snap/db\" & echo $! > {}\nexec sleep 60",
            holder_pid.display()
        ),
    );
    e.set("HEALTH_TIMEOUT", "60s");
    let t0 = Instant::now();
    tb.migrate(
        "backend locked by another process",
        &e,
        1,
        "is locked by pid",
        "stop it and run again",
    );
    let took = t0.elapsed();
    let pid: i32 = fs::read_to_string(&holder_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    fs::remove_file(&holder_pid).unwrap();
    assert!(
        took < Duration::from_secs(20),
        "failed at once, not after the 60 s health timeout: {took:?}"
    );
    assert_eq!(recorded_version(&data), "3.4.23/etcd3");
    tb.done(7);
}

/// Variables set over the base env, in order.
type EnvSettings = &'static [(&'static str, &'static str)];

#[tokio::test]
async fn unsupported_targets_and_restores_of_non_backups_are_refused_untouched() {
    let (_t, base, mut tb) = bad_input_dir().await;
    const TV: &str = "TARGET_VERSION";
    const TS: &str = "TARGET_STORAGE";
    const BV: &str = "BUNDLED_VERSIONS";
    // (case, settings over the base env, problem, remedy)
    let targets: [(&str, EnvSettings, &str, &str); 5] = [
        (
            "target not bundled",
            &[(TV, "3.6.0")],
            "not bundled",
            "set TARGET_VERSION",
        ),
        (
            "etcd3 to etcd2 upward",
            &[(TV, "3.5.1"), (TS, "etcd2")],
            "not supported",
            "supported paths",
        ),
        (
            "rollback to 2.3.7",
            &[(TV, "2.3.7"), (TS, "etcd2")],
            "not supported",
            "supported paths",
        ),
        (
            "etcd2 on 3.6",
            &[(TV, "3.6.0"), (TS, "etcd2"), (BV, "3.4.23 3.5.1 3.6.0")],
            "v2 store was removed",
            "storage",
        ),
        (
            "rollback to an unbundled minor",
            &[(TV, "3.3.27"), (BV, "3.4.23 3.5.1")],
            "not bundled",
            "bundled",
        ),
    ];
    for (name, settings, problem, remedy) in targets {
        let mut e = base();
        for (k, v) in settings {
            e.set(k, v);
        }
        tb.migrate(name, &e, 2, problem, remedy);
    }
    tb.expect(
        "restore of a non-backup",
        || base().run(&["restore", "data.backup-nope"]),
        2,
        "is not a backup",
        "backups:",
    );
    tb.done(6);
}

/// Waits until `dir` has not changed for a while: a running etcd writes its data dir for a
/// moment after it starts (its backend commits every 100 ms).
fn wait_settled(dir: &Path) {
    let mut last: Option<(String, Instant)> = None;
    wait_until(
        format_args!("{} to stop changing", dir.display()),
        Duration::from_secs(30),
        || {
            let h = tree_hash(dir);
            match &last {
                Some((prev, since)) if *prev == h => {
                    (since.elapsed() >= Duration::from_millis(500)).then_some(())
                }
                _ => {
                    last = Some((h, Instant::now()));
                    None
                }
            }
        },
    )
}

#[tokio::test]
async fn a_busy_dir_or_port_is_refused_untouched() {
    let (t, base, mut tb) = bad_input_dir().await;
    let data = tb.data.clone();
    let e = base();
    let hold = std::net::TcpListener::bind(("127.0.0.1", e.port)).unwrap();
    tb.migrate(
        "private port taken",
        &e,
        2,
        &format!("port {}", e.port),
        "--port",
    );
    drop(hold);
    let work = t.path().join("data.etcd-migrate");
    fs::create_dir_all(&work).unwrap();
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(work.join("lock"))
        .unwrap();
    lock.try_lock().unwrap();
    tb.migrate(
        "lock held by another run",
        &base(),
        3,
        "busy",
        "wait for it to finish",
    );
    drop(lock);
    // The etcd's own writes are waited out: the table compares only what etcd-migrate could change.
    let m = Member::start("3.4.23", &data, "m1");
    wait_settled(&data);
    tb.migrate(
        "an etcd running on the dir",
        &base(),
        3,
        "in use",
        "stop that etcd",
    );
    m.stop();
    tb.done(3);
}

#[tokio::test]
async fn rollbacks_that_would_lose_data_are_refused_untouched() {
    let t = tempfile::tempdir().unwrap();
    // Protobuf data on rollback to etcd2.
    let pb = t.path().join("pb");
    fs::create_dir(&pb).unwrap();
    let pb_data = untar_fixture("etcd-3.0.17-v3-protobuf", &pb);
    record_version(&pb_data, "3.0.17/etcd3");
    let mut pb_tb = Table::on(&pb_data);
    pb_tb.migrate(
        "protobuf on rollback",
        &MigrateEnv::new(&pb_data, "etcd-test", "2.2.1", "etcd2"),
        2,
        "protobuf",
        "STORAGE_MEDIA_TYPE=application/json",
    );

    // Rollback to etcd2 of a backend that lacks writes its WAL holds (etcd killed), without
    // etcd-3.0.17 in the bundle to apply them.
    let lag = t.path().join("lag/data");
    killed_before_backend_commit(&lag).await;
    let mut lag_tb = Table::on(&lag);
    lag_tb.migrate(
        "writes only in the WAL on rollback",
        &MigrateEnv::new(&lag, "m1", "2.2.1", "etcd2"),
        2,
        "has applied the log up to index",
        "stop it with SIGTERM",
    );
    pb_tb.checked.extend(lag_tb.checked);
    pb_tb.done(2);
}

#[tokio::test]
async fn a_second_run_on_the_same_dir_exits_3_at_once_and_an_intruding_etcd_waits() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let before = seeded_34(&data, "m1", 200).await;
    let env = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3");
    let first = env
        .command(&["migrate"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let step_etcd = wait_until("the first run's etcd", Duration::from_secs(30), || {
        etcd_children(Some(first.id())).first().copied()
    });
    // A second etcd-migrate: refused at once, naming the holder.
    let t0 = Instant::now();
    let second = MigrateEnv::new(&data, "m1", "3.5.1", "etcd3").run(&["migrate"]);
    assert_eq!(second.status.code(), Some(3), "{}", text(&second));
    assert!(
        text(&second).contains(&format!("pid={}", first.id())),
        "names the holder: {}",
        text(&second)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refused at once, took {:?}",
        t0.elapsed()
    );
    // An etcd started on the dir while the step's etcd holds it (bbolt's flock on the backend,
    // taken before the WAL): the flock makes the intruder wait. Started earlier, the intruder
    // could take the flock first and the step would time out instead.
    wait_until(
        "the first run's etcd to lock the data dir",
        deadline.saturating_duration_since(Instant::now()),
        || etcd_migrate::datadir::in_use_by(&data),
    );
    let mut intruder = MemberSpec::new("3.4.23", &data, "m1");
    intruder.extra.push("--heartbeat-interval=10".into());
    let intruder = Member::spawn(intruder);
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the migration completes despite the intruder: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        exited(step_etcd),
        "the step's etcd {step_etcd} outlived the run"
    );
    drop(intruder);
    assert_eq!(recorded_version(&data), "3.5.1/etcd3");
    let m = Member::start("3.5.1", &data, "m1");
    assert_eq!(dump(&mut m.client().await).await, before, "nothing lost");
}

/// A tmpfs of `size` bytes mounted for the test (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: u64) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(at)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "mount tmpfs needs root (CI runs as root): {}",
            text(&st)
        );
        Tmpfs(at.to_path_buf())
    }
    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
    /// Fills the filesystem so that `left` bytes stay free.
    fn leave_free(&self, left: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = fs::remove_file(&filler);
        let free = self.free();
        assert!(
            free > left,
            "tmpfs too small: {free} free, want {left} left"
        );
        let f = fs::File::create(&filler).unwrap();
        let mut w = std::io::BufWriter::new(f);
        let chunk = vec![0x5au8; 1 << 16];
        let mut n = free - left;
        while n > 0 {
            let k = n.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut w, &chunk[..k]).unwrap();
            n -= k as u64;
        }
        drop(w);
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn tree_bytes(p: &Path) -> u64 {
    let m = fs::symlink_metadata(p).unwrap();
    if m.is_dir() {
        fs::read_dir(p)
            .unwrap()
            .map(|e| tree_bytes(&e.unwrap().path()))
            .sum()
    } else {
        m.len()
    }
}

/// Keys a dir serves, read on a copy outside the tmpfs by the version it records.
async fn serves(data: &Path, name: &str, scratch: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    cp_dir(data, scratch);
    let v = recorded_version(scratch);
    let (ver, storage) = v.split_once('/').unwrap();
    // The "3.0.17" source here was written by 3.4.23 (no 3.0.17 binary to write or read it).
    let ver = if bundle().join(format!("etcd-{ver}")).exists() {
        ver
    } else {
        "3.4.23"
    };
    let mut spec = MemberSpec::new(ver, scratch, name);
    if storage == "etcd2" {
        spec.extra.push("--enable-v2=true".into());
    }
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    if storage == "etcd2" {
        v2_leaves(&m.client_url)
            .await
            .into_iter()
            .map(|(k, (v, _))| (k.into_bytes(), v.into_bytes()))
            .collect()
    } else {
        dump(&mut m.client().await)
            .await
            .into_iter()
            .map(|(k, v)| (k, v.value))
            .collect()
    }
}

struct DiskCase {
    name: &'static str,
    source: PathBuf,
    member: &'static str,
    target: (&'static str, &'static str),
    /// Free bytes to leave, from the member dir's and the backend's sizes.
    leave: fn(u64, u64) -> u64,
    /// The step must be refused before it copies anything (vs fail midway).
    early: bool,
}

#[tokio::test]
async fn a_full_disk_fails_the_step_cleanly_and_a_rerun_after_freeing_space_completes() {
    let t = tempfile::tempdir().unwrap();
    // Sources, written on the normal disk by real etcd.
    let v2 = t.path().join("src-v2/data");
    {
        let mut spec = MemberSpec::new("3.4.23", &v2, "m1");
        spec.extra.push("--enable-v2=true".into());
        let m = Member::spawn(spec);
        m.wait_healthy(Duration::from_secs(30));
        seed_v2(&m.client_url, 3000, 500, 10, 0).await;
        // Enough value bytes that `etcdctl migrate`'s new backend outgrows the early check's slack.
        let http = reqwest::Client::new();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..4000 {
            let (http, url) = (
                http.clone(),
                format!("{}/v2/keys/registry/secrets/default/s{i}", m.client_url),
            );
            set.spawn(async move {
                http.put(url)
                    .form(&[("value", "x".repeat(2048))])
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .is_success()
            });
            if set.len() >= 32 {
                assert!(set.join_next().await.unwrap().unwrap());
            }
        }
        while let Some(r) = set.join_next().await {
            assert!(r.unwrap());
        }
        m.stop();
        record_version(&v2, "3.4.23/etcd2");
    }
    let v351 = t.path().join("src-351/data");
    {
        let m = Member::start("3.5.1", &v351, "m1");
        seed(&mut m.client().await, 2000, 10).await;
        m.stop();
        record_version(&v351, "3.5.1/etcd3");
    }
    // Values that grow sixfold as v2 JSON (control characters are escaped as \u00XX), labelled
    // 3.0.17 for the native rollback (no 3.0.17 binary here; the backend format is the same).
    let esc = t.path().join("src-esc/data");
    {
        let m = Member::start("3.4.23", &esc, "m1");
        let mut c = m.client().await;
        for i in 0..200 {
            c.put(
                format!("/registry/configmaps/default/c{i}"),
                "\u{1}".repeat(20_000),
                None,
            )
            .await
            .unwrap();
        }
        m.stop();
        record_version(&esc, "3.0.17/etcd3");
    }
    let cases = [
        DiskCase {
            name: "storage migration, refused before copying",
            source: v2.clone(),
            member: "m1",
            target: ("3.4.23", "etcd3"),
            leave: |m, _| m / 2,
            early: true,
        },
        DiskCase {
            name: "storage migration, full midway",
            source: v2.clone(),
            member: "m1",
            target: ("3.4.23", "etcd3"),
            leave: |m, _| m + m / 20 + (1 << 20) + (256 << 10),
            early: false,
        },
        DiskCase {
            name: "minor rollback, refused before the snapshot",
            source: v351.clone(),
            member: "m1",
            target: ("3.4.23", "etcd3"),
            leave: |_, _| 1 << 20,
            early: true,
        },
        DiskCase {
            name: "native rollback, full midway",
            source: esc.clone(),
            member: "m1",
            target: ("2.2.1", "etcd2"),
            leave: |_, db| 2 * db + db / 10 + (3 << 19),
            early: false,
        },
        DiskCase {
            name: "upgrade, disk full",
            source: t.path().join("src-34"),
            member: "m1",
            target: ("3.5.1", "etcd3"),
            leave: |_, _| 0,
            early: false,
        },
    ];
    seeded_34(&t.path().join("src-34"), "m1", 300).await;
    let mut resumable = 0;
    for (i, c) in cases.iter().enumerate() {
        let member_size = tree_bytes(&c.source.join("member"));
        let fsdir = t.path().join(format!("fs{i}"));
        let tmpfs = Tmpfs::mount(&fsdir, 3 * member_size + (64 << 20));
        let data = fsdir.join("data");
        cp_dir(&c.source, &data);
        let before_version = recorded_version(&data);
        let want = serves(&c.source, c.member, &t.path().join("scratch")).await;
        let db_size = fs::metadata(c.source.join("member/snap/db"))
            .map(|m| m.len())
            .unwrap_or(0);
        let filler = tmpfs.leave_free((c.leave)(member_size, db_size));
        let env = MigrateEnv::new(&data, c.member, c.target.0, c.target.1);
        let out = env.run(&["migrate"]);
        let log = text(&out);
        assert_eq!(out.status.code(), Some(1), "{}: {log}", c.name);
        if c.early {
            assert!(
                log.contains("not enough free space in") && log.contains("bytes needed"),
                "{}: names the path and the space needed:\n{log}",
                c.name
            );
        } else {
            assert!(
                log.contains("bytes free")
                    || log.contains("No space left")
                    || log.contains("no space left"),
                "{}: says the disk is full:\n{log}",
                c.name
            );
        }
        assert_eq!(
            recorded_version(&data),
            before_version,
            "{}: version.txt intact",
            c.name
        );
        assert_eq!(
            serves(&data, c.member, &t.path().join("scratch")).await,
            want,
            "{}: usable by the recorded version",
            c.name
        );
        fs::remove_file(&filler).unwrap();
        env.run_ok(
            &["migrate"],
            &format!("{}: rerun after freeing space", c.name),
        );
        assert_eq!(
            recorded_version(&data),
            format!("{}/{}", c.target.0, c.target.1)
        );
        resumable += 1;
        drop(tmpfs);
    }
    println!(
        "RESULT disk-full cases {resumable}/{} resumable",
        cases.len()
    );
    assert_eq!(resumable, cases.len());
}

/// A verified snapshot of a member of `version` holding 30 keys, saved into `dir`.
async fn snapshot_of(version: &str, dir: &Path) -> PathBuf {
    let m = Member::start(version, &dir.join(format!("m-{version}")), "m1");
    seed(&mut m.client().await, 30, 0).await;
    let path = snapshot_with_cluster_version(&m.client_url, &dir.join("snaps"));
    m.stop();
    path
}

#[tokio::test]
async fn a_bad_restore_snapshot_is_refused_untouched() {
    let t = tempfile::tempdir().unwrap();
    let s34 = snapshot_of("3.4.23", t.path()).await;
    let s35 = snapshot_of(&newest_35(), t.path()).await;
    let bytes = fs::read(&s34).unwrap();
    let bad = |name: &str, content: &[u8]| {
        let p = t.path().join(name);
        fs::write(&p, content).unwrap();
        p
    };
    let truncated = bad("truncated.db", &bytes[..bytes.len() / 2 + 32]);
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 3] ^= 0x40;
    let corrupted = bad("corrupted.db", &flipped);
    let text_file = bad("notes.db", &b"not a database\n".repeat(1024)[..8192]);
    // The pod's data dir, empty (its disk was replaced); the table hashes its parent, so that
    // nothing may be created beside it either.
    let pod = t.path().join("pod");
    let data = pod.join("data");
    fs::create_dir_all(&data).unwrap();
    let mut tb = Table::on(&pod);
    let env = |file: &Path, target: &str| {
        let mut e = MigrateEnv::new(&data, "m1", target, "etcd3");
        e.set("RESTORE_SNAPSHOT", &file.to_string_lossy());
        e
    };
    let new = newest_35();
    let cases: [(&str, MigrateEnv, &str, &str); 6] = [
        (
            "restore: no such file",
            env(&t.path().join("gone.db"), "3.4.23"),
            "No such file",
            "nothing was changed",
        ),
        (
            "restore: truncated",
            env(&truncated, "3.4.23"),
            "the file is truncated",
            "nothing was changed",
        ),
        (
            "restore: a byte changed",
            env(&corrupted, "3.4.23"),
            "does not match the file",
            "nothing was changed",
        ),
        (
            "restore: not a bbolt file",
            env(&text_file, "3.4.23"),
            "not a bbolt database",
            "nothing was changed",
        ),
        (
            "restore: newer than the target",
            env(&s35, "3.4.23"),
            "cannot serve data newer",
            "set TARGET_VERSION to a 3.5 release",
        ),
        (
            "restore: no release of its line bundled",
            {
                let mut e = env(&s34, &new);
                e.set("BUNDLED_VERSIONS", &new);
                e
            },
            "has no 3.4 release",
            "nothing was changed",
        ),
    ];
    for (name, e, problem, remedy) in cases {
        tb.migrate(name, &e, 2, problem, remedy);
    }
    // A data dir with data it was never restored from: never replaced.
    let (_t2, base, _) = bad_input_dir().await;
    let mut e = base();
    e.set("RESTORE_SNAPSHOT", &s34.to_string_lossy());
    let mut tb2 = Table::on(Path::new(
        &e.vars
            .iter()
            .find(|(k, _)| k == "DATA_DIRECTORY")
            .unwrap()
            .1,
    ));
    tb2.migrate(
        "restore over data never restored",
        &e,
        2,
        "never restored from a snapshot",
        "move the data dir away",
    );
    tb.checked.append(&mut tb2.checked);
    tb.done(7);
}

/// (case, env of `snapshot`, exit code, problem, remedy).
type SnapshotCase = (
    &'static str,
    Vec<(&'static str, String)>,
    i32,
    &'static str,
    &'static str,
);

#[tokio::test]
async fn bad_snapshot_settings_and_a_member_not_serving_are_refused_untouched() {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    let out = t.path().join("snaps");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("keep-me.db"), b"an operator's file").unwrap();
    let a_file = t.path().join("a-file");
    fs::write(&a_file, b"x").unwrap();
    let mut tb = Table::on(&out);
    let run = |vars: Vec<(&'static str, String)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-migrate"));
        cmd.arg("snapshot")
            .env_clear()
            .envs(vars)
            .stdin(Stdio::null());
        cmd.output().unwrap()
    };
    let ep = m.client_url.clone();
    let dir = out.to_string_lossy().into_owned();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cases: [SnapshotCase; 6] = [
        (
            "snapshot: no SNAPSHOT_DIR",
            vec![("SNAPSHOT_ENDPOINT", ep.clone())],
            2,
            "--out is required",
            "SNAPSHOT_DIR",
        ),
        (
            "snapshot: SNAPSHOT_DIR is a file",
            vec![
                ("SNAPSHOT_ENDPOINT", ep.clone()),
                ("SNAPSHOT_DIR", a_file.to_string_lossy().into_owned()),
            ],
            2,
            "is not a directory",
            "snapshot dir",
        ),
        (
            "snapshot: endpoint not a URL",
            vec![
                ("SNAPSHOT_ENDPOINT", "127.0.0.1:2379".into()),
                ("SNAPSHOT_DIR", dir.clone()),
            ],
            2,
            "SNAPSHOT_ENDPOINT",
            "expected a client URL",
        ),
        (
            "snapshot: SNAPSHOT_KEEP 0",
            vec![
                ("SNAPSHOT_ENDPOINT", ep.clone()),
                ("SNAPSHOT_DIR", dir.clone()),
                ("SNAPSHOT_KEEP", "0".into()),
            ],
            2,
            "SNAPSHOT_KEEP",
            ">= 1",
        ),
        (
            "snapshot: https without a CA",
            vec![
                ("SNAPSHOT_ENDPOINT", ep.replace("http:", "https:")),
                ("SNAPSHOT_DIR", dir.clone()),
            ],
            2,
            "needs the CA",
            "--trusted-ca-file",
        ),
        (
            "snapshot: member not serving",
            vec![("SNAPSHOT_ENDPOINT", dead), ("SNAPSHOT_DIR", dir.clone())],
            1,
            "is not serving",
            "check that etcd runs there",
        ),
    ];
    for (name, vars, code, problem, remedy) in cases {
        tb.expect(name, || run(vars), code, problem, remedy);
    }
    m.stop();
    tb.done(6);
}

#[tokio::test]
async fn a_snapshot_onto_a_full_disk_leaves_no_file_and_succeeds_once_there_is_room() {
    let t = tempfile::tempdir().unwrap();
    let m = Member::start("3.4.23", &t.path().join("m"), "m1");
    let mut c = m.client().await;
    for i in 0..300 {
        c.put(
            format!("/registry/configmaps/default/c{i}"),
            "x".repeat(10_000),
            None,
        )
        .await
        .unwrap();
    }
    let fsdir = t.path().join("fs");
    let tmpfs = Tmpfs::mount(&fsdir, 16 << 20);
    let out = fsdir.join("snaps");
    fs::create_dir_all(&out).unwrap();
    let filler = tmpfs.leave_free(1 << 20);
    let snap = || {
        Command::new(env!("CARGO_BIN_EXE_etcd-migrate"))
            .arg("snapshot")
            .env_clear()
            .env("SNAPSHOT_ENDPOINT", &m.client_url)
            .env("SNAPSHOT_DIR", &out)
            .output()
            .unwrap()
    };
    let o = snap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("No space left"), "{}", text(&o));
    assert_eq!(
        fs::read_dir(&out).unwrap().count(),
        0,
        "nothing left behind"
    );
    fs::remove_file(filler).unwrap();
    let o = snap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
    drop(c);
    m.stop();
}
