//! The diffusion U-Net exactly as MONAI's `DiffusionModelUNet` (REFERENCE §10) computes it, forward
//! and backward on the autograd tape, with this library's confounder tables and null embeddings.
//!
//! Structure (2-D; activations NHWC inside, NCHW at the API boundary):
//! - time: sinusoidal embedding of `channels[0]` (MONAI's float32 arithmetic) → Linear → SiLU →
//!   Linear (`time_embed.0/2`); plus MONAI's single `class_embedding` table and one table per
//!   confounder (`confounder_embedding.<name>.weight`, summed into the time embedding);
//! - `conv_in`, down levels (`num_res_blocks` residual blocks, optionally each followed by attention,
//!   then a stride-2 conv or an average-pooling residual block unless last), middle block (resnet,
//!   attention, resnet), up levels (`num_res_blocks + 1` residual blocks over concatenated skips,
//!   attention, nearest ×2 + conv or an upsampling residual block unless last), GroupNorm → SiLU →
//!   conv out;
//! - attention: without conditioning MONAI's `SpatialAttentionBlock` (GN → q/k/v with bias →
//!   multi-head attention → out_proj, + residual); with conditioning a `SpatialTransformer` (GN →
//!   1×1 proj_in → per layer LN self-attention, LN cross-attention on the context, LN GEGLU
//!   feed-forward, each + residual → 1×1 proj_out, + residual).
//!
//! Null embeddings (classifier-free guidance): with `null_embeddings`, every confounder table has
//! one extra last row (the "unknown" value, index [`NULL`]) and a learned `null_context` vector
//! replaces a sample's context when its `context_null` flag is set (all of its tokens).

use crate::autograd::{Float, ParamKind, Params, Tape, Var};
use crate::error::{Error, Result};
use crate::io::safetensors::TensorMap;
use crate::ops::attention::attention;
use crate::ops::conv::{conv2d_pad, Pad2d};
use crate::ops::elementwise::{add, linear, silu};
use crate::ops::groupnorm::{group_norm, layer_norm};
use crate::ops::norm::Act;
use crate::ops::packed::{conv2d_packed, linear_packed, PackedConv};
use crate::ops::shape::{add_per_sample, concat_last, embedding, reshape, upsample_nearest2x};
use crate::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

/// Index of the null ("unknown") value of a confounder (needs `null_embeddings`).
pub const NULL: usize = usize::MAX;

/// One confounder of the structural causal model: a learned table of `num_values` embeddings
/// (+ the null row) added to the time embedding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confounder {
    pub name: String,
    pub num_values: usize,
}

/// MONAI `DiffusionModelUNet` arguments (2-D) plus this library's confounders and null embeddings.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Residual blocks per level (MONAI accepts one int for all levels).
    pub num_res_blocks: Vec<usize>,
    pub channels: Vec<usize>,
    pub attention_levels: Vec<bool>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub resblock_updown: bool,
    /// Channels per attention head, per level (the middle block uses the last level's).
    pub num_head_channels: Vec<usize>,
    pub with_conditioning: bool,
    pub transformer_num_layers: usize,
    pub cross_attention_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub confounders: Vec<Confounder>,
    pub null_embeddings: bool,
}

impl UNetConfig {
    /// The LDM paper's U-Net (REFERENCE §10): 8 latent channels, 256/512/768, 2 residual blocks per
    /// level, attention at the two deepest levels and in the middle, cross-attention on 512-d
    /// compound embeddings, GroupNorm 32 / 1e-6; one head per attention block; confounders
    /// source / batch / well with the given numbers of values, null embeddings on.
    pub fn paper(num_sources: usize, num_batches: usize, num_wells: usize) -> Self {
        UNetConfig {
            in_channels: 8,
            out_channels: 8,
            num_res_blocks: vec![2, 2, 2],
            channels: vec![256, 512, 768],
            attention_levels: vec![false, true, true],
            norm_num_groups: 32,
            norm_eps: 1e-6,
            resblock_updown: false,
            num_head_channels: vec![256, 512, 768],
            with_conditioning: true,
            transformer_num_layers: 1,
            cross_attention_dim: Some(512),
            num_class_embeds: None,
            confounders: vec![
                Confounder {
                    name: "source".into(),
                    num_values: num_sources,
                },
                Confounder {
                    name: "batch".into(),
                    num_values: num_batches,
                },
                Confounder {
                    name: "well".into(),
                    num_values: num_wells,
                },
            ],
            null_embeddings: true,
        }
    }

