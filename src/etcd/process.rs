//! Child processes: a scrubbed environment, output into our log with a prefix, death with
//! the parent (PR_SET_PDEATHSIG), and SIGTERM, grace, SIGKILL, reap when dropped.

use std::collections::VecDeque;
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

use crate::flags::ChildOutput;

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

fn pump<R: Read + Send + 'static>(
    r: R,
    label: String,
    tail: Tail,
    output: ChildOutput,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let line = output.redact(&line);
            if output.logged {
                tracing::info!(target: "child", "[{label}] {line}");
            } else {
                tracing::debug!(target: "child", "[{label}] {line}");
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
        output: &ChildOutput,
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
            pumps.push(pump(out, label.clone(), tail.clone(), output.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, label.clone(), tail.clone(), output.clone()));
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

    /// The same as `stop`, but waiting without blocking the runtime, so that the tasks that
    /// close our connections to the child still run while it shuts down.
    pub async fn terminate(mut self) -> Option<ExitStatus> {
        let pid = self.pid()?;
        if self.try_wait().is_none() {
            let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if let Some(status) = self.wait(self.grace).await {
                return Some(status);
            }
            tracing::warn!(child = %self.label, grace_ms = self.grace.as_millis() as u64, "did not stop after SIGTERM; sending SIGKILL");
        }
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
    output: &ChildOutput,
) -> Result<ToolOutput, SpawnError> {
    let start = Instant::now();
    let mut g = ChildGuard::spawn(path, args, env, label, Duration::from_secs(5), output)?;
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
            &ChildOutput::default(),
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
            &ChildOutput::default(),
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
            &[(OsString::from("X"), OsString::from("1"))],
            "sh".into(),
            Duration::from_secs(5),
            &ChildOutput::default(),
        )
        .await
        .unwrap();
        assert!(out.success());
        assert_eq!(out.tail.last(1), "x=1 y=");
    }
}
