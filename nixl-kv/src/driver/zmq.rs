//! The ZeroMQ side: one thread running a small tokio runtime, holding the prefill's PULL
//! listener or the decode's PUSH connections, both our bounded ZMTP ([`crate::net::zmtp`]).
//!
//! PULL: one task per peer, so a bad connection ends only itself, and every length is checked
//! before it is allocated. PUSH: one task per prefill endpoint, so a stalled or hostile prefill
//! delays only the sends to it; connecting and shaking hands take at most 10 s, writing a
//! message at most 10 s, and whatever the peer sends is bounded the same way
//! ([`PushLimits`]). A failed send drops that connection and returns why; the next send to
//! that endpoint reconnects.

use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::net::zmtp::{self, PullLimits, PushLimits, Pusher};

/// Handle to the ZMQ thread; stops it when dropped.
pub(crate) struct ZmqThread {
    pusher: Option<Pusher>,
    thread: Option<JoinHandle<()>>,
}

impl ZmqThread {
    /// Starts the thread. With `pull`, binds a PULL socket at that endpoint (port 0: any) and
    /// hands every message to `on_message`; returns the bound port. A send polls for its
    /// outcome without sleeping for up to `busy_poll` before it blocks, and the thread polls
    /// its sockets without sleeping for `busy_poll` after each message sent or received.
    pub(crate) fn start(
        pull: Option<String>,
        on_message: Box<dyn Fn(Vec<Bytes>) + Send>,
        busy_poll: std::time::Duration,
    ) -> Result<(Self, Option<u16>), String> {
        let hot = Arc::new(crate::net::busy::Hot::new(busy_poll));
        let (pusher, jobs) = Pusher::new(PushLimits::default());
        let pusher = pusher.busy_poll(Arc::clone(&hot));
        let limits = pusher.limits();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Option<u16>, String>>();
        let thread = crate::net::thread::spawn(
            "kv-zmq",
            {
                let ready_tx = ready_tx.clone();
                move |e| {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            },
            move || async move {
                if !busy_poll.is_zero() {
                    let hot = Arc::clone(&hot);
                    tokio::spawn(async move { hot.keep_polling().await });
                }
                let mut port = None;
                if let Some(ep) = pull {
                    let listener = match zmtp::bind(&ep).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind {ep}: {e}")));
                            return;
                        }
                    };
                    match listener.local_addr() {
                        Ok(a) => port = Some(a.port()),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind {ep}: {e}")));
                            return;
                        }
                    }
                    let (tx, rx) = mpsc::channel(zmtp::QUEUE);
                    tokio::spawn(zmtp::serve(listener, PullLimits::default(), tx));
                    let hot = Arc::clone(&hot);
                    tokio::spawn(zmtp::deliver(rx, move |frames| {
                        hot.touch();
                        on_message(frames);
                    }));
                }
                let _ = ready_tx.send(Ok(port));
                zmtp::route(jobs, limits).await;
            },
        )
        .map_err(|e| e.to_string())?;
        let port = ready_rx.recv().map_err(|e| e.to_string())??;
        Ok((
            Self {
                pusher: Some(pusher),
                thread: Some(thread),
            },
            port,
        ))
    }

    /// Sends a multipart message to `endpoint` (connecting when there is no live connection
    /// to it) and waits until it is written to the socket; `Err` says why not, within the
    /// connect and send timeouts.
    pub(crate) fn send(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        self.pusher
            .as_ref()
            .ok_or("zmq thread stopped")?
            .send(endpoint, frames)
    }
}

impl ZmqThread {
    /// Queues a multipart message to `endpoint` without waiting for it (see `Pusher::post`).
    pub(crate) fn post(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        self.pusher
            .as_ref()
            .ok_or("zmq thread stopped")?
            .post(endpoint, frames)
    }
}

impl Drop for ZmqThread {
    fn drop(&mut self) {
        drop(self.pusher.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::ZmqThread;

    /// A raw ZMTP 3.0 PUSH peer up to the end of the handshake.
    fn handshaken(port: u16) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut g = [0u8; 64];
        g[0] = 0xff;
        g[9] = 0x7f;
        g[10] = 3;
        g[12..16].copy_from_slice(b"NULL");
        s.write_all(&g).unwrap();
        let mut ready = vec![0x04, 26, 5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&[0, 0, 0, 4]);
        ready.extend_from_slice(b"PUSH");
        s.write_all(&ready).unwrap();
        let mut theirs = [0u8; 64];
        s.read_exact(&mut theirs).unwrap();
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x04, "a short READY command");
        let mut body = vec![0u8; usize::from(h[1])];
        s.read_exact(&mut body).unwrap();
        assert_eq!(&body[..6], b"\x05READY");
        s
    }

