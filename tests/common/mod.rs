//! Test harness: real etcd members of any bundled version on free loopback ports, seeding and
//! reading keys, running etcd-migrate as an operator would, and stopping and reaping every
//! process it started on drop (also when a test fails).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Display;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};

/// The repo's `.bundle` (made by `make bundle`).
pub fn bundle() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".bundle");
    assert!(
        b.join("etcd-3.4.23").exists(),
        "no etcd bundle at {}: run `make bundle`",
        b.display()
    );
    b
}

/// The etcd versions in the bundle (every `etcd-<X.Y.Z>`), oldest first.
pub fn bundled_versions() -> Vec<String> {
    let mut v: Vec<(Vec<u32>, String)> = std::fs::read_dir(bundle())
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("etcd-")?.to_string();
            let key: Vec<u32> = ver
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            (key.len() == 3).then_some((key, ver))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

/// The newest etcd 3.5 in the bundle: Debian's current one (`make bundle` fetches it), read
/// from the bundle so that a newer Debian upload needs no change here.
pub fn newest_35() -> String {
    bundled_versions()
        .into_iter()
        .rfind(|v| v.starts_with("3.5."))
        .expect("no etcd 3.5 in the bundle: run `make bundle`")
}

/// The journal of a data dir, one JSON value per completed step or event.
pub fn journal(data_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data_dir.join("etcd-migrate.journal"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// ../shared/fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// A port nobody listens on right now (127.0.0.1 only).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The child is killed when the test (or benchmark) process dies, whatever way it dies.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The first and the longest pause between two probes of `wait_until`: short at first, to
/// catch short-lived states (a step's etcd), longer later, not to load the machine.
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);

/// Polls `probe` until it returns `Some`, and returns that; None once `timeout` has passed.
pub fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let mut pause = POLL_FIRST;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Polls `probe` until it returns `Some`, and returns that; panics naming `what` and the time
/// waited when `timeout` passes first. `what` is formatted only then (see `LogTail`).
pub fn wait_until<T>(what: impl Display, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    poll(timeout, probe).unwrap_or_else(|| panic!("waited {:?} for {what}", start.elapsed()))
}

/// `wait_until` for probes that talk to etcd through an async client.
pub async fn wait_until_async<T>(
    what: impl Display,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    let mut pause = POLL_FIRST;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if start.elapsed() >= timeout {
            panic!("waited {:?} for {what}", start.elapsed());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// The last `.1` lines of the log `.0`, read when formatted: for `wait_until`'s `what`.
pub struct LogTail<'a>(pub &'a Path, pub usize);

impl Display for LogTail<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&tail(self.0, self.1))
    }
}

/// A value formatted by calling `.0` when it is formatted: state read at failure time.
pub struct Lazy<F>(pub F);

impl<F: Fn() -> String> Display for Lazy<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// Panics if `child` has exited, with the end of its log: for probes that wait on a process
/// that must stay up.
pub fn assert_running(child: &mut Child, log: &Path) {
    if let Some(st) = child.try_wait().unwrap() {
        panic!("exited ({st}); log:\n{}", tail(log, 20));
    }
}

/// SIGTERM, up to `grace` for the process to exit, then SIGKILL; always reaped.
pub fn stop_child(c: &mut Child, grace: Duration) -> ExitStatus {
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    poll(grace, || c.try_wait().unwrap()).unwrap_or_else(|| {
        let _ = c.kill();
        c.wait().unwrap()
    })
}

/// The process `pid` has exited: no /proc entry, or a zombie its parent has not reaped yet.
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z')),
    }
}

/// The parent of `pid`, from /proc (None once it is gone).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// The version and storage a data dir records in version.txt (e.g. `3.4.23/etcd3`).
pub fn recorded_version(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("version.txt"))
        .unwrap()
        .trim_end()
        .to_string()
}

/// Records `version` (e.g. `3.4.23/etcd3`) in the data dir's version.txt, as a pod would have.
pub fn record_version(dir: &Path, version: &str) {
    std::fs::write(dir.join("version.txt"), format!("{version}\n")).unwrap();
}

