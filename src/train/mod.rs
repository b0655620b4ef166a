//! Weakly supervised training of the Cell Painting CNN (REFERENCE §2): data, augmentation, sampling,
//! splits, validation, the training loop and checkpoints.
pub mod augment;
pub mod prefetch;
pub mod sampler;
pub mod split;
pub mod validation;
pub mod checkpoint;
pub mod trainer;

pub use trainer::{DecayScope, Dataset, EpochReport, Event, OptimizerKind, Trainer, TrainerOptions};
pub mod synthetic;
pub mod config;
