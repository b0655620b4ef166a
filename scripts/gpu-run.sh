#!/usr/bin/env bash
# The GPU half of the checks, on a GPU machine with the CUDA driver, the CUDA libraries and PyTorch
# but no Rust toolchain, from the programs scripts/gpu-stage.sh built and staged in .gpu/.
# (With cargo at hand, `scripts/test-cuda-nvrtc.sh --gpu` and the benches' own commands do the same.)
#
#   scripts/gpu-run.sh LOG_DIR STEP...
#
# Steps, each logged to LOG_DIR/STEP.log, each under its own time limit (PHENO_STEP_TIMEOUT_<STEP>,
# seconds), each failing step reported at the end with the others still run:
#   info       the GPU, driver, CUDA libraries found
#   parity     tests/cuda_ops.rs and tests/cuda_parity.rs with their #[ignore]d GPU tests
#   memcheck   the same two programs under compute-sanitizer --tool memcheck
#   racecheck  the same under --tool racecheck (PHENO_RACECHECK_FILTER: libtest arguments for the
#              parity program, e.g. test-name filters and --test-threads; the whole suite is slow)
#   initcheck  the same under --tool initcheck (PHENO_INITCHECK_FILTER likewise), with
#              --check-bulk-copy: cuBLAS's Hopper kernels store through the TMA, and without it
#              what they write reads as uninitialised (the likely cause of the add_per_sample_vec
#              reports of the first initcheck run, which read bf16 GEMM outputs)
#   kernels    benches/cuda_kernels.rs (achieved bandwidth against the device copy)
#   effnet, train, unet   benches/cuda_{effnet,train,unet}.py (PyTorch side by side)
#   trainer    `phenocore bench-train --device 0` at batch 256, f32 and bf16: the Trainer's whole
#              step on the GPU (host batch, upload, step, loss and logits read back)
#   profile    the three benches, smaller, with PHENOCORE_CUDA_PROFILE=1: GPU time by kernel
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
logs="$1"; shift
[ "$logs" = --step ] || mkdir -p "$logs"
stage="$root/.gpu"
[ -x "$stage/bin/cuda_parity" ] || { echo "error: no staged programs in $stage (run scripts/gpu-stage.sh)" >&2; exit 2; }

if [ -z "${PHENO_GPU_ENV_READY:-}" ]; then # once, not again in each step's process
    # The test programs read their fixtures under the directory they were built in.
    built_in="$(cat "$stage/built_in")"
    if [ "$built_in" != "$root" ] && [ ! -e "$built_in" ]; then
        mkdir -p "$(dirname "$built_in")" && ln -s "$root" "$built_in"
    fi

    # NVRTC and cuBLAS for phenocore's programs: the toolkit's (matching the driver) first, then the
    # pip wheels' of this Python. Only those programs get this path (through wrappers); PyTorch keeps
    # its own libraries.
    libdirs=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
             $(python3 -c 'import glob, site, os; print(" ".join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/lib*.so*", recursive=True)})))' 2>/dev/null); do
        [ -d "$d" ] && libdirs="${libdirs:+$libdirs:}$d"
    done
    export PHENO_CUDA_LIBS="$libdirs"
    mkdir -p /tmp/pheno-bin
    for b in "$stage"/bin/*; do
        printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$libdirs" "$b" > "/tmp/pheno-bin/${b##*/}"
        chmod +x "/tmp/pheno-bin/${b##*/}"
    done
    export PHENOCORE_BENCH_BIN_DIR=/tmp/pheno-bin PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
    if [ -d "$stage/whl" ] && ls "$stage"/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pheno-site "$stage"/whl/*.whl \
            && export PYTHONPATH="/tmp/pheno-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PHENO_GPU_ENV_READY=1
fi

sanitize() { # TOOL PROGRAM ARGS...
    local tool="$1"; shift
    # No --leak-check: the caching allocator keeps its blocks for the life of the process by design.
    compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 50 "$@"
}
step() {
    case "$1" in
        info)
            nvidia-smi; echo "phenocore's library path: $PHENO_CUDA_LIBS"; echo "staged from commit $(cat "$stage/commit")"
            for l in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
                for d in ${PHENO_CUDA_LIBS//:/ }; do [ -e "$d/$l" ] && { echo "$l: $d"; break; }; done
            done
            python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'
            which compute-sanitizer nvcc ncu cargo || true ;;
        parity)
            /tmp/pheno-bin/cuda_ops --include-ignored && /tmp/pheno-bin/cuda_parity --include-ignored ;;
        memcheck)
            sanitize memcheck /tmp/pheno-bin/cuda_ops --include-ignored \
                && sanitize memcheck /tmp/pheno-bin/cuda_parity --include-ignored ;;
        racecheck)
            sanitize racecheck /tmp/pheno-bin/cuda_ops --include-ignored \
                && sanitize racecheck /tmp/pheno-bin/cuda_parity --include-ignored ${PHENO_RACECHECK_FILTER:-} ;;
        initcheck)
            sanitize initcheck --check-bulk-copy yes /tmp/pheno-bin/cuda_ops --include-ignored \
                && sanitize initcheck --check-bulk-copy yes /tmp/pheno-bin/cuda_parity --include-ignored ${PHENO_INITCHECK_FILTER:-} ;;
        kernels) /tmp/pheno-bin/cuda_kernels 20 ;;
        trainer)
            for c in f32 bf16; do
                /tmp/pheno-bin/phenocore bench-train --device 0 --compute $c --batch 256 --steps 10 \
                    --warmup 2 || return 1
            done ;;
        effnet) python3 benches/cuda_effnet.py --batch 1024 --reps 10 ;;
        train) python3 benches/cuda_train.py --batch 256 --steps 10 ;;
        unet) python3 benches/cuda_unet.py --batch 64 --size 48 --steps 50 ;;
        profile)
            export PHENOCORE_CUDA_PROFILE=1
            python3 benches/cuda_effnet.py --batch 1024 --reps 2 --no-compile \
                && python3 benches/cuda_train.py --batch 256 --steps 3 \
                && python3 benches/cuda_unet.py --batch 64 --size 48 --reps 1 --steps 5 ;;
        *) echo "unknown step $1" >&2; return 2 ;;
    esac
}
if [ "$logs" = --step ]; then # one step, under the time limit of the loop below
    step "$1"
    exit
fi
failed=()
for s in "$@"; do
    var="PHENO_STEP_TIMEOUT_${s^^}"
    limit="${!var:-600}"
    echo "== $s (limit ${limit}s) $(date -u +%T)"
    t0=$(date +%s)
    timeout -k 15 "$limit" "$0" --step "$s" > "$logs/$s.log" 2>&1; rc=$?
    echo "== $s: rc $rc in $(( $(date +%s) - t0 ))s"
    tail -n "${PHENO_TAIL:-25}" "$logs/$s.log"
    [ "$rc" = 0 ] || failed+=("$s")
done
echo "== failed steps: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
