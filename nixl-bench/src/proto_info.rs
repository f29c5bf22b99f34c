//! Reading UCX's protocol tables (`UCX_PROTO_INFO=y`): which transport and protocol UCX chose
//! for each kind of RMA operation, and whether that is software emulation.
//!
//! UCX prints one table per endpoint configuration and operation the first time it selects
//! protocols for it, behind a log prefix or bare. UCX 1.19 (the NIXL wheels) writes the endpoint
//! and the operation on two lines:
//!
//! ```text
//! | agent-a intra-node cfg#2                                 |
//! | remote memory write by ucp_put* from cuda/GPU0 to cuda   |
//! |   Range   | Description |             Config             |
//! |    0..inf | zero-copy   | cuda_ipc/cuda                  |
//! ```
//!
//! Older releases put both on one line (`| ep cfg#2 | remote memory write by ... |`); both forms
//! are read. [`rma_tables`] extracts the `ucp_put*`/`ucp_get*` tables.

/// One protocol table of an RMA operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RmaTable {
    /// The endpoint configuration, e.g. `ucp_context_0 intra-node cfg#2`.
    pub endpoint: String,
    /// The operation, e.g. `remote memory write by ucp_put* from cuda/GPU0 to cuda`.
    pub operation: String,
    /// `(message sizes, protocol, transports)` rows, e.g. `("0..inf", "zero-copy",
    /// "cuda_ipc/cuda")`.
    pub rows: Vec<(String, String, String)>,
}

impl RmaTable {
    /// Whether any size range of this operation is served by software emulation.
    pub fn emulated(&self) -> bool {
        self.rows.iter().any(|(_, p, _)| p.contains("emulation"))
    }

    /// Whether the operation involves GPU memory on either side.
    pub fn involves_gpu(&self) -> bool {
        self.operation.contains("cuda")
    }

    /// A one-line summary: `protocol transports` of each row, joined by `; `.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (range, proto, tl) in &self.rows {
            let part = if self.rows.len() > 1 {
                format!("{range}: {proto} {tl}")
            } else {
                format!("{proto} {tl}")
            };
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        parts.join("; ")
    }
}

