//! The prefill's direct path (docs/protocol.md §3.5): a decode of ours on the same node
//! exports its KV pools as CUDA IPC handles; once we have mapped them, every KV chunk to it is
//! one kernel launch copying our pages straight into its pages, followed by the chunk's usual
//! notification; a decode of another TP size gets its head slices the same way. Aux rows still
//! go by NIXL. Anything that does not fit (another node, other page lengths, slices that cannot
//! be cut, a handle that does not open) keeps the staged or plain path.

use super::*;

impl PrefillCore {
    /// Turns the direct path on for decodes on the node `node` (its boot id): their exported
    /// pools are mapped once their metadata is loaded. Needs a driver that can launch our
    /// kernels (a staging-capable manager).
    #[must_use]
    pub fn with_direct(mut self, node: &str) -> Self {
        self.node = (!node.is_empty()).then(|| node.to_owned());
        self
    }

    /// Queues the mapping of `peer`'s pools if the direct path applies to it: it exported them
    /// on our node, on GPU memory like ours, with as many buffers as ours, and either takes
    /// whole pages of our page length or head slices we can cut (docs/protocol.md §5.6).
    pub(super) fn open_direct(&mut self, agent: &AgentName, peer: &Peer) {
        let (Some(node), Some(ipc)) = (&self.node, &peer.ipc) else {
            return;
        };
        let item = self.peer_item_len(peer);
        // Whole pages need our page length on every buffer; head slices one page length for
        // all our buffers (the kernel checks each slice against both sides' pages).
        let lens = match self.head_slice(peer) {
            None => self.layout.kv_item_lens.iter().all(|&l| l == item),
            Some(Ok(s)) => self.layout.kv_item_lens.iter().all(|&l| l == s.src_item),
            Some(Err(_)) => false,
        };
        let fits = ipc.host == *node
            && ipc.gpu == peer.gpu_id.get()
            && self.layout.kv_mem == MemType::Vram
            && peer.kv_ptrs.len() == self.layout.kv_ptrs.len()
            && lens;
        if !fits {
            tracing::debug!(%agent, "decode pools not mapped (another node or another layout)");
            return;
        }
        self.commands.push_back(Command::OpenDirect {
            agent: agent.clone(),
            pools: ipc.clone(),
            kv_ptrs: peer.kv_ptrs.clone(),
            item_len: item,
        });
    }

    /// The page length of every KV buffer of `peer`: a decode registers one for all its
    /// buffers (SGLang's rule), in frame 12; without it, ours.
    pub(super) fn peer_item_len(&self, peer: &Peer) -> u64 {
        peer.tp_info
            .as_ref()
            .map(|t| t.dst_kv_item_len)
            .or_else(|| self.layout.kv_item_lens.first().copied())
            .unwrap_or(0)
    }

    /// The outcome of a [`Command::OpenDirect`]: from now on KV chunks to `agent` go direct, or,
    /// if its pools could not be mapped, by the staged or plain path as before.
    pub fn direct_opened(&mut self, agent: &AgentName, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => match self.peers.get_mut(agent) {
                Some(p) => {
                    tracing::info!(%agent, "decode pools mapped: KV pages go direct");
                    p.direct = true;
                }
                None => tracing::debug!(%agent, "pools mapped for a decode already forgotten"),
            },
            Err(reason) => {
                tracing::info!(%agent, %reason, "decode pools not mapped; staged or plain path");
            }
        }
    }
}
