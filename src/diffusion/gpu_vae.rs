//! The diffusers `AutoencoderKL` of `vae.rs` on a [`Gpu`]: the CPU encoder and decoder composed
//! from the launch layer's kernels and GEMMs, f32 storage, NHWC activations inside (inference only).
//!
//! - convolutions: every 3 × 3 (stride 1 with padding 1, and the encoder's stride-2 downsample after
//!   diffusers' explicit (0, 1, 0, 1) zero pad) by the dense convolution of `backend::gpu::conv`;
//!   1 × 1 (`conv_shortcut`, `quant_conv`, `post_quant_conv`) through the same plan, which runs
//!   them as one GEMM + per-channel bias;
//! - ResnetBlock2D: GroupNorm with fused SiLU, conv, GroupNorm + SiLU, conv, + (projected) input;
//! - mid-block attention: GroupNorm (no activation), `to_q` / `to_k` / `to_v` as biased linears
//!   over the H·W tokens (GEMM + bias, through the 1 × 1 convolution plan), flash attention with
//!   ONE head over all C channels (scale 1/√C, head dimension up to the kernels' 1024), `to_out.0`,
//!   + input;
//! - decoder upsampling: nearest 2× then a 3 × 3 conv;
//! - the posterior: the encoder's moments are read back and split on the host into the mean and
//!   the logvar (clamped to [−30, 20], as the CPU and diffusers' `DiagonalGaussianDistribution`);
//!   draws from it use the CPU's [`AutoencoderKL::sample`] (host RNG), so the LDM 5-channel scheme
//!   ([`GpuVae::encode5`] / [`GpuVae::decode5`]) gives what the CPU gives for the same RNG.
//!
//! Runs on a CUDA device (`backend::cuda`) and, in the tests, on the CPU emulation of the kernels
//! (`tests/gpu/parity/vae.rs`: parity with the CPU VAE in f64).

use super::unet::nchw_to_nhwc;
use super::vae::{check_groups, AutoencoderKL, AutoencoderKLConfig, Nchw, DOWNSAMPLE_PAD};
use crate::backend::gpu::attention::Attention;
use crate::backend::gpu::conv::Conv2d;
use crate::backend::gpu::norm::GroupNorm;
use crate::backend::gpu::shape::{add, Upsample2x};
use crate::backend::gpu::{Gpu, Math};
use crate::error::{Error, Result};
use crate::ops::conv::Pad2d;
use crate::ops::norm::Act;
use crate::tensor::DType;
use rand::RngCore;
use std::collections::HashMap;

const F32: DType = DType::F32;

/// diffusers' logvar clamp in `DiagonalGaussianDistribution` (as `vae.rs`).
const LOGVAR_MIN: f32 = -30.0;
const LOGVAR_MAX: f32 = 20.0;

/// One parameter on the device.
struct Param<B> {
    buf: B,
    shape: Vec<usize>,
}

/// A device activation, NHWC [n, h, w, c] f32 (token sequences: h = tokens, w = 1).
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

/// An [`AutoencoderKL`]'s parameters on one device (f32), and its encoder and decoder.
pub struct GpuVae<G: Gpu> {
    config: AutoencoderKLConfig,
    params: HashMap<String, Param<G::Buf>>,
    /// GEMM and convolution arithmetic: `Math::F32` (default) or TF32 tensor cores.
    pub math: Math,
}

