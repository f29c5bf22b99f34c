//! Hostile ZMTP peers against the prefill's PULL listener (issue items D1, D2): raw TCP clients
//! that misbehave after (or during) the handshake. After each attack a real PUSH socket (the
//! `zeromq` crate) sends a multipart message and the listener's callback must receive it.

#![allow(clippy::unwrap_used, reason = "test code")]
#![allow(
    clippy::big_endian_bytes,
    reason = "ZMTP lengths are in network byte order"
)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use nixl_kv::net::zmtp::{PullLimits, PullListener};
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

struct Pull {
    listener: PullListener,
    rx: mpsc::Receiver<Vec<Bytes>>,
}

impl Pull {
    fn start(limits: PullLimits) -> Self {
        let (tx, rx) = mpsc::channel();
        let listener = PullListener::bind("tcp://127.0.0.1:0", limits, move |m| {
            let _ = tx.send(m);
        })
        .unwrap();
        Self { listener, rx }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().port()
    }

    /// A real zeromq PUSH peer sends `frames`; the callback must get exactly them.
    fn assert_push_delivers(&self, frames: &[&'static [u8]]) {
        let endpoint = format!("tcp://127.0.0.1:{}", self.port());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let frames: Vec<Bytes> = frames.iter().map(|f| Bytes::from_static(f)).collect();
        let msg = ZmqMessage::try_from(frames.clone()).unwrap();
        rt.block_on(async {
            let mut push = PushSocket::new();
            tokio::time::timeout(Duration::from_secs(5), push.connect(&endpoint))
                .await
                .unwrap()
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), push.send(msg))
                .await
                .unwrap()
                .unwrap();
            // The socket's writer task runs on this runtime: wait without blocking it.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let got = loop {
                match self.rx.try_recv() {
                    Ok(m) => break m,
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("no message from the PUSH peer: {e}"),
                }
            };
            assert_eq!(got, frames);
        });
    }

    fn assert_nothing_delivered(&self) {
        assert!(self.rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}

fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 1;
    g[12..16].copy_from_slice(b"NULL");
    g
}

fn command(name: &[u8], body: &[u8]) -> Vec<u8> {
    let len = 1 + name.len() + body.len();
    let mut f = vec![
        0x04,
        u8::try_from(len).unwrap(),
        u8::try_from(name.len()).unwrap(),
    ];
    f.extend_from_slice(name);
    f.extend_from_slice(body);
    f
}

fn ready(socket_type: &[u8]) -> Vec<u8> {
    let mut props = vec![11];
    props.extend_from_slice(b"Socket-Type");
    props.extend_from_slice(&u32::try_from(socket_type.len()).unwrap().to_be_bytes());
    props.extend_from_slice(socket_type);
    command(b"READY", &props)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one frame: (flags, body).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 1];
    s.read_exact(&mut h).unwrap();
    let len = if h[0] & 0x02 != 0 {
        let mut l = [0u8; 8];
        s.read_exact(&mut l).unwrap();
        usize::try_from(u64::from_be_bytes(l)).unwrap()
    } else {
        let mut l = [0u8; 1];
        s.read_exact(&mut l).unwrap();
        usize::from(l[0])
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (h[0], body)
}

/// A raw PUSH peer after a complete handshake.
fn handshaken(port: u16) -> TcpStream {
    let mut s = connect(port);
    s.write_all(&greeting()).unwrap();
    s.write_all(&ready(b"PUSH")).unwrap();
    let mut theirs = [0u8; 64];
    s.read_exact(&mut theirs).unwrap();
    assert_eq!((theirs[0], theirs[9], theirs[10]), (0xff, 0x7f, 3));
    assert_eq!(&theirs[12..16], b"NULL");
    let (flags, body) = read_frame(&mut s);
    assert_eq!(flags & 0x04, 0x04);
    assert!(body.starts_with(b"\x05READY"));
    assert!(body.windows(4).any(|w| w == b"PULL"));
    s
}

/// The listener closes this connection (EOF or reset) within the read timeout; whatever it
/// sent before (its greeting, its READY) is skipped.
fn assert_dropped(mut s: TcpStream) {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection is still open")
            }
            Err(_) => return,
        }
    }
}

