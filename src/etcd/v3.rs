//! The v3 API of a private etcd, through the etcd-client crate.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use crate::fingerprint::{Fingerprint, FingerprintBuilder};

/// Keys fetched per range request while fingerprinting. Large: etcd counts the whole rest of
/// the range for every request, so many small pages cost quadratic time. Halved when a page of
/// large values outgrows gRPC's 4 MiB message limit.
const PAGE: i64 = 10_000;

/// A put with its lease, guarded by the key's mod revision: (key, value, mod revision, lease).
pub type LeasedPut = (Vec<u8>, Vec<u8>, i64, i64);

/// A v3 client failure, as text (the crate's error type is not ours to expose).
#[derive(Debug, thiserror::Error)]
#[error("{op}: {message}")]
pub struct V3Error {
    pub op: &'static str,
    pub message: String,
}

fn err(op: &'static str) -> impl FnOnce(etcd_client::Error) -> V3Error {
    move |e| V3Error {
        op,
        message: e.to_string(),
    }
}

/// One key as read from the v3 store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// A member as `member list` shows it. An added member that never started has no name and no
/// client URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedMember {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

impl From<&etcd_client::Member> for ListedMember {
    fn from(m: &etcd_client::Member) -> ListedMember {
        ListedMember {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            is_learner: m.is_learner(),
        }
    }
}

/// Where a member's raft log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftStatus {
    pub member: u64,
    pub leader: u64,
    pub committed: u64,
    pub applied: u64,
}

/// Client TLS for a member's client URL: the CA that signed its certificate, and our own
/// certificate and key when it asks for one (`--client-cert-auth`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl ClientTls {
    /// The credentials the member's own flags name (ETCD_CREDS): `--trusted-ca-file`, and
    /// `--client-cert-file`/`--client-key-file` (etcd 3.5+), else `--cert-file`/`--key-file`
    /// (kubeadm's server certificate is also a client certificate). `None` without any.
    pub fn from_flags(args: &[String]) -> Option<ClientTls> {
        let value = |name: &str| -> Option<std::path::PathBuf> {
            let eq = format!("--{name}=");
            let bare = format!("--{name}");
            let mut it = args.iter();
            let mut found = None;
            while let Some(a) = it.next() {
                if let Some(v) = a.strip_prefix(&eq) {
                    found = Some(v.to_string());
                } else if *a == bare {
                    found = it.next().cloned();
                }
            }
            found.filter(|v| !v.is_empty()).map(Into::into)
        };
        let tls = ClientTls {
            ca: value("trusted-ca-file"),
            cert: value("client-cert-file").or_else(|| value("cert-file")),
            key: value("client-key-file").or_else(|| value("key-file")),
        };
        (tls != ClientTls::default()).then_some(tls)
    }

    fn options(&self) -> Result<etcd_client::TlsOptions, V3Error> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| V3Error {
                op: "read TLS file",
                message: format!("{}: {e}", p.display()),
            })
        };
        let mut o = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca {
            o = o.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                o = o.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?))
            }
            (None, None) => {}
            _ => {
                return Err(V3Error {
                    op: "client TLS",
                    message: "a client certificate needs its key, and a key its certificate".into(),
                })
            }
        }
        Ok(o)
    }
}

/// HashKV as a member answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHash {
    pub hash: u32,
    pub compact_revision: i64,
    /// The member's revision when it answered.
    pub current_revision: i64,
}

/// What `status` says of the member itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub version: String,
    pub revision: i64,
    pub db_size: i64,
}

/// A connected v3 client.
#[derive(Clone)]
pub struct V3 {
    client: Client,
}

