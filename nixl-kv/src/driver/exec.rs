//! The executors: carry out a core's commands in queue order and report what came of them.
//! Nothing here decides; every branch is on what NIXL or ZeroMQ answered.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use nixl_core::{Agent, PreparedDescs, XferOp, XferRequest, XferStatus};
use nixl_wire::{AgentName, RoomId};

use super::host_pack::HostPacker;
use super::probe::Probe;
use super::staged::PrefillGpu;
use super::staged::{ScatterEnd, StageEnd};
use super::{DecodeIo, PrefillIo, Shared, lock};
use crate::proto::FailureReason;
use crate::proto::decode::Command as DecodeCommand;
use crate::proto::lower::{ListId, Work};
use crate::proto::prefill::{Command, Post};
use crate::proto::route::PackArea;

/// What the prefill's commands run with, behind one lock (`PrefillIo::exec`): the prepared
/// descriptor lists by the core's names for them, the probe agent that metadata loads go
/// through, and the GPU and host executors of the staged, direct and packed work.
pub(crate) struct Lists {
    lists: HashMap<ListId, PreparedDescs>,
    probe: Probe,
    gpu: Option<PrefillGpu>,
    host_pack: Option<HostPacker>,
}

impl Lists {
    /// With the executors this prefill has.
    pub(crate) fn new(gpu: Option<PrefillGpu>, host_pack: Option<HostPacker>) -> Self {
        Self {
            lists: HashMap::new(),
            probe: Probe::default(),
            gpu,
            host_pack,
        }
    }
}

/// What a command came to, for the core.
enum Outcome {
    Loaded(AgentName, Result<String, String>),
    Prepared(ListId, bool),
    Done(RoomId, Result<(), FailureReason>),
    Staged(StageEnd),
    DirectOpened(AgentName, Result<(), String>),
}

/// Runs the prefill core's queue until it is empty (outcomes can queue more commands), moving
/// staged pieces on each round. Posted requests go to the in-flight table of their room.
/// Checks the posted requests of `room` (every room's with `None`) and reports those that
/// ended to the core. Returns whether any of them is still in flight (for `None`: any at all).
pub(crate) fn reap(p: &PrefillIo, room: Option<RoomId>) -> bool {
    let taken: Vec<(RoomId, Vec<XferRequest>)> = {
        let mut table = lock(&p.in_flight);
        match room {
            Some(r) => table.remove(&r).map(|v| vec![(r, v)]).unwrap_or_default(),
            None => table.drain().collect(),
        }
    };
    let mut ended = Vec::new();
    let mut kept = Vec::new();
    for (room, mut reqs) in taken {
        reqs.retain(|req| match req.status() {
            Ok(XferStatus::InProgress) => true,
            Ok(XferStatus::Done) => {
                ended.push((room, Ok(())));
                false
            }
            Err(e) => {
                let reason = FailureReason::Transfer {
                    peer: req.peer().to_owned(),
                    reason: e.to_string(),
                };
                ended.push((room, Err(reason)));
                false
            }
        });
        if !reqs.is_empty() {
            kept.push((room, reqs));
        }
    }
    let left = {
        let mut table = lock(&p.in_flight);
        for (room, reqs) in kept {
            table.entry(room).or_default().extend(reqs);
        }
        match room {
            Some(r) => table.contains_key(&r),
            None => !table.is_empty(),
        }
    };
    if !ended.is_empty() {
        let mut core = lock(&p.core);
        for (room, outcome) in ended {
            core.transfer_done(room, outcome);
        }
    }
    left
}

