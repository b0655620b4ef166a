//! Parity tests: conv (placeholder: being written).
