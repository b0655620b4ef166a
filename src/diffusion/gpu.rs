//! The diffusion U-Net ([`DiffusionUNet`]) on a [`Gpu`]: the CPU forward of `unet.rs` composed
//! from the launch layer's kernels and GEMMs, f32 storage, NHWC activations inside.
//!
//! - time embedding: MONAI's sinusoidal table computed on the host (N × channels[0] values, the
//!   CPU's float32 arithmetic) and uploaded; `time_embed.0` / `.2` GEMMs, SiLU; the class and
//!   confounder tables gathered by the embedding kernel (null value → the table's last row) and
//!   added; SiLU once (every residual block projects SiLU(embedding));
//! - context: built on the host as the CPU builds it (null-flagged samples take the learned
//!   `null_context` in every token) and uploaded;
//! - convolutions: 3 × 3 (stride 1 or 2) by the dense convolution of `backend::gpu::conv`, 1 × 1
//!   (skip connections, `proj_in`, `proj_out`) and linear layers by GEMM + per-channel bias;
//! - residual blocks: GroupNorm with fused SiLU, conv, plus the projected embedding per sample,
//!   GroupNorm with SiLU, conv, plus the skip; resampling residual blocks (`resblock_updown`) by nearest 2× upsampling
//!   or 2 × 2 average pooling (a stride-2 depthwise convolution with weights ¼ on a 2 × 2 window);
//! - attention: `SpatialAttentionBlock` (GroupNorm, q / k / v GEMMs with bias, flash attention,
//!   out_proj, + residual) or `SpatialTransformer` (GroupNorm, proj_in, LayerNorm → self-attention,
//!   LayerNorm → cross-attention on the context, LayerNorm → GEGLU feed-forward, each + residual,
//!   proj_out, + residual);
//! - up path: skip concatenation on the channel axis, nearest 2× upsampling + conv;
//! - out: GroupNorm + SiLU, conv.
//!
//! Training: [`GpuUNet::forward_backward`] records the pass on a small device tape (each op's
//! saved inputs and statistics, values by id; everything out of place) and walks it backwards
//! with the kernels' backward launchers and GEMMs, gradients of shared values (the embedding, the
//! context, the skips) summed; it returns the input and every parameter gradient, as the CPU
//! tape's `backward_with`. Each parameter enters the pass once.
//!
//! Mixed precision ([`GpuUNet::set_compute`] with `DType::BF16`), as torch autocast runs the model:
//! the parameters stay f32 (the masters); a bf16 working copy of them, made when bf16 is switched
//! on, is what the GEMMs and convolutions read; activations and their gradients are bf16 from the
//! input cast to the output cast (GroupNorm / LayerNorm statistics, affine parameters and their
//! gradients f32, attention's softmax and log-sum-exp f32, every kernel's arithmetic f32). The
//! time / class / confounder embedding MLP and the null-context selection stay f32 (per-sample
//! vectors) and are cast once. The input, the output, the input gradient and every parameter
//! gradient are f32 on either path; linear weight gradients come out of the GEMM in f32 from bf16
//! operands, convolution and bias gradients in bf16 (as autocast's), widened to f32.
//!
//! Runs on a CUDA device (`backend::cuda`) and, in the tests, on the CPU emulation of the kernels
//! (`tests/gpu/parity/unet.rs`: parity with the CPU forward and backward in f64).

use super::unet::{monai_timestep_embedding, nchw_to_nhwc, nhwc_to_nchw};
use super::unet::{Conditioning, DiffusionUNet, UNetConfig, NULL};
use crate::backend::gpu::attention::Attention;
use crate::backend::gpu::depthwise::Depthwise;
use crate::backend::gpu::elementwise::{cast, unary, Unary};
use crate::backend::gpu::geglu::Geglu;
use crate::backend::gpu::norm::{GroupNorm, LayerNorm};
use crate::backend::gpu::shape::{activation_backward, add, ActivationGrad};
use crate::backend::gpu::shape::{ConcatLast, Embedding, SampleChannels, Upsample2x};
use crate::backend::gpu::{Gemm, Gpu, Math};
use crate::error::{Error, Result};
use crate::ops::conv::Pad2d;
use crate::ops::norm::Act;
use crate::tensor::DType;
use std::collections::HashMap;
use std::rc::Rc;

const F32: DType = DType::F32;

// The dense convolution (`backend::gpu::conv`).
use crate::backend::gpu::conv::Conv2d;

/// torch.nn.LayerNorm's default ε (MONAI does not set it), as the CPU pass uses.
const LAYER_NORM_EPS: f64 = 1e-5;

/// One parameter on the device.
struct Param<B> {
    buf: B,
    shape: Vec<usize>,
}

/// A device value, NHWC [n, h, w, c] of `dt` (f32 or bf16; token sequences: h = length, w = 1;
/// per-sample vectors: h = w = 1), with its id on the recording (0: a constant, no gradient).
struct Val<B> {
    buf: Rc<B>,
    id: usize,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    dt: DType,
}

impl<B> Clone for Val<B> {
    fn clone(&self) -> Self {
        Val {
            buf: self.buf.clone(),
            ..*self
        }
    }
}

