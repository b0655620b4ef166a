#!/usr/bin/env bash
# Every test of phenocore: Rust (unit, integration, torchvision parity fixtures, CLI, header freshness),
# the CUDA kernels on a CPU emulation against the CPU ops, C and C++ link tests (plain and under valgrind), Python bindings, and the NVRTC compile check of
# every CUDA kernel (sm_80 + sm_90, no spills; no GPU needed). Exits non-zero on the first failure.
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS
step() { printf '\n===== %s (%ds)\n' "$1" $((SECONDS - start)); }

# The Rust tests compile C (tests/c_abi.rs) and build the CUDA kernels for the CPU emulation with
# g++ (tests/gpu_emu.rs): install the compilers first when missing.
if ! command -v cc >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
    step "installing gcc / g++"
    sudo_cmd=()
    [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q gcc g++
fi

step "Rust tests (cargo test --release)"
cargo test --release

step "C / C++ ABI tests"
scripts/test-c.sh

step "Python bindings"
scripts/test-python.sh

step "CUDA backend: build with --features cuda, NVRTC check of every kernel"
scripts/test-cuda-nvrtc.sh

step "all tests passed"
