//! `cargo xtask gpu`: everything the GPU machine needs, in one archive to carry there.
//!
//! The device has no network and no cargo, so nothing may be built or downloaded there. This
//! builds the release binaries here (`nixl-pd` and `nixl-hicache` of nixl-tools, `gpubench` of
//! nixl-bench, nixl-core's GPU test and nixl-kv's staged-path test), provisions the
//! CUDA 13 runtime closure (`nixl-cu13`) plus `libcudart.so.13` from PyPI's
//! `nvidia-cuda-runtime`, writes a run script, packs it all as `target/gpu/bundle.tar.xz` and
//! prints the one command to run on the device.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cmd, prereq, runtime};

/// The CUDA runtime wheel whose libcudart ran with driver 580 (docs/runtime.md §1).
const CUDART: &str = "nvidia-cuda-runtime==13.5.37";

const RUN_SH: &str = r#"#!/bin/bash
# Runs on the GPU machine from the unpacked bundle: the GPU test, then gpubench (anchors, nixl-core
# VRAM transfers with UCX's protocol choices, emulation predictions, the pd flow with VRAM pools
# against raw NIXL on the same descriptors), on one GPU and, where there are two, across them.
# Logs and reports go to $OUT.
# `run.sh defaults` runs the GPU tests and the pd flow per flag set (DEFAULT_RUNS picks them:
# default no-direct ring-4x16 old p0523 p0523-no-direct p0523-old, the last three speaking the
# sglang-0.5.23 profile on both sides); `run.sh staging` runs only the staged-path table (gpubench staging); `run.sh protocol` only the
# protocol-cost rows (host memory, 1 page); `run.sh busy` the pd flow on GPU 0 without and with
# busy polling; `run.sh hostsliced` head slicing on host-memory pools (same TP, per-token,
# packed).
set -u
B=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp}
export NIXL_RUNTIME_DIR=$B/runtime NCCL_NVLS_ENABLE=0
nvidia-smi -L
N=$(nvidia-smi -L | grep -c "^GPU")
staging() {
  echo "== nixl-kv staged-path test (GPU pools, one process, cuda_ipc)"
  UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y timeout 120 "$B/bin/kv-gpu-test" --test-threads=1 2>&1 | grep -E -A3 "^test |test result|panicked"
  echo "== gpubench staging, GPU 0: NIXL-only settings, the staged path and the full pd flow, 1, 32 and 256 pages"
  # Bounded so that the report is packed even when the run is cut short (it is rewritten after
  # every round).
  timeout "${STAGING_SECONDS:-460}" "$B/bin/gpubench" staging --gpu 0 --rounds "${ROUNDS:-2}" --pd "$B/bin/nixl-pd" --out "$OUT/staging" 2>&1 | grep -v "^\[" > "$OUT/gpubench-staging.log"
  tail -3 "$OUT/gpubench-staging.log"
  cat "$OUT/staging/staging.md" 2>/dev/null
  cp "$OUT/staging/staging.md" "$OUT/staging/staging.json" "$OUT/" 2>/dev/null
  (cd "$OUT" && tar -czf staging.tgz staging && rm -rf staging)
}
protocol() {
  # The protocol's own cost: 1-page requests of 4 x 4 KiB in host memory (ZeroMQ hop, claim,
  # post, notifications, poll loops), sleeping loops, spinning loops, and spinning loops with
  # the managers' busy polling alternating; then the idle prefill's CPU over 5 s.
  echo "== protocol cost: nixl-pd, host-memory pools, 1 page of 4 buffers x 4 KiB, concurrency 1"
  for round in 1 2 3; do
    for spin in "" "--spin" "--spin --busy-poll-us ${BUSY_US:-2000}"; do
      port=$((19000 + round))
      "$B/bin/nixl-pd" prefill --bootstrap-port $port --layers 2 --page-bytes 4096 --pages 64 $spin 2>/dev/null &
      P=$!
      sleep 2
      echo -n "round $round ${spin:-(sleeping loops)}: "
      "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:$port --layers 2 --page-bytes 4096 --pages 64 \
        --requests 3000 --pages-per-request 1 --concurrency 1 --no-verify $spin 2>/dev/null | grep "requests x"
      t0=$(awk '{print $14 + $15}' /proc/$P/stat)
      sleep 5
      t1=$(awk '{print $14 + $15}' /proc/$P/stat)
      echo "  idle prefill over 5 s: $(( (t1 - t0) * 100 / 500 ))% of a core ($((t1 - t0)) ticks of 1/100 s)"
      kill $P
      wait $P 2>/dev/null
    done
  done
}
contexts() {
  # Does another process on the GPU slow our launches? The staging kernels alone, next to an
  # idle nixl-pd prefill (a CUDA context with registered pools), and next to a working pair.
  echo "== staging kernels: alone"
  "$B/bin/gpubench" kernels --gpu 0 | grep -o '"gather_64x32x32k_[a-z0-9_]*":[0-9.]*'
  "$B/bin/nixl-pd" prefill --bootstrap-port 19100 --layers 32 --page-bytes 32768 --pages 600 --device gpu:0 --spin 2>/dev/null &
  P=$!
  sleep 4
  echo "== staging kernels: next to an idle nixl-pd prefill on the same GPU"
  "$B/bin/gpubench" kernels --gpu 0 | grep -o '"gather_64x32x32k_[a-z0-9_]*":[0-9.]*'
  "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:19100 --layers 32 --page-bytes 32768 --pages 600 --device gpu:0 --spin \
    --requests 100000 --pages-per-request 32 --concurrency 1 --no-verify --seconds 20 > /dev/null 2>&1 &
  D=$!
  sleep 6
  echo "== staging kernels: next to a working pd pair (32-page plain requests)"
  "$B/bin/gpubench" kernels --gpu 0 | grep -o '"gather_64x32x32k_[a-z0-9_]*":[0-9.]*'
  kill $D
  wait $D 2>/dev/null
  sleep 1
  echo "== staging kernels: next to the same prefill, idle again after serving"
  "$B/bin/gpubench" kernels --gpu 0 | grep -o '"gather_64x32x32k_[a-z0-9_]*":[0-9.]*'
  kill $P
  wait $P 2>/dev/null
}
agents() {
  # Where does the fixed ~0.14 ms per staging launch of the two-process cases come from? The
  # timed gather with no agent, next to an agent with a UCX backend (created before any CUDA
  # work), with its buffers registered, and with cuda_ipc mappings to a second agent live; each
  # also after 0.3 ms and 3 ms of GPU idleness. Then the raw staged case under UCX settings.
  nvidia-smi -q -d CLOCK,PERFORMANCE | grep -E -A3 "Clocks$|Clocks Event|Performance State|Applications Clocks$" | head -40
  for round in ${AGENT_ROUNDS:-1}; do
    for with in ${AGENT_KINDS:-no peer}; do
      echo -n "round $round, agent: $with: "
      UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y "$B/bin/gpubench" kernels --gpu 0 --with-agent $with 2>&1 | grep -o '"gather_64x32x32k_[a-z0-9_]*":[0-9.]*\|rror.*' | tr '\n' ' '
      echo
    done
  done
  for env in "X=1" "UCX_CUDA_IPC_CACHE=n" "X=2"; do
    echo "== raw staged, 32 pages, $env"
    env $env "$B/bin/gpubench" case --name staged --place two --gpu 0 --remote-gpu 0 --seconds 1 --block 32768 \
      --buffers 64 --pool-pages 600 --per-buffer 32 --dst-run 4 --staged 2>&1 | grep -o '"\(create\|gather\|write\|scatter\|probes\)":{[^}]*}\|rror.*'
  done
  ps aux | grep -i "[m]ps" | head -3; nvidia-smi -q | grep -i -E "compute mode|MIG Mode" -A1 | head -6
}
busy() {
  # Busy polling through the full pd flow on GPU 0 (64 x 32 KiB pages, spinning loops): per
  # round, path and size a prefill, a verified decode run of 30 requests, then a timed one of
  # 300, without and with the managers' busy polling (--busy-poll-us).
  echo "== pd flow on GPU 0, spinning loops, without and with busy polling"
  for round in 1 2; do
    for path in plain staged direct; do
      for n in 1 32; do
        for busy in "" "--busy-poll-us ${BUSY_US:-2000}"; do
          flags="--layers 32 --page-bytes 32768 --pages 600 --device gpu:0 --spin $busy"
          case $path in
            staged) flags="$flags --staging --no-direct" ;;
            direct) flags="$flags --staging" ;;
          esac
          port=$((19600 + RANDOM % 1000))
          "$B/bin/nixl-pd" prefill --bootstrap-port $port $flags 2> "$OUT/busy-prefill.log" &
          P=$!
          for _ in $(seq 300); do grep -q "bootstrap on" "$OUT/busy-prefill.log" && break; sleep 0.1; done
          echo "round $round, $path, $n pages, ${busy:-no busy polling}:"
          "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:$port $flags --requests 30 --pages-per-request $n \
            --concurrency 1 2>&1 | grep "requests x" | sed 's/^/  verified: /'
          "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:$port $flags --requests 300 --pages-per-request $n \
            --concurrency 1 --no-verify 2>&1 | grep -m4 "requests x\|rror\|failed:" | sed 's/^/  timed: /'
          kill $P
          wait $P 2>/dev/null
          grep -m2 "failed:" "$OUT/busy-prefill.log" | sed 's/^/  prefill: /'
        done
      done
    done
  done
}
sliced() {
  # Heterogeneous TP (1 prefill rank of TP 1, 2 decode ranks of TP 2) next to same-TP rows, all
  # through the full pd flow with 32-page requests, rounds alternating.
  echo "== gpubench staging --pd-sizes 32 --no-cases --sliced, GPU 0"
  timeout "${STAGING_SECONDS:-400}" "$B/bin/gpubench" staging --gpu 0 --rounds "${ROUNDS:-2}" --pd "$B/bin/nixl-pd" \
    --pd-sizes 32 --no-cases --sliced --out "$OUT/sliced" 2>&1 | grep -v "^\[" > "$OUT/gpubench-sliced.log"
  tail -3 "$OUT/gpubench-sliced.log"
  cat "$OUT/sliced/staging.md" 2>/dev/null
  cp "$OUT/sliced/staging.md" "$OUT/sliced.md" 2>/dev/null
  cp "$OUT/sliced/staging.json" "$OUT/sliced.json" 2>/dev/null
  (cd "$OUT" && tar -czf sliced.tgz sliced && rm -rf sliced)
}
hostsliced() {
  # Head slicing on host-memory pools (what `cargo xtask bench sliced` runs, on this host's
  # cores): a prefill rank of 8 heads of 256 B, 4 tokens per page (8 KiB pages), 4 layers of 64
  # pages; per round the same TP (one decode of 8 heads), then 1 -> 2 (two decode ranks of 4
  # heads, every request to both) with SGLang's per-token descriptors (--no-packed), then packed.
  # Sleeping loops, concurrency 2 per decode rank, not verified; a verified run of 30 requests
  # before each sliced timed one.
  echo "== head slicing on host pools: same TP, sliced per-token, sliced packed"
  for round in 1 2 3; do
    for run in same tokens packed; do
      for n in ${HOST_PAGES:-16 32}; do
        port=$((19700 + RANDOM % 1000))
        common="--layers 4 --pages 128 --page-tokens 4"
        pflags="--bootstrap-port $port $common --page-bytes 8192 --heads 8 --tp-size 1 --tp-rank 0"
        [ $run = tokens ] && pflags="$pflags --no-packed"
        "$B/bin/nixl-pd" prefill $pflags 2> "$OUT/hostsliced-prefill.log" &
        P=$!
        for _ in $(seq 300); do grep -q "bootstrap on" "$OUT/hostsliced-prefill.log" && break; sleep 0.1; done
        dflags="--bootstrap 127.0.0.1:$port $common --sliced-tp --prefill-pages 128 --pages-per-request $n --concurrency 2"
        if [ $run = same ]; then
          ranks="0"; dflags="$dflags --page-bytes 8192 --heads 8 --tp-size 1"
        else
          ranks="0 1"; dflags="$dflags --page-bytes 4096 --heads 4 --tp-size 2"
        fi
        if [ $run != same ]; then
          for r in $ranks; do
            "$B/bin/nixl-pd" decode $dflags --tp-rank $r --requests 30 --seed 77 > "$OUT/hostsliced-v$r.log" 2>&1 &
          done
          wait $(jobs -p | grep -v "^$P$") 2>/dev/null
          for r in $ranks; do echo "round $round, $run, $n pages, rank $r verified: $(grep "requests x" "$OUT/hostsliced-v$r.log")"; done
        fi
        for r in $ranks; do
          "$B/bin/nixl-pd" decode $dflags --tp-rank $r --requests 300 --seed 4242 --no-verify > "$OUT/hostsliced-$r.log" 2>&1 &
        done
        wait $(jobs -p | grep -v "^$P$") 2>/dev/null
        for r in $ranks; do echo "round $round, $run, $n pages, rank $r: $(grep "requests x" "$OUT/hostsliced-$r.log")"; done
        kill $P
        wait $P 2>/dev/null
        grep "requests so far" "$OUT/hostsliced-prefill.log" | tail -1 | sed 's/^.*requests so far/  prefill, requests so far/'
      done
    done
  done
}
defaults() {
  # What a user gets without flags (issue: the fastest safe path by default): the GPU tests,
  # then the pd flow on GPU 0 (64 x 32 KiB pages) per round and size with only --device gpu:0
  # (same node: direct), with --no-direct (staged, the default ring and a smaller one), and with
  # the old defaults (--no-staging --no-spin --busy-poll-us 0: SGLang's per-page path).
  echo "== nixl-kv GPU tests (VRAM metadata through the metadata check, staged and direct paths)"
  UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y timeout 150 "$B/bin/kv-gpu-test" --test-threads=1 2>&1 | grep -E -A3 "^test |test result|panicked"
  UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y timeout 60 "$B/bin/gpu-test" --test-threads=1 2>&1 | grep -E "test result|panicked"
  echo "== pd flow on GPU 0: defaults against flags"
  for round in ${DEFAULT_ROUNDS:-1 2}; do
    for run in ${DEFAULT_RUNS:-default no-direct ring-4x16 old}; do
      for n in ${DEFAULT_SIZES:-32 256}; do
        flags="--layers 32 --page-bytes 32768 --pages 600 --device gpu:0"
        case $run in
          no-direct) flags="$flags --no-direct" ;;
          ring-4x16) flags="$flags --no-direct --staging-slots 4 --staging-slot-mib 16" ;;
          old) flags="$flags --no-staging --no-spin --busy-poll-us 0" ;;
          p0523) flags="$flags --profile sglang-0.5.23" ;;
          p0523-no-direct) flags="$flags --profile sglang-0.5.23 --no-direct" ;;
          p0523-old) flags="$flags --profile sglang-0.5.23 --no-staging --no-spin --busy-poll-us 0" ;;
        esac
        port=$((19600 + RANDOM % 1000))
        "$B/bin/nixl-pd" prefill --bootstrap-port $port $flags 2> "$OUT/defaults-prefill.log" &
        P=$!
        for _ in $(seq 300); do grep -q "bootstrap on" "$OUT/defaults-prefill.log" && break; sleep 0.1; done
        echo "round $round, $run, $n pages:"
        "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:$port $flags --requests 10 --pages-per-request $n \
          --concurrency 1 2>&1 | grep "requests x\|rror" | head -3 | sed 's/^/  verified: /'
        "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:$port $flags --requests ${DEFAULT_REQUESTS:-200} --pages-per-request $n \
          --concurrency 1 --no-verify 2>&1 | grep -m4 "requests x\|rror\|failed:" | sed 's/^/  timed: /'
        kill $P
        wait $P 2>/dev/null
        grep "requests so far" "$OUT/defaults-prefill.log" | tail -1 | sed 's/^.*requests so far/  prefill, requests so far/'
      done
    done
  done
  echo "== idle CPU of a default GPU prefill over 5 s (after one request)"
  "$B/bin/nixl-pd" prefill --bootstrap-port 19590 --layers 32 --page-bytes 32768 --pages 600 --device gpu:0 2> "$OUT/idle-prefill.log" &
  P=$!
  for _ in $(seq 300); do grep -q "bootstrap on" "$OUT/idle-prefill.log" && break; sleep 0.1; done
  "$B/bin/nixl-pd" decode --bootstrap 127.0.0.1:19590 --layers 32 --page-bytes 32768 --pages 600 --device gpu:0 --requests 5 --pages-per-request 32 2>&1 | grep "requests x"
  sleep 1
  t0=$(awk '{print $14+$15}' /proc/$P/stat); sleep 5; t1=$(awk '{print $14+$15}' /proc/$P/stat)
  echo "idle prefill: $((t1 - t0)) ticks of $(getconf CLK_TCK)/s in 5 s"
  kill $P; wait $P 2>/dev/null
}
if [ "${1:-all}" = defaults ]; then
  defaults
  exit 0
