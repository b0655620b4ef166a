//! The Stable Diffusion XL VAE: diffusers `AutoencoderKL` (REFERENCE §10), fp32, forward and backward.
//!
//! Architecture (diffusers 0.42 `Encoder` / `Decoder` with `DownEncoderBlock2D` / `UpDecoderBlock2D`):
//! - encoder: conv_in 3×3 → per level `layers_per_block` ResnetBlock2D (+ a stride-2 3×3 conv after an
//!   explicit (0, 1, 0, 1) zero pad, all levels but the last) → mid block (resnet, single-head
//!   attention, resnet) → GroupNorm + SiLU → conv_out 3×3 to 2·latent channels → quant_conv 1×1.
//! - decoder: post_quant_conv 1×1 → conv_in 3×3 → mid block → per level (reversed channels)
//!   `layers_per_block + 1` resnets (+ nearest ×2 upsample and a 3×3 conv, all levels but the last)
//!   → GroupNorm + SiLU → conv_out 3×3.
//! - ResnetBlock2D: GN+SiLU → conv3 → GN+SiLU → conv3, plus the input (1×1 `conv_shortcut` when the
//!   channel count changes). Mid-block attention: GN → to_q / to_k / to_v (biased linears over the
//!   H·W tokens) → softmax(q kᵀ / √C) v → to_out.0 → + input. Every GroupNorm has eps 1e-6
//!   (hard-coded by diffusers) and `norm_num_groups` groups; output / rescale factors are 1.
//!
//! Parameters live in a [`Params`] under diffusers' state_dict names (`encoder.down_blocks.0.resnets.0
//! .conv1.weight`, …; the pre-0.14 attention names `query` / `key` / `value` / `proj_attn` and 1 × 1
//! conv-shaped attention weights are accepted on load). The public API is NCHW (as diffusers); inside,
//! activations are NHWC (one transpose at each end). [`AutoencoderKL::encoder_forward`] /
//! [`AutoencoderKL::decoder_forward`] run on a caller's [`Tape`] so the VAE can be differentiated;
//! `encode` / `decode` run a no-grad tape and release every intermediate as soon as it is consumed.
//!
//! The LDM paper's 5-channel scheme ([`AutoencoderKL::encode5`] / [`AutoencoderKL::decode5`]): the
//! image's channels are split into groups of `in_channels` (default [`LDM_GROUPS`] = [0,1,2] and
//! [2,3,4], sharing channel 2), each group is encoded on its own and the latents are concatenated on
//! the channel axis (2 × 4 → 8 channels) and scaled by `scaling_factor`. The inverse decodes every
//! group's latents and, for a channel reconstructed by more than one group, returns the **mean of its
//! reconstructions** (the unbiased choice when both decodings are equally good; it also equals what
//! a least-squares fit of one image to both decodings gives).

use crate::autograd::{Float, ParamKind, Params, Tape, Var};
use crate::error::{Error, Result};
use crate::io::safetensors::TensorMap;
use crate::ops::attention::attention;
use crate::ops::conv::{conv2d_pad, Pad2d};
use crate::ops::elementwise::{add, linear};
use crate::ops::groupnorm::group_norm;
use crate::ops::norm::Act;
use crate::ops::shape::{reshape, upsample_nearest2x};
use crate::tensor::Tensor;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::path::Path;

/// The LDM paper's grouping of 5 Cell Painting channels into two RGB-like triplets sharing channel 2.
pub const LDM_GROUPS: [[usize; 3]; 2] = [[0, 1, 2], [2, 3, 4]];

/// diffusers' logvar clamp in `DiagonalGaussianDistribution`.
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

/// diffusers `AutoencoderKL` config (same names). All levels are `DownEncoderBlock2D` /
/// `UpDecoderBlock2D` with SiLU, the only block types the SD / SDXL VAEs use.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// GroupNorm epsilon: diffusers hard-codes 1e-6 in `Encoder` / `Decoder` (not a diffusers key).
    pub norm_eps: f64,
    pub scaling_factor: f64,
    /// Latents are `(z − shift_factor) · scaling_factor` when set (SD3 / Flux VAEs; None for SDXL).
    pub shift_factor: Option<f64>,
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self::sdxl()
    }
}

