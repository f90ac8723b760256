//! What a running cluster's members say about it on their peer URLs: `/members` (every member's
//! id, name, peer and client URLs) and `/version` (the cluster version). These are what etcd
//! itself asks when a member joins with `--initial-cluster-state existing`; they need no client
//! credentials, and they tell the client URLs the v3 API is reached on.

use std::time::Duration;

use serde::Deserialize;

/// A member as a peer's `/members` lists it. A member added but never started has no name and no
/// client URLs; one that started has published both.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PeerMember {
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    pub client_urls: Vec<String>,
}

impl PeerMember {
    /// Whether this member has run: it published its name and client URLs.
    pub fn started(&self) -> bool {
        !self.name.is_empty() && !self.client_urls.is_empty()
    }
}

/// One peer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAnswer {
    pub peer_url: String,
    pub members: Vec<PeerMember>,
    /// `etcdcluster` of `/version` (`3.4.0`): the version the whole cluster runs at.
    pub cluster_version: Option<String>,
}

/// A peer that did not answer, or answered something that is not etcd's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{peer_url}: {message}")]
pub struct PeerError {
    pub peer_url: String,
    pub message: String,
}

#[derive(Deserialize)]
struct VersionAnswer {
    #[serde(rename = "etcdcluster", default)]
    cluster: Option<String>,
}

/// Why a GET got no usable answer.
#[derive(Debug, thiserror::Error)]
enum Fetch {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("GET {path}: HTTP {status}")]
    Status {
        path: &'static str,
        status: reqwest::StatusCode,
    },
}

fn http_client(timeout: Duration) -> Result<reqwest::Client, Fetch> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .build()?)
}

/// GET `base` + `path`: the body of a 2xx answer.
async fn get(
    http: &reqwest::Client,
    base: &str,
    path: &'static str,
) -> Result<bytes::Bytes, Fetch> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = http.get(url).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        return Err(Fetch::Status { path, status });
    }
    Ok(body)
}

/// `etcdcluster` of `/version` (peer and client ports both serve it); `None` before the cluster
/// has decided, or when it cannot be read.
async fn cluster_version(http: &reqwest::Client, base: &str) -> Option<String> {
    let body = get(http, base, "/version").await.ok()?;
    serde_json::from_slice::<VersionAnswer>(&body)
        .ok()
        .and_then(|v| v.cluster)
        .filter(|v| !v.is_empty() && v != "not_decided")
}

/// Asks one peer URL for the members and the cluster version.
pub async fn ask(peer_url: &str, timeout: Duration) -> Result<PeerAnswer, PeerError> {
    let e = |message: String| PeerError {
        peer_url: peer_url.to_string(),
        message,
    };
    let http = http_client(timeout).map_err(|x| e(x.to_string()))?;
    let body = get(&http, peer_url, "/members")
        .await
        .map_err(|x| e(x.to_string()))?;
    let members: Vec<PeerMember> =
        serde_json::from_slice(&body).map_err(|x| e(format!("GET /members: {x}")))?;
    Ok(PeerAnswer {
        peer_url: peer_url.to_string(),
        members,
        cluster_version: cluster_version(&http, peer_url).await,
    })
}

/// Asks the members' client URLs instead (`ETCD_CLUSTER_ENDPOINTS`: peers behind mTLS, whose
/// peer URLs need certificates): `member list` over the v3 API, the cluster version from the
/// client port's `/version`.
pub async fn ask_clients(
    client_urls: &[String],
    timeout: Duration,
) -> Result<PeerAnswer, PeerError> {
    let asked = client_urls.join(",");
    let e = |message: String| PeerError {
        peer_url: asked.clone(),
        message,
    };
    let mut v3 = super::v3::V3::connect_any(client_urls, timeout)
        .await
        .map_err(|x| e(x.to_string()))?;
    let members = v3
        .member_list()
        .await
        .map_err(|x| e(x.to_string()))?
        .into_iter()
        .map(|m| PeerMember {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: m.client_urls,
        })
        .collect();
    let http = http_client(timeout).map_err(|x| e(x.to_string()))?;
    let mut version = None;
    for url in client_urls {
        version = cluster_version(&http, url).await;
        if version.is_some() {
            break;
        }
    }
    Ok(PeerAnswer {
        peer_url: asked,
        members,
        cluster_version: version,
    })
}

/// Asks every peer URL, concurrently.
pub async fn ask_all(
    peer_urls: &[String],
    timeout: Duration,
) -> Vec<Result<PeerAnswer, PeerError>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, url) in peer_urls.iter().enumerate() {
        let url = url.clone();
        tasks.spawn(async move { (i, ask(&url, timeout).await) });
    }
    let mut answers: Vec<Option<Result<PeerAnswer, PeerError>>> = vec![None; peer_urls.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, a)) = joined {
            answers[i] = Some(a);
        }
    }
    answers
        .into_iter()
        .zip(peer_urls)
        .map(|(a, url)| {
            a.unwrap_or_else(|| {
                Err(PeerError {
                    peer_url: url.clone(),
                    message: "the request's task ended".into(),
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_as_etcd_3_4_prints_them() {
        let body = r#"[{"id":13668033151171901709,"peerURLs":["http://127.0.0.1:23801"],"name":"a","clientURLs":["http://127.0.0.1:23791"]},{"id":7,"peerURLs":["http://127.0.0.1:23802"]}]"#;
        let m: Vec<PeerMember> = serde_json::from_str(body).unwrap();
        assert_eq!(m[0].id, 13668033151171901709);
        assert!(m[0].started());
        assert_eq!(m[1].name, "");
        assert!(!m[1].started(), "added, never started");
    }

    #[tokio::test]
    async fn a_peer_that_is_not_there_is_an_error_naming_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        drop(l);
        let got = ask_all(std::slice::from_ref(&url), Duration::from_millis(300)).await;
        let e = got[0].clone().unwrap_err();
        assert_eq!(e.peer_url, url);
    }
}
