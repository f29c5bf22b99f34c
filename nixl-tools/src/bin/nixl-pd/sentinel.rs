//! The decode's stray-write check: every page and aux row that no live request owns holds a
//! sentinel, checked a few pages at a time while the decode runs and all at once at its end.
//!
//! KV sentinel bytes are 251..=255 (a per-page constant, [`kv`]): the prefill's KV pattern is
//! taken mod 251, so no byte it sends can equal one. An aux row's sentinel is a constant too
//! ([`aux`]); the prefill's aux rows count up byte by byte, so none equals a constant row.

/// The memory the sentinel lives in.
pub(crate) trait Target {
    /// KV buffers (each of the same number of pages).
    fn kv_buffers(&self) -> usize;
    /// Aux buffers (each of the same number of slots).
    fn aux_buffers(&self) -> usize;
    /// Fills all of KV buffer `b`, page `p` with `byte(p)`.
    fn fill_kv_buffer(&mut self, b: usize, byte: &dyn Fn(u32) -> u8) -> anyhow::Result<()>;
    /// Fills page `p` of KV buffer `b` with `byte`.
    fn fill_kv_page(&mut self, b: usize, p: u32, byte: u8) -> anyhow::Result<()>;
    /// The first offset of page `p` of KV buffer `b` that does not hold `byte`, and its value;
    /// `scratch` is for a copy where the page is not host memory.
    fn kv_page_differs(
        &self,
        b: usize,
        p: u32,
        byte: u8,
        scratch: &mut Vec<u8>,
    ) -> anyhow::Result<Option<(usize, u8)>>;
    /// Slot `slot`'s row of aux buffer `k`.
    fn aux_row(&self, k: usize, slot: u32) -> &[u8];
    fn aux_row_mut(&mut self, k: usize, slot: u32) -> &mut [u8];
}

/// The sentinel byte of page `p` of KV buffer `b`.
pub(crate) fn kv(b: usize, p: u32) -> u8 {
    251 + ((b as u64 + u64::from(p)) % 5) as u8
}

/// The sentinel byte of aux buffer `k`'s row for `slot`.
pub(crate) fn aux(k: usize, slot: u32) -> u8 {
    251 + ((k as u64 + u64::from(slot)) % 5) as u8
}

/// Stray writes reported on stderr one by one, at most; later ones are only counted.
const REPORTED: u64 = 20;

/// What the checks found.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Free pages checked (each in every KV buffer).
    pub(crate) checked_pages: u64,
    /// Free aux slots checked (each in every aux buffer).
    pub(crate) checked_rows: u64,
    /// Free pages found written (a page counts once per check that found it written).
    pub(crate) stray_pages: u64,
    /// Free aux slots found written.
    pub(crate) stray_rows: u64,
}

/// Fills and checks the sentinel; does nothing when off.
pub(crate) struct Sentinel {
    on: bool,
    counts: Counts,
    scratch: Vec<u8>,
}

impl Sentinel {
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on,
            counts: Counts::default(),
            scratch: Vec::new(),
        }
    }

    pub(crate) fn on(&self) -> bool {
        self.on
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// Fills every page and every aux row: before any peer learns where the memory is.
    pub(crate) fn fill_all(&mut self, m: &mut impl Target, slots: u32) -> anyhow::Result<()> {
        if !self.on {
            return Ok(());
        }
        for b in 0..m.kv_buffers() {
            m.fill_kv_buffer(b, &|p| kv(b, p))?;
        }
        for slot in 0..slots {
            fill_slot(m, slot);
        }
        Ok(())
    }

    /// Puts the sentinel back in a request's pages and aux slot, before they are freed.
    pub(crate) fn refill(
        &mut self,
        m: &mut impl Target,
        pages: &[u32],
        slot: u32,
    ) -> anyhow::Result<()> {
        if !self.on {
            return Ok(());
        }
        for b in 0..m.kv_buffers() {
            for &p in pages {
                m.fill_kv_page(b, p, kv(b, p))?;
            }
        }
        fill_slot(m, slot);
        Ok(())
    }

    /// Checks free page `p` in every KV buffer. A page found written is counted, reported
    /// (naming `last`, the room that owned it last) and refilled, so that it counts once per
    /// write. Returns whether the page was clean.
    pub(crate) fn check_page(
        &mut self,
        m: &mut impl Target,
        p: u32,
        last: Option<u64>,
    ) -> anyhow::Result<bool> {
        if !self.on {
            return Ok(true);
        }
        self.counts.checked_pages += 1;
        let mut stray = None;
        for b in 0..m.kv_buffers() {
            if let Some((j, got)) = m.kv_page_differs(b, p, kv(b, p), &mut self.scratch)? {
                stray = Some((b, j, got));
                break;
            }
        }
        let Some((b, j, got)) = stray else {
            return Ok(true);
        };
        self.counts.stray_pages += 1;
        if self.counts.stray_pages <= REPORTED {
            eprintln!(
                "stray write: free KV page {p} (buffer {b}, byte {j}) holds {got:#04x}, not the sentinel {:#04x}; {}",
                kv(b, p),
                owner(last)
            );
        }
        for b in 0..m.kv_buffers() {
            m.fill_kv_page(b, p, kv(b, p))?;
        }
        Ok(false)
    }

    /// Checks free aux slot `slot` in every aux buffer, as [`Self::check_page`] does a page.
    pub(crate) fn check_slot(&mut self, m: &mut impl Target, slot: u32, last: Option<u64>) -> bool {
        if !self.on {
            return true;
        }
        self.counts.checked_rows += 1;
        let stray = (0..m.aux_buffers()).find_map(|k| {
            let s = aux(k, slot);
            let row = m.aux_row(k, slot);
            row.iter().position(|&x| x != s).map(|j| (k, j, row[j]))
        });
        let Some((k, j, got)) = stray else {
            return true;
        };
        self.counts.stray_rows += 1;
        if self.counts.stray_rows <= REPORTED {
            eprintln!(
                "stray write: free aux slot {slot} (buffer {k}, byte {j}) holds {got:#04x}, not the sentinel {:#04x}; {}",
                aux(k, slot),
                owner(last)
            );
        }
        fill_slot(m, slot);
        false
    }
}

