//! Bootstrap HTTP bodies and queries of SGLang 0.5.20–0.5.23 (docs/protocol.md §10.7).
//!
//! Keys a release added later are `Option`s that are left out when `None`: an older decode
//! builds `PrefillServerInfo(**json)` and fails on any key it does not know, so a server
//! answers each profile with that profile's keys only
//! ([`PrefillServerInfo::for_profile`]). A key present with JSON `null` (`kv_layout` in
//! 0.5.23's `PUT /route`) stays present as [`serde_json::Value::Null`].

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::Profile;
use crate::error::{DecodeError, MessageKind};
use crate::scalar;

/// Deserializes a key that is present, `null` included, as `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The body of `PUT /route` a 0.5.2x prefill rank sends at start-up (keys in SGLang's order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRegistration {
    /// Attention-TP size.
    pub attn_tp_size: u32,
    /// Attention-TP rank.
    pub attn_tp_rank: u32,
    /// Attention context-parallel size.
    pub attn_cp_size: u32,
    /// Attention context-parallel rank.
    pub attn_cp_rank: u32,
    /// Attention-DP size.
    pub attn_dp_size: u32,
    /// Attention-DP rank.
    pub attn_dp_rank: u32,
    /// Pipeline-parallel size.
    pub pp_size: u32,
    /// Pipeline-parallel rank.
    pub pp_rank: u32,
    /// System DP size (DP controller).
    pub system_dp_size: u32,
    /// System DP rank.
    pub system_dp_rank: u32,
    /// The IP of this rank's ZMQ PULL socket.
    pub rank_ip: String,
    /// The port of this rank's ZMQ PULL socket.
    pub rank_port: u16,
    /// Tokens per page.
    pub page_size: u32,
    /// The KV cache's dtype (`bfloat16`, ...).
    pub kv_cache_dtype: String,
    /// The KV layout (0.5.23; `null` for the default).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub kv_layout: Option<Value>,
    /// DeepSeek-V4.1 speculative layout (0.5.21 on; `null` if unused).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub dsv41_spec_layout: Option<Value>,
    /// `follow_bootstrap_room` or another DP load-balancing method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balance_method: Option<String>,
    /// DSA cache layer split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_dsa_cache_layer_split: Option<bool>,
    /// KV-cache sharding (0.5.23).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_kv_cache_sharding: Option<bool>,
    /// The prefill's HTTP API port (`null` if unknown).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub prefill_http_port: Option<Value>,
    /// When the decode allocates pages (0.5.22 on; `early` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_allocation_policy: Option<String>,
}

impl PrefillRegistration {
    /// The 0.5.2x registration of the rank that `seed` registers in 0.5.1's form: attention
    /// TP and DP from its sizes, no pipeline or context parallelism, DP by bootstrap room.
    pub fn from_seed(
        seed: &crate::http::PrefillRegistration,
        page_size: u32,
        kv_cache_dtype: &str,
    ) -> Self {
        let dp = seed.dp_size.max(1);
        let attn_tp = (seed.tp_size / dp).max(1);
        Self {
            attn_tp_size: attn_tp,
            attn_tp_rank: seed.engine_rank % attn_tp,
            attn_cp_size: 1,
            attn_cp_rank: 0,
            attn_dp_size: dp,
            attn_dp_rank: seed.engine_rank / attn_tp,
            pp_size: 1,
            pp_rank: 0,
            system_dp_size: 1,
            system_dp_rank: 0,
            rank_ip: seed.rank_ip.clone(),
            rank_port: seed.rank_port,
            page_size,
            kv_cache_dtype: kv_cache_dtype.to_owned(),
            kv_layout: None,
            dsv41_spec_layout: None,
            load_balance_method: Some("follow_bootstrap_room".into()),
            enable_dsa_cache_layer_split: Some(false),
            enable_kv_cache_sharding: None,
            prefill_http_port: None,
            decode_allocation_policy: None,
        }
    }

