//! The operator's way in, end to end: the image's layout (`make rootfs`, by the same script), the
//! Dockerfile checked without a docker daemon and built for real with buildah, the kube-up style
//! bootstrap (scripts/render-manifests.sh) rendering static pods that parse as Kubernetes Pods,
//! and a fake kubelet that runs a rendered pod's command and env against the rootfs: a fresh
//! cluster, an upgrade, a manual rollback and forward again, etcd and etcd-events side by side,
//! and the Kubernetes-style `sh -c "migrate-if-needed.sh && exec etcd ..."` command line.
//!
//! Every port is a free 127.0.0.1 port substituted into the settings; every process a test starts
//! runs in its own process group, which is stopped and reaped when the test ends, also on failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use etcd_client::{Client, ConnectOptions, PutOptions};
use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use serde_json::Value;

/// How long a pod may take from start to serving: a migration runs first.
const SERVE_TIMEOUT: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", text(&out));
    out
}

/// The versions of etcd-<X.Y.Z> files in a directory, sorted.
fn etcd_versions_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("etcd-")?.to_string();
            (ver.split('.').count() == 3 && ver.split('.').all(|p| p.parse::<u32>().is_ok()))
                .then_some(ver)
        })
        .collect();
    v.sort_by_key(|s| semver_key(s));
    v
}

fn semver_key(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap()).collect()
}

/// A line of images/etcd/versions ("official" or "local"). In the local line, `debian-3.5`
/// stands for the newest etcd 3.5 Debian ships, which `make bundle` fetched and recorded.
fn versions_line(which: &str) -> Vec<String> {
    let text = fs::read_to_string(repo().join("images/etcd/versions")).unwrap();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(which))
        .unwrap_or_else(|| panic!("images/etcd/versions has no {which} line"));
    line.split_whitespace()
        .skip(1)
        .map(|v| match v {
            "debian-3.5" => debian_35(),
            v => v.to_string(),
        })
        .collect()
}

/// The etcd 3.5 the image tests step to: the newest in the bundle (Debian's).
fn new35() -> String {
    newest_35()
}

/// The version of Debian's etcd 3.5 in the bundle, as `make bundle` recorded it.
fn debian_35() -> String {
    let rec = fs::read_to_string(bundle().join(".debian-etcd-3.5"))
        .expect("the bundle does not say which etcd 3.5 Debian shipped: run `make bundle`");
    rec.split_whitespace().next().unwrap().to_string()
}

/// The image rootfs, made once per test run by scripts/rootfs.sh (what `make rootfs` runs), with
/// this build's etcd-migrate in place of the static release binary.
fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-test-rootfs");
        run_ok(
            Command::new(repo().join("scripts/rootfs.sh"))
                .arg(&out)
                .env("MIGRATE_BIN", env!("CARGO_BIN_EXE_etcd-migrate"))
                .env("BUNDLE", bundle()),
            "scripts/rootfs.sh",
        );
        out
    })
}

// ---- the layout ---------------------------------------------------------------------------

/// One expanded line of images/etcd/layout.
#[derive(Debug)]
struct LayoutEntry {
    path: String,
    kind: String,
    mode: Option<u32>,
    source: String,
}

fn at_least(v: &str, min: &str) -> bool {
    let (a, b) = (semver_key(v), semver_key(min));
    a[..b.len()] >= b[..]
}

/// images/etcd/layout expanded for `versions` (an independent reading of the format
/// assemble.sh implements).
fn layout_for(versions: &[String]) -> Vec<LayoutEntry> {
    let text = fs::read_to_string(repo().join("images/etcd/layout")).unwrap();
    let newest = versions.last().unwrap().clone();
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || f[0].starts_with('#') {
            continue;
        }
        assert_eq!(f.len(), 5, "layout line {line:?}");
        let vs: Vec<String> = match f[4] {
            "-" => vec![String::new()],
            "all" => versions.to_vec(),
            "newest" => vec![newest.clone()],
            s if s.starts_with("newest>=") => {
                if at_least(&newest, &s[8..]) {
                    vec![newest.clone()]
                } else {
                    vec![]
                }
            }
            s if s.starts_with(">=") => versions
                .iter()
                .filter(|v| at_least(v, &s[2..]))
                .cloned()
                .collect(),
            other => panic!("layout versions column {other:?}"),
        };
        for v in vs {
            out.push(LayoutEntry {
                path: f[0].replace("{v}", &v),
                kind: f[1].to_string(),
                mode: u32::from_str_radix(f[2], 8).ok(),
                source: f[3].replace("{v}", &v),
            });
        }
    }
    out
}

#[test]
fn rootfs_holds_exactly_the_layout_and_runs_under_chroot() {
    let root = rootfs();
    let versions = etcd_versions_in(&bundle());
    assert_eq!(
        versions,
        versions_line("local"),
        "the bundle differs from the local line of images/etcd/versions"
    );
    let layout = layout_for(&versions);
    let mut named = BTreeSet::new();
    for e in &layout {
        let p = root.join(&e.path);
        let meta = fs::symlink_metadata(&p)
            .unwrap_or_else(|_| panic!("{} is in the layout but not in the rootfs", e.path));
        match e.kind.as_str() {
            "dir" => assert!(meta.is_dir(), "{} is not a dir", e.path),
            "file" => {
                assert!(meta.is_file(), "{} is not a file", e.path);
                let want = fs::read(bundle_or_part(&e.source)).unwrap();
                assert!(
                    fs::read(&p).unwrap() == want,
                    "{} is not a copy of {}",
                    e.path,
                    e.source
                );
            }
            "link" => assert_eq!(
                fs::read_link(&p).unwrap(),
                PathBuf::from(&e.source),
                "{} links elsewhere",
                e.path
            ),
            other => panic!("layout type {other}"),
        }
        if let Some(mode) = e.mode {
            assert_eq!(meta.mode() & 0o7777, mode, "mode of {}", e.path);
        }
        named.insert(PathBuf::from(&e.path));
    }
    // Nothing else, except the shared libraries of dynamically linked parts.
    for entry in walk(root) {
        let rel = entry.strip_prefix(root).unwrap().to_path_buf();
        let lib = rel.starts_with("lib") || rel.starts_with("lib64") || rel.starts_with("usr/lib");
        assert!(
            named.contains(&rel) || lib,
            "{} is in the rootfs but not in the layout",
            rel.display()
        );
    }
    let newest = versions.last().unwrap();
    assert_eq!(
        fs::read_link(root.join("usr/local/bin/etcd")).unwrap(),
        PathBuf::from(format!("etcd-{newest}"))
    );
    // Debian's 3.4.23 is dynamically linked: its libraries came along, so it runs under chroot.
    let out = run_ok(
        Command::new("/usr/sbin/chroot")
            .arg(root)
            .args(["/usr/local/bin/etcd-3.4.23", "--version"]),
        "chroot etcd-3.4.23 --version",
    );
    assert!(
        text(&out).contains("etcd Version: 3.4.23"),
        "{}",
        text(&out)
    );
    let out = run_ok(
        Command::new("/usr/sbin/chroot")
            .arg(root)
            .args(["/bin/sh", "-c", "exec migrate --version"])
            .env("PATH", "/usr/local/bin:/bin"),
        "chroot sh -c 'migrate --version'",
    );
    assert!(text(&out).starts_with("etcd-migrate "), "{}", text(&out));
}

