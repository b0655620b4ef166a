//! The diffusion U-Net on a [`crate::backend::gpu::Gpu`] (placeholder: being written).
