//! HA control planes: a rolling migration of a three-member cluster, member by member, as a
//! kubelet restarts each static pod; peers over plain HTTP and over mTLS.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Three members' specs on one machine.
fn three_member_specs(root: &Path, version: &str, scheme: &str) -> Vec<MemberSpec> {
    cluster_specs(root, version, &["m1", "m2", "m3"], scheme)
}

fn spawn_member(spec: &MemberSpec, flags: &[String]) -> Child {
    let log = fs::File::create(
        spec.data_dir
            .with_extension(format!("{}.log", spec.version)),
    )
    .unwrap();
    let mut cmd = Command::new(bundle().join(format!("etcd-{}", spec.version)));
    cmd.args(flags)
        .env_clear()
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd.spawn().unwrap()
}

fn stop(c: &mut Child) {
    stop_child(c, Duration::from_secs(20));
}

/// Waits until the member at `url` reports `want` on /version.
fn wait_version(url: &str, want: &str, timeout: Duration, log: &Path) {
    wait_until(
        format_args!("{url}/version to say {want}; log:\n{}", LogTail(log, 15)),
        timeout,
        || http_get(url, "/version").filter(|v| v.contains(want)),
    );
}

/// Waits until a put of `key` = `value` through `c` succeeds.
async fn wait_put(
    c: &mut etcd_client::Client,
    (key, value): (&str, &str),
    what: &str,
    timeout: Duration,
) {
    wait_until_async(what, timeout, async || c.put(key, value, None).await.ok()).await;
}

fn migrate_env(spec: &MemberSpec, target: &str, scheme: &str, tls: Option<&Tls>) -> MigrateEnv {
    let mut env = MigrateEnv::new(&spec.data_dir, &spec.name, target, "etcd3");
    let ic = with_scheme(vec![spec.initial_cluster.clone().unwrap()], scheme).remove(0);
    let peer = format!("{scheme}://127.0.0.1:{}", spec.peer_port);
    env.set("INITIAL_CLUSTER", &ic)
        .set("LISTEN_PEER_URLS", &peer)
        .set("INITIAL_ADVERTISE_PEER_URLS", &peer);
    if let Some(t) = tls {
        env.set("ETCD_CREDS", &t.flags(&spec.name).join(" "));
    }
    env
}

