//! Our bootstrap server answering SGLang 0.5.20–0.5.23 (docs/protocol.md §10.7): the PUT
//! SGLang 0.5.23's own prefill sent in the capture run registers, and 0.5.2x decodes then get
//! a parallel info every 0.5.2x release reads and the rank's address; 0.5.1 decodes keep their
//! own answers; one body from our prefill serves both families.
#![allow(clippy::unwrap_used, reason = "test code")]

use nixl_kv::BootstrapServer;
use nixl_wire::http::v2x::{PrefillRegistration, PrefillServerInfo};
use nixl_wire::http::{self, ParallelInfo, RankInfo, to_python_json};
use serde_json::Value;

fn capture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nixl-wire/tests/data-0523/bootstrap_http.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Status and body of a request (any status is an answer, not an error).
fn call(method: &str, url: &str, body: Option<&[u8]>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = match (method, body) {
        ("PUT", Some(b)) => agent
            .put(url)
            .header("Content-Type", "application/json")
            .send(b),
        _ => agent.get(url).call(),
    }
    .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().read_to_string().unwrap())
}

const INFO: &str =
    "/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1";
const RANK0: &str = "/route?prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=0&target_pp_rank=0";

#[test]
fn sglang_0523s_registration_serves_0523_and_older_0_5_2x_decodes() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let base = format!("http://{}", server.addr());
    let (status, text) = call("GET", &format!("{base}{INFO}"), None);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("not fully registered"));
    let doc = capture();
    let put = doc["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "PUT")
        .unwrap();
    let body = unhex(put["request_body_hex"].as_str().unwrap());
    let (status, text) = call("PUT", &format!("{base}/route"), Some(&body));
    assert_eq!((status, text.as_str()), (200, "OK"));

    let (status, text) = call("GET", &format!("{base}{INFO}"), None);
    assert_eq!(status, 200, "{text}");
    let reg: PrefillRegistration = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        text,
        to_python_json(&PrefillServerInfo::for_every_profile(&reg))
    );
    // Only keys 0.5.20 knows, so 0.5.20, 0.5.21 and 0.5.22 decodes read it too.
    for newer in [
        "dsv41_spec_layout",
        "decode_allocation_policy",
        "kv_layout",
        "enable_kv_cache_sharding",
    ] {
        assert!(!text.contains(newer), "{newer} in {text}");
    }
    let (status, text) = call("GET", &format!("{base}{RANK0}"), None);
    assert_eq!(status, 200);
    let rank: RankInfo = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (rank.rank_ip.as_str(), rank.rank_port),
        ("127.0.0.1", reg.rank_port)
    );
    let (status, text) = call(
        "GET",
        &format!(
            "{base}/route?prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=1&target_pp_rank=0"
        ),
        None,
    );
    assert_eq!(status, 404);
    assert!(text.contains("tp_rank=1"), "{text}");
    let (status, _) = call(
        "GET",
        &format!("{base}/route?prefill_dp_rank=0&prefill_cp_rank=0"),
        None,
    );
    assert_eq!(status, 400, "missing inputs");
    // A 0.5.1 decode asking the same server gets 0.5.1's answers.
    let (status, text) = call(
        "GET",
        &format!("{base}/route?engine_rank=-1&target_dp_group=-1"),
        None,
    );
    assert_eq!(status, 200);
    let info: ParallelInfo = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (info.prefill_tp_size, info.prefill_dp_size),
        (Some(1), Some(1))
    );
}

#[test]
fn one_body_from_our_prefill_registers_for_both_families() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let base = format!("http://{}", server.addr());
    let seed = http::PrefillRegistration {
        role: "Prefill".into(),
        tp_size: 2,
        dp_size: 1,
        rank_ip: "127.0.0.1".into(),
        rank_port: 6001,
        engine_rank: 1,
    };
    let v2 = PrefillRegistration::from_seed(&seed, 16, "bfloat16");
    let body = v2.body_for_every_release(&seed);
    assert_eq!(
        call("PUT", &format!("{base}/route"), Some(body.as_bytes())).0,
        200
    );
    let (status, text) = call("GET", &format!("{base}{INFO}"), None);
    assert_eq!(status, 503, "one of two ranks: {text}");
    let mut rank0 = seed.clone();
    rank0.engine_rank = 0;
    rank0.rank_port = 6000;
    let v2 = PrefillRegistration::from_seed(&rank0, 16, "bfloat16");
    assert_eq!(
        call(
            "PUT",
            &format!("{base}/route"),
            Some(v2.body_for_every_release(&rank0).as_bytes())
        )
        .0,
        200
    );
    let (status, text) = call("GET", &format!("{base}{INFO}"), None);
    assert_eq!(status, 200);
    let info: PrefillServerInfo = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (
            info.attn_tp_size,
            info.page_size,
            info.kv_cache_dtype.as_deref()
        ),
        (2, Some(16), Some("bfloat16"))
    );
    let (_, text) = call(
        "GET",
        &format!(
            "{base}/route?prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=1&target_pp_rank=0"
        ),
        None,
    );
    assert_eq!(
        serde_json::from_str::<RankInfo>(&text).unwrap().rank_port,
        6001
    );
    let (_, text) = call(
        "GET",
        &format!("{base}/route?engine_rank=1&target_dp_group=0"),
        None,
    );
    assert_eq!(
        serde_json::from_str::<RankInfo>(&text).unwrap().rank_port,
        6001
    );
}

#[test]
fn prefills_with_pipeline_or_context_parallelism_are_refused_with_a_reason() {
    let server = BootstrapServer::start("127.0.0.1:0").unwrap();
    let base = format!("http://{}", server.addr());
    let seed = http::PrefillRegistration {
        role: "Prefill".into(),
        tp_size: 1,
        dp_size: 1,
        rank_ip: "127.0.0.1".into(),
        rank_port: 6000,
        engine_rank: 0,
    };
    let mut v2 = PrefillRegistration::from_seed(&seed, 16, "bfloat16");
    v2.pp_size = 2;
    let (status, text) = call(
        "PUT",
        &format!("{base}/route"),
        Some(to_python_json(&v2).as_bytes()),
    );
    assert_eq!(status, 400);
    assert!(text.contains("pipeline"), "{text}");
}
