//! Minority failure: a member of a three-member cluster loses its data dir; its pod restarts with
//! the manifest unchanged (plus REJOIN_IF_EMPTY=true) and rejoins by itself, under a writer; the
//! refusals leave the cluster and the disk as they were; a run killed at each point converges.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use etcd_client::{Client, ConnectOptions, GetOptions};

const VERSION: &str = "3.4.23";

/// A running three-member cluster whose every member has recorded its version.
struct Cluster {
    _root: tempfile::TempDir,
    specs: Vec<MemberSpec>,
    procs: Procs,
    /// Peers over mTLS (client URLs stay plain HTTP on loopback).
    tls: Option<Tls>,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(false)
    }

    fn start_with(mtls: bool) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let scheme = if mtls { "https" } else { "http" };
        let tls = mtls.then(|| Tls::make(root.path(), &["m1", "m2", "m3"]));
        let specs = cluster_specs(root.path(), VERSION, &["m1", "m2", "m3"], scheme);
        let procs = Procs(specs.iter().map(|s| spawn(s, tls.as_ref())).collect());
        let c = Cluster {
            _root: root,
            specs,
            procs,
            tls,
        };
        for s in &c.specs {
            wait_healthy(s);
            record_version(&s.data_dir, &format!("{VERSION}/etcd3"));
        }
        c
    }

    fn endpoints(&self, of: &[usize]) -> Vec<String> {
        of.iter().map(|&i| self.specs[i].client_url()).collect()
    }

    /// Kills member `i` with SIGKILL and deletes its data dir: the disk is lost.
    fn lose(&mut self, i: usize) {
        let _ = self.procs.0[i].kill();
        let _ = self.procs.0[i].wait();
        fs::remove_dir_all(&self.specs[i].data_dir).unwrap();
    }

    fn stop(&mut self, i: usize) {
        stop_child(&mut self.procs.0[i], Duration::from_secs(20));
    }

    fn restart(&mut self, i: usize) {
        self.procs.0[i] = spawn(&self.specs[i], self.tls.as_ref());
        wait_healthy(&self.specs[i]);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Member `i`'s etcd flags, as its pod passes them after `run --`.
    fn flags(&self, i: usize) -> Vec<String> {
        member_flags(&self.specs[i], self.scheme(), self.tls.as_ref())
    }

    /// The environment of member `i`'s pod: the manifest's, with REJOIN_IF_EMPTY as given.
    fn env(&self, i: usize, rejoin: bool) -> MigrateEnv {
        let s = &self.specs[i];
        let mut env = MigrateEnv::new(&s.data_dir, &s.name, VERSION, "etcd3");
        let scheme = self.scheme();
        let ic = with_scheme(vec![s.initial_cluster.clone().unwrap()], scheme).remove(0);
        let peer = format!("{scheme}://127.0.0.1:{}", s.peer_port);
        env.set("INITIAL_CLUSTER", &ic)
            .set("LISTEN_PEER_URLS", &peer)
            .set("INITIAL_ADVERTISE_PEER_URLS", &peer)
            .set("REJOIN_IF_EMPTY", if rejoin { "true" } else { "false" });
        if let Some(t) = &self.tls {
            // Peer URLs need a certificate: the other members are asked on their client URLs.
            let others: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| self.specs[j].client_url())
                .collect();
            env.set("ETCD_CREDS", &t.flags(&s.name).join(" "))
                .set("ETCD_CLUSTER_ENDPOINTS", &others.join(","));
        }
        env
    }
}

fn spawn(s: &MemberSpec, tls: Option<&Tls>) -> std::process::Child {
    let log = fs::File::create(s.data_dir.with_extension("log")).unwrap();
    let mut cmd = std::process::Command::new(bundle().join(format!("etcd-{}", s.version)));
    let scheme = if tls.is_some() { "https" } else { "http" };
    cmd.args(member_flags(s, scheme, tls))
        .env_clear()
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    die_with_parent(&mut cmd);
    cmd.spawn().unwrap()
}

