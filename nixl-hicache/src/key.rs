//! Page keys: SGLang's SHA-256 chain, the optional model/rank suffix, and key validation
//! (docs/protocol.md §9.1–§9.2).

use sha2::{Digest, Sha256};

/// The key of one page: SHA-256 over the previous page's key bytes (if any) and each token id as
/// 4-byte little-endian, as lowercase hex. Exactly SGLang's `get_hash_str`.
///
/// A `prior` that is not valid hex is hashed as given, never panicking; SGLang would raise.
pub fn page_key(tokens: &[u32], prior: Option<&str>) -> String {
    let mut h = Sha256::new();
    if let Some(p) = prior {
        match decode_hex(p) {
            Some(bytes) => h.update(bytes),
            None => h.update(p.as_bytes()),
        }
    }
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// The key chain over the full pages of `tokens` (`page_size` tokens each), starting from
/// `prior`. A partial last page is not hashed. A zero page size gives no keys.
pub fn page_keys(tokens: &[u32], page_size: usize, prior: Option<&str>) -> Vec<String> {
    if page_size == 0 {
        return Vec::new();
    }
    let mut keys: Vec<String> = Vec::with_capacity(tokens.len() / page_size);
    for page in tokens.chunks_exact(page_size) {
        let k = page_key(page, keys.last().map(String::as_str).or(prior));
        keys.push(k);
    }
    keys
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Python: f"{int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), 'big') & 0xff:02x}"
    #[test]
    fn buckets_match_python_blake2b() {
        assert_eq!(
            bucket_of(&format!("{}_org-My-Model_0_1_k", "a".repeat(64))),
            "61"
        );
        assert_eq!(bucket_of("x"), "4f");
        assert_eq!(bucket_of(""), "b4");
    }

    // Vectors computed with Python's hashlib, as SGLang's get_hash_str does:
    //   h = sha256(); [h.update(t.to_bytes(4, "little")) for t in tokens]; h.hexdigest()
    //   (with h.update(bytes.fromhex(prior)) first when chained).
    #[test]
    fn matches_python_hashlib_constants() {
        // SHA-256 of nothing (no prior, no tokens).
        assert_eq!(
            page_key(&[], None),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // python3 -c "import hashlib; h=hashlib.sha256(); [h.update(t.to_bytes(4,'little')) for t in [1,2,3]]; print(h.hexdigest())"
        let k1 = page_key(&[1, 2, 3], None);
        assert_eq!(
            k1,
            "4636993d3e1da4e9d6b8f87b79e8f7c6d018580d52661950eabc3845c5897a4d"
        );
        // The same, chained: h.update(bytes.fromhex(k1)) first, then tokens 0xffffffff and 0.
        assert_eq!(
            page_key(&[u32::MAX, 0], Some(&k1)),
            "82ef56b592180f623ae395d0280fb57de9a3a575fc5569d204c73351ea4fd627"
        );
    }

    fn python_sha(tokens: &[u32], prior: Option<&str>) -> String {
        let mut script = String::from("import hashlib,sys;h=hashlib.sha256()\n");
        if let Some(p) = prior {
            script.push_str(&format!("h.update(bytes.fromhex('{p}'))\n"));
        }
        script.push_str(&format!(
            "for t in {tokens:?}: h.update(t.to_bytes(4,'little'))\nprint(h.hexdigest())"
        ));
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn chain_matches_python_page_by_page() {
        let tokens: Vec<u32> = (0..40).map(|i| i * 7919 + 3).collect();
        let keys = page_keys(&tokens, 16, None);
        assert_eq!(keys.len(), 2, "the partial third page is not hashed");
        assert_eq!(keys[0], python_sha(&tokens[..16], None));
        assert_eq!(keys[1], python_sha(&tokens[16..32], Some(&keys[0])));
        let from_prior = page_keys(&tokens[..16], 16, Some(&keys[0]));
        assert_eq!(from_prior[0], python_sha(&tokens[..16], Some(&keys[0])));
        assert!(page_keys(&tokens, 0, None).is_empty());
    }
}

/// The suffix later SGLang versions (#10969) append to storage names so that TP ranks and models
/// do not share files: `_{model}_{tp_rank}_{tp_size}` for MHA, `_{model}` for MLA (whose KV is
/// replicated across ranks). The seed appends nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeySuffix {
    /// Per-rank files for MHA models.
    Mha {
        /// The model name.
        model: String,
        /// This rank.
        tp_rank: u32,
        /// The TP size.
        tp_size: u32,
    },
    /// One file per page for MLA models.
    Mla {
        /// The model name.
        model: String,
    },
}

impl KeySuffix {
    /// The suffix text.
    pub fn render(&self) -> String {
        match self {
            Self::Mha {
                model,
                tp_rank,
                tp_size,
            } => format!("_{model}_{tp_rank}_{tp_size}"),
            Self::Mla { model } => format!("_{model}"),
        }
    }
}

/// Where a page's file lies under the storage directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Naming {
    /// `<dir>/<name>`: SGLang 0.5.1's HiCacheNixl.
    #[default]
    Flat,
    /// `<dir>/<bucket>/<name>`, the bucket being the low byte, as two lowercase hex digits, of
    /// the big-endian BLAKE2b-64 digest of the name ([`bucket_of`]): SGLang 0.5.23's
    /// HiCacheNixl (one storage directory).
    Bucketed,
}

/// Which part of a page an object holds. SGLang 0.5.23's zero-copy layouts store a page as
/// objects per KV buffer (`<key><suffix>_k` and, for MHA, `_v`); every other layout as one
/// object (`<key><suffix>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PagePart {
    /// The whole page: no part suffix.
    Whole,
    /// The K buffer's bytes (MHA) or the latent buffer's (MLA): `_k`.
    K,
    /// The V buffer's bytes (MHA): `_v`.
    V,
}

