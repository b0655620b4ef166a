//! The CUDA kernels' parity suite (`tests/gpu/parity/`) on the CPU emulation of `kernels/*.cu`
//! (`tests/gpu/cuda_emu.hpp`, built with g++): kernel logic and launch geometry checked against the
//! CPU backend on every CI run. The same suite runs on a GPU in `tests/cuda_parity.rs`.

#[path = "gpu/emu.rs"]
mod emu;
#[path = "gpu/parity/mod.rs"]
mod parity;

use parity::*;

macro_rules! emu_tests {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod emulated {
            use super::*;
            $(
                #[test]
                fn $name() {
                    $module::$name(emu::emu());
                }
            )*
        }
    };
}
for_each_parity_test!(emu_tests);

#[test]
fn every_listed_entry_point_exists() {
    for m in phenocore::backend::gpu::kernels::MODULES {
        emu::emu().check_entries(m).unwrap();
    }
}
