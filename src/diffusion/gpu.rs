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
//! - residual blocks: GroupNorm with fused SiLU, conv, + projected embedding per sample, GroupNorm
//!   + SiLU, conv, + skip; resampling residual blocks (`resblock_updown`) by nearest 2× upsampling
//!   or 2 × 2 average pooling (a stride-2 depthwise convolution with weights ¼ on a 2 × 2 window);
//! - attention: `SpatialAttentionBlock` (GroupNorm, q / k / v GEMMs with bias, flash attention,
//!   out_proj, + residual) or `SpatialTransformer` (GroupNorm, proj_in, LayerNorm → self-attention,
//!   LayerNorm → cross-attention on the context, LayerNorm → GEGLU feed-forward, each + residual,
//!   proj_out, + residual);
//! - up path: skip concatenation on the channel axis, nearest 2× upsampling + conv;
//! - out: GroupNorm + SiLU, conv.
//!
//! Runs on a CUDA device (`backend::cuda`) and, in the tests, on the CPU emulation of the kernels
//! (`tests/gpu/parity/unet.rs`: parity with the CPU forward in f64).

use super::unet::{monai_timestep_embedding, nchw_to_nhwc, nhwc_to_nchw};
use super::unet::{Conditioning, DiffusionUNet, UNetConfig, NULL};
use crate::backend::gpu::attention::Attention;
use crate::backend::gpu::depthwise::Depthwise;
use crate::backend::gpu::elementwise::{unary, Unary};
use crate::backend::gpu::geglu::Geglu;
use crate::backend::gpu::norm::{GroupNorm, LayerNorm};
use crate::backend::gpu::shape::{add, ConcatLast, Embedding, SampleChannels, Upsample2x};
use crate::backend::gpu::{Gemm, Gpu, Math};
use crate::error::{Error, Result};
use crate::ops::conv::Pad2d;
use crate::ops::norm::Act;
use crate::tensor::DType;
use std::collections::HashMap;

const F32: DType = DType::F32;

// The dense convolution: `backend::gpu::conv::Conv2d` once it lands.
use HostIm2colConv as Conv2d;

/// torch.nn.LayerNorm's default ε (MONAI does not set it), as the CPU pass uses.
const LAYER_NORM_EPS: f64 = 1e-5;

/// One parameter on the device.
struct Param<B> {
    buf: B,
    shape: Vec<usize>,
}

