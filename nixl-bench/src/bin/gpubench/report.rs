//! The Markdown report of `gpubench all`.

use std::fmt::Write;

use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// What UCX chose, from the case's PROTO_INFO tables.
fn observed(case: &Value) -> (String, bool) {
    // The tables of this case's operation towards the peer (not the agents' self endpoints).
    // UCX also prints tables for memory-type pairs the case never uses (e.g. host to cuda for
    // every remote GPU key); keep those naming exactly this case's memory types.
    let rma = if case["op"] == "read" {
        "ucp_get"
    } else {
        "ucp_put"
    };
    let sides = [&case["local"], &case["remote"]];
    let host = sides.iter().any(|m| *m != "vram");
    let cuda = sides.iter().any(|m| *m == "vram");
    let tables: Vec<Value> = case["ucx_tables"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| {
            let op = t["operation"].as_str().unwrap_or("");
            op.contains(rma)
                && op.contains("host") == host
                && op.contains("cuda") == cuda
                && !t["endpoint"].as_str().is_some_and(|e| e.contains(" self "))
        })
        .collect();
    let emulated = tables.iter().any(|t| t["emulated"].as_bool() == Some(true));
    let mut parts: Vec<String> = Vec::new();
    for t in &tables {
        let s = t["summary"].as_str().unwrap_or("").to_owned();
        if !parts.contains(&s) {
            parts.push(s);
        }
    }
    let text = if parts.is_empty() {
        "(no table)".to_owned()
    } else {
        parts.join(" / ")
    };
    (text, emulated)
}

fn predicted(case: &Value) -> (String, bool) {
    let risks = case["predicted_emulation"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if risks.is_empty() {
        return ("zero-copy".into(), false);
    }
    let first = risks[0].as_str().unwrap_or("");
    let short: String = first.chars().take(70).collect();
    (format!("emulation: {short}…"), true)
}

pub(crate) fn markdown(all: &Value) -> String {
    let mut s = String::new();
    let a = &all["anchors"];
    let dtod = f(&a["dtod_1g_gbps"]);
    let _ = writeln!(s, "#### Anchors (GPU {})\n", a["gpu"]);
    let _ = writeln!(s, "| copy | GB/s |\n|---|---|");
    for (k, label) in [
        ("dtod_1g_gbps", "cuMemcpyDtoD 1 GiB (one-way bytes)"),
        ("dtod_64m_gbps", "cuMemcpyDtoD 64 MiB"),
        ("pinned_htod_gbps", "pinned host → device, 256 MiB"),
        ("pinned_dtoh_gbps", "device → pinned host, 256 MiB"),
        ("peer_copy_gbps", "cuMemcpyPeer GPU a → GPU b, 1 GiB"),
        ("peer_copy_back_gbps", "cuMemcpyPeer GPU b → GPU a, 1 GiB"),
    ] {
        if !a[k].is_null() {
            let _ = writeln!(s, "| {label} | {:.1} |", f(&a[k]));
        }
    }
    let cases = all["cases"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "\n#### nixl-core transfers (create + post + wait per transfer, notification on each)\n"
    );
    let _ = writeln!(
        s,
        "| case | config | op | GB/s | of DtoD | mean µs | p50 µs | p99 µs | first µs | reps | UCX chose (PROTO_INFO) | nixl-core predicted | agree |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut disagreements = 0;
    for c in &cases {
        if let Some(why) = c["failed"].as_str() {
            let _ = writeln!(
                s,
                "| {} | {} | | **failed**: {why} |||||||||",
                c["case"], c["config"]
            );
            continue;
        }
        let cr = &c["create"];
        let (obs, emulated) = observed(c);
        let (pred, predicted_emul) = predicted(c);
        let agree = emulated == predicted_emul;
        if !agree {
            disagreements += 1;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} {}→{} | {:.2} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.0} | {} | {obs} | {pred} | {} |",
            c["case"].as_str().unwrap_or(""),
            c["config"].as_str().unwrap_or(""),
            c["op"].as_str().unwrap_or(""),
            c["local"].as_str().unwrap_or(""),
            c["remote"].as_str().unwrap_or(""),
            f(&cr["gbps"]),
            100.0 * f(&cr["gbps"]) / dtod,
            f(&cr["mean_us"]),
            f(&cr["p50_us"]),
            f(&cr["p99_us"]),
            f(&cr["first_us"]),
            cr["reps"],
            if agree { "yes" } else { "**no**" },
        );
    }
    let _ = writeln!(
        s,
        "\nPredictions that disagree with UCX's tables: {disagreements}."
    );
    pd_section(&mut s, all, &cases);
    interleaved_section(&mut s, all);
    s
}

