//! Frames captured from real SGLang 0.5.1.post3 peers (tests/data; the formats are in docs/protocol.md §2–§4):
//! each decodes to its decoded view and re-encodes to identical bytes.
//!
//! Set `NIXL_WIRE_GOLDEN_DIR` to check another directory of captures in the same format.
#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::PathBuf;

use bytes::Bytes;
use nixl_wire::http::{ParallelInfo, PrefillRegistration, RankInfo, RouteQuery, to_python_json};
use nixl_wire::{Notification, PrefillInbound};
use serde_json::Value;

fn golden_dir() -> PathBuf {
    std::env::var_os("NIXL_WIRE_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data"))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap()
}

fn check_frames(name: &str, doc: &Value) {
    let frames: Vec<Bytes> = doc["frames_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| Bytes::from(unhex(text(h))))
        .collect();
    let lens: Vec<u64> = doc["frame_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        frames.iter().map(|f| f.len() as u64).collect::<Vec<_>>(),
        lens,
        "{name}: frame lengths"
    );
    let msg = PrefillInbound::decode(&frames).unwrap_or_else(|e| panic!("{name}: {e}"));
    let d = &doc["decoded"];
    match &msg {
        PrefillInbound::Register(r) => {
            assert_eq!(text(&d["frame_1_room"]), "None");
            assert_eq!(r.local_ip, text(&d["frame_2_local_ip"]));
            assert_eq!(r.rank_port.to_string(), text(&d["frame_3_rank_port"]));
            assert_eq!(r.agent.as_str(), text(&d["frame_4_agent_name"]));
            assert_eq!(
                r.metadata.len() as u64,
                d["frame_5_agent_metadata_len"].as_u64().unwrap()
            );
            let want: Vec<u64> = d["frame_6_kv_data_ptrs_u64_native_le"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(r.kv_ptrs, want);
            let want: Vec<u64> = d["frame_7_aux_data_ptrs_u64_native_le"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(r.aux_ptrs, want);
            assert_eq!(r.gpu_id.to_string(), text(&d["frame_8_gpu_id"]));
        }
        PrefillInbound::Transfer(t) => {
            assert_eq!(t.room.to_string(), text(&d["frame_1_room"]));
            assert_eq!(t.local_ip, text(&d["frame_2_local_ip"]));
            assert_eq!(t.rank_port.to_string(), text(&d["frame_3_rank_port"]));
            assert_eq!(t.agent.as_str(), text(&d["frame_4_agent_name"]));
            let want: Vec<u64> = d["frame_5_dst_kv_indices_int32_le"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(
                t.dst_pages
                    .iter()
                    .map(|p| u64::from(p.get()))
                    .collect::<Vec<_>>(),
                want
            );
            assert_eq!(
                t.dst_aux_index.to_string(),
                text(&d["frame_6_dst_aux_index"])
            );
            assert_eq!(
                t.required_dst_info_num.to_string(),
                text(&d["frame_7_required_dst_info_num"])
            );
        }
        other => panic!("{name}: unexpected {other:?}"),
    }
    assert_eq!(msg.encode(), frames, "{name}: re-encoding differs");
}

fn check_notification(name: &str, ascii: &str) -> Notification {
    let n =
        Notification::decode(ascii.as_bytes()).unwrap_or_else(|e| panic!("{name}: {ascii}: {e}"));
    assert_eq!(n.encode(), ascii.as_bytes(), "{name}: {ascii}");
    n
}

fn check_notification_lists(name: &str, doc: &Value) -> usize {
    let mut n = 0;
    for key in [
        "sent",
        "received",
        "nixl_notifs_sent_by_prefill",
        "nixl_notifs_received_by_decode",
    ] {
        for entry in doc[key].as_array().into_iter().flatten() {
            let ascii = text(&entry["notif_ascii"]);
            check_notification(name, ascii);
            if let Some(h) = entry["notif_hex"].as_str() {
                assert_eq!(unhex(h), ascii.as_bytes());
            }
            n += 1;
        }
    }
    n
}

fn check_http(name: &str, doc: &Value) {
    for ex in doc["exchanges"].as_array().unwrap() {
        let url = text(&ex["url"]);
        match text(&ex["method"]) {
            "PUT" => {
                let body: PrefillRegistration =
                    serde_json::from_value(ex["request_json"].clone()).unwrap();
                assert_eq!(
                    serde_json::to_value(&body).unwrap(),
                    ex["request_json"],
                    "{name}: {url}"
                );
                // requests.put(json=...) sends json.dumps with default separators, keys in order.
                let keys: Vec<&str> = [
                    "role",
                    "tp_size",
                    "dp_size",
                    "rank_ip",
                    "rank_port",
                    "engine_rank",
                ]
                .to_vec();
                let ours = to_python_json(&body);
                let mut pos = 0;
                for k in keys {
                    let at = ours[pos..]
                        .find(&format!("\"{k}\": "))
                        .unwrap_or_else(|| panic!("{name}: key {k} order"));
                    pos += at;
                }
                assert_eq!(text(&ex["response_text"]), "OK");
            }
            "GET" => {
                let query = url.split_once('?').unwrap().1;
                let q = RouteQuery::parse(query).unwrap();
                assert_eq!(q.to_query_string(), query, "{name}");
                let resp = text(&ex["response_text"]);
                let ours = if q.is_parallel_info() {
                    to_python_json(&serde_json::from_str::<ParallelInfo>(resp).unwrap())
                } else {
                    to_python_json(&serde_json::from_str::<RankInfo>(resp).unwrap())
                };
                assert_eq!(ours, resp, "{name}: response bytes");
            }
            other => panic!("{name}: method {other}"),
        }
    }
}

#[test]
fn every_golden_capture_decodes_and_reencodes_byte_for_byte() {
    let dir = golden_dir();
    let mut files = 0;
    let mut notifs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if doc.get("frames_hex").is_some() {
            check_frames(&name, &doc);
        }
        if doc.get("exchanges").is_some() {
            check_http(&name, &doc);
        }
        notifs += check_notification_lists(&name, &doc);
        files += 1;
    }
    assert!(files >= 5, "only {files} golden files in {}", dir.display());
    assert!(notifs > 10, "only {notifs} notifications checked");
}

#[test]
fn the_golden_notification_sequence_completes_every_room() {
    // Replaying the decode side: every room that got its last chunk also got aux.
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("notifications.json")).unwrap(),
    )
    .unwrap();
    let mut last: std::collections::HashMap<u64, u32> = Default::default();
    let mut chunks: std::collections::HashMap<u64, std::collections::HashSet<u32>> =
        Default::default();
    let mut aux = std::collections::HashSet::new();
    for e in doc["received"].as_array().unwrap() {
        match check_notification("notifications.json", text(&e["notif_ascii"])) {
            Notification::Kv {
                room,
                chunk,
                last: is_last,
                ..
            } => {
                chunks.entry(room.get()).or_default().insert(chunk.get());
                if is_last {
                    last.insert(room.get(), chunk.get() + 1);
                }
            }
            Notification::Aux { room } => {
                aux.insert(room.get());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!last.is_empty());
    for (room, expected) in &last {
        assert_eq!(chunks[room].len() as u32, *expected, "room {room}");
        assert!(aux.contains(room), "room {room} has no aux");
    }
}
