//! Ops: one file per op family, each dispatching to the CPU or CUDA backend by the tensor's device.
pub mod activation;
pub mod attention;
pub mod adversarial;
pub mod conv;
pub mod elementwise;
#[doc(hidden)]
pub mod gradcheck;
pub mod loss;
pub mod mil;
pub mod norm;
