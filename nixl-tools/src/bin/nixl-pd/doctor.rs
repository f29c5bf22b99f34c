//! `nixl-pd doctor`: what this machine gives the programs: the runtime, its plugins, the UCX
//! settings, and whether UCX would emulate the KV transfers in software.

use anyhow::bail;
use nixl_core::emulation::{PeerPlace, TransferShape, UcxEnv, risks};
use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, MemType, XferOp};
use nixl_tools::runtime::{self, Source};

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct DoctorArgs {
    /// Where this side's KV pool would live: `cpu` or `gpu:N` (as `prefill`/`decode --device`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Where the peer's KV pool would live (default: the same kind as `--device`).
    #[arg(long)]
    peer_device: Option<String>,
}

/// `Some(N)` for `gpu:N`, `None` for `cpu`.
fn gpu_of(device: &str) -> Option<u32> {
    device.strip_prefix("gpu:").and_then(|n| n.parse().ok())
}

fn mem_type(device: &str) -> anyhow::Result<MemType> {
    match device {
        "cpu" => Ok(MemType::Dram),
        d if d
            .strip_prefix("gpu:")
            .is_some_and(|n| n.parse::<u32>().is_ok()) =>
        {
            Ok(MemType::Vram)
        }
        d => bail!("a device is cpu or gpu:N, not {d}"),
    }
}

pub(crate) fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let local = mem_type(&args.device)?;
    let remote = mem_type(args.peer_device.as_deref().unwrap_or(&args.device))?;

    println!("NIXL and UCX settings in the environment:");
    let settings = runtime::settings();
    if settings.is_empty() {
        println!("  (none: UCX picks its transports itself, NIXL_RUNTIME_DIR is unset)");
    }
    for (k, v) in &settings {
        println!("  {k}={v}");
    }

    println!(
        "\nKV transfers (prefill WRITEs into another process's pool), {local:?} -> {remote:?}:"
    );
    // The pd flow: WRITEs to an agent of another process, NIXL's default peer error mode.
    let shape = TransferShape::new(XferOp::Write, local, remote, PeerPlace::OtherProcess, true);
    let found = risks(&shape, &UcxEnv::from_process());
    if found.is_empty() {
        println!("  no software-emulation risk known for this shape and environment");
    }
    for r in &found {
        println!("  emulation risk: {r}");
    }

    println!("\nNIXL runtime:");
    let loaded = match runtime::load() {
        Ok(l) => l,
        Err(e) => {
            println!("  not usable\n");
            eprintln!("nixl-pd doctor: {e}");
            std::process::exit(2);
        }
    };
    match (&loaded.source, &loaded.info.library) {
        (Source::PipWheel(dir), _) => println!(
            "  pip-installed wheel in {} (set {}={} to skip the python3 lookup)",
            dir.display(),
            nixl_core::runtime::RUNTIME_DIR_ENV,
            dir.display()
        ),
        (_, Some(lib)) => println!("  {}", lib.display()),
        (_, None) => println!("  libnixl_capi.so, found by the dynamic loader (LD_LIBRARY_PATH)"),
    }
    let agent = Agent::new(
        &format!("nixl-pd-doctor-{}", std::process::id()),
        &AgentConfig::default(),
    )?;
    let plugins = agent.plugins()?;
    println!("  plugins: {}", plugins.join(", "));
    if let Ok(params) = agent.plugin_params(&BackendKind::Ucx) {
        let list: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  UCX backend parameters (NIXL's defaults): {}",
            list.join(", ")
        );
    }
    match agent.create_backend(BackendKind::Ucx, &BackendParams::new()) {
        Ok(_) => println!("  UCX backend: created"),
        Err(e) => {
            println!("  UCX backend: FAILED: {e}");
            bail!("the UCX backend, which nixl-pd needs, cannot be created: {e}");
        }
    }
    if let Some(gpu) = gpu_of(&args.device) {
        probe_gpu(&agent, gpu)?;
    }
    println!("\nok");
    Ok(())
}

/// Allocates and registers 1 MiB on GPU `gpu`, and says whether other processes can reach it
/// through CUDA IPC (what `cuda_ipc` needs).
fn probe_gpu(agent: &Agent, gpu: u32) -> anyhow::Result<()> {
    use nixl_core::cuda::{DeviceBuffer, device_count, driver_present, ipc_capable};
    if !driver_present() {
        bail!("--device gpu:{gpu}: the CUDA driver (libcuda.so.1) cannot be loaded");
    }
    println!("  CUDA devices: {}", device_count()?);
    let buf = agent.register(DeviceBuffer::new(gpu, 1 << 20)?)?;
    let addr = buf.region().addr;
    if ipc_capable(gpu, addr)? {
        println!("  GPU {gpu}: 1 MiB allocated and registered; exportable with CUDA IPC");
    } else {
        println!(
            "  emulation risk: {}",
            nixl_core::emulation::EmulationRisk::NotIpcExportable { addr }
        );
    }
    Ok(())
}
