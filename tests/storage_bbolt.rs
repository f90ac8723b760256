//! Real etcd 3.4.23 and 3.5.1 write a store with history, leases, big values and a
//! compaction; our bbolt + mvcc reader must then see exactly what etcdctl saw.
//!
//! Each etcd is a `common::Member` on free 127.0.0.1 ports from the repo's `.bundle/`, killed
//! and reaped on drop (also when an assertion fails).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value as Json;

use common::{bundle, wait_until, LogTail, Member};
use etcd_migrate::storage::bbolt::{Db, Value};
use etcd_migrate::storage::mvcc::{self, KeyValue, LiveIndex, MvccError};

const KEYS: usize = 10_000;
/// Keys whose values need overflow pages, with their sizes.
const BIG: [(usize, usize); 5] = [
    (17, 10_000),
    (123, 40_000),
    (4242, 100_000),
    (5000, 64_000),
    (9999, 25_000),
];

/// A running single-member etcd and its etcdctl (v3 API).
struct Etcd {
    member: Option<Member>,
    version: &'static str,
    endpoint: String,
}

impl Etcd {
    /// Starts a member (waiting for /health) and checks that etcdctl reaches it.
    fn start(version: &'static str, data_dir: &Path) -> Etcd {
        let member = Member::start(version, data_dir, "t");
        let etcd = Etcd {
            endpoint: member.client_url.clone(),
            member: Some(member),
            version,
        };
        let log = etcd.member.as_ref().unwrap().log.clone();
        wait_until(
            format_args!(
                "etcdctl to find etcd-{version} healthy; log:\n{}",
                LogTail(&log, 20)
            ),
            Duration::from_secs(30),
            || etcd.try_ctl(&["endpoint", "health"], None).0.then_some(()),
        );
        etcd
    }

    fn try_ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
        let mut cmd = Command::new(bundle().join(format!("etcdctl-{}", self.version)));
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg("--command-timeout=60s")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run etcdctl");
        // Reap etcdctl before acting on a failed write, so no process outlives a failure.
        let written = stdin.map(|input| child.stdin.take().unwrap().write_all(input));
        let out = child.wait_with_output().unwrap();
        if let Some(w) = written {
            w.unwrap_or_else(|e| panic!("etcdctl {args:?} stdin: {e}"));
        }
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        let (ok, stdout, stderr) = self.try_ctl(args, stdin);
        assert!(ok, "etcdctl {args:?} failed: {stderr}");
        stdout
    }

    fn ctl_json(&self, args: &[&str]) -> Json {
        serde_json::from_slice(&self.ctl(args, None)).expect("etcdctl -w json output")
    }

    /// Runs `ops` (etcdctl txn op lines) as one transaction.
    fn txn(&self, ops: &[String]) {
        let input = format!("\n{}\n\n\n", ops.join("\n"));
        let out = self.ctl(&["txn"], Some(input.as_bytes()));
        assert!(
            out.starts_with(b"SUCCESS"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    fn grant(&self, ttl: i64) -> i64 {
        let out = self.ctl_json(&["lease", "grant", &ttl.to_string(), "-w", "json"]);
        int(out.get("ID")).unwrap()
    }

    fn revision(&self) -> i64 {
        let out = self.ctl_json(&["get", "nothing-here", "-w", "json"]);
        int(out.get("header").unwrap().get("revision")).unwrap()
    }

    /// SIGTERM, then wait for a clean exit (status 0 or death by signal) within 30 s; the
    /// harness reaps the process afterwards (or kills it, when this panics).
    fn stop(&mut self) {
        let member = self.member.take().unwrap();
        let pid = Pid::from_raw(member.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        // WNOWAIT: look at the exit status without reaping; `Member::stop` reaps (and the
        // harness kills it on drop if this panics).
        let status = wait_until(
            format_args!(
                "etcd-{} to exit on SIGTERM; log:\n{}",
                self.version,
                LogTail(&member.log, 20)
            ),
            Duration::from_secs(30),
            || {
                let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
                match waitid(Id::Pid(pid), flags).unwrap() {
                    WaitStatus::StillAlive => None,
                    st => Some(st),
                }
            },
        );
        match status {
            WaitStatus::Exited(_, code) => {
                assert!(code == 0, "etcd exited with exit status: {code}")
            }
            WaitStatus::Signaled(..) => {}
            other => panic!("etcd-{}: unexpected wait status {other:?}", self.version),
        }
        member.stop();
    }
}

/// An integer field of etcdctl's JSON: None when absent or null, a panic when not an integer
/// (ids and revisions are 64-bit integers, which serde_json keeps exact).
fn int(v: Option<&Json>) -> Option<i64> {
    match v {
        None | Some(Json::Null) => None,
        Some(n) => Some(
            n.as_i64()
                .unwrap_or_else(|| panic!("not an integer: {n:?}")),
        ),
    }
}

fn b64(v: &Json) -> Vec<u8> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"));
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("bad base64 {s:?}: {e}"))
}

/// A JSON array field; empty when absent (etcdctl omits empty lists).
fn arr<'a>(v: &'a Json, field: &str) -> &'a [Json] {
    match v.get(field) {
        None => &[],
        Some(a) => a
            .as_array()
            .unwrap_or_else(|| panic!("not an array: {a:?}")),
    }
}

