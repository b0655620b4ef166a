//! Diffusion sampling on a [`Gpu`]: [`super::train::sample`] with the U-Net passes on the device
//! ([`GpuUNet::forward_device`]) and the guidance + DDPM / DDIM update as one kernel
//! (`backend::gpu::sampler`); the sample never leaves the device between steps. The noise comes
//! from the same seeded scheduler RNG in the same order as on the CPU, so both samplers produce the
//! same latents up to rounding.

use super::gpu::GpuUNet;
use super::scheduler::Scheduler;
use super::train::{check_sample, GuidedConditions, SampleOptions};
use super::unet::{nchw_to_nhwc, nhwc_to_nchw, Conditioning};
use crate::backend::gpu::{sampler, Gpu};
use crate::error::{Error, Result};

/// [`super::train::sample`] on the device: `n` latents (NCHW f32, out_channels × `h` × `w`).
/// `progress(done, total)` is called after each step is queued; returning false cancels
/// (`Error::Cancelled`).
#[allow(clippy::too_many_arguments)]
pub fn sample<G: Gpu>(
    g: &G,
    model: &GpuUNet<G>,
    opts: &SampleOptions,
    cond: &Conditioning<'_, f32>,
    n: usize,
    h: usize,
    w: usize,
    mut progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
) -> Result<Vec<f32>> {
    let cfg = model.config();
    let c = cfg.in_channels;
    let guided = check_sample(cfg, opts)?;
    cfg.check_inputs(n, c, h, w, &vec![0.0; n], cond)?;
    let mut sched = Scheduler::new(opts.scheduler, opts.seed)?;
    sched.set_timesteps(opts.steps)?;
    let doubled = GuidedConditions::new(cfg, cond, n);
    let cond2 = doubled.get();
    let (nn, pass_cond) = if guided { (2 * n, &cond2) } else { (n, cond) };

    let len = n * c * h * w;
    let bytes = len * 4;
    let mut x = g.upload_slice(&nchw_to_nhwc(&sched.noise(len), n, c, h, w))?;
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len();
    for (k, &t) in timesteps.iter().enumerate() {
        // The U-Net consumes its input: a copy of x (twice for the guided batch).
        let input = g.alloc(nn / n * bytes)?;
        for half in 0..nn / n {
            // SAFETY: x holds `bytes`, input nn / n times as many.
            unsafe { g.copy(g.ptr(&x), g.ptr(&input) + (half * bytes) as u64, bytes)? };
        }
        let y = model.forward_device(g, input, nn, h, w, &vec![t as f64; nn], pass_cond)?;
        let coef = sched.step_coefficients(t)?;
        let z = if coef.adds_noise {
            Some(g.upload_slice(&nchw_to_nhwc(&sched.noise(len), n, c, h, w))?)
        } else {
            None
        };
        let (prev, x0) = (g.alloc(bytes)?, g.alloc(bytes)?);
        // SAFETY: x, prev, x0 and z hold len f32; y nn / n · len; prev and x0 are fresh.
        unsafe {
            sampler::step(
                g,
                &coef,
                guided.then_some(opts.guidance_scale),
                g.ptr(&x),
                g.ptr(&y),
                z.as_ref().map(|z| g.ptr(z)),
                g.ptr(&prev),
                g.ptr(&x0),
                len,
            )?
        };
        x = prev;
        if let Some(cb) = progress.as_mut() {
            if !cb(k + 1, total) {
                return Err(Error::Cancelled);
            }
        }
    }
    let out = g.download_vec(&x, len)?;
    Ok(nhwc_to_nchw(&out, n, c, h, w))
}
