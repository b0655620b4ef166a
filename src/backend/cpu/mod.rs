//! CPU kernels: reference and fast paths.
pub mod activation;
