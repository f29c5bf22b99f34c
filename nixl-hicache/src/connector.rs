//! The connector: SGLang's `HiCacheNixl` operations over a NIXL storage backend.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nixl_core::{
    Agent, AgentConfig, Backend, BackendKind, FileRegion, HostBuffer, MemType, NixlBuffer,
    ObjectRegion, Op, Registered, XferDescs, XferOp,
};

use crate::config::{HiCacheConfig, Plugin, select};
use crate::error::{Error, Result};
use crate::files::{DIRECT_ALIGN, FileStore};
use crate::key::{self, Naming, PagePart};
use crate::object::{ObjectStore, TOMBSTONE};
use crate::paths::FileAccess;

/// How long one batch may take before it is reported as failed.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// A host range inside memory registered with this connector's agent (with
/// [`HiCache::register_buffer`], or with [`nixl_core::Agent::register_raw`] on [`HiCache::agent`]),
/// for SGLang's address mode. A range outside registered memory is refused by NIXL and reported
/// as [`Error::Unregistered`]; nothing is read or written then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTarget {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

enum Store {
    Files(FileStore),
    Objects(ObjectStore),
}

/// One page object to move: its storage name and the host ranges it is made of, in file order
/// (one range, except for layouts that scatter a page over layers).
pub(crate) struct Item {
    pub(crate) name: String,
    pub(crate) segs: Vec<RawTarget>,
}

impl Item {
    fn one(name: String, addr: u64, len: u64) -> Self {
        Self {
            name,
            segs: vec![RawTarget { addr, len }],
        }
    }

    /// The object's length: its ranges together.
    pub(crate) fn len(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }

    /// Pushes the object's ranges as descriptors: host ranges into `local`, and into `remote`
    /// the same lengths at consecutive offsets of `dev` (a file descriptor or object id).
    fn push(&self, local: &mut XferDescs, remote: &mut XferDescs, dev: u64) {
        let mut off = 0;
        for s in self.segs.iter().filter(|s| s.len > 0) {
            local.push(s.addr, s.len, 0);
            remote.push(off, s.len, dev);
            off += s.len;
        }
    }
}

