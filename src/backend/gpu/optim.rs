//! Fused multi-tensor optimizer steps (`kernels/optim.cu`): one launch updates every tensor of a
//! parameter group with the arithmetic of [`crate::optim::Sgd`] / [`crate::optim::AdamW`] (the same
//! bits, given the same step counts and hyper-parameters), and a deterministic device-side global
//! gradient norm with the clip coefficient of [`crate::optim::clip_grad_norm`].
//!
//! Each step uploads a small table: one `#[repr(C)]` entry per tensor (device pointers, length,
//! its per-step scalars) and, per chunk of [`CHUNK`] elements, the tensor it belongs to. Blocks walk
//! the chunks grid-stride, so a group of many small tensors and one of a few large ones both fill
//! the device. The table buffer is dropped after the launch (stream order keeps it alive).

use super::kernels::OPTIM;
use super::{Arg, Gpu, Launch, BLOCK, BLOCKS_PER_SM};
use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWOptions, Sgd, SgdOptions};
use crate::tensor::DType;

/// Elements per chunk (one block's work item) by default.
pub const CHUNK: usize = 4096;

/// Threads per block of the norm kernels (`NORM_THREADS` in kernels/optim.cu).
const NORM_THREADS: u32 = 256;

/// One tensor of an SGD step, as the kernel's `SgdTensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SgdTensor {
    pub param: u64,
    pub grad: u64,
    pub buf: u64,
    pub n: u64,
    pub chunk0: u64,
    pub first: i32,
    pub decay: i32,
}

/// The group scalars of an SGD step, as the kernel's `SgdCoef` (f32, rounded as the CPU rounds).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SgdCoef {
    pub sign: f32,
    pub wd: f32,
    pub momentum: f32,
    pub one_minus_dampening: f32,
    pub neg_lr: f32,
    pub momentum_on: i32,
    pub nesterov: i32,
    pub pad: i32,
}

/// One tensor of an AdamW step, as the kernel's `AdamTensor` (its own step's scalars included).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamTensor {
    pub param: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    pub vmax: u64,
    pub n: u64,
    pub chunk0: u64,
    pub bias_correction2_sqrt: f32,
    pub neg_step_size: f32,
    pub decay_factor: f32,
    pub decay: i32,
}

/// The group scalars of an AdamW step, as the kernel's `AdamCoef`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamCoef {
    pub lerp_weight: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub amsgrad: i32,
    pub small: i32,
}

/// One gradient of a norm / scale launch, as the kernel's `NormTensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NormTensor {
    pub grad: u64,
    pub n: u64,
    pub chunk0: u64,
}

/// How a group's tensors split into chunks: the first chunk of each tensor and each chunk's tensor.
#[derive(Clone, Debug)]
struct Chunks {
    lens: Vec<usize>,
    chunk: usize,
    chunk0: Vec<u64>,
    tensor_of: Vec<u32>,
}