fn wait_healthy(s: &MemberSpec) {
    wait_until(
        format_args!(
            "{} to be healthy; log:\n{}",
            s.name,
            LogTail(&s.data_dir.with_extension("log"), 15)
        ),
        Duration::from_secs(60),
        || http_get(&s.client_url(), "/health").filter(|b| b.contains("true")),
    );
}

async fn client(endpoints: Vec<String>) -> Client {
    let opts = ConnectOptions::new()
        .with_timeout(Duration::from_secs(3))
        .with_connect_timeout(Duration::from_millis(500));
    Client::connect(endpoints, Some(opts)).await.unwrap()
}

/// (id, name) of every member, as the cluster lists them.
async fn members(c: &mut Client) -> Vec<(u64, String)> {
    let r = wait_until_async("member list", Duration::from_secs(20), async || {
        c.member_list().await.ok()
    })
    .await;
    let mut m: Vec<(u64, String)> = r
        .members()
        .iter()
        .map(|m| (m.id(), m.name().to_string()))
        .collect();
    m.sort();
    m
}

/// Keys under `prefix` that member `url` holds itself (serializable reads: its own copy).
async fn keys_on(url: &str, prefix: &str) -> BTreeSet<String> {
    let mut c = client(vec![url.to_string()]).await;
    let opts = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_serializable();
    let r = c.get(prefix, Some(opts)).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| String::from_utf8(kv.key().to_vec()).unwrap())
        .collect()
}