impl<G: Gpu> GpuVae<G> {
    /// Uploads every parameter of `vae` (f32).
    pub fn new(g: &G, vae: &AutoencoderKL<f32>) -> Result<Self> {
        let mut params = HashMap::new();
        for (name, shape, _, value) in vae.params().iter() {
            params.insert(
                name.to_string(),
                Param {
                    buf: g.upload_slice(value)?,
                    shape: shape.to_vec(),
                },
            );
        }
        Ok(GpuVae {
            config: vae.config().clone(),
            params,
            math: Math::F32,
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    fn param(&self, key: &str) -> Result<&Param<G::Buf>> {
        self.params
            .get(key)
            .ok_or_else(|| Error::MissingKey(format!("GPU VAE: no parameter {key:?}")))
    }

    fn ptr(&self, g: &G, key: &str) -> Result<u64> {
        Ok(g.ptr(&self.param(key)?.buf))
    }

    // ---- host API (NCHW, as `AutoencoderKL`) ----

    /// Encodes NCHW images → (mean, logvar) of the latent Gaussian, each `[N, latent_channels,
    /// H/f, W/f]`, logvar clamped to [−30, 20]: [`AutoencoderKL::encode`] (same checks).
    pub fn encode(&self, g: &G, x: &Nchw<f32>) -> Result<(Nchw<f32>, Nchw<f32>)> {
        let cfg = &self.config;
        check_nchw("encode input", x, cfg.in_channels, cfg.downscale())?;
        let [n, c, h, w] = x.shape;
        let xb = g.upload_slice(&nchw_to_nhwc(&x.data, n, c, h, w))?;
        // SAFETY: xb holds n·h·w·c f32 (just uploaded), c = in_channels (checked).
        let (m, [_, lh, lw, mc]) = unsafe { self.encoder_forward_device(g, &xb, n, h, w)? };
        let moments: Vec<f32> = g.download_vec(&m, n * lh * lw * mc)?;
        let l = cfg.latent_channels;
        let mean = from_nhwc(&moments, [n, l, lh, lw], mc, 0);
        let mut logvar = from_nhwc(&moments, [n, l, lh, lw], mc, l);
        // As the CPU (a NaN stays NaN).
        for v in logvar.data.iter_mut() {
            *v = v.clamp(LOGVAR_MIN, LOGVAR_MAX);
        }
        Ok((mean, logvar))
    }

    /// Decodes NCHW latents `[N, latent_channels, h, w]` in the VAE's own scale → images
    /// `[N, out_channels, h·f, w·f]`: [`AutoencoderKL::decode`] (same checks).
    pub fn decode(&self, g: &G, z: &Nchw<f32>) -> Result<Nchw<f32>> {
        let cfg = &self.config;
        check_nchw("decode input", z, cfg.latent_channels, 1)?;
        let [n, c, h, w] = z.shape;
        let zb = g.upload_slice(&nchw_to_nhwc(&z.data, n, c, h, w))?;
        // SAFETY: zb holds n·h·w·c f32 (just uploaded), c = latent_channels (checked).
        let (y, [_, oh, ow, oc]) = unsafe { self.decoder_forward_device(g, &zb, n, h, w)? };
        let out: Vec<f32> = g.download_vec(&y, n * oh * ow * oc)?;
        Ok(from_nhwc(&out, [n, oc, oh, ow], oc, 0))
    }

    /// [`AutoencoderKL::encode5`] on the device: each channel group encoded on its own, the mean
    /// (or, with `rng`, a draw by [`AutoencoderKL::sample`] — the CPU's RNG use, so the same seed
    /// gives the same noise) concatenated on the channel axis and scaled to diffusion latents.
    pub fn encode5(
        &self,
        g: &G,
        x: &Nchw<f32>,
        groups: &[Vec<usize>],
        mut rng: Option<&mut dyn RngCore>,
    ) -> Result<Nchw<f32>> {
        let [n, c, h, w] = x.shape;
        check_groups(groups, c, self.config.in_channels, "encode5")?;
        let l = self.config.latent_channels;
        let hw = h * w;
        let mut parts = Vec::with_capacity(groups.len());
        for grp in groups {
            let mut sub = vec![0f32; n * grp.len() * hw];
            for b in 0..n {
                for (j, &ch) in grp.iter().enumerate() {
                    sub[(b * grp.len() + j) * hw..][..hw]
                        .copy_from_slice(&x.data[(b * c + ch) * hw..][..hw]);
                }
            }
            let (mean, logvar) = self.encode(g, &Nchw::new([n, grp.len(), h, w], sub)?)?;
            parts.push(match rng.as_deref_mut() {
                Some(r) => AutoencoderKL::<f32>::sample(&mean, &logvar, r)?,
                None => mean,
            });
        }
        let [_, _, lh, lw] = parts[0].shape;
        let lhw = lh * lw;
        let (sf, shift) = (
            self.config.scaling_factor,
            self.config.shift_factor.unwrap_or(0.0),
        );
        let gl = groups.len() * l;
        let mut out = vec![0f32; n * gl * lhw];
        for (gi, p) in parts.iter().enumerate() {
            for b in 0..n {
                let dst = &mut out[(b * gl + gi * l) * lhw..][..l * lhw];
                let src = &p.data[b * l * lhw..][..l * lhw];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, &s)| *d = ((s as f64 - shift) * sf) as f32);
            }
        }
        Nchw::new([n, gl, lh, lw], out)
    }

    /// [`AutoencoderKL::decode5`] on the device: every group's latents unscaled and decoded; a
    /// channel reconstructed by several groups gets the mean of its reconstructions.
    pub fn decode5(&self, g: &G, latents: &Nchw<f32>, groups: &[Vec<usize>]) -> Result<Nchw<f32>> {
        let c = groups.iter().flatten().max().map_or(0, |m| m + 1);
        check_groups(groups, c, self.config.out_channels, "decode5")?;
        let l = self.config.latent_channels;
        let [n, lc, lh, lw] = latents.shape;
        if lc != groups.len() * l {
            return Err(Error::Shape(format!(
                "AutoencoderKL decode5: latents have {lc} channels, {} groups × {l} latent channels need {}",
                groups.len(),
                groups.len() * l
            )));
        }
        check_finite("AutoencoderKL decode5 latents", &latents.data)?;
        let (sf, shift) = (
            self.config.scaling_factor,
            self.config.shift_factor.unwrap_or(0.0),
        );
        let lhw = lh * lw;
        let mut out: Vec<f32> = Vec::new();
        let mut count = vec![0usize; c];
        let mut dims_out = [n, c, 0, 0];
        for (gi, grp) in groups.iter().enumerate() {
            let mut z = vec![0f32; n * l * lhw];
            for b in 0..n {
                let src = &latents.data[(b * lc + gi * l) * lhw..][..l * lhw];
                z[b * l * lhw..][..l * lhw]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(d, &s)| *d = (s as f64 / sf + shift) as f32);
            }
            let rec = self.decode(g, &Nchw::new([n, l, lh, lw], z)?)?;
            let [_, rc, h, w] = rec.shape;
            let hw = h * w;
            if out.is_empty() {
                out = vec![0f32; n * c * hw];
                dims_out = [n, c, h, w];
            }
            for b in 0..n {
                for (j, &ch) in grp.iter().enumerate() {
                    let dst = &mut out[(b * c + ch) * hw..][..hw];
                    let src = &rec.data[(b * rc + j) * hw..][..hw];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
                }
            }
            grp.iter().for_each(|&ch| count[ch] += 1);
        }
        let hw = dims_out[2] * dims_out[3];
        for (bc, o) in out.chunks_mut(hw.max(1)).enumerate() {
            let k = count[bc % c] as f32;
            o.iter_mut().for_each(|v| *v /= k);
        }
        Nchw::new(dims_out, out)
    }