impl Chunks {
    fn new(what: &str, lens: &[usize], chunk: usize) -> Result<Chunks> {
        if chunk == 0 || chunk > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "{what}: chunk length {chunk} must be in 1..={}",
                i32::MAX
            )));
        }
        if lens.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "{what}: {} tensors is too many",
                lens.len()
            )));
        }
        let mut chunk0 = Vec::with_capacity(lens.len());
        let mut tensor_of = Vec::new();
        for (t, &n) in lens.iter().enumerate() {
            chunk0.push(tensor_of.len() as u64);
            let k = n.div_ceil(chunk);
            if tensor_of.len() + k > u32::MAX as usize {
                return Err(Error::InvalidArgument(format!(
                    "{what}: more than {} chunks of {chunk} elements",
                    u32::MAX
                )));
            }
            tensor_of.extend(std::iter::repeat_n(t as u32, k));
        }
        Ok(Chunks {
            lens: lens.to_vec(),
            chunk,
            chunk0,
            tensor_of,
        })
    }

    fn count(&self) -> usize {
        self.tensor_of.len()
    }

    /// Checks one launch's tensor count against the plan's.
    fn check_count(&self, what: &str, got: usize) -> Result<()> {
        if got != self.lens.len() {
            return Err(Error::Shape(format!(
                "{what}: {got} tensors passed to a plan for {}",
                self.lens.len()
            )));
        }
        Ok(())
    }

    /// Uploads `entries` followed by the chunk → tensor table; returns the buffer and both addresses.
    fn upload<G: Gpu, T: bytemuck::Pod>(&self, g: &G, entries: &[T]) -> Result<(G::Buf, u64, u64)> {
        let mut bytes = bytemuck::cast_slice::<T, u8>(entries).to_vec();
        bytes.resize(bytes.len().div_ceil(8) * 8, 0);
        let off = bytes.len() as u64;
        bytes.extend_from_slice(bytemuck::cast_slice(&self.tensor_of));
        let buf = g.upload(&bytes)?;
        let p = g.ptr(&buf);
        Ok((buf, p, p + off))
    }

    fn blocks(&self, g: &impl Gpu) -> u32 {
        let cap = g.multiprocessors().max(1).saturating_mul(BLOCKS_PER_SM) as usize;
        self.count().clamp(1, cap) as u32
    }
}

fn grad_suffix(what: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => Err(Error::InvalidArgument(format!(
            "{what} on CUDA: gradient dtype {d:?} is not supported (f32 or bf16)"
        ))),
    }
}

fn check_lr(what: &str, lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{what}: learning rate must be finite and >= 0, got {lr}"
        )));
    }
    Ok(())
}

fn check_ptr(what: &str, t: usize, name: &str, p: u64, n: usize) -> Result<()> {
    if p == 0 && n > 0 {
        return Err(Error::NullPointer(format!(
            "{what}: tensor {t} has a null {name} pointer"
        )));
    }
    Ok(())
}

fn grad_scale_arg(grad_scale: Option<u64>) -> Arg {
    Arg::Ptr(grad_scale.unwrap_or(0))
}

/// One tensor of an SGD step: device addresses of its f32 weights, its gradient (the plan's
/// gradient dtype) and its f32 momentum buffer (unused, may be 0, without momentum).
#[derive(Clone, Copy, Debug)]
pub struct SgdTensorArgs {
    pub param: u64,
    pub grad: u64,
    pub momentum_buffer: u64,
    /// The parameter's first step with momentum: the buffer is set to the gradient, not read
    /// (the CPU optimiser's buffer did not exist yet).
    pub first_step: bool,
    /// Whether the weight decay applies to this parameter.
    pub weight_decay: bool,
}

/// An SGD step over a parameter group with fixed tensor lengths (torch.optim.SGD semantics).
#[derive(Clone, Debug)]
pub struct SgdPlan {
    opts: SgdOptions,
    grad_dtype: DType,
    chunks: Chunks,
}

impl SgdPlan {
    /// Checks the options as [`Sgd::new`] does, the gradient dtype (f32 or bf16), and the lengths.
    pub fn new(opts: SgdOptions, grad_dtype: DType, lens: &[usize]) -> Result<Self> {
        Sgd::new(opts)?;
        grad_suffix("sgd", grad_dtype)?;
        Ok(SgdPlan {
            opts,
            grad_dtype,
            chunks: Chunks::new("sgd", lens, CHUNK)?,
        })
    }

    /// The same plan with `chunk` elements per work item (tests use small ones).
    pub fn with_chunk(self, chunk: usize) -> Result<Self> {
        let chunks = Chunks::new("sgd", &self.chunks.lens, chunk)?;
        Ok(SgdPlan { chunks, ..self })
    }

    pub fn lens(&self) -> &[usize] {
        &self.chunks.lens
    }

