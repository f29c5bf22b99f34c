//! The packed path's WRITE of one gathered piece (docs/protocol.md §5.6), out of a GPU packing
//! area or a host one alike: the piece's whole decode pages, area → the decode's pages.

use nixl_core::{Agent, MemRegion, MemType, XferDescs, XferOp, XferRequest};

/// The decode a packed chunk goes to.
pub(crate) struct PieceTarget<'a> {
    pub(crate) peer: &'a str,
    pub(crate) mem: MemType,
    pub(crate) gpu: u32,
}

/// Posts the WRITE of a piece gathered from byte `base` of `area` on: each of `copies` is
/// (offset in the piece, decode address, length). The chunk's notification goes with it when
/// `notif` is given (its last piece).
pub(crate) fn write_piece(
    agent: &Agent,
    area: &MemRegion,
    base: u64,
    copies: &[(u64, u64, u64)],
    to: &PieceTarget<'_>,
    notif: Option<&[u8]>,
) -> Result<XferRequest, String> {
    let mut local = XferDescs::with_capacity(area.mem, copies.len());
    let mut remote = XferDescs::with_capacity(to.mem, copies.len());
    for &(off, dst, len) in copies {
        let at = base.checked_add(off);
        if at
            .and_then(|a| a.checked_add(len))
            .is_none_or(|e| e > area.len)
        {
            return Err(format!(
                "{len} bytes at {off} of a piece at {base} of a {}-byte packing area",
                area.len
            ));
        }
        local.push_in(area, base + off, len);
        remote.push(dst, len, u64::from(to.gpu));
    }
    let req = agent
        .create_request(XferOp::Write, &local, &remote, to.peer, notif)
        .map_err(|e| e.to_string())?;
    req.post().map_err(|e| e.to_string())?;
    Ok(req)
}