impl AutoencoderKLConfig {
    /// stabilityai/sdxl-vae (REFERENCE §10).
    pub fn sdxl() -> Self {
        AutoencoderKLConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            norm_eps: 1e-6,
            scaling_factor: 0.13025,
            shift_factor: None,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// A diffusers `config.json` (or a dict of some of its keys): keys not given keep their
    /// [`AutoencoderKLConfig::sdxl`] value. Keys starting with `_` and the ones that do not change
    /// the computation (`sample_size`, `force_upcast`, `latents_mean`, `latents_std`) are ignored;
    /// any other unknown key, a block type other than `DownEncoderBlock2D` / `UpDecoderBlock2D` or an
    /// activation other than SiLU is an error.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Format(format!("AutoencoderKL config is not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| {
            Error::Format("AutoencoderKL config must be a JSON object".to_string())
        })?;
        let mut c = Self::sdxl();
        let uint = |k: &str, v: &serde_json::Value| -> Result<usize> {
            v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "AutoencoderKL config {k:?} must be a non-negative integer, got {v}"
                ))
            })
        };
        let float = |k: &str, v: &serde_json::Value| -> Result<f64> {
            v.as_f64().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "AutoencoderKL config {k:?} must be a number, got {v}"
                ))
            })
        };
        let boolean = |k: &str, v: &serde_json::Value| -> Result<bool> {
            v.as_bool().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "AutoencoderKL config {k:?} must be a boolean, got {v}"
                ))
            })
        };
        let list = |k: &str, v: &serde_json::Value| -> Result<Vec<serde_json::Value>> {
            v.as_array().cloned().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "AutoencoderKL config {k:?} must be a list, got {v}"
                ))
            })
        };
        let mut block_types: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in obj {
            match k.as_str() {
                "in_channels" => c.in_channels = uint(k, v)?,
                "out_channels" => c.out_channels = uint(k, v)?,
                "block_out_channels" => {
                    c.block_out_channels = list(k, v)?
                        .iter()
                        .map(|x| uint(k, x))
                        .collect::<Result<_>>()?
                }
                "layers_per_block" => c.layers_per_block = uint(k, v)?,
                "latent_channels" => c.latent_channels = uint(k, v)?,
                "norm_num_groups" => c.norm_num_groups = uint(k, v)?,
                "norm_eps" => c.norm_eps = float(k, v)?,
                "scaling_factor" => c.scaling_factor = float(k, v)?,
                "shift_factor" => {
                    c.shift_factor = if v.is_null() {
                        None
                    } else {
                        Some(float(k, v)?)
                    }
                }
                "mid_block_add_attention" => c.mid_block_add_attention = boolean(k, v)?,
                "use_quant_conv" => c.use_quant_conv = boolean(k, v)?,
                "use_post_quant_conv" => c.use_post_quant_conv = boolean(k, v)?,
                "act_fn" => {
                    if v.as_str() != Some("silu") && v.as_str() != Some("swish") {
                        return Err(Error::Unsupported(format!(
                            "AutoencoderKL act_fn {v}: only \"silu\" is supported"
                        )));
                    }
                }
                "down_block_types" | "up_block_types" => {
                    let names = list(k, v)?
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "AutoencoderKL config {k:?} must list strings"
                            ))
                        })?;
                    block_types.push((k.clone(), names));
                }
                "sample_size" | "force_upcast" | "latents_mean" | "latents_std" => {}
                _ if k.starts_with('_') => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown AutoencoderKL config key {k:?}"
                    )))
                }
            }
        }
        for (k, names) in &block_types {
            let want = if k == "down_block_types" {
                "DownEncoderBlock2D"
            } else {
                "UpDecoderBlock2D"
            };
            if let Some(bad) = names.iter().find(|n| n.as_str() != want) {
                return Err(Error::Unsupported(format!(
                    "AutoencoderKL {k} entry {bad:?}: only {want} is supported"
                )));
            }
            if names.len() != c.block_out_channels.len() {
                return Err(Error::InvalidArgument(format!(
                    "AutoencoderKL {k} has {} entries but block_out_channels has {}",
                    names.len(),
                    c.block_out_channels.len()
                )));
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the config is buildable.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("AutoencoderKL config: {m}")));
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return bad(format!(
                "in_channels {}, out_channels {} and latent_channels {} must be positive",
                self.in_channels, self.out_channels, self.latent_channels
            ));
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.len() > 16 {
            return bad(format!(
                "block_out_channels must have 1 to 16 entries, got {:?}",
                self.block_out_channels
            ));
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block must be positive".into());
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| g == 0 || c == 0 || c % g != 0)
        {
            return bad(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {g}"
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad(format!("norm_eps must be positive, got {}", self.norm_eps));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!(
                "scaling_factor must be finite and non-zero, got {}",
                self.scaling_factor
            ));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return bad(format!(
                "shift_factor must be finite, got {:?}",
                self.shift_factor
            ));
        }
        Ok(())
    }

    /// Spatial down-sampling factor of the encoder: 2^(levels − 1) (8 for SDXL).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Every parameter's (diffusers name, shape, kind) in forward order.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>, ParamKind)> {
        let mut s = Specs(Vec::new());
        let b = &self.block_out_channels;
        let (first, last, lat) = (b[0], b[b.len() - 1], self.latent_channels);
        // Encoder.
        s.conv("encoder.conv_in", self.in_channels, first, 3);
        let mut cin = first;
        for (i, &cout) in b.iter().enumerate() {
            for j in 0..self.layers_per_block {
                s.resnet(&format!("encoder.down_blocks.{i}.resnets.{j}"), cin, cout);
                cin = cout;
            }
            if i + 1 < b.len() {
                s.conv(
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                );
            }
        }
        s.mid("encoder.mid_block", last, self.mid_block_add_attention);
        s.norm("encoder.conv_norm_out", last);
        s.conv("encoder.conv_out", last, 2 * lat, 3);
        if self.use_quant_conv {
            s.conv("quant_conv", 2 * lat, 2 * lat, 1);
        }
        // Decoder.
        if self.use_post_quant_conv {
            s.conv("post_quant_conv", lat, lat, 1);
        }
        s.conv("decoder.conv_in", lat, last, 3);
        s.mid("decoder.mid_block", last, self.mid_block_add_attention);
        let mut cin = last;
        for (i, &cout) in b.iter().rev().enumerate() {
            for j in 0..=self.layers_per_block {
                s.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), cin, cout);
                cin = cout;
            }
            if i + 1 < b.len() {
                s.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                );
            }
        }
        s.norm("decoder.conv_norm_out", first);
        s.conv("decoder.conv_out", first, self.out_channels, 3);
        s.0
    }
}