    /// One `PUT /route` body that every release's server reads: 0.5.1's `role`, `tp_size`,
    /// `dp_size` and `engine_rank` followed by this registration's keys (each server ignores
    /// the keys it does not know; `rank_ip` and `rank_port` are shared).
    pub fn body_for_every_release(&self, seed: &crate::http::PrefillRegistration) -> String {
        let head = format!(
            "{{\"role\": {}, \"tp_size\": {}, \"dp_size\": {}, \"engine_rank\": {}, ",
            crate::http::to_python_json(&seed.role),
            seed.tp_size,
            seed.dp_size,
            seed.engine_rank
        );
        let own = crate::http::to_python_json(self);
        // `own` is a JSON object with at least the required keys: `{...}`.
        head + own.strip_prefix('{').unwrap_or(&own)
    }

    /// The DP group this rank belongs to, as SGLang's server computes it.
    pub fn dp_group(&self) -> u32 {
        if self.system_dp_size == 1 {
            self.attn_dp_rank
        } else {
            self.system_dp_rank
        }
    }

    /// The DP size the server records.
    pub fn dp_size(&self) -> u32 {
        if self.system_dp_size == 1 {
            self.attn_dp_size
        } else {
            self.system_dp_size
        }
    }
}

/// The answer to the parallel-info query (`GET /route` with all four parameters −1):
/// SGLang's `PrefillServerInfo`, keys in its order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillServerInfo {
    /// Attention-TP size.
    pub attn_tp_size: u32,
    /// Attention context-parallel size.
    pub attn_cp_size: u32,
    /// DP size.
    pub dp_size: u32,
    /// Pipeline-parallel size.
    pub pp_size: u32,
    /// Tokens per page.
    pub page_size: Option<u32>,
    /// The KV cache's dtype.
    pub kv_cache_dtype: Option<String>,
    /// Whether the decode picks the DP rank from the bootstrap room.
    pub follow_bootstrap_room: bool,
    /// DSA cache layer split.
    pub enable_dsa_cache_layer_split: bool,
    /// DeepSeek-V4.1 speculative layout (0.5.21 on; left out when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsv41_spec_layout: Option<Value>,
    /// The KV layout (0.5.23; left out when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_layout: Option<String>,
    /// When the decode allocates pages (0.5.22 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_allocation_policy: Option<String>,
    /// KV-cache sharding (0.5.23).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_kv_cache_sharding: Option<bool>,
    /// The prefill's HTTP API port.
    pub prefill_http_port: Option<u16>,
    /// Filled in by the decode; `null` on the wire.
    pub target_tp_rank: Option<i64>,
    /// Filled in by the decode; `null` on the wire.
    pub target_tp_ranks: Option<Vec<i64>>,
    /// Filled in by the decode; `null` on the wire.
    pub target_cp_ranks: Option<Vec<i64>>,
    /// Filled in by the decode; `null` on the wire.
    pub target_pp_ranks: Option<Vec<i64>>,
    /// Filled in by the decode; `null` on the wire.
    pub required_dst_info_num: Option<i64>,
    /// Filled in by the decode; `null` on the wire.
    pub required_prefill_response_num: Option<i64>,
}

impl PrefillServerInfo {
    /// The answer for decodes of `profile`, from what the first registration fixed: only keys
    /// every release of the profile knows (0.5.20's for [`Profile::Sglang0520`]).
    pub fn for_profile(profile: Profile, first: &PrefillRegistration) -> Self {
        let newest = profile == Profile::Sglang0523;
        Self {
            attn_tp_size: first.attn_tp_size,
            attn_cp_size: first.attn_cp_size,
            dp_size: first.dp_size(),
            pp_size: first.pp_size,
            page_size: Some(first.page_size),
            kv_cache_dtype: Some(first.kv_cache_dtype.clone()),
            follow_bootstrap_room: first
                .load_balance_method
                .as_deref()
                .is_none_or(|m| m == "follow_bootstrap_room"),
            enable_dsa_cache_layer_split: first.enable_dsa_cache_layer_split.unwrap_or(false),
            dsv41_spec_layout: None,
            kv_layout: None,
            decode_allocation_policy: newest.then(|| {
                first
                    .decode_allocation_policy
                    .clone()
                    .unwrap_or_else(|| "early".into())
            }),
            enable_kv_cache_sharding: newest
                .then(|| first.enable_kv_cache_sharding.unwrap_or(false)),
            prefill_http_port: first
                .prefill_http_port
                .as_ref()
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok()),
            target_tp_rank: None,
            target_tp_ranks: None,
            target_cp_ranks: None,
            target_pp_ranks: None,
            required_dst_info_num: None,
            required_prefill_response_num: None,
        }
    }
}

