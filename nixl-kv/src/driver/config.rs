//! Manager configuration, with SGLang's environment variables as defaults.

use std::time::Duration;

/// Timeouts, heartbeats and addresses: `Default` (from SGLang's environment variables) plus
/// chained setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ManagerConfig {
    /// The IP to bind (prefill) and advertise.
    pub local_ip: String,
    /// Decode: seconds between `/health` checks of each prefill bootstrap server
    /// (`SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL`, default 5, at least 2 from the variable).
    pub heartbeat_interval: Duration,
    /// Decode: failed checks before every room of that prefill fails
    /// (`SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE`, default 2, at least 1).
    pub heartbeat_max_failures: u32,
    /// Decode: how long a started receiver may wait for its data
    /// (`SGLANG_DISAGGREGATION_WAITING_TIMEOUT`, default 300 s).
    pub waiting_timeout: Option<Duration>,
    /// Prefill: how long a room without a sender is kept
    /// (`SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT`, default 300 s).
    pub orphan_timeout: Duration,
    /// Timeout of each bootstrap HTTP request.
    pub http_timeout: Duration,
    /// Prefill: the secret sent with the registration (`PUT /route`), for a bootstrap server
    /// that takes registrations only with it
    /// ([`BootstrapServer::start_with_token`](crate::BootstrapServer::start_with_token)), so
    /// that no stranger can register a rank before the real one does. Default:
    /// `NIXL_RS_BOOTSTRAP_TOKEN` when set, else none.
    pub bootstrap_token: Option<String>,
    /// Decode: how long a receiver's bootstrap may take in all: every lookup a
    /// [`KvReceiver::new`](crate::KvReceiver::new) makes, and each heartbeat round's re-checks
    /// of cached rank entries (default 30 s). A bootstrap server naming many ranks that answer
    /// slowly then fails the request with the reason instead of holding the caller for minutes.
    pub bootstrap_deadline: Duration,
    /// Prefill: how long a decode agent that sends nothing (and that no room refers to) stays
    /// registered before its NIXL metadata is released (default 600 s; our decodes re-register
    /// every 60 s while active).
    pub peer_idle_timeout: Duration,
    /// Prefill: refuse transfer infos from decodes that cannot prove they are the agent they
    /// name (SGLang's Python decodes cannot); off by default, as SGLang accepts them.
    pub strict_peers: bool,
    /// The staged GPU path between two of our peers (docs/runtime.md §12), with the same-node
    /// direct path: `None` (the default) leaves the choice to [`ManagerConfig::auto_staging`];
    /// without either, pages move as SGLang moves them, one descriptor per page and buffer.
    /// Needs GPU KV pools and nixl-kv's `cuda` feature.
    pub staging: Option<StagingConfig>,
    /// With GPU KV pools, the `cuda` feature and no [`ManagerConfig::staging`] given, stage with
    /// [`StagingConfig::recommended`] (direct between our peers on one node, staged between
    /// ours on two, SGLang's per-page path to every other peer). On by default.
    pub auto_staging: bool,
    /// With GPU KV pools and a [`ManagerConfig::busy_poll`] of zero, poll for
    /// [`RECOMMENDED_BUSY_POLL`] after traffic. On by default; host pools never get it.
    pub auto_busy_poll: bool,
    /// Decode: for a model that is not MLA, ask a prefill of a smaller attention-TP size for
    /// head slices (docs/protocol.md §5.6). Only prefills that slice heads (SGLang 0.5.2 and
    /// later, or ours given `KvArgs::heads`) may be asked: an older one would write whole
    /// pages. Off by default: such pairs fail with a reason, as in SGLang 0.5.1.
    pub sliced_tp: bool,
    /// How long the manager's own waits poll without sleeping after traffic before they
    /// block: the prefill's inbound thread after each message, [`KvManager::wait_unclaimed`]
    /// after the last message, a decode waiting for its send to reach the socket, and the ZMQ
    /// thread after each message sent or received. Zero always blocks (the default on host
    /// pools; GPU pools get [`RECOMMENDED_BUSY_POLL`], see [`ManagerConfig::auto_busy_poll`]);
    /// a window of a millisecond or two saves the thread wake-ups of a request that follows
    /// another closely (BENCHMARKS.md has the figures), at the cost of a core per polling thread
    /// while traffic flows (none once the window has passed).
    ///
    /// [`KvManager::wait_unclaimed`]: crate::KvManager::wait_unclaimed
    pub busy_poll: Duration,
    /// Prefill with host KV pools: head slices for a decode of a larger attention-TP size are
    /// gathered on the CPU into whole decode pages and written as pages (the packed path on
    /// host memory, docs/protocol.md §5.6), instead of one descriptor per token slot. The
    /// decode side is passive (SGLang's decodes included). `None` (the default): per-token
    /// descriptors.
    pub host_packing: Option<HostPacking>,
    /// Prefill: tokens per page and the KV cache's dtype name (`bfloat16`, ...), as SGLang
    /// 0.5.20–0.5.23 decodes check them against their own. Given, the prefill registers with
    /// its bootstrap server in a form every SGLang release reads (docs/protocol.md §10.7), so
    /// that 0.5.2x decodes can bootstrap from it; `None` (the default): 0.5.1's form only.
    pub sglang_pages: Option<(u32, String)>,
    /// Decode: the wire format it speaks to a prefill until that prefill's bootstrap server
    /// reveals its own (asked first in this profile's form, docs/protocol.md §10.12). A prefill
    /// answers each decode in the decode's own profile whatever this says. Default
    /// `sglang-0.5.1`.
    pub profile: nixl_wire::Profile,
}

