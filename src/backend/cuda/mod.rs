//! CUDA backend (feature `cuda`). Being written.
