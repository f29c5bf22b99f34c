//! The prefill's decode agents: registrations (capabilities, ring, proof notice), metadata
//! loads with their back-off, the peers' prepared descriptor lists, and forgetting a peer.

use super::peer_table::Admission;
use super::*;

impl PrefillCore {
    pub(super) fn handle_register(&mut self, r: KvArgsRegister, now: Instant) {
        self.register(r, Profile::Sglang051, None, now);
    }

    /// Admits a registration (any profile's, in 0.5.1's form), remembering how the decode
    /// speaks and what it asked that we do not transfer yet.
    pub(super) fn register(
        &mut self,
        r: KvArgsRegister,
        profile: Profile,
        unsupported: Option<String>,
        now: Instant,
    ) {
        match self.peers.admit(&r.agent, now) {
            Admission::Load => {}
            Admission::Known => {
                tracing::debug!(agent = %r.agent, "decode agent already registered or loading");
                return;
            }
            Admission::BackingOff => return,
            Admission::Full => {
                peer_warn!(self.peer_logs, now, agent = %r.agent, max = MAX_PEERS, "too many decode agents; registration dropped");
                return;
            }
        }
        let caps = ext::caps(&r.trailing);
        let proves = caps.iter().any(|c| c == ext::CAP_PROOF);
        let ring = if caps.iter().any(|c| c == ext::CAP_STAGING) {
            Ring::find(&r.trailing)
        } else {
            None
        };
        let ipc = if caps.iter().any(|c| c == ext::CAP_DIRECT) {
            IpcPools::find(&r.trailing)
        } else {
            None
        };
        let peer = Peer {
            kv_ptrs: r.kv_ptrs,
            aux_ptrs: r.aux_ptrs,
            gpu_id: r.gpu_id,
            tp_info: r.tp_info,
            proves,
            ring,
            ipc,
            profile,
            ours: r.trailing.iter().any(|f| f.starts_with(ext::EXT_PREFIX)),
            unsupported,
        };
        self.peers.loading(r.agent.clone(), peer, now);
        self.commands.push_back(Command::LoadRemote {
            agent: r.agent,
            metadata: r.metadata,
        });
    }

    /// The outcome of a [`Command::LoadRemote`]: the name NIXL loaded, or why it could not.
    pub fn remote_loaded(&mut self, agent: &AgentName, outcome: Result<String, String>) {
        let Some((peer, seen)) = self.peers.take_loading(agent) else {
            return;
        };
        match outcome {
            Ok(name) if name == agent.as_str() => {
                self.timers
                    .lower(Timer::PeerIdle, seen + self.peer_idle_timeout);
                let proves = peer.proves;
                let mut state = PeerState {
                    peer: Arc::new(peer),
                    kv: ListTrack::default(),
                    aux: ListTrack::default(),
                    tokens: ListTrack::default(),
                    tokens_geometry: None,
                    last_seen: seen,
                    proves,
                    proven: false,
                    direct: false,
                };
                // Only the agent whose metadata NIXL loaded receives this.
                if state.proves
                    && let (Some(secret), Some(p)) = (self.secret(agent), &self.proofs)
                {
                    let notice = ProofNotice {
                        endpoint: p.endpoint.clone(),
                        secret,
                    };
                    self.commands.push_back(Command::Notify {
                        agents: vec![agent.clone()],
                        payload: notice.encode(),
                    });
                }
                // Lists at our own pool size now, so the first request can use them (none of
                // whole KV pages for a decode that takes head slices: they do not fit its pages).
                if self.head_slice(&state.peer).is_none() {
                    prepare_peer_list(
                        &self.layout,
                        &mut self.commands,
                        agent,
                        &mut state,
                        ListKind::Kv,
                        1,
                    );
                }
                prepare_peer_list(
                    &self.layout,
                    &mut self.commands,
                    agent,
                    &mut state,
                    ListKind::Aux,
                    1,
                );
                self.open_direct(agent, &state.peer);
                self.peers.insert(agent.clone(), state);
            }
            Ok(name) => {
                peer_warn!(self.peer_logs, seen, claimed = %agent, actual = %name, "decode metadata names another agent");
                // Forget what was just loaded, unless it belongs to a registered decode (a
                // hostile message must not disconnect a legitimate peer).
                let known = AgentName::new(&name).is_ok_and(|n| self.peers.contains_key(&n));
                if !known {
                    self.commands.push_back(Command::Forget { agent: name });
                }
            }
            Err(reason) => {
                peer_warn!(self.peer_logs, seen, agent = %agent, %reason, "cannot load decode metadata");
                self.peers.refuse(agent.clone(), seen);
            }
        }
    }

