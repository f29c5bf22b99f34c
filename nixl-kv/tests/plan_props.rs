//! Planner invariants: runs cover every page pair once, are maximal, and the KV plan moves
//! exactly the bytes of a naive per-page expansion.
#![allow(clippy::unwrap_used, reason = "test code")]

use nixl_kv::proto::plan::{group_runs, plan_kv};
use proptest::prelude::*;

fn pages() -> impl Strategy<Value = (Vec<u32>, Vec<u32>)> {
    (0usize..200).prop_flat_map(|n| {
        let seq = || {
            prop_oneof![
                // Mostly runs of consecutive pages, sometimes jumps or repeats.
                (0u32..10_000, 1usize..9).prop_map(|(s, l)| (s..s + l as u32).collect::<Vec<_>>()),
                (0u32..10_000).prop_map(|p| vec![p]),
            ]
        };
        (
            prop::collection::vec(seq(), n / 4 + 1),
            prop::collection::vec(seq(), n / 4 + 1),
        )
            .prop_map(|(a, b)| {
                let a: Vec<u32> = a.into_iter().flatten().collect();
                let b: Vec<u32> = b.into_iter().flatten().collect();
                let n = a.len().min(b.len());
                (a[..n].to_vec(), b[..n].to_vec())
            })
    })
}

proptest! {
    #[test]
    fn runs_cover_each_pair_once_and_are_maximal((src, dst) in pages()) {
        let mut runs = Vec::new();
        group_runs(&src, &dst, &mut runs);
        let mut i = 0usize;
        for (k, r) in runs.iter().enumerate() {
            for j in 0..r.len as usize {
                prop_assert_eq!(src[i + j], r.src + j as u32);
                prop_assert_eq!(dst[i + j], r.dst + j as u32);
            }
            i += r.len as usize;
            if let Some(next) = runs.get(k + 1) {
                // Maximal: the next run could not have been joined.
                prop_assert!(!(next.src == r.src + r.len && next.dst == r.dst + r.len));
            }
        }
        prop_assert_eq!(i, src.len());
    }

    #[test]
    fn kv_plan_equals_the_naive_per_page_copy((src, dst) in pages(), items in prop::collection::vec(1u64..9000, 1..5)) {
        let sp: Vec<u64> = (0..items.len() as u64).map(|i| 0x1_0000_0000 * (i + 1)).collect();
        let dp: Vec<u64> = (0..items.len() as u64).map(|i| 0x100_0000_0000 * (i + 1)).collect();
        let mut runs = Vec::new();
        group_runs(&src, &dst, &mut runs);
        let mut ops = Vec::new();
        plan_kv(&sp, &dp, &items, &runs, &mut ops);
        // Expand the plan page by page (ops are buffer-major, one per run) and compare with the
        // naive per-page copy list, in order.
        prop_assert_eq!(ops.len(), items.len() * runs.len());
        let mut expanded = Vec::new();
        for (k, op) in ops.iter().enumerate() {
            let item = items[k / runs.len().max(1)];
            for j in 0..op.len / item {
                expanded.push((op.src + j * item, op.dst + j * item));
            }
        }
        let mut naive = Vec::new();
        for (b, item) in items.iter().enumerate() {
            for (s, d) in src.iter().zip(&dst) {
                naive.push((sp[b] + u64::from(*s) * item, dp[b] + u64::from(*d) * item));
            }
        }
        prop_assert_eq!(expanded, naive);
        prop_assert_eq!(ops.len(), items.len() * runs.len());
    }
}
