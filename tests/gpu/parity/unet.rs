//! Parity tests: unet (placeholder: being written).
