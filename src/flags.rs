//! Command lines and environments of the processes we start, as data: which flags a command
//! line names, which `ETCD_*` variables would shadow them, and which values must never reach
//! our log. No process is started here.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::Arc;

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

/// The values of `args` that look like secrets (tokens, passwords: not file paths or URLs, six
/// characters or more), e.g. the value of `--auth-token=...`.
pub fn secrets_in(args: &[String]) -> Vec<String> {
    let mut secrets = Vec::new();
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
    secrets
}

/// What becomes of the lines our children print.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildOutput {
    /// Logged at info (else at debug; the tail is still kept for error messages).
    pub logged: bool,
    /// Values replaced by `<redacted>` (etcd prints its command line, ETCD_CREDS included).
    pub secrets: Arc<[String]>,
}

impl ChildOutput {
    /// The line with every secret replaced.
    pub fn redact(&self, line: &str) -> String {
        self.secrets
            .iter()
            .fold(line.to_string(), |l, s| l.replace(s.as_str(), "<redacted>"))
    }
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
        let out = ChildOutput {
            logged: true,
            secrets: secrets_in(&args).into(),
        };
        let line = out.redact(
            "Running: --auth-token simple-s3cr3t-token --peer-key-file=/etc/k.pem --password=hunter22",
        );
        assert!(
            !line.contains("s3cr3t") && !line.contains("hunter22"),
            "{line}"
        );
        assert!(line.contains("/etc/k.pem"), "{line}");
    }
}
