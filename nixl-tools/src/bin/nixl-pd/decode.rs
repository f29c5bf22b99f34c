//! `nixl-pd decode`: runs requests against a prefill, verifies every byte, and checks that no
//! write lands in a page or aux row that no live request owned (pool.rs keeps the owners,
//! sentinel.rs the sentinel in what is free).

use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use nixl_kv::{KvManager, KvPoll, KvReceiver, RoomId};
use rand::{Rng, SeedableRng};

use crate::memory::{Memory, args, memory};
use crate::pool::Pages;
use crate::sentinel::Sentinel;
use crate::{AuxVerify, Pool, aux_byte};

struct Request {
    rx: KvReceiver,
    pages: Vec<u32>,
    slot: u32,
    start: Instant,
    /// The abort knob aborts it then.
    abort_at: Option<Instant>,
}

pub(crate) struct DecodeOpts {
    pub(crate) prefill_pages: u32,
    pub(crate) requests: usize,
    pub(crate) per_request: usize,
    pub(crate) concurrency: usize,
    pub(crate) aux_verify: Option<AuxVerify>,
    pub(crate) json: bool,
    pub(crate) seconds: Option<Duration>,
    pub(crate) abort_one_in: Option<u32>,
    pub(crate) allow_failures: bool,
    /// Fill free memory with the sentinel and check it.
    pub(crate) sentinel: bool,
    /// How long the pages and aux slot of a failed or aborted request stay out of use.
    pub(crate) quarantine: Duration,
    pub(crate) allow_stray: bool,
}

/// How a decode's requests ended.
#[derive(Default)]
struct Outcomes {
    /// Success, every byte verified (or not verified with `--no-verify`).
    ok: usize,
    /// Failed with a reason (a receiver that could not be created included).
    failed: usize,
    /// Failed without a reason.
    no_reason: usize,
    /// Success, but a byte differs.
    corrupt: usize,
    /// Aborted by the abort knob.
    aborted: usize,
}

/// Free pages (and, separately, free aux slots) checked for the sentinel per loop iteration:
/// a few microseconds of host memory, a full sweep of a 2048-page pool in about 0.1 s.
const CHECKS_PER_TICK: usize = 2;

