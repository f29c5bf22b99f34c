//! Fuzzes the prefill-bound dispatch and the notification decoder: arbitrary frame sets and
//! payloads must decode or fail, never panic, and whatever decodes must re-encode identically.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixl_wire::{Notification, PrefillInbound};

fuzz_target!(|data: &[u8]| {
    // Frames are separated by the byte 0xFE in the fuzz input; the first frame is the GUARD
    // when the input starts with 0x01 (so the fuzzer reaches past the guard check quickly).
    let (guard, body) = match data.split_first() {
        Some((1, rest)) => (true, rest),
        _ => (false, data),
    };
    let mut frames: Vec<Bytes> = Vec::new();
    if guard {
        frames.push(Bytes::from_static(nixl_wire::GUARD));
    }
    frames.extend(body.split(|&b| b == 0xFE).map(Bytes::copy_from_slice));
    if let Ok(m) = PrefillInbound::decode(&frames) {
        assert_eq!(m.encode(), frames);
    }
    if let Ok(n) = Notification::decode(data) {
        assert_eq!(n.encode(), data);
    }
});
