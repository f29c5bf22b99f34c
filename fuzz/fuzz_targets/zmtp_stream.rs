//! Fuzzes both ends of our ZMTP with raw byte streams: `nixl_kv::net::zmtp::replay` runs exactly
//! the prefill's PULL listener's per-connection code (greeting, `READY`, frames, commands,
//! limits) over in-memory IO, and in raw mode `nixl_kv::net::zmtp::replay_push` also runs the same
//! bytes as what a "prefill" answers the decode's PUSH connection (handshake, then the reader
//! of what follows). Nothing may panic or hang, every delivered message must be within the
//! limits, and a well-formed stream (the structured mode) must deliver exactly its messages.
//!
//! Input: byte 0 picks the mode (even: raw bytes, odd: structured; see below for its other
//! bits); byte 1: bits 0..6 the read size the stream trickles in (1..=64 bytes a read, or all
//! at once with bit 6), bit 7 in raw mode tiny limits instead of the defaults (to reach every
//! limit branch with short inputs), in structured mode a `Pending` every 7th read; the rest
//! is the stream (raw) or the recipe (structured, always with the default limits).
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixl_kv::net::zmtp::{PullLimits, PushReplay, Replay, replay, replay_push};
use tokio::io::{AsyncRead, ReadBuf};

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

/// Hands out at most `step` bytes a read and, when `pend_every` is not 0, returns `Pending`
/// (after waking itself) before every `pend_every`-th read, so that the listener's reads see
/// partial frames and its futures are suspended in the middle of them.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    pend_every: u32,
    reads: u32,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.reads = self.reads.wrapping_add(1);
        if self.pend_every != 0 && self.reads % self.pend_every == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

fn limits(tiny: Option<u8>) -> PullLimits {
    let mut l = PullLimits::default();
    if let Some(b) = tiny {
        l.max_frame = u64::from(b % 64) + 1;
        l.max_frames = usize::from(b % 5) + 1;
        l.max_message = u64::from(b) * 2 + 1;
    }
    l
}

fn run(stream: &[u8], step: usize, pend_every: u32, limits: &PullLimits) -> Replay {
    RT.with(|rt| {
        rt.block_on(replay(
            Trickle {
                data: stream,
                step,
                pend_every,
                reads: 0,
            },
            limits,
        ))
    })
}

fn run_push(stream: &[u8], step: usize, pend_every: u32, max_command: u64) -> PushReplay {
    let frames = [Bytes::from_static(b"NixlMsgGuard"), Bytes::new()];
    RT.with(|rt| {
        rt.block_on(replay_push(
            Trickle {
                data: stream,
                step,
                pend_every,
                reads: 0,
            },
            max_command,
            &frames,
        ))
    })
}

fn check_bounds(messages: &[Vec<Bytes>], l: &PullLimits) {
    for m in messages {
        assert!(
            !m.is_empty() && m.len() <= l.max_frames,
            "{} frames",
            m.len()
        );
        let mut total = 0u64;
        for f in m {
            assert!(f.len() as u64 <= l.max_frame, "frame of {}", f.len());
            total += f.len() as u64;
        }
        assert!(total <= l.max_message, "message of {total}");
    }
}

/// A frame header: short or (when `long`, or needed) long form.
fn header(out: &mut Vec<u8>, flags: u8, len: usize, long: bool) {
    if long || len > 255 {
        out.push(flags | 0x02);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    } else {
        out.push(flags);
        out.push(len as u8);
    }
}

fn command(out: &mut Vec<u8>, name: &[u8], body: &[u8], long: bool) {
    let mut c = vec![name.len() as u8];
    c.extend_from_slice(name);
    c.extend_from_slice(body);
    header(out, 0x04, c.len(), long);
    out.extend_from_slice(&c);
}

