//! A summary of a store's keys that two steps can compare: counts and digests.

use serde::{Deserialize, Serialize};

/// Keys whose name starts with this are ours (health probes), never the user's.
pub const PROBE_PREFIX: &str = "/etcd-migrate-probe";

/// What a store held at the end of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Every key (v2: leaf keys; directories do not count).
    pub keys: u64,
    /// Keys without a TTL (v2) or lease (v3).
    pub permanent: u64,
    /// Digest over (key, value) of every key.
    pub content: String,
    /// Digest over (key, value, create revision, mod revision) of permanent keys.
    pub permanent_digest: String,
}

impl Fingerprint {
    /// Keys with a TTL or lease: they may expire between steps.
    pub fn expiring(&self) -> u64 {
        self.keys - self.permanent
    }
}

/// Builds a fingerprint from keys fed in any order: each digest is the sum, modulo 2^128, of
/// a 128-bit hash (XXH3) per key, so a v2 store walked in tree order and a v3 store read in key
/// order compare, and nothing has to be sorted or held.
#[derive(Default)]
pub struct FingerprintBuilder {
    keys: u64,
    permanent: u64,
    content: u128,
    permanent_digest: u128,
}

impl FingerprintBuilder {
    /// Adds one key; probe keys are skipped.
    pub fn add(&mut self, key: &[u8], value: &[u8], create: i64, modified: i64, expiring: bool) {
        use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64};
        if key.starts_with(PROBE_PREFIX.as_bytes()) {
            return;
        }
        self.keys += 1;
        let seed = xxh3_64(key);
        self.content = self.content.wrapping_add(xxh3_128_with_seed(value, seed));
        if !expiring {
            self.permanent += 1;
            let revs = [create.to_le_bytes(), modified.to_le_bytes()].concat();
            let h = xxh3_128_with_seed(value, seed ^ xxh3_64(&revs));
            self.permanent_digest = self.permanent_digest.wrapping_add(h);
        }
    }

    pub fn finish(self) -> Fingerprint {
        Fingerprint {
            keys: self.keys,
            permanent: self.permanent,
            content: format!("{:032x}", self.content),
            permanent_digest: format!("{:032x}", self.permanent_digest),
        }
    }
}

/// How the store after a step compares with the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Same,
    /// Only keys with a TTL or lease went away (they expired, as etcd does).
    Expired {
        gone: u64,
    },
    Differs(String),
}

/// Compares two fingerprints of the same storage.
pub fn compare(before: &Fingerprint, after: &Fingerprint) -> Comparison {
    if before == after {
        return Comparison::Same;
    }
    if before.permanent != after.permanent || before.permanent_digest != after.permanent_digest {
        return Comparison::Differs(format!(
            "keys without TTL: {} before, {} after (digest {} vs {})",
            before.permanent,
            after.permanent,
            &before.permanent_digest[..12],
            &after.permanent_digest[..12]
        ));
    }
    if after.expiring() < before.expiring() {
        return Comparison::Expired {
            gone: before.expiring() - after.expiring(),
        };
    }
    Comparison::Differs(format!(
        "keys with TTL: {} before, {} after, contents differ",
        before.expiring(),
        after.expiring()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(keys: &[(&str, &str, bool)]) -> Fingerprint {
        let mut b = FingerprintBuilder::default();
        for (i, (k, v, e)) in keys.iter().enumerate() {
            b.add(k.as_bytes(), v.as_bytes(), i as i64 + 1, i as i64 + 1, *e);
        }
        b.finish()
    }

    #[test]
    fn probe_keys_do_not_count() {
        let a = fp(&[("/a", "1", false)]);
        let b = fp(&[("/a", "1", false), ("/etcd-migrate-probe-m1", "x", false)]);
        assert_eq!(a, b);
    }

    #[test]
    fn order_does_not_matter_but_every_part_of_a_key_does() {
        let a = fp(&[("/a", "1", false), ("/b", "2", true)]);
        let mut b = FingerprintBuilder::default();
        b.add(b"/b", b"2", 2, 2, true);
        b.add(b"/a", b"1", 1, 1, false);
        assert_eq!(a, b.finish(), "the same keys in another order");
        let mut c = FingerprintBuilder::default();
        c.add(b"/b", b"2", 2, 2, true);
        c.add(b"/a", b"1", 1, 9, false);
        assert_ne!(
            a.permanent_digest,
            c.finish().permanent_digest,
            "a revision differs"
        );
        let swapped = fp(&[("/a", "2", false), ("/b", "1", true)]);
        assert_ne!(a.content, swapped.content, "values moved between keys");
    }

    #[test]
    fn comparison_tells_expiry_from_loss() {
        let before = fp(&[("/a", "1", false), ("/e1", "x", true), ("/e2", "y", true)]);
        let expired = fp(&[("/a", "1", false), ("/e1", "x", true)]);
        assert_eq!(compare(&before, &expired), Comparison::Expired { gone: 1 });
        let lost = fp(&[("/e1", "x", true), ("/e2", "y", true)]);
        assert!(matches!(compare(&before, &lost), Comparison::Differs(_)));
        let changed = fp(&[("/a", "2", false), ("/e1", "x", true), ("/e2", "y", true)]);
        assert!(matches!(compare(&before, &changed), Comparison::Differs(_)));
        assert_eq!(compare(&before, &before.clone()), Comparison::Same);
    }
}
