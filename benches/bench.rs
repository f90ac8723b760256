//! Benchmarks with real etcd: `make bench` (or `cargo bench --bench bench -- [p1 p2 p3 p3step p4 p6 ha rejoin sizes dr]`).
//! Each prints its figures and BENCHMARKS.md is rewritten with them and the command that made them.

#[path = "support/bigmember.rs"]
mod bigmember;
#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use etcd_migrate::steps::to_etcd3::{reattach, reattach_naive, Captured};

/// One measured figure.
struct Row {
    id: &'static str,
    what: String,
    figure: String,
    goal: &'static str,
    met: Option<bool>,
}

/// `etcdctl-3.4.23 snapshot restore` of `file` into `dir` as member m1 at `peer`.
fn etcdctl_restore(file: &Path, dir: &Path, peer: &str) -> Command {
    let mut cmd = Command::new(bundle().join("etcdctl-3.4.23"));
    cmd.env_clear()
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(dir)
        .args(["--name", "m1", "--initial-cluster", &format!("m1={peer}")])
        .args(["--initial-advertise-peer-urls", peer]);
    cmd
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Puts `n` keys in batched transactions, many in flight.
async fn bulk_put(
    url: &str,
    n: usize,
    key: impl Fn(usize) -> String + Send + Sync + 'static,
    value: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
    lease: Option<i64>,
) {
    let key = Arc::new(key);
    let value = Arc::new(value);
    let c = Client::connect([url], None).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    let mut i = 0;
    while i < n || !set.is_empty() {
        while set.len() < 16 && i < n {
            let end = (i + 100).min(n);
            let (mut c, key, value) = (c.clone(), key.clone(), value.clone());
            set.spawn(async move {
                let ops: Vec<TxnOp> = (i..end)
                    .map(|j| {
                        TxnOp::put(
                            key(j),
                            value(j),
                            lease.map(|l| PutOptions::new().with_lease(l)),
                        )
                    })
                    .collect();
                c.txn(Txn::new().and_then(ops)).await.unwrap();
            });
            i = end;
        }
        set.join_next().await.unwrap().unwrap();
    }
}

/// Every private etcd stop the benchmarks' runs logged: release -> stop times (ms).
static STOPS: Mutex<std::collections::BTreeMap<String, Vec<u64>>> =
    Mutex::new(std::collections::BTreeMap::new());

/// What one etcd-migrate run measured.
struct Ran {
    took: Duration,
    /// Peak RSS of etcd-migrate itself (MiB), as it logs it: its etcd children are not in it.
    own_mb: u64,
    /// Peak RSS of the largest child it reaped (a step's etcd), MiB.
    etcd_mb: u64,
    log: String,
}

/// A field `name=<number>` of the last log line containing `marker`.
fn log_field(log: &str, marker: &str, name: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(marker))?;
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Runs the release etcd-migrate with Kubernetes-style env.
fn run_migrate(env: &MigrateEnv, args: &[&str]) -> Ran {
    let out = tempfile::NamedTempFile::new().unwrap();
    let t = Instant::now();
    let mut child = env
        .command(args)
        .stdout(Stdio::null())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let took = t.elapsed();
    let log = fs::read_to_string(out.path()).unwrap_or_default();
    assert!(
        status.success(),
        "etcd-migrate {args:?} failed:\n{}",
        log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
    );
    for line in log.lines().filter(|l| l.contains(" stopped elapsed_ms=")) {
        let Some(rel) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("etcd-"))
        else {
            continue;
        };
        if let Some(ms) = log_field(line, "stopped", "elapsed_ms") {
            STOPS
                .lock()
                .unwrap()
                .entry(rel.to_string())
                .or_default()
                .push(ms);
        }
    }
    Ran {
        took,
        own_mb: log_field(&log, "migration complete", "peak_rss_mb").unwrap_or(0),
        etcd_mb: log_field(&log, "migration complete", "etcd_peak_rss_mb").unwrap_or(0),
        log,
    }
}

/// The newest etcd 3.5 of the bundle (Debian's current one).
fn new35() -> String {
    newest_35()
}

/// Start, first successful write, stop: what an operator's bare restart costs.
async fn bare_cycle(version: &str, dir: &Path, name: &str, extra: &[&str]) -> Duration {
    let mut spec = MemberSpec::new(version, dir, name);
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    let t = Instant::now();
    first_write_cycle(spec).await;
    t.elapsed()
}

