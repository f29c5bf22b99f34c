//! The decode's PUSH side: one connection per prefill endpoint, each driven by a task of its
//! own, so a stalled or hostile endpoint delays only the sends queued for it.
//!
//! A send is a job for its endpoint's task: connect and handshake when there is no live
//! connection (bounded together by [`PushLimits::connect_timeout`]), then write the message
//! (bounded by [`PushLimits::send_timeout`]). Any failure drops that connection only, and the
//! job reports why; the next send to the endpoint connects afresh. A connection whose peer
//! closed while idle is replaced before the next send. Each job also carries a deadline (the
//! two timeouts together from when it was queued), so one queued behind a stalled send fails
//! instead of waiting its turn, and the sender's thread always gets an answer in bounded time.
//! A task without a connection ends; the next send to its endpoint starts a new one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::push_link::Link;

/// Time and size bounds of the decode's PUSH connections.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PushLimits {
    /// From the first TCP connect attempt (refused ones are retried) to the end of the
    /// handshake.
    pub connect_timeout: Duration,
    /// Writing one message into the socket.
    pub send_timeout: Duration,
    /// Largest command the peer may send (its `READY`, `PING`s), and largest message frame it
    /// may send (a PULL sends none; they are dropped unread), in bytes.
    pub max_command: u64,
}

impl Default for PushLimits {
    /// 10 s to connect and shake hands, 10 s per message (the timeouts the decode had with the
    /// zeromq crate), commands ≤ 64 KiB (libzmq's `READY` is tens of bytes).
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            max_command: 64 << 10,
        }
    }
}

/// How long a sender waits beyond a job's deadline before it gives up on the ZMQ thread.
const GRACE: Duration = Duration::from_secs(1);
/// Endpoint tasks remembered before ended ones are forgotten.
const PRUNE_AT: usize = 64;

/// One send.
pub(crate) struct Job {
    endpoint: String,
    frames: Vec<Bytes>,
    deadline: Instant,
    done: std_mpsc::Sender<Result<(), String>>,
}

/// The synchronous handle of [`route`]: queues sends and waits for their outcome.
pub(crate) struct Pusher {
    tx: mpsc::UnboundedSender<Job>,
    limits: Arc<PushLimits>,
    /// Told of every send, to keep the runtime hot; a send polls for its outcome for the
    /// window before it blocks.
    hot: Option<Arc<crate::net::busy::Hot>>,
}

impl Pusher {
    /// A handle and the task to run (on any tokio runtime with IO and time) that serves it;
    /// the task ends once every handle is dropped.
    pub(crate) fn new(limits: PushLimits) -> (Self, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let limits = Arc::new(limits);
        (
            Self {
                tx,
                limits,
                hot: None,
            },
            rx,
        )
    }

    /// Sends touch `hot` and poll for their outcome without sleeping for up to its window
    /// before they block.
    pub(crate) fn busy_poll(mut self, hot: Arc<crate::net::busy::Hot>) -> Self {
        self.hot = Some(hot);
        self
    }

    pub(crate) fn limits(&self) -> Arc<PushLimits> {
        Arc::clone(&self.limits)
    }

    /// Sends a multipart message to `endpoint` (`tcp://HOST:PORT`) and waits until it is
    /// written to the socket, or why not.
    pub(crate) fn send(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        let budget = self.limits.connect_timeout + self.limits.send_timeout;
        let (done, rx) = std_mpsc::channel();
        let window = self.hot.as_ref().map_or(Duration::ZERO, |hot| {
            hot.touch();
            hot.window()
        });
        self.tx
            .send(Job {
                endpoint: endpoint.to_owned(),
                frames,
                deadline: Instant::now() + budget,
                done,
            })
            .map_err(|_| "zmq thread stopped")?;
        let polled = crate::net::busy::poll_for(window, || match rx.try_recv() {
            Ok(res) => Some(res),
            Err(std_mpsc::TryRecvError::Disconnected) => Some(Err("zmq thread stopped".into())),
            Err(std_mpsc::TryRecvError::Empty) => None,
        });
        if let Some(res) = polled {
            return res;
        }
        match rx.recv_timeout(budget + GRACE) {
            Ok(res) => res,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("sending to {endpoint} timed out"))
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err("zmq thread stopped".into()),
        }
    }
}

impl Pusher {
    /// Queues a multipart message to `endpoint` without waiting for it: a status a peer is
    /// owed, where a slow peer must not hold the caller. A failure is logged.
    pub(crate) fn post(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        let budget = self.limits.connect_timeout + self.limits.send_timeout;
        // Nobody waits on the outcome: `run` logs it when the receiver is gone.
        let (done, _) = std_mpsc::channel();
        if let Some(hot) = &self.hot {
            hot.touch();
        }
        self.tx
            .send(Job {
                endpoint: endpoint.to_owned(),
                frames,
                deadline: Instant::now() + budget,
                done,
            })
            .map_err(|_| "zmq thread stopped".to_owned())
    }
}

