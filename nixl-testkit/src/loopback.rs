//! Two agents in one process.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, Notification, Registered,
    UcxErrorMode, XferRequest,
};

use crate::{Error, Result};

/// A process-unique agent name with `prefix`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An initiator and a target agent with UCX backends, one registered host buffer each, and the
/// target's metadata loaded by the initiator.
#[derive(Debug)]
pub struct LoopbackPair {
    /// Issues transfers.
    pub initiator: Agent,
    /// Receives them.
    pub target: Agent,
    /// The initiator's buffer.
    pub src: Registered<HostBuffer>,
    /// The target's buffer.
    pub dst: Registered<HostBuffer>,
}

impl LoopbackPair {
    /// A pair with `len`-byte buffers, UCX in its default (peer) error mode.
    pub fn new(len: usize) -> Result<Self> {
        Self::with_mode(len, UcxErrorMode::Peer)
    }

    /// A pair with `len`-byte buffers and the given UCX error mode.
    pub fn with_mode(len: usize, mode: UcxErrorMode) -> Result<Self> {
        let config = AgentConfig::default();
        let initiator = Agent::new(&unique_name("initiator"), &config)?;
        let target = Agent::new(&unique_name("target"), &config)?;
        for a in [&initiator, &target] {
            a.create_backend(BackendKind::Ucx, &BackendParams::ucx(mode))?;
        }
        let src = initiator.register(HostBuffer::new(len)?)?;
        let dst = target.register(HostBuffer::new(len)?)?;
        initiator.load_remote(target.local_metadata()?.as_bytes())?;
        Ok(Self {
            initiator,
            target,
            src,
            dst,
        })
    }

    /// Waits for `req`, progressing the target and collecting its notifications into `notifs`.
    pub fn wait(&self, req: &XferRequest, notifs: &mut Vec<Notification>) -> Result<()> {
        let mut drain_err = None;
        req.wait(Duration::from_secs(30), || {
            if let Err(e) = self.target.drain_notifications(notifs) {
                drain_err = Some(e);
            }
        })?;
        match drain_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Waits until the target has received a notification with `payload`, which is removed
    /// from `notifs` and returned. Both agents are progressed while waiting (without a progress
    /// thread, a stand-alone notification leaves only when its sender is progressed).
    pub fn wait_notification(
        &self,
        notifs: &mut Vec<Notification>,
        payload: &[u8],
    ) -> Result<Notification> {
        let mut initiator_inbox = Vec::new();
        wait_for_notification(
            &self.target,
            notifs,
            payload,
            Duration::from_secs(30),
            &mut || {
                // Progress only; the initiator receives nothing in these tests.
                let _ = self.initiator.drain_notifications(&mut initiator_inbox);
            },
        )
    }
}

/// Drains `agent`'s notifications into `notifs` until one with `payload` is there; removes and
/// returns it. `progress` runs between polls (to progress the sending agent).
pub fn wait_for_notification(
    agent: &Agent,
    notifs: &mut Vec<Notification>,
    payload: &[u8],
    timeout: Duration,
    progress: &mut dyn FnMut(),
) -> Result<Notification> {
    let start = Instant::now();
    loop {
        if let Some(i) = notifs.iter().position(|n| n.payload == payload) {
            return Ok(notifs.remove(i));
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout(format!(
                "notification {:?} not received by {}",
                String::from_utf8_lossy(payload),
                agent.name()
            )));
        }
        agent.drain_notifications(notifs)?;
        progress();
        std::thread::yield_now();
    }
}
