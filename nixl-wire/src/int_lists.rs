//! SGLang ≥ 0.5.20's `pack_int_lists` (docs/protocol.md §10.2): a list of integer lists in one
//! frame, as `<u32 n><n × u32 byte length>` and then each list's little-endian integers back to
//! back. An empty outer list is an empty frame (no header).

use crate::error::Reason;

/// An integer type a packed list can hold: `Q` (u64), `I` (u32) or `i` (i32) in Python's
/// `struct` letters.
pub trait PackedInt: Copy + Sized {
    /// Bytes per element.
    const WIDTH: usize;
    /// Reads one element from exactly [`PackedInt::WIDTH`] bytes.
    fn read(b: &[u8]) -> Self;
    /// Appends one element.
    fn write(self, out: &mut Vec<u8>);
}

macro_rules! packed_int {
    ($t:ty, $w:literal) => {
        impl PackedInt for $t {
            const WIDTH: usize = $w;
            fn read(b: &[u8]) -> Self {
                let mut a = [0u8; $w];
                a.copy_from_slice(&b[..$w]);
                <$t>::from_le_bytes(a)
            }
            fn write(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}

packed_int!(u64, 8);
packed_int!(u32, 4);
packed_int!(i32, 4);

/// Encodes `lists` as `pack_int_lists` does (empty outer list: empty frame).
pub fn pack_int_lists<T: PackedInt>(lists: &[Vec<T>]) -> Vec<u8> {
    if lists.is_empty() {
        return Vec::new();
    }
    let body: usize = lists.iter().map(|l| l.len() * T::WIDTH).sum();
    let mut out = Vec::with_capacity(4 + 4 * lists.len() + body);
    push_u32(&mut out, lists.len());
    for l in lists {
        push_u32(&mut out, l.len() * T::WIDTH);
    }
    for l in lists {
        for &v in l {
            v.write(&mut out);
        }
    }
    out
}

fn push_u32(out: &mut Vec<u8>, v: usize) {
    // Lists that fit one frame have fewer than 2^32 bytes.
    out.extend_from_slice(&u32::try_from(v).unwrap_or(u32::MAX).to_le_bytes());
}

fn read_u32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Decodes a `pack_int_lists` frame. Stricter than SGLang (which slices silently): the header
/// must fit and count at least one list, every length must be a multiple of the element width,
/// and the lists must fill the frame exactly, so what decodes re-encodes to the same bytes. Nothing is allocated beyond what the frame itself holds.
pub fn unpack_int_lists<T: PackedInt>(b: &[u8]) -> Result<Vec<Vec<T>>, Reason> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |what: &'static str| Reason::Malformed { what };
    let n = read_u32(b, 0).ok_or_else(|| bad("list count cut short"))?;
    if n == 0 {
        // SGLang writes no lists as an empty frame, never as a zero count.
        return Err(bad("zero lists written as a header"));
    }
    // Each list needs 4 header bytes: a count the frame cannot hold is refused before use.
    if n > (b.len() - 4) / 4 {
        return Err(bad("list count larger than the frame"));
    }
    let mut at = 4 + 4 * n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let len = read_u32(b, 4 + 4 * i).ok_or_else(|| bad("list length cut short"))?;
        if !len.is_multiple_of(T::WIDTH) {
            return Err(Reason::BadLength {
                len,
                elem_size: T::WIDTH,
            });
        }
        let body = at
            .checked_add(len)
            .and_then(|end| b.get(at..end))
            .ok_or_else(|| bad("list longer than the frame"))?;
        out.push(body.chunks_exact(T::WIDTH).map(T::read).collect());
        at += len;
    }
    if at != b.len() {
        return Err(bad("bytes after the last list"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn matches_sglangs_bytes() {
        assert!(pack_int_lists::<u64>(&[]).is_empty());
        // pack_int_lists([[1, 2], []], "I")
        let b = pack_int_lists(&[vec![1u32, 2], vec![]]);
        assert_eq!(
            b,
            [2, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]
        );
        assert_eq!(
            unpack_int_lists::<u32>(&b).unwrap(),
            vec![vec![1, 2], vec![]]
        );
        let neg = pack_int_lists(&[vec![-1i32]]);
        assert_eq!(neg, [1, 0, 0, 0, 4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(unpack_int_lists::<i32>(&neg).unwrap(), vec![vec![-1]]);
    }

    #[test]
    fn refuses_what_does_not_fill_the_frame_exactly() {
        for bad in [
            &[1u8, 0, 0][..],
            &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
            &[1, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0],
            &[1, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 9],
            &[1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0],
            &[0, 0, 0, 0],
        ] {
            assert!(unpack_int_lists::<u32>(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(lists in proptest::collection::vec(proptest::collection::vec(any::<u64>(), 0..5), 0..5)) {
            let b = pack_int_lists(&lists);
            prop_assert_eq!(unpack_int_lists::<u64>(&b).unwrap(), lists);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpack_int_lists::<u32>(&b);
            let _ = unpack_int_lists::<u64>(&b);
        }
    }
}