impl PagePart {
    /// The part's suffix of the storage name.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Whole => "",
            Self::K => "_k",
            Self::V => "_v",
        }
    }
}

/// The bucket directory of a storage name under [`Naming::Bucketed`]: the last byte of the
/// name's BLAKE2b digest of 8 bytes (Python's `blake2b(name, digest_size=8)`), in hex.
pub fn bucket_of(name: &str) -> String {
    use blake2::Digest;
    use blake2::digest::consts::U8;
    let digest = blake2::Blake2b::<U8>::digest(name.as_bytes());
    format!("{:02x}", digest[7])
}

/// The longest storage name (key plus suffix) in bytes: S3's limit on object keys, and well
/// inside Linux's `PATH_MAX` with the directory in front.
pub const MAX_KEY_LEN: usize = 1024;
/// The longest `/`-separated component of a storage name in bytes: a directory entry's limit
/// (`NAME_MAX`) on Linux file systems. A 64-hex key leaves 191 bytes for the suffix.
pub const MAX_KEY_COMPONENT_LEN: usize = 255;

/// Why a storage name (key plus suffix) was refused.
pub(crate) fn validate(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_KEY_LEN {
        return Err("longer than 1024 bytes with its suffix (MAX_KEY_LEN)");
    }
    if name.starts_with('/') {
        return Err("absolute path");
    }
    if name.contains('\0') {
        return Err("contains NUL");
    }
    for part in name.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err("empty, `.` or `..` path component");
        }
        if part.len() > MAX_KEY_COMPONENT_LEN {
            return Err(
                "a `/`-separated component is longer than 255 bytes with the suffix (MAX_KEY_COMPONENT_LEN)",
            );
        }
        if part.starts_with(".tmp.") || part.starts_with(".tmp-") {
            return Err("reserved `.tmp.`/`.tmp-` prefix (temp files)");
        }
    }
    Ok(())
}
