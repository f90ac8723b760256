//! `plan` and `status`: what a run would do, and what the data dir holds and has been through.

use std::path::Path;

use serde::Serialize;

use crate::backup;
use crate::cli::Output;
use crate::config::Config;
use crate::datadir::{self, OnDisk};
use crate::plan::Step;
use crate::progress::{self, JournalEntry};
use crate::run::{prepare, Prepared, RunError};
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

/// Text for a member count: a cluster of several allows upgrades only.
fn members_line(members: usize) -> String {
    let allowed = if members > 1 {
        " (upgrades only: storage migration and rollbacks need one member)"
    } else {
        ""
    };
    format!("members:  {members}{allowed}")
}

/// Prints `out` as pretty JSON; a value that cannot be encoded is an error, never empty output.
fn print_json(out: &impl Serialize) -> Result<(), RunError> {
    let text = serde_json::to_string_pretty(out).map_err(RunError::Report)?;
    println!("{text}");
    Ok(())
}

/// What `plan` prints.
#[derive(Serialize)]
struct PlanOut<'a> {
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

impl<'a> PlanOut<'a> {
    fn new(config: &'a Config, p: &Prepared) -> PlanOut<'a> {
        let members = p.inspection.facts.members;
        let (steps, notes) = match &p.plan {
            Some(pl) => (
                pl.steps
                    .iter()
                    .map(|s| StepOut {
                        step: *s,
                        outcome: s.outcome(),
                        describe: s.to_string(),
                    })
                    .collect(),
                pl.notes.iter().map(|n| n.to_string()).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        PlanOut {
            data_dir: &config.data_dir,
            current: p.inspection.on_disk.current(),
            legacy_default: p.inspection.on_disk == OnDisk::Legacy,
            target: p.target,
            bundled: p.bundle.versions.iter().map(|v| v.to_string()).collect(),
            members,
            steps,
            notes,
            allowed: Allowed::for_members(members),
        }
    }

    fn print_text(&self, p: &Prepared) {
        let cur = match (self.current, self.legacy_default) {
            (None, _) => "none (fresh data dir)".to_string(),
            (Some(v), true) => format!("{v} (no version.txt: the legacy default for a v2 WAL)"),
            (Some(v), false) => v.to_string(),
        };
        println!("data dir: {}", self.data_dir.display());
        println!("current:  {cur}");
        println!("target:   {}", self.target);
        println!("bundled:  {}", self.bundled.join(" "));
        println!("{}", members_line(self.members));
        match &p.plan {
            None => println!(
                "steps:    none; record {} (etcd creates the data on first start)",
                self.target
            ),
            Some(pl) if pl.steps.is_empty() => println!("steps:    none; already at the target"),
            Some(_) => {
                println!("steps:");
                for (i, s) in self.steps.iter().enumerate() {
                    println!("  {}. {}", i + 1, s.describe);
                }
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}

/// `plan`: what migrate would do.
pub fn print_plan(config: &Config, output: Output) -> Result<(), RunError> {
    let p = prepare(config, true)?;
    let out = PlanOut::new(config, &p);
    match output {
        Output::Json => print_json(&out)?,
        Output::Text => out.print_text(&p),
    }
    Ok(())
}

/// What `status` prints.
#[derive(Serialize)]
struct StatusOut<'a> {
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

impl<'a> StatusOut<'a> {
    fn read(config: &'a Config) -> Result<StatusOut<'a>, RunError> {
        let layout = config.layout();
        let inspection = datadir::inspect(&config.data_dir)?;
        let members = if inspection.on_disk.has_data() {
            datadir::member_facts(&layout.member())
                .map(|f| f.members)
                .ok()
        } else {
            None
        };
        Ok(StatusOut {
            data_dir: &config.data_dir,
            recorded: inspection.on_disk.current(),
            legacy_default: inspection.on_disk == OnDisk::Legacy,
            members,
            allowed: members.map(Allowed::for_members),
            lock_holder: datadir::lock_holder(&layout),
            interrupted_work: layout.staging().exists(),
            last_steps: progress::read_journal(&config.data_dir, 10),
            backups: backup::list(&layout),
        })
    }

    fn print_text(&self) {
        println!("data dir: {}", self.data_dir.display());
        match (self.recorded, self.legacy_default) {
            (None, _) => println!("recorded: none (fresh)"),
            (Some(v), true) => println!("recorded: none; the data is {v} by the legacy default"),
            (Some(v), false) => println!("recorded: {v}"),
        }
        if let Some(m) = self.members {
            println!("{}", members_line(m));
        }
        println!(
            "lock:     {}",
            self.lock_holder.as_deref().unwrap_or("free")
        );
        if self.interrupted_work {
            println!("interrupted work: a staged rewrite is present; the next run finishes or discards it");
        }
        println!("last steps:");
        if self.last_steps.is_empty() {
            println!("  none");
        }
        for e in &self.last_steps {
            print_entry(e);
        }
        println!("backups:");
        if self.backups.is_empty() {
            println!("  none");
        }
        for b in &self.backups {
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

/// One journal entry of `status`: what ran, and what it counted and how long its parts took
/// (TTLs, leases, sub-steps).
fn print_entry(e: &JournalEntry) {
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

/// `status`: recorded version, recent steps, backups, lock holder.
pub fn print_status(config: &Config, output: Output) -> Result<(), RunError> {
    let out = StatusOut::read(config)?;
    match output {
        Output::Json => print_json(&out)?,
        Output::Text => out.print_text(),
    }
    Ok(())
}
