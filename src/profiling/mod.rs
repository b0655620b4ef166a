//! Profile making: single-cell crops, aggregation, sphering, Harmony, treatment effect.
pub mod crops;
pub mod profile;
pub mod synthetic;