    /// MONAI's defaults for the arguments a caller did not give are applied by the config parser;
    /// this checks the combination, naming the offending argument.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("U-Net config: {m}")));
        let levels = self.channels.len();
        if levels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return bad(
                "channels, in_channels and out_channels must be non-empty / positive".into(),
            );
        }
        if self.attention_levels.len() != levels {
            return bad(format!(
                "attention_levels has {} entries for {levels} levels of channels",
                self.attention_levels.len()
            ));
        }
        if self.num_res_blocks.len() != levels {
            return bad(format!(
                "num_res_blocks has {} entries for {levels} levels",
                self.num_res_blocks.len()
            ));
        }
        if self.num_head_channels.len() != levels {
            return bad(format!(
                "num_head_channels has {} entries for {levels} levels",
                self.num_head_channels.len()
            ));
        }
        if self.norm_num_groups == 0 || self.channels.iter().any(|c| c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "every entry of channels {:?} must be a multiple of norm_num_groups {}",
                self.channels, self.norm_num_groups
            ));
        }
        if !(self.norm_eps > 0.0) {
            return bad(format!("norm_eps {} must be positive", self.norm_eps));
        }
        if self.channels[0] < 2 {
            return bad("channels[0] must be at least 2 (the timestep embedding)".into());
        }
        if self.with_conditioning != self.cross_attention_dim.is_some() {
            return bad("with_conditioning and cross_attention_dim go together".into());
        }
        if self.cross_attention_dim == Some(0) || self.num_class_embeds == Some(0) {
            return bad("cross_attention_dim / num_class_embeds must be positive".into());
        }
        if self.transformer_num_layers == 0 && self.with_conditioning {
            return bad("transformer_num_layers must be positive".into());
        }
        for (l, (&c, (&a, &h))) in self
            .channels
            .iter()
            .zip(self.attention_levels.iter().zip(&self.num_head_channels))
            .enumerate()
        {
            let needs = a || l == levels - 1;
            if needs && (h == 0 || c % h != 0) {
                return bad(format!(
                    "num_head_channels[{l}] = {h} must divide channels[{l}] = {c} (level with attention)"
                ));
            }
        }
        for (i, cf) in self.confounders.iter().enumerate() {
            if cf.num_values == 0 {
                return bad(format!("confounder {:?} has no values", cf.name));
            }
            let ok = !cf.name.is_empty()
                && cf
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !ok || self.confounders[..i].iter().any(|o| o.name == cf.name) {
                return bad(format!(
                    "confounder name {:?} must be unique and made of [A-Za-z0-9_]",
                    cf.name
                ));
            }
        }
        Ok(())
    }

    pub fn time_embed_dim(&self) -> usize {
        self.channels[0] * 4
    }

    fn heads(&self, level: usize) -> (usize, usize) {
        let c = self.channels[level];
        let hc = self.num_head_channels[level];
        (c / hc, hc)
    }

    /// Every parameter's key (current MONAI names) and shape, in MONAI's registration order.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let temb = self.time_embed_dim();
        let c0 = self.channels[0];
        let conv = |v: &mut Vec<(String, Vec<usize>)>, k: &str, o: usize, i: usize, ks: usize| {
            v.push((format!("{k}.conv.weight"), vec![o, i, ks, ks]));
            v.push((format!("{k}.conv.bias"), vec![o]));
        };
        let lin = |v: &mut Vec<(String, Vec<usize>)>, k: &str, o: usize, i: usize, bias: bool| {
            v.push((format!("{k}.weight"), vec![o, i]));
            if bias {
                v.push((format!("{k}.bias"), vec![o]));
            }
        };
        let norm = |v: &mut Vec<(String, Vec<usize>)>, k: &str, c: usize| {
            v.push((format!("{k}.weight"), vec![c]));
            v.push((format!("{k}.bias"), vec![c]));
        };
        let resnet = |v: &mut Vec<(String, Vec<usize>)>, k: &str, i: usize, o: usize| {
            norm(v, &format!("{k}.norm1"), i);
            conv(v, &format!("{k}.conv1"), o, i, 3);
            lin(v, &format!("{k}.time_emb_proj"), o, temb, true);
            norm(v, &format!("{k}.norm2"), o);
            conv(v, &format!("{k}.conv2"), o, o, 3);
            if i != o {
                conv(v, &format!("{k}.skip_connection"), o, i, 1);
            }
        };
        let attn = |v: &mut Vec<(String, Vec<usize>)>, k: &str, level: usize| {
            let c = self.channels[level];
            norm(v, &format!("{k}.norm"), c);
            if let Some(ctx) = self.cross_attention_dim {
                let (h, hc) = self.heads(level);
                let inner = h * hc;
                conv(v, &format!("{k}.proj_in"), inner, c, 1);
                for t in 0..self.transformer_num_layers {
                    let b = format!("{k}.transformer_blocks.{t}");
                    lin(v, &format!("{b}.attn1.out_proj"), inner, inner, true);
                    for p in ["to_q", "to_k", "to_v"] {
                        lin(v, &format!("{b}.attn1.{p}"), inner, inner, false);
                    }
                    lin(v, &format!("{b}.ff.linear1"), inner * 8, inner, true);
                    lin(v, &format!("{b}.ff.linear2"), inner, inner * 4, true);
                    lin(v, &format!("{b}.attn2.out_proj"), inner, inner, true);
                    lin(v, &format!("{b}.attn2.to_q"), inner, inner, false);
                    lin(v, &format!("{b}.attn2.to_k"), inner, ctx, false);
                    lin(v, &format!("{b}.attn2.to_v"), inner, ctx, false);
                    for n in ["norm1", "norm2", "norm3"] {
                        norm(v, &format!("{b}.{n}"), inner);
                    }
                }
                conv(v, &format!("{k}.proj_out"), c, inner, 1);
            } else {
                lin(v, &format!("{k}.attn.out_proj"), c, c, true);
                for p in ["to_q", "to_k", "to_v"] {
                    lin(v, &format!("{k}.attn.{p}"), c, c, true);
                }
            }
        };
        conv(&mut v, "conv_in", c0, self.in_channels, 3);
        lin(&mut v, "time_embed.0", temb, c0, true);
        lin(&mut v, "time_embed.2", temb, temb, true);
        if let Some(n) = self.num_class_embeds {
            v.push(("class_embedding.weight".into(), vec![n, temb]));
        }
        let extra = usize::from(self.null_embeddings);
        for cf in &self.confounders {
            v.push((
                format!("confounder_embedding.{}.weight", cf.name),
                vec![cf.num_values + extra, temb],
            ));
        }
        if let (true, Some(ctx)) = (self.null_embeddings, self.cross_attention_dim) {
            v.push(("null_context".into(), vec![ctx]));
        }
        let levels = self.channels.len();
        let mut out_ch = c0;
        for l in 0..levels {
            let in_ch = out_ch;
            out_ch = self.channels[l];
            let k = format!("down_blocks.{l}");
            if self.attention_levels[l] {
                for j in 0..self.num_res_blocks[l] {
                    attn(&mut v, &format!("{k}.attentions.{j}"), l);
                }
            }
            for j in 0..self.num_res_blocks[l] {
                let i = if j == 0 { in_ch } else { out_ch };
                resnet(&mut v, &format!("{k}.resnets.{j}"), i, out_ch);
            }
            if l + 1 < levels {
                if self.resblock_updown {
                    resnet(&mut v, &format!("{k}.downsampler"), out_ch, out_ch);
                } else {
                    conv(&mut v, &format!("{k}.downsampler.op"), out_ch, out_ch, 3);
                }
            }
        }
        let last = self.channels[levels - 1];
        resnet(&mut v, "middle_block.resnet_1", last, last);
        attn(&mut v, "middle_block.attention", levels - 1);
        resnet(&mut v, "middle_block.resnet_2", last, last);
        let mut out_ch = last;
        for i in 0..levels {
            let l = levels - 1 - i;
            let prev = out_ch;
            out_ch = self.channels[l];
            let input = self.channels[l.saturating_sub(1)];
            let n = self.num_res_blocks[l] + 1;
            let k = format!("up_blocks.{i}");
            if self.attention_levels[l] {
                for j in 0..n {
                    attn(&mut v, &format!("{k}.attentions.{j}"), l);
                }
            }
            for j in 0..n {
                let skip = if j == n - 1 { input } else { out_ch };
                let rin = if j == 0 { prev } else { out_ch };
                resnet(&mut v, &format!("{k}.resnets.{j}"), rin + skip, out_ch);
            }
            if i + 1 < levels {
                if self.resblock_updown {
                    resnet(&mut v, &format!("{k}.upsampler"), out_ch, out_ch);
                } else {
                    conv(
                        &mut v,
                        &format!("{k}.upsampler.postconv"),
                        out_ch,
                        out_ch,
                        3,
                    );
                }
            }
        }
        norm(&mut v, "out.0", c0);
        conv(&mut v, "out.2", self.out_channels, c0, 3);
        v
    }

    /// Checks the input shape and the conditions for a batch of `n` samples of `h` × `w`
    /// (what every forward of this config, on the CPU or a GPU, checks first).
    pub fn check_inputs<T: Float>(
        &self,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, T>,
    ) -> Result<()> {
        let cfg = self;
        if c != cfg.in_channels {
            return Err(Error::Shape(format!(
                "U-Net input has {c} channels, the config expects in_channels = {}",
                cfg.in_channels
            )));
        }
        let f = 1usize << (cfg.channels.len() - 1);
        if n == 0 || h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::Shape(format!(
                "U-Net input {n} × {c} × {h} × {w}: height and width must be positive multiples of {f} \
                 ({} levels)",
                cfg.channels.len()
            )));
        }
        if timesteps.len() != n {
            return Err(Error::Shape(format!(
                "{} timesteps for a batch of {n}",
                timesteps.len()
            )));
        }
        if let Some(t) = timesteps.iter().find(|t| !t.is_finite()) {
            return Err(Error::NonFinite(format!("timestep {t} is not finite")));
        }
        match (cfg.cross_attention_dim, cond.context) {
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "a context was given but the model has with_conditioning = false".into(),
                ))
            }
            (Some(d), Some(ctx)) => {
                if cond.context_len == 0 || ctx.len() != n * cond.context_len * d {
                    return Err(Error::Shape(format!(
                        "context has {} values; expected N·context_len·cross_attention_dim = {n}·{}·{d}",
                        ctx.len(),
                        cond.context_len
                    )));
                }
                if let Some(i) = ctx.iter().position(|v| !v.to_f64().is_finite()) {
                    return Err(Error::NonFinite(format!(
                        "context value {i} (sample {}) is not finite",
                        i / (cond.context_len * d)
                    )));
                }
            }
            _ => {}
        }
        if let Some(flags) = cond.context_null {
            if flags.len() != n {
                return Err(Error::Shape(format!(
                    "{} context_null flags for a batch of {n}",
                    flags.len()
                )));
            }
            if flags.iter().any(|&f| f) && !(cfg.null_embeddings && cfg.with_conditioning) {
                return Err(Error::InvalidArgument(
                    "null context requested (guidance) but the model has no null embeddings \
                     (null_embeddings = false or no conditioning)"
                        .into(),
                ));
            }
            if cond.context.is_none() && flags.iter().any(|&f| !f) {
                return Err(Error::InvalidArgument(
                    "context_null leaves samples with a context, but no context was given".into(),
                ));
            }
        }
        match (cfg.num_class_embeds, cond.class_labels) {
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "class_labels must be given: the model has num_class_embeds".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "class_labels given but the model has no num_class_embeds".into(),
                ))
            }
            (Some(k), Some(l)) => {
                if l.len() != n {
                    return Err(Error::Shape(format!(
                        "{} class labels for a batch of {n}",
                        l.len()
                    )));
                }
                if let Some((i, v)) = l.iter().enumerate().find(|(_, &v)| v >= k) {
                    return Err(Error::InvalidArgument(format!(
                        "class label {v} of sample {i} is out of range (num_class_embeds = {k})"
                    )));
                }
            }
            _ => {}
        }
        let kc = cfg.confounders.len();
        match cond.confounders {
            None if kc > 0 => {
                return Err(Error::InvalidArgument(format!(
                    "confounders must be given: the model has {kc} ({})",
                    cfg.confounders
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            Some(_) if kc == 0 => {
                return Err(Error::InvalidArgument(
                    "confounders given but the model has none".into(),
                ))
            }
            Some(idx) => {
                if idx.len() != n * kc {
                    return Err(Error::Shape(format!(
                        "{} confounder indices; expected N × K = {n} × {kc}",
                        idx.len()
                    )));
                }
                for (i, &v) in idx.iter().enumerate() {
                    let cf = &cfg.confounders[i % kc];
                    if v == NULL {
                        if !cfg.null_embeddings {
                            return Err(Error::InvalidArgument(format!(
                                "null value of confounder {:?} (sample {}) requested but the model \
                                 has no null embeddings",
                                cf.name,
                                i / kc
                            )));
                        }
                    } else if v >= cf.num_values {
                        return Err(Error::InvalidArgument(format!(
                            "confounder {:?} index {v} of sample {} is out of range ({} values)",
                            cf.name,
                            i / kc,
                            cf.num_values
                        )));
                    }
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Keys MONAI zero-initialises (`zero_module`): residual conv2, proj_out and the output conv.
    fn zero_init(key: &str) -> bool {
        key.contains(".conv2.conv.") || key.contains(".proj_out.conv.") || key.starts_with("out.2.")
    }
}

/// Maps an older MONAI GenerativeModels key to the current MONAI name (what MONAI's
/// `DiffusionModelUNet.load_old_state_dict` does), or returns it unchanged.
pub fn map_old_key(key: &str, expected: &BTreeMap<String, Vec<usize>>) -> String {
    if expected.contains_key(key) {
        return key.to_string();
    }
    // Spatial attention blocks: `<block>.to_q.*` → `<block>.attn.to_q.*`, `proj_attn` → `attn.out_proj`.
    for p in ["to_q", "to_k", "to_v"] {
        for s in ["weight", "bias"] {
            let suffix = format!(".{p}.{s}");
            if let Some(block) = key.strip_suffix(&suffix) {
                let new = format!("{block}.attn.{p}.{s}");
                if expected.contains_key(&new) {
                    return new;
                }
            }
        }
    }
    for s in ["weight", "bias"] {
        if let Some(block) = key.strip_suffix(&format!(".proj_attn.{s}")) {
            return format!("{block}.attn.out_proj.{s}");
        }
        // Transformer attention: `to_out.0` → `out_proj`.
        if let Some(block) = key.strip_suffix(&format!(".to_out.0.{s}")) {
            return format!("{block}.out_proj.{s}");
        }
    }
    // Upsampler convs were renamed `postconv`.
    if key.contains(".upsampler.conv.") {
        let new = key.replace(".upsampler.conv.", ".upsampler.postconv.");
        if expected.contains_key(&new) {
            return new;
        }
    }
    key.to_string()
}

/// Conditions of a batch of `n` samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct Conditioning<'a, T> {
    /// Compound context [N, context_len, cross_attention_dim] (models with conditioning).
    pub context: Option<&'a [T]>,
    pub context_len: usize,
    /// Per sample: use the learned null context instead (needs `null_embeddings`).
    pub context_null: Option<&'a [bool]>,
    /// MONAI's single class table, one index per sample.
    pub class_labels: Option<&'a [usize]>,
    /// [N, K] confounder indices (K = number of confounders), [`NULL`] for the null value.
    pub confounders: Option<&'a [usize]>,
}

/// MONAI `DiffusionModelUNet` with its parameters.
pub struct DiffusionUNet<T: Float> {
    config: UNetConfig,
    params: Params<T>,
    /// Inference cache: conv / linear weights packed for the f32 register-tile kernel, built on the
    /// first no-grad forward and dropped whenever the parameters are borrowed mutably.
    packed: OnceLock<Option<HashMap<String, PackedConv>>>,
}

impl<T: Float> DiffusionUNet<T> {
    /// torch's default initialisation as MONAI builds the model: conv / linear weights and biases
    /// U(±1/√fan_in), norms 1 / 0, embeddings N(0, 1), MONAI's zero-initialised layers 0;
    /// `null_context` N(0, 1). Seeded (ChaCha8).
    pub fn new(config: UNetConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut params = Params::new();
        let shapes = config.expected_shapes();
        // Fan-in of a bias is its weight's.
        let fan_in: BTreeMap<String, usize> = shapes
            .iter()
            .filter(|(k, s)| k.ends_with(".weight") && s.len() >= 2)
            .map(|(k, s)| {
                (
                    k.trim_end_matches(".weight").to_string(),
                    s[1..].iter().product(),
                )
            })
            .collect();
        for (key, shape) in &shapes {
            let n: usize = shape.iter().product();
            let stem = key
                .trim_end_matches(".weight")
                .trim_end_matches(".bias")
                .to_string();
            let is_norm =
                shape.len() == 1 && !key.ends_with(".bias") && !fan_in.contains_key(&stem);
            let data: Vec<T> = if UNetConfig::zero_init(key) {
                vec![T::ZERO; n]
            } else if key.contains("embedding") || key == "null_context" {
                (0..n)
                    .map(|_| T::from_f64(StandardNormal.sample(&mut rng)))
                    .collect()
            } else if is_norm {
                vec![T::ONE; n]
            } else if shape.len() == 1 && !fan_in.contains_key(&stem) {
                vec![T::ZERO; n] // norm bias
            } else {
                let bound = 1.0 / (fan_in.get(&stem).copied().unwrap_or(1) as f64).sqrt();
                (0..n)
                    .map(|_| T::from_f64(rng.gen_range(-bound..bound)))
                    .collect()
            };
            params.add(key, shape, data, ParamKind::Weight)?;
        }
        Ok(DiffusionUNet {
            config,
            params,
            packed: OnceLock::new(),
        })
    }

    /// From tensors under current or older MONAI names (mapped as MONAI's `load_old_state_dict`).
    /// Missing, extra or mis-shaped keys are errors naming the first one (with both shapes).
    pub fn from_state_dict(state: &TensorMap, config: UNetConfig) -> Result<Self> {
        config.validate()?;
        let shapes = config.expected_shapes();
        let expected: BTreeMap<String, Vec<usize>> = shapes.iter().cloned().collect();
        let mut mapped: BTreeMap<String, &Tensor> = BTreeMap::new();
        for (k, t) in state {
            let new = map_old_key(k, &expected);
            if !expected.contains_key(&new) {
                return Err(Error::Shape(format!(
                    "weights file has key {k:?} that this U-Net config does not have (shape {:?}) — \
                     a file for another config?",
                    t.shape()
                )));
            }
            mapped.insert(new, t);
        }
        let mut params = Params::new();
        for (key, shape) in &shapes {
            let t = mapped.get(key).ok_or_else(|| {
                Error::MissingKey(format!(
                    "weights file lacks {key:?} (expected shape {shape:?}) — a file for another config?"
                ))
            })?;
            if t.shape() != shape.as_slice() {
                return Err(Error::Shape(format!(
                    "weights key {key:?} has shape {:?}, this config expects {shape:?}",
                    t.shape()
                )));
            }
            let data: Vec<T> = t.as_f32()?.iter().map(|&x| T::from_f64(x as f64)).collect();
            params.add(key, shape, data, ParamKind::Weight)?;
        }
        Ok(DiffusionUNet {
            config,
            params,
            packed: OnceLock::new(),
        })
    }

    /// Loads a safetensors file (see [`DiffusionUNet::from_state_dict`]).
    pub fn load(path: &Path, config: UNetConfig) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        let state = crate::io::safetensors::read_f32_tensors(&bytes)?;
        Self::from_state_dict(&state, config)
    }

    /// The weights under current MONAI names (f32).
    pub fn state_dict(&self) -> Result<TensorMap> {
        let mut m = TensorMap::new();
        for (name, shape, _, value) in self.params.iter() {
            let data: Vec<f32> = value.iter().map(|x| x.to_f64() as f32).collect();
            m.insert(name.to_string(), Tensor::from_f32(shape, data)?);
        }
        Ok(m)
    }

    /// Writes the weights (safetensors, atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::safetensors::write_f32_tensors(path, &self.state_dict()?)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }
    pub fn params(&self) -> &Params<T> {
        &self.params
    }
    /// Mutable parameters (drops the packed inference weights, rebuilt on the next inference).
    pub fn params_mut(&mut self) -> &mut Params<T> {
        self.packed = OnceLock::new();
        &mut self.params
    }

    /// The packed f32 weights of conv / linear `key` (without `.weight`), for no-grad forwards.
    fn packed(&self, key: &str) -> Option<&PackedConv> {
        self.packed
            .get_or_init(|| self.build_packed())
            .as_ref()?
            .get(key)
    }

    fn build_packed(&self) -> Option<HashMap<String, PackedConv>> {
        if TypeId::of::<T>() != TypeId::of::<f32>() {
            return None;
        }
        let jobs: Vec<(String, &[usize], &[f32], Option<&[f32]>)> = self
            .params
            .iter()
            .filter(|(name, shape, _, _)| {
                name.ends_with(".weight")
                    && !name.contains("embedding")
                    && (shape.len() == 2 || (shape.len() == 4 && shape[2] == shape[3]))
                    // stride-1 3 × 3 convolutions: Winograd (weights transformed per call)
                    && !(shape.len() == 4
                        && !name.contains("downsampler")
                        && winograd_conv(T::ZERO, shape[2], 1))
            })
            .filter_map(|(name, shape, _, value)| {
                let stem = name.trim_end_matches(".weight").to_string();
                let w = crate::ops::conv::as_f32(value)?;
                let b = self
                    .params
                    .index(&format!("{stem}.bias"))
                    .ok()
                    .and_then(|i| crate::ops::conv::as_f32(self.params.value(i)));
                Some((stem, shape, w, b))
            })
            .collect();
        let built: Vec<(String, PackedConv)> = jobs
            .into_par_iter()
            .filter_map(|(stem, shape, w, b)| {
                let k = if shape.len() == 4 { shape[2] } else { 1 };
                PackedConv::new(w, b, shape[0], shape[1], k).map(|pc| (stem, pc))
            })
            .collect();
        if built.is_empty() {
            return None;
        }
        Some(built.into_iter().collect())
    }

    pub fn num_parameters(&self) -> usize {
        self.params
            .iter()
            .map(|(_, s, _, _)| s.iter().product::<usize>())
            .sum()
    }

    fn p(&self, tape: &mut Tape<T>, key: &str) -> Result<Var> {
        tape.param_named(&self.params, key)
    }

    /// Checks the input shape and the conditions for a batch of `n` samples of `h` × `w`
    /// (see [`UNetConfig::check_inputs`]).
    pub fn check_inputs(
        &self,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, T>,
    ) -> Result<()> {
        self.config.check_inputs(n, c, h, w, timesteps, cond)
    }

    /// Forward pass on `tape`: `x` NHWC [N, H, W, in_channels] → NHWC [N, H, W, out_channels].
    pub fn forward(
        &self,
        tape: &mut Tape<T>,
        x: &Var,
        timesteps: &[f64],
        cond: &Conditioning<'_, T>,
    ) -> Result<Var> {
        let (n, h, w, c) = match x.shape() {
            &[n, h, w, c] => (n, h, w, c),
            s => {
                return Err(Error::Shape(format!(
                    "U-Net input must be NHWC [N, H, W, C], got {s:?}"
                )))
            }
        };
        self.check_inputs(n, c, h, w, timesteps, cond)?;
        let cfg = &self.config;
        let levels = cfg.channels.len();
        // 1. time (+ class, confounders).
        let t_emb = monai_timestep_embedding::<T>(timesteps, cfg.channels[0]);
        let t_emb = tape.input(&[n, cfg.channels[0]], t_emb, false)?;
        let e = self.linear(tape, &t_emb, "time_embed.0", true)?;
        let e = silu(tape, &e);
        let mut emb = self.linear(tape, &e, "time_embed.2", true)?;
        if let Some(labels) = cond.class_labels {
            let table = self.p(tape, "class_embedding.weight")?;
            let ce = embedding(tape, &table, labels)?;
            emb = add(tape, &emb, &ce)?;
        }
        if let Some(idx) = cond.confounders {
            let kc = cfg.confounders.len();
            for (k, cf) in cfg.confounders.iter().enumerate() {
                let rows: Vec<usize> = (0..n)
                    .map(|i| match idx[i * kc + k] {
                        NULL => cf.num_values,
                        v => v,
                    })
                    .collect();
                let table = self.p(tape, &format!("confounder_embedding.{}.weight", cf.name))?;
                let ce = embedding(tape, &table, &rows)?;
                emb = add(tape, &emb, &ce)?;
            }
        }
        // Every residual block applies SiLU to the embedding before its projection: once here.
        let emb = silu(tape, &emb);
        let context = self.context(tape, n, cond)?;
        let ctx = context.as_ref();

        // 2. down.
        let mut hcur = self.conv(tape, x, "conv_in", 1, Pad2d::same(1))?;
        let mut skips = vec![hcur.clone()];
        for l in 0..levels {
            let k = format!("down_blocks.{l}");
            for j in 0..cfg.num_res_blocks[l] {
                hcur = self.resnet(
                    tape,
                    &hcur,
                    &emb,
                    &format!("{k}.resnets.{j}"),
                    Resample::None,
                )?;
                if cfg.attention_levels[l] {
                    let r = hcur;
                    hcur = self.attention(tape, &r, ctx, &format!("{k}.attentions.{j}"), l)?;
                    tape.release(&r);
                }
                skips.push(hcur.clone());
            }
            if l + 1 < levels {
                hcur = if cfg.resblock_updown {
                    self.resnet(
                        tape,
                        &hcur,
                        &emb,
                        &format!("{k}.downsampler"),
                        Resample::Down,
                    )?
                } else {
                    self.conv(
                        tape,
                        &hcur,
                        &format!("{k}.downsampler.op"),
                        2,
                        Pad2d::same(1),
                    )?
                };
                skips.push(hcur.clone());
            }
        }
        // 3. middle.
        // Values no later step reads are released as the pass goes (the ops that need them for
        // backward hold their own references): lower peak memory, buffers recycled by the pool.
        let m1 = self.resnet(tape, &hcur, &emb, "middle_block.resnet_1", Resample::None)?;
        let m2 = self.attention(tape, &m1, ctx, "middle_block.attention", levels - 1)?;
        tape.release(&m1);
        hcur = self.resnet(tape, &m2, &emb, "middle_block.resnet_2", Resample::None)?;
        tape.release(&m2);
        // 4. up.
        for i in 0..levels {
            let l = levels - 1 - i;
            let k = format!("up_blocks.{i}");
            for j in 0..cfg.num_res_blocks[l] + 1 {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Internal("U-Net: skip connections exhausted".into()))?;
                let cat = concat_last(tape, &[&hcur, &skip])?;
                tape.release(&skip);
                tape.release(&hcur);
                hcur = self.resnet(
                    tape,
                    &cat,
                    &emb,
                    &format!("{k}.resnets.{j}"),
                    Resample::None,
                )?;
                tape.release(&cat);
                if cfg.attention_levels[l] {
                    let r = hcur;
                    hcur = self.attention(tape, &r, ctx, &format!("{k}.attentions.{j}"), l)?;
                    tape.release(&r);
                }
            }
            if i + 1 < levels {
                let prev = hcur;
                hcur = if cfg.resblock_updown {
                    self.resnet(tape, &prev, &emb, &format!("{k}.upsampler"), Resample::Up)?
                } else {
                    let u = upsample_nearest2x(tape, &prev)?;
                    let c = self.conv(
                        tape,
                        &u,
                        &format!("{k}.upsampler.postconv"),
                        1,
                        Pad2d::same(1),
                    )?;
                    tape.release(&u);
                    c
                };
                tape.release(&prev);
            }
        }
        // 5. out.
        let hn = self.group_norm(tape, &hcur, "out.0", Act::Silu)?;
        tape.release(&hcur);
        let y = self.conv(tape, &hn, "out.2", 1, Pad2d::same(1))?;
        tape.release(&hn);
        Ok(y)
    }

    /// Inference on NCHW f32 input → NCHW f32 output (no-grad tape, intermediate values freed).
    pub fn predict(
        &self,
        x_nchw: &[T],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, T>,
    ) -> Result<Vec<T>> {
        let c = self.config.in_channels;
        if x_nchw.len() != n * c * h * w {
            return Err(Error::Shape(format!(
                "U-Net input has {} values, expected {n} × {c} × {h} × {w}",
                x_nchw.len()
            )));
        }
        if let Some(i) = x_nchw.iter().position(|v| !v.to_f64().is_finite()) {
            return Err(Error::NonFinite(format!(
                "U-Net input value {i} (sample {}) is not finite",
                i / (c * h * w)
            )));
        }
        let mut tape = Tape::no_grad();
        let x = tape.input(&[n, h, w, c], nchw_to_nhwc(x_nchw, n, c, h, w), false)?;
        let y = self.forward(&mut tape, &x, timesteps, cond)?;
        let oc = self.config.out_channels;
        Ok(nhwc_to_nchw(tape.data(&y), n, oc, h, w))
    }

    fn linear(&self, tape: &mut Tape<T>, x: &Var, key: &str, bias: bool) -> Result<Var> {
        if !tape.records_grad() {
            if let (Some(pc), Some(t32)) = (
                self.packed(key),
                (tape as &mut dyn Any).downcast_mut::<Tape<f32>>(),
            ) {
                return linear_packed(t32, x, pc);
            }
        }
        let w = self.p(tape, &format!("{key}.weight"))?;
        let b = if bias {
            Some(self.p(tape, &format!("{key}.bias"))?)
        } else {
            None
        };
        linear(tape, x, &w, b.as_ref())
    }

    fn conv(
        &self,
        tape: &mut Tape<T>,
        x: &Var,
        key: &str,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Var> {
        // 3 × 3 stride-1 convolutions run by Winograd (f32 / AVX-512, in `conv2d_pad`) and are
        // not in the packed cache.
        if !tape.records_grad() && !winograd_conv(T::ZERO, 3, stride) {
            if let (Some(pc), Some(t32)) = (
                self.packed(&format!("{key}.conv")),
                (tape as &mut dyn Any).downcast_mut::<Tape<f32>>(),
            ) {
                return conv2d_packed(t32, x, pc, stride, pad);
            }
        }
        let w = self.p(tape, &format!("{key}.conv.weight"))?;
        let b = self.p(tape, &format!("{key}.conv.bias"))?;
        conv2d_pad(tape, x, &w, Some(&b), stride, pad)
    }

    fn group_norm(&self, tape: &mut Tape<T>, x: &Var, key: &str, act: Act) -> Result<Var> {
        let g = self.p(tape, &format!("{key}.weight"))?;
        let b = self.p(tape, &format!("{key}.bias"))?;
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

    fn layer_norm(&self, tape: &mut Tape<T>, x: &Var, key: &str) -> Result<Var> {
        let g = self.p(tape, &format!("{key}.weight"))?;
        let b = self.p(tape, &format!("{key}.bias"))?;
        // torch.nn.LayerNorm's default eps (MONAI does not set it).
        layer_norm(tape, x, &g, &b, 1e-5)
    }

    /// `DiffusionUNetResnetBlock`; `emb` is SiLU(time embedding) [N, temb].
    fn resnet(
        &self,
        tape: &mut Tape<T>,
        x: &Var,
        emb: &Var,
        key: &str,
        resample: Resample,
    ) -> Result<Var> {
        let mut hn = self.group_norm(tape, x, &format!("{key}.norm1"), Act::Silu)?;
        let mut x = x.clone();
        match resample {
            Resample::None => {}
            Resample::Up => {
                x = upsample_nearest2x(tape, &x)?;
                hn = upsample_nearest2x(tape, &hn)?;
            }
            Resample::Down => {
                x = avg_pool2x(tape, &x)?;
                hn = avg_pool2x(tape, &hn)?;
            }
        }
        let h1 = self.conv(tape, &hn, &format!("{key}.conv1"), 1, Pad2d::same(1))?;
        tape.release(&hn);
        let t = self.linear(tape, emb, &format!("{key}.time_emb_proj"), true)?;
        let h1 = add_per_sample(tape, &h1, &t)?;
        let h2 = self.group_norm(tape, &h1, &format!("{key}.norm2"), Act::Silu)?;
        tape.release(&h1);
        let h3 = self.conv(tape, &h2, &format!("{key}.conv2"), 1, Pad2d::same(1))?;
        tape.release(&h2);
        let skip_key = format!("{key}.skip_connection.conv.weight");
        let has_conv = self.params.index(&skip_key).is_ok();
        let skip = if has_conv {
            self.conv(
                tape,
                &x,
                &format!("{key}.skip_connection"),
                1,
                Pad2d::same(0),
            )?
        } else {
            x.clone()
        };
        let y = add(tape, &skip, &h3)?;
        tape.release(&h3);
        if has_conv {
            tape.release(&skip);
        }
        if resample != Resample::None {
            tape.release(&x); // the resampled input (the caller's input is not released)
        }
        Ok(y)
    }

    /// `SpatialAttentionBlock` (no conditioning) or `SpatialTransformer` (conditioning) at `level`.
    fn attention(
        &self,
        tape: &mut Tape<T>,
        x: &Var,
        ctx: Option<&Var>,
        key: &str,
        level: usize,
    ) -> Result<Var> {
        let (n, h, w, c) = match x.shape() {
            &[n, h, w, c] => (n, h, w, c),
            s => return Err(Error::Internal(format!("attention input {s:?}"))),
        };
        let (heads, hc) = self.config.heads(level);
        let xn = self.group_norm(tape, x, &format!("{key}.norm"), Act::None)?;
        let tokens = reshape(tape, &xn, &[n, h * w, c])?;
        tape.release(&xn);
        let y = if self.config.with_conditioning {
            let mut t = self.linear(tape, &tokens, &format!("{key}.proj_in.conv"), true)?;
            tape.release(&tokens);
            // `step(t) = t + f(LN(t))`, releasing everything but the new residual stream.
            let residual = |tape: &mut Tape<T>, t: Var, f: Var, extra: &[Var]| -> Result<Var> {
                let out = add(tape, &t, &f)?;
                tape.release(&t);
                tape.release(&f);
                for v in extra {
                    tape.release(v);
                }
                Ok(out)
            };
            for l in 0..self.config.transformer_num_layers {
                let b = format!("{key}.transformer_blocks.{l}");
                let a = self.layer_norm(tape, &t, &format!("{b}.norm1"))?;
                let o = self.mha(tape, &a, None, &format!("{b}.attn1"), heads, hc, false)?;
                t = residual(tape, t, o, &[a])?;
                let a = self.layer_norm(tape, &t, &format!("{b}.norm2"))?;
                let o = self.mha(tape, &a, ctx, &format!("{b}.attn2"), heads, hc, false)?;
                t = residual(tape, t, o, &[a])?;
                let a = self.layer_norm(tape, &t, &format!("{b}.norm3"))?;
                let f1 = self.linear(tape, &a, &format!("{b}.ff.linear1"), true)?;
                let g = crate::ops::gelu::geglu(tape, &f1)?;
                let f2 = self.linear(tape, &g, &format!("{b}.ff.linear2"), true)?;
                t = residual(tape, t, f2, &[a, f1, g])?;
            }
            let o = self.linear(tape, &t, &format!("{key}.proj_out.conv"), true)?;
            tape.release(&t);
            o
        } else {
            let o = self.mha(tape, &tokens, None, &format!("{key}.attn"), heads, hc, true)?;
            tape.release(&tokens);
            o
        };
        let y2 = reshape(tape, &y, &[n, h, w, c])?;
        tape.release(&y);
        let out = add(tape, &y2, x)?;
        tape.release(&y2);
        Ok(out)
    }

    /// MONAI SABlock / CrossAttentionBlock: q from `x`, k / v from `ctx` (or `x`), scale 1/√head_dim.
    #[allow(clippy::too_many_arguments)]
    fn mha(
        &self,
        tape: &mut Tape<T>,
        x: &Var,
        ctx: Option<&Var>,
        key: &str,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Var> {
        let kv = ctx.unwrap_or(x);
        let q = self.linear(tape, x, &format!("{key}.to_q"), qkv_bias)?;
        let k = self.linear(tape, kv, &format!("{key}.to_k"), qkv_bias)?;
        let v = self.linear(tape, kv, &format!("{key}.to_v"), qkv_bias)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let a = attention(tape, &q, &k, &v, heads, Some(scale))?;
        for t in [&q, &k, &v] {
            tape.release(t);
        }
        let o = self.linear(tape, &a, &format!("{key}.out_proj"), true)?;
        tape.release(&a);
        Ok(o)
    }

    /// The context var [N, L, D], with null rows replaced by the learned null vector.
    fn context(
        &self,
        tape: &mut Tape<T>,
        n: usize,
        cond: &Conditioning<'_, T>,
    ) -> Result<Option<Var>> {
        let d = match self.config.cross_attention_dim {
            Some(d) => d,
            None => return Ok(None),
        };
        let any_null = cond.context_null.is_some_and(|f| f.iter().any(|&b| b));
        let l = if cond.context.is_some() {
            cond.context_len
        } else if any_null {
            1
        } else {
            return Ok(None);
        };
        let data = match cond.context {
            Some(c) => c.to_vec(),
            None => vec![T::ZERO; n * l * d],
        };
        let ctx = tape.input(&[n, l, d], data, false)?;
        if !any_null {
            return Ok(Some(ctx));
        }
        let flags = cond.context_null.unwrap_or(&[]).to_vec();
        let null = self.p(tape, "null_context")?;
        Ok(Some(select_null_context(tape, &ctx, &null, &flags)?))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resample {
    None,
    Up,
    Down,
}

/// MONAI `get_timestep_embedding` in its float32 arithmetic: half = dim/2,
/// freqs = exp(−ln(10000)·i / half), [cos(t·f), sin(t·f)], a zero column for odd `dim`.
pub fn monai_timestep_embedding<T: Float>(timesteps: &[f64], dim: usize) -> Vec<T> {
    let half = dim / 2;
    let ln = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-ln * i as f32) / half as f32).exp())
        .collect();
    let mut out = vec![T::ZERO; timesteps.len() * dim];
    for (row, &t) in out.chunks_mut(dim).zip(timesteps) {
        let t = t as f32;
        for (i, &f) in freqs.iter().enumerate() {
            let a = (t * f) as f64;
            row[i] = T::from_f64(a.cos() as f32 as f64);
            row[half + i] = T::from_f64(a.sin() as f32 as f64);
        }
    }
    out
}

/// NCHW → NHWC copy (parallel over output rows).
pub fn nchw_to_nhwc<T: Copy + Default + Send + Sync>(
    x: &[T],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); n * c * h * w];
    let hw = h * w;
    out.par_chunks_mut((w * c).max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let (b, y) = (row / h.max(1), row % h.max(1));
            let src = &x[b * c * hw..][..c * hw];
            for xx in 0..w {
                for ch in 0..c {
                    o[xx * c + ch] = src[ch * hw + y * w + xx];
                }
            }
        });
    out
}

/// NHWC → NCHW copy (parallel over output planes).
pub fn nhwc_to_nchw<T: Copy + Default + Send + Sync>(
    x: &[T],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); n * c * h * w];
    let hw = h * w;
    out.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(plane, o)| {
            let (b, ch) = (plane / c.max(1), plane % c.max(1));
            let src = &x[b * hw * c..][..hw * c];
            for (p, v) in o.iter_mut().enumerate() {
                *v = src[p * c + ch];
            }
        });
    out
}