fn journal_events(data_dir: &Path) -> Vec<String> {
    journal(data_dir)
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_data_rejoins_under_a_writer_keeping_every_write() {
    lose_and_rejoin_under_a_writer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rejoins_over_peer_mtls_from_etcd_creds() {
    lose_and_rejoin_under_a_writer(true).await;
}

async fn lose_and_rejoin_under_a_writer(mtls: bool) {
    let mut cl = Cluster::start_with(mtls);
    let mut c = client(cl.endpoints(&[0, 1])).await;
    for i in 0..200 {
        c.put(format!("/registry/pods/p{i:04}"), "v", None)
            .await
            .unwrap();
    }
    let before = members(&mut c).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop_writer) = (acked.clone(), stop_writer.clone());
        let mut w = client(cl.endpoints(&[0, 1])).await;
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop_writer.load(Ordering::Relaxed) {
                i += 1;
                let k = format!("/registry/w/{i:06}");
                if w.put(k.clone(), "x", None).await.is_ok() {
                    acked.lock().unwrap().push(k);
                }
                // Pacing, not waiting: a steady trickle of writes across the rejoin.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    cl.lose(2);
    let env = cl.env(2, true);
    let log = cl.specs[2].data_dir.with_extension("migrate.log");
    let pod = env
        .run_command(&cl.flags(2))
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    cl.procs.0[2] = pod;
    wait_healthy(&cl.specs[2]);
    wait_until_async(
        "more than 100 writes across the rejoin",
        Duration::from_secs(30),
        async || (acked.lock().unwrap().len() > 100).then_some(()),
    )
    .await;
    stop_writer.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    for s in &cl.specs {
        let url = s.client_url();
        let what = format!("{} to hold every acknowledged write", s.name);
        let held = wait_until_async(what, Duration::from_secs(20), async || {
            let held = keys_on(&url, "/registry/w/").await;
            acked.is_subset(&held).then_some(held)
        })
        .await;
        assert!(acked.is_subset(&held));
        assert_eq!(
            keys_on(&url, "/registry/pods/").await.len(),
            200,
            "{}",
            s.name
        );
    }
    let after = members(&mut c).await;
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(after.iter().filter(|(_, n)| n == "m3").count(), 1);
    let old_m3 = before.iter().find(|(_, n)| n == "m3").unwrap().0;
    assert!(
        !after.iter().any(|(id, _)| *id == old_m3),
        "the old m3 is gone"
    );
    assert_eq!(recorded_version(&cl.specs[2].data_dir), "3.4.23/etcd3");
    assert_eq!(journal_events(&cl.specs[2].data_dir), vec!["rejoin"]);
    let out = fs::read_to_string(&log).unwrap();
    assert!(out.contains("rejoined the cluster"), "{out}");
    // The pod's process is etcd now (same PID), started as an existing member.
    let cmdline = fs::read(format!("/proc/{}/cmdline", cl.procs.0[2].id())).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let state = args.iter().position(|a| a == "--initial-cluster-state");
    assert_eq!(
        state.map(|i| args[i + 1].as_str()),
        Some("existing"),
        "{args:?}"
    );
}

/// Runs `migrate` and checks it was refused (exit 2) saying `says`.
fn assert_refused(env: &MigrateEnv, says: &str) {
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains(says), "want {says:?}: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_change_nothing_on_the_cluster_or_the_disk() {
    let mut cl = Cluster::start();
    let mut c = client(cl.endpoints(&[0, 1])).await;
    let before = members(&mut c).await;
    cl.lose(2);
    let data = cl.specs[2].data_dir.clone();

    // Without the opt-in: the remedy, not a crash loop.
    assert_refused(&cl.env(2, false), "REJOIN_IF_EMPTY=true");
    assert_refused(&cl.env(2, false), "started member");
    assert!(!data.exists(), "nothing written");

    // A name the cluster does not know.
    let mut env = cl.env(2, true);
    let ic = cl.specs[2]
        .initial_cluster
        .clone()
        .unwrap()
        .replace("m3=", "m4=");
    env.set("ETCD_NAME", "m4").set("INITIAL_CLUSTER", &ic);
    assert_refused(&env, "does not know a member named m4");
    assert!(!data.exists());

    // The only member.
    let mut env = cl.env(2, true);
    env.set("INITIAL_CLUSTER", &format!("m3={}", cl.specs[2].peer_url()));
    assert_refused(&env, "only member");
    assert!(!data.exists());

    // No quorum: one member of three left.
    cl.stop(1);
    assert_refused(&cl.env(2, true), "no quorum");
    assert!(!data.exists());

    // Nobody answers.
    cl.stop(0);
    assert_refused(&cl.env(2, true), "no peer of m3 answered");
    assert!(!data.exists());

    cl.procs.0[0] = spawn(&cl.specs[0], None);
    cl.procs.0[1] = spawn(&cl.specs[1], None);
    wait_healthy(&cl.specs[0]);
    wait_healthy(&cl.specs[1]);
    let mut c = client(cl.endpoints(&[0, 1])).await;
    assert_eq!(members(&mut c).await, before, "the cluster is as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_killed_at_any_point_converges_on_the_next_run() {
    let mut cl = Cluster::start();
    let mut c = client(cl.endpoints(&[0, 1])).await;
    c.put("/registry/k", "v", None).await.unwrap();
    for point in [
        "rejoin-after-remove",
        "rejoin-after-add",
        "rejoin-catching-up",
    ] {
        cl.lose(2);
        let mut env = cl.env(2, true);
        env.set("FAILPOINTS", &format!("{point}=panic"));
        let out = env.run(&["migrate"]);
        assert!(!out.status.success(), "{point}: {}", text(&out));
        assert!(
            text(&out).contains("crashing at a failpoint"),
            "{point}: {}",
            text(&out)
        );

        let out = cl.env(2, true).run(&["migrate"]);
        assert!(
            out.status.success(),
            "{point}: the next run: {}",
            text(&out)
        );
        assert_eq!(recorded_version(&cl.specs[2].data_dir), "3.4.23/etcd3");
        // The pod's etcd starts on the synced data.
        cl.restart(2);
        let m = members(&mut c).await;
        assert_eq!(m.len(), 3, "{point}: {m:?}");
        assert_eq!(
            m.iter().filter(|(_, n)| n == "m3").count(),
            1,
            "{point}: {m:?}"
        );
        assert!(
            m.iter().all(|(_, n)| !n.is_empty()),
            "{point}: all started: {m:?}"
        );
        let held = keys_on(&cl.specs[2].client_url(), "/registry/").await;
        assert!(held.contains("/registry/k"), "{point}");
    }
}
