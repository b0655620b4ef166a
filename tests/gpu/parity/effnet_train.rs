//! Parity tests: effnet_train (placeholder: being written).
