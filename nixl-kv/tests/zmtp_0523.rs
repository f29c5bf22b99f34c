//! The raw ZMTP bytes of SGLang 0.5.23's capture run (`nixl-wire/tests/data-0523/
//! zmtp_raw_streams.json`, libzmq 4.3.5 through pyzmq) through our ZMTP: what its decodes pushed
//! arrives at our PULL listener as the messages a prefill decodes (registration, TransferInfos,
//! `ABORT`), what its prefill pushed as what a decode's listener decodes (`KV_STATUS`), and our
//! PUSH side completes its handshake with libzmq's PULL answers.
#![allow(clippy::unwrap_used, reason = "test code")]

use bytes::Bytes;
use nixl_kv::net::zmtp::{PullLimits, replay, replay_push};
use nixl_wire::PrefillInbound;
use nixl_wire::v2x::DecodeInbound;
use serde_json::Value;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every stream of the capture: its name and its bytes, as they crossed the socket. The
/// capture's own parser lost track where the prefill's PUSH socket connected again (a second
/// greeting in one stream, read as frames with impossible flags and cut short as
/// `...(truncated)`): a stream is taken up to the first such part, where its first connection
/// ended.
fn streams() -> Vec<(String, Vec<u8>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nixl-wire/tests/data-0523/zmtp_raw_streams.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["streams"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, s)| {
            let mut bytes = Vec::new();
            let mut whole = true;
            for part in s["zmtp"].as_array().unwrap() {
                // ZMTP flags use three bits: more is the capture misreading a new greeting.
                if part["flags"].as_u64().is_some_and(|f| f > 7) {
                    whole = false;
                    break;
                }
                let got = match hex(&part["hex"]) {
                    Some(h) => Some(unhex(h)),
                    None => hex(&part["header_hex"])
                        .zip(hex(&part["body_hex"]))
                        .map(|(h, b)| [unhex(h), unhex(b)].concat()),
                };
                let Some(got) = got else {
                    whole = false;
                    break;
                };
                bytes.extend(got);
            }
            let total = s["total_bytes"].as_u64().unwrap();
            assert!(
                if whole {
                    bytes.len() as u64 == total
                } else {
                    (bytes.len() as u64) < total
                },
                "{name}"
            );
            (name.clone(), bytes)
        })
        .collect()
}

/// A hex field, unless the capture cut it short.
fn hex(v: &Value) -> Option<&str> {
    v.as_str()
        .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn libzmq_pushes_from_sglang_0523_arrive_whole_and_decode() {
    let rt = rt();
    let (mut to_prefill, mut to_decode) = (Vec::new(), Vec::new());
    for (name, bytes) in streams()
        .into_iter()
        .filter(|(n, _)| n.ends_with("client_to_server"))
    {
        let r = rt.block_on(replay(&bytes[..], &PullLimits::default()));
        assert_eq!(r.outcome, Ok(()), "{name}");
        assert!(!r.messages.is_empty(), "{name}");
        for m in r.messages {
            if name.contains("decode_push_to_prefill_pull") {
                to_prefill
                    .push(PrefillInbound::decode(&m).unwrap_or_else(|e| panic!("{name}: {e}")));
            } else {
                to_decode.push(DecodeInbound::decode(&m).unwrap_or_else(|e| panic!("{name}: {e}")));
            }
        }
    }
    let count = |f: fn(&PrefillInbound) -> bool| to_prefill.iter().filter(|m| f(m)).count();
    assert!(
        count(|m| matches!(m, PrefillInbound::RegisterV2x(_))) >= 3,
        "a registration per decode"
    );
    assert!(count(|m| matches!(m, PrefillInbound::TransferV2x(_))) >= 5);
    assert!(count(|m| matches!(m, PrefillInbound::Abort(_))) >= 1);
    // The prefill's first connection carried the three normal rooms' Success (its abort
    // acknowledgements and the failure went on the second, which the capture lost).
    let successes = to_decode
        .iter()
        .filter(|m| matches!(m, DecodeInbound::KvStatus(s) if s.status == 4))
        .count();
    assert!(successes >= 3, "{to_decode:?}");
}

#[test]
fn our_push_completes_its_handshake_with_libzmqs_pull() {
    let rt = rt();
    for (name, bytes) in streams()
        .into_iter()
        .filter(|(n, _)| n.ends_with("server_to_client"))
    {
        // What libzmq's PULL sent: its greeting and READY (Socket-Type PULL), nothing more.
        let frames = vec![Bytes::from_static(b"KV_STATUS"), Bytes::from_static(b"1")];
        let r = rt.block_on(replay_push(&bytes[..], 1 << 10, &frames));
        assert_eq!(r.handshake, Ok(()), "{name}");
    }
}
