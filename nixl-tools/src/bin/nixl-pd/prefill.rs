//! `nixl-pd prefill`: serves rooms until killed, sending pages of a known pattern.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_kv::BootstrapServer;
use nixl_kv::{FailureReason, KvManager, KvPoll, KvSender, RoomId};
use rand::Rng;

use crate::memory::{args, memory};
use crate::{Pool, aux_byte, reason};

/// Sleep between polls of a prefill's active senders.
const POLL_ACTIVE: Duration = Duration::from_micros(100);
/// A busy prefill's interval between looks for new rooms.
const SCAN_BUSY: Duration = Duration::from_millis(1);
/// The longest interval between looks for new rooms, reached by doubling while idle.
const SCAN_IDLE: Duration = Duration::from_millis(16);
/// A scan for new rooms takes at most 1/this of the time.
const SCAN_COST_RATIO: u32 = 50;

pub(crate) struct PrefillOpts {
    /// Another rank's bootstrap server to register with (none started here).
    pub(crate) join: Option<String>,
    pub(crate) chunk: Option<usize>,
    pub(crate) stats_every: Option<Duration>,
    pub(crate) abort_one_in: Option<u32>,
}

/// A room being sent: its sender, source pages, pages sent so far, and the page count at
/// which the abort knob aborts it.
struct Active {
    tx: KvSender,
    src: Vec<u32>,
    sent: usize,
    abort_at: Option<usize>,
}

/// What a prefill has done, for its stats line.
#[derive(Default)]
struct Counts {
    served: u64,
    failed: u64,
    aborted: u64,
}

/// This process's resident set (kB, from `/proc/self/status`) and open descriptors.
fn rss_and_fds() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (rss, fds)
}

