//! Fuzzes the check a prefill runs on a decode's NIXL metadata before NIXL or UCX sees it
//! (`nixl_core::inspect_metadata`): any bytes must be accepted or refused, never panic, and an
//! accepted blob's agent name must be what the blob's first entry holds, as NIXL will read it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = nixl_core::inspect_metadata(data) {
        let name = summary.agent.as_bytes();
        let at = b"nixlSerDes|Agent".len() + 8;
        assert_eq!(&data[at..at + name.len()], name);
        assert!(!summary.backends.is_empty());
    }
});