/// A device activation map, NHWC [n, h, w, c], f32.
struct Map<B> {
    buf: B,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl<B> Map<B> {
    fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
    fn len(&self) -> usize {
        self.rows() * self.c
    }
}

/// The context on the device: [n, len, dim].
struct Context<B> {
    buf: B,
    len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resample {
    None,
    Up,
    Down,
}

/// A [`DiffusionUNet`]'s parameters on one device (f32), and its forward pass there.
pub struct GpuUNet<G: Gpu> {
    config: UNetConfig,
    params: HashMap<String, Param<G::Buf>>,
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
            null_context,
            math: Math::F32,
        })
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
        self.config.check_inputs(n, c, h, w, timesteps, cond)?;
        let x = g.upload_slice(x_nhwc)?;
        let y = self.forward_device(g, &x, n, h, w, timesteps, cond)?;
        g.download_vec(&y, n * h * w * self.config.out_channels)
    }

    /// The forward pass on a device input x (NHWC [n, h, w, in_channels] f32) → a new device
    /// buffer NHWC [n, h, w, out_channels] f32. Checks the conditions (not x's values).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_device(
        &self,
        g: &G,
        x: &G::Buf,
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<G::Buf> {
        let cfg = &self.config;
        self.config
            .check_inputs(n, cfg.in_channels, h, w, timesteps, cond)?;
        let levels = cfg.channels.len();
        let emb = self.embedding(g, n, timesteps, cond)?;
        let ctx = self.context(g, n, cond)?;
        let ctx = ctx.as_ref();

        // Down.
        let xin = Map {
            buf: g.alloc(n * h * w * cfg.in_channels * 4)?,
            n,
            h,
            w,
            c: cfg.in_channels,
        };
        // SAFETY: x holds (the caller's contract) and xin was sized for n·h·w·in_channels f32.
        unsafe { g.copy(g.ptr(x), g.ptr(&xin.buf), xin.len() * 4)? };
        let mut skips = vec![self.conv(g, &xin, "conv_in", 1, Pad2d::same(1))?];
        drop(xin);
        // The skip stack holds every map the up path concatenates; the last one is the current.
        let last = |s: &Vec<Map<G::Buf>>| -> Result<usize> {
            s.len()
                .checked_sub(1)
                .ok_or_else(|| Error::Internal("GPU U-Net: empty skip stack".into()))
        };
        for l in 0..levels {
            let k = format!("down_blocks.{l}");
            for j in 0..cfg.num_res_blocks[l] {
                let x = &skips[last(&skips)?];
                let mut h = self.resnet(g, x, &emb, &format!("{k}.resnets.{j}"), Resample::None)?;
                if cfg.attention_levels[l] {
                    h = self.attention(g, &h, ctx, &format!("{k}.attentions.{j}"), l)?;
                }
                skips.push(h);
            }
            if l + 1 < levels {
                let x = &skips[last(&skips)?];
                let d = if cfg.resblock_updown {
                    self.resnet(g, x, &emb, &format!("{k}.downsampler"), Resample::Down)?
                } else {
                    self.conv(g, x, &format!("{k}.downsampler.op"), 2, Pad2d::same(1))?
                };
                skips.push(d);
            }
        }
        // Middle.
        let x = &skips[last(&skips)?];
        let m1 = self.resnet(g, x, &emb, "middle_block.resnet_1", Resample::None)?;
        let m2 = self.attention(g, &m1, ctx, "middle_block.attention", levels - 1)?;
        drop(m1);
        let mut hcur = self.resnet(g, &m2, &emb, "middle_block.resnet_2", Resample::None)?;
        drop(m2);
        // Up.
        for i in 0..levels {
            let l = levels - 1 - i;
            let k = format!("up_blocks.{i}");
            for j in 0..cfg.num_res_blocks[l] + 1 {
                let skip = skips.pop().ok_or_else(|| {
                    Error::Internal("GPU U-Net: skip connections exhausted".into())
                })?;
                let cat = self.concat(g, &hcur, &skip)?;
                drop(skip);
                hcur = self.resnet(g, &cat, &emb, &format!("{k}.resnets.{j}"), Resample::None)?;
                drop(cat);
                if cfg.attention_levels[l] {
                    hcur = self.attention(g, &hcur, ctx, &format!("{k}.attentions.{j}"), l)?;
                }
            }
            if i + 1 < levels {
                hcur = if cfg.resblock_updown {
                    self.resnet(g, &hcur, &emb, &format!("{k}.upsampler"), Resample::Up)?
                } else {
                    let u = self.upsample(g, &hcur)?;
                    self.conv(g, &u, &format!("{k}.upsampler.postconv"), 1, Pad2d::same(1))?
                };
            }
        }
        // Out.
        let hn = self.group_norm(g, &hcur, "out.0", Act::Silu)?;
        drop(hcur);
        let y = self.conv(g, &hn, "out.2", 1, Pad2d::same(1))?;
        Ok(y.buf)
    }

    /// SiLU(time embedding (+ class, confounders)) [n, time_embed_dim] on the device.
    fn embedding(
        &self,
        g: &G,
        n: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
    ) -> Result<G::Buf> {
        let cfg = &self.config;
        let temb = cfg.time_embed_dim();
        let t = g.upload_slice(&monai_timestep_embedding::<f32>(timesteps, cfg.channels[0]))?;
        let e = self.linear(g, &t, n, "time_embed.0", true)?;
        let s = g.alloc(n * temb * 4)?;
        // SAFETY: e and s hold n·temb f32, distinct.
        unsafe { unary(g, Unary::Silu, F32, g.ptr(&e), g.ptr(&s), n * temb)? };
        let emb = self.linear(g, &s, n, "time_embed.2", true)?;
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
            // SAFETY: the table holds vocab · temb f32, ce n · temb; emb n · temb (sum in place).
            unsafe {
                plan.forward(g, g.ptr(&p.buf), g.ptr(&ce))?;
                add(g, F32, g.ptr(&emb), g.ptr(&ce), g.ptr(&emb), n * temb)?;
            }
        }
        let out = g.alloc(n * temb * 4)?;
        // SAFETY: emb and out hold n·temb f32, distinct.
        unsafe { unary(g, Unary::Silu, F32, g.ptr(&emb), g.ptr(&out), n * temb)? };
        Ok(out)
    }

    /// The context [n, len, cross_attention_dim] on the device, null-flagged samples replaced by
    /// the learned null vector (the CPU's `context`).
    fn context(
        &self,
        g: &G,
        n: usize,
        cond: &Conditioning<'_, f32>,
    ) -> Result<Option<Context<G::Buf>>> {
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
        if any_null {
            let nv = self.null_context.as_ref().ok_or_else(|| {
                Error::MissingKey("GPU U-Net: null context requested, no null_context".into())
            })?;
            for (s, _) in flags.iter().enumerate().filter(|(_, &f)| f) {
                for t in 0..len {
                    data[(s * len + t) * d..][..d].copy_from_slice(&nv[..d]);
                }
            }
        }
        Ok(Some(Context {
            buf: g.upload_slice(&data)?,
            len,
        }))
    }

    /// y [rows, out] = x [rows, in] · Wᵀ (+ b) for the linear (or 1 × 1 conv) `key`.
    fn linear(&self, g: &G, x: &G::Buf, rows: usize, key: &str, bias: bool) -> Result<G::Buf> {
        let wp = self.param(&format!("{key}.weight"))?;
        let out = wp.shape[0];
        let inp = wp.shape[1..].iter().product::<usize>();
        let y = g.alloc(rows * out * 4)?;
        // SAFETY: x holds rows × inp f32 (the caller's map of that width), w out × inp, y rows ×
        // out (fresh); b out.
        unsafe {
            g.gemm(&Gemm {
                m: rows,
                n: out,
                k: inp,
                a: g.ptr(x),
                lda: inp,
                trans_a: false,
                b: g.ptr(&wp.buf),
                ldb: inp,
                trans_b: true,
                c: g.ptr(&y),
                ldc: out,
                alpha: 1.0,
                beta: 0.0,
                dtype: F32,
                math: self.math,
            })?;
            if bias {
                let b = self.ptr(g, &format!("{key}.bias"))?;
                SampleChannels::new(F32, [1, rows, out])?.add_per_sample(
                    g,
                    g.ptr(&y),
                    b,
                    g.ptr(&y),
                )?;
            }
        }
        Ok(y)
    }

    /// Linear on a map's channels.
    fn linear_map(&self, g: &G, x: &Map<G::Buf>, key: &str) -> Result<Map<G::Buf>> {
        let inp: usize = self.param(&format!("{key}.weight"))?.shape[1..]
            .iter()
            .product();
        if inp != x.c {
            return Err(Error::Internal(format!(
                "GPU U-Net: {key} takes {inp} channels, the map has {}",
                x.c
            )));
        }
        let out = self.param(&format!("{key}.weight"))?.shape[0];
        Ok(Map {
            buf: self.linear(g, &x.buf, x.rows(), key, true)?,
            c: out,
            ..*x
        })
    }

    /// Convolution `key` (`{key}.conv.weight` [out, in, k, k], `.bias`).
    fn conv(
        &self,
        g: &G,
        x: &Map<G::Buf>,
        key: &str,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Map<G::Buf>> {
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
            return self.linear_map(g, x, &format!("{key}.conv"));
        }
        let plan = Conv2d::new(F32, [x.n, x.h, x.w, x.c], out, k, stride, pad)?;
        let [oh, ow] = plan.out_hw();
        let y = g.alloc(plan.output_len() * 4)?;
        let (wp, bp) = (
            self.ptr(g, &wkey)?,
            self.ptr(g, &format!("{key}.conv.bias"))?,
        );
        // SAFETY: x holds the plan's input, w its OIHW weights, b out f32, y its output (fresh).
        unsafe { plan.forward(g, g.ptr(&x.buf), wp, Some(bp), g.ptr(&y), self.math)? };
        Ok(Map {
            buf: y,
            n: x.n,
            h: oh,
            w: ow,
            c: out,
        })
    }

    fn group_norm(&self, g: &G, x: &Map<G::Buf>, key: &str, act: Act) -> Result<Map<G::Buf>> {
        let cfg = &self.config;
        let plan = GroupNorm::new(
            F32,
            [x.n, x.h * x.w, x.c],
            cfg.norm_num_groups,
            cfg.norm_eps,
            act,
        )?;
        let y = g.alloc(plan.x_len() * 4)?;
        let mean = g.alloc(plan.stats_len() * 4)?;
        let invstd = g.alloc(plan.stats_len() * 4)?;
        let (gamma, beta) = (
            self.ptr(g, &format!("{key}.weight"))?,
            self.ptr(g, &format!("{key}.bias"))?,
        );
        // SAFETY: x and y hold x_len f32 (distinct), γ / β c f32, mean / invstd stats_len.
        unsafe {
            plan.forward(
                g,
                g.ptr(&x.buf),
                gamma,
                beta,
                g.ptr(&y),
                g.ptr(&mean),
                g.ptr(&invstd),
            )?
        };
        Ok(Map { buf: y, ..*x })
    }

    fn layer_norm(&self, g: &G, x: &G::Buf, rows: usize, c: usize, key: &str) -> Result<G::Buf> {
        let plan = LayerNorm::new(F32, rows, c, LAYER_NORM_EPS)?;
        let y = g.alloc(plan.x_len() * 4)?;
        let mean = g.alloc(rows * 4)?;
        let invstd = g.alloc(rows * 4)?;
        let (gamma, beta) = (
            self.ptr(g, &format!("{key}.weight"))?,
            self.ptr(g, &format!("{key}.bias"))?,
        );
        // SAFETY: x and y hold rows·c f32 (distinct), γ / β c f32, mean / invstd rows.
        unsafe {
            plan.forward(
                g,
                g.ptr(x),
                gamma,
                beta,
                g.ptr(&y),
                g.ptr(&mean),
                g.ptr(&invstd),
            )?
        };
        Ok(y)
    }

    fn upsample(&self, g: &G, x: &Map<G::Buf>) -> Result<Map<G::Buf>> {
        let plan = Upsample2x::new(F32, [x.n, x.h, x.w, x.c])?;
        let y = g.alloc(plan.output_len() * 4)?;
        // SAFETY: x holds input_len f32, y output_len (fresh).
        unsafe { plan.forward(g, g.ptr(&x.buf), g.ptr(&y))? };
        Ok(Map {
            buf: y,
            h: 2 * x.h,
            w: 2 * x.w,
            ..*x
        })
    }

    /// 2 × 2 average pooling, stride 2: a stride-2 depthwise 3 × 3 convolution whose taps are ¼ on
    /// the top-left 2 × 2 window and 0 elsewhere (the window's third row / column, past the
    /// input at the last output, is never read as anything but zero · padding).
    fn avg_pool(&self, g: &G, x: &Map<G::Buf>) -> Result<Map<G::Buf>> {
        let (oh, ow) = (x.h / 2, x.w / 2);
        let plan = Depthwise::new(F32, [x.n, x.h, x.w, x.c], 3, 2, 0, 0, [oh, ow])?;
        let taps: Vec<f32> = (0..x.c)
            .flat_map(|_| [0.25, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0])
            .collect();
        let wb = g.upload_slice(&taps)?;
        let y = g.alloc(plan.output_len() * 4)?;
        // SAFETY: x holds input_len f32, the taps c·9, y output_len (fresh).
        unsafe { plan.forward(g, g.ptr(&x.buf), g.ptr(&wb), g.ptr(&y))? };
        Ok(Map {
            buf: y,
            h: oh,
            w: ow,
            ..*x
        })
    }

    fn concat(&self, g: &G, a: &Map<G::Buf>, b: &Map<G::Buf>) -> Result<Map<G::Buf>> {
        if (a.n, a.h, a.w) != (b.n, b.h, b.w) {
            return Err(Error::Internal(format!(
                "GPU U-Net: skip {}×{}×{} for a map {}×{}×{}",
                b.n, b.h, b.w, a.n, a.h, a.w
            )));
        }
        let plan = ConcatLast::new(F32, a.rows(), &[a.c, b.c])?;
        let y = g.alloc(plan.output_len() * 4)?;
        // SAFETY: a and b hold rows × their widths f32, y rows × (sum) (fresh).
        unsafe { plan.forward(g, &[g.ptr(&a.buf), g.ptr(&b.buf)], g.ptr(&y))? };
        Ok(Map {
            buf: y,
            c: a.c + b.c,
            ..*a
        })
    }

    /// `DiffusionUNetResnetBlock`; `emb` is SiLU(time embedding) [n, temb].
    fn resnet(
        &self,
        g: &G,
        x: &Map<G::Buf>,
        emb: &G::Buf,
        key: &str,
        resample: Resample,
    ) -> Result<Map<G::Buf>> {
        let mut hn = self.group_norm(g, x, &format!("{key}.norm1"), Act::Silu)?;
        let resampled = match resample {
            Resample::None => None,
            Resample::Up => {
                hn = self.upsample(g, &hn)?;
                Some(self.upsample(g, x)?)
            }
            Resample::Down => {
                hn = self.avg_pool(g, &hn)?;
                Some(self.avg_pool(g, x)?)
            }
        };
        let x = resampled.as_ref().unwrap_or(x);
        let h1 = self.conv(g, &hn, &format!("{key}.conv1"), 1, Pad2d::same(1))?;
        drop(hn);
        let t = self.linear(g, emb, x.n, &format!("{key}.time_emb_proj"), true)?;
        let per = SampleChannels::new(F32, [h1.n, h1.h * h1.w, h1.c])?;
        // SAFETY: h1 holds n·hw·c f32 (in place), t n·c.
        unsafe { per.add_per_sample(g, g.ptr(&h1.buf), g.ptr(&t), g.ptr(&h1.buf))? };
        let h2 = self.group_norm(g, &h1, &format!("{key}.norm2"), Act::Silu)?;
        drop(h1);
        let h3 = self.conv(g, &h2, &format!("{key}.conv2"), 1, Pad2d::same(1))?;
        drop(h2);
        let skip_key = format!("{key}.skip_connection");
        let conv_skip = if self.params.contains_key(&format!("{skip_key}.conv.weight")) {
            Some(self.conv(g, x, &skip_key, 1, Pad2d::same(0))?)
        } else {
            None
        };
        let skip = conv_skip.as_ref().unwrap_or(x);
        if skip.len() != h3.len() {
            return Err(Error::Internal(format!(
                "GPU U-Net: {key}: skip of {} values for an output of {}",
                skip.len(),
                h3.len()
            )));
        }
        // SAFETY: both hold len f32; the sum goes into h3 in place.
        unsafe {
            add(
                g,
                F32,
                g.ptr(&skip.buf),
                g.ptr(&h3.buf),
                g.ptr(&h3.buf),
                h3.len(),
            )?
        };
        Ok(h3)
    }

    /// `SpatialAttentionBlock` (no conditioning) or `SpatialTransformer` (conditioning).
    fn attention(
        &self,
        g: &G,
        x: &Map<G::Buf>,
        ctx: Option<&Context<G::Buf>>,
        key: &str,
        level: usize,
    ) -> Result<Map<G::Buf>> {
        let cfg = &self.config;
        let hc = cfg.num_head_channels[level];
        let heads = cfg.channels[level] / hc.max(1);
        let (n, l, rows) = (x.n, x.h * x.w, x.rows());
        let xn = self.group_norm(g, x, &format!("{key}.norm"), Act::None)?;
        let y = if cfg.with_conditioning {
            let t = self.linear_map(g, &xn, &format!("{key}.proj_in.conv"))?;
            drop(xn);
            let inner = t.c;
            let tb = t.buf;
            let residual = |f: &G::Buf| -> Result<()> {
                // SAFETY: both hold rows × inner f32; the sum goes into the stream in place.
                unsafe { add(g, F32, g.ptr(&tb), g.ptr(f), g.ptr(&tb), rows * inner) }
            };
            for layer in 0..cfg.transformer_num_layers {
                let b = format!("{key}.transformer_blocks.{layer}");
                let a = self.layer_norm(g, &tb, rows, inner, &format!("{b}.norm1"))?;
                let o = self.mha(g, &a, n, l, None, &format!("{b}.attn1"), heads, hc, false)?;
                residual(&o)?;
                let a = self.layer_norm(g, &tb, rows, inner, &format!("{b}.norm2"))?;
                let o = self.mha(g, &a, n, l, ctx, &format!("{b}.attn2"), heads, hc, false)?;
                residual(&o)?;
                let a = self.layer_norm(g, &tb, rows, inner, &format!("{b}.norm3"))?;
                let f1 = self.linear(g, &a, rows, &format!("{b}.ff.linear1"), true)?;
                let two_d = self.param(&format!("{b}.ff.linear1.weight"))?.shape[0];
                let geglu = Geglu::new(F32, rows, two_d)?;
                let gl = g.alloc(geglu.output_len() * 4)?;
                // SAFETY: f1 holds rows × 2d f32, gl rows × d (fresh).
                unsafe { geglu.forward(g, g.ptr(&f1), g.ptr(&gl))? };
                let f2 = self.linear(g, &gl, rows, &format!("{b}.ff.linear2"), true)?;
                residual(&f2)?;
            }
            let t = Map {
                buf: tb,
                c: inner,
                ..*x
            };
            self.linear_map(g, &t, &format!("{key}.proj_out.conv"))?
        } else {
            let o = self.mha(
                g,
                &xn.buf,
                n,
                l,
                None,
                &format!("{key}.attn"),
                heads,
                hc,
                true,
            )?;
            Map {
                buf: o,
                c: cfg.channels[level],
                ..*x
            }
        };
        if y.len() != x.len() {
            return Err(Error::Internal(format!(
                "GPU U-Net: {key}: {} output values for an input of {}",
                y.len(),
                x.len()
            )));
        }
        // SAFETY: both hold len f32; the sum goes into y in place.
        unsafe { add(g, F32, g.ptr(&y.buf), g.ptr(&x.buf), g.ptr(&y.buf), y.len())? };
        Ok(y)
    }

    /// MONAI SABlock / CrossAttentionBlock on x [n, lq, ·]: q from x, k / v from the context (or
    /// x), scale 1/√head_dim, then out_proj → [n·lq, out].
    #[allow(clippy::too_many_arguments)]
    fn mha(
        &self,
        g: &G,
        x: &G::Buf,
        n: usize,
        lq: usize,
        ctx: Option<&Context<G::Buf>>,
        key: &str,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<G::Buf> {
        let (kv, lk) = match ctx {
            Some(c) => (&c.buf, c.len),
            None => (x, lq),
        };
        let q = self.linear(g, x, n * lq, &format!("{key}.to_q"), qkv_bias)?;
        let k = self.linear(g, kv, n * lk, &format!("{key}.to_k"), qkv_bias)?;
        let v = self.linear(g, kv, n * lk, &format!("{key}.to_v"), qkv_bias)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let plan = Attention::new(F32, n, lq, lk, heads, head_dim, head_dim, Some(scale))?;
        let o = g.alloc(plan.out_len() * 4)?;
        let lse = g.alloc(plan.lse_len() * 4)?;
        // SAFETY: q, k, v hold the plan's q_len, k_len, v_len f32 (the projections' outputs), o and
        // lse are fresh.
        unsafe { plan.forward(g, g.ptr(&q), g.ptr(&k), g.ptr(&v), g.ptr(&o), g.ptr(&lse))? };
        self.linear(g, &o, n * lq, &format!("{key}.out_proj"), true)
    }
}