    /// The outcome of a [`Command::Prepare`].
    pub fn list_prepared(&mut self, id: &ListId, ok: bool) {
        match id {
            ListId::Local(kind) => {
                let state = if ok {
                    Readiness::Ready
                } else {
                    Readiness::Failed
                };
                if !ok {
                    tracing::info!(
                        ?kind,
                        "local descriptor list not prepared; using explicit descriptors"
                    );
                }
                match kind {
                    ListKind::Kv => self.local_kv = state,
                    ListKind::Aux => self.local_aux = state,
                    ListKind::Tokens => {}
                }
            }
            ListId::LocalTokens { offset, len } => self.local_tokens_prepared(*offset, *len, ok),
            ListId::Peer {
                agent,
                kind,
                generation,
            } => {
                let Some(state) = self.peers.get_mut(agent) else {
                    // Forgotten meanwhile; its lists went with it.
                    return;
                };
                let track = match kind {
                    ListKind::Kv => &mut state.kv,
                    ListKind::Aux => &mut state.aux,
                    ListKind::Tokens => &mut state.tokens,
                };
                if !ok {
                    tracing::info!(peer = %agent, ?kind, "peer descriptor list not prepared");
                }
                if let Some(old) = track.prepared(*generation, ok) {
                    self.commands.push_back(Command::Release(ListId::Peer {
                        agent: agent.clone(),
                        kind: *kind,
                        generation: old,
                    }));
                }
            }
        }
    }

    /// Forgets a decode agent: its metadata and lists are dropped; rooms with infos from it
    /// fail when they send.
    pub fn remove_peer(&mut self, agent: &AgentName) {
        // Staged rooms waiting on it would wait for slots it never frees: they fail now.
        let stuck: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, r)| {
                r.staged
                    .iter()
                    .any(|s| &s.peer == agent && !(s.sched.all_posted() && s.aux.is_none()))
            })
            .map(|(id, _)| *id)
            .collect();
        for room in stuck {
            self.fail(
                room,
                FailureReason::Staging(format!("decode {agent} forgotten mid-transfer")),
            );
        }
        if self.peers.forget(agent) {
            self.commands.push_back(Command::Forget {
                agent: agent.as_str().to_owned(),
            });
        }
    }

    /// Whether `agent` is registered.
    pub fn has_peer(&self, agent: &AgentName) -> bool {
        self.peers.contains_key(agent)
    }
}

/// Queues a preparation of `agent`'s `kind` list if one reaching entry `need - 1` is due (a
/// function of the layout, the queue and the peer, so that the peer can stay in its table).
pub(super) fn prepare_peer_list(
    layout: &Layout,
    commands: &mut VecDeque<Command>,
    agent: &AgentName,
    state: &mut PeerState,
    kind: ListKind,
    need: u32,
) {
    let (track, base, ptrs, items, buffers, mem, dev) = match kind {
        ListKind::Kv => (
            &mut state.kv,
            layout.kv_pages,
            &state.peer.kv_ptrs[..],
            &layout.kv_item_lens[..],
            layout.kv_ptrs.len(),
            layout.kv_mem,
            state.peer.gpu_id.get(),
        ),
        ListKind::Aux => {
            let n = aux_buffers(layout.aux_ptrs.len(), state.peer.aux_ptrs.len());
            (
                &mut state.aux,
                layout.aux_slots,
                &state.peer.aux_ptrs[..n],
                &layout.aux_item_lens[..n],
                n,
                MemType::Dram,
                0,
            )
        }
        // Token lists have their own shapes (tokens.rs).
        ListKind::Tokens => return,
    };
    if buffers == 0 {
        return;
    }
    if let Some((generation, count)) = track.want(need, base, peer_cap(base, buffers)) {
        let id = ListId::Peer {
            agent: agent.clone(),
            kind,
            generation,
        };
        commands.push_back(Command::Prepare(list_spec(
            id, mem, ptrs, items, count, dev,
        )));
    }
}
