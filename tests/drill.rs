//! The disaster-recovery drill with real etcd: three members under a writer, the snapshot sidecar
//! taking verified snapshots; all three killed and their data dirs lost; one brought back from the
//! newest snapshot by RESTORE_SNAPSHOT, serving exactly the writes that snapshot holds; the other
//! two joined again by the runbook's steps (`member add`, an empty data dir, `existing` state);
//! then every pod restarted once more with its env unchanged, and nothing restored twice.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use etcd_client::{Client, ConnectOptions, GetOptions};

async fn client(endpoints: Vec<String>) -> Client {
    let opts = ConnectOptions::new()
        .with_timeout(Duration::from_secs(3))
        .with_connect_timeout(Duration::from_millis(500));
    Client::connect(endpoints, Some(opts)).await.unwrap()
}

fn wait_healthy(s: &MemberSpec, log: &Path) {
    wait_until(
        format_args!("{} to be healthy; log:\n{}", s.name, LogTail(log, 25)),
        Duration::from_secs(60),
        || http_get(&s.client_url(), "/health").filter(|b| b.contains("true")),
    );
}

/// Member `s`'s pod: `etcd-migrate run -- <its etcd flags>` with the manifest's env.
fn pod(s: &MemberSpec, version: &str, restore: Option<&Path>, log: &Path) -> Child {
    let mut env = MigrateEnv::new(&s.data_dir, &s.name, version, "etcd3");
    let ic = s.initial_cluster.clone().unwrap();
    env.set("INITIAL_CLUSTER", &ic)
        .set("LISTEN_PEER_URLS", &s.peer_url())
        .set("INITIAL_ADVERTISE_PEER_URLS", &s.peer_url());
    if let Some(f) = restore {
        env.set("RESTORE_SNAPSHOT", &f.to_string_lossy());
    }
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = env.run_command(&s.flags());
    cmd.stdout(out.try_clone().unwrap()).stderr(out);
    die_with_parent(&mut cmd);
    cmd.spawn().unwrap()
}

