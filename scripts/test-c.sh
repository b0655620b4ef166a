#!/usr/bin/env bash
# C and C++ link tests of the phenocore ABI against the release cdylib:
#   1. tests/c_abi.rs in release (builds the cdylib, target/release/deps/libphenocore.so): compiles
#      tests/c/test_phenocore.c and checks its features against the Rust API's (it also writes the
#      expected numbers reused below)
#   2. the C tests (test_phenocore.c, test_train.c, test_scheduler.c, test_unet.c) linked with that
#      libphenocore.so, plain and under valgrind
#   3. the C++ wrapper test (bindings/cpp), plain and under valgrind
# Idempotent; exits non-zero on the first failure. Installs gcc/g++/valgrind with apt-get if missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
if ((${#need[@]})); then
    echo "== installing ${need[*]}"
    sudo_cmd=()
    [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${need[@]}"
fi

# The library under test is the one `cargo test --release` builds (target/release/deps), not a
# separate `cargo build --release`: cargo test resolves dependency features with the
# dev-dependencies (cbindgen turns on serde derive, bitflags std, ...), so a `cargo build` in between
# would rebuild the dependencies and the library for a different feature set, and then again for
# the test (about 5 minutes on 2 cores). The code linked is the same either way.
echo "== C test against the Rust API (cargo test --release --test c_abi)"
cargo test --release --test c_abi -- --nocapture

target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
lib_dir="$target_dir/release/deps"
[[ -f "$lib_dir/libphenocore.so" ]] || { echo "missing $lib_dir/libphenocore.so" >&2; exit 1; }
out="$target_dir/c-test"
mkdir -p "$out"

expected="$target_dir/tmp/phenocore-c/expected_features.txt"
[[ -s "$expected" ]] || { echo "missing $expected" >&2; exit 1; }

echo "== C test linked with $lib_dir/libphenocore.so"
cc -std=c11 -O1 -g -Wall -Wextra -Werror -pedantic -pthread -I include tests/c/test_phenocore.c \
    -o "$out/test_phenocore" -L "$lib_dir" -Wl,--disable-new-dtags,-rpath,"$lib_dir" -lphenocore -lm
"$out/test_phenocore" --expected "$expected" --workdir "$out"

valgrind_flags=(--error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect --quiet)

echo "== C test under valgrind"
valgrind "${valgrind_flags[@]}" "$out/test_phenocore" --expected "$expected" --workdir "$out"

echo "== C trainer test (tests/c/test_train.c), plain and under valgrind"
cc -std=c11 -O1 -g -Wall -Wextra -Werror -pedantic -pthread -I include tests/c/test_train.c \
    -o "$out/test_train" -L "$lib_dir" -Wl,--disable-new-dtags,-rpath,"$lib_dir" -lphenocore -lm
"$out/test_train" --workdir "$out"
valgrind "${valgrind_flags[@]}" "$out/test_train" --workdir "$out"

echo "== C scheduler test (tests/c/test_scheduler.c), plain and under valgrind"
cc -std=c11 -O1 -g -Wall -Wextra -Werror -pedantic -pthread -I include tests/c/test_scheduler.c \
    -o "$out/test_scheduler" -L "$lib_dir" -Wl,--disable-new-dtags,-rpath,"$lib_dir" -lphenocore -lm
"$out/test_scheduler"
valgrind "${valgrind_flags[@]}" "$out/test_scheduler"

echo "== C U-Net test (tests/c/test_unet.c), plain and under valgrind"
cc -std=c11 -O1 -g -Wall -Wextra -Werror -pedantic -pthread -I include tests/c/test_unet.c \
    -o "$out/test_unet" -L "$lib_dir" -Wl,--disable-new-dtags,-rpath,"$lib_dir" -lphenocore -lm
"$out/test_unet" --fixtures tests/fixtures/unet --workdir "$out"
valgrind "${valgrind_flags[@]}" "$out/test_unet" --fixtures tests/fixtures/unet --workdir "$out"

echo "== C++ wrapper test"
c++ -std=c++17 -O1 -g -Wall -Wextra -Werror -pedantic -pthread -I include -I bindings/cpp \
    bindings/cpp/test_phenocore.cpp -o "$out/test_phenocore_cpp" -L "$lib_dir" -Wl,--disable-new-dtags,-rpath,"$lib_dir" -lphenocore
"$out/test_phenocore_cpp" --workdir "$out"

echo "== C++ wrapper test under valgrind"
valgrind "${valgrind_flags[@]}" "$out/test_phenocore_cpp" --workdir "$out"

echo "== C and C++ tests passed"