    // ---- device API (NHWC) ----

    /// Encoder + quant_conv on a device input x, NHWC [n, h, w, in_channels] f32 (not consumed)
    /// → a device buffer with the Gaussian's parameters NHWC [n, h/f, w/f, 2·latent_channels]
    /// (mean channels first, then the unclamped logvar) and its shape: the CPU's
    /// `encoder_forward`. Checks the geometry (not x's values).
    ///
    /// # Safety
    /// `x` holds at least n·h·w·in_channels f32.
    pub unsafe fn encoder_forward_device(
        &self,
        g: &G,
        x: &G::Buf,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(G::Buf, [usize; 4])> {
        let cfg = &self.config;
        check_spatial("encoder input", n, h, w, cfg.downscale())?;
        let levels = cfg.block_out_channels.len();
        let mut hcur = self.conv_ptr(
            g,
            g.ptr(x),
            [n, h, w, cfg.in_channels],
            "encoder.conv_in",
            1,
            Pad2d::same(1),
        )?;
        for i in 0..levels {
            for j in 0..cfg.layers_per_block {
                hcur = self.resnet(g, hcur, &format!("encoder.down_blocks.{i}.resnets.{j}"))?;
            }
            if i + 1 < levels {
                let key = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                hcur = self.conv(g, &hcur, &key, 2, DOWNSAMPLE_PAD)?;
            }
        }
        hcur = self.mid_block(g, hcur, "encoder.mid_block")?;
        hcur = self.group_norm(g, &hcur, "encoder.conv_norm_out", Act::Silu)?;
        hcur = self.conv(g, &hcur, "encoder.conv_out", 1, Pad2d::same(1))?;
        if cfg.use_quant_conv {
            hcur = self.conv(g, &hcur, "quant_conv", 1, Pad2d::same(0))?;
        }
        let shape = [hcur.n, hcur.h, hcur.w, hcur.c];
        Ok((hcur.buf, shape))
    }

    /// post_quant_conv + decoder on device latents z, NHWC [n, h, w, latent_channels] f32 in the
    /// VAE's own scale (not consumed) → a device buffer NHWC [n, h·f, w·f, out_channels] and its
    /// shape: the CPU's `decoder_forward`. Checks the geometry (not z's values).
    ///
    /// # Safety
    /// `z` holds at least n·h·w·latent_channels f32.
    pub unsafe fn decoder_forward_device(
        &self,
        g: &G,
        z: &G::Buf,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(G::Buf, [usize; 4])> {
        let cfg = &self.config;
        check_spatial("decoder input", n, h, w, 1)?;
        let zshape = [n, h, w, cfg.latent_channels];
        let mut hcur = if cfg.use_post_quant_conv {
            let p = self.conv_ptr(g, g.ptr(z), zshape, "post_quant_conv", 1, Pad2d::same(0))?;
            self.conv(g, &p, "decoder.conv_in", 1, Pad2d::same(1))?
        } else {
            self.conv_ptr(g, g.ptr(z), zshape, "decoder.conv_in", 1, Pad2d::same(1))?
        };
        hcur = self.mid_block(g, hcur, "decoder.mid_block")?;
        let levels = cfg.block_out_channels.len();
        for i in 0..levels {
            for j in 0..=cfg.layers_per_block {
                hcur = self.resnet(g, hcur, &format!("decoder.up_blocks.{i}.resnets.{j}"))?;
            }
            if i + 1 < levels {
                let u = self.upsample(g, &hcur)?;
                drop(hcur);
                let key = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
                hcur = self.conv(g, &u, &key, 1, Pad2d::same(1))?;
            }
        }
        hcur = self.group_norm(g, &hcur, "decoder.conv_norm_out", Act::Silu)?;
        hcur = self.conv(g, &hcur, "decoder.conv_out", 1, Pad2d::same(1))?;
        let shape = [hcur.n, hcur.h, hcur.w, hcur.c];
        Ok((hcur.buf, shape))
    }

    // ---- building blocks (NHWC, f32) ----

    /// Convolution (or linear: weight [out, in], run as a 1 × 1 convolution) `key` with bias.
    fn conv(
        &self,
        g: &G,
        x: &Map<G::Buf>,
        key: &str,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Map<G::Buf>> {
        // SAFETY: x is a live map of its recorded shape.
        unsafe { self.conv_ptr(g, g.ptr(&x.buf), [x.n, x.h, x.w, x.c], key, stride, pad) }
    }

    /// [`Self::conv`] on the input at device address `x`.
    ///
    /// # Safety
    /// `x` addresses n·h·w·c f32 of a live buffer.
    unsafe fn conv_ptr(
        &self,
        g: &G,
        x: u64,
        [n, h, w, c]: [usize; 4],
        key: &str,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Map<G::Buf>> {
        let wp = self.param(&format!("{key}.weight"))?;
        let (out, inp) = (wp.shape[0], wp.shape[1]);
        let k = if wp.shape.len() == 4 { wp.shape[2] } else { 1 };
        if inp != c {
            return Err(Error::Internal(format!(
                "GPU VAE: {key} takes {inp} channels, the map has {c}"
            )));
        }
        let plan = Conv2d::new(F32, [n, h, w, c], out, k, stride, pad)?;
        let [oh, ow] = plan.out_hw();
        let y = g.alloc(plan.output_len() * 4)?;
        let bp = self.ptr(g, &format!("{key}.bias"))?;
        // x holds the plan's input, w its OIHW weights (a linear's [out, in] is the 1 × 1 case),
        // b out f32, y its output (fresh).
        plan.forward(g, x, g.ptr(&wp.buf), Some(bp), g.ptr(&y), self.math)?;
        Ok(Map {
            buf: y,
            n,
            h: oh,
            w: ow,
            c: out,
        })
    }

    /// GroupNorm `key` (config groups and ε) with the activation fused.
    fn group_norm(&self, g: &G, x: &Map<G::Buf>, key: &str, act: Act) -> Result<Map<G::Buf>> {
        let cfg = &self.config;
        let plan = GroupNorm::new(
            F32,
            [x.n, x.h * x.w, x.c],
            cfg.norm_num_groups,
            cfg.norm_eps,
            act,
        )?;
        let y = g.alloc(x.len() * 4)?;
        let mean = g.alloc(plan.stats_len() * 4)?;
        let invstd = g.alloc(plan.stats_len() * 4)?;
        let (gamma, beta) = (
            self.ptr(g, &format!("{key}.weight"))?,
            self.ptr(g, &format!("{key}.bias"))?,
        );
        // SAFETY: x and y hold len f32 (y fresh), γ / β c f32, mean / invstd stats_len f32.
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
        Ok(Map {
            buf: y,
            n: x.n,
            h: x.h,
            w: x.w,
            c: x.c,
        })
    }

    /// y += x, in place in y (same length).
    fn add_into(&self, g: &G, x: &Map<G::Buf>, y: &Map<G::Buf>) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::Internal(format!(
                "GPU VAE: adding {} values to {}",
                x.len(),
                y.len()
            )));
        }
        // SAFETY: x and y hold len f32; the kernel reads both elements before writing y's.
        unsafe { add(g, F32, g.ptr(&x.buf), g.ptr(&y.buf), g.ptr(&y.buf), y.len()) }
    }

    fn upsample(&self, g: &G, x: &Map<G::Buf>) -> Result<Map<G::Buf>> {
        let plan = Upsample2x::new(F32, [x.n, x.h, x.w, x.c])?;
        let y = g.alloc(plan.output_len() * 4)?;
        // SAFETY: x holds input_len f32, y output_len (fresh).
        unsafe { plan.forward(g, g.ptr(&x.buf), g.ptr(&y))? };
        Ok(Map {
            buf: y,
            n: x.n,
            h: 2 * x.h,
            w: 2 * x.w,
            c: x.c,
        })
    }

    /// ResnetBlock2D; consumes x.
    fn resnet(&self, g: &G, x: Map<G::Buf>, key: &str) -> Result<Map<G::Buf>> {
        let h1 = self.group_norm(g, &x, &format!("{key}.norm1"), Act::Silu)?;
        let h2 = self.conv(g, &h1, &format!("{key}.conv1"), 1, Pad2d::same(1))?;
        drop(h1);
        let h3 = self.group_norm(g, &h2, &format!("{key}.norm2"), Act::Silu)?;
        drop(h2);
        let h4 = self.conv(g, &h3, &format!("{key}.conv2"), 1, Pad2d::same(1))?;
        drop(h3);
        let shortcut = format!("{key}.conv_shortcut");
        let skip = if self.params.contains_key(&format!("{shortcut}.weight")) {
            self.conv(g, &x, &shortcut, 1, Pad2d::same(0))?
        } else {
            x
        };
        self.add_into(g, &skip, &h4)?;
        Ok(h4)
    }

    /// The mid-block single-head self-attention with residual; consumes x.
    fn attention(&self, g: &G, x: Map<G::Buf>, key: &str) -> Result<Map<G::Buf>> {
        let (n, l, c) = (x.n, x.h * x.w, x.c);
        let xn = self.group_norm(g, &x, &format!("{key}.group_norm"), Act::None)?;
        // The H·W tokens as an [n, l, 1, c] map: the linears are 1 × 1 convolutions over it.
        let seq = Map { h: l, w: 1, ..xn };
        let q = self.conv(g, &seq, &format!("{key}.to_q"), 1, Pad2d::same(0))?;
        let k = self.conv(g, &seq, &format!("{key}.to_k"), 1, Pad2d::same(0))?;
        let v = self.conv(g, &seq, &format!("{key}.to_v"), 1, Pad2d::same(0))?;
        drop(seq);
        // diffusers: heads = C / attention_head_dim = 1, scale = 1/√C.
        let plan = Attention::new(F32, n, l, l, 1, c, c, None)?.with_math(self.math);
        let o = g.alloc(plan.out_len() * 4)?;
        let lse = g.alloc(plan.lse_len() * 4)?;
        // SAFETY: q, k, v hold n·l·c f32 (the plan's q_len, k_len, v_len), o and lse are fresh.
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
        drop((q, k, v, lse));
        let a = Map {
            buf: o,
            n,
            h: l,
            w: 1,
            c,
        };
        let out = self.conv(g, &a, &format!("{key}.to_out.0"), 1, Pad2d::same(0))?;
        drop(a);
        let out = Map {
            h: x.h,
            w: x.w,
            ..out
        };
        self.add_into(g, &x, &out)?;
        Ok(out)
    }

    fn mid_block(&self, g: &G, x: Map<G::Buf>, key: &str) -> Result<Map<G::Buf>> {
        let mut h = self.resnet(g, x, &format!("{key}.resnets.0"))?;
        if self.config.mid_block_add_attention {
            h = self.attention(g, h, &format!("{key}.attentions.0"))?;
        }
        self.resnet(g, h, &format!("{key}.resnets.1"))
    }
}

/// The CPU's checks on an NCHW input: non-empty batch, channel count, spatial size a positive
/// multiple of `f`, finite values.
fn check_nchw(what: &str, x: &Nchw<f32>, want_c: usize, f: usize) -> Result<()> {
    let [n, c, h, w] = x.shape;
    if n == 0 {
        return Err(Error::Shape(format!(
            "AutoencoderKL {what} has an empty batch"
        )));
    }
    if x.data.len() != n * c * h * w {
        return Err(Error::Shape(format!(
            "AutoencoderKL {what}: shape {:?} needs {} values, got {}",
            x.shape,
            n * c * h * w,
            x.data.len()
        )));
    }
    if c != want_c {
        return Err(Error::Shape(format!(
            "AutoencoderKL {what} has {c} channels, the config needs {want_c}"
        )));
    }
    check_spatial(what, n, h, w, f)?;
    check_finite(&format!("AutoencoderKL {what}"), &x.data)
}

fn check_spatial(what: &str, n: usize, h: usize, w: usize, f: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Shape(format!(
            "AutoencoderKL {what} has an empty batch"
        )));
    }
    if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
        return Err(Error::Shape(format!(
            "AutoencoderKL {what} is {h}×{w}: height and width must be positive multiples of {f} (2^(levels − 1))"
        )));
    }
    Ok(())
}

fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite(format!(
            "{what} has a non-finite value ({:?}) at flat index {i}",
            v[i]
        ))),
    }
}

/// Channels `c0 .. c0 + shape[1]` of NHWC `[n, h, w, ctot]` as NCHW `shape`.
fn from_nhwc(nhwc: &[f32], shape: [usize; 4], ctot: usize, c0: usize) -> Nchw<f32> {
    let [n, c, h, w] = shape;
    let hw = h * w;
    let mut data = vec![0f32; n * c * hw];
    for b in 0..n {
        for ch in 0..c {
            let dst = &mut data[(b * c + ch) * hw..][..hw];
            for (p, d) in dst.iter_mut().enumerate() {
                *d = nhwc[(b * hw + p) * ctot + c0 + ch];
            }
        }
    }
    Nchw { shape, data }
}