/// Builds a valid PUSH stream from `recipe`; returns it, the messages it carries and the
/// offsets where a cut leaves a clean stream (a message or command just ended).
fn build(recipe: &[u8]) -> (Vec<u8>, Vec<Vec<Bytes>>, Vec<(usize, usize)>) {
    let mut it = recipe.iter().copied();
    let mut next = move || it.next();
    let mut s = vec![0u8; 64];
    s[0] = 0xff;
    s[9] = 0x7f;
    s[10] = 3;
    s[11] = next().unwrap_or(0) % 2; // minor 0 or 1
    s[12..16].copy_from_slice(b"NULL");
    s[32] = next().unwrap_or(0) % 2; // as-server: either
    let mut ready = Vec::new();
    if next().unwrap_or(0) % 2 == 1 {
        ready.push(8);
        ready.extend_from_slice(b"Identity");
        ready.extend_from_slice(&0u32.to_be_bytes());
    }
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&4u32.to_be_bytes());
    ready.extend_from_slice(b"PUSH");
    command(&mut s, b"READY", &ready, false);
    let mut cuts = vec![(0, 0), (s.len(), 0)];
    let mut messages = Vec::new();
    while let Some(op) = next() {
        if op % 8 == 0 {
            let ctx: Vec<u8> = (0..op % 17).map(|_| next().unwrap_or(7)).collect();
            let mut body = vec![0, 10];
            body.extend_from_slice(&ctx);
            command(&mut s, b"PING", &body, op & 0x80 != 0);
        } else {
            let frames = usize::from(op % 6) + 1;
            let mut m = Vec::new();
            for i in 0..frames {
                let l = next().unwrap_or(0);
                let len = usize::from(l % 64) * if l & 0x40 != 0 { 9 } else { 1 };
                let fill = next().unwrap_or(0);
                let body: Vec<u8> = (0..len).map(|j| fill.wrapping_add(j as u8)).collect();
                let more = if i + 1 < frames { 0x01 } else { 0 };
                header(&mut s, more, len, l & 0x80 != 0);
                s.extend_from_slice(&body);
                m.push(Bytes::from(body));
            }
            messages.push(m);
        }
        cuts.push((s.len(), messages.len()));
    }
    (s, messages, cuts)
}

fuzz_target!(|data: &[u8]| {
    let (Some(&mode), Some(&knobs)) = (data.first(), data.get(1)) else {
        return;
    };
    let rest = &data[2..];
    let step = if knobs & 0x40 != 0 {
        usize::MAX
    } else {
        usize::from(knobs & 0x3f) + 1
    };
    // Raw mode: bits 1..3 of byte 0 (never, or every 2nd, 7th or 31st read). Each `Pending`
    // costs a turn of the runtime's time driver, so they are kept few by default.
    let pend_every = [0, 2, 7, 31][usize::from((mode >> 1) & 0x03)];
    let tiny = (knobs & 0x80 != 0).then(|| rest.first().copied().unwrap_or(0));
    let l = limits(tiny);
    if mode % 2 == 0 {
        let r = run(rest, step, pend_every, &l);
        check_bounds(&r.messages, &l);
        assert!(r.written.len() >= 64, "our greeting goes first");
        let p = run_push(rest, step, pend_every, l.max_frame);
        assert!(p.written.len() >= 64, "our greeting goes first");
        assert_eq!(p.handshake.is_err(), p.after.is_none(), "{:?}", p.handshake);
        return;
    }
    // Structured: a valid stream with the default limits, cut at an offset given by byte 0.
    let l = PullLimits::default();
    let (stream, messages, cuts) = build(rest);
    let cut = if mode & 0x02 != 0 {
        stream.len()
    } else {
        usize::from(mode >> 2) * stream.len() / 63
    };
    let r = run(&stream[..cut], step, u32::from(knobs & 0x80 != 0) * 7, &l);
    let clean = cuts.iter().find(|&&(at, _)| at == cut);
    let delivered = cuts
        .iter()
        .filter(|&&(at, _)| at <= cut)
        .map(|&(_, n)| n)
        .max()
        .unwrap_or(0);
    assert_eq!(
        r.messages,
        messages[..delivered],
        "cut at {cut} of {}",
        stream.len()
    );
    assert_eq!(
        r.outcome.is_ok(),
        clean.is_some(),
        "cut at {cut}: {:?}",
        r.outcome
    );
});
