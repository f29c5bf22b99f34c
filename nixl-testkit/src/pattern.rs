//! Deterministic byte patterns: fill a buffer from a seed, then verify it elsewhere.

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

/// Checks `buf` against the pattern for `seed`; `Err(i)` is the first wrong index.
pub fn verify(buf: &[u8], seed: u64) -> Result<(), usize> {
    match buf.iter().enumerate().find(|&(i, &b)| b != byte(seed, i)) {
        Some((i, _)) => Err(i),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_verify_and_detect_a_flip() {
        let mut v = vec![0u8; 10_000];
        fill(&mut v, 9);
        assert_eq!(verify(&v, 9), Ok(()));
        assert!(verify(&v, 10).is_err());
        v[5000] ^= 1;
        assert_eq!(verify(&v, 9), Err(5000));
    }
}
