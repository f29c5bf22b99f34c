//! Caller-given paths (SGLang's file-manager calls: `create_file`, `open_files`,
//! `register_files`) in a shared directory: a link planted at the path itself is never followed,
//! reads open read-only, writes open only this user's singly linked regular files, and an
//! existing file of ours is kept as SGLang keeps it. The tests at the top need no NIXL runtime;
//! those in `runtime` (feature `nixl-runtime-tests`) register files and move bytes through
//! NIXL, and mount a read-only tmpfs (root and mount(8), as in CI).
#![allow(clippy::unwrap_used, reason = "test code")]

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use nixl_hicache::{Error, FileAccess, create_file, open_files};
use nixl_testkit::tempdir;
use rustix::fs::OFlags;

const PRECIOUS: &[u8] = b"precious";

/// Asserts that `r` is the error for `path` (not for another path of the batch).
fn refused_for<T: std::fmt::Debug>(r: Result<T, Error>, path: &Path) {
    match r {
        Err(Error::Io { path: p, .. }) => assert_eq!(p, path, "the error names the wrong file"),
        other => panic!("expected an error for {}, got {other:?}", path.display()),
    }
}

fn access_mode(f: &std::fs::File) -> OFlags {
    rustix::fs::fcntl_getfl(f).unwrap() & OFlags::RWMODE
}

/// `<tmp>/store` and a victim file outside it holding [`PRECIOUS`].
fn setup() -> (nixl_testkit::TempDir, PathBuf, PathBuf) {
    let d = tempdir().unwrap();
    let store = d.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, PRECIOUS).unwrap();
    (d, store, victim)
}

#[test]
fn create_file_never_writes_or_creates_through_a_link_at_the_path() {
    let (d, store, victim) = setup();
    let link = store.join("page.bin");
    symlink(&victim, &link).unwrap();
    refused_for(create_file(&link), &link);
    assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());

    // A dangling link: nothing is created behind it.
    let absent = d.path().join("absent");
    let dangling = store.join("dangling.bin");
    symlink(&absent, &dangling).unwrap();
    refused_for(create_file(&dangling), &dangling);
    assert!(
        std::fs::symlink_metadata(&absent).is_err(),
        "a file was created behind a dangling link"
    );

    // A trailing slash names the link itself, which is still not followed.
    let slashed = PathBuf::from(format!("{}/", link.display()));
    assert!(create_file(&slashed).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);
}

#[test]
fn open_files_never_opens_through_a_link_and_names_the_file() {
    let (_d, store, victim) = setup();
    let good = store.join("good.bin");
    create_file(&good).unwrap();
    let link = store.join("link.bin");
    symlink(&victim, &link).unwrap();
    for access in [FileAccess::Read, FileAccess::Write] {
        refused_for(open_files(&[&good, &link], access), &link);
        refused_for(open_files(&[&link], access), &link);
        // The rest of the batch is fine on its own.
        assert_eq!(open_files(&[&good], access).unwrap().len(), 1);
    }
    assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
}

#[test]
fn reads_open_read_only_and_only_writes_open_for_writing() {
    let (_d, store, _victim) = setup();
    let f = store.join("page.bin");
    create_file(&f).unwrap();
    let r = open_files(&[&f], FileAccess::Read).unwrap();
    assert_eq!(access_mode(r[0].file()), OFlags::RDONLY);
    assert_eq!(r[0].path(), f);
    let w = open_files(&[&f], FileAccess::Write).unwrap();
    assert_eq!(access_mode(w[0].file()), OFlags::RDWR);
    // Blocking again once checked (NIXL's POSIX plugin expects an ordinary descriptor).
    for region in r.iter().chain(&w) {
        let fl = rustix::fs::fcntl_getfl(region.file()).unwrap();
        assert!(!fl.contains(OFlags::NONBLOCK));
    }
}

#[test]
fn an_existing_file_of_ours_is_kept_as_sglang_keeps_it() {
    let (_d, store, _victim) = setup();
    let f = store.join("sub/dir/page.bin");
    create_file(&f).unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 0);
    std::fs::write(&f, b"page").unwrap();
    let ino = std::fs::metadata(&f).unwrap().ino();
    create_file(&f).unwrap();
    let meta = std::fs::metadata(&f).unwrap();
    assert_eq!(meta.ino(), ino, "the file was replaced");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"page",
        "the file was truncated"
    );
    assert_eq!(open_files(&[&f], FileAccess::Write).unwrap().len(), 1);
    assert_eq!(open_files(&[&f], FileAccess::Read).unwrap().len(), 1);
}

#[test]
fn a_hard_link_or_another_users_file_is_read_but_never_written() {
    let (_d, store, victim) = setup();
    let hard = store.join("hard.bin");
    std::fs::hard_link(&victim, &hard).unwrap();
    refused_for(create_file(&hard), &hard);
    refused_for(open_files(&[&hard], FileAccess::Write), &hard);
    assert_eq!(open_files(&[&hard], FileAccess::Read).unwrap().len(), 1);
    assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);

    if rustix::process::geteuid().is_root() {
        let planted = store.join("planted.bin");
        std::fs::write(&planted, b"theirs").unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        refused_for(create_file(&planted), &planted);
        refused_for(open_files(&[&planted], FileAccess::Write), &planted);
        assert_eq!(open_files(&[&planted], FileAccess::Read).unwrap().len(), 1);
        assert_eq!(std::fs::read(&planted).unwrap(), b"theirs");
    }
}