fi
if [ "${1:-all}" = hostsliced ]; then
  hostsliced
  exit 0
fi
if [ "${1:-all}" = sliced ]; then
  sliced
  exit 0
fi
if [ "${1:-all}" = busy ]; then
  busy
  exit 0
fi
if [ "${1:-all}" = agents ]; then
  agents
  exit 0
fi
if [ "${1:-all}" = contexts ]; then
  contexts
  exit 0
fi
if [ "${1:-all}" = protocol ]; then
  protocol
  exit 0
fi
if [ "${1:-all}" = staging ]; then
  staging
  exit 0
fi
echo "== nixl-core GPU test (VRAM->VRAM WRITE, one process, cuda_ipc)"
UCX_CUDA_IPC_ENABLE_SAME_PROCESS=y "$B/bin/gpu-test" --test-threads=1 --nocapture 2>&1 | grep -E "WRITE|test result|panicked"
echo "== gpubench, GPU 0"
"$B/bin/gpubench" all --gpu 0 --pd "$B/bin/nixl-pd" --out "$OUT/gpubench" 2>&1 | grep -v "^\["
(cd "$OUT" && tar -czf gpubench.tgz gpubench && rm -rf gpubench)
staging
echo "== HiCache over POSIX files (/tmp/hicache-bench): pages in GPU 0 memory vs host memory"
for shape in "1000 65536 64" "256 1048576 64"; do
  set -- $shape
  for dev in gpu:0 cpu; do
    rm -rf /tmp/hicache-bench
    "$B/bin/nixl-hicache" bench --dir /tmp/hicache-bench --pages $1 --page-bytes $2 --batch $3 --device $dev --json 2>&1 | grep -v "^\["
  done