    /// One step at learning rate `lr`: w, the momentum buffers updated in place. With
    /// `grad_scale` (the address of one f32, e.g. [`GradNormPlan::norm`]'s coefficient) every
    /// gradient is first multiplied by it, as `clip_grad_norm`'s in-place scaling would.
    ///
    /// # Safety
    /// For each tensor t (one per plan length, in order): `param` addresses `lens[t]` f32, `grad`
    /// `lens[t]` elements of the gradient dtype, `momentum_buffer` (with momentum) `lens[t]` f32,
    /// all distinct; `grad_scale`, when given, one f32.
    pub unsafe fn step(
        &self,
        g: &impl Gpu,
        tensors: &[SgdTensorArgs],
        lr: f64,
        grad_scale: Option<u64>,
    ) -> Result<()> {
        const WHAT: &str = "sgd on CUDA";
        self.chunks.check_count(WHAT, tensors.len())?;
        check_lr(WHAT, lr)?;
        let o = self.opts;
        let momentum_on = o.momentum != 0.0;
        let mut table = Vec::with_capacity(tensors.len());
        for (t, (a, &n)) in tensors.iter().zip(&self.chunks.lens).enumerate() {
            check_ptr(WHAT, t, "param", a.param, n)?;
            check_ptr(WHAT, t, "grad", a.grad, n)?;
            if momentum_on {
                check_ptr(WHAT, t, "momentum buffer", a.momentum_buffer, n)?;
            }
            table.push(SgdTensor {
                param: a.param,
                grad: a.grad,
                buf: a.momentum_buffer,
                n: n as u64,
                chunk0: self.chunks.chunk0[t],
                first: (momentum_on && a.first_step) as i32,
                decay: (a.weight_decay && o.weight_decay != 0.0) as i32,
            });
        }
        if self.chunks.count() == 0 {
            return Ok(());
        }
        let coef = SgdCoef {
            sign: if o.maximize { -1.0 } else { 1.0 },
            wd: o.weight_decay as f32,
            momentum: o.momentum as f32,
            one_minus_dampening: (1.0 - o.dampening) as f32,
            neg_lr: (-lr) as f32,
            momentum_on: momentum_on as i32,
            nesterov: o.nesterov as i32,
            pad: 0,
        };
        let (_table, tp, cp) = self.chunks.upload(g, &table)?;
        g.launch(&Launch {
            module: &OPTIM,
            entry: format!("sgd_step_{}", grad_suffix(WHAT, self.grad_dtype)?),
            grid: [self.chunks.blocks(g), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(tp),
                Arg::Ptr(cp),
                Arg::U64(self.chunks.count() as u64),
                Arg::I32(self.chunks.chunk as i32),
                Arg::pod(&coef),
                grad_scale_arg(grad_scale),
            ],
        })
    }
}

/// One tensor of an AdamW step: device addresses of its f32 weights, gradient (the plan's dtype),
/// f32 moments, and the parameter's own step count for this step (1 on its first step).
#[derive(Clone, Copy, Debug)]
pub struct AdamWTensorArgs {
    pub param: u64,
    pub grad: u64,
    pub exp_avg: u64,
    pub exp_avg_sq: u64,
    /// amsgrad only (may be 0 otherwise).
    pub max_exp_avg_sq: u64,
    /// torch's `state[p]["step"]` after its increment: 1, 2, …
    pub step: u64,
    pub weight_decay: bool,
}

/// An AdamW step over a parameter group with fixed tensor lengths (torch.optim.AdamW semantics).
#[derive(Clone, Debug)]
pub struct AdamWPlan {
    opts: AdamWOptions,
    grad_dtype: DType,
    chunks: Chunks,
}

impl AdamWPlan {
    /// Checks the options as [`AdamW::new`] does, the gradient dtype (f32 or bf16), and the lengths.
    pub fn new(opts: AdamWOptions, grad_dtype: DType, lens: &[usize]) -> Result<Self> {
        AdamW::new(opts)?;
        grad_suffix("adamw", grad_dtype)?;
        Ok(AdamWPlan {
            opts,
            grad_dtype,
            chunks: Chunks::new("adamw", lens, CHUNK)?,
        })
    }

