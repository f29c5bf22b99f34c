//! Physical anchors: what the GPU's copy engines reach without NIXL.

use std::time::Instant;

use nixl_core::cuda::{DeviceBuffer, PinnedBuffer};
use serde_json::{Value, json};

fn gbps(bytes: usize, reps: u32, secs: f64) -> f64 {
    bytes as f64 * f64::from(reps) / secs / 1e9
}

/// Times `reps` runs of `f` after one warm-up run; GB/s for `bytes` per run.
fn time(bytes: usize, reps: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(gbps(bytes, reps, t.elapsed().as_secs_f64()))
}

/// Device-to-device copies (1 GiB and 64 MiB), pinned host<->device (256 MiB), and with
/// `peer`, copies between the two GPUs (1 GiB, both directions).
pub(crate) fn measure(gpu: u32, peer: Option<u32>) -> anyhow::Result<Value> {
    const GIB: usize = 1 << 30;
    const MIB: usize = 1 << 20;
    let a = DeviceBuffer::new(gpu, GIB)?;
    let mut b = DeviceBuffer::new(gpu, GIB)?;
    let dtod_1g = time(GIB, 20, || Ok(b.copy_from_device(0, &a, 0, GIB)?))?;
    let dtod_64m = time(64 * MIB, 100, || {
        Ok(b.copy_from_device(0, &a, 0, 64 * MIB)?)
    })?;
    let mut pinned = PinnedBuffer::new(gpu, 256 * MIB)?;
    let htod = time(256 * MIB, 10, || Ok(b.write_at(0, pinned.as_slice())?))?;
    let dtoh = time(256 * MIB, 10, || Ok(b.read_at(0, pinned.as_mut_slice())?))?;
    let mut out = json!({
        "gpu": gpu,
        "dtod_1g_gbps": dtod_1g,
        "dtod_64m_gbps": dtod_64m,
        "pinned_htod_gbps": htod,
        "pinned_dtoh_gbps": dtoh,
    });
    if let Some(p) = peer {
        let mut c = DeviceBuffer::new(p, GIB)?;
        out["peer_gpu"] = json!(p);
        out["peer_copy_gbps"] = json!(time(GIB, 20, || Ok(c.copy_from_device(0, &a, 0, GIB)?))?);
        out["peer_copy_back_gbps"] =
            json!(time(GIB, 20, || Ok(b.copy_from_device(0, &c, 0, GIB)?))?);
    }
    Ok(out)
}