pub(crate) fn prefill(
    pool: &Pool,
    port: u16,
    host: &str,
    opts: &PrefillOpts,
) -> anyhow::Result<()> {
    let mut m = memory(pool, "prefill")?;
    let page = pool.page_bytes as usize;
    for b in 0..m.kv.len() {
        m.kv.fill(b, page, |p, bytes| {
            for (j, byte) in bytes.iter_mut().enumerate() {
                *byte = pool.kv_byte(b, p, j);
            }
        })?;
    }
    let a = args(&m, pool)?;
    // Host pools go to the manager too: head slices for larger decodes are packed out of them.
    let packing = match m.kv.host_pools() {
        Some(pools) if !pool.no_packed => Some(nixl_kv::HostPacking::new(pools)),
        _ => None,
    };
    let config = pool.manager_config()?.local_ip(host).host_packing(packing);
    // The server lives as long as this loop; a joining rank starts none. With
    // NIXL_RS_BOOTSTRAP_TOKEN set, it takes registrations only from ranks that send it.
    let (_server, addr) = match &opts.join {
        Some(j) => (None, j.clone()),
        None => {
            let at = format!("{host}:{port}");
            let s = match &config.bootstrap_token {
                Some(t) => BootstrapServer::start_with_token(&at, t)?,
                None => BootstrapServer::start(&at)?,
            };
            let a = s.addr().to_string();
            (Some(s), a)
        }
    };
    let mgr = KvManager::prefill(m.agent.clone(), a, &addr, config).map_err(|e| {
        let conflict = matches!(
            &e,
            nixl_kv::Error::Bootstrap(nixl_kv::net::bootstrap::BootstrapError::Conflict { .. })
        );
        if conflict {
            anyhow::anyhow!(
                "{e}\n  another process registered this rank first. If it is not one of yours, \
                 give every prefill rank the same {} so that only they can register",
                nixl_kv::TOKEN_ENV
            )
        } else {
            anyhow::Error::from(e)
        }
    })?;
    eprintln!(
        "prefill: bootstrap on {addr}, zmq port {}, {} KV buffers of {} pages",
        mgr.rank_port(),
        m.kv.len(),
        pool.pages
    );
    let mut rng = rand::rng();
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut counts = Counts::default();
    let mut next_slot = 0u32;
    // Per-room time from claiming the room (all decode infos arrived) to both transfers done,
    // summarised on stderr every 20 rooms: the transfer time as this side sees it, to tell
    // apart from what the decode measures (which adds the ZMQ request and the notification).
    let mut claimed: HashMap<u64, Instant> = HashMap::new();
    let mut served: Vec<Duration> = Vec::new();
    let mut scan_every = SCAN_BUSY;
    let mut next_scan = Instant::now();
    let mut next_stats = opts.stats_every.map(|d| Instant::now() + d);
    loop {
        let now = Instant::now();
        if now >= next_scan {
            let scan_start = Instant::now();
            let unclaimed = mgr.unclaimed_rooms();
            let cost = scan_start.elapsed();
            let found = !unclaimed.is_empty();
            for unclaimed in unclaimed {
                let (room, n) = (unclaimed.room.get(), unclaimed.pages);
                if n == 0 || active.contains_key(&room) {
                    // nixl-kv never offers a room without pages (dummy infos only); a sender
                    // for one would wait forever.
                    continue;
                }
                let slot = next_slot % pool.aux_slots;
                next_slot = next_slot.wrapping_add(1);
                for (k, aux) in m.aux.iter_mut().enumerate() {
                    let item = m.aux_items[k] as usize;
                    let row = &mut aux.buffer_mut().as_mut_slice()
                        [slot as usize * item..(slot as usize + 1) * item];
                    for (j, b) in row.iter_mut().enumerate() {
                        *b = aux_byte(room, k, j);
                    }
                }
                claimed.insert(room, Instant::now());
                let mut tx = KvSender::new(&mgr, RoomId::new(room))?;
                tx.init(n, slot);
                let src: Vec<u32> = (0..u64::from(n))
                    .map(|i| (room.wrapping_add(97 * i) % u64::from(pool.pages)) as u32)
                    .collect();
                let abort_at = opts
                    .abort_one_in
                    .filter(|&k| rng.random_range(0..k) == 0)
                    .map(|_| rng.random_range(0..src.len()));
                active.insert(
                    room,
                    Active {
                        tx,
                        src,
                        sent: 0,
                        abort_at,
                    },
                );
            }
            // Busy (or just found work): scan often; idle: back off, doubling up to SCAN_IDLE.
            scan_every = if found || !active.is_empty() {
                SCAN_BUSY
            } else {
                (scan_every * 2).min(SCAN_IDLE)
            };
            // However many rooms the manager holds, scanning stays a small share of the time.
            scan_every = scan_every.max(cost * SCAN_COST_RATIO);
            next_scan = Instant::now() + scan_every;
        }
        let mut finished = Vec::new();
        for (room, a) in active.iter_mut() {
            if a.abort_at.is_some_and(|at| a.sent >= at) {
                a.abort_at = None;
                a.tx.abort("nixl-pd --abort-one-in");
            } else if a.sent < a.src.len() {
                let k = opts
                    .chunk
                    .unwrap_or(a.src.len())
                    .max(1)
                    .min(a.src.len() - a.sent);
                a.tx.send(&a.src[a.sent..a.sent + k]);
                a.sent += k;
            }
            match a.tx.poll() {
                KvPoll::Success => {
                    counts.served += 1;
                    finished.push(*room);
                }
                KvPoll::Failed => {
                    let why = a.tx.failure();
                    if matches!(why, Some(FailureReason::Aborted(_))) {
                        counts.aborted += 1;
                    } else {
                        counts.failed += 1;
                        eprintln!("prefill: room {room} failed: {}", reason(why));
                    }
                    finished.push(*room);
                }
                _ => {}
            }
        }
        for r in finished {
            active.remove(&r);
            if let Some(t) = claimed.remove(&r) {
                served.push(t.elapsed());
            }
        }
        if served.len() >= 20 {
            served.sort();
            let paths = mgr.request_paths();
            eprintln!(
                "prefill: last {} rooms, claim to transfers done: p50 {:.2} ms, p99 {:.2} ms; requests so far: {} prepared, {} explicit, {} staged pieces, {} direct chunks, {} packed chunks",
                served.len(),
                served[served.len() / 2].as_secs_f64() * 1e3,
                served[served.len() * 99 / 100].as_secs_f64() * 1e3,
                paths.prepared,
                paths.explicit,
                paths.staged,
                paths.direct,
                paths.packed
            );
            served.clear();
        }
        if let (Some(at), Some(every)) = (next_stats, opts.stats_every)
            && Instant::now() >= at
        {
            let t = mgr.table_sizes();
            let (rss_kb, fds) = rss_and_fds();
            eprintln!(
                "prefill stats: rooms={} peers={} active={} served={} failed={} aborted={} rss_kb={rss_kb} fds={fds}",
                t.prefill_rooms,
                t.peers,
                active.len(),
                counts.served,
                counts.failed,
                counts.aborted
            );
            next_stats = Some(Instant::now() + every);
        }
        let wake = if active.is_empty() {
            next_scan
        } else {
            next_scan.min(Instant::now() + POLL_ACTIVE)
        };
        let wake = next_stats.map_or(wake, |t| wake.min(t));
        let nap = wake.saturating_duration_since(Instant::now());
        if active.is_empty() {
            // Idle: wake as soon as a decode's infos complete a room, not at the next scan.
            if mgr.wait_unclaimed(nap) {
                next_scan = Instant::now();
                scan_every = SCAN_BUSY;
            }
        } else if !nap.is_zero() {
            pool.pause(nap);
        }
    }
}