/// Where a layout source comes from when the rootfs is made from the bundle.
fn bundle_or_part(source: &str) -> PathBuf {
    match source {
        "etcd-migrate" => PathBuf::from(env!("CARGO_BIN_EXE_etcd-migrate")),
        "sh" => PathBuf::from("/bin/bash-static"),
        "migrate-if-needed.sh" => repo().join("images/etcd/migrate-if-needed.sh"),
        other => bundle().join(other),
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

// ---- the Dockerfile, without a docker daemon ------------------------------------------------

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let text = fs::read_to_string(repo().join("images/etcd/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
        }
    }
    out
}

/// ARG defaults, first definition wins (the global ones).
fn dockerfile_args() -> BTreeMap<String, String> {
    let mut args = BTreeMap::new();
    for i in dockerfile() {
        if let Some(rest) = i.strip_prefix("ARG ") {
            if let Some((k, v)) = rest.split_once('=') {
                args.entry(k.to_string())
                    .or_insert_with(|| v.trim_matches('"').to_string());
            }
        }
    }
    args
}

#[test]
fn dockerfile_copies_only_what_the_repo_and_the_rootfs_hold() {
    let root = rootfs();
    let args = dockerfile_args();
    let mut checked_rootfs_copy = false;
    for i in dockerfile() {
        let Some(rest) = i.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words[0].starts_with("--from=") {
            continue;
        }
        let (dst, srcs) = words.split_last().unwrap();
        assert!(
            dst.starts_with('/') || dst.starts_with("./"),
            "COPY destination {dst}"
        );
        for src in srcs {
            if *src == "${ROOTFS}/" {
                // PARTS=local: the whole image is the rootfs `make rootfs` made.
                assert_eq!(args.get("ROOTFS").map(String::as_str), Some(".rootfs"));
                assert_eq!(*dst, "/");
                checked_rootfs_copy = true;
                continue;
            }
            assert!(
                repo().join(src).exists(),
                "the Dockerfile copies {src}, which is not in the repo"
            );
        }
    }
    assert!(
        checked_rootfs_copy,
        "the PARTS=local stage does not copy the rootfs"
    );
    // images/Dockerfile is the same file (a link), for `-f images/Dockerfile`.
    assert_eq!(
        fs::canonicalize(repo().join("images/Dockerfile")).unwrap(),
        fs::canonicalize(repo().join("images/etcd/Dockerfile")).unwrap()
    );
    // Every script the official stages run from images/etcd/ exists there.
    for i in dockerfile().iter().filter(|i| i.starts_with("RUN ")) {
        for word in i.split_whitespace() {
            if let Some(name) = word.strip_prefix("/image/") {
                assert!(
                    repo().join("images/etcd").join(name).is_file(),
                    "the Dockerfile runs /image/{name}, which is not in images/etcd/"
                );
            }
        }
    }
    // Everything the final image names exists in the rootfs.
    let mut named = Vec::new();
    for i in dockerfile() {
        for key in ["ENTRYPOINT ", "CMD "] {
            if let Some(json) = i.strip_prefix(key) {
                let v: Vec<String> = serde_json::from_str(json).unwrap();
                named.extend(v.into_iter().filter(|w| w.starts_with('/')));
            }
        }
        if let Some(path) = i.strip_prefix("ENV PATH=") {
            named.extend(path.split(':').map(String::from));
        }
    }
    assert!(
        named.contains(&"/usr/local/bin/etcd-migrate".to_string()),
        "{named:?}"
    );
    for p in &named {
        assert!(
            root.join(p.trim_start_matches('/')).exists(),
            "the Dockerfile names {p}, which the rootfs lacks"
        );
    }
    // The parts the official fetch stage hands to assemble.sh are the ones the layout reads.
    let official = versions_line("official");
    let layout_sources: BTreeSet<String> = layout_for(&official)
        .into_iter()
        .filter(|e| e.kind == "file")
        .map(|e| e.source)
        .collect();
    let run = dockerfile()
        .into_iter()
        .find(|i| i.contains("/image/assemble.sh"))
        .unwrap();
    for part in ["sh", "migrate-if-needed.sh"] {
        assert!(
            run.contains(&format!("/parts/{part}")),
            "the fetch stage does not put {part} in /parts"
        );
        assert!(layout_sources.contains(part));
    }
}

#[test]
fn dockerfile_versions_match_the_version_list_and_the_bundle() {
    let args = dockerfile_args();
    let official: Vec<String> = args["ETCD_VERSIONS"]
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(official, versions_line("official"));
    assert_eq!(etcd_versions_in(&bundle()), versions_line("local"));
    // The image ships the 3.5 that the tests prove: Debian's newest.
    let newest_35 = |list: &[String]| {
        list.iter()
            .rfind(|v| v.starts_with("3.5."))
            .cloned()
            .unwrap()
    };
    let (ours, debian) = (newest_35(&official), newest_35(&versions_line("local")));
    assert!(
        semver_key(&ours) >= semver_key("3.5.20"),
        "the image's 3.5 is {ours}: 3.5 -> 3.6 needs 3.5.20 or later first"
    );
    if ours != debian {
        assert!(
            semver_key(&debian) > semver_key(&ours),
            "the image's official 3.5 is {ours}, newer than any the tests run ({debian}): the image would \
             ship a release no test here has run"
        );
        eprintln!(
            "note: Debian now ships etcd {debian}, the image's official list has {ours}: update the official \
             line of images/etcd/versions and the Dockerfile's ETCD_VERSIONS once {debian} is released upstream"
        );
    }
    assert_eq!(args.get("PARTS").map(String::as_str), Some("official"));
    // Every minor of the official list is needed (no duplicates) and sorted.
    let mut sorted = official.clone();
    sorted.sort_by_key(|v| semver_key(v));
    assert_eq!(official, sorted, "ETCD_VERSIONS is not sorted");
    let minors: BTreeSet<(u32, u32)> = official
        .iter()
        .map(|v| {
            let k = semver_key(v);
            (k[0], k[1])
        })
        .collect();
    assert_eq!(minors.len(), official.len(), "two patches of one minor");
    // build-image.sh passes only build args the Dockerfile declares.
    let script = fs::read_to_string(repo().join("scripts/build-image.sh")).unwrap();
    let passed: Vec<&str> = script
        .split("--build-arg \"")
        .skip(1)
        .map(|rest| rest.split('=').next().unwrap())
        .collect();
    assert!(passed.contains(&"PARTS"), "{passed:?}");
    for name in passed {
        assert!(
            args.contains_key(name),
            "build arg {name} is not in the Dockerfile"
        );
    }
}

/// The official set is a complete upgrade chain: the planner walks 2.2.1/etcd2 (the legacy
/// fixture) to the newest official release through every minor of the list, with no gap.
#[test]
fn official_versions_form_a_complete_upgrade_chain() {
    let official = versions_line("official");
    let newest = official.last().unwrap().clone();
    let t = tempfile::tempdir().unwrap();
    let data = untar_fixture("etcd-2.2.1-v2", t.path());
    let mut env = MigrateEnv::new(&data, "etcd-test", &newest, "etcd3");
    env.set("BUNDLED_VERSIONS", &official.join(" "));
    let out = env.run_ok(&["plan", "--output", "json"], "plan");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let outcomes = field_of_each(&plan["steps"], "outcome");
    let visited: BTreeSet<String> = outcomes
        .iter()
        .map(|o| o.split('/').next().unwrap().to_string())
        .collect();
    for v in official.iter().skip(1) {
        assert!(
            visited.contains(v),
            "the plan 2.2.1 -> {newest} with {official:?} skips {v}: {outcomes:?}"
        );
    }
    assert_eq!(outcomes.last().unwrap(), &format!("{newest}/etcd3"));
}

/// hadolint: `make image-deps` installs it into .tools/.
fn hadolint() -> PathBuf {
    let local = repo().join(".tools/hadolint");
    if local.exists() {
        return local;
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v hadolint"])
        .output()
        .unwrap();
    assert!(
        on_path.status.success(),
        "hadolint is not installed: run `make image-deps`"
    );
    PathBuf::from(String::from_utf8_lossy(&on_path.stdout).trim())
}

#[test]
fn hadolint_passes_the_dockerfile() {
    let out = Command::new(hadolint())
        .arg("--no-color")
        .arg(repo().join("images/etcd/Dockerfile"))
        .output()
        .unwrap();
    assert!(out.status.success(), "hadolint: {}", text(&out));
    // And it does flag a bad Dockerfile, so a pass means something.
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("Dockerfile");
    fs::write(
        &bad,
        "FROM debian\nRUN apt-get install curl\nCOPY a b\nUSER root\n",
    )
    .unwrap();
    let out = Command::new(hadolint())
        .arg("--no-color")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "hadolint passed a bad Dockerfile");
}

#[test]
fn image_and_bootstrap_scripts_pass_shellcheck() {
    let scripts = [
        "images/etcd/assemble.sh",
        "images/etcd/fetch-etcd.sh",
        "images/etcd/migrate-if-needed.sh",
        "scripts/render-manifests.sh",
        "scripts/rootfs.sh",
        "scripts/build-image.sh",
        "scripts/image-deps.sh",
        "testdata/gen-registry.sh",
    ];
    let out = Command::new("shellcheck")
        .current_dir(repo())
        .args(scripts)
        .output()
        .expect("shellcheck is not installed: run `make image-deps`");
    assert!(out.status.success(), "shellcheck: {}", text(&out));
}

/// fetch-etcd.sh (the official stage) refuses an archive whose SHA-256 does not match, and takes
/// one that does; here against a fake release server on file://.
#[test]
fn fetch_etcd_verifies_checksums_before_unpacking() {
    let t = tempfile::tempdir().unwrap();
    let server = t.path().join("releases");
    let make_release = |v: &str, tools: &[&str]| {
        let name = format!("etcd-v{v}-linux-amd64");
        let dir = t.path().join("src").join(&name);
        fs::create_dir_all(&dir).unwrap();
        for tool in tools {
            fs::write(dir.join(tool), format!("#!/bin/sh\necho {tool} {v}\n")).unwrap();
        }
        let rel = server.join(format!("v{v}"));
        fs::create_dir_all(&rel).unwrap();
        run_ok(
            Command::new("tar")
                .arg("czf")
                .arg(rel.join(format!("{name}.tar.gz")))
                .arg("-C")
                .arg(t.path().join("src"))
                .arg(&name),
            "tar",
        );
        rel.join(format!("{name}.tar.gz"))
    };
    let a34 = make_release("3.4.99", &["etcd", "etcdctl"]);
    let a35 = make_release("3.5.99", &["etcd", "etcdctl", "etcdutl"]);
    let sha = |p: &Path| {
        let o = run_ok(Command::new("sha256sum").arg(p), "sha256sum");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    // 3.4.99 pinned in our list; 3.5.99 listed by its release's SHA256SUMS.
    let pins = t.path().join("pins.txt");
    fs::write(
        &pins,
        format!("{}  etcd-v3.4.99-linux-amd64.tar.gz\n", sha(&a34)),
    )
    .unwrap();
    fs::write(
        server.join("v3.5.99/SHA256SUMS"),
        format!("{}  etcd-v3.5.99-linux-amd64.tar.gz\n", sha(&a35)),
    )
    .unwrap();
    let fetch = |versions: &str, out: &Path| {
        Command::new(repo().join("images/etcd/fetch-etcd.sh"))
            .args(["--versions", versions, "--arch", "amd64", "--out"])
            .arg(out)
            .arg("--pins")
            .arg(&pins)
            .env("ETCD_RELEASE_URL", format!("file://{}", server.display()))
            .output()
            .unwrap()
    };
    let parts = t.path().join("parts");
    let out = fetch("3.4.99 3.5.99", &parts);
    assert!(out.status.success(), "{}", text(&out));
    let mut got: Vec<String> = fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "etcd-3.4.99",
            "etcd-3.5.99",
            "etcdctl-3.4.99",
            "etcdctl-3.5.99",
            "etcdutl-3.5.99"
        ]
    );
    // Tampered after pinning: refused, nothing unpacked.
    fs::write(&a34, b"not the release").unwrap();
    let parts2 = t.path().join("parts2");
    let out = fetch("3.4.99", &parts2);
    assert!(!out.status.success(), "a tampered archive was accepted");
    assert!(text(&out).contains("refusing"), "{}", text(&out));
    assert!(!parts2.join("etcd-3.4.99").exists());
    // Listed nowhere: refused.
    let _ = make_release("3.3.99", &["etcd", "etcdctl"]);
    let out = fetch("3.3.99", &parts2);
    assert!(
        !out.status.success(),
        "an unverifiable archive was accepted"
    );
    assert!(text(&out).contains("no checksum"), "{}", text(&out));
}

