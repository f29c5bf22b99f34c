//! Source hygiene that clippy does not cover.
//!
//! The `unsafe` rule:
//! - `unsafe` blocks, `unsafe impl`, `unsafe trait` and `unsafe extern` appear only under
//!   `nixl-core/src/sys`, and every block and impl there has a `// SAFETY:` comment;
//! - an `unsafe fn` outside `nixl-core/src/sys` is allowed only in `nixl-core/src`, as a wrapper:
//!   its docs have a `# Safety` section and its body is exactly one call into `sys::` (so the
//!   contract it states is forwarded unchanged to the audited primitive);
//! - the one exception is the Python extension's FFI boundary, `nixl-py/src/ffi.rs`: addresses
//!   handed over by Python become NIXL registrations there, each block with a `// SAFETY:`
//!   comment (the crate root denies `unsafe_code` and allows it only on that module);
//! - every other library crate's root declares `#![forbid(unsafe_code)]`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::bail;

const CRATES: [&str; 9] = [
    "nixl-wire",
    "nixl-core",
    "nixl-kv",
    "nixl-hicache",
    "nixl-tools",
    "nixl-bench",
    "nixl-py",
    "nixl-testkit",
    "xtask",
];
/// Files outside nixl-core/src/sys that may hold `unsafe` blocks (each with `// SAFETY:`).
const FFI_BOUNDARY: [&str; 1] = ["nixl-py/src/ffi.rs"];
/// Crate roots that must `#![forbid(unsafe_code)]` (all but nixl-core's).
const FORBID_UNSAFE: [&str; 10] = [
    "nixl-wire/src/lib.rs",
    "nixl-kv/src/lib.rs",
    "nixl-hicache/src/lib.rs",
    "nixl-testkit/src/lib.rs",
    "nixl-tools/src/lib.rs",
    "nixl-tools/src/bin/nixl-pd/main.rs",
    "nixl-tools/src/bin/nixl-hicache.rs",
    "nixl-bench/src/lib.rs",
    "nixl-bench/src/bin/gpubench/main.rs",
    "nixl-bench/benches/kv.rs",
];
const LONG_FILE: usize = 1000;

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for c in CRATES {
        collect(&root.join(c), &mut files);
    }
    collect(&root.join("fuzz/fuzz_targets"), &mut files);
    for lib in FORBID_UNSAFE {
        let forbids = fs::read_to_string(root.join(lib))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]"));
        if !forbids {
            errors.push(format!("{lib}: crate root lacks `#![forbid(unsafe_code)]`"));
        }
    }
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
    let in_sys = rel.starts_with("nixl-core/src/sys") || FFI_BOUNDARY.contains(&rel);
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
    // The sans-IO core's files, up to their test module (tests may read the clock), and its
    // test directory not at all.
    let sans_io =
        rel.starts_with("nixl-kv/src/proto/") && !rel.starts_with("nixl-kv/src/proto/tests/");
    let mut in_tests = false;
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let stripped = strip_strings(line);
        let code = stripped.split("//").next().unwrap_or("");
        if line.ends_with(' ') || line.ends_with('\t') {
            errors.push(format!("{rel}:{n}: trailing whitespace"));
        }
        if has_keyword(code, "unsafe") && !in_sys {
            if code.contains("unsafe fn") && rel.starts_with("nixl-core/src/") {
                if let Err(why) = check_unsafe_wrapper(&lines, i) {
                    errors.push(format!("{rel}:{n}: `unsafe fn` outside sys {why}"));
                }
            } else {
                errors.push(format!("{rel}:{n}: `unsafe` outside nixl-core/src/sys"));
            }
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
        if sans_io
            && !in_tests
            && let Some(what) = SANS_IO_FORBIDDEN.iter().find(|w| code.contains(*w))
        {
            errors.push(format!(
                "{rel}:{n}: `{what}` in the sans-IO core (clocks, threads, sockets and \
                 files belong to the driver)"
            ));
        }
        if sans_io && code.trim_start().starts_with("#[cfg(test)]") {
            in_tests = true;
        }
    }
}

/// What may not appear in `nixl-kv/src/proto/` outside its tests: IO crates, the NIXL agent,
/// clocks, threads, sockets and files (each spelled in two pieces so that this file passes).
const SANS_IO_FORBIDDEN: &[&str] = &[
    concat!("use zer", "omq"),
    concat!("use tok", "io"),
    concat!("nixl_core::", "Agent"),
    concat!("Instant::", "now"),
    concat!("System", "Time"),
    concat!("std::", "thread"),
    concat!("thread::", "sleep"),
    concat!("std::", "net"),
    concat!("Tcp", "Stream"),
    concat!("std::", "fs"),
    concat!("File::", "open"),
];