impl PrefillServerInfo {
    /// The answer every 0.5.2x decode accepts: 0.5.20's keys, when the later keys would hold
    /// their defaults (no speculative or KV layout, allocation policy `early`, no sharding);
    /// otherwise 0.5.23's answer, which only 0.5.23 decodes read.
    pub fn for_every_profile(first: &PrefillRegistration) -> Self {
        let defaults = first.dsv41_spec_layout.as_ref().is_none_or(Value::is_null)
            && first.kv_layout.as_ref().is_none_or(Value::is_null)
            && first
                .decode_allocation_policy
                .as_deref()
                .is_none_or(|p| p == "early")
            && !first.enable_kv_cache_sharding.unwrap_or(false);
        if defaults {
            Self::for_profile(Profile::Sglang0520, first)
        } else {
            let mut info = Self::for_profile(Profile::Sglang0523, first);
            info.dsv41_spec_layout = first.dsv41_spec_layout.clone().filter(|v| !v.is_null());
            info.kv_layout = first
                .kv_layout
                .as_ref()
                .and_then(Value::as_str)
                .map(str::to_owned);
            info
        }
    }
}

/// The query of a 0.5.2x decode's `GET /route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteQuery {
    /// The prefill DP rank, or −1.
    pub prefill_dp_rank: i64,
    /// The prefill context-parallel rank, or −1.
    pub prefill_cp_rank: i64,
    /// The target TP rank, or −1.
    pub target_tp_rank: i64,
    /// The target pipeline rank, or −1.
    pub target_pp_rank: i64,
}

const PARAMS: [&str; 4] = [
    "prefill_dp_rank",
    "prefill_cp_rank",
    "target_tp_rank",
    "target_pp_rank",
];

impl RouteQuery {
    /// The parallel-info query (all −1).
    pub const PARALLEL_INFO: Self = Self {
        prefill_dp_rank: -1,
        prefill_cp_rank: -1,
        target_tp_rank: -1,
        target_pp_rank: -1,
    };

    /// Whether this asks for [`PrefillServerInfo`] rather than a rank's address.
    pub fn is_parallel_info(&self) -> bool {
        *self == Self::PARALLEL_INFO
    }

