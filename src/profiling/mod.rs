//! Profile making: single-cell crops (and, later, aggregation, sphering, ...).
pub mod crops;
pub mod profile;
pub mod synthetic;