fn pd_section(s: &mut String, all: &Value, cases: &[Value]) {
    let pd = all["pd"].as_array().cloned().unwrap_or_default();
    if pd.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### pd flow (prefill and decode processes, VRAM pools) vs raw nixl-core on the same descriptors\n"
    );
    let _ = writeln!(
        s,
        "| pages/request | descs | pd verified | pd GB/s (no-verify) | pd p50 ms | pd p99 ms | prefill claim→done p50 ms | raw create p50 ms | raw prepared p50 ms | raw pool-prepared p50 ms | raw best GB/s | pd / raw GB/s | raw p50 / pd p50 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for ppr in [32u64, 256] {
        let rows: Vec<&Value> = pd
            .iter()
            .filter(|r| r["pages_per_request"] == ppr)
            .collect();
        let verified = rows.iter().find(|r| r["verified"] == true);
        let bench = rows.iter().find(|r| {
            r["verified"] == false && r["failed"].is_null() && r["interleaved_raw"].is_null()
        });
        let raw = cases.iter().find(|c| {
            c["case"]
                .as_str()
                .is_some_and(|n| n.contains(&format!("64 x {ppr} x")))
        });
        let (Some(b), Some(raw)) = (bench, raw) else {
            let _ = writeln!(s, "| {ppr} | | missing run |||||||||");
            continue;
        };
        let create = &raw["create"];
        let prep = &raw["prepared"];
        let pool = &raw["prepared_pool"];
        let best_gbps = raw_best_gbps(raw);
        let best_p50 = f(&create["p50_us"])
            .min(f(&prep["p50_us"]))
            .min(f(&pool["p50_us"]))
            / 1e3;
        let _ = writeln!(
            s,
            "| {ppr} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
            raw["descs"],
            verified.map_or_else(
                || "not run".to_owned(),
                |v| format!("{} requests, {} failed", v["requests"], v["failures"])
            ),
            f(&b["gbps"]),
            f(&b["p50_ms"]),
            f(&b["p99_ms"]),
            rows.iter()
                .find_map(|r| r["prefill_p50_ms"].as_f64())
                .unwrap_or(f64::NAN),
            f(&create["p50_us"]) / 1e3,
            f(&prep["p50_us"]) / 1e3,
            f(&pool["p50_us"]) / 1e3,
            best_gbps,
            f(&b["gbps"]) / best_gbps,
            best_p50 / f(&b["p50_ms"]),
        );
    }
}

/// The best raw GB/s of a case (create, prepared or pool-prepared series).
fn raw_best_gbps(raw: &Value) -> f64 {
    ["create", "prepared", "prepared_pool"]
        .iter()
        .map(|k| f(&raw[*k]["gbps"]))
        .filter(|g| !g.is_nan())
        .fold(f64::NAN, f64::max)
}

