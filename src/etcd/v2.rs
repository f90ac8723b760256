//! The v2 HTTP API of a private etcd (etcd2 storage).

use std::time::Duration;

use crate::fingerprint::{Fingerprint, FingerprintBuilder};

/// One directory's listing as it is parsed: leaves and the directory itself (when empty) go to
/// the walk's visit; subdirectories, which a listing without recursion shows without their
/// children, are kept to be listed next.
struct Listing<S, E> {
    state: S,
    visit: fn(&mut S, Entry) -> Result<(), E>,
    listed: String,
    subdirs: Vec<String>,
}

impl<S, E> Listing<S, E> {
    fn see(&mut self, entry: Entry) -> Result<(), E> {
        match entry {
            Entry::EmptyDir(d) if d.trim_end_matches('/') != self.listed.trim_end_matches('/') => {
                self.subdirs.push(d);
                Ok(())
            }
            e => (self.visit)(&mut self.state, e),
        }
    }
}

/// A v2 request failure.
#[derive(Debug, thiserror::Error)]
#[error("v2 {op} {key}: {message}")]
pub struct V2Error {
    pub op: &'static str,
    pub key: String,
    pub message: String,
}

/// A leaf key of the v2 store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub key: String,
    pub value: String,
    pub created_index: i64,
    pub modified_index: i64,
    /// RFC 3339 expiry time, for keys with a TTL.
    pub expiration: Option<String>,
    /// Remaining TTL in seconds as etcd reported it.
    pub ttl: Option<i64>,
}

/// What a recursive read of the v2 store found.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Leaf keys in key order.
    pub leaves: Vec<Leaf>,
    /// Directories without any key below them (v3 has no directories: they are not migrated).
    pub empty_dirs: Vec<String>,
}

/// A v2 client bound to one etcd.
#[derive(Clone)]
pub struct V2 {
    http: reqwest::Client,
    base: String,
}

impl V2 {
    pub fn new(client_url: &str, request_timeout: Duration) -> V2 {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(Duration::from_millis(500))
            .no_proxy()
            .build()
            .unwrap_or_default();
        V2 {
            http,
            base: client_url.trim_end_matches('/').to_string(),
        }
    }

    fn url(&self, key: &str) -> String {
        format!("{}/v2/keys{}", self.base, key)
    }

    async fn send(
        &self,
        op: &'static str,
        key: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<String, V2Error> {
        let e = |message: String| V2Error {
            op,
            key: key.to_string(),
            message,
        };
        let resp = req.send().await.map_err(|x| e(x.to_string()))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|x| e(x.to_string()))?;
        if !status.is_success() {
            return Err(e(format!("HTTP {status}: {}", body.trim())));
        }
        Ok(body)
    }

