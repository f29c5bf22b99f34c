//! Pages as S3 objects through the NIXL OBJ plugin (docs/protocol.md §9.4).
//!
//! The plugin names an object by its registration's device id (the S3 key is the id in
//! decimal); nixl-sys cannot pass the key string SGLang intended. So each page is stored under
//! `id(name)`, the first 8 bytes (little-endian) of SHA-256 of the storage name, and the name
//! itself is stored next to it as the object `id(name + "\0key")`. Reads fetch both and treat a
//! key object that does not hold the expected name as a miss, so an id collision, or a key
//! deleted by overwriting its key object, can never return another key's page.

use std::collections::HashSet;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Marker written over a key object by `delete`.
pub(crate) const TOMBSTONE: u8 = 0;

/// The object side of the connector.
#[derive(Default)]
pub(crate) struct ObjectStore {
    written: Mutex<HashSet<String>>,
}

impl ObjectStore {
    /// The page object's id.
    pub(crate) fn page_id(name: &str) -> u64 {
        id_of(name.as_bytes())
    }

    /// The key object's id.
    pub(crate) fn key_id(name: &str) -> u64 {
        let mut v = name.as_bytes().to_vec();
        v.extend_from_slice(b"\0key");
        id_of(&v)
    }

    pub(crate) fn remember(&self, name: &str) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
    }

    pub(crate) fn forget(&self, name: &str) -> bool {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// Names this instance wrote (and has not deleted).
    pub(crate) fn written(&self) -> Vec<String> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

fn id_of(bytes: &[u8]) -> u64 {
    let d = Sha256::digest(bytes);
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let k = "4636993d3e1da4e9d6b8f87b79e8f7c6d018580d52661950eabc3845c5897a4d";
        assert_eq!(ObjectStore::page_id(k), ObjectStore::page_id(k));
        assert_ne!(ObjectStore::page_id(k), ObjectStore::key_id(k));
        assert_ne!(ObjectStore::page_id(k), ObjectStore::page_id(&k[1..]));
    }
}