pub(crate) fn drive_prefill(s: &Shared) {
    let Some(p) = s.prefill() else { return };
    let mut lists = lock(&p.exec);
    let mut cmds = Vec::new();
    let mut staged = Vec::new();
    let mut direct = Vec::new();
    loop {
        cmds.clear();
        lock(&p.core).drain_commands(&mut cmds);
        let mut outcomes = Vec::new();
        let mut posted = Vec::new();
        let mut statuses = Vec::new();
        // Rooms one of whose posts failed to start: the rest of theirs in this batch (the aux
        // WRITE after a chunk's) are not started either, as SGLang's worker stops at the error.
        let mut refused: Vec<RoomId> = Vec::new();
        for cmd in cmds.drain(..) {
            match cmd {
                Command::SendStatus { endpoint, frames } => {
                    statuses.push((endpoint, frames));
                    continue;
                }
                Command::Post(post) if refused.contains(&post.room) => {
                    let reason = FailureReason::Transfer {
                        peer: post.peer.as_str().to_owned(),
                        reason: "not started: an earlier transfer of the room failed".into(),
                    };
                    outcomes.push(Outcome::Done(post.room, Err(reason)));
                    continue;
                }
                cmd => {
                    let room = match &cmd {
                        Command::Post(post) => Some(post.room),
                        _ => None,
                    };
                    let before = outcomes.len();
                    run(&s.agent, p, &mut lists, cmd, &mut outcomes, &mut posted);
                    let failed = outcomes[before..]
                        .iter()
                        .any(|o| matches!(o, Outcome::Done(_, Err(_))));
                    if let (Some(room), true) = (room, failed) {
                        refused.push(room);
                    }
                }
            }
        }
        if !statuses.is_empty() {
            // Queued, not awaited: a slow decode listener must not hold the transfers.
            let zmq = lock(&s.zmq);
            for (endpoint, frames) in statuses {
                let res = zmq
                    .as_ref()
                    .ok_or_else(|| "zmq thread stopped".to_owned())
                    .and_then(|z| z.post(&endpoint, frames));
                if let Err(e) = res {
                    tracing::warn!(%endpoint, error = %e, "status not sent");
                }
            }
        }
        if let Some(gpu) = &mut lists.gpu {
            gpu.progress(&s.agent, &mut staged, &mut direct);
            outcomes.extend(staged.drain(..).map(Outcome::Staged));
            outcomes.extend(direct.drain(..).map(|e| Outcome::Done(e.room, e.result)));
        }
        if let Some(hp) = &mut lists.host_pack {
            hp.progress(&s.agent, &mut direct);
            outcomes.extend(direct.drain(..).map(|e| Outcome::Done(e.room, e.result)));
        }
        if outcomes.is_empty() && posted.is_empty() {
            return;
        }
        if !posted.is_empty() {
            let mut table = lock(&p.in_flight);
            for (room, req) in posted {
                table.entry(room).or_default().push(req);
            }
        }
        let mut core = lock(&p.core);
        for o in outcomes {
            match o {
                Outcome::Loaded(agent, res) => core.remote_loaded(&agent, res),
                Outcome::Prepared(id, ok) => core.list_prepared(&id, ok),
                Outcome::Done(room, res) => core.transfer_done(room, res),
                Outcome::Staged(e) => {
                    core.staged_done(e.room, e.slot, e.result, std::time::Instant::now());
                }
                Outcome::DirectOpened(agent, res) => core.direct_opened(&agent, res),
            }
        }
    }
}

