//! Child processes: a scrubbed environment, output into our log with a prefix, death with
//! the parent (PR_SET_PDEATHSIG), and SIGTERM, grace, SIGKILL, reap when dropped.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Lines of child output kept for error messages.
const TAIL_LINES: usize = 30;

/// The last lines a child printed.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == TAIL_LINES {
                q.pop_front();
            }
            q.push_back(line);
        }
    }
    /// The kept lines, the last `n` of them, joined.
    pub fn last(&self, n: usize) -> String {
        let q = self.0.lock().map(|q| q.clone()).unwrap_or_default();
        let skip = q.len().saturating_sub(n);
        q.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
    }
}

/// The env var etcd (or etcdctl) reads for a flag: `--peer-cert-file` -> `ETCD_PEER_CERT_FILE`.
pub fn env_name_of_flag(prefix: &str, flag: &str) -> String {
    format!(
        "{prefix}{}",
        flag.trim_start_matches('-')
            .replace('-', "_")
            .to_ascii_uppercase()
    )
}

/// Flags named on a command line (`--a=b`, `--a b`, `-a`).
pub fn flags_in(args: &[String]) -> BTreeSet<String> {
    args.iter()
        .filter(|a| a.starts_with('-') && a.len() > 1 && !a.starts_with("---"))
        .map(|a| {
            a.trim_start_matches('-')
                .split('=')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|f| !f.is_empty())
        .collect()
}

/// The environment for a child: `base` minus every `<prefix>X` that duplicates a flag in `args`
/// (etcd 3.x exits when an env var shadows a command-line flag). Returns the dropped names.
pub fn scrub_env(
    base: &[(OsString, OsString)],
    args: &[String],
    prefix: &str,
) -> (Vec<(OsString, OsString)>, Vec<String>) {
    let shadowed: BTreeSet<String> = flags_in(args)
        .iter()
        .map(|f| env_name_of_flag(prefix, f))
        .collect();
    let mut dropped = Vec::new();
    let kept = base
        .iter()
        .filter(|(k, _)| {
            let name = k.to_string_lossy();
            let dup = shadowed.contains(name.as_ref());
            if dup {
                dropped.push(name.into_owned());
            }
            !dup
        })
        .cloned()
        .collect();
    (kept, dropped)
}

/// Makes the child die with us (even on kill -9), so no etcd outlives a crashed migration.
fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: between fork and exec we only call async-signal-safe syscalls (prctl, getppid, _exit).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The parent may have died before prctl took effect.
            if nix::unistd::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Values never to appear in our log (secret-looking ETCD_CREDS values; etcd prints its
/// command line).
static SECRETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Registers values to redact from child output: the values of `args` that are not file paths
/// and long enough to be a secret (tokens, passwords), e.g. `--auth-token=...`.
pub fn redact_values_of(args: &[String]) {
    let mut secrets: Vec<String> = Vec::new();
    let mut prev_is_flag = false;
    for a in args {
        let value = match a.split_once('=') {
            Some((flag, v)) if flag.starts_with('-') => Some(v),
            _ if prev_is_flag && !a.starts_with('-') => Some(a.as_str()),
            _ => None,
        };
        prev_is_flag = a.starts_with('-') && !a.contains('=');
        if let Some(v) = value {
            let path_like = v.starts_with('/') || v.starts_with("./") || v.contains("://");
            if !path_like && v.len() >= 6 && !matches!(v, "true" | "false") {
                secrets.push(v.to_string());
            }
        }
    }
    if let Ok(mut s) = SECRETS.lock() {
        *s = secrets;
    }
}

/// The line with registered secrets replaced.
pub fn redact(line: &str) -> String {
    let Ok(secrets) = SECRETS.lock() else {
        return line.to_string();
    };
    secrets
        .iter()
        .fold(line.to_string(), |l, s| l.replace(s.as_str(), "<redacted>"))
}

/// Child output goes to our log at info, or at debug when quiet.
static QUIET_CHILDREN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Logs child output at debug only (it is still kept for error messages).
pub fn quiet_children(quiet: bool) {
    QUIET_CHILDREN.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

fn pump<R: Read + Send + 'static>(r: R, label: String, tail: Tail) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let line = redact(&line);
            if QUIET_CHILDREN.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!(target: "child", "[{label}] {line}");
            } else {
                tracing::info!(target: "child", "[{label}] {line}");
            }
            tail.push(line);
        }
    })
}

/// A running child: stopped and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    label: String,
    pub tail: Tail,
    grace: Duration,
    pumps: Vec<thread::JoinHandle<()>>,
}

