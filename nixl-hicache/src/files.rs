//! Pages as files: `<dir>/<key><suffix>`, raw bytes from offset 0 — the same files SGLang's
//! HiCacheNixl reads and writes (docs/protocol.md §9.3).
//!
//! Every file operation is relative to a descriptor of the storage directory, opened once, and
//! never follows a symbolic link: each directory component of a key is opened with
//! `O_DIRECTORY | O_NOFOLLOW` under its parent, and the page file with `O_NOFOLLOW`. A link
//! planted at a key, at a subdirectory of keys, or in place of the storage directory itself
//! cannot redirect a write or a read anywhere else.
//!
//! In the atomic mode a write creates a fresh temp file beside the key's file
//! (`O_CREAT | O_EXCL`, never an existing inode), reserves its blocks, and is renamed over the
//! key only after the transfer completed and the file was checked: the previous page stays
//! readable until then and survives any failure (a full disk, a killed process, a descriptor
//! limit). Reads open files read-only and keep a bounded cache of open, registered files,
//! checked against the file's inode so a key rewritten by anyone is reopened.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nixl_core::{Agent, FileRegion, Registered};
use rustix::fs::{AtFlags, FallocateFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::config::WriteMode;
use crate::error::{Error, Result, io};
use crate::key::{self, Naming, PagePart};

/// A temp file of this connector older than this is left over from a writer that died, and
/// is removed when a store opens. A live write takes at most the transfer timeout (120 s).
pub(crate) const STALE_TEMP_AGE: Duration = Duration::from_secs(15 * 60);
/// The sweep for stale temp files at open looks at no more directory entries than this.
const SWEEP_MAX_ENTRIES: usize = 1 << 20;
/// ... and descends no deeper than this below the storage directory.
const SWEEP_MAX_DEPTH: usize = 8;
/// Temp files of this version: `.tmp-<tag>-<key hash>-<nonce>` (docs/protocol.md §9.3).
pub(crate) const TEMP_PREFIX: &str = ".tmp-";
/// Temp files of earlier versions: `.tmp.<name>.<pid>.<n>`.
pub(crate) const OLD_TEMP_PREFIX: &str = ".tmp.";
/// The alignment `O_DIRECT` needs of addresses, lengths and file offsets (a page; every
/// common block size divides it).
pub(crate) const DIRECT_ALIGN: u64 = 4096;
/// Hex digits of each part of a temp name: suffix tag, key hash, nonce.
const TEMP_PARTS: [usize; 3] = [8, 16, 16];
/// Attempts at a temp name that does not exist yet.
const TEMP_ATTEMPTS: usize = 8;
/// Mode of new files and directories before the umask (as Python's `open` and `mkdir`).
pub(crate) const FILE_MODE: u32 = 0o666;
const DIR_MODE: u32 = 0o777;

/// An open, registered file in the read cache.
struct Cached {
    file: Arc<Registered<FileRegion>>,
    ino: (u64, u64),
    last_use: u64,
}

/// A file staged for a write: the registered file, the directory it lies in, its temp name
/// (none in place) and the key's name.
pub(crate) struct Staged {
    pub(crate) file: Registered<FileRegion>,
    parent: Option<OwnedFd>,
    temp: Option<String>,
    name: String,
    len: u64,
}

/// The file side of the connector.
pub(crate) struct FileStore {
    dir: PathBuf,
    root: OwnedFd,
    mode: WriteMode,
    max_open: usize,
    suffix: String,
    naming: Naming,
    tag: String,
    cache: Mutex<HashMap<String, Cached>>,
    clock: AtomicU64,
    seq: AtomicU64,
    nonce_seed: u64,
    /// The file system refused `O_DIRECT` once (tmpfs, for example): writes stay buffered.
    no_direct: AtomicBool,
}

/// The directory a name lies in: an opened subdirectory, or the storage directory (`None`).
type Parent = Option<OwnedFd>;

/// What a walk over the directory saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Walked {
    pub(crate) entries: usize,
    pub(crate) removed: usize,
    pub(crate) truncated: bool,
}

