//! A target agent in a child process, driven over its stdin and stdout.
//!
//! The child is the `nixl-testkit-peer` binary. It prints
//! `READY <agent> <addr> <len> <metadata-hex>`, keeps its agent progressed on a thread, and then
//! answers one line per command: `FILL <seed>`, `VERIFY <offset> <len> <seed>`,
//! `NOTIF <payload-hex> <timeout-ms>`, `QUIT`. It exits when its stdin closes, so it never
//! outlives the test.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use nixl_core::{MemRegion, UcxErrorMode};

use crate::{Error, Result};

/// A target agent in a child process.
#[derive(Debug)]
pub struct ChildPeer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    name: String,
    region: MemRegion,
    metadata: Vec<u8>,
}

impl ChildPeer {
    /// Starts `bin` (the `nixl-testkit-peer` binary) with a registered buffer of `len` bytes.
    pub fn spawn(bin: &Path, len: usize, mode: UcxErrorMode) -> Result<Self> {
        let mode = match mode {
            UcxErrorMode::Peer => "peer",
            UcxErrorMode::None => "none",
        };
        let mut child = Command::new(bin)
            .arg(len.to_string())
            .arg(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Setup(format!("spawning {}: {e}", bin.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Setup("child has no stdio pipes".into()));
        };
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = Self {
            child,
            stdin,
            lines,
            name: String::new(),
            region: MemRegion::dram(0, 0),
            metadata: Vec::new(),
        };
        let ready = peer.read_line(Duration::from_secs(60), &mut || {})?;
        let parts: Vec<&str> = ready.split(' ').collect();
        let ["READY", name, addr, len, md] = parts[..] else {
            return Err(Error::Setup(format!(
                "unexpected first line from child: {ready}"
            )));
        };
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|e| Error::Setup(format!("{s}: {e}")))
        };
        peer.name = name.to_owned();
        peer.region = MemRegion::dram(parse(addr)?, parse(len)?);
        peer.metadata = hex_decode(md).ok_or_else(|| Error::Setup("bad metadata hex".into()))?;
        Ok(peer)
    }

    /// The child's agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's registered buffer (an address in the child's address space).
    pub fn region(&self) -> MemRegion {
        self.region
    }

    /// The child's agent metadata.
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fills the child's whole buffer with the pattern for `seed`.
    pub fn fill(&mut self, seed: u64) -> Result<()> {
        self.expect_ok(&format!("FILL {seed}"))
    }

    /// Checks `len` bytes at `offset` of the child's buffer against the pattern for `seed`;
    /// `Ok(Err(i))` names the first wrong byte.
    pub fn verify(
        &mut self,
        offset: u64,
        len: u64,
        seed: u64,
    ) -> Result<std::result::Result<(), usize>> {
        let reply = self.command(&format!("VERIFY {offset} {len} {seed}"), &mut || {})?;
        if reply == "OK" {
            return Ok(Ok(()));
        }
        match reply.strip_prefix("BAD ").and_then(|i| i.parse().ok()) {
            Some(i) => Ok(Err(i)),
            None => Err(Error::Setup(format!("unexpected reply: {reply}"))),
        }
    }

    /// Waits until the child's agent has received a notification with `payload`; returns the
    /// sender's name. `progress` runs while waiting (progress the initiator's agent there).
    pub fn wait_notification(
        &mut self,
        payload: &[u8],
        timeout: Duration,
        progress: &mut dyn FnMut(),
    ) -> Result<String> {
        let ms = timeout.as_millis();
        let reply = self.command(&format!("NOTIF {} {ms}", hex_encode(payload)), progress)?;
        match reply.strip_prefix("NOTIF ") {
            Some(peer) => Ok(peer.to_owned()),
            None => Err(Error::Timeout(format!("child: {reply}"))),
        }
    }

    fn expect_ok(&mut self, cmd: &str) -> Result<()> {
        let reply = self.command(cmd, &mut || {})?;
        if reply == "OK" {
            Ok(())
        } else {
            Err(Error::Setup(format!("{cmd}: {reply}")))
        }
    }

    fn command(&mut self, cmd: &str, progress: &mut dyn FnMut()) -> Result<String> {
        writeln!(self.stdin, "{cmd}")
            .map_err(|e| Error::Setup(format!("writing to child: {e}")))?;
        self.stdin
            .flush()
            .map_err(|e| Error::Setup(format!("writing to child: {e}")))?;
        self.read_line(Duration::from_secs(120), progress)
    }

    fn read_line(&mut self, timeout: Duration, progress: &mut dyn FnMut()) -> Result<String> {
        let start = Instant::now();
        loop {
            match self.lines.recv_timeout(Duration::from_millis(1)) {
                Ok(line) => return Ok(line),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(Error::Setup(format!("child exited ({status:?})")));
                }
                Err(RecvTimeoutError::Timeout) if start.elapsed() > timeout => {
                    return Err(Error::Timeout("child did not answer".into()));
                }
                Err(RecvTimeoutError::Timeout) => progress(),
            }
        }
    }
}

impl Drop for ChildPeer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "QUIT");
        let _ = self.stdin.flush();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Bytes of a hex string, or `None` if it is not hex of even length.
pub(crate) fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