struct Specs(Vec<(String, Vec<usize>, ParamKind)>);

impl Specs {
    fn conv(&mut self, p: &str, cin: usize, cout: usize, k: usize) {
        self.0.push((
            format!("{p}.weight"),
            vec![cout, cin, k, k],
            ParamKind::Weight,
        ));
        self.0
            .push((format!("{p}.bias"), vec![cout], ParamKind::Bias));
    }
    fn linear(&mut self, p: &str, cin: usize, cout: usize) {
        self.0
            .push((format!("{p}.weight"), vec![cout, cin], ParamKind::Weight));
        self.0
            .push((format!("{p}.bias"), vec![cout], ParamKind::Bias));
    }
    fn norm(&mut self, p: &str, c: usize) {
        self.0
            .push((format!("{p}.weight"), vec![c], ParamKind::Bias));
        self.0.push((format!("{p}.bias"), vec![c], ParamKind::Bias));
    }
    fn resnet(&mut self, p: &str, cin: usize, cout: usize) {
        self.norm(&format!("{p}.norm1"), cin);
        self.conv(&format!("{p}.conv1"), cin, cout, 3);
        self.norm(&format!("{p}.norm2"), cout);
        self.conv(&format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{p}.conv_shortcut"), cin, cout, 1);
        }
    }
    fn mid(&mut self, p: &str, c: usize, attn: bool) {
        self.resnet(&format!("{p}.resnets.0"), c, c);
        if attn {
            let a = format!("{p}.attentions.0");
            self.norm(&format!("{a}.group_norm"), c);
            for l in ["to_q", "to_k", "to_v", "to_out.0"] {
                self.linear(&format!("{a}.{l}"), c, c);
            }
        }
        self.resnet(&format!("{p}.resnets.1"), c, c);
    }
}

/// The pre-0.14 diffusers / original LDM names of a mid-block attention parameter, if `name` is one.
fn legacy_name(name: &str) -> Option<String> {
    let (head, tail) = name.rsplit_once(".attentions.0.")?;
    let (layer, leaf) = tail.split_once('.')?;
    let old = match (layer, leaf) {
        ("to_q", _) => "query",
        ("to_k", _) => "key",
        ("to_v", _) => "value",
        ("to_out", "0.weight") | ("to_out", "0.bias") => {
            return Some(format!(
                "{head}.attentions.0.proj_attn.{}",
                leaf.trim_start_matches("0.")
            ))
        }
        _ => return None,
    };
    Some(format!("{head}.attentions.0.{old}.{leaf}"))
}

/// A dense NCHW array (the API boundary of the VAE, as diffusers).
#[derive(Clone, Debug, PartialEq)]
pub struct Nchw<T> {
    pub shape: [usize; 4],
    pub data: Vec<T>,
}

impl<T: Float> Nchw<T> {
    pub fn new(shape: [usize; 4], data: Vec<T>) -> Result<Self> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "an NCHW array of shape {shape:?} needs {} values, got {}",
                shape.iter().product::<usize>(),
                data.len()
            )));
        }
        Ok(Nchw { shape, data })
    }

    /// From a rank-4 f32 / f64 tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let shape: [usize; 4] = t.shape().try_into().map_err(|_| {
            Error::Shape(format!(
                "expected an NCHW tensor (rank 4), got shape {:?}",
                t.shape()
            ))
        })?;
        let data = match t.as_f32() {
            Ok(v) => v.iter().map(|&x| T::from_f64(x as f64)).collect(),
            Err(_) => t.as_f64()?.iter().map(|&x| T::from_f64(x)).collect(),
        };
        Self::new(shape, data)
    }

    /// As an f32 tensor.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_f32(
            &self.shape,
            self.data.iter().map(|x| x.to_f64() as f32).collect(),
        )
    }

    fn check_finite(&self, what: &str) -> Result<()> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::NonFinite(format!(
                "{what} has a non-finite value ({:?}) at flat index {i}",
                self.data[i]
            ))),
        }
    }

    fn to_nhwc(&self) -> Vec<T> {
        let [n, c, h, w] = self.shape;
        crate::diffusion::unet::nchw_to_nhwc(&self.data, n, c, h, w)
    }

    fn from_nhwc(nhwc: &[T], shape: [usize; 4], channels: std::ops::Range<usize>) -> Self {
        // `nhwc` is [N, H, W, Ctot]; the result takes channels `channels` of it as NCHW.
        let [n, c, h, w] = shape;
        let ctot = nhwc.len() / (n * h * w).max(1);
        let mut out = vec![T::ZERO; n * c * h * w];
        let hw = h * w;
        out.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(nc, o)| {
                let (b, ch) = (nc / c, channels.start + nc % c);
                let src = &nhwc[b * hw * ctot..][..hw * ctot];
                for (p, v) in o.iter_mut().enumerate() {
                    *v = src[p * ctot + ch];
                }
            });
        Nchw { shape, data: out }
    }
}

