//! Weakly supervised training of the Cell Painting CNN (REFERENCE §2): data, augmentation, sampling,
//! splits, validation, the training loop and checkpoints.
pub mod augment;
pub mod checkpoint;
mod device;
pub mod domain;
pub mod mil;
pub mod prefetch;
pub mod sampler;
pub mod split;
pub mod trainer;
pub mod validation;

pub use domain::{DomainAdversarial, GrlLambda};
pub use mil::MilOptions;
pub use trainer::{
    Compute, Dataset, DecayScope, EpochReport, Event, OnlineLabelSmoothing, OptimizerKind, Trainer,
    TrainerOptions,
};
pub mod config;
pub mod synthetic;
