//! etcd-migrate: brings an etcd data directory to the version a manifest asks for.
pub mod cli;
pub mod config;
pub mod datadir;
pub mod etcd;
pub mod failpoints;
pub mod fsutil;
pub mod plan;
pub mod progress;
pub mod run;
pub mod steps;
pub mod storage;
pub mod version;