    /// Sets a key (quorum write through raft).
    pub async fn put(&self, key: &str, value: &str) -> Result<(), V2Error> {
        self.send(
            "put",
            key,
            self.http.put(self.url(key)).form(&[("value", value)]),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete(&self, key: &str) -> Result<(), V2Error> {
        self.send("delete", key, self.http.delete(self.url(key)))
            .await
            .map(|_| ())
    }

    /// Every key, recursively, sorted (the whole store in memory: small stores and tests).
    pub async fn tree(&self) -> Result<Tree, V2Error> {
        let tree = self
            .walk(Tree::default(), |tree, entry| {
                match entry {
                    Entry::Leaf(l) => tree.leaves.push(l),
                    Entry::EmptyDir(d) => tree.empty_dirs.push(d),
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .await
            .map_err(WalkError::into_v2)?;
        let mut tree = tree;
        tree.leaves
            .sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        Ok(tree)
    }

    /// Visits every leaf key and every empty directory of the store, one directory at a time:
    /// each directory is listed without recursion and its listing parsed as it arrives, on a
    /// thread of its own, so neither etcd (which builds each response whole) nor we hold more
    /// than one directory's listing, whatever the store's size (one recursive read of a 1 GB
    /// store had etcd 3.4 peak at 16 GB). Each directory's children come sorted, a
    /// directory's leaves before its subdirectories; not in key byte order. `visit` runs on
    /// those threads, with `state`, which is handed back at the end; an error from it ends the
    /// walk.
    pub async fn walk<S: Send + 'static, E: std::fmt::Display + Send + 'static>(
        &self,
        state: S,
        visit: fn(&mut S, Entry) -> Result<(), E>,
    ) -> Result<S, WalkError<E>> {
        let mut listing = Listing {
            state,
            visit,
            listed: String::new(),
            subdirs: Vec::new(),
        };
        // Depth first, each directory's subdirectories in sorted order.
        let mut pending = vec!["/".to_string()];
        while let Some(dir) = pending.pop() {
            listing.listed = dir;
            listing = self.list(listing).await?;
            pending.extend(listing.subdirs.drain(..).rev());
        }
        Ok(listing.state)
    }

    /// Streams one directory's listing through `listing`.
    async fn list<S: Send + 'static, E: std::fmt::Display + Send + 'static>(
        &self,
        listing: Listing<S, E>,
    ) -> Result<Listing<S, E>, WalkError<E>> {
        let dir = listing.listed.clone();
        let e = |message: String| V2Error {
            op: "get",
            key: dir.clone(),
            message,
        };
        let url = self
            .key_url(&dir)
            .ok_or_else(|| WalkError::V2(e(format!("{} cannot take a path", self.base))))?;
        let mut resp = self
            .http
            .get(url)
            .query(&[("sorted", "true"), ("quorum", "true")])
            // One directory may be large: no overall deadline, only between chunks.
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .map_err(|x| WalkError::V2(e(x.to_string())))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(WalkError::V2(e(format!("HTTP {status}: {}", body.trim()))));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
        let parser = std::thread::Builder::new()
            .name("v2-walk".into())
            .spawn(move || parse_walk(ChunkReader::new(rx), listing, Listing::<S, E>::see))
            .map_err(|x| WalkError::V2(e(x.to_string())))?;
        let mut sent = Ok(());
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if tx.send(chunk).is_err() {
                        break; // the parser stopped (its error is reported below)
                    }
                }
                Ok(None) => break,
                Err(x) => {
                    sent = Err(e(x.to_string()));
                    break;
                }
            }
        }
        drop(tx);
        let parsed = loop {
            if parser.is_finished() {
                break parser
                    .join()
                    .map_err(|_| WalkError::V2(e("the v2 parser panicked".into())))?;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        sent.map_err(WalkError::V2)?;
        parsed.map_err(|p| match p {
            Parse::Json(m) => WalkError::V2(e(m)),
            Parse::Visit(v) => WalkError::Visit(v),
        })
    }

    /// `/v2/keys<key>` with each path segment percent-encoded; `None` when the base URL cannot
    /// take a path.
    fn key_url(&self, key: &str) -> Option<reqwest::Url> {
        let mut url = reqwest::Url::parse(&format!("{}/v2/keys", self.base)).ok()?;
        {
            let mut path = url.path_segments_mut().ok()?;
            path.extend(key.split('/').filter(|s| !s.is_empty()));
            if key.trim_matches('/').is_empty() {
                path.push("");
            }
        }
        Some(url)
    }

    /// Fingerprint of every leaf key (probe keys excluded), streaming.
    pub async fn fingerprint(&self) -> Result<Fingerprint, V2Error> {
        let b = self
            .walk(FingerprintBuilder::default(), |b, entry| {
                if let Entry::Leaf(l) = entry {
                    add_leaf(b, &l);
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .await
            .map_err(WalkError::into_v2)?;
        Ok(b.finish())
    }
}

/// Why a walk of the store ended early.
#[derive(Debug)]
pub enum WalkError<E> {
    /// The request or the response failed.
    V2(V2Error),
    /// The visit stopped the walk.
    Visit(E),
}

impl WalkError<std::convert::Infallible> {
    fn into_v2(self) -> V2Error {
        match self {
            WalkError::V2(e) => e,
            WalkError::Visit(never) => match never {},
        }
    }
}

/// Why parsing a response ended early.
enum Parse<E> {
    Json(String),
    Visit(E),
}

/// What a walk of the store visits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Leaf(Leaf),
    /// A directory without any key below it (v3 has no directories: they are not migrated).
    EmptyDir(String),
}

/// Adds a leaf as the v2 store holds it: keys with a TTL may expire.
pub fn add_leaf(b: &mut FingerprintBuilder, l: &Leaf) {
    b.add(
        l.key.as_bytes(),
        l.value.as_bytes(),
        l.created_index,
        l.modified_index,
        l.expiration.is_some(),
    );
}

/// A `Read` over the chunks of a response body arriving on a channel.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl ChunkReader {
    fn new(rx: std::sync::mpsc::Receiver<bytes::Bytes>) -> Self {
        ChunkReader {
            rx,
            cur: bytes::Bytes::new(),
        }
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(c) => self.cur = c,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Parses a v2 GET response from `r`, visiting nodes as they complete.
fn parse_walk<S, E: std::fmt::Display>(
    r: impl std::io::Read,
    mut state: S,
    visit: fn(&mut S, Entry) -> Result<(), E>,
) -> Result<S, Parse<E>> {
    use serde::de::DeserializeSeed;
    let mut de =
        serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(1 << 16, r));
    let mut failed = None;
    let seed = ResponseSeed {
        walk: Walk {
            state: &mut state,
            visit,
            failed: &mut failed,
        },
    };
    let parsed = seed.deserialize(&mut de);
    if let Some(f) = failed {
        return Err(Parse::Visit(f));
    }
    parsed.map_err(|x| Parse::Json(format!("reading the v2 store's JSON: {x}")))?;
    Ok(state)
}

/// The visitor's state while parsing: a callback error stops the parse.
struct Walk<'a, S, V> {
    state: &'a mut S,
    visit: fn(&mut S, Entry) -> Result<(), V>,
    failed: &'a mut Option<V>,
}

impl<S, V: std::fmt::Display> Walk<'_, S, V> {
    fn reborrow(&mut self) -> Walk<'_, S, V> {
        Walk {
            state: self.state,
            visit: self.visit,
            failed: self.failed,
        }
    }
    fn emit<E: serde::de::Error>(&mut self, entry: Entry) -> Result<(), E> {
        (self.visit)(self.state, entry).map_err(|x| {
            let message = x.to_string();
            *self.failed = Some(x);
            E::custom(message)
        })
    }
}

/// `{"action": ..., "node": {...}}`: only `node` is walked.
struct ResponseSeed<'a, S, V> {
    walk: Walk<'a, S, V>,
}

impl<'de, S, V: std::fmt::Display> serde::de::DeserializeSeed<'de> for ResponseSeed<'_, S, V> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S, V: std::fmt::Display> serde::de::Visitor<'de> for ResponseSeed<'_, S, V> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a v2 response")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut m: A) -> Result<(), A::Error> {
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            if k == "node" {
                m.next_value_seed(NodeSeed {
                    walk: self.walk.reborrow(),
                })?;
            } else {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// One node: a leaf is visited when its object ends; a directory's children as they come.
struct NodeSeed<'a, S, V> {
    walk: Walk<'a, S, V>,
}

impl<'de, S, V: std::fmt::Display> serde::de::DeserializeSeed<'de> for NodeSeed<'_, S, V> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S, V: std::fmt::Display> serde::de::Visitor<'de> for NodeSeed<'_, S, V> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a v2 node")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut m: A) -> Result<(), A::Error> {
        let mut leaf = Leaf {
            key: String::new(),
            value: String::new(),
            created_index: 0,
            modified_index: 0,
            expiration: None,
            ttl: None,
        };
        let (mut has_key, mut dir, mut children) = (false, false, 0u64);
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match k.as_ref() {
                "key" => {
                    leaf.key = m.next_value()?;
                    has_key = true;
                }
                "value" => leaf.value = m.next_value()?,
                "dir" => dir = m.next_value()?,
                "expiration" => leaf.expiration = m.next_value()?,
                "ttl" => leaf.ttl = m.next_value()?,
                "createdIndex" => leaf.created_index = m.next_value()?,
                "modifiedIndex" => leaf.modified_index = m.next_value()?,
                "nodes" => {
                    children = m.next_value_seed(NodesSeed {
                        walk: self.walk.reborrow(),
                    })?;
                }
                _ => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        match (dir, has_key) {
            (true, true) if children == 0 => self.walk.emit(Entry::EmptyDir(leaf.key)),
            (false, true) => self.walk.emit(Entry::Leaf(leaf)),
            _ => Ok(()),
        }
    }
}

/// A directory's `nodes`: returns how many there were.
struct NodesSeed<'a, S, V> {
    walk: Walk<'a, S, V>,
}

