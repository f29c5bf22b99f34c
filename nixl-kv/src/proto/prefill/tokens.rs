//! Head slices from descriptor lists prepared once (docs/protocol.md §5.6): SGLang's slicing
//! moves one descriptor per token slot of every page of every buffer, so instead of building
//! them for every chunk, the prefill prepares a token list of its own pool per slice shape
//! (`ListId::LocalTokens`) and one of each sliced decode's pool (`ListKind::Tokens`), and a
//! chunk becomes two index lists into them. The first chunk to a decode goes by explicit
//! descriptors while the lists are prepared; lists too large for the caps never are.

use super::*;
use crate::proto::lists::MAX_PEER_LIST_DESCS;
use crate::proto::lower::{TokenGeometry, token_list_spec};

impl PrefillCore {
    /// The chunk `c` as indices into prepared token lists, when both are
    /// ready; otherwise queues what is missing and returns `None` (explicit descriptors then).
    pub(super) fn lower_tokens_prepared(
        &mut self,
        slice: &HeadSlice,
        agent: &AgentName,
        c: &Chunk<'_>,
    ) -> Option<Work> {
        let tokens = slice.slice.tokens;
        let ours = TokenGeometry {
            item: slice.src_item,
            tokens,
            token: slice.slice.src_token,
            offset: slice.slice.src_offset,
            len: slice.slice.len,
        };
        let theirs = TokenGeometry {
            item: slice.dst_item,
            tokens,
            token: slice.slice.dst_token,
            offset: slice.slice.dst_offset,
            len: slice.slice.len,
        };
        let local = self.local_token_list(ours);
        let need = c.need();
        let state = self.peers.get_mut(agent)?;
        // A decode's slice shape is fixed by its registration; a list is never reused for
        // another one.
        let fits = state.tokens_geometry.is_none_or(|g| g == theirs);
        let covering = if fits {
            state.tokens_geometry = Some(theirs);
            let covering = state.tokens.covering(need);
            if covering.is_none() {
                prepare_peer_tokens(&self.layout, &mut self.commands, agent, state, theirs, need);
            }
            covering
        } else {
            None
        };
        let (generation, remote_pages) = covering?;
        if local != Readiness::Ready {
            return None;
        }
        let mut pairs = Vec::with_capacity(c.src.len() * tokens as usize);
        for (&s, &d) in c.src.iter().zip(c.dst) {
            for t in 0..tokens {
                pairs.push((
                    s.checked_mul(tokens)?.checked_add(t)?,
                    d.checked_mul(tokens)?.checked_add(t)?,
                ));
            }
        }
        let local_count = self.layout.kv_pages.checked_mul(tokens)?;
        let remote_count = remote_pages.checked_mul(tokens)?;
        let buffers = self.layout.kv_ptrs.len();
        let (local_idx, remote_idx) = lower_indexed(buffers, local_count, remote_count, &pairs)?;
        Some(Work::Indexed {
            local: ListId::LocalTokens {
                offset: ours.offset,
                len: ours.len,
            },
            remote: ListId::Peer {
                agent: agent.clone(),
                kind: ListKind::Tokens,
                generation,
            },
            local_idx,
            remote_idx,
        })
    }

    /// The state of our token list for slices of shape `g`, queuing its preparation the first
    /// time (never, past the descriptor cap).
    fn local_token_list(&mut self, g: TokenGeometry) -> Readiness {
        let key = (g.offset, g.len);
        if let Some(&state) = self.local_tokens.get(&key) {
            return state;
        }
        let l = &self.layout;
        let total = (l.kv_ptrs.len() as u64)
            .saturating_mul(u64::from(l.kv_pages))
            .saturating_mul(u64::from(g.tokens));
        let id = ListId::LocalTokens {
            offset: g.offset,
            len: g.len,
        };
        let spec = (total <= MAX_PEER_LIST_DESCS)
            .then(|| token_list_spec(id, l.kv_mem, &l.kv_ptrs, g, l.kv_pages, l.gpu_id))
            .flatten();
        let state = match spec {
            Some(spec) => {
                self.commands.push_back(Command::Prepare(spec));
                Readiness::Pending
            }
            None => Readiness::Failed,
        };
        self.local_tokens.insert(key, state);
        state
    }

    /// The outcome of preparing our token list `(offset, len)`.
    pub(super) fn local_tokens_prepared(&mut self, offset: u64, len: u64, ok: bool) {
        if !ok {
            tracing::info!(
                offset,
                len,
                "local token list not prepared; head slices use explicit descriptors"
            );
        }
        let state = if ok {
            Readiness::Ready
        } else {
            Readiness::Failed
        };
        self.local_tokens.insert((offset, len), state);
    }
}

/// Queues a preparation of `agent`'s token list if one reaching page `need - 1` is due.
fn prepare_peer_tokens(
    l: &Layout,
    commands: &mut VecDeque<Command>,
    agent: &AgentName,
    state: &mut PeerState,
    g: TokenGeometry,
    need: u32,
) {
    let per_page = (l.kv_ptrs.len() as u64).saturating_mul(u64::from(g.tokens));
    if per_page == 0 {
        return;
    }
    // Pages, so that the whole list stays within the cap (however large our own pool).
    let cap = u64::from(l.kv_pages)
        .saturating_mul(4)
        .min(MAX_PEER_LIST_DESCS / per_page);
    let cap = u32::try_from(cap).unwrap_or(u32::MAX);
    if let Some((generation, pages)) = state.tokens.want(need, l.kv_pages.min(cap), cap) {
        let id = ListId::Peer {
            agent: agent.clone(),
            kind: ListKind::Tokens,
            generation,
        };
        let dev = state.peer.gpu_id.get();
        match token_list_spec(id, l.kv_mem, &state.peer.kv_ptrs, g, pages, dev) {
            Some(spec) => commands.push_back(Command::Prepare(spec)),
            None => {
                state.tokens.prepared(generation, false);
            }
        }
    }
}