/// Starts `spec`, waits for the first successful write through it, stops it (SIGTERM, wait).
async fn first_write_cycle(spec: MemberSpec) {
    let m = Member::spawn(spec);
    loop {
        if let Ok(mut c) = Client::connect(
            [m.client_url.as_str()],
            Some(
                etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(100))
                    .with_timeout(Duration::from_secs(5)),
            ),
        )
        .await
        {
            if c.put("/bench/probe", "1", None).await.is_ok() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    m.stop();
}

async fn seeded(version: &str, dir: &Path, name: &str, n: usize, value_len: usize) {
    let m = Member::start(version, dir, name);
    let lease = m.client().await.lease_grant(3600, None).await.unwrap().id();
    bulk_put(
        &m.client_url,
        n,
        |i| format!("/registry/pods/ns-{}/p{i:07}", i % 100),
        move |i| {
            format!("{{\"n\":{i}}}")
                .into_bytes()
                .into_iter()
                .chain(std::iter::repeat_n(b'x', value_len))
                .collect()
        },
        None,
    )
    .await;
    let mut c = m.client().await;
    for i in 0..n.min(1000) {
        c.put(
            format!("/registry/events/default/e{i}"),
            "e",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    }
    m.stop();
    fs::write(dir.join("version.txt"), format!("{version}/etcd3\n")).unwrap();
}

/// The quota an operator of a member past etcd's default 2 GiB has set (else etcd raises its
/// NOSPACE alarm at once and refuses every write): the bare runs get it, as etcd-migrate gives
/// its private etcd one above the member's size.
const BARE_QUOTA: &str = "--quota-backend-bytes=8589934592";

/// Copies `seed` to `to` and waits for the copy to reach the disk, so that no run is timed
/// against the writeback of the one before.
fn fresh_copy(seed: &Path, to: &Path) {
    cp_dir(seed, to);
    assert!(Command::new("sync").status().unwrap().success());
}

/// One P1 case: `runs` upgrade steps of copies of `seed` (recorded at `from`) to `to` by
/// etcd-migrate, each beside a plain bare cycle of `to` (the operator's restart: start, first
/// write, stop) and one with our single-member election flags, on copies of the same data.
struct P1 {
    ratio: f64,
    /// Each run's, in run order.
    ratios: Vec<f64>,
    ratio_fast: f64,
    ours: f64,
    bare: f64,
    bare_fast: f64,
    own_mb: u64,
    etcd_mb: u64,
    /// The median run's journal detail (where the step's time went).
    detail: serde_json::Value,
}

async fn p1_case(root: &Path, seed: &Path, to: &str, runs: usize) -> P1 {
    let (mut ours, mut bare, mut bare_fast, mut own, mut etcd) =
        (Vec::new(), Vec::new(), Vec::new(), 0, 0);
    let mut details = Vec::new();
    for r in 0..runs {
        let a = root.join(format!("p1-a{r}"));
        fresh_copy(seed, &a);
        let mut env = MigrateEnv::new(&a, "m1", to, "etcd3");
        env.set("CHILD_OUTPUT", "quiet");
        let ran = run_migrate(&env, &["migrate"]);
        ours.push(secs(ran.took));
        (own, etcd) = (own.max(ran.own_mb), etcd.max(ran.etcd_mb));
        details.push((secs(ran.took), step_detail(&a)));
        fs::remove_dir_all(&a).unwrap();
        let _ = fs::remove_dir_all(a.with_extension("etcd-migrate"));
        let b = root.join(format!("p1-b{r}"));
        fresh_copy(seed, &b);
        bare.push(secs(bare_cycle(to, &b, "m1", &[BARE_QUOTA]).await));
        fs::remove_dir_all(&b).unwrap();
        fresh_copy(seed, &b);
        let fast = [
            "--heartbeat-interval=10",
            "--election-timeout=100",
            BARE_QUOTA,
        ];
        bare_fast.push(secs(bare_cycle(to, &b, "m1", &fast).await));
        fs::remove_dir_all(&b).unwrap();
    }
    let ratios: Vec<f64> = ours.iter().zip(&bare).map(|(o, b)| o / b).collect();
    let ratios_fast: Vec<f64> = ours.iter().zip(&bare_fast).map(|(o, b)| o / b).collect();
    details.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
    P1 {
        ratio: median(ratios.clone()),
        ratios,
        ratio_fast: median(ratios_fast),
        ours: median(ours),
        bare: median(bare),
        bare_fast: median(bare_fast),
        own_mb: own,
        etcd_mb: etcd,
        detail: details[details.len() / 2].1.clone(),
    }
}

/// The detail of the last step in a data dir's journal.
fn step_detail(data: &Path) -> serde_json::Value {
    journal(data)
        .into_iter()
        .rfind(|e| e["event"] == "step")
        .map(|e| {
            let mut d = e["detail"].clone();
            d["elapsed_ms"] = e["elapsed_ms"].clone();
            d
        })
        .unwrap_or_default()
}

/// Where a step's time went, from its journal detail.
fn stages(d: &serde_json::Value) -> String {
    let ms = |k: &str| {
        d[k].as_u64()
            .map(|v| format!("{k} {:.2} s", v as f64 / 1000.0))
    };
    let stops: Vec<String> = d["stops"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            format!(
                "stop of {} {} ms",
                s["etcd"].as_str().unwrap_or("?"),
                s["stop_ms"]
            )
        })
        .collect();
    [
        "elapsed_ms",
        "healthy_ms",
        "verify_ms",
        "snapshot_save_ms",
        "snapshot_restore_ms",
        "prove_ms",
    ]
    .iter()
    .filter_map(|k| ms(k))
    .chain(stops)
    .collect::<Vec<_>>()
    .join(", ")
    .replace("elapsed_ms", "step")
    .replace("_ms ", " ")
}

async fn p1(root: &Path) -> Vec<Row> {
    let new = new35();
    let seed = root.join("p1-seed");
    seeded("3.4.23", &seed, "m1", 10_000, 200).await;
    let c = p1_case(root, &seed, &new, 5).await;
    let patch_seed = root.join("p1-patch-seed");
    seeded("3.5.1", &patch_seed, "m1", 10_000, 200).await;
    let p = p1_case(root, &patch_seed, &new, 5).await;
    println!("P1 3.4.23 -> {new}: step {:.3}s, bare {:.3}s, fast bare {:.3}s: {:.3} / {:.3}; patch 3.5.1 -> {new}: {:.3} / {:.3}", c.ours, c.bare, c.bare_fast, c.ratio, c.ratio_fast, p.ratio, p.ratio_fast);
    vec![
        Row { id: "P1", what: format!("upgrade step 3.4.23 -> {new}, 10,000 keys, / bare start-write-stop of etcd-{new} (median of 5)"), figure: format!("{:.3} (step {:.2} s, bare {:.2} s)", c.ratio, c.ours, c.bare), goal: "<= 1.05", met: Some(c.ratio <= 1.05) },
        Row { id: "P1'", what: "the same, bare etcd given our single-member election flags (our own overhead)".into(), figure: format!("{:.3} (bare {:.2} s)", c.ratio_fast, c.bare_fast), goal: "(report)", met: None },
        Row { id: "P1 patch", what: format!("patch step 3.5.1 -> {new}, 10,000 keys, / bare cycle of etcd-{new} (median of 5)"), figure: format!("{:.3} (step {:.2} s, bare {:.2} s; same-flags {:.3})", p.ratio, p.ours, p.bare, p.ratio_fast), goal: "<= 1.05", met: Some(p.ratio <= 1.05) },
    ]
}

/// P1 and P6 on the cached big members: the slope with size.
async fn sizes(root: &Path) -> Vec<Row> {
    let new = new35();
    let mut rows = Vec::new();
    // BENCH_SIZES=1g (or 4g) runs one size only.
    let only = std::env::var("BENCH_SIZES").ok();
    // BENCH_SIZES_P6=0 leaves the rollback rows out (a rerun of the upgrade rows alone).
    let p6 = std::env::var("BENCH_SIZES_P6").map_or(true, |v| v != "0");
    // Row ids name the size: a merge replaces rows by id. The 4 GB upgrade gets more runs: its
    // start reads 4 GB and the page cache makes single runs vary by a third.
    let sizes = [
        (
            "1g",
            1u64 << 30,
            3,
            3,
            ["P1 1g", "RSS upgrade 1g", "P6 1g", "RSS rollback 1g"],
        ),
        (
            "4g",
            4u64 << 30,
            5,
            2,
            ["P1 4g", "RSS upgrade 4g", "P6 4g", "RSS rollback 4g"],
        ),
    ];
    for (name, bytes, runs, p6_runs, ids) in sizes {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let seed = bigmember::member(name, bytes).await;
        let shape = bigmember::describe(&seed);
        let c = p1_case(root, &seed, &new, runs).await;
        println!(
            "P1 {name}: step {:.2}s, bare {:.2}s: {:.3} (runs {:.3?}); {}",
            c.ours,
            c.bare,
            c.ratio,
            c.ratios,
            stages(&c.detail)
        );
        rows.push(Row { id: ids[0], what: format!("upgrade step 3.4.23 -> {new} of a {name} member ({shape}) / bare cycle (median of {runs}, each run's ratio on fresh copies)"), figure: format!("{:.3} (step {:.2} s, bare {:.2} s; runs {}; same-flags {:.3}; {})", c.ratio, c.ours, c.bare, c.ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "), c.ratio_fast, stages(&c.detail)), goal: "<= 1.10", met: Some(c.ratio <= 1.10) });
        rows.push(Row {
            id: ids[1],
            what: "the same: peak RSS of etcd-migrate itself; of its private etcd".into(),
            figure: format!("{} MiB; etcd {} MiB", c.own_mb, c.etcd_mb),
            goal: "<= 256 MB",
            met: Some(c.own_mb <= 244),
        });
        if !p6 {
            continue;
        }
        // P6 on the member upgraded once (the rollback's own starting point).
        let up = root.join(format!("p6-{name}-seed"));
        cp_dir(&seed, &up);
        let mut env = MigrateEnv::new(&up, "m1", &new, "etcd3");
        env.set("CHILD_OUTPUT", "quiet");
        run_migrate(&env, &["migrate"]);
        let r = p6_case(root, &up, &new, p6_runs).await;
        fs::remove_dir_all(&up).unwrap();
        rows.push(Row { id: ids[2], what: format!("minor rollback {new} -> 3.4.23 of the {name} member / bare start + snapshot save + stop + restore (median of {p6_runs})"), figure: format!("{:.3} ({:.2} s vs {:.2} s; {})", r.ratio, r.ours, r.bare, stages(&r.detail)), goal: "<= 1.15", met: Some(r.ratio <= 1.15) });
        rows.push(Row {
            id: ids[3],
            what: "the same: peak RSS of etcd-migrate itself; of its private etcd".into(),
            figure: format!("{} MiB; etcd {} MiB", r.own_mb, r.etcd_mb),
            goal: "<= 256 MB",
            met: Some(r.own_mb <= 244),
        });
    }
    if only.as_deref().is_none_or(|o| o == "1g") {
        rows.extend(storage_migration_1g(root).await);
    }
    rows
}

/// Which child of a storage migration peaked: `etcdctl migrate` (the children's peak when it
/// was reaped, from the journal) or the private etcd after it (the rest).
fn which_child(det: &serde_json::Value, children_mb: u64) -> String {
    let Some(tool) = det["children_peak_rss_mb_after_etcdctl_migrate"].as_u64() else {
        return "per child: not recorded".into();
    };
    if children_mb > tool {
        format!("etcdctl migrate {tool} MiB; the private etcd serving v2 and v3 {children_mb} MiB")
    } else {
        format!("etcdctl migrate {tool} MiB; the private etcd at most that")
    }
}

/// The storage migration etcd2 -> etcd3 of a 1 GB etcd2 member, at 3.4.23: time, where it went,
/// and memory (etcd-migrate's own; `etcdctl migrate` and the private etcd are children).
async fn storage_migration_1g(root: &Path) -> Vec<Row> {
    let seed = bigmember::member_v2("1g", 1 << 30).await;
    let shape = bigmember::describe(&seed);
    let d = root.join("mig-1g/data");
    fs::create_dir_all(d.parent().unwrap()).unwrap();
    fresh_copy(&seed, &d);
    let mut env = MigrateEnv::new(&d, "m1", "3.4.23", "etcd3");
    env.set("CHILD_OUTPUT", "quiet");
    let ran = run_migrate(&env, &["migrate"]);
    let det = step_detail(&d);
    let s = |k: &str| det[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    println!("storage migration 1g: {:.1}s (etcdctl migrate {:.1}s, capture {:.1}s, reattach {:.1}s), own {} MiB, children {} MiB", secs(ran.took), s("etcdctl_migrate_ms"), s("capture_ms"), s("reattach_ms"), ran.own_mb, ran.etcd_mb);
    fs::remove_dir_all(d.parent().unwrap()).unwrap();
    vec![
        Row { id: "P3 1g", what: format!("storage migration etcd2 -> etcd3 at 3.4.23 of a 1 GB etcd2 member ({shape})"), figure: format!("{:.1} s: etcdctl migrate {:.1} s, capture {:.1} s, reattach {:.1} s; {} TTL keys leased", secs(ran.took), s("etcdctl_migrate_ms"), s("capture_ms"), s("reattach_ms"), det["ttl_keys_leased"]), goal: "(report)", met: None },
        Row { id: "RSS migrate", what: "the same: peak RSS of etcd-migrate itself; of its largest child (etcdctl migrate or the private etcd)".into(), figure: format!("{} MiB; children {} MiB ({})", ran.own_mb, ran.etcd_mb, which_child(&det, ran.etcd_mb)), goal: "<= 256 MB", met: Some(ran.own_mb <= 244) },
    ]
}

async fn p2(root: &Path) -> Vec<Row> {
    let d = root.join("p2");
    let new = new35();
    seeded(&new, &d, "m1", 1000, 50).await;
    let env = MigrateEnv::new(&d, "m1", &new, "etcd3");
    let runs: Vec<f64> = (0..21)
        .map(|_| secs(run_migrate(&env, &["migrate"]).took) * 1000.0)
        .collect();
    let m = median(runs);
    println!("P2 no-op run at target: median {m:.2} ms of 21");
    vec![Row {
        id: "P2",
        what: "no-op run at the target (median of 21, process start to exit)".into(),
        figure: format!("{m:.2} ms"),
        goal: "<= 10 ms",
        met: Some(m <= 10.0),
    }]
}

async fn p3(root: &Path) -> Vec<Row> {
    let n = 100_000;
    let naive_n = 10_000;
    let d = root.join("p3");
    // The flags the storage migration gives its private etcd (single member, bulk rewrite).
    let release = etcd_migrate::release::Release::new("3.4.23".parse().unwrap());
    let ops = release.max_txn_ops(true);
    let mut spec = MemberSpec::new("3.4.23", &d, "m1");
    spec.extra = vec![
        "--heartbeat-interval=10".into(),
        "--election-timeout=100".into(),
    ];
    spec.extra.extend(release.txn_ops_flag(ops));
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    bulk_put(
        &m.client_url,
        n,
        |i| format!("/registry/events/ns-{}/e{i:07}", i % 50),
        |i| format!("{{\"kind\":\"Event\",\"reason\":\"Started\",\"count\":{i}}}").into_bytes(),
        None,
    )
    .await;
    let mut c = m.client().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let mut keys = Vec::with_capacity(n);
    let kvs = dump(&mut c).await;
    for (i, (k, kv)) in kvs.into_iter().enumerate() {
        keys.push(Captured {
            key: String::from_utf8(k).unwrap(),
            value: String::from_utf8(kv.value).unwrap(),
            created_index: kv.create_revision,
            modified_index: kv.mod_revision,
            expires_unix_ns: now + (3000 + (i % 600) as i128) * 1_000_000_000,
        });
    }
    let v3 = etcd_migrate::etcd::v3::V3::connect(&m.client_url, Duration::from_secs(30))
        .await
        .unwrap();
    let cpu = |pid: u32| -> f64 {
        let st = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = st.rsplit_once(") ").unwrap().1.split(' ').collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    };
    let self_cpu = || {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        ru.ru_utime.tv_sec as f64
            + ru.ru_utime.tv_usec as f64 / 1e6
            + ru.ru_stime.tv_sec as f64
            + ru.ru_stime.tv_usec as f64 / 1e6
    };
    let (e0, s0) = (cpu(m.pid()), self_cpu());
    let t = Instant::now();
    let att = reattach(v3.clone(), &keys, 1, ops).await.unwrap();
    let batched = t.elapsed();
    println!(
        "P3 cpu: etcd {:.2}s, client {:.2}s over {:.2}s",
        cpu(m.pid()) - e0,
        self_cpu() - s0,
        secs(batched)
    );
    assert_eq!(att.attached, n as u64);
    let naive = reattach_naive(v3, &keys[..naive_n], 1).await.unwrap();
    let rate = n as f64 / secs(batched);
    let naive_rate = naive_n as f64 / secs(naive);
    println!("P3 reattach {n} keys in {:.2}s = {rate:.0} keys/s ({} leases); naive {naive_n} keys in {:.2}s = {naive_rate:.0} keys/s; ratio {:.1}", secs(batched), att.leases, secs(naive), rate / naive_rate);
    m.stop();
    vec![
        Row { id: "P3", what: format!("reattach {n} TTL keys (600 TTL buckets), etcd 3.4.23, {ops} puts per guarded txn"), figure: format!("{rate:.0} keys/s ({:.2} s)", secs(batched)), goal: ">= 50,000 keys/s", met: Some(rate >= 50_000.0) },
        Row { id: "P3 ratio", what: format!("the same / a naive client putting keys one by one (measured on {naive_n} keys, same run)"), figure: format!("{:.1}x (naive {naive_rate:.0} keys/s)", rate / naive_rate), goal: ">= 10x", met: Some(rate / naive_rate >= 10.0) },
    ]
}

async fn p3_step(root: &Path) -> Vec<Row> {
    let d = root.join("p3step");
    let mut spec = MemberSpec::new("3.4.23", &d, "m1");
    spec.extra = vec!["--enable-v2=true".into()];
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    seed_v2(&m.client_url, 50_000, 50_000, 0, 0).await;
    m.stop();
    fs::write(d.join("version.txt"), "3.4.23/etcd2\n").unwrap();
    let env = MigrateEnv::new(&d, "m1", "3.4.23", "etcd3");
    let ran = run_migrate(&env, &["migrate"]);
    let (took, rss) = (ran.took, ran.own_mb * 1024);
    let j = fs::read_to_string(d.join("etcd-migrate.journal")).unwrap();
    let e: serde_json::Value = j
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["kind"] == "migrate-storage")
        .unwrap();
    let det = &e["detail"];
    let mig = det["etcdctl_migrate_ms"].as_f64().unwrap() / 1000.0;
    let share = mig / secs(took) * 100.0;
    println!("P3 step: 100,000 keys etcd2 -> etcd3 in {:.2}s (etcdctl migrate {mig:.2}s = {share:.0}%, capture {} ms, reattach {} ms), peak RSS {} MiB", secs(took), det["capture_ms"], det["reattach_ms"], rss / 1024);
    vec![Row {
        id: "P3 step",
        what: "whole storage migration, 100,000 keys (50,000 with TTL), 3.4.23/etcd2 -> 3.4.23/etcd3".into(),
        figure: format!("{:.2} s, {share:.0}% in etcdctl migrate (capture {:.2} s, reattach {:.2} s), peak RSS {} MiB", secs(took), det["capture_ms"].as_f64().unwrap() / 1000.0, det["reattach_ms"].as_f64().unwrap() / 1000.0, rss / 1024),
        goal: "(report)",
        met: None,
    }]
}

async fn p4(root: &Path) -> Vec<Row> {
    let n: usize = std::env::var("BENCH_P4_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let d = root.join("p4/data");
    let m = Member::start("3.4.23", &d, "m1");
    let lease = m.client().await.lease_grant(3600, None).await.unwrap().id();
    bulk_put(
        &m.client_url,
        n,
        |i| format!("/registry/configmaps/ns-{}/cm-{i:07}", i % 1000),
        |i| {
            let mut v = format!("{{\"kind\":\"ConfigMap\",\"n\":{i},\"data\":\"").into_bytes();
            v.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 1000));
            v.extend_from_slice(b"\"}");
            v
        },
        None,
    )
    .await;
    bulk_put(
        &m.client_url,
        10_000,
        |i| format!("/registry/events/default/e{i}"),
        |_| b"{}".to_vec(),
        Some(lease),
    )
    .await;
    m.stop();
    // Written by 3.4.23, labelled 3.0.17: no 3.0.17 binary here, and the native rollback reads
    // the backend offline, whose format is the same.
    fs::write(d.join("version.txt"), "3.0.17/etcd3\n").unwrap();
    // The 2.4 GB etcd just wrote would otherwise still be going to disk while cp and the
    // rollbacks are timed.
    assert!(Command::new("sync").status().unwrap().success());
    let db = d.join("member/snap/db");
    let db_bytes = fs::metadata(&db).unwrap().len();
    // cp of the db file (page cache to page cache), and a durable one (then fsync of the copy,
    // as our output is): medians of 3.
    let copy = root.join("p4/db.copy");
    let cp_once = |durable: bool| {
        let t = Instant::now();
        assert!(Command::new("cp")
            .arg(&db)
            .arg(&copy)
            .status()
            .unwrap()
            .success());
        if durable {
            fs::File::open(&copy).unwrap().sync_all().unwrap();
        }
        let took = t.elapsed();
        fs::remove_file(&copy).unwrap();
        took.as_secs_f64()
    };
    let cp_time = Duration::from_secs_f64(median((0..3).map(|_| cp_once(false)).collect()));
    let cp_sync = Duration::from_secs_f64(median((0..3).map(|_| cp_once(true)).collect()));
    let mut env = MigrateEnv::new(&d, "m1", "2.2.1", "etcd2");
    env.set("CHILD_OUTPUT", "quiet");
    // Three rollbacks of the same data (each puts the backup back for the next); the median run's
    // figures are reported, the highest peak RSS.
    let mut runs = Vec::new();
    let mut backup = PathBuf::new();
    for r in 0..3 {
        let ran = run_migrate(&env, &["migrate"]);
        let (took, rss, log) = (ran.took, ran.own_mb as i64 * 1024, ran.log);
        // Where the time went: the step's own sub-step figures from the journal; the rest of
        // the run is before the step (reading the WAL to inspect and plan) and after it.
        let journal = fs::read_to_string(d.join("etcd-migrate.journal")).unwrap();
        let step: serde_json::Value =
            serde_json::from_str(journal.lines().last().unwrap()).unwrap();
        let ms = |k: &str| step["detail"][k].as_f64().unwrap_or(f64::NAN) / 1000.0;
        let outside = secs(took) - step["elapsed_ms"].as_f64().unwrap() / 1000.0;
        let split = format!(
            "index scan {:.1} s, values + JSON + fsync {:.1} s, before and after the step {outside:.1} s",
            ms("read_ms"),
            ms("write_ms")
        );
        runs.push((took, rss, log, split));
        backup = PathBuf::from(step["detail"]["backup"].as_str().unwrap());
        if r < 2 {
            fs::remove_dir_all(&d).unwrap();
            fs::rename(&backup, &d).unwrap();
        }
    }
    let rss = runs.iter().map(|r| r.1).max().unwrap();
    runs.sort_by_key(|r| r.0);
    let (took, _, log, split) = runs.swap_remove(1);
    let ratio = secs(cp_time) / secs(took);
    let rss_mib = rss / 1024;
    // The least any rollback of this member must do, with no CPU spent on parsing, indexing or
    // JSON: read the whole WAL and the db once each, and write a file the size of the snapshot
    // written and fsync it. Read from the last run's backup (the member as it was), the output
    // made of the db's bytes as they are read.
    let snap_bytes: u64 = fs::read_dir(d.join("member/snap"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "snap"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(snap_bytes > 0, "the rollback wrote no snapshot");
    let out = root.join("p4/floor.out");
    let floor = Duration::from_secs_f64(median(
        (0..3)
            .map(|_| move_bytes_once(&backup, snap_bytes, &out))
            .collect(),
    ));
    let floor_ratio = secs(cp_time) / secs(floor);
    println!("P4 rollback of {n} keys ({:.0} MB db) in {:.1}s ({split}); cp {:.1}s; throughput ratio {ratio:.2}; peak RSS {rss_mib} MiB; floor {:.2}s (ratio {floor_ratio:.2})", db_bytes as f64 / 1e6, secs(took), secs(cp_time), secs(floor));
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        println!("{log}");
    }
    vec![
        Row { id: "P4", what: format!("native rollback of 1,010,000 keys ({:.2} GB db) to 2.2.1: time / the floor below (medians of 3)", db_bytes as f64 / 1e9), figure: format!("{:.1}x ({:.1} s: {split}; floor {:.2} s)", secs(took) / secs(floor), secs(took), secs(floor)), goal: "<= 2x floor", met: Some(secs(took) <= 2.0 * secs(floor)) },
        Row { id: "P4 cp", what: "the same: cp of the db file / the rollback (throughput against a plain copy; and against a durable copy, cp then fsync)".into(), figure: format!("{ratio:.2} (cp {:.1} s); durable {:.2} (cp + fsync {:.1} s)", secs(cp_time), secs(cp_sync) / secs(took), secs(cp_sync)), goal: "(report)", met: None },
        Row { id: "P4 RSS", what: "the same: peak RSS of etcd-migrate".into(), figure: format!("{rss_mib} MiB"), goal: "<= 256 MB", met: Some(rss_mib <= 244) },
        Row { id: "P4 floor", what: format!("the bytes any rollback of this member must move, and nothing else: read the WAL and the db once, write {:.2} GB (the snapshot's size) and fsync it, writeback started every 32 MiB as the rollback does; cp of the db / that (median of 3)", snap_bytes as f64 / 1e9), figure: format!("{floor_ratio:.2} ({:.2} s)", secs(floor)), goal: "(report)", met: None },
    ]
}

/// Reads every WAL file and the db of `member_dir` through a 1 MiB buffer, writing the first
/// `out_bytes` bytes read from the db (then zeros, if the db is shorter) to `out` as they come,
/// and fsyncs it: seconds taken.
fn move_bytes_once(member_dir: &Path, out_bytes: u64, out: &Path) -> f64 {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut wal: Vec<PathBuf> = fs::read_dir(member_dir.join("member/wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    wal.sort();
    assert!(!wal.is_empty(), "no WAL in {}", member_dir.display());
    for path in &wal {
        let mut f = fs::File::open(path).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
    let mut db = fs::File::open(member_dir.join("member/snap/db")).unwrap();
    let mut dst = fs::File::create(out).unwrap();
    // Writeback started every 32 MiB, as the rollback does, so the disk works while we write.
    let (mut written, mut flushed) = (0u64, 0u64);
    loop {
        let mut n = db.read(&mut buf).unwrap();
        if n == 0 {
            if written >= out_bytes {
                break;
            }
            buf.fill(0);
            n = buf.len();
        }
        let take = n.min((out_bytes - written) as usize);
        dst.write_all(&buf[..take]).unwrap();
        written += take as u64;
        if written - flushed >= 32 << 20 {
            etcd_migrate::fsutil::start_writeback(&dst, flushed, written - flushed);
            flushed = written;
        }
    }
    dst.sync_all().unwrap();
    let took = t.elapsed().as_secs_f64();
    assert_eq!(fs::metadata(out).unwrap().len(), out_bytes);
    fs::remove_file(out).unwrap();
    took
}

/// One P6 case: minor rollbacks of copies of `seed` (at `from`) to 3.4.23, each beside the bare
/// way: start `from`, `snapshot save` once it serves, stop, `snapshot restore` with 3.4.23's
/// etcdctl.
struct P6 {
    ratio: f64,
    ours: f64,
    bare: f64,
    own_mb: u64,
    etcd_mb: u64,
    detail: serde_json::Value,
}

async fn p6_case(root: &Path, seed: &Path, from: &str, runs: usize) -> P6 {
    let (mut ours, mut bare, mut own, mut etcd, mut details) =
        (Vec::new(), Vec::new(), 0, 0, Vec::new());
    for r in 0..runs {
        let a = root.join(format!("p6-a{r}/data"));
        fs::create_dir_all(a.parent().unwrap()).unwrap();
        fresh_copy(seed, &a);
        let mut env = MigrateEnv::new(&a, "m1", "3.4.23", "etcd3");
        env.set("CHILD_OUTPUT", "quiet");
        let ran = run_migrate(&env, &["migrate"]);
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            println!("{}", ran.log);
        }
        ours.push(secs(ran.took));
        (own, etcd) = (own.max(ran.own_mb), etcd.max(ran.etcd_mb));
        details.push((secs(ran.took), step_detail(&a)));
        fs::remove_dir_all(a.parent().unwrap()).unwrap();
        let b = root.join(format!("p6-b{r}/data"));
        fs::create_dir_all(b.parent().unwrap()).unwrap();
        fresh_copy(seed, &b);
        let mut spec = MemberSpec::new(from, &b, "m1");
        spec.extra = vec![BARE_QUOTA.to_string()];
        let (url, peer) = (spec.client_url(), spec.peer_url());
        let t = Instant::now();
        let m = Member::spawn(spec);
        let snap = b.with_file_name("snap.db");
        loop {
            let st = Command::new(bundle().join(format!("etcdctl-{from}")))
                .args(["--endpoints", &url, "snapshot", "save"])
                .arg(&snap)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if st.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        m.stop();
        let st = etcdctl_restore(&snap, &b.with_file_name("restored"), &peer)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        bare.push(secs(t.elapsed()));
        fs::remove_dir_all(b.parent().unwrap()).unwrap();
    }
    let ratios: Vec<f64> = ours.iter().zip(&bare).map(|(o, b)| o / b).collect();
    details.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
    P6 {
        ratio: median(ratios),
        ours: median(ours),
        bare: median(bare),
        own_mb: own,
        etcd_mb: etcd,
        detail: details[details.len() / 2].1.clone(),
    }
}

async fn p6(root: &Path) -> Vec<Row> {
    let new = new35();
    let seed = root.join("p6-seed");
    seeded(&new, &seed, "m1", 10_000, 200).await;
    let r = p6_case(root, &seed, &new, 3).await;
    println!(
        "P6 minor rollback {:.2}s, bare save+restore {:.2}s: {:.3}; {}",
        r.ours,
        r.bare,
        r.ratio,
        stages(&r.detail)
    );
    vec![Row { id: "P6", what: format!("minor rollback {new} -> 3.4.23 of 10,000 keys / bare start + snapshot save + stop + restore (median of 3)"), figure: format!("{:.3} ({:.2} s vs {:.2} s)", r.ratio, r.ours, r.bare), goal: "<= 1.15", met: Some(r.ratio <= 1.15) }]
}

/// Rolls a three-member 3.4.23 cluster to the newest 3.5, by etcd-migrate `run` or by a bare
/// restart; returns each member's downtime (from the SIGTERM of its 3.4.23 to the new release
/// serving a write through it) and the longest window of failed client writes.
async fn roll(root: &Path, with_migrate: bool) -> (Vec<f64>, f64) {
    let new = new35();
    let mut specs: Vec<MemberSpec> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| MemberSpec::new("3.4.23", &root.join(n), n))
        .collect();
    let ic = specs
        .iter()
        .map(|s| format!("{}={}", s.name, s.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    for s in &mut specs {
        s.initial_cluster = Some(ic.clone());
    }
    let mut members: Vec<Option<Member>> = specs
        .iter()
        .map(|s| Some(Member::spawn(s.clone())))
        .collect();
    let eps: Vec<String> = specs.iter().map(|s| s.client_url()).collect();
    let mut c = Client::connect(eps.clone(), None).await.unwrap();
    while c.put("/warm", "1", None).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in &specs {
        fs::write(s.data_dir.join("version.txt"), "3.4.23/etcd3\n").unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gap = Arc::new(Mutex::new(0f64));
    let writer = {
        let (stop, gap, eps) = (stop.clone(), gap.clone(), eps.clone());
        tokio::spawn(async move {
            let opts = etcd_client::ConnectOptions::new()
                .with_timeout(Duration::from_secs(1))
                .with_connect_timeout(Duration::from_millis(200));
            let mut c = Client::connect(eps, Some(opts)).await.unwrap();
            let mut last_ok = Instant::now();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                if c.put(format!("/w/{i}"), "x", None).await.is_ok() {
                    let g = secs(last_ok.elapsed());
                    let mut m = gap.lock().unwrap();
                    *m = m.max(g);
                    last_ok = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut kids = Vec::new();
    let mut per = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let t = Instant::now();
        members[i].take().unwrap().stop();
        let flags: Vec<String> = s
            .flags()
            .into_iter()
            .map(|f| if f == "new" { "existing".into() } else { f })
            .collect();
        let child = if with_migrate {
            let mut env = MigrateEnv::new(&s.data_dir, &s.name, &new, "etcd3");
            env.set("INITIAL_CLUSTER", &ic)
                .set("LISTEN_PEER_URLS", &s.peer_url())
                .set("INITIAL_ADVERTISE_PEER_URLS", &s.peer_url());
            let mut args = vec!["run", "--"];
            args.extend(flags.iter().map(|f| f.as_str()));
            env.command(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        } else {
            spawn_etcd(&new, &flags)
        };
        kids.push(child);
        let mut one = loop {
            if let Ok(c) = Client::connect(
                [s.client_url()],
                Some(
                    etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_millis(100))
                        .with_timeout(Duration::from_secs(2)),
                ),
            )
            .await
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        loop {
            if http_get(&s.client_url(), "/version")
                .is_some_and(|v| v.contains(&format!("\"etcdserver\":\"{new}\"")))
                && one.put("/roll", s.name.as_str(), None).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        per.push(secs(t.elapsed()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    for mut k in kids {
        unsafe { libc::kill(k.id() as i32, libc::SIGTERM) };
        let _ = k.wait();
    }
    let g = *gap.lock().unwrap();
    (per, g)
}

/// Rolls a fresh three-member cluster this many times each way: a single roll swings by a factor
/// of several with how fast the peers' raft transports reconnect.
const HA_ROLLS: usize = 5;

async fn ha(root: &Path) -> Vec<Row> {
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for r in 0..HA_ROLLS {
        ours.push(roll(&root.join(format!("ha-ours-{r}")), true).await);
        bare.push(roll(&root.join(format!("ha-bare-{r}")), false).await);
    }
    let total = |v: &[(Vec<f64>, f64)]| median(v.iter().map(|(per, _)| per.iter().sum()).collect());
    let member =
        |v: &[(Vec<f64>, f64)], i: usize| median(v.iter().map(|(per, _)| per[i]).collect());
    let gap = |v: &[(Vec<f64>, f64)]| median(v.iter().map(|(_, g)| *g).collect());
    let (to, tb) = (total(&ours), total(&bare));
    let r = to / tb;
    let per = |v: &[(Vec<f64>, f64)]| (0..3).map(|i| member(v, i)).collect::<Vec<f64>>();
    let (po, pb) = (per(&ours), per(&bare));
    println!("HA rolls ({HA_ROLLS} each): etcd-migrate totals {:.2?}, bare {:.2?}; medians {to:.2}s vs {tb:.2}s, ratio {r:.2}; per member {po:.2?} vs {pb:.2?}; longest write gap (median) {:.2}s vs {:.2}s",
        ours.iter().map(|(p, _)| p.iter().sum::<f64>()).collect::<Vec<_>>(),
        bare.iter().map(|(p, _)| p.iter().sum::<f64>()).collect::<Vec<_>>(),
        gap(&ours), gap(&bare));
    let new = new35();
    let worst = (0..3).map(|i| po[i] - pb[i]).fold(f64::MIN, f64::max);
    vec![
        Row { id: "HA down", what: format!("rolling upgrade 3.4.23 -> {new} of three members with `etcd-migrate run`: each member's downtime, from the SIGTERM of its 3.4.23 to {new} serving a write through it, beside a bare restart with the new binary (medians of {HA_ROLLS} rolls each)"), figure: format!("{po:.2?} s vs {pb:.2?} s (worst member +{worst:.2} s)"), goal: "<= bare + 0.3 s", met: Some(worst <= 0.3) },
        Row { id: "HA", what: "the same: total time / bare restarts".into(), figure: format!("{r:.2} ({to:.2} s vs {tb:.2} s)"), goal: "(report)", met: None },
        Row { id: "HA gap", what: "the same: longest window in which the client's writes failed (median)".into(), figure: format!("{:.2} s (bare restart: {:.2} s)", gap(&ours), gap(&bare)), goal: "(report)", met: None },
    ]
}

/// A three-member 3.4.23 cluster for the rejoin benchmark; member processes are killed and
/// reaped on drop.
struct Trio {
    specs: Vec<MemberSpec>,
    procs: Procs,
    /// Keys the cluster holds: a rejoined member serves when its own copy has them all.
    keys: i64,
}

/// Starts etcd-`version` with `flags`, output discarded; dies with us.
fn spawn_etcd(version: &str, flags: &[String]) -> std::process::Child {
    let mut cmd = Command::new(bundle().join(format!("etcd-{version}")));
    cmd.args(flags)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    cmd.spawn().unwrap()
}

/// A member of a [`Trio`], from its spec.
fn spawn_member(spec: &MemberSpec) -> std::process::Child {
    spawn_etcd(&spec.version, &spec.flags())
}

/// etcdctl-3.4.23 against m1 and m2; its output.
fn ctl(specs: &[MemberSpec], args: &[&str]) -> std::process::Output {
    Command::new(bundle().join("etcdctl-3.4.23"))
        .env_clear()
        .env("ETCDCTL_API", "3")
        .arg(format!(
            "--endpoints={},{}",
            specs[0].client_url(),
            specs[1].client_url()
        ))
        .args(args)
        .output()
        .unwrap()
}

/// `member add <name>` retried while etcd refuses it (as an operator retries); the
/// `ETCD_INITIAL_CLUSTER` it prints.
fn add_member(specs: &[MemberSpec], spec: &MemberSpec) -> String {
    let peer = format!("--peer-urls={}", spec.peer_url());
    let added = wait_until(
        "member add to be accepted",
        Duration::from_secs(120),
        || {
            let out = ctl(specs, &["member", "add", &spec.name, &peer]);
            out.status
                .success()
                .then(|| String::from_utf8(out.stdout).unwrap())
        },
    );
    added
        .lines()
        .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER=\""))
        .unwrap()
        .trim_end_matches('"')
        .to_string()
}

async fn count_on(url: &str, serializable: bool) -> Option<i64> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(100))
        .with_timeout(Duration::from_secs(5));
    let mut c = Client::connect([url], Some(opts)).await.ok()?;
    let mut count = etcd_client::GetOptions::new()
        .with_all_keys()
        .with_count_only();
    if serializable {
        count = count.with_serializable();
    }
    Some(c.get(vec![0u8], Some(count)).await.ok()?.count())
}

impl Trio {
    /// A new cluster whose m1 writes `keys` keys of 1 KB.
    async fn seeded(root: &Path, keys: usize) -> Trio {
        let specs = cluster_specs(root, "3.4.23", &["m1", "m2", "m3"], "http");
        let procs = Procs(specs.iter().map(spawn_member).collect());
        for s in &specs {
            wait_until("a member to serve", Duration::from_secs(60), || {
                http_get(&s.client_url(), "/health").filter(|b| b.contains("true"))
            });
        }
        let value = |_| vec![b'x'; 1024];
        let key = |i| format!("/registry/pods/ns{}/p{i:07}", i % 50);
        bulk_put(&specs[0].client_url(), keys, key, value, None).await;
        Trio::ready(specs, procs).await
    }

    /// The cached single-member `data` (a member named m1) grown to three: m1 on a copy, its
    /// peer URL updated, m2 and m3 added and synced from it.
    async fn grown_from(root: &Path, data: &Path) -> Trio {
        let mut specs = cluster_specs(root, "3.4.23", &["m1", "m2", "m3"], "http");
        fs::create_dir_all(root).unwrap();
        cp_dir(data, &specs[0].data_dir);
        fs::remove_file(specs[0].data_dir.join("version.txt")).ok();
        let mut procs = Procs(vec![spawn_member(&specs[0])]);
        wait_until_async("m1 to serve", Duration::from_secs(300), async || {
            count_on(&specs[0].client_url(), false).await
        })
        .await;
        let list = ctl(&specs, &["member", "list"]);
        let id = String::from_utf8(list.stdout).unwrap();
        let id = id.split(',').next().unwrap().trim().to_string();
        let peer = format!("--peer-urls={}", specs[0].peer_url());
        assert!(ctl(&specs, &["member", "update", &id, &peer])
            .status
            .success());
        for i in 1..3 {
            let ic = add_member(&specs, &specs[i]);
            specs[i].initial_cluster = Some(ic);
            specs[i].cluster_state = "existing";
            procs.0.push(spawn_member(&specs[i]));
            let url = specs[i].client_url();
            wait_until_async(
                "a new member to sync",
                Duration::from_secs(600),
                async || count_on(&url, false).await.filter(|n| *n > 0),
            )
            .await;
        }
        Trio::ready(specs, procs).await
    }

    async fn ready(specs: Vec<MemberSpec>, procs: Procs) -> Trio {
        for s in &specs {
            record_version(&s.data_dir, "3.4.23/etcd3");
        }
        let keys = count_on(&specs[0].client_url(), false).await.unwrap();
        Trio { specs, procs, keys }
    }

    /// m3 loses its disk; seconds from its pod's start to it serving every key, by
    /// `etcd-migrate run` with REJOIN_IF_EMPTY=true or by the runbook by hand. m3 runs again
    /// afterwards.
    async fn rejoin(&mut self, by_hand: bool) -> f64 {
        let m3 = self.specs[2].clone();
        let _ = self.procs.0[2].kill();
        let _ = self.procs.0[2].wait();
        fs::remove_dir_all(&m3.data_dir).unwrap();
        let t = Instant::now();
        self.procs.0[2] = if by_hand {
            self.rejoin_by_hand()
        } else {
            let mut env = MigrateEnv::new(&m3.data_dir, &m3.name, "3.4.23", "etcd3");
            let ic = self.initial_cluster();
            env.set("INITIAL_CLUSTER", &ic)
                .set("LISTEN_PEER_URLS", &m3.peer_url())
                .set("INITIAL_ADVERTISE_PEER_URLS", &m3.peer_url())
                .set("REJOIN_IF_EMPTY", "true")
                .set("CHILD_OUTPUT", "quiet");
            let mut spec = m3.clone();
            spec.initial_cluster = Some(ic);
            env.run_command(&spec.flags())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let url = m3.client_url();
        let keys = self.keys;
        wait_until_async(
            "m3 to serve every key",
            Duration::from_secs(600),
            async || count_on(&url, true).await.filter(|n| *n >= keys),
        )
        .await;
        secs(t.elapsed())
    }

    /// The manifest's INITIAL_CLUSTER: every member by name and peer URL.
    fn initial_cluster(&self) -> String {
        self.specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The runbook by hand: remove m3 and add it again (each retried while etcd refuses it, as an
    /// operator retries), then etcd-3.4.23 as an existing member.
    fn rejoin_by_hand(&self) -> std::process::Child {
        let list = String::from_utf8(ctl(&self.specs, &["member", "list"]).stdout).unwrap();
        let id = list
            .lines()
            .find(|l| l.contains(", m3,"))
            .and_then(|l| l.split(',').next())
            .unwrap()
            .to_string();
        wait_until(
            "member remove to be accepted",
            Duration::from_secs(60),
            || {
                ctl(&self.specs, &["member", "remove", &id])
                    .status
                    .success()
                    .then_some(())
            },
        );
        let mut spec = self.specs[2].clone();
        spec.initial_cluster = Some(add_member(&self.specs, &spec));
        spec.cluster_state = "existing";
        spawn_member(&spec)
    }
}

/// Rejoins per case, each on a cluster of its own: how soon etcd accepts the membership changes
/// depends on how recently the membership changed, so a cluster is never reused.
const REJOIN_RUNS: usize = 3;

async fn rejoin_row(root: &Path, size: &str, runs: usize, big: Option<&Path>) -> Row {
    let (mut ours, mut hand) = (Vec::new(), Vec::new());
    for r in 0..runs {
        for (by_hand, out) in [(false, &mut ours), (true, &mut hand)] {
            let dir = root.join(format!("{r}-{by_hand}"));
            fs::create_dir_all(&dir).unwrap();
            let mut trio = match big {
                Some(data) => Trio::grown_from(&dir, data).await,
                None => Trio::seeded(&dir, 10_000).await,
            };
            out.push(trio.rejoin(by_hand).await);
            drop(trio);
            fs::remove_dir_all(&dir).unwrap();
        }
    }
    println!("rejoin of m3, {size}: etcd-migrate {ours:.2?} s, by hand {hand:.2?} s");
    let (o, h) = (median(ours), median(hand));
    Row {
        id: "rejoin",
        what: format!("a member of a three-member 3.4.23 cluster ({size}) lost its disk: pod start to it serving every key, `etcd-migrate run` with REJOIN_IF_EMPTY=true / the runbook by hand with etcdctl and etcd (medians of {runs}, a fresh cluster each)"),
        figure: format!("{:.2} ({o:.2} s vs {h:.2} s)", o / h),
        goal: "<= 1.10",
        met: Some(o / h <= 1.10),
    }
}

async fn rejoin(root: &Path) -> Vec<Row> {
    let small = rejoin_row(&root.join("10k"), "10,000 keys of 1 KB", REJOIN_RUNS, None).await;
    let big = bigmember::member("1g", 1 << 30).await;
    let size = format!("the 1 GB member: {}", bigmember::describe(&big));
    vec![
        small,
        rejoin_row(&root.join("1g"), &size, 2, Some(&big)).await,
    ]
}

/// What the snapshot runs of one release measured (medians).
struct Snaps {
    ratio: f64,
    ours: f64,
    ctl: f64,
    stream: f64,
    verify: f64,
    own_mb: u64,
    bytes: u64,
    /// The last run's verified snapshot, kept for the restore rows.
    kept: PathBuf,
}

/// `etcd-migrate snapshot` of the member at `url` into the fresh dir `out`: wall time, the
/// file, and the log's "snapshot verified" line.
fn our_snapshot(url: &str, out: &Path) -> (f64, PathBuf, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let t = Instant::now();
    let ran = Command::new(env!("CARGO_BIN_EXE_etcd-migrate"))
        .arg("snapshot")
        .env_clear()
        .env("SNAPSHOT_ENDPOINT", url)
        .env("SNAPSHOT_DIR", out)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stderr(log.reopen().unwrap())
        .output()
        .unwrap();
    let took = secs(t.elapsed());
    let log = fs::read_to_string(log.path()).unwrap_or_default();
    assert!(ran.status.success(), "etcd-migrate snapshot failed:\n{log}");
    let path = PathBuf::from(String::from_utf8(ran.stdout).unwrap().trim());
    assert!(path.is_file(), "no snapshot at {}:\n{log}", path.display());
    (took, path, log)
}

/// `etcdctl snapshot save` of the member at `url` to `file`: wall time.
fn ctl_snapshot(release: &str, url: &str, file: &Path) -> f64 {
    let t = Instant::now();
    let out = Command::new(bundle().join(format!("etcdctl-{release}")))
        .env_clear()
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", url, "snapshot", "save"])
        .arg(file)
        .output()
        .unwrap();
    let took = secs(t.elapsed());
    assert!(
        out.status.success(),
        "etcdctl snapshot save: {}",
        text(&out)
    );
    took
}

/// Snapshots of the cached member `seed` served by etcd-`release` (on a copy), `runs` of ours
/// and of etcdctl's alternating, each into a fresh dir on the same filesystem, files deleted
/// between runs (but the last of ours, moved to `keep`).
async fn snapshot_case(root: &Path, seed: &Path, release: &str, runs: usize, keep: &Path) -> Snaps {
    let data = root.join(format!("snap-{release}/data"));
    fs::create_dir_all(data.parent().unwrap()).unwrap();
    fresh_copy(seed, &data);
    let _ = fs::remove_file(data.join("version.txt"));
    let mut spec = MemberSpec::new(release, &data, "m1");
    spec.extra = vec![BARE_QUOTA.to_string()];
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(300));
    let url = m.client_url.clone();
    let (mut ours, mut ctl, mut stream, mut verify, mut own, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0, 0);
    for r in 0..runs {
        let a = root.join(format!("snap-{release}-a{r}"));
        fs::create_dir_all(&a).unwrap();
        let (took, file, log) = our_snapshot(&url, &a);
        let field = |k: &str| log_field(&log, "snapshot verified", k).unwrap_or(0);
        ours.push(took);
        stream.push(field("stream_ms") as f64 / 1000.0);
        verify.push(field("verify_ms") as f64 / 1000.0);
        own = own.max(field("peak_rss_mb"));
        bytes = fs::metadata(&file).unwrap().len();
        if r + 1 == runs {
            fs::rename(&file, keep).unwrap();
        }
        fs::remove_dir_all(&a).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
        let b = root.join(format!("snap-{release}-b{r}"));
        fs::create_dir_all(&b).unwrap();
        ctl.push(ctl_snapshot(release, &url, &b.join("snapshot.db")));
        fs::remove_dir_all(&b).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
    }
    m.stop();
    fs::remove_dir_all(data.parent().unwrap()).unwrap();
    println!("snapshot of the 1 GB member at etcd {release}: etcd-migrate {ours:.2?} s (stream {stream:.2?}, verify {verify:.2?}), etcdctl {ctl:.2?} s, peak RSS {own} MiB");
    let ratios: Vec<f64> = ours.iter().zip(&ctl).map(|(o, c)| o / c).collect();
    Snaps {
        ratio: median(ratios),
        ours: median(ours),
        ctl: median(ctl),
        stream: median(stream),
        verify: median(verify),
        own_mb: own,
        bytes,
        kept: keep.to_path_buf(),
    }
}

/// The rows of a [`snapshot_case`]: `ids` for the time and the RSS row.
fn snapshot_rows(
    s: &Snaps,
    ids: (&'static str, &'static str),
    release: &str,
    shape: &str,
    runs: usize,
) -> Vec<Row> {
    vec![
        Row { id: ids.0, what: format!("`etcd-migrate snapshot` (verification included) of the 1 GB member ({shape}) served by etcd {release} / `etcdctl-{release} snapshot save` of it, each into a fresh dir on the same disk (median of {runs}, alternating)"), figure: format!("{:.3} ({:.2} s: stream {:.2} s, verify {:.2} s; etcdctl {:.2} s; {:.0} MB file)", s.ratio, s.ours, s.stream, s.verify, s.ctl, s.bytes as f64 / 1e6), goal: "<= 1.10", met: Some(s.ratio <= 1.10) },
        Row { id: ids.1, what: format!("the same at etcd {release}: peak RSS of etcd-migrate (its log's peak_rss_mb)"), figure: format!("{} MiB", s.own_mb), goal: "<= 128 MB", met: Some(s.own_mb <= 122) },
    ]
}

/// Restores of `file` (a 3.4.23 snapshot) as a new one-member cluster, `runs` alternating:
/// `etcd-migrate migrate` with RESTORE_SNAPSHOT onto an empty data dir, against `etcdctl
/// snapshot restore` then etcd-3.4.23 started on it until the first write, then stopped.
async fn restore_row(root: &Path, file: &Path, shape: &str, runs: usize) -> Row {
    let (mut ours, mut hand, mut restore, mut prove, mut ctl) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let a = root.join(format!("restore-a{r}/data"));
        fs::create_dir_all(a.parent().unwrap()).unwrap();
        let mut env = MigrateEnv::new(&a, "m1", "3.4.23", "etcd3");
        env.set("RESTORE_SNAPSHOT", &file.to_string_lossy())
            .set("CHILD_OUTPUT", "quiet");
        let ran = run_migrate(&env, &["migrate"]);
        assert!(
            ran.log.contains("restored the snapshot"),
            "no restore:\n{}",
            ran.log
        );
        ours.push(secs(ran.took));
        let d = journal(&a)
            .into_iter()
            .rfind(|e| e["event"] == "restore-snapshot")
            .map(|e| e["detail"].clone())
            .unwrap_or_default();
        restore.push(d["restore_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        prove.push(d["prove_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        fs::remove_dir_all(a.parent().unwrap()).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
        let b = root.join(format!("restore-b{r}/data"));
        fs::create_dir_all(b.parent().unwrap()).unwrap();
        let mut spec = MemberSpec::new("3.4.23", &b, "m1");
        spec.extra = vec![BARE_QUOTA.to_string()];
        let peer = spec.peer_url();
        let t = Instant::now();
        let out = etcdctl_restore(file, &b, &peer).output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl snapshot restore: {}",
            text(&out)
        );
        ctl.push(secs(t.elapsed()));
        first_write_cycle(spec).await;
        hand.push(secs(t.elapsed()));
        fs::remove_dir_all(b.parent().unwrap()).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
    }
    println!("restore of the 1 GB member's snapshot at 3.4.23: etcd-migrate {ours:.2?} s (restore {restore:.2?}, prove {prove:.2?}), by hand {hand:.2?} s (etcdctl snapshot restore {ctl:.2?})");
    let ratios: Vec<f64> = ours.iter().zip(&hand).map(|(o, h)| o / h).collect();
    let r = median(ratios);
    // What the restore and prove stages leave of our runs: the file's verification before
    // anything is touched, start-up, preflight.
    let before: Vec<f64> = (0..runs).map(|i| ours[i] - restore[i] - prove[i]).collect();
    let started: Vec<f64> = hand.iter().zip(&ctl).map(|(h, c)| h - c).collect();
    let bytes = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    Row {
        id: "restore 1g",
        what: format!("`etcd-migrate migrate` with RESTORE_SNAPSHOT (a {:.0} MB snapshot of the 1 GB member: {shape}), TARGET_VERSION=3.4.23, onto an empty data dir, to its exit / by hand: `etcdctl-3.4.23 snapshot restore`, etcd-3.4.23 started on it until the first write, stopped (default election flags, as the bare rows; median of {runs}, alternating)", bytes as f64 / 1e6),
        figure: format!("{r:.3} ({:.2} s: verification of the file and the rest {:.2} s, restore {:.2} s, prove {:.2} s; by hand {:.2} s: etcdctl snapshot restore {:.2} s, start to first write and stop {:.2} s)", median(ours), median(before), median(restore), median(prove), median(hand), median(ctl), median(started)),
        goal: "<= 1.15",
        met: Some(r <= 1.15),
    }
}

/// Disaster recovery on the cached 1 GB member: `etcd-migrate snapshot` against `etcdctl
/// snapshot save` (at 3.4.23, and at the newest 3.5 on a copy it upgraded in place), and the
/// restore of the 3.4.23 snapshot by RESTORE_SNAPSHOT against restore + first start by hand.
async fn dr(root: &Path) -> Vec<Row> {
    const RUNS: usize = 3;
    let big = bigmember::member("1g", 1 << 30).await;
    let shape = bigmember::describe(&big);
    let kept = root.join("kept-3.4.23.db");
    let s = snapshot_case(root, &big, "3.4.23", RUNS, &kept).await;
    let mut rows = snapshot_rows(&s, ("snapshot 1g", "RSS snapshot"), "3.4.23", &shape, RUNS);
    rows.push(restore_row(root, &s.kept, &shape, RUNS).await);
    fs::remove_file(&s.kept).unwrap();
    // BENCH_DR_35=0 leaves out the newest 3.5 (a copy of the 3.4.23 member upgraded in place
    // by its first start).
    if std::env::var("BENCH_DR_35")
        .map(|v| v != "0")
        .unwrap_or(true)
    {
        let new = new35();
        let kept = root.join(format!("kept-{new}.db"));
        let s = snapshot_case(root, &big, &new, RUNS, &kept).await;
        fs::remove_file(&s.kept).unwrap();
        let shape = format!("{shape}; upgraded in place by {new}'s first start");
        rows.extend(snapshot_rows(
            &s,
            ("snapshot 1g 3.5", "RSS snapshot 3.5"),
            &new,
            &shape,
            RUNS,
        ));
    }
    rows
}

/// How long each release's private etcd took to stop, over every run of this benchmark.
fn stops_row() -> Option<Row> {
    let stops = STOPS.lock().unwrap();
    if stops.is_empty() {
        return None;
    }
    let worst = stops.values().flatten().copied().max().unwrap_or(0);
    let list: Vec<String> = stops
        .iter()
        .map(|(v, ms)| {
            format!(
                "{v}: median {} ms, max {} ms ({} stops)",
                median(ms.iter().map(|&m| m as f64).collect()),
                ms.iter().max().unwrap(),
                ms.len()
            )
        })
        .collect();
    Some(Row { id: "stops", what: "SIGTERM to exit of every private etcd stopped in these runs, per release (journal `stops`)".into(), figure: list.join("; "), goal: "< 1 s", met: Some(worst < 1000) })
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = mem
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
        / 1024;
    format!(
        "{} cores ({model}), {total} GiB RAM",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

/// A file at the top of the repo (BENCHMARKS.md, its notes).
fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// One table row as BENCHMARKS.md has it (printed too).
fn row_line(r: &Row) -> String {
    let met = match r.met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "-",
    };
    println!("{:<8} {:<10} {}  ({})", r.id, met, r.figure, r.goal);
    format!(
        "| {} | {} | {} | {} | {met} |",
        r.id, r.what, r.figure, r.goal
    )
}

/// `BENCH_MERGE=1`: a subset's rows replace the rows of the same id in BENCHMARKS.md (new ids
/// are added at the end of the table) and the header says which rows this run made, when.
fn merge_into_benchmarks_md(which: &[String], rows: &[Row]) {
    let path = repo_file("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    let id_of = |line: &str| line.split('|').nth(1).map(|c| c.trim().to_string());
    let mut new: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.id.to_string(), row_line(r)))
        .collect();
    let mut out = Vec::new();
    let mut in_table = false;
    for line in old.lines() {
        if line.starts_with("| id |") {
            in_table = true;
        } else if in_table && !line.starts_with('|') {
            out.extend(new.drain(..).map(|(_, l)| l));
            in_table = false;
        } else if in_table && !line.starts_with("|---") {
            if let Some(i) = id_of(line).and_then(|id| new.iter().position(|(n, _)| *n == id)) {
                out.push(new.remove(i).1);
                continue;
            }
        }
        out.push(line.to_string());
        if line.starts_with("Made by") {
            out.push(String::new());
            out.push(format!(
                "Rows {} rerun by `BENCH_MERGE=1 cargo bench --bench bench -- {}` on {}, {}.",
                rows.iter().map(|r| r.id).collect::<Vec<_>>().join(", "),
                which.join(" "),
                time::OffsetDateTime::now_utc().date(),
                machine()
            ));
        }
    }
    out.extend(new.into_iter().map(|(_, l)| l));
    // The notes as BENCHMARKS.notes.md has them now.
    if let Some(at) = out.iter().position(|l| l.starts_with("## Notes")) {
        out.truncate(at);
        out.extend(
            fs::read_to_string(repo_file("BENCHMARKS.notes.md"))
                .unwrap_or_default()
                .lines()
                .map(String::from),
        );
    }
    fs::write(&path, out.join("\n") + "\n").unwrap();
}

fn main() {
    let mut which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if which.is_empty() || which.iter().any(|w| w == "all") {
        which = [
            "p1", "p2", "p3", "p3step", "p4", "p6", "ha", "rejoin", "sizes", "dr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::Builder::new()
        .prefix("etcd-migrate-bench")
        .tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
        .unwrap();
    // BENCH_KEEP=1 leaves the data behind for a look (its path is printed).
    let (root_path, _guard) = if std::env::var_os("BENCH_KEEP").is_some() {
        let p = root.keep();
        println!("keeping {}", p.display());
        (p, None)
    } else {
        (root.path().to_path_buf(), Some(root))
    };
    let mut rows = Vec::new();
    for w in &which {
        let dir = root_path.join(w);
        fs::create_dir_all(&dir).unwrap();
        let r = rt.block_on(async {
            match w.as_str() {
                "p1" => p1(&dir).await,
                "p2" => p2(&dir).await,
                "p3" => p3(&dir).await,
                "p3step" => p3_step(&dir).await,
                "p4" => p4(&dir).await,
                "p6" => p6(&dir).await,
                "ha" => ha(&dir).await,
                "rejoin" => rejoin(&dir).await,
                "sizes" => sizes(&dir).await,
                "dr" => dr(&dir).await,
                // The storage migration of the 1 GB etcd2 member alone (also part of `sizes`).
                "mig1g" => storage_migration_1g(&dir).await,
                // Only make (or find) the cached big members.
                "gen1g" => {
                    println!("{}", bigmember::member("1g", 1 << 30).await.display());
                    Vec::new()
                }
                "gen4g" => {
                    println!("{}", bigmember::member("4g", 4 << 30).await.display());
                    Vec::new()
                }
                other => panic!("unknown benchmark {other}"),
            }
        });
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&dir);
        }
        rows.extend(r);
    }
    if std::env::var_os("BENCH_MERGE").is_some() {
        // The stops row sums every run's stops: a subset's would replace it with a part.
        return merge_into_benchmarks_md(&which, &rows);
    }
    rows.extend(stops_row());
    let mut md = String::from("# Benchmarks\n\n");
    md.push_str(&format!(
        "Made by `make bench` (`cargo bench --bench bench -- {}`) on {}, {}. Real etcd from `.bundle/` ({}), on loopback; big members cached under `target/bench-members/` on the disk. Figures are from one run; rerun the command to reproduce them.\n\n",
        which.join(" "),
        time::OffsetDateTime::now_utc().date(),
        machine(),
        bundled_versions().join(", ")
    ));
    md.push_str("| id | what | figure | goal | met |\n|---|---|---|---|---|\n");
    for r in &rows {
        md.push_str(&row_line(r));
        md.push('\n');
    }
    if let Ok(n) = fs::read_to_string(repo_file("BENCHMARKS.notes.md")) {
        md.push('\n');
        md.push_str(&n);
    }
    if std::env::var("BENCH_WRITE")
        .map(|v| v != "0")
        .unwrap_or(true)
    {
        fs::write(repo_file("BENCHMARKS.md"), md).unwrap();
    }
}
