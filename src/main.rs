//! Entry point: parse, resolve config, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

use etcd_migrate::cli::{Cli, Command};
use etcd_migrate::config::{self, Env, LogFormat};
use etcd_migrate::executor::RealEtcd;
use etcd_migrate::run::{self, Mode, RunError};
use etcd_migrate::{backup, report};

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(tracing::Level::INFO);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Migrate);
    if let Command::Snapshot(args) = &command {
        return snapshot(&cli.opts, args);
    }
    let needs_target = matches!(
        command,
        Command::Migrate | Command::Run { .. } | Command::Plan { .. }
    );
    let config = match config::resolve(&cli.opts, &Env::from_process(), needs_target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("etcd-migrate: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    etcd_migrate::failpoints::setup();
    let result: Result<(), RunError> = match &command {
        Command::Plan { output } => report::print_plan(&config, *output),
        Command::Status { output } => report::print_status(&config, *output),
        Command::Snapshot(_) => unreachable!("handled before the data dir is resolved"),
        Command::Restore { backup } => {
            block_on(backup::restore(&config.layout(), backup)).map_err(RunError::from)
        }
        Command::Migrate => {
            block_on(run::migrate(&config, &mut RealEtcd, Mode::Migrate)).map(|_| ())
        }
        Command::Run { etcd_args } => match check_exec_flags(&config, etcd_args)
            .and_then(|_| block_on(run::migrate(&config, &mut RealEtcd, Mode::Run)))
        {
            Ok(m) if m.rejoined => {
                let args = etcd_migrate::rejoin::existing_state(etcd_args);
                Err(run::exec_etcd(&config, &config.bin_dir, m.target, &args))
            }
            Ok(m) => Err(run::exec_etcd(
                &config,
                &config.bin_dir,
                m.target,
                etcd_args,
            )),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(exit_code = e.exit_code(), "{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `snapshot` needs no data dir and no target: its own options only.
fn snapshot(opts: &etcd_migrate::cli::Opts, args: &etcd_migrate::cli::SnapshotArgs) -> ExitCode {
    let (config, log_format) = match config::resolve_snapshot(opts, args, &Env::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("etcd-migrate: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(log_format);
    etcd_migrate::failpoints::setup();
    match block_on(etcd_migrate::snapshot::run(&config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(exit_code = e.exit_code(), "{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `run` ends in exec etcd-<target> with the pod's flags: a flag that release lacks is refused
/// before any step, not met as a crash loop after the migration.
fn check_exec_flags(
    config: &config::Config,
    etcd_args: &[std::ffi::OsString],
) -> Result<(), RunError> {
    let Some(target) = config.target else {
        return Ok(());
    };
    let args: Vec<String> = etcd_args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    etcd_migrate::preflight::check_flags_known(
        target.version,
        &args,
        "the etcd flags after `run --`",
    )
}

/// One thread: children are spawned from the main thread, so their parent-death signal fires
/// only when this process dies.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => panic!("cannot start the async runtime: {e}"),
    }
}
