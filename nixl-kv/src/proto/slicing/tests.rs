//! The slicing rule against a naive byte-level model of every rank's pool.

use proptest::prelude::*;

use super::{HeadSlice, SliceError, SliceParams, sources};

fn params(p: u32, d: u32, pr: u32, dr: u32, h: u32, s: u32, b: u64) -> SliceParams {
    let hd = u64::from(h) * u64::from(p) / u64::from(d);
    SliceParams {
        prefill_tp: p,
        decode_tp: d,
        prefill_rank: pr,
        decode_rank: dr,
        kv_heads: h,
        page_tokens: s,
        src_item: u64::from(s) * u64::from(h) * b,
        dst_item: u64::from(s) * hd * b,
    }
}

#[test]
fn sglang_examples_and_the_fixed_offset() {
    // P = 1, D = 2, H = 8 heads of 256 B, 16 tokens: decode rank 1 takes heads 4..8.
    let s = HeadSlice::new(&params(1, 2, 0, 1, 8, 16, 256)).unwrap();
    assert_eq!(
        (
            s.slice.src_offset,
            s.slice.dst_offset,
            s.slice.len,
            s.slice.src_token,
            s.slice.dst_token
        ),
        (4 * 256, 0, 4 * 256, 8 * 256, 4 * 256)
    );
    // P = 4, D = 2: prefill rank 3 is the second of decode rank 1's group, at head H, not at
    // 3·H (SGLang's offset, past the 2·H-head token slot).
    let s = HeadSlice::new(&params(4, 2, 3, 1, 8, 16, 256)).unwrap();
    assert_eq!(
        (s.slice.src_offset, s.slice.dst_offset, s.slice.len),
        (0, 8 * 256, 8 * 256)
    );
    assert!(s.slice.dst_offset + s.slice.len <= s.slice.dst_token);
    // Same TP: the whole token slot.
    let s = HeadSlice::new(&params(2, 2, 1, 1, 8, 16, 256)).unwrap();
    assert_eq!(
        (s.slice.src_offset, s.slice.dst_offset, s.slice.len),
        (0, 0, s.slice.src_token)
    );
}