/// Every key under `prefix` that member `url` holds itself, with its value.
async fn keys_on(url: &str, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut c = client(vec![url.to_string()]).await;
    let opts = GetOptions::new().with_prefix().with_serializable();
    let r = c.get(prefix, Some(opts)).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key().to_vec()).unwrap(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

/// The newest verified snapshot in `dir`.
fn newest_snapshot(dir: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "db"))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v.pop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_member_and_coming_back_from_the_newest_snapshot() {
    let version = newest_35();
    let root = tempfile::tempdir().unwrap();
    let mut specs = cluster_specs(root.path(), &version, &["m1", "m2", "m3"], "http");
    let log = |s: &MemberSpec| s.data_dir.with_extension("pod.log");
    let mut procs = Procs(
        specs
            .iter()
            .map(|s| pod(s, &version, None, &log(s)))
            .collect(),
    );
    for s in &specs {
        wait_healthy(s, &log(s));
    }

    // A writer, each acknowledged write with the revision it got.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut w = client(specs.iter().map(|s| s.client_url()).collect()).await;
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = format!("/registry/w/{i:06}");
                if let Ok(r) = w.put(k.clone(), format!("v{i}"), None).await {
                    acked
                        .lock()
                        .unwrap()
                        .push((k, r.header().unwrap().revision()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The sidecar of m1's pod.
    let snaps = root.path().join("snapshots");
    let mut sidecar = Command::new(env!("CARGO_BIN_EXE_etcd-migrate"));
    sidecar
        .arg("snapshot")
        .env_clear()
        .env("SNAPSHOT_ENDPOINT", specs[0].client_url())
        .env("SNAPSHOT_DIR", &snaps)
        .env("SNAPSHOT_EVERY", "1s")
        .env("SNAPSHOT_KEEP", "3")
        .stdin(Stdio::null())
        .stdout(fs::File::create(root.path().join("sidecar.log")).unwrap())
        .stderr(fs::File::create(root.path().join("sidecar.log")).unwrap());
    die_with_parent(&mut sidecar);
    let sidecar = Procs(vec![sidecar.spawn().unwrap()]);
    wait_until(
        "three snapshots and 200 writes",
        Duration::from_secs(60),
        || {
            let n = fs::read_dir(&snaps).map(|d| d.count()).unwrap_or(0);
            (n >= 3 && acked.lock().unwrap().len() >= 200).then_some(())
        },
    );

    // The writer stops (every write in flight answered), the sidecar takes one more.
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let last = newest_snapshot(&snaps);
    wait_until("one more snapshot", Duration::from_secs(30), || {
        (newest_snapshot(&snaps) != last).then_some(())
    });
    // Disaster: every member killed, every data dir lost.
    drop(sidecar);
    for c in &mut procs.0 {
        let _ = c.kill();
        let _ = c.wait();
    }
    for s in &specs {
        fs::remove_dir_all(&s.data_dir).unwrap();
    }
    let newest = newest_snapshot(&snaps).expect("a snapshot");
    let rev = snapshot_revision(&newest);
    let acked = acked.lock().unwrap().clone();
    let held: BTreeMap<String, Vec<u8>> = acked
        .iter()
        .filter(|(_, r)| *r <= rev)
        .map(|(k, _)| {
            (
                k.clone(),
                format!("v{}", &k[12..].trim_start_matches('0')).into_bytes(),
            )
        })
        .collect();
    assert!(
        held.len() >= 100,
        "the snapshot holds writes: {}",
        held.len()
    );

    // 1. m1 from the newest snapshot, by env; its manifest otherwise unchanged.
    procs.0[0] = pod(&specs[0], &version, Some(&newest), &log(&specs[0]));
    wait_healthy(&specs[0], &log(&specs[0]));
    let got = keys_on(&specs[0].client_url(), "/registry/w/").await;
    assert_eq!(
        got, held,
        "m1 serves every write the snapshot holds, and nothing after it"
    );
    assert_eq!(restores(&specs[0].data_dir), 1);

    // 2. m2 and m3 by the runbook: member add, an empty data dir, `existing` state.
    let mut c = client(vec![specs[0].client_url()]).await;
    for i in 1..3 {
        // etcd refuses an add for a few seconds after a member joined ("unhealthy cluster").
        let peer = specs[i].peer_url();
        wait_until_async("member add", Duration::from_secs(30), async || {
            c.member_add([peer.clone()], None).await.ok()
        })
        .await;
        let ic = specs[..=i]
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        specs[i].initial_cluster = Some(ic);
        specs[i].cluster_state = "existing";
        procs.0[i] = pod(&specs[i], &version, None, &log(&specs[i]));
        wait_healthy(&specs[i], &log(&specs[i]));
    }
    c.put("/registry/after-recovery", "yes", None)
        .await
        .unwrap();
    let members = c.member_list().await.unwrap();
    let mut names: Vec<&str> = members.members().iter().map(|m| m.name()).collect();
    names.sort();
    assert_eq!(names, ["m1", "m2", "m3"]);
    for s in &specs {
        let url = s.client_url();
        let all = wait_until_async(
            format!("{} to hold every key", s.name),
            Duration::from_secs(30),
            async || {
                let got = keys_on(&url, "/registry/").await;
                (got.len() == held.len() + 1).then_some(got)
            },
        )
        .await;
        assert_eq!(
            all.get("/registry/after-recovery").map(|v| v.as_slice()),
            Some(&b"yes"[..])
        );
    }

    // 3. Each pod restarted once more, env unchanged: nothing restored twice.
    for (i, (s, p)) in specs.iter().zip(procs.0.iter_mut()).enumerate() {
        stop_child(p, Duration::from_secs(20));
        let restore = (i == 0).then_some(newest.as_path());
        *p = pod(s, &version, restore, &log(s));
        wait_healthy(s, &log(s));
    }
    assert_eq!(restores(&specs[0].data_dir), 1, "restored once");
    let pod_log = fs::read_to_string(log(&specs[0])).unwrap();
    assert!(
        pod_log.contains("restored from this snapshot already"),
        "{pod_log}"
    );
    let mut c = client(specs.iter().map(|s| s.client_url()).collect()).await;
    let r = c.get("/registry/after-recovery", None).await.unwrap();
    assert_eq!(
        r.kvs()[0].value(),
        b"yes",
        "a write after the recovery survives the restarts"
    );
    assert_eq!(c.member_list().await.unwrap().members().len(), 3);
}