fn run(
    agent: &Agent,
    p: &PrefillIo,
    lists: &mut Lists,
    cmd: Command,
    outcomes: &mut Vec<Outcome>,
    posted: &mut Vec<(RoomId, XferRequest)>,
) {
    match cmd {
        Command::LoadRemote {
            agent: name,
            metadata,
        } => {
            // Through the probe: a failed load must not leave a socket in our agent.
            let res = lists.probe.load(agent, name.as_str(), &metadata);
            outcomes.push(Outcome::Loaded(name, res));
        }
        Command::Forget { agent: name } => {
            lists.lists.retain(
                |id, _| !matches!(id, ListId::Peer { agent, .. } if agent.as_str() == name),
            );
            if let Some(gpu) = &mut lists.gpu {
                gpu.forget(&name);
            }
            if let Err(e) = agent.invalidate_remote(&name) {
                tracing::debug!(peer = %name, error = %e, "remote metadata not invalidated");
            }
        }
        Command::Prepare(spec) => {
            let peer = match &spec.id {
                ListId::Peer { agent, .. } => Some(agent.as_str()),
                _ => None,
            };
            let ok = match agent.prepare(peer, &spec.descs) {
                Ok(list) => {
                    lists.lists.insert(spec.id.clone(), list);
                    true
                }
                Err(e) => {
                    tracing::debug!(list = ?spec.id, error = %e, "list not prepared");
                    false
                }
            };
            outcomes.push(Outcome::Prepared(spec.id, ok));
        }
        Command::Release(id) => {
            lists.lists.remove(&id);
        }
        // Taken out of the queue by the caller, which holds the ZMQ thread.
        Command::SendStatus { .. } => {}
        Command::OpenDirect {
            agent: name,
            pools,
            kv_ptrs,
            item_len,
        } => {
            let res = match &mut lists.gpu {
                Some(gpu) => gpu.open_direct(name.as_str(), &pools, &kv_ptrs, item_len),
                None => Err("this prefill cannot map pools".into()),
            };
            outcomes.push(Outcome::DirectOpened(name, res));
        }
        Command::Post(post) => {
            if let Err(reason) = execute(agent, p, lists, &post, posted) {
                tracing::warn!(room = %post.room, peer = %post.peer, %reason, "transfer not started");
                let reason = FailureReason::Transfer {
                    peer: post.peer.as_str().to_owned(),
                    reason,
                };
                outcomes.push(Outcome::Done(post.room, Err(reason)));
            }
        }
        Command::Notify { agents, payload } => {
            for a in agents {
                if let Err(e) = agent.send_notification(a.as_str(), &payload) {
                    tracing::debug!(peer = %a, error = %e, "notification not delivered");
                }
            }
            // A stand-alone notification leaves only when the agent is progressed, and no
            // progress thread runs by default: progress now (the inbound thread does on its
            // ticks too), so a failed sender dropped at once still tells its decode.
            progress(agent, p);
        }
        Command::Stage(w) => {
            // Only a core given a staging buffer stages (`with_staging`), and only a manager
            // with one gives it that.
            let res = match &mut lists.gpu {
                Some(gpu) => gpu.stage(w),
                None => Err(StageEnd {
                    room: w.room,
                    slot: w.local_slot,
                    result: Err(FailureReason::Staging(
                        "this prefill has no staging buffer".into(),
                    )),
                }),
            };
            match res {
                Ok(()) => {
                    p.made_staged.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => outcomes.push(Outcome::Staged(e)),
            }
        }
    }
}

/// Progresses the agent's workers, draining its notifications into the core (our decodes'
/// `nixl-rs:freed:` notices; anything else is ignored there).
pub(crate) fn progress(agent: &Agent, p: &PrefillIo) {
    let mut notifs = Vec::new();
    if agent.drain_notifications(&mut notifs).is_ok() && !notifs.is_empty() {
        let now = std::time::Instant::now();
        let mut core = lock(&p.core);
        for n in &notifs {
            core.handle_notification(&n.peer, &n.payload, now);
        }
    }
}

/// Starts a posted chunk by its kind, one executor each, and counts it once it started.
fn execute(
    agent: &Agent,
    p: &PrefillIo,
    lists: &mut Lists,
    post: &Post,
    posted: &mut Vec<(RoomId, XferRequest)>,
) -> Result<(), String> {
    let counter = match &post.work {
        Work::Indexed { .. } | Work::Explicit { .. } => {
            let req = make(agent, lists, post)?;
            req.post().map_err(|e| e.to_string())?;
            posted.push((post.room, req));
            match post.work {
                Work::Indexed { .. } => &p.made_prepared,
                _ => &p.made_explicit,
            }
        }
        Work::Direct { src, dst, slice } => {
            // Only a core told `with_direct` routes to Direct, and only a prefill with a staging
            // buffer (and its kernels) tells it so.
            let gpu = lists
                .gpu
                .as_mut()
                .ok_or("this prefill cannot launch direct copies")?;
            let notif = post.notif.clone();
            gpu.direct(post.room, post.peer.as_str(), src, dst, *slice, notif)?;
            &p.made_direct
        }
        Work::Packed { area, .. } => {
            // The core chose the packer with the route: host areas on host pools, the staging
            // buffer's packing slot on GPU pools.
            let notif = post.notif.clone();
            let (room, peer) = (post.room, post.peer.as_str());
            match (area, &mut lists.host_pack, &mut lists.gpu) {
                (PackArea::Host { .. }, Some(hp), _) => hp.push(room, peer, &post.work, notif),
                (PackArea::Gpu { .. }, _, Some(gpu)) => {
                    gpu.pack(agent, room, peer, &post.work, notif)
                }
                _ => Err(format!("this prefill has no packer for {area:?}")),
            }?;
            &p.made_packed
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The NIXL request of a WRITE chunk: indices into two prepared lists, or explicit descriptors.
fn make(agent: &Agent, lists: &Lists, post: &Post) -> Result<XferRequest, String> {
    if post.work.is_empty() {
        return Err("nothing to transfer (the decode registered no matching buffers)".into());
    }
    // 0.5.23 decodes get no notification (docs/protocol.md §10.8).
    let notif = (!post.notif.is_empty()).then_some(&post.notif[..]);
    match &post.work {
        Work::Indexed {
            local,
            remote,
            local_idx,
            remote_idx,
        } => {
            let (Some(l), Some(r)) = (lists.lists.get(local), lists.lists.get(remote)) else {
                return Err("a prepared descriptor list is missing".into());
            };
            agent
                .make_request(XferOp::Write, l, local_idx, r, remote_idx, notif)
                .map_err(|e| e.to_string())
        }
        Work::Explicit { local, remote } => agent
            .create_request(XferOp::Write, local, remote, post.peer.as_str(), notif)
            .map_err(|e| e.to_string()),
        Work::Direct { .. } | Work::Packed { .. } => {
            Err("not a NIXL request (started by its own executor)".into())
        }
    }
}

/// Runs the decode core's queue in order (frames, scatters, notifications), then reports the
/// scatters that finished, until nothing is left to do; failures go back to the core.
pub(crate) fn drive_decode(s: &Shared) {
    let Some(d) = s.decode() else { return };
    let order = lock(&d.sending);
    run_decode(s, d, &order);
}

/// [`drive_decode`] unless another thread is at it (its frames may be stuck behind a stalled
/// prefill for seconds): then only finished scatters are reported, and that thread runs what
/// they queue once its sends return. For polls, which must not block.
pub(crate) fn try_drive_decode(s: &Shared) {
    let Some(d) = s.decode() else { return };
    match d.sending.try_lock() {
        Ok(order) => run_decode(s, d, &order),
        Err(std::sync::TryLockError::Poisoned(e)) => run_decode(s, d, &e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => {
            report_scatters(d);
        }
    }
}

/// Feeds the scatters that finished to the core; whether any did.
fn report_scatters(d: &DecodeIo) -> bool {
    let mut ended = Vec::new();
    if let Some(gpu) = &d.gpu {
        lock(gpu).progress(&mut ended);
    }
    if ended.is_empty() {
        return false;
    }
    let mut core = lock(&d.core);
    for e in ended {
        core.scatter_done(e.room, e.slot, e.result);
    }
    true
}

/// The loop of [`drive_decode`]; `_order` is the held `sending` lock.
fn run_decode(s: &Shared, d: &DecodeIo, _order: &std::sync::MutexGuard<'_, ()>) {
    let mut cmds = Vec::new();
    loop {
        lock(&d.core).drain_commands(&mut cmds);
        let ran = !cmds.is_empty();
        for cmd in cmds.drain(..) {
            send(s, d, cmd);
        }
        // Finished scatters queue freed-slot messages: run the queue again.
        if !report_scatters(d) && !ran {
            return;
        }
    }
}

fn send(s: &Shared, d: &DecodeIo, cmd: DecodeCommand) {
    match cmd {
        DecodeCommand::Send {
            room,
            endpoint,
            frames,
        } => {
            let res = match lock(&s.zmq).as_ref() {
                Some(z) => z.send(&endpoint, frames),
                None => Err("the ZeroMQ thread stopped".into()),
            };
            if let Err(reason) = res {
                tracing::warn!(%room, %endpoint, %reason, "message to the prefill not sent");
                lock(&d.core).send_failed(room, &endpoint, reason);
            }
        }
        DecodeCommand::Scatter {
            room,
            slot,
            pages,
            slice,
        } => {
            // Only a decode that announced a ring is sent staged pieces.
            let res = match &d.gpu {
                Some(gpu) => lock(gpu).scatter(room, slot, &pages, slice.as_ref()),
                None => Err(ScatterEnd {
                    room,
                    slot,
                    result: Err("this decode has no staging ring".to_owned()),
                }),
            };
            if let Err(e) = res {
                lock(&d.core).scatter_done(e.room, e.slot, e.result);
            }
        }
    }
}