/// Raw and pd rounds run alternately: the ratio per round and its median.
fn interleaved_section(s: &mut String, all: &Value) {
    let pd = all["pd"].as_array().cloned().unwrap_or_default();
    if !pd.iter().any(|r| r["interleaved_raw"] == true) {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### pd vs raw, rounds alternating in time (raw case, then pd decode --no-verify)\n"
    );
    let _ = writeln!(
        s,
        "| pages/request | round | raw best GB/s | pd GB/s | pd p50 ms | pd / raw |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for ppr in [32u64, 256] {
        let mut ratios = Vec::new();
        for round in 0u64..8 {
            let at = |raw: bool| {
                pd.iter().find(|r| {
                    r["pages_per_request"] == ppr
                        && r["round"] == round
                        && (r["interleaved_raw"] == true) == raw
                })
            };
            let (Some(raw), Some(run)) = (at(true), at(false)) else {
                continue;
            };
            let (rg, pg) = (raw_best_gbps(raw), f(&run["gbps"]));
            ratios.push(pg / rg);
            let _ = writeln!(
                s,
                "| {ppr} | {round} | {rg:.2} | {pg:.2} | {:.2} | {:.3} |",
                f(&run["p50_ms"]),
                pg / rg
            );
        }
        if !ratios.is_empty() {
            ratios.sort_by(f64::total_cmp);
            let _ = writeln!(
                s,
                "| {ppr} | **median** | | | | **{:.3}** |",
                ratios[ratios.len() / 2]
            );
        }
    }
}

