//! The prefill's staged path (docs/protocol.md §3.5): whether a room goes staged, its pieces
//! scheduled into the decode's granted ring slots and our own staging slots, and the freed-slot
//! messages that let the next piece go.

use nixl_wire::ext::StagedSlice;

use super::*;

/// One staged WRITE (docs/runtime.md §12): gather `src_pages` of our pool into our staging
/// slot `local_slot`; only once that gather completed, WRITE its `bytes` from the slot into the
/// decode's ring at `remote_addr` with `notif`. Report its end with
/// [`PrefillCore::staged_done`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StagedWrite {
    /// The room it belongs to.
    pub room: RoomId,
    /// The decode agent.
    pub peer: AgentName,
    /// Our staging slot (at `local_slot * slot_bytes` in our staging buffer).
    pub local_slot: u32,
    /// Our pages, in order.
    pub src_pages: Vec<u32>,
    /// Staged bytes (pages × bytes per page).
    pub bytes: u64,
    /// The decode's ring slot address.
    pub remote_addr: u64,
    /// The decode ring's GPU.
    pub remote_gpu: u32,
    /// The `nixl-rs:staged:` notification.
    pub notif: Vec<u8>,
    /// Head slices (heterogeneous TP, docs/protocol.md §5.6): gather only this slice of every
    /// token of `src_pages`, as whole decode pages packed buffer-major into the slot, which is
    /// what the decode's scatter of those pages reads (`None`: gather whole pages).
    pub pack: Option<StagedPack>,
}

/// How a staged piece of head slices is gathered: `slice` of every token, into decode pages of
/// `item` bytes (of every buffer) packed buffer-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StagedPack {
    /// The slice of every token slot.
    pub slice: nixl_core::staging::TokenSlice,
    /// Bytes of one decode page of one buffer.
    pub item: u64,
}

/// A prefill's staged path: the slot size of its staging buffer and which slots are free.
#[derive(Debug, Clone)]
pub(super) struct PrefillStaging {
    pub(super) slot_bytes: u64,
    pub(super) local: LocalSlots,
}

/// How the pieces to one decode are staged: pages per piece, staged bytes per page, and for
/// head slices how they are gathered or scattered.
struct PieceShape {
    per: u32,
    bytes_per_page: u64,
    pack: Option<StagedPack>,
    notice: Option<StagedSlice>,
}

/// A room's staged path to one of its decodes.
#[derive(Debug)]
pub(super) struct StagedRoom {
    pub(super) peer: AgentName,
    ring: Ring,
    pub(super) sched: SlotSchedule,
    /// Staged bytes per page (the decode's page of every buffer when head slices are packed).
    bytes_per_page: u64,
    /// Head slices packed into the decode's pages (`None`: our pages gathered whole).
    pack: Option<StagedPack>,
    /// Head slices the decode scatters out of our whole pages (its notices say how).
    notice: Option<StagedSlice>,
    /// The sender's pages so far (pieces index into them).
    src: Vec<u32>,
    /// The aux WRITE, queued once the last piece is posted.
    pub(super) aux: Option<Post>,
    /// The last time a piece was posted, completed or had its slot freed.
    pub(super) progress: Instant,
}

