//! The CUDA C sources in `kernels/`, embedded in the binary. The CUDA backend compiles them with
//! NVRTC for the device's architecture; the tests also build them for the CPU emulation
//! (`tests/gpu/cuda_emu.hpp`). Always compiled (no CUDA dependency): the tables are plain strings.

/// One `kernels/<name>.cu` file and the entry points the launch layer ([`super`]) calls in it.
#[derive(Debug)]
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    /// Every `extern "C"` entry point `backend::gpu` launches from this module; the NVRTC check
    /// fails when one is missing from the compiled cubin.
    pub entries: &'static [&'static str],
}

macro_rules! module {
    ($static:ident, $name:literal, [$($entry:literal),* $(,)?]) => {
        pub static $static: KernelModule = KernelModule {
            name: $name,
            source: include_str!(concat!("../../../kernels/", $name, ".cu")),
            entries: &[$($entry),*],
        };
    };
}

module!(
    UNARY,
    "unary",
    [
        "silu_f32",
        "silu_f64",
        "silu_f16",
        "silu_bf16",
        "sigmoid_f32",
        "sigmoid_f64",
        "sigmoid_f16",
        "sigmoid_bf16",
    ]
);
module!(
    AFFINE,
    "affine",
    ["affine_f32", "affine_f64", "affine_f16", "affine_bf16"]
);

module!(
    DEPTHWISE,
    "depthwise",
    [
        "depthwise_forward_k3_f32",
        "depthwise_backward_x_k3_f32",
        "depthwise_backward_w_k3_f32",
        "depthwise_forward_k5_f32",
        "depthwise_backward_x_k5_f32",
        "depthwise_backward_w_k5_f32",
        "depthwise_forward_k3_bf16",
        "depthwise_backward_x_k3_bf16",
        "depthwise_backward_w_k3_bf16",
        "depthwise_forward_k5_bf16",
        "depthwise_backward_x_k5_bf16",
        "depthwise_backward_w_k5_bf16",
        "depthwise_backward_w_reduce",
    ]
);

module!(NORM, "norm", []);
module!(ATTENTION, "attention", []);
module!(LOSS, "loss", []);
module!(GEGLU, "geglu", []);
module!(SHAPE, "shape", []);
module!(OPTIM, "optim", []);
module!(CROP, "crop", []);

/// Every kernel module; `tests/nvrtc_check.rs` fails when a `kernels/*.cu` file is missing here.
pub static MODULES: &[&KernelModule] = &[
    &UNARY, &AFFINE, &DEPTHWISE, &NORM, &ATTENTION, &LOSS, &GEGLU, &SHAPE, &OPTIM, &CROP,
];

/// Headers the modules may `#include "<name>"`, handed to NVRTC in memory.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../../kernels/common.cuh"))];
