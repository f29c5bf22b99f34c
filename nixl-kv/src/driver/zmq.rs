//! The ZeroMQ side: one thread running a small tokio runtime, holding the prefill's PULL socket
//! or the decode's cached PUSH sockets.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

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
        let thread = std::thread::Builder::new()
            .name("kv-zmq".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut port = None;
                    if let Some(ep) = pull {
                        let mut sock = PullSocket::new();
                        match sock.bind(&ep).await {
                            Ok(zeromq::Endpoint::Tcp(_, p)) => port = Some(p),
                            Ok(other) => {
                                let _ = ready_tx.send(Err(format!("unexpected endpoint {other}")));
                                return;
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("bind {ep}: {e}")));
                                return;
                            }
                        }
                        tokio::spawn(async move {
                            loop {
                                match sock.recv().await {
                                    Ok(msg) => on_message(msg.into_vec()),
                                    Err(e) => {
                                        tracing::debug!(error = %e, "PULL socket closed");
                                        break;
                                    }
                                }
                            }
                        });
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
                });
            })
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
