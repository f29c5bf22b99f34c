//! Agent metadata: the opaque blob peers exchange to reach each other.

/// An agent's serialized metadata (name, backend connection info, registered regions and their
/// remote keys), as produced by NIXL. Opaque: pass it to the peer's [`crate::Agent::load_remote`].
#[derive(Clone, PartialEq, Eq)]
pub struct AgentMetadata(Vec<u8>);

impl AgentMetadata {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl From<Vec<u8>> for AgentMetadata {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl AsRef<[u8]> for AgentMetadata {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for AgentMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentMetadata({} bytes)", self.0.len())
    }
}

/// What [`inspect`] read out of a peer's metadata blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataSummary {
    /// The agent name the blob carries (valid UTF-8, no control characters).
    pub agent: String,
    /// The backends the peer offers connection information for, in blob order.
    pub backends: Vec<String>,
    /// Memory descriptors in the blob's memory section, all backends together.
    pub descriptors: usize,
}

/// Most connections (backends) one blob may carry.
const MAX_CONNS: u64 = 16;
/// Most memory sections (one per backend and memory type) one blob may carry.
const MAX_SECTIONS: u64 = 64;
/// Longest agent or backend name accepted.
const MAX_NAME: usize = 255;
/// NIXL's memory types are DRAM, VRAM, BLK, OBJ and FILE (0..=4).
const MAX_MEM_TYPE: u32 = 4;
/// A serialized descriptor starts with address, length and device id (3 × u64).
const BASIC_DESC: usize = 24;
/// UCX's memory types run to `UCS_MEMORY_TYPE_LAST` (10 in UCX 1.23); anything above it is not a
/// memory type any UCX release packs.
const UCS_MEMORY_TYPE_LAST: u8 = 10;
/// `UCS_SYS_DEVICE_ID_UNKNOWN`, which also terminates a packed distance list.
const SYS_DEVICE_UNKNOWN: u8 = 0xff;

/// Checks a peer's NIXL metadata blob before any byte of it reaches NIXL or UCX, and returns what
/// it carries.
///
/// NIXL and UCX trust the blob: UCX aborts the process on an unknown worker-address version
/// (`ucs_assertv_always`), unpacks remote keys without a length, and nixl-sys panics on an agent
/// name that is not UTF-8. So the blob is parsed here, completely and with every length checked
/// against what is left: NIXL's tag-length-value framing (`nixlSerDes|`, agent name, connection
/// count, one backend name and connection blob each, the memory section with its descriptor
/// lists), the UCX worker address's header (version V1 or V2, known flags, the fixed fields it
/// announces present) and every UCX remote key (MD map, memory type, one length-prefixed key per
/// MD bit, the system-device byte). Anything else, trailing bytes included, is refused with the
/// place and the reason. Cost: one pass over the blob (3.6 µs for a captured 3.5 KiB blob of 70
/// descriptors, release build on a 2-core machine).
pub fn inspect(blob: &[u8]) -> Result<MetadataSummary, crate::Error> {
    inspect_inner(blob).map_err(|reason| crate::Error::InvalidArgument {
        what: "agent metadata",
        reason,
    })
}

fn inspect_inner(blob: &[u8]) -> Result<MetadataSummary, String> {
    let mut r = Reader::new(blob)?;
    let agent = name(r.str_entry("Agent")?, "agent name")?;
    let conns = r.u64_entry("Conns")?;
    if conns == 0 || conns > MAX_CONNS {
        return Err(format!("{conns} connections (1 to {MAX_CONNS} accepted)"));
    }
    let mut backends = Vec::new();
    for _ in 0..conns {
        let backend = name(r.str_entry("t")?, "backend name")?;
        let info = r.str_entry("c")?;
        if info.is_empty() {
            return Err(format!("empty connection info for backend {backend}"));
        }
        if backend == "UCX" {
            ucx_worker_address(info)?;
        }
        backends.push(backend);
    }
    if r.str_entry("")? != b"MemSection" {
        return Err("no memory section where one belongs".into());
    }
    let sections = r.u64_entry("nixlSecElms")?;
    if sections > MAX_SECTIONS {
        return Err(format!(
            "{sections} memory sections (at most {MAX_SECTIONS} accepted)"
        ));
    }
    let mut descriptors = 0;
    for _ in 0..sections {
        let backend = name(r.str_entry("bknd")?, "section backend name")?;
        if r.str_entry("nixlDList")? != b"nixlSDList" {
            return Err(format!(
                "section of {backend}: not a list of descriptors with keys"
            ));
        }
        let mem = r.fixed_entry::<4>("t")?;
        let mem = u32::from_le_bytes(mem);
        if mem > MAX_MEM_TYPE {
            return Err(format!("section of {backend}: memory type {mem}"));
        }
        let n = r.u64_entry("n")?;
        if n == 0 {
            return Err(format!("section of {backend}: no descriptors"));
        }
        // Each descriptor takes at least its 9-byte entry header and 24 bytes: a count the rest
        // of the blob cannot hold is refused before looping over it.
        if n > (r.remaining() / (9 + BASIC_DESC)) as u64 {
            return Err(format!(
                "section of {backend}: {n} descriptors do not fit in {} bytes",
                r.remaining()
            ));
        }
        for i in 0..n {
            let desc = r.str_entry("")?;
            if desc.len() < BASIC_DESC {
                return Err(format!(
                    "section of {backend}: descriptor {i} is {} bytes",
                    desc.len()
                ));
            }
            if backend == "UCX" {
                ucx_rkey(&desc[BASIC_DESC..])
                    .map_err(|e| format!("section of {backend}: descriptor {i}: {e}"))?;
            }
        }
        descriptors += n as usize;
    }
    if r.remaining() != 0 {
        return Err(format!("{} bytes after the memory section", r.remaining()));
    }
    Ok(MetadataSummary {
        agent,
        backends,
        descriptors,
    })
}

