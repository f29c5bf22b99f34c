//! GPU pages (feature `cuda`): storing pages that live in GPU memory and loading pages into it.
//!
//! The POSIX and OBJ backends move host memory only, so GPU pages go through a pinned host
//! staging buffer registered with the connector's agent: device → pinned → storage on the way
//! out, storage → pinned → device on the way in, one staging-buffer-full at a time. (NIXL's GDS
//! backends read and write GPU memory directly; they need `libcufile`, which the NIXL wheels do
//! not ship.)

use nixl_core::Registered;
use nixl_core::cuda::{DeviceBuffer, PinnedBuffer};

use crate::connector::{HiCache, RawTarget};
use crate::error::{Error, Result};

/// A pinned host buffer registered with a connector, for moving GPU pages.
#[derive(Debug)]
pub struct DeviceStaging {
    pinned: Registered<PinnedBuffer>,
}

/// One GPU page: its key, and its byte range in the device buffer.
#[derive(Debug, Clone, Copy)]
pub struct DevicePage<'a> {
    /// The storage key.
    pub key: &'a str,
    /// Byte offset in the device buffer.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

impl HiCache {
    /// A staging buffer of `bytes` pinned host memory (GPU `ordinal`'s context), registered
    /// with this connector. Batches larger than it are moved in several rounds.
    pub fn device_staging(&self, ordinal: u32, bytes: usize) -> Result<DeviceStaging> {
        let pinned = self.register_buffer(PinnedBuffer::new(ordinal, bytes)?)?;
        Ok(DeviceStaging { pinned })
    }

    /// Stores GPU pages of `dev` under their keys.
    pub fn batch_set_device(
        &self,
        staging: &mut DeviceStaging,
        dev: &DeviceBuffer,
        pages: &[DevicePage<'_>],
    ) -> Result<()> {
        for round in rounds(staging, pages)? {
            let base = staging.pinned.region().addr;
            let mut off = 0usize;
            let mut items = Vec::with_capacity(round.len());
            for p in round {
                let slot = &mut staging.pinned.buffer_mut().as_mut_slice()[off..off + p.len];
                dev.read_at(p.offset, slot)?;
                items.push((p.key, raw(base, off, p.len)));
                off += p.len;
            }
            self.batch_set_raw(&items)?;
        }
        Ok(())
    }

    /// Loads keys into their GPU pages of `dev`; per-page hit (`true`) or miss (`false`, the
    /// page left untouched).
    pub fn batch_get_device(
        &self,
        staging: &mut DeviceStaging,
        dev: &mut DeviceBuffer,
        pages: &[DevicePage<'_>],
    ) -> Result<Vec<bool>> {
        let mut hits = Vec::with_capacity(pages.len());
        for round in rounds(staging, pages)? {
            let base = staging.pinned.region().addr;
            let mut off = 0usize;
            let items: Vec<(&str, RawTarget)> = round
                .iter()
                .map(|p| {
                    let item = (p.key, raw(base, off, p.len));
                    off += p.len;
                    item
                })
                .collect();
            let got = self.batch_get_raw(&items)?;
            let mut off = 0usize;
            for (p, &hit) in round.iter().zip(&got) {
                if hit {
                    dev.write_at(
                        p.offset,
                        &staging.pinned.buffer().as_slice()[off..off + p.len],
                    )?;
                }
                off += p.len;
            }
            hits.extend(got);
        }
        Ok(hits)
    }
}

fn raw(base: u64, off: usize, len: usize) -> RawTarget {
    RawTarget {
        addr: base + off as u64,
        len: len as u64,
    }
}

/// Splits `pages` into runs that fit the staging buffer; a page larger than it is an error.
fn rounds<'p, 'k>(
    staging: &DeviceStaging,
    pages: &'p [DevicePage<'k>],
) -> Result<Vec<&'p [DevicePage<'k>]>> {
    split(staging.pinned.buffer().len(), pages)
}

fn split<'p, 'k>(cap: usize, pages: &'p [DevicePage<'k>]) -> Result<Vec<&'p [DevicePage<'k>]>> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0usize, 0usize);
    for (i, p) in pages.iter().enumerate() {
        if p.len > cap {
            return Err(Error::Backend(format!(
                "page {:?} of {} bytes does not fit the {cap}-byte staging buffer",
                p.key, p.len
            )));
        }
        if used + p.len > cap {
            out.push(&pages[start..i]);
            (start, used) = (i, 0);
        }
        used += p.len;
    }
    if start < pages.len() {
        out.push(&pages[start..]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(lens: &[usize]) -> Vec<DevicePage<'static>> {
        lens.iter()
            .map(|&len| DevicePage {
                key: "k",
                offset: 0,
                len,
            })
            .collect()
    }

    #[test]
    fn batches_split_where_the_staging_buffer_is_full() {
        let p = pages(&[4, 4, 4, 2, 8]);
        let r: Vec<usize> = split(8, &p).unwrap().iter().map(|r| r.len()).collect();
        assert_eq!(r, vec![2, 2, 1]);
        assert!(split(8, &[]).unwrap().is_empty());
        assert!(matches!(split(3, &p), Err(Error::Backend(_))));
    }
}
