#!/usr/bin/env bash
# Builds the GPU half of the checks here (a machine with Rust, no GPU needed) and stages the programs
# in .gpu/ (ignored by git), for a GPU machine that has the CUDA driver and PyTorch but no Rust
# toolchain; scripts/gpu-run.sh runs them there.
#
#   scripts/gpu-stage.sh        # then copy the checkout with .gpu/ to the GPU machine
#
# Staged: the test programs tests/cuda_ops.rs and tests/cuda_parity.rs, the bench programs
# benches/cuda_{kernels,effnet,train,unet}.rs, the `phenocore` CLI built with `cuda` (stripped), and the monai wheel that
# benches/cuda_unet.py needs (pure Python; PHENO_STAGE_PYTHON's pip downloads it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stage="$root/.gpu"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/whl"

exe() { # the executable cargo reports for a target, from its JSON messages
    python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name and m.get("executable"):
        print(m["executable"])' "$1"
}
tests_json="$(cargo test --release --features cuda --no-run --test cuda_ops --test cuda_parity --message-format=json 2>/dev/null)"
benches_json="$(cargo bench --features cuda --no-run --bench cuda_kernels --bench cuda_effnet \
    --bench cuda_train --bench cuda_unet --message-format=json 2>/dev/null)"
bin_json="$(cargo build --release --features cuda --bin phenocore --message-format=json 2>/dev/null)"
cp "$(exe phenocore <<<"$bin_json")" "$stage/bin/phenocore"
for t in cuda_ops cuda_parity; do
    cp "$(exe $t <<<"$tests_json")" "$stage/bin/$t"
done
for b in cuda_kernels cuda_effnet cuda_train cuda_unet; do
    cp "$(exe $b <<<"$benches_json")" "$stage/bin/$b"
done
strip "$stage"/bin/*
# The test programs read fixtures under the path they were built in (CARGO_MANIFEST_DIR).
echo "$root" > "$stage/built_in"
git rev-parse HEAD > "$stage/commit"
"${PHENO_STAGE_PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d "$stage/whl" "monai==1.6.1"
du -sh "$stage"/bin/* "$stage"/whl/*