// ---- the bootstrap: settings -> manifests -------------------------------------------------

/// A settings file for scripts/render-manifests.sh, on free loopback ports.
struct Settings {
    vars: BTreeMap<String, String>,
    file: PathBuf,
}

impl Settings {
    /// Settings for a node "master-1" whose /var/etcd is `<dir>/var-etcd`, on free ports.
    fn for_test(dir: &Path, target_version: &str) -> Settings {
        let mut vars = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            vars.insert(k.to_string(), v);
        };
        set("TARGET_VERSION", target_version.into());
        set("TARGET_STORAGE", "etcd3".into());
        set("ETCD_HOSTNAME", "master-1".into());
        set("ETCD_ADVERTISE_HOST", "127.0.0.1".into());
        set("ETCD_HOST_IP", "127.0.0.1".into());
        set("ETCD_LISTEN_CLIENT_IP", "127.0.0.1".into());
        for k in [
            "ETCD_CLIENT_PORT",
            "ETCD_PEER_PORT",
            "ETCD_MIGRATE_PORT",
            "ETCD_EVENTS_CLIENT_PORT",
            "ETCD_EVENTS_PEER_PORT",
            "ETCD_EVENTS_MIGRATE_PORT",
        ] {
            set(k, free_port().to_string());
        }
        set(
            "ETCD_DATA_ROOT",
            dir.join("var-etcd").to_string_lossy().into_owned(),
        );
        set(
            "ETCD_CREDS_DIR",
            dir.join("srv-kubernetes").to_string_lossy().into_owned(),
        );
        set("ETCD_IMAGE", "localhost/etcd-migrate:test".into());
        Settings {
            vars,
            file: dir.join("settings.env"),
        }
    }

    fn set(&mut self, k: &str, v: &str) -> &mut Self {
        self.vars.insert(k.to_string(), v.to_string());
        self
    }

    fn port(&self, k: &str) -> u16 {
        self.vars[k].parse().unwrap()
    }

    /// Runs the bootstrap script; its output.
    fn try_render(&self, out: &Path) -> Output {
        let body: String = self
            .vars
            .iter()
            .map(|(k, v)| {
                if v.contains('\'') {
                    format!("{k}=\"{v}\"\n")
                } else {
                    format!("{k}='{v}'\n")
                }
            })
            .collect();
        fs::write(&self.file, format!("# written by a test\n{body}")).unwrap();
        Command::new(repo().join("scripts/render-manifests.sh"))
            .arg("--settings")
            .arg(&self.file)
            .arg("--out")
            .arg(out)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap()
    }

    fn render(&self, out: &Path) {
        let o = self.try_render(out);
        assert!(o.status.success(), "render-manifests.sh: {}", text(&o));
    }
}

/// A rendered manifest as a Kubernetes Pod; also checks that the Pod type knows every field
/// (a misspelled field would be dropped by the round trip).
fn load_pod(path: &Path) -> Pod {
    let raw: Value = serde_json::from_slice(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let pod: Pod = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{} is not a Pod: {e}", path.display()));
    let back = serde_json::to_value(&pod).unwrap();
    assert_eq!(
        back,
        raw,
        "{}: fields the Pod type does not know were dropped",
        path.display()
    );
    pod
}

fn container(pod: &Pod) -> &Container {
    &pod.spec.as_ref().unwrap().containers[0]
}

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    container(pod)
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

/// The etcd flags after `run --` in the pod's command.
fn etcd_flags(pod: &Pod) -> Vec<String> {
    let cmd = container(pod).command.as_ref().unwrap();
    let dd = cmd.iter().position(|a| a == "--").unwrap();
    cmd[dd + 1..].to_vec()
}

fn flag<'a>(flags: &'a [String], name: &str) -> &'a str {
    let i = flags.iter().position(|f| f == name).unwrap();
    &flags[i + 1]
}

#[test]
fn rendered_manifests_are_kubernetes_pods_with_the_env_contract() {
    let t = tempfile::tempdir().unwrap();
    let mut s = Settings::for_test(t.path(), "3.4.23");
    s.set(
        "ETCD_CREDS",
        "--peer-cert-file=/etc/srv/kubernetes/peer.crt --peer-key-file '/etc/srv/kubernetes/peer key.pem'",
    );
    s.set("ETCD_EXTRA_ARGS", "--quota-backend-bytes=8589934592");
    let out = t.path().join("manifests");
    s.render(&out);
    let main = load_pod(&out.join("etcd.manifest"));
    let events = load_pod(&out.join("etcd-events.manifest"));
    let mut names = BTreeSet::new();
    for (pod, suffix, client, peer, migrate) in [
        (
            &main,
            "",
            "ETCD_CLIENT_PORT",
            "ETCD_PEER_PORT",
            "ETCD_MIGRATE_PORT",
        ),
        (
            &events,
            "-events",
            "ETCD_EVENTS_CLIENT_PORT",
            "ETCD_EVENTS_PEER_PORT",
            "ETCD_EVENTS_MIGRATE_PORT",
        ),
    ] {
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some(&*format!("etcd-server{suffix}")));
        assert_eq!(meta.namespace.as_deref(), Some("kube-system"));
        names.insert(meta.name.clone().unwrap());
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        let c = container(pod);
        let cmd = c.command.as_ref().unwrap();
        assert_eq!(cmd[..3], ["/usr/local/bin/etcd-migrate", "run", "--"]);
        let env = env_of(pod);
        let data_dir = format!("/var/etcd/data{suffix}");
        let peer_url = format!("http://127.0.0.1:{}", s.port(peer));
        let cluster = format!("etcd-master-1={peer_url}");
        for (k, v) in [
            ("TARGET_STORAGE", "etcd3"),
            ("TARGET_VERSION", "3.4.23"),
            ("DATA_DIRECTORY", data_dir.as_str()),
            ("INITIAL_CLUSTER", cluster.as_str()),
            ("LISTEN_PEER_URLS", peer_url.as_str()),
            ("INITIAL_ADVERTISE_PEER_URLS", peer_url.as_str()),
            ("ETCD_HOSTNAME", "master-1"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k} in {suffix:?}");
        }
        assert_eq!(
            env["LISTEN_CLIENT_URLS"],
            format!("http://127.0.0.1:{}", s.port(migrate))
        );
        assert_eq!(env["ETCD_CREDS"], s.vars["ETCD_CREDS"]);
        // The final etcd's flags agree with the env the migration uses.
        let flags = etcd_flags(pod);
        assert_eq!(flag(&flags, "--data-dir"), data_dir);
        assert_eq!(flag(&flags, "--name"), "etcd-master-1");
        assert_eq!(flag(&flags, "--initial-cluster"), cluster);
        assert_eq!(flag(&flags, "--listen-peer-urls"), peer_url);
        assert_eq!(
            flag(&flags, "--listen-client-urls"),
            format!("http://127.0.0.1:{}", s.port(client))
        );
        // ETCD_CREDS became separate flags, quotes honoured.
        assert_eq!(
            flag(&flags, "--peer-key-file"),
            "/etc/srv/kubernetes/peer key.pem"
        );
        assert!(flags.contains(&"--peer-cert-file=/etc/srv/kubernetes/peer.crt".to_string()));
        assert!(flags.contains(&"--quota-backend-bytes=8589934592".to_string()));
        // Probes: the same etcdctl health check, on this pod's client port.
        let live = c.liveness_probe.as_ref().unwrap();
        let start = c.startup_probe.as_ref().unwrap();
        let live_cmd = live.exec.as_ref().unwrap().command.clone().unwrap();
        assert_eq!(
            start.exec.as_ref().unwrap().command.clone().unwrap(),
            live_cmd
        );
        assert!(
            live_cmd[2].contains(&format!("127.0.0.1:{} ", s.port(client))),
            "{live_cmd:?}"
        );
        assert!(start.failure_threshold.unwrap() * start.period_seconds.unwrap() >= 600);
        // The data root is a hostPath mounted at /var/etcd.
        let mounts = c.volume_mounts.as_ref().unwrap();
        let varetcd = mounts.iter().find(|m| m.mount_path == "/var/etcd").unwrap();
        let vol = volume(pod, &varetcd.name);
        assert_eq!(
            vol.host_path.as_ref().unwrap().path,
            s.vars["ETCD_DATA_ROOT"]
        );
        assert!(spec.termination_grace_period_seconds.unwrap() > 30);
    }
    assert_eq!(names.len(), 2);
    // Only the events data dir matches etcd-migrate's "event" path rule (private ports 18631/2381
    // when the migrate port is left empty).
    assert!(env_of(&events)["DATA_DIRECTORY"].contains("event"));
    assert!(!env_of(&main)["DATA_DIRECTORY"].contains("event"));
}

