//! SGLang 0.5.23's capture run (`nixl-wire/tests/data-0523`) replayed through our prefill core:
//! the same WRITEs land the same bytes at the same places, and the messages go in the order the
//! capture's prefill sent them.

use serde_json::Value;

use super::*;

fn capture(name: &str) -> Value {
    let path = format!(
        "{}/../nixl-wire/tests/data-0523/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The first message of `file` whose decode run is "normal", as frames.
fn frames_of(file: &str) -> Vec<Bytes> {
    let doc = capture(file);
    let m = doc["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["decode_run"] == "normal")
        .unwrap();
    m["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Bytes::from(unhex(f["hex"].as_str().unwrap())))
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<u64>> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_u64)
                .collect()
        })
        .collect()
}

/// Copies as page-sized (src, dst, len) units, sorted: merged runs and single pages compare.
fn units(copies: &[(u64, u64, u64)], unit: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<_> = copies
        .iter()
        .flat_map(|&(s, d, len)| (0..len / unit).map(move |k| (s + k * unit, d + k * unit, unit)))
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn the_0523_captures_writes_are_the_bytes_our_prefill_writes_to_a_0523_decode() {
    let desc = capture("nixl_descriptors.json");
    let dlists = desc["prep_xfer_dlist"].as_array().unwrap();
    // (addr, len, dev, stride, slots) per KV buffer: ours, then the first decode's.
    let src = rows(&dlists[0]["descs"]);
    let reg = frames_of("zmq_registration.json");
    let PrefillInbound::RegisterV2x(r) = PrefillInbound::decode(&reg).unwrap() else {
        panic!("not a 0.5.2x registration")
    };
    let dst = rows(
        &dlists
            .iter()
            .find(|d| d["peer"] == r.agent.as_str())
            .unwrap()["descs"],
    );
    assert_eq!(dst.iter().map(|row| row[0]).collect::<Vec<_>>(), r.kv_ptrs);
    let aux_rows = desc["aux_get_xfer_descs_first_room"].as_array().unwrap();
    let (src_aux, dst_aux) = (rows(&aux_rows[0]["descs"]), rows(&aux_rows[1]["descs"]));
    let items: Vec<u64> = src_aux.iter().map(|row| row[1]).collect();
    let prefill_aux_base: Vec<u64> = desc["register_memory"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "prefill" && m["mem_type_requested"] == "DRAM")
        .map(|m| rows(&m["regions"]).iter().map(|row| row[0]).collect())
        .unwrap();
    let src_slot = (src_aux[0][0] - prefill_aux_base[0]) / items[0];
    let page = src[0][1];
    let ours = Layout {
        kv_mem: MemType::Dram,
        kv_ptrs: src.iter().map(|row| row[0]).collect(),
        kv_item_lens: vec![page; src.len()],
        kv_pages: src[0][4] as u32,
        aux_ptrs: prefill_aux_base,
        aux_item_lens: items.clone(),
        aux_slots: 32,
        gpu_id: 0,
        tp: crate::proto::TpPlace::default(),
    };
    let now = Instant::now();
    let mut p = PrefillCore::new(ours.clone(), Duration::from_secs(300));
    let mut drv = FakeDriver::new();
    let mut r = r;
    r.kv_mem_kinds = vec![nixl_wire::v2x::MemKind::Dram; r.kv_ptrs.len()];
    p.handle_inbound(PrefillInbound::RegisterV2x(r), now);
    drv.run(&mut p);
    let info = PrefillInbound::decode(&frames_of("zmq_transfer_info.json")).unwrap();
    let PrefillInbound::TransferV2x(t) = &info else {
        panic!("not a 0.5.2x TransferInfo")
    };
    let room = t.room;
    p.handle_inbound(info.clone(), now);
    // The capture's chunks: its prefill pages are buffer 0's local indices of each WRITE.
    let posts_capture = desc["make_prepped_xfer_first_room"].as_array().unwrap();
    let chunks: Vec<Vec<u32>> = posts_capture
        .iter()
        .map(|x| {
            let l: Vec<u64> = x["local_indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let per = l.len() / src.len();
            l[..per].iter().map(|&v| v as u32).collect()
        })
        .collect();
    let total: u32 = chunks.iter().map(|c| c.len() as u32).sum();
    p.sender_new(room, now);
    p.sender_init(room, total, src_slot as u32).unwrap();
    for c in &chunks {
        p.sender_send(room, c, now).unwrap();
    }
    drv.run(&mut p);
    let posts = drv.take_posts();
    assert_eq!(
        posts.len(),
        chunks.len() + 1,
        "one WRITE per chunk, then the aux WRITE"
    );
    assert!(
        posts.iter().all(|c| c.notif.is_empty()),
        "0.5.23 gets no notification"
    );
    // The capture's KV bytes: element index = buffer · slots + page, on either side.
    let mut theirs = Vec::new();
    for x in posts_capture {
        let idx = |k: &str| -> Vec<u64> {
            x[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        for (l, r) in idx("local_indices").into_iter().zip(idx("remote_indices")) {
            let (s, d) = (
                &src[(l / src[0][4]) as usize],
                &dst[(r / dst[0][4]) as usize],
            );
            theirs.push((s[0] + (l % s[4]) * s[3], d[0] + (r % d[4]) * d[3], page));
        }
    }
    let mine: Vec<_> = posts[..chunks.len()]
        .iter()
        .flat_map(|c| drv.copies(c))
        .collect();
    assert_eq!(units(&mine, page), units(&theirs, page), "KV bytes");
    // The aux WRITE: every one of the ten rows, with the prefill's lengths.
    let theirs: Vec<_> = src_aux
        .iter()
        .zip(&dst_aux)
        .map(|(s, d)| (s[0], d[0], s[1]))
        .collect();
    let mut mine = drv.copies(&posts[chunks.len()]);
    mine.sort_unstable();
    let mut theirs = theirs;
    theirs.sort_unstable();
    assert_eq!(mine, theirs, "aux rows");
}

#[test]
fn the_0523_capture_sequence_is_what_our_prefill_does() {
    let seq = capture("message_sequence.json");
    let events: Vec<&str> = seq["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .filter(|e| {
            e.starts_with("prefill ZMQ")
                || e.starts_with("prefill NIXL make")
                || e.starts_with("prefill NIXL initialize")
        })
        .collect();
    // Per room of the capture: what its prefill did after the TransferInfo (or the ABORT).
    let mut expected: Vec<(String, Vec<&str>)> = Vec::new();
    for e in &events {
        if let Some(rest) = e.strip_prefix("prefill ZMQ recv TRANSFER_INFO room=") {
            expected.push((rest.to_owned(), Vec::new()));
        } else if let Some(last) = expected.last_mut()
            && !e.contains("REGISTRATION")
        {
            let kind = if e.contains("make_prepped_xfer") {
                "kv"
            } else if e.contains("initialize_xfer") {
                "aux"
            } else if e.contains("send KV_STATUS") {
                "KV_STATUS"
            } else if e.contains("recv ABORT") {
                "ABORT"
            } else if e.contains("send ABORT_ACK") {
                "ABORT_ACK"
            } else {
                continue;
            };
            last.1.push(kind);
        }
    }
    assert!(expected.len() >= 4, "{expected:?}");
    // Ours, one room at a time: three chunks of four pages, or an ABORT right after the info.
    let now = Instant::now();
    let (mut p, mut drv) = dialect::prefill_for_capture(now);
    for (k, (_, kinds)) in expected.iter().enumerate() {
        let room = RoomId::new(900 + k as u64);
        let mut mine: Vec<&str> = Vec::new();
        p.handle_inbound(dialect::info_for_capture(room, 12), now);
        p.sender_new(room, now);
        if kinds.first() == Some(&"ABORT") {
            p.handle_inbound(dialect::abort_for_capture(room), now);
            mine.push("ABORT");
        } else {
            p.sender_init(room, 12, 1).unwrap();
            for c in 0..3 {
                p.sender_send(room, &[c * 4, c * 4 + 1, c * 4 + 2, c * 4 + 3], now)
                    .unwrap();
            }
        }
        drv.run(&mut p);
        // The capture's failing room (a page past the decode's pool): its last KV WRITE could
        // not be made, and nothing of the room was started after it, the aux WRITE included
        // (`driver::exec` skips the rest of a room's posts once one failed to start).
        let fails = kinds.last() == Some(&"KV_STATUS") && !kinds.contains(&"aux");
        let posts = drv.take_posts();
        let failing = posts.iter().filter(|c| c.kind == ListKind::Kv).count();
        for (n, post) in posts.into_iter().enumerate() {
            if fails && n + 1 == failing {
                mine.push("kv");
                p.transfer_done(
                    room,
                    Err(FailureReason::Transfer {
                        peer: "d23".into(),
                        reason: "NIXL_ERR_INVALID_PARAM".into(),
                    }),
                );
                continue;
            }
            if fails && n + 1 > failing {
                p.transfer_done(
                    room,
                    Err(FailureReason::Transfer {
                        peer: "d23".into(),
                        reason: "not started".into(),
                    }),
                );
                continue;
            }
            mine.push(if post.kind == ListKind::Kv {
                "kv"
            } else {
                "aux"
            });
            p.transfer_done(room, Ok(()));
        }
        drv.run(&mut p);
        for (_, frames) in drv.statuses.drain(..) {
            mine.push(match DecodeInboundKind::of(&frames) {
                Some(k) => k,
                None => "?",
            });
        }
        assert_eq!(&mine, kinds, "room {k}");
    }
}

/// The tag of a message to a decode's listener.
struct DecodeInboundKind;

impl DecodeInboundKind {
    fn of(frames: &[Bytes]) -> Option<&'static str> {
        match nixl_wire::v2x::DecodeInbound::decode(frames).ok()? {
            nixl_wire::v2x::DecodeInbound::KvStatus(_) => Some("KV_STATUS"),
            nixl_wire::v2x::DecodeInbound::AbortAck(_) => Some("ABORT_ACK"),
            _ => None,
        }
    }
}