/// Deterministic filler: `len` alphanumeric bytes (etcdctl txn lines split on whitespace).
fn filler(seed: usize, len: usize) -> String {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(ALPHA[(x % ALPHA.len() as u64) as usize])
        })
        .collect()
}

fn key(i: usize) -> String {
    const KINDS: [&str; 5] = ["pods", "services/specs", "events", "configmaps", "leases"];
    format!("/registry/{}/ns-{}/obj-{i}", KINDS[i % KINDS.len()], i % 50)
}

fn value(i: usize, gen: u32) -> String {
    let len = BIG
        .iter()
        .find(|(k, _)| *k == i)
        .map_or(20 + (i * 7) % 300, |(_, n)| *n + gen as usize);
    format!("v{gen}-{i}-{}", filler(i * 31 + gen as usize, len))
}

fn put(i: usize, gen: u32, lease: Option<i64>) -> String {
    match lease {
        Some(id) => format!("put {} {} --lease={id:x}", key(i), value(i, gen)),
        None => format!("put {} {}", key(i), value(i, gen)),
    }
}

/// Runs ops in transactions of at most 100 ops and 1 MB.
fn run_batched(etcd: &Etcd, ops: Vec<String>) {
    let mut batch = Vec::new();
    let mut bytes = 0;
    for op in ops {
        if batch.len() == 100 || bytes + op.len() > 1_000_000 {
            etcd.txn(&batch);
            batch.clear();
            bytes = 0;
        }
        bytes += op.len();
        batch.push(op);
    }
    if !batch.is_empty() {
        etcd.txn(&batch);
    }
}

/// What etcdctl reports, in key order.
fn etcdctl_live_set(etcd: &Etcd) -> Vec<KeyValue> {
    let json = etcd.ctl_json(&["get", "--prefix", "", "-w", "json"]);
    let kvs: Vec<KeyValue> = arr(&json, "kvs")
        .iter()
        .map(|kv| {
            let num = |f: &str| int(kv.get(f)).unwrap_or(0);
            KeyValue {
                key: b64(kv.get("key").unwrap()),
                value: kv.get("value").map(b64).unwrap_or_default(),
                create_revision: num("create_revision"),
                mod_revision: num("mod_revision"),
                version: num("version"),
                lease: num("lease"),
            }
        })
        .collect();
    assert_eq!(int(json.get("count")), Some(kvs.len() as i64));
    kvs
}

fn etcdctl_lease_ids(etcd: &Etcd) -> BTreeSet<i64> {
    let json = etcd.ctl_json(&["lease", "list", "-w", "json"]);
    arr(&json, "leases")
        .iter()
        .map(|l| int(l.get("id")).unwrap())
        .collect()
}