    /// The same plan with `chunk` elements per work item (tests use small ones).
    pub fn with_chunk(self, chunk: usize) -> Result<Self> {
        let chunks = Chunks::new("adamw", &self.chunks.lens, chunk)?;
        Ok(AdamWPlan { chunks, ..self })
    }

    pub fn lens(&self) -> &[usize] {
        &self.chunks.lens
    }

    /// One step at learning rate `lr`: weights and moments updated in place (see
    /// [`SgdPlan::step`] for `grad_scale`).
    ///
    /// # Safety
    /// For each tensor t (one per plan length, in order): `param`, `exp_avg`, `exp_avg_sq` (and
    /// `max_exp_avg_sq` with amsgrad) address `lens[t]` f32, `grad` `lens[t]` elements of the
    /// gradient dtype, all distinct; `grad_scale`, when given, one f32.
    pub unsafe fn step(
        &self,
        g: &impl Gpu,
        tensors: &[AdamWTensorArgs],
        lr: f64,
        grad_scale: Option<u64>,
    ) -> Result<()> {
        const WHAT: &str = "adamw on CUDA";
        self.chunks.check_count(WHAT, tensors.len())?;
        check_lr(WHAT, lr)?;
        let o = self.opts;
        let (b1, b2) = o.betas;
        let mut table = Vec::with_capacity(tensors.len());
        for (t, (a, &n)) in tensors.iter().zip(&self.chunks.lens).enumerate() {
            check_ptr(WHAT, t, "param", a.param, n)?;
            check_ptr(WHAT, t, "grad", a.grad, n)?;
            check_ptr(WHAT, t, "exp_avg", a.exp_avg, n)?;
            check_ptr(WHAT, t, "exp_avg_sq", a.exp_avg_sq, n)?;
            if o.amsgrad {
                check_ptr(WHAT, t, "max_exp_avg_sq", a.max_exp_avg_sq, n)?;
            }
            if a.step == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{WHAT}: tensor {t} has step count 0 (the first step is 1)"
                )));
            }
            // As src/optim/adamw.rs's Coef::new: scalars in f64, rounded to f32.
            let st = a.step as f64;
            let bias_correction1 = 1.0 - b1.powf(st);
            let bias_correction2 = 1.0 - b2.powf(st);
            table.push(AdamTensor {
                param: a.param,
                grad: a.grad,
                m: a.exp_avg,
                v: a.exp_avg_sq,
                vmax: a.max_exp_avg_sq,
                n: n as u64,
                chunk0: self.chunks.chunk0[t],
                bias_correction2_sqrt: bias_correction2.sqrt() as f32,
                neg_step_size: (-(lr / bias_correction1)) as f32,
                decay_factor: (1.0 - lr * o.weight_decay) as f32,
                decay: (a.weight_decay && o.weight_decay != 0.0) as i32,
            });
        }
        if self.chunks.count() == 0 {
            return Ok(());
        }
        let lerp_weight = (1.0 - b1) as f32;
        let coef = AdamCoef {
            lerp_weight,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: o.eps as f32,
            amsgrad: o.amsgrad as i32,
            small: (lerp_weight.abs() < 0.5) as i32,
        };
        let (_table, tp, cp) = self.chunks.upload(g, &table)?;
        g.launch(&Launch {
            module: &OPTIM,
            entry: format!("adamw_step_{}", grad_suffix(WHAT, self.grad_dtype)?),
            grid: [self.chunks.blocks(g), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(tp),
                Arg::Ptr(cp),
                Arg::U64(self.chunks.count() as u64),
                Arg::I32(self.chunks.chunk as i32),
                Arg::pod(&coef),
                grad_scale_arg(grad_scale),
            ],
        })
    }
}

/// The joint norm of a group's gradients and `clip_grad_norm`'s coefficient, on the device and
/// deterministic (per-chunk f64 partials, added in a fixed order whatever the grid).
#[derive(Clone, Debug)]
pub struct GradNormPlan {
    grad_dtype: DType,
    norm_type: f64,
    max_norm: f64,
    chunks: Chunks,
}

