//! What the seed gets wrong, fixed: per-key batch results, atomic writes, bounded files and
//! registrations, safe keys, suffixes, delete/clear of our own keys only, concurrent use, and
//! byte compatibility with SGLang's files. Needs the NIXL runtime.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::Path;
use std::sync::Arc;

use nixl_hicache::{Error, HiCache, HiCacheConfig, KeySuffix, Plugin, RawTarget, page_key};
use nixl_testkit::{TempDir, pattern, tempdir};

fn cache(max_open: usize) -> (TempDir, HiCache) {
    let dir = tempdir().unwrap();
    let cfg = HiCacheConfig::new(Some(dir.path().to_path_buf()), Plugin::parse("POSIX"))
        .max_open(max_open);
    (dir, HiCache::new(cfg).unwrap())
}

fn key(i: u32) -> String {
    page_key(&[i], None)
}

fn page(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern::fill(&mut v, seed);
    v
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn batch_get_answers_per_key_and_the_all_or_nothing_form_says_false() {
    let (_d, c) = cache(16);
    let (a, b, missing) = (key(1), key(2), key(3));
    c.batch_set(&[(&a, &page(4096, 1)), (&b, &page(4096, 2))])
        .unwrap();
    let (mut x, mut y, mut z) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
    let hits = c
        .batch_get(&mut [(&a, &mut x[..]), (&missing, &mut z[..]), (&b, &mut y[..])])
        .unwrap();
    assert_eq!(hits, vec![true, false, true]);
    assert_eq!(x, page(4096, 1));
    assert_eq!(y, page(4096, 2));
    assert!(z.iter().all(|&v| v == 0), "a miss leaves its buffer alone");
    assert!(
        !c.batch_get_all(&mut [(&a, &mut x[..]), (&missing, &mut z[..])])
            .unwrap()
    );
    assert_eq!(c.batch_exists(&[&a, &b, &missing, &a]).unwrap(), 2);
}

#[test]
fn a_failed_set_leaves_no_key_and_no_file() {
    let (d, c) = cache(16);
    let k = key(7);
    let stray = vec![1u8; 4096];
    // Address mode with memory that was never registered: NIXL refuses; nothing is published.
    let err = c
        .set_raw(
            &k,
            RawTarget {
                addr: stray.as_ptr() as u64,
                len: 4096,
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::Unregistered { .. }), "{err}");
    assert!(!c.exists(&k).unwrap());
    assert!(files_in(d.path()).is_empty(), "{:?}", files_in(d.path()));
    // An interrupted writer's temp file is not a key, and clear() removes it.
    std::fs::write(d.path().join(format!(".tmp.{k}.999999.0")), b"partial").unwrap();
    assert!(!c.exists(&k).unwrap());
    let mut buf = vec![0u8; 7];
    assert!(!c.get(&k, &mut buf).unwrap());
    assert_eq!(c.clear().unwrap(), 1);
}

#[test]
fn short_pages_are_misses_and_rewrites_are_seen() {
    let (_d, c) = cache(16);
    let k = key(8);
    c.set(&k, &page(1000, 1)).unwrap();
    let mut big = vec![0u8; 4096];
    assert!(
        !c.get(&k, &mut big).unwrap(),
        "a page shorter than the buffer is a miss"
    );
    let mut small = vec![0u8; 1000];
    assert!(c.get(&k, &mut small).unwrap());
    // Rewrite: the cached open file is replaced, not read stale.
    c.set(&k, &page(1000, 2)).unwrap();
    assert!(c.get(&k, &mut small).unwrap());
    assert_eq!(small, page(1000, 2));
}

#[test]
fn unsafe_keys_are_refused() {
    let (_d, c) = cache(16);
    for bad in [
        "",
        "/etc/passwd",
        "../escape",
        "a/../../b",
        "a//b",
        ".tmp.x",
    ] {
        let err = c.set(bad, b"x").unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{bad:?}: {err}");
        assert!(
            matches!(c.exists(bad), Err(Error::InvalidKey { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn suffix_names_files_per_model_and_rank() {
    let dir = tempdir().unwrap();
    let suffix = KeySuffix::Mha {
        model: "llama".into(),
        tp_rank: 1,
        tp_size: 4,
    };
    let cfg = HiCacheConfig::new(Some(dir.path().to_path_buf()), Plugin::parse("POSIX"))
        .suffix(Some(suffix));
    let c = HiCache::new(cfg).unwrap();
    let k = key(9);
    c.set(&k, &page(64, 1)).unwrap();
    assert_eq!(files_in(dir.path()), vec![format!("{k}_llama_1_4")]);
    let mla = HiCacheConfig::new(Some(dir.path().to_path_buf()), Plugin::parse("POSIX")).suffix(
        Some(KeySuffix::Mla {
            model: "dsv3".into(),
        }),
    );
    let m = HiCache::new(mla).unwrap();
    assert!(!m.exists(&k).unwrap(), "another suffix is another key");
    m.set(&k, &page(64, 2)).unwrap();
    assert!(dir.path().join(format!("{k}_dsv3")).is_file());
}

#[test]
fn delete_and_clear_touch_only_our_keys() {
    let dir = tempdir().unwrap();
    let mine = HiCache::new(
        HiCacheConfig::new(Some(dir.path().to_path_buf()), Plugin::parse("POSIX")).suffix(Some(
            KeySuffix::Mha {
                model: "m".into(),
                tp_rank: 0,
                tp_size: 2,
            },
        )),
    )
    .unwrap();
    let other = HiCache::new(
        HiCacheConfig::new(Some(dir.path().to_path_buf()), Plugin::parse("POSIX")).suffix(Some(
            KeySuffix::Mha {
                model: "m".into(),
                tp_rank: 1,
                tp_size: 2,
            },
        )),
    )
    .unwrap();
    for i in 0..5 {
        mine.set(&key(i), &page(64, i.into())).unwrap();
        other.set(&key(i), &page(64, i.into())).unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"not a page").unwrap();
    std::fs::write(
        dir.path().join(key(99)),
        b"a seed-style page without suffix",
    )
    .unwrap();
    assert!(mine.delete(&key(0)).unwrap());
    assert!(!mine.delete(&key(0)).unwrap());
    assert_eq!(mine.clear().unwrap(), 4);
    for i in 0..5 {
        assert!(!mine.exists(&key(i)).unwrap());
        assert!(
            other.exists(&key(i)).unwrap(),
            "the other rank's key {i} survived"
        );
    }
    assert!(dir.path().join("notes.txt").is_file());
    assert!(dir.path().join(key(99)).is_file());
}

#[test]
fn concurrent_use_from_several_threads() {
    let (_d, c) = cache(32);
    let c = Arc::new(c);
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let k = key(t * 1000 + i);
                    let v = page(8192, u64::from(t * 1000 + i));
                    c.set(&k, &v).unwrap();
                    let mut back = vec![0u8; 8192];
                    assert!(c.get(&k, &mut back).unwrap());
                    assert_eq!(back, v, "thread {t} key {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(c.open_files() <= 32);
}

#[test]
fn ten_thousand_batch_operations_under_an_open_file_limit_of_256() {
    rlimit::setrlimit(rlimit::Resource::NOFILE, 256, 256).unwrap();
    let dir = tempdir().unwrap();
    let c = HiCache::new(HiCacheConfig::new(
        Some(dir.path().to_path_buf()),
        Plugin::parse("POSIX"),
    ))
    .unwrap();
    let keys: Vec<String> = (0..400).map(key).collect();
    let pages: Vec<Vec<u8>> = (0..400).map(|i| page(4096, i)).collect();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    for op in 0..10_000usize {
        let i = (op * 7) % 398;
        if op % 2 == 0 {
            c.batch_set(&[(&keys[i], &pages[i]), (&keys[i + 1], &pages[i + 1])])
                .unwrap();
        } else {
            let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
            let j = (op * 13) % 398;
            let hits = c
                .batch_get(&mut [(&keys[j], &mut a[..]), (&keys[j + 1], &mut b[..])])
                .unwrap();
            if hits[0] {
                assert_eq!(a, pages[j]);
            }
        }
    }
    assert!(
        c.open_files() <= nixl_hicache::DEFAULT_MAX_OPEN,
        "{} files held",
        c.open_files()
    );
    let after = fds();
    assert!(
        after <= before + 64 + 4,
        "fds grew from {before} to {after}"
    );
}

#[test]
fn pages_are_the_same_bytes_sglang_reads_and_writes() {
    // SGLang's HiCacheNixl stores a page as the raw tensor bytes at offset 0 of `<dir>/<key>`
    // and reads the first `len` bytes back. A Python writer/reader doing exactly that stands in
    // for it here (the real module needs torch and sglang).
    let (d, c) = cache(16);
    let k = key(42);
    let theirs = page(4096, 5);
    std::fs::write(d.path().join(&k), &theirs).unwrap();
    let script = "import sys; p=sys.argv[1]; open(p,'r+b').write(bytes(range(256))*16)";
    let ok = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(d.path().join(&k))
        .status()
        .unwrap();
    assert!(ok.success());
    let mut back = vec![0u8; 4096];
    assert!(c.get(&k, &mut back).unwrap());
    let expect: Vec<u8> = (0..16).flat_map(|_| 0..=255u8).collect();
    assert_eq!(back, expect, "a page written by Python is read by us");

    let ours_key = key(43);
    let ours = page(4096, 6);
    c.set(&ours_key, &ours).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; sys.stdout.buffer.write(open(sys.argv[1],'rb').read(4096))",
        ])
        .arg(d.path().join(&ours_key))
        .output()
        .unwrap();
    assert_eq!(
        out.stdout, ours,
        "a page we wrote is read by Python byte for byte"
    );
}
