//! phenocore: Cell Painting images → phenotypic profiles.
pub mod error;
pub mod tensor;
pub mod backend;
pub mod ops;
pub mod models;
pub mod profiling;
pub mod io;
pub mod ffi;
pub mod threads;

pub use error::{Error, Result};
pub use tensor::{DType, Device, Tensor};