/// The probes use only flags and commands the probed release's etcdctl has (its `--help` is in
/// ../shared/fixtures/etcd-help): v3 `endpoint health` for etcd3, v2 `cluster-health` of the
/// target release for etcd2.
#[test]
fn probes_use_flags_the_target_etcdctl_knows() {
    for (version, storage, tool, want) in [
        ("3.5.1", "etcd3", "etcdctl-3.5.1", "endpoint health"),
        ("3.4.23", "etcd3", "etcdctl-3.4.23", "endpoint health"),
        ("2.2.1", "etcd2", "etcdctl-2.2.1", "cluster-health"),
        ("3.0.17", "etcd2", "etcdctl-3.0.17", "cluster-health"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let mut s = Settings::for_test(t.path(), version);
        s.set("TARGET_STORAGE", storage);
        s.render(&t.path().join("m"));
        let pod = load_pod(&t.path().join("m/etcd.manifest"));
        let probe = container(&pod).liveness_probe.clone().unwrap();
        let line = probe.exec.unwrap().command.unwrap()[2].clone();
        assert!(line.contains(want), "{line}");
        if storage == "etcd2" {
            assert!(line.contains(&format!("/usr/local/bin/{tool} ")), "{line}");
            assert!(line.starts_with("ETCDCTL_API=2 exec "), "{line}");
        }
        let help = fs::read_to_string(fixtures().join(format!("etcd-help/{tool}.txt"))).unwrap();
        for word in line.split_whitespace().filter(|w| w.starts_with("--")) {
            let name = word.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}=")),
                "{tool} has no {name}: {line}"
            );
        }
        let cmd = want.split(' ').next().unwrap();
        assert!(help.contains(cmd), "{tool} has no {cmd}");
    }
}

#[test]
fn default_settings_render_kube_up_ports_and_the_path_rule() {
    let t = tempfile::tempdir().unwrap();
    // The script with a clean environment, given only the node's hostname.
    let render = |args: &[&std::ffi::OsStr]| {
        let o = Command::new(repo().join("scripts/render-manifests.sh"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ETCD_HOSTNAME", "master-1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    };
    let out = t.path().join("m");
    let settings = repo().join("manifests/settings.env");
    render(&[
        "--settings".as_ref(),
        settings.as_ref(),
        "--out".as_ref(),
        out.as_ref(),
    ]);
    let main = load_pod(&out.join("etcd.manifest"));
    let events = load_pod(&out.join("etcd-events.manifest"));
    let ports = |p: &Pod| -> Vec<i32> {
        container(p)
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect()
    };
    assert_eq!(ports(&main), [2380, 2379]);
    assert_eq!(ports(&events), [2381, 4002]);
    // Empty LISTEN_CLIENT_URLS counts as unset: etcd-migrate picks 18629, or 18631 for events.
    assert_eq!(env_of(&main)["LISTEN_CLIENT_URLS"], "");
    assert_eq!(env_of(&events)["LISTEN_CLIENT_URLS"], "");
    // The example file holds the script's defaults: rendering without it gives the same pods.
    let out2 = t.path().join("m2");
    render(&["--out".as_ref(), out2.as_ref()]);
    for m in ["etcd.manifest", "etcd-events.manifest"] {
        assert_eq!(
            fs::read_to_string(out.join(m)).unwrap(),
            fs::read_to_string(out2.join(m)).unwrap(),
            "manifests/settings.env and the script's defaults differ ({m})"
        );
    }
}

#[test]
fn render_refuses_bad_settings_and_leaves_the_manifests_alone() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("manifests");
    let good = Settings::for_test(t.path(), "3.4.23");
    good.render(&out);
    let before = tree_hash(&out);
    for (k, v, want) in [
        ("TARGET_VERSION", "3.5", "X.Y.Z"),
        ("TARGET_STORAGE", "etcd4", "etcd2 or etcd3"),
        ("ETCD_CLIENT_PORT", "70000", "port"),
        ("ETCD_CREDS", "--peer-key-file '/unterminated", "ETCD_CREDS"),
        (
            "ETCD_INITIAL_CLUSTER",
            "other=http://10.0.0.1:2380",
            "etcd-master-1",
        ),
        ("ETCD_CLUSTER_STATE", "maybe", "new or existing"),
        ("ETCD_REJOIN_IF_EMPTY", "maybe", "true or false"),
        ("ETCD_SNAPSHOT_EVERY", "soon", "ETCD_SNAPSHOT_EVERY=soon"),
        ("ETCD_SNAPSHOT_EVERY", "0m", "ETCD_SNAPSHOT_EVERY=0m"),
        ("ETCD_SNAPSHOT_EVERY", "30", "ETCD_SNAPSHOT_EVERY=30"),
        ("ETCD_SNAPSHOT_KEEP", "0", "ETCD_SNAPSHOT_KEEP=0"),
        ("ETCD_SNAPSHOT_KEEP", "ten", "ETCD_SNAPSHOT_KEEP=ten"),
        (
            "ETCD_SNAPSHOT_DIR",
            "snapshots",
            "ETCD_SNAPSHOT_DIR=snapshots",
        ),
        (
            "ETCD_RESTORE_SNAPSHOT",
            "/elsewhere/etcd.db",
            "ETCD_RESTORE_SNAPSHOT=/elsewhere/etcd.db",
        ),
    ] {
        let mut bad = Settings::for_test(t.path(), "3.4.23");
        bad.set(k, v);
        let o = bad.try_render(&out);
        assert_eq!(o.status.code(), Some(2), "{k}={v}: {}", text(&o));
        assert!(text(&o).contains(want), "{k}={v}: {}", text(&o));
        assert_eq!(tree_hash(&out), before, "{k}={v} changed the manifests dir");
    }
    // An unknown key (a typo) is refused too.
    fs::write(t.path().join("typo.env"), "TARGET_VERSON=3.5.1\n").unwrap();
    let o = Command::new(repo().join("scripts/render-manifests.sh"))
        .arg("--settings")
        .arg(t.path().join("typo.env"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("unknown setting TARGET_VERSON"));
}

#[test]
fn the_two_templates_differ_only_by_the_events_data_dir_and_name() {
    let main = fs::read_to_string(repo().join("manifests/etcd.manifest")).unwrap();
    let events = fs::read_to_string(repo().join("manifests/etcd-events.manifest")).unwrap();
    let as_events = main
        .replace("\"etcd-server\"", "\"etcd-server-events\"")
        .replace("\"component\": \"etcd\"", "\"component\": \"etcd-events\"")
        .replace("/var/etcd/data\"", "/var/etcd/data-events\"");
    assert_eq!(as_events, events);
    assert_ne!(main, events);
}

#[test]
fn generator_reproduces_the_committed_test_data() {
    let out = run_ok(
        Command::new(repo().join("testdata/gen-registry.sh")).arg("40"),
        "gen-registry.sh",
    );
    let committed = fs::read(repo().join("testdata/registry-small.tsv")).unwrap();
    assert!(
        out.stdout == committed,
        "testdata/registry-small.tsv is not `gen-registry.sh 40`"
    );
}

// ---- snapshots and restore by env --------------------------------------------------------

const SIDECAR: &str = "etcd-snapshot";

fn containers(pod: &Pod) -> &[Container] {
    &pod.spec.as_ref().unwrap().containers
}

fn sidecar(pod: &Pod) -> Option<&Container> {
    containers(pod).iter().find(|c| c.name == SIDECAR)
}

fn env_in(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

/// The container's mount of the hostPath dir `host`, if any: (mount path, read-only).
fn mount_of(pod: &Pod, c: &Container, host: &str) -> Option<(String, bool)> {
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    c.volume_mounts.iter().flatten().find_map(|m| {
        let v = volumes.iter().find(|v| v.name == m.name)?;
        (v.host_path.as_ref()?.path == host)
            .then(|| (m.mount_path.clone(), m.read_only.unwrap_or(false)))
    })
}

/// Settings with a snapshot dir each for etcd and etcd-events under `dir`.
fn snapshot_settings(dir: &Path) -> Settings {
    let mut s = Settings::for_test(dir, "3.4.23");
    for (k, sub) in [
        ("ETCD_SNAPSHOT_DIR", "snap-etcd"),
        ("ETCD_EVENTS_SNAPSHOT_DIR", "snap-events"),
    ] {
        s.set(k, &dir.join(sub).to_string_lossy());
    }
    s
}

/// Off by default: one container, no RESTORE_SNAPSHOT, no snapshot volume; not a trace of the
/// optional parts (or of their template markers) in the text.
#[test]
fn default_render_has_no_snapshot_sidecar_and_no_restore() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    snapshot_settings(t.path()).render(&out);
    for m in ["etcd.manifest", "etcd-events.manifest"] {
        let raw = fs::read_to_string(out.join(m)).unwrap();
        for word in [
            "etcd-snapshot",
            "RESTORE_SNAPSHOT",
            "SNAPSHOT_DIR",
            "{{",
            "}}",
        ] {
            assert!(!raw.contains(word), "{m} holds {word:?}:\n{raw}");
        }
        let pod = load_pod(&out.join(m));
        assert_eq!(containers(&pod).len(), 1, "{m}");
        assert!(!env_of(&pod).contains_key("RESTORE_SNAPSHOT"), "{m}");
        let volumes = pod.spec.as_ref().unwrap().volumes.clone().unwrap();
        let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["varetcd", "etc"], "{m}");
    }
}

/// ETCD_SNAPSHOT_EVERY=30m: each pod gets the sidecar, on the etcd container's image and binary,
/// snapshotting its own member's client URL (scheme and port of --advertise-client-urls) into its
/// own host dir, with the client TLS flags, the cert dir, and no probe; etcd sees the dir too.
#[test]
fn snapshot_every_adds_the_sidecar_to_both_pods() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let mut s = snapshot_settings(t.path());
    s.set("ETCD_SNAPSHOT_EVERY", "30m")
        .set("ETCD_SNAPSHOT_KEEP", "4")
        .set("ETCD_CLIENT_PROTOCOL", "https")
        .set("ETCD_CREDS", "--peer-cert-file=/etc/srv/kubernetes/peer.crt")
        .set(
            "ETCD_APISERVER_CREDS",
            "--trusted-ca-file=/etc/srv/kubernetes/ca.crt --cert-file '/etc/srv/kubernetes/etcd server.crt'",
        );
    s.render(&out);
    for (m, dir_key) in [
        ("etcd.manifest", "ETCD_SNAPSHOT_DIR"),
        ("etcd-events.manifest", "ETCD_EVENTS_SNAPSHOT_DIR"),
    ] {
        let pod = load_pod(&out.join(m));
        let main = container(&pod);
        assert_eq!(containers(&pod).len(), 2, "{m}");
        let side = sidecar(&pod).unwrap_or_else(|| panic!("{m}: no {SIDECAR} container"));
        assert_eq!(side.image, main.image, "{m}");
        let cmd = side.command.clone().unwrap();
        assert_eq!(cmd, ["/usr/local/bin/etcd-migrate", "snapshot"], "{m}");
        assert_eq!(cmd[0], main.command.as_ref().unwrap()[0], "{m}");
        assert!(side.args.is_none(), "{m}");
        assert!(
            side.liveness_probe.is_none() && side.startup_probe.is_none(),
            "{m}"
        );
        let requests = side.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{m}"
        );
        assert_eq!(side.security_context, main.security_context, "{m}");

        let env = env_in(side);
        let advertised = flag(&etcd_flags(&pod), "--advertise-client-urls").to_string();
        assert!(advertised.starts_with("https://127.0.0.1:"), "{advertised}");
        assert_eq!(env["SNAPSHOT_ENDPOINT"], advertised, "{m}");
        assert_eq!(env["SNAPSHOT_EVERY"], "30m", "{m}");
        assert_eq!(env["SNAPSHOT_KEEP"], "4", "{m}");
        // The peer flags the etcd container has, then the client TLS flags snapshot reads.
        assert_eq!(
            env["ETCD_CREDS"],
            format!(
                "{} {}",
                env_of(&pod)["ETCD_CREDS"],
                s.vars["ETCD_APISERVER_CREDS"]
            ),
            "{m}"
        );
        assert_eq!(env.len(), 5, "{m}: {env:?}");

        // SNAPSHOT_DIR is where the sidecar mounts this pod's host dir, writable.
        let host = &s.vars[dir_key];
        let (at, ro) =
            mount_of(&pod, side, host).unwrap_or_else(|| panic!("{m}: {host} not mounted"));
        assert_eq!(env["SNAPSHOT_DIR"], at, "{m}");
        assert!(!ro, "{m}: the sidecar's snapshot dir is read-only");
        let spec = pod.spec.as_ref().unwrap();
        let vol = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| &h.path == host));
        assert_eq!(
            vol.unwrap().host_path.as_ref().unwrap().type_.as_deref(),
            Some("DirectoryOrCreate")
        );
        // The cert dir the etcd container mounts, at the same path, read-only.
        let certs = &s.vars["ETCD_CREDS_DIR"];
        let main_certs = mount_of(&pod, main, certs).unwrap();
        assert_eq!(mount_of(&pod, side, certs), Some(main_certs), "{m}");
        // Not the data dir.
        assert!(
            mount_of(&pod, side, &s.vars["ETCD_DATA_ROOT"]).is_none(),
            "{m}"
        );
        // etcd sees the same dir, read-only, at the same path (so RESTORE_SNAPSHOT can name a file).
        assert_eq!(mount_of(&pod, main, host), Some((at, true)), "{m}");
        assert!(!env_of(&pod).contains_key("RESTORE_SNAPSHOT"), "{m}");
    }
    // Plain http and no TLS flags: the sidecar's ETCD_CREDS is the etcd container's.
    let mut s = snapshot_settings(t.path());
    s.set("ETCD_SNAPSHOT_EVERY", "90s").set(
        "ETCD_CREDS",
        "--peer-key-file '/etc/srv/kubernetes/peer key.pem'",
    );
    s.render(&out);
    let pod = load_pod(&out.join("etcd.manifest"));
    let env = env_in(sidecar(&pod).unwrap());
    assert_eq!(env["ETCD_CREDS"], env_of(&pod)["ETCD_CREDS"]);
    assert_eq!(env["SNAPSHOT_KEEP"], "10");
    assert_eq!(
        env["SNAPSHOT_ENDPOINT"],
        format!("http://127.0.0.1:{}", s.port("ETCD_CLIENT_PORT"))
    );
}

