//! Source hygiene that clippy does not cover.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::bail;

const CRATES: [&str; 6] = [
    "nixl-wire",
    "nixl-core",
    "nixl-kv",
    "nixl-hicache",
    "nixl-testkit",
    "xtask",
];
const LONG_FILE: usize = 1000;

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for c in CRATES {
        collect(&root.join(c), &mut files);
    }
    collect(&root.join("fuzz/fuzz_targets"), &mut files);
    for path in &files {
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let Ok(text) = fs::read_to_string(path) else {
            continue;
        };
        check_file(&rel, &text, &mut errors);
    }
    if !errors.is_empty() {
        bail!(
            "tidy found {} problem(s):\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
    println!("tidy ok ({} files)", files.len());
    Ok(())
}

fn check_file(rel: &str, text: &str, errors: &mut Vec<String>) {
    let in_sys = rel.starts_with("nixl-core/src/sys");
    let library = !rel.starts_with("xtask/")
        && !rel.contains("/tests/")
        && !rel.contains("/benches/")
        && !rel.contains("/examples/")
        && !rel.contains("/src/bin/")
        && !rel.starts_with("fuzz/");
    if !text.starts_with("//!") {
        errors.push(format!("{rel}: does not start with a `//!` doc comment"));
    }
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > LONG_FILE {
        println!(
            "note: {rel} has {} lines (> {LONG_FILE}); consider splitting",
            lines.len()
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let stripped = strip_strings(line);
        let code = stripped.split("//").next().unwrap_or("");
        if line.ends_with(' ') || line.ends_with('\t') {
            errors.push(format!("{rel}:{n}: trailing whitespace"));
        }
        if has_keyword(code, "unsafe") && !in_sys {
            errors.push(format!("{rel}:{n}: `unsafe` outside nixl-core/src/sys"));
        }
        if (code.contains("unsafe {") || code.contains("unsafe impl"))
            && has_keyword(code, "unsafe")
            && !has_safety_comment(&lines, i)
        {
            errors.push(format!(
                "{rel}:{n}: unsafe block or impl without a `// SAFETY:` comment"
            ));
        }
        if library
            && ["println!(", "eprintln!(", "print!(", "eprint!(", "dbg!("]
                .iter()
                .any(|m| code.contains(m))
        {
            errors.push(format!(
                "{rel}:{n}: print macro in library code (use tracing)"
            ));
        }
        // Spelled in two pieces so that this file does not match its own rule.
        if code.contains(concat!("#[should", "_panic"))
            || code.trim_start().starts_with(concat!("#[ig", "nore"))
        {
            errors.push(format!(
                "{rel}:{n}: should_panic/ignore attribute (assert on Err; gate hardware by features)"
            ));
        }
        if rel.starts_with("nixl-kv/src/proto/")
            && (code.contains("use zeromq")
                || code.contains("use tokio")
                || code.contains("nixl_core::Agent"))
        {
            errors.push(format!("{rel}:{n}: IO in the sans-IO core"));
        }
    }
}

/// Whether `word` occurs in `code` as a keyword (not inside an identifier).
fn has_keyword(code: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    code.match_indices(word).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// `line` with the contents of string literals blanked, so patterns inside strings do not count.
fn strip_strings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_str = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                out.push(c);
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        out.push(c);
    }
    out
}

/// A `// SAFETY:` comment on one of the few lines above (attributes and comment lines between).
fn has_safety_comment(lines: &[&str], i: usize) -> bool {
    if lines[i].contains("SAFETY:") {
        return true;
    }
    let mut j = i;
    while j > 0 && i - j < 12 {
        j -= 1;
        let t = lines[j].trim_start();
        if t.contains("SAFETY") {
            return true;
        }
        if !(t.starts_with("//")
            || t.starts_with("#[")
            || t.starts_with("let ")
            || t.is_empty()
            || t.ends_with('(')
            || t.ends_with('='))
        {
            return false;
        }
    }
    false
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}
