//! Frames and bodies captured between SGLang 0.5.23's own classes (tests/data-0523; the formats
//! are in docs/protocol.md §10): each decodes to its decoded view and re-encodes to identical
//! bytes.
//!
//! Set `NIXL_WIRE_GOLDEN_DIR_0523` to check another directory of captures in the same format.
#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::PathBuf;

use bytes::Bytes;
use nixl_wire::http::RankInfo;
use nixl_wire::http::to_python_json;
use nixl_wire::http::v2x::{PrefillRegistration, PrefillServerInfo, RouteQuery};
use nixl_wire::v2x::{DecodeInbound, MemKind};
use nixl_wire::{PrefillInbound, Profile};
use serde_json::Value;

fn dir() -> PathBuf {
    std::env::var_os("NIXL_WIRE_GOLDEN_DIR_0523")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data-0523"))
}

fn load(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn frames(msg: &Value) -> Vec<Bytes> {
    let frames: Vec<Bytes> = msg["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Bytes::from(unhex(f["hex"].as_str().unwrap())))
        .collect();
    for (f, doc) in frames.iter().zip(msg["frames"].as_array().unwrap()) {
        assert_eq!(f.len() as u64, doc["len"].as_u64().unwrap());
    }
    assert_eq!(frames.len() as u64, msg["n_frames"].as_u64().unwrap());
    frames
}

/// The decoded view of frame `i`.
fn view(msg: &Value, i: usize) -> &Value {
    let f = &msg["frames"][i];
    assert_eq!(f["index"].as_u64(), Some(i as u64));
    if f.get("decoded").is_some() {
        &f["decoded"]
    } else {
        &f["ascii"]
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn registrations_decode_to_their_view_and_reencode() {
    let doc = load("zmq_registration.json");
    let msgs = doc["messages"].as_array().unwrap();
    assert!(!msgs.is_empty());
    for m in msgs {
        let f = frames(m);
        let PrefillInbound::RegisterV2x(r) = PrefillInbound::decode(&f).unwrap() else {
            panic!("not a 0.5.2x registration")
        };
        assert_eq!(r.profile(), Profile::Sglang0523);
        assert_eq!(r.local_ip, text(view(m, 2)));
        assert_eq!(r.rank_port.to_string(), text(view(m, 3)));
        assert_eq!(r.agent.as_str(), text(view(m, 4)));
        assert_eq!(r.metadata, f[5]);
        assert_eq!(r.kv_ptrs, u64s(view(m, 6)));
        assert_eq!(r.aux_ptrs, u64s(view(m, 7)));
        assert_eq!(r.aux_ptrs.len(), 10, "ten aux buffers by default");
        assert!(r.state_ptrs.is_empty() && view(m, 8).as_array().unwrap().is_empty());
        assert_eq!(r.gpu_id.to_string(), text(view(m, 9)));
        assert_eq!(r.decode_tp_size.to_string(), text(view(m, 10)));
        assert_eq!(r.decode_tp_rank.to_string(), text(view(m, 11)));
        assert_eq!(r.dst_kv_item_len.to_string(), text(view(m, 12)));
        assert_eq!(r.staging, None);
        assert_eq!(r.dst_num_slots.unwrap().to_string(), text(view(m, 17)));
        let kinds: Vec<&str> = r.kv_mem_kinds.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds.join(","), text(view(m, 18)));
        assert!(r.kv_mem_kinds.iter().all(|k| *k == MemKind::Vram));
        assert_eq!(r.kv_item_lens, u64s(view(m, 19)));
        assert!(r.kv_layer_ids.is_empty());
        assert_eq!(r.dcp_size.to_string(), text(view(m, 22)));
        assert_eq!(r.dcp_rank.to_string(), text(view(m, 23)));
        assert_eq!(r.state_data_lens, Some(Vec::new()));
        assert!(r.trailing.is_empty());
        assert_eq!(r.unsupported(), None);
        assert_eq!(PrefillInbound::RegisterV2x(r.clone()).encode(), f);
        // 0.5.20–0.5.22 send the first 24 frames.
        let short = PrefillInbound::decode(&f[..24]).unwrap();
        assert_eq!(short.profile(), Some(Profile::Sglang0520));
        assert_eq!(short.encode(), f[..24].to_vec());
    }
}

#[test]
fn transfer_infos_decode_to_their_view_and_reencode() {
    let doc = load("zmq_transfer_info.json");
    let msgs = doc["messages"].as_array().unwrap();
    assert!(msgs.len() >= 2);
    for m in msgs {
        let f = frames(m);
        let PrefillInbound::TransferV2x(t) = PrefillInbound::decode(&f).unwrap() else {
            panic!("not a 0.5.2x TransferInfo")
        };
        assert_eq!(t.room.to_string(), text(view(m, 1)));
        assert_eq!(t.local_ip, text(view(m, 2)));
        assert_eq!(t.rank_port.to_string(), text(view(m, 3)));
        assert_eq!(t.agent.as_str(), text(view(m, 4)));
        let pages: Vec<u64> = t.dst_pages.iter().map(|p| u64::from(p.get())).collect();
        assert_eq!(pages, u64s(view(m, 5)));
        assert_eq!(t.dst_aux_index.to_string(), text(view(m, 6)));
        assert_eq!(t.required_dst_info_num.to_string(), text(view(m, 7)));
        assert!(t.state_indices.is_empty());
        assert_eq!(t.decode_prefix_len.to_string(), text(view(m, 9)));
        assert_eq!(if t.is_dummy { "1" } else { "0" }, text(view(m, 10)));
        assert_eq!(t.unsupported(), None);
        assert_eq!(PrefillInbound::TransferV2x(t).encode(), f);
        // The first eight frames are 0.5.1's TransferInfo, which a 0.5.23 prefill also takes.
        assert!(matches!(
            PrefillInbound::decode(&f[..8]),
            Ok(PrefillInbound::Transfer(_))
        ));
    }
}

#[test]
fn tagged_messages_decode_on_their_side_and_reencode() {
    let doc = load("zmq_tagged_messages.json");
    let mut kinds = Vec::new();
    for m in doc["messages"].as_array().unwrap() {
        let f = frames(m);
        let kind = text(&m["kind"]);
        kinds.push(kind.to_owned());
        match kind {
            "KV_STATUS" => {
                let DecodeInbound::KvStatus(s) = DecodeInbound::decode(&f).unwrap() else {
                    panic!("{kind}")
                };
                assert_eq!(s.room.to_string(), text(view(m, 1)));
                assert_eq!(s.status.to_string(), text(view(m, 2)));
                assert_eq!(s.prefill_rank.to_string(), text(view(m, 3)));
                assert_eq!(s.reason.as_deref(), Some(text(view(m, 4))));
                assert_eq!(DecodeInbound::KvStatus(s).encode(), f);
            }
            "ABORT_ACK" => {
                let DecodeInbound::AbortAck(a) = DecodeInbound::decode(&f).unwrap() else {
                    panic!("{kind}")
                };
                assert_eq!(a.room.to_string(), text(view(m, 1)));
                assert_eq!(a.prefill_rank.to_string(), text(view(m, 2)));
                assert_eq!(a.generation.unwrap().to_string(), text(view(m, 3)));
                assert_eq!(DecodeInbound::AbortAck(a).encode(), f);
            }
            "ABORT" => {
                let PrefillInbound::Abort(a) = PrefillInbound::decode(&f).unwrap() else {
                    panic!("{kind}")
                };
                assert_eq!(a.room.to_string(), text(view(m, 1)));
                let reply = a.reply.clone().unwrap();
                assert_eq!(reply.ip, text(view(m, 2)));
                assert_eq!(reply.port.to_string(), text(view(m, 3)));
                assert_eq!(reply.generation.unwrap().to_string(), text(view(m, 4)));
                assert_eq!(PrefillInbound::Abort(a).encode(), f);
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    for k in ["KV_STATUS", "ABORT", "ABORT_ACK"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} captured");
    }
}

#[test]
fn bootstrap_bodies_and_queries_reencode_byte_for_byte() {
    let doc = load("bootstrap_http.json");
    let (mut puts, mut infos, mut ranks, mut health) = (0, 0, 0, 0);
    for ex in doc["exchanges"].as_array().unwrap() {
        let url = text(&ex["url"]);
        let resp = text(&ex["response_text"]);
        match (text(&ex["method"]), url.split_once('?')) {
            ("PUT", None) => {
                let body = unhex(text(&ex["request_body_hex"]));
                let reg: PrefillRegistration = serde_json::from_slice(&body).unwrap();
                assert_eq!(to_python_json(&reg).as_bytes(), body, "PUT body bytes");
                let info = PrefillServerInfo::for_profile(Profile::Sglang0523, &reg);
                infos += usize::from(info.page_size == Some(reg.page_size));
                assert_eq!(resp, "OK");
                puts += 1;
            }
            ("GET", Some((_, query))) => {
                assert!(RouteQuery::is_v2x(query));
                let q = RouteQuery::parse(query).unwrap();
                assert_eq!(q.to_query_string(), query);
                if q.is_parallel_info() {
                    let info: PrefillServerInfo = serde_json::from_str(resp).unwrap();
                    assert_eq!(to_python_json(&info), resp, "parallel info bytes");
                    infos += 1;
                } else {
                    let r: RankInfo = serde_json::from_str(resp).unwrap();
                    assert_eq!(to_python_json(&r), resp);
                    ranks += 1;
                }
            }
            ("GET", None) if url.ends_with("/health") => {
                assert_eq!(resp, "OK");
                health += 1;
            }
            other => panic!("unexpected exchange {other:?}"),
        }
    }
    assert!(puts >= 1 && infos >= 2 && ranks >= 1 && health >= 1);
}

#[test]
fn what_our_server_answers_0523_decodes_equals_what_sglangs_answered() {
    let doc = load("bootstrap_http.json");
    let ex = doc["exchanges"].as_array().unwrap();
    let put = ex.iter().find(|e| text(&e["method"]) == "PUT").unwrap();
    let reg: PrefillRegistration =
        serde_json::from_slice(&unhex(text(&put["request_body_hex"]))).unwrap();
    let answered = ex
        .iter()
        .find(|e| text(&e["url"]).ends_with("target_pp_rank=-1"))
        .unwrap();
    assert_eq!(
        to_python_json(&PrefillServerInfo::for_profile(Profile::Sglang0523, &reg)),
        text(&answered["response_text"])
    );
}

#[test]
fn the_0523_profile_signals_like_the_capture_no_notification_at_all() {
    let doc = load("nixl_notifications.json");
    let posted = doc["prefill_kv_xfers_make_prepped"].as_u64().unwrap();
    assert!(posted > 0, "the capture wrote KV");
    assert_eq!(doc["xfers_with_nonempty_notif_msg"].as_u64(), Some(0));
    assert_eq!(doc["decode_notifications_received"].as_u64(), Some(0));
    // So the profile must carry Success (and failures) by KV_STATUS to a listener.
    let p = Profile::Sglang0523;
    assert!(p.success_by_status() && p.failure_by_status() && p.decode_listens());
}
