//! Big members for the "real sizes" benchmarks: a single etcd 3.4.23 member written in
//! Kubernetes-like shapes until its backend reaches a target size, made once and cached under
//! `target/bench-members/` (on the disk: a 4 GB member and its copies do not fit a tmpfs here).
//!
//! Shape: keys `/registry/<resource>/<namespace>/<name>`, JSON values of 0.5-20 KB (70% 0.5-2 KB,
//! 25% 2-8 KB, 5% 8-20 KB), events on 1-hour leases (a new lease every 10,000 events, as the API
//! server grants one per minute), then history: a fifth of the keys overwritten, a twentieth
//! deleted, one compaction half way through that history, a few more overwrites after it.
//! Written with small transactions (8 puts, 64 in flight: a WAL entry stays the size of a few
//! objects, so the WAL since the last snapshot is what a busy member has, about 10,000 entries)
//! and raised request limits.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, PutOptions, Txn, TxnOp};

use crate::common::MemberSpec;

/// Bump when the shape changes: cached members of another version are made again.
const SHAPE_VERSION: u32 = 4;

/// Puts per transaction, and transactions in flight.
const TXN_PUTS: u64 = 8;
const IN_FLIGHT: usize = 64;

const RESOURCES: &[(&str, u32)] = &[
    ("pods", 30),
    ("events", 20),
    ("configmaps", 12),
    ("secrets", 10),
    ("replicasets", 8),
    ("deployments", 5),
    ("services", 4),
    ("endpointslices", 6),
    ("leases", 3),
    ("serviceaccounts", 2),
];

/// A deterministic generator (splitmix64): the same member every time for the same size.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The key of object `i`.
fn key(i: u64) -> String {
    let mut r = Rng(i.wrapping_mul(31) ^ 0x5EED);
    let total: u32 = RESOURCES.iter().map(|(_, w)| w).sum();
    let mut pick = r.below(total as u64) as u32;
    let mut res = RESOURCES[0].0;
    for (name, w) in RESOURCES {
        if pick < *w {
            res = name;
            break;
        }
        pick -= w;
    }
    format!("/registry/{res}/ns-{:03}/obj-{i:08}", r.below(200))
}

/// A JSON value for object `i` at generation `gen`, 0.5-20 KB.
fn value(i: u64, gen: u64) -> Vec<u8> {
    let mut r = Rng(i ^ (gen << 40) ^ 0xC0FFEE);
    let size = match r.below(100) {
        0..=69 => 500 + r.below(1500),
        70..=94 => 2000 + r.below(6000),
        _ => 8000 + r.below(12000),
    } as usize;
    let mut v = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Object\",\"metadata\":{{\"name\":\"obj-{i:08}\",\"generation\":{gen},\"uid\":\"{:016x}{:016x}\"}},\"data\":\"",
        r.next(),
        r.next()
    )
    .into_bytes();
    while v.len() + 2 < size {
        let w = r.next();
        v.extend_from_slice(format!("{w:016x}").as_bytes());
    }
    v.truncate(size.saturating_sub(2));
    v.extend_from_slice(b"\"}");
    v
}

/// A cached member of about `target_bytes` of backend: its data dir (recorded `3.4.23/etcd3`).
/// Made on first use; progress is printed while it is written.
pub async fn member(name: &str, target_bytes: u64) -> PathBuf {
    let Cached::Make(data, t) = cached(&format!("{name}-v{SHAPE_VERSION}")) else {
        return cached_data(&format!("{name}-v{SHAPE_VERSION}"));
    };
    let stats = generate(&data, target_bytes).await;
    fs::write(data.join("version.txt"), "3.4.23/etcd3\n").unwrap();
    made(&data, &stats, t);
    data
}

/// A cached member: already made, or to be made now into its data dir.
enum Cached {
    Ready,
    Make(PathBuf, Instant),
}

fn members_dir(id: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-members")
        .join(id)
}

fn cached_data(id: &str) -> PathBuf {
    members_dir(id).join("data")
}