/// The packed path on host pools: the KV pools themselves, as the engine shares them with the
/// manager, and the registered areas the slices are gathered into.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HostPacking {
    /// Buffers that hold every KV buffer of the manager's `KvArgs` (each KV buffer's pages
    /// inside one of them), read by copies while the engine keeps writing other pages.
    pub pools: Vec<nixl_core::SharedHostBuffer>,
    /// Bytes of one packing area: a piece is as many whole decode pages of every buffer as fit.
    pub area_bytes: u64,
    /// Areas, allocated and registered on first use: how many pieces can be in flight at once.
    pub areas: u32,
}

impl HostPacking {
    /// Packing out of `pools`, in 4 areas of 4 MiB.
    pub fn new(pools: Vec<nixl_core::SharedHostBuffer>) -> Self {
        Self {
            pools,
            area_bytes: 4 << 20,
            areas: 4,
        }
    }

    /// Sets the areas' size and count (a count of at least 1).
    #[must_use]
    pub fn areas(mut self, area_bytes: u64, areas: u32) -> Self {
        self.area_bytes = area_bytes;
        self.areas = areas.max(1);
        self
    }
}

/// The staged path's buffer: `slots` slots of `slot_bytes` in GPU memory, allocated and
/// registered by the manager. On a decode it is the ring that prefills write into, with up to
/// `per_room` slots granted to one room; on a prefill, the slots its gathers fill, plus, with
/// [`StagingConfig::packed`] and once a decode of another TP size takes packed head slices
/// (docs/protocol.md §5.6), a packing area of one more slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StagingConfig {
    /// Bytes of one slot: a piece holds as many whole pages (of every KV buffer) as fit.
    pub slot_bytes: u64,
    /// Slots, 1 to 1024.
    pub slots: u32,
    /// Decode: slots one room may hold at once (1 to `slots`).
    pub per_room: u32,
    /// Same node: a decode exports its KV pools to prefills on its node, and a prefill copies
    /// pages straight into them with one kernel, with no staging slot and no NIXL WRITE
    /// (docs/protocol.md §3.5). On by default; off, same-node pairs stage as other pairs do.
    pub direct: bool,
    /// Prefill: head slices for a decode of a larger TP size that does not go direct are
    /// gathered into whole decode pages and written as pages (the packed path, docs/protocol.md
    /// §5.6) instead of one descriptor per token slot. On by default (much faster than the
    /// per-token descriptors: BENCHMARKS.md); off, such decodes get SGLang's per-token
    /// descriptors.
    pub packed: bool,
}

/// Busy-poll window managers over GPU pools take by default: long enough to cover the gap
/// between the requests of one stream, short enough that an idle manager sleeps again within
/// milliseconds (chosen by a sweep of 0 to 5 ms on the lent H100: BENCHMARKS.md, session 10).
pub const RECOMMENDED_BUSY_POLL: Duration = Duration::from_millis(2);

/// Slots of [`StagingConfig::recommended`] (8 × 64 MiB beat 4 × 16 MiB by 1.6× at 32 pages and
/// 3× at 256 on the lent H100: BENCHMARKS.md, session 10).
pub const RECOMMENDED_SLOTS: u32 = 8;
/// MiB per slot of [`StagingConfig::recommended`].
pub const RECOMMENDED_SLOT_MIB: u64 = 64;

impl StagingConfig {
    /// The ring managers over GPU pools take by default: [`RECOMMENDED_SLOTS`] slots of
    /// [`RECOMMENDED_SLOT_MIB`] MiB, direct and packed on.
    pub fn recommended() -> Self {
        Self {
            slot_bytes: RECOMMENDED_SLOT_MIB << 20,
            slots: RECOMMENDED_SLOTS,
            per_room: (RECOMMENDED_SLOTS / 2).max(1),
            direct: true,
            packed: true,
        }
    }

