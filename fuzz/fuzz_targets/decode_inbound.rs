//! Fuzzes what a decode's listener receives from SGLang 0.5.20–0.5.23 prefills (`KV_STATUS`,
//! `ABORT_ACK`, `CHUNK_READY`, `STAGING_REQ`) and the packed integer lists: arbitrary frame
//! sets must decode or fail, never panic, and whatever decodes must re-encode identically.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixl_wire::v2x::DecodeInbound;

const TAGS: [&[u8]; 4] = [b"KV_STATUS", b"ABORT_ACK", b"CHUNK_READY", b"STAGING_REQ"];

fuzz_target!(|data: &[u8]| {
    // Frames are separated by the byte 0xFE; a first byte below 4 picks a tag as frame 0 (so
    // the fuzzer reaches past the tag check quickly).
    let mut frames: Vec<Bytes> = Vec::new();
    let body = match data.split_first() {
        Some((&t, rest)) if (t as usize) < TAGS.len() => {
            frames.push(Bytes::from_static(TAGS[t as usize]));
            rest
        }
        _ => data,
    };
    frames.extend(body.split(|&b| b == 0xFE).map(Bytes::copy_from_slice));
    if let Ok(m) = DecodeInbound::decode(&frames) {
        assert_eq!(m.encode(), frames);
    }
    if let Ok(lists) = nixl_wire::unpack_int_lists::<u32>(data) {
        assert_eq!(nixl_wire::pack_int_lists(&lists), data);
    }
});
