//! PLACEHOLDER until the WAL reader lands: reports one member and no boot version.
use std::path::Path;

pub struct MemberSummary {
    pub members: Vec<u64>,
    pub boot_cluster_version: Option<String>,
}

pub fn summarize(_member: &Path) -> Result<MemberSummary, std::io::Error> {
    Ok(MemberSummary { members: vec![1], boot_cluster_version: None })
}