/// Checks that the `unsafe fn` declared on line `i` is a wrapper: a `# Safety` doc section above,
/// and a body that is one call into `sys::`, e.g. `{ sys::register_raw(self, region) }`.
fn check_unsafe_wrapper(lines: &[&str], i: usize) -> Result<(), &'static str> {
    let mut j = i;
    let mut documented = false;
    while j > 0 && i - j < 40 {
        j -= 1;
        let t = lines[j].trim();
        let comment = t.starts_with("//");
        if t.is_empty() || !comment && (t.ends_with('{') || t.ends_with('}') || t.ends_with(';')) {
            break;
        }
        documented |= t.starts_with("///") && t.contains("# Safety");
    }
    if !documented {
        return Err("lacks a `# Safety` doc section");
    }
    // The body: from the first `{` after the signature to its matching `}`.
    let mut body = String::new();
    let mut depth = 0usize;
    let mut started = false;
    'scan: for line in &lines[i..] {
        let stripped = strip_strings(line);
        let code = stripped.split("//").next().unwrap_or("");
        for c in code.chars() {
            match c {
                '{' => {
                    if started {
                        body.push(c);
                    }
                    started = true;
                    depth += 1;
                }
                '}' if started => {
                    depth -= 1;
                    if depth == 0 {
                        break 'scan;
                    }
                    body.push(c);
                }
                _ if started => body.push(c),
                _ => {}
            }
        }
        body.push(' ');
    }
    let body = body.trim();
    let path = body
        .strip_prefix("crate::sys::")
        .or_else(|| body.strip_prefix("sys::"))
        .ok_or("must have a body that is one call into `sys::`")?;
    let args = path.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_' || c == ':');
    let single_call = args.starts_with('(')
        && args.ends_with(')')
        && !args.contains(';')
        && !args.contains('{')
        && args[1..args.len() - 1]
            .chars()
            .try_fold(0usize, |d, c| match c {
                '(' => Some(d + 1),
                ')' => d.checked_sub(1),
                _ => Some(d),
            })
            == Some(0);
    if single_call {
        Ok(())
    } else {
        Err("must have a body that is one call into `sys::`")
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

#[cfg(test)]
mod tests {
    use super::check_file;

    /// `text` with `UNSAFE` replaced by the keyword (spelled so that this file passes its rules).
    fn problems(rel: &str, text: &str) -> Vec<String> {
        let text = text.replace("UNSAFE", concat!("uns", "afe"));
        let mut errors = Vec::new();
        check_file(rel, &text, &mut errors);
        errors
    }

    const WRAPPER: &str = concat!(
        "//! m\nimpl A {\n    /// Does it.\n    ///\n    /// # Safety\n    ///\n",
        "    /// The contract; see `x`.\n    #[allow(\n        UNSAFE_code,\n",
        "        reason = \"wrapper\"\n    )]\n",
        "    pub UNSAFE fn f(&self, r: R) -> Result<(), E> {\n        sys::f(self, r)\n    }\n}\n",
    );

    #[test]
    fn a_wrapper_unsafe_fn_in_nixl_core_passes() {
        assert_eq!(
            problems("nixl-core/src/mem.rs", WRAPPER),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_wrapper_elsewhere_or_with_more_body_fails() {
        assert_eq!(problems("nixl-kv/src/a.rs", WRAPPER).len(), 1);
        for body in [
            "let x = 1;\n        sys::f(self, r)",
            "sys::f(self, r);\n        sys::g()",
            "sys::f(self, r)?",
            "other::f(self, r)",
        ] {
            let text = WRAPPER.replace("sys::f(self, r)", body);
            assert_eq!(problems("nixl-core/src/mem.rs", &text).len(), 1, "{body}");
        }
        let undocumented = WRAPPER.replace("# Safety", "Safety");
        assert_eq!(problems("nixl-core/src/mem.rs", &undocumented).len(), 1);
    }

    #[test]
    fn the_python_ffi_boundary_may_hold_commented_unsafe_blocks() {
        let block = "//! m\nfn f() {\n    UNSAFE { g() }\n}\n";
        let commented = block.replace("    UNSAFE", "    // SAFETY: ok.\n    UNSAFE");
        assert!(problems("nixl-py/src/ffi.rs", &commented).is_empty());
        assert_eq!(problems("nixl-py/src/ffi.rs", block).len(), 1);
        assert_eq!(problems("nixl-py/src/kv.rs", &commented).len(), 1);
    }

    #[test]
    fn the_sans_io_core_may_not_read_clocks_or_touch_threads_sockets_or_files() {
        for bad in [
            concat!("let t = Instant::", "now();"),
            concat!("std::", "thread::spawn(f);"),
            concat!("let s = std::", "net::TcpStream::connect(a);"),
            concat!("let f = std::", "fs::read(p);"),
            concat!("use tok", "io::time;"),
        ] {
            let text = format!("//! m\nfn f() {{\n    {bad}\n}}\n");
            assert_eq!(
                problems("nixl-kv/src/proto/prefill/mod.rs", &text).len(),
                1,
                "{bad}"
            );
            assert!(problems("nixl-kv/src/driver/mod.rs", &text).is_empty());
            assert!(problems("nixl-kv/src/proto/tests/mod.rs", &text).is_empty());
            let in_test_module = format!(
                "//! m\nfn g() {{}}\n\n#[cfg(test)]\nmod tests {{\n    fn f() {{\n        {bad}\n    }}\n}}\n"
            );
            assert!(problems("nixl-kv/src/proto/staging.rs", &in_test_module).is_empty());
        }
    }

    #[test]
    fn unsafe_blocks_belong_in_sys_with_a_safety_comment() {
        let block = "//! m\nfn f() {\n    UNSAFE { g() }\n}\n";
        assert_eq!(problems("nixl-core/src/mem.rs", block).len(), 2);
        assert_eq!(problems("nixl-core/src/sys/mod.rs", block).len(), 1);
        let commented = block.replace("    UNSAFE", "    // SAFETY: g has none.\n    UNSAFE");
        assert_eq!(
            problems("nixl-core/src/sys/mod.rs", &commented),
            Vec::<String>::new()
        );
    }
}
