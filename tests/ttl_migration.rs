//! etcd2 -> etcd3 with per-key TTL reattachment, on real etcd 3.4.23 in v2 mode.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;
use std::time::Instant;

use common::*;
use serde_json::Value;

/// What the v2 store held right before a migration: key -> (value, created, modified, ttl).
type V2Snapshot = BTreeMap<String, (String, i64, i64, Option<i64>)>;

fn flatten(n: &Value, out: &mut V2Snapshot) {
    if n["dir"].as_bool().unwrap_or(false) {
        for c in n["nodes"].as_array().into_iter().flatten() {
            flatten(c, out);
        }
    } else if let Some(k) = n["key"].as_str() {
        out.insert(
            k.to_string(),
            (
                n["value"].as_str().unwrap_or_default().to_string(),
                n["createdIndex"].as_i64().unwrap(),
                n["modifiedIndex"].as_i64().unwrap(),
                n["ttl"].as_i64(),
            ),
        );
    }
}

async fn read_v2(url: &str) -> V2Snapshot {
    let body: Value = reqwest::get(format!("{url}/v2/keys/?recursive=true&sorted=true"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    flatten(&body["node"], &mut out);
    out
}

/// A 3.4.23/etcd2 data dir with the data set; returns what v2 held after the seeding.
async fn seeded_v2_dir(
    dir: &Path,
    permanent: usize,
    events: usize,
    masterleases: usize,
    outside: usize,
) {
    let mut spec = MemberSpec::new("3.4.23", dir, "m1");
    spec.extra.push("--enable-v2=true".into());
    let m = Member::spawn(spec);
    m.wait_healthy(std::time::Duration::from_secs(30));
    seed_v2(&m.client_url, permanent, events, masterleases, outside).await;
    m.stop();
    record_version(dir, "3.4.23/etcd2");
}

/// Reads what v2 holds right now without changing the data: on a throwaway copy.
async fn v2_now(dir: &Path, scratch: &Path) -> (V2Snapshot, Instant) {
    cp_dir(dir, scratch);
    let mut spec = MemberSpec::new("3.4.23", scratch, "m1");
    spec.extra.push("--enable-v2=true".into());
    let m = Member::spawn(spec);
    m.wait_healthy(std::time::Duration::from_secs(30));
    let snap = read_v2(&m.client_url).await;
    let at = Instant::now();
    m.stop();
    (snap, at)
}

fn journal_detail(data: &Path) -> Value {
    journal(data)
        .into_iter()
        .find(|e| e["kind"] == "migrate-storage")
        .expect("a migrate-storage journal entry")["detail"]
        .clone()
}

struct Expect {
    /// Keys that must carry a lease.
    leased: BTreeSet<String>,
}

/// Checks the migrated store against what v2 held before.
async fn check_migrated(
    data: &Path,
    version: &str,
    before: &V2Snapshot,
    captured_at: Instant,
    expect: &Expect,
    granularity: i64,
) {
    let m = Member::start(version, data, "m1");
    let mut c = m.client().await;
    let after = dump(&mut c).await;
    let elapsed = captured_at.elapsed().as_secs() as i64 + 1;
    // Every key came through, but for one whose TTL ran out since it was read (the shortest
    // masterlease has 30 s: a slow machine may take that long).
    let missing: Vec<(&String, Option<i64>)> = before
        .iter()
        .filter(|(k, _)| !after.contains_key(k.as_bytes()))
        .map(|(k, v)| (k, v.3))
        .collect();
    assert!(
        missing
            .iter()
            .all(|(_, ttl)| ttl.is_some_and(|t| t <= elapsed + granularity)),
        "every key came through but for expired ones; missing: {:?} ({elapsed}s elapsed)",
        &missing[..missing.len().min(5)]
    );
    assert_eq!(after.len() + missing.len(), before.len());
    let mut lease_ttl: HashMap<i64, i64> = HashMap::new();
    for (k, kv) in &after {
        let key = String::from_utf8(k.clone()).unwrap();
        let (value, created, modified, ttl) = before
            .get(&key)
            .unwrap_or_else(|| panic!("{key} was not in v2"));
        assert_eq!(&String::from_utf8_lossy(&kv.value), value, "{key}");
        if expect.leased.contains(&key) {
            assert_ne!(kv.lease, 0, "{key} has a TTL and must have a lease");
            let captured = ttl.expect("a leased key had a TTL");
            let remaining = match lease_ttl.get(&kv.lease) {
                Some(r) => *r,
                None => {
                    let r = c.lease_time_to_live(kv.lease, None).await.unwrap().ttl();
                    lease_ttl.insert(kv.lease, r);
                    r
                }
            };
            assert!(
                remaining <= captured && remaining >= captured - elapsed - granularity - 1,
                "{key}: lease remaining {remaining}s, captured {captured}s, {elapsed}s elapsed"
            );
        } else {
            assert_eq!(kv.lease, 0, "{key} is permanent and must have no lease");
            assert_eq!(
                (kv.create_revision, kv.mod_revision),
                (*created, *modified),
                "{key}: revisions = v2 indexes"
            );
        }
    }
    let detail = journal_detail(data);
    assert_eq!(
        detail["leases_granted"].as_u64().unwrap(),
        lease_ttl.len() as u64,
        "{detail}"
    );
    let distinct_ttls: BTreeSet<i64> = before
        .iter()
        .filter(|(k, _)| expect.leased.contains(*k))
        .filter_map(|(_, v)| v.3)
        .collect();
    assert!(
        lease_ttl.len() <= 2 * distinct_ttls.len(),
        "one lease per TTL bucket: {} leases for {} TTLs",
        lease_ttl.len(),
        distinct_ttls.len()
    );
    assert_eq!(detail["empty_dirs"], 3, "empty v2 directories are reported");
    assert_eq!(
        detail["keys_migrated"].as_u64().unwrap(),
        before.len() as u64
    );
    m.stop();
}

fn leased_all(before: &V2Snapshot) -> BTreeSet<String> {
    before
        .iter()
        .filter(|(_, v)| v.3.is_some())
        .map(|(k, _)| k.clone())
        .collect()
}

#[tokio::test]
async fn etcd2_to_etcd3_keeps_every_key_and_each_keys_remaining_ttl() {
    let t = tempfile::tempdir().unwrap();
    let seed = t.path().join("seed");
    seeded_v2_dir(&seed, 5000, 20000, 100, 10).await;

    for (target, scope) in [("3.4.23", "all"), ("3.5.1", "all"), ("3.4.23", "directory")] {
        let data = t.path().join(format!("data-{target}-{scope}"));
        cp_dir(&seed, &data);
        let (before, captured_at) = v2_now(&data, &t.path().join("scratch")).await;
        assert_eq!(before.len(), 25110);
        let mut env = MigrateEnv::new(&data, "m1", target, "etcd3");
        env.set("TTL_SCOPE", scope);
        let log = text(&env.run_ok(&["migrate"], &format!("{target} {scope}")));
        assert_eq!(recorded_version(&data), format!("{target}/etcd3"));
        assert!(log.contains("captured v2 keys and TTLs"), "{log}");
        assert!(
            log.contains("prefix=/registry/events ttl_keys=20000"),
            "TTL keys per prefix in the log:\n{log}"
        );
        let leased = if scope == "all" {
            leased_all(&before)
        } else {
            before
                .keys()
                .filter(|k| k.starts_with("/registry/events/"))
                .cloned()
                .collect()
        };
        check_migrated(&data, target, &before, captured_at, &Expect { leased }, 1).await;
        let detail = journal_detail(&data);
        assert_eq!(detail["ttl_keys"], 20110);
        // Which child a memory limit must fit: `etcdctl migrate`'s peak is recorded apart.
        let tool_mb = detail["children_peak_rss_mb_after_etcdctl_migrate"].as_u64();
        assert!(tool_mb.is_some_and(|mb| mb > 0), "{detail}");
        assert_eq!(
            detail["ttl_keys_outside_ttl_dir"], 110,
            "masterleases and /other are outside /registry/events"
        );
        if scope == "directory" {
            assert_eq!(
                detail["ttl_keys_leased"], 20000,
                "the Kubernetes behaviour: only events get leases"
            );
            assert_eq!(detail["ttl_keys_left_permanent"], 110);
        } else {
            assert_eq!(detail["ttl_keys_leased"], 20110);
        }
        // status reports the step and the backup of the etcd2 data.
        assert_backup_kept(&env, "3.4.23/etcd2");
        let _ = fs::remove_dir_all(t.path().join("scratch"));
        let _ = fs::remove_dir_all(&data);
    }
}

/// Keys of a 2.2.1 fixture's keys.json that must come out: (key, value, had a TTL).
fn fixture_leaves(name: &str) -> Vec<(String, String, bool)> {
    fixture_keys(name)
        .into_iter()
        .filter(|k| !k.dir)
        .map(|k| (k.key, k.value.unwrap_or_default(), k.ttl.is_some()))
        .collect()
}

#[tokio::test]
async fn real_221_fixtures_go_through_etcdctl_migrate_and_keep_every_key() {
    for fixture in ["etcd-2.2.1-v2", "etcd-2.2.1-v2-snap"] {
        for target in ["3.4.23", "3.5.1"] {
            let t = tempfile::tempdir().unwrap();
            let data = untar_fixture(fixture, t.path());
            // No 2.x/3.0-3.3 binaries here: 3.4.23 takes the place of the first 3.x release.
            record_version(&data, "3.4.23/etcd2");
            let env = MigrateEnv::new(&data, "etcd-test", target, "etcd3");
            let out = env.run_ok(&["migrate"], &format!("{fixture} -> {target}"));
            if target == "3.5.1" {
                assert!(
                    text(&out).contains("3.4.23/etcd2 -> 3.4.23/etcd3")
                        || text(&out).contains("storage etcd2 -> etcd3 at 3.4.23")
                );
            }
            let m = Member::start(target, &data, "etcd-test");
            let got = dump(&mut m.client().await).await;
            let want = fixture_leaves(fixture);
            assert_eq!(got.len(), want.len(), "{fixture} -> {target}");
            for (k, v, ttl) in want {
                let kv = got
                    .get(k.as_bytes())
                    .unwrap_or_else(|| panic!("{fixture} -> {target}: {k} missing"));
                assert_eq!(String::from_utf8_lossy(&kv.value), v, "{k}");
                assert_eq!(
                    kv.lease != 0,
                    ttl,
                    "{k}: a lease exactly where the key had a TTL"
                );
            }
            m.stop();
        }
    }
}
