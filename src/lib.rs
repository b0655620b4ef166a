//! phenocore: Cell Painting images → phenotypic profiles.
pub mod autograd;
pub mod backend;
pub mod diffusion;
pub mod error;
pub mod ffi;
pub mod io;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod profiling;
pub mod tensor;
pub mod threads;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, Device, Tensor};