done
rm -rf /tmp/hicache-bench
if [ "$N" -ge 2 ]; then
  echo "== gpubench, GPU 0 -> GPU 1"
  "$B/bin/gpubench" all --gpu 0 --remote-gpu 1 --pd "$B/bin/nixl-pd" --out "$OUT/gpubench-2gpu" 2>&1 | grep -v "^\["
  (cd "$OUT" && tar -czf gpubench-2gpu.tgz gpubench-2gpu && rm -rf gpubench-2gpu)
fi
"#;

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    prereq::ensure_libclang()?;
    let rt_args = runtime::RuntimeArgs::cuda13(root.join("target/nixl-runtime-cu13"));
    let rt = runtime::run(root, &rt_args)?;
    add_cudart(root, &rt)?;
    let pd = crate::demo::build_pd(root)?;
    let test_bin = build_test(root, "nixl-core", "gpu")?;
    let kv_test_bin = build_test(root, "nixl-kv", "staged_gpu")?;
    let bench = crate::demo::build_bin(root, "nixl-bench", "gpubench")?;
    let hicache = crate::demo::build_bin(root, "nixl-tools", "nixl-hicache")?;

    let stage = root.join("target/gpu-stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(stage.join("bin"))?;
    for (src, name) in [
        (pd, "nixl-pd"),
        (test_bin, "gpu-test"),
        (kv_test_bin, "kv-gpu-test"),
        (bench, "gpubench"),
        (hicache, "nixl-hicache"),
    ] {
        let dst = stage.join("bin").join(name);
        fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        let _ = Command::new("strip").arg(&dst).status();
    }
    cmd::run(
        Command::new("cp")
            .arg("-r")
            .arg(&rt)
            .arg(stage.join("runtime")),
    )?;
    fs::write(stage.join("run.sh"), RUN_SH)?;
    cmd::run(Command::new("chmod").arg("+x").arg(stage.join("run.sh")))?;
    let out = root.join("target/gpu");
    fs::create_dir_all(&out)?;
    let archive = out.join("bundle.tar.xz");
    cmd::run(
        Command::new("tar")
            .arg("-C")
            .arg(&stage)
            .arg("-cJf")
            .arg(&archive)
            .arg("."),
    )?;
    let size = fs::metadata(&archive)?.len();
    if size > 60 << 20 {
        bail!("the bundle is {size} bytes, over what the device tool carries");
    }
    println!(
        "\nbundle: {} ({:.1} MiB)",
        archive.display(),
        size as f64 / (1 << 20) as f64
    );
    println!("run it on the GPU machine with the device tool, carrying \"target/gpu\":");
    println!(
        "  mkdir -p /tmp/b && tar -C /tmp/b -xJf target/gpu/bundle.tar.xz && /tmp/b/run.sh 2>&1 | tee $OUT/gpu.log"
    );
    println!("(`/tmp/b/run.sh staging` runs only gpubench's staged-path table)");
    Ok(())
}

