//! Bootstrap HTTP bodies and queries (docs/protocol.md §2), as serde types.
//!
//! SGLang's aiohttp server writes JSON with Python's `json.dumps` defaults (`", "` and `": "`
//! separators, non-ASCII escaped); [`to_python_json`] writes the same bytes, so a Rust bootstrap
//! server answers exactly like the Python one.

pub mod v2x;

use std::io;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, MessageKind};
use crate::scalar;

/// The body of `PUT /route` a prefill rank sends at start-up (keys in SGLang's order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillRegistration {
    /// `"Prefill"` (the server stores only that role).
    pub role: String,
    /// The prefill server's TP size.
    pub tp_size: u32,
    /// The prefill server's DP size.
    pub dp_size: u32,
    /// The IP of this rank's ZMQ PULL socket.
    pub rank_ip: String,
    /// The port of this rank's ZMQ PULL socket.
    pub rank_port: u16,
    /// The global TP rank.
    pub engine_rank: u32,
}

/// The answer to `GET /route?engine_rank=-1&target_dp_group=-1`; `None` (JSON `null`) until a
/// prefill has registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelInfo {
    /// The prefill's TP size.
    pub prefill_tp_size: Option<u32>,
    /// The prefill's DP size.
    pub prefill_dp_size: Option<u32>,
}

/// The answer to `GET /route?engine_rank=E&target_dp_group=G`: where rank E of DP group G
/// listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankInfo {
    /// IP of the prefill rank's PULL socket.
    pub rank_ip: String,
    /// Port of the prefill rank's PULL socket.
    pub rank_port: u16,
}

/// The query of `GET /route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteQuery {
    /// The TP rank inside the DP group, or −1.
    pub engine_rank: i64,
    /// The DP group, or −1.
    pub target_dp_group: i64,
}

impl RouteQuery {
    /// The parallel-info query (both −1).
    pub const PARALLEL_INFO: Self = Self {
        engine_rank: -1,
        target_dp_group: -1,
    };

    /// Whether this asks for [`ParallelInfo`] rather than a [`RankInfo`].
    pub fn is_parallel_info(&self) -> bool {
        *self == Self::PARALLEL_INFO
    }

    /// `engine_rank=E&target_dp_group=G`.
    pub fn to_query_string(&self) -> String {
        format!(
            "engine_rank={}&target_dp_group={}",
            self.engine_rank, self.target_dp_group
        )
    }

    /// Parses a query string (without `?`). A missing or empty parameter is the server's 400
    /// case; other parameters are ignored, as aiohttp does.
    pub fn parse(query: &str) -> Result<Self, DecodeError> {
        let field = |i: usize, name: &'static str| -> Result<i64, DecodeError> {
            let err = |r| DecodeError::field(MessageKind::RouteQuery, i, name, r);
            let v = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .unwrap_or("");
            scalar::parse_signed(v.as_bytes()).map_err(err)
        };
        Ok(Self {
            engine_rank: field(0, "engine_rank")?,
            target_dp_group: field(1, "target_dp_group")?,
        })
    }
}

/// Serializes `value` as Python's `json.dumps(value)` does by default.
pub fn to_python_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Our body types serialize infallibly (no maps with non-string keys, no non-finite floats).
    if value.serialize(&mut ser).is_err() {
        return String::from("null");
    }
    // The formatter writes ASCII only.
    String::from_utf8(out).unwrap_or_default()
}

/// serde_json output in `json.dumps` style: `", "`, `": "`, `ensure_ascii=True`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                let mut b = [0u8; 1];
                w.write_all(c.encode_utf8(&mut b).as_bytes())?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_style_json() {
        let p = ParallelInfo {
            prefill_tp_size: Some(1),
            prefill_dp_size: None,
        };
        assert_eq!(
            to_python_json(&p),
            r#"{"prefill_tp_size": 1, "prefill_dp_size": null}"#
        );
        let r = RankInfo {
            rank_ip: "héllo".into(),
            rank_port: 1,
        };
        assert_eq!(
            to_python_json(&r),
            r#"{"rank_ip": "h\u00e9llo", "rank_port": 1}"#
        );
        assert_eq!(to_python_json(&vec![1, 2]), "[1, 2]");
    }

    #[test]
    fn route_query_parses_and_rejects_missing_inputs() {
        assert_eq!(
            RouteQuery::parse("engine_rank=-1&target_dp_group=-1").unwrap(),
            RouteQuery::PARALLEL_INFO
        );
        let q = RouteQuery::parse("target_dp_group=3&x=y&engine_rank=2").unwrap();
        assert_eq!(
            q,
            RouteQuery {
                engine_rank: 2,
                target_dp_group: 3
            }
        );
        assert_eq!(q.to_query_string(), "engine_rank=2&target_dp_group=3");
        assert!(RouteQuery::parse("engine_rank=1").is_err());
        assert!(RouteQuery::parse("engine_rank=&target_dp_group=1").is_err());
        assert!(RouteQuery::parse("engine_rank=a&target_dp_group=1").is_err());
    }
}