/// Hands every job to its endpoint's task, starting one where there is none; ends when every
/// [`Pusher`] is gone.
pub(crate) async fn route(mut jobs: mpsc::UnboundedReceiver<Job>, limits: Arc<PushLimits>) {
    let mut tasks: HashMap<String, mpsc::UnboundedSender<Job>> = HashMap::new();
    while let Some(job) = jobs.recv().await {
        let job = match tasks.get(&job.endpoint) {
            Some(tx) => match tx.send(job) {
                Ok(()) => continue,
                // That task has ended: start another.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        if tasks.len() >= PRUNE_AT {
            tasks.retain(|_, tx| !tx.is_closed());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(endpoint_task(job.endpoint.clone(), rx, Arc::clone(&limits)));
        let endpoint = job.endpoint.clone();
        // The receiver is alive: `endpoint_task` has not run yet.
        let _ = tx.send(job);
        tasks.insert(endpoint, tx);
    }
}

/// Serves one endpoint's jobs in order over at most one connection; ends when it has none.
async fn endpoint_task(
    endpoint: String,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    limits: Arc<PushLimits>,
) {
    let mut link: Option<Link> = None;
    loop {
        let job = tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => job,
                None => return,
            },
            pong = next_pong(&mut link) => {
                match pong {
                    Some(pong) => answer_ping(&endpoint, &mut link, &pong, &limits).await,
                    None => link = None,
                }
                if link.is_some() {
                    continue;
                }
                // Idle without a connection: end (queued jobs below still run).
                jobs.close();
                while let Ok(job) = jobs.try_recv() {
                    run(&endpoint, &mut link, job, &limits).await;
                }
                return;
            }
        };
        run(&endpoint, &mut link, job, &limits).await;
        if link.is_none() {
            // Refuse new jobs (the router starts a new task for them), finish the queued ones.
            jobs.close();
            while let Ok(job) = jobs.try_recv() {
                run(&endpoint, &mut link, job, &limits).await;
            }
            return;
        }
    }
}

/// The next `PONG` the connection owes; `None` when its reader ended; never without one.
async fn next_pong(link: &mut Option<Link>) -> Option<Vec<u8>> {
    match link {
        Some(l) => l.next_pong().await,
        None => std::future::pending().await,
    }
}

async fn answer_ping(endpoint: &str, link: &mut Option<Link>, pong: &[u8], l: &PushLimits) {
    let Some(conn) = link.as_mut() else { return };
    match tokio::time::timeout(l.send_timeout, conn.write_command(pong)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%endpoint, error = %e, "PONG not sent; connection dropped");
            *link = None;
        }
        Err(_) => {
            tracing::debug!(%endpoint, "PONG timed out; connection dropped");
            *link = None;
        }
    }
}

/// Runs one job and reports its outcome to the sender.
async fn run(endpoint: &str, link: &mut Option<Link>, job: Job, limits: &PushLimits) {
    let res = send(endpoint, link, &job, limits).await;
    if let Err(std_mpsc::SendError(Err(e))) = job.done.send(res) {
        tracing::warn!(%endpoint, error = %e, "message not delivered");
    }
}

async fn send(
    endpoint: &str,
    link: &mut Option<Link>,
    job: &Job,
    limits: &PushLimits,
) -> Result<(), String> {
    if job.frames.is_empty() {
        return Err(format!(
            "send to {endpoint}: a message needs at least one frame"
        ));
    }
    let deadline = tokio::time::Instant::from_std(job.deadline);
    let now = tokio::time::Instant::now();
    if now >= deadline {
        return Err(format!(
            "sending to {endpoint} timed out behind earlier sends to it"
        ));
    }
    if link.as_ref().is_some_and(Link::ended) {
        tracing::debug!(%endpoint, "ZMQ connection ended while idle; reconnecting");
        *link = None;
    }
    let conn = match link {
        Some(conn) => conn,
        None => {
            let until = deadline.min(now + limits.connect_timeout);
            let conn = tokio::time::timeout_at(until, Link::connect(endpoint, limits.max_command))
                .await
                .map_err(|_| format!("connecting to {endpoint} timed out"))?
                .map_err(|e| format!("connect {endpoint}: {e}"))?;
            link.insert(conn)
        }
    };
    let until = deadline.min(tokio::time::Instant::now() + limits.send_timeout);
    let res = match tokio::time::timeout_at(until, conn.write_message(&job.frames)).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => Err(format!("send to {endpoint}: {e}")),
        Err(_) => Err(format!("send to {endpoint} timed out")),
    };
    // Part of the message may be on the wire: this connection cannot carry another.
    *link = None;
    res
}

/// A PUSH client on its own thread (a current-thread tokio runtime): one connection per
/// endpoint, as the decode's ZMQ thread keeps them; stops when dropped.
pub struct PushClient {
    pusher: Option<Pusher>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushClient").finish_non_exhaustive()
    }
}

impl PushClient {
    /// Starts the thread.
    pub fn start(limits: PushLimits) -> std::io::Result<Self> {
        let (pusher, jobs) = Pusher::new(limits);
        let shared = pusher.limits();
        let thread = crate::net::thread::spawn(
            "kv-zmtp-push",
            |e| tracing::error!(error = %e, "the ZMQ PUSH runtime failed to start"),
            move || route(jobs, shared),
        )?;
        Ok(Self {
            pusher: Some(pusher),
            thread: Some(thread),
        })
    }

    /// Sends a multipart message to `endpoint` (`tcp://HOST:PORT`), connecting when there is
    /// no live connection to it, and waits until it is written to the socket. `Err` says why
    /// not (a connect, handshake or write error or timeout); the next send reconnects.
    pub fn send(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        self.pusher
            .as_ref()
            .ok_or("push thread stopped")?
            .send(endpoint, frames)
    }
}

impl Drop for PushClient {
    fn drop(&mut self) {
        drop(self.pusher.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