    /// Whether a query string is this family's (it names `prefill_dp_rank`), as opposed to
    /// 0.5.1's `engine_rank`/`target_dp_group`.
    pub fn is_v2x(query: &str) -> bool {
        query
            .split('&')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == PARAMS[0]))
    }

    /// `prefill_dp_rank=D&prefill_cp_rank=C&target_tp_rank=T&target_pp_rank=P`.
    pub fn to_query_string(&self) -> String {
        format!(
            "prefill_dp_rank={}&prefill_cp_rank={}&target_tp_rank={}&target_pp_rank={}",
            self.prefill_dp_rank, self.prefill_cp_rank, self.target_tp_rank, self.target_pp_rank
        )
    }

    /// Parses a query string (without `?`). A missing or empty parameter is the server's 400
    /// case; other parameters are ignored.
    pub fn parse(query: &str) -> Result<Self, DecodeError> {
        let mut v = [0i64; 4];
        for (i, name) in PARAMS.into_iter().enumerate() {
            let raw = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .unwrap_or("");
            v[i] = scalar::parse_signed(raw.as_bytes())
                .map_err(|r| DecodeError::field(MessageKind::RouteQuery, i, name, r))?;
        }
        Ok(Self {
            prefill_dp_rank: v[0],
            prefill_cp_rank: v[1],
            target_tp_rank: v[2],
            target_pp_rank: v[3],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::to_python_json;

    #[test]
    fn queries_parse_and_tell_the_family() {
        let q = RouteQuery::parse(&RouteQuery::PARALLEL_INFO.to_query_string()).unwrap();
        assert!(q.is_parallel_info());
        assert!(RouteQuery::is_v2x("prefill_dp_rank=0&x=1"));
        assert!(!RouteQuery::is_v2x("engine_rank=-1&target_dp_group=-1"));
        assert!(RouteQuery::parse("prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=0").is_err());
        assert!(
            RouteQuery::parse(
                "prefill_dp_rank=&prefill_cp_rank=0&target_tp_rank=0&target_pp_rank=0"
            )
            .is_err()
        );
    }

    #[test]
    fn one_body_reads_as_either_releases_registration() {
        let seed = crate::http::PrefillRegistration {
            role: "Prefill".into(),
            tp_size: 4,
            dp_size: 2,
            rank_ip: "10.0.0.1".into(),
            rank_port: 5000,
            engine_rank: 3,
        };
        let v2 = PrefillRegistration::from_seed(&seed, 16, "bfloat16");
        assert_eq!(
            (v2.attn_tp_size, v2.attn_tp_rank, v2.attn_dp_rank),
            (2, 1, 1)
        );
        let body = v2.body_for_every_release(&seed);
        let back: crate::http::PrefillRegistration = serde_json::from_str(&body).unwrap();
        assert_eq!(back, seed);
        let back: PrefillRegistration = serde_json::from_str(&body).unwrap();
        assert_eq!(back, v2);
        assert!(
            body.starts_with(r#"{"role": "Prefill", "tp_size": 4"#),
            "{body}"
        );
    }

    #[test]
    fn each_profile_gets_only_its_keys() {
        let first: PrefillRegistration = serde_json::from_str(
            r#"{"attn_tp_size": 2, "attn_tp_rank": 0, "attn_cp_size": 1, "attn_cp_rank": 0,
                "attn_dp_size": 1, "attn_dp_rank": 0, "pp_size": 1, "pp_rank": 0,
                "system_dp_size": 1, "system_dp_rank": 0, "rank_ip": "127.0.0.1",
                "rank_port": 5000, "page_size": 16, "kv_cache_dtype": "bfloat16",
                "kv_layout": null, "unknown_future_key": 1}"#,
        )
        .unwrap();
        assert_eq!(
            first.kv_layout,
            Some(Value::Null),
            "present null stays present"
        );
        assert_eq!(first.dsv41_spec_layout, None);
        let new = to_python_json(&PrefillServerInfo::for_profile(Profile::Sglang0523, &first));
        assert!(
            new.contains(
                r#""decode_allocation_policy": "early", "enable_kv_cache_sharding": false"#
            ),
            "{new}"
        );
        let old = to_python_json(&PrefillServerInfo::for_profile(Profile::Sglang0520, &first));
        for key in [
            "decode_allocation_policy",
            "enable_kv_cache_sharding",
            "kv_layout",
            "dsv41",
        ] {
            assert!(!old.contains(key), "{key} in {old}");
        }
        assert!(old.starts_with(r#"{"attn_tp_size": 2, "attn_cp_size": 1, "dp_size": 1"#));
        assert_eq!(
            to_python_json(&PrefillServerInfo::for_every_profile(&first)),
            old
        );
        let mut sharded = first.clone();
        sharded.enable_kv_cache_sharding = Some(true);
        let only_new = to_python_json(&PrefillServerInfo::for_every_profile(&sharded));
        assert!(
            only_new.contains(r#""enable_kv_cache_sharding": true"#),
            "{only_new}"
        );
    }
}
