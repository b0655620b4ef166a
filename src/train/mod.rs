//! Weakly supervised training of the Cell Painting CNN (REFERENCE §2): data, augmentation, sampling,
//! splits, validation, the training loop and checkpoints.
