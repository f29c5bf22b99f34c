//! Fuzzes the prefill-bound dispatch (every profile's registration and TransferInfo, `ABORT`,
//! `STAGING_RSP`, `WATERMARK`, ours) and the notification decoder: arbitrary frame sets and
//! payloads must decode or fail, never panic, and whatever decodes must re-encode identically.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixl_wire::{Notification, PrefillInbound};

fuzz_target!(|data: &[u8]| {
    // Frames are separated by the byte 0xFE in the fuzz input; the first frame is the GUARD
    // when the input starts with 0x01, a tag when it starts with 2–4 (so the fuzzer reaches
    // past the first check quickly).
    let (first, body): (Option<&'static [u8]>, &[u8]) = match data.split_first() {
        Some((1, rest)) => (Some(nixl_wire::GUARD), rest),
        Some((2, rest)) => (Some(b"ABORT"), rest),
        Some((3, rest)) => (Some(b"STAGING_RSP"), rest),
        Some((4, rest)) => (Some(b"WATERMARK"), rest),
        _ => (None, data),
    };
    let mut frames: Vec<Bytes> = Vec::new();
    frames.extend(first.map(Bytes::from_static));
    frames.extend(body.split(|&b| b == 0xFE).map(Bytes::copy_from_slice));
    if let Ok(m) = PrefillInbound::decode(&frames) {
        assert_eq!(m.encode(), frames);
    }
    if let Ok(n) = Notification::decode(data) {
        assert_eq!(n.encode(), data);
    }
});
