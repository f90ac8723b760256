//! `plan` and `status`: what a run would do, and what the data dir holds and has been through.

use std::path::Path;

use serde::Serialize;

use crate::backup;
use crate::cli::Output;
use crate::config::Config;
use crate::datadir::{self, OnDisk};
use crate::plan::Step;
use crate::progress::{self, JournalEntry};
use crate::run::{prepare, RunError};
use crate::version::VersionFile;

/// Which kinds of step the data's cluster allows: one member's data may be rewritten alone only
/// when it is the whole cluster.
#[derive(Serialize)]
struct Allowed {
    upgrade: bool,
    storage_migration: bool,
    rollback: bool,
}

impl Allowed {
    fn for_members(members: usize) -> Allowed {
        Allowed {
            upgrade: true,
            storage_migration: members <= 1,
            rollback: members <= 1,
        }
    }
}

/// `plan`: what migrate would do.
pub fn print_plan(config: &Config, output: Output) -> Result<(), RunError> {
    let p = prepare(config, true)?;
    #[derive(Serialize)]
    struct Out<'a> {
        data_dir: &'a Path,
        current: Option<VersionFile>,
        legacy_default: bool,
        target: VersionFile,
        bundled: Vec<String>,
        members: usize,
        steps: Vec<StepOut>,
        notes: Vec<String>,
        allowed: Allowed,
    }
    #[derive(Serialize)]
    struct StepOut {
        #[serde(flatten)]
        step: Step,
        outcome: VersionFile,
        describe: String,
    }
    let members = p.inspection.facts.members;
    let out = Out {
        data_dir: &config.data_dir,
        current: p.inspection.on_disk.current(),
        legacy_default: p.inspection.on_disk == OnDisk::Legacy,
        target: p.target,
        bundled: p.bundle.versions.iter().map(|v| v.to_string()).collect(),
        members,
        steps: p
            .plan
            .as_ref()
            .map(|pl| {
                pl.steps
                    .iter()
                    .map(|s| StepOut {
                        step: *s,
                        outcome: s.outcome(),
                        describe: s.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        notes: p
            .plan
            .as_ref()
            .map(|pl| pl.notes.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default(),
        allowed: Allowed {
            upgrade: true,
            storage_migration: members <= 1,
            rollback: members <= 1,
        },
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Output::Text => {
            let cur = match (out.current, out.legacy_default) {
                (None, _) => "none (fresh data dir)".to_string(),
                (Some(v), true) => format!("{v} (no version.txt: the legacy default for a v2 WAL)"),
                (Some(v), false) => v.to_string(),
            };
            println!("data dir: {}", config.data_dir.display());
            println!("current:  {cur}");
            println!("target:   {}", out.target);
            println!("bundled:  {}", out.bundled.join(" "));
            println!(
                "members:  {members}{}",
                if members > 1 {
                    " (upgrades only: storage migration and rollbacks need one member)"
                } else {
                    ""
                }
            );
            match &p.plan {
                None => println!(
                    "steps:    none; record {} (etcd creates the data on first start)",
                    out.target
                ),
                Some(pl) if pl.steps.is_empty() => {
                    println!("steps:    none; already at the target")
                }
                Some(_) => {
                    println!("steps:");
                    for (i, s) in out.steps.iter().enumerate() {
                        println!("  {}. {}", i + 1, s.describe);
                    }
                }
            }
            for n in &out.notes {
                println!("note: {n}");
            }
        }
    }
    Ok(())
}

/// `status`: recorded version, recent steps, backups, lock holder.
pub fn print_status(config: &Config, output: Output) -> Result<(), RunError> {
    let layout = config.layout();
    let inspection = datadir::inspect(&config.data_dir)?;
    let members = if inspection.on_disk.has_data() {
        datadir::member_facts(&layout.member())
            .map(|f| f.members)
            .ok()
    } else {
        None
    };
    let journal = progress::read_journal(&config.data_dir, 10);
    let backups = backup::list(&layout);
    let lock = datadir::lock_holder(&layout);
    let staging = layout.staging().exists();
    #[derive(Serialize)]
    struct Out<'a> {
        data_dir: &'a Path,
        recorded: Option<VersionFile>,
        legacy_default: bool,
        members: Option<usize>,
        allowed: Option<Allowed>,
        lock_holder: Option<String>,
        interrupted_work: bool,
        last_steps: Vec<JournalEntry>,
        backups: Vec<backup::Backup>,
    }
    let out = Out {
        data_dir: &config.data_dir,
        recorded: inspection.on_disk.current(),
        legacy_default: inspection.on_disk == OnDisk::Legacy,
        members,
        allowed: members.map(Allowed::for_members),
        lock_holder: lock,
        interrupted_work: staging,
        last_steps: journal,
        backups,
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Output::Text => {
            println!("data dir: {}", config.data_dir.display());
            match (out.recorded, out.legacy_default) {
                (None, _) => println!("recorded: none (fresh)"),
                (Some(v), true) => {
                    println!("recorded: none; the data is {v} by the legacy default")
                }
                (Some(v), false) => println!("recorded: {v}"),
            }
            if let Some(m) = out.members {
                let allowed = if m > 1 {
                    " (upgrades only: storage migration and rollbacks need one member)"
                } else {
                    ""
                };
                println!("members:  {m}{allowed}");
            }
            println!("lock:     {}", out.lock_holder.as_deref().unwrap_or("free"));
            if out.interrupted_work {
                println!("interrupted work: a staged rewrite is present; the next run finishes or discards it");
            }
            println!("last steps:");
            if out.last_steps.is_empty() {
                println!("  none");
            }
            for e in &out.last_steps {
                let kind = e.kind.clone().unwrap_or_else(|| e.event.clone());
                let keys = e
                    .keys
                    .map(|k| format!(", {k} keys"))
                    .or_else(|| {
                        e.detail
                            .get("revisions_verified")
                            .and_then(|r| r.as_u64())
                            .map(|r| format!(", {r} revisions verified"))
                    })
                    .unwrap_or_default();
                println!(
                    "  {} {kind:<15} {} -> {} ({} ms{keys})",
                    e.at, e.from, e.to, e.elapsed_ms
                );
                // What the step counted and how long its parts took (TTLs, leases, sub-steps).
                let detail: Vec<String> = e
                    .detail
                    .iter()
                    .filter(|(k, _)| k.as_str() != "backup")
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect();
                if !detail.is_empty() {
                    println!("      {}", detail.join(" "));
                }
            }
            println!("backups:");
            if out.backups.is_empty() {
                println!("  none");
            }
            for b in &out.backups {
                println!(
                    "  {} ({}, taken {}, {} bytes)",
                    b.path.display(),
                    b.version,
                    b.taken,
                    b.bytes
                );
            }
        }
    }
    Ok(())
}