#[test]
fn bad_layouts_are_refused_with_a_reason() {
    let ok = params(2, 4, 0, 1, 4, 8, 128);
    assert!(HeadSlice::new(&ok).is_ok());
    let mut p = ok;
    p.decode_tp = 3;
    assert_eq!(
        HeadSlice::new(&p),
        Err(SliceError::Ratio {
            prefill_tp: 2,
            decode_tp: 3
        })
    );
    let mut p = ok;
    p.kv_heads = 1; // 1 head over 2 decode ranks
    p.src_item = 8 * 128;
    assert!(matches!(HeadSlice::new(&p), Err(SliceError::Split { .. })));
    let mut p = ok;
    p.dst_item += 1;
    assert!(matches!(HeadSlice::new(&p), Err(SliceError::Split { .. })));
    let mut p = ok;
    p.dst_item = 8 * 2 * 64; // decode heads of 64 B, prefill heads of 128 B
    assert_eq!(
        HeadSlice::new(&p),
        Err(SliceError::HeadBytes {
            prefill: 128,
            decode: 64
        })
    );
    let mut p = ok;
    p.decode_rank = 2; // fed by prefill rank 1
    assert_eq!(
        HeadSlice::new(&p),
        Err(SliceError::NotPaired {
            prefill: 0,
            decode: 2
        })
    );
    let mut p = ok;
    p.page_tokens = 0;
    assert!(matches!(HeadSlice::new(&p), Err(SliceError::Zero(_))));
    for e in [
        HeadSlice::new(&params(3, 2, 0, 0, 2, 1, 1)).unwrap_err(),
        SliceError::Zero("x"),
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn sources_cover_every_ratio() {
    assert_eq!(sources(4, 2, 1), vec![2, 3]);
    assert_eq!(sources(2, 4, 3), vec![1]);
    assert_eq!(sources(3, 6, 5), vec![2]);
    assert_eq!(sources(6, 3, 2), vec![4, 5]);
    assert_eq!(sources(2, 2, 1), vec![1]);
    assert!(sources(3, 2, 0).is_empty());
    assert!(sources(0, 2, 0).is_empty());
}

#[test]
fn whole_token_slices_of_adjacent_pages_merge() {
    let s = HeadSlice::new(&params(2, 2, 0, 0, 4, 4, 8)).unwrap();
    let c = s.copies(&[0], &[1000], &[(1, 5), (2, 6), (7, 0)]).unwrap();
    let item = 4 * 4 * 8;
    assert_eq!(
        c,
        vec![(item, 1000 + 5 * item, 2 * item), (7 * item, 1000, item)]
    );
    assert_eq!(s.copies(&[u64::MAX], &[0], &[(1, 0)]), None);
}

/// (P, D) with one a multiple of the other, including ratios that are not powers of two.
fn tp_pair() -> impl Strategy<Value = (u32, u32)> {
    (1u32..=3, 1u32..=4, any::<bool>()).prop_map(|(base, k, wide)| {
        if wide {
            (base * k, base)
        } else {
            (base, base * k)
        }
    })
}

/// What byte `j` of head `g` (global) of token `t` of page `page` of buffer `b` holds on the
/// prefill side: never 0, so that an unwritten decode byte shows.
fn model(b: usize, page: u32, t: u32, g: u64, j: u64) -> u8 {
    (1 + (b as u64 * 31 + u64::from(page) * 17 + u64::from(t) * 7 + g * 5 + j) % 250) as u8
}

proptest! {
    /// Every decode rank's requested pages end up holding exactly the heads it owns, each byte
    /// written once, from the prefill ranks `sources` names; nothing else is touched; and a
    /// pair `sources` leaves out is refused.
    #[test]
    fn sliced_copies_match_the_naive_model(
        (pt, dt) in tp_pair(),
        m in 1u32..=3,
        s in 1u32..=4,
        hb in prop::sample::select(vec![1u64, 2, 3, 8]),
        buffers in 1usize..=3,
        pairs in prop::sample::subsequence((0u32..6).collect::<Vec<_>>(), 1..=4),
        shuffle in prop::sample::subsequence((0u32..6).rev().collect::<Vec<_>>(), 4..=4),
    ) {
        const PAGES: u32 = 6;
        // H so that H·P/D is whole: H = m·(D/P) when P < D.
        let h = if pt >= dt { m } else { m * (dt / pt) };
        let hd = u64::from(h) * u64::from(pt) / u64::from(dt);
        let pages: Vec<(u32, u32)> = pairs.iter().zip(&shuffle).map(|(&a, &b)| (a, b)).collect();
        let src_item = u64::from(s) * u64::from(h) * hb;
        let dst_item = u64::from(s) * hd * hb;
        let (src_len, dst_len) = (src_item * u64::from(PAGES), dst_item * u64::from(PAGES));
        // Each rank's pool is one flat array: buffer b at b·len.
        let prefill: Vec<Vec<u8>> = (0..pt)
            .map(|p| {
                let mut v = vec![0u8; buffers * src_len as usize];
                for (i, byte) in v.iter_mut().enumerate() {
                    let i = i as u64;
                    let (b, rest) = (i / src_len, i % src_len);
                    let (page, rest) = (rest / src_item, rest % src_item);
                    let (t, rest) = (rest / (src_item / u64::from(s)), rest % (src_item / u64::from(s)));
                    let (head, j) = (rest / hb, rest % hb);
                    *byte = model(b as usize, page as u32, t as u32, u64::from(p) * u64::from(h) + head, j);
                }
                v
            })
            .collect();
        let src_bases: Vec<u64> = (0..buffers as u64).map(|b| b * src_len).collect();
        let dst_bases: Vec<u64> = (0..buffers as u64).map(|b| b * dst_len).collect();
        for d in 0..dt {
            let mut pool = vec![0u8; buffers * dst_len as usize];
            let mut writes = vec![0u8; pool.len()];
            for p in 0..pt {
                let slice = HeadSlice::new(&SliceParams {
                    prefill_tp: pt,
                    decode_tp: dt,
                    prefill_rank: p,
                    decode_rank: d,
                    kv_heads: h,
                    page_tokens: s,
                    src_item,
                    dst_item,
                });
                if !sources(pt, dt, d).contains(&p) {
                    prop_assert!(matches!(slice, Err(SliceError::NotPaired { .. })), "{slice:?}");
                    continue;
                }
                let slice = slice.unwrap();
                for (from, to, len) in slice.copies(&src_bases, &dst_bases, &pages).unwrap() {
                    let (from, to, len) = (from as usize, to as usize, len as usize);
                    pool[to..to + len].copy_from_slice(&prefill[p as usize][from..from + len]);
                    for w in &mut writes[to..to + len] {
                        *w += 1;
                    }
                }
            }
            for (i, (&byte, &n)) in pool.iter().zip(&writes).enumerate() {
                let i = i as u64;
                let (b, rest) = (i / dst_len, i % dst_len);
                let (page, rest) = (rest / dst_item, rest % dst_item);
                let token = dst_item / u64::from(s);
                let (t, rest) = (rest / token, rest % token);
                let (head, j) = (rest / hb, rest % hb);
                match pages.iter().find(|&&(_, dp)| u64::from(dp) == page) {
                    Some(&(sp, _)) => {
                        prop_assert_eq!(n, 1, "decode {} byte {} written {} times", d, i, n);
                        let want = model(b as usize, sp, t as u32, u64::from(d) * hd + head, j);
                        prop_assert_eq!(byte, want, "decode {} byte {}", d, i);
                    }
                    None => prop_assert_eq!(n, 0, "decode {} page {} not requested", d, page),
                }
            }
        }
    }
}