/// A name NIXL will hand back through a C string and nixl-sys will read as UTF-8.
fn name(bytes: &[u8], what: &str) -> Result<String, String> {
    let s = std::str::from_utf8(bytes).map_err(|_| format!("{what} is not UTF-8"))?;
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(format!(
            "{what} of {} bytes (1 to {MAX_NAME} accepted)",
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} {s:?} has control characters"));
    }
    Ok(s.to_owned())
}

/// UCX's packed worker address: the header byte's low nibble is the version (V1 = 0, V2 = 1;
/// UCX aborts on any other), the flags say which fixed fields follow.
fn ucx_worker_address(addr: &[u8]) -> Result<(), String> {
    const FLAG_WORKER_UUID: u8 = 1 << 1;
    const FLAG_CLIENT_ID: u8 = 1 << 2;
    const KNOWN_FLAGS: u8 = 0x0f;
    let header = addr[0];
    let (flags, header_len) = match header & 0x0f {
        0 => (header >> 4, 1),
        1 => {
            let flags = *addr
                .get(1)
                .ok_or("UCX worker address: V2 header cut short")?;
            if flags & !KNOWN_FLAGS != 0 {
                return Err(format!(
                    "UCX worker address: unknown header flags {flags:#04x}"
                ));
            }
            (flags, 2)
        }
        v => {
            return Err(format!(
                "UCX worker address: version {v} (UCX knows 0 and 1)"
            ));
        }
    };
    let mut need = header_len + 1; // and at least the first device's MD index
    if flags & FLAG_WORKER_UUID != 0 || header & 0x0f == 0 {
        need += 8;
    }
    if flags & FLAG_CLIENT_ID != 0 {
        need += 8;
    }
    if addr.len() < need {
        return Err(format!(
            "UCX worker address of {} bytes, its header announces at least {need}",
            addr.len()
        ));
    }
    Ok(())
}

/// A UCX packed remote key: MD map (u64), memory type (u8), one length-prefixed key per bit of
/// the map, then (for a non-empty map) the system device, then for a known device the packed
/// distances up to the terminator. UCX reads all of this without a length.
fn ucx_rkey(key: &[u8]) -> Result<(), String> {
    let map: [u8; 8] = key
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("remote key of {} bytes", key.len()))?;
    let map = u64::from_le_bytes(map);
    let mem_type = *key.get(8).ok_or("remote key without a memory type")?;
    if mem_type >= UCS_MEMORY_TYPE_LAST {
        return Err(format!("remote key of memory type {mem_type}"));
    }
    let mut at = 9usize;
    for _ in 0..map.count_ones() {
        let len = *key.get(at).ok_or("remote key cut short in its MD keys")? as usize;
        at += 1 + len;
        if at > key.len() {
            return Err("remote key cut short in its MD keys".into());
        }
    }
    if map != 0 {
        let sys_dev = *key.get(at).ok_or("remote key without its system device")?;
        at += 1;
        // A known device (its top bit asks for a flush) is followed by packed distances (3 bytes
        // each: device, latency, bandwidth) up to the terminator.
        if sys_dev != SYS_DEVICE_UNKNOWN {
            loop {
                match key.get(at) {
                    None => return Err("remote key: distances not closed by the terminator".into()),
                    Some(&SYS_DEVICE_UNKNOWN) => {
                        at += 1;
                        break;
                    }
                    Some(_) => at += 3,
                }
            }
        }
    }
    if at != key.len() {
        return Err(format!(
            "remote key has {} bytes past its end",
            key.len() - at
        ));
    }
    Ok(())
}

