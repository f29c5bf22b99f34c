//! SGLang's own NIXL classes as a peer: `nixl-py/tests/sglang0523_pd.py` (SGLang 0.5.20 to
//! 0.5.23 on host memory, behind JSON lines) started with a given venv's python, and the
//! workload both sides derive rooms, pages and bytes from.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The harness's workload (its `--requests ... --hidden` options): both sides must use one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Requests.
    pub requests: u64,
    /// Chunks per request (one `send()` each).
    pub chunks: u32,
    /// Pages per chunk.
    pub pages_per_chunk: u32,
    /// Layers: K and V buffers each.
    pub layers: usize,
    /// Bytes of one page of one buffer.
    pub page_bytes: u64,
    /// Pages of the prefill's pool (not a multiple of 7).
    pub prefill_pages: u64,
    /// Pages of the decode's pool (not a multiple of 5).
    pub decode_pages: u64,
    /// Aux rows per buffer.
    pub aux_slots: u64,
    /// Requests the SGLang decode keeps in flight.
    pub window: u32,
}

/// The harness's first room.
pub const ROOM_BASE: u64 = (1 << 62) + 12345;

impl Default for Workload {
    fn default() -> Self {
        Self {
            requests: 8,
            chunks: 4,
            pages_per_chunk: 4,
            layers: 2,
            page_bytes: 4096,
            prefill_pages: 129,
            decode_pages: 256,
            aux_slots: 32,
            window: 4,
        }
    }
}

impl Workload {
    /// Pages per request.
    pub fn pages(&self) -> u32 {
        self.chunks * self.pages_per_chunk
    }

    /// Request `i`'s room.
    pub fn room(&self, i: u64) -> u64 {
        ROOM_BASE + i
    }

    /// Request `i`'s source pages on the prefill.
    pub fn src_pages(&self, i: u64) -> Vec<u32> {
        let t = u64::from(self.pages());
        (0..t)
            .map(|n| (((i * t + n) * 7) % self.prefill_pages) as u32)
            .collect()
    }

    /// Byte `j` of prefill page `p` of KV buffer `b`.
    pub fn kv_byte(b: usize, p: u32, j: usize) -> u8 {
        ((7 * b + 13 * p as usize + j) % 251) as u8
    }

    /// Byte `j` of aux buffer `k`'s row for `room`.
    pub fn aux_byte(room: u64, k: usize, j: usize) -> u8 {
        ((room % 256) as usize + 17 * k + j) as u8
    }

    /// The harness options for this workload (`--hidden 32`: SGLang's hidden-state row is then
    /// the 64 bytes of the 0.5.2x default layout).
    pub fn options(&self) -> Vec<String> {
        let pairs: [(&str, String); 11] = [
            ("--requests", self.requests.to_string()),
            ("--chunks", self.chunks.to_string()),
            ("--pages-per-chunk", self.pages_per_chunk.to_string()),
            ("--layers", self.layers.to_string()),
            ("--page-bytes", self.page_bytes.to_string()),
            ("--page-tokens", "16".into()),
            ("--prefill-pages", self.prefill_pages.to_string()),
            ("--decode-pages", self.decode_pages.to_string()),
            ("--aux-slots", self.aux_slots.to_string()),
            ("--hidden", "32".into()),
            ("--window", self.window.to_string()),
        ];
        pairs
            .into_iter()
            .flat_map(|(k, v)| [k.to_owned(), v])
            .collect()
    }
}

/// The harness script in this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixl-py/tests/sglang0523_pd.py")
}

/// One harness process (prefill, decode or pair), killed if still running when dropped. Its
/// stdout is read on a thread of its own as it comes, so that a peer never blocks on a full
/// pipe while the caller waits on another one.
pub struct SglangPeer {
    child: Child,
    lines: std::sync::mpsc::Receiver<Value>,
    stdin: Option<ChildStdin>,
}

impl SglangPeer {
    /// Starts `role` with `python` (a venv holding one SGLang release), the workload's options
    /// and `extra` ones.
    pub fn start(python: &Path, role: &str, w: &Workload, extra: &[&str]) -> crate::Result<Self> {
        Self::spawn(
            Command::new(python)
                .arg(script())
                .arg(role)
                .args(w.options())
                .args(["--timeout", "60"])
                .args(extra)
                .env("SGLANG_HOST_IP", "127.0.0.1"),
        )
    }

    /// Starts any command that speaks JSON lines on stdout.
    pub fn spawn(cmd: &mut Command) -> crate::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| crate::Error::Setup(format!("starting the SGLang peer: {e}")))?;
        let stdin = child.stdin.take();
        let out = child
            .stdout
            .take()
            .ok_or_else(|| crate::Error::Setup("no stdout".into()))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let parsed = BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str::<Value>(&l).ok());
            for v in parsed {
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            stdin,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next JSON line, whatever it is.
    pub fn line(&mut self) -> crate::Result<Value> {
        self.lines
            .recv()
            .map_err(|_| crate::Error::Setup("the SGLang peer ended".into()))
    }

    /// The next event named `event`; an `error` event or the end of the output is an error.
    pub fn next(&mut self, event: &str) -> crate::Result<Value> {
        loop {
            let v = self.line()?;
            if v["event"] == "error" {
                return Err(crate::Error::Setup(format!("the SGLang peer failed: {v}")));
            }
            if v["event"] == event {
                return Ok(v);
            }
        }
    }

    /// Every `result` of `role` up to its `done`, and that `done` (a pair forwards both of its
    /// children's events).
    pub fn results(&mut self, role: &str) -> crate::Result<(Vec<Value>, Value)> {
        let mut results = Vec::new();
        loop {
            let v = self.line()?;
            match v["event"].as_str() {
                Some("error") => {
                    return Err(crate::Error::Setup(format!("the SGLang peer failed: {v}")));
                }
                Some("result") if v["role"] == role => results.push(v),
                Some("done") if v["role"] == role => return Ok((results, v)),
                _ => {}
            }
        }
    }

    /// Writes one line to its stdin.
    pub fn send(&mut self, line: &str) -> crate::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| crate::Error::Setup("stdin closed".into()))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| crate::Error::Setup(e.to_string()))
    }

    /// Asks it to end (a prefill holding on stdin).
    pub fn quit(&mut self) {
        let _ = self.send("quit");
        self.stdin = None;
    }
}

impl std::fmt::Debug for SglangPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SglangPeer")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Drop for SglangPeer {
    fn drop(&mut self) {
        self.quit();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