// ------------------------------------------------------------------------------------------------
// Dense convolution.

/// STAND-IN for `backend::gpu::conv::Conv2d` (being written; same API subset) until it lands:
/// im2col on the host (download, gather, upload), GEMM and per-channel bias on the device.
/// Switch with the `use` line above [`GpuUNet`].
struct HostIm2colConv {
    shape: [usize; 4],
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad2d,
    out: [usize; 2],
}

impl HostIm2colConv {
    fn new(
        dtype: DType,
        shape: [usize; 4],
        cout: usize,
        k: usize,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Self> {
        if dtype != F32 {
            return Err(Error::InvalidArgument("host-im2col conv: f32 only".into()));
        }
        let [_, h, w, _] = shape;
        let g = crate::ops::conv::Geom::explicit(h, w, k, stride, pad)?;
        Ok(HostIm2colConv {
            shape,
            cout,
            k,
            stride,
            pad,
            out: [g.oh, g.ow],
        })
    }

    fn out_hw(&self) -> [usize; 2] {
        self.out
    }

    fn output_len(&self) -> usize {
        self.shape[0] * self.out[0] * self.out[1] * self.cout
    }

    /// # Safety
    /// x holds n·h·w·cin f32, w cout·cin·k·k (OIHW), b cout, y `output_len` (fresh).
    #[allow(clippy::too_many_arguments)]
    unsafe fn forward<G: Gpu>(
        &self,
        g: &G,
        x: u64,
        w: u64,
        b: Option<u64>,
        y: u64,
        math: Math,
    ) -> Result<()> {
        let [n, h, wd, c] = self.shape;
        let [oh, ow] = self.out;
        let k = self.k;
        // Download x through a device copy into a buffer we own.
        let tmp = g.alloc(n * h * wd * c * 4)?;
        g.copy(x, g.ptr(&tmp), n * h * wd * c * 4)?;
        let xs: Vec<f32> = g.download_vec(&tmp, n * h * wd * c)?;
        let inner = c * k * k;
        let rows = n * oh * ow;
        let mut cols = vec![0f32; rows * inner];
        for s in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let r = (s * oh + oy) * ow + ox;
                    let row = &mut cols[r * inner..][..inner];
                    for ky in 0..k {
                        let iy = (oy * self.stride + ky) as isize - self.pad.top as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox * self.stride + kx) as isize - self.pad.left as isize;
                            if ix < 0 || ix >= wd as isize {
                                continue;
                            }
                            let src = &xs[((s * h + iy as usize) * wd + ix as usize) * c..][..c];
                            for (ci, &v) in src.iter().enumerate() {
                                row[ci * k * k + ky * k + kx] = v;
                            }
                        }
                    }
                }
            }
        }
        let cb = g.upload_slice(&cols)?;
        g.gemm(&Gemm {
            m: rows,
            n: self.cout,
            k: inner,
            a: g.ptr(&cb),
            lda: inner,
            trans_a: false,
            b: w,
            ldb: inner,
            trans_b: true,
            c: y,
            ldc: self.cout,
            alpha: 1.0,
            beta: 0.0,
            dtype: F32,
            math,
        })?;
        if let Some(b) = b {
            SampleChannels::new(F32, [1, rows, self.cout])?.add_per_sample(g, y, b, y)?;
        }
        g.synchronize()
    }
}
