//! The direct path's registration frame (docs/protocol.md §3.5): a decode on the same node as
//! its prefill exports the GPU allocations holding its KV pools as CUDA IPC handles, so that
//! the prefill can copy pages straight into them with one kernel launch.
//!
//! `nixl-rs:ipc:{host};{gpu};{base},{len},{handle};...` with `host` the decode's node
//! identity (its boot id), `gpu` the CUDA ordinal, and per allocation its start address and
//! length in the decode's address space and its 64-byte handle as 128 lowercase hex digits.

use bytes::Bytes;

const IPC: &[u8] = b"nixl-rs:ipc:";

/// A decode that exported its KV pools (its registration also carries an [`IpcPools`] frame).
pub const CAP_DIRECT: &str = "direct";

/// The most allocations one frame may name.
pub const MAX_IPC_ALLOCATIONS: usize = 4096;

/// One exported allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcAlloc {
    /// Start address in the decode's address space.
    pub base: u64,
    /// Length in bytes (non-zero).
    pub len: u64,
    /// The legacy CUDA IPC handle.
    pub handle: [u8; 64],
}

/// A decode's exported KV pool allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcPools {
    /// The decode's node identity: a prefill maps the handles only when it matches its own.
    pub host: String,
    /// CUDA ordinal of the pools.
    pub gpu: u32,
    /// The allocations, at least one.
    pub allocs: Vec<IpcAlloc>,
}

impl IpcPools {
    /// The trailing frame.
    pub fn frame(&self) -> Bytes {
        let mut f = IPC.to_vec();
        f.extend_from_slice(format!("{};{}", self.host, self.gpu).as_bytes());
        for a in &self.allocs {
            f.extend_from_slice(format!(";{},{},", a.base, a.len).as_bytes());
            for b in a.handle {
                f.extend_from_slice(format!("{b:02x}").as_bytes());
            }
        }
        f.into()
    }

    /// The first well-formed ipc frame in `trailing`; `None` if there is none or it is
    /// malformed (no allocation, too many, an empty or overflowing one, a bad handle, a host
    /// identity that is empty, long or not printable).
    pub fn find(trailing: &[Bytes]) -> Option<Self> {
        trailing.iter().find_map(|f| Self::decode(f))
    }

    fn decode(f: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(f.strip_prefix(IPC)?).ok()?;
        let mut parts = text.split(';');
        let host = parts.next()?;
        let printable = !host.is_empty()
            && host.len() <= 128
            && host.bytes().all(|b| b.is_ascii_graphic() && b != b',');
        if !printable {
            return None;
        }
        let gpu = super::decimal(parts.next()?)?;
        let mut allocs = Vec::new();
        for p in parts {
            if allocs.len() >= MAX_IPC_ALLOCATIONS {
                return None;
            }
            let mut fields = p.split(',');
            let (base, len, hex) = (fields.next()?, fields.next()?, fields.next()?);
            if fields.next().is_some() || hex.len() != 128 {
                return None;
            }
            let a = IpcAlloc {
                base: super::decimal(base)?,
                len: super::decimal(len)?,
                handle: handle(hex)?,
            };
            if a.len == 0 || a.base.checked_add(a.len).is_none() {
                return None;
            }
            allocs.push(a);
        }
        (!allocs.is_empty()).then(|| Self {
            host: host.to_owned(),
            gpu,
            allocs,
        })
    }
}

fn handle(hex: &str) -> Option<[u8; 64]> {
    let mut out = [0u8; 64];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2)?;
        if !pair
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> IpcPools {
        let mut h = [0u8; 64];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        IpcPools {
            host: "6f1c2a9e-0b3d-4c5e-9f70-1a2b3c4d5e6f".into(),
            gpu: 3,
            allocs: vec![
                IpcAlloc {
                    base: 0x7f00_0000_0000,
                    len: 1 << 30,
                    handle: h,
                },
                IpcAlloc {
                    base: 0x7f80_0000_0000,
                    len: 4096,
                    handle: [0xff; 64],
                },
            ],
        }
    }

    #[test]
    fn an_ipc_frame_round_trips_among_other_trailing_frames() {
        let p = pools();
        let trailing = vec![Bytes::from_static(b"nixl-rs:caps:direct"), p.frame()];
        assert_eq!(IpcPools::find(&trailing), Some(p));
    }

    #[test]
    fn malformed_ipc_frames_are_ignored() {
        let good = String::from_utf8(pools().frame().to_vec()).unwrap();
        let bad = [
            "nixl-rs:ipc:host;0".to_owned(),           // no allocation
            good.replacen(";3;", ";03;", 1),           // non-canonical ordinal
            good.replacen(",1073741824,", ",0,", 1),   // empty allocation
            good.replacen("00254a", "0025ga", 1),      // not hex
            good[..good.len() - 2].to_owned(),         // short handle
            good.replacen("6f1c2a9e", "6f1c 2a9e", 1), // host not printable
            format!("{good};1,1"),                     // a field missing
            good.replacen(",1073741824,", ",18446744073709551615,", 1), // overflow
        ];
        for b in bad {
            assert_eq!(IpcPools::find(&[Bytes::from(b.clone())]), None, "{b}");
        }
    }
}