fn message_frames(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let more = u8::from(i + 1 < frames.len());
        out.push(more);
        out.push(u8::try_from(f.len()).unwrap());
        out.extend_from_slice(f);
    }
    out
}

#[test]
fn a_valid_raw_message_is_delivered() {
    let pull = Pull::start(PullLimits::default());
    let mut s = handshaken(pull.port());
    s.write_all(&message_frames(&[b"a", b"", b"ccc"])).unwrap();
    let got = pull.rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, vec![&b"a"[..], b"", b"ccc"]);
    pull.assert_push_delivers(&[b"after", b"raw"]);
}

#[test]
fn a_reset_after_the_handshake_leaves_the_listener_serving() {
    let pull = Pull::start(PullLimits::default());
    // Closing with the listener's greeting still unread makes the kernel send RST.
    let mut s = connect(pull.port());
    s.write_all(&greeting()).unwrap();
    s.write_all(&ready(b"PUSH")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(s);
    std::thread::sleep(Duration::from_millis(50));
    pull.assert_push_delivers(&[b"one", b"two"]);
    // And after a handshake completed, a frame begun, then RST by unread data.
    let mut s = handshaken(pull.port());
    s.write_all(&[0x01, 10, b'x']).unwrap();
    drop(s);
    pull.assert_push_delivers(&[b"three"]);
}

#[test]
fn a_truncated_frame_then_eof_leaves_the_listener_serving() {
    let pull = Pull::start(PullLimits::default());
    let mut s = handshaken(pull.port());
    s.write_all(&[0x01, 1, b'a', 0x00, 100, b'b', b'c'])
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_dropped(s);
    pull.assert_nothing_delivered();
    // A long-frame header cut short.
    let mut s = handshaken(pull.port());
    s.write_all(&[0x02, 0, 0, 0]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_dropped(s);
    pull.assert_push_delivers(&[b"still", b"here"]);
}

#[test]
fn unknown_commands_are_ignored_and_empty_ones_drop_only_that_peer() {
    let pull = Pull::start(PullLimits::default());
    // A well-formed unknown command is ignored (as libzmq does); the connection goes on.
    let mut s = handshaken(pull.port());
    s.write_all(&command(b"WHATEVER", b"\x01\x02")).unwrap();
    s.write_all(&message_frames(&[b"after-unknown"])).unwrap();
    let got = pull.rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, vec![&b"after-unknown"[..]]);
    // An empty command, a zero-length name, a name longer than its frame: dropped.
    for bad in [&[0x04, 0][..], &[0x04, 1, 0], &[0x04, 2, 9, b'X']] {
        let mut s = handshaken(pull.port());
        s.write_all(bad).unwrap();
        assert_dropped(s);
    }
    // A command inside a multipart message: dropped.
    let mut s = handshaken(pull.port());
    s.write_all(&[0x01, 1, b'a']).unwrap();
    s.write_all(&command(b"PING", b"\x00\x00")).unwrap();
    assert_dropped(s);
    pull.assert_nothing_delivered();
    pull.assert_push_delivers(&[b"ok"]);
}

#[test]
fn ping_gets_pong_with_its_context() {
    let pull = Pull::start(PullLimits::default());
    let mut s = handshaken(pull.port());
    s.write_all(&command(b"PING", b"\x00\x0actx")).unwrap();
    let (flags, body) = read_frame(&mut s);
    assert_eq!(flags, 0x04);
    assert_eq!(body, b"\x04PONGctx");
}

#[test]
fn huge_announced_frames_drop_the_peer_without_allocating() {
    let pull = Pull::start(PullLimits::default());
    for len in [1u64 << 40, 1 << 62, u64::MAX, (64 << 20) + 1] {
        let mut s = handshaken(pull.port());
        let mut h = vec![0x02];
        h.extend_from_slice(&len.to_be_bytes());
        s.write_all(&h).unwrap();
        s.write_all(b"some bytes").unwrap();
        assert_dropped(s);
        // The same as a command frame.
        let mut s = handshaken(pull.port());
        h[0] = 0x06;
        s.write_all(&h).unwrap();
        assert_dropped(s);
    }
    // During the handshake too: a READY announcing 2^62 bytes.
    let mut s = connect(pull.port());
    s.write_all(&greeting()).unwrap();
    let mut h = vec![0x06];
    h.extend_from_slice(&(1u64 << 62).to_be_bytes());
    s.write_all(&h).unwrap();
    assert_dropped(s);
    pull.assert_push_delivers(&[b"alive"]);
}

#[test]
fn frame_count_and_message_size_are_bounded() {
    let limits = {
        let mut l = PullLimits::default();
        l.max_frame = 100;
        l.max_message = 250;
        l
    };
    let pull = Pull::start(limits);
    // SGLang sends 8 to 25 frames, and ours add trailing ones: 32 pass.
    let most: Vec<&[u8]> = vec![b"f"; 32];
    let mut s = handshaken(pull.port());
    s.write_all(&message_frames(&most)).unwrap();
    assert_eq!(
        pull.rx.recv_timeout(Duration::from_secs(5)).unwrap().len(),
        32
    );
    // 33 frames: dropped before the 33rd is read.
    let too_many: Vec<&[u8]> = vec![b"f"; 33];
    let mut s = handshaken(pull.port());
    s.write_all(&message_frames(&too_many)).unwrap();
    assert_dropped(s);
    // A frame over max_frame.
    let mut s = handshaken(pull.port());
    s.write_all(&[0x00, 101]).unwrap();
    assert_dropped(s);
    // Three frames of 100 bytes: over max_message.
    let big = [b'z'; 100];
    let mut s = handshaken(pull.port());
    s.write_all(&message_frames(&[&big, &big, &big])).unwrap();
    assert_dropped(s);
    pull.assert_nothing_delivered();
    pull.assert_push_delivers(&[b"fine"]);
}

#[test]
fn bad_handshakes_drop_only_that_peer() {
    let pull = Pull::start(PullLimits::default());
    let port = pull.port();
    // Not ZMTP.
    let mut s = connect(port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    assert_dropped(s);
    // ZMTP 2.
    let mut g = greeting();
    g[10] = 2;
    let mut s = connect(port);
    s.write_all(&g).unwrap();
    assert_dropped(s);
    // PLAIN mechanism.
    let mut g = greeting();
    g[12..17].copy_from_slice(b"PLAIN");
    let mut s = connect(port);
    s.write_all(&g).unwrap();
    assert_dropped(s);
    // A PULL (or anything but PUSH) cannot talk to PULL.
    let mut s = connect(port);
    s.write_all(&greeting()).unwrap();
    s.write_all(&ready(b"PULL")).unwrap();
    assert_dropped(s);
    // A message frame instead of READY.
    let mut s = connect(port);
    s.write_all(&greeting()).unwrap();
    s.write_all(&message_frames(&[b"early"])).unwrap();
    assert_dropped(s);
    pull.assert_nothing_delivered();
    pull.assert_push_delivers(&[b"good", b"peer"]);
}

#[test]
fn a_stalled_handshake_times_out_and_the_peer_cap_holds() {
    let limits = {
        let mut l = PullLimits::default();
        l.max_peers = 3;
        l.handshake_timeout = Duration::from_millis(300);
        l
    };
    let pull = Pull::start(limits);
    // Three silent peers fill the cap; a fourth is closed at once.
    let idle: Vec<TcpStream> = (0..3).map(|_| connect(pull.port())).collect();
    std::thread::sleep(Duration::from_millis(50));
    let extra = connect(pull.port());
    assert_dropped(extra);
    // The silent ones are dropped at the handshake timeout (after our greeting).
    for s in idle {
        assert_dropped(s);
    }
    std::thread::sleep(Duration::from_millis(50));
    pull.assert_push_delivers(&[b"after", b"the", b"cap"]);
}

#[test]
fn many_hostile_peers_then_a_good_one() {
    let pull = Pull::start(PullLimits::default());
    let mut attacks = Vec::new();
    for i in 0..50u8 {
        let mut s = handshaken(pull.port());
        match i % 4 {
            0 => s.write_all(&[0x02, 0x40, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            1 => s.write_all(&[0x04, 0]).unwrap(),
            2 => s.write_all(&[0x01, 5, b'a']).unwrap(),
            _ => {}
        }
        attacks.push(s);
    }
    drop(attacks);
    std::thread::sleep(Duration::from_millis(100));
    pull.assert_push_delivers(&[&b"x"[..]; 13]);
}
