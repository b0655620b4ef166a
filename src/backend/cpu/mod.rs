//! CPU kernels: reference and fast paths.
pub mod activation;
pub mod conv;
pub mod gemm;
pub mod pointwise;
