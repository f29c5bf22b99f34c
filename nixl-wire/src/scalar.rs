//! Scalar encodings: ASCII decimal integers as Python's `str(int)` writes them, printable ASCII
//! text, and little-endian integer arrays (docs/protocol.md §1.2).

use crate::error::Reason;

/// Parses a non-negative integer written as `str(int)`: digits only, no sign, no leading zero
/// (except `0` itself), within `max`.
pub(crate) fn parse_unsigned(b: &[u8], max: u64) -> Result<u64, Reason> {
    if b.is_empty() {
        return Err(Reason::Empty);
    }
    if !b.iter().all(u8::is_ascii_digit) || (b.len() > 1 && b[0] == b'0') {
        return Err(Reason::NotDecimal);
    }
    let mut v: u64 = 0;
    for &d in b {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or(Reason::OutOfRange)?;
    }
    if v > max {
        Err(Reason::OutOfRange)
    } else {
        Ok(v)
    }
}

/// Parses a possibly negative integer as `str(int)` writes it (`-` only before a non-zero value).
pub(crate) fn parse_signed(b: &[u8]) -> Result<i64, Reason> {
    match b.split_first() {
        Some((b'-', rest)) => {
            let v = parse_unsigned(rest, i64::MAX as u64 + 1)?;
            if v == 0 {
                return Err(Reason::NotDecimal);
            }
            Ok(0i64.wrapping_sub_unsigned(v))
        }
        _ => parse_unsigned(b, i64::MAX as u64).map(|v| v as i64),
    }
}

/// Checks that `b` is printable ASCII (0x20..=0x7e) and returns it as text.
pub(crate) fn ascii(b: &[u8]) -> Result<&str, Reason> {
    if !b.iter().all(|c| (0x20..=0x7e).contains(c)) {
        return Err(Reason::NotAscii);
    }
    // Printable ASCII is valid UTF-8.
    std::str::from_utf8(b).map_err(|_| Reason::NotAscii)
}

/// Decodes concatenated little-endian u64s.
pub(crate) fn u64_le_array(b: &[u8]) -> Result<Vec<u64>, Reason> {
    if !b.len().is_multiple_of(8) {
        return Err(Reason::BadLength {
            len: b.len(),
            elem_size: 8,
        });
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Decodes concatenated little-endian i32s that must be non-negative, as u32.
pub(crate) fn index_le_array(b: &[u8]) -> Result<Vec<u32>, Reason> {
    if !b.len().is_multiple_of(4) {
        return Err(Reason::BadLength {
            len: b.len(),
            elem_size: 4,
        });
    }
    b.chunks_exact(4)
        .enumerate()
        .map(|(position, c)| {
            let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            u32::try_from(v).map_err(|_| Reason::NegativeIndex { position })
        })
        .collect()
}

/// Appends the decimal text of `v`.
pub(crate) fn push_decimal(out: &mut Vec<u8>, v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// The decimal text of `v`.
pub(crate) fn decimal(v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    push_decimal(&mut out, v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_is_strict_like_python_str() {
        assert_eq!(parse_unsigned(b"0", u64::MAX), Ok(0));
        assert_eq!(
            parse_unsigned(b"18446744073709551615", u64::MAX),
            Ok(u64::MAX)
        );
        assert_eq!(
            parse_unsigned(b"18446744073709551616", u64::MAX),
            Err(Reason::OutOfRange)
        );
        assert_eq!(parse_unsigned(b"65536", 65535), Err(Reason::OutOfRange));
        for bad in [
            &b"007"[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"1e3",
            b"None",
            b"\xff",
        ] {
            assert_eq!(
                parse_unsigned(bad, u64::MAX),
                Err(Reason::NotDecimal),
                "{bad:?}"
            );
        }
        assert_eq!(parse_unsigned(b"", 1), Err(Reason::Empty));
    }

    #[test]
    fn signed_accepts_minus_one_but_not_minus_zero() {
        assert_eq!(parse_signed(b"-1"), Ok(-1));
        assert_eq!(parse_signed(b"-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(parse_signed(b"-0"), Err(Reason::NotDecimal));
        assert_eq!(
            parse_signed(b"9223372036854775808"),
            Err(Reason::OutOfRange)
        );
    }

    #[test]
    fn arrays_are_little_endian_and_length_checked() {
        assert_eq!(
            u64_le_array(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
            Ok(vec![1, 256])
        );
        assert_eq!(
            u64_le_array(&[0; 9]),
            Err(Reason::BadLength {
                len: 9,
                elem_size: 8
            })
        );
        assert_eq!(index_le_array(&[5, 0, 0, 0]), Ok(vec![5]));
        assert_eq!(
            index_le_array(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(Reason::NegativeIndex { position: 1 })
        );
        assert_eq!(
            index_le_array(&[0; 6]),
            Err(Reason::BadLength {
                len: 6,
                elem_size: 4
            })
        );
    }

    #[test]
    fn decimal_matches_to_string() {
        for v in [0, 7, 10, 65535, u64::MAX] {
            assert_eq!(decimal(v), v.to_string().into_bytes());
        }
    }
}