/// A staged room whose next piece waits this long without any progress (no slot freed, no
/// WRITE completed) fails: its decode is gone or stuck.
pub const STAGED_STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl PrefillCore {
    /// Whether `room` goes staged, decided at its first chunk: the staged path is on, and
    /// every real decode of the room announced a ring, granted slots of it in its info, and
    /// stages what we gather: the same bytes at the same offsets, or (heterogeneous TP, with
    /// packing on) head slices that fill its token slots, packed as its pages
    /// (docs/protocol.md §3.5, §5.6). Otherwise the plain path.
    pub(super) fn choose_staging(&mut self, room: RoomId, infos: &[TransferInfo], now: Instant) {
        if self.staging.is_none() || infos.is_empty() {
            return;
        }
        let mut staged = Vec::with_capacity(infos.len());
        for info in infos {
            match self.staged_to(info, now) {
                Ok(s) => staged.push(s),
                Err(why) => {
                    tracing::debug!(%room, agent = %info.agent, %why, "room not staged");
                    return;
                }
            }
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            r.staged = staged;
        }
    }

    /// The staged path of a room to the decode of `info`, or why it cannot be staged.
    fn staged_to(&self, info: &TransferInfo, now: Instant) -> Result<StagedRoom, String> {
        let st = self.staging.as_ref().ok_or("the staged path is off")?;
        let peer = self
            .peers
            .get(&info.agent)
            .filter(|p| !p.direct)
            .map(|p| Arc::clone(&p.peer))
            .ok_or("not a registered decode off this node")?;
        let ring = peer.ring.ok_or("the decode announced no ring")?;
        let granted =
            ext::slots(&info.trailing, ring.slots).ok_or("the decode granted no slots")?;
        let shape = match self.head_slice(&peer) {
            None => {
                // Its announced ring is GPU memory, and so are its pools.
                let item = self.peer_item_len(&peer);
                let remote = Layout {
                    kv_mem: MemType::Vram,
                    kv_ptrs: peer.kv_ptrs.clone(),
                    kv_item_lens: vec![item; peer.kv_ptrs.len()],
                    kv_pages: 1,
                    aux_ptrs: Vec::new(),
                    aux_item_lens: Vec::new(),
                    aux_slots: 0,
                    gpu_id: peer.gpu_id.get(),
                    tp: crate::proto::TpPlace::default(),
                };
                PieceShape {
                    per: pages_per_piece(&self.layout, st.slot_bytes, &remote, &ring)?,
                    bytes_per_page: staging_layout(&self.layout)?.bytes_per_page(),
                    pack: None,
                    notice: None,
                }
            }
            Some(Ok(slice)) => self.sliced_pieces(&slice, &peer, st.slot_bytes, &ring)?,
            Some(Err(why)) => return Err(why.to_string()),
        };
        let sched = SlotSchedule::new(&granted, shape.per).ok_or("no slot holds a page")?;
        Ok(StagedRoom {
            peer: info.agent.clone(),
            ring,
            sched,
            bytes_per_page: shape.bytes_per_page,
            pack: shape.pack,
            notice: shape.notice,
            src: Vec::new(),
            aux: None,
            progress: now,
        })
    }

    /// For head slices to a decode with a ring: pages per piece, staged bytes per page, how
    /// the gather packs them and how the decode scatters them. GPU pools on both sides and our
    /// buffers of one item length, then either
    /// - slices that fill the decode's token slots (`P < D`), with packing on: gathered packed
    ///   as decode pages (a packed page then holds only bytes of ours), which the decode
    ///   scatters as its own pages; a piece fits our slot as our pages (the gather's table) and
    ///   as decode pages, and the decode's slot as its pages; or
    /// - slices that are our whole token slots (`P > D`: several prefill ranks fill one decode
    ///   token slot): our pages gathered whole, and the decode scatters each token's slice to
    ///   its place in its token slots (the notice's [`StagedSlice`]); a piece fits our slot as
    ///   our pages and the decode's slot as its pages (its scatter's limit).
    fn sliced_pieces(
        &self,
        slice: &HeadSlice,
        peer: &Peer,
        slot_bytes: u64,
        ring: &Ring,
    ) -> Result<PieceShape, String> {
        let l = &self.layout;
        if l.kv_mem != MemType::Vram {
            return Err("our KV pool is not in GPU memory".into());
        }
        if l.kv_item_lens.iter().any(|&i| i != slice.src_item) {
            return Err("our KV buffers differ in item length".into());
        }
        let nb = peer.kv_ptrs.len() as u64;
        if nb != l.kv_ptrs.len() as u64 {
            return Err("the decode's KV buffers differ from ours in count".into());
        }
        let t = slice.token_slice();
        let page = |item: u64| item.checked_mul(nb).filter(|&b| b > 0);
        let (Some(ours), Some(decode_page)) = (page(slice.src_item), page(slice.dst_item)) else {
            return Err("a page of no bytes or of too many".into());
        };
        let (per, bytes_per_page, pack, notice) = if slice.fills_decode_slots() {
            if !self.packing {
                return Err("head slices without packing".into());
            }
            let per = (slot_bytes / ours.max(decode_page)).min(ring.slot_bytes / decode_page);
            let pack = StagedPack {
                slice: t,
                item: slice.dst_item,
            };
            (per, decode_page, Some(pack), None)
        } else if t.src_offset == 0 && t.len == t.src_token {
            let notice = crate::proto::slicing::notice_slice(&t);
            // The decode's scatter takes as many pages as its slot holds of its own (larger)
            // pages, however few bytes of each we fill.
            let per = (slot_bytes / ours).min(ring.slot_bytes / decode_page.max(ours));
            (per, ours, None, Some(notice))
        } else {
            return Err(
                "head slices that are neither whole decode pages nor whole token slots of ours"
                    .into(),
            );
        };
        let per = u32::try_from(per).unwrap_or(u32::MAX);
        if per == 0 {
            return Err(format!(
                "a page fits no slot (ours {slot_bytes}, theirs {})",
                ring.slot_bytes
            ));
        }
        Ok(PieceShape {
            per,
            bytes_per_page,
            pack,
            notice,
        })
    }

    /// Queues a chunk of a staged room to each of its decodes: the pieces wait in each
    /// schedule (posted by [`Self::pump`]), and after the last chunk each decode's aux WRITE
    /// waits for its last piece.
    pub(super) fn stage_chunk(
        &mut self,
        room: RoomId,
        infos: &[TransferInfo],
        pages: &[u32],
        last: bool,
        aux_index: u32,
    ) -> Result<Vec<Post>, FailureReason> {
        let staged: Vec<AgentName> = self
            .rooms
            .get(&room)
            .ok_or(FailureReason::NoSender)?
            .staged
            .iter()
            .map(|s| s.peer.clone())
            .collect();
        for agent in staged {
            let info = infos.iter().find(|i| i.agent == agent).ok_or_else(|| {
                FailureReason::Staging(format!("a staged room lost its decode {agent}"))
            })?;
            let peer = self
                .peers
                .get(&agent)
                .map(|p| Arc::clone(&p.peer))
                .ok_or_else(|| FailureReason::DecodeNotRegistered(agent.clone()))?;
            let aux = last.then(|| {
                let work = self.lower_aux(&agent, &peer, aux_index, info.dst_aux_index);
                Post {
                    room,
                    peer: agent.clone(),
                    kind: ListKind::Aux,
                    notif: Notification::Aux { room }.encode(),
                    work,
                }
            });
            let sr = self
                .rooms
                .get_mut(&room)
                .and_then(|r| r.staged.iter_mut().find(|s| s.peer == agent))
                .ok_or(FailureReason::NoSender)?;
            let have = sr.src.len();
            if info.dst_pages.len() < have + pages.len() {
                return Err(FailureReason::TooFewDecodePages {
                    agent,
                    got: info.dst_pages.len(),
                    need: have + pages.len(),
                });
            }
            let n = u32::try_from(pages.len()).unwrap_or(u32::MAX);
            if sr.sched.push(n, last) != Pushed::Queued {
                return Err(FailureReason::Staging(format!(
                    "chunk of {n} pages not schedulable"
                )));
            }
            sr.src.extend_from_slice(pages);
            sr.aux = aux;
        }
        Ok(Vec::new())
    }

    /// Posts what a staged room can post now: for each of its decodes, a piece for every
    /// granted slot seen free (while our own staging slots last), then, after its last piece,
    /// the aux WRITE.
    pub(super) fn pump(&mut self, room: RoomId) {
        let Some(st) = self.staging.as_mut() else {
            return;
        };
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if r.failure.is_some() || r.status == KvPoll::Failed {
            return;
        }
        let mut broken = None;
        for sr in &mut r.staged {
            while let Some(post) = sr.sched.next(&mut st.local) {
                let p = post.piece;
                let from = p.first_page_offset as usize;
                let src = sr.src.get(from..from.saturating_add(p.pages as usize));
                let (Some(src), Some(remote_addr)) = (src, sr.ring.slot_addr(post.remote_slot))
                else {
                    st.local.put(post.local_slot);
                    broken = Some(format!("piece {} outside the room", p.chunk));
                    break;
                };
                let notif = StagedNotice {
                    room,
                    chunk: p.chunk,
                    last: p.last,
                    slot: post.remote_slot,
                    first_page_offset: p.first_page_offset,
                    pages: p.pages,
                    slice: sr.notice,
                }
                .encode();
                r.in_flight += 1;
                self.commands.push_back(Command::Stage(StagedWrite {
                    room,
                    peer: sr.peer.clone(),
                    local_slot: post.local_slot,
                    src_pages: src.to_vec(),
                    bytes: sr.bytes_per_page.saturating_mul(u64::from(p.pages)),
                    remote_addr,
                    remote_gpu: sr.ring.gpu,
                    notif,
                    pack: sr.pack,
                }));
            }
            if broken.is_some() {
                break;
            }
            if sr.sched.all_posted()
                && let Some(aux) = sr.aux.take()
            {
                r.in_flight += 1;
                self.commands.push_back(Command::Post(aux));
            }
        }
        if let Some(why) = broken {
            self.fail(room, FailureReason::Staging(why));
        }
    }

    /// A [`Command::Stage`] ended (the WRITE completed, or the gather or the WRITE failed): our
    /// staging slot is free again, for this room or any other waiting for one.
    pub fn staged_done(
        &mut self,
        room: RoomId,
        local_slot: u32,
        outcome: Result<(), FailureReason>,
        now: Instant,
    ) {
        if let Some(st) = self.staging.as_mut() {
            st.local.put(local_slot);
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            for sr in &mut r.staged {
                sr.progress = now;
            }
        }
        self.transfer_done(room, outcome);
        let waiting: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.staged.iter().any(|s| s.sched.waiting() > 0))
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.pump(id);
        }
    }

    /// A NIXL notification to the prefill agent: none is expected (a decode holds no NIXL
    /// metadata of ours to send one); ignored.
    pub fn handle_notification(&mut self, peer: &str, payload: &[u8], now: Instant) {
        let _ = (payload, now);
        tracing::debug!(peer, "prefill agent received a notification; ignored");
    }

    /// A decode's freed-slot message: the slot is free for the room's next piece, if it comes
    /// from the room's decode (with its proof, once that decode has proven itself).
    pub(super) fn handle_freed(&mut self, m: &FreedMessage, now: Instant) {
        let f = m.notice;
        if !self.origin_ok(&m.agent, &m.trailing) {
            peer_warn!(self.peer_logs, now, agent = %m.agent, room = %f.room, "freed slot without the proof its agent owes; refused");
            return;
        }
        let Some(sr) = self
            .rooms
            .get_mut(&f.room)
            .and_then(|r| r.staged.iter_mut().find(|s| s.peer == m.agent))
        else {
            return;
        };
        if !sr.sched.freed(f.slot) {
            tracing::debug!(agent = %m.agent, room = %f.room, slot = f.slot, "stray slot freed; ignored");
            return;
        }
        sr.progress = now;
        self.pump(f.room);
    }

    /// Free slots of our staging buffer (`None`: the staged path is off).
    pub fn free_staging_slots(&self) -> Option<u32> {
        self.staging.as_ref().map(|s| s.local.free())
    }
}