/// The median of the finite values.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The report of `gpubench staging`: every figure is the median over the rounds of that
/// configuration's per-round value.
pub(crate) fn staging_markdown(all: &Value) -> String {
    let mut s = String::new();
    let a = &all["anchors"];
    let k = &all["kernels"];
    let _ = writeln!(
        s,
        "#### Anchors and kernels (GPU {})\n\n| what | value |\n|---|---|",
        a["gpu"]
    );
    let _ = writeln!(
        s,
        "| cuMemcpyDtoD 64 MiB (one-way bytes) | {:.1} GB/s |",
        f(&a["dtod_64m_gbps"])
    );
    let _ = writeln!(
        s,
        "| cuMemcpyDtoD 1 GiB (one-way bytes) | {:.1} GB/s |",
        f(&a["dtod_1g_gbps"])
    );
    let _ = writeln!(
        s,
        "| gather kernel, 64 × 32 × 32 KiB, back to back | {:.1} µs ({:.0} GB/s read + write) |",
        f(&k["gather_64x32x32k_back_to_back_us"]),
        f(&k["gather_64x32x32k_rw_gbps"])
    );
    let _ = writeln!(
        s,
        "| gather kernel, launch + wait, p50 | {:.1} µs |",
        f(&k["gather_64x32x32k_launch_and_wait_p50_us"])
    );
    let _ = writeln!(
        s,
        "| kernel check (odd lengths, unaligned offset, gather + scatter) | {} bytes verified |",
        k["verified_bytes"]
    );
    if let Some(why) = k["failed"].as_str() {
        let _ = writeln!(s, "| kernel check | **failed**: {why} |");
    }
    let cases = all["cases"].as_array().cloned().unwrap_or_default();
    let failed: Vec<&Value> = cases.iter().filter(|c| !c["failed"].is_null()).collect();
    for ppr in [32u64, 256] {
        let rows: Vec<&Value> = cases
            .iter()
            .filter(|c| c["pages_per_request"] == ppr && c["failed"].is_null())
            .collect();
        let Some(bytes) = rows.first().map(|r| f(&r["bytes"])) else {
            continue;
        };
        let _ = writeln!(
            s,
            "\n#### {ppr} pages per request (64 buffers × 32 KiB: {} descriptors, {:.0} MiB), two processes on one GPU\n",
            64 * ppr,
            bytes / f64::from(1 << 20)
        );
        let _ = writeln!(
            s,
            "| path | create p50 / p99 ms | prepared p50 / p99 ms | pool-prepared p50 / p99 ms | best p50 ms | GB/s at best p50 | rounds |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let mut labels: Vec<String> = Vec::new();
        for r in &rows {
            let l = r["config"].as_str().unwrap_or("").to_owned();
            if !labels.contains(&l) {
                labels.push(l);
            }
        }
        for label in labels {
            let of: Vec<&&Value> = rows
                .iter()
                .filter(|r| r["config"] == label.as_str())
                .collect();
            let med =
                |series: &str, q: &str| median(of.iter().map(|r| f(&r[series][q]) / 1e3).collect());
            if of.iter().any(|r| r["staged"] == true) {
                let p50 = med("create", "p50_us");
                let _ = writeln!(
                    s,
                    "| **{label}**: gather {:.3} + WRITE {:.3} + scatter {:.3} ms (p50s) | {p50:.3} / {:.3} | | | {p50:.3} | {:.1} | {} |",
                    med("gather", "p50_us"),
                    med("write", "p50_us"),
                    med("scatter", "p50_us"),
                    med("create", "p99_us"),
                    bytes / (p50 / 1e3) / 1e9,
                    of.len()
                );
                continue;
            }
            let (c, p, pool) = (
                med("create", "p50_us"),
                med("prepared", "p50_us"),
                med("prepared_pool", "p50_us"),
            );
            let best = c.min(p).min(pool);
            let _ = writeln!(
                s,
                "| {label} | {c:.2} / {:.2} | {p:.2} / {:.2} | {pool:.2} / {:.2} | {best:.2} | {:.1} | {} |",
                med("create", "p99_us"),
                med("prepared", "p99_us"),
                med("prepared_pool", "p99_us"),
                bytes / (best / 1e3) / 1e9,
                of.len()
            );
        }
    }
    if !failed.is_empty() {
        let _ = writeln!(s, "\nFailed runs:");
        for c in failed {
            let _ = writeln!(s, "- {} ({}): {}", c["case"], c["config"], c["failed"]);
        }
    }
    pd_flow_section(&mut s, all, &cases);
    s
}

/// The full `nixl-pd` flow rows of `gpubench staging --pd`: per size and path, the verified
/// runs and the medians over rounds of the timed runs, against the raw staged round trip.
fn pd_flow_section(s: &mut String, all: &Value, cases: &[Value]) {
    let pd = all["pd"].as_array().cloned().unwrap_or_default();
    if pd.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### Full pd flow (nixl-pd prefill and decode processes, one GPU, 64 × 32 KiB pages; bootstrap, ZeroMQ, claim, transfers, notifications, Success)\n\nStaging memory: {:.0} MiB per side.\n",
        f(&all["staging_bytes_per_side"]) / f64::from(1 << 20)
    );
    let _ = writeln!(
        s,
        "| pages/request | path | verified runs | p50 ms | p99 ms | GB/s | rounds | raw staged p50 ms | raw staged / pd p50 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let mut paths_seen = Vec::new();
    for ppr in [1u64, 32, 256] {
        let raw_p50 = median(
            cases
                .iter()
                .filter(|c| c["pages_per_request"] == ppr && c["staged"] == true)
                .map(|c| f(&c["create"]["p50_us"]) / 1e3)
                .collect(),
        );
        for path in crate::pdflow::PATHS {
            // Reports from before the direct path have `staged` only.
            let of_path = |r: &Value| match r["path"].as_str() {
                Some(p) => p == path,
                None => r["staged"] == (path == "staged") && path != "direct",
            };
            let rows: Vec<&Value> = pd
                .iter()
                .filter(|r| r["pages_per_request"] == ppr && of_path(r) && r["sliced"].is_null())
                .collect();
            let staged = path != "plain";
            if rows.is_empty() {
                continue;
            }
            let verified: Vec<&&Value> = rows.iter().filter(|r| r["verified"] == true).collect();
            let ok: u64 = verified.iter().map(|r| r["ok"].as_u64().unwrap_or(0)).sum();
            let timed: Vec<&&Value> = rows
                .iter()
                // `failed` is a count in nixl-pd's summary and a string when the run broke.
                .filter(|r| r["verified"] == false && !r["failed"].is_string() && r["exit"] == 0)
                .collect();
            let med = |k: &str| median(timed.iter().map(|r| f(&r[k])).collect());
            let p50 = med("p50_ms");
            let failed: Vec<String> = rows
                .iter()
                .filter_map(|r| r["failed"].as_str().map(str::to_owned))
                .collect();
            let _ = writeln!(
                s,
                "| {ppr} | {} | {} of {} runs, {ok} requests | {p50:.3} | {:.3} | {:.1} | {} | {} | {} |{}",
                match path {
                    "staged" => "**staged**",
                    "direct" => "**direct** (same node)",
                    _ => "plain (GPU_FAST)",
                },
                verified.len(),
                rows.len() / 2,
                med("p99_ms"),
                med("gbps"),
                timed.len(),
                if staged && raw_p50.is_finite() {
                    format!("{raw_p50:.3}")
                } else {
                    String::new()
                },
                if staged && raw_p50.is_finite() {
                    format!("{:.2}", raw_p50 / p50)
                } else {
                    String::new()
                },
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" failed: {}", failed.join("; "))
                },
            );
            if let Some(p) = rows.iter().find_map(|r| r["prefill_paths"].as_str()) {
                paths_seen.push(format!("{ppr} pages, {path}: {p}"));
            }
        }
    }
    if !paths_seen.is_empty() {
        let _ = writeln!(
            s,
            "\nHow the prefills moved their requests (their last count):\n"
        );
        for p in paths_seen {
            let _ = writeln!(s, "- {p}");
        }
    }
    sliced_section(s, &pd);
}