/// ETCD_RESTORE_SNAPSHOT, the host path of a file in the member's snapshot dir, becomes the etcd
/// container's RESTORE_SNAPSHOT: the same file as that container sees it. etcd-events has its own
/// setting; no sidecar unless ETCD_SNAPSHOT_EVERY is set.
#[test]
fn restore_snapshot_names_the_file_as_the_etcd_container_sees_it() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let mut s = snapshot_settings(t.path());
    let file = format!(
        "{}/old/etcd-master-1-20261203T101500Z-rev42.db",
        s.vars["ETCD_SNAPSHOT_DIR"]
    );
    s.set("ETCD_RESTORE_SNAPSHOT", &file);
    s.render(&out);
    let main = load_pod(&out.join("etcd.manifest"));
    assert!(sidecar(&main).is_none());
    let host = &s.vars["ETCD_SNAPSHOT_DIR"];
    let (at, ro) = mount_of(&main, container(&main), host).expect("snapshot dir not mounted");
    assert!(ro, "etcd's mount of the snapshot dir is writable");
    let in_pod = &env_of(&main)["RESTORE_SNAPSHOT"];
    let rel = in_pod
        .strip_prefix(&format!("{at}/"))
        .unwrap_or_else(|| panic!("RESTORE_SNAPSHOT {in_pod} is not under the mount {at}"));
    assert_eq!(format!("{host}/{rel}"), file);
    // Only the env it asks for: REJOIN_IF_EMPTY and the rest as before.
    let env = env_of(&main);
    assert_eq!(env["REJOIN_IF_EMPTY"], "false");
    assert_eq!(env["ETCDCTL_API"], "3");
    let events = load_pod(&out.join("etcd-events.manifest"));
    assert!(!env_of(&events).contains_key("RESTORE_SNAPSHOT"));
    assert_eq!(containers(&events).len(), 1);
    assert!(mount_of(
        &events,
        container(&events),
        &s.vars["ETCD_EVENTS_SNAPSHOT_DIR"]
    )
    .is_none());

    // etcd-events: its own file in its own dir.
    let events_file = format!("{}/e.db", s.vars["ETCD_EVENTS_SNAPSHOT_DIR"]);
    s.set("ETCD_EVENTS_RESTORE_SNAPSHOT", &events_file);
    s.render(&out);
    let events = load_pod(&out.join("etcd-events.manifest"));
    let (at, _) = mount_of(
        &events,
        container(&events),
        &s.vars["ETCD_EVENTS_SNAPSHOT_DIR"],
    )
    .unwrap();
    assert_eq!(env_of(&events)["RESTORE_SNAPSHOT"], format!("{at}/e.db"));
}

/// Settings that would render a sidecar or restore that cannot work are refused, naming them.
#[test]
fn render_refuses_snapshot_settings_that_cannot_work() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let base = snapshot_settings(t.path());
    let etcd_dir = base.vars["ETCD_SNAPSHOT_DIR"].clone();
    let cases: Vec<(Vec<(&str, String)>, String)> = vec![
        // https without a CA for the sidecar.
        (
            vec![
                ("ETCD_SNAPSHOT_EVERY", "30m".into()),
                ("ETCD_CLIENT_PROTOCOL", "https".into()),
                (
                    "ETCD_APISERVER_CREDS",
                    "--cert-file=/etc/srv/kubernetes/s.crt".into(),
                ),
            ],
            "--trusted-ca-file".into(),
        ),
        // One dir for both: the same member name, each sidecar would prune the other's.
        (
            vec![
                ("ETCD_SNAPSHOT_EVERY", "30m".into()),
                ("ETCD_EVENTS_SNAPSHOT_DIR", format!("{etcd_dir}/")),
            ],
            "ETCD_EVENTS_SNAPSHOT_DIR".into(),
        ),
        // etcd-events' restore in etcd's dir, which its pod does not mount.
        (
            vec![("ETCD_EVENTS_RESTORE_SNAPSHOT", format!("{etcd_dir}/x.db"))],
            "ETCD_EVENTS_RESTORE_SNAPSHOT".into(),
        ),
        (
            vec![("ETCD_RESTORE_SNAPSHOT", format!("{etcd_dir}/../x.db"))],
            "ETCD_RESTORE_SNAPSHOT".into(),
        ),
        (
            vec![("ETCD_RESTORE_SNAPSHOT", format!("{etcd_dir}/"))],
            "ETCD_RESTORE_SNAPSHOT".into(),
        ),
    ];
    for (set, want) in cases {
        let mut bad = snapshot_settings(t.path());
        for (k, v) in &set {
            bad.set(k, v);
        }
        let o = bad.try_render(&out);
        assert_eq!(o.status.code(), Some(2), "{set:?}: {}", text(&o));
        assert!(text(&o).contains(&want), "{set:?}: {}", text(&o));
        assert!(!out.exists(), "{set:?} wrote manifests");
    }
}