#[test]
fn a_fifo_or_a_directory_at_the_path_is_an_error_not_a_hang() {
    let (_d, store, _victim) = setup();
    let fifo = store.join("fifo.bin");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();
    let dir = store.join("dir.bin");
    std::fs::create_dir(&dir).unwrap();
    for p in [&fifo, &dir] {
        refused_for(create_file(p), p);
        refused_for(open_files(&[p.as_path()], FileAccess::Read), p);
        refused_for(open_files(&[p.as_path()], FileAccess::Write), p);
    }
}

#[test]
fn a_linked_parent_directory_is_the_callers_choice_and_is_followed() {
    let (d, store, _victim) = setup();
    let alias = d.path().join("alias");
    symlink(&store, &alias).unwrap();
    let f = alias.join("page.bin");
    create_file(&f).unwrap();
    assert!(
        std::fs::symlink_metadata(store.join("page.bin"))
            .unwrap()
            .is_file()
    );
    assert_eq!(open_files(&[&f], FileAccess::Write).unwrap().len(), 1);
    // Paths without a file name are refused, as are those without a directory (SGLang).
    assert!(create_file(Path::new("/")).is_err());
    assert!(create_file(&store.join("..")).is_err());
    assert!(create_file(Path::new("name.bin")).is_err());
}

#[cfg(feature = "nixl-runtime-tests")]
mod runtime {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Duration;

    use nixl_core::{FileRegion, HostBuffer, MemType, Registered, XferDescs, XferOp, XferStatus};
    use nixl_hicache::{FileAccess, HiCache, HiCacheConfig, Plugin, create_file, open_files};
    use nixl_testkit::{TempDir, pattern, tempdir};

    use super::{PRECIOUS, refused_for, setup};

    fn posix(dir: &Path) -> HiCache {
        HiCache::new(HiCacheConfig::new(
            Some(dir.to_path_buf()),
            Plugin::parse("POSIX"),
        ))
        .unwrap()
    }

    /// Moves `len` bytes between the start of `buf` and the start of `file`.
    fn transfer(
        c: &HiCache,
        op: XferOp,
        buf: &Registered<HostBuffer>,
        file: &Registered<FileRegion>,
        len: u64,
    ) {
        let mut local = XferDescs::new(MemType::Dram);
        local.push(buf.buffer().addr(), len, 0);
        let mut remote = XferDescs::new(MemType::File);
        remote.push(0, len, file.buffer().fd());
        let req = c
            .agent()
            .create_request(op, &local, &remote, c.agent().name(), None)
            .unwrap();
        if req.post().unwrap() != XferStatus::Done {
            req.wait(Duration::from_secs(60), std::thread::yield_now)
                .unwrap();
        }
    }

    /// A tmpfs mounted on a fresh directory, unmounted on drop.
    struct Tmpfs {
        mnt: PathBuf,
        _dir: TempDir,
    }

    impl Tmpfs {
        fn new() -> Self {
            let dir = tempdir().unwrap();
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs"])
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

    #[test]
    fn register_files_writes_and_reads_the_file_never_a_linked_victim() {
        let (_d, store, victim) = setup();
        let c = posix(&store);
        let f = store.join("page.bin");
        create_file(&f).unwrap();
        let link = store.join("link.bin");
        symlink_to(&victim, &link);
        for access in [FileAccess::Read, FileAccess::Write] {
            refused_for(c.register_files(&[&f, &link], access), &link);
        }

        let mut src = HostBuffer::new(4096).unwrap();
        pattern::fill(src.as_mut_slice(), 7);
        let src = c.register_buffer(src).unwrap();
        let files = c.register_files(&[&f], FileAccess::Write).unwrap();
        transfer(&c, XferOp::Write, &src, &files[0], 4096);
        drop(files);
        assert_eq!(std::fs::read(&f).unwrap(), src.buffer().as_slice());

        let dst = c.register_buffer(HostBuffer::new(4096).unwrap()).unwrap();
        let files = c.register_files(&[&f], FileAccess::Read).unwrap();
        transfer(&c, XferOp::Read, &dst, &files[0], 4096);
        assert_eq!(dst.buffer().as_slice(), src.buffer().as_slice());
        assert_eq!(std::fs::read(&victim).unwrap(), PRECIOUS);
    }

    #[test]
    fn a_read_only_store_serves_reads_of_caller_given_files() {
        let fs = Tmpfs::new();
        let f = fs.mnt.join("page.bin");
        create_file(&f).unwrap();
        let mut page = vec![0u8; 4096];
        pattern::fill(&mut page, 3);
        std::fs::write(&f, &page).unwrap();
        fs.remount_read_only();

        let tuples = open_files(&[&f], FileAccess::Read).unwrap();
        assert_eq!(tuples[0].path(), f);
        drop(tuples);
        // Writing is refused by the file system, and says so for this file.
        refused_for(open_files(&[&f], FileAccess::Write), &f);

        let c = posix(&fs.mnt);
        let dst = c.register_buffer(HostBuffer::new(4096).unwrap()).unwrap();
        let files = c.register_files(&[&f], FileAccess::Read).unwrap();
        transfer(&c, XferOp::Read, &dst, &files[0], 4096);
        assert_eq!(dst.buffer().as_slice(), &page[..]);
    }

    fn symlink_to(target: &Path, link: &Path) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }
}
