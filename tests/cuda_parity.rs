//! The CUDA kernels' parity suite (`tests/gpu/parity/`) on a real GPU: the same tests that
//! `tests/gpu_emu.rs` runs on the CPU emulation, launched on CUDA device 0. `#[ignore]`d (CI has no
//! GPU): `scripts/test-cuda-nvrtc.sh --gpu`, or
//! `cargo test --release --features cuda --test cuda_parity -- --ignored`; under
//! `compute-sanitizer --tool memcheck` / `--tool racecheck` for the sanitizer runs.
#![cfg(feature = "cuda")]

#[path = "gpu/parity/mod.rs"]
mod parity;

use parity::*;
use phenocore::backend::cuda::{device, CudaDevice};
use std::sync::Arc;

fn gpu() -> Arc<CudaDevice> {
    device(0).unwrap_or_else(|e| panic!("these tests need CUDA device 0: {e}"))
}

macro_rules! gpu_tests {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod on_gpu {
            use super::*;
            $(
                #[test]
                #[ignore = "needs a CUDA GPU"]
                fn $name() {
                    $module::$name(&gpu());
                }
            )*
        }
    };
}
for_each_parity_test!(gpu_tests);
