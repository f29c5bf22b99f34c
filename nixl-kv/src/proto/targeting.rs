//! Which prefill ranks a decode rank asks for its pages (docs/protocol.md §5).

/// Why two parallel layouts cannot be paired.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetingError {
    /// A TP size per DP rank is zero.
    #[error("TP size per DP rank is zero (decode {decode}, prefill {prefill})")]
    ZeroTp {
        /// Decode TP size per DP rank.
        decode: u32,
        /// Prefill TP size per DP rank.
        prefill: u32,
    },
    /// Different TP sizes for a model that is not MLA.
    #[error(
        "PD with different TP sizes per DP rank (decode {decode}, prefill {prefill}) is only supported for MLA models"
    )]
    HeterogeneousNonMla {
        /// Decode TP size per DP rank.
        decode: u32,
        /// Prefill TP size per DP rank.
        prefill: u32,
    },
    /// The larger TP size is not a multiple of the smaller.
    #[error("TP sizes are not multiples of each other (decode {decode}, prefill {prefill})")]
    NotMultiple {
        /// Decode TP size per DP rank.
        decode: u32,
        /// Prefill TP size per DP rank.
        prefill: u32,
    },
}

/// The prefill ranks one decode rank sends a TransferInfo to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// `(prefill TP rank inside the DP group, is_dummy)`, in order; exactly one is real.
    pub ranks: Vec<(u32, bool)>,
    /// The value of the TransferInfo's last frame.
    pub required_dst_info_num: u32,
    /// The real target (the connection-pool key uses it).
    pub real: u32,
}

/// Computes the targets. `local` = decode TP size per DP rank, `remote` = prefill TP size per
/// DP rank, `engine_rank` = the decode's rank inside its TP group.
///
/// Different sizes are supported for MLA models only (their latent cache is replicated across
/// TP ranks), as in SGLang; for others this is an error, not SGLang's AssertionError.
pub fn targets(
    local: u32,
    remote: u32,
    engine_rank: u32,
    is_mla: bool,
) -> Result<Targets, TargetingError> {
    targets_sliced(local, remote, engine_rank, is_mla, false)
}

/// [`targets`], and with `sliced` different sizes for a model that is not MLA too
/// (docs/protocol.md §5.6): a decode larger than its prefill asks the one prefill rank holding
/// its heads, which slices them out for each of the `local / remote` decode ranks it feeds; a
/// smaller one asks all `remote / local` prefill ranks holding its heads, every one a real
/// writer. The prefills must slice heads (SGLang 0.5.2 and later, or ours given
/// `KvArgs::heads`).
pub fn targets_sliced(
    local: u32,
    remote: u32,
    engine_rank: u32,
    is_mla: bool,
    sliced: bool,
) -> Result<Targets, TargetingError> {
    let sizes = (local, remote);
    if local == 0 || remote == 0 {
        return Err(TargetingError::ZeroTp {
            decode: local,
            prefill: remote,
        });
    }
    if local == remote {
        let t = engine_rank % local;
        return Ok(Targets {
            ranks: vec![(t, false)],
            required_dst_info_num: 1,
            real: t,
        });
    }
    if !(is_mla || sliced) {
        return Err(TargetingError::HeterogeneousNonMla {
            decode: sizes.0,
            prefill: sizes.1,
        });
    }
    if local > remote {
        let ratio = local / remote;
        if ratio == 0 || !local.is_multiple_of(remote) {
            return Err(TargetingError::NotMultiple {
                decode: sizes.0,
                prefill: sizes.1,
            });
        }
        let t = (engine_rank % local) / ratio;
        Ok(Targets {
            ranks: vec![(t, false)],
            required_dst_info_num: ratio,
            real: t,
        })
    } else {
        if !remote.is_multiple_of(local) {
            return Err(TargetingError::NotMultiple {
                decode: sizes.0,
                prefill: sizes.1,
            });
        }
        let ratio = remote / local;
        let first = (engine_rank % local) * ratio;
        // MLA: the first rank writes, the others are dummies. Sliced: every one writes its heads.
        let ranks = (first..first + ratio)
            .map(|r| (r, is_mla && r != first))
            .collect();
        Ok(Targets {
            ranks,
            required_dst_info_num: 1,
            real: first,
        })
    }
}

/// The prefill DP group a request goes to: the request's DP rank if given, else
/// `room % prefill_dp_size`.
pub fn dp_group(room: u64, dp_rank: Option<u32>, prefill_dp_size: u32) -> u32 {
    dp_rank.unwrap_or_else(|| (room % u64::from(prefill_dp_size.max(1))) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tp_targets_own_rank() {
        let t = targets(4, 4, 6, false).unwrap();
        assert_eq!(t.ranks, vec![(2, false)]);
        assert_eq!(t.required_dst_info_num, 1);
    }

    #[test]
    fn mla_decode_larger_shares_a_prefill_rank() {
        let t = targets(8, 2, 5, true).unwrap();
        assert_eq!(t.ranks, vec![(1, false)]);
        assert_eq!(t.required_dst_info_num, 4);
    }

    #[test]
    fn mla_prefill_larger_adds_dummies() {
        let t = targets(2, 8, 1, true).unwrap();
        assert_eq!(t.ranks, vec![(4, false), (5, true), (6, true), (7, true)]);
        assert_eq!((t.required_dst_info_num, t.real), (1, 4));
    }

    #[test]
    fn sliced_decodes_ask_the_ranks_holding_their_heads() {
        let t = targets_sliced(4, 2, 3, false, true).unwrap();
        assert_eq!((t.ranks, t.required_dst_info_num), (vec![(1, false)], 2));
        let t = targets_sliced(6, 3, 4, false, true).unwrap();
        assert_eq!((t.ranks, t.required_dst_info_num), (vec![(2, false)], 2));
        // A larger prefill: every rank holding our heads writes.
        let t = targets_sliced(2, 4, 1, false, true).unwrap();
        assert_eq!(
            (t.ranks, t.required_dst_info_num),
            (vec![(2, false), (3, false)], 1)
        );
        assert!(matches!(
            targets_sliced(2, 4, 0, false, false),
            Err(TargetingError::HeterogeneousNonMla { .. })
        ));
        assert!(targets_sliced(4, 3, 0, false, true).is_err());
    }

    #[test]
    fn non_mla_heterogeneous_is_an_error() {
        assert!(targets(2, 4, 0, false).is_err());
        assert!(targets(0, 4, 0, true).is_err());
        assert_eq!(dp_group(10, None, 4), 2);
        assert_eq!(dp_group(10, Some(1), 4), 1);
    }
}
