//! Profile making: single-cell crops, aggregation, sphering, Harmony, treatment effect.
pub mod aggregate;
pub mod crops;
pub mod effect;
pub mod harmony;
pub mod profile;
pub mod sphere;
pub mod synthetic;