// ---- the fake kubelet ---------------------------------------------------------------------

/// What a kubelet would run for a pod's container, with the image's paths mapped into the
/// rootfs and each volume's mount path to its hostPath dir.
#[derive(Clone)]
struct ContainerRun {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

/// The pod's volume `name`.
fn volume<'a>(pod: &'a Pod, name: &str) -> &'a Volume {
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    volumes
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn path_maps(pod: &Pod, c: &Container, root: &Path) -> Vec<(String, String)> {
    let mut maps = Vec::new();
    for m in c.volume_mounts.as_ref().unwrap() {
        let vol = volume(pod, &m.name);
        let host = &vol.host_path.as_ref().unwrap().path;
        fs::create_dir_all(host).unwrap(); // type DirectoryOrCreate
        maps.push((m.mount_path.clone(), host.clone()));
    }
    maps.push((
        "/usr/local/bin/".to_string(),
        format!("{}/usr/local/bin/", root.display()),
    ));
    maps
}

fn map_paths(s: &str, maps: &[(String, String)]) -> String {
    let mut s = s.to_string();
    for (from, to) in maps {
        s = s.replace(from.as_str(), to);
    }
    s
}

/// The container's command and env as the kubelet runs them; `/bin/sh` and `/usr/local/bin`
/// are the rootfs's, ETCD_BIN_DIR and PATH point there (the image's default bin dir), HOSTNAME
/// is the node's (hostNetwork).
fn container_run(pod: &Pod, argv: &[String]) -> ContainerRun {
    container_run_in(pod, container(pod), argv)
}

/// The same for any container of the pod (the snapshot sidecar), with its own mounts and env.
fn container_run_in(pod: &Pod, c: &Container, argv: &[String]) -> ContainerRun {
    let root = rootfs();
    let maps = path_maps(pod, c, root);
    let argv = argv
        .iter()
        .map(|a| {
            if a == "/bin/sh" {
                format!("{}/bin/sh", root.display())
            } else {
                map_paths(a, &maps)
            }
        })
        .collect();
    let mut env: Vec<(String, String)> = env_in(c)
        .into_iter()
        .map(|(k, v)| (k, map_paths(&v, &maps)))
        .collect();
    env.push((
        "ETCD_BIN_DIR".into(),
        format!("{}/usr/local/bin", root.display()),
    ));
    env.push((
        "PATH".into(),
        format!("{0}/usr/local/bin:{0}/bin", root.display()),
    ));
    env.push(("HOSTNAME".into(), "master-1".into()));
    ContainerRun { argv, env }
}

fn pod_command(pod: &Pod) -> Vec<String> {
    container(pod).command.clone().unwrap()
}

/// A running pod: its own process group, stopped like a kubelet stops it (SIGTERM to the main
/// process, SIGKILL to the group after the grace period) and always reaped.
struct PodProcess {
    child: Option<Child>,
    log: PathBuf,
    client_url: String,
}

impl PodProcess {
    fn start(run: &ContainerRun, log: &Path, client_port: u16) -> PodProcess {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(&run.argv[0]);
        cmd.args(&run.argv[1..])
            .env_clear()
            .envs(run.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start the pod");
        PodProcess {
            child: Some(child),
            log: log.to_path_buf(),
            client_url: format!("http://127.0.0.1:{client_port}"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// Waits until a write succeeds on the pod's client port; panics if the pod exits first.
    async fn wait_serving(&mut self) -> Client {
        let last = std::cell::RefCell::new(String::new());
        let url = self.client_url.clone();
        let child = self.child.as_mut().unwrap();
        let mut c = wait_until_async(
            format_args!(
                "the pod to serve on {url} (last error: {}); log:\n{}",
                Lazy(|| last.borrow().clone()),
                LogTail(&self.log, 40)
            ),
            SERVE_TIMEOUT,
            async || {
                assert_running(child, &self.log);
                let opts = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500))
                    .with_timeout(Duration::from_secs(3));
                let r = match Client::connect([url.as_str()], Some(opts)).await {
                    Ok(mut c) => c.put("/e2e/probe", "1", None).await.map(|_| c),
                    Err(e) => Err(e),
                };
                r.map_err(|e| *last.borrow_mut() = e.to_string()).ok()
            },
        )
        .await;
        c.delete("/e2e/probe", None).await.unwrap();
        c
    }

    /// Waits for the pod to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let st = wait_until(
            format_args!("the pod to exit; log:\n{}", LogTail(&self.log, 40)),
            timeout,
            || child.try_wait().unwrap(),
        );
        self.kill_group();
        self.child = None;
        st
    }

    /// The kubelet's stop: SIGTERM, the grace period, SIGKILL.
    fn stop(&mut self) -> ExitStatus {
        let pid = self.pid() as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let child = self.child.as_mut().unwrap();
        let Some(st) = poll(Duration::from_secs(60), || child.try_wait().unwrap()) else {
            self.kill_group();
            let st = self.child.take().unwrap().wait().unwrap();
            panic!("the pod ignored SIGTERM ({st}); log:\n{}", self.log_tail());
        };
        self.kill_group();
        self.child = None;
        st
    }

