//! CPU kernels: reference and fast paths.
pub mod activation;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod conv;
pub mod gemm;
pub mod pointwise;
pub mod pointwise_bf16;
#[cfg(target_arch = "x86_64")]
pub mod sgemm;
#[cfg(target_arch = "x86_64")]
pub mod winograd;
