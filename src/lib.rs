//! etcd-migrate: brings an etcd data directory to the version a manifest asks for.
pub mod cli;
pub mod config;
pub mod fsutil;
pub mod plan;
pub mod progress;
pub mod storage;
pub mod version;
