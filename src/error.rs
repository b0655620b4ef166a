//! One error type for the whole library, mapped onto the pinned C status codes in `ffi`.

use std::fmt;

/// Pinned C status codes. Values are part of the ABI: never renumber, only append.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoStatus {
    PHENO_OK = 0,
    PHENO_ERR_INVALID_ARGUMENT = 1,
    PHENO_ERR_NULL_POINTER = 2,
    PHENO_ERR_SHAPE = 3,
    PHENO_ERR_DTYPE = 4,
    PHENO_ERR_IO = 5,
    PHENO_ERR_FORMAT = 6,
    PHENO_ERR_MISSING_KEY = 7,
    PHENO_ERR_UNKNOWN_LAYER = 8,
    PHENO_ERR_NON_FINITE = 9,
    PHENO_ERR_NO_DEVICE = 10,
    PHENO_ERR_OUT_OF_MEMORY = 11,
    PHENO_ERR_CUDA = 12,
    PHENO_ERR_CANCELLED = 13,
    PHENO_ERR_UNSUPPORTED = 14,
    PHENO_ERR_INTERNAL = 15,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    InvalidArgument(String),
    NullPointer(String),
    Shape(String),
    DType(String),
    Io(String),
    Format(String),
    MissingKey(String),
    UnknownLayer(String),
    NonFinite(String),
    NoDevice(String),
    OutOfMemory(String),
    Cuda(String),
    Cancelled,
    Unsupported(String),
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn status(&self) -> PhenoStatus {
        use PhenoStatus::*;
        match self {
            Error::InvalidArgument(_) => PHENO_ERR_INVALID_ARGUMENT,
            Error::NullPointer(_) => PHENO_ERR_NULL_POINTER,
            Error::Shape(_) => PHENO_ERR_SHAPE,
            Error::DType(_) => PHENO_ERR_DTYPE,
            Error::Io(_) => PHENO_ERR_IO,
            Error::Format(_) => PHENO_ERR_FORMAT,
            Error::MissingKey(_) => PHENO_ERR_MISSING_KEY,
            Error::UnknownLayer(_) => PHENO_ERR_UNKNOWN_LAYER,
            Error::NonFinite(_) => PHENO_ERR_NON_FINITE,
            Error::NoDevice(_) => PHENO_ERR_NO_DEVICE,
            Error::OutOfMemory(_) => PHENO_ERR_OUT_OF_MEMORY,
            Error::Cuda(_) => PHENO_ERR_CUDA,
            Error::Cancelled => PHENO_ERR_CANCELLED,
            Error::Unsupported(_) => PHENO_ERR_UNSUPPORTED,
            Error::Internal(_) => PHENO_ERR_INTERNAL,
        }
    }

    /// Shape mismatch error that prints both shapes.
    pub fn shape_mismatch(what: &str, expected: &[usize], got: &[usize]) -> Self {
        Error::Shape(format!("{what}: expected shape {expected:?}, got {got:?}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::NullPointer(m) => write!(f, "null pointer: {m}"),
            Error::Shape(m) => write!(f, "shape error: {m}"),
            Error::DType(m) => write!(f, "dtype error: {m}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::Format(m) => write!(f, "format error: {m}"),
            Error::MissingKey(m) => write!(f, "weights error: {m}"),
            Error::UnknownLayer(m) => write!(f, "unknown layer: {m}"),
            Error::NonFinite(m) => write!(f, "non-finite value: {m}"),
            Error::NoDevice(m) => write!(f, "no device: {m}"),
            Error::OutOfMemory(m) => write!(f, "out of memory: {m}"),
            Error::Cuda(m) => write!(f, "CUDA error: {m}"),
            Error::Cancelled => write!(f, "cancelled by the progress callback"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
