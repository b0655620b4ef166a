//! Optimisers (SGD as torch.optim.SGD, AdamW), learning-rate schedules and gradient clipping.
