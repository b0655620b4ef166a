//! EfficientNet training step on a [`crate::backend::gpu::Gpu`] (placeholder: being written).
