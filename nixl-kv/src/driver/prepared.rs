//! Descriptor lists prepared once (NIXL's `prepXferDlist`), so the hot path only makes requests
//! by index: ours once per manager, each decode's once per peer.
//!
//! Every (buffer, page) is one descriptor, at index `buffer · pages + page`; aux rows likewise.
//! The seed wire format does not carry the decode's pool size, so a peer's list covers the
//! highest page asked for so far (rounded up) and is prepared again when a request goes beyond
//! it. Where NIXL refuses a list, that peer falls back to per-request descriptor lists.

use std::collections::HashMap;

use nixl_core::{Agent, MemType, PreparedDescs, XferDescs, XferOp, XferRequest};
use nixl_wire::AgentName;

use crate::proto::Layout;
use crate::proto::prefill::{Peer, Transfer};

/// Prepared lists for one manager.
#[derive(Default)]
pub(crate) struct PreparedLists {
    local_kv: Option<PreparedDescs>,
    local_aux: Option<PreparedDescs>,
    local_failed: bool,
    peers: HashMap<AgentName, PeerLists>,
}

#[derive(Default)]
struct PeerLists {
    kv: Option<(PreparedDescs, u32)>,
    aux: Option<(PreparedDescs, u32)>,
    failed: bool,
}

fn list(mem: MemType, ptrs: &[u64], items: &[u64], count: u32, dev: u32) -> XferDescs {
    let mut d = XferDescs::with_capacity(mem, ptrs.len() * count as usize);
    for (p, item) in ptrs.iter().zip(items) {
        for i in 0..u64::from(count) {
            d.push(p + i * item, *item, u64::from(dev));
        }
    }
    d
}

impl PreparedLists {
    /// Makes `t` from prepared lists; `None` when the prepared path cannot serve it (the caller
    /// then builds descriptor lists for this request).
    pub(crate) fn request(
        &mut self,
        agent: &Agent,
        layout: &Layout,
        kv_mem: MemType,
        peer: &Peer,
        t: &Transfer,
    ) -> Option<Result<XferRequest, String>> {
        if self.local_failed {
            return None;
        }
        if self.local_kv.is_none() {
            let kv = list(
                kv_mem,
                &layout.kv_ptrs,
                &layout.kv_item_lens,
                layout.kv_pages,
                layout.gpu_id,
            );
            let aux = list(
                MemType::Dram,
                &layout.aux_ptrs,
                &layout.aux_item_lens,
                layout.aux_slots,
                0,
            );
            match (agent.prepare(None, &kv), agent.prepare(None, &aux)) {
                (Ok(k), Ok(a)) => (self.local_kv, self.local_aux) = (Some(k), Some(a)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::info!(error = %e, "local descriptor lists not prepared; using per-request lists");
                    self.local_failed = true;
                    return None;
                }
            }
        }
        let lists = self.peers.entry(t.peer.clone()).or_default();
        if lists.failed {
            return None;
        }
        let needed = t.pages.iter().map(|&(_, d)| d + 1).max().unwrap_or(0);
        let (ours, theirs, ours_count) = if t.aux {
            let slot = lists.aux.as_ref().filter(|(_, n)| *n >= needed);
            if slot.is_none() {
                let n = needed.max(layout.aux_slots);
                let descs = list(MemType::Dram, &peer.aux_ptrs, &layout.aux_item_lens, n, 0);
                match agent.prepare(Some(t.peer.as_str()), &descs) {
                    Ok(p) => lists.aux = Some((p, n)),
                    Err(e) => {
                        tracing::info!(peer = %t.peer, error = %e, "peer aux list not prepared; using per-request lists");
                        lists.failed = true;
                        return None;
                    }
                }
            }
            (
                self.local_aux.as_ref()?,
                lists.aux.as_ref()?,
                layout.aux_slots,
            )
        } else {
            if lists.kv.as_ref().is_none_or(|(_, n)| *n < needed) {
                // Cover our own pool size or the need, whichever is larger, then the exact need.
                let sizes = [
                    needed.max(layout.kv_pages).next_power_of_two(),
                    needed.max(layout.kv_pages),
                    needed,
                ];
                let dev = peer.gpu_id.get();
                let prepared = sizes.iter().find_map(|&n| {
                    let descs = list(kv_mem, &peer.kv_ptrs, &layout.kv_item_lens, n, dev);
                    agent
                        .prepare(Some(t.peer.as_str()), &descs)
                        .ok()
                        .map(|p| (p, n))
                });
                match prepared {
                    Some(p) => lists.kv = Some(p),
                    None => {
                        tracing::info!(peer = %t.peer, "peer KV list not prepared; using per-request lists");
                        lists.failed = true;
                        return None;
                    }
                }
            }
            (self.local_kv.as_ref()?, lists.kv.as_ref()?, layout.kv_pages)
        };
        let (remote, remote_count) = (&theirs.0, theirs.1);
        let buffers = if t.aux {
            layout.aux_ptrs.len().min(peer.aux_ptrs.len())
        } else {
            layout.kv_ptrs.len()
        };
        let mut li = Vec::with_capacity(buffers * t.pages.len());
        let mut ri = Vec::with_capacity(buffers * t.pages.len());
        for b in 0..buffers as u64 {
            for &(s, d) in &t.pages {
                let (l, r) = (
                    b * u64::from(ours_count) + u64::from(s),
                    b * u64::from(remote_count) + u64::from(d),
                );
                let (Ok(l), Ok(r)) = (i32::try_from(l), i32::try_from(r)) else {
                    return None;
                };
                li.push(l);
                ri.push(r);
            }
        }
        Some(
            agent
                .make_request(XferOp::Write, ours, &li, remote, &ri, Some(&t.notif))
                .map_err(|e| e.to_string()),
        )
    }

    /// Drops a peer's lists (its metadata went away).
    #[allow(dead_code, reason = "used when peers are removed")]
    pub(crate) fn forget(&mut self, peer: &AgentName) {
        self.peers.remove(peer);
    }
}
