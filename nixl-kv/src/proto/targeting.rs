//! Which prefill ranks a decode rank asks for its pages (SPEC.md §2.4).

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
pub fn targets(local: u32, remote: u32, engine_rank: u32, is_mla: bool) -> Result<Targets, String> {
    if local == 0 || remote == 0 {
        return Err(format!(
            "TP size per DP rank is zero (decode {local}, prefill {remote})"
        ));
    }
    if local == remote {
        let t = engine_rank % local;
        return Ok(Targets {
            ranks: vec![(t, false)],
            required_dst_info_num: 1,
            real: t,
        });
    }
    if !is_mla {
        return Err(format!(
            "PD with different TP sizes per DP rank (decode {local}, prefill {remote}) is only supported for MLA models"
        ));
    }
    if local > remote {
        let ratio = local / remote;
        if ratio == 0 || !local.is_multiple_of(remote) {
            return Err(format!(
                "decode TP {local} is not a multiple of prefill TP {remote}"
            ));
        }
        let t = (engine_rank % local) / ratio;
        Ok(Targets {
            ranks: vec![(t, false)],
            required_dst_info_num: ratio,
            real: t,
        })
    } else {
        if !remote.is_multiple_of(local) {
            return Err(format!(
                "prefill TP {remote} is not a multiple of decode TP {local}"
            ));
        }
        let ratio = remote / local;
        let first = (engine_rank % local) * ratio;
        let ranks = (first..first + ratio).map(|r| (r, r != first)).collect();
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
    fn non_mla_heterogeneous_is_an_error() {
        assert!(targets(2, 4, 0, false).is_err());
        assert!(targets(0, 4, 0, true).is_err());
        assert_eq!(dp_group(10, None, 4), 2);
        assert_eq!(dp_group(10, Some(1), 4), 1);
    }
}