/// How a child failed to start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {path}: {source}")]
pub struct SpawnError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl ChildGuard {
    /// Starts `path args` with `env` (and nothing else) as its environment.
    pub fn spawn(
        path: &Path,
        args: &[String],
        env: &[(OsString, OsString)],
        label: String,
        grace: Duration,
    ) -> Result<ChildGuard, SpawnError> {
        let mut cmd = Command::new(path);
        cmd.args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| SpawnError {
            path: path.to_path_buf(),
            source,
        })?;
        let tail = Tail::default();
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, label.clone(), tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, label.clone(), tail.clone()));
        }
        Ok(ChildGuard {
            child: Some(child),
            label,
            tail,
            grace,
            pumps,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The exit status if the child has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the child to end on its own, polling without blocking the runtime.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                self.child = None;
                self.join_pumps();
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaped. Returns the exit status.
    /// Blocking on purpose: it also runs from `Drop`, on error paths, panics and cancellation.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.stop_blocking()
    }

    fn stop_blocking(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = match child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => {
                let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                let deadline = Instant::now() + self.grace;
                let mut exited = None;
                while exited.is_none() && Instant::now() < deadline {
                    exited = child.try_wait().ok().flatten();
                    if exited.is_none() {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                exited.or_else(|| {
                    tracing::warn!(child = %self.label, grace_ms = self.grace.as_millis() as u64, "did not stop after SIGTERM; sending SIGKILL");
                    let _ = child.kill();
                    child.wait().ok()
                })
            }
        };
        self.join_pumps();
        status
    }

    /// Waits briefly for the output to drain; a grandchild holding the pipe must not make a
    /// stop hang, so pumps still running after that are left to end on their own.
    fn join_pumps(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        for p in self.pumps.drain(..) {
            if p.is_finished() {
                let _ = p.join();
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Outcome of a tool run to completion.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub tail: Tail,
    pub elapsed: Duration,
}

impl ToolOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// "exit status 1" or "signal 9".
    pub fn describe(&self) -> String {
        describe_status(self.status)
    }
}

/// "exit status N" or "killed by signal N".
pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Runs a tool (etcdctl, etcdutl) to completion, output logged, killed after `timeout`.
pub async fn run_tool(
    path: &Path,
    args: &[String],
    env: &[(OsString, OsString)],
    label: String,
    timeout: Duration,
) -> Result<ToolOutput, SpawnError> {
    let start = Instant::now();
    let mut g = ChildGuard::spawn(path, args, env, label, Duration::from_secs(5))?;
    let status = match g.wait(timeout).await {
        Some(s) => s,
        None => {
            tracing::warn!(child = %g.label, timeout_s = timeout.as_secs(), "tool did not finish in time; stopping it");
            g.stop_blocking()
                .unwrap_or_else(|| ExitStatus::from_raw(9 << 8))
        }
    };
    let tail = g.tail.clone();
    g.child = None;
    Ok(ToolOutput {
        status,
        tail,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn env_duplicating_a_flag_is_dropped_and_the_rest_kept() {
        let base = os(&[
            ("ETCD_NAME", "x"),
            ("ETCD_SNAPSHOT_COUNT", "10"),
            ("ETCD_PEER_CERT_FILE", "/c"),
            ("PATH", "/bin"),
        ]);
        let args: Vec<String> = ["--name", "m1", "--data-dir=/d", "--peer-cert-file", "/p"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (kept, dropped) = scrub_env(&base, &args, "ETCD_");
        assert_eq!(dropped, ["ETCD_NAME", "ETCD_PEER_CERT_FILE"]);
        let names: Vec<_> = kept
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["ETCD_SNAPSHOT_COUNT", "PATH"]);
    }

    #[test]
    fn secret_looking_creds_values_are_redacted_paths_are_not() {
        let args: Vec<String> = [
            "--auth-token",
            "simple-s3cr3t-token",
            "--peer-key-file=/etc/k.pem",
            "--password=hunter22",
            "--peer-client-cert-auth",
            "--x=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        redact_values_of(&args);
        let line = redact("Running: --auth-token simple-s3cr3t-token --peer-key-file=/etc/k.pem --password=hunter22");
        assert!(
            !line.contains("s3cr3t") && !line.contains("hunter22"),
            "{line}"
        );
        assert!(line.contains("/etc/k.pem"), "{line}");
        redact_values_of(&[]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_escalates_to_sigkill_and_reaps() {
        // A child that ignores SIGTERM.
        let args = vec![
            "-c".to_string(),
            "trap '' TERM; echo ready; exec sleep 30".to_string(),
        ];
        let g = ChildGuard::spawn(
            Path::new("/bin/sh"),
            &args,
            &[],
            "sh".into(),
            Duration::from_millis(200),
        )
        .unwrap();
        let pid = g.pid().unwrap();
        while g.tail.last(1) != "ready" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        let status = g.stop().unwrap();
        assert_eq!(status.signal(), Some(9));
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} not reaped"
        );
    }

    #[test]
    fn dropping_the_guard_stops_the_child() {
        let args = vec!["30".to_string()];
        let g = ChildGuard::spawn(
            Path::new("/bin/sleep"),
            &args,
            &[],
            "sleep".into(),
            Duration::from_secs(5),
        )
        .unwrap();
        let pid = g.pid().unwrap();
        drop(g);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} survived its guard"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tools_run_with_only_the_given_env() {
        let args = vec!["-c".to_string(), "echo \"x=$X y=$Y\"".to_string()];
        let out = run_tool(
            Path::new("/bin/sh"),
            &args,
            &os(&[("X", "1")]),
            "sh".into(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(out.success());
        assert_eq!(out.tail.last(1), "x=1 y=");
    }
}
