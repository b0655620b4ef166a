//! Profile making: single-cell crops (and, later, aggregation, sphering, ...).
pub mod crops;