    fn kill_group(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

/// Starts the pod of `manifest` as the kubelet would, with the rendered command.
fn start_pod(manifest: &Path, log: &Path, client_port: u16) -> (Pod, PodProcess) {
    let pod = load_pod(manifest);
    let run = container_run(&pod, &pod_command(&pod));
    let p = PodProcess::start(&run, log, client_port);
    (pod, p)
}

/// The pod's liveness probe, run as the kubelet would (exec in the container).
fn liveness_probe_passes(pod: &Pod) -> bool {
    let probe = container(pod).liveness_probe.as_ref().unwrap();
    let argv = probe.exec.as_ref().unwrap().command.clone().unwrap();
    let run = container_run(pod, &argv);
    Command::new(&run.argv[0])
        .args(&run.argv[1..])
        .env_clear()
        .envs(run.env)
        .output()
        .unwrap()
        .status
        .success()
}

/// Puts testdata/registry-small.tsv into etcd: TTL keys get one lease per TTL.
async fn seed_registry(c: &mut Client) -> usize {
    let text = fs::read_to_string(repo().join("testdata/registry-small.tsv")).unwrap();
    let mut leases: BTreeMap<i64, i64> = BTreeMap::new();
    let mut n = 0;
    for line in text.lines() {
        let mut f = line.splitn(3, '\t');
        let (key, ttl, value) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let ttl: i64 = ttl.parse().unwrap();
        let opts = if ttl > 0 {
            let id = match leases.get(&ttl) {
                Some(id) => *id,
                None => {
                    let id = c.lease_grant(ttl, None).await.unwrap().id();
                    leases.insert(ttl, id);
                    id
                }
            };
            Some(PutOptions::new().with_lease(id))
        } else {
            None
        };
        c.put(key, value, opts).await.unwrap();
        n += 1;
    }
    n
}

async fn served_version(c: &mut Client) -> String {
    c.status().await.unwrap().version().to_string()
}

/// Every key, value and revision equal; leases attached to the same keys.
fn assert_same_keys(want: &BTreeMap<Vec<u8>, Kv>, got: &BTreeMap<Vec<u8>, Kv>, what: &str) {
    assert_eq!(
        want.len(),
        got.len(),
        "{what}: {} keys before, {} after",
        want.len(),
        got.len()
    );
    for (k, a) in want {
        let b = got
            .get(k)
            .unwrap_or_else(|| panic!("{what}: {} is gone", String::from_utf8_lossy(k)));
        assert_eq!(
            (
                &a.value,
                a.create_revision,
                a.mod_revision,
                a.version,
                a.lease != 0
            ),
            (
                &b.value,
                b.create_revision,
                b.mod_revision,
                b.version,
                b.lease != 0
            ),
            "{what}: {} changed",
            String::from_utf8_lossy(k)
        );
    }
}

/// (1) fresh, (2) upgrade, (3) manual rollback and forward again, all by re-rendering the
/// settings and restarting the pod, as an operator with kube-up would.
#[tokio::test]
async fn kubelet_runs_the_rendered_pod_fresh_upgrade_rollback_and_forward() {
    let t = tempfile::tempdir().unwrap();
    let manifests = t.path().join("manifests");
    let log = t.path().join("etcd-pod.log");
    let mut s = Settings::for_test(t.path(), "3.4.23");
    let port = s.port("ETCD_CLIENT_PORT");
    let data = t.path().join("var-etcd/data");

    // (1) A fresh node: the pod comes up at the target and serves writes on its client port.
    s.render(&manifests);
    let (pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, "3.4.23");
    assert_eq!(recorded_version(&data), "3.4.23/etcd3");
    let pid = p.pid();
    let listening: BTreeSet<String> = listening_addrs(pid).into_iter().collect();
    assert_eq!(
        listening,
        BTreeSet::from([
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{}", s.port("ETCD_PEER_PORT"))
        ]),
        "run must exec etcd in the pod's own process"
    );
    assert!(liveness_probe_passes(&pod), "liveness probe fails");
    let n = seed_registry(&mut c).await;
    let before = dump(&mut c).await;
    assert_eq!(before.len(), n);
    assert!(before.values().any(|kv| kv.lease != 0));

    // (2) TARGET_VERSION 3.4.23 -> the newest 3.5, re-render, restart the pod: upgraded, every key served.
    s.set("TARGET_VERSION", &new35());
    s.render(&manifests);
    assert_eq!(
        env_of(&load_pod(&manifests.join("etcd.manifest")))["TARGET_VERSION"],
        new35()
    );
    p.stop();
    let (pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, new35());
    assert_eq!(recorded_version(&data), format!("{}/etcd3", new35()));
    assert_same_keys(&before, &dump(&mut c).await, "after the upgrade");
    assert!(
        liveness_probe_passes(&pod),
        "liveness probe fails on {}",
        new35()
    );
    c.put("/registry/pods/default/after-upgrade", "{}", None)
        .await
        .unwrap();
    let before = dump(&mut c).await;

    // (3) Manual rollback: TARGET_VERSION back to 3.4.23, re-render, restart.
    s.set("TARGET_VERSION", "3.4.23");
    s.render(&manifests);
    p.stop();
    let (_pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, "3.4.23");
    assert_eq!(recorded_version(&data), "3.4.23/etcd3");
    assert_same_keys(&before, &dump(&mut c).await, "after the rollback");
    // The rollback kept a backup of the the newest 3.5 data, listed by status.
    let status = run_ok(
        Command::new(rootfs().join("usr/local/bin/etcd-migrate"))
            .args(["status", "--output", "json", "--data-dir"])
            .arg(&data)
            .env_clear(),
        "status",
    );
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let backups = field_of_each(&status["backups"], "version");
    assert!(backups.contains(&format!("{}/etcd3", new35())), "{status}");
    let kinds: Vec<&str> = status["last_steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.last(), Some(&"minor-rollback"), "{status}");

    // ... and forward again.
    s.set("TARGET_VERSION", &new35());
    s.render(&manifests);
    p.stop();
    let (_pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, new35());
    assert_eq!(recorded_version(&data), format!("{}/etcd3", new35()));
    assert_same_keys(&before, &dump(&mut c).await, "forward again");
    drop(c);

    // The runbook's restore: pod stopped, `restore <backup>` (a name `status` lists), the
    // target set to the backup's version, pod started: it serves the backup's data as is.
    let backup = status["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["version"] == format!("{}/etcd3", new35()))
        .map(|b| PathBuf::from(b["path"].as_str().unwrap()))
        .unwrap();
    p.stop();
    let name = backup.file_name().unwrap().to_str().unwrap();
    run_ok(
        Command::new(rootfs().join("usr/local/bin/etcd-migrate"))
            .arg("--data-dir")
            .arg(&data)
            .args(["restore", name])
            .env_clear(),
        "restore",
    );
    assert_eq!(recorded_version(&data), format!("{}/etcd3", new35()));
    let (_pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, new35());
    assert_same_keys(&before, &dump(&mut c).await, "restored from the backup");
    p.stop();
}

/// (4) etcd and etcd-events on one node: own data dirs, own ports, no clash, also while both
/// migrate at once.
#[tokio::test]
async fn etcd_and_etcd_events_run_side_by_side_and_upgrade_together() {
    let t = tempfile::tempdir().unwrap();
    let manifests = t.path().join("manifests");
    let mut s = Settings::for_test(t.path(), "3.4.23");
    s.render(&manifests);
    let root = t.path().join("var-etcd");
    let pods = [
        ("etcd", "ETCD_CLIENT_PORT", "ETCD_PEER_PORT", "data"),
        (
            "etcd-events",
            "ETCD_EVENTS_CLIENT_PORT",
            "ETCD_EVENTS_PEER_PORT",
            "data-events",
        ),
    ];
    let mut running = Vec::new();
    for (name, port, _, _) in pods {
        running.push(start_pod(
            &manifests.join(format!("{name}.manifest")),
            &t.path().join(format!("{name}.log")),
            s.port(port),
        ));
    }
    let mut clients = Vec::new();
    for (_, p) in running.iter_mut() {
        clients.push(p.wait_serving().await);
    }
    for (i, (name, port, peer, dir)) in pods.iter().enumerate() {
        assert_eq!(recorded_version(&root.join(dir)), "3.4.23/etcd3", "{name}");
        let listening: BTreeSet<String> = listening_addrs(running[i].1.pid()).into_iter().collect();
        assert_eq!(
            listening,
            BTreeSet::from([
                format!("127.0.0.1:{}", s.port(port)),
                format!("127.0.0.1:{}", s.port(peer))
            ]),
            "{name}"
        );
        clients[i]
            .put(format!("/registry/only-in/{name}"), *name, None)
            .await
            .unwrap();
    }
    seed_registry(&mut clients[1]).await;
    let befores = [dump(&mut clients[0]).await, dump(&mut clients[1]).await];
    assert!(befores[0].contains_key(&b"/registry/only-in/etcd"[..]));
    assert!(!befores[0].contains_key(&b"/registry/only-in/etcd-events"[..]));
    assert!(befores[1].contains_key(&b"/registry/only-in/etcd-events"[..]));
    assert!(!befores[1].contains_key(&b"/registry/only-in/etcd"[..]));

    // Both upgrade at the same time, each on its own private migrate port.
    s.set("TARGET_VERSION", &new35());
    s.render(&manifests);
    for (_, p) in running.iter_mut() {
        p.stop();
    }
    running.clear();
    for (name, port, _, _) in pods {
        running.push(start_pod(
            &manifests.join(format!("{name}.manifest")),
            &t.path().join(format!("{name}.log")),
            s.port(port),
        ));
    }
    for (i, (name, _, _, dir)) in pods.iter().enumerate() {
        let mut c = running[i].1.wait_serving().await;
        assert_eq!(served_version(&mut c).await, new35(), "{name}");
        assert_eq!(
            recorded_version(&root.join(dir)),
            format!("{}/etcd3", new35()),
            "{name}"
        );
        assert_same_keys(&befores[i], &dump(&mut c).await, name);
    }
    // Their work areas and backups are their own.
    assert!(root.join("data.etcd-migrate").is_dir());
    assert!(root.join("data-events.etcd-migrate").is_dir());
    for (_, p) in running.iter_mut() {
        p.stop();
    }
}

/// The snapshot sidecar's command and env, run by the fake kubelet next to the running pod,
/// leave a verified snapshot in ETCD_SNAPSHOT_DIR; with the data dir moved away,
/// ETCD_RESTORE_SNAPSHOT naming that file brings every key back, and a later start with the
/// setting still there serves the data as it is.
#[tokio::test]
async fn kubelet_runs_the_snapshot_sidecar_and_restores_by_env() {
    let t = tempfile::tempdir().unwrap();
    let manifests = t.path().join("manifests");
    let log = t.path().join("etcd-pod.log");
    let mut s = snapshot_settings(t.path());
    s.set("ETCD_SNAPSHOT_EVERY", "30m");
    let port = s.port("ETCD_CLIENT_PORT");
    let data = t.path().join("var-etcd/data");
    let snaps = PathBuf::from(&s.vars["ETCD_SNAPSHOT_DIR"]);
    s.render(&manifests);
    let (pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    seed_registry(&mut c).await;
    let before = dump(&mut c).await;

    // The sidecar once: its env without SNAPSHOT_EVERY (with it, it takes one every 30m).
    let side = sidecar(&pod).expect("no sidecar");
    let mut run = container_run_in(&pod, side, side.command.as_ref().unwrap());
    run.env.retain(|(k, _)| k != "SNAPSHOT_EVERY");
    let out = Command::new(&run.argv[0])
        .args(&run.argv[1..])
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "the sidecar: {}", text(&out));
    let file = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(file.parent(), Some(snaps.as_path()), "{}", text(&out));
    assert!(file.is_file(), "{}", file.display());
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("etcd-master-1-") && name.ends_with(".db"),
        "{name}"
    );
    drop(c);
    p.stop();

    // Restore by env: the data dir moved away, the file named by its path on the host.
    fs::rename(&data, t.path().join("var-etcd/data.before-restore")).unwrap();
    s.set("ETCD_RESTORE_SNAPSHOT", &file.to_string_lossy());
    s.render(&manifests);
    let (pod, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    assert!(env_of(&pod).contains_key("RESTORE_SNAPSHOT"));
    let mut c = p.wait_serving().await;
    assert_same_keys(&before, &dump(&mut c).await, "restored from the snapshot");
    c.put("/registry/after-restore", "1", None).await.unwrap();
    let after = dump(&mut c).await;
    drop(c);
    p.stop();
    // The setting stays: the next start restores nothing and keeps the newer write.
    let (_, mut p) = start_pod(&manifests.join("etcd.manifest"), &log, port);
    let mut c = p.wait_serving().await;
    assert_same_keys(
        &after,
        &dump(&mut c).await,
        "restarted with ETCD_RESTORE_SNAPSHOT set",
    );
    drop(c);
    p.stop();
}

/// The Kubernetes-style command line of the rendered pod's flags.
fn kubernetes_sh_command(pod: &Pod, exec: &str) -> Vec<String> {
    let flags = etcd_flags(pod);
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "/usr/local/bin/migrate-if-needed.sh && exec {exec} {}",
            shell_words::join(&flags)
        ),
    ]
}

/// (5) The shim: `sh -c "migrate-if-needed.sh && exec /usr/local/bin/etcd ..."`, as manifests
/// written for the Kubernetes image say it, works against the rootfs; when /usr/local/bin/etcd
/// is not the target it refuses untouched, and with DO_NOT_MOVE_BINARIES=true plus
/// `exec etcd-<target>` it rolls back.
#[tokio::test]
async fn kubernetes_style_sh_c_command_with_the_shim_works() {
    let t = tempfile::tempdir().unwrap();
    let manifests = t.path().join("manifests");
    let log = t.path().join("shim-pod.log");
    let mut s = Settings::for_test(t.path(), &new35());
    let port = s.port("ETCD_CLIENT_PORT");
    let data = t.path().join("var-etcd/data");
    s.render(&manifests);
    let pod = load_pod(&manifests.join("etcd.manifest"));
    let shim_run = |pod: &Pod, exec: &str, extra: &[(&str, &str)]| {
        let mut run = container_run(pod, &kubernetes_sh_command(pod, exec));
        // The shim finds etcd-migrate and the etcd binaries beside itself.
        run.env.retain(|(k, _)| k != "ETCD_BIN_DIR");
        for (k, v) in extra {
            run.env.push((k.to_string(), v.to_string()));
        }
        run
    };

    // Fresh, target = the newest in the image: the shim records it, `exec etcd` serves.
    let mut p = PodProcess::start(&shim_run(&pod, "/usr/local/bin/etcd", &[]), &log, port);
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, new35());
    assert_eq!(recorded_version(&data), format!("{}/etcd3", new35()));
    seed_registry(&mut c).await;
    let before = dump(&mut c).await;
    p.stop();

    // TARGET_VERSION=3.4.23 with `exec /usr/local/bin/etcd` (the newest 3.5): refused, nothing touched.
    s.set("TARGET_VERSION", "3.4.23");
    s.render(&manifests);
    let pod = load_pod(&manifests.join("etcd.manifest"));
    let untouched = tree_hash(&data);
    let mut p = PodProcess::start(&shim_run(&pod, "/usr/local/bin/etcd", &[]), &log, port);
    let st = p.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(2), "{}", p.log_tail());
    let log_text = fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("etcd-3.4.23") && log_text.contains("Nothing was touched"),
        "{log_text}"
    );
    assert_eq!(tree_hash(&data), untouched);
    assert_eq!(recorded_version(&data), format!("{}/etcd3", new35()));

    // DO_NOT_MOVE_BINARIES=true and `exec etcd-3.4.23`: the shim rolls back, etcd 3.4.23 serves.
    let mut p = PodProcess::start(
        &shim_run(
            &pod,
            "/usr/local/bin/etcd-3.4.23",
            &[("DO_NOT_MOVE_BINARIES", "true")],
        ),
        &log,
        port,
    );
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, "3.4.23");
    assert_eq!(recorded_version(&data), "3.4.23/etcd3");
    assert_same_keys(&before, &dump(&mut c).await, "after the shim's rollback");
    p.stop();
}

