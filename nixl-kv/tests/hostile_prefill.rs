//! Hostile or broken "prefills" against the decode's PUSH side (`nixl_kv::net::zmtp::PushClient`,
//! the code behind the decode's ZMQ thread): raw TCP servers at an address a bootstrap server
//! could name. Each must fail only its own send, within the configured bounds, and a following
//! send to a good PULL listener on another endpoint must arrive. The process surviving is part
//! of every test (zeromq's codec aborted on a huge announced length).

#![allow(clippy::unwrap_used, reason = "test code")]
#![allow(
    clippy::big_endian_bytes,
    reason = "ZMTP lengths are in network byte order"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nixl_kv::net::zmtp::{PullLimits, PullListener, PushClient, PushLimits};

const CONNECT: Duration = Duration::from_millis(1500);
const SEND: Duration = Duration::from_millis(1500);

fn client() -> PushClient {
    let mut l = PushLimits::default();
    l.connect_timeout = CONNECT;
    l.send_timeout = SEND;
    PushClient::start(l).unwrap()
}

/// Our PULL listener, the good prefill.
struct Good {
    _listener: PullListener,
    endpoint: String,
    rx: mpsc::Receiver<Vec<Bytes>>,
}

impl Good {
    fn start() -> Self {
        let (tx, rx) = mpsc::channel();
        let listener = PullListener::bind("tcp://127.0.0.1:0", PullLimits::default(), move |m| {
            let _ = tx.send(m);
        })
        .unwrap();
        let endpoint = format!("tcp://127.0.0.1:{}", listener.local_addr().port());
        Self {
            _listener: listener,
            endpoint,
            rx,
        }
    }

    /// A send through `push` arrives whole.
    fn assert_receives(&self, push: &PushClient) {
        let msg = vec![
            Bytes::from_static(b"NixlMsgGuard"),
            Bytes::new(),
            Bytes::from(vec![5u8; 1000]),
        ];
        let t = Instant::now();
        push.send(&self.endpoint, msg.clone()).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(self.rx.recv_timeout(Duration::from_secs(5)).unwrap(), msg);
    }
}

/// A raw server: every accepted connection is served by `serve` on a thread of its own.
/// Returns its endpoint and the count of connections so far.
fn server(serve: fn(TcpStream)) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://127.0.0.1:{}", l.local_addr().unwrap().port());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || serve(s));
        }
    });
    (endpoint, count)
}

fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

fn ready_pull() -> Vec<u8> {
    let mut r = vec![0x04, 26, 5];
    r.extend_from_slice(b"READY");
    r.push(11);
    r.extend_from_slice(b"Socket-Type");
    r.extend_from_slice(&4u32.to_be_bytes());
    r.extend_from_slice(b"PULL");
    r
}

/// Reads the client's greeting and `READY`, answering with ours: a raw PULL's handshake.
fn handshake(s: &mut TcpStream) {
    let mut g = [0u8; 64];
    s.read_exact(&mut g).unwrap();
    s.write_all(&greeting()).unwrap();
    s.write_all(&ready_pull()).unwrap();
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x04, "a short READY");
    let mut body = vec![0u8; usize::from(h[1])];
    s.read_exact(&mut body).unwrap();
    assert!(body.ends_with(b"PUSH"), "{body:?}");
}

fn linger(s: TcpStream) {
    std::thread::sleep(Duration::from_secs(60));
    drop(s);
}

/// Sends to `endpoint`, expecting an error; checks it came within `within`. Returns it.
fn fails(push: &PushClient, endpoint: &str, within: Duration) -> String {
    let t = Instant::now();
    let err = push
        .send(endpoint, vec![Bytes::from_static(b"x")])
        .unwrap_err();
    assert!(t.elapsed() < within, "{err} after {:?}", t.elapsed());
    err
}

/// (a) The greeting, then a header announcing a 2^62-byte frame (command or message).
#[test]
fn a_huge_frame_header_after_the_greeting_fails_at_once() {
    let good = Good::start();
    let push = client();
    for serve in [
        (|mut s: TcpStream| {
            let _ = s.write_all(&greeting());
            let _ = s.write_all(&[0x06, 0x40, 0, 0, 0, 0, 0, 0, 0]);
            linger(s);
        }) as fn(TcpStream),
        |mut s| {
            let _ = s.write_all(&greeting());
            let _ = s.write_all(&[0x02, 0x40, 0, 0, 0, 0, 0, 0, 0]);
            linger(s);
        },
    ] {
        let (hostile, _) = server(serve);
        let err = fails(&push, &hostile, CONNECT);
        assert!(!err.contains("timed out"), "{err}");
        good.assert_receives(&push);
    }
}