/// A single member of `version` on `dir` holding `n` keys (every `lease_every`-th on a lease),
/// stopped cleanly and recorded as `<version>/etcd3`: the keys it served, and its leases.
pub async fn seeded_member(
    version: &str,
    dir: &Path,
    name: &str,
    n: usize,
    lease_every: usize,
) -> (BTreeMap<Vec<u8>, Kv>, Vec<i64>) {
    let m = Member::start(version, dir, name);
    let mut c = m.client().await;
    let leases = seed(&mut c, n, lease_every).await;
    let before = dump(&mut c).await;
    drop(c);
    m.stop();
    record_version(dir, &format!("{version}/etcd3"));
    (before, leases)
}

/// Runs `run` and checks that it exited with `code`, that its output says each of `says`, and
/// that `data` is byte-for-byte as it was; `what` names the case in failures. The output, for
/// further checks.
pub fn assert_refused_untouched(
    what: &str,
    data: &Path,
    run: impl FnOnce() -> Output,
    code: i32,
    says: &[&str],
) -> String {
    let before = tree_hash(data);
    let out = run();
    let log = text(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit code; log:\n{log}"
    );
    for s in says {
        assert!(
            log.contains(s),
            "{what}: the message should say {s:?}:\n{log}"
        );
    }
    assert_eq!(tree_hash(data), before, "{what}: the data dir changed");
    log
}

/// The string `field` of every element of the JSON array `list` (plan steps, backups).
pub fn field_of_each(list: &serde_json::Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|e| {
            e[field]
                .as_str()
                .unwrap_or_else(|| panic!("no {field} in {e}"))
                .to_string()
        })
        .collect()
}

/// Checks that `status` lists a backup of the data as it was at `version`.
pub fn assert_backup_kept(env: &MigrateEnv, version: &str) {
    let out = env.run_ok(&["status", "--output", "json"], "status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        field_of_each(&st["backups"], "version")
            .iter()
            .any(|v| v == version),
        "no backup of {version}: {st}"
    );
}

/// The record types of a WAL dir, in order.
pub fn wal_record_types(wal_dir: &Path) -> Vec<i64> {
    etcd_migrate::storage::wal::WalReader::open(wal_dir)
        .unwrap()
        .map(|r| r.unwrap().record.r#type)
        .collect()
}

/// The records of the WAL we write for etcd 2.2.1: as a 2.2.1 member restored from a snapshot
/// leaves it (crc, metadata, the empty snapshot marker, the snapshot's, the HardState).
pub const WAL_221_RECORDS: [i64; 5] = {
    use etcd_migrate::storage::raftpb::{
        RECORD_CRC, RECORD_METADATA, RECORD_SNAPSHOT, RECORD_STATE,
    };
    [
        RECORD_CRC,
        RECORD_METADATA,
        RECORD_SNAPSHOT,
        RECORD_SNAPSHOT,
        RECORD_STATE,
    ]
};

/// The specs of a cluster of `names` on one machine under `root`, peers over `scheme`.
pub fn cluster_specs(root: &Path, version: &str, names: &[&str], scheme: &str) -> Vec<MemberSpec> {
    let mut specs: Vec<MemberSpec> = names
        .iter()
        .map(|n| MemberSpec::new(version, &root.join(n), n))
        .collect();
    let ic = specs
        .iter()
        .map(|s| format!("{}={scheme}://127.0.0.1:{}", s.name, s.peer_port))
        .collect::<Vec<_>>()
        .join(",");
    for s in &mut specs {
        s.initial_cluster = Some(ic.clone());
    }
    specs
}

/// Peer TLS material made for the test (CA plus one cert per member, SAN 127.0.0.1).
pub struct Tls {
    pub dir: PathBuf,
}

impl Tls {
    pub fn make(dir: &Path, names: &[&str]) -> Tls {
        let sh = |args: &str| {
            let st = Command::new("sh")
                .arg("-c")
                .arg(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(st.status.success(), "{args}: {}", text(&st));
        };
        sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca");
        for n in names {
            sh(&format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {n}.key -out {n}.csr -subj /CN={n} && \
                 printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > {n}.ext && \
                 openssl x509 -req -in {n}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {n}.crt -days 2 -extfile {n}.ext"
            ));
        }
        Tls {
            dir: dir.to_path_buf(),
        }
    }
    pub fn flags(&self, name: &str) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        vec![
            format!("--peer-cert-file={}", p(&format!("{name}.crt"))),
            format!("--peer-key-file={}", p(&format!("{name}.key"))),
            format!("--peer-trusted-ca-file={}", p("ca.crt")),
            "--peer-client-cert-auth".into(),
        ]
    }
}

