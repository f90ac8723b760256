//! Everything that starts processes: private etcd servers, etcdctl/etcdutl, and the v2/v3 clients.
pub mod bundle;
pub mod conns;
pub mod ctl;
pub mod peers;
pub mod process;
pub mod server;
pub mod v2;
pub mod v3;
