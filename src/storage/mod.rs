//! On-disk formats of etcd, read and written by hand (no I/O policy here). No published Rust
//! crate reads etcd's bbolt backend or writes a 2.2.1-compatible WAL, so these are ours.
pub mod bbolt;
pub mod mvcc;
pub mod raftpb;
pub mod snap;
pub mod v2member;
pub mod v2store;
pub mod wal;
pub mod walinfo;
