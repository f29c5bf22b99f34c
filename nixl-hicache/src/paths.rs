//! Files at caller-given paths: SGLang's `NixlFileManager.create_file` and
//! `files_to_nixl_tuples` ([`create_file`], [`open_files`]) and
//! [`HiCache::register_files`](crate::HiCache::register_files).
//!
//! Unlike the key-based page store (`files.rs`), these take whole paths from the caller, who
//! chose the directory: the directories of a path are resolved by the OS as given, links among
//! them included (a caller who wants no link there must not pass one). The final component is
//! never followed: the path's directory is opened and the file is opened (or created) under it
//! with `O_NOFOLLOW`, so a link planted at the path itself, dangling or not, is an error for that
//! file and nothing behind it is read, written or created. A path ending in `/` or `/.` names its
//! last named component (the kernel would follow a link there, this module does not); a path
//! whose last component is `..`, or that is only `/`, is refused.
//!
//! Reads open `O_RDONLY`, so a read-only file or file system serves them; only writes open
//! `O_RDWR`, and only a regular file of this process's effective user with a single link. Every
//! open is non-blocking until the file is checked to be a regular file, so a FIFO planted at a
//! path fails the open instead of stalling it.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nixl_core::FileRegion;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::files::FILE_MODE;

/// How [`open_files`] and [`HiCache::register_files`](crate::HiCache::register_files) open
/// caller-given files: pick the direction of the transfers the files are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileAccess {
    /// Read-only (`O_RDONLY`), for transfers that read the files: any regular file, also on a
    /// read-only file system or without write permission.
    Read,
    /// Read-write (`O_RDWR`, as SGLang opens every file), for transfers that write the files:
    /// only a regular file owned by this process's effective user with a single link, so that
    /// a file planted by another user (who could read back or change what is written) or a
    /// hard link to a file elsewhere is never written.
    Write,
}

/// SGLang's `NixlFileManager.create_file`: creates the parent directories and an empty file
/// unless one exists (no truncation). A path without a directory part (`""`, `"name.bin"`) is
/// an error, as in SGLang.
///
/// The file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` under its directory, at its final
/// name: `O_EXCL` makes a fresh inode or fails, never opening an existing entry, so a link
/// planted at the path (even a dangling one) is never written through and nothing is created
/// behind it. No temp file and rename are needed: the new file is empty, so there is no partial
/// state to hide, and renaming over the name would replace an existing file, which SGLang's
/// semantics keep (SGLang registers the file under this name and NIXL then writes into it).
///
/// When the name exists, the entry is examined without following it: a regular file that
/// [`FileAccess::Write`] would accept (owned by this user, one link) is left as it is, contents
/// included, as in SGLang; a link, a non-regular file, another user's file or a file with
/// other hard links is an [`Error::Io`] for this path (a planted inode is never reused), and is
/// left untouched. Directories of the path are created and followed as given (see the module
/// docs).
pub fn create_file(path: &Path) -> Result<()> {
    const OP: &str = "create";
    let (dir, name) = split(path, OP)?;
    if dir.as_os_str().is_empty() {
        return Err(refused(OP, path, "no directory part"));
    }
    std::fs::create_dir_all(dir).map_err(crate::error::io("create directory", dir))?;
    let parent = open_dir(dir)?;
    let at = at(&parent);
    match rustix::fs::openat(
        at,
        name,
        OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY
            | OFlags::NONBLOCK,
        Mode::from_raw_mode(FILE_MODE),
    ) {
        Ok(fd) => {
            drop(fd);
            tracing::trace!(path = %path.display(), "created an empty file");
            Ok(())
        }
        Err(Errno::EXIST) => {
            let st = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(sys("stat", path))?;
            check(&st, FileAccess::Write, OP, path)
        }
        Err(e) => Err(sys(OP, path)(e)),
    }
}

/// SGLang's `files_to_nixl_tuples`: opens every path for `access`; all or nothing, as SGLang.
/// Each [`FileRegion`] is the tuple `(0, 0, fd, path)` ([`FileRegion::fd`],
/// [`FileRegion::path`]) and closes its file on drop.
///
/// The final component of a path is never followed (see the module docs and [`FileAccess`]):
/// a link there, a non-regular file, or for [`FileAccess::Write`] another user's file or one
/// with other hard links, is an [`Error::Io`] naming that path. The files opened before it are
/// closed again; nothing is created, truncated or written at any path of the batch.
pub fn open_files(paths: &[&Path], access: FileAccess) -> Result<Vec<FileRegion>> {
    paths.iter().map(|p| open_file(p, access)).collect()
}

/// Opens one caller-given file for `access` without following its final component.
fn open_file(path: &Path, access: FileAccess) -> Result<FileRegion> {
    const OP: &str = "open";
    let (dir, name) = split(path, OP)?;
    let parent = open_dir(dir)?;
    let rw = match access {
        FileAccess::Read => OFlags::RDONLY,
        FileAccess::Write => OFlags::RDWR,
    };
    let fd = rustix::fs::openat(
        at(&parent),
        name,
        rw | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| {
        if e == Errno::LOOP {
            // `name` is one component under an opened directory: the link is the file itself.
            refused(OP, path, LINK)
        } else {
            sys(OP, path)(e)
        }
    })?;
    let st = rustix::fs::fstat(&fd).map_err(sys("stat", path))?;
    check(&st, access, OP, path)?;
    rustix::fs::fcntl_getfl(&fd)
        .and_then(|fl| rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK))
        .map_err(sys("set flags of", path))?;
    Ok(FileRegion::from_file(File::from(fd), path.to_path_buf()))
}

const LINK: &str = "a symbolic link at the path itself is not followed";

/// Whether the entry `st` may be opened for `access`: an error for `path` otherwise.
fn check(st: &Stat, access: FileAccess, op: &'static str, path: &Path) -> Result<()> {
    let ty = FileType::from_raw_mode(st.st_mode);
    let why = if ty == FileType::Symlink {
        Some(LINK)
    } else if ty != FileType::RegularFile {
        Some("not a regular file")
    } else if access == FileAccess::Write && st.st_uid != rustix::process::geteuid().as_raw() {
        Some("owned by another user, not written")
    } else if access == FileAccess::Write && st.st_nlink != 1 {
        Some("has other hard links, not written")
    } else {
        None
    };
    why.map_or(Ok(()), |why| Err(refused(op, path, why)))
}

/// The directory part (empty for a bare name) and the final component of `path`.
fn split<'p>(path: &'p Path, op: &'static str) -> Result<(&'p Path, &'p std::ffi::OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| refused(op, path, "no file name"))?;
    Ok((path.parent().unwrap_or_else(|| Path::new("")), name))
}

/// Opens `dir` (following links: the caller chose it); `None` is the working directory.
fn open_dir(dir: &Path) -> Result<Option<OwnedFd>> {
    if dir.as_os_str().is_empty() {
        return Ok(None);
    }
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map(Some)
    .map_err(sys("open directory", dir))
}

fn at(parent: &Option<OwnedFd>) -> BorrowedFd<'_> {
    parent.as_ref().map_or(rustix::fs::CWD, AsFd::as_fd)
}

fn refused(op: &'static str, path: &Path, why: &'static str) -> Error {
    tracing::warn!(path = %path.display(), op, why, "refused a caller-given file");
    Error::Io {
        op,
        path: path.to_path_buf(),
        source: std::io::Error::other(why),
    }
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> Error + 'a {
    move |e| crate::error::io(op, path)(std::io::Error::from(e))
}