/// diffusers `AutoencoderKL` with parameters of type `T` (f32 models, f64 finite-difference checks).
pub struct AutoencoderKL<T: Float = f32> {
    config: AutoencoderKLConfig,
    params: Params<T>,
}

impl<T: Float> AutoencoderKL<T> {
    /// Random weights as torch initialises them (conv / linear weights and biases U(±1/√fan_in),
    /// GroupNorm γ = 1, β = 0), seeded.
    pub fn new(config: AutoencoderKLConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let specs = config.param_specs();
        let mut params = Params::new();
        let mut fan_in = 1usize;
        for (name, shape, kind) in specs {
            let n: usize = shape.iter().product();
            let value: Vec<T> = if name.ends_with(".weight") && shape.len() >= 2 {
                fan_in = shape[1..].iter().product();
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n)
                    .map(|_| T::from_f64(rng.gen_range(-bound..bound)))
                    .collect()
            } else if is_norm(&name) {
                let v = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                vec![T::from_f64(v); n]
            } else {
                // A conv / linear bias follows its weight (same fan-in).
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n)
                    .map(|_| T::from_f64(rng.gen_range(-bound..bound)))
                    .collect()
            };
            params.add(&name, &shape, value, kind)?;
        }
        Ok(AutoencoderKL { config, params })
    }

    /// Weights from a diffusers state_dict. Every parameter of `config` must be present with its
    /// shape (the first one that is missing or has another shape is named, with both shapes), and no
    /// other tensor may be (the unexpected ones are named).
    pub fn from_tensors(config: AutoencoderKLConfig, tensors: &TensorMap) -> Result<Self> {
        config.validate()?;
        let mut params = Params::new();
        let mut used = std::collections::BTreeSet::new();
        for (name, shape, kind) in config.param_specs() {
            let (key, t) = match tensors.get(&name) {
                Some(t) => (name.clone(), t),
                None => match legacy_name(&name).and_then(|l| tensors.get(&l).map(|t| (l, t))) {
                    Some(found) => found,
                    None => {
                        return Err(Error::MissingKey(format!(
                            "AutoencoderKL weights lack {name:?} (shape {shape:?})"
                        )))
                    }
                },
            };
            // Linear weights may come as 1 × 1 conv kernels (original LDM checkpoints).
            let fits = t.shape() == shape.as_slice()
                || (shape.len() == 2 && t.shape() == [shape[0], shape[1], 1, 1]);
            if !fits {
                return Err(Error::Shape(format!(
                    "AutoencoderKL weights do not fit the config: {key:?} has shape {:?}, the config needs {shape:?}",
                    t.shape()
                )));
            }
            let data = t
                .as_f32()
                .map_err(|e| Error::DType(format!("tensor {key:?}: {e}")))?;
            params.add(
                &name,
                &shape,
                data.iter().map(|&x| T::from_f64(x as f64)).collect(),
                kind,
            )?;
            used.insert(key);
        }
        let extra: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
        if !extra.is_empty() {
            return Err(Error::Format(format!(
                "AutoencoderKL weights have {} tensor(s) the config does not use, first {:?}",
                extra.len(),
                &extra[..extra.len().min(5)]
            )));
        }
        Ok(AutoencoderKL { config, params })
    }

    /// Loads a diffusers `diffusion_pytorch_model.safetensors` (f32 / f16 / bf16).
    pub fn load(config: AutoencoderKLConfig, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        let tensors = crate::io::safetensors::read_f32_tensors(&bytes)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        Self::from_tensors(config, &tensors)
    }

    /// The parameters as f32 tensors under diffusers' names.
    pub fn to_tensors(&self) -> Result<TensorMap> {
        let mut m = TensorMap::new();
        for (name, shape, _, value) in self.params.iter() {
            let t = Tensor::from_f32(shape, value.iter().map(|x| x.to_f64() as f32).collect())?;
            m.insert(name.to_string(), t);
        }
        Ok(m)
    }

    /// Writes the weights as safetensors (atomically), loadable by diffusers' `load_state_dict`.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::safetensors::write_f32_tensors(path, &self.to_tensors()?)
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }
    pub fn params(&self) -> &Params<T> {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut Params<T> {
        &mut self.params
    }

    /// Whether the parameters train (default) or are frozen: frozen parameters enter every tape as
    /// constants (no gradient, nothing recorded for them), as the VAE of a latent diffusion model is;
    /// gradients with respect to the inputs still flow.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        let mut p = Params::new();
        for (name, shape, kind) in self.config.param_specs() {
            let i = self.params.index(&name)?;
            let kind = if trainable { kind } else { ParamKind::Buffer };
            p.add(&name, &shape, self.params.value(i).to_vec(), kind)?;
        }
        self.params = p;
        Ok(())
    }

    pub fn trainable(&self) -> bool {
        self.params.len() > 0 && self.params.trainable(0)
    }

    // ---- building blocks on a tape (NHWC) ----

    fn p(&self, tape: &mut Tape<T>, name: &str) -> Result<Var> {
        tape.param_named(&self.params, name)
    }

    fn conv(
        &self,
        tape: &mut Tape<T>,
        x: &Var,
        pre: &str,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Var> {
        let w = self.p(tape, &format!("{pre}.weight"))?;
        let b = self.p(tape, &format!("{pre}.bias"))?;
        conv2d_pad(tape, x, &w, Some(&b), stride, pad)
    }

    fn norm(&self, tape: &mut Tape<T>, x: &Var, pre: &str, act: Act) -> Result<Var> {
        let g = self.p(tape, &format!("{pre}.weight"))?;
        let b = self.p(tape, &format!("{pre}.bias"))?;
        group_norm(
            tape,
            x,
            &g,
            &b,
            self.config.norm_num_groups,
            self.config.norm_eps,
            act,
        )
    }

    fn linear(&self, tape: &mut Tape<T>, x: &Var, pre: &str) -> Result<Var> {
        let w = self.p(tape, &format!("{pre}.weight"))?;
        let b = self.p(tape, &format!("{pre}.bias"))?;
        linear(tape, x, &w, Some(&b))
    }

    /// ResnetBlock2D; consumes (releases) `x`.
    fn resnet(&self, tape: &mut Tape<T>, x: Var, pre: &str) -> Result<Var> {
        let h = self.norm(tape, &x, &format!("{pre}.norm1"), Act::Silu)?;
        let h = consume(tape, h, |t, h| {
            self.conv(t, h, &format!("{pre}.conv1"), 1, Pad2d::same(1))
        })?;
        let h = consume(tape, h, |t, h| {
            self.norm(t, h, &format!("{pre}.norm2"), Act::Silu)
        })?;
        let h = consume(tape, h, |t, h| {
            self.conv(t, h, &format!("{pre}.conv2"), 1, Pad2d::same(1))
        })?;
        let shortcut = format!("{pre}.conv_shortcut");
        let skip = if self.params.index(&format!("{shortcut}.weight")).is_ok() {
            consume(tape, x, |t, x| {
                self.conv(t, x, &shortcut, 1, Pad2d::same(0))
            })?
        } else {
            x
        };
        let out = add(tape, &skip, &h)?;
        tape.release(&skip);
        tape.release(&h);
        Ok(out)
    }

    /// The mid-block single-head self-attention with residual; consumes `x`.
    fn attention(&self, tape: &mut Tape<T>, x: Var, pre: &str) -> Result<Var> {
        let (n, h, w, c) = dims(&x)?;
        let hn = self.norm(tape, &x, &format!("{pre}.group_norm"), Act::None)?;
        let seq = consume(tape, hn, |t, hn| reshape(t, hn, &[n, h * w, c]))?;
        let q = self.linear(tape, &seq, &format!("{pre}.to_q"))?;
        let k = self.linear(tape, &seq, &format!("{pre}.to_k"))?;
        let v = self.linear(tape, &seq, &format!("{pre}.to_v"))?;
        tape.release(&seq);
        // diffusers: heads = C / attention_head_dim = 1, scale = dim_head^-0.5 = 1/√C.
        let a = attention(tape, &q, &k, &v, 1, None)?;
        for t in [&q, &k, &v] {
            tape.release(t);
        }
        let o = consume(tape, a, |t, a| {
            self.linear(t, a, &format!("{pre}.to_out.0"))
        })?;
        let o = consume(tape, o, |t, o| reshape(t, o, &[n, h, w, c]))?;
        let out = add(tape, &o, &x)?;
        tape.release(&o);
        tape.release(&x);
        Ok(out)
    }

    fn mid_block(&self, tape: &mut Tape<T>, x: Var, pre: &str) -> Result<Var> {
        let mut h = self.resnet(tape, x, &format!("{pre}.resnets.0"))?;
        if self.config.mid_block_add_attention {
            h = self.attention(tape, h, &format!("{pre}.attentions.0"))?;
        }
        self.resnet(tape, h, &format!("{pre}.resnets.1"))
    }

    /// Encoder + quant_conv on NHWC `x` `[N, H, W, in_channels]` → the Gaussian's parameters
    /// `[N, H/f, W/f, 2·latent_channels]` (mean channels first, then the unclamped logvar),
    /// f = [`AutoencoderKLConfig::downscale`]. `x` itself is not released.
    pub fn encoder_forward(&self, tape: &mut Tape<T>, x: &Var) -> Result<Var> {
        let cfg = &self.config;
        let (_, hh, ww, c) = dims(x)?;
        self.check_spatial("encoder input", c, cfg.in_channels, hh, ww, cfg.downscale())?;
        let mut h = self.conv(tape, x, "encoder.conv_in", 1, Pad2d::same(1))?;
        let levels = cfg.block_out_channels.len();
        for i in 0..levels {
            for j in 0..cfg.layers_per_block {
                h = self.resnet(tape, h, &format!("encoder.down_blocks.{i}.resnets.{j}"))?;
            }
            if i + 1 < levels {
                let pre = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                h = consume(tape, h, |t, h| self.conv(t, h, &pre, 2, DOWNSAMPLE_PAD))?;
            }
        }
        h = self.mid_block(tape, h, "encoder.mid_block")?;
        h = consume(tape, h, |t, h| {
            self.norm(t, h, "encoder.conv_norm_out", Act::Silu)
        })?;
        h = consume(tape, h, |t, h| {
            self.conv(t, h, "encoder.conv_out", 1, Pad2d::same(1))
        })?;
        if cfg.use_quant_conv {
            h = consume(tape, h, |t, h| {
                self.conv(t, h, "quant_conv", 1, Pad2d::same(0))
            })?;
        }
        Ok(h)
    }

    /// post_quant_conv + decoder on NHWC latents `z` `[N, h, w, latent_channels]` (the VAE's own
    /// scale, i.e. diffusion latents divided by `scaling_factor`) → `[N, h·f, w·f, out_channels]`.
    /// `z` itself is not released.
    pub fn decoder_forward(&self, tape: &mut Tape<T>, z: &Var) -> Result<Var> {
        let cfg = &self.config;
        let (_, hh, ww, c) = dims(z)?;
        self.check_spatial("decoder input", c, cfg.latent_channels, hh, ww, 1)?;
        let mut h = if cfg.use_post_quant_conv {
            let p = self.conv(tape, z, "post_quant_conv", 1, Pad2d::same(0))?;
            consume(tape, p, |t, p| {
                self.conv(t, p, "decoder.conv_in", 1, Pad2d::same(1))
            })?
        } else {
            self.conv(tape, z, "decoder.conv_in", 1, Pad2d::same(1))?
        };
        h = self.mid_block(tape, h, "decoder.mid_block")?;
        let levels = cfg.block_out_channels.len();
        for i in 0..levels {
            for j in 0..=cfg.layers_per_block {
                h = self.resnet(tape, h, &format!("decoder.up_blocks.{i}.resnets.{j}"))?;
            }
            if i + 1 < levels {
                h = consume(tape, h, upsample_nearest2x)?;
                let pre = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
                h = consume(tape, h, |t, h| self.conv(t, h, &pre, 1, Pad2d::same(1)))?;
            }
        }
        h = consume(tape, h, |t, h| {
            self.norm(t, h, "decoder.conv_norm_out", Act::Silu)
        })?;
        consume(tape, h, |t, h| {
            self.conv(t, h, "decoder.conv_out", 1, Pad2d::same(1))
        })
    }

    fn check_spatial(
        &self,
        what: &str,
        c: usize,
        want_c: usize,
        h: usize,
        w: usize,
        f: usize,
    ) -> Result<()> {
        if c != want_c {
            return Err(Error::Shape(format!(
                "AutoencoderKL {what} has {c} channels, the config needs {want_c}"
            )));
        }
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::Shape(format!(
                "AutoencoderKL {what} is {h}×{w}: height and width must be positive multiples of {f} (2^(levels − 1))"
            )));
        }
        Ok(())
    }

    fn check_nchw(&self, what: &str, x: &Nchw<T>, want_c: usize, f: usize) -> Result<()> {
        let [n, c, h, w] = x.shape;
        if n == 0 {
            return Err(Error::Shape(format!(
                "AutoencoderKL {what} has an empty batch"
            )));
        }
        self.check_spatial(what, c, want_c, h, w, f)?;
        x.check_finite(&format!("AutoencoderKL {what}"))
    }

    /// Encodes NCHW images (diffusers' range [−1, 1]) → (mean, logvar) of the latent Gaussian, each
    /// `[N, latent_channels, H/f, W/f]`, logvar clamped to [−30, 20] as diffusers'
    /// `DiagonalGaussianDistribution`.
    pub fn encode(&self, x: &Nchw<T>) -> Result<(Nchw<T>, Nchw<T>)> {
        let cfg = &self.config;
        self.check_nchw("encode input", x, cfg.in_channels, cfg.downscale())?;
        let [n, c, h, w] = x.shape;
        let mut tape = inference_tape();
        let xin = tape.input(&[n, h, w, c], x.to_nhwc(), false)?;
        let m = self.encoder_forward(&mut tape, &xin)?;
        tape.release(&xin);
        let (_, lh, lw, _) = dims(&m)?;
        let l = cfg.latent_channels;
        let moments = tape.data(&m);
        let mean = Nchw::from_nhwc(moments, [n, l, lh, lw], 0..l);
        let mut logvar = Nchw::from_nhwc(moments, [n, l, lh, lw], l..2 * l);
        let (lo, hi) = (T::from_f64(LOGVAR_MIN), T::from_f64(LOGVAR_MAX));
        logvar.data.par_iter_mut().for_each(|v| {
            *v = if *v < lo {
                lo
            } else if *v > hi {
                hi
            } else {
                *v
            }
        });
        Ok((mean, logvar))
    }

    /// A draw from the latent Gaussian: mean + exp(logvar / 2)·ε, ε ~ N(0, 1) from `rng`
    /// (logvar clamped to [−30, 20] as diffusers).
    pub fn sample(mean: &Nchw<T>, logvar: &Nchw<T>, rng: &mut dyn RngCore) -> Result<Nchw<T>> {
        if mean.shape != logvar.shape {
            return Err(Error::Shape(format!(
                "AutoencoderKL sample: mean {:?} and logvar {:?} differ in shape",
                mean.shape, logvar.shape
            )));
        }
        let data = mean
            .data
            .iter()
            .zip(&logvar.data)
            .map(|(&m, &lv)| {
                let lv = lv.to_f64().clamp(LOGVAR_MIN, LOGVAR_MAX);
                let e: f64 = rng.sample(StandardNormal);
                T::from_f64(m.to_f64() + (0.5 * lv).exp() * e)
            })
            .collect();
        Nchw::new(mean.shape, data)
    }

    /// Decodes NCHW latents `[N, latent_channels, h, w]` in the VAE's own scale (divide diffusion
    /// latents by `scaling_factor` first, as diffusers pipelines do) → images
    /// `[N, out_channels, h·f, w·f]`.
    pub fn decode(&self, z: &Nchw<T>) -> Result<Nchw<T>> {
        let cfg = &self.config;
        self.check_nchw("decode input", z, cfg.latent_channels, 1)?;
        let [n, c, h, w] = z.shape;
        let mut tape = inference_tape();
        let zin = tape.input(&[n, h, w, c], z.to_nhwc(), false)?;
        let out = self.decoder_forward(&mut tape, &zin)?;
        tape.release(&zin);
        let (_, oh, ow, oc) = dims(&out)?;
        Ok(Nchw::from_nhwc(tape.data(&out), [n, oc, oh, ow], 0..oc))
    }

    /// The LDM paper's multi-channel encoding: each group of `in_channels` image channels (e.g.
    /// [`LDM_GROUPS`]) is encoded separately and the latents are concatenated on the channel axis
    /// → `[N, groups·latent_channels, H/f, W/f]`, as diffusion latents: (z − shift_factor) ·
    /// scaling_factor. z is the posterior mean, or a draw from it when `rng` is given. Every image
    /// channel must belong to at least one group.
    pub fn encode5(
        &self,
        x: &Nchw<T>,
        groups: &[Vec<usize>],
        mut rng: Option<&mut dyn RngCore>,
    ) -> Result<Nchw<T>> {
        let [n, c, h, w] = x.shape;
        check_groups(groups, c, self.config.in_channels, "encode5")?;
        let l = self.config.latent_channels;
        let hw = h * w;
        let mut parts = Vec::with_capacity(groups.len());
        for g in groups {
            let mut sub = vec![T::ZERO; n * g.len() * hw];
            for b in 0..n {
                for (j, &ch) in g.iter().enumerate() {
                    sub[(b * g.len() + j) * hw..][..hw]
                        .copy_from_slice(&x.data[(b * c + ch) * hw..][..hw]);
                }
            }
            let (mean, logvar) = self.encode(&Nchw::new([n, g.len(), h, w], sub)?)?;
            parts.push(match rng.as_deref_mut() {
                Some(r) => Self::sample(&mean, &logvar, r)?,
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
        let mut out = vec![T::ZERO; n * gl * lhw];
        for (gi, p) in parts.iter().enumerate() {
            for b in 0..n {
                let dst = &mut out[(b * gl + gi * l) * lhw..][..l * lhw];
                let src = &p.data[b * l * lhw..][..l * lhw];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, &s)| *d = T::from_f64((s.to_f64() - shift) * sf));
            }
        }
        Nchw::new([n, gl, lh, lw], out)
    }

    /// Inverse of [`AutoencoderKL::encode5`]: latents `[N, groups·latent_channels, h, w]` (diffusion
    /// scale) → images `[N, C, h·f, w·f]`, C = largest channel index + 1. Each group's latents are
    /// unscaled (z / scaling_factor + shift_factor) and decoded; a channel reconstructed by several
    /// groups gets the mean of its reconstructions.
    pub fn decode5(&self, latents: &Nchw<T>, groups: &[Vec<usize>]) -> Result<Nchw<T>> {
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
        latents.check_finite("AutoencoderKL decode5 latents")?;
        let (sf, shift) = (
            self.config.scaling_factor,
            self.config.shift_factor.unwrap_or(0.0),
        );
        let lhw = lh * lw;
        let mut out: Vec<T> = Vec::new();
        let mut count = vec![0usize; c];
        let mut dims_out = [n, c, 0, 0];
        for (gi, g) in groups.iter().enumerate() {
            let mut z = vec![T::ZERO; n * l * lhw];
            for b in 0..n {
                let src = &latents.data[(b * lc + gi * l) * lhw..][..l * lhw];
                z[b * l * lhw..][..l * lhw]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(d, &s)| *d = T::from_f64(s.to_f64() / sf + shift));
            }
            let rec = self.decode(&Nchw::new([n, l, lh, lw], z)?)?;
            let [_, rc, h, w] = rec.shape;
            let hw = h * w;
            if out.is_empty() {
                out = vec![T::ZERO; n * c * hw];
                dims_out = [n, c, h, w];
            }
            for b in 0..n {
                for (j, &ch) in g.iter().enumerate() {
                    let dst = &mut out[(b * c + ch) * hw..][..hw];
                    let src = &rec.data[(b * rc + j) * hw..][..hw];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
                }
            }
            g.iter().for_each(|&ch| count[ch] += 1);
        }
        let hw = dims_out[2] * dims_out[3];
        out.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(bc, o)| {
                let k = T::from_usize(count[bc % c]);
                o.iter_mut().for_each(|v| *v /= k);
            });
        Nchw::new(dims_out, out)
    }
}

