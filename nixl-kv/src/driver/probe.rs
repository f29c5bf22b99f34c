//! The probe: a disposable NIXL agent that loads each decode's metadata before the manager's
//! agent does (docs/protocol.md §3.3).
//!
//! A UCX worker keeps one socket open for every endpoint it ever tried to create: for one whose
//! creation failed (metadata naming a worker that is gone) and for one whose metadata was
//! invalidated since. Only destroying the worker closes them, and the manager's agent lives as
//! long as the manager. So metadata reaches the manager's agent only once the probe loaded it
//! under the name it was registered with, and the probe is replaced after every
//! [`LOADS_PER_PROBE`] loads, which bounds the descriptors it holds.

use std::time::{Duration, Instant};

use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams};

/// Loads into one probe agent before it is replaced (each can leave a socket behind).
const LOADS_PER_PROBE: u32 = 16;

/// After the probe agent could not be created, how long loads go straight to the manager's
/// agent before creating it is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// The probe agent, made on the first load, and its count of loads.
#[derive(Default)]
pub(crate) struct Probe {
    agent: Option<Agent>,
    loads: u32,
    made: u64,
    retry_at: Option<Instant>,
}

impl Probe {
    /// Loads `metadata`, registered under `claimed`, into `owner` once the probe loaded it
    /// under that name. Returns the agent name NIXL loaded, or why nothing was loaded into
    /// `owner`. Metadata naming another agent is not loaded into `owner` (the core would only
    /// forget it again); its name is returned for the core to judge.
    pub(crate) fn load(
        &mut self,
        owner: &Agent,
        claimed: &str,
        metadata: &[u8],
    ) -> Result<String, String> {
        let Some(probe) = self.take(owner) else {
            // No probe: the manager's agent loads it, as without one.
            return owner.load_remote(metadata).map_err(|e| e.to_string());
        };
        self.loads += 1;
        let res = probe.load_remote(metadata).map_err(|e| e.to_string());
        // A probe that holds metadata it could not forget would refuse that agent next time.
        let forgotten = match &res {
            Ok(name) => probe.invalidate_remote(name).map_err(|e| {
                tracing::debug!(peer = %name, error = %e, "probe metadata not invalidated");
            }),
            Err(_) => Ok(()),
        };
        if forgotten.is_ok() && self.loads < LOADS_PER_PROBE {
            self.agent = Some(probe);
        } else {
            tracing::debug!(
                probe = probe.name(),
                loads = self.loads,
                "probe agent replaced"
            );
            self.loads = 0;
            drop(probe);
        }
        match res {
            Ok(name) if name == claimed => owner.load_remote(metadata).map_err(|e| e.to_string()),
            Ok(name) => Ok(name),
            Err(reason) => Err(format!("{reason} (in the probe agent)")),
        }
    }

    /// Takes the probe agent out, creating one when there is none (unless a creation failed
    /// less than [`RETRY`] ago).
    fn take(&mut self, owner: &Agent) -> Option<Agent> {
        if let Some(a) = self.agent.take() {
            return Some(a);
        }
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        self.made += 1;
        let name = format!("{}.probe.{}", owner.name(), self.made);
        let made = Agent::new(&name, &AgentConfig::default()).and_then(|a| {
            a.create_backend(BackendKind::Ucx, &BackendParams::new())?;
            Ok(a)
        });
        match made {
            Ok(a) => {
                tracing::debug!(probe = %name, "probe agent created");
                self.retry_at = None;
                Some(a)
            }
            Err(e) => {
                tracing::warn!(
                    probe = %name,
                    error = %e,
                    retry_s = RETRY.as_secs(),
                    "no probe agent; decode metadata goes straight to the manager's agent"
                );
                self.retry_at = Some(now + RETRY);
                None
            }
        }
    }
}