    /// D1/D2 through the manager's own ZMQ thread: a peer announcing a 2^62-byte frame (which
    /// made zeromq's codec abort the process) and one resetting after the handshake (which
    /// ended the receive loop) leave the PULL side serving real PUSH peers.
    #[test]
    fn hostile_peers_do_not_stop_the_pull_socket() {
        let (tx, rx) = std_mpsc::channel::<Vec<Bytes>>();
        let (pull, port) = ZmqThread::start(
            Some("tcp://127.0.0.1:0".into()),
            Box::new(move |m| {
                let _ = tx.send(m);
            }),
            Duration::ZERO,
        )
        .unwrap();
        let port = port.unwrap();
        let (push, _) = ZmqThread::start(None, Box::new(|_| {}), Duration::ZERO).unwrap();
        let endpoint = format!("tcp://127.0.0.1:{port}");

        let mut huge = handshaken(port);
        huge.write_all(&[0x02, 0x40, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        huge.write_all(b"xxxx").unwrap();
        // The peer is dropped: EOF (or a reset) rather than the process aborting.
        let mut b = [0u8; 1];
        match huge.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the peer to be dropped, got {other:?}"),
        }

        // A reset after the handshake: the server's unread greeting makes close send RST.
        let rst = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut rst2 = handshaken(port);
        rst2.write_all(&[0x01, 200, b'a']).unwrap();
        drop(rst);
        drop(rst2);
        std::thread::sleep(Duration::from_millis(100));

        let msg = vec![Bytes::from_static(b"hello"), Bytes::from_static(b"world")];
        push.send(&endpoint, msg.clone()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), msg);
        drop(push);
        drop(pull);
    }

    /// A raw "prefill" on a thread: each accepted connection is handed to `serve`.
    fn hostile_prefill(serve: fn(TcpStream)) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || serve(s));
            }
        });
        format!("tcp://127.0.0.1:{port}")
    }

    fn pull_thread() -> (ZmqThread, String, std_mpsc::Receiver<Vec<Bytes>>) {
        let (tx, rx) = std_mpsc::channel::<Vec<Bytes>>();
        let (pull, port) = ZmqThread::start(
            Some("tcp://127.0.0.1:0".into()),
            Box::new(move |m| {
                let _ = tx.send(m);
            }),
            Duration::ZERO,
        )
        .unwrap();
        (pull, format!("tcp://127.0.0.1:{}", port.unwrap()), rx)
    }

    /// A decode's send to a "prefill" that answers the greeting with a header announcing a
    /// 2^62-byte frame fails (zeromq's codec aborted the process), and the next send, to a
    /// real PULL, arrives; the same with sends polling for their outcome.
    #[test]
    fn a_prefill_announcing_a_huge_frame_fails_only_its_send() {
        let hostile = hostile_prefill(|mut s| {
            let mut g = [0u8; 64];
            g[0] = 0xff;
            g[9] = 0x7f;
            g[10] = 3;
            g[12..16].copy_from_slice(b"NULL");
            let _ = s.write_all(&g);
            let _ = s.write_all(&[0x06, 0x40, 0, 0, 0, 0, 0, 0, 0]);
            std::thread::sleep(Duration::from_secs(30));
        });
        let (_pull, good, rx) = pull_thread();
        // Busy polling for the outcome changes neither the failure nor the success.
        let (push, _) =
            ZmqThread::start(None, Box::new(|_| {}), Duration::from_millis(50)).unwrap();
        let t = std::time::Instant::now();
        let err = push
            .send(&hostile, vec![Bytes::from_static(b"x")])
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{err}");
        let msg = vec![Bytes::from_static(b"hello"), Bytes::new()];
        push.send(&good, msg.clone()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), msg);
    }

    /// A "prefill" that accepts and never answers holds its own send until the connect
    /// timeout, but a send to another prefill from another thread meanwhile goes at once (one
    /// task per endpoint; the zeromq version served every send in turn).
    #[test]
    fn a_stalled_prefill_does_not_delay_sends_to_others() {
        let stalled = hostile_prefill(|s| {
            std::thread::sleep(Duration::from_secs(30));
            drop(s);
        });
        let (_pull, good, rx) = pull_thread();
        let (push, _) = ZmqThread::start(None, Box::new(|_| {}), Duration::ZERO).unwrap();
        let push = std::sync::Arc::new(push);
        let stuck = {
            let push = std::sync::Arc::clone(&push);
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                let res = push.send(&stalled, vec![Bytes::from_static(b"x")]);
                (res, t.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let t = std::time::Instant::now();
        let msg = vec![Bytes::from_static(b"to the good one")];
        push.send(&good, msg.clone()).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), msg);
        let (res, took) = stuck.join().unwrap();
        assert!(res.unwrap_err().contains("timed out"));
        assert!(took < Duration::from_secs(12), "{took:?}");
    }
}
