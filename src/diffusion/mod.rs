//! Latent diffusion (REFERENCE §10): noise schedules and samplers.
pub mod config;
pub mod gpu;
pub mod gpu_sample;
pub mod gpu_train;
pub mod gpu_vae;
pub mod scheduler;
pub mod train;
pub mod unet;
pub mod vae;