impl GradNormPlan {
    /// `norm_type` is any p > 0 or `f64::INFINITY`; `max_norm` ≥ 0 (as `clip_grad_norm` checks).
    pub fn new(grad_dtype: DType, lens: &[usize], max_norm: f64, norm_type: f64) -> Result<Self> {
        if norm_type.is_nan() || norm_type <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "clip_grad_norm on CUDA: norm_type must be > 0 or infinity, got {norm_type}"
            )));
        }
        if max_norm.is_nan() || max_norm < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "clip_grad_norm on CUDA: max_norm must be >= 0, got {max_norm}"
            )));
        }
        grad_suffix("clip_grad_norm", grad_dtype)?;
        Ok(GradNormPlan {
            grad_dtype,
            norm_type,
            max_norm,
            chunks: Chunks::new("clip_grad_norm", lens, CHUNK)?,
        })
    }

    /// The same plan with `chunk` elements per partial sum (tests use small ones).
    pub fn with_chunk(self, chunk: usize) -> Result<Self> {
        let chunks = Chunks::new("clip_grad_norm", &self.chunks.lens, chunk)?;
        Ok(GradNormPlan { chunks, ..self })
    }

    fn kind(&self) -> (i32, f64) {
        match self.norm_type {
            p if p == 2.0 => (0, p),
            p if p == 1.0 => (1, p),
            p if p == f64::INFINITY => (2, p),
            p => (3, p),
        }
    }

    fn table(&self, what: &str, grads: &[u64]) -> Result<Vec<NormTensor>> {
        self.chunks.check_count(what, grads.len())?;
        grads
            .iter()
            .zip(&self.chunks.lens)
            .enumerate()
            .map(|(t, (&p, &n))| {
                check_ptr(what, t, "grad", p, n)?;
                Ok(NormTensor {
                    grad: p,
                    n: n as u64,
                    chunk0: self.chunks.chunk0[t],
                })
            })
            .collect()
    }

    /// Writes the joint norm (one f64) to `out_norm` and the clip coefficient
    /// `min(1, max_norm / (norm + 1e-6))` (one f32, formed as `clip_grad_norm` forms it; NaN for a
    /// NaN norm, 0 for an infinite one) to `out_coef`. A caller that must reject a non-finite norm
    /// (`error_if_nonfinite`) downloads `out_norm`.
    ///
    /// # Safety
    /// `grads[t]` addresses `lens[t]` elements of the gradient dtype; `out_norm` one f64,
    /// `out_coef` one f32.
    pub unsafe fn norm(
        &self,
        g: &impl Gpu,
        grads: &[u64],
        out_norm: u64,
        out_coef: u64,
    ) -> Result<()> {
        const WHAT: &str = "clip_grad_norm on CUDA";
        let table = self.table(WHAT, grads)?;
        let (kind, p) = self.kind();
        let chunks = self.chunks.count();
        let partial = g.alloc(chunks.max(1) * 8)?;
        let pp = g.ptr(&partial);
        let (_table, tp, cp) = self.chunks.upload(g, &table)?;
        if chunks > 0 {
            g.launch(&Launch {
                module: &OPTIM,
                entry: format!("grad_norm_partial_{}", grad_suffix(WHAT, self.grad_dtype)?),
                grid: [self.chunks.blocks(g), 1, 1],
                block: [NORM_THREADS, 1, 1],
                shared_bytes: 0,
                args: vec![
                    Arg::Ptr(tp),
                    Arg::Ptr(cp),
                    Arg::U64(chunks as u64),
                    Arg::I32(self.chunks.chunk as i32),
                    Arg::I32(kind),
                    Arg::F64(p),
                    Arg::Ptr(pp),
                ],
            })?;
        }
        g.launch(&Launch {
            module: &OPTIM,
            entry: "grad_norm_finish".into(),
            grid: [1, 1, 1],
            block: [NORM_THREADS, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(pp),
                Arg::U64(chunks as u64),
                Arg::I32(kind),
                Arg::F64(p),
                Arg::F32(self.max_norm as f32),
                Arg::Ptr(out_norm),
                Arg::Ptr(out_coef),
            ],
        })
    }

    /// Multiplies every (f32) gradient in place by the f32 at `coef` (nothing when it is 1), as
    /// `clip_grad_norm` scales them. Optimizer steps can instead take `coef` as `grad_scale`.
    ///
    /// # Safety
    /// `grads[t]` addresses `lens[t]` f32; `coef` one f32.
    pub unsafe fn scale(&self, g: &impl Gpu, grads: &[u64], coef: u64) -> Result<()> {
        const WHAT: &str = "clip_grad_norm on CUDA";
        if self.grad_dtype != DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "{WHAT}: in-place scaling needs f32 gradients (got {:?}); pass the coefficient as the \
                 optimizer step's grad_scale instead",
                self.grad_dtype
            )));
        }
        let table = self.table(WHAT, grads)?;
        if self.chunks.count() == 0 {
            return Ok(());
        }
        let (_table, tp, cp) = self.chunks.upload(g, &table)?;
        g.launch(&Launch {
            module: &OPTIM,
            entry: "grad_scale_f32".into(),
            grid: [self.chunks.blocks(g), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(tp),
                Arg::Ptr(cp),
                Arg::U64(self.chunks.count() as u64),
                Arg::I32(self.chunks.chunk as i32),
                Arg::Ptr(coef),
            ],
        })
    }
}

