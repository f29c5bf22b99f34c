//! Page allocation as an inference server's KV allocator hands pages out: random runs.

use rand::Rng;

/// Takes `n` pages from `free` in runs of 1 to 8 consecutive pages where the free list allows,
/// starting at random places (SGLang's allocator hands out mostly short runs). `free` is sorted
/// first; the pages taken are removed from it.
///
/// # Panics
///
/// If `free` holds fewer than `n` pages (a caller error).
pub fn take_page_runs(free: &mut Vec<u32>, n: usize, rng: &mut impl Rng) -> Vec<u32> {
    assert!(free.len() >= n, "{n} pages wanted, {} free", free.len());
    free.sort_unstable();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let run = rng.random_range(1..=8).min(n - out.len());
        let start = rng.random_range(0..free.len());
        let mut k = start;
        while k < free.len() && k - start < run && (k == start || free[k] == free[k - 1] + 1) {
            k += 1;
        }
        out.extend(free.drain(start..k));
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn takes_distinct_free_pages_mostly_in_runs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut free: Vec<u32> = (0..600).rev().collect();
        let got = take_page_runs(&mut free, 256, &mut rng);
        assert_eq!(got.len(), 256);
        let mut seen = got.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256, "pages repeat");
        assert!(
            got.iter().all(|p| !free.contains(p)),
            "taken pages stay free"
        );
        assert_eq!(free.len(), 600 - 256);
        let adjacent = got.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(adjacent > 64, "only {adjacent} adjacent pairs: not runs");
    }
}
