//! Stores a KV page under its SGLang HiCache key in a temporary directory over NIXL's POSIX
//! backend, checks that it exists, reads it back and compares.
//!
//! ```text
//! cargo run -p nixl-hicache --example pages
//! ```
//!
//! Needs the NIXL runtime (see nixl-core's docs: `NIXL_RUNTIME_DIR`, or `cargo xtask runtime` in
//! this repository).
#![allow(clippy::print_stdout, reason = "example program")]

use nixl_core::HostBuffer;
use nixl_hicache::{HiCache, HiCacheConfig, Plugin, RawTarget, page_key};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("nixl-hicache-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir);
    std::fs::remove_dir_all(&dir)?;
    result
}

fn run(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let cache = HiCache::new(HiCacheConfig::new(
        Some(dir.to_path_buf()),
        Plugin::parse("POSIX"),
    ))?;

    // The key of the first page of a prompt: SHA-256 over its token ids (no prior page).
    let tokens: Vec<u32> = (0..64).collect();
    let key = page_key(&tokens, None);
    const LEN: usize = 64 * 1024;

    // Pages in registered memory move zero-copy (an unregistered slice, as `set`/`get` take,
    // would be staged through a buffer the connector registers).
    let mut page = cache.register_buffer(HostBuffer::new(LEN)?)?;
    for (i, byte) in page.buffer_mut().as_mut_slice().iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    let at = |addr| RawTarget {
        addr,
        len: LEN as u64,
    };
    cache.set_raw(&key, at(page.region().addr))?;
    println!("stored {LEN} bytes under {key}");
    assert!(cache.exists(&key)?);

    let back = cache.register_buffer(HostBuffer::new(LEN)?)?;
    if !cache.get_raw(&key, at(back.region().addr))? {
        return Err(format!("{key} was not found after set").into());
    }
    if back.buffer().as_slice() != page.buffer().as_slice() {
        return Err("the page read back differs".into());
    }
    println!("read it back from {}: every byte matches", dir.display());
    Ok(())
}