/// One tensor of an EMA update, as the kernel's `EmaTensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EmaTensor {
    pub ema: u64,
    pub param: u64,
    pub n: u64,
    pub chunk0: u64,
}

/// The exponential moving average of a parameter group in one launch: for every tensor,
/// `ema ← ema − omd·(ema − w)` in f32 with the CPU's rounding (`diffusion::train`'s EMA update,
/// bit for bit; `omd` = 1 − decay).
#[derive(Clone, Debug)]
pub struct EmaPlan {
    chunks: Chunks,
}

impl EmaPlan {
    pub fn new(lens: &[usize]) -> Result<Self> {
        Ok(EmaPlan {
            chunks: Chunks::new("EMA update", lens, CHUNK)?,
        })
    }

    /// The same plan with `chunk` elements per block work item (tests use small ones).
    pub fn with_chunk(self, chunk: usize) -> Result<Self> {
        Ok(EmaPlan {
            chunks: Chunks::new("EMA update", &self.chunks.lens, chunk)?,
        })
    }

    /// `emas[t] ← emas[t] − omd·(emas[t] − params[t])` for every tensor t.
    ///
    /// # Safety
    /// `emas[t]` and `params[t]` address `lens[t]` f32 each, in distinct buffers.
    pub unsafe fn update(
        &self,
        g: &impl Gpu,
        emas: &[u64],
        params: &[u64],
        omd: f32,
    ) -> Result<()> {
        const WHAT: &str = "EMA update on CUDA";
        self.chunks.check_count(WHAT, emas.len())?;
        self.chunks.check_count(WHAT, params.len())?;
        if !omd.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "{WHAT}: 1 − decay must be finite, got {omd}"
            )));
        }
        let table = emas
            .iter()
            .zip(params)
            .zip(&self.chunks.lens)
            .enumerate()
            .map(|(t, ((&e, &p), &n))| {
                check_ptr(WHAT, t, "EMA", e, n)?;
                check_ptr(WHAT, t, "param", p, n)?;
                Ok(EmaTensor {
                    ema: e,
                    param: p,
                    n: n as u64,
                    chunk0: self.chunks.chunk0[t],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if self.chunks.count() == 0 {
            return Ok(());
        }
        let (_table, tp, cp) = self.chunks.upload(g, &table)?;
        g.launch(&Launch {
            module: &OPTIM,
            entry: "ema_update_f32".into(),
            grid: [self.chunks.blocks(g), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(tp),
                Arg::Ptr(cp),
                Arg::U64(self.chunks.count() as u64),
                Arg::I32(self.chunks.chunk as i32),
                Arg::F32(omd),
            ],
        })
    }
}