    /// `slots` slots of `slot_bytes` each, up to half of them (at least one) per room; `None`
    /// when either is zero or `slots` is over 1024.
    pub fn new(slot_bytes: u64, slots: u32) -> Option<Self> {
        (slot_bytes > 0 && (1..=nixl_wire::ext::MAX_SLOTS).contains(&slots)).then_some(Self {
            slot_bytes,
            slots,
            per_room: (slots / 2).max(1),
            direct: true,
            packed: true,
        })
    }

    /// Turns the same-node direct path on or off (see [`StagingConfig::direct`]).
    #[must_use]
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = on;
        self
    }

    /// Turns the packed path for head slices on or off (see [`StagingConfig::packed`]).
    #[must_use]
    pub fn packed(mut self, on: bool) -> Self {
        self.packed = on;
        self
    }

    /// Sets how many slots one room may hold (clamped to 1..=`slots`).
    #[must_use]
    pub fn per_room(mut self, n: u32) -> Self {
        self.per_room = n.clamp(1, self.slots);
        self
    }

    /// Bytes of GPU memory the buffer takes.
    pub fn bytes(&self) -> u64 {
        self.slot_bytes.saturating_mul(u64::from(self.slots))
    }
}

/// The environment variable with the bootstrap token (see
/// [`ManagerConfig::bootstrap_token`]).
pub const TOKEN_ENV: &str = "NIXL_RS_BOOTSTRAP_TOKEN";

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

impl Default for ManagerConfig {
    fn default() -> Self {
        let interval =
            env_f64("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL").map_or(5.0, |v| v.max(2.0));
        let failures =
            env_f64("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE").map_or(2.0, |v| v.max(1.0));
        let waiting = env_f64("SGLANG_DISAGGREGATION_WAITING_TIMEOUT").unwrap_or(300.0);
        let orphan = env_f64("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT").unwrap_or(300.0);
        Self {
            local_ip: "127.0.0.1".into(),
            heartbeat_interval: Duration::from_secs_f64(interval),
            heartbeat_max_failures: failures as u32,
            waiting_timeout: (waiting > 0.0).then(|| Duration::from_secs_f64(waiting)),
            orphan_timeout: Duration::from_secs_f64(orphan.max(0.0)),
            http_timeout: Duration::from_secs(5),
            bootstrap_deadline: Duration::from_secs(30),
            bootstrap_token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
            strict_peers: false,
            peer_idle_timeout: crate::proto::prefill::DEFAULT_PEER_IDLE_TIMEOUT,
            staging: None,
            auto_staging: true,
            auto_busy_poll: true,
            sliced_tp: false,
            busy_poll: Duration::ZERO,
            host_packing: None,
            sglang_pages: None,
            profile: nixl_wire::Profile::Sglang051,
        }
    }
}

impl ManagerConfig {
    /// Announces tokens per page and the KV dtype name to 0.5.20–0.5.23 decodes (see
    /// [`ManagerConfig::sglang_pages`]).
    #[must_use]
    pub fn sglang_pages(mut self, page_size: u32, kv_cache_dtype: &str) -> Self {
        self.sglang_pages = Some((page_size, kv_cache_dtype.to_owned()));
        self
    }

