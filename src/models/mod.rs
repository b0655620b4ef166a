//! Models built over ops: EfficientNet-B0 (the Cell Painting CNN).
pub mod efficientnet;