// ---- the real image, built with buildah ---------------------------------------------------

/// buildah with a private storage root (vfs) under `dir`, removed with it.
struct Buildah {
    root: PathBuf,
}

impl Buildah {
    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        run_ok(self.cmd().args(args), &format!("buildah {args:?}"))
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["umount", "--all"]).output();
        let _ = self.cmd().args(["rm", "--all"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
    }
}

/// Processes whose parent is `pid`, recursively.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if parent_pid(child) == Some(pid) {
            out.push(child);
            out.extend(descendants(child));
        }
    }
    out
}

/// The PARTS=local image, built by buildah from the rootfs (FROM scratch, no registry), holds the
/// rootfs file for file, and runs the Kubernetes-style pod as non-root: a 3.4.23 data dir is
/// upgraded to the newest 3.5 inside the image and served.
#[tokio::test]
async fn image_built_with_buildah_matches_the_rootfs_and_runs_the_pod_as_non_root() {
    let root = rootfs();
    assert!(
        Command::new("buildah")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "buildah is not installed: run `make image-deps`"
    );
    let t = tempfile::tempdir().unwrap();
    let b = Buildah {
        root: t.path().join("buildah"),
    };
    // The build context: the rootfs (as `make rootfs` leaves .rootfs) and nothing else.
    let ctx = t.path().join("context");
    fs::create_dir_all(&ctx).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(root)
            .arg(ctx.join(".rootfs")),
        "cp rootfs",
    );
    let tag = "localhost/etcd-migrate:e2e";
    let dockerfile = repo().join("images/etcd/Dockerfile");
    b.run(&[
        "bud",
        "--isolation",
        "chroot",
        "--pull=never",
        "--build-arg",
        "PARTS=local",
        "--build-arg",
        "RUN_AS=65532:65532",
        "-f",
        dockerfile.to_str().unwrap(),
        "-t",
        tag,
        ctx.to_str().unwrap(),
    ]);
    let ctr = String::from_utf8(b.run(&["from", "--pull=never", tag]).stdout).unwrap();
    let ctr = ctr.trim().to_string();
    let inspect: Value =
        serde_json::from_slice(&b.run(&["inspect", "--type", "image", tag]).stdout).unwrap();
    assert_eq!(inspect["OCIv1"]["config"]["User"], "65532:65532");

    // File for file: same paths, types, modes, link targets and bytes as the rootfs.
    let mnt = PathBuf::from(
        String::from_utf8(b.run(&["mount", &ctr]).stdout)
            .unwrap()
            .trim(),
    );
    let list = |dir: &Path| -> BTreeMap<PathBuf, (u32, Option<PathBuf>, u64)> {
        walk(dir)
            .into_iter()
            .map(|p| {
                let m = fs::symlink_metadata(&p).unwrap();
                let link = m
                    .file_type()
                    .is_symlink()
                    .then(|| fs::read_link(&p).unwrap());
                let size = if m.is_file() { m.len() } else { 0 };
                (
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    (m.permissions().mode() & 0o7777, link, size),
                )
            })
            .collect()
    };
    let want = list(root);
    let got = list(&mnt);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the image's files differ from the rootfs"
    );
    for (p, w) in &want {
        let g = &got[p];
        assert_eq!((g.1.as_ref(), g.2), (w.1.as_ref(), w.2), "{}", p.display());
        if w.1.is_none() {
            assert_eq!(g.0, w.0, "mode of {}", p.display());
        }
    }
    b.run(&["umount", &ctr]);

    // A 3.4.23 data dir with keys, written by the member the manifest describes (same name and
    // peer URL), owned by the image's non-root user.
    let var_etcd = t.path().join("var-etcd");
    let data = var_etcd.join("data");
    fs::create_dir_all(&var_etcd).unwrap();
    let mut s = Settings::for_test(t.path(), &new35());
    let mut spec = MemberSpec::new("3.4.23", &data, "etcd-master-1");
    spec.peer_port = s.port("ETCD_PEER_PORT");
    let m = Member::spawn(spec);
    m.wait_healthy(Duration::from_secs(30));
    let mut c = m.client().await;
    seed_registry(&mut c).await;
    let before = dump(&mut c).await;
    drop(c);
    m.stop();
    record_version(&data, "3.4.23/etcd3");
    run_ok(
        Command::new("chown")
            .args(["-R", "65532:65532"])
            .arg(&var_etcd),
        "chown",
    );

    // The rendered pod's env and Kubernetes-style command, run in the image with /var/etcd
    // mounted from the host, as the kubelet's container runtime would.
    s.set("ETCD_DATA_ROOT", var_etcd.to_str().unwrap());
    let manifests = t.path().join("manifests");
    s.render(&manifests);
    let pod = load_pod(&manifests.join("etcd.manifest"));
    let argv = kubernetes_sh_command(&pod, "/usr/local/bin/etcd");
    let mut cmd = b.cmd();
    cmd.args(["run", "--isolation", "chroot", "--network", "host"])
        .arg("-v")
        .arg(format!("{}:/var/etcd", var_etcd.display()));
    for (k, v) in env_of(&pod) {
        cmd.arg("-e").arg(format!("{k}={v}"));
    }
    cmd.arg(&ctr).arg("--").args(&argv);
    let log = t.path().join("image-pod.log");
    let out = fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0);
    let child = cmd.spawn().unwrap();
    let mut run = BuildahRun(PodProcess {
        child: Some(child),
        log: log.clone(),
        client_url: format!("http://127.0.0.1:{}", s.port("ETCD_CLIENT_PORT")),
    });
    let p = &mut run.0;
    let buildah_pid = p.pid();
    let mut c = p.wait_serving().await;
    assert_eq!(served_version(&mut c).await, new35());
    assert_same_keys(&before, &dump(&mut c).await, "upgraded inside the image");
    assert_eq!(recorded_version(&data), format!("{}/etcd3", new35()));
    // etcd runs as the image's user and the data it wrote is that user's.
    let etcd_pid = descendants(buildah_pid)
        .into_iter()
        .find(|pid| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|e| e.to_string_lossy().ends_with(&format!("/etcd-{}", new35())))
        })
        .expect("the newest etcd 3.5 under buildah run");
    assert_eq!(
        fs::metadata(format!("/proc/{etcd_pid}")).unwrap().uid(),
        65532
    );
    assert_eq!(fs::metadata(data.join("version.txt")).unwrap().uid(), 65532);
    drop(c);
    // buildah passes SIGTERM on to the container's process, which stops cleanly.
    let in_container = descendants(buildah_pid);
    p.stop();
    wait_until(
        format_args!("the container's processes {in_container:?} to exit with buildah run"),
        Duration::from_secs(5),
        || in_container.iter().all(|pid| exited(*pid)).then_some(()),
    );
}

/// A `buildah run` pod: on drop, also kills what runs inside the container, which may live in
/// a session of its own.
struct BuildahRun(PodProcess);

impl Drop for BuildahRun {
    fn drop(&mut self) {
        if let Some(c) = &self.0.child {
            for pid in descendants(c.id()) {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}