/// Rolls a 3.4.23 cluster to 3.5.1 member by member under a writer; checks every acked write.
async fn rolling_upgrade(scheme: &str) {
    let t = tempfile::tempdir().unwrap();
    let tls = (scheme == "https").then(|| Tls::make(t.path(), &["m1", "m2", "m3"]));
    let specs = three_member_specs(t.path(), "3.4.23", scheme);
    let mut procs = Procs(
        specs
            .iter()
            .map(|s| spawn_member(s, &member_flags(s, scheme, tls.as_ref())))
            .collect(),
    );
    for s in &specs {
        let log = s.data_dir.with_extension(format!("{}.log", s.version));
        wait_version(&s.client_url(), "3.4.23", Duration::from_secs(30), &log);
    }
    let endpoints: Vec<String> = specs.iter().map(|s| s.client_url()).collect();
    let mut c = etcd_client::Client::connect(endpoints.clone(), None)
        .await
        .unwrap();
    let warm = Duration::from_secs(30);
    wait_put(&mut c, ("/registry/warmup", "1"), "a quorum write", warm).await;
    for s in &specs {
        record_version(&s.data_dir, "3.4.23/etcd3");
    }

    // A client that keeps writing through the members that are up.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop_writer, acked, endpoints) =
            (stop_writer.clone(), acked.clone(), endpoints.clone());
        tokio::spawn(async move {
            let opts = etcd_client::ConnectOptions::new()
                .with_timeout(Duration::from_secs(2))
                .with_connect_timeout(Duration::from_millis(500));
            let mut c = etcd_client::Client::connect(endpoints, Some(opts))
                .await
                .unwrap();
            let mut i = 0u64;
            let mut failures = 0u64;
            while !stop_writer.load(Ordering::Relaxed) {
                i += 1;
                let k = format!("/registry/w/{i:06}");
                match c.put(k.clone(), i.to_string(), None).await {
                    Ok(_) => acked.lock().unwrap().push(k),
                    Err(_) => failures += 1,
                }
                // Pacing, not waiting: a steady trickle of writes across the rolling restarts.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failures
        })
    };

    for (i, s) in specs.iter().enumerate() {
        stop(&mut procs.0[i]);
        let env = migrate_env(s, "3.5.1", scheme, tls.as_ref());
        let run_flags: Vec<String> = member_flags(s, scheme, tls.as_ref())
            .into_iter()
            .map(|f| {
                if f == "new" {
                    "existing".to_string()
                } else {
                    f
                }
            })
            .collect();
        let log = s.data_dir.with_extension("migrate.log");
        let child = env
            .run_command(&run_flags)
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        procs.0[i] = child;
        let served = "\"etcdserver\":\"3.5.1\"";
        let err = log.with_extension("err");
        wait_version(&s.client_url(), served, Duration::from_secs(60), &err);
        assert_eq!(
            fs::read_to_string(s.data_dir.join("version.txt")).unwrap(),
            "3.5.1/etcd3\n"
        );
        // The cluster is healthy after each member: a quorum write through every member.
        for e in &endpoints {
            let mut one = etcd_client::Client::connect([e.as_str()], None)
                .await
                .unwrap();
            let what = format!("a quorum write through {e} after rolling {}", s.name);
            let key = format!("/registry/health/{}", s.name);
            wait_put(&mut one, (&key, "ok"), &what, Duration::from_secs(10)).await;
        }
        let log = fs::read_to_string(log.with_extension("err")).unwrap();
        assert!(
            log.contains("accepted a write"),
            "the step's health write went through the cluster:\n{log}"
        );
        assert!(!log.contains("--force-new-cluster"));
    }
    // Let the writer go on through the rolled cluster until it has a fair number of writes (a
    // busy machine rolls three members in under a second and writes slowly).
    wait_until_async(
        "more than 50 writes through the rolling cluster",
        Duration::from_secs(30),
        async || (acked.lock().unwrap().len() > 50).then_some(()),
    )
    .await;
    stop_writer.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    // A fresh client: every member has restarted since `c` connected.
    drop(c);
    let mut c = etcd_client::Client::connect(endpoints.clone(), None)
        .await
        .unwrap();
    wait_until_async(
        "the rolled cluster to serve reads",
        Duration::from_secs(10),
        async || {
            let count = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            c.get("/registry/w/", Some(count)).await.ok()
        },
    )
    .await;
    let present: BTreeSet<String> = dump(&mut c)
        .await
        .into_keys()
        .map(|k| String::from_utf8(k).unwrap())
        .filter(|k| k.starts_with("/registry/w/"))
        .collect();
    for k in &acked {
        assert!(present.contains(k), "acknowledged write {k} lost");
    }
    wait_until_async(
        "the cluster version to reach 3.5",
        Duration::from_secs(30),
        async || {
            http_get(&specs[0].client_url(), "/version")
                .filter(|v| v.contains("\"etcdcluster\":\"3.5.0\""))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_rolling_upgrade_keeps_every_acknowledged_write() {
    rolling_upgrade("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_rolling_upgrade_with_peer_mtls_from_etcd_creds() {
    rolling_upgrade("https").await;
}

/// A stopped three-member 3.4.23 cluster with a few keys.
async fn stopped_cluster(root: &Path) -> Vec<MemberSpec> {
    let specs = three_member_specs(root, "3.4.23", "http");
    let mut procs = Procs(specs.iter().map(|s| spawn_member(s, &s.flags())).collect());
    let endpoints: Vec<String> = specs.iter().map(|s| s.client_url()).collect();
    let mut c = etcd_client::Client::connect(endpoints, None).await.unwrap();
    let quorum = Duration::from_secs(30);
    wait_put(&mut c, ("/registry/a", "1"), "a quorum write", quorum).await;
    for p in &mut procs.0 {
        stop(p);
    }
    for s in &specs {
        record_version(&s.data_dir, "3.4.23/etcd3");
    }
    specs
}

#[tokio::test]
async fn a_member_whose_peers_are_down_times_out_naming_them_then_completes() {
    let t = tempfile::tempdir().unwrap();
    let specs = stopped_cluster(t.path()).await;
    let m1 = &specs[0];
    let mut env = migrate_env(m1, "3.5.1", "http", None);
    env.set("HEALTH_TIMEOUT", "6s");
    let before = fs::read_to_string(m1.data_dir.join("version.txt")).unwrap();
    let out = env.run(&["migrate"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("did not accept a write within 6s"), "{log}");
    for p in &specs[1..] {
        assert!(
            log.contains(&format!("{} (http://127.0.0.1:{})", p.name, p.peer_port)),
            "names unreachable peer {}: {log}",
            p.name
        );
    }
    assert_eq!(
        fs::read_to_string(m1.data_dir.join("version.txt")).unwrap(),
        before,
        "version.txt unchanged"
    );

    // The peers come back (still 3.4.23): the rerun completes.
    let _peers = Procs(
        specs[1..]
            .iter()
            .map(|s| spawn_member(s, &s.flags()))
            .collect(),
    );
    env.run_ok(&["migrate"], "rerun with the peers back");
    assert_eq!(
        fs::read_to_string(m1.data_dir.join("version.txt")).unwrap(),
        "3.5.1/etcd3\n"
    );
}

#[tokio::test]
async fn rewriting_one_members_data_is_refused_on_a_cluster_untouched() {
    let t = tempfile::tempdir().unwrap();
    let specs = stopped_cluster(t.path()).await;
    // Storage migration: pretend etcd2 storage; rollback: a minor rollback.
    for (version_txt, target, storage) in [
        ("3.4.23/etcd3", "3.3.27", "etcd3"),
        ("3.5.1/etcd3", "3.4.23", "etcd3"),
        ("3.4.23/etcd2", "3.4.23", "etcd3"),
    ] {
        let hashes: Vec<String> = specs
            .iter()
            .map(|s| {
                fs::write(s.data_dir.join("version.txt"), format!("{version_txt}\n")).unwrap();
                tree_hash(&s.data_dir)
            })
            .collect();
        for (s, h) in specs.iter().zip(&hashes) {
            let mut env = migrate_env(s, target, "http", None);
            env.set("TARGET_STORAGE", storage);
            if target == "3.3.27" {
                env.set("BUNDLED_VERSIONS", "3.3.27 3.4.23");
            }
            let out = env.run(&["migrate"]);
            let log = text(&out);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{version_txt} -> {target}: {log}"
            );
            assert!(
                log.contains("cluster of 3 members")
                    && log.contains("shrink the cluster to one member"),
                "{log}"
            );
            assert_eq!(&tree_hash(&s.data_dir), h, "{} changed", s.name);
            let plan = env.run(&["plan", "--output", "json"]);
            assert_eq!(plan.status.code(), Some(2));
        }
    }
    // plan and status show the member count and what is allowed.
    fs::write(specs[0].data_dir.join("version.txt"), "3.4.23/etcd3\n").unwrap();
    let env = migrate_env(&specs[0], "3.5.1", "http", None);
    let plan: serde_json::Value =
        serde_json::from_slice(&env.run(&["plan", "--output", "json"]).stdout).unwrap();
    assert_eq!(plan["members"], 3);
    assert_eq!(plan["allowed"]["upgrade"], true);
    assert_eq!(plan["allowed"]["rollback"], false);
    assert_eq!(plan["allowed"]["storage_migration"], false);
    let status: serde_json::Value =
        serde_json::from_slice(&env.run(&["status", "--output", "json"]).stdout).unwrap();
    assert_eq!(status["members"], 3);
    assert_eq!(status["allowed"]["rollback"], false);
}
