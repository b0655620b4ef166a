//! The diffusion sampler's step on the device (`kernels/sampler.cu`): classifier-free guidance and
//! one DDPM / DDIM update per value, with the coefficients of
//! [`crate::diffusion::scheduler::Scheduler::step_coefficients`], in f64 like the CPU step.

use super::kernels::SAMPLER;
use super::{grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::diffusion::scheduler::StepCoefficients;
use crate::error::{Error, Result};

/// kernels/sampler.cu's `StepCoef`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StepCoef {
    p: f64,
    q: f64,
    r: f64,
    s_x: f64,
    u: f64,
    w: f64,
    std: f64,
    clip: f64,
    guidance: f64,
    eps_term: i32,
    guided: i32,
    noisy: i32,
    _pad: i32,
}

/// x_prev and x0 from the sample `x` and the model output `y`, all f32 with `n` values (`y` 2n,
/// [cond; uncond], when `guidance` is Some(scale)): m = y, or (1 − s)·uncond + s·cond rounded to
/// f32 as [`crate::diffusion::scheduler::guide`] does; then the step of `c`. `z` (n values) is the
/// noise when `c.adds_noise`.
///
/// # Safety
/// The pointers address buffers of those sizes; `x_prev` and `x0` are distinct from the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn step(
    g: &impl Gpu,
    c: &StepCoefficients,
    guidance: Option<f64>,
    x: u64,
    y: u64,
    z: Option<u64>,
    x_prev: u64,
    x0: u64,
    n: usize,
) -> Result<()> {
    if c.adds_noise && z.is_none() {
        return Err(Error::InvalidArgument(
            "sampler step: this step adds noise but no noise buffer was given".into(),
        ));
    }
    if let Some(s) = guidance {
        if !s.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "sampler step: guidance scale {s} is not finite"
            )));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let coef = StepCoef {
        p: c.p,
        q: c.q,
        r: c.r,
        s_x: c.s,
        u: c.u,
        w: c.w,
        std: c.std,
        clip: c.clip.unwrap_or(0.0),
        guidance: guidance.unwrap_or(1.0),
        eps_term: c.eps_term as i32,
        guided: guidance.is_some() as i32,
        noisy: c.adds_noise as i32,
        _pad: 0,
    };
    g.launch(&Launch {
        module: &SAMPLER,
        entry: "sampler_step_f32".into(),
        grid: [grid_stride_blocks(g, n), 1, 1],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(x),
            Arg::Ptr(y),
            // Never read unless noisy: any valid address will do.
            Arg::Ptr(z.unwrap_or(x)),
            Arg::Ptr(x_prev),
            Arg::Ptr(x0),
            Arg::U64(n as u64),
            Arg::pod(&coef),
        ],
    })
}