impl<'de, S, V: std::fmt::Display> serde::de::DeserializeSeed<'de> for NodesSeed<'_, S, V> {
    type Value = u64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S, V: std::fmt::Display> serde::de::Visitor<'de> for NodesSeed<'_, S, V> {
    type Value = u64;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of v2 nodes")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut s: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while s
            .next_element_seed(NodeSeed {
                walk: self.walk.reborrow(),
            })?
            .is_some()
        {
            n += 1;
        }
        Ok(n)
    }
}

/// Fingerprint of a tree read over v2: comparable with a v3 fingerprint of migrated data.
pub fn fingerprint_of(tree: &Tree) -> Fingerprint {
    let mut b = FingerprintBuilder::default();
    for l in &tree.leaves {
        add_leaf(&mut b, l);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"action":"get","node":{"dir":true,"nodes":[
            {"key":"/registry","dir":true,"nodes":[
                {"key":"/registry/b","value":"2","modifiedIndex":5,"createdIndex":5},
                {"key":"/registry/a","value":"1","expiration":"2036-01-01T00:00:00Z","ttl":100,"modifiedIndex":4,"createdIndex":4},
                {"key":"/registry/emptydir","dir":true,"modifiedIndex":6,"createdIndex":6}]}]}}"#;

    /// Serves `bytes` a few at a time, as a response arrives in chunks.
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(7);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn collect(t: &mut Tree, e: Entry) -> Result<(), std::convert::Infallible> {
        match e {
            Entry::Leaf(l) => t.leaves.push(l),
            Entry::EmptyDir(d) => t.empty_dirs.push(d),
        }
        Ok(())
    }

    #[test]
    fn a_streamed_walk_visits_leaves_and_empty_dirs() {
        let Ok(tree) = parse_walk(Trickle(BODY.as_bytes()), Tree::default(), collect) else {
            panic!("the walk failed")
        };
        let keys: Vec<&str> = tree.leaves.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            ["/registry/b", "/registry/a"],
            "tree order, as served"
        );
        assert_eq!(tree.leaves[1].ttl, Some(100));
        assert_eq!(
            tree.leaves[1].expiration.as_deref(),
            Some("2036-01-01T00:00:00Z")
        );
        assert_eq!(
            (tree.leaves[0].created_index, tree.leaves[0].modified_index),
            (5, 5)
        );
        assert_eq!(tree.empty_dirs, ["/registry/emptydir"]);
        let fp = fingerprint_of(&tree);
        assert_eq!((fp.keys, fp.permanent), (2, 1));
    }

    #[test]
    fn a_visit_error_ends_the_walk_with_that_error() {
        fn stop(n: &mut u32, _: Entry) -> Result<(), &'static str> {
            *n += 1;
            Err("disk full")
        }
        let Err(Parse::Visit(err)) = parse_walk(Trickle(BODY.as_bytes()), 0u32, stop) else {
            panic!("the visit's error did not end the walk")
        };
        assert_eq!(err, "disk full");
    }

    #[test]
    fn a_truncated_response_is_an_error() {
        let cut = &BODY.as_bytes()[..BODY.len() - 10];
        let Err(Parse::Json(err)) = parse_walk(Trickle(cut), Tree::default(), collect) else {
            panic!("a truncated response parsed")
        };
        assert!(err.contains("JSON"), "{err}");
    }
}
