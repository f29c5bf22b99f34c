//! The prefill's staged path (docs/protocol.md §3.5): whether a room goes staged, its pieces
//! scheduled into the decode's granted ring slots and our own staging slots, and the freed-slot
//! messages that let the next piece go.

use super::*;

impl PrefillCore {
    /// Whether `room` goes staged, decided at its first chunk: the staged path is on, the room
    /// has one real decode, that decode announced a ring and granted slots of it in its info,
    /// and both pools stage the same bytes (docs/protocol.md §3.5). Otherwise the plain path.
    pub(super) fn choose_staging(&mut self, room: RoomId, infos: &[TransferInfo], now: Instant) {
        let Some(st) = &self.staging else { return };
        let [info] = infos else { return };
        let Some(peer) = self
            .peers
            .get(&info.agent)
            .filter(|p| !p.direct)
            .map(|p| Arc::clone(&p.peer))
        else {
            return;
        };
        let Some(ring) = peer.ring else { return };
        let Some(granted) = ext::slots(&info.trailing, ring.slots) else {
            return;
        };
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
        let per = match pages_per_piece(&self.layout, st.slot_bytes, &remote, &ring) {
            Ok(per) => per,
            Err(why) => {
                tracing::debug!(%room, agent = %info.agent, %why, "room not staged");
                return;
            }
        };
        let (Some(sched), Ok(l)) = (
            SlotSchedule::new(&granted, per),
            staging_layout(&self.layout),
        ) else {
            return;
        };
        if let Some(r) = self.rooms.get_mut(&room) {
            r.staged = Some(StagedRoom {
                peer: info.agent.clone(),
                ring,
                sched,
                bytes_per_page: l.bytes_per_page(),
                src: Vec::new(),
                aux: None,
                progress: now,
            });
        }
    }

    /// Queues a chunk of a staged room: its pieces wait in the schedule (posted by
    /// [`Self::pump`]), and after the last chunk the aux WRITE waits for the last piece.
    pub(super) fn stage_chunk(
        &mut self,
        room: RoomId,
        infos: &[TransferInfo],
        pages: &[u32],
        last: bool,
        aux_index: u32,
    ) -> Result<Vec<Post>, FailureReason> {
        let [info] = infos else {
            return Err(FailureReason::Staging(
                "a staged room lost its decode".into(),
            ));
        };
        let peer = self
            .peers
            .get(&info.agent)
            .map(|p| Arc::clone(&p.peer))
            .ok_or_else(|| FailureReason::DecodeNotRegistered(info.agent.clone()))?;
        let r = self.rooms.get(&room).ok_or(FailureReason::NoSender)?;
        let have = r.staged.as_ref().map_or(0, |s| s.src.len());
        if info.dst_pages.len() < have + pages.len() {
            return Err(FailureReason::TooFewDecodePages {
                agent: info.agent.clone(),
                got: info.dst_pages.len(),
                need: have + pages.len(),
            });
        }
        let aux = last.then(|| {
            let coords = self.lower_aux(&info.agent, &peer, aux_index, info.dst_aux_index);
            Post {
                room,
                peer: info.agent.clone(),
                kind: ListKind::Aux,
                notif: Notification::Aux { room }.encode(),
                coords,
            }
        });
        let sr = self
            .rooms
            .get_mut(&room)
            .and_then(|r| r.staged.as_mut())
            .ok_or(FailureReason::NoSender)?;
        let n = u32::try_from(pages.len()).unwrap_or(u32::MAX);
        if sr.sched.push(n, last) != Pushed::Queued {
            return Err(FailureReason::Staging(format!(
                "chunk of {n} pages not schedulable"
            )));
        }
        sr.src.extend_from_slice(pages);
        sr.aux = aux;
        Ok(Vec::new())
    }

    /// Posts what a staged room can post now: a piece for every granted slot seen free (while
    /// our own staging slots last), then, after its last piece, the aux WRITE.
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
        let Some(sr) = r.staged.as_mut() else { return };
        let mut broken = None;
        while let Some(post) = sr.sched.next(&mut st.local) {
            let p = post.piece;
            let from = p.first_page_offset as usize;
            let src = sr.src.get(from..from.saturating_add(p.pages as usize));
            let (Some(src), Some(remote_addr)) = (src, sr.ring.slot_addr(post.remote_slot)) else {
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
            }));
        }
        if broken.is_none()
            && sr.sched.all_posted()
            && let Some(aux) = sr.aux.take()
        {
            r.in_flight += 1;
            self.commands.push_back(Command::Post(aux));
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
        if let Some(sr) = self.rooms.get_mut(&room).and_then(|r| r.staged.as_mut()) {
            sr.progress = now;
        }
        self.transfer_done(room, outcome);
        let waiting: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.staged.as_ref().is_some_and(|s| s.sched.waiting() > 0))
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
            tracing::warn!(agent = %m.agent, room = %f.room, "freed slot without the proof its agent owes; refused");
            return;
        }
        let Some(sr) = self.rooms.get_mut(&f.room).and_then(|r| r.staged.as_mut()) else {
            return;
        };
        if sr.peer != m.agent || !sr.sched.freed(f.slot) {
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
