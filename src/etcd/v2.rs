//! The v2 HTTP API of a private etcd (etcd2 storage).

use std::time::Duration;

use serde::Deserialize;

use super::fingerprint::{Fingerprint, FingerprintBuilder};

/// A v2 request failure.
#[derive(Debug, thiserror::Error)]
#[error("v2 {op} {key}: {message}")]
pub struct V2Error {
    pub op: &'static str,
    pub key: String,
    pub message: String,
}

/// A node of the v2 store as the HTTP API returns it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub key: Option<String>,
    pub value: Option<String>,
    #[serde(default)]
    pub dir: bool,
    pub expiration: Option<String>,
    pub ttl: Option<i64>,
    #[serde(default)]
    pub created_index: i64,
    #[serde(default)]
    pub modified_index: i64,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct Response {
    node: Node,
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

    /// Every key, recursively, sorted.
    pub async fn tree(&self) -> Result<Tree, V2Error> {
        let body = self
            .send(
                "get",
                "/",
                self.http.get(self.url("/")).query(&[
                    ("recursive", "true"),
                    ("sorted", "true"),
                    ("quorum", "true"),
                ]),
            )
            .await?;
        let resp: Response = serde_json::from_str(&body).map_err(|e| V2Error {
            op: "get",
            key: "/".into(),
            message: e.to_string(),
        })?;
        let mut tree = Tree::default();
        flatten(resp.node, &mut tree);
        tree.leaves
            .sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        Ok(tree)
    }

    /// Fingerprint of every leaf key (probe keys excluded).
    pub async fn fingerprint(&self) -> Result<Fingerprint, V2Error> {
        Ok(fingerprint_of(&self.tree().await?))
    }
}

/// Fingerprint of a tree read over v2: comparable with a v3 fingerprint of migrated data.
pub fn fingerprint_of(tree: &Tree) -> Fingerprint {
    let mut b = FingerprintBuilder::default();
    for l in &tree.leaves {
        b.add(
            l.key.as_bytes(),
            l.value.as_bytes(),
            l.created_index,
            l.modified_index,
            l.expiration.is_some(),
        );
    }
    b.finish()
}

fn flatten(node: Node, tree: &mut Tree) {
    if node.dir {
        let key = node.key.clone();
        if node.nodes.is_empty() {
            if let Some(k) = key {
                tree.empty_dirs.push(k);
            }
            return;
        }
        for child in node.nodes {
            flatten(child, tree);
        }
    } else if let Some(key) = node.key {
        tree.leaves.push(Leaf {
            key,
            value: node.value.unwrap_or_default(),
            created_index: node.created_index,
            modified_index: node.modified_index,
            expiration: node.expiration,
            ttl: node.ttl,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_keeps_leaves_in_order_and_reports_empty_dirs() {
        let body = r#"{"action":"get","node":{"dir":true,"nodes":[
            {"key":"/registry","dir":true,"nodes":[
                {"key":"/registry/b","value":"2","modifiedIndex":5,"createdIndex":5},
                {"key":"/registry/a","value":"1","expiration":"2036-01-01T00:00:00Z","ttl":100,"modifiedIndex":4,"createdIndex":4},
                {"key":"/registry/emptydir","dir":true,"modifiedIndex":6,"createdIndex":6}]}]}}"#;
        let resp: Response = serde_json::from_str(body).unwrap();
        let mut tree = Tree::default();
        flatten(resp.node, &mut tree);
        tree.leaves.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(tree.leaves.len(), 2);
        assert_eq!(tree.leaves[0].key, "/registry/a");
        assert_eq!(tree.leaves[0].ttl, Some(100));
        assert_eq!(tree.empty_dirs, ["/registry/emptydir"]);
        let fp = fingerprint_of(&tree);
        assert_eq!((fp.keys, fp.permanent), (2, 1));
    }
}