/// NIXL's `nixlSerDes` framing: `nixlSerDes|`, then entries of tag, u64 length (native = little
/// endian on every platform NIXL ships), value and `|`.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(blob: &'a [u8]) -> Result<Self, String> {
        let rest = blob
            .strip_prefix(b"nixlSerDes|")
            .ok_or("not NIXL metadata (no nixlSerDes header)")?;
        Ok(Self { rest })
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn str_entry(&mut self, tag: &str) -> Result<&'a [u8], String> {
        let after_tag = self
            .rest
            .strip_prefix(tag.as_bytes())
            .ok_or_else(|| format!("entry {tag:?} missing"))?;
        let (len, after_len) = after_tag
            .split_first_chunk::<8>()
            .ok_or_else(|| format!("entry {tag:?} cut short"))?;
        let len = u64::from_le_bytes(*len);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l < after_len.len())
            .ok_or_else(|| {
                format!(
                    "entry {tag:?} claims {len} bytes, {} remain",
                    after_len.len()
                )
            })?;
        let (value, after_value) = after_len.split_at(len);
        let rest = after_value
            .strip_prefix(b"|")
            .ok_or_else(|| format!("entry {tag:?} not closed by '|'"))?;
        self.rest = rest;
        Ok(value)
    }

    fn fixed_entry<const N: usize>(&mut self, tag: &str) -> Result<[u8; N], String> {
        let v = self.str_entry(tag)?;
        v.try_into()
            .map_err(|_| format!("entry {tag:?} of {} bytes, {N} expected", v.len()))
    }

    fn u64_entry(&mut self, tag: &str) -> Result<u64, String> {
        self.fixed_entry::<8>(tag).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata of a NIXL 1.5.1 agent with the UCX backend and 70 host regions, as a decode sent
    /// it in a registration (captured between SGLang 0.5.1.post3's own classes).
    const CAPTURED: &[u8] = include_bytes!("../tests/data/ucx_host_metadata.bin");

    /// Offset of the UCX worker address (the value of the first `c` entry).
    fn worker_address_at(blob: &[u8]) -> usize {
        let mut at = b"nixlSerDes|Agent".len();
        let name_len = u64::from_le_bytes(blob[at..at + 8].try_into().unwrap()) as usize;
        at += 8 + name_len + 1;
        at += b"Conns".len() + 8 + 8 + 1;
        at += b"t".len() + 8 + 3 + 1;
        at + b"c".len() + 8
    }

    fn refused(blob: &[u8]) -> String {
        match inspect(blob) {
            Err(crate::Error::InvalidArgument { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn captured_metadata_is_read_whole() {
        let s = inspect(CAPTURED).unwrap();
        assert_eq!(s.agent, "c218bba5-06de-41cd-82e8-2f8404efccb0");
        assert_eq!(s.backends, ["UCX"]);
        assert_eq!(s.descriptors, 70);
    }

    #[test]
    fn a_worker_address_version_ucx_would_abort_on_is_refused() {
        let at = worker_address_at(CAPTURED);
        assert_eq!(CAPTURED[at] & 0x0f, 0, "the capture is a V1 address");
        for version in 2..16u8 {
            let mut blob = CAPTURED.to_vec();
            blob[at] = (blob[at] & 0xf0) | version;
            let reason = refused(&blob);
            assert!(reason.contains(&format!("version {version}")), "{reason}");
        }
    }

    #[test]
    fn an_agent_name_that_is_not_utf8_is_refused() {
        let mut blob = CAPTURED.to_vec();
        let at = b"nixlSerDes|Agent".len() + 8;
        blob[at + 3] = 0xff;
        assert!(refused(&blob).contains("not UTF-8"));
        blob[at + 3] = 0;
        assert!(refused(&blob).contains("control characters"));
    }

    #[test]
    fn every_truncation_is_refused() {
        for len in 0..CAPTURED.len() {
            assert!(inspect(&CAPTURED[..len]).is_err(), "cut at {len} accepted");
        }
        let mut longer = CAPTURED.to_vec();
        longer.push(b'|');
        assert!(refused(&longer).contains("after the memory section"));
    }

    #[test]
    fn counts_larger_than_the_blob_are_refused_before_any_loop() {
        // The descriptor count of the first section: `n` entry right after the memory type.
        let n_at = CAPTURED
            .windows(10)
            .position(|w| w == b"|n\x08\x00\x00\x00\x00\x00\x00\x00")
            .unwrap()
            + 10;
        let mut blob = CAPTURED.to_vec();
        blob[n_at..n_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(refused(&blob).contains("do not fit"));
    }

    #[test]
    fn remote_keys_are_walked_to_their_end() {
        // md_map 1, host, one empty MD key, unknown system device.
        assert!(ucx_rkey(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff]).is_ok());
        // A map of two MDs with only one key present.
        assert!(ucx_rkey(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff]).is_err());
        // A key length past the end.
        assert!(ucx_rkey(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0xff]).is_err());
        // A known device with one distance and the terminator; then without the terminator.
        assert!(ucx_rkey(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3, 4, 5, 6, 0xff]).is_ok());
        assert!(ucx_rkey(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3, 4, 5, 6]).is_err());
        // A memory type no UCX release packs.
        assert!(ucx_rkey(&[1, 0, 0, 0, 0, 0, 0, 0, 200, 0, 0xff]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn mutated_metadata_never_panics(at in 0..CAPTURED.len(), byte: u8, cut in 0..CAPTURED.len() + 1) {
            let mut blob = CAPTURED.to_vec();
            blob[at] = byte;
            blob.truncate(cut);
            let _ = inspect(&blob);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let mut blob = b"nixlSerDes|".to_vec();
            blob.extend_from_slice(&bytes);
            let _ = inspect(&bytes);
            let _ = inspect(&blob);
        }
    }
}
