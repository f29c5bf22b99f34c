//! A HiCache directory is shared: whatever another user plants in it, a full or read-only file
//! system, a descriptor limit or a killed writer must not redirect a write, hide a stored page
//! or lose one. Needs the NIXL runtime; the read-only and full file systems are tmpfs mounts
//! made by the tests (root and mount(8), as in CI), and a test fails saying so where it cannot
//! mount.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use nixl_hicache::{
    Error, HiCache, HiCacheConfig, KeySuffix, MAX_KEY_COMPONENT_LEN, Plugin, WriteMode, page_key,
};
use nixl_testkit::{TempDir, pattern, tempdir};

fn open(dir: &Path) -> HiCache {
    HiCache::new(HiCacheConfig::new(
        Some(dir.to_path_buf()),
        Plugin::parse("POSIX"),
    ))
    .unwrap()
}

fn key(i: u32) -> String {
    page_key(&[i], None)
}

fn page(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern::fill(&mut v, seed);
    v
}

/// The page stored under `k`, read with a buffer of `len` bytes (`None`: a miss).
fn read(c: &HiCache, k: &str, len: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; len];
    c.get(k, &mut v).unwrap().then_some(v)
}

fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect()
}

fn age(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

/// A tmpfs of a given size mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    mnt: PathBuf,
    _dir: TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&mnt)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => panic!(
                "this test needs to mount a tmpfs (run as root with mount(8), as CI does); \
                 mount failed: {other:?}"
            ),
        }
        Self { mnt, _dir: dir }
    }

    fn remount_read_only(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(ok.success(), "remount read-only failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

// ---- D13: no symbolic link is followed ----

#[test]
fn put_never_writes_through_a_link_planted_at_the_key() {
    let d = tempdir().unwrap();
    let store = d.path().join("store");
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let c = open(&store);
    let k = key(1);
    std::os::unix::fs::symlink(&victim, store.join(&k)).unwrap();
    c.set(&k, &page(4096, 1)).unwrap();
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the file behind the link was written"
    );
    let meta = std::fs::symlink_metadata(store.join(&k)).unwrap();
    assert!(meta.is_file(), "the link was replaced by the page file");
    assert_eq!(read(&c, &k, 4096), Some(page(4096, 1)));
    // A link at a key is no page, and nothing is read through it.
    let k3 = key(3);
    std::os::unix::fs::symlink(&victim, store.join(&k3)).unwrap();
    assert!(!c.exists(&k3).unwrap(), "a link is no page");
    assert_eq!(read(&c, &k3, 8), None, "nor is it read through");

    // In place, SGLang's way: the link is refused, not followed.
    let inplace = HiCache::new(
        HiCacheConfig::new(Some(store.clone()), Plugin::parse("POSIX"))
            .write_mode(WriteMode::InPlace),
    )
    .unwrap();
    let k2 = key(2);
    std::os::unix::fs::symlink(&victim, store.join(&k2)).unwrap();
    assert!(inplace.set(&k2, &page(4096, 2)).is_err());
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the file behind the link was written"
    );
}

#[test]
fn a_linked_subdirectory_or_a_swapped_store_directory_redirects_nothing() {
    let d = tempdir().unwrap();
    let store = d.path().join("store");
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let c = open(&store);
    // A key below a directory that is a link to elsewhere.
    std::os::unix::fs::symlink(&elsewhere, store.join("sub")).unwrap();
    let nested = format!("sub/{}", key(3));
    let res = c.set(&nested, &page(512, 3));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(res.is_err());
    assert!(!c.exists(&nested).unwrap());
    // The store directory itself swapped for a link after opening: the connector keeps
    // working in the directory it opened.
    let (k1, k2) = (key(4), key(5));
    c.set(&k1, &page(512, 4)).unwrap();
    let moved = d.path().join("moved");
    std::fs::rename(&store, &moved).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &store).unwrap();
    c.set(&k2, &page(512, 5)).unwrap();
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert_eq!(std::fs::read(moved.join(&k2)).unwrap(), page(512, 5));
    assert_eq!(read(&c, &k1, 512), Some(page(512, 4)));
    assert!(c.delete(&k1).unwrap());
    assert!(!moved.join(&k1).exists());
}

/// Not one of the findings: reads open without following links but also must not block
/// on a FIFO someone planted (an `O_RDONLY` open of a FIFO waits for a writer).
#[test]
fn a_fifo_at_a_key_is_a_miss_not_a_hang() {
    let d = tempdir().unwrap();
    let c = open(d.path());
    let k = key(6);
    let ok = Command::new("mkfifo")
        .arg(d.path().join(&k))
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(!c.exists(&k).unwrap());
    assert_eq!(read(&c, &k, 64), None);
}

// ---- D14: reads open files read-only ----