    /// Sets the wire format a decode speaks (see [`ManagerConfig::profile`]).
    #[must_use]
    pub fn profile(mut self, profile: nixl_wire::Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Sets the IP to bind and advertise.
    #[must_use]
    pub fn local_ip(mut self, ip: &str) -> Self {
        self.local_ip = ip.to_owned();
        self
    }

    /// Sets the timeout of each bootstrap HTTP request.
    #[must_use]
    pub fn http_timeout(mut self, t: Duration) -> Self {
        self.http_timeout = t;
        self
    }

    /// Sets the secret sent with the registration (see [`ManagerConfig::bootstrap_token`]).
    #[must_use]
    pub fn bootstrap_token(mut self, token: Option<String>) -> Self {
        self.bootstrap_token = token;
        self
    }

    /// Sets how long a receiver's whole bootstrap may take (see
    /// [`ManagerConfig::bootstrap_deadline`]).
    #[must_use]
    pub fn bootstrap_deadline(mut self, t: Duration) -> Self {
        self.bootstrap_deadline = t;
        self
    }

    /// Sets the heartbeat interval and failure count (programmatic values are not clamped).
    #[must_use]
    pub fn heartbeat(mut self, interval: Duration, max_failures: u32) -> Self {
        self.heartbeat_interval = interval;
        self.heartbeat_max_failures = max_failures.max(1);
        self
    }

    /// Sets the decode waiting timeout (`None`: wait forever, as the seed).
    #[must_use]
    pub fn waiting_timeout(mut self, t: Option<Duration>) -> Self {
        self.waiting_timeout = t;
        self
    }

    /// Prefill: refuse transfer infos whose origin cannot be proven (see
    /// [`ManagerConfig::strict_peers`]).
    #[must_use]
    pub fn strict_peers(mut self, strict: bool) -> Self {
        self.strict_peers = strict;
        self
    }

    /// Prefill: sets how long an idle decode agent stays registered (see
    /// [`ManagerConfig::peer_idle_timeout`]).
    #[must_use]
    pub fn peer_idle_timeout(mut self, t: Duration) -> Self {
        self.peer_idle_timeout = t;
        self
    }

    /// Turns the staged GPU path on (see [`ManagerConfig::staging`]).
    #[must_use]
    pub fn staging(mut self, staging: Option<StagingConfig>) -> Self {
        self.staging = staging;
        self
    }

    /// Turns the GPU-pool staging default on or off (see [`ManagerConfig::auto_staging`]).
    #[must_use]
    pub fn auto_staging(mut self, on: bool) -> Self {
        self.auto_staging = on;
        self
    }

    /// Turns the GPU-pool busy-polling default on or off (see
    /// [`ManagerConfig::auto_busy_poll`]).
    #[must_use]
    pub fn auto_busy_poll(mut self, on: bool) -> Self {
        self.auto_busy_poll = on;
        self
    }

    /// The settings a manager over KV pools in `mem` runs with: the GPU defaults filled in
    /// where they apply, each logged once.
    pub(crate) fn resolved(mut self, mem: nixl_core::MemType) -> Self {
        let gpu = mem == nixl_core::MemType::Vram;
        if gpu && self.staging.is_none() && self.auto_staging && cfg!(feature = "cuda") {
            let st = StagingConfig::recommended();
            tracing::info!(
                slots = st.slots,
                slot_mib = st.slot_bytes >> 20,
                "GPU KV pools: the direct and staged paths are on (ring of {} x {} MiB)",
                st.slots,
                st.slot_bytes >> 20
            );
            self.staging = Some(st);
        }
        if gpu && self.busy_poll.is_zero() && self.auto_busy_poll {
            tracing::info!(
                window_us = RECOMMENDED_BUSY_POLL.as_micros() as u64,
                "GPU KV pools: busy polling after traffic is on"
            );
            self.busy_poll = RECOMMENDED_BUSY_POLL;
        }
        self
    }

    /// Prefill: gathers head slices out of host pools (see [`ManagerConfig::host_packing`]).
    #[must_use]
    pub fn host_packing(mut self, packing: Option<HostPacking>) -> Self {
        self.host_packing = packing;
        self
    }

    /// Decode: allows head slices from smaller prefills (see [`ManagerConfig::sliced_tp`]).
    #[must_use]
    pub fn sliced_tp(mut self, on: bool) -> Self {
        self.sliced_tp = on;
        self
    }

    /// Sets [`ManagerConfig::busy_poll`].
    #[must_use]
    pub fn busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll = window;
        self
    }

    /// Sets the prefill orphan-room timeout.
    #[must_use]
    pub fn orphan_timeout(mut self, t: Duration) -> Self {
        self.orphan_timeout = t;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_core::MemType;

    #[test]
    fn gpu_pools_get_the_fast_paths_without_being_asked_and_host_pools_never_do() {
        let host = ManagerConfig::default().resolved(MemType::Dram);
        assert_eq!(host.staging, None);
        assert_eq!(host.busy_poll, Duration::ZERO);

        let gpu = ManagerConfig::default().resolved(MemType::Vram);
        assert_eq!(gpu.busy_poll, RECOMMENDED_BUSY_POLL);
        // Staging needs the kernels of the `cuda` feature; without it the manager would refuse
        // to start, so the default leaves it off.
        let staged = cfg!(feature = "cuda").then(StagingConfig::recommended);
        assert_eq!(gpu.staging, staged);
        if let Some(st) = gpu.staging {
            assert!(st.direct && st.packed);
            assert_eq!(st.slots, RECOMMENDED_SLOTS);
            assert_eq!(st.slot_bytes, RECOMMENDED_SLOT_MIB << 20);
        }
    }

    #[test]
    fn what_is_asked_for_or_turned_off_stays_as_it_is() {
        let off = ManagerConfig::default()
            .auto_staging(false)
            .auto_busy_poll(false)
            .resolved(MemType::Vram);
        assert_eq!(off.staging, None);
        assert_eq!(off.busy_poll, Duration::ZERO);

        let mine = StagingConfig::new(1 << 20, 2).unwrap().direct(false);
        let asked = ManagerConfig::default()
            .staging(Some(mine))
            .busy_poll(Duration::from_micros(300))
            .resolved(MemType::Vram);
        assert_eq!(asked.staging, Some(mine));
        assert_eq!(asked.busy_poll, Duration::from_micros(300));
    }
}
