//! The ZeroMQ side: one thread running a small tokio runtime, holding the prefill's PULL socket
//! or the decode's cached PUSH sockets.
//!
//! The PULL side is our bounded ZMTP reader ([`crate::zmtp`]): one task per peer, so a bad
//! connection ends only itself, and every length is checked before it is allocated. The PUSH
//! side is the `zeromq` crate.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

use crate::zmtp::{self, PullLimits};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

enum Cmd {
    Send {
        endpoint: String,
        frames: Vec<Bytes>,
        done: std_mpsc::Sender<Result<(), String>>,
    },
}

/// Handle to the ZMQ thread; stops it when dropped.
pub(crate) struct ZmqThread {
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    thread: Option<JoinHandle<()>>,
}

impl ZmqThread {
    /// Starts the thread. With `pull`, binds a PULL socket at that endpoint (port 0: any) and
    /// hands every message to `on_message`; returns the bound port.
    pub(crate) fn start(
        pull: Option<String>,
        on_message: Box<dyn Fn(Vec<Bytes>) + Send>,
    ) -> Result<(Self, Option<u16>), String> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<Option<u16>, String>>();
        let thread = crate::runtime_thread::spawn(
            "kv-zmq",
            {
                let ready_tx = ready_tx.clone();
                move |e| {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            },
            move || async move {
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
                    tokio::spawn(zmtp::deliver(rx, on_message));
                }
                let _ = ready_tx.send(Ok(port));
                let mut pushes: HashMap<String, PushSocket> = HashMap::new();
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Cmd::Send {
                            endpoint,
                            frames,
                            done,
                        } => {
                            let res = send(&mut pushes, &endpoint, frames).await;
                            if res.is_err() {
                                // Reconnect next time.
                                pushes.remove(&endpoint);
                            }
                            let _ = done.send(res);
                        }
                    }
                }
            },
        )
        .map_err(|e| e.to_string())?;
        let port = ready_rx.recv().map_err(|e| e.to_string())??;
        Ok((
            Self {
                tx: Some(tx),
                thread: Some(thread),
            },
            port,
        ))
    }

    /// Sends a multipart message to `endpoint` (connecting once and caching the socket) and
    /// waits until it is handed to the socket.
    pub(crate) fn send(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        let (done, rx) = std_mpsc::channel();
        let tx = self.tx.as_ref().ok_or("zmq thread stopped")?;
        tx.send(Cmd::Send {
            endpoint: endpoint.to_owned(),
            frames,
            done,
        })
        .map_err(|_| "zmq thread stopped")?;
        rx.recv_timeout(CONNECT_TIMEOUT * 2)
            .map_err(|_| format!("sending to {endpoint} timed out"))?
    }
}

async fn send(
    pushes: &mut HashMap<String, PushSocket>,
    endpoint: &str,
    frames: Vec<Bytes>,
) -> Result<(), String> {
    if !pushes.contains_key(endpoint) {
        let mut s = PushSocket::new();
        tokio::time::timeout(CONNECT_TIMEOUT, s.connect(endpoint))
            .await
            .map_err(|_| format!("connecting to {endpoint} timed out"))?
            .map_err(|e| format!("connect {endpoint}: {e}"))?;
        pushes.insert(endpoint.to_owned(), s);
    }
    let sock = pushes.get_mut(endpoint).ok_or("socket vanished")?;
    let msg = ZmqMessage::try_from(frames).map_err(|e| format!("{e:?}"))?;
    tokio::time::timeout(CONNECT_TIMEOUT, sock.send(msg))
        .await
        .map_err(|_| format!("send to {endpoint} timed out"))?
        .map_err(|e| format!("send to {endpoint}: {e}"))
}

impl Drop for ZmqThread {
    fn drop(&mut self) {
        drop(self.tx.take());
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
        )
        .unwrap();
        let port = port.unwrap();
        let (push, _) = ZmqThread::start(None, Box::new(|_| {})).unwrap();
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
}
