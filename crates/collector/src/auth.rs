//! API keys: loaded from a file (one per line), checked in constant time, reloadable.
//!
//! **Why the check leaks nothing through timing.** The presented token is hashed with SipHash
//! under two secret per-process random keys into a 128-bit digest, and that digest is compared
//! with every configured key's digest using `subtle`'s constant-time equality, folding the
//! results without branching and without stopping early. The time taken depends only on the
//! token's length (which its sender knows) and on the number of configured keys, never on which
//! key matched or on how many leading bytes did. A digest match is then confirmed against the key
//! itself, also in constant time. Keys are never logged.

use parking_lot::RwLock;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// A key's 128-bit digest: also its identity for rate limiting (stable across reloads).
pub type KeyId = [u8; 16];

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("cannot read the API keys file {path}: {source}; pass --api-keys FILE with one key per line")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has no key.
    #[error("the API keys file {0} has no key; write one key per line (blank lines and # comments are skipped)")]
    Empty(PathBuf),
}

struct KeySet {
    digests: Vec<KeyId>,
    keys: Vec<Box<[u8]>>,
}

/// The accepted API keys.
pub struct ApiKeys {
    k1: RandomState,
    k2: RandomState,
    set: RwLock<Arc<KeySet>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys themselves.
        f.debug_struct("ApiKeys")
            .field("count", &self.len())
            .field("path", &self.path)
            .finish()
    }
}

/// The keys in a file's text: one per line, trimmed; blank lines and `#` comments skipped.
pub fn parse_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

impl ApiKeys {
    /// These keys (tests, embedding).
    pub fn from_keys<I, S>(keys: I) -> ApiKeys
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut k = ApiKeys {
            k1: RandomState::new(),
            k2: RandomState::new(),
            set: RwLock::new(Arc::new(KeySet {
                digests: Vec::new(),
                keys: Vec::new(),
            })),
            path: None,
        };
        let list: Vec<String> = keys.into_iter().map(|s| s.as_ref().to_owned()).collect();
        k.replace(list);
        k.path = None;
        k
    }

    /// The keys in `path` (see [`parse_keys`]); an empty file is an error.
    pub fn load(path: &Path) -> Result<ApiKeys, KeysError> {
        let mut k = ApiKeys::from_keys(read_keys(path)?);
        k.path = Some(path.to_owned());
        Ok(k)
    }

    /// Re-reads the file it was loaded from; on error the current keys stay. Returns the count.
    pub fn reload(&self) -> Result<usize, KeysError> {
        let Some(path) = &self.path else {
            return Ok(self.len());
        };
        let keys = read_keys(path)?;
        Ok(self.replace(keys))
    }

    fn replace(&self, keys: Vec<String>) -> usize {
        let digests = keys.iter().map(|k| self.digest(k.as_bytes())).collect();
        let keys: Vec<Box<[u8]>> = keys
            .into_iter()
            .map(|k| k.into_bytes().into_boxed_slice())
            .collect();
        let n = keys.len();
        *self.set.write() = Arc::new(KeySet { digests, keys });
        n
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.set.read().keys.len()
    }

    /// No key at all (every request is refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn digest(&self, token: &[u8]) -> KeyId {
        let a = self.k1.hash_one(token).to_le_bytes();
        let b = self.k2.hash_one(token).to_le_bytes();
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&a);
        d[8..].copy_from_slice(&b);
        d
    }

    /// The matching key's id, if `token` is one of the keys. Constant time (see the module docs).
    pub fn check(&self, token: &[u8]) -> Option<KeyId> {
        let set = Arc::clone(&self.set.read());
        let d = self.digest(token);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, kd) in set.digests.iter().enumerate() {
            let eq = kd.ct_eq(&d);
            index = u64::conditional_select(&index, &(i as u64), eq);
            found |= eq;
        }
        if !bool::from(found) {
            return None;
        }
        let key = set.keys.get(index as usize)?;
        bool::from(key.as_ref().ct_eq(token)).then_some(d)
    }
}

fn read_keys(path: &Path) -> Result<Vec<String>, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.to_owned(),
        source,
    })?;
    let keys = parse_keys(&text);
    if keys.is_empty() {
        return Err(KeysError::Empty(path.to_owned()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_pass() {
        let k = ApiKeys::from_keys(["alpha", "beta-key", "g"]);
        assert!(k.check(b"alpha").is_some());
        assert!(k.check(b"beta-key").is_some());
        assert!(k.check(b"g").is_some());
        for bad in [&b""[..], b"alph", b"alphaa", b"beta", b"ALPHA", b"x"] {
            assert!(k.check(bad).is_none(), "{bad:?}");
        }
        assert_ne!(k.check(b"alpha"), k.check(b"g"));
        assert!(ApiKeys::from_keys(Vec::<String>::new())
            .check(b"")
            .is_none());
    }

    #[test]
    fn files_reload_and_ids_stay_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# comment\n\n  one  \ntwo\n").unwrap();
        let k = ApiKeys::load(&path).unwrap();
        assert_eq!(k.len(), 2);
        let id = k.check(b"one").unwrap();
        std::fs::write(&path, "two\nthree\none\n").unwrap();
        assert_eq!(k.reload().unwrap(), 3);
        assert_eq!(k.check(b"one"), Some(id));
        assert!(k.check(b"three").is_some());
        std::fs::write(&path, "\n# none\n").unwrap();
        assert!(k.reload().is_err());
        assert_eq!(k.len(), 3, "a bad reload keeps the old keys");
        let err = ApiKeys::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("--api-keys"));
        assert!(!format!("{k:?}").contains("one"));
    }
}
