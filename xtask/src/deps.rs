//! The dependency-direction rules (ARCHITECTURE.md, "Dependency directions"), checked on `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::bail;
use serde_json::Value;

use crate::cmd;

/// Which workspace crates each crate may depend on (normal and build edges; dev edges are
/// checked by `DEV_ALLOWED`). The programs sit on top: no library lists `nixl-tools` or
/// `nixl-bench`; `nixl-tools` is published, so it never names the unpublished `nixl-testkit`.
const ALLOWED: &[(&str, &[&str])] = &[
    ("nixl-wire", &[]),
    ("nixl-core", &[]),
    ("nixl-kv", &["nixl-core", "nixl-wire"]),
    ("nixl-hicache", &["nixl-core", "nixl-wire"]),
    ("nixl-testkit", &["nixl-core", "nixl-wire"]),
    (
        "nixl-tools",
        &["nixl-core", "nixl-wire", "nixl-kv", "nixl-hicache"],
    ),
    (
        "nixl-bench",
        &[
            "nixl-core",
            "nixl-wire",
            "nixl-kv",
            "nixl-hicache",
            "nixl-tools",
            "nixl-testkit",
        ],
    ),
    // The Python extension: a top like the programs; nothing depends on it.
    (
        "nixl-py",
        &["nixl-core", "nixl-wire", "nixl-kv", "nixl-hicache"],
    ),
    ("xtask", &[]),
];

/// Extra workspace crates allowed as dev-dependencies.
const DEV_ALLOWED: &[(&str, &[&str])] = &[
    ("nixl-core", &["nixl-testkit"]),
    ("nixl-kv", &["nixl-testkit"]),
    ("nixl-hicache", &["nixl-testkit"]),
];

/// External crates that must not be reachable (through normal edges) from a crate.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "nixl-wire",
        &["nixl-sys", "zeromq", "zmq", "tokio", "cudarc"],
    ),
    ("nixl-core", &["zeromq", "zmq", "tokio", "nixl-wire"]),
    ("nixl-hicache", &["zeromq", "zmq", "tokio"]),
    ("nixl-tools", &["nixl-testkit", "nixl-bench"]),
    ("nixl-py", &["nixl-testkit", "nixl-bench", "nixl-tools"]),
];

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let out = cmd::output(Command::new("cargo").current_dir(root).args([
        "metadata",
        "--format-version",
        "1",
        "--locked",
    ]))?;
    let meta: Value = serde_json::from_str(&out)?;
    let members: BTreeSet<String> = meta["workspace_members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| package_name(&meta, id.as_str()?))
        .collect();

    let mut errors = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let Some(name) = pkg["name"].as_str() else {
            continue;
        };
        if !members.contains(name) {
            continue;
        }
        // `publish = false` is `[]` in the metadata; absent (null) means publishable.
        let published = !pkg["publish"].as_array().is_some_and(Vec::is_empty);
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let Some(dep_name) = dep["name"].as_str() else {
                continue;
            };
            if !members.contains(dep_name) {
                continue;
            }
            let dev = dep["kind"].as_str() == Some("dev");
            // A published crate's path dependencies need a version, or `cargo publish` refuses.
            if published && !dev && dep["req"].as_str().is_none_or(|r| r == "*") {
                errors.push(format!(
                    "{name} -> {dep_name} has no version; a published crate's path dependencies need one"
                ));
            }
            let ok = lookup(ALLOWED, name).contains(&dep_name)
                || (dev && lookup(DEV_ALLOWED, name).contains(&dep_name));
            if !ok {
                errors.push(format!(
                    "{name} -> {dep_name}{} is not allowed",
                    if dev { " (dev)" } else { "" }
                ));
            }
        }
    }

    // Reachability over normal dependency edges, from the resolve graph.
    let graph = resolve_graph(&meta);
    for (krate, banned) in FORBIDDEN {
        let reach = reachable(&graph, krate);
        for b in *banned {
            if reach.contains(*b) {
                errors.push(format!("{krate} reaches {b} through normal dependencies"));
            }
        }
    }
    if !errors.is_empty() {
        bail!("dependency rules broken:\n  {}", errors.join("\n  "));
    }
    println!(
        "dependency directions ok ({} workspace crates)",
        members.len()
    );
    Ok(())
}

fn lookup<'a>(table: &'a [(&str, &'a [&'a str])], name: &str) -> &'a [&'a str] {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&[], |(_, v)| v)
}

fn package_name(meta: &Value, id: &str) -> Option<String> {
    meta["packages"]
        .as_array()?
        .iter()
        .find(|p| p["id"] == id)?["name"]
        .as_str()
        .map(str::to_owned)
}

/// name -> names of its normal (non-dev, non-build) dependencies.
fn resolve_graph(meta: &Value) -> BTreeMap<String, Vec<String>> {
    let mut g = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
        let Some(name) = node["id"].as_str().and_then(|id| package_name(meta, id)) else {
            continue;
        };
        let deps = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].is_null())
            })
            .filter_map(|d| d["pkg"].as_str().and_then(|id| package_name(meta, id)))
            .collect();
        g.insert(name, deps);
    }
    g
}

fn reachable(g: &BTreeMap<String, Vec<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(n) = stack.pop() {
        for d in g.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) {
                stack.push(d.clone());
            }
        }
    }
    seen
}
