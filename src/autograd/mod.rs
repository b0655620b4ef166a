//! Reverse-mode automatic differentiation: a tape of recorded ops, parameters and their gradients.