/// [`LDM_GROUPS`] as the `groups` argument of [`AutoencoderKL::encode5`] / `decode5`.
pub fn ldm_groups() -> Vec<Vec<usize>> {
    LDM_GROUPS.iter().map(|g| g.to_vec()).collect()
}

/// diffusers `Downsample2D(padding=0)`: F.pad(x, (0, 1, 0, 1)) then a stride-2 3 × 3 conv.
pub(crate) const DOWNSAMPLE_PAD: Pad2d = Pad2d {
    top: 0,
    bottom: 1,
    left: 0,
    right: 1,
};

/// The channel-group checks of `encode5` / `decode5` (also the GPU VAE's).
pub(crate) fn check_groups(groups: &[Vec<usize>], c: usize, size: usize, what: &str) -> Result<()> {
    if groups.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "AutoencoderKL {what}: no channel groups"
        )));
    }
    let mut covered = vec![false; c];
    for (i, g) in groups.iter().enumerate() {
        if g.len() != size {
            return Err(Error::InvalidArgument(format!(
                "AutoencoderKL {what}: group {i} {g:?} has {} channels, the VAE takes {size}",
                g.len()
            )));
        }
        for (j, &ch) in g.iter().enumerate() {
            if ch >= c {
                return Err(Error::Shape(format!(
                    "AutoencoderKL {what}: group {i} {g:?} names channel {ch} of a {c}-channel image"
                )));
            }
            if g[..j].contains(&ch) {
                return Err(Error::InvalidArgument(format!(
                    "AutoencoderKL {what}: group {i} {g:?} repeats channel {ch}"
                )));
            }
            covered[ch] = true;
        }
    }
    if let Some(ch) = covered.iter().position(|&v| !v) {
        return Err(Error::InvalidArgument(format!(
            "AutoencoderKL {what}: image channel {ch} is in no group {groups:?}"
        )));
    }
    Ok(())
}

/// Runs `f` on `v` and releases `v` from the tape (its value lives on only where an op saved it).
fn consume<T: Float>(
    tape: &mut Tape<T>,
    v: Var,
    f: impl FnOnce(&mut Tape<T>, &Var) -> Result<Var>,
) -> Result<Var> {
    let out = f(tape, &v)?;
    tape.release(&v);
    Ok(out)
}

fn dims(x: &Var) -> Result<(usize, usize, usize, usize)> {
    match *x.shape() {
        [n, h, w, c] => Ok((n, h, w, c)),
        ref s => Err(Error::Shape(format!(
            "AutoencoderKL expects NHWC activations [N, H, W, C], got {s:?}"
        ))),
    }
}

/// A tape for inference: eval mode, parameters and inputs as constants, no backward recorded.
fn inference_tape<T: Float>() -> Tape<T> {
    Tape::no_grad()
}

fn is_norm(name: &str) -> bool {
    name.contains(".norm") || name.contains("conv_norm_out") || name.contains(".group_norm")
}
