//! On-disk formats of etcd, read and written by hand (no I/O policy here).