/// The heterogeneous-TP rows: per ratio, size and path, each decode rank's verified runs and
/// the median over rounds of its timed p50 (the slower rank's figure is the request's).
fn sliced_section(s: &mut String, pd: &[Value]) {
    let rows: Vec<&Value> = pd.iter().filter(|r| !r["sliced"].is_null()).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### Heterogeneous TP through the full pd flow (P:D prefill and decode ranks; 8 KV heads of 256 bytes over a TP group, 16-token pages: 32 KiB on a rank of TP 1, 16 KiB on a rank of TP 2; 64 buffers)\n"
    );
    let _ = writeln!(
        s,
        "| P:D | pages/request | path | decode rank | verified runs | p50 ms | p99 ms | rounds |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for ratio in ["1:2", "2:1"] {
        for ppr in [1u64, 32, 256] {
            for path in ["plain", "packed", "staged", "direct"] {
                for rank in [0u64, 1] {
                    let of: Vec<&&Value> = rows
                        .iter()
                        .filter(|r| {
                            r["sliced"] == ratio
                                && r["pages_per_request"] == ppr
                                && r["path"] == path
                                && r["decode_rank"] == rank
                        })
                        .collect();
                    if of.is_empty() {
                        continue;
                    }
                    let verified = of.iter().filter(|r| r["verified"] == true).count();
                    let ok: u64 = of
                        .iter()
                        .filter(|r| r["verified"] == true)
                        .map(|r| r["ok"].as_u64().unwrap_or(0))
                        .sum();
                    let timed: Vec<&&&Value> = of
                        .iter()
                        .filter(|r| {
                            r["verified"] == false && !r["failed"].is_string() && r["exit"] == 0
                        })
                        .collect();
                    let med = |k: &str| median(timed.iter().map(|r| f(&r[k])).collect());
                    let _ = writeln!(
                        s,
                        "| {ratio} | {ppr} | {path} | {rank} | {verified} of {} runs, {ok} requests | {:.3} | {:.3} | {} |",
                        of.len() / 2,
                        med("p50_ms"),
                        med("p99_ms"),
                        timed.len(),
                    );
                }
            }
        }
    }
    for r in rows.iter().filter(|r| r["failed"].is_string()) {
        let _ = writeln!(s, "\nfailed: {}", r["failed"]);
    }
}