fn describe(kv: &KeyValue) -> String {
    format!(
        "{} (value {} bytes, create {}, mod {}, version {}, lease {:x})",
        String::from_utf8_lossy(&kv.key),
        kv.value.len(),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease
    )
}

fn real_etcd_round_trip(version: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut etcd = Etcd::start(version, &data);

    let hour = etcd.grant(3600);
    let ten_min = etcd.grant(600);
    let doomed = etcd.grant(900);
    let lease_of = |i: usize| match i % 10 {
        1 => Some(hour),
        2 => Some(ten_min),
        _ if i % 37 == 5 => Some(doomed),
        _ => None,
    };

    // Generation 1: every key; big values in transactions of their own size.
    run_batched(&etcd, (0..KEYS).map(|i| put(i, 1, lease_of(i))).collect());
    // Before compaction: update every 7th, delete every 13th, re-create every 39th.
    run_batched(
        &etcd,
        (0..KEYS)
            .step_by(7)
            .map(|i| put(i, 2, lease_of(i)))
            .collect(),
    );
    run_batched(
        &etcd,
        (0..KEYS)
            .step_by(13)
            .map(|i| format!("del {}", key(i)))
            .collect(),
    );
    run_batched(
        &etcd,
        (0..KEYS).step_by(39).map(|i| put(i, 3, None)).collect(),
    );
    let compacted = etcd.revision();
    etcd.ctl(&["compact", &compacted.to_string(), "--physical"], None);
    // After compaction: more history on top of the compacted revisions.
    run_batched(
        &etcd,
        (0..KEYS)
            .step_by(11)
            .map(|i| put(i, 4, lease_of(i)))
            .collect(),
    );
    run_batched(
        &etcd,
        (0..KEYS)
            .step_by(17)
            .map(|i| format!("del {}", key(i)))
            .collect(),
    );
    run_batched(&etcd, vec![put(4242, 5, None), format!("del {}", key(123))]);
    etcd.ctl(&["lease", "revoke", &format!("{doomed:x}")], None);

    let want = etcdctl_live_set(&etcd);
    let want_leases = etcdctl_lease_ids(&etcd);
    let final_revision = etcd.revision();
    etcd.stop();

    let db_path = data.join("member/snap/db");
    let db = Db::open(&db_path).unwrap();
    let started = Instant::now();
    let index = LiveIndex::build(&db).unwrap();
    let built = started.elapsed();
    let mut got = Vec::new();
    let mut value_bytes = 0usize;
    index
        .for_each(&db, |kv| {
            value_bytes += kv.value.len();
            got.push(kv);
            Ok::<(), MvccError>(())
        })
        .unwrap();
    eprintln!(
        "etcd-{version}: {} live keys ({} revisions scanned, {value_bytes} value bytes, db {} bytes, page size {}): \
         LiveIndex::build {built:?}, build + for_each {:?}",
        index.len(),
        index.revisions_scanned(),
        std::fs::metadata(&db_path).unwrap().len(),
        db.page_size(),
        started.elapsed()
    );

    // The workload must have produced what it claims, or the comparison proves little.
    assert!(
        want.len() > 8_000 && want.len() < KEYS,
        "{} live keys",
        want.len()
    );
    assert!(
        want.iter().any(|kv| kv.value.len() > 100_000),
        "overflow values present"
    );
    assert!(want.iter().any(|kv| kv.lease == hour) && want.iter().any(|kv| kv.lease == ten_min));
    assert!(
        want.iter().all(|kv| kv.lease != doomed),
        "revoked lease took its keys"
    );
    assert!(
        want.iter().any(|kv| kv.version >= 3)
            && want.iter().any(|kv| kv.create_revision > compacted)
    );
    assert!(
        index.revisions_scanned() > want.len() as u64,
        "history beyond the live set survived"
    );

    assert_eq!(got.len(), want.len(), "etcd-{version}: live key count");
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g == w,
            "etcd-{version}: ours {} != etcdctl {}",
            describe(g),
            describe(w)
        );
    }
    assert_eq!(
        index.newest_revision().map(|r| r.main),
        Some(final_revision)
    );

    let leases = mvcc::leases(&db).unwrap();
    let ids: BTreeSet<i64> = leases.iter().map(|l| l.id).collect();
    assert_eq!(ids, want_leases, "etcd-{version}: lease ids");
    let ttls: BTreeMap<i64, i64> = leases.iter().map(|l| (l.id, l.ttl)).collect();
    assert_eq!(ttls, BTreeMap::from([(hour, 3600), (ten_min, 600)]));

    let meta = mvcc::store_meta(&db).unwrap();
    eprintln!(
        "etcd-{version}: meta keys {:?}",
        meta.keys
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    );
    assert!(meta.consistent_index.is_some_and(|ci| ci > 0));
    assert_eq!(meta.scheduled_compact_rev.map(|r| r.main), Some(compacted));
    assert_eq!(meta.finished_compact_rev.map(|r| r.main), Some(compacted));
    let names = mvcc::bucket_names(&db).unwrap().join(" ");
    eprintln!("etcd-{version}: buckets {names}; meta {:?}", db.meta());
    assert!(
        names.starts_with(
            "alarm auth authRoles authUsers cluster key lease members members_removed meta"
        ),
        "{names}"
    );

    corrupt_in_place(&db_path, &db, 200);
}

