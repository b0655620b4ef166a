//! Compute backends. The CPU backend is always built; CUDA behind the `cuda` feature.
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gpu;