pub fn with_scheme(flags: Vec<String>, scheme: &str) -> Vec<String> {
    flags
        .into_iter()
        .map(|f| {
            if scheme == "https" {
                f.replace("http://127.0.0.1", "https://127.0.0.1")
            } else {
                f
            }
        })
        .collect()
}

/// Fixes the peer URL scheme in a member's flags (client URLs stay http on loopback).
pub fn member_flags(spec: &MemberSpec, scheme: &str, tls: Option<&Tls>) -> Vec<String> {
    let mut out = Vec::new();
    let f = spec.flags();
    let mut i = 0;
    while i < f.len() {
        out.push(f[i].clone());
        if ["--listen-peer-urls", "--initial-advertise-peer-urls"].contains(&f[i].as_str()) {
            out.push(with_scheme(vec![f[i + 1].clone()], scheme).remove(0));
            i += 2;
            continue;
        }
        i += 1;
    }
    if let Some(t) = tls {
        out.extend(t.flags(&spec.name));
    }
    out
}

/// Children killed and reaped on drop.
pub struct Procs(pub Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One etcd member started by a test.
pub struct Member {
    child: Option<Child>,
    pub version: String,
    pub name: String,
    pub data_dir: PathBuf,
    pub client_url: String,
    pub peer_url: String,
    pub log: PathBuf,
}

/// How to start a member.
#[derive(Clone)]
pub struct MemberSpec {
    pub version: String,
    pub name: String,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    pub initial_cluster: Option<String>,
    pub cluster_state: &'static str,
    pub extra: Vec<String>,
}

impl MemberSpec {
    pub fn new(version: &str, data_dir: &Path, name: &str) -> MemberSpec {
        MemberSpec {
            version: version.into(),
            name: name.into(),
            data_dir: data_dir.into(),
            client_port: free_port(),
            peer_port: free_port(),
            initial_cluster: None,
            cluster_state: "new",
            extra: Vec::new(),
        }
    }
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    /// The etcd flags of this member (also what a pod would pass after `run --`).
    pub fn flags(&self) -> Vec<String> {
        let ic = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={}", self.name, self.peer_url()));
        let mut f: Vec<String> = [
            "--name",
            &self.name,
            "--data-dir",
            &self.data_dir.to_string_lossy(),
            "--listen-client-urls",
            &self.client_url(),
            "--advertise-client-urls",
            &self.client_url(),
            "--listen-peer-urls",
            &self.peer_url(),
            "--initial-advertise-peer-urls",
            &self.peer_url(),
            "--initial-cluster",
            &ic,
            "--initial-cluster-state",
            self.cluster_state,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        f.extend(self.extra.iter().cloned());
        f
    }
}

impl Member {
    /// Starts a single-member cluster and waits until it serves.
    pub fn start(version: &str, data_dir: &Path, name: &str) -> Member {
        let m = Member::spawn(MemberSpec::new(version, data_dir, name));
        m.wait_healthy(Duration::from_secs(30));
        m
    }

    /// Starts a member without waiting.
    pub fn spawn(spec: MemberSpec) -> Member {
        std::fs::create_dir_all(spec.data_dir.parent().unwrap()).unwrap();
        let log = spec
            .data_dir
            .with_extension(format!("{}.{}.log", spec.version, spec.client_port));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bundle().join(format!("etcd-{}", spec.version)));
        cmd.args(spec.flags())
            .env_clear()
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn etcd");
        Member {
            child: Some(child),
            version: spec.version.clone(),
            name: spec.name.clone(),
            data_dir: spec.data_dir.clone(),
            client_url: spec.client_url(),
            peer_url: spec.peer_url(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until /health says true.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until(
            format_args!(
                "etcd-{} on {} to be healthy; log:\n{}",
                self.version,
                self.data_dir.display(),
                LogTail(&self.log, 20)
            ),
            timeout,
            || http_get(&self.client_url, "/health").filter(|b| b.contains("true")),
        );
    }

    pub async fn client(&self) -> Client {
        Client::connect([self.client_url.as_str()], None)
            .await
            .expect("connect")
    }

    /// SIGTERM and wait: a clean stop, data flushed.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(20));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP GET on loopback; the body, or None on any failure.
pub fn http_get(base: &str, path: &str) -> Option<String> {
    let hostport = base.trim_start_matches("http://");
    let mut s =
        TcpStream::connect_timeout(&hostport.parse().ok()?, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The last lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A key as the v3 API returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl Kv {
    /// A key as the v3 API returned it.
    pub fn of(kv: &etcd_client::KeyValue) -> Kv {
        Kv {
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }
}

/// `etcd-migrate snapshot` of the member at `endpoint` into `out`, taken again until the file
/// records its release line (`clusterVersion`, which etcd writes to its backend some time after
/// the cluster version is decided): the path of that snapshot. Earlier tries are removed.
pub fn snapshot_with_cluster_version(endpoint: &str, out: &Path) -> PathBuf {
    wait_until(
        "a snapshot that records the cluster version",
        Duration::from_secs(30),
        || {
            let o = Command::new(env!("CARGO_BIN_EXE_etcd-migrate"))
                .arg("snapshot")
                .env_clear()
                .env("SNAPSHOT_ENDPOINT", endpoint)
                .env("SNAPSHOT_DIR", out)
                .output()
                .unwrap();
            assert!(o.status.success(), "snapshot: {}", text(&o));
            let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            let facts =
                etcd_migrate::storage::snapcheck::check(&path, &Default::default()).unwrap();
            if facts.cluster_version.is_some() {
                return Some(path);
            }
            std::fs::remove_file(&path).unwrap();
            None
        },
    )
}

/// How many restores from a snapshot the data dir's journal records.
pub fn restores(data_dir: &Path) -> usize {
    journal(data_dir)
        .iter()
        .filter(|e| e["event"] == "restore-snapshot")
        .count()
}

/// The revision in the name of a snapshot `etcd-migrate snapshot` took
/// (`<member>-<utc>-rev<N>.db`).
pub fn snapshot_revision(path: &Path) -> i64 {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    name.rsplit_once("-rev")
        .and_then(|(_, r)| r.strip_suffix(".db"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("not a snapshot's name: {name}"))
}

/// Every key of a v3 store (paged: gRPC caps a response at 4 MiB).
///
/// Waits out "not capable": an etcd started on data whose cluster version is 2.x (data just
/// migrated from etcd2) is healthy before its leader has raised the cluster version, and until
/// then refuses v3 requests.
pub async fn dump(c: &mut Client) -> BTreeMap<Vec<u8>, Kv> {
    let mut out = BTreeMap::new();
    let mut start = vec![0u8];
    loop {
        let r = wait_until_async(
            "etcd to serve v3 requests (\"not capable\")",
            Duration::from_secs(30),
            async || {
                let opts = GetOptions::new().with_range(vec![0u8]).with_limit(500);
                match c.get(start.clone(), Some(opts)).await {
                    Err(e) if e.to_string().contains("not capable") => None,
                    r => Some(r.expect("range")),
                }
            },
        )
        .await;
        for kv in r.kvs() {
            out.insert(kv.key().to_vec(), Kv::of(kv));
        }
        match r.kvs().last() {
            Some(last) if r.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return out,
        }
    }
}

/// Writes `n` keys under `/registry/pods/default/p<i>`; every `lease_every`-th gets one of two leases.
pub async fn seed(c: &mut Client, n: usize, lease_every: usize) -> Vec<i64> {
    let l1 = c.lease_grant(3600, None).await.unwrap().id();
    let l2 = c.lease_grant(600, None).await.unwrap().id();
    for i in 0..n {
        let key = format!("/registry/pods/default/p{i:05}");
        let value = format!("{{\"kind\":\"Pod\",\"n\":{i}}}");
        let opts = (lease_every > 0 && i % lease_every == 0)
            .then(|| PutOptions::new().with_lease(if i % 2 == 0 { l1 } else { l2 }));
        c.put(key, value, opts).await.unwrap();
    }
    vec![l1, l2]
}

/// The Kubernetes-style environment for etcd-migrate on one data dir.
pub struct MigrateEnv {
    pub vars: Vec<(String, String)>,
    pub port: u16,
    pub peer_port: u16,
}

impl MigrateEnv {
    /// TARGET_*, DATA_DIRECTORY, ETCD_BIN_DIR, ETCD_NAME, INITIAL_CLUSTER and peer URLs, on free ports.
    pub fn new(
        data_dir: &Path,
        name: &str,
        target_version: &str,
        target_storage: &str,
    ) -> MigrateEnv {
        let peer_port = free_port();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let vars = vec![
            ("TARGET_VERSION".into(), target_version.into()),
            ("TARGET_STORAGE".into(), target_storage.into()),
            (
                "DATA_DIRECTORY".into(),
                data_dir.to_string_lossy().into_owned(),
            ),
            (
                "ETCD_BIN_DIR".into(),
                bundle().to_string_lossy().into_owned(),
            ),
            ("ETCD_NAME".into(), name.into()),
            ("INITIAL_CLUSTER".into(), format!("{name}={peer}")),
            ("LISTEN_PEER_URLS".into(), peer.clone()),
            ("INITIAL_ADVERTISE_PEER_URLS".into(), peer),
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ];
        MigrateEnv {
            vars,
            port: free_port(),
            peer_port,
        }
    }

    pub fn set(&mut self, k: &str, v: &str) -> &mut Self {
        self.vars.retain(|(n, _)| n != k);
        self.vars.push((k.into(), v.into()));
        self
    }

    /// The command, with `--port` for the private client port.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-migrate"));
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(args)
            .env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs to completion; output captured.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcd-migrate")
    }

    /// Runs to completion and checks that it succeeded (`what` and the output if not).
    pub fn run_ok(&self, args: &[&str], what: &str) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "{what}: {}", text(&out));
        out
    }

    /// `run -- <etcd_flags>`, as a pod's command runs it.
    pub fn run_command(&self, etcd_flags: &[String]) -> Command {
        let mut args = vec!["run", "--"];
        args.extend(etcd_flags.iter().map(|s| s.as_str()));
        self.command(&args)
    }
}

/// stdout + stderr as text, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Unpacks a fixture tarball into `dir` and returns its `data/`.
pub fn untar_fixture(name: &str, dir: &Path) -> PathBuf {
    let st = Command::new("tar")
        .arg("xzf")
        .arg(fixtures().join(format!("{name}.tar.gz")))
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
    dir.join("data")
}

/// A digest of every file's path, mode and bytes under `dir` (the data dir "byte for byte").
pub fn tree_hash(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;
    fn walk(p: &Path, rel: &Path, h: &mut Sha256) {
        let meta = std::fs::symlink_metadata(p).unwrap();
        h.update(rel.to_string_lossy().as_bytes());
        h.update(meta.permissions().mode().to_le_bytes());
        if meta.is_dir() {
            let mut names: Vec<OsString> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(&p.join(&n), &rel.join(&n), h);
            }
        } else if meta.is_file() {
            h.update(std::fs::read(p).unwrap());
        } else if meta.file_type().is_symlink() {
            h.update(std::fs::read_link(p).unwrap().to_string_lossy().as_bytes());
        }
    }
    let mut h = Sha256::new();
    if dir.exists() {
        walk(dir, Path::new(""), &mut h);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Processes whose executable is an etcd of the bundle and whose parent is `ppid` (or any, if None).
pub fn etcd_children(ppid: Option<u32>) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(parent) = parent_pid(pid) else {
            continue;
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if exe.contains("/.bundle/etcd-") && ppid.is_none_or(|p| p == parent) {
            out.push(pid);
        }
    }
    out
}

/// Sockets in LISTEN state owned by `pid` (from /proc/net/tcp{,6}), as "addr:port".
pub fn listening_addrs(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.filter_map(|e| e.ok()) {
            if let Ok(l) = std::fs::read_link(e.path()) {
                let s = l.to_string_lossy().into_owned();
                if let Some(i) = s.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(body) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in body.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            let (addr, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            let ip = if v6 {
                format!("v6:{addr}")
            } else {
                let n = u32::from_str_radix(addr, 16).unwrap();
                std::net::Ipv4Addr::from(n.swap_bytes()).to_string()
            };
            out.push(format!("{ip}:{port}"));
        }
    }
    out
}

/// Seeds the Kubernetes-like data set over v2, many requests in flight.
pub async fn seed_v2(
    url: &str,
    permanent: usize,
    events: usize,
    masterleases: usize,
    outside: usize,
) {
    let http = reqwest::Client::new();
    let mut puts: Vec<(String, String, Option<u64>)> = Vec::new();
    let kinds = [
        "pods",
        "services/specs",
        "minions",
        "namespaces",
        "configmaps",
    ];
    for i in 0..permanent {
        let kind = kinds[i % kinds.len()];
        puts.push((
            format!("/registry/{kind}/default/k{i:05}"),
            format!("{{\"kind\":\"{kind}\",\"i\":{i}}}"),
            None,
        ));
    }
    for i in 0..events {
        puts.push((
            format!("/registry/events/default/e{i:05}"),
            format!("{{\"event\":{i}}}"),
            Some(3600),
        ));
    }
    for i in 0..masterleases {
        let ttl = 30 + (570 * i / masterleases.max(1)) as u64;
        puts.push((
            format!("/registry/masterleases/10.0.{}.{}", i / 250, i % 250),
            format!("{{\"ip\":{i}}}"),
            Some(ttl),
        ));
    }
    for i in 0..outside {
        puts.push((format!("/other/ttl/k{i}"), format!("o{i}"), Some(1200)));
    }
    let mut set = tokio::task::JoinSet::new();
    let mut it = puts.into_iter();
    loop {
        while set.len() < 64 {
            let Some((k, v, ttl)) = it.next() else { break };
            let http = http.clone();
            let url = format!("{url}/v2/keys{k}");
            set.spawn(async move {
                let mut form = vec![("value".to_string(), v)];
                if let Some(t) = ttl {
                    form.push(("ttl".into(), t.to_string()));
                }
                let r = http.put(&url).form(&form).send().await.unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
            });
        }
        if set.join_next().await.is_none() {
            break;
        }
    }
    for d in [
        "/registry/emptydir",
        "/registry/namespaces/emptysub",
        "/other/empty",
    ] {
        let r = http
            .put(format!("{url}/v2/keys{d}"))
            .form(&[("dir", "true")])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
}

/// A fixture unpacked into a fresh temp dir: (the dir, its `data/`).
pub fn unpack(name: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let data = untar_fixture(name, t.path());
    (t, data)
}

/// One logical key of a fixture's keys.json: the last write of each key.
#[derive(Clone, Debug)]
pub struct FixtureKey {
    pub key: String,
    pub value: Option<String>,
    pub dir: bool,
    pub ttl: Option<i64>,
}

pub fn fixture_keys(name: &str) -> Vec<FixtureKey> {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.keys.json"))).unwrap();
    let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut m: BTreeMap<String, FixtureKey> = BTreeMap::new();
    for x in v {
        let key = x["key"].as_str().unwrap().to_string();
        let value = match (x.get("value"), x.get("value_b64")) {
            (Some(s), _) if s.is_string() => s.as_str().map(str::to_string),
            (_, Some(b)) if b.is_string() => {
                let bytes = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    b.as_str().unwrap(),
                )
                .unwrap();
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ => None,
        };
        let ttl = x
            .get("ttl")
            .and_then(|t| t.as_i64())
            .or_else(|| x.get("lease_ttl").and_then(|t| t.as_i64()));
        let dir = x.get("dir").and_then(|d| d.as_bool()).unwrap_or(false);
        m.insert(
            key.clone(),
            FixtureKey {
                key,
                value,
                dir,
                ttl,
            },
        );
    }
    m.into_values().collect()
}

/// The fixture keys as a sorted v2 key stream with indexes 2.. in key order.
pub fn as_v2_keys(
    keys: &[FixtureKey],
    now: std::time::SystemTime,
) -> Vec<etcd_migrate::storage::v2store::V2Key> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| etcd_migrate::storage::v2store::V2Key {
            key: k.key.clone().into_bytes(),
            value: k.value.clone().unwrap_or_default().into_bytes(),
            dir: k.dir,
            expire: k
                .ttl
                .map(|t| etcd_migrate::storage::v2store::ExpireTime::after_ttl(now, t)),
            created_index: 2 + i as u64,
            modified_index: 2 + i as u64,
        })
        .collect()
}

/// Copies a directory tree (cp -a), replacing `to`.
pub fn cp_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    assert!(Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success());
}

/// The leaf keys of a v2 store over its HTTP API: key -> (value, has a TTL).
pub async fn v2_leaves(client_url: &str) -> BTreeMap<String, (String, bool)> {
    let body: serde_json::Value = reqwest::get(format!("{client_url}/v2/keys/?recursive=true"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    fn walk(n: &serde_json::Value, out: &mut BTreeMap<String, (String, bool)>) {
        if n["dir"].as_bool().unwrap_or(false) {
            n["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .for_each(|c| walk(c, out));
        } else if let Some(k) = n["key"].as_str() {
            out.insert(
                k.into(),
                (
                    n["value"].as_str().unwrap_or_default().into(),
                    n["ttl"].is_number(),
                ),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(&body["node"], &mut out);
    out
}

/// A member killed (SIGKILL) before it committed its backend: the writes are in the WAL only,
/// as after an OOM kill or a power loss. Written by 3.4.23 and labelled 3.0.17, like the other
/// native-rollback inputs written here (3.0.17 cannot be run here): the backend and WAL formats
/// are the same. The keys it acknowledged, and how many the backend holds.
pub async fn killed_before_backend_commit(dir: &Path) -> (BTreeMap<Vec<u8>, Kv>, usize) {
    let r = killed_at("3.4.23", dir).await;
    record_version(dir, "3.0.17/etcd3");
    r
}

/// A member of `version` killed with nothing committed to its backend (its writes only in the
/// WAL), recorded as `<version>/etcd3`: the keys acknowledged, and how many the backend holds.
pub async fn killed_at(version: &str, dir: &Path) -> (BTreeMap<Vec<u8>, Kv>, usize) {
    let mut spec = MemberSpec::new(version, dir, "m1");
    // Nothing is committed to the backend until the batch interval or the limit: never here.
    spec.extra = vec![
        "--backend-batch-interval=10m".into(),
        "--backend-batch-limit=1000000".into(),
    ];
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    let mut c = m.client().await;
    seed(&mut c, 300, 10).await;
    c.delete("/registry/pods/default/p00007", None)
        .await
        .unwrap();
    let acked = dump(&mut c).await;
    drop(m); // SIGKILL
    record_version(dir, &format!("{version}/etcd3"));
    use etcd_migrate::storage::{bbolt::Db, mvcc::LiveIndex};
    let db = Db::open(dir.join("member/snap/db")).unwrap();
    let in_backend = LiveIndex::build(&db).unwrap().len();
    (acked, in_backend)
}