/// Whether `conv2d_pad` runs a k × k convolution of this stride by Winograd (f32 / AVX-512).
fn winograd_conv<T: Float>(_: T, k: usize, stride: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k == 3
            && stride == 1
            && TypeId::of::<T>() == TypeId::of::<f32>()
            && crate::backend::cpu::winograd::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, stride);
        false
    }
}

/// 2 × 2 average pooling, stride 2 (MONAI's `DiffusionUnetDownsample(use_conv=False)`), NHWC.
pub fn avg_pool2x<T: Float>(tape: &mut Tape<T>, x: &Var) -> Result<Var> {
    let (n, h, w, c) = match x.shape() {
        &[n, h, w, c] => (n, h, w, c),
        s => {
            return Err(Error::Shape(format!(
                "avg_pool2x: input must be NHWC, got {s:?}"
            )))
        }
    };
    let (oh, ow) = (h / 2, w / 2);
    if oh == 0 || ow == 0 {
        return Err(Error::Shape(format!(
            "avg_pool2x: a {h} × {w} input has no 2 × 2 window"
        )));
    }
    let xs = tape.value(x);
    let quarter = T::from_f64(0.25);
    let mut out = vec![T::ZERO; n * oh * ow * c];
    for s in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = ((s * oh + oy) * ow + ox) * c;
                for dy in 0..2 {
                    for dx in 0..2 {
                        let i = ((s * h + 2 * oy + dy) * w + 2 * ox + dx) * c;
                        for ch in 0..c {
                            out[o + ch] += xs[i + ch];
                        }
                    }
                }
                for v in &mut out[o..o + c] {
                    *v *= quarter;
                }
            }
        }
    }
    let need = tape.requires_grad(x);
    let xid = x.id();
    Ok(tape.push(&[n, oh, ow, c], out, need, move |oid, g| {
        let go = match g.take(oid) {
            Some(go) => go,
            None => return Ok(()),
        };
        g.accumulate(xid, n * h * w * c, |dx, _| {
            for s in 0..n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let o = ((s * oh + oy) * ow + ox) * c;
                        for dy in 0..2 {
                            for dx_ in 0..2 {
                                let i = ((s * h + 2 * oy + dy) * w + 2 * ox + dx_) * c;
                                for ch in 0..c {
                                    dx[i + ch] += go[o + ch] * quarter;
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok(())
    }))
}

/// Context [N, L, D] with every token of samples flagged in `null` replaced by the vector `nullv` [D].
pub fn select_null_context<T: Float>(
    tape: &mut Tape<T>,
    ctx: &Var,
    nullv: &Var,
    null: &[bool],
) -> Result<Var> {
    let (n, l, d) = match ctx.shape() {
        &[n, l, d] => (n, l, d),
        s => {
            return Err(Error::Shape(format!(
                "context must be [N, L, D], got {s:?}"
            )))
        }
    };
    if nullv.shape() != [d] || null.len() != n {
        return Err(Error::Shape(format!(
            "null context {:?} / {} flags for a context {:?}",
            nullv.shape(),
            null.len(),
            ctx.shape()
        )));
    }
    let cv = tape.value(ctx);
    let nv = tape.value(nullv);
    let mut out = cv.to_vec();
    for (s, &is_null) in null.iter().enumerate() {
        if is_null {
            for t in 0..l {
                out[(s * l + t) * d..][..d].copy_from_slice(&nv[..d]);
            }
        }
    }
    let need = tape.requires_grad(ctx) || tape.requires_grad(nullv);
    let (cid, nid) = (ctx.id(), nullv.id());
    let flags = null.to_vec();
    Ok(tape.push(&[n, l, d], out, need, move |oid, g| {
        let go = match g.take(oid) {
            Some(go) => go,
            None => return Ok(()),
        };
        g.accumulate(nid, d, |dn, _| {
            for (s, &f) in flags.iter().enumerate() {
                if f {
                    for t in 0..l {
                        for (a, b) in dn.iter_mut().zip(&go[(s * l + t) * d..][..d]) {
                            *a += *b;
                        }
                    }
                }
            }
        });
        g.accumulate(cid, n * l * d, |dc, _| {
            for (s, &f) in flags.iter().enumerate() {
                if !f {
                    let r = s * l * d..(s + 1) * l * d;
                    for (a, b) in dc[r.clone()].iter_mut().zip(&go[r]) {
                        *a += *b;
                    }
                }
            }
        });
        Ok(())
    }))
}
