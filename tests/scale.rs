//! Real sizes: etcd-migrate's own memory does not grow with the store. An upgrade step of a
//! member twenty times larger than a memory cap completes under that cap (the old way, which
//! indexed every key in memory first, needed more than the cap on this member).
//!
//! The cap is RLIMIT_DATA (what `prlimit --data` sets) on etcd-migrate alone, not a cgroup: a
//! cgroup would also charge the step's etcd, which, like any etcd starting on the member, needs
//! memory in proportion to the store (it maps the backend and replays the WAL). Its children
//! get the cap lifted again by the bin dir's wrappers (the hard limit is left unlimited).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use etcd_client::{Client, Txn, TxnOp};

/// The cap on etcd-migrate's data segment (heap and private mappings, thread stacks included).
const CAP_MB: u64 = 16;

/// A bin dir whose etcd, etcdctl and etcdutl lift the soft data limit before running the real
/// binary: the cap is etcd-migrate's only.
fn uncapped_children(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for e in fs::read_dir(bundle()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("etcd") {
            continue;
        }
        let p = dir.join(&name);
        fs::write(
            &p,
            format!(
                "#!/bin/sh\nulimit -S -d unlimited\nexec {} \"$@\"\n",
                e.path().display()
            ),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A 3.4.23 member of `keys` keys with 1 KB values, written in large transactions.
async fn big_member(dir: &Path, keys: usize) {
    let mut spec = MemberSpec::new("3.4.23", dir, "m1");
    spec.extra = vec![
        "--max-txn-ops=2000".into(),
        "--max-request-bytes=10485760".into(),
        "--quota-backend-bytes=8589934592".into(),
        "--snapshot-count=10000".into(),
    ];
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    let c = Client::connect([m.client_url.as_str()], None)
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for start in (0..keys).step_by(2000) {
        let mut c = c.clone();
        set.spawn(async move {
            let ops: Vec<TxnOp> = (start..(start + 2000).min(keys))
                .map(|i| {
                    let v = format!(
                        "{{\"kind\":\"ConfigMap\",\"i\":{i},\"d\":\"{}\"}}",
                        "x".repeat(1000)
                    );
                    TxnOp::put(
                        format!("/registry/configmaps/ns-{}/cm-{i:07}", i % 50),
                        v,
                        None,
                    )
                })
                .collect();
            c.txn(Txn::new().and_then(ops)).await.unwrap();
        });
        while set.len() >= 8 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while set.join_next().await.is_some() {}
    drop(c);
    m.stop();
    record_version(dir, "3.4.23/etcd3");
}

fn capped_run(env: &MigrateEnv, cap_mb: u64) -> std::process::Output {
    let mut cmd = env.command(&["migrate"]);
    let cap = cap_mb << 20;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: cap,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(std::process::Stdio::null()).output().unwrap()
}

#[tokio::test]
async fn an_upgrade_of_a_member_twenty_times_the_cap_completes_under_it() {
    let t = tempfile::tempdir().unwrap();
    let seed = t.path().join("seed");
    big_member(&seed, 300_000).await;
    let db_mb = fs::metadata(seed.join("member/snap/db")).unwrap().len() >> 20;
    assert!(
        db_mb >= 20 * CAP_MB,
        "the member ({db_mb} MB) is not twenty times the cap"
    );
    let bin = t.path().join("bin");
    uncapped_children(&bin);
    let new = newest_35();

    // The cap binds: far below it, etcd-migrate cannot even start, and touches nothing.
    let control = t.path().join("control");
    cp_dir(&seed, &control);
    let h0 = tree_hash(&control);
    let mut env = MigrateEnv::new(&control, "m1", &new, "etcd3");
    env.set("ETCD_BIN_DIR", bin.to_str().unwrap());
    let out = capped_run(&env, 1);
    assert!(
        !out.status.success(),
        "ran under a 1 MB cap: {}",
        text(&out)
    );
    assert_eq!(tree_hash(&control), h0);

    let data = t.path().join("data");
    cp_dir(&seed, &data);
    let mut env = MigrateEnv::new(&data, "m1", &new, "etcd3");
    env.set("ETCD_BIN_DIR", bin.to_str().unwrap())
        .set("CHILD_OUTPUT", "quiet");
    let out = capped_run(&env, CAP_MB);
    let log = text(&out);
    assert!(out.status.success(), "under a {CAP_MB} MB cap: {log}");
    assert_eq!(
        fs::read_to_string(data.join("version.txt")).unwrap().trim(),
        format!("{new}/etcd3")
    );
    assert!(
        log.contains("every revision and value read back as before"),
        "{log}"
    );
    let own: u64 = log
        .lines()
        .rev()
        .find(|l| l.contains("migration complete"))
        .and_then(|l| l.split("peak_rss_mb=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak_rss_mb in {log}"));
    // Resident memory also counts the binary's own pages (a debug build here): a small fraction
    // of the store, not in proportion to it.
    assert!(
        own * 8 < db_mb,
        "etcd-migrate's own peak RSS {own} MB on a {db_mb} MB member"
    );
}