impl<B> Val<B> {
    fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
    fn len(&self) -> usize {
        self.rows() * self.c
    }
    fn bytes(&self) -> usize {
        self.len() * self.dt.size_in_bytes()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resample {
    None,
    Up,
    Down,
}

/// What the backward of one op needs (`y`: the output's id).
enum Node<B> {
    Linear {
        x: Val<B>,
        key: String,
        bias: bool,
        y: usize,
    },
    Conv {
        x: Val<B>,
        key: String,
        stride: usize,
        pad: Pad2d,
        y: usize,
    },
    /// GroupNorm (`Some(act)`) or LayerNorm (`None`) with the saved statistics.
    Norm {
        x: Val<B>,
        key: String,
        group: Option<Act>,
        mean: B,
        invstd: B,
        y: usize,
    },
    Silu {
        x: Val<B>,
        y: usize,
    },
    Add {
        a: usize,
        b: usize,
        len: usize,
        dt: DType,
        y: usize,
    },
    AddPerSample {
        x: usize,
        e: usize,
        shape: [usize; 3],
        dt: DType,
        y: usize,
    },
    Attention {
        qkv: [Val<B>; 3],
        o: Rc<B>,
        lse: B,
        plan: Attention,
        y: usize,
    },
    Geglu {
        x: Val<B>,
        y: usize,
    },
    Upsample {
        x: usize,
        shape: [usize; 4],
        dt: DType,
        y: usize,
    },
    AvgPool {
        x: usize,
        shape: [usize; 4],
        dt: DType,
        taps: B,
        y: usize,
    },
    Concat {
        a: usize,
        b: usize,
        rows: usize,
        widths: [usize; 2],
        dt: DType,
        y: usize,
    },
    /// x (`len` values) converted from `from` to `to`.
    Cast {
        x: usize,
        len: usize,
        from: DType,
        to: DType,
        y: usize,
    },
    Embedding {
        key: String,
        plan: Embedding,
        y: usize,
    },
    /// The context with null-flagged samples' tokens taken from `null_context` (`sel`: 1 for
    /// those tokens, 0 elsewhere).
    NullContext {
        sel: Vec<f32>,
        d: usize,
        y: usize,
    },
}

/// The ops of one forward pass, recorded for the backward when `on`.
struct Rec<B> {
    on: bool,
    next: usize,
    nodes: Vec<Node<B>>,
}

impl<B> Rec<B> {
    fn new(on: bool) -> Self {
        Rec {
            on,
            next: 0,
            nodes: Vec::new(),
        }
    }
    fn id(&mut self) -> usize {
        if self.on {
            self.next += 1;
            self.next
        } else {
            0
        }
    }
    fn push(&mut self, node: Node<B>) {
        if self.on {
            self.nodes.push(node);
        }
    }
}

/// The gradients of one backward pass: host copies, f32.
#[derive(Clone, Debug, Default)]
pub struct UNetGrads {
    /// ∂L/∂x, NHWC [n, h, w, in_channels].
    pub input: Vec<f32>,
    /// ∂L/∂θ for every parameter, by MONAI key (zeros for parameters the pass did not use, e.g.
    /// `null_context` when no sample was null), in each parameter's layout.
    pub params: HashMap<String, Vec<f32>>,
}

/// A [`DiffusionUNet`]'s parameters on one device (f32), and its forward and backward passes.
pub struct GpuUNet<G: Gpu> {
    config: UNetConfig,
    params: HashMap<String, Param<G::Buf>>,
    /// The activation dtype: f32 (default) or bf16 mixed precision ([`GpuUNet::set_compute`]).
    compute: DType,
    /// With bf16 compute: a bf16 copy of every parameter (what the GEMMs and convolutions read).
    working: HashMap<String, G::Buf>,
    /// The learned null context (host copy: null-flagged samples' context rows are built on the
    /// host, as on the CPU).
    null_context: Option<Vec<f32>>,
    /// GEMM and convolution arithmetic: `Math::F32` (default) or TF32 tensor cores.
    pub math: Math,
}

impl<G: Gpu> GpuUNet<G> {
    /// Uploads every parameter of `unet` (f32).
    pub fn new(g: &G, unet: &DiffusionUNet<f32>) -> Result<Self> {
        let mut params = HashMap::new();
        let mut null_context = None;
        for (name, shape, _, value) in unet.params().iter() {
            if name == "null_context" {
                null_context = Some(value.to_vec());
            }
            params.insert(
                name.to_string(),
                Param {
                    buf: g.upload_slice(value)?,
                    shape: shape.to_vec(),
                },
            );
        }
        Ok(GpuUNet {
            config: unet.config().clone(),
            params,
            compute: F32,
            working: HashMap::new(),
            null_context,
            math: Math::F32,
        })
    }

    /// Sets the activation dtype: `DType::F32` (the default) or `DType::BF16` (mixed precision,
    /// f32 parameters and gradients: see the module doc). Switching to bf16 casts every parameter
    /// into a bf16 working copy (one launch each); switching back frees it. Other dtypes are an
    /// `InvalidArgument`, and leave the model as it was.
    pub fn set_compute(&mut self, g: &G, dtype: DType) -> Result<()> {
        match dtype {
            DType::F32 => self.working.clear(),
            DType::BF16 => {
                let mut working = HashMap::with_capacity(self.params.len());
                for (key, p) in &self.params {
                    let len = p.shape.iter().product::<usize>();
                    let b = g.alloc(len * 2)?;
                    // SAFETY: p holds len f32, b len bf16 (fresh).
                    unsafe { cast(g, F32, DType::BF16, g.ptr(&p.buf), g.ptr(&b), len)? };
                    working.insert(key.clone(), b);
                }
                self.working = working;
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "GPU U-Net: compute dtype {other:?} is not supported (f32 or bf16)"
                )))
            }
        }
        self.compute = dtype;
        Ok(())
    }

    /// Each parameter's f32 master buffer: (key, device address, length), in `names`' order.
    pub(crate) fn param_ptrs(&self, g: &G, names: &[String]) -> Result<Vec<(u64, usize)>> {
        names
            .iter()
            .map(|k| {
                let p = self.param(k)?;
                Ok((g.ptr(&p.buf), p.shape.iter().product()))
            })
            .collect()
    }

    /// After the f32 masters changed in place (an optimizer step, a load): recasts the bf16
    /// working copies and refreshes the host copy of the null context.
    pub(crate) fn masters_changed(&mut self, g: &G) -> Result<()> {
        for (key, b) in &self.working {
            let p = self.param(key)?;
            let len = p.shape.iter().product::<usize>();
            // SAFETY: p holds len f32, b len bf16.
            unsafe { cast(g, F32, DType::BF16, g.ptr(&p.buf), g.ptr(b), len)? };
        }
        if self.null_context.is_some() {
            let p = self.param("null_context")?;
            let len = p.shape.iter().product::<usize>();
            self.null_context = Some(g.download_vec(&p.buf, len)?);
        }
        Ok(())
    }

    /// Overwrites the device parameters with `unet`'s (same configuration and keys).
    pub(crate) fn upload_from(&mut self, g: &G, unet: &DiffusionUNet<f32>) -> Result<()> {
        let mut fresh = Vec::with_capacity(unet.params().len());
        for (name, _, _, value) in unet.params().iter() {
            let p = self.param(name)?;
            let len = p.shape.iter().product::<usize>();
            if len != value.len() {
                return Err(Error::Shape(format!(
                    "GPU U-Net: parameter {name:?} has {len} values, the model {}",
                    value.len()
                )));
            }
            fresh.push((name.to_string(), g.upload_slice(value)?));
        }
        // Everything uploaded: replace.
        for (name, buf) in fresh {
            if let Some(p) = self.params.get_mut(&name) {
                p.buf = buf;
            }
        }
        self.masters_changed(g)
    }

    /// Copies the device parameters into `unet` (same configuration and keys).
    pub(crate) fn download_into(&self, g: &G, unet: &mut DiffusionUNet<f32>) -> Result<()> {
        let params = unet.params_mut();
        for i in 0..params.len() {
            let name = params.name(i).to_string();
            let p = self.param(&name)?;
            let v = g.download_vec::<f32>(&p.buf, p.shape.iter().product())?;
            let dst = params.value_mut(i);
            if dst.len() != v.len() {
                return Err(Error::Shape(format!(
                    "GPU U-Net: parameter {name:?} has {} values on the device, {} on the host",
                    v.len(),
                    dst.len()
                )));
            }
            dst.copy_from_slice(&v);
        }
        Ok(())
    }

    /// The activation dtype (f32 or bf16).
    pub fn compute(&self) -> DType {
        self.compute
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    fn param(&self, key: &str) -> Result<&Param<G::Buf>> {
        self.params
            .get(key)
            .ok_or_else(|| Error::MissingKey(format!("GPU U-Net: no parameter {key:?}")))
    }

    fn ptr(&self, g: &G, key: &str) -> Result<u64> {
        Ok(g.ptr(&self.param(key)?.buf))
    }

    /// Parameter `key` as a GEMM / convolution operand of dtype `dt`: the f32 master, or its bf16
    /// working copy.
    fn wptr(&self, g: &G, key: &str, dt: DType) -> Result<u64> {
        if dt == F32 {
            return self.ptr(g, key);
        }
        self.working
            .get(key)
            .map(|b| g.ptr(b))
            .ok_or_else(|| Error::Internal(format!("GPU U-Net: no {dt:?} working copy of {key:?}")))
    }

    /// Inference on NCHW input → NCHW output, as [`DiffusionUNet::predict`] (same checks).
    #[allow(clippy::too_many_arguments)]
    pub fn predict(
        &self,
        g: &G,
        x_nchw: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<Vec<f32>> {
        let c = self.config.in_channels;
        if x_nchw.len() != n * c * h * w {
            return Err(Error::Shape(format!(
                "U-Net input has {} values, expected {n} × {c} × {h} × {w}",
                x_nchw.len()
            )));
        }
        let y = self.forward(
            g,
            &nchw_to_nhwc(x_nchw, n, c, h, w),
            n,
            h,
            w,
            timesteps,
            cond,
        )?;
        Ok(nhwc_to_nchw(&y, n, self.config.out_channels, h, w))
    }

    /// Checks a host NHWC input and uploads it.
    fn upload_input(&self, g: &G, x_nhwc: &[f32], n: usize, h: usize, w: usize) -> Result<G::Buf> {
        let c = self.config.in_channels;
        if x_nhwc.len() != n * h * w * c {
            return Err(Error::Shape(format!(
                "U-Net input has {} values, expected {n} × {h} × {w} × {c}",
                x_nhwc.len()
            )));
        }
        if let Some(i) = x_nhwc.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "U-Net input value {i} (sample {}) is not finite",
                i / (c * h * w).max(1)
            )));
        }
        g.upload_slice(x_nhwc)
    }

    /// The forward pass on NHWC input [n, h, w, in_channels] → NHWC [n, h, w, out_channels] on the
    /// host, as [`DiffusionUNet::forward`] computes it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        g: &G,
        x_nhwc: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<Vec<f32>> {
        self.config
            .check_inputs(n, self.config.in_channels, h, w, timesteps, cond)?;
        let x = self.upload_input(g, x_nhwc, n, h, w)?;
        let y = self.forward_device(g, x, n, h, w, timesteps, cond)?;
        g.download_vec(&y, n * h * w * self.config.out_channels)
    }

    /// The forward pass on a device input x (NHWC [n, h, w, in_channels] f32, consumed) → a
    /// device buffer NHWC [n, h, w, out_channels] f32. Checks the conditions (not x's values).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_device(
        &self,
        g: &G,
        x: G::Buf,
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<G::Buf> {
        let cfg = &self.config;
        cfg.check_inputs(n, cfg.in_channels, h, w, timesteps, cond)?;
        let mut rec = Rec::new(false);
        let x = Val {
            buf: Rc::new(x),
            id: 0,
            n,
            h,
            w,
            c: cfg.in_channels,
            dt: F32,
        };
        let y = self.run(g, &mut rec, x, timesteps, cond)?;
        Rc::try_unwrap(y.buf).map_err(|_| Error::Internal("GPU U-Net: output still shared".into()))
    }

    /// Forward and backward: the output y (NHWC, as [`GpuUNet::forward`]) and, for the upstream
    /// gradient `dy` (NHWC, y's shape), the gradients of the input and of every parameter, as the
    /// CPU tape's `backward_with` computes them.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        g: &G,
        x_nhwc: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
        dy_nhwc: &[f32],
    ) -> Result<(Vec<f32>, UNetGrads)> {
        let cfg = &self.config;
        let (y, input, grads) =
            self.forward_backward_device(g, x_nhwc, n, h, w, timesteps, cond, dy_nhwc)?;
        let y_host = g.download_vec(&y, n * h * w * cfg.out_channels)?;
        let input = match input {
            Some(b) => g.download_vec(&b, n * h * w * cfg.in_channels)?,
            None => vec![0.0; n * h * w * cfg.in_channels],
        };
        let mut params = HashMap::new();
        for (key, p) in &self.params {
            let len = p.shape.iter().product::<usize>();
            let v = match grads.get(key) {
                Some(b) => g.download_vec(b, len)?,
                None => vec![0.0; len],
            };
            params.insert(key.clone(), v);
        }
        Ok((y_host, UNetGrads { input, params }))
    }

    /// [`Self::forward_backward`] leaving its results on the device (for a training step, or to
    /// time the passes without the copies): the output y (NHWC f32), the input gradient (None
    /// when nothing reached it: zero) and the parameter gradients by key (f32, the parameter's
    /// shape; a parameter the pass did not use has no entry: zero).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn forward_backward_device(
        &self,
        g: &G,
        x_nhwc: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
        dy_nhwc: &[f32],
    ) -> Result<(G::Buf, Option<G::Buf>, HashMap<String, G::Buf>)> {
        let cfg = &self.config;
        cfg.check_inputs(n, cfg.in_channels, h, w, timesteps, cond)?;
        let out_len = n * h * w * cfg.out_channels;
        if dy_nhwc.len() != out_len {
            return Err(Error::Shape(format!(
                "output gradient has {} values, the output {n} × {h} × {w} × {} has {out_len}",
                dy_nhwc.len(),
                cfg.out_channels
            )));
        }
        let x = self.upload_input(g, x_nhwc, n, h, w)?;
        self.forward_backward_with(g, x, n, h, w, timesteps, cond, |_| g.upload_slice(dy_nhwc))
    }

    /// [`Self::forward_backward_device`] on a device input x (NHWC [n, h, w, in_channels] f32,
    /// consumed; its values are not checked), the upstream gradient computed from the output by
    /// `dy_of` (NHWC f32, y's shape) between the passes: a loss on the device (a training step).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn forward_backward_with<F>(
        &self,
        g: &G,
        x: G::Buf,
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
        dy_of: F,
    ) -> Result<(G::Buf, Option<G::Buf>, HashMap<String, G::Buf>)>
    where
        F: FnOnce(&G::Buf) -> Result<G::Buf>,
    {
        let cfg = &self.config;
        cfg.check_inputs(n, cfg.in_channels, h, w, timesteps, cond)?;
        let mut rec = Rec::new(true);
        let x = Val {
            buf: Rc::new(x),
            id: rec.id(),
            n,
            h,
            w,
            c: cfg.in_channels,
            dt: F32,
        };
        let x_id = x.id;
        let y = self.run(g, &mut rec, x, timesteps, cond)?;
        let mut grads = Grads {
            act: HashMap::new(),
            params: HashMap::new(),
        };
        grads.act.insert(y.id, dy_of(&y.buf)?);
        let y_buf = y.buf.clone();
        drop(y);
        while let Some(node) = rec.nodes.pop() {
            self.backward_node(g, node, &mut grads)?;
        }
        drop(rec);
        let y = Rc::try_unwrap(y_buf).map_err(|_| {
            Error::Internal("GPU U-Net: output still shared after the backward".into())
        })?;
        Ok((y, grads.act.remove(&x_id), grads.params))
    }

    /// The whole pass from the input value (f32) to the output (f32), in the compute dtype between.
    fn run(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: Val<G::Buf>,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<Val<G::Buf>> {
        let cfg = &self.config;
        let levels = cfg.channels.len();
        let n = x.n;
        let cd = self.compute;
        let emb = self.embedding(g, t, n, timesteps, cond)?;
        let emb = self.cast(g, t, &emb, cd)?;
        let ctx = match self.context(g, t, n, cond)? {
            Some(c) => Some(self.cast(g, t, &c, cd)?),
            None => None,
        };
        let ctx = ctx.as_ref();
        let x = self.cast(g, t, &x, cd)?;

        // Down. The skip stack holds every map the up path concatenates; the last is the current.
        let mut skips = vec![self.conv(g, t, &x, "conv_in", 1, Pad2d::same(1))?];
        drop(x);
        for l in 0..levels {
            let k = format!("down_blocks.{l}");
            for j in 0..cfg.num_res_blocks[l] {
                let x = last(&skips)?;
                let mut h =
                    self.resnet(g, t, x, &emb, &format!("{k}.resnets.{j}"), Resample::None)?;
                if cfg.attention_levels[l] {
                    h = self.attention(g, t, &h, ctx, &format!("{k}.attentions.{j}"), l)?;
                }
                skips.push(h);
            }
            if l + 1 < levels {
                let x = last(&skips)?;
                let d = if cfg.resblock_updown {
                    self.resnet(g, t, x, &emb, &format!("{k}.downsampler"), Resample::Down)?
                } else {
                    self.conv(g, t, x, &format!("{k}.downsampler.op"), 2, Pad2d::same(1))?
                };
                skips.push(d);
            }
        }
        // Middle.
        let x = last(&skips)?;
        let m1 = self.resnet(g, t, x, &emb, "middle_block.resnet_1", Resample::None)?;
        let m2 = self.attention(g, t, &m1, ctx, "middle_block.attention", levels - 1)?;
        drop(m1);
        let mut hcur = self.resnet(g, t, &m2, &emb, "middle_block.resnet_2", Resample::None)?;
        drop(m2);
        // Up.
        for i in 0..levels {
            let l = levels - 1 - i;
            let k = format!("up_blocks.{i}");
            for j in 0..cfg.num_res_blocks[l] + 1 {
                let skip = skips.pop().ok_or_else(|| {
                    Error::Internal("GPU U-Net: skip connections exhausted".into())
                })?;
                let cat = self.concat(g, t, &hcur, &skip)?;
                drop(skip);
                hcur = self.resnet(
                    g,
                    t,
                    &cat,
                    &emb,
                    &format!("{k}.resnets.{j}"),
                    Resample::None,
                )?;
                drop(cat);
                if cfg.attention_levels[l] {
                    hcur = self.attention(g, t, &hcur, ctx, &format!("{k}.attentions.{j}"), l)?;
                }
            }
            if i + 1 < levels {
                hcur = if cfg.resblock_updown {
                    self.resnet(g, t, &hcur, &emb, &format!("{k}.upsampler"), Resample::Up)?
                } else {
                    let u = self.upsample(g, t, &hcur)?;
                    self.conv(
                        g,
                        t,
                        &u,
                        &format!("{k}.upsampler.postconv"),
                        1,
                        Pad2d::same(1),
                    )?
                };
            }
        }
        // Out.
        let hn = self.group_norm(g, t, &hcur, "out.0", Act::Silu)?;
        drop(hcur);
        let y = self.conv(g, t, &hn, "out.2", 1, Pad2d::same(1))?;
        drop(hn);
        self.cast(g, t, &y, F32)
    }

    /// x converted to `to` (x itself when it already is).
    fn cast(&self, g: &G, t: &mut Rec<G::Buf>, x: &Val<G::Buf>, to: DType) -> Result<Val<G::Buf>> {
        if x.dt == to {
            return Ok(x.clone());
        }
        let y = g.alloc(x.len() * to.size_in_bytes())?;
        // SAFETY: x holds len values of its dtype, y len of `to` (fresh).
        unsafe { cast(g, x.dt, to, g.ptr(&x.buf), g.ptr(&y), x.len())? };
        let y = Val {
            buf: Rc::new(y),
            id: t.id(),
            dt: to,
            ..*x
        };
        t.push(Node::Cast {
            x: x.id,
            len: x.len(),
            from: x.dt,
            to,
            y: y.id,
        });
        Ok(y)
    }

    /// A new value of `like`'s sample / position shape with `c` channels.
    fn val(&self, t: &mut Rec<G::Buf>, buf: G::Buf, like: &Val<G::Buf>, c: usize) -> Val<G::Buf> {
        Val {
            buf: Rc::new(buf),
            id: t.id(),
            c,
            ..*like
        }
    }

    /// SiLU(time embedding (+ class, confounders)) [n, time_embed_dim] on the device.
    fn embedding(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        n: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<Val<G::Buf>> {
        let cfg = &self.config;
        let temb = cfg.time_embed_dim();
        let table = monai_timestep_embedding::<f32>(timesteps, cfg.channels[0]);
        let t0 = Val {
            buf: Rc::new(g.upload_slice(&table)?),
            id: 0,
            n,
            h: 1,
            w: 1,
            c: cfg.channels[0],
            dt: F32,
        };
        let e = self.linear(g, t, &t0, "time_embed.0", true)?;
        let e = self.silu(g, t, &e)?;
        let mut emb = self.linear(g, t, &e, "time_embed.2", true)?;
        let mut tables: Vec<(String, Vec<usize>)> = Vec::new();
        if let Some(labels) = cond.class_labels {
            tables.push(("class_embedding.weight".into(), labels.to_vec()));
        }
        if let Some(idx) = cond.confounders {
            let kc = cfg.confounders.len();
            for (k, cf) in cfg.confounders.iter().enumerate() {
                let rows = (0..n)
                    .map(|i| match idx[i * kc + k] {
                        NULL => cf.num_values,
                        v => v,
                    })
                    .collect();
                tables.push((format!("confounder_embedding.{}.weight", cf.name), rows));
            }
        }
        for (key, rows) in tables {
            let p = self.param(&key)?;
            let plan = Embedding::new(F32, p.shape[0], temb, &rows)?;
            let ce = g.alloc(plan.output_len() * 4)?;
            // SAFETY: the table holds vocab · temb f32, ce n · temb (fresh).
            unsafe { plan.forward(g, g.ptr(&p.buf), g.ptr(&ce))? };
            let ce = self.val(t, ce, &emb, temb);
            t.push(Node::Embedding {
                key,
                plan,
                y: ce.id,
            });
            emb = self.add(g, t, &emb, &ce)?;
        }
        self.silu(g, t, &emb)
    }

    /// The context [n, len, cross_attention_dim] on the device, null-flagged samples replaced by
    /// the learned null vector (the CPU's `context`).
    fn context(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        n: usize,
        cond: &Conditioning<'_, f32>,
    ) -> Result<Option<Val<G::Buf>>> {
        let d = match self.config.cross_attention_dim {
            Some(d) => d,
            None => return Ok(None),
        };
        let flags = cond.context_null.unwrap_or(&[]);
        let any_null = flags.iter().any(|&b| b);
        let len = if cond.context.is_some() {
            cond.context_len
        } else if any_null {
            1
        } else {
            return Ok(None);
        };
        let mut data = match cond.context {
            Some(c) => c.to_vec(),
            None => vec![0.0; n * len * d],
        };
        let mut sel = vec![0f32; n * len];
        if any_null {
            let nv = self.null_context.as_ref().ok_or_else(|| {
                Error::MissingKey("GPU U-Net: null context requested, no null_context".into())
            })?;
            for (s, _) in flags.iter().enumerate().filter(|(_, &f)| f) {
                for tok in 0..len {
                    data[(s * len + tok) * d..][..d].copy_from_slice(&nv[..d]);
                    sel[s * len + tok] = 1.0;
                }
            }
        }
        let v = Val {
            buf: Rc::new(g.upload_slice(&data)?),
            id: if any_null { t.id() } else { 0 },
            n,
            h: len,
            w: 1,
            c: d,
            dt: F32,
        };
        if any_null {
            t.push(Node::NullContext { sel, d, y: v.id });
        }
        Ok(Some(v))
    }

    /// y [rows, out] = x [rows, in] · Wᵀ (+ b) for the linear (or 1 × 1 conv) `key`.
    fn linear(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        key: &str,
        bias: bool,
    ) -> Result<Val<G::Buf>> {
        let wp = self.param(&format!("{key}.weight"))?;
        let out = wp.shape[0];
        let inp = wp.shape[1..].iter().product::<usize>();
        if inp != x.c {
            return Err(Error::Internal(format!(
                "GPU U-Net: {key} takes {inp} features, the input has {}",
                x.c
            )));
        }
        let (rows, dt) = (x.rows(), x.dt);
        let y = g.alloc(rows * out * dt.size_in_bytes())?;
        // SAFETY: x holds rows × inp of dt, w out × inp, y rows × out (fresh); b out.
        unsafe {
            g.gemm(&Gemm {
                m: rows,
                n: out,
                k: inp,
                a: g.ptr(&x.buf),
                lda: inp,
                trans_a: false,
                b: self.wptr(g, &format!("{key}.weight"), dt)?,
                ldb: inp,
                trans_b: true,
                c: g.ptr(&y),
                ldc: out,
                alpha: 1.0,
                beta: 0.0,
                dtype: dt,
                c_dtype: dt,
                math: self.math,
            })?;
            if bias {
                let b = self.wptr(g, &format!("{key}.bias"), dt)?;
                SampleChannels::new(dt, [1, rows, out])?.add_per_sample(
                    g,
                    g.ptr(&y),
                    b,
                    g.ptr(&y),
                )?;
            }
        }
        let y = self.val(t, y, x, out);
        t.push(Node::Linear {
            x: x.clone(),
            key: key.to_string(),
            bias,
            y: y.id,
        });
        Ok(y)
    }

    /// Convolution `key` (`{key}.conv.weight` [out, in, k, k], `.bias`).
    fn conv(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        key: &str,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Val<G::Buf>> {
        let wkey = format!("{key}.conv.weight");
        let shape = self.param(&wkey)?.shape.clone();
        let (out, inp, k) = (shape[0], shape[1], shape[2]);
        if inp != x.c {
            return Err(Error::Internal(format!(
                "GPU U-Net: {key} takes {inp} channels, the map has {}",
                x.c
            )));
        }
        if k == 1 && stride == 1 && pad == Pad2d::same(0) {
            return self.linear(g, t, x, &format!("{key}.conv"), true);
        }
        let plan = Conv2d::new(x.dt, [x.n, x.h, x.w, x.c], out, k, stride, pad)?;
        let [oh, ow] = plan.out_hw();
        let y = g.alloc(plan.output_len() * x.dt.size_in_bytes())?;
        let (wp, bp) = (
            self.wptr(g, &wkey, x.dt)?,
            self.wptr(g, &format!("{key}.conv.bias"), x.dt)?,
        );
        // SAFETY: x holds the plan's input, w its OIHW weights, b out values, y its output
        // (fresh), all of x's dtype.
        unsafe { plan.forward(g, g.ptr(&x.buf), wp, Some(bp), g.ptr(&y), self.math)? };
        let y = Val {
            buf: Rc::new(y),
            id: t.id(),
            n: x.n,
            h: oh,
            w: ow,
            c: out,
            dt: x.dt,
        };
        t.push(Node::Conv {
            x: x.clone(),
            key: key.to_string(),
            stride,
            pad,
            y: y.id,
        });
        Ok(y)
    }

    fn group_norm(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        key: &str,
        act: Act,
    ) -> Result<Val<G::Buf>> {
        self.norm(g, t, x, key, Some(act))
    }

    /// GroupNorm (`Some(act)`, groups per sample over the positions) or LayerNorm (`None`, per
    /// row) with the parameters `{key}.weight` / `.bias`.
    fn norm(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        key: &str,
        group: Option<Act>,
    ) -> Result<Val<G::Buf>> {
        let cfg = &self.config;
        let stats = match group {
            Some(_) => x.n * cfg.norm_num_groups,
            None => x.rows(),
        };
        let y = g.alloc(x.bytes())?;
        let mean = g.alloc(stats * 4)?;
        let invstd = g.alloc(stats * 4)?;
        let (gamma, beta) = (
            self.ptr(g, &format!("{key}.weight"))?,
            self.ptr(g, &format!("{key}.bias"))?,
        );
        let (xp, yp, mp, ip) = (g.ptr(&x.buf), g.ptr(&y), g.ptr(&mean), g.ptr(&invstd));
        // SAFETY: x and y hold len values of x's dtype (distinct), γ / β c f32, mean / invstd
        // `stats` f32.
        unsafe {
            match group {
                Some(act) => GroupNorm::new(
                    x.dt,
                    [x.n, x.h * x.w, x.c],
                    cfg.norm_num_groups,
                    cfg.norm_eps,
                    act,
                )?
                .forward(g, xp, gamma, beta, yp, mp, ip)?,
                None => LayerNorm::new(x.dt, x.rows(), x.c, LAYER_NORM_EPS)?
                    .forward(g, xp, gamma, beta, yp, mp, ip)?,
            }
        }
        let y = self.val(t, y, x, x.c);
        if t.on {
            t.push(Node::Norm {
                x: x.clone(),
                key: key.to_string(),
                group,
                mean,
                invstd,
                y: y.id,
            });
        }
        Ok(y)
    }

    fn silu(&self, g: &G, t: &mut Rec<G::Buf>, x: &Val<G::Buf>) -> Result<Val<G::Buf>> {
        let y = g.alloc(x.bytes())?;
        // SAFETY: x and y hold len values of x's dtype, distinct.
        unsafe { unary(g, Unary::Silu, x.dt, g.ptr(&x.buf), g.ptr(&y), x.len())? };
        let y = self.val(t, y, x, x.c);
        t.push(Node::Silu {
            x: x.clone(),
            y: y.id,
        });
        Ok(y)
    }

    /// a + b (a new value of a's shape).
    fn add(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        a: &Val<G::Buf>,
        b: &Val<G::Buf>,
    ) -> Result<Val<G::Buf>> {
        if a.len() != b.len() || a.dt != b.dt {
            return Err(Error::Internal(format!(
                "GPU U-Net: adding {} values of {:?} to {} of {:?}",
                b.len(),
                b.dt,
                a.len(),
                a.dt
            )));
        }
        let y = g.alloc(a.bytes())?;
        // SAFETY: a, b, y hold len values of a's dtype; y is fresh.
        unsafe { add(g, a.dt, g.ptr(&a.buf), g.ptr(&b.buf), g.ptr(&y), a.len())? };
        let y = self.val(t, y, a, a.c);
        t.push(Node::Add {
            a: a.id,
            b: b.id,
            len: a.len(),
            dt: a.dt,
            y: y.id,
        });
        Ok(y)
    }

    fn upsample(&self, g: &G, t: &mut Rec<G::Buf>, x: &Val<G::Buf>) -> Result<Val<G::Buf>> {
        let shape = [x.n, x.h, x.w, x.c];
        let plan = Upsample2x::new(x.dt, shape)?;
        let y = g.alloc(plan.output_len() * x.dt.size_in_bytes())?;
        // SAFETY: x holds input_len values of its dtype, y output_len (fresh).
        unsafe { plan.forward(g, g.ptr(&x.buf), g.ptr(&y))? };
        let y = Val {
            buf: Rc::new(y),
            id: t.id(),
            h: 2 * x.h,
            w: 2 * x.w,
            ..*x
        };
        t.push(Node::Upsample {
            x: x.id,
            shape,
            dt: x.dt,
            y: y.id,
        });
        Ok(y)
    }

    /// 2 × 2 average pooling, stride 2: a stride-2 depthwise 3 × 3 convolution whose taps are ¼ on
    /// the top-left 2 × 2 window and 0 elsewhere (the third row / column of the last window lies
    /// past the input and reads as padding).
    fn avg_pool_plan(dt: DType, shape: [usize; 4]) -> Result<Depthwise> {
        let [n, h, w, c] = shape;
        Depthwise::new(dt, [n, h, w, c], 3, 2, 0, 0, [h / 2, w / 2])
    }

    fn avg_pool(&self, g: &G, t: &mut Rec<G::Buf>, x: &Val<G::Buf>) -> Result<Val<G::Buf>> {
        let shape = [x.n, x.h, x.w, x.c];
        let plan = Self::avg_pool_plan(x.dt, shape)?;
        let taps: Vec<f32> = (0..x.c)
            .flat_map(|_| [0.25, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0])
            .collect();
        // ¼ and 0 are exact in bf16.
        let taps = match x.dt {
            DType::BF16 => g.upload_slice(
                &taps
                    .iter()
                    .map(|&v| half::bf16::from_f32(v))
                    .collect::<Vec<_>>(),
            )?,
            _ => g.upload_slice(&taps)?,
        };
        let y = g.alloc(plan.output_len() * x.dt.size_in_bytes())?;
        // SAFETY: x holds input_len values of its dtype, the taps c·9, y output_len (fresh).
        unsafe { plan.forward(g, g.ptr(&x.buf), g.ptr(&taps), g.ptr(&y))? };
        let y = Val {
            buf: Rc::new(y),
            id: t.id(),
            h: x.h / 2,
            w: x.w / 2,
            ..*x
        };
        t.push(Node::AvgPool {
            x: x.id,
            shape,
            dt: x.dt,
            taps,
            y: y.id,
        });
        Ok(y)
    }

    fn concat(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        a: &Val<G::Buf>,
        b: &Val<G::Buf>,
    ) -> Result<Val<G::Buf>> {
        if (a.n, a.h, a.w, a.dt) != (b.n, b.h, b.w, b.dt) {
            return Err(Error::Internal(format!(
                "GPU U-Net: skip {}×{}×{} {:?} for a map {}×{}×{} {:?}",
                b.n, b.h, b.w, b.dt, a.n, a.h, a.w, a.dt
            )));
        }
        let plan = ConcatLast::new(a.dt, a.rows(), &[a.c, b.c])?;
        let y = g.alloc(plan.output_len() * a.dt.size_in_bytes())?;
        // SAFETY: a and b hold rows × their widths of a's dtype, y rows × (sum) (fresh).
        unsafe { plan.forward(g, &[g.ptr(&a.buf), g.ptr(&b.buf)], g.ptr(&y))? };
        let y = self.val(t, y, a, a.c + b.c);
        t.push(Node::Concat {
            a: a.id,
            b: b.id,
            rows: a.rows(),
            widths: [a.c, b.c],
            dt: a.dt,
            y: y.id,
        });
        Ok(y)
    }

    /// `DiffusionUNetResnetBlock`; `emb` is SiLU(time embedding) [n, temb].
    fn resnet(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        emb: &Val<G::Buf>,
        key: &str,
        resample: Resample,
    ) -> Result<Val<G::Buf>> {
        let mut hn = self.group_norm(g, t, x, &format!("{key}.norm1"), Act::Silu)?;
        let resampled = match resample {
            Resample::None => None,
            Resample::Up => {
                hn = self.upsample(g, t, &hn)?;
                Some(self.upsample(g, t, x)?)
            }
            Resample::Down => {
                hn = self.avg_pool(g, t, &hn)?;
                Some(self.avg_pool(g, t, x)?)
            }
        };
        let x = resampled.as_ref().unwrap_or(x);
        let h1 = self.conv(g, t, &hn, &format!("{key}.conv1"), 1, Pad2d::same(1))?;
        drop(hn);
        let e = self.linear(g, t, emb, &format!("{key}.time_emb_proj"), true)?;
        let shape = [h1.n, h1.h * h1.w, h1.c];
        if e.dt != h1.dt {
            return Err(Error::Internal(format!(
                "GPU U-Net: {key}: embedding {:?} for a map {:?}",
                e.dt, h1.dt
            )));
        }
        let per = SampleChannels::new(h1.dt, shape)?;
        let hb = g.alloc(h1.bytes())?;
        // SAFETY: h1 and hb hold n·hw·c values of h1's dtype (hb fresh), e n·c.
        unsafe { per.add_per_sample(g, g.ptr(&h1.buf), g.ptr(&e.buf), g.ptr(&hb))? };
        let hb = self.val(t, hb, &h1, h1.c);
        t.push(Node::AddPerSample {
            x: h1.id,
            e: e.id,
            shape,
            dt: h1.dt,
            y: hb.id,
        });
        drop(h1);
        let h2 = self.group_norm(g, t, &hb, &format!("{key}.norm2"), Act::Silu)?;
        drop(hb);
        let h3 = self.conv(g, t, &h2, &format!("{key}.conv2"), 1, Pad2d::same(1))?;
        drop(h2);
        let skip_key = format!("{key}.skip_connection");
        if self.params.contains_key(&format!("{skip_key}.conv.weight")) {
            let s = self.conv(g, t, x, &skip_key, 1, Pad2d::same(0))?;
            self.add(g, t, &s, &h3)
        } else {
            self.add(g, t, x, &h3)
        }
    }

    /// `SpatialAttentionBlock` (no conditioning) or `SpatialTransformer` (conditioning).
    fn attention(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        ctx: Option<&Val<G::Buf>>,
        key: &str,
        level: usize,
    ) -> Result<Val<G::Buf>> {
        let cfg = &self.config;
        let hc = cfg.num_head_channels[level];
        let heads = cfg.channels[level] / hc.max(1);
        let xn = self.group_norm(g, t, x, &format!("{key}.norm"), Act::None)?;
        let y = if cfg.with_conditioning {
            let mut s = self.linear(g, t, &xn, &format!("{key}.proj_in.conv"), true)?;
            drop(xn);
            for layer in 0..cfg.transformer_num_layers {
                let b = format!("{key}.transformer_blocks.{layer}");
                let a = self.norm(g, t, &s, &format!("{b}.norm1"), None)?;
                let o = self.mha(g, t, &a, None, &format!("{b}.attn1"), heads, hc, false)?;
                s = self.add(g, t, &s, &o)?;
                let a = self.norm(g, t, &s, &format!("{b}.norm2"), None)?;
                let o = self.mha(g, t, &a, ctx, &format!("{b}.attn2"), heads, hc, false)?;
                s = self.add(g, t, &s, &o)?;
                let a = self.norm(g, t, &s, &format!("{b}.norm3"), None)?;
                let f1 = self.linear(g, t, &a, &format!("{b}.ff.linear1"), true)?;
                let geglu = Geglu::new(f1.dt, f1.rows(), f1.c)?;
                let gl = g.alloc(geglu.output_len() * f1.dt.size_in_bytes())?;
                // SAFETY: f1 holds rows × 2d of its dtype, gl rows × d (fresh).
                unsafe { geglu.forward(g, g.ptr(&f1.buf), g.ptr(&gl))? };
                let gl = self.val(t, gl, &f1, f1.c / 2);
                t.push(Node::Geglu {
                    x: f1.clone(),
                    y: gl.id,
                });
                let f2 = self.linear(g, t, &gl, &format!("{b}.ff.linear2"), true)?;
                s = self.add(g, t, &s, &f2)?;
            }
            self.linear(g, t, &s, &format!("{key}.proj_out.conv"), true)?
        } else {
            self.mha(g, t, &xn, None, &format!("{key}.attn"), heads, hc, true)?
        };
        self.add(g, t, &y, x)
    }

    /// MONAI SABlock / CrossAttentionBlock on x [n, lq, ·]: q from x, k / v from the context (or
    /// x), scale 1/√head_dim, then out_proj.
    #[allow(clippy::too_many_arguments)]
    fn mha(
        &self,
        g: &G,
        t: &mut Rec<G::Buf>,
        x: &Val<G::Buf>,
        ctx: Option<&Val<G::Buf>>,
        key: &str,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Val<G::Buf>> {
        let kv = ctx.unwrap_or(x);
        let q = self.linear(g, t, x, &format!("{key}.to_q"), qkv_bias)?;
        let k = self.linear(g, t, kv, &format!("{key}.to_k"), qkv_bias)?;
        let v = self.linear(g, t, kv, &format!("{key}.to_v"), qkv_bias)?;
        let (lq, lk) = (x.h * x.w, kv.h * kv.w);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let plan = Attention::new(q.dt, x.n, lq, lk, heads, head_dim, head_dim, Some(scale))?
            .with_math(self.math);
        let o = g.alloc(plan.out_len() * q.dt.size_in_bytes())?;
        let lse = g.alloc(plan.lse_len() * 4)?;
        // SAFETY: q, k, v hold the plan's q_len, k_len, v_len values of q's dtype (the
        // projections' outputs), o and lse (f32) are fresh.
        unsafe {
            plan.forward(
                g,
                g.ptr(&q.buf),
                g.ptr(&k.buf),
                g.ptr(&v.buf),
                g.ptr(&o),
                g.ptr(&lse),
            )?
        };
        let (ob, c) = (Rc::new(o), heads * head_dim);
        let a = Val {
            buf: ob.clone(),
            id: t.id(),
            c,
            ..*x
        };
        if t.on {
            t.push(Node::Attention {
                qkv: [q, k, v],
                o: ob.clone(),
                lse,
                plan,
                y: a.id,
            });
        }
        self.linear(g, t, &a, &format!("{key}.out_proj"), true)
    }
}

fn last<B>(s: &[Val<B>]) -> Result<&Val<B>> {
    s.last()
        .ok_or_else(|| Error::Internal("GPU U-Net: empty skip stack".into()))
}

/// Gradients during the backward: activations by id, parameters by key (device, f32).
struct Grads<B> {
    act: HashMap<usize, B>,
    params: HashMap<String, B>,
}

impl<G: Gpu> GpuUNet<G> {
    /// Adds `d` (len values of `dt`, the value's dtype) into the gradient of value `id` (ignored
    /// for constants).
    fn acc_act(
        &self,
        g: &G,
        gr: &mut Grads<G::Buf>,
        id: usize,
        d: G::Buf,
        len: usize,
        dt: DType,
    ) -> Result<()> {
        if id == 0 {
            return Ok(());
        }
        match gr.act.get(&id) {
            // SAFETY: both hold len values of dt (the value's gradient); the sum goes into the
            // old one.
            Some(old) => unsafe { add(g, dt, g.ptr(old), g.ptr(&d), g.ptr(old), len) },
            None => {
                gr.act.insert(id, d);
                Ok(())
            }
        }
    }

    /// Adds `d` (of `dt`: widened to f32 first when bf16) into parameter `key`'s gradient (f32).
    fn acc_param(
        &self,
        g: &G,
        gr: &mut Grads<G::Buf>,
        key: &str,
        d: G::Buf,
        dt: DType,
    ) -> Result<()> {
        let len = self.param(key)?.shape.iter().product::<usize>();
        let d = if dt == F32 {
            d
        } else {
            let w = g.alloc(len * 4)?;
            // SAFETY: d holds len values of dt, w len f32 (fresh).
            unsafe { cast(g, dt, F32, g.ptr(&d), g.ptr(&w), len)? };
            w
        };
        match gr.params.get(key) {
            // SAFETY: both hold len f32; the sum goes into the old one.
            Some(old) => unsafe { add(g, F32, g.ptr(old), g.ptr(&d), g.ptr(old), len) },
            None => {
                gr.params.insert(key.to_string(), d);
                Ok(())
            }
        }
    }

    /// The backward of one recorded op, from its output's gradient (if any reached it).
    fn backward_node(&self, g: &G, node: Node<G::Buf>, gr: &mut Grads<G::Buf>) -> Result<()> {
        let y = match &node {
            Node::Linear { y, .. }
            | Node::Conv { y, .. }
            | Node::Norm { y, .. }
            | Node::Silu { y, .. }
            | Node::Add { y, .. }
            | Node::AddPerSample { y, .. }
            | Node::Attention { y, .. }
            | Node::Geglu { y, .. }
            | Node::Upsample { y, .. }
            | Node::AvgPool { y, .. }
            | Node::Concat { y, .. }
            | Node::Embedding { y, .. }
            | Node::NullContext { y, .. }
            | Node::Cast { y, .. } => *y,
        };
        let dy = match gr.act.remove(&y) {
            Some(d) => d,
            None => return Ok(()),
        };
        let dyp = g.ptr(&dy);
        let math = self.math;
        // SAFETY (every launch below): dy holds the op's output gradient (its output's size), the
        // saved values their forward sizes, and every gradient buffer is fresh and sized as the
        // plan (or the GEMM's m × n) says.
        unsafe {
            match node {
                Node::Linear { x, key, bias, .. } => {
                    let wk = format!("{key}.weight");
                    let wp = self.param(&wk)?;
                    let (out, inp, rows, dt) = (wp.shape[0], x.c, x.rows(), x.dt);
                    let gemm = |m, n, k, a, lda, ta, b, ldb, tb, c, ldc, c_dtype| Gemm {
                        m,
                        n,
                        k,
                        a,
                        lda,
                        trans_a: ta,
                        b,
                        ldb,
                        trans_b: tb,
                        c,
                        ldc,
                        alpha: 1.0,
                        beta: 0.0,
                        dtype: dt,
                        c_dtype,
                        math,
                    };
                    // dw in f32 straight from the GEMM (bf16 operands: f32 output).
                    let dw = g.alloc(out * inp * 4)?;
                    let xp = g.ptr(&x.buf);
                    g.gemm(&gemm(
                        out,
                        inp,
                        rows,
                        dyp,
                        out,
                        true,
                        xp,
                        inp,
                        false,
                        g.ptr(&dw),
                        inp,
                        F32,
                    ))?;
                    self.acc_param(g, gr, &wk, dw, F32)?;
                    if bias {
                        let db = g.alloc(out * dt.size_in_bytes())?;
                        SampleChannels::new(dt, [1, rows, out])?.add_per_sample_backward_e(
                            g,
                            dyp,
                            g.ptr(&db),
                            false,
                        )?;
                        self.acc_param(g, gr, &format!("{key}.bias"), db, dt)?;
                    }
                    if x.id != 0 {
                        let dx = g.alloc(rows * inp * dt.size_in_bytes())?;
                        let wb = self.wptr(g, &wk, dt)?;
                        g.gemm(&gemm(
                            rows,
                            inp,
                            out,
                            dyp,
                            out,
                            false,
                            wb,
                            inp,
                            false,
                            g.ptr(&dx),
                            inp,
                            dt,
                        ))?;
                        self.acc_act(g, gr, x.id, dx, rows * inp, dt)?;
                    }
                }
                Node::Conv {
                    x,
                    key,
                    stride,
                    pad,
                    ..
                } => {
                    let (wk, bk) = (format!("{key}.conv.weight"), format!("{key}.conv.bias"));
                    let wp = self.param(&wk)?;
                    let (out, k) = (wp.shape[0], wp.shape[2]);
                    let dt = x.dt;
                    let es = dt.size_in_bytes();
                    let plan = Conv2d::new(dt, [x.n, x.h, x.w, x.c], out, k, stride, pad)?;
                    // dw in f32 (never rounded to bf16).
                    let dw = g.alloc(plan.weight_len() * 4)?;
                    plan.backward_w_f32(g, g.ptr(&x.buf), dyp, g.ptr(&dw), math)?;
                    let db = g.alloc(out * es)?;
                    plan.backward_b(g, dyp, g.ptr(&db))?;
                    if x.id != 0 {
                        let dx = g.alloc(plan.input_len() * es)?;
                        plan.backward_x(g, dyp, self.wptr(g, &wk, dt)?, g.ptr(&dx), math)?;
                        self.acc_act(g, gr, x.id, dx, plan.input_len(), dt)?;
                    }
                    self.acc_param(g, gr, &wk, dw, F32)?;
                    self.acc_param(g, gr, &bk, db, dt)?;
                }
                Node::Norm {
                    x,
                    key,
                    group,
                    mean,
                    invstd,
                    ..
                } => {
                    let cfg = &self.config;
                    let (wk, bk) = (format!("{key}.weight"), format!("{key}.bias"));
                    let (gamma, beta) = (self.ptr(g, &wk)?, self.ptr(g, &bk)?);
                    let dx = g.alloc(x.bytes())?;
                    let dgamma = g.alloc(x.c * 4)?;
                    let dbeta = g.alloc(x.c * 4)?;
                    let (xp, dxp, dgp, dbp) =
                        (g.ptr(&x.buf), g.ptr(&dx), g.ptr(&dgamma), g.ptr(&dbeta));
                    let (mp, ip) = (g.ptr(&mean), g.ptr(&invstd));
                    match group {
                        Some(act) => GroupNorm::new(
                            x.dt,
                            [x.n, x.h * x.w, x.c],
                            cfg.norm_num_groups,
                            cfg.norm_eps,
                            act,
                        )?
                        .backward(g, xp, dyp, gamma, beta, mp, ip, dxp, dgp, dbp, false)?,
                        None => LayerNorm::new(x.dt, x.rows(), x.c, LAYER_NORM_EPS)?
                            .backward(g, xp, dyp, gamma, mp, ip, dxp, dgp, dbp, false)?,
                    }
                    self.acc_param(g, gr, &wk, dgamma, F32)?;
                    self.acc_param(g, gr, &bk, dbeta, F32)?;
                    self.acc_act(g, gr, x.id, dx, x.len(), x.dt)?;
                }
                Node::Silu { x, .. } => {
                    let dx = g.alloc(x.bytes())?;
                    activation_backward(
                        g,
                        ActivationGrad::Silu,
                        x.dt,
                        g.ptr(&x.buf),
                        dyp,
                        g.ptr(&dx),
                        x.len(),
                    )?;
                    self.acc_act(g, gr, x.id, dx, x.len(), x.dt)?;
                }
                Node::Add { a, b, len, dt, .. } => {
                    if a != 0 {
                        let bytes = len * dt.size_in_bytes();
                        let da = g.alloc(bytes)?;
                        g.copy(dyp, g.ptr(&da), bytes)?;
                        self.acc_act(g, gr, a, da, len, dt)?;
                    }
                    self.acc_act(g, gr, b, dy, len, dt)?;
                }
                Node::AddPerSample {
                    x, e, shape, dt, ..
                } => {
                    let [n, _, c] = shape;
                    let de = g.alloc(n * c * dt.size_in_bytes())?;
                    SampleChannels::new(dt, shape)?.add_per_sample_backward_e(
                        g,
                        dyp,
                        g.ptr(&de),
                        false,
                    )?;
                    self.acc_act(g, gr, e, de, n * c, dt)?;
                    self.acc_act(g, gr, x, dy, shape.iter().product(), dt)?;
                }
                Node::Attention {
                    qkv, o, lse, plan, ..
                } => {
                    let d = [plan.q_len(), plan.k_len(), plan.v_len()];
                    let dt = qkv[0].dt;
                    let es = dt.size_in_bytes();
                    let bufs = [
                        g.alloc(d[0] * es)?,
                        g.alloc(d[1] * es)?,
                        g.alloc(d[2] * es)?,
                    ];
                    plan.backward(
                        g,
                        [g.ptr(&qkv[0].buf), g.ptr(&qkv[1].buf), g.ptr(&qkv[2].buf)],
                        g.ptr(&o),
                        g.ptr(&lse),
                        dyp,
                        [g.ptr(&bufs[0]), g.ptr(&bufs[1]), g.ptr(&bufs[2])],
                    )?;
                    for ((v, b), len) in qkv.iter().zip(bufs).zip(d) {
                        self.acc_act(g, gr, v.id, b, len, dt)?;
                    }
                }
                Node::Geglu { x, .. } => {
                    let plan = Geglu::new(x.dt, x.rows(), x.c)?;
                    let dx = g.alloc(x.bytes())?;
                    plan.backward(g, g.ptr(&x.buf), dyp, g.ptr(&dx))?;
                    self.acc_act(g, gr, x.id, dx, x.len(), x.dt)?;
                }
                Node::Upsample { x, shape, dt, .. } => {
                    let plan = Upsample2x::new(dt, shape)?;
                    let dx = g.alloc(plan.input_len() * dt.size_in_bytes())?;
                    plan.backward(g, dyp, g.ptr(&dx))?;
                    self.acc_act(g, gr, x, dx, plan.input_len(), dt)?;
                }
                Node::AvgPool {
                    x, shape, dt, taps, ..
                } => {
                    let plan = Self::avg_pool_plan(dt, shape)?;
                    let dx = g.alloc(plan.input_len() * dt.size_in_bytes())?;
                    plan.backward_x(g, dyp, g.ptr(&taps), g.ptr(&dx))?;
                    self.acc_act(g, gr, x, dx, plan.input_len(), dt)?;
                }
                Node::Concat {
                    a,
                    b,
                    rows,
                    widths,
                    dt,
                    ..
                } => {
                    let plan = ConcatLast::new(dt, rows, &widths)?;
                    let es = dt.size_in_bytes();
                    let da = g.alloc(rows * widths[0] * es)?;
                    let db = g.alloc(rows * widths[1] * es)?;
                    plan.backward(g, dyp, &[Some(g.ptr(&da)), Some(g.ptr(&db))])?;
                    self.acc_act(g, gr, a, da, rows * widths[0], dt)?;
                    self.acc_act(g, gr, b, db, rows * widths[1], dt)?;
                }
                Node::Embedding { key, plan, .. } => {
                    let dtab = g.alloc(plan.table_len() * 4)?;
                    plan.backward(g, dyp, g.ptr(&dtab), false)?;
                    self.acc_param(g, gr, &key, dtab, F32)?;
                }
                Node::Cast {
                    x, len, from, to, ..
                } => {
                    if x != 0 {
                        let dx = g.alloc(len * from.size_in_bytes())?;
                        cast(g, to, from, dyp, g.ptr(&dx), len)?;
                        self.acc_act(g, gr, x, dx, len, from)?;
                    }
                }
                Node::NullContext { sel, d, .. } => {
                    // d null = Σ over the null tokens of their gradient rows: sel [1, tokens] · dy.
                    let sb = g.upload_slice(&sel)?;
                    let dn = g.alloc(d * 4)?;
                    g.gemm(&Gemm {
                        m: 1,
                        n: d,
                        k: sel.len(),
                        a: g.ptr(&sb),
                        lda: sel.len(),
                        trans_a: false,
                        b: dyp,
                        ldb: d,
                        trans_b: false,
                        c: g.ptr(&dn),
                        ldc: d,
                        alpha: 1.0,
                        beta: 0.0,
                        dtype: F32,
                        c_dtype: F32,
                        math: Math::F32,
                    })?;
                    self.acc_param(g, gr, "null_context", dn, F32)?;
                }
            }
        }
        Ok(())
    }
}