/// Puts `libcudart.so.13` into the runtime's bundled-library folder (UCX's cuda module needs it).
fn add_cudart(root: &Path, rt: &Path) -> anyhow::Result<()> {
    let dst = rt.join("nixl_cu13.libs/libcudart.so.13");
    if dst.is_file() {
        return Ok(());
    }
    let wheels = root.join("target/nixl-wheels");
    let find = || -> Option<PathBuf> {
        fs::read_dir(&wheels)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("nvidia_cuda_runtime-13"))
            })
    };
    if find().is_none() {
        cmd::run(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--quiet",
                ])
                .args([
                    "--python-version",
                    "3.11",
                    "--platform",
                    "manylinux2014_x86_64",
                    "-d",
                ])
                .arg(&wheels)
                .arg(CUDART),
        )?;
    }
    let wheel = find().context("nvidia-cuda-runtime wheel missing after pip")?;
    let mut zip = zip::ZipArchive::new(fs::File::open(&wheel)?)?;
    let mut data = Vec::new();
    zip.by_name("nvidia/cu13/lib/libcudart.so.13")?
        .read_to_end(&mut data)?;
    fs::write(&dst, data)?;
    Ok(())
}

/// Builds `package`'s integration test `test` with its `gpu-tests` feature, in release, and
/// returns the executable.
fn build_test(root: &Path, package: &str, test: &str) -> anyhow::Result<PathBuf> {
    let out = cmd::output(
        Command::new("cargo")
            .current_dir(root)
            .args(["test", "--release", "--locked", "-p", package])
            .args(["--features", "gpu-tests"])
            .args(["--test", test, "--no-run", "--message-format=json"]),
    )?;
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == test)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo did not report the {test} test executable"))
}
