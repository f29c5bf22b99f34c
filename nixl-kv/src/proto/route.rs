//! How a room's KV pages reach one of its decodes: one [`Route`] per (room, decode), chosen once
//! by [`choose`] at the room's first chunk and kept for every later chunk (docs/protocol.md
//! §3.5, §5.6; ARCHITECTURE.md's routes table).
//!
//! The prefill core gathers what the choice depends on into [`RouteInputs`] (the room's staged
//! decision, whether the decode's pools are mapped on our node, the head slice it takes, the
//! packing area that slice fits) and lowers each chunk by the route it stored. Aux rows always
//! go by NIXL WRITE, whatever the route.

use std::fmt;

use super::FailureReason;
use super::slicing::HeadSlice;

/// Where head slices are gathered into whole decode pages before the WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PackArea {
    /// One staging slot of our GPU staging buffer, gathered by a kernel.
    Gpu {
        /// Pages per packed piece.
        per: u32,
    },
    /// A registered host area, gathered by the CPU.
    Host {
        /// Pages per packed piece.
        per: u32,
    },
}

impl PackArea {
    /// Pages per packed piece.
    pub fn per(self) -> u32 {
        match self {
            Self::Gpu { per } | Self::Host { per } => per,
        }
    }
}

/// One room's way to one decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// Whole pages by NIXL WRITE, as SGLang moves them: indices into prepared lists, or merged
    /// explicit runs.
    Pages,
    /// Head slices by NIXL WRITE, one descriptor per token slot, as SGLang moves them.
    Tokens(HeadSlice),
    /// Head slices gathered into whole decode pages in `area`, then one WRITE per piece.
    Packed(HeadSlice, PackArea),
    /// Same node: one kernel copies our pages (or their head slices) straight into the
    /// decode's mapped pools, then the chunk's usual notification.
    Direct(Option<HeadSlice>),
    /// Our staging slot, one WRITE into the decode's ring, its scatter (every decode of the room
    /// stages, or none does).
    Staged,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pages => f.write_str("pages"),
            Self::Tokens(_) => f.write_str("tokens"),
            Self::Packed(_, PackArea::Gpu { .. }) => f.write_str("packed (GPU)"),
            Self::Packed(_, PackArea::Host { .. }) => f.write_str("packed (host)"),
            Self::Direct(None) => f.write_str("direct"),
            Self::Direct(Some(_)) => f.write_str("direct (head slices)"),
            Self::Staged => f.write_str("staged"),
        }
    }
}

/// What the route to one decode is chosen from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteInputs {
    /// The room is staged to every one of its decodes (decided before any route).
    pub staged: bool,
    /// The decode's KV pools are mapped on our node.
    pub mapped: bool,
    /// The head slice the decode takes (`None`: whole pages), or why it cannot take any.
    pub slice: Option<Result<HeadSlice, FailureReason>>,
    /// Where that slice can be packed (`None`: packing is off, no area holds a page, or the
    /// slice does not fill the decode's token slots).
    pub pack: Option<PackArea>,
}

/// The one decision: staged rooms stage; a decode whose pools are mapped goes direct; head
/// slices are packed where an area takes them, else go per token; whole pages go as pages. A
/// decode whose head slice cannot be cut fails the room, whatever else is possible.
pub fn choose(inputs: &RouteInputs) -> Result<Route, FailureReason> {
    let slice = match &inputs.slice {
        None => None,
        Some(Ok(s)) => Some(*s),
        Some(Err(reason)) => return Err(reason.clone()),
    };
    Ok(match (inputs.staged, inputs.mapped, slice, inputs.pack) {
        (true, _, _, _) => Route::Staged,
        (false, true, slice, _) => Route::Direct(slice),
        (false, false, None, _) => Route::Pages,
        (false, false, Some(s), Some(area)) => Route::Packed(s, area),
        (false, false, Some(s), None) => Route::Tokens(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::slicing::SliceParams;

    fn slice() -> HeadSlice {
        HeadSlice::new(&SliceParams {
            prefill_tp: 1,
            decode_tp: 2,
            prefill_rank: 0,
            decode_rank: 1,
            kv_heads: 8,
            page_tokens: 4,
            src_item: 8 * 4 * 64,
            dst_item: 4 * 4 * 64,
        })
        .unwrap()
    }

    /// Every combination of the inputs against the route it must give.
    #[test]
    fn the_route_table() {
        let s = slice();
        let bad = FailureReason::Slicing("cannot cut".into());
        let gpu = PackArea::Gpu { per: 4 };
        let host = PackArea::Host { per: 9 };
        let slices: [(&str, Option<Result<HeadSlice, FailureReason>>); 3] = [
            ("whole", None),
            ("sliced", Some(Ok(s))),
            ("uncuttable", Some(Err(bad.clone()))),
        ];
        for staged in [false, true] {
            for mapped in [false, true] {
                for (what, sl) in &slices {
                    for pack in [None, Some(gpu), Some(host)] {
                        let inputs = RouteInputs {
                            staged,
                            mapped,
                            slice: sl.clone(),
                            pack,
                        };
                        let want = match (*what, staged, mapped, pack) {
                            ("uncuttable", ..) => Err(bad.clone()),
                            (_, true, _, _) => Ok(Route::Staged),
                            ("whole", false, true, _) => Ok(Route::Direct(None)),
                            ("sliced", false, true, _) => Ok(Route::Direct(Some(s))),
                            ("whole", false, false, _) => Ok(Route::Pages),
                            ("sliced", false, false, Some(a)) => Ok(Route::Packed(s, a)),
                            ("sliced", false, false, None) => Ok(Route::Tokens(s)),
                            _ => unreachable!(),
                        };
                        assert_eq!(choose(&inputs), want, "{inputs:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn routes_name_themselves_for_the_log() {
        let s = slice();
        let named: Vec<String> = [
            Route::Pages,
            Route::Tokens(s),
            Route::Packed(s, PackArea::Gpu { per: 1 }),
            Route::Packed(s, PackArea::Host { per: 1 }),
            Route::Direct(None),
            Route::Direct(Some(s)),
            Route::Staged,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            named,
            [
                "pages",
                "tokens",
                "packed (GPU)",
                "packed (host)",
                "direct",
                "direct (head slices)",
                "staged"
            ]
        );
    }
}