fn cached(id: &str) -> Cached {
    let dir = members_dir(id);
    if dir.join("complete").exists() {
        return Cached::Ready;
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    Cached::Make(dir.join("data"), Instant::now())
}

/// Marks a member made (what it holds in its `complete` file).
fn made(data: &Path, stats: &str, t: Instant) {
    fs::write(
        data.parent().unwrap().join("complete"),
        format!(
            "{stats}\nmade in {:.0} s by benches/support/bigmember.rs (shape v{SHAPE_VERSION})\n",
            secs(t.elapsed())
        ),
    )
    .unwrap();
    println!("big member: {stats}, made in {:.0} s", secs(t.elapsed()));
}

/// What a cached member holds, as its `complete` file says.
#[allow(dead_code)]
pub fn describe(data: &Path) -> String {
    fs::read_to_string(data.parent().unwrap().join("complete"))
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn generate(data: &Path, target_bytes: u64) -> String {
    let mut spec = MemberSpec::new("3.4.23", data, "m1");
    spec.extra = [
        "--max-txn-ops=10000",
        "--max-request-bytes=33554432",
        "--quota-backend-bytes=8589934592",
        // etcd 3.6's default: the WAL since the last snapshot holds at most this many entries.
        "--snapshot-count=10000",
        "--auto-compaction-retention=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let m = crate::common::Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(60));
    let opts = ConnectOptions::new().with_timeout(Duration::from_secs(120));
    let c = Client::connect([m.client_url.as_str()], Some(opts))
        .await
        .unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let db_size = |c: &mut Client| {
        let mut c = c.clone();
        async move { c.status().await.map(|s| s.db_size() as u64).unwrap_or(0) }
    };
    let t = Instant::now();
    let mut last_report = Instant::now();
    // Live objects: written until the backend holds about 70% of the target (history and free
    // pages add the rest).
    let mut lease = 0i64;
    let mut n: u64 = 0;
    let mut cc = c.clone();
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        if n.is_multiple_of(10_000) {
            lease = cc.lease_grant(3600, None).await.unwrap().id();
        }
        let batch: Vec<u64> = (n..n + TXN_PUTS).collect();
        n += TXN_PUTS;
        let (c2, w) = (c.clone(), written.clone());
        inflight.spawn(put_batch(c2, batch, 0, lease, w));
        while inflight.len() >= IN_FLIGHT {
            inflight.join_next().await.unwrap().unwrap();
        }
        if n.is_multiple_of(20_000) {
            let size = db_size(&mut cc).await;
            if last_report.elapsed() > Duration::from_secs(5) {
                print_progress(t, n, &written, size, target_bytes);
                last_report = Instant::now();
            }
            if size >= target_bytes * 8 / 10 {
                break;
            }
        }
    }
    while inflight.join_next().await.is_some() {}
    let live = n;
    // History: overwrite a fifth, delete a twentieth, compact half way, overwrite a little more.
    let mut r = Rng(live);
    let mut ops = 0u64;
    let mut compacted_at = 0;
    for round in 0..4u64 {
        let batch: Vec<u64> = (0..live / 20).map(|_| r.below(live)).collect();
        for chunk in batch.chunks(TXN_PUTS as usize) {
            // A transaction may name a key once.
            let mut chunk = chunk.to_vec();
            chunk.sort_unstable();
            chunk.dedup();
            let (c2, w) = (c.clone(), written.clone());
            inflight.spawn(put_batch(c2, chunk, round + 1, lease, w));
            while inflight.len() >= IN_FLIGHT {
                inflight.join_next().await.unwrap().unwrap();
            }
        }
        while inflight.join_next().await.is_some() {}
        ops += batch.len() as u64;
        if round == 1 {
            let dels: Vec<u64> = (0..live / 20).map(|_| r.below(live)).collect();
            for chunk in dels.chunks(1000) {
                let mut chunk = chunk.to_vec();
                chunk.sort_unstable();
                chunk.dedup();
                let txn = Txn::new().and_then(
                    chunk
                        .iter()
                        .map(|&i| TxnOp::delete(key(i), None))
                        .collect::<Vec<_>>(),
                );
                cc.txn(txn).await.unwrap();
            }
            let rev = cc
                .get("/", None)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision();
            cc.compact(rev, None).await.unwrap();
            compacted_at = rev;
        }
        let size = db_size(&mut cc).await;
        print_progress(t, n + ops, &written, size, target_bytes);
    }
    let st = cc.status().await.unwrap();
    let keys = cc
        .get(
            "/registry/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    let stats = format!(
        "{} keys, {} MB backend, revision {}, compacted at {compacted_at}, {} MB written",
        keys,
        st.db_size() >> 20,
        st.header().unwrap().revision(),
        written.load(Ordering::Relaxed) >> 20
    );
    drop(cc);
    drop(c);
    m.stop();
    // etcd purges WAL files past its last snapshot (beyond 5) when it starts, as a member that
    // has run for a while has: one more start leaves the WAL a real member would carry. It also
    // resumes the compaction, which deletes in batches with pauses: wait until it is finished.
    // A 4 GB backend's index takes tens of seconds to rebuild on a busy machine.
    let m = crate::common::Member::spawn(crate::common::MemberSpec::new("3.4.23", data, "m1"));
    m.wait_healthy(Duration::from_secs(300));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !fs::read_to_string(&m.log)
        .unwrap_or_default()
        .contains("finished scheduled compaction")
    {
        assert!(Instant::now() < deadline, "the compaction did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    m.stop();
    stats
}

fn print_progress(t: Instant, ops: u64, written: &AtomicU64, size: u64, target: u64) {
    let w = written.load(Ordering::Relaxed);
    println!(
        "  writing: {ops} puts, {} MB sent, backend {} of {} MB, {:.0} MB/s",
        w >> 20,
        size >> 20,
        target >> 20,
        (w >> 20) as f64 / secs(t.elapsed()).max(0.001)
    );
}

async fn put_batch(mut c: Client, ids: Vec<u64>, gen: u64, lease: i64, written: Arc<AtomicU64>) {
    let mut bytes = 0;
    let ops: Vec<TxnOp> = ids
        .iter()
        .map(|&i| {
            let k = key(i);
            let v = value(i, gen);
            bytes += k.len() + v.len();
            let opts = k
                .starts_with("/registry/events/")
                .then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(k, v, opts)
        })
        .collect();
    c.txn(Txn::new().and_then(ops)).await.unwrap();
    written.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// A cached etcd2 member (3.4.23 serving the v2 API, recorded `3.4.23/etcd2`) of about
/// `target_bytes` of keys and values, in the same shapes: events carry a 1-hour TTL. Written
/// over the v2 HTTP API, 64 requests in flight; no snapshot while it is written (a v2 snapshot
/// is the whole store), one at the end.
pub async fn member_v2(name: &str, target_bytes: u64) -> PathBuf {
    let id = format!("{name}-etcd2-v{SHAPE_VERSION}");
    let Cached::Make(data, t) = cached(&id) else {
        return cached_data(&id);
    };
    let mut spec = MemberSpec::new("3.4.23", &data, "m1");
    spec.extra = vec![
        "--enable-v2=true".into(),
        "--snapshot-count=10000000".into(),
    ];
    let m = crate::common::Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(60));
    let http = reqwest::Client::new();
    let (mut n, mut bytes, mut ttl_keys) = (0u64, 0u64, 0u64);
    let mut set = tokio::task::JoinSet::new();
    let mut last = Instant::now();
    while bytes < target_bytes {
        let (k, v) = (key(n), value(n, 0));
        n += 1;
        bytes += (k.len() + v.len()) as u64;
        let ttl = k.starts_with("/registry/events/");
        ttl_keys += u64::from(ttl);
        let (http, url) = (http.clone(), format!("{}/v2/keys{k}", m.client_url));
        set.spawn(async move {
            let mut form = vec![("value".to_string(), String::from_utf8(v).unwrap())];
            if ttl {
                form.push(("ttl".into(), "3600".into()));
            }
            let r = http.put(&url).form(&form).send().await.unwrap();
            assert!(r.status().is_success(), "{url}: {}", r.status());
        });
        while set.len() >= 64 {
            set.join_next().await.unwrap().unwrap();
        }
        if last.elapsed() > Duration::from_secs(5) {
            println!(
                "  writing v2: {n} keys, {} of {} MB, {:.0} MB/s",
                bytes >> 20,
                target_bytes >> 20,
                (bytes >> 20) as f64 / secs(t.elapsed())
            );
            last = Instant::now();
        }
    }
    while set.join_next().await.is_some() {}
    m.stop();
    fs::write(data.join("version.txt"), "3.4.23/etcd2\n").unwrap();
    let stats = format!(
        "{n} v2 keys ({ttl_keys} with a TTL), {} MB of keys and values",
        bytes >> 20
    );
    made(&data, &stats, t);
    data
}
