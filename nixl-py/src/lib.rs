//! `nixl_rs._native`: the Python extension module behind the `nixl-rs` wheel.
//!
//! It exposes nixl-rs's engine (nixl-kv's manager, sender, receiver and bootstrap server, and
//! nixl-hicache's connector) as small native classes; the Python package `nixl_rs` wraps them in
//! classes with exactly SGLang 0.5.1.post3's names, constructors and methods
//! (`nixl_rs.sglang`). Nothing here links torch or numpy: memory arrives as addresses and lengths
//! that the Python side read with `data_ptr()`/`nbytes`/`__array_interface__`.
//!
//! Rules at this boundary: no panic on anything Python passes (errors become Python
//! exceptions), the GIL is released during IO and waits, and `unsafe` exists only in `ffi`,
//! where addresses from Python become NIXL registrations.
#![deny(unsafe_code)]

#[allow(
    unsafe_code,
    reason = "the FFI boundary: addresses from Python become registrations"
)]
mod ffi;
mod hicache;
mod kv;
mod logging;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The engine's version (the crate's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Loads the NIXL runtime: from `lib_dir` (a directory holding `libnixl_capi.so`, such as a
/// pip-installed `nixl-cu12` wheel's `.nixl_cu12.mesonpy.libs`) when given, else by nixl-core's
/// search. Returns the library loaded (or `None` when the dynamic loader found it by name).
#[pyfunction]
#[pyo3(signature = (lib_dir=None))]
fn load_runtime(py: Python<'_>, lib_dir: Option<String>) -> PyResult<Option<String>> {
    let res = py.detach(|| match &lib_dir {
        Some(dir) => nixl_core::runtime::load_from(std::path::Path::new(dir)),
        None => nixl_core::runtime::ensure_loaded(),
    });
    match res {
        Ok(info) => Ok(info.library.map(|p| p.display().to_string())),
        Err(e) => Err(PyRuntimeError::new_err(e.to_string())),
    }
}

/// Whether a NIXL runtime is loaded in this process.
#[pyfunction]
fn runtime_loaded() -> bool {
    nixl_core::runtime::is_loaded()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::init();
    m.add("__version__", VERSION)?;
    m.add_function(wrap_pyfunction!(load_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_loaded, m)?)?;
    hicache::add(m)?;
    kv::add(m)?;
    Ok(())
}