/// Flips bytes of the big db in place (restoring them after each case): every read must end
/// in Ok or Err, promptly, without a panic.
fn corrupt_in_place(path: &Path, db: &Db, cases: u64) {
    let used = db.meta().high_water * db.page_size() as u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut ok, mut err) = (0, 0);
    for case in 0..cases {
        // Mostly page headers and element arrays, where the structure lives.
        let flips: Vec<(u64, u8)> = (0..1 + next() % 4)
            .map(|_| {
                let page = next() % (used / db.page_size() as u64);
                let within = if case % 2 == 0 {
                    next() % 256
                } else {
                    next() % db.page_size() as u64
                };
                (
                    page * db.page_size() as u64 + within,
                    (1 + next() % 255) as u8,
                )
            })
            .collect();
        let mut saved = Vec::new();
        for &(at, x) in &flips {
            let mut b = [0u8];
            file.read_exact_at(&mut b, at).unwrap();
            saved.push((at, b[0]));
            file.write_all_at(&[b[0] ^ x], at).unwrap();
        }
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| read_everything(path));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "case {case} {flips:?} took {:?}",
            started.elapsed()
        );
        match outcome {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panic!("case {case}: flips {flips:?} panicked"),
        }
        for (at, b) in saved.into_iter().rev() {
            file.write_all_at(&[b], at).unwrap();
        }
    }
    assert!(read_everything(path), "restored db reads again");
    assert!(err > 0, "no corruption detected in {cases} cases");
    eprintln!("corrupted in place: {cases} cases, {ok} read fine, {err} errors");
}

fn read_everything(path: &Path) -> bool {
    (|| -> Result<(), MvccError> {
        let db = Db::open(path)?;
        for name in db.bucket_names()? {
            if let Some(b) = db.bucket(&name)? {
                for item in b.iter() {
                    if let (_, Value::Bucket(_)) = item? {}
                }
            }
        }
        let index = LiveIndex::build(&db)?;
        index.for_each(&db, |_| Ok::<(), MvccError>(()))?;
        mvcc::leases(&db)?;
        mvcc::store_meta(&db)?;
        Ok(())
    })()
    .is_ok()
}

#[test]
fn etcd_3_4_23_store_reads_back_exactly() {
    real_etcd_round_trip("3.4.23");
}

#[test]
fn etcd_3_5_1_store_reads_back_exactly() {
    real_etcd_round_trip("3.5.1");
}
