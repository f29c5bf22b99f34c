//! The faults step's network: two namespaces joined by a veth pair, and the impairments
//! (black hole, delay and loss by `tc netem` or by iptables and an NFQUEUE delay program).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{IP_D, IP_P, NS_D, NS_P, Proc, VETH_D, VETH_P};
use crate::cmd;

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    cmd::output(Command::new("ip").args(args)).map(drop)
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    cmd::output(Command::new("ip").args(["netns", "exec", ns]).args(args)).map(drop)
}

/// The two namespaces and the veth; deleted on drop (the veth goes with them).
pub(super) struct Net {
    delay: Option<Proc>,
}

impl Net {
    pub(super) fn create() -> anyhow::Result<Self> {
        Self::remove();
        let net = Self { delay: None };
        ip(&["netns", "add", NS_P])?;
        ip(&["netns", "add", NS_D])?;
        ip(&[
            "link", "add", VETH_P, "type", "veth", "peer", "name", VETH_D,
        ])?;
        ip(&["link", "set", VETH_P, "netns", NS_P])?;
        ip(&["link", "set", VETH_D, "netns", NS_D])?;
        for (ns, dev, addr) in [(NS_P, VETH_P, IP_P), (NS_D, VETH_D, IP_D)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Deletes the namespaces, first killing what runs in them (only our own children run
    /// there: the names are this step's).
    fn remove() {
        for ns in [NS_P, NS_D] {
            if let Ok(pids) = cmd::output(Command::new("ip").args(["netns", "pids", ns])) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    pub(super) fn has_netem(&self) -> bool {
        let ok = in_ns(
            NS_D,
            &[
                "tc", "qdisc", "add", "dev", VETH_D, "root", "netem", "delay", "1ms",
            ],
        )
        .is_ok();
        let _ = in_ns(NS_D, &["tc", "qdisc", "del", "dev", VETH_D, "root"]);
        ok
    }

    /// Removes every impairment: qdiscs, iptables rules, the delay program; links up.
    pub(super) fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(mut d) = self.delay.take() {
            d.kill();
        }
        for (ns, dev) in [(NS_P, VETH_P), (NS_D, VETH_D)] {
            let _ = in_ns(ns, &["tc", "qdisc", "del", "dev", dev, "root"]);
            in_ns(ns, &["iptables", "-F"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Drops every packet both ways on both ends: a cable cut that no carrier loss reveals.
    pub(super) fn blackhole(&self) -> anyhow::Result<()> {
        for (ns, dev) in [(NS_P, VETH_P), (NS_D, VETH_D)] {
            in_ns(ns, &["iptables", "-I", "OUTPUT", "-o", dev, "-j", "DROP"])?;
            in_ns(ns, &["iptables", "-I", "INPUT", "-i", dev, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// `delay_ms` each way and `loss_pct` % loss each way.
    pub(super) fn impair(
        &mut self,
        netem: bool,
        logs: &Path,
        delay_ms: u32,
        loss_pct: u32,
    ) -> anyhow::Result<()> {
        if netem {
            for (ns, dev) in [(NS_P, VETH_P), (NS_D, VETH_D)] {
                in_ns(
                    ns,
                    &[
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "netem",
                        "delay",
                        &format!("{delay_ms}ms"),
                        "loss",
                        &format!("{loss_pct}%"),
                    ],
                )?;
            }
            return Ok(());
        }
        let p = format!("{:.4}", f64::from(loss_pct) / 100.0);
        for (ns, dev) in [(NS_P, VETH_P), (NS_D, VETH_D)] {
            in_ns(
                ns,
                &[
                    "iptables",
                    "-A",
                    "OUTPUT",
                    "-o",
                    dev,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        // One delay program in the prefill's namespace holds both directions (its egress and
        // its ingress), so each way gets `delay_ms`. No bypass: without the program the link
        // carries nothing, which fails loudly instead of running undelayed.
        for chain in [["OUTPUT", "-o"], ["INPUT", "-i"]] {
            in_ns(
                NS_P,
                &[
                    "iptables",
                    "-A",
                    chain[0],
                    chain[1],
                    VETH_P,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    "7",
                ],
            )?;
        }
        let script = logs.join("nfq_delay.py");
        std::fs::write(&script, NFQ_DELAY)?;
        let mut d = Proc::spawn(
            "delay",
            NS_P,
            &[],
            Path::new("python3"),
            &[
                script.to_string_lossy().as_ref(),
                "7",
                &delay_ms.to_string(),
            ],
            Duration::from_secs(600),
            logs,
        )?;
        d.wait_line("delay: bound", Duration::from_secs(10))?;
        self.delay = Some(d);
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut d) = self.delay.take() {
            d.kill();
        }
        Self::remove();
    }
}

/// Holds each queued packet for the delay, in order; verdicts are batched (every id up to the
/// newest that is due).
const NFQ_DELAY: &str = r#"
import collections, select, socket, struct, sys, time
QUEUE, DELAY = int(sys.argv[1]), float(sys.argv[2]) / 1000.0
def attr(t, p):
    n = 4 + len(p)
    return struct.pack("=HH", n, t) + p + b"\0" * ((4 - n % 4) % 4)
seq = 0
def send(s, t, p, flags=1):
    global seq
    seq += 1
    body = struct.pack("!BBH", 0, 0, QUEUE) + p
    s.send(struct.pack("=IHHII", 16 + len(body), (3 << 8) | t, flags, seq, 0) + body)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
s.setsockopt(270, 5, 1)  # NETLINK_NO_ENOBUFS
s.bind((0, 0))
send(s, 2, attr(1, struct.pack("!BBH", 1, 0, 0)), 5)  # bind the queue
send(s, 2, attr(2, struct.pack("!IB", 0, 1)) + attr(3, struct.pack("!I", 1 << 16)), 5)
pending = collections.deque()
bound = False
while True:
    timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else (None if bound else 0.2)
    r, _, _ = select.select([s], [], [], timeout)
    now = time.monotonic()
    if not r and not bound:
        bound = True
        print("delay: bound queue", QUEUE, flush=True)
    while r:
        try:
            data = s.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        off = 0
        while off + 16 <= len(data):
            ln, typ = struct.unpack_from("=IH", data, off)
            if ln < 16:
                break
            if typ == 2 and struct.unpack_from("=i", data, off + 16)[0] != 0:
                sys.exit("delay: netlink error %d" % struct.unpack_from("=i", data, off + 16)[0])
            if typ == (3 << 8):
                a = off + 20
                while a + 4 <= off + ln:
                    alen, atyp = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atyp & 0x7FFF == 1:
                        pending.append((now + DELAY, struct.unpack_from("!I", data, a + 4)[0]))
                    a += (alen + 3) & ~3
            off += (ln + 3) & ~3
    last = None
    while pending and pending[0][0] <= now:
        last = pending.popleft()[1]
    if last is not None:
        send(s, 3, attr(2, struct.pack("!II", 1, last)))
"#;