/// (b) An oversized command: a `READY` announcing 1 TiB, and after a good handshake a `PING`
/// announcing 2^62 bytes (zeromq's reader task reserved that much too).
#[test]
fn oversized_commands_are_refused_before_they_are_read() {
    let good = Good::start();
    let push = client();
    let (hostile, _) = server(|mut s| {
        let _ = s.write_all(&greeting());
        let _ = s.write_all(&[0x06, 0, 0, 1, 0, 0, 0, 0, 0]);
        let _ = s.write_all(&[0u8; 4096]);
        linger(s);
    });
    let err = fails(&push, &hostile, CONNECT);
    assert!(err.contains("over limit"), "{err}");
    good.assert_receives(&push);

    let (late, conns) = server(|mut s| {
        handshake(&mut s);
        let mut m = [0u8; 3];
        let _ = s.read_exact(&mut m);
        let _ = s.write_all(&[0x06, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        linger(s);
    });
    // The message goes out; the reader then drops the connection on the huge PING.
    push.send(&late, vec![Bytes::from_static(b"x")]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    good.assert_receives(&push);
    // The next send to that prefill reconnects rather than use the dropped connection.
    push.send(&late, vec![Bytes::from_static(b"x")]).unwrap();
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

/// (c) Garbage (an HTTP server, say) instead of a greeting.
#[test]
fn garbage_instead_of_a_greeting_fails_at_once() {
    let good = Good::start();
    let push = client();
    let (hostile, _) = server(|mut s| {
        let mut junk = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec();
        junk.resize(200, b'!');
        let _ = s.write_all(&junk);
        linger(s);
    });
    let err = fails(&push, &hostile, CONNECT);
    assert!(err.contains("not a ZMTP greeting"), "{err}");
    good.assert_receives(&push);
}

/// (d) Accepts and stalls forever: the send fails at the connect timeout.
#[test]
fn a_prefill_that_never_answers_fails_at_the_connect_timeout() {
    let good = Good::start();
    let push = client();
    let (hostile, _) = server(linger);
    let err = fails(&push, &hostile, CONNECT + Duration::from_millis(500));
    assert!(err.contains("timed out"), "{err}");
    good.assert_receives(&push);
    // A half greeting, then nothing.
    let (half, _) = server(|mut s| {
        let _ = s.write_all(&greeting()[..20]);
        linger(s);
    });
    let err = fails(&push, &half, CONNECT + Duration::from_millis(500));
    assert!(err.contains("timed out"), "{err}");
    good.assert_receives(&push);
}

/// (e) Resets in the middle of the handshake (closing with our greeting unread sends RST).
#[test]
fn a_reset_mid_handshake_fails_at_once() {
    let good = Good::start();
    let push = client();
    let (hostile, _) = server(|mut s| {
        std::thread::sleep(Duration::from_millis(100));
        let _ = s.write_all(&greeting()[..30]);
        drop(s);
    });
    let err = fails(&push, &hostile, CONNECT);
    assert!(!err.contains("timed out"), "{err}");
    good.assert_receives(&push);
}

/// A prefill that shakes hands and then never reads: a message larger than the socket buffers
/// fails at the send timeout, and meanwhile another thread's send to a good prefill goes at
/// once.
#[test]
fn a_stalled_prefill_does_not_block_sends_to_another() {
    let good = Good::start();
    let push = Arc::new(client());
    let (stalled, _) = server(|mut s| {
        handshake(&mut s);
        linger(s);
    });
    let stuck = {
        let push = Arc::clone(&push);
        std::thread::spawn(move || {
            let t = Instant::now();
            let big = vec![Bytes::from(vec![0u8; 64 << 20])];
            (push.send(&stalled, big), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    good.assert_receives(&push);
    let (res, took) = stuck.join().unwrap();
    assert!(res.unwrap_err().contains("timed out"));
    assert!(
        took < CONNECT + SEND + Duration::from_millis(500),
        "{took:?}"
    );
}

/// A connection the prefill closed while idle is replaced before the next send.
#[test]
fn a_connection_closed_while_idle_is_reconnected() {
    let push = client();
    let (ep, conns) = server(|mut s| {
        handshake(&mut s);
        let mut m = [0u8; 3];
        s.read_exact(&mut m).unwrap();
        assert_eq!(m, [0x00, 1, b'x']);
    });
    for _ in 0..3 {
        push.send(&ep, vec![Bytes::from_static(b"x")]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(conns.load(Ordering::SeqCst), 3);
}

/// Nothing listening: refused connects are retried until the connect timeout, as zeromq did,
/// so a prefill that binds a moment later is still reached.
#[test]
fn refused_connects_are_retried_until_the_timeout() {
    let push = client();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let err = fails(&push, &endpoint, CONNECT + Duration::from_millis(500));
    assert!(err.contains("timed out"), "{err}");
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        handshake(&mut s);
        let mut m = [0u8; 3];
        s.read_exact(&mut m).unwrap();
        m
    });
    push.send(&endpoint, vec![Bytes::from_static(b"x")])
        .unwrap();
    assert_eq!(late.join().unwrap(), [0x00, 1, b'x']);
}
