//! Progress of long stages (offline reads, key comparisons, snapshot save and restore), so an
//! operator watching a pod step a multi-GB member knows it is alive: on a terminal, a line
//! redrawn every second (done, total, rate, ETA); in the log, a line at least every 10 s. Stages
//! that end within two seconds print nothing.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the log gets a progress line.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Stages shorter than this show no progress at all.
const QUIET_FOR: Duration = Duration::from_secs(2);

/// Peak resident memory of this process alone, in MiB (children are not in it): `VmHWM`, the
/// high-water mark of this program's own memory. (`getrusage` would also count the memory of
/// the process we were forked from, which Linux carries over an exec.)
pub fn own_peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Peak resident memory of the largest child reaped so far (a step's etcd), in MiB.
pub fn children_peak_rss_mb() -> u64 {
    peak_rss_mb(libc::RUSAGE_CHILDREN)
}

fn peak_rss_mb(who: libc::c_int) -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; no other memory is touched.
    #[allow(unsafe_code)]
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut ru) != 0 {
            return 0;
        }
        (ru.ru_maxrss.max(0) as u64) / 1024
    }
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Keys,
}

/// Where the count comes from.
enum Source {
    Counter(Arc<AtomicU64>),
    /// The size of a file another process writes (etcdctl snapshot save, a restore).
    FileSize(PathBuf),
}

impl Source {
    fn read(&self) -> u64 {
        match self {
            Source::Counter(c) => c.load(Ordering::Relaxed),
            Source::FileSize(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        }
    }
}

/// A running progress report; stops when finished or dropped.
pub struct Meter {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Meter {
    /// Reports a count the caller adds to through [`Meter::counter`].
    pub fn count(what: &str, unit: Unit, total: Option<u64>) -> Meter {
        let count = Arc::new(AtomicU64::new(0));
        Meter::spawn(what, unit, total, Source::Counter(count.clone()), count)
    }

    /// Reports the growing size of `file`.
    pub fn file(what: &str, file: PathBuf, total: Option<u64>) -> Meter {
        Meter::spawn(
            what,
            Unit::Bytes,
            total,
            Source::FileSize(file),
            Arc::new(AtomicU64::new(0)),
        )
    }

    /// What the caller adds its progress to.
    pub fn counter(&self) -> &AtomicU64 {
        &self.count
    }

    fn spawn(
        what: &str,
        unit: Unit,
        total: Option<u64>,
        src: Source,
        count: Arc<AtomicU64>,
    ) -> Meter {
        let stop = Arc::new(AtomicBool::new(false));
        let what = what.to_string();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meter".into())
            .spawn(move || run(&what, unit, total, &src, &stop2))
            .ok();
        Meter {
            count,
            stop,
            thread,
        }
    }

    /// Ends the report (clearing the terminal line).
    pub fn finish(self) {}
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn run(what: &str, unit: Unit, total: Option<u64>, src: &Source, stop: &AtomicBool) {
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_log = t0;
    let mut drawn = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(250));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let elapsed = t0.elapsed();
        if elapsed < QUIET_FOR {
            continue;
        }
        let line = describe(what, unit, src.read(), total, elapsed);
        if tty {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
            drawn = true;
        }
        if last_log.elapsed() >= LOG_EVERY {
            tracing::info!(stage = what, "{line}");
            last_log = Instant::now();
        }
    }
    if drawn {
        let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
    }
}

/// "reading the backend: 812 of 4096 MB (19%), 640 MB/s, about 5 s left".
pub fn describe(
    what: &str,
    unit: Unit,
    done: u64,
    total: Option<u64>,
    elapsed: Duration,
) -> String {
    let (scale, name) = match unit {
        Unit::Bytes => (1u64 << 20, " MB"),
        Unit::Keys => (1, " keys"),
    };
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / scale as f64 / secs;
    let mut s = format!("{what}: {}", done / scale);
    match total.filter(|t| *t > 0) {
        Some(t) => {
            let pct = (done as f64 * 100.0 / t as f64).min(100.0);
            s += &format!(" of {}{name} ({pct:.0}%), {rate:.0}{name}/s", t / scale);
            if done > 0 && done < t {
                let left = (t - done) as f64 / (done as f64 / secs);
                s += &format!(", about {left:.0} s left");
            }
        }
        None => s += &format!("{name}, {rate:.0}{name}/s"),
    }
    s += &format!(" ({:.0} s so far)", secs);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_done_total_rate_and_time_left() {
        let l = describe(
            "reading the backend",
            Unit::Bytes,
            100 << 20,
            Some(400 << 20),
            Duration::from_secs(10),
        );
        assert_eq!(
            l,
            "reading the backend: 100 of 400 MB (25%), 10 MB/s, about 30 s left (10 s so far)"
        );
        let l = describe(
            "comparing keys",
            Unit::Keys,
            5000,
            None,
            Duration::from_secs(5),
        );
        assert_eq!(l, "comparing keys: 5000 keys, 1000 keys/s (5 s so far)");
    }

    #[test]
    fn a_meter_stops_when_dropped() {
        let m = Meter::count("x", Unit::Keys, None);
        m.counter().fetch_add(3, Ordering::Relaxed);
        let t = Instant::now();
        drop(m);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