fn fill_slot(m: &mut impl Target, slot: u32) {
    for k in 0..m.aux_buffers() {
        m.aux_row_mut(k, slot).fill(aux(k, slot));
    }
}

fn owner(last: Option<u64>) -> String {
    last.map_or_else(
        || "never owned".to_owned(),
        |r| format!("last owned by room {r}"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Plain host vectors standing in for the registered pools.
    pub(crate) struct Mem {
        pub(crate) kv: Vec<Vec<u8>>,
        pub(crate) aux: Vec<Vec<u8>>,
        pub(crate) page: usize,
        pub(crate) row: usize,
    }

    impl Mem {
        pub(crate) fn new(buffers: usize, pages: usize, page: usize, slots: usize) -> Self {
            let row = 8;
            Self {
                kv: vec![vec![0; pages * page]; buffers],
                aux: vec![vec![0; slots * row]; 2],
                page,
                row,
            }
        }
    }

    impl Target for Mem {
        fn kv_buffers(&self) -> usize {
            self.kv.len()
        }
        fn aux_buffers(&self) -> usize {
            self.aux.len()
        }
        fn fill_kv_buffer(&mut self, b: usize, byte: &dyn Fn(u32) -> u8) -> anyhow::Result<()> {
            for (p, c) in self.kv[b].chunks_mut(self.page).enumerate() {
                c.fill(byte(p as u32));
            }
            Ok(())
        }
        fn fill_kv_page(&mut self, b: usize, p: u32, byte: u8) -> anyhow::Result<()> {
            let p = p as usize;
            self.kv[b][p * self.page..(p + 1) * self.page].fill(byte);
            Ok(())
        }
        fn kv_page_differs(
            &self,
            b: usize,
            p: u32,
            byte: u8,
            _: &mut Vec<u8>,
        ) -> anyhow::Result<Option<(usize, u8)>> {
            let p = p as usize;
            let page = &self.kv[b][p * self.page..(p + 1) * self.page];
            Ok(page.iter().position(|&x| x != byte).map(|j| (j, page[j])))
        }
        fn aux_row(&self, k: usize, slot: u32) -> &[u8] {
            let s = slot as usize;
            &self.aux[k][s * self.row..(s + 1) * self.row]
        }
        fn aux_row_mut(&mut self, k: usize, slot: u32) -> &mut [u8] {
            let s = slot as usize;
            &mut self.aux[k][s * self.row..(s + 1) * self.row]
        }
    }

    #[test]
    fn no_kv_byte_is_a_sentinel() {
        for b in 0..8 {
            for p in 0..600u32 {
                for j in 0..300 {
                    assert_ne!(crate::kv_byte(b, u64::from(p), j), kv(b, p));
                }
            }
        }
    }

    #[test]
    fn a_write_into_a_free_page_or_row_is_found_once() {
        let mut m = Mem::new(3, 16, 64, 4);
        let mut s = Sentinel::new(true);
        s.fill_all(&mut m, 4).unwrap();
        for p in 0..16 {
            assert!(s.check_page(&mut m, p, None).unwrap());
        }
        for slot in 0..4 {
            assert!(s.check_slot(&mut m, slot, None));
        }
        // One late byte in buffer 2 of page 5, one in aux buffer 1 of slot 3.
        m.kv[2][5 * 64 + 17] = crate::kv_byte(2, 9, 17);
        m.aux[1][3 * 8 + 7] ^= 1;
        assert!(!s.check_page(&mut m, 5, Some(42)).unwrap());
        assert!(!s.check_slot(&mut m, 3, Some(42)));
        // Reported once and refilled: the next check is clean.
        assert!(s.check_page(&mut m, 5, Some(42)).unwrap());
        assert!(s.check_slot(&mut m, 3, Some(42)));
        let c = s.counts();
        assert_eq!((c.stray_pages, c.stray_rows), (1, 1));
        assert_eq!((c.checked_pages, c.checked_rows), (18, 6));
    }

    #[test]
    fn refill_restores_a_used_page_and_off_checks_nothing() {
        let mut m = Mem::new(2, 8, 32, 2);
        let mut s = Sentinel::new(true);
        s.fill_all(&mut m, 2).unwrap();
        // A request's pages 2 and 3 and slot 1 receive data, then are refilled.
        for b in 0..2 {
            m.kv[b][2 * 32..4 * 32].fill(7);
        }
        m.aux[0][8..16].fill(1);
        s.refill(&mut m, &[2, 3], 1).unwrap();
        assert!((0..8).all(|p| s.check_page(&mut m, p, None).unwrap()));
        assert!(s.check_slot(&mut m, 1, None));
        let mut off = Sentinel::new(false);
        m.kv[0][0] = 0;
        assert!(off.check_page(&mut m, 0, None).unwrap());
        assert_eq!(off.counts(), Counts::default());
    }
}
