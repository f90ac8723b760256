//! Value types: etcd release versions, storage kinds, and the content of version.txt.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// An etcd release, `X.Y.Z`, parsed strictly (no `v`, no pre-release, no leading zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EtcdVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// A minor release line, e.g. `3.4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Minor {
    pub major: u32,
    pub minor: u32,
}

/// How the data is stored: the v2 store (WAL + v2 snapshots) or the v3 backend (bbolt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    Etcd2,
    Etcd3,
}

/// What version.txt says: the version that last wrote the data and its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionFile {
    pub version: EtcdVersion,
    pub storage: Storage,
}

/// Why a version, storage or version.txt text was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("'{0}' is not a version: expected X.Y.Z, e.g. 3.5.1 (no 'v', no pre-release)")]
    Version(String),
    #[error("'{0}' is not a storage: expected etcd2 or etcd3")]
    Storage(String),
    #[error("'{0}' is not <X.Y.Z>/<etcd2|etcd3>, e.g. 3.0.17/etcd3")]
    VersionFile(String),
}

impl EtcdVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        EtcdVersion {
            major,
            minor,
            patch,
        }
    }

    /// The minor release line this version belongs to.
    pub const fn minor_line(self) -> Minor {
        Minor {
            major: self.major,
            minor: self.minor,
        }
    }
}

impl Minor {
    pub const fn new(major: u32, minor: u32) -> Self {
        Minor { major, minor }
    }
}

fn parse_component(s: &str) -> Option<u32> {
    let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = s.len() > 1 && s.starts_with('0');
    if !digits_only || leading_zero {
        return None;
    }
    s.parse().ok()
}

impl FromStr for EtcdVersion {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Version(s.to_string());
        let mut parts = s.split('.');
        let (Some(a), Some(b), Some(c), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        match (parse_component(a), parse_component(b), parse_component(c)) {
            (Some(major), Some(minor), Some(patch)) => Ok(EtcdVersion {
                major,
                minor,
                patch,
            }),
            _ => Err(err()),
        }
    }
}

impl FromStr for Storage {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "etcd2" => Ok(Storage::Etcd2),
            "etcd3" => Ok(Storage::Etcd3),
            _ => Err(ParseError::Storage(s.to_string())),
        }
    }
}

impl FromStr for VersionFile {
    type Err = ParseError;
    /// Strict: exactly `<X.Y.Z>/<etcd2|etcd3>` with at most one trailing newline.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.strip_suffix('\n').unwrap_or(s);
        let err = || ParseError::VersionFile(s.to_string());
        let (v, st) = body.split_once('/').ok_or_else(err)?;
        let version = v.parse().map_err(|_| err())?;
        let storage = st.parse().map_err(|_| err())?;
        Ok(VersionFile { version, storage })
    }
}

impl fmt::Display for EtcdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl fmt::Display for Minor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Storage::Etcd2 => "etcd2",
            Storage::Etcd3 => "etcd3",
        })
    }
}

impl fmt::Display for VersionFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.version, self.storage)
    }
}

impl serde::Serialize for EtcdVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl serde::Serialize for VersionFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parse_accepts_only_plain_triples() {
        let good = [
            ("3.5.1", (3, 5, 1)),
            ("2.2.1", (2, 2, 1)),
            ("3.0.17", (3, 0, 17)),
            ("10.0.0", (10, 0, 0)),
        ];
        for (s, (a, b, c)) in good {
            assert_eq!(
                s.parse::<EtcdVersion>(),
                Ok(EtcdVersion::new(a, b, c)),
                "{s}"
            );
        }
        let bad = [
            "",
            "3",
            "3.5",
            "v3.5.1",
            "3.5.1.2",
            "3.5.1-rc.0",
            "3.5.1+meta",
            "abc",
            " 3.5.1",
            "3.5.1 ",
            "03.5.1",
            "3.05.1",
            "3..1",
            "3.5.",
            "-3.5.1",
            "3.5.99999999999",
        ];
        for s in bad {
            assert!(s.parse::<EtcdVersion>().is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn version_file_parse_is_strict_and_round_trips() {
        let vf: VersionFile = "3.0.17/etcd3\n".parse().unwrap();
        assert_eq!(vf.version, EtcdVersion::new(3, 0, 17));
        assert_eq!(vf.storage, Storage::Etcd3);
        assert_eq!(vf.to_string(), "3.0.17/etcd3");
        assert_eq!(
            "2.2.1/etcd2".parse::<VersionFile>().unwrap().to_string(),
            "2.2.1/etcd2"
        );
        for bad in [
            "",
            "\n",
            "3.4.23/etcd5",
            "3.4.23",
            "3.4.23/",
            "/etcd3",
            "3.4.23/etcd3\n\n",
            "3.4.23/etcd3 ",
            "garbage",
        ] {
            let e = bad.parse::<VersionFile>().unwrap_err();
            assert_eq!(e, ParseError::VersionFile(bad.to_string()), "{bad:?}");
        }
    }

    #[test]
    fn versions_order_numerically() {
        let a: EtcdVersion = "3.10.0".parse().unwrap();
        let b: EtcdVersion = "3.9.20".parse().unwrap();
        assert!(a > b);
        assert!(EtcdVersion::new(2, 3, 7) < EtcdVersion::new(3, 0, 0));
    }
}