impl V3 {
    /// Connects to `url`; each request gives up after `request_timeout`.
    pub async fn connect(url: &str, request_timeout: Duration) -> Result<V3, V3Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect([url], Some(opts))
            .await
            .map_err(err("connect"))?;
        Ok(V3 { client })
    }

    /// Connects to `url` with client TLS when given. `request_timeout` bounds each unary request;
    /// `None` leaves requests unbounded (a snapshot stream of any size: its caller bounds each
    /// message instead).
    pub async fn connect_tls(
        url: &str,
        request_timeout: Option<Duration>,
        tls: Option<&ClientTls>,
    ) -> Result<V3, V3Error> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(t) = request_timeout {
            opts = opts.with_timeout(t);
        }
        if let Some(tls) = tls {
            opts = opts.with_tls(tls.options()?);
        }
        let client = Client::connect([url], Some(opts))
            .await
            .map_err(err("connect"))?;
        Ok(V3 { client })
    }

    /// The member's id, release, store revision and backend size.
    pub async fn member_status(&mut self) -> Result<MemberStatus, V3Error> {
        let r = self.client.status().await.map_err(err("status"))?;
        Ok(MemberStatus {
            id: r.header().map(|h| h.member_id()).unwrap_or_default(),
            version: r.version().to_string(),
            revision: r.header().map(|h| h.revision()).unwrap_or_default(),
            db_size: r.db_size(),
        })
    }

    /// Opens the member's snapshot stream (its backend, then etcd's SHA-256 of it).
    pub async fn snapshot(&mut self) -> Result<etcd_client::SnapshotStreaming, V3Error> {
        self.client.snapshot().await.map_err(err("snapshot"))
    }

    /// The member's HashKV at `revision`.
    pub async fn hash_kv(&mut self, revision: i64) -> Result<MemberHash, V3Error> {
        let r = self.client.hash_kv(revision).await.map_err(err("hashkv"))?;
        Ok(MemberHash {
            hash: r.hash(),
            compact_revision: r.compact_version(),
            current_revision: r.header().map(|h| h.revision()).unwrap_or_default(),
        })
    }

    /// How many keys were live at `revision`.
    pub async fn count_at(&mut self, revision: i64) -> Result<u64, V3Error> {
        self.count(revision).await
    }

    /// Connects to whichever of `urls` answers (a cluster's members).
    pub async fn connect_any(urls: &[String], request_timeout: Duration) -> Result<V3, V3Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(request_timeout);
        let client = Client::connect(urls, Some(opts))
            .await
            .map_err(err("connect"))?;
        Ok(V3 { client })
    }

    /// A linearizable read of `key`'s count: succeeds only while the cluster has quorum.
    pub async fn quorum_read(&mut self, key: &[u8]) -> Result<(), V3Error> {
        self.client
            .get(key, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(err("linearizable get"))?;
        Ok(())
    }

    /// The cluster's members as the member answering sees them.
    pub async fn member_list(&mut self) -> Result<Vec<ListedMember>, V3Error> {
        let r = self
            .client
            .member_list()
            .await
            .map_err(err("member list"))?;
        Ok(r.members().iter().map(ListedMember::from).collect())
    }

    pub async fn member_remove(&mut self, id: u64) -> Result<(), V3Error> {
        self.client
            .member_remove(id)
            .await
            .map_err(err("member remove"))?;
        Ok(())
    }

    /// Adds a member with `peer_urls`; returns its id and the members after the add.
    pub async fn member_add(
        &mut self,
        peer_urls: Vec<String>,
    ) -> Result<(u64, Vec<ListedMember>), V3Error> {
        let r = self
            .client
            .member_add(peer_urls, None)
            .await
            .map_err(err("member add"))?;
        let id = r.member().map(|m| m.id()).unwrap_or_default();
        Ok((id, r.member_list().iter().map(ListedMember::from).collect()))
    }

    /// The answering member's raft position: (its id, the leader's id, raft index, applied index).
    /// The raft index is the member's committed index; the applied index is 0 before etcd 3.4.
    pub async fn status(&mut self) -> Result<RaftStatus, V3Error> {
        let r = self.client.status().await.map_err(err("status"))?;
        Ok(RaftStatus {
            member: r.header().map(|h| h.member_id()).unwrap_or_default(),
            leader: r.leader(),
            committed: r.raft_index(),
            applied: r.raft_applied_index(),
        })
    }

    /// Puts a key; returns the store revision after the put.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<i64, V3Error> {
        let r = self
            .client
            .put(key, value, None)
            .await
            .map_err(err("put"))?;
        Ok(r.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// Puts a key and reads it back (a linearizable read): the proof that the member serves
    /// writes and reads.
    pub async fn put_and_read_back(&mut self, key: &[u8], value: &[u8]) -> Result<i64, V3Error> {
        let rev = self.put(key, value).await?;
        let r = self.client.get(key, None).await.map_err(err("get"))?;
        match r.kvs().first() {
            Some(kv) if kv.value() == value && kv.mod_revision() == rev => Ok(rev),
            other => Err(V3Error {
                op: "get",
                message: format!(
                    "read back {:?} at revision {:?} after writing revision {rev}",
                    other.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    other.map(|kv| kv.mod_revision())
                ),
            }),
        }
    }

    pub async fn delete(&mut self, key: &[u8]) -> Result<(), V3Error> {
        self.client.delete(key, None).await.map_err(err("delete"))?;
        Ok(())
    }

    /// Deletes `keys` in transactions of up to 128 deletes (etcd 3.4's default `--max-txn-ops`),
    /// each tried up to three times (a delete is idempotent): a mass expiry of tens of thousands
    /// of keys is a few hundred requests, not one each.
    pub async fn delete_many(&mut self, keys: &[Vec<u8>]) -> Result<(), V3Error> {
        for chunk in keys.chunks(128) {
            let mut tries = 0;
            loop {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|k| TxnOp::delete(k.clone(), None))
                    .collect();
                match self.client.txn(Txn::new().and_then(ops)).await {
                    Ok(_) => break,
                    Err(_) if tries < 2 => tries += 1,
                    Err(e) => return Err(err("delete")(e)),
                }
            }
        }
        Ok(())
    }

    /// Reads every key in key order, a page at a time, at one revision.
    pub async fn for_each_key(&mut self, mut f: impl FnMut(KeyValue)) -> Result<i64, V3Error> {
        let mut start: Vec<u8> = vec![0];
        let mut revision = 0;
        let mut limit = PAGE;
        loop {
            // No sort order: etcd returns key order anyway, and with any explicit sort it reads
            // the whole rest of the range for every page (quadratic).
            let mut opts = GetOptions::new().with_range(vec![0]).with_limit(limit);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = match self.client.get(start.clone(), Some(opts)).await {
                Ok(r) => r,
                // A page of large values outgrew gRPC's 4 MiB message limit: smaller pages.
                Err(e) if limit > 1 && e.to_string().contains("message length too large") => {
                    limit /= 2;
                    continue;
                }
                Err(e) => return Err(err("range")(e)),
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            let kvs = resp.kvs();
            for kv in kvs {
                f(KeyValue {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    version: kv.version(),
                    lease: kv.lease(),
                });
            }
            match kvs.last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(revision),
            }
        }
    }

    /// How many keys the store holds (a read served through the whole keyspace's index).
    pub async fn count_keys(&mut self) -> Result<u64, V3Error> {
        self.count(0).await
    }

    /// Keys live at `revision` (0: now).
    async fn count(&mut self, revision: i64) -> Result<u64, V3Error> {
        let opts = GetOptions::new()
            .with_range(vec![0])
            .with_count_only()
            .with_revision(revision);
        let r = self
            .client
            .get(vec![0], Some(opts))
            .await
            .map_err(err("count"))?;
        Ok(r.count().max(0) as u64)
    }

    /// Fingerprint of the whole keyspace (probe keys excluded).
    pub async fn fingerprint(&mut self) -> Result<Fingerprint, V3Error> {
        let mut b = FingerprintBuilder::default();
        let meter = crate::meter::Meter::count("comparing keys", crate::meter::Unit::Keys, None);
        let read = meter.counter();
        self.for_each_key(|kv| {
            read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            b.add(
                &kv.key,
                &kv.value,
                kv.create_revision,
                kv.mod_revision,
                kv.lease != 0,
            )
        })
        .await?;
        Ok(b.finish())
    }

    /// Grants a lease with the given TTL (seconds); returns its id.
    pub async fn lease_grant(&mut self, ttl: i64) -> Result<i64, V3Error> {
        let r = self
            .client
            .lease_grant(ttl, None)
            .await
            .map_err(err("lease grant"))?;
        Ok(r.id())
    }

    /// Re-puts keys with their leases in one transaction, guarded by each key's mod revision: if
    /// any key changed since it was read, nothing is written. Items: (key, value, mod revision,
    /// lease). Returns whether the guard held.
    pub async fn put_with_leases_guarded(
        &mut self,
        items: &[(Vec<u8>, Vec<u8>, i64, i64)],
    ) -> Result<bool, V3Error> {
        let compares: Vec<Compare> = items
            .iter()
            .map(|(k, _, rev, _)| Compare::mod_revision(k.clone(), CompareOp::Equal, *rev))
            .collect();
        let ops: Vec<TxnOp> = items
            .iter()
            .map(|(k, v, _, lease)| {
                TxnOp::put(
                    k.clone(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(*lease)),
                )
            })
            .collect();
        let r = self
            .client
            .txn(Txn::new().when(compares).and_then(ops))
            .await
            .map_err(err("txn"))?;
        Ok(r.succeeded())
    }

    /// A plain put with a lease (the naive one-by-one reattach the benchmark compares with).
    pub async fn put_with_lease(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<(), V3Error> {
        self.client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(err("put"))?;
        Ok(())
    }
}