/// The `ucp_put*`/`ucp_get*` tables in `text` (UCX output with or without log prefixes), in
/// order, without repeats.
pub fn rma_tables(text: &str) -> Vec<RmaTable> {
    let mut out: Vec<RmaTable> = Vec::new();
    let mut current: Option<RmaTable> = None;
    // A one-cell line that is not an operation: the endpoint of the operation line to come.
    let mut endpoint = String::new();
    let flush = |t: Option<RmaTable>, out: &mut Vec<RmaTable>| {
        if let Some(t) = t
            && !t.rows.is_empty()
            && !out.contains(&t)
        {
            out.push(t);
        }
    };
    let is_rma = |s: &str| s.contains("ucp_put") || s.contains("ucp_get");
    for line in text.lines() {
        let Some(start) = line.find('|') else {
            continue;
        };
        let cells: Vec<&str> = line[start..]
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let mut begin = |ep: &str, op: &str, out: &mut Vec<RmaTable>| {
            flush(current.take(), out);
            current = Some(RmaTable {
                endpoint: ep.to_owned(),
                operation: op.to_owned(),
                rows: Vec::new(),
            });
        };
        match cells[..] {
            [ep, op] if is_rma(op) => begin(ep, op, &mut out),
            [op] if is_rma(op) => begin(&endpoint.clone(), op, &mut out),
            [one] => {
                flush(current.take(), &mut out);
                one.clone_into(&mut endpoint);
            }
            [range, proto, tl] if range.contains("..") => {
                if let Some(t) = current.as_mut() {
                    t.rows
                        .push((range.to_owned(), proto.to_owned(), tl.to_owned()));
                }
            }
            [_, _] => flush(current.take(), &mut out),
            _ => {}
        }
    }
    flush(current, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
[1.2] [h:1:0]  proto_debug.c:406 UCX INFO  +--------------------------------+-------------------------------------------------------+
[1.2] [h:1:0]  proto_debug.c:406 UCX INFO  | ucp_context_0 intra-node cfg#2 | remote memory write by ucp_put* from cuda/GPU0 to cuda |
[1.2] [h:1:0]  proto_debug.c:406 UCX INFO  +--------------------------------+------------------------------+------------------------+
[1.2] [h:1:0]  proto_debug.c:406 UCX INFO  |                         0..inf | zero-copy                    | cuda_ipc/cuda          |
[1.2] [h:1:0]  proto_debug.c:406 UCX INFO  +--------------------------------+------------------------------+------------------------+
| ucp_context_0 intra-node cfg#2 | remote memory write by ucp_put* from host memory to cuda |
+--------------------------------+------------------------------+------------------------+
|                        0..8192 | software emulation           | sysv/memory            |
|                      8193..inf | software emulation           | sysv/memory            |
+--------------------------------+------------------------------+------------------------+
| ucp_context_0 intra-node cfg#2 | active message by ucp_am_send* from host memory |
|                          0..inf | eager short | sysv/memory |
";

    #[test]
    fn finds_put_tables_and_tells_emulation_apart() {
        let t = rma_tables(SAMPLE);
        assert_eq!(t.len(), 2, "{t:#?}");
        assert_eq!(t[0].endpoint, "ucp_context_0 intra-node cfg#2");
        assert!(t[0].operation.contains("from cuda/GPU0 to cuda"));
        assert!(!t[0].emulated());
        assert_eq!(t[0].summary(), "zero-copy cuda_ipc/cuda");
        assert!(t[1].emulated());
        assert!(t[1].involves_gpu());
        assert_eq!(
            t[1].summary(),
            "0..8192: software emulation sysv/memory; 8193..inf: software emulation sysv/memory"
        );
    }

    /// The two-line header form of UCX 1.19, as the NIXL 1.5.1 wheel prints it.
    const UCX_1_19: &str = "\
[1795489752.276004] [vm:10557:0]   +-----------+-------------+--------------------------------+
[1795489752.276004] [vm:10557:0]   | gpubench-a-10557 self cfg#0                              |
[1795489752.276004] [vm:10557:0]   | remote memory write by ucp_put* from host memory to host |
[1795489752.276004] [vm:10557:0]   +-----------+-------------+--------------------------------+
[1795489752.276004] [vm:10557:0]   |   Range   | Description |             Config             |
[1795489752.276004] [vm:10557:0]   +-----------+-------------+--------------------------------+
[1795489752.276004] [vm:10557:0]   |   0..5804 | short       | self/memory                    |
[1795489752.276004] [vm:10557:0]   | 5805..inf | zero-copy   | cma/memory                     |
[1795489752.276004] [vm:10557:0]   +-----------+-------------+--------------------------------+
[1795489752.276062] [vm:10557:0]   | gpubench-a-10557 intra-node cfg#1                        |
[1795489752.276062] [vm:10557:0]   | remote memory read by ucp_get* from cuda/GPU0 to host    |
[1795489752.276004] [vm:10557:0]   |   Range   | Description |             Config             |
[1795489752.276004] [vm:10557:0]   |    0..inf | software emulation | sysv/memory             |
";

    #[test]
    fn reads_the_two_line_headers_of_ucx_1_19() {
        let t = rma_tables(UCX_1_19);
        assert_eq!(t.len(), 2, "{t:#?}");
        assert_eq!(t[0].endpoint, "gpubench-a-10557 self cfg#0");
        assert_eq!(
            t[0].summary(),
            "0..5804: short self/memory; 5805..inf: zero-copy cma/memory"
        );
        assert!(!t[0].involves_gpu() && !t[0].emulated());
        assert_eq!(t[1].endpoint, "gpubench-a-10557 intra-node cfg#1");
        assert!(t[1].operation.starts_with("remote memory read by ucp_get*"));
        assert!(t[1].involves_gpu() && t[1].emulated());
    }

    #[test]
    fn repeated_tables_are_reported_once_and_junk_is_ignored() {
        let twice = format!("{SAMPLE}\nnoise | with a pipe\n{SAMPLE}");
        assert_eq!(rma_tables(&twice).len(), 2);
        assert!(rma_tables("no tables here\n| a | b | c |").is_empty());
    }
}