pub(crate) fn decode(pool: &Pool, bootstrap: &str, o: &DecodeOpts) -> anyhow::Result<()> {
    let (per_request, concurrency) = (o.per_request, o.concurrency);
    if per_request == 0 || per_request * concurrency > pool.pages as usize {
        bail!(
            "{concurrency} concurrent requests of {per_request} pages do not fit in {} pages",
            pool.pages
        );
    }
    if pool.page_bytes == 0 || pool.aux_slots == 0 {
        bail!("--page-bytes and --aux-slots must be positive");
    }
    let mut m = memory(pool, "decode")?;
    let mut sentinel = Sentinel::new(o.sentinel);
    // Before the manager exists, so before any peer can learn where the memory is.
    sentinel.fill_all(&mut m, pool.aux_slots)?;
    let mgr = KvManager::decode(m.agent.clone(), args(&m, pool)?, pool.manager_config()?)?;
    eprintln!(
        "decode: ready, {} KV buffers of {} pages{}",
        m.kv.len(),
        pool.pages,
        if sentinel.on() {
            ", free pages and aux rows hold the sentinel"
        } else {
            ""
        }
    );
    let mut rng = match pool.seed {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    // Rooms come from a stream of their own, drawn once per started request: decode ranks of
    // one TP group run with one seed and must agree on every room, whatever their pages do.
    let mut rooms = match pool.seed {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    let mut next_room: Option<u64> = None;
    let mut owners = Pages::new(pool.pages, pool.aux_slots, o.quarantine);
    let bar = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(o.requests as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("decode [{bar:40}] {pos}/{len} requests {per_sec} {msg}")?
            .progress_chars("=> "),
    );
    let (mut started, mut out, mut latencies, mut bytes) =
        (0usize, Outcomes::default(), Vec::new(), 0u64);
    let mut inflight: Vec<Request> = Vec::new();
    // Time spent able to start a request but for quarantined pages or slots.
    let (mut starved, mut starved_since) = (Duration::ZERO, None::<Instant>);
    let t0 = Instant::now();
    let deadline = o.seconds.map(|s| t0 + s);
    let more = |started: usize| started < o.requests && deadline.is_none_or(|d| Instant::now() < d);
    while more(started) || !inflight.is_empty() {
        while let Some(h) = owners.expired(Instant::now()) {
            sentinel.refill(&mut m, &h.pages, h.slot)?;
            owners.release(&h);
        }
        while more(started) && inflight.len() < concurrency && owners.can_take(per_request) {
            let room = *next_room.get_or_insert_with(|| rooms.random::<u64>() >> 1);
            let Some((pages, slot)) = owners.take(room, per_request, &mut rng) else {
                break;
            };
            next_room = None;
            started += 1;
            // From before the receiver's bootstrap lookup and registration (which it blocks on).
            let start = Instant::now();
            let mut rx = match KvReceiver::new(&mgr, bootstrap, RoomId::new(room), None) {
                Ok(rx) => rx,
                Err(e) => {
                    eprintln!("room {room} failed: {e}");
                    out.failed += 1;
                    // No peer learned of them: they still hold the sentinel.
                    owners.free(room, &pages, slot);
                    bar.inc(1);
                    continue;
                }
            };
            rx.init(&pages, slot);
            let abort_at = o
                .abort_one_in
                .filter(|&k| rng.random_range(0..k) == 0)
                .map(|_| start + Duration::from_micros(rng.random_range(0..20_000)));
            inflight.push(Request {
                rx,
                pages,
                slot,
                start,
                abort_at,
            });
        }
        let blocked = more(started) && inflight.len() < concurrency;
        match (blocked, starved_since) {
            (true, None) => {
                starved_since = Some(Instant::now());
                let next = owners
                    .next_expiry()
                    .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64());
                bar.set_message(format!(
                    "(waiting for quarantined pages: next back in {:.0} s)",
                    next.unwrap_or(0.0)
                ));
            }
            (false, Some(t)) => {
                starved += t.elapsed();
                starved_since = None;
                bar.set_message("");
            }
            _ => {}
        }
        let mut i = 0;
        while i < inflight.len() {
            if inflight[i].abort_at.is_some_and(|t| Instant::now() >= t) {
                let mut req = inflight.swap_remove(i);
                req.rx.abort("nixl-pd --abort-one-in");
                out.aborted += 1;
                let room = req.rx.room().get();
                owners.quarantine(room, req.pages, req.slot, Instant::now());
                bar.inc(1);
                continue;
            }
            let state = inflight[i].rx.poll();
            if !matches!(state, KvPoll::Success | KvPoll::Failed) {
                i += 1;
                continue;
            }
            let req = inflight.swap_remove(i);
            latencies.push(req.start.elapsed());
            let room = req.rx.room().get();
            if state == KvPoll::Failed {
                match req.rx.failure() {
                    Some(why) => {
                        eprintln!("room {room} failed: {why}");
                        out.failed += 1;
                    }
                    None => {
                        eprintln!("room {room} failed: no reason given");
                        out.no_reason += 1;
                    }
                }
                // A failed room's pages may still receive a late write, as an aborted one's.
                owners.quarantine(room, req.pages, req.slot, Instant::now());
                bar.inc(1);
                continue;
            }
            let good = o.aux_verify.is_none_or(|a| {
                verify(&m, pool, o.prefill_pages, room, &req.pages, req.slot, a)
                    .map_err(|e| eprintln!("room {room}: {e}"))
                    .is_ok()
            });
            if good {
                out.ok += 1;
                if out.ok == 1 {
                    // Harnesses time faults from here (an observed event, not a guess).
                    eprintln!("decode: first success");
                }
                bytes += req.pages.len() as u64 * pool.page_bytes * m.kv.len() as u64;
            } else {
                out.corrupt += 1;
            }
            sentinel.refill(&mut m, &req.pages, req.slot)?;
            owners.free(room, &req.pages, req.slot);
            bar.inc(1);
        }
        if sentinel.on() {
            for p in owners.next_free_pages(CHECKS_PER_TICK) {
                sentinel.check_page(&mut m, p, owners.page_owner(p))?;
            }
            for s in owners.next_free_slots(CHECKS_PER_TICK) {
                sentinel.check_slot(&mut m, s, owners.slot_owner(s));
            }
        }
        pool.pause(Duration::from_micros(50));
    }
    bar.finish();
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(t) = starved_since {
        starved += t.elapsed();
    }
    // The final sweep: every page and slot that is free now (the quarantined ones may still
    // receive their own room's late writes).
    for p in owners.all_free_pages() {
        sentinel.check_page(&mut m, p, owners.page_owner(p))?;
    }
    for s in owners.all_free_slots() {
        sentinel.check_slot(&mut m, s, owners.slot_owner(s));
    }
    latencies.sort();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let (p50, p99) = (pct(0.5), pct(0.99));
    let gbps = bytes as f64 / seconds / 1e9;
    let failures = out.failed + out.no_reason + out.corrupt;
    println!(
        "{started} requests x {per_request} pages x {} buffers x {} B: {:.1} req/s, {gbps:.2} GB/s, p50 {p50:.3} ms, p99 {p99:.3} ms, {failures} failed{}{}",
        m.kv.len(),
        pool.page_bytes,
        started as f64 / seconds,
        if o.aux_verify.is_some() {
            ", every byte verified"
        } else {
            " (not verified)"
        },
        if out.aborted > 0 {
            format!(", {} aborted", out.aborted)
        } else {
            String::new()
        }
    );
    let c = sentinel.counts();
    let quarantined = owners.quarantined_pages();
    if sentinel.on() {
        println!(
            "sentinel: {} stray pages, {} stray aux rows in {} free-page and {} free-slot checks; {quarantined} pages still quarantined; {:.1} s waiting for quarantined pages",
            c.stray_pages,
            c.stray_rows,
            c.checked_pages,
            c.checked_rows,
            starved.as_secs_f64()
        );
    } else {
        println!("sentinel: off (no stray-write check)");
    }
    if o.json {
        let line = serde_json::json!({
            "requests": started, "bytes": bytes, "seconds": seconds, "p50_ms": p50, "p99_ms": p99,
            "gbps": gbps, "failures": failures, "ok": out.ok, "failed": out.failed,
            "no_reason": out.no_reason, "corrupt": out.corrupt, "aborted": out.aborted,
            "sentinel": sentinel.on(), "stray_pages": c.stray_pages,
            "stray_aux_rows": c.stray_rows, "sentinel_checked_pages": c.checked_pages,
            "sentinel_checked_rows": c.checked_rows, "quarantined_pages": quarantined,
            "quarantine_wait_s": starved.as_secs_f64(),
        });
        println!("{line}");
    }
    let stray = c.stray_pages + c.stray_rows > 0;
    if out.corrupt > 0
        || out.no_reason > 0
        || (failures > 0 && !o.allow_failures)
        || (stray && !o.allow_stray)
    {
        std::process::exit(1);
    }
    Ok(())
}

fn verify(
    m: &Memory,
    pool: &Pool,
    np: u32,
    room: u64,
    pages: &[u32],
    slot: u32,
    aux: AuxVerify,
) -> Result<(), String> {
    let page = pool.page_bytes as usize;
    let mut got = Vec::with_capacity(page);
    for b in 0..m.kv.len() {
        for (i, &d) in pages.iter().enumerate() {
            let src = room.wrapping_add(97 * i as u64) % u64::from(np);
            m.kv.read_page(b, d as usize, page, &mut got)
                .map_err(|e| e.to_string())?;
            if let Some(j) = (0..page).find(|&j| got[j] != pool.kv_byte(b, src, j)) {
                return Err(format!("buffer {b} page {d} byte {j} differs"));
            }
        }
    }
    let buffers = match aux {
        AuxVerify::All => m.aux.len(),
        AuxVerify::First => 1,
    };
    for (k, buf) in m.aux.iter().enumerate().take(buffers) {
        let item = m.aux_items[k] as usize;
        let row = &buf.buffer().as_slice()[slot as usize * item..(slot as usize + 1) * item];
        if let Some(j) = (0..item).find(|&j| row[j] != aux_byte(room, k, j)) {
            return Err(format!("aux buffer {k} byte {j} differs"));
        }
    }
    Ok(())
}
