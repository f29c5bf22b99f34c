//! Deterministic byte patterns: fill a buffer from a seed, compare it elsewhere.

/// The byte at position `i` of the pattern for `seed`. Period 251 (prime), shifted by the seed
/// and by the 4 KiB block, so misplaced blocks are caught.
pub fn byte(seed: u64, i: usize) -> u8 {
    let block = (i / 4096) as u64;
    ((seed
        .wrapping_mul(31)
        .wrapping_add(i as u64)
        .wrapping_add(block.wrapping_mul(17)))
        % 251) as u8
}

/// Fills `buf` with the pattern for `seed`.
pub fn fill(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte(seed, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_differ_and_seeds_differ() {
        let mut a = vec![0u8; 3 * 4096];
        fill(&mut a, 9);
        let mut b = a.clone();
        fill(&mut b, 10);
        assert_ne!(a, b);
        assert_ne!(a[..4096], a[4096..8192]);
    }
}