#[test]
fn a_read_only_store_serves_every_get() {
    let fs = Tmpfs::new("16m");
    let (a, b, missing) = (key(10), key(11), key(12));
    {
        let c = open(&fs.mnt);
        c.batch_set(&[(&a, &page(65536, 1)), (&b, &page(4096, 2))])
            .unwrap();
    }
    fs.remount_read_only();
    let c = open(&fs.mnt);
    assert!(c.exists(&a).unwrap());
    assert_eq!(read(&c, &a, 65536), Some(page(65536, 1)));
    let (mut x, mut y, mut z) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
    let hits = c
        .batch_get(&mut [(&b, &mut x[..]), (&missing, &mut y[..]), (&a, &mut z[..])])
        .unwrap();
    assert_eq!(hits, vec![true, false, true]);
    assert_eq!(x, page(4096, 2));
    assert_eq!(z, page(65536, 1)[..4096]);
    // Writes fail, and the stored page is still there.
    assert!(c.set(&a, &page(65536, 3)).is_err());
    assert_eq!(read(&c, &a, 65536), Some(page(65536, 1)));
}

// ---- D15: a failed or interrupted overwrite keeps the previous page ----

#[test]
fn a_full_file_system_keeps_the_previous_page() {
    let fs = Tmpfs::new("4m");
    let c = open(&fs.mnt);
    let k = key(20);
    c.set(&k, &page(262_144, 1)).unwrap();
    // Fill the file system.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(fs.mnt.join("filler")).unwrap();
        let chunk = vec![0xa5u8; 65536];
        while filler.write_all(&chunk).is_ok() {}
        let _ = filler.sync_all();
    }
    // A larger page, then one of the same size (a fresh file needs fresh blocks).
    for len in [1 << 20, 262_144] {
        let res = c.set(&k, &page(len, 2));
        assert!(
            c.exists(&k).unwrap(),
            "the key survived a rewrite of {len} bytes"
        );
        assert_eq!(read(&c, &k, 262_144), Some(page(262_144, 1)), "{len}");
        let err = res.unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(28)),
            "ENOSPC expected: {err}"
        );
        assert!(temps_in(&fs.mnt).is_empty(), "{:?}", temps_in(&fs.mnt));
    }
    std::fs::remove_file(fs.mnt.join("filler")).unwrap();
    c.set(&k, &page(1 << 20, 3)).unwrap();
    assert_eq!(read(&c, &k, 1 << 20), Some(page(1 << 20, 3)));
}

#[test]
fn a_descriptor_limit_in_a_batch_loses_no_previous_page() {
    let d = tempdir().unwrap();
    let c = open(d.path());
    let keys: Vec<String> = (100..164).map(key).collect();
    let olds: Vec<Vec<u8>> = (0..64).map(|i| page(4096, i)).collect();
    let news: Vec<Vec<u8>> = (0..64).map(|i| page(4096, 1000 + i)).collect();
    let items = |pages: &[Vec<u8>]| -> Vec<(String, Vec<u8>)> {
        keys.iter().cloned().zip(pages.iter().cloned()).collect()
    };
    let old_items = items(&olds);
    let refs: Vec<(&str, &[u8])> = old_items
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    c.batch_set(&refs).unwrap();

    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    rlimit::setrlimit(rlimit::Resource::NOFILE, fds + 24, hard).unwrap();
    let new_items = items(&news);
    let refs: Vec<(&str, &[u8])> = new_items
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let res = c.batch_set(&refs);
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
    let err = res.unwrap_err();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            read(&c, k, 4096).as_ref(),
            Some(&olds[i]),
            "key {i} kept its page"
        );
    }
    assert!(
        matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(24)),
        "EMFILE expected: {err}"
    );
    assert!(temps_in(d.path()).is_empty(), "{:?}", temps_in(d.path()));
}

#[test]
fn one_key_that_cannot_be_published_costs_no_other_key_its_page() {
    let d = tempdir().unwrap();
    let c = open(d.path());
    let (k1, k2, k3) = (key(30), key(31), key(32));
    c.batch_set(&[(&k1, &page(4096, 1)), (&k3, &page(4096, 3))])
        .unwrap();
    // Someone made k2's name a directory: nothing can be renamed over it.
    std::fs::create_dir(d.path().join(&k2)).unwrap();
    std::fs::write(d.path().join(&k2).join("theirs"), b"x").unwrap();
    let err = c
        .batch_set(&[
            (&k1, &page(4096, 11)),
            (&k2, &page(4096, 12)),
            (&k3, &page(4096, 13)),
        ])
        .unwrap_err();
    for (k, old, new) in [(&k1, 1, 11), (&k3, 3, 13)] {
        let got = read(&c, k, 4096).expect("the key still holds a page");
        assert!(
            got == page(4096, old) || got == page(4096, new),
            "a complete page"
        );
    }
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(d.path().join(&k2).join("theirs").is_file());
    assert!(temps_in(d.path()).is_empty(), "{:?}", temps_in(d.path()));
}

const CHILD_ENV: &str = "NIXL_HICACHE_TEST_REWRITER_DIR";
const KILL_PAGE: usize = 8 << 20;