impl FileStore {
    /// Opens (creating it if needed) the storage directory for keys with `suffix`, and removes
    /// this connector's temp files older than [`STALE_TEMP_AGE`] (bounded; failures are logged).
    pub(crate) fn new(
        dir: PathBuf,
        max_open: usize,
        mode: WriteMode,
        suffix: &str,
        naming: Naming,
    ) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let root = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys("open directory", &dir))?;
        let store = Self {
            dir,
            root,
            mode,
            max_open,
            suffix: suffix.to_owned(),
            naming,
            tag: suffix_tag(suffix),
            cache: Mutex::default(),
            clock: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            nonce_seed: RandomState::new().hash_one(std::process::id()),
            no_direct: AtomicBool::new(false),
        };
        store.sweep(STALE_TEMP_AGE, SWEEP_MAX_ENTRIES, SWEEP_MAX_DEPTH);
        Ok(store)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/<name>`.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn at<'a>(&'a self, parent: &'a Parent) -> BorrowedFd<'a> {
        parent
            .as_ref()
            .map_or_else(|| self.root.as_fd(), AsFd::as_fd)
    }

    /// Opens the directory that holds `name` and returns it with the file's own name, walking
    /// each directory component under its parent without following links (`create`: making
    /// missing ones).
    fn parent<'n>(&self, name: &'n str, create: bool) -> rustix::io::Result<(Parent, &'n str)> {
        let Some((dirs, base)) = name.rsplit_once('/') else {
            return Ok((None, name));
        };
        Ok((self.open_dir(dirs, create)?, base))
    }

    /// Opens the directory `rel` (components separated by `/`; empty is the storage directory).
    fn open_dir(&self, rel: &str, create: bool) -> rustix::io::Result<Parent> {
        let mut cur: Parent = None;
        for comp in rel.split('/').filter(|c| !c.is_empty()) {
            let next = {
                let at = self.at(&cur);
                let open = || {
                    rustix::fs::openat(
                        at,
                        comp,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                };
                match open() {
                    Err(Errno::NOENT) if create => {
                        match rustix::fs::mkdirat(at, comp, Mode::from_raw_mode(DIR_MODE)) {
                            Ok(()) | Err(Errno::EXIST) => open()?,
                            Err(e) => return Err(e),
                        }
                    }
                    r => r?,
                }
            };
            cur = Some(next);
        }
        Ok(cur)
    }

    /// Creates and registers the file a page of `len` bytes for `name` is written to, with its
    /// blocks reserved (so a full file system fails here, before anything is written).
    ///
    /// Atomic mode: a fresh temp file beside the key's file; the key's current file, if any, is
    /// not touched until [`FileStore::publish`]. In place: the key's own file.
    /// With `direct`, the file is opened `O_DIRECT` (the caller checked that the ranges are
    /// aligned to [`DIRECT_ALIGN`]) where the file system supports it, else without.
    pub(crate) fn stage(
        &self,
        agent: &Agent,
        name: &str,
        len: u64,
        direct: bool,
    ) -> Result<Staged> {
        let path = self.path(name);
        let (parent, base) = self
            .parent(name, true)
            .map_err(sys("open directory of", &path))?;
        let at = self.at(&parent);
        let (fd, temp) = match self.mode {
            WriteMode::Atomic => {
                let (fd, temp) = self
                    .create_temp(at, base, self.direct_flag(direct))
                    .or_else(|e| match e {
                        Errno::INVAL if direct => {
                            self.no_direct.store(true, Ordering::Relaxed);
                            self.create_temp(at, base, OFlags::empty())
                        }
                        e => Err(e),
                    })
                    .map_err(sys("create temp for", &path))?;
                (fd, Some(temp))
            }
            WriteMode::InPlace => {
                self.forget(name);
                let fd = rustix::fs::openat(
                    at,
                    base,
                    OFlags::RDWR
                        | OFlags::CREATE
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC
                        | OFlags::NONBLOCK
                        | OFlags::NOCTTY,
                    Mode::from_raw_mode(FILE_MODE),
                )
                .map_err(sys("open", &path))?;
                (fd, None)
            }
        };
        let file = File::from(fd);
        let file_path = match &temp {
            Some(t) => path.with_file_name(t),
            None => path.clone(),
        };
        let prepared = check_regular(&file, &file_path)
            .and_then(|()| reserve(&file, len).map_err(sys("reserve", &file_path)))
            .and_then(|()| Ok(agent.register(FileRegion::from_file(file, file_path))?));
        match prepared {
            Ok(file) => Ok(Staged {
                file,
                parent,
                temp,
                name: name.to_owned(),
                len,
            }),
            Err(e) => {
                if let Some(t) = &temp {
                    self.unlink_logged(at, t, &path);
                }
                Err(e)
            }
        }
    }

    /// Creates a temp file for `base` in `at` that did not exist before (`O_EXCL`, so never an
    /// existing file or a link planted under a guessed name).
    /// `O_DIRECT` when asked for and not yet refused by this store's file system.
    fn direct_flag(&self, direct: bool) -> OFlags {
        if direct && !self.no_direct.load(Ordering::Relaxed) {
            OFlags::DIRECT
        } else {
            OFlags::empty()
        }
    }

    fn create_temp(
        &self,
        at: BorrowedFd<'_>,
        base: &str,
        extra: OFlags,
    ) -> rustix::io::Result<(OwnedFd, String)> {
        let mut last = Errno::EXIST;
        for _ in 0..TEMP_ATTEMPTS {
            let temp = self.temp_name(base);
            match rustix::fs::openat(
                at,
                temp.as_str(),
                OFlags::RDWR
                    | OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NOCTTY
                    | extra,
                Mode::from_raw_mode(FILE_MODE),
            ) {
                Ok(fd) => return Ok((fd, temp)),
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// `.tmp-<tag>-<key hash>-<nonce>`: 47 bytes whatever the key, so any key whose name fits
    /// in a directory entry can be staged.
    pub(crate) fn temp_name(&self, base: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut h = Sha256::new();
        h.update(self.nonce_seed.to_le_bytes());
        h.update(n.to_le_bytes());
        h.update(nanos.to_le_bytes());
        let nonce = h.finalize();
        let key = Sha256::digest(base.as_bytes());
        format!(
            "{TEMP_PREFIX}{}-{}-{}",
            self.tag,
            hex(&key[..TEMP_PARTS[1] / 2]),
            hex(&nonce[..TEMP_PARTS[2] / 2])
        )
    }

    /// Publishes a written file under its key: checks it still has the page's size and renames
    /// the temp file over the key's name (replacing a file or a link there, never following
    /// one). On an error the temp file is removed and the key keeps its previous page.
    pub(crate) fn publish(&self, staged: Staged) -> Result<()> {
        let Staged {
            file,
            parent,
            temp,
            name,
            len,
        } = staged;
        let path = self.path(&name);
        let size = file.buffer().file().metadata().map(|m| m.len());
        drop(file.into_inner());
        self.forget(&name);
        let at = self.at(&parent);
        let base = name.rsplit('/').next().unwrap_or(&name);
        let checked = match size {
            Ok(s) if s == len => Ok(()),
            Ok(s) => Err(Error::Io {
                op: "check",
                path: path.clone(),
                source: std::io::Error::other(format!(
                    "page file has {s} bytes after writing {len}"
                )),
            }),
            Err(e) => Err(io("stat", &path)(e)),
        };
        let Some(temp) = temp else {
            return checked;
        };
        let renamed = checked.and_then(|()| {
            rustix::fs::renameat(at, temp.as_str(), at, base).map_err(sys("rename temp to", &path))
        });
        if renamed.is_err() {
            self.unlink_logged(at, &temp, &path);
        }
        renamed
    }

    /// Removes the file of a write that failed: the temp file, or in place the key's (possibly
    /// torn) file.
    pub(crate) fn discard(&self, staged: Staged) {
        let Staged {
            file,
            parent,
            temp,
            name,
            ..
        } = staged;
        drop(file.into_inner());
        self.forget(&name);
        let path = self.path(&name);
        let at = self.at(&parent);
        let base = name.rsplit('/').next().unwrap_or(&name);
        self.unlink_logged(at, temp.as_deref().unwrap_or(base), &path);
    }

    fn unlink_logged(&self, at: BorrowedFd<'_>, file: &str, path: &Path) {
        if let Err(e) = rustix::fs::unlinkat(at, file, AtFlags::empty())
            && e != Errno::NOENT
        {
            tracing::warn!(path = %path.display(), file, error = %e, "could not remove a page's temp file");
        }
    }

    /// Whether `name` is a regular file (a link there is not followed and is no page).
    pub(crate) fn exists(&self, name: &str) -> bool {
        let Ok((parent, base)) = self.parent(name, false) else {
            return false;
        };
        rustix::fs::statat(self.at(&parent), base, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
    }

    /// The registered file for reading `name` if it is a regular file with at least `len`
    /// bytes; `None` is a miss. The file is opened read-only, so a read-only store serves
    /// reads. The caller's `Arc` keeps the file open even if the cache evicts it meanwhile.
    pub(crate) fn open_for_read(
        &self,
        agent: &Agent,
        name: &str,
        len: u64,
    ) -> Result<Option<Arc<Registered<FileRegion>>>> {
        let path = self.path(name);
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let (parent, base) = match self.parent(name, false) {
            Ok(p) => p,
            Err(e) => {
                miss("open directory of", &path, e);
                return Ok(None);
            }
        };
        let at = self.at(&parent);
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get_mut(name) {
                // Still the file at this name? (Another writer may have replaced it.)
                match rustix::fs::statat(at, base, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                            && (st.st_dev, st.st_ino) == c.ino =>
                    {
                        c.last_use = now;
                        let size = u64::try_from(st.st_size).unwrap_or(0);
                        return Ok((size >= len).then(|| Arc::clone(&c.file)));
                    }
                    _ => {
                        cache.remove(name);
                    }
                }
            }
        }
        // Non-blocking so that a FIFO planted at a key cannot stall the open; cleared below.
        let fd = match rustix::fs::openat(
            at,
            base,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                miss("open", &path, e);
                return Ok(None);
            }
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(io("stat", &path))?;
        if !meta.is_file() {
            tracing::warn!(path = %path.display(), "not a regular file: miss");
            return Ok(None);
        }
        if meta.len() < len {
            tracing::debug!(path = %path.display(), have = meta.len(), want = len, "short page file: miss");
            return Ok(None);
        }
        rustix::fs::fcntl_getfl(&file)
            .and_then(|fl| rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK))
            .map_err(sys("set flags of", &path))?;
        let ino = (meta.dev(), meta.ino());
        let file = Arc::new(agent.register(FileRegion::from_file(file, path))?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.max_open && !cache.contains_key(name) {
            let oldest = cache
                .iter()
                .min_by_key(|(_, c)| c.last_use)
                .map(|(p, _)| p.clone());
            if let Some(p) = oldest {
                cache.remove(&p);
            }
        }
        // Replacing an entry drops (deregisters, closes) the stale one.
        cache.insert(
            name.to_owned(),
            Cached {
                file: Arc::clone(&file),
                ino,
                last_use: now,
            },
        );
        Ok(Some(file))
    }

    /// Drops a cached file (after it was replaced or deleted).
    pub(crate) fn forget(&self, name: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Number of open, registered files held for reads.
    pub(crate) fn open_files(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Deletes `name` (a link there is removed, not followed); `false` if it did not exist.
    pub(crate) fn delete(&self, name: &str) -> Result<bool> {
        let path = self.path(name);
        self.forget(name);
        let (parent, base) = match self.parent(name, false) {
            Ok(p) => p,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(false),
            Err(e) => return Err(sys("open directory of", &path)(e)),
        };
        match rustix::fs::unlinkat(self.at(&parent), base, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(sys("remove", &path)(e)),
        }
    }

    /// Whether `rel` (a path relative to the directory) is a page file of this connector:
    /// 64 lowercase hex digits plus its suffix; with [`Naming::Bucketed`], under its bucket
    /// and with or without a part suffix (`_k`, `_v`).
    pub(crate) fn is_our_key(&self, rel: &str) -> bool {
        let name = match self.naming {
            Naming::Flat => rel,
            Naming::Bucketed => match rel.split_once('/') {
                Some((bucket, name)) if bucket == key::bucket_of(name) => name,
                _ => return false,
            },
        };
        let unparted = match self.naming {
            Naming::Flat => name,
            Naming::Bucketed => [PagePart::K, PagePart::V]
                .iter()
                .find_map(|p| name.strip_suffix(p.suffix()))
                .filter(|n| n.ends_with(self.suffix.as_str()))
                .unwrap_or(name),
        };
        let Some(key) = unparted.strip_suffix(self.suffix.as_str()) else {
            return false;
        };
        key.len() == 64 && is_lower_hex(key)
    }

    /// Whether the file name `base` is a temp file of this connector: `.tmp-<tag>-…` with the
    /// tag of its suffix, or an earlier version's `.tmp.<name>.<pid>.<n>` of one of its keys.
    pub(crate) fn is_our_temp(&self, base: &str) -> bool {
        if let Some(rest) = base.strip_prefix(TEMP_PREFIX) {
            let parts: Vec<&str> = rest.split('-').collect();
            return parts.len() == TEMP_PARTS.len()
                && parts
                    .iter()
                    .zip(TEMP_PARTS)
                    .all(|(p, n)| p.len() == n && is_lower_hex(p))
                && parts.first() == Some(&self.tag.as_str());
        }
        let Some(rest) = base.strip_prefix(OLD_TEMP_PREFIX) else {
            return false;
        };
        let mut it = rest.rsplitn(3, '.');
        let (Some(n), Some(pid), Some(name)) = (it.next(), it.next(), it.next()) else {
            return false;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        digits(n) && digits(pid) && self.is_our_key(name)
    }

    /// Deletes every page file and temp file of this connector under the directory; returns
    /// how many. Nothing else is touched, and no link is followed.
    pub(crate) fn clear(&self) -> Result<usize> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut failed = None;
        let walked = self.walk(usize::MAX, usize::MAX, &mut |at, rel, base, _| {
            if !(self.is_our_key(rel) || self.is_our_temp(base)) {
                return false;
            }
            match rustix::fs::unlinkat(at, base, AtFlags::empty()) {
                Ok(()) => true,
                Err(Errno::NOENT) => false,
                Err(e) => {
                    failed.get_or_insert_with(|| sys("remove", &self.path(rel))(e));
                    false
                }
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(walked.removed),
        }
    }

    /// Removes this connector's temp files last modified more than `age` ago (writers that
    /// died), looking at no more than `max_entries` entries and `max_depth` levels.
    pub(crate) fn sweep(&self, age: Duration, max_entries: usize, max_depth: usize) -> Walked {
        let cutoff = SystemTime::now()
            .checked_sub(age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let walked = self.walk(max_entries, max_depth, &mut |at, rel, base, st| {
            if !self.is_our_temp(base) || st.st_mtime >= cutoff {
                return false;
            }
            match rustix::fs::unlinkat(at, base, AtFlags::empty()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(file = rel, error = %e, "could not remove a stale temp file");
                    false
                }
            }
        });
        match walked {
            Ok(w) => {
                if w.removed > 0 {
                    tracing::info!(dir = %self.dir.display(), removed = w.removed, "removed stale temp files of interrupted writes");
                }
                if w.truncated {
                    tracing::warn!(dir = %self.dir.display(), entries = w.entries, "stopped looking for stale temp files at the bound");
                }
                w
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not look for stale temp files");
                Walked::default()
            }
        }
    }

    /// Visits every regular file under the directory (links are neither followed nor visited),
    /// calling `f(directory, relative name, file name, stat)`; `f` says whether it removed the
    /// file. Directories are reopened from the top by name, so only one or two descriptors are
    /// open at a time whatever the tree. A directory that cannot be listed is an error only at
    /// the top.
    fn walk(
        &self,
        max_entries: usize,
        max_depth: usize,
        f: &mut dyn FnMut(BorrowedFd<'_>, &str, &str, &rustix::fs::Stat) -> bool,
    ) -> Result<Walked> {
        let mut out = Walked::default();
        let mut stack = vec![(String::new(), 0usize)];
        while let Some((rel_dir, depth)) = stack.pop() {
            let listed = self.open_dir(&rel_dir, false).and_then(|parent| {
                let dir = rustix::fs::Dir::read_from(self.at(&parent))?;
                Ok((parent, dir))
            });
            let (parent, dir) = match listed {
                Ok(d) => d,
                Err(e) if rel_dir.is_empty() => return Err(sys("list", &self.dir)(e)),
                Err(e) => {
                    tracing::debug!(dir = rel_dir, error = %e, "could not list");
                    continue;
                }
            };
            let at = self.at(&parent);
            for entry in dir {
                let Ok(entry) = entry else { break };
                let Ok(base) = entry.file_name().to_str() else {
                    continue;
                };
                if base == "." || base == ".." {
                    continue;
                }
                if out.entries >= max_entries {
                    out.truncated = true;
                    return Ok(out);
                }
                out.entries += 1;
                let rel = if rel_dir.is_empty() {
                    base.to_owned()
                } else {
                    format!("{rel_dir}/{base}")
                };
                let Ok(st) = rustix::fs::statat(at, base, AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory if depth < max_depth => stack.push((rel, depth + 1)),
                    FileType::Directory => out.truncated = true,
                    FileType::RegularFile if f(at, &rel, base, &st) => out.removed += 1,
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

/// Refuses anything but a regular file (a directory or device under a temp or key name).
fn check_regular(file: &File, path: &Path) -> Result<()> {
    let meta = file.metadata().map_err(io("stat", path))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(Error::Io {
            op: "open",
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        })
    }
}

/// Sizes `file` to `len` bytes and allocates its blocks, so that a full file system fails
/// before the transfer (the POSIX plugin would otherwise meet `ENOSPC` halfway). File systems
/// without `fallocate` are only sized.
fn reserve(file: &File, len: u64) -> rustix::io::Result<()> {
    rustix::fs::ftruncate(file, len)?;
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, len) {
        Err(Errno::OPNOTSUPP | Errno::NOSYS) => Ok(()),
        r => r,
    }
}

/// Logs why a read is a miss: absence quietly, anything else (a refused link, a descriptor
/// limit, permissions) as a warning.
fn miss(op: &str, path: &Path, e: Errno) {
    if matches!(e, Errno::NOENT | Errno::NOTDIR) {
        tracing::trace!(path = %path.display(), op, "no page file: miss");
    } else if e == Errno::LOOP {
        tracing::warn!(path = %path.display(), op, "a symbolic link where a page should be is not followed: miss");
    } else {
        tracing::warn!(path = %path.display(), op, error = %e, "cannot open page file: miss");
    }
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> Error + 'a {
    move |e| io(op, path)(std::io::Error::from(e))
}

/// The first 8 hex digits of SHA-256 of the suffix: marks temp files of connectors with this
/// suffix, so that `clear` and the sweep leave other ranks' and models' temp files alone.
fn suffix_tag(suffix: &str) -> String {
    let d = Sha256::digest(suffix.as_bytes());
    hex(&d[..TEMP_PARTS[0] / 2])
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn store(dir: &Path, suffix: &str) -> FileStore {
        FileStore::new(
            dir.to_path_buf(),
            4,
            WriteMode::Atomic,
            suffix,
            Naming::Flat,
        )
        .unwrap()
    }

    fn tmpdir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let r = RandomState::new().hash_one(n);
        let d =
            std::env::temp_dir().join(format!("hicache-files-{}-{n}-{r:x}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn age(path: &Path, secs: u64) {
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    const KEY: &str = "4636993d3e1da4e9d6b8f87b79e8f7c6d018580d52661950eabc3845c5897a4d";

    #[test]
    fn temp_names_are_short_reserved_and_recognised() {
        let d = tmpdir();
        let s = store(&d, "_m_0_2");
        let long = "k".repeat(255);
        let t = s.temp_name(&long);
        assert_eq!(t.len(), 47, "{t}");
        assert!(t.starts_with(TEMP_PREFIX));
        assert!(key::validate(&t).is_err(), "a temp name is never a key");
        assert!(s.is_our_temp(&t));
        assert_ne!(t, s.temp_name(&long), "fresh each time");
        let other = store(&d, "_m_1_2");
        assert!(
            !other.is_our_temp(&t),
            "another suffix's temp files are not ours"
        );
        assert!(s.is_our_temp(&format!(".tmp.{KEY}_m_0_2.123.4")));
        assert!(!s.is_our_temp(&format!(".tmp.{KEY}_m_1_2.123.4")));
        assert!(!s.is_our_temp(".tmp-notes"));
        assert!(!s.is_our_temp(&format!("{}x", &t)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn opening_removes_only_our_stale_temp_files_within_bounds() {
        let d = tmpdir();
        let s = store(&d, "");
        let stale = s.temp_name(KEY);
        let fresh = s.temp_name(KEY);
        let old_style = format!(".tmp.{KEY}.4242.7");
        let foreign = store(&d, "_x").temp_name(KEY);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let nested = format!("sub/{}", s.temp_name(KEY));
        for (name, secs) in [
            (stale.as_str(), 3600),
            (fresh.as_str(), 0),
            (old_style.as_str(), 3600),
            (foreign.as_str(), 3600),
            (KEY, 3600),
            (".tmp-notes", 3600),
            (nested.as_str(), 3600),
        ] {
            std::fs::write(d.join(name), b"x").unwrap();
            age(&d.join(name), secs);
        }
        drop(store(&d, ""));
        for (name, kept) in [
            (stale.as_str(), false),
            (old_style.as_str(), false),
            (nested.as_str(), false),
            (fresh.as_str(), true),
            (foreign.as_str(), true),
            (KEY, true),
            (".tmp-notes", true),
        ] {
            assert_eq!(d.join(name).exists(), kept, "{name}");
        }
        // Bounded: a sweep that may look at one entry removes at most one file and says so.
        let s = store(&d, "");
        for _ in 0..3 {
            let t = s.temp_name(KEY);
            std::fs::write(d.join(&t), b"x").unwrap();
            age(&d.join(&t), 3600);
        }
        let w = s.sweep(STALE_TEMP_AGE, 1, 8);
        assert!(w.truncated && w.entries == 1 && w.removed <= 1, "{w:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_are_never_followed() {
        let d = tmpdir();
        let outside = tmpdir().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"victim").unwrap();
        std::fs::write(outside.join(KEY), b"victim").unwrap();
        let s = store(&d, "");
        std::os::unix::fs::symlink(outside.join("victim"), d.join(KEY)).unwrap();
        std::os::unix::fs::symlink(&outside, d.join("sub")).unwrap();
        assert!(!s.exists(KEY), "a link is no page");
        assert!(
            !s.exists(&format!("sub/{KEY}")),
            "nor a key under a linked directory"
        );
        assert!(s.delete(KEY).unwrap(), "delete removes the link");
        assert!(outside.join("victim").is_file());
        assert!(!s.delete(&format!("sub/{KEY}")).unwrap());
        assert!(outside.join(KEY).is_file());
        // clear walks no linked directory.
        let s = store(&d, "");
        assert_eq!(s.clear().unwrap(), 0);
        assert!(outside.join(KEY).is_file());
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(outside.parent().unwrap()).unwrap();
    }
}
