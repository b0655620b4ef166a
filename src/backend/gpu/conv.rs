//! Dense k × k convolutions on a [`super::Gpu`] (placeholder: being written).
