//! Ops: one file per op family, each dispatching to the CPU or CUDA backend by the tensor's device.
pub mod activation;
pub mod adversarial;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gelu;
#[doc(hidden)]
pub mod gradcheck;
pub mod groupnorm;
pub mod loss;
pub mod mil;
pub mod norm;
pub mod packed;
pub mod shape;
