//! Pages made of several host ranges: SGLang 0.5.23's host-pool layouts move a page between
//! the pool and storage without a copy, one object per KV buffer (`page_first`,
//! `page_first_direct`) or one object gathered from every layer (`layer_first`).

use crate::connector::{HiCache, Item, RawTarget};
use crate::error::{Error, Result};
use crate::key::PagePart;

/// One stored object of a page: its key, which part of the page it holds, and the registered
/// host ranges it is made of, in the object's byte order (written one after another from
/// offset 0; read back into the same ranges).
#[derive(Debug, Clone, Copy)]
pub struct PageObject<'a> {
    /// The page's key (SGLang's hash), without suffixes.
    pub key: &'a str,
    /// The part of the page.
    pub part: PagePart,
    /// The host ranges, in object order.
    pub ranges: &'a [RawTarget],
}

impl HiCache {
    fn objects(&self, objects: &[PageObject<'_>]) -> Result<Vec<Item>> {
        objects
            .iter()
            .map(|o| {
                if o.ranges.len() > 1 && self.dir().is_none() {
                    return Err(Error::Mismatch(format!(
                        "key {}: an object store takes a page as one host range, not {}",
                        o.key,
                        o.ranges.len()
                    )));
                }
                Ok(Item {
                    name: self.part_name(o.key, o.part)?,
                    segs: o.ranges.to_vec(),
                })
            })
            .collect()
    }

    /// Stores every object from its registered host ranges; as [`HiCache::batch_set_raw`]
    /// (each object holds its previous bytes or its new ones, complete).
    pub fn batch_set_objects(&self, objects: &[PageObject<'_>]) -> Result<()> {
        let items = self.objects(objects)?;
        self.write(&items).map_err(|e| unregistered(e, objects))
    }

    /// Reads every object into its registered host ranges; per-object hit (`true`) or miss
    /// (`false`: not stored, or shorter than its ranges together).
    pub fn batch_get_objects(&self, objects: &[PageObject<'_>]) -> Result<Vec<bool>> {
        let items = self.objects(objects)?;
        self.read(&items).map_err(|e| unregistered(e, objects))
    }

    /// The number of leading keys whose every part in `parts` is stored (SGLang 0.5.23's
    /// `batch_exists`).
    pub fn batch_exists_parts(&self, keys: &[&str], parts: &[PagePart]) -> Result<usize> {
        let mut n = 0;
        for k in keys {
            for &p in parts {
                if !self.part_exists(k, p)? {
                    return Ok(n);
                }
            }
            n += 1;
        }
        Ok(n)
    }
}

fn unregistered(e: Error, objects: &[PageObject<'_>]) -> Error {
    if crate::connector::is_unregistered(&e) {
        let first = objects.iter().flat_map(|o| o.ranges).next();
        let (addr, len) = first.map_or((0, 0), |t| (t.addr, t.len));
        Error::Unregistered { addr, len }
    } else {
        e
    }
}