/// HiCache storage over NIXL: pages keyed by SGLang's hash chain, stored in files
/// (`<dir>/<key><suffix>`, raw bytes, the same files SGLang reads and writes) or S3 objects.
///
/// `Send + Sync`: share one per process (or per TP rank) between threads.
///
/// Differences from SGLang's HiCacheNixl, each deliberate:
/// - results are `Result`s instead of `bool`/`None`;
/// - [`HiCache::batch_get`] answers per key; [`HiCache::batch_get_all`] keeps SGLang's
///   all-or-nothing answer for callers that rely on it;
/// - a write becomes visible only once complete (a fresh temp file renamed over the key), and a
///   failed or interrupted write leaves the key's previous page in place;
/// - no symbolic link is followed under the directory, and reads open files read-only;
/// - open files and registrations are bounded ([`HiCacheConfig::max_open`]) and released on
///   drop; caller buffers that were not registered are registered only for the call;
/// - keys are validated (no absolute paths, `..`, empty components; at most
///   [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes with the suffix, each component at most
///   [`MAX_KEY_COMPONENT_LEN`](crate::MAX_KEY_COMPONENT_LEN));
/// - [`HiCache::delete`] and [`HiCache::clear`] touch only this connector's keys.
pub struct HiCache {
    agent: Agent,
    backend: Backend,
    store: Store,
    suffix: String,
    naming: Naming,
    direct_io: bool,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl HiCache {
    /// Creates the connector: an agent without UCX, the selected storage backend and, for file
    /// plugins, the directory.
    pub fn new(config: HiCacheConfig) -> Result<Self> {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let agent = Agent::new(
            &format!("hicache_nixl_{}_{n}", std::process::id()),
            &AgentConfig::default(),
        )?;
        let kind = select(&config.plugin, &agent.plugins()?).map_err(Error::Backend)?;
        let mut params = config.params.clone();
        if kind == BackendKind::Obj && params.value("bucket").is_none() {
            match std::env::var("AWS_DEFAULT_BUCKET") {
                Ok(b) if !b.is_empty() => params.set("bucket", b),
                _ => {
                    return Err(Error::Backend(
                        "OBJ needs a bucket (param `bucket` or AWS_DEFAULT_BUCKET)".into(),
                    ));
                }
            }
        }
        let backend = agent.create_backend(kind.clone(), &params)?;
        let suffix = config
            .suffix
            .as_ref()
            .map(key::KeySuffix::render)
            .unwrap_or_default();
        key::validate(&format!("x{suffix}")).map_err(|reason| Error::InvalidKey {
            key: suffix.clone(),
            reason,
        })?;
        let store = if kind == BackendKind::Obj && matches!(config.plugin, Plugin::Named(_)) {
            Store::Objects(ObjectStore::default())
        } else if kind == BackendKind::Obj {
            // `auto` fell through to OBJ: SGLang still creates the directory.
            std::fs::create_dir_all(&config.dir)
                .map_err(crate::error::io("create directory", &config.dir))?;
            Store::Objects(ObjectStore::default())
        } else {
            Store::Files(FileStore::new(
                config.dir.clone(),
                config.max_open,
                config.write_mode,
                &suffix,
                config.naming,
            )?)
        };
        tracing::debug!(backend = %kind, "hicache connector ready");
        Ok(Self {
            agent,
            backend,
            store,
            suffix,
            naming: config.naming,
            direct_io: config.direct_io,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> &BackendKind {
        self.backend.kind()
    }

    /// The connector's agent (to register memory for raw targets).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The storage directory, for file backends.
    pub fn dir(&self) -> Option<&Path> {
        match &self.store {
            Store::Files(f) => Some(f.dir()),
            Store::Objects(_) => None,
        }
    }

    /// The storage name of `key`: the key plus the configured suffix, validated (under its
    /// bucket directory with [`Naming::Bucketed`]).
    pub fn storage_name(&self, key: &str) -> Result<String> {
        self.part_name(key, PagePart::Whole)
    }

    /// The storage name of one part of `key`'s page: the key, the configured suffix and the
    /// part's, validated, under its bucket directory with [`Naming::Bucketed`].
    pub fn part_name(&self, key: &str, part: PagePart) -> Result<String> {
        let name = format!("{key}{}{}", self.suffix, part.suffix());
        key::validate(&name).map_err(|reason| Error::InvalidKey {
            key: key.to_owned(),
            reason,
        })?;
        Ok(match self.naming {
            Naming::Flat => name,
            Naming::Bucketed => format!("{}/{name}", key::bucket_of(&name)),
        })
    }

    /// The file of `key`, for file backends.
    pub fn path_of(&self, key: &str) -> Result<Option<PathBuf>> {
        let name = self.storage_name(key)?;
        Ok(match &self.store {
            Store::Files(f) => Some(f.path(&name)),
            Store::Objects(_) => None,
        })
    }

    /// Registers a buffer for zero-copy `get`/`set` (SGLang's `register_buffers`).
    pub fn register_buffer<B: NixlBuffer>(&self, buffer: B) -> Result<Registered<B>> {
        Ok(self.agent.register(buffer)?)
    }

    /// Opens existing files for `access` and registers them (SGLang's `register_files`); all
    /// or nothing. The files are opened as [`open_files`](crate::open_files) opens them: the
    /// final component of a path is never followed, reads open read-only, and only
    /// [`FileAccess::Write`] opens for writing (only this user's singly linked regular files).
    pub fn register_files(
        &self,
        paths: &[&Path],
        access: FileAccess,
    ) -> Result<Vec<Registered<FileRegion>>> {
        crate::paths::open_files(paths, access)?
            .into_iter()
            .map(|f| Ok(self.agent.register(f)?))
            .collect()
    }

    /// Registers the objects of `keys` (SGLang's `register_objects`).
    pub fn register_objects(&self, keys: &[&str]) -> Result<Vec<Registered<ObjectRegion>>> {
        keys.iter()
            .map(|k| {
                let name = self.storage_name(k)?;
                Ok(self
                    .agent
                    .register(ObjectRegion::new(ObjectStore::page_id(&name)))?)
            })
            .collect()
    }

    /// Stores `value` under `key`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.batch_set(&[(key, value)])
    }

    /// Stores every `(key, value)`. Each key holds either its previous page or its new one,
    /// complete, whatever fails (file backends, atomic mode): an error before or during the
    /// transfer publishes none of the batch's keys; an error renaming one key's file into place
    /// still publishes the others, and the first error is returned.
    pub fn batch_set(&self, items: &[(&str, &[u8])]) -> Result<()> {
        let list = items
            .iter()
            .map(|(k, v)| {
                Ok(Item::one(
                    self.storage_name(k)?,
                    v.as_ptr() as u64,
                    v.len() as u64,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Store::Files(f) = &self.store {
            // Staged files are kept for the retry from a registered copy.
            return self.write_files(f, &list, Some(items));
        }
        match self.write(&list) {
            Err(e) if is_unregistered(&e) => {
                let (_staging, addrs) = self.registered_copy(items)?;
                let staged: Vec<Item> = list
                    .into_iter()
                    .zip(addrs)
                    .map(|(item, addr)| {
                        let len = item.len();
                        Item::one(item.name, addr, len)
                    })
                    .collect();
                self.write(&staged)
            }
            other => other,
        }
    }

    /// The values copied into one registered buffer (for values outside registered memory),
    /// and the address of each copy.
    fn registered_copy(
        &self,
        items: &[(&str, &[u8])],
    ) -> Result<(Registered<HostBuffer>, Vec<u64>)> {
        let total: usize = items.iter().map(|(_, v)| v.len()).sum();
        let mut staging = self.agent.register(HostBuffer::new(total)?)?;
        let base = staging.region().addr;
        let mut addrs = Vec::with_capacity(items.len());
        let mut off = 0usize;
        for (_, v) in items {
            staging.buffer_mut().as_mut_slice()[off..off + v.len()].copy_from_slice(v);
            addrs.push(base + off as u64);
            off += v.len();
        }
        Ok((staging, addrs))
    }

    /// Stores the bytes at a registered host range under `key` (SGLang's address mode).
    pub fn set_raw(&self, key: &str, src: RawTarget) -> Result<()> {
        self.batch_set_raw(&[(key, src)])
    }

    /// Stores registered host ranges under their keys.
    pub fn batch_set_raw(&self, items: &[(&str, RawTarget)]) -> Result<()> {
        let list = self.raw_items(items)?;
        self.write(&list).map_err(|e| raw_error(e, items))
    }

    /// Reads `key` into `dst`; `false` is a miss (no such key, or a stored page shorter than
    /// `dst`). `dst` need not be registered.
    pub fn get(&self, key: &str, dst: &mut [u8]) -> Result<bool> {
        let mut one = [(key, dst)];
        Ok(self.batch_get(&mut one)?[0])
    }

    /// Reads every key into its buffer; per-key hit (`true`) or miss (`false`). A transfer error
    /// is an `Err`; a missing key only makes its own entry `false`.
    pub fn batch_get(&self, items: &mut [(&str, &mut [u8])]) -> Result<Vec<bool>> {
        let list = items
            .iter()
            .map(|(k, d)| {
                Ok(Item::one(
                    self.storage_name(k)?,
                    d.as_ptr() as u64,
                    d.len() as u64,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        match self.read(&list) {
            Err(e) if is_unregistered(&e) => {
                // Register the caller's buffers for this call only.
                let guards = items
                    .iter_mut()
                    .map(|(_, d)| self.agent.register_slice_mut(d))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let res = self.read(&list);
                drop(guards);
                res
            }
            other => other,
        }
    }

    /// SGLang's all-or-nothing form: `true` only if every key was read.
    pub fn batch_get_all(&self, items: &mut [(&str, &mut [u8])]) -> Result<bool> {
        Ok(self.batch_get(items)?.iter().all(|&hit| hit))
    }

    /// Reads `key` into a registered host range; `false` is a miss.
    pub fn get_raw(&self, key: &str, dst: RawTarget) -> Result<bool> {
        Ok(self.batch_get_raw(&[(key, dst)])?[0])
    }

    /// Reads keys into registered host ranges; per-key hit or miss.
    pub fn batch_get_raw(&self, items: &[(&str, RawTarget)]) -> Result<Vec<bool>> {
        let list = self.raw_items(items)?;
        self.read(&list).map_err(|e| raw_error(e, items))
    }

    /// Whether `key` is stored (complete: writes publish atomically). For files: a regular file
    /// (a symbolic link at the key is not followed and is no page).
    pub fn exists(&self, key: &str) -> Result<bool> {
        self.part_exists(key, PagePart::Whole)
    }

    /// Whether one part of `key`'s page is stored (see [`HiCache::exists`]).
    pub fn part_exists(&self, key: &str, part: PagePart) -> Result<bool> {
        let name = self.part_name(key, part)?;
        match &self.store {
            Store::Files(f) => Ok(f.exists(&name)),
            Store::Objects(_) => self.object_key_matches(&name),
        }
    }

    /// The number of leading keys that exist (SGLang 0.5.1.post3's `batch_exists`).
    pub fn batch_exists(&self, keys: &[&str]) -> Result<usize> {
        let mut n = 0;
        for k in keys {
            if !self.exists(k)? {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Deletes `key`; `false` if it was not stored.
    pub fn delete(&self, key: &str) -> Result<bool> {
        let name = self.storage_name(key)?;
        match &self.store {
            Store::Files(f) => f.delete(&name),
            Store::Objects(o) => {
                let existed = self.object_key_matches(&name)?;
                if existed {
                    self.overwrite_key_object(&name)?;
                }
                o.forget(&name);
                Ok(existed)
            }
        }
    }

    /// Deletes every key of this connector (64-hex keys with this connector's suffix for file
    /// backends, including temp files of interrupted writes; the keys this instance wrote for
    /// OBJ). Other files in the directory are never touched, and no link is followed. Returns
    /// how many were removed.
    pub fn clear(&self) -> Result<usize> {
        match &self.store {
            Store::Files(f) => f.clear(),
            Store::Objects(o) => {
                let mut n = 0;
                for name in o.written() {
                    if self.object_key_matches(&name)? {
                        self.overwrite_key_object(&name)?;
                        n += 1;
                    }
                    o.forget(&name);
                }
                Ok(n)
            }
        }
    }

    /// Files (or nothing, for OBJ) held open and registered for reads; bounded by
    /// [`HiCacheConfig::max_open`].
    pub fn open_files(&self) -> usize {
        match &self.store {
            Store::Files(f) => f.open_files(),
            Store::Objects(_) => 0,
        }
    }

    fn raw_items(&self, items: &[(&str, RawTarget)]) -> Result<Vec<Item>> {
        items
            .iter()
            .map(|(k, t)| Ok(Item::one(self.storage_name(k)?, t.addr, t.len)))
            .collect()
    }

    pub(crate) fn write(&self, items: &[Item]) -> Result<()> {
        match &self.store {
            Store::Files(f) => self.write_files(f, items, None),
            Store::Objects(o) => self.write_objects(o, items),
        }
    }

    pub(crate) fn read(&self, items: &[Item]) -> Result<Vec<bool>> {
        match &self.store {
            Store::Files(f) => self.read_files(f, items),
            Store::Objects(_) => self.read_objects(items),
        }
    }

    /// Writes pages into fresh files and publishes them. `values`: the same pages as slices,
    /// copied into registered memory and sent again if NIXL refuses `items`' addresses as
    /// unregistered (the staged files are reused, not created twice).
    fn write_files(
        &self,
        f: &FileStore,
        items: &[Item],
        values: Option<&[(&str, &[u8])]>,
    ) -> Result<()> {
        let mut staged = Vec::with_capacity(items.len());
        for it in items {
            let direct = self.direct_io
                && it
                    .segs
                    .iter()
                    .all(|s| s.addr % DIRECT_ALIGN == 0 && s.len % DIRECT_ALIGN == 0);
            match f.stage(&self.agent, &it.name, it.len(), direct) {
                Ok(s) => staged.push(s),
                Err(e) => {
                    staged.into_iter().for_each(|s| f.discard(s));
                    return Err(e);
                }
            }
        }
        let mut local = XferDescs::with_capacity(MemType::Dram, items.len());
        let mut remote = XferDescs::with_capacity(MemType::File, items.len());
        for (it, s) in items.iter().zip(&staged) {
            it.push(&mut local, &mut remote, s.file.buffer().fd());
        }
        let sent = match (self.run(XferOp::Write, &local, &remote), values) {
            (Err(e), Some(values)) if is_unregistered(&e) => {
                self.registered_copy(values).and_then(|(staging, addrs)| {
                    let mut local = XferDescs::with_capacity(MemType::Dram, items.len());
                    for (it, addr) in items.iter().zip(addrs) {
                        if it.len() > 0 {
                            local.push(addr, it.len(), 0);
                        }
                    }
                    let sent = self.run(XferOp::Write, &local, &remote);
                    drop(staging);
                    sent
                })
            }
            (sent, _) => sent,
        };
        if let Err(e) = sent {
            staged.into_iter().for_each(|s| f.discard(s));
            return Err(e);
        }
        // Every key is published or keeps its previous page; one failed rename does not stop
        // the others (their temp files would otherwise be lost with their pages).
        let mut first = None;
        for s in staged {
            if let Err(e) = f.publish(s) {
                tracing::warn!(error = %e, "could not publish a page");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn read_files(&self, f: &FileStore, items: &[Item]) -> Result<Vec<bool>> {
        let mut hits = vec![false; items.len()];
        let mut held = Vec::with_capacity(items.len());
        let mut local = XferDescs::with_capacity(MemType::Dram, items.len());
        let mut remote = XferDescs::with_capacity(MemType::File, items.len());
        for (hit, it) in hits.iter_mut().zip(items) {
            if it.len() == 0 {
                *hit = f.exists(&it.name);
                continue;
            }
            if let Some(file) = f.open_for_read(&self.agent, &it.name, it.len())? {
                it.push(&mut local, &mut remote, file.buffer().fd());
                held.push(file);
                *hit = true;
            }
        }
        self.run(XferOp::Read, &local, &remote)?;
        drop(held);
        Ok(hits)
    }

    fn write_objects(&self, o: &ObjectStore, items: &[Item]) -> Result<()> {
        let names_len: usize = items.iter().map(|it| it.name.len()).sum();
        let mut names = self.agent.register(HostBuffer::new(names_len)?)?;
        let mut regs = Vec::with_capacity(items.len() * 2);
        let mut local = XferDescs::with_capacity(MemType::Dram, items.len() * 2);
        let mut remote = XferDescs::with_capacity(MemType::Object, items.len() * 2);
        let mut off = 0usize;
        for it in items {
            let (page, key) = (
                ObjectStore::page_id(&it.name),
                ObjectStore::key_id(&it.name),
            );
            regs.push(self.agent.register(ObjectRegion::new(page))?);
            regs.push(self.agent.register(ObjectRegion::new(key))?);
            names.buffer_mut().as_mut_slice()[off..off + it.name.len()]
                .copy_from_slice(it.name.as_bytes());
            it.push(&mut local, &mut remote, page);
            local.push(names.region().addr + off as u64, it.name.len() as u64, 0);
            remote.push(0, it.name.len() as u64, key);
            off += it.name.len();
        }
        self.run(XferOp::Write, &local, &remote)?;
        items.iter().for_each(|it| o.remember(&it.name));
        drop(regs);
        Ok(())
    }

    fn read_objects(&self, items: &[Item]) -> Result<Vec<bool>> {
        let mut hits = vec![false; items.len()];
        for (hit, it) in hits.iter_mut().zip(items) {
            // One object at a time: a missing or short object fails only its own request. An
            // unregistered destination is the caller's problem, not a miss.
            *hit = match self.read_object(it) {
                Ok(hit) => hit,
                Err(e) if is_unregistered(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(key = %it.name, error = %e, "object read failed: miss");
                    false
                }
            };
        }
        Ok(hits)
    }

    fn read_object(&self, it: &Item) -> Result<bool> {
        if !self.object_key_matches(&it.name)? {
            return Ok(false);
        }
        if it.len() == 0 {
            return Ok(true);
        }
        let page = ObjectStore::page_id(&it.name);
        let reg = self.agent.register(ObjectRegion::new(page))?;
        let mut local = XferDescs::new(MemType::Dram);
        let mut remote = XferDescs::new(MemType::Object);
        it.push(&mut local, &mut remote, page);
        self.run(XferOp::Read, &local, &remote)?;
        drop(reg);
        // The key object is checked again after the page arrived, so a concurrent delete or
        // overwrite by another key (an id collision) is a miss.
        self.object_key_matches(&it.name)
    }

    /// Whether the key object of `name` exists and holds `name`.
    fn object_key_matches(&self, name: &str) -> Result<bool> {
        let key = ObjectStore::key_id(name);
        let exists =
            self.agent
                .query_storage(&self.backend, MemType::Object, &[&key.to_string()])?;
        if !exists.first().copied().unwrap_or(false) {
            return Ok(false);
        }
        let reg = self.agent.register(ObjectRegion::new(key))?;
        let buf = self.agent.register(HostBuffer::new(name.len())?)?;
        let mut local = XferDescs::new(MemType::Dram);
        local.push(buf.region().addr, name.len() as u64, 0);
        let mut remote = XferDescs::new(MemType::Object);
        remote.push(0, name.len() as u64, key);
        let ok = self.run(XferOp::Read, &local, &remote).is_ok()
            && buf.buffer().as_slice() == name.as_bytes();
        drop(reg);
        Ok(ok)
    }

    /// Makes `name` a miss by overwriting its key object with a one-byte tombstone.
    fn overwrite_key_object(&self, name: &str) -> Result<()> {
        let key = ObjectStore::key_id(name);
        let reg = self.agent.register(ObjectRegion::new(key))?;
        let mut buf = self.agent.register(HostBuffer::new(1)?)?;
        buf.buffer_mut().as_mut_slice()[0] = TOMBSTONE;
        let mut local = XferDescs::new(MemType::Dram);
        local.push(buf.region().addr, 1, 0);
        let mut remote = XferDescs::new(MemType::Object);
        remote.push(0, 1, key);
        self.run(XferOp::Write, &local, &remote)?;
        drop(reg);
        Ok(())
    }

    fn run(&self, op: XferOp, local: &XferDescs, remote: &XferDescs) -> Result<()> {
        if local.is_empty() {
            return Ok(());
        }
        let req = self
            .agent
            .create_request(op, local, remote, self.agent.name(), None)?;
        if req.post()? == nixl_core::XferStatus::Done {
            return Ok(());
        }
        req.wait(TRANSFER_TIMEOUT, std::thread::yield_now)?;
        Ok(())
    }
}

impl std::fmt::Debug for HiCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HiCache")
            .field("agent", &self.agent.name())
            .field("backend", self.backend.kind())
            .field("dir", &self.dir())
            .field("suffix", &self.suffix)
            .finish()
    }
}

/// Whether NIXL refused to build the request, as it does for unregistered host memory.
pub(crate) fn is_unregistered(e: &Error) -> bool {
    matches!(
        e,
        Error::Core(nixl_core::Error::Nixl {
            op: Op::CreateRequest,
            ..
        })
    )
}

fn raw_error(e: Error, items: &[(&str, RawTarget)]) -> Error {
    if is_unregistered(&e) {
        let (addr, len) = items.first().map_or((0, 0), |(_, t)| (t.addr, t.len));
        Error::Unregistered { addr, len }
    } else {
        e
    }
}