#[test]
fn a_writer_killed_mid_overwrite_leaves_the_old_or_the_new_page() {
    let k = key(40);
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        // The child: rewrite the key until killed.
        let c = open(Path::new(&dir));
        let pages = [page(KILL_PAGE, 1), page(KILL_PAGE, 2)];
        for i in 0usize.. {
            c.set(&k, &pages[i % 2]).unwrap();
        }
        return;
    }
    let d = tempdir().unwrap();
    open(d.path()).set(&k, &page(KILL_PAGE, 1)).unwrap();
    let (one, two) = (page(KILL_PAGE, 1), page(KILL_PAGE, 2));
    let mut leftovers = 0;
    for round in 0..6u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_writer_killed_mid_overwrite_leaves_the_old_or_the_new_page",
                "--nocapture",
            ])
            .env(CHILD_ENV, d.path())
            .spawn()
            .unwrap();
        // Kill only once the child writes (a temp file of its own exists): on a loaded machine
        // its start alone can outlast any fixed delay. Then a different delay each round.
        let before = temps_in(d.path());
        let writing = Instant::now();
        while temps_in(d.path()).iter().all(|t| before.contains(t)) {
            assert!(
                writing.elapsed() < Duration::from_secs(60),
                "round {round}: the child never wrote"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(5 + 37 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let c = open(d.path());
        let got = read(&c, &k, KILL_PAGE).unwrap_or_else(|| panic!("round {round}: key lost"));
        assert!(got == one || got == two, "round {round}: a torn page");
        leftovers += temps_in(d.path()).len();
    }
    // D17: the killed writers' temp files are removed once they are old enough, at open.
    let temps = temps_in(d.path());
    assert!(
        leftovers > 0,
        "no kill landed during a write: the test proved nothing"
    );
    for t in &temps {
        age(&d.path().join(t), 3600);
    }
    let c = open(d.path());
    assert!(temps_in(d.path()).is_empty(), "{:?}", temps_in(d.path()));
    assert!(read(&c, &k, KILL_PAGE).is_some());
}

// ---- D16: every key that fits a directory entry can be stored ----

#[test]
fn keys_up_to_255_bytes_are_stored_and_longer_ones_refused_clearly() {
    let d = tempdir().unwrap();
    let c = open(d.path());
    for len in [243, 250, MAX_KEY_COMPONENT_LEN] {
        let k = "k".repeat(len);
        c.set(&k, &page(100, len as u64)).unwrap();
        assert_eq!(read(&c, &k, 100), Some(page(100, len as u64)), "{len}");
    }
    let nested = format!("{}/{}", "d".repeat(255), "f".repeat(255));
    c.set(&nested, &page(100, 7)).unwrap();
    assert_eq!(read(&c, &nested, 100), Some(page(100, 7)));
    assert!(temps_in(d.path()).is_empty());

    let err = c.set(&"k".repeat(256), b"x").unwrap_err();
    assert!(
        matches!(&err, Error::InvalidKey { reason, .. } if reason.contains("255")),
        "{err}"
    );
    let deep = format!("{}x", "d/".repeat(512));
    let err = c.set(&deep, b"x").unwrap_err();
    assert!(
        matches!(&err, Error::InvalidKey { reason, .. } if reason.contains("1024")),
        "{err}"
    );
    // The suffix counts.
    let mla = HiCache::new(
        HiCacheConfig::new(Some(d.path().to_path_buf()), Plugin::parse("POSIX"))
            .suffix(Some(KeySuffix::Mla { model: "m".into() })),
    )
    .unwrap();
    mla.set(&"k".repeat(253), b"x").unwrap();
    assert!(matches!(
        mla.set(&"k".repeat(254), b"x"),
        Err(Error::InvalidKey { .. })
    ));
    for bad in [".tmp-x", "a/.tmp-y", ".tmp.z"] {
        assert!(
            matches!(c.set(bad, b"x"), Err(Error::InvalidKey { .. })),
            "{bad}"
        );
    }
}

// ---- D17: stale temp files go at open ----

#[test]
fn opening_a_store_removes_its_stale_temp_files_and_nothing_else() {
    let d = tempdir().unwrap();
    let k = key(50);
    let stale = d.path().join(format!(".tmp.{k}.999999.0"));
    let fresh = d.path().join(format!(".tmp.{k}.999999.1"));
    let foreign = d.path().join(format!(".tmp.{k}_other.999999.0"));
    let notes = d.path().join(".tmp.notes");
    for p in [&stale, &fresh, &foreign, &notes] {
        std::fs::write(p, b"partial").unwrap();
    }
    std::fs::write(d.path().join(&k), page(64, 1)).unwrap();
    for p in [&stale, &foreign, &notes, &d.path().join(&k)] {
        age(p, 3600);
    }
    let c = open(d.path());
    assert!(!stale.exists(), "a stale temp file of ours is removed");
    assert!(fresh.exists(), "a recent one may belong to a live writer");
    assert!(foreign.exists() && notes.exists(), "others' files stay");
    assert_eq!(read(&c, &k, 64), Some(page(64, 1)), "keys are never swept");
}
